#!/usr/bin/env bash
# check and repair, judged by qemu-img check. Images are damaged on purpose
# the ways qemu-iotests damage them, then:
#   - qcowkit check --output=json gives the same corruptions, leaks,
#     allocated/fragmented/compressed clusters and image end offset as
#     qemu-img check --output=json, and the same exit code; the human output
#     is identical too (stdout);
#   - qcowkit check -r all on a copy: exit 0, then qemu-img check finds it
#     clean, and its guest content equals the content of a copy qemu-img
#     check -r all repaired (where qemu-img's repair is sound);
#   - qcowkit check -r leaks: leaks gone, corruptions (if any) left, exit
#     code as qemu-img's.
# Damage: a zeroed L2 entry (leak), a data cluster's refcount set to 0,
# a refcount raised (leak), a cluster referenced twice, an L2 entry pointing
# at the refcount table, the file truncated, extended L2 bitmaps with
# subclusters both allocated and zero or allocated in an unallocated
# cluster (qemu-img cannot repair the last three; we must), clean images with snapshots,
# compressed clusters
# and 512 B clusters with 64-bit refcounts, and a crash under lazy
# refcounts (qemu-io killed before closing the image). Then --forensic on
# the same images, with known answers: what is mapped but unreferenced,
# leaked (with --extract of the bytes), and held only by a snapshot; the
# image unchanged.
# shellcheck source=../lib.sh
. "$(dirname "$0")/../lib.sh"
# shellcheck source=readcmp.bash
. "$(dirname "$0")/readcmp.bash"
need qemu-img qemu-io python3

cd "$T" || exit 1

# poke.py IMG ACTION ARGS: damage an image (v3, 16-bit refcounts unless
# said). Actions:
#   l2 GUEST_CLUSTER VALUE|copy:OTHER   set the L2 entry of a guest cluster
#   rc HOST_CLUSTER VALUE               set a refcount
#   l2-at-rt GUEST_CLUSTER              point an entry at the refcount table
#   rt INDEX VALUE                      set a refcount table entry
cat >poke.py <<'PYEOF'
import struct, sys
img, action = sys.argv[1], sys.argv[2]
f = open(img, "r+b")
h = f.read(104)
cb = struct.unpack(">I", h[20:24])[0]
cs = 1 << cb
l1_off = struct.unpack(">Q", h[40:48])[0]
rt_off = struct.unpack(">Q", h[48:56])[0]
order = struct.unpack(">I", h[96:100])[0]
bits = 1 << order
def rd(o, n):
    f.seek(o); return f.read(n)
def l2_slot(gc):
    per = cs // 8
    l1e = struct.unpack(">Q", rd(l1_off + 8 * (gc // per), 8))[0]
    l2 = l1e & 0x00fffffffffffe00
    assert l2, "no L2 table"
    return l2 + 8 * (gc % per)
def rc_slot(c):
    per = cs * 8 // bits
    rte = struct.unpack(">Q", rd(rt_off + 8 * (c // per), 8))[0]
    assert rte, "no refcount block"
    return rte + (c % per) * bits // 8
if action == "l2":
    gc, val = int(sys.argv[3]), sys.argv[4]
    if val.startswith("copy:"):
        v = struct.unpack(">Q", rd(l2_slot(int(val[5:])), 8))[0]
    else:
        v = int(val, 0)
    f.seek(l2_slot(gc)); f.write(struct.pack(">Q", v))
elif action == "rc":
    c, v = int(sys.argv[3]), int(sys.argv[4])
    assert bits == 16
    f.seek(rc_slot(c)); f.write(struct.pack(">H", v))
elif action == "l2-at-rt":
    gc = int(sys.argv[3])
    f.seek(l2_slot(gc)); f.write(struct.pack(">Q", rt_off | (1 << 63)))
elif action == "bm":          # extended L2: set a cluster's subcluster bitmap
    gc, v = int(sys.argv[3]), int(sys.argv[4], 0)
    per = cs // 16
    l1e = struct.unpack(">Q", rd(l1_off + 8 * (gc // per), 8))[0]
    f.seek((l1e & 0x00fffffffffffe00) + 16 * (gc % per) + 8); f.write(struct.pack(">Q", v))
elif action == "rt":          # set a refcount table entry
    i, v = int(sys.argv[3]), int(sys.argv[4], 0)
    f.seek(rt_off + 8 * i); f.write(struct.pack(">Q", v))
elif action == "l1e":         # print the L2 table offset of an L1 entry
    print(struct.unpack(">Q", rd(l1_off + 8 * int(sys.argv[3]), 8))[0] & 0x00fffffffffffe00)
elif action == "rte":         # print a refcount table entry
    print(struct.unpack(">Q", rd(rt_off + 8 * int(sys.argv[3]), 8))[0])
elif action == "host":        # print the host cluster of a guest cluster
    v = struct.unpack(">Q", rd(l2_slot(int(sys.argv[3])), 8))[0]
    print((v & 0x00fffffffffffe00) >> cb)
PYEOF

# jkeys FILE: the check JSON keys that must agree, one line.
jkeys() {
  python3 -c '
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except Exception as e:
    print("unparsable: %s" % e); sys.exit(0)
print(" ".join("%s=%s" % (k, d.get(k, 0)) for k in ("corruptions", "leaks", "check-errors",
      "allocated-clusters", "fragmented-clusters", "compressed-clusters", "image-end-offset",
      "total-clusters")))' "$1"
}

# ccase NAME IMG [repair-sound]: compare check, then repair a copy.
ccase() {
  local n=$1 img=$2 sound=${3:-1} rr=0 out
  qemu-img check --output=json "$img" >ref.json 2>ref.err || rr=$?
  run_qk qk.json qk.err check --output=json "$img"
  if [ "$qk_rc" -eq "$rr" ] && [ "$(jkeys ref.json)" = "$(jkeys qk.json)" ]; then ok
  else bad "$n/json" "qemu-img (exit $rr): $(jkeys ref.json) | qcowkit (exit $qk_rc): $(jkeys qk.json) $(head -c 200 qk.err)"; fi
  qemu-img check "$img" >ref.txt 2>/dev/null
  run_qk qk.txt qk.err check "$img"
  if cmp -s ref.txt qk.txt; then ok
  else bad "$n/human" "$(diff ref.txt qk.txt | head -8 | tr '\n' '|')"; fi
  # -r leaks
  cp "$img" qkl.qcow2 && cp "$img" refl.qcow2
  rr=0; qemu-img check -r leaks refl.qcow2 >/dev/null 2>&1 || rr=$?
  run_qk qk.out qk.err check -r leaks qkl.qcow2
  if [ "$qk_rc" -eq "$rr" ]; then ok
  else bad "$n/-r leaks" "exit $qk_rc, qemu-img's $rr: $(head -c 200 qk.err)"; fi
  # -r all
  cp "$img" qka.qcow2 && cp "$img" refa.qcow2
  qemu-img check -r all refa.qcow2 >/dev/null 2>&1
  run_qk qk.out qk.err check -r all qka.qcow2
  if [ "$qk_rc" -ne 0 ]; then bad "$n/-r all" "$(qk_why qk.err)"; return; fi
  if out=$(qemu-img check qka.qcow2 2>&1); then ok
  else bad "$n/-r all: check" "$(echo "$out" | head -4 | tr '\n' '|')"; fi
  if [ "$sound" = 1 ]; then
    if out=$(qemu-img compare refa.qcow2 qka.qcow2 2>&1); then ok
    else bad "$n/-r all: content" "$out"; fi
  fi
}

mk() { # mk NAME [create options]: 64k clusters, data, compressed, a snapshot
  local n=$1; shift
  setup qemu-img create -q -f qcow2 "$@" "$n" 8M &&
  setup qemu-io -f qcow2 -c 'write -P 1 0 1M' -c 'write -c -P 2 2M 256k' -c 'write -P 3 5M 64k' -c 'write -z 6M 64k' "$n"
}
mk clean.qcow2
ccase clean clean.qcow2
mk snap.qcow2 && setup qemu-img snapshot -c s1 snap.qcow2 &&
  setup qemu-io -f qcow2 -c 'write -P 4 0 128k' -c 'write -P 5 7M 64k' snap.qcow2
ccase snapshot snap.qcow2
mk small.qcow2 -o cluster_size=512,refcount_bits=64
ccase "512 B clusters, 64-bit refcounts" small.qcow2
mk v2.qcow2 -o compat=0.10
ccase v2 v2.qcow2

# a zeroed L2 entry: its cluster leaks
mk leak.qcow2 && python3 poke.py leak.qcow2 l2 3 0
ccase "zeroed L2 entry" leak.qcow2
# a refcount raised: a leak
mk leak2.qcow2 && h=$(python3 poke.py leak2.qcow2 host 1) && python3 poke.py leak2.qcow2 rc "$h" 2
ccase "refcount raised" leak2.qcow2
# a data cluster's refcount dropped to 0
mk rc0.qcow2 && h=$(python3 poke.py rc0.qcow2 host 2) && python3 poke.py rc0.qcow2 rc "$h" 0
ccase "refcount 0" rc0.qcow2
# a cluster referenced twice (guest 4 now maps guest 0's cluster)
mk dbl.qcow2 && python3 poke.py dbl.qcow2 l2 4 copy:0
ccase "referenced twice" dbl.qcow2
# an L2 entry pointing at the refcount table (qemu-img "repairs" this by
# raising the refcount; the content comparison is skipped)
mk intoRT.qcow2 && python3 poke.py intoRT.qcow2 l2-at-rt 7
ccase "L2 entry into the refcount table" intoRT.qcow2 0
# ... which qemu-img -r all leaves as data mapped over the refcount table
# (refcount 2), clean in its eyes; we call it a corruption. Our -r all moves
# the data out instead: the refcount table's cluster keeps refcount 1 and
# the guest reads what it read before the repair.
cp intoRT.qcow2 qrep.qcow2 && qemu-img check -r all qrep.qcow2 >/dev/null 2>&1
run_qk qk.json qk.err check --output=json qrep.qcow2
if [ "$qk_rc" -eq 2 ] && grep -q '"qcowkit-overlaps": 1' qk.json; then ok
else bad "overlap after qemu-img's repair" "exit $qk_rc: $(tr '\n' ' ' <qk.json) $(head -c 200 qk.err)"; fi
cp intoRT.qcow2 ours.qcow2
qemu-img convert -O raw intoRT.qcow2 before.raw
run_qk qk.out qk.err check -r all ours.qcow2
rt=$(python3 -c '
import struct, sys
f = open(sys.argv[1], "rb"); h = f.read(104)
cb = struct.unpack(">I", h[20:24])[0]; rt = struct.unpack(">Q", h[48:56])[0]
print(rt >> cb)' intoRT.qcow2)
if [ "$qk_rc" -eq 0 ] && qemu-img check ours.qcow2 >/dev/null 2>&1 &&
   qemu-img convert -O raw ours.qcow2 after.raw && cmp -s before.raw after.raw; then ok
else bad "overlap repair" "exit $qk_rc, or not clean, or the guest content changed: $(head -c 200 qk.err)"; fi
# the old refcount table cluster is no longer referenced twice
if python3 - ours.qcow2 "$rt" <<'PYEOF'
import struct, sys
f = open(sys.argv[1], "rb"); h = f.read(104)
cb = struct.unpack(">I", h[20:24])[0]; cs = 1 << cb
l1 = struct.unpack(">Q", h[40:48])[0]
f.seek(l1); l2 = struct.unpack(">Q", f.read(8))[0] & 0x00fffffffffffe00
f.seek(l2); ents = [struct.unpack(">Q", f.read(8))[0] & 0x00fffffffffffe00 for _ in range(cs // 8)]
sys.exit(1 if (int(sys.argv[2]) << cb) in ents else 0)
PYEOF
then ok; else bad "overlap repair" "an L2 entry still maps the old refcount table cluster"; fi

# damaged refcount structures, with 512 B clusters so the file has several
# refcount blocks (each covers 128 KiB): a refcount table entry pointing
# past the end of the file, at a cluster that is also an L2 table (a
# refcount block overlapping metadata), at a data cluster, and one with
# reserved bits set
mk rtbase.qcow2 -o cluster_size=512
for dmg in "past the end:0x10000000" "over an L2 table:$(( $(python3 poke.py rtbase.qcow2 l1e 12) ))" \
           "over data:$(( $(python3 poke.py rtbase.qcow2 host 0) * 512 ))" "reserved bits:RB3"; do
  name=${dmg%%:*} val=${dmg#*:}
  cp rtbase.qcow2 rtd.qcow2
  if [ "$val" = RB3 ]; then val=$(( $(python3 poke.py rtd.qcow2 rte 3) | 1 )); fi
  python3 poke.py rtd.qcow2 rt 3 "$val"
  ccase "refcount block $name" rtd.qcow2
done

# a cluster shared by 70 snapshots (refcount 71: past the counts kept in a
# byte), then with its refcount dropped to 0 so -r all rebuilds with 71
mk manysnap.qcow2 && for i in $(seq 70); do qemu-img snapshot -c "s$i" manysnap.qcow2 || break; done
ccase "70 snapshots" manysnap.qcow2
cp manysnap.qcow2 manysnap0.qcow2 && h=$(python3 poke.py manysnap0.qcow2 host 1) &&
  python3 poke.py manysnap0.qcow2 rc "$h" 0
ccase "70 snapshots, refcount 0" manysnap0.qcow2

# extended L2: subclusters both allocated and zero; an unallocated cluster
# with allocated subclusters
mk el2.qcow2 -o extended_l2=on && python3 poke.py el2.qcow2 bm 0 0x00000001ffffffff &&
  python3 poke.py el2.qcow2 bm 50 0x0000000000000003
ccase "extended L2 bitmaps" el2.qcow2 0

# the file truncated: the last data clusters lie past its end
mk trunc.qcow2 && truncate -s $(( $(stat -c %s trunc.qcow2) - 2 * 65536 )) trunc.qcow2
ccase "truncated file" trunc.qcow2 0

# 132k clusters of 512 bytes, every one written in order: check's fast
# paths (eight L2 entries and eight counts at a time, whole chunks of
# stored refcounts that are all 0 or 1) run here, and each damage below
# lands inside them
setup qemu-img create -q -f qcow2 -o cluster_size=512 big.qcow2 64M &&
  setup qemu-io -f qcow2 -c 'write -P 7 0 64M' big.qcow2
ccase "132k clusters" big.qcow2
cp big.qcow2 bigleak.qcow2 && h=$(python3 poke.py bigleak.qcow2 host 70001) &&
  python3 poke.py bigleak.qcow2 rc "$h" 2
ccase "132k clusters, a refcount raised" bigleak.qcow2
cp big.qcow2 bigrc0.qcow2 && h=$(python3 poke.py bigrc0.qcow2 host 90003) &&
  python3 poke.py bigrc0.qcow2 rc "$h" 0
ccase "132k clusters, a refcount 0" bigrc0.qcow2
cp big.qcow2 bigcp.qcow2 &&
  python3 poke.py bigcp.qcow2 l2 80005 $(( $(python3 poke.py bigcp.qcow2 host 80005) * 512 ))
ccase "132k clusters, COPIED cleared" bigcp.qcow2
cp big.qcow2 bigdbl.qcow2 && python3 poke.py bigdbl.qcow2 l2 100002 copy:100001
ccase "132k clusters, a cluster referenced twice" bigdbl.qcow2
cp big.qcow2 bigrt.qcow2 && python3 poke.py bigrt.qcow2 rt 300 0x10000000
ccase "132k clusters, a refcount block past the end" bigrt.qcow2 0

# a crash under lazy refcounts: qemu-io killed with the image open
setup qemu-img create -q -f qcow2 -o lazy_refcounts=on lazy.qcow2 8M
bash -c "qemu-io -f qcow2 -c 'write -P 1 0 1M' -c 'write -P 2 3M 512k' -c 'sigraise 9' lazy.qcow2; true" >/dev/null 2>&1
if qemu-img info lazy.qcow2 | grep -q 'corrupt: false' && qemu-img info --output=json lazy.qcow2 | grep -q '"dirty-flag": true'; then
  ccase "lazy refcounts crash" lazy.qcow2
else
  bad setup "qemu-io did not leave a dirty image"
fi

# --forensic, read-only, with known answers: NAME IMG EXPECTED (a Python
# expression over the JSON report d) [extra args]
fcase() {
  local n=$1 img=$2 want=$3; shift 3
  local before out
  before=$(sha256sum <"$img")
  run_qk qk.json qk.err check --forensic --output=json "$@" "$img"
  if crashed "$qk_rc" || [ "$qk_rc" -eq 1 ]; then bad "forensic $n" "$(qk_why qk.err)"; return; fi
  if out=$(python3 -c '
import json, sys
d = json.load(open(sys.argv[1]))
if not eval(sys.argv[2]):
    print("report does not satisfy %s: %s" % (sys.argv[2], json.dumps(d)[:400])); sys.exit(1)' qk.json "$want" 2>&1)
  then ok; else bad "forensic $n" "$out"; fi
  if [ "$(sha256sum <"$img")" = "$before" ]; then ok; else bad "forensic $n" "the image changed"; fi
}
fcase clean clean.qcow2 'd["unreferenced-clusters"] == 0 and d["leaked-clusters"] == 0 and d["snapshot-only-clusters"] == 0'
# the two clusters at [0, 128k) were overwritten after the snapshot
fcase snapshot snap.qcow2 'd["snapshot-only-clusters"] == 2 and d["leaked-clusters"] == 0'
fcase "zeroed L2 entry" leak.qcow2 'd["leaked-clusters"] == 1 and d["leaked-clusters-with-data"] == 1 and d["leaked"][0]["refcount"] == 1' --extract "$T/x"
f=$(ls "$T"/x/cluster-*.bin 2>/dev/null | head -1)
if [ -n "$f" ] && [ "$(stat -c %s "$f")" -eq 65536 ] && cmp -s "$f" <(head -c 65536 /dev/zero | tr '\0' '\1'); then ok
else bad "forensic --extract" "no 64 KiB file of 0x01 bytes in $T/x: $(ls -la "$T/x" 2>&1 | tr '\n' ' ')"; fi
fcase "refcount 0" rc0.qcow2 'd["unreferenced-clusters"] == 1 and d["unreferenced"][0]["guest-offset"] == 131072'
fcase "refcount raised" leak2.qcow2 'd["leaked-clusters"] == 0 and d["unreferenced-clusters"] == 0'
fcase "lazy refcounts crash" lazy.qcow2 'd["unreferenced-clusters"] == 24'
run_qk qk.out qk.err check --forensic clean.qcow2
if [ "$qk_rc" -eq 0 ] && grep -q "Leaked clusters: 0" qk.out; then ok
else bad "forensic human" "exit $qk_rc: $(head -c 300 qk.out qk.err | tr '\n' '|')"; fi

# raw: no checks, exit 63
head -c 1M /dev/zero >a.raw
run_qk qk.out qk.err check -f raw a.raw
if [ "$qk_rc" -eq 63 ] && grep -q 'does not support checks' qk.err; then ok
else bad "raw" "exit $qk_rc: $(head -c 200 qk.err)"; fi
finish
