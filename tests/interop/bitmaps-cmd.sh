#!/usr/bin/env bash
# qcowkit bitmap, resize, convert --bitmaps and check judged by QEMU 7.2:
# every case runs the same command line through qemu-img and qcowkit on two
# copies of an image with persistent bitmaps, then requires
#   - the same exit status, and the same first line of the message (after
#     the program's name; qemu-img adds a second line of advice that
#     qcowkit gives on the same line);
#   - the bitmaps part of `qemu-img info --output=json` identical (names,
#     granularities, flags, order);
#   - `qemu-img check` of ours clean (no corruptions, no leaks);
#   - the bits of every bitmap identical as qemu-nbd -B exports them
#     (nbdinfo --map=qemu:dirty-bitmap:NAME against qemu-nbd on each copy);
#   - the guest content unchanged (qemu-img compare).
# The template image has an odd size (not a multiple of any granularity),
# data, and bitmaps b0 (64 KiB, enabled), b1 (4 KiB, enabled) and b2
# (64 KiB, disabled) with bits set by qemu-io writes. Cases: each action,
# several actions in one command line (applied in order; one that fails
# leaves those before it done), merges across granularities, into a
# disabled bitmap and from another file (-b, -F), qemu-img's refusals and
# messages, an inconsistent (in-use) bitmap, version 2 and raw images,
# 512 B and 2 MiB clusters, removing every bitmap (the extension and the
# autoclear bit go); resize (grow, shrink, grow again); convert --bitmaps;
# check and check -r all of a stale in-use bitmap (ours reports it and
# removes it, qemu-img leaves it).
# shellcheck source=../lib.sh
. "$(dirname "$0")/../lib.sh"
# shellcheck source=readcmp.bash
. "$(dirname "$0")/readcmp.bash"
need qemu-img qemu-io qemu-nbd nbdinfo python3

cd "$T" || exit 1
M=1048576
SIZE=$((8 * M + 5000))

# describe.py IMG...: for each IMG, IMG.desc holding the bitmaps part of
# `qemu-img info --output=json` (one line), the autoclear bitmaps bit and
# the bitmaps extension's count (one line), then the names of the
# consistent bitmaps, one per line. (One python for all: its start-up is
# most of what a case costs.)
cat >describe.py <<'PYEOF'
import json, struct, subprocess, sys
for img in sys.argv[1:]:
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", img],
                         capture_output=True, text=True).stdout
    try:
        bms = json.loads(out).get("format-specific", {}).get("data", {}).get("bitmaps")
    except ValueError:
        bms = "qemu-img info failed"
    h = open(img, "rb").read(4096)
    hdr = "not qcow2"
    if h[:4] == b"QFI\xfb" and struct.unpack(">I", h[4:8])[0] >= 3:
        off, n = struct.unpack(">I", h[100:104])[0], "none"
        while off + 8 <= len(h):
            m, ln = struct.unpack(">II", h[off:off + 8])
            if m == 0:
                break
            if m == 0x23852875:
                n = struct.unpack(">I", h[off + 8:off + 12])[0]
            off += 8 + ((ln + 7) & ~7)
        hdr = "autoclear-bitmaps=%d extension=%s" % (struct.unpack(">Q", h[88:96])[0] & 1, n)
    with open(img + ".desc", "w") as f:
        f.write(json.dumps(bms) + "\n" + hdr + "\n")
        for b in bms if isinstance(bms, list) else []:
            if "in-use" not in b["flags"]:
                f.write(b["name"] + "\n")
PYEOF

# infobm IMG, hdrbm IMG, names IMG: what describe.py found.
describe() { python3 describe.py "$@"; }
infobm() { sed -n 1p "$1.desc"; }
hdrbm() { sed -n 2p "$1.desc"; }
names() { tail -n +3 "$1.desc"; }

# bits IMG: every consistent bitmap's map as qemu-nbd -B exports it. A
# qemu-nbd per bitmap, on a copy of the image, with a socket of its own:
# it lingers up to a second after nbdinfo leaves, and must neither hold
# the lock of an image the next case changes nor remove a socket in use.
nbits=0
bits() {
  local img=$1 n sock copy
  mapfile -t ns < <(names "$img")
  [ "${#ns[@]}" -eq 0 ] && { echo "(no bitmaps)"; return; }
  nbits=$((nbits + 1))
  copy=$T/bits-$nbits.img
  cp "$img" "$copy"
  for n in "${ns[@]}"; do
    nbits=$((nbits + 1))
    sock=$T/bits-$nbits.sock
    if ! qemu-nbd -r -e 2 --fork -k "$sock" -B "$n" "$copy" 2>"$T/bits.err"; then
      echo "qemu-nbd failed: $(cat "$T/bits.err")"
      continue
    fi
    echo "$n:"
    nbdinfo --map="qemu:dirty-bitmap:$n" "nbd+unix:///?socket=$sock" 2>&1
  done
  rm -f "$copy"
}

# first ERRFILE: the first line of a message, without the program's name,
# what qcowkit adds on the line where qemu-img goes on to the next, and the
# name of QEMU's block node (ours names the file).
first() {
  head -n1 "$1" | sed -E -e 's/^(qemu-img|qcowkit): //' -e 's/ \(try --remove .*\)$//' \
    -e "s/ \(try --skip-broken-bitmaps, or use 'qcowkit bitmap --remove' to delete it\)$//" \
    -e 's/(suffixes for) .*/\1/' -e "s/(persistent in|persistent bitmaps to) ('[^']*'|#block[0-9]+)/\1 NODE/" \
    -e "s/'n{60,}(\.\.\.)?'/'LONG NAME'/g" -e 's/^warning: Shrinking an image .*//'
}

# judge NAME REF QK: the images after a case (5 results).
judge() {
  local n=$1 ref=$2 qk=$3 out
  describe "$ref" "$qk"
  if [ "$(infobm "$ref")" = "$(infobm "$qk")" ]; then ok
  else bad "$n/info" "qemu-img's: $(infobm "$ref") ours: $(infobm "$qk")"; fi
  if [ "$(hdrbm "$ref")" = "$(hdrbm "$qk")" ]; then ok
  else bad "$n/header" "qemu-img's: $(hdrbm "$ref") ours: $(hdrbm "$qk")"; fi
  if qemu-img info "$qk" | grep -q '^file format: raw' || qemu-img check "$qk" >chk.out 2>&1; then ok
  else bad "$n/check" "$(grep -v '^$' chk.out | head -6 | tr '\n' '|')"; fi
  bits "$ref" >ref.bits
  bits "$qk" >qk.bits
  if cmp -s ref.bits qk.bits; then ok
  else bad "$n/bits" "qemu-img's: $(tr '\n' '|' <ref.bits | head -c 600) ours: $(tr '\n' '|' <qk.bits | head -c 600)"; fi
  if out=$(qemu-img compare "$ref" "$qk" 2>&1); then ok
  else bad "$n/content" "$out"; fi
}

# same_run NAME: the two runs ended alike (1 result).
same_run() {
  local n=$1
  if crashed "$qk_rc"; then bad "$n/exit" "$(qk_why qk.err)"; return 1; fi
  if [ "$ref_rc" -ne "$qk_rc" ]; then
    bad "$n/exit" "qemu-img exit $ref_rc ($(first ref.err)), ours $qk_rc ($(first qk.err))"
  elif [ "$(first ref.err)" != "$(first qk.err)" ]; then
    bad "$n/message" "qemu-img: '$(first ref.err)' ours: '$(first qk.err)'"
  else ok; fi
}

# bcase NAME TEMPLATE ARGS...: `bitmap ARGS ref.qcow2 ...` on copies, where
# the word IMG in ARGS stands for the image (6 results).
bcase() {
  local n=$1 tpl=$2; shift 2
  local -a ra=() qa=()
  local a
  for a in "$@"; do
    if [ "$a" = IMG ]; then ra+=(ref.qcow2); qa+=(qk.qcow2); else ra+=("$a"); qa+=("$a"); fi
  done
  rm -f ref.qcow2 qk.qcow2
  cp "$tpl" ref.qcow2 && cp "$tpl" qk.qcow2
  ref_rc=0; qemu-img bitmap "${ra[@]}" >ref.out 2>ref.err || ref_rc=$?
  run_qk qk.out qk.err bitmap "${qa[@]}"
  same_run "$n" || return
  judge "$n" ref.qcow2 qk.qcow2
}

# mkimg NAME SIZE [CREATE OPTIONS...]: NAME.qcow2 with data and b0, b1, b2.
mkimg() {
  local n=$1 size=$2; shift 2
  setup qemu-img create -q -f qcow2 "$@" "$n.qcow2" "$size" &&
  setup qemu-io -f qcow2 -c 'write -P 0x11 0 1M' -c 'write -c -P 0x22 2M 2M' "$n.qcow2" &&
  setup qemu-img bitmap --add "$n.qcow2" b0 &&
  setup qemu-img bitmap --add -g 4096 "$n.qcow2" b1 &&
  setup qemu-img bitmap --add --disable "$n.qcow2" b2 &&
  setup qemu-io -f qcow2 -c 'write -P 0x33 5M 100k' -c 'write -P 0x34 1000 5000' \
    -c "write -z $((SIZE - 3000)) 3000" "$n.qcow2" &&
  setup qemu-img bitmap --merge b1 "$n.qcow2" b2 &&
  setup qemu-io -f qcow2 -c 'write -P 0x35 7M 64k' "$n.qcow2"
}

# set_in_use IMG NAME: the in-use flag of bitmap NAME set, as a crash leaves it.
set_in_use() {
  python3 - "$1" "$2" <<'PYEOF' || bad setup "could not set the in-use flag"
import struct, sys
f = open(sys.argv[1], "r+b")
hdr = f.read(104)
off = struct.unpack(">I", hdr[100:104])[0]
while True:
    f.seek(off)
    m, ln = struct.unpack(">II", f.read(8))
    if m == 0x23852875:
        nb, _, dsize, doff = struct.unpack(">IIQQ", f.read(24))
        break
    if m == 0:
        sys.exit("no bitmaps extension")
    off += 8 + ((ln + 7) & ~7)
f.seek(doff)
d = f.read(dsize)
p = 0
for _ in range(nb):
    flags = struct.unpack(">I", d[p + 12:p + 16])[0]
    nlen, extra = struct.unpack(">HI", d[p + 18:p + 24])
    if d[p + 24 + extra:p + 24 + extra + nlen].decode() == sys.argv[2]:
        f.seek(doff + p + 12)
        f.write(struct.pack(">I", flags | 1))
        sys.exit(0)
    p += (24 + extra + nlen + 7) & ~7
sys.exit("no bitmap " + sys.argv[2])
PYEOF
}

mkimg v3 "$SIZE"
mkimg c512 "$SIZE" -o cluster_size=512
mkimg c2m "$SIZE" -o cluster_size=2M
mkimg other "$SIZE"
setup qemu-io -f qcow2 -c 'write -P 0x44 6M 300k' other.qcow2
mkimg big $((SIZE + M))
setup qemu-img create -q -f qcow2 base.qcow2 "$SIZE"
mkimg top "$SIZE" -b base.qcow2 -F qcow2
cp v3.qcow2 inuse.qcow2 && set_in_use inuse.qcow2 b1
setup qemu-img create -q -f qcow2 -o compat=0.10 v2.qcow2 "$SIZE"
setup qemu-img create -q -f raw raw.img "$SIZE"

# ---- info shows the bitmaps as qemu-img does (flags in-use, auto, none) ------------
for img in v3.qcow2 inuse.qcow2 c512.qcow2; do
  for fmt in human json; do
    qemu-img info --output=$fmt "$img" | grep -v -e '^disk size' -e '"actual-size"' >ref.info
    run_qk qk.out qk.err info --output=$fmt "$img"
    grep -v -e '^disk size' -e '"actual-size"' qk.out >qk.info
    if [ "$qk_rc" -eq 0 ] && cmp -s ref.info qk.info; then ok
    else bad "info --output=$fmt $img" "$(diff ref.info qk.info | head -8 | tr '\n' '|')"; fi
  done
done

# ---- each action ---------------------------------------------------------------
bcase "add" v3.qcow2 --add IMG b3
bcase "add -g 4k --disable" v3.qcow2 --add -g 4k --disable IMG b3
bcase "add -g 512" v3.qcow2 --add -g 512 IMG b3
bcase "add -g 2G" v3.qcow2 --add -g 2G IMG b3
bcase "add -g 0 (the default)" v3.qcow2 --add -g 0 IMG b3
bcase "add -g 6G (as 32 bits: 2 GiB)" v3.qcow2 --add -g 6G IMG b3
bcase "remove" v3.qcow2 --remove IMG b1
bcase "clear" v3.qcow2 --clear IMG b0
bcase "clear a disabled one" v3.qcow2 --clear IMG b2
bcase "disable" v3.qcow2 --disable IMG b0
bcase "disable a disabled one" v3.qcow2 --disable IMG b2
bcase "enable" v3.qcow2 --enable IMG b2
bcase "enable an enabled one" v3.qcow2 --enable IMG b1
bcase "merge fine into coarse" v3.qcow2 --merge b1 IMG b0
bcase "merge coarse into fine" v3.qcow2 --merge b0 IMG b1
bcase "merge into a disabled one" v3.qcow2 --merge b0 IMG b2
bcase "merge into itself" v3.qcow2 --merge b1 IMG b1
bcase "merge -b" v3.qcow2 --merge b1 -b other.qcow2 IMG b0
bcase "merge -b -F" v3.qcow2 --merge b0 -b other.qcow2 -F qcow2 IMG b2
bcase "add, merge -b, disable" v3.qcow2 --add --merge b1 -b other.qcow2 --disable IMG b3

# ---- several actions, in order -----------------------------------------------
bcase "add then clear" v3.qcow2 --add --clear IMG b3
bcase "add, disable, enable" v3.qcow2 --add --disable --enable IMG b3
bcase "remove then add" v3.qcow2 --remove --add -g 16k IMG b0
bcase "clear then merge" v3.qcow2 --clear --merge b1 IMG b0
bcase "add then failing merge (the add stays)" v3.qcow2 --add --merge nope IMG b3
bcase "two merges" v3.qcow2 --merge b1 --merge b2 IMG b0

# ---- refusals ----------------------------------------------------------------------
bcase "add an existing one" v3.qcow2 --add IMG b0
bcase "remove a missing one" v3.qcow2 --remove IMG nope
bcase "clear a missing one" v3.qcow2 --clear IMG nope
bcase "enable a missing one" v3.qcow2 --enable IMG nope
bcase "disable before add" v3.qcow2 --disable --add IMG b3
bcase "merge a missing source" v3.qcow2 --merge nope IMG b0
bcase "merge into a missing one" v3.qcow2 --merge b0 IMG nope
bcase "merge -b of another size" v3.qcow2 --merge b0 -b big.qcow2 IMG b0
bcase "merge -b -F raw" v3.qcow2 --merge b0 -b other.qcow2 -F raw IMG b0
bcase "empty name" v3.qcow2 --add IMG ''
bcase "name of 1023 bytes" v3.qcow2 --add IMG "$(printf 'n%.0s' $(seq 1023))"
bcase "name of 1024 bytes" v3.qcow2 --add IMG "$(printf 'n%.0s' $(seq 1024))"
bcase "granularity 1000" v3.qcow2 --add -g 1000 IMG b3
bcase "granularity 256" v3.qcow2 --add -g 256 IMG b3
bcase "granularity 4G (as 32 bits: 0)" v3.qcow2 --add -g 4G IMG b3
bcase "granularity abc" v3.qcow2 --add -g abc IMG b3
bcase "no action" v3.qcow2 IMG b0
bcase "-g without --add" v3.qcow2 --remove -g 4k IMG b0
bcase "-F without -b" v3.qcow2 --merge b0 -F qcow2 IMG b1
bcase "-b without --merge" v3.qcow2 --clear -b other.qcow2 IMG b1
bcase "one operand" v3.qcow2 --clear IMG
bcase "three operands" v3.qcow2 --clear IMG b0 b1
bcase "version 2" v2.qcow2 --add IMG b0
bcase "-f raw" v3.qcow2 -f raw --remove IMG b0
bcase "raw: add" raw.img -f raw --add IMG b0

# ---- an inconsistent bitmap (left in use) --------------------------------------------
bcase "in use: clear" inuse.qcow2 --clear IMG b1
bcase "in use: enable" inuse.qcow2 --enable IMG b1
bcase "in use: disable" inuse.qcow2 --disable IMG b1
bcase "in use: merge into" inuse.qcow2 --merge b0 IMG b1
bcase "in use: merge from" inuse.qcow2 --merge b1 IMG b0
bcase "in use: add over it" inuse.qcow2 --add IMG b1
bcase "in use: remove" inuse.qcow2 --remove IMG b1
bcase "in use: another one" inuse.qcow2 --clear IMG b0

# ---- other layouts -------------------------------------------------------------------------
for t in c512 c2m top; do
  bcase "$t: add (default granularity)" "$t.qcow2" --add IMG b3
  bcase "$t: merge coarse into fine" "$t.qcow2" --merge b0 IMG b1
  bcase "$t: clear, disable" "$t.qcow2" --clear --disable IMG b0
done
cp v3.qcow2 none.qcow2
setup qemu-img bitmap --remove none.qcow2 b0 && setup qemu-img bitmap --remove none.qcow2 b1
bcase "remove the last one" none.qcow2 --remove IMG b2
if [ "$(hdrbm qk.qcow2)" = "autoclear-bitmaps=0 extension=none" ]; then ok
else bad "remove the last one" "$(hdrbm qk.qcow2)"; fi
cp ref.qcow2 empty.qcow2
bcase "add the first one" empty.qcow2 --add -g 8k IMG first
# Many bitmaps, added one command at a time (the directory grows).
cp v3.qcow2 many-ref.qcow2 && cp v3.qcow2 many-qk.qcow2
for i in $(seq 24); do
  qemu-img bitmap --add -g $((512 << (i % 8))) many-ref.qcow2 "bitmap number $i" 2>/dev/null
  "$QCOWKIT" bitmap --add -g $((512 << (i % 8))) many-qk.qcow2 "bitmap number $i" 2>/dev/null
done
setup qemu-io -f qcow2 -c 'write -P 9 3M 1M' many-ref.qcow2
setup qemu-io -f qcow2 -c 'write -P 9 3M 1M' many-qk.qcow2
judge "24 more bitmaps" many-ref.qcow2 many-qk.qcow2

# ---- resize ------------------------------------------------------------------------------
cp v3.qcow2 rs-ref.qcow2 && cp v3.qcow2 rs-qk.qcow2
for step in 20M "--shrink 7M" 9M "--shrink 3000000" "--shrink $((4 * M + 512))" $((16 * M + 512)); do
  read -r -a args <<<"$step"
  sz=${args[-1]} opt=()
  [ "${#args[@]}" -gt 1 ] && opt=(--shrink)
  ref_rc=0; qemu-img resize "${opt[@]}" rs-ref.qcow2 "$sz" >ref.out 2>ref.err || ref_rc=$?
  run_qk qk.out qk.err resize "${opt[@]}" rs-qk.qcow2 "$sz"
  same_run "resize $step" && judge "resize $step" rs-ref.qcow2 rs-qk.qcow2
done
cp inuse.qcow2 rs-ref.qcow2 && cp inuse.qcow2 rs-qk.qcow2
ref_rc=0; qemu-img resize rs-ref.qcow2 20M >ref.out 2>ref.err || ref_rc=$?
run_qk qk.out qk.err resize rs-qk.qcow2 20M
if [ "$ref_rc" -ne 0 ] && [ "$qk_rc" -eq 1 ] && grep -q "Bitmap 'b1' is inconsistent" qk.err; then ok
else bad "resize with an inconsistent bitmap" "qemu-img exit $ref_rc, ours $qk_rc: $(cat qk.err)"; fi
judge "resize with an inconsistent bitmap" rs-ref.qcow2 rs-qk.qcow2

# ---- convert --bitmaps ----------------------------------------------------------------------
ccase() {
  local n=$1; shift
  rm -f cv-ref.qcow2 cv-qk.qcow2
  ref_rc=0; qemu-img convert "${@/DST/cv-ref.qcow2}" >ref.out 2>ref.err || ref_rc=$?
  run_qk qk.out qk.err convert "${@/DST/cv-qk.qcow2}"
  same_run "$n" || return
  [ "$ref_rc" -eq 0 ] && judge "$n" cv-ref.qcow2 cv-qk.qcow2
}
ccase "convert --bitmaps" --bitmaps -O qcow2 v3.qcow2 DST
ccase "convert --bitmaps to 4 KiB clusters" --bitmaps -O qcow2 -o cluster_size=4k c2m.qcow2 DST
ccase "convert --bitmaps -c" --bitmaps -c -O qcow2 v3.qcow2 DST
ccase "convert --bitmaps of an inconsistent one" --bitmaps -O qcow2 inuse.qcow2 DST
ccase "convert --bitmaps --skip-broken-bitmaps" --bitmaps --skip-broken-bitmaps -O qcow2 inuse.qcow2 DST
ccase "convert --skip-broken-bitmaps alone" --skip-broken-bitmaps -O qcow2 v3.qcow2 DST
ccase "convert --bitmaps of a raw image" --bitmaps -O qcow2 -f raw raw.img DST
ccase "convert --bitmaps of a v2 image" --bitmaps -O qcow2 v2.qcow2 DST
ccase "convert --bitmaps to v2" --bitmaps -O qcow2 -o compat=0.10 v3.qcow2 DST

# ---- check of a stale in-use bitmap -------------------------------------------------------
# qemu-img check says nothing and -r all leaves it; ours warns (exit 0, as
# the metadata is sound) and -r all removes it: the image then equals what
# qemu-img bitmap --remove makes of it.
cp inuse.qcow2 st-qk.qcow2 && cp inuse.qcow2 st-ref.qcow2
run_qk qk.out qk.err check st-qk.qcow2
if [ "$qk_rc" -eq 0 ] && grep -q "^Warning: bitmap 'b1' was left in use" qk.err; then ok
else bad "check: stale bitmap" "exit $qk_rc: $(cat qk.err)"; fi
run_qk qk.out qk.err check --output=json st-qk.qcow2
if grep -q '"qcowkit-stale-bitmaps": 1' qk.out; then ok; else bad "check --output=json: stale bitmap" "$(cat qk.out)"; fi
run_qk qk.out qk.err check -r leaks st-qk.qcow2
describe st-qk.qcow2
if [ "$qk_rc" -eq 0 ] && [ "$(names st-qk.qcow2 | tr '\n' ' ')" = "b0 b2 " ] &&
   qemu-img info st-qk.qcow2 | grep -q in-use; then ok
else bad "check -r leaks keeps a stale bitmap" "exit $qk_rc: $(cat qk.err)"; fi
run_qk qk.out qk.err check -r all st-qk.qcow2
if [ "$qk_rc" -eq 0 ] && grep -q "^Repairing bitmap 'b1'" qk.err; then ok
else bad "check -r all: stale bitmap" "exit $qk_rc: $(cat qk.err)"; fi
setup qemu-img bitmap --remove st-ref.qcow2 b1
judge "check -r all removes a stale bitmap" st-ref.qcow2 st-qk.qcow2
run_qk qk.out qk.err check st-qk.qcow2
if [ "$qk_rc" -eq 0 ] && [ ! -s qk.err ]; then ok; else bad "check after -r all" "exit $qk_rc: $(cat qk.err)"; fi
finish
