#!/usr/bin/env bash
# serve -B BITMAP: the qemu:dirty-bitmap:BITMAP context, judged against
# qemu-nbd -B on the same images (each check runs against both servers,
# which also proves the test):
#   - nbdinfo --map=qemu:dirty-bitmap:NAME gives the same extents, for
#     bitmaps of 64 KiB, 4 KiB and 512 B granularity, enabled and
#     disabled, an image whose size is no multiple of them, a bitmap found
#     in the backing file (qemu-nbd looks down the chain), a read-write
#     export after writes through it (an enabled bitmap follows them, and
#     is stored consistent when the server exits);
#   - in one session (dirtymap.py), base:allocation, qemu:allocation-depth
#     and two bitmaps together: the same chunks, in the same order, for
#     requests of several sizes and with REQ_ONE;
#   - nbdinfo --list names the same contexts; -B of a missing or an
#     inconsistent bitmap is refused with qemu-nbd's message.
# Then an incremental backup end to end, through qcowkit alone: write,
# full copy, add a bitmap, write more (data, zeros, discards, the last
# sector), export it read-only with -B and copy only the extents the
# bitmap marks dirty (nbdinfo --map --json, then dirtymap.py copy) onto the
# full copy: the result equals the final image byte for byte.
# shellcheck source=../lib.sh
. "$(dirname "$0")/../lib.sh"
# shellcheck source=nbd.bash
. "$(dirname "$0")/nbd.bash"
need qemu-img qemu-io qemu-nbd nbdinfo python3

cd "$T" || exit 1
M=1048576
SIZE=$((8 * M + 5000))
PY="python3 $QK_SRC/tests/nbd/dirtymap.py"

# run NAME CMD...: CMD must succeed (its output in $T/out).
run() {
  local n=$1; shift
  if "$@" >"$T/out" 2>&1; then ok; else bad "$n" "$* failed: $(head -c 300 "$T/out")"; return 1; fi
}

# ---- images, made by qemu-img ------------------------------------------------
setup() { "$@" >/dev/null 2>"$T/setup.err" || bad setup "$*: $(cat "$T/setup.err")"; }
setup qemu-img create -q -f qcow2 img.qcow2 "$SIZE"
setup qemu-io -f qcow2 -c 'write -P 1 0 1M' -c 'write -c -P 2 2M 1M' img.qcow2
setup qemu-img bitmap --add img.qcow2 coarse
setup qemu-img bitmap --add -g 4k img.qcow2 fine
setup qemu-img bitmap --add -g 512 img.qcow2 tiny
setup qemu-img bitmap --add --disable img.qcow2 off
setup qemu-io -f qcow2 -c 'write -P 3 5M 100k' -c 'write -P 4 1000 3000' -c 'discard 2M 64k' \
  -c "write -z $((SIZE - 700)) 700" -c 'write -P 5 6000000 1' img.qcow2
setup qemu-img bitmap --merge fine img.qcow2 off
setup qemu-img create -q -f qcow2 base.qcow2 "$((SIZE - M))"
setup qemu-io -f qcow2 -c 'write -P 6 0 3M' base.qcow2
setup qemu-img bitmap --add -g 8k base.qcow2 below
setup qemu-io -f qcow2 -c 'write -P 7 1M 200k' -c 'write -P 7 7M 4k' base.qcow2
setup qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2 "$SIZE"
setup qemu-io -f qcow2 -c 'write -P 8 4M 1M' top.qcow2
cp img.qcow2 inuse.qcow2
python3 - inuse.qcow2 <<'PYEOF' || bad setup "in-use flag"
import struct, sys
f = open(sys.argv[1], "r+b")
h = f.read(4096)
off = struct.unpack(">I", h[100:104])[0]
while struct.unpack(">I", h[off:off + 4])[0] != 0x23852875:
    off += 8 + ((struct.unpack(">I", h[off + 4:off + 8])[0] + 7) & ~7)
doff = struct.unpack(">Q", h[off + 24:off + 32])[0]
f.seek(doff + 12)
flags = struct.unpack(">I", f.read(4))[0]
f.seek(doff + 12)
f.write(struct.pack(">I", flags | 1))     # the first bitmap: coarse
PYEOF

# maps KIND IMG NAME... : nbdinfo --map of each bitmap, then the session
# of dirtymap.py, against server KIND (-r -t) on a copy of IMG.
maps() {
  local kind=$1 img=$2; shift 2
  local -a opts=() n
  for n in "$@"; do opts+=(-B "$n"); done
  cp "$img" "$kind.img"
  SRV_TAG=maps serve_start "$kind" "$kind.img" -r -t "${opts[@]}" || return
  for n in "$@"; do
    echo "== $n"
    nbdinfo --map="qemu:dirty-bitmap:$n" "$URI" 2>&1
  done
  echo "== contexts"
  nbdinfo --list "$URI" 2>&1 | sed -n '/contexts:/,/is_rotational/p'
  for step in 65536 1000000 $((32 * M)); do
    echo "== one session, requests of $step bytes"
    local -a ctx=(base:allocation qemu:allocation-depth)
    for n in "$@"; do ctx+=("qemu:dirty-bitmap:$n"); done
    $PY map "$SOCK" "$step" "${ctx[@]}" 2>&1
  done
  serve_stop "maps $img"
}

# cmaps NAME IMG BITMAP...: the maps from both servers are identical.
cmaps() {
  local n=$1; shift
  maps qemu-nbd "$@" >ref.maps
  maps qcowkit "$@" >qk.maps
  if cmp -s ref.maps qk.maps; then ok
  else bad "$n" "qemu-nbd and qcowkit differ: $(diff ref.maps qk.maps | head -12 | tr '\n' '|')"; fi
  grep -q dirty ref.maps || bad "$n" "test bug: no dirty extent at all"
}

cmaps "four bitmaps" img.qcow2 coarse fine tiny off
cmaps "one bitmap" img.qcow2 fine
cmaps "a bitmap of the backing file" top.qcow2 below

# Refusals, in qemu-nbd's words.
for kind in qemu-nbd qcowkit; do
  for c in "img.qcow2 nope|Bitmap 'nope' is not found" \
           "inuse.qcow2 coarse|Bitmap 'coarse' is inconsistent and cannot be used"; do
    img=${c%% *} rest=${c#* } bm=${rest%%|*} msg=${c#*|}
    rc=0
    if [ "$kind" = qcowkit ]; then
      timeout 20 "$QCOWKIT" serve -r -k "$T/refuse.sock" -B "$bm" "$img" >out 2>&1 || rc=$?
    else
      timeout 20 qemu-nbd -r -k "$T/refuse.sock" -B "$bm" "$img" >out 2>&1 || rc=$?
    fi
    if [ "$rc" -eq 1 ] && grep -q "^[a-z-]*: $msg\$" out; then ok
    else bad "$kind -B $bm of $img" "exit $rc: $(cat out)"; fi
  done
done

# A read-write export: an enabled bitmap follows the writes made through
# it (a disabled one does not), and is stored consistent when the server
# exits, as the live map showed it.
for kind in qemu-nbd qcowkit; do
  cp img.qcow2 "rw-$kind.qcow2"
  SRV_TAG=rw serve_start "$kind" "rw-$kind.qcow2" -t -B fine -B off || continue
  qemu-io -f raw -c 'write -P 9 3M 70k' -c 'write -z 7M 8k' -c 'discard 1536k 64k' \
    "$URI" >/dev/null 2>&1 || bad "rw $kind" "qemu-io over NBD failed"
  nbdinfo --map=qemu:dirty-bitmap:fine "$URI" >"rw-$kind.fine" 2>&1
  nbdinfo --map=qemu:dirty-bitmap:off "$URI" >"rw-$kind.off" 2>&1
  serve_stop "rw $kind"
  if qemu-img info "rw-$kind.qcow2" | grep -q in-use; then bad "rw $kind" "a bitmap left in use"; fi
  SRV_TAG=rw serve_start qemu-nbd "rw-$kind.qcow2" -r -B fine || continue
  nbdinfo --map=qemu:dirty-bitmap:fine "$URI" >"rw-$kind.stored" 2>&1
  serve_wait_exit "rw $kind: stored"
  if cmp -s "rw-$kind.fine" "rw-$kind.stored"; then ok
  else bad "rw $kind" "stored map differs from the live one: $(diff "rw-$kind.fine" "rw-$kind.stored" | head -6 | tr '\n' '|')"; fi
done
for m in fine off; do
  if cmp -s "rw-qemu-nbd.$m" "rw-qcowkit.$m"; then ok
  else bad "read-write export: $m" "$(diff "rw-qemu-nbd.$m" "rw-qcowkit.$m" | head -8 | tr '\n' '|')"; fi
done
cmp -s rw-qemu-nbd.fine rw-qemu-nbd.off && bad "read-write export" "test bug: the writes changed nothing"

# ---- an incremental backup, end to end, with qcowkit alone ---------------------------------
qk() { run "$1" "$QCOWKIT" "${@:2}"; }
qk "create" create -f qcow2 disk.qcow2 "$SIZE"
qk "first writes" io disk.qcow2 -c 'write -P 0x11 0 3M' -c 'write -P 0x12 5M 512k' \
  -c "write -P 0x13 $((SIZE - 5000)) 5000"
qk "full backup" convert -O raw disk.qcow2 backup.raw
qk "bitmap --add" bitmap --add -g 16k disk.qcow2 since-full
qk "more writes" io disk.qcow2 -c 'write -P 0x21 100000 70000' -c 'write -z 2M 128k' \
  -c 'discard 5M 256k' -c 'write -P 0x22 6M 1' -c "write -P 0x23 $((SIZE - 100)) 100" \
  -c 'write -c -P 0x24 7M 64k'
qk "final image" convert -O raw disk.qcow2 final.raw
if cmp -s backup.raw final.raw; then bad "incremental backup" "test bug: nothing changed"; fi
SRV_TAG=inc serve_start qcowkit disk.qcow2 -r -t -B since-full && {
  run "map of the bitmap" nbdinfo --map=qemu:dirty-bitmap:since-full --json "$URI" &&
    cp out inc.json
  run "copy the dirty extents" $PY copy "$SOCK" inc.json backup.raw
  copied=$(cat out)
  serve_stop "incremental backup"
}
if cmp -s backup.raw final.raw; then ok
else bad "incremental backup" "the backup differs from the image: $(cmp backup.raw final.raw 2>&1)"; fi
if [ -n "${copied:-}" ] && [ "$copied" -gt 0 ] && [ "$copied" -lt $((2 * M)) ]; then ok
else bad "incremental backup" "copied ${copied:-nothing} bytes: the bitmap marks too much or too little"; fi
run "qemu-img check" qemu-img check disk.qcow2
finish
