# Sourced by the tests/fault drivers (after tests/lib.sh).
#
# make_start DIR LAZY: DIR/base.qcow2 (1 MiB, a different byte in every
# 4 KiB) and DIR/start.qcow2 over it: 512-byte clusters, 64-bit refcounts
# (so a refcount block covers 32 KiB and one refcount table cluster 2 MiB
# of file), lazy_refcounts=LAZY, 1 MiB (L1 of one cluster). Data in
# [0, 64k), compressed clusters in [64k, 96k) and zero clusters in
# [96k, 104k), all shared with snapshot s1; private data in [128k, 160k);
# the backing file everywhere else. tests/fault/fault-walk.c relies on it.
#
# make_start DIR LAZY OPTS: the same with the create options OPTS instead
# of 512-byte clusters and 64-bit refcounts (compressed clusters written
# 16 KiB at a time, so clusters up to 16 KiB).
make_start() {
  local d=$1 lazy=$2 opts=${3:-cluster_size=512,refcount_bits=64} i cmds=()
  qemu-img create -q -f qcow2 "$d/base.qcow2" 1M || return 1
  for i in $(seq 0 255); do cmds+=(-c "write -P $((i % 250 + 1)) $((i * 4096)) 4096"); done
  qemu-io "${cmds[@]}" "$d/base.qcow2" >/dev/null || return 1
  qemu-img create -q -f qcow2 -o "$opts,lazy_refcounts=$lazy" \
    -b base.qcow2 -F qcow2 "$d/start.qcow2" 1M || return 1
  local step=4096
  [ -n "${3:-}" ] && step=16384
  cmds=()
  for i in $(seq 0 15); do cmds+=(-c "write -P $((0x40 + i)) $((i * 4096)) 4096"); done
  for i in $(seq 0 $((32768 / step - 1))); do
    cmds+=(-c "write -c -P $((0x60 + i)) $((65536 + i * step)) $step")
  done
  cmds+=(-c "write -z 98304 8192")
  qemu-io "${cmds[@]}" "$d/start.qcow2" >/dev/null || return 1
  qemu-img snapshot -c s1 "$d/start.qcow2" || return 1
  cmds=()
  for i in $(seq 0 7); do cmds+=(-c "write -P $((0x80 + i)) $((131072 + i * 4096)) 4096"); done
  qemu-io "${cmds[@]}" "$d/start.qcow2" >/dev/null || return 1
  qemu-img check -q "$d/start.qcow2"
}

# walk NAME MODE LAZY STRIDE [ASAN_STRIDE [OPTS]]: make the images (OPTS:
# see make_start) and run the walker (every STRIDE-th point; ASAN_STRIDE
# under the sanitizers, where each point costs more); its summary lines go
# to stdout.
walk() {
  local name=$1 mode=$2 lazy=$3 stride=$4 opts=${6:-} d="$T/$1"
  [ "${QK_SANITIZE:-}" = 1 ] && stride=${5:-$((stride * 3))}
  local prog
  prog=$(dirname "$QCOWKIT")/fault-walk
  if [ ! -x "$prog" ]; then bad "$name" "no walker at $prog"; return; fi
  mkdir -p "$d"
  if ! make_start "$d" "$lazy" $opts; then bad "$name" "could not make the starting image"; return; fi
  if [ -n "$opts" ]; then
    FAULT_WALK_OTHER=1 "$prog" "$mode" "$d/start.qcow2" "$d" "$stride" >"$d/out" 2>"$d/err"
  else
    "$prog" "$mode" "$d/start.qcow2" "$d" "$stride" >"$d/out" 2>"$d/err"
  fi
  local rc=$?
  sed "s/^/$name: /" "$d/out"
  if [ $rc -eq 0 ] && [ ! -s "$d/err" ]; then
    ok "$name"
  else
    head -30 "$d/err" >&2
    bad "$name" "fault-walk $mode exited $rc"
  fi
}
