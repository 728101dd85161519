#!/usr/bin/env bash
# bench/snapshot.sh -- internal snapshots: `qcowkit snapshot` against
# `qemu-img snapshot`, side by side.
#
# Usage: bench/snapshot.sh [--clean | --clean-only] [QCOWKIT_BINARY] [ROUNDS]
#   QCOWKIT_BINARY  default: <repo>/build/qcowkit
#   ROUNDS          default: 3
#   BENCH_MANY      snapshots in the many-snapshots run (default 1000)
#
# Image (made once in ${BENCH_DIR:-/tmp}/qksbench and reused): half-100G,
# a 100 GiB qcow2 (64 KiB clusters) whose first 50 GiB are allocated
# (preallocation=metadata, then grown): 819,200 data clusters, 50% of the
# disk, in a sparse file. Each round copies it (sparse) once per tool and
# times, per tool: snapshot -c (take), -a (apply, after a write that
# unshares one L2 table), -d (delete); then, on a small image, 1,000
# snapshots taken one command each, listed, and deleted. Every image is
# checked by qemu-img afterwards (0 errors, 0 leaks). Prints the seconds
# of each run and, per round, qemu-img time / qcowkit time (> 1: qcowkit
# faster), then the medians of those ratios.
set -euo pipefail
export LC_ALL=C

# shellcheck source=common.bash
. "$(dirname "${BASH_SOURCE[0]}")/common.bash"
bench_args 3 "$@"
bench_workdir qksbench
if [ ! -f "$W/half-100G.qcow2" ]; then
  qemu-img create -q -f qcow2 -o preallocation=metadata "$W/half-100G.qcow2" 50G
  qemu-img resize -q "$W/half-100G.qcow2" 100G
fi

clean_check() {
  local out
  out=$(qemu-img check --output=json "$1")
  python3 -c 'import json,sys; d=json.load(sys.stdin); sys.exit(d.get("corruptions",0) or d.get("leaks",0) or d.get("check-errors",0))' <<<"$out" ||
    { echo "snapshot.sh: $1 is not clean after $2" >&2; exit 1; }
}

# many TOOL IMG: 1,000 snapshots taken, listed, deleted.
many() {
  local tool=$1 img=$2 i
  for i in $(seq 1 "${BENCH_MANY:-1000}"); do "$tool" snapshot -c "s$i" "$img"; done
  "$tool" snapshot -l "$img" >/dev/null
  for i in $(seq 1 "${BENCH_MANY:-1000}"); do "$tool" snapshot -d "s$i" "$img"; done
}

declare -A r
ops="take apply delete many-snapshots"
for round in $(seq 1 "$ROUNDS"); do
  declare -A t
  for tool in qemu-img "$QCOWKIT"; do
    name=$(basename "$tool")
    img="$W/$name.qcow2"
    cp --sparse=always "$W/half-100G.qcow2" "$img"
    t[$name,take]=$(bench_secs /dev/null "$tool" snapshot -c s1 "$img")
    qemu-io -c "write -P 7 0 64k" "$img" >/dev/null
    t[$name,apply]=$(bench_secs /dev/null "$tool" snapshot -a s1 "$img")
    t[$name,delete]=$(bench_secs /dev/null "$tool" snapshot -d s1 "$img")
    clean_check "$img" "$name take/apply/delete"
    rm -f "$img"
    qemu-img create -q -f qcow2 "$img" 1G
    qemu-io -c "write -P 1 0 16M" "$img" >/dev/null
    t[$name,many-snapshots]=$(bench_secs /dev/null many "$tool" "$img")
    clean_check "$img" "$name 1000 snapshots"
    rm -f "$img"
  done
  for op in $ops; do
    a=${t[qemu-img,$op]} b=${t[qcowkit,$op]}
    ratio=$(echo "$a / $b" | bc -l)
    r[$op]="${r[$op]:-} $ratio"
    printf 'round %d %-15s qemu-img %.3f s  qcowkit %.3f s  ratio %.2f\n' "$round" "$op" "$a" "$b" "$ratio"
  done
  unset t
done
for op in $ops; do
  # shellcheck disable=SC2086
  printf 'median %-15s qemu-img/qcowkit %.2f\n' "$op" \
    "$(printf '%s\n' ${r[$op]} | sort -g | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}')"
done
