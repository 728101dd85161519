#!/usr/bin/env bash
# Writes into images with persistent bitmaps, judged by QEMU: qcowkit io and
# qemu-io run the same commands on two copies of an image that qemu-img
# gave three bitmaps (b0 enabled, 64 KiB granularity; b1 enabled, 4 KiB
# granularity; b2 disabled). Then, for each case:
#   - qemu-img check of ours: no errors, no leaks;
#   - qemu-img info --output=json: the same bitmaps with the same flags
#     ("auto" for the enabled ones, nothing for the disabled one; no
#     "in-use" after a clean close) and granularities as qemu-io's copy;
#   - the bits of every bitmap, read from the file by bmdump.py (the
#     bitmaps extension, directory and tables as the specification lays
#     them out), equal qemu-io's;
#   - qemu-img compare: the same guest content.
# Cases: plain, zero, unmapping zero, compressed writes and discards, at
# cluster-aligned and odd offsets, up to the end of the image (whose size is
# not a multiple of the granularity), over a backing file, in v3 images
# with 512 B and 2 MiB clusters, and a seeded random workload. Also: an
# image whose enabled bitmap qemu left "in-use" keeps it so, unchanged, and
# a read-only open changes nothing.
# shellcheck source=../lib.sh
. "$(dirname "$0")/../lib.sh"
# shellcheck source=readcmp.bash
. "$(dirname "$0")/readcmp.bash"
need qemu-img qemu-io python3

cd "$T" || exit 1
M=1048576
SIZE=$((8 * M + 5000))

cat >bmdump.py <<'PYEOF'
# bmdump.py IMG: one line per persistent bitmap: name, flags, granularity
# bits and a digest of its bits (as many as the image size needs).
import hashlib, struct, sys
f = open(sys.argv[1], "rb")
def rd(off, n):
    f.seek(off)
    b = f.read(n)
    if len(b) != n:
        sys.exit("short read at %d" % off)
    return b
hdr = rd(0, 104)
magic, version = struct.unpack(">II", hdr[:8])
cluster_bits = struct.unpack(">I", hdr[20:24])[0]
size = struct.unpack(">Q", hdr[24:32])[0]
cs = 1 << cluster_bits
hlen = struct.unpack(">I", hdr[100:104])[0] if version >= 3 else 72
autoclear = struct.unpack(">Q", hdr[88:96])[0] if version >= 3 else 0
off = hlen
while True:
    m, ln = struct.unpack(">II", rd(off, 8))
    if m == 0:
        break
    if m == 0x23852875:
        nb, _, dsize, doff = struct.unpack(">IIQQ", rd(off + 8, 24))
        break
    off += 8 + ((ln + 7) & ~7)
else:
    pass
if m == 0:
    print("no bitmaps")
    sys.exit(0)
print("autoclear-bitmaps %d" % (autoclear & 1))
d = rd(doff, dsize)
p = 0
for _ in range(nb):
    toff, tsize, flags = struct.unpack(">QII", d[p:p + 16])
    typ, gbits, nlen, extra = struct.unpack(">BBHI", d[p + 16:p + 24])
    name = d[p + 24 + extra:p + 24 + extra + nlen].decode()
    p += (24 + extra + nlen + 7) & ~7
    nbits = (size + (1 << gbits) - 1) >> gbits
    data = bytearray()
    for i in range(tsize):
        e = struct.unpack(">Q", rd(toff + 8 * i, 8))[0]
        o = e & 0x00fffffffffffe00
        data += rd(o, cs) if o else (b"\xff" if e & 1 else b"\0") * cs
    nbytes = (nbits + 7) // 8
    bits = bytearray(data[:nbytes])
    if nbits % 8:
        bits[-1] &= (1 << (nbits % 8)) - 1
    ones = sum(bin(x).count("1") for x in bits)
    print("%s flags=%d gran=%d ones=%d %s" % (name, flags, gbits, ones,
                                              hashlib.sha256(bits).hexdigest()[:16]))
PYEOF

# infobm IMG: the bitmaps part of qemu-img info --output=json.
infobm() {
  qemu-img info --output=json "$1" | python3 -c '
import json, sys
d = json.load(sys.stdin)
print(json.dumps(d.get("format-specific", {}).get("data", {}).get("bitmaps"), sort_keys=True))'
}

# mkimg NAME [CREATE OPTIONS...]: NAME.qcow2 with data and the three bitmaps.
mkimg() {
  local n=$1; shift
  setup qemu-img create -q -f qcow2 "$@" "$n.qcow2" "$SIZE" &&
  setup qemu-io -f qcow2 -c 'write -P 0x11 0 1M' -c 'write -c -P 0x22 2M 2M' "$n.qcow2" &&
  setup qemu-img bitmap --add "$n.qcow2" b0 &&
  setup qemu-img bitmap --add -g 4096 "$n.qcow2" b1 &&
  setup qemu-img bitmap --add --disable "$n.qcow2" b2 &&
  # some bits set already: qemu-io writes with the bitmaps enabled
  setup qemu-io -f qcow2 -c 'write -P 0x33 5M 100k' "$n.qcow2"
}

# bcase NAME TEMPLATE CMD...: the commands through qemu-io and qcowkit io on
# copies of TEMPLATE; 4 results.
bcase() {
  local n=$1 tpl=$2; shift 2
  local -a args=()
  local c out
  for c in "$@"; do args+=(-c "$c"); done
  cp "$tpl" ref.qcow2 && cp "$tpl" qk.qcow2
  if ! qemu-io -f qcow2 ref.qcow2 "${args[@]}" >ref.out 2>&1; then
    bad "$n" "test bug: qemu-io failed: $(head -c 300 ref.out)"
    return
  fi
  run_qk qk.out qk.err io -f qcow2 qk.qcow2 "${args[@]}"
  if [ "$qk_rc" -ne 0 ]; then bad "$n" "$(qk_why qk.err)"; return; fi
  if qemu-img check qk.qcow2 >chk.out 2>&1; then ok
  else bad "$n/check" "$(grep -v '^$' chk.out | head -6 | tr '\n' '|')"; fi
  if [ "$(infobm ref.qcow2)" = "$(infobm qk.qcow2)" ]; then ok
  else bad "$n/info" "qemu-io's copy: $(infobm ref.qcow2) ours: $(infobm qk.qcow2)"; fi
  python3 bmdump.py ref.qcow2 >ref.bm 2>&1
  python3 bmdump.py qk.qcow2 >qk.bm 2>&1
  if cmp -s ref.bm qk.bm; then ok
  else bad "$n/bits" "qemu-io's: $(tr '\n' '|' <ref.bm) ours: $(tr '\n' '|' <qk.bm)"; fi
  if out=$(qemu-img compare ref.qcow2 qk.qcow2 2>&1); then ok
  else bad "$n/content" "$out"; fi
}

mkimg v3
mkimg c512 -o cluster_size=512
mkimg c2m -o cluster_size=2M
setup qemu-img create -q -f qcow2 base.qcow2 "$SIZE" &&
  setup qemu-io -f qcow2 -c "write -P 0x44 0 $SIZE" base.qcow2
mkimg top -b base.qcow2 -F qcow2

END=$((SIZE - 3000))
for t in v3 c512 c2m top; do
  bcase "$t: aligned writes" "$t.qcow2" 'write -P 1 0 64k' 'write -P 2 3M 128k'
  bcase "$t: odd writes" "$t.qcow2" 'write -P 3 1000 5000' 'write -P 4 4194000 300000'
  bcase "$t: zeroes and discards" "$t.qcow2" 'write -z 1M 64k' 'write -z -u 1536k 8k' 'discard 6M 256k' 'write -z 7000 100'
  bcase "$t: to the end" "$t.qcow2" "write -P 5 $END 3000" "write -z $((END - 70000)) 1000"
  bcase "$t: flushes between" "$t.qcow2" 'write -P 6 64k 4k' 'flush' 'write -P 7 2M 4k' 'flush'
done
bcase "v3: compressed writes" v3.qcow2 'write -c -P 8 4M 128k' 'write -c -P 9 7M 1M'
bcase "v3: nothing written" v3.qcow2 'read 0 4k'

# A seeded random workload.
python3 - >rand.cmds <<PYEOF
import random
r = random.Random(${QK_SEED:-99})
size = $SIZE
for _ in range(60):
    off = r.randrange(0, size)
    ln = max(1, min(size - off, r.choice([r.randint(1, 4096), r.randint(1, 300000)])))
    x = r.random()
    if x < 0.5:
        print("write -P %d %d %d" % (r.randint(0, 255), off, ln))
    elif x < 0.7:
        print("write -z %d %d" % (off, ln))
    elif x < 0.85:
        print("write -z -u %d %d" % (off, ln))
    else:
        print("discard %d %d" % (off, ln))
PYEOF
mapfile -t rcmds <rand.cmds
bcase "v3: random workload" v3.qcow2 "${rcmds[@]}"
bcase "top: random workload" top.qcow2 "${rcmds[@]}"

# Read-only: nothing changes.
cp v3.qcow2 ro.qcow2
before=$(sha256sum <ro.qcow2)
run_qk qk.out qk.err io -r ro.qcow2 -c 'read 0 64k'
if [ "$qk_rc" -eq 0 ] && [ "$(sha256sum <ro.qcow2)" = "$before" ]; then ok
else bad "read-only open" "exit $qk_rc or the file changed"; fi

# A bitmap qemu left in use (inconsistent): it stays so, its bits as they
# were; the others are kept true.
cp v3.qcow2 inuse.qcow2
python3 - inuse.qcow2 <<'PYEOF' || bad setup "could not set the in-use flag"
import struct, sys
f = open(sys.argv[1], "r+b")
hdr = f.read(104)
hlen = struct.unpack(">I", hdr[100:104])[0]
off = hlen
while True:
    f.seek(off)
    m, ln = struct.unpack(">II", f.read(8))
    if m == 0x23852875:
        nb, _, dsize, doff = struct.unpack(">IIQQ", f.read(24))
        break
    off += 8 + ((ln + 7) & ~7)
f.seek(doff + 12)
flags = struct.unpack(">I", f.read(4))[0]
f.seek(doff + 12)
f.write(struct.pack(">I", flags | 1))    # b0 is the first entry
PYEOF
python3 bmdump.py inuse.qcow2 | grep '^b0 ' >before.bm
run_qk qk.out qk.err io inuse.qcow2 -c 'write -P 1 0 1M'
python3 bmdump.py inuse.qcow2 | grep '^b0 ' >after.bm
if [ "$qk_rc" -eq 0 ] && cmp -s before.bm after.bm && grep -q 'flags=3' after.bm &&
   qemu-img info inuse.qcow2 | grep -q 'in-use'; then ok
else bad "in-use bitmap" "exit $qk_rc: before $(cat before.bm) after $(cat after.bm) $(head -c 200 qk.err)"; fi
finish
