#!/bin/bash
# Power cuts at every write of commit and rebase (tests/fault/chain-walk.c,
# which runs qk_commit and qk_rebase, the library calls behind `qcowkit
# commit` and `qcowkit rebase`): after each cut, qemu-img check finds no
# corruption in any image written, the top's guest view is what it was,
# and a commit's base holds in every sector its old data or the top's.
# Chains made by qemu-img: version 3 and 2, a raw base shorter than the
# top, three layers committed into the bottom one, extended L2 entries,
# compressed and zero clusters and discards in the top; rebase onto
# another image, onto none, and with -c.
. "$(dirname "$0")/../lib.sh"
need qemu-img qemu-io
prog=$(dirname "$QCOWKIT")/chain-walk
[ -x "$prog" ] || { bad chain-walk "no walker at $prog"; finish; }
stride=1
[ "${QK_SANITIZE:-}" = 1 ] && stride=3

# io FILE CMD...: qemu-io commands on FILE.
io() { local f=$1 a=() c fmt=qcow2; shift; case $f in *.raw) fmt=raw;; esac; for c in "$@"; do a+=(-c "$c"); done; qemu-io -f $fmt "${a[@]}" "$f" >/dev/null; }

# fill FILE SIZE STEP BYTE0: a different byte every STEP (sizes in KiB).
fill() {
  local f=$1 size=$2 step=$3 b=$4 i a=()
  for ((i = 0; i * step < size; i++)); do a+=("write -P $(((b + i) % 250 + 1)) $((i * step))k ${step}k"); done
  io "$f" "${a[@]}"
}

# top FILE: writes of every kind over the backing file.
top_writes() {
  io "$1" "write -P 0x41 0 64k" "write -P 0x42 200k 3k" "write -z 512k 128k" \
    "discard 1M 64k" "write -c -P 0x43 1536k 64k" "write -P 0x44 2047k 2k" \
    "write -z 3M 4k" "write -P 0x45 3580k 100k"
}

# walk NAME ARGS...: run the walker on $T/NAME.
walk() {
  local name=$1; shift
  local d=$T/$name out
  "$prog" "$1" "$d" "${@:2}" "$stride" >"$d/out" 2>"$d/err"
  local rc=$?
  sed "s/^/$name: /" "$d/out"
  if [ $rc -eq 0 ] && [ ! -s "$d/err" ]; then ok "$name"; else head -20 "$d/err" >&2; bad "$name" "chain-walk exited $rc"; fi
}

mk() { qemu-img create -q "$@"; }

# commit: v3, 4 KiB clusters (many L2 and refcount updates), top emptied
d=$T/c-v3; mkdir -p "$d"
mk -f qcow2 -o cluster_size=4k "$d/base.qcow2" 4M && fill "$d/base.qcow2" 4096 256 1 &&
  mk -f qcow2 -o cluster_size=4k -b base.qcow2 -F qcow2 "$d/top.qcow2" && top_writes "$d/top.qcow2" &&
  walk c-v3 commit 1 1

# commit -d into a version 2 base (zeros written as data)
d=$T/c-v2; mkdir -p "$d"
mk -f qcow2 -o compat=0.10,cluster_size=8k "$d/base.qcow2" 4M && fill "$d/base.qcow2" 4096 512 7 &&
  mk -f qcow2 -o compat=0.10 -b base.qcow2 -F qcow2 "$d/top.qcow2" && top_writes "$d/top.qcow2" &&
  walk c-v2 commit 1 0

# commit into a raw base half the top's size: the base grows first
d=$T/c-raw; mkdir -p "$d"
mk -f raw "$d/base.raw" 2M && fill "$d/base.raw" 2048 256 3 &&
  mk -f qcow2 -b base.raw -F raw "$d/top.qcow2" 4M && top_writes "$d/top.qcow2" &&
  walk c-raw commit 1 1

# commit -b: three layers into the bottom one (the middle one stays)
d=$T/c-deep; mkdir -p "$d"
mk -f qcow2 -o cluster_size=4k "$d/base.qcow2" 4M && fill "$d/base.qcow2" 4096 512 5 &&
  mk -f qcow2 -b base.qcow2 -F qcow2 "$d/mid.qcow2" && io "$d/mid.qcow2" "write -P 0x51 100k 300k" "write -z 2M 64k" &&
  mk -f qcow2 -b mid.qcow2 -F qcow2 "$d/top.qcow2" && top_writes "$d/top.qcow2" &&
  walk c-deep commit 2 0

# commit with extended L2 entries (subclusters) in both
d=$T/c-extl2; mkdir -p "$d"
mk -f qcow2 -o extended_l2=on,cluster_size=32k "$d/base.qcow2" 4M && fill "$d/base.qcow2" 4096 256 9 &&
  mk -f qcow2 -o extended_l2=on,cluster_size=32k -b base.qcow2 -F qcow2 "$d/top.qcow2" &&
  top_writes "$d/top.qcow2" && walk c-extl2 commit 1 1

# rebase onto another image (4 KiB clusters), onto none, and compressed
for r in "r-new new.qcow2 qcow2 0" "r-none '' '' 0" "r-compress new.qcow2 qcow2 1"; do
  eval "set -- $r"
  d=$T/$1; mkdir -p "$d"
  mk -f qcow2 "$d/old.qcow2" 4M && fill "$d/old.qcow2" 4096 128 11 &&
    mk -f qcow2 "$d/new.qcow2" 4M && fill "$d/new.qcow2" 2048 128 11 &&
    io "$d/new.qcow2" "write -P 0x77 512k 64k" &&
    mk -f qcow2 -o cluster_size=4k -b old.qcow2 -F qcow2 "$d/top.qcow2" &&
    top_writes "$d/top.qcow2" && walk "$1" rebase "$2" "$3" "$4"
done

# rebase with extended L2 entries: subclusters written, the rest left
d=$T/r-extl2; mkdir -p "$d"
mk -f qcow2 "$d/old.qcow2" 4M && fill "$d/old.qcow2" 4096 64 13 &&
  mk -f qcow2 "$d/new.qcow2" 4M && fill "$d/new.qcow2" 4096 128 13 &&
  mk -f qcow2 -o extended_l2=on,cluster_size=64k -b old.qcow2 -F qcow2 "$d/top.qcow2" &&
  top_writes "$d/top.qcow2" && walk r-extl2 rebase new.qcow2 qcow2 0
finish
