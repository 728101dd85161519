#!/usr/bin/env bash
# commit: `qcowkit commit` against `qemu-img commit` (7.2). Each case builds
# a backing chain with qemu-img and qemu-io (relative names), copies it into
# two directories, commits one with qemu-img and the other with qcowkit
# (same arguments), then for every file of the chain:
#   - qemu-img compare finds the guest content identical;
#   - qemu-img info gives the same virtual size and backing fields;
#   - qemu-img map --output=json agrees in start, length, depth, present,
#     zero and data (what was committed and what the top kept), but for
#     ranges of an image that read as its own zeros, allocated or not;
#   - qemu-img check is clean on ours.
# Errors (no backing file, a -b not in the chain) as qemu-img's.
# shellcheck source=../lib.sh
. "$(dirname "$0")/../lib.sh"
need qemu-img qemu-io python3
# shellcheck source=chaincmp.bash
. "$(dirname "$0")/chaincmp.bash"
cd "$T" || exit 1
only=${1:-}

# run NAME SETUP ARGS...: SETUP builds the chain in the current directory
# (top image: top.qcow2); both tools commit it with ARGS.
run() {
  local name=$1 setup=$2; shift 2
  [ -n "$only" ] && [ "$only" != "$name" ] && return
  mkdir -p "$name/src" && (cd "$name/src" && $setup) || { bad "$name" setup; return; }
  cp -a "$name/src" "$name/ref"; cp -a "$name/src" "$name/our"
  local r o
  r=$(cd "$name/ref" && qemu-img commit "$@" top.qcow2 2>&1; echo "rc=$?")
  o=$(cd "$name/our" && "$QCOWKIT" commit "$@" top.qcow2 2>&1; echo "rc=$?")
  same_results "$name" "$r" "$o"
}

two_v3() {
  mk -f qcow2 base.qcow2 4M; io qcow2 base.qcow2 -c 'write -P 1 0 3M'
  mk -f qcow2 -b base.qcow2 -F qcow2 top.qcow2
  io qcow2 top.qcow2 -c 'write -P 2 64k 192k' -c 'write -z 1M 128k' -c 'write -c -P 3 2M 64k' \
     -c 'write -P 4 3000k 5k' -c 'discard 3M 64k'
}
three_v2() {
  mk -f qcow2 -o compat=0.10 base.qcow2 2M; io qcow2 base.qcow2 -c 'write -P 1 0 2M'
  mk -f qcow2 -o compat=0.10 -b base.qcow2 -F qcow2 mid.qcow2
  io qcow2 mid.qcow2 -c 'write -P 5 512k 512k' -c 'write -P 0x15 1536k 64k'
  mk -f qcow2 -o compat=0.10 -b mid.qcow2 -F qcow2 top.qcow2 3M
  io qcow2 top.qcow2 -c 'write -P 6 768k 64k' -c 'write -P 7 2500k 100k'
}
raw_short() {
  head -c 1200000 /dev/urandom >base.raw
  mk -f qcow2 -b base.raw -F raw top.qcow2 4M
  io qcow2 top.qcow2 -c 'write -P 8 100k 50k' -c 'write -z 300k 200k' -c 'write -P 9 3M 64k'
}
extl2() {
  mk -f qcow2 -o extended_l2=on base.qcow2 2M; io qcow2 base.qcow2 -c 'write -P 1 0 2M'
  mk -f qcow2 -o extended_l2=on,cluster_size=128k -b base.qcow2 -F qcow2 mid.qcow2
  io qcow2 mid.qcow2 -c 'write -P 2 4k 4k' -c 'write -z 64k 8k' -c 'write -P 3 300k 20k'
  mk -f qcow2 -o extended_l2=on -b mid.qcow2 -F qcow2 top.qcow2
  io qcow2 top.qcow2 -c 'write -P 4 10k 2k' -c 'write -z 1M 4k' -c 'write -c -P 5 1536k 64k'
}
four_rel() {
  mkdir -p d1/d2
  mk -f qcow2 -o cluster_size=4k d1/d2/base.qcow2 1M; io qcow2 d1/d2/base.qcow2 -c 'write -P 1 0 1M'
  mk -f qcow2 -b d2/base.qcow2 -F qcow2 d1/low.qcow2; io qcow2 d1/low.qcow2 -c 'write -P 2 0 256k'
  mk -f qcow2 -b d1/low.qcow2 -F qcow2 mid.qcow2; io qcow2 mid.qcow2 -c 'write -P 3 128k 256k' -c 'write -z 512k 64k'
  mk -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2; io qcow2 top.qcow2 -c 'write -P 4 200k 300k'
}

run two-v3 two_v3
run two-v3-d two_v3 -d
run two-v3-q two_v3 -q -p -t none -r 1G
run three-v2 three_v2
run three-v2-b three_v2 -b base.qcow2
run three-v2-bmid three_v2 -b mid.qcow2
run raw-short raw_short
run extl2 extl2
run extl2-b extl2 -b base.qcow2
run four-rel four_rel
run four-rel-b four_rel -b d1/d2/base.qcow2
run four-rel-blow four_rel -b d1/low.qcow2
run no-such-base two_v3 -b nope.qcow2
run base-is-top two_v3 -b top.qcow2

mk -f qcow2 alone.qcow2 1M
o=$("$QCOWKIT" commit alone.qcow2 2>&1); rc=$?
[ $rc = 1 ] && [ "$o" = "qcowkit: Image does not have a backing file" ] && ok alone || bad alone "$rc $o"
finish
