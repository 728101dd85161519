#!/usr/bin/env bash
# io's writing commands next to qemu-io 7.2: write [-P] [-z [-u]], writev,
# discard, flush and aio_flush, each run by qemu-io (with -d unmap, so its
# discard really discards) and by qcowkit on two copies of the same image.
# Per case: the same exit status and the same stdout (timing lines aside),
# `qemu-img compare` says the two images are identical, and `qemu-img check`
# of ours finds no errors and no leaks. Images: v3 and v2 with 64 KiB
# clusters (data, zero, compressed, unallocated clusters and a partial last
# cluster), 512-byte clusters (many L2 tables), a 1 GiB image (writes across
# its two L2 tables), extended L2, v3 and v2 overlays over a base with data
# and compressed clusters, and a raw file. Then the failures: writing to an
# image opened with -r, writing past the end, write -c off cluster bounds or
# to raw, and qemu-io's argument errors, word for word. Last, bench -w
# against qemu-img bench -w with the same flags (same content, clean image).
# shellcheck source=../lib.sh
. "$(dirname "$0")/../lib.sh"
# shellcheck source=../interop/readcmp.bash
. "$(dirname "$0")/../interop/readcmp.bash"
need qemu-img qemu-io python3

cd "$T" || exit 1
K=1024
M=1048576

# ---- templates -------------------------------------------------------------------
# The 64k layout, SIZE = 4M + 1536 (a partial last cluster):
#   [0, 192k) data 0x11 | [256k, 320k) zero (v2: unallocated) |
#   [512k, 640k) compressed 0x33 | [1M, 1M+64k) data 0x44 |
#   [4M, 4M+1536) data 0x55; the rest unallocated.
SIZE64=$((4 * M + 1536))
fill64() {
  setup qemu-io -f qcow2 "$1" -c 'write -P 0x11 0 192k' -c 'write -z 256k 64k' \
    -c 'write -c -P 0x33 512k 128k' -c 'write -P 0x44 1M 64k' -c "write -P 0x55 $((4 * M)) 1536"
}
setup qemu-img create -q -f qcow2 v3.qcow2 "$SIZE64" && fill64 v3.qcow2
setup qemu-img create -q -f qcow2 -o compat=0.10 v2.qcow2 "$SIZE64" && fill64 v2.qcow2
setup qemu-img create -q -f qcow2 -o extended_l2=on el2.qcow2 "$SIZE64" && fill64 el2.qcow2
setup qemu-img create -q -f qcow2 -o refcount_bits=1,lazy_refcounts=on lazy.qcow2 "$SIZE64" && fill64 lazy.qcow2
# a base under the overlays: 0x66 everywhere but compressed 0x77 at [2M, 2M+128k)
setup qemu-img create -q -f qcow2 base.qcow2 "$SIZE64"
setup qemu-io -f qcow2 base.qcow2 -c 'write -P 0x66 0 2M' -c 'write -c -P 0x77 2M 128k' \
  -c "write -P 0x66 $((2 * M + 128 * K)) $((SIZE64 - 2 * M - 128 * K))"
setup qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top3.qcow2 "$SIZE64" && fill64 top3.qcow2
setup qemu-img create -q -f qcow2 -o compat=0.10 -b base.qcow2 -F qcow2 top2.qcow2 "$SIZE64" && fill64 top2.qcow2
# 512-byte clusters: an L2 table covers 32k. [0, 40k) data 0x11, [48k, 52k)
# zero, [64k, 68k) compressed 0x33.
setup qemu-img create -q -f qcow2 -o cluster_size=512 s512.qcow2 4M
setup qemu-io -f qcow2 s512.qcow2 -c 'write -P 0x11 0 40k' -c 'write -z 48k 4k' -c 'write -c -P 0x33 64k 4k'
setup qemu-img create -q -f qcow2 -o cluster_size=512,compat=0.10 s512v2.qcow2 4M
setup qemu-io -f qcow2 s512v2.qcow2 -c 'write -P 0x11 0 40k' -c 'write -c -P 0x33 64k 4k'
# 1 GiB: the second L2 table starts at 512M
setup qemu-img create -q -f qcow2 big.qcow2 1G
setup qemu-io -f qcow2 big.qcow2 -c "write -P 0x11 $((512 * M - 64 * K)) 64k"
setup qemu-img create -q -f raw a.raw 4M
setup qemu-io -f raw a.raw -c 'write -P 0x11 0 64k' -c 'write -P 0x22 1M 64k'

# ---- the comparison ------------------------------------------------------------------
# wcase NAME TEMPLATE CMD...: copy TEMPLATE twice (same directory, so a
# relative backing name still resolves), run the commands through qemu-io
# and through qcowkit, compare exit status, stdout and the images, and check
# ours: 3 results (2 for raw).
wcase() {
  local n=$1 tpl=$2; shift 2
  local ext=${tpl##*.} fmt=qcow2 ref_rc=0 c
  [ "$ext" = raw ] && fmt=raw
  local -a args=()
  for c in "$@"; do args+=(-c "$c"); done
  cp "$tpl" "ref.$ext" && cp "$tpl" "qk.$ext"
  qemu-io -d unmap -f "$fmt" "ref.$ext" "${args[@]}" >ref.out 2>ref.err || ref_rc=$?
  run_qk qk.out qk.err io -f "$fmt" "qk.$ext" "${args[@]}"
  if crashed "$qk_rc"; then bad "$n: output" "$(qk_why qk.err)"; return; fi
  if [ "$ref_rc" -ne 0 ]; then
    bad "$n: output" "test bug: qemu-io failed (exit $ref_rc): $(head -c 300 ref.out ref.err | tr '\n' ' ')"
    return
  fi
  grep -v ' ops; ' ref.out >ref.lines
  grep -v ' ops; ' qk.out >qk.lines
  if [ "$qk_rc" -ne 0 ]; then
    bad "$n: output" "$(qk_why qk.err) [$*]"
  elif ! cmp -s ref.lines qk.lines; then
    bad "$n: output" "[$*] differs from qemu-io (- qemu-io, + qcowkit):
$(diff -u ref.lines qk.lines | sed -n '3,14p')"
  else
    ok "$n: output"
  fi
  if qemu-img compare -f "$fmt" -F "$fmt" "ref.$ext" "qk.$ext" >cmp.out 2>&1; then
    ok "$n: content"
  else
    bad "$n: content" "[$*] image differs from qemu-io's: $(head -c 300 cmp.out | tr '\n' ' ')"
  fi
  [ "$fmt" = raw ] && return
  if qemu-img check -f qcow2 "qk.$ext" >chk.out 2>&1; then
    ok "$n: check"
  else
    bad "$n: check" "[$*] qemu-img check exit $?: $(grep -v '^$' chk.out | head -6 | tr '\n' '|')"
  fi
}

# The 64k-layout cases, on every 64k template.
cases64() {
  local t=$1 end=$((4 * M)) last=$((4 * M - 64 * K))
  wcase "$t: partial write, data cluster" "$t" 'write -P 0xa1 1000 3000'
  wcase "$t: partial write, unallocated cluster" "$t" 'write -P 0xa2 200k 1000'
  wcase "$t: partial write, compressed cluster" "$t" 'write -P 0xa3 530k 100'
  wcase "$t: partial write, zero cluster" "$t" 'write -P 0xa4 260k 512'
  wcase "$t: partial write, over backing or nothing" "$t" 'write -P 0xa5 2100000 7000'
  wcase "$t: write across clusters" "$t" 'write -P 0xb1 60k 10k' 'write -P 0xb2 180k 100k' 'write 600k 100k'
  wcase "$t: whole-cluster writes, writev" "$t" 'write -P 0xc1 2M 128k' 'writev -P 0xc2 1M 4k 60k 64k'
  wcase "$t: write, last partial cluster" "$t" "write -P 0xe1 $end 1536" "write -P 0xe2 $((end + 512)) 1k"
  wcase "$t: write -z, whole clusters" "$t" 'write -z 0 64k' 'write -z 2M 64k' 'write -z 512k 64k' 'write -z 256k 64k'
  wcase "$t: write -z, partial clusters" "$t" 'write -z 70000 1000' 'write -z 100k 100k' 'write -z 520k 4k' "write -z $end 512"
  wcase "$t: write -z -u, whole clusters" "$t" 'write -z -u 0 64k' 'write -z -u 2M 64k' 'write -z -u 576k 64k' 'write -z -u 256k 64k' 'write -z -u 1M 64k'
  wcase "$t: write -z -u, partial and to the end" "$t" 'write -zu 1000 200k' "write -z -u $last $((64 * K + 1536))"
  wcase "$t: discard whole clusters" "$t" 'discard 0 64k' 'discard 512k 128k' 'discard 1M 64k' 'discard 2M 64k' 'discard 256k 64k'
  wcase "$t: discard partial clusters" "$t" 'discard 1000 200k' 'discard 530k 1000' 'discard 1M 4k'
  wcase "$t: discard the last partial cluster" "$t" "discard $end 1536"
  wcase "$t: discard up to the end" "$t" "discard $last $((64 * K + 1536))"
  wcase "$t: discard past a partial last cluster's start only" "$t" "discard $end 512"
  wcase "$t: write, discard, rewrite" "$t" 'discard 0 192k' 'write -P 0xf1 64k 1000' 'write -z -u 128k 64k' 'write -P 0xf2 130k 10'
  wcase "$t: flush between" "$t" 'write -P 0xd1 0 64k' 'flush' 'write -z 64k 64k' 'aio_flush' 'discard 128k 64k' 'flush' 'write -P 0xd2 3M 100k' 'f'
  wcase "$t: write -c, unallocated clusters" "$t" 'write -c -P 0xc3 2M 128k' 'write -c 3M 64k' 'write -c -P 0xc4 3200k 64k'
  wcase "$t: write -c, then partial overwrite" "$t" 'write -c -P 0xc5 2M 64k' 'write -P 0xc6 2100000 1000' 'write -c -P 0xc7 3M 64k' 'discard 3M 64k'
  wcase "$t: zero-length requests, -q" "$t" 'write 0 0' 'discard 0 0' 'write -z 0 0' 'write -q -P 9 0 512' 'discard -q 2M 64k' 'w -f 1M 512' 'd 512k 64k'
}
for t in v3.qcow2 v2.qcow2 el2.qcow2 top3.qcow2 top2.qcow2; do cases64 "$t"; done
# a lazy-refcounts image with 1-bit refcounts: fewer cases
wcase "lazy.qcow2: writes, zeros, discards" lazy.qcow2 'write -P 0xa1 1000 3000' 'write -P 0xa3 530k 100' \
  'write -z -u 0 64k' 'discard 1M 64k' 'write -P 0xb1 2M 100k' 'flush' 'write -z 3M 128k'

# 512-byte clusters: writes across L2 tables (each covers 32k)
for t in s512.qcow2 s512v2.qcow2; do
  wcase "$t: write across an L2 table boundary" "$t" 'write -P 0xa1 30k 4k'
  wcase "$t: write over several L2 tables" "$t" 'write -P 0xa2 100000 70000'
  wcase "$t: partial write, compressed cluster" "$t" 'write -P 0xa3 65600 300'
  wcase "$t: write -z across L2 tables" "$t" 'write -z 31k 2k' 'write -z 200k 100k' 'write -z 1000 100'
  wcase "$t: write -z -u" "$t" 'write -z -u 60k 8k' 'write -z -u 16k 32k'
  wcase "$t: discard" "$t" 'discard 40k 30k' 'discard 1000 1000' 'discard 0 33k'
  wcase "$t: discard to the end" "$t" 'write -P 0x44 4193280 1024' 'discard 4193000 1304'
done

# 1 GiB, 64k clusters: the second L2 table starts at 512M
B=$((512 * M))
wcase "big: write across the L2 boundary" big.qcow2 "write -P 0xa1 $((B - 64 * K)) 128k" "write -P 0xa2 $((B - 500)) 1000"
wcase "big: write -z across the L2 boundary" big.qcow2 "write -z $((B - 64 * K)) 128k" "write -P 0xa3 $((B + 64 * K)) 64k" "write -z -u $((B + 60 * K)) 72k"
wcase "big: discard across the L2 boundary" big.qcow2 "write -P 0xa4 $B 64k" "discard $((B - 64 * K)) 128k"
wcase "big: far end" big.qcow2 "write -P 0xa5 $((1024 * M - 1000)) 1000" "discard $((1024 * M - 64 * K)) 64k"

# raw
wcase "raw: write, write -z" a.raw 'write -P 0xa1 1000 3000' 'write -z 1M 4k' 'write -z -u 2M 64k' 'writev 3M 512 512'
wcase "raw: discard" a.raw 'discard 0 64k' 'discard 2M 1M' 'flush'

# ---- -C: machine-readable statistics -------------------------------------------------
cp v3.qcow2 qk.qcow2
run_qk qk.out qk.err io qk.qcow2 -c 'write -C 0 512' -c 'discard -C 0 64k' -c 'write -z -C 64k 64k'
if [ "$qk_rc" -eq 0 ] && [ "$(grep -cE '^(512|65536),1,[0-9]+:[0-9]{2}:[0-9]{2}\.[0-9]{2},[0-9.]+,[0-9.]+$' qk.out)" -eq 3 ]; then
  ok "write/discard -C"
else
  bad "write/discard -C" "exit $qk_rc: $(head -c 300 qk.out qk.err | tr '\n' '|')"
fi

# ---- failures --------------------------------------------------------------------------
# img_sum FILE: the file's sha256
img_sum() { sha256sum <"$1"; }

# wfail NAME TEMPLATE WANT IOARGS...: qcowkit io IOARGS on a copy of TEMPLATE
# fails with exactly one line of output (matching the extended regex WANT),
# no "wrote"/"discard" claim, and leaves the file unchanged. 1 result.
wfail() {
  local n=$1 tpl=$2 want=$3; shift 3
  local ext=${tpl##*.} before lines
  cp "$tpl" "qk.$ext"
  before=$(img_sum "qk.$ext")
  run_qk qk.out qk.err io "$@"
  cat qk.out qk.err >qk.all
  lines=$(grep -c . qk.all)
  if [ "$qk_rc" -eq 0 ] || crashed "$qk_rc"; then
    bad "$n" "exit $qk_rc, want a failure: $(head -c 300 qk.all | tr '\n' '|')"
  elif [ "$lines" -ne 1 ] || ! [ -s qk.err ]; then
    bad "$n" "want one line on stderr, got $lines: $(head -c 300 qk.all | tr '\n' '|')"
  elif ! grep -qiE "$want" qk.all; then
    bad "$n" "message does not match /$want/: $(cat qk.all)"
  elif [ "$(img_sum "qk.$ext")" != "$before" ]; then
    bad "$n" "the image changed"
  else
    ok "$n"
  fi
}

for c in 'write 0 512' 'write -z 0 64k' 'write -z -u 0 64k' 'discard 0 64k' 'writev 0 512' 'w -P 1 0 1'; do
  wfail "read-only: $c" v3.qcow2 'read-only' -r qk.qcow2 -c "$c"
done
# qemu-io's words, after our prefix
qemu-io -r -f qcow2 v3.qcow2 -c 'write 0 512' >ref.out 2>ref.err
cp v3.qcow2 qk.qcow2
run_qk qk.out qk.err io -r -f qcow2 qk.qcow2 -c 'write 0 512'
if [ "$(sed 's/^qemu-io: //' ref.err)" = "$(sed 's/^qcowkit: //' qk.err)" ] && [ ! -s qk.out ]; then ok "read-only: qemu-io's message"
else bad "read-only: qemu-io's message" "qemu-io: $(cat ref.err) qcowkit: $(cat qk.out qk.err)"; fi
# reads and flushes work read-only; a write among them fails the run but not them
cp v3.qcow2 qk.qcow2
before=$(img_sum qk.qcow2)
run_qk qk.out qk.err io -r qk.qcow2 -c 'flush' -c 'read -P 0x11 0 64k' -c 'write 0 512' -c 'aio_flush' -c 'read -P 0x44 1M 64k'
if [ "$qk_rc" -eq 1 ] && [ "$(grep -c '^read ' qk.out)" -eq 2 ] && [ "$(img_sum qk.qcow2)" = "$before" ]; then ok "read-only: other commands still run"
else bad "read-only: other commands still run" "exit $qk_rc: $(head -c 300 qk.out qk.err | tr '\n' '|')"; fi
# a missing file fails to open, with one line
run_qk qk.out qk.err io nonexist.qcow2 -c 'write 0 512'
if [ "$qk_rc" -ne 0 ] && ! crashed "$qk_rc" && [ "$(grep -c . qk.err)" -eq 1 ]; then ok "write to a missing file"
else bad "write to a missing file" "exit $qk_rc: $(head -c 300 qk.out qk.err | tr '\n' '|')"; fi

# past the end (SIZE64 = 4M + 1536): qemu-io fails too
for c in "write $SIZE64 512" "write $((SIZE64 - 1000)) 1024" "write -z $SIZE64 512" "write -z -u 4M 64k" \
         "discard $SIZE64 512" "discard 4M 64k" "writev $((SIZE64 - 512)) 512 512" "write 8G 512" "write -P 3 0 5M"; do
  ref_rc=0
  cp v3.qcow2 ref.qcow2
  qemu-io -f qcow2 ref.qcow2 -c "$c" >/dev/null 2>&1 || ref_rc=$?
  if [ "$ref_rc" -eq 0 ]; then bad "past the end: $c" "test bug: qemu-io accepts it"; continue; fi
  wfail "past the end: $c" v3.qcow2 'past the end|end of the image' qk.qcow2 -c "$c"
done
wfail "past the end, raw" a.raw 'past the end|end of the image' -f raw qk.raw -c "write $((4 * M)) 512"

# write -c: cluster aligned, or ending at the end of the image
wfail "write -c, unaligned offset" v3.qcow2 'whole cluster' qk.qcow2 -c 'write -c 512 64k'
wfail "write -c, partial cluster" v3.qcow2 'whole cluster' qk.qcow2 -c 'write -c -P 1 2M 100k'
wfail "write -c, raw" a.raw 'compressed' -f raw qk.raw -c 'write -c 0 64k'
wfail "write -b" v3.qcow2 'not supported' qk.qcow2 -c 'write -b 0 512'
# several commands, one failing in the middle: the others take effect
cp v3.qcow2 ref.qcow2; cp v3.qcow2 qk.qcow2
qemu-io -d unmap -f qcow2 ref.qcow2 -c 'write -P 0x61 0 512' -c "write 8M 512" -c 'write -P 0x62 4k 512' >ref.out 2>&1
run_qk qk.out qk.err io qk.qcow2 -c 'write -P 0x61 0 512' -c "write 8M 512" -c 'write -P 0x62 4k 512'
if [ "$qk_rc" -eq 1 ] && [ "$(grep -c '^wrote ' qk.out)" -eq 2 ] && [ "$(grep -c . qk.err)" -eq 1 ] &&
   qemu-img compare ref.qcow2 qk.qcow2 >/dev/null 2>&1; then ok "a failing command among others"
else bad "a failing command among others" "exit $qk_rc: $(head -c 300 qk.out qk.err | tr '\n' '|')"; fi

# argument errors: stdout, stderr and exit status exactly as qemu-io's
acase() {
  local n="args: $1" c=$1 ref_rc=0
  cp v3.qcow2 ref.qcow2; cp v3.qcow2 qk.qcow2
  qemu-io -f qcow2 ref.qcow2 -c "$c" >ref.out 2>ref.err || ref_rc=$?
  run_qk qk.out qk.err io -f qcow2 qk.qcow2 -c "$c"
  if [ "$qk_rc" -ne "$ref_rc" ]; then
    bad "$n" "exit $qk_rc, qemu-io exits $ref_rc: $(head -c 200 qk.out qk.err | tr '\n' '|')"
  elif ! cmp -s ref.out qk.out || ! cmp -s ref.err qk.err; then
    bad "$n" "qemu-io: $(tr '\n' '|' <ref.out) / $(tr '\n' '|' <ref.err) qcowkit: $(tr '\n' '|' <qk.out) / $(tr '\n' '|' <qk.err)"
  elif ! cmp -s v3.qcow2 qk.qcow2; then
    bad "$n" "the image changed"
  else
    ok "$n"
  fi
}
for c in 'write' 'write 0' 'w' 'write -x 0 512' 'write 0 512 1' 'write -u 0 512' 'write -n 0 512' \
         'write -z -P 1 0 512' 'write -P 300 0 512' 'write -P 0x1g 0 512' 'write -c 100 512' 'write -c 0 100' \
         'write abc 512' 'write 0 3G' 'write -b -z 0 512' 'write -f -c 0 512' 'write 0 -1' 'write -P' \
         'discard' 'discard -x 0 1' 'discard 0 3G' 'discard 0 abc' 'discard 0 1 2' 'flush x' 'aio_flush x' 'f 1 2' \
         'writev' 'writev 0' 'writev -x 0 512' 'writev 0 3G' 'writev 0 1G 1.5G' 'writev -P 300 0 1' 'writev 0 abc'; do
  acase "$c"
done

# bench -w: the same requests as qemu-img bench -w (pattern, step, depth,
# flush interval) leave the same content, and a clean image.
for args in "-c 300 -d 1 -s 4k -S 70000 --pattern=7" "-c 500 -d 8 -s 64k -S 200704 --flush-interval=50" \
            "-c 200 -d 4 -s 512 -S 1000448 -o 4096"; do
  rm -f bref.qcow2 bqk.qcow2
  setup qemu-img create -q -f qcow2 -o cluster_size=4k bref.qcow2 64M && cp bref.qcow2 bqk.qcow2
  # shellcheck disable=SC2086
  setup qemu-img bench -q -w $args bref.qcow2
  # shellcheck disable=SC2086
  run_qk qk.out qk.err bench -w $args bqk.qcow2
  if [ "$qk_rc" -ne 0 ]; then bad "bench -w $args" "$(qk_why qk.err)"
  elif ! out=$(qemu-img compare bref.qcow2 bqk.qcow2 2>&1); then bad "bench -w $args" "$out"
  elif ! qemu-img check bqk.qcow2 >/dev/null 2>&1; then bad "bench -w $args" "qemu-img check failed"
  else ok; fi
done

# convert -O raw onto an existing file: no byte of the old file survives
# where the source reads as zero (the copy skips zeros).
rm -f old.raw src-z.qcow2
setup qemu-img create -q -f qcow2 src-z.qcow2 1M
setup qemu-io -c "write -P 9 64k 64k" src-z.qcow2
head -c 1048576 /dev/urandom >old.raw
run_qk qk.out qk.err convert -O raw src-z.qcow2 old.raw
if [ "$qk_rc" -ne 0 ]; then bad "convert onto an old raw file" "$(qk_why qk.err)"
elif ! qemu-img compare -f qcow2 -F raw src-z.qcow2 old.raw >/dev/null 2>&1; then
  bad "convert onto an old raw file" "old bytes survive where the source reads as zero"
else ok "convert onto an old raw file"; fi

finish
