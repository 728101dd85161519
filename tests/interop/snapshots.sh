#!/usr/bin/env bash
# Internal snapshots over a matrix of layouts, judged by QEMU 7.2: the
# snapshots qcowkit takes, applies and deletes, and the images it leaves,
# must be exactly QEMU's, and each tool must take up where the other left.
#
# Layouts (a covering set, not the cross product): v2 with 64k and 512 B
# clusters; v3 with 512 B/refcount_bits=8, 4k/4, 4k/64, 64k/16, 2M/32;
# extended L2 (64k, and 16k with refcount_bits=8: two L1 entries); zstd
# compression; lazy refcounts; an overlay over a backing file. Sizes end in
# a partial cluster where clusters are larger than 512 B, and the small
# cluster sizes span several L2 tables.
#
# Each layout: a seeded workload (write -P, write -z, discard, and write
# -c into fresh clusters) in phases, alternately through qemu-io and
# `qcowkit io` (whose result must equal qemu-io's on a copy), and after
# each phase the guest content is saved raw and a snapshot taken,
# alternately by qcowkit and qemu-img. Then:
#   - info, map and check --output=json equal qemu-img's (readcmp's jsub.py
#     rules), info's "snapshots" lists are identical, and snapshot -l, info
#     and map (human) print exactly what qemu-img prints;
#   - every snapshot read by qemu-img convert -l and by qcowkit convert -l
#     (by name, id, snapshot.name=, snapshot.id=...,snapshot.name=) equals
#     the content saved when it was taken;
#   - qemu-img applies one snapshot and qcowkit io writes; qcowkit applies
#     another (by id) and qemu-io writes; after each apply the active disk
#     is the saved content; qcowkit takes one more snapshot over the
#     applied tables; the reads above again;
#   - the snapshots are deleted one by one, alternately by qcowkit and
#     qemu-img, and after each delete the others still read as saved (by
#     the two tools in turn) and the active disk is unchanged.
# qemu-img check finds no errors and no leaks after every step (each
# workload, create, apply and delete).
# Refcount limits, bitmaps, data files, names, ids, messages, -U, -q and
# sizes: snapshots-cli.sh; 1,000 snapshots: snapshots-many.sh; serve -l:
# nbd/snapshot.sh.
# QK_SEED (default 5151) changes the workloads; a failure names the seed.
# Under the sanitizers (QK_SANITIZE) the layouts run 3 phases, not 4.
# shellcheck source=../lib.sh
. "$(dirname "$0")/../lib.sh"
# shellcheck source=readcmp.bash
. "$(dirname "$0")/readcmp.bash"
# shellcheck source=snapshots.bash
. "$(dirname "$0")/snapshots.bash"
need qemu-img qemu-io python3

cd "$T" || exit 1
SEED=${QK_SEED:-5151}
M=1048576
K=1024
PHASES=4
OPS=10
if [ -n "${QK_SANITIZE:-}" ]; then PHASES=3; fi

# gen_ops SIZE CS: $OPS qemu-io commands into $T/ops, drawn from RANDOM
# (seeded per layout): write -P, write -z and discard at sector-aligned
# offsets (a fifth at cluster boundaries), and, when COMPRESS is 1,
# write -c -P into clusters never written before (QEMU refuses compressed
# writes over allocated clusters), which USED remembers. It runs in the
# calling shell (no subshell), so RANDOM's sequence goes on across calls.
# The compressed writes of a batch come first: qemu-io 7.2 keeps
# compressing into a host cluster that a later write in the same process
# freed and took for normal data (refcount 2 with OFLAG_COPIED: qemu-img
# check errors caused by QEMU itself).
declare -A USED
COMPRESS=1
rnd30() { r30=$((((RANDOM << 15) | RANDOM) % $1)); }
mark() { local c; for ((c = $1 / $3; c <= ($1 + $2 - 1) / $3; c++)); do USED[$c]=1; done; }
gen_ops() {
  local size=$1 cs=$2 i k c cnt off ln tries ns=$(($1 / 512)) nc=$(($1 / $2)) maxs
  maxs=$((4 * cs > 16384 ? 4 * cs : 16384))
  maxs=$(((maxs > 524288 ? 524288 : maxs) / 512))
  : >"$T/ops"
  : >"$T/ops.c"
  for ((i = 0; i < OPS; i++)); do
    k=$((RANDOM % 10))
    if ((k < 2 && COMPRESS)); then
      for ((tries = 0; tries < 20; tries++)); do
        rnd30 "$nc"
        c=$r30
        [ -z "${USED[$c]:-}" ] && break
      done
      if ((tries < 20)); then
        cnt=1
        while ((cnt < 3 && c + cnt < nc && RANDOM % 2)) && [ -z "${USED[$((c + cnt))]:-}" ]; do
          cnt=$((cnt + 1))
        done
        mark $((c * cs)) $((cnt * cs)) "$cs"
        echo "write -c -P $((RANDOM % 255 + 1)) $((c * cs)) $((cnt * cs))" >>"$T/ops.c"
        continue
      fi
    fi
    rnd30 "$ns"
    off=$((r30 * 512))
    if ((RANDOM % 5 == 0)); then rnd30 "$nc"; off=$((r30 * cs)); fi
    rnd30 "$maxs"
    ln=$(((r30 + 1) * 512))
    ((off + ln > size)) && ln=$((size - off))
    if ((k < 6)); then echo "write -P $((RANDOM % 255 + 1)) $off $ln"
    elif ((k < 8)); then echo "write -z $off $ln"
    else echo "discard $off $ln"; fi >>"$T/ops"
    ((k < 8)) && mark "$off" "$ln" "$cs"
  done
  cat "$T/ops" >>"$T/ops.c"
  mv "$T/ops.c" "$T/ops"
}

# work NAME TOOL IMG CS SIZE: a seeded workload through TOOL (qemu-io, or
# qcowkit io judged by qemu-io on a copy: the same guest content), then chk.
work() {
  local n=$1 tool=$2 img=$3 cs=$4 size=$5 c
  local -a a=()
  gen_ops "$size" "$cs"
  while IFS= read -r c; do a+=(-c "$c"); done <"$T/ops"
  if [ "$tool" = qk ]; then
    cp "$img" "$T/ref-$img"
    if ! qemu-io -t unsafe -f qcow2 "$T/ref-$img" "${a[@]}" >"$T/qio.out" 2>&1 ||
      grep -qi 'error\|fail' "$T/qio.out"; then
      bad "$n" "test bug: qemu-io failed [seed $SEED]: $(head -c 300 "$T/qio.out")"
      return
    fi
    run_qk "$T/io.out" "$T/io.err" io -f qcow2 "$img" "${a[@]}"
    if [ "$qk_rc" -ne 0 ]; then bad "$n" "$(qk_why "$T/io.err") [seed $SEED]"; return; fi
    if qemu-img compare -q -f qcow2 -F qcow2 "$T/ref-$img" "$img" >"$T/cmp.out" 2>&1; then ok
    else bad "$n: qcowkit io = qemu-io" "[seed $SEED] guest content differs: $(head -c 200 "$T/cmp.out")"; fi
  elif ! qemu-io -t unsafe -f qcow2 "$img" "${a[@]}" >"$T/qio.out" 2>&1 ||
    grep -qi 'error\|fail' "$T/qio.out"; then
    bad "$n" "test bug: qemu-io failed [seed $SEED]: $(head -c 300 "$T/qio.out")"
    return
  fi
  chk "$n: after the workload" "$img"
}

# layout NAME SIZE CS CREATE-ARGS...: the whole life of one layout.
nlayouts=0
layout() {
  local name=$1 size=$2 cs=$3
  shift 3
  local img=$name.qcow2 k tool i j w
  nlayouts=$((nlayouts + 1))
  RANDOM=$((SEED + nlayouts))
  USED=()
  setup qemu-img create -q -f qcow2 "$@" "$img" "$size" || return
  # phases: a workload (qemu-io, qcowkit io, ...), the content saved, a
  # snapshot (qcowkit after qemu-io's writes, qemu-img after qcowkit's)
  for ((k = 1; k <= PHASES; k++)); do
    if ((k % 2)); then tool=qemu; else tool=qk; fi
    work "$name: workload $k" "$tool" "$img" "$cs" "$size"
    setup qemu-img convert -t unsafe -O raw "$img" "$name-s$k.raw" || return
    if ((k % 2)); then tool=qk; else tool=qemu; fi
    sn "$name: create $k ($tool)" "$tool" "$img" -c "snap $k" || return
  done
  reads "$name" "$img"
  # every snapshot, as both tools read it, by the ways -l names one
  for ((k = 1; k <= PHASES; k++)); do
    content "$name: qemu-img convert -l $k" qemu "$img" "$name-s$k.raw" -l "snap $k"
    case $((k % 4)) in
    1) content "$name: convert -l NAME ($k)" qk "$img" "$name-s$k.raw" -l "snap $k" ;;
    2) content "$name: convert -l ID ($k)" qk "$img" "$name-s$k.raw" -l "$k" ;;
    3) content "$name: convert -l snapshot.name= ($k)" qk "$img" "$name-s$k.raw" -l "snapshot.name=snap $k" ;;
    0) content "$name: convert -l snapshot.id=,snapshot.name= ($k)" qk "$img" "$name-s$k.raw" \
         -l "snapshot.id=$k,snapshot.name=snap $k" ;;
    esac
  done
  # apply: qemu-img to snapshot 2, then qcowkit io writes; qcowkit to
  # snapshot 1 (by id), then qemu-io writes and qcowkit takes one more
  sn "$name: apply 2 (qemu)" qemu "$img" -a "snap 2" &&
    content "$name: active after apply 2" qemu "$img" "$name-s2.raw"
  work "$name: workload after apply 2" qk "$img" "$cs" "$size"
  sn "$name: apply 1 (qk)" qk "$img" -a 1 &&
    content "$name: active after apply 1" qemu "$img" "$name-s1.raw"
  work "$name: workload after apply 1" qemu "$img" "$cs" "$size"
  k=$((PHASES + 1))
  setup qemu-img convert -t unsafe -O raw "$img" "$name-s$k.raw" || return
  sn "$name: create $k after apply (qk)" qk "$img" -c "snap $k"
  work "$name: workload after create $k" qk "$img" "$cs" "$size"
  setup qemu-img convert -t unsafe -O raw "$img" "$name-active.raw" || return
  reads "$name: after applies" "$img"
  # deletes, alternating qcowkit and qemu-img: 2, PHASES+1, 1, 3, 4...
  local -a order=(2 "$k" 1) left
  for ((i = 3; i <= PHASES; i++)); do order+=("$i"); done
  left=("${order[@]}")
  i=0
  for k in "${order[@]}"; do
    if ((i % 2)); then tool=qemu; else tool=qk; fi
    i=$((i + 1))
    sn "$name: delete $k ($tool)" "$tool" "$img" -d "snap $k" || return
    left=("${left[@]:1}")
    w=qemu
    for j in "${left[@]}"; do
      content "$name: snapshot $j after delete $k ($w)" "$w" "$img" "$name-s$j.raw" -l "snap $j"
      if [ $w = qemu ]; then w=qk; else w=qemu; fi
    done
    content "$name: active after delete $k" "$tool" "$img" "$name-active.raw"
  done
  if [ -z "$(qemu-img snapshot -l "$img")" ]; then ok
  else bad "$name: all deleted" "qemu-img still lists some"; fi
  rm -f "$name"-*.raw
}

t0=$SECONDS
qemu-img create -q -f qcow2 base.qcow2 $((3 * M))
qemu-io -f qcow2 -c 'write -P 0xb0 0 3M' -c 'write -c -P 0xb1 1M 128k' -c 'write -z 2M 64k' \
  base.qcow2 >/dev/null

layout v2-64k $((48 * 64 * K + 1536)) $((64 * K)) -o compat=0.10
layout v2-512 $((192 * K + 512)) 512 -o compat=0.10,cluster_size=512
layout v3-512-rc8 $((160 * K + 1024)) 512 -o cluster_size=512,refcount_bits=8
# refcount_bits=4 holds 15: compressed clusters share host clusters, and
# five snapshots of a host cluster holding three of them pass it
COMPRESS=0
layout v3-4k-rc4 $((5 * M / 2 + 512)) $((4 * K)) -o cluster_size=4k,refcount_bits=4
COMPRESS=1
layout v3-4k-rc64 $((9 * M / 4)) $((4 * K)) -o cluster_size=4k,refcount_bits=64
layout v3-64k $((40 * 64 * K + 1536)) $((64 * K))
layout v3-2M-rc32 $((10 * 2 * M + 1536)) $((2 * M)) -o cluster_size=2M,refcount_bits=32
layout v3-64k-xl2 $((40 * 64 * K + 1536)) $((64 * K)) -o extended_l2=on
layout v3-16k-xl2-rc8 $((17 * M + 2048)) $((16 * K)) -o cluster_size=16k,extended_l2=on,refcount_bits=8
layout v3-64k-zstd $((40 * 64 * K)) $((64 * K)) -o compression_type=zstd
layout v3-64k-lazy $((40 * 64 * K)) $((64 * K)) -o lazy_refcounts=on
layout v3-64k-backing $((3 * M + 1536)) $((64 * K)) -b base.qcow2 -F qcow2
echo "layout matrix: $nlayouts layouts, $PHASES phases of $OPS operations, $((SECONDS - t0)) s"
finish
