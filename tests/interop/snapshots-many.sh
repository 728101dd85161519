#!/usr/bin/env bash
# 1,000 internal snapshots: qcowkit takes them one by one (with writes
# between every quarter), lists them as qemu-img lists them (snapshot -l,
# info and map, human and JSON), reads the old ones back as saved, then
# deletes them all, oldest first (a prune); qemu-img check is clean after
# the creates, half way through the deletes and at the end, and the
# active disk is what it was. qemu-img takes the last 10 snapshots on a
# copy of the image as it was before them, and deletes the first 10 on a
# copy of the full image; its results must equal ours (ids, names, check),
# and the time per operation of the two tools at the same table size is
# printed side by side as a ratio (not asserted: qemu-img takes 100-250 ms
# an operation at this size, so it does only 10 of each).
# The scratch directory is in /dev/shm when there is one: the table work is
# measured, not the disk's sync latency (qcowkit syncs a dozen times per
# snapshot; on a slow disk 1,000 would take minutes).
# Under the sanitizers (QK_SANITIZE) 250 snapshots, not 1,000.
if [ -d /dev/shm ] && [ -w /dev/shm ]; then export TMPDIR=/dev/shm; fi
# shellcheck source=../lib.sh
. "$(dirname "$0")/../lib.sh"
# shellcheck source=readcmp.bash
. "$(dirname "$0")/readcmp.bash"
# shellcheck source=snapshots.bash
. "$(dirname "$0")/snapshots.bash"
need qemu-img qemu-io python3

cd "$T" || exit 1
N=1000
[ -n "${QK_SANITIZE:-}" ] && N=250
Q=10              # operations timed for qemu-img

us() { us=${EPOCHREALTIME/./}; }      # microseconds now, into $us
tagcols() { qemu-img snapshot -l "$1" | awk 'NR > 2 { print $1, $2 }'; }

qemu-img create -q -f qcow2 many.qcow2 64M
setup qemu-io -f qcow2 -c 'write -P 0x11 0 4M' -c 'write -c -P 0x12 8M 1M' many.qcow2
# $N snapshots, a write before each quarter's first; qemu-img's copy is
# made before the last $Q. Only qcowkit's time counts (skip: the rest).
us; t0=$us; skip=0
failed=
for ((i = 1; i <= N; i++)); do
  if ((i % (N / 4) == 1)); then
    us; a=$us
    setup qemu-io -t unsafe -f qcow2 -c "write -P $((i % 200 + 32)) $((i / (N / 4)))M 64k" many.qcow2
    setup qemu-img convert -t unsafe -O raw many.qcow2 "many-$i.raw"
    us; skip=$((skip + us - a))
  fi
  if ((i == N - Q + 1)); then
    us; a=$us
    cp many.qcow2 q.qcow2
    us; skip=$((skip + us - a)); tail0=$us
  fi
  if ! "$QCOWKIT" snapshot -c "s$i" many.qcow2 2>"$T/err"; then
    failed="snapshot -c s$i: $(head -c 300 "$T/err")"
    break
  fi
done
us; t_create=$((us - t0 - skip)); t_tail=$((us - tail0))
if [ -z "$failed" ]; then ok; else bad "create $N" "$failed"; fi
chk "after $N creates" many.qcow2
us; t0=$us
run_qk list.out list.err snapshot -l many.qcow2
us; t_list=$((us - t0))
[ "$qk_rc" -eq 0 ] && [ "$(wc -l <list.out)" -eq $((N + 2)) ] && ok ||
  bad "list" "exit $qk_rc, $(wc -l <list.out) lines"
reads "$N snapshots" many.qcow2
for ((i = 1; i <= N; i += N / 4)); do
  content "content of s$i" qk many.qcow2 "many-$i.raw" -l "s$i"
done
setup qemu-img convert -t unsafe -O raw many.qcow2 many-active.raw

# qemu-img: the last $Q creates on the copy, the first $Q deletes on another
us; t0=$us
for ((i = N - Q + 1; i <= N; i++)); do
  qemu-img snapshot -c "s$i" q.qcow2 || break
done
us; q_create=$((us - t0))
[ "$(tagcols q.qcow2)" = "$(tagcols many.qcow2)" ] && ok ||
  bad "qemu-img's creates" "ids or names differ from qcowkit's"
chk "qemu-img's creates" q.qcow2
cp many.qcow2 q.qcow2
us; t0=$us
for ((i = 1; i <= Q; i++)); do
  qemu-img snapshot -d "s$i" q.qcow2 || break
done
us; q_delete=$((us - t0))
chk "qemu-img's deletes" q.qcow2

# the prune, oldest first; half way, the last quarter's first snapshot is
# still there
last=$(((N - 1) / (N / 4) * (N / 4) + 1))
us; t0=$us; skip=0
failed=
for ((i = 1; i <= N; i++)); do
  if ((i == N / 2 + 1)); then
    us; a=$us
    chk "half deleted" many.qcow2
    content "s$last half way" qk many.qcow2 "many-$last.raw" -l "s$last"
    us; skip=$((skip + us - a))
  fi
  if ! "$QCOWKIT" snapshot -d "s$i" many.qcow2 2>"$T/err"; then
    failed="snapshot -d s$i: $(head -c 300 "$T/err")"
    break
  fi
  if ((i == Q)); then
    us; a=$us; t_head=$((us - t0))
    [ "$(tagcols many.qcow2)" = "$(tagcols q.qcow2)" ] && ok ||
      bad "deletes" "qemu-img's first $Q deletes leave other snapshots than qcowkit's"
    us; skip=$((skip + us - a))
  fi
done
us; t_delete=$((us - t0 - skip))
if [ -z "$failed" ]; then ok; else bad "delete $N" "$failed"; fi
chk "after the prune" many.qcow2
[ -z "$(qemu-img snapshot -l many.qcow2)" ] && ok || bad "prune" "snapshots left"
content "active after the prune" qemu many.qcow2 many-active.raw

fs=$(stat -f -c %T "$T")
awk -v fs="$fs" -v n="$N" -v q="$Q" -v c="$t_create" -v l="$t_list" -v d="$t_delete" \
  -v ct="$t_tail" -v dh="$t_head" -v qc="$q_create" -v qd="$q_delete" 'BEGIN {
  printf "%d snapshots: qcowkit create %.1f s (%.1f ms each), list %.3f s, delete %.1f s (%.1f ms each)\n",
    n, c / 1e6, c / n / 1e3, l / 1e6, d / 1e6, d / n / 1e3
  printf "ratio at %d snapshots on %s, %d operations each: create qcowkit %.1f ms, qemu-img %.1f ms (qemu-img/qcowkit x%.1f); delete qcowkit %.1f ms, qemu-img %.1f ms (x%.1f)\n",
    n, fs, q, ct / q / 1e3, qc / q / 1e3, qc / ct, dh / q / 1e3, qd / q / 1e3, qd / dh
}'
finish
