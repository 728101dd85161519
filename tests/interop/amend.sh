#!/usr/bin/env bash
# qcowkit amend against qemu-img amend (QEMU 7.2). For each case, a copy of
# an image that QEMU's tools made is amended by qemu-img and another by
# qcowkit, with the same -o options; then:
#   - qemu-img info --output=json of both is the same (but for the file
#     name and the space the file takes);
#   - qemu-img check of ours: no errors, no leaks;
#   - qemu-img compare: ours shows the guest what qemu-img's shows and what
#     the image showed before; and every internal snapshot too (qemu-img
#     convert -l NAME of each, compared);
# and for the options qemu-img refuses, both refuse, our message holds
# qemu-img's (its first line), and ours leaves the image as it was.
# Cases: compat 1.1 -> 0.10 with zero clusters (plain, preallocated, and
# unmapped ones, compressed clusters), without and over a backing file,
# with snapshots sharing L2 tables that hold zero clusters; 0.10 -> 1.1;
# refcount_bits 16 -> 1, 2, 4, 8, 32, 64 and back, with refcounts of 2 and 3
# from snapshots (and the widths too narrow for them refused); lazy
# refcounts on and off (off on an image a crash left dirty); the size;
# zstd images; an external data file's name and raw flag; 512-byte and
# 2 MiB clusters; -p and -o help; and every refusal below.
# shellcheck source=../lib.sh
. "$(dirname "$0")/../lib.sh"
need qemu-img qemu-io python3

cd "$T" || exit 1
M=1048576

# info_json IMG: qemu-img info --output=json without what differs between
# two copies made side by side.
# (qemu-img prints one key a line, in an order of its own but the same for
# the same keys.)
info_json() {
  qemu-img info -U --output=json "$1" | grep -v -e '^    "actual-size": ' -e '^    "filename": '
}

# snapshots IMG: the names of its internal snapshots (none has a space).
snapshots() {
  qemu-img snapshot -U -l "$1" | awk 'NR > 2 { print $2 }'
}

# same_content NAME A B: A and B show the same guest content, and so does
# every snapshot of A and B.
same_content() {
  local n=$1 a=$2 b=$3 s
  if ! qemu-img compare -U "$a" "$b" >cmp.out 2>&1; then
    bad "$n: content" "$(head -c 300 cmp.out)"
    return 1
  fi
  for s in $(snapshots "$a"); do
    qemu-img convert -U -l "$s" -O raw "$a" snap-a.raw &&
      qemu-img convert -U -l "$s" -O raw "$b" snap-b.raw || { bad "$n: snapshot $s" "convert -l failed"; return 1; }
    cmp -s snap-a.raw snap-b.raw || { bad "$n: snapshot $s" "content differs"; return 1; }
    rm -f snap-a.raw snap-b.raw
  done
  return 0
}

# amend_case NAME IMG OPTS [resized]: amend copies of IMG (in this
# directory, so a backing file's relative name still holds) with both tools
# and compare. The snapshots are compared with IMG's only: qemu-img 7.2's
# downgrade writes zeros over clusters that a snapshot shares with a zero
# cluster of the active image (write -z after the snapshot), destroying the
# snapshot's data (and leaving COPIED errors): ours must not.
amend_case() {
  local n=$1 img=$2 opts=$3 resized=${4:-} rc=0
  cp "$img" q.qcow2
  cp "$img" k.qcow2
  if ! qemu-img amend -o "$opts" q.qcow2 2>q.err; then
    bad "$n" "qemu-img amend -o $opts failed: $(head -c 300 q.err)"
    return
  fi
  "$QCOWKIT" amend -o "$opts" k.qcow2 2>k.err || rc=$?
  if [ "$rc" -ne 0 ] || crashed "$rc"; then
    bad "$n" "qcowkit amend -o $opts: exit $rc: $(head -c 300 k.err)"
    return
  fi
  info_json q.qcow2 >q.info
  info_json k.qcow2 >k.info
  if ! diff q.info k.info >info.diff; then
    bad "$n: info" "$(head -c 600 info.diff | tr '\n' ' ')"
    return
  fi
  rc=0
  qemu-img check k.qcow2 >check.out 2>&1 || rc=$?
  if [ "$rc" -ne 0 ]; then
    bad "$n: check" "exit $rc: $(grep -v '^$' check.out | head -5 | tr '\n' ' ')"
    return
  fi
  if ! qemu-img compare -U q.qcow2 k.qcow2 >cmp.out 2>&1; then
    bad "$n: content (qemu-img's)" "$(head -c 300 cmp.out)"
    return
  fi
  [ -n "$resized" ] || same_content "$n (before)" "$img" k.qcow2 || return
  ok "$n"
}

# solo_case NAME IMG OPTS PYTHON: as amend_case where qemu-img cannot be
# the reference (its refcount width change walks every entry the old
# refcount table could cover: hours with 2 MiB clusters): ours must show
# the info of IMG changed by the python statement PYTHON (on dict d, the
# format-specific data as f), check clean and keep the content.
solo_case() {
  local n=$1 img=$2 opts=$3 change=$4 rc=0
  cp "$img" k.qcow2
  "$QCOWKIT" amend -o "$opts" k.qcow2 2>k.err || rc=$?
  if [ "$rc" -ne 0 ]; then
    bad "$n" "qcowkit amend -o $opts: exit $rc: $(head -c 300 k.err)"
    return
  fi
  qemu-img info -U --output=json "$img" | python3 -c "
import json, sys
d = json.load(sys.stdin)
f = d['format-specific']['data']
$change
for k in ('actual-size', 'filename'):
    d.pop(k, None)
print(json.dumps(d, sort_keys=True, indent=1))" >a.info
  qemu-img info -U --output=json k.qcow2 | python3 -c "
import json, sys
d = json.load(sys.stdin)
for k in ('actual-size', 'filename'):
    d.pop(k, None)
print(json.dumps(d, sort_keys=True, indent=1))" >k.info
  if ! diff a.info k.info >info.diff; then
    bad "$n: info" "$(head -c 600 info.diff | tr '\n' ' ')"
    return
  fi
  qemu-img check k.qcow2 >check.out 2>&1 || rc=$?
  if [ "$rc" -ne 0 ]; then
    bad "$n: check" "exit $rc: $(grep -v '^$' check.out | head -5 | tr '\n' ' ')"
    return
  fi
  same_content "$n" "$img" k.qcow2 && ok "$n"
}

# refuse_case NAME IMG OPTS: both tools refuse; ours says what qemu-img
# says and leaves the image as it was.
refuse_case() {
  local n=$1 img=$2 opts=$3 rc=0 msg
  cp "$img" q.qcow2
  cp "$img" k.qcow2
  if qemu-img amend -o "$opts" q.qcow2 2>q.err; then
    bad "$n" "qemu-img amend -o $opts succeeded"
    return
  fi
  msg=$(head -1 q.err | sed 's/^qemu-img: //')
  "$QCOWKIT" amend -o "$opts" k.qcow2 >k.out 2>k.err || rc=$?
  if [ "$rc" -eq 0 ] || crashed "$rc"; then
    bad "$n" "qcowkit amend -o $opts: exit $rc"
    return
  fi
  if ! grep -qF -- "$msg" k.err || [ "$(wc -l <k.err)" -ne 1 ]; then
    bad "$n: message" "want '$msg', got '$(cat k.err)'"
    return
  fi
  info_json "$img" >a.info
  info_json k.qcow2 >k.info
  if ! diff a.info k.info >info.diff; then
    bad "$n: unchanged" "$(head -c 400 info.diff | tr '\n' ' ')"
    return
  fi
  rc=0
  qemu-img check k.qcow2 >check.out 2>&1 || rc=$?
  [ "$rc" -eq 0 ] || { bad "$n: check" "exit $rc"; return; }
  same_content "$n" "$img" k.qcow2 && ok "$n"
}

# ---- images -------------------------------------------------------------------------
# mkzero IMG CS [BACKING]: data, compressed, zero clusters of every kind
# (plain: never written; allocated: written, then zeroed in place;
# unmapped: zeroed with -u), partly over what a backing file holds.
mkzero() {
  local img=$1 cs=$2 back=${3:-} c
  if [ -n "$back" ]; then
    qemu-img create -q -f qcow2 -o cluster_size="$cs" -b "$back" -F qcow2 "$img"
  else
    qemu-img create -q -f qcow2 -o cluster_size="$cs" "$img" $((8 * M))
  fi
  c=$cs
  qemu-io -c "write -P 0x11 0 $((4 * c))" -c "write -c -P 0x22 $((8 * c)) $((2 * c))" \
    -c "write -z $((16 * c)) $((3 * c))" -c "write -P 0x33 $((24 * c)) $((2 * c))" \
    -c "write -z $((24 * c)) $((2 * c))" -c "write -P 0x44 $((32 * c)) $c" \
    -c "write -z -u $((32 * c)) $c" -c "write -z $((2 * M)) $M" \
    -c "write -P 0x55 $((5 * M)) $((64 * 1024))" "$img" >/dev/null
}

# mkbase IMG CS: a base image full of data where the overlays zero.
mkbase() {
  qemu-img create -q -f qcow2 -o cluster_size="$2" "$1" $((8 * M))
  qemu-io -c "write -P 0x66 0 $((8 * M))" "$1" >/dev/null
}

# snapshot IMG: two snapshots around more writes and zeros, so L2 tables
# holding zero clusters are shared (refcount 2 and 3) and some copied.
mksnaps() {
  local img=$1
  qemu-img snapshot -c s1 "$img"
  qemu-io -c "write -P 0x77 $((6 * M)) 4k" -c "write -z $((7 * M)) 128k" \
    -c "write -z 0 64k" "$img" >/dev/null
  qemu-img snapshot -c s2 "$img"
  qemu-io -c "write -P 0x88 $((6 * M + 128 * 1024)) 64k" "$img" >/dev/null
}

mkbase base.qcow2 65536
mkzero z.qcow2 65536
mkzero zb.qcow2 65536 base.qcow2
cp z.qcow2 zs.qcow2 && mksnaps zs.qcow2
cp zb.qcow2 zbs.qcow2 && mksnaps zbs.qcow2
qemu-img create -q -f qcow2 -o preallocation=metadata zp.qcow2 $((4 * M))
qemu-io -c "write -z 0 $M" -c "write -P 1 $((2 * M)) 64k" -c "write -z $((2 * M)) 64k" zp.qcow2 >/dev/null
mkbase base512.qcow2 512
mkzero z512.qcow2 512
mkzero zb512.qcow2 512 base512.qcow2
cp z512.qcow2 zs512.qcow2 && mksnaps zs512.qcow2
mkbase base2m.qcow2 $((2 * M))
mkzero zb2m.qcow2 $((2 * M)) base2m.qcow2
cp zb2m.qcow2 zbs2m.qcow2 && mksnaps zbs2m.qcow2
qemu-img create -q -f qcow2 -o compat=0.10 v2.qcow2 $((8 * M))
qemu-io -c "write -P 0x12 0 1M" -c "write -c -P 0x13 2M 128k" v2.qcow2 >/dev/null
cp v2.qcow2 v2s.qcow2 && qemu-img snapshot -c s1 v2s.qcow2 &&
  qemu-io -c "write -P 0x14 0 64k" v2s.qcow2 >/dev/null
qemu-img create -q -f qcow2 -o compat=0.10 -b base.qcow2 -F qcow2 v2b.qcow2
qemu-io -c "write -P 0x15 1M 64k" v2b.qcow2 >/dev/null

# ---- compat -------------------------------------------------------------------------
for i in z zb zs zbs zp z512 zb512 zs512 zb2m zbs2m; do
  amend_case "downgrade $i" "$i.qcow2" compat=0.10
done
amend_case "downgrade v2 spelling" z.qcow2 compat=v2
for i in v2 v2s v2b; do
  amend_case "upgrade $i" "$i.qcow2" compat=1.1
done
amend_case "upgrade with lazy refcounts" v2s.qcow2 compat=1.1,lazy_refcounts=on
amend_case "upgrade v3 spelling" v2.qcow2 compat=v3
amend_case "same compat" z.qcow2 compat=1.1
qemu-img create -q -f qcow2 -o compression_type=zstd zstd.qcow2 $((4 * M))
qemu-io -c "write -P 1 0 64k" -c "write -z 1M 64k" zstd.qcow2 >/dev/null
amend_case "downgrade zstd without compressed clusters" zstd.qcow2 compat=0.10

# ---- refcount_bits ------------------------------------------------------------------
# (compressed clusters sharing a host cluster count 2: zn has none)
qemu-img create -q -f qcow2 zn.qcow2 $((64 * M))
qemu-io -c "write -P 1 0 1M" -c "write -z 4M 1M" -c "write -P 2 40M 128k" zn.qcow2 >/dev/null
# qemu-img's way back to 16 bits from 1, 2 or 4 takes it 5 to 20 s (its
# walk covers all the old table could cover): back to 16, ours must give
# the image it started from.
for b in 1 2 4 8 32 64; do
  amend_case "refcount_bits 16->$b" zn.qcow2 refcount_bits=$b
  cp k.qcow2 r$b.qcow2
  solo_case "refcount_bits $b->16" r$b.qcow2 refcount_bits=16 'f["refcount-bits"] = 16'
done
for b in 4 64; do
  amend_case "refcount_bits 16->$b with snapshots" zbs.qcow2 refcount_bits=$b
done
cp k.qcow2 rs64.qcow2
solo_case "refcount_bits 64->4 with snapshots" rs64.qcow2 refcount_bits=4 'f["refcount-bits"] = 4'
solo_case "refcount_bits 64->16 with snapshots" rs64.qcow2 refcount_bits=16 'f["refcount-bits"] = 16'
amend_case "refcount_bits 16->4, 512-byte clusters" zs512.qcow2 refcount_bits=4,compat=1.1
amend_case "refcount_bits 16->64, 512-byte clusters" zs512.qcow2 refcount_bits=64
solo_case "refcount_bits 16->1, 2 MiB clusters" zb2m.qcow2 refcount_bits=1 'f["refcount-bits"] = 1'
solo_case "refcount_bits 16->64, 2 MiB clusters" zbs2m.qcow2 refcount_bits=64 'f["refcount-bits"] = 64'
cp k.qcow2 r2m.qcow2
solo_case "refcount_bits 64->4, 2 MiB clusters" r2m.qcow2 refcount_bits=4 'f["refcount-bits"] = 4'
solo_case "refcount_bits 64->16 and downgrade, 2 MiB clusters" r2m.qcow2 refcount_bits=16,compat=0.10 \
  'd["format-specific"]["data"] = {"compat": "0.10", "compression-type": "zlib", "refcount-bits": 16}'
rc=0; "$QCOWKIT" amend -o refcount_bits=1 r2m.qcow2 2>k.err || rc=$?
if [ "$rc" -ne 0 ] && grep -q "Cannot decrease refcount entry width to 1 bits: Cluster at offset 0x[0-9a-f]* has a refcount of [2-9]" k.err; then
  ok "refuse refcount_bits 64->1, 2 MiB clusters"; else bad "refuse refcount_bits 64->1, 2 MiB clusters" "exit $rc: $(cat k.err)"; fi
amend_case "upgrade and refcount_bits" v2s.qcow2 compat=1.1,refcount_bits=8
amend_case "refcount_bits and downgrade" rs64.qcow2 refcount_bits=16,compat=0.10

# ---- lazy refcounts, size -----------------------------------------------------------
amend_case "lazy_refcounts on" zs.qcow2 lazy_refcounts=on
cp q.qcow2 lazy.qcow2
amend_case "lazy_refcounts off" lazy.qcow2 lazy_refcounts=off
amend_case "lazy_refcounts and downgrade" lazy.qcow2 compat=0.10
# A crash leaves a lazy image dirty: both open it, rebuild, then amend.
cp lazy.qcow2 dirty.qcow2
{ qemu-io -c "write -P 9 3M 64k" -c abort dirty.qcow2 >/dev/null 2>&1; } 2>/dev/null  # (not "Aborted")
check "dirty after the crash" grep -q '"dirty-flag": true' <(qemu-img info -U --output=json dirty.qcow2)
amend_case "lazy_refcounts off, dirty" dirty.qcow2 lazy_refcounts=off
amend_case "dirty and refcount_bits" dirty.qcow2 refcount_bits=8
amend_case "grow" z.qcow2 size=16M resized
amend_case "shrink" z.qcow2 size=3M resized
amend_case "size and downgrade" zs.qcow2 size=8M,compat=0.10
amend_case "backing file unchanged" zb.qcow2 backing_file=base.qcow2,backing_fmt=qcow2

# ---- external data file ------------------------------------------------------------
qemu-img create -q -f qcow2 -o data_file=d.data,data_file_raw=on d.qcow2 $((4 * M))
qemu-io -c "write -P 3 0 64k" d.qcow2 >/dev/null
amend_case "data_file_raw off" d.qcow2 data_file_raw=off
amend_case "data_file_raw on, as it is" d.qcow2 data_file_raw=on
cp d.data d2.data
amend_case "data_file renamed" d.qcow2 data_file=d2.data

# ---- refusals, with qemu-img's messages ----------------------------------------------
qemu-img create -q -f qcow2 -o extended_l2=on e.qcow2 $((4 * M))
qemu-img create -q -f qcow2 -o compression_type=zstd zc.qcow2 $((4 * M))
qemu-io -c "write -c -P 1 0 64k" zc.qcow2 >/dev/null
qemu-img create -q -f qcow2 -o refcount_bits=8 r8.qcow2 $((4 * M))
cp zs.qcow2 zsr.qcow2 && qemu-img resize -q zsr.qcow2 16M
for o in foo=bar cluster_size=4k preallocation=full extended_l2=on compression_type=zstd \
  encryption=on encrypt.format=luks encrypt.state=active compat=0.42 compat= refcount_bits=3 \
  refcount_bits=128 refcount_bits=-16 refcount_bits=abc lazy_refcounts=maybe size=1000 \
  size=-1 backing_file=foo backing_fmt=raw data_file=x data_file_raw=on \
  compat=0.10,lazy_refcounts=on compat=0.10,refcount_bits=8 backing_file=x,refcount_bits=8; do
  refuse_case "refuse $o" z.qcow2 "$o"
done
refuse_case "refuse backing_file alone" zb.qcow2 backing_file=base.qcow2
refuse_case "refuse lazy_refcounts on v2" v2.qcow2 lazy_refcounts=on
refuse_case "refuse refcount_bits on v2" v2.qcow2 refcount_bits=8
refuse_case "refuse downgrade extended_l2" e.qcow2 compat=0.10
refuse_case "refuse downgrade data file" d.qcow2 compat=0.10
refuse_case "refuse downgrade zstd compressed" zc.qcow2 compat=0.10
refuse_case "refuse downgrade refcount_bits=8" r8.qcow2 compat=0.10
refuse_case "refuse downgrade snapshot size" zsr.qcow2 compat=0.10
refuse_case "refuse refcount_bits 16->1 (compressed, refcount 2)" z.qcow2 refcount_bits=1
refuse_case "refuse refcount_bits 16->2 (refcount 6)" zs.qcow2 refcount_bits=2
refuse_case "refuse refcount_bits 64->2 (refcount 6)" rs64.qcow2 refcount_bits=2
refuse_case "refuse refcount_bits 64->1" rs64.qcow2 refcount_bits=1
refuse_case "refuse refcount_bits 16->1, 512-byte clusters" zs512.qcow2 refcount_bits=1
refuse_case "refuse v2 snapshots resize" v2s.qcow2 size=16M

# ---- the command line ------------------------------------------------------------------
cp z.qcow2 p.qcow2
if "$QCOWKIT" amend -p -o refcount_bits=64,compat=0.10 p.qcow2 >p.out 2>p.err; then
  bad "-p" "succeeded: $(cat p.err)"
else
  ok "-p refused"
fi
if "$QCOWKIT" amend -p -o refcount_bits=64 p.qcow2 >p.out 2>&1 && grep -q '(100.00/100%)' p.out &&
  grep -q '(0.00/100%)' p.out; then ok "-p"; else bad "-p" "$(head -c 200 p.out)"; fi
if "$QCOWKIT" amend -q -p -o refcount_bits=16 p.qcow2 >p.out 2>&1 && [ ! -s p.out ]; then
  ok "-q"; else bad "-q" "$(head -c 200 p.out)"; fi
qemu-img amend -o help z.qcow2 >q.help
"$QCOWKIT" amend -o help z.qcow2 >k.help
check "-o help" cmp -s q.help k.help
"$QCOWKIT" amend -f qcow2 -o help >k.help
check "-f qcow2 -o help" cmp -s q.help k.help
rc=0; "$QCOWKIT" amend z.qcow2 2>k.err || rc=$?
check "no -o" grep -q "Must specify options (-o)" k.err
qemu-img create -q -f raw r.raw 1M
rc=0; "$QCOWKIT" amend -f raw -o size=2M r.raw 2>k.err || rc=$?
check "raw" grep -q "Format driver 'raw' does not support option amendment" k.err
rc=0; "$QCOWKIT" amend -o compat=1.1 2>k.err || rc=$?
check "no file" grep -q "Expecting one image file name" k.err
finish
