#!/usr/bin/env bash
# rebase: `qcowkit rebase` against `qemu-img rebase` (7.2). Each case builds
# a backing chain and other images with qemu-img and qemu-io (relative
# names), copies them into two directories, rebases the top image of one
# with qemu-img and of the other with qcowkit (same arguments), then for
# every file (the rebased image first, with its old and new backing):
#   - qemu-img compare finds the guest content identical;
#   - qemu-img info gives the same virtual size and backing fields;
#   - qemu-img map --output=json agrees in start, length, depth, present,
#     zero and data (what was committed and what the top kept), but for
#     ranges of an image that read as its own zeros, allocated or not;
#   - qemu-img check is clean on ours.
# Errors (no -F, a new backing file that does not open) as qemu-img's.
# shellcheck source=../lib.sh
. "$(dirname "$0")/../lib.sh"
need qemu-img qemu-io python3
# shellcheck source=chaincmp.bash
. "$(dirname "$0")/chaincmp.bash"
cd "$T" || exit 1
only=${1:-}

# run NAME SETUP ARGS...: SETUP builds the chain in the current directory
# (the image rebased: $TOP, top.qcow2 by default); both tools rebase it
# with ARGS.
run() {
  local name=$1 setup=$2; shift 2
  [ -n "$only" ] && [ "$only" != "$name" ] && return
  mkdir -p "$name/src" && (cd "$name/src" && $setup) || { bad "$name" setup; return; }
  cp -a "$name/src" "$name/ref"; cp -a "$name/src" "$name/our"
  local r o
  r=$(cd "$name/ref" && qemu-img rebase "$@" "${TOP:-top.qcow2}" 2>&1; echo "rc=$?")
  o=$(cd "$name/our" && "$QCOWKIT" rebase "$@" "${TOP:-top.qcow2}" 2>&1; echo "rc=$?")
  same_results "$name" "$r" "$o"
}

# top over old.qcow2 (3M); new.qcow2 (4M) shares part of it, differs elsewhere.
two_v3() {
  mk -f qcow2 old.qcow2 3M; io qcow2 old.qcow2 -c 'write -P 1 0 3M' -c 'write -z 1M 64k'
  mk -f qcow2 new.qcow2 4M; io qcow2 new.qcow2 -c 'write -P 1 0 1M' -c 'write -P 2 1500k 3k' \
     -c 'write -P 1 2M 300k'
  mk -f qcow2 -b old.qcow2 -F qcow2 top.qcow2 4M
  io qcow2 top.qcow2 -c 'write -P 3 64k 128k' -c 'write -z 512k 64k' -c 'write -c -P 4 2M 64k' \
     -c 'discard 2500k 128k'
}
# base <- mid <- top, v2: drop mid (new backing inside the old chain).
three_v2() {
  mk -f qcow2 -o compat=0.10 base.qcow2 2M; io qcow2 base.qcow2 -c 'write -P 1 0 2M'
  mk -f qcow2 -o compat=0.10 -b base.qcow2 -F qcow2 mid.qcow2
  io qcow2 mid.qcow2 -c 'write -P 5 512k 512k' -c 'write -P 1 1536k 64k' -c 'write -P 6 1700k 1k'
  mk -f qcow2 -o compat=0.10 -b mid.qcow2 -F qcow2 top.qcow2 3M
  io qcow2 top.qcow2 -c 'write -P 6 768k 64k' -c 'write -P 7 2500k 100k'
}
# a raw new backing file shorter than the overlay, odd-sized
raw_short() {
  head -c 1200000 /dev/urandom >old.raw; cp old.raw new.raw
  dd if=/dev/zero of=new.raw bs=1 seek=70000 count=3000 conv=notrunc 2>/dev/null
  truncate -s 900000 new.raw
  mk -f qcow2 -b old.raw -F raw top.qcow2 2M
  io qcow2 top.qcow2 -c 'write -P 8 100k 50k' -c 'write -z 300k 200k'
}
# extended L2 overlay: differences smaller than a subcluster
extl2() {
  mk -f qcow2 old.qcow2 2M; io qcow2 old.qcow2 -c 'write -P 1 0 2M'
  mk -f qcow2 new.qcow2 2M; io qcow2 new.qcow2 -c 'write -P 1 0 2M' -c 'write -P 2 5k 1k' \
     -c 'write -P 2 1M 100k'
  mk -f qcow2 -o extended_l2=on,cluster_size=128k -b old.qcow2 -F qcow2 top.qcow2
  io qcow2 top.qcow2 -c 'write -P 4 10k 2k' -c 'write -z 1040k 4k' -c 'write -c -P 5 1536k 128k'
}
# names relative to the overlay's directory, which is not the current one
rel() {
  mkdir -p d/n
  mk -f qcow2 -o cluster_size=4k d/old.qcow2 1M; io qcow2 d/old.qcow2 -c 'write -P 1 0 1M'
  mk -f qcow2 -o cluster_size=16k d/n/new.qcow2 1M; io qcow2 d/n/new.qcow2 -c 'write -P 1 0 512k'
  mk -f qcow2 -b old.qcow2 -F qcow2 d/top.qcow2; io qcow2 d/top.qcow2 -c 'write -P 4 200k 300k'
}

run two-v3 two_v3 -b new.qcow2 -F qcow2
run two-v3-none two_v3 -b ""
run two-v3-u two_v3 -u -b new.qcow2 -F qcow2
run two-v3-qp two_v3 -q -p -t none -b new.qcow2 -F qcow2
run two-v3-noF two_v3 -b new.qcow2
run two-v3-nope two_v3 -b nope.qcow2 -F qcow2
run three-v2 three_v2 -b base.qcow2 -F qcow2
run three-v2-none three_v2 -b ""
run raw-short raw_short -b new.raw -F raw
run extl2 extl2 -b new.qcow2 -F qcow2
TOP=d/top.qcow2 run rel rel -b n/new.qcow2 -F qcow2
TOP=d/top.qcow2 run rel-u rel -u -b n/new.qcow2 -F qcow2

# -c (qemu-img 8.2): a cluster that differs is written whole, compressed.
mkdir c && cd c && two_v3 && cp top.qcow2 ref.qcow2 &&
  "$QCOWKIT" rebase -c -b new.qcow2 -F qcow2 top.qcow2 &&
  qemu-img rebase -b new.qcow2 -F qcow2 ref.qcow2 && qemu-img compare -q top.qcow2 ref.qcow2 &&
  qemu-img check -q top.qcow2 && qemu-img check --output=json top.qcow2 |
  python3 -c 'import json,sys; sys.exit(json.load(sys.stdin)["compressed-clusters"] < 5)' &&
  ok compress || bad compress "rebase -c"
cd "$T" || exit 1
o=$("$QCOWKIT" rebase c/top.qcow2 2>&1); rc=$?
[ $rc = 1 ] && [[ $o == "qcowkit: Must specify backing file (-b) or use unsafe mode (-u)"* ]] &&
  ok no-b || bad no-b "$rc $o"
finish
