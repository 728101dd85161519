#!/usr/bin/env bash
# The read-side commands' command-line behaviour next to qemu-io / qemu-img 7.2:
# io -r read [-P], compare (identical, different, size mismatch, -s, -f/-F,
# errors), map --start-offset/--max-length, info/map/convert on a missing file,
# bench, and format detection (-f raw on a qcow2 file, -f qcow2 on a raw file).
# shellcheck source=../lib.sh
. "$(dirname "$0")/../lib.sh"
# shellcheck source=../interop/readcmp.bash
. "$(dirname "$0")/../interop/readcmp.bash"
need qemu-img qemu-io python3

cd "$T" || exit 1

# ---- images ---------------------------------------------------------------------
setup qemu-img create -q -f qcow2 a.qcow2 2M
setup qemu-io -c 'write -P 0x11 0 64k' -c 'write -P 0x22 1M 4k' -c 'write -z 1536k 64k' \
  -c 'write -c -P 0x33 1792k 64k' a.qcow2
setup qemu-img convert -O raw a.qcow2 a.raw
cp a.qcow2 a-copy.qcow2
# b.raw: a.raw with one byte changed at 1M+1000 (qemu-img reports the 512-byte
# sector: 1049088); c.raw: changed inside a region a.qcow2 has unallocated.
cp a.raw b.raw
printf '\x99' | dd of=b.raw bs=1 seek=$((1048576 + 1000)) conv=notrunc status=none
cp a.raw c.raw
printf '\x01' | dd of=c.raw bs=1 seek=$((700000)) conv=notrunc status=none
# big.qcow2: a.qcow2's content in a 3M image; bigx.qcow2 also has data past 2M
setup qemu-img create -q -f qcow2 big.qcow2 3M
setup qemu-io -c 'write -P 0x11 0 64k' -c 'write -P 0x22 1M 4k' -c 'write -c -P 0x33 1792k 64k' big.qcow2
cp big.qcow2 bigx.qcow2
setup qemu-io -c 'write -P 1 2101248 512' bigx.qcow2
# a plain (uncompressed) qcow2 for -f raw reads and map ranges
setup qemu-img create -q -f qcow2 p.qcow2 2M
setup qemu-io -c 'write -P 0x44 0 64k' -c 'write -P 0x55 1M 4k' -c 'write -z 1536k 64k' p.qcow2
# a two-layer chain
setup qemu-img create -q -f qcow2 base.qcow2 2M
setup qemu-io -c 'write -P 0x66 0 1M' base.qcow2
setup qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2 2M
setup qemu-io -c 'write -P 0x77 64k 64k' -c 'write -z 256k 64k' top.qcow2

# ---- io -r read ---------------------------------------------------------------------
# io_lines FILE: the lines of qemu-io output that must match exactly (the
# timing lines differ by nature).
io_lines() { grep -E '^(Pattern verification failed|read [0-9]+/[0-9]+ bytes|wrote )' "$1"; }

# cmp_io NAME FILE CMD [FMT]: run `io -r [-f FMT] FILE -c CMD` through qemu-io
# and qcowkit; same success/failure, and qemu-io's read/verification lines
# appear in qcowkit's output (stdout or stderr), in order.
cmp_io() {
  local n=$1 img=$2 cmd=$3 fmt=${4:-} ref_rc=0
  local -a f=()
  [ -n "$fmt" ] && f=(-f "$fmt")
  qemu-io -r "${f[@]}" "$img" -c "$cmd" >"$T/io.ref" 2>&1 || ref_rc=$?
  run_qk "$T/io.out" "$T/io.err" io -r "${f[@]}" "$img" -c "$cmd"
  if crashed "$qk_rc"; then bad "$n" "$(qk_why "$T/io.err")"; return; fi
  if { [ "$ref_rc" -eq 0 ] && [ "$qk_rc" -ne 0 ]; } || { [ "$ref_rc" -ne 0 ] && [ "$qk_rc" -eq 0 ]; }; then
    bad "$n" "qcowkit io exit $qk_rc, qemu-io exit $ref_rc [$cmd]: $(cat "$T/io.out" "$T/io.err" | head -c 300 | tr '\n' ' ')"
    return
  fi
  io_lines "$T/io.ref" >"$T/io.want"
  cat "$T/io.out" "$T/io.err" >"$T/io.all"
  io_lines "$T/io.all" >"$T/io.got"
  if [ ! -s "$T/io.want" ]; then bad "$n" "test bug: qemu-io printed nothing to compare"; return; fi
  if cmp -s "$T/io.want" "$T/io.got"; then
    ok "$n"
  else
    bad "$n" "[$cmd] qemu-io says: $(tr '\n' '|' <"$T/io.want") qcowkit says: $(head -c 300 "$T/io.all" | tr '\n' '|')"
  fi
}

cmp_io "io read -P, matching" a.qcow2 'read -P 0x11 0 64k'
cmp_io "io read -P, matching, unaligned" a.qcow2 'read -P 0x22 1049000 3000'
cmp_io "io read -P 0, unallocated" a.qcow2 'read -P 0 128k 256k'
cmp_io "io read -P 0, zero cluster" a.qcow2 'read -P 0 1536k 64k'
cmp_io "io read -P, compressed cluster" a.qcow2 'read -P 0x33 1792k 64k'
cmp_io "io read -P, backing data" top.qcow2 'read -P 0x66 0 64k'
cmp_io "io read -P, overlay data" top.qcow2 'read -P 0x77 64k 64k'
cmp_io "io read -P 0, zero cluster over backing" top.qcow2 'read -P 0 256k 64k'
cmp_io "io read -P 0, unallocated in the whole chain" top.qcow2 'read -P 0 1M 1M'
cmp_io "io read -P, raw file" a.raw 'read -P 0x22 1M 4k' raw
# mismatches: qemu-io names the offset and length of the whole request
cmp_io "io read -P, mismatch at the first byte" a.qcow2 'read -P 0x33 1M 4k'
cmp_io "io read -P, mismatch inside the request" a.qcow2 'read -P 0x11 0 128k'
cmp_io "io read -P, mismatch in a zero cluster" a.qcow2 'read -P 0x22 1536k 4k'
cmp_io "io read -P, mismatch with -f raw on qcow2" a.qcow2 'read -P 0x11 0 64k' raw

# several commands: qemu-io runs them all and exits 1 if one failed
qemu-io -r a.qcow2 -c 'read -P 0x11 0 64k' -c 'read -P 0x12 0 64k' -c 'read -P 0x11 0 64k' >"$T/io.ref" 2>&1
run_qk "$T/io.out" "$T/io.err" io -r a.qcow2 -c 'read -P 0x11 0 64k' -c 'read -P 0x12 0 64k' -c 'read -P 0x11 0 64k'
cat "$T/io.out" "$T/io.err" >"$T/io.all"
if [ "$qk_rc" -eq 0 ] || crashed "$qk_rc"; then
  bad "io several -c, middle one fails" "exit $qk_rc (want 1 like qemu-io)"
elif [ "$(io_lines "$T/io.all")" != "$(io_lines "$T/io.ref")" ]; then
  bad "io several -c, middle one fails" "qemu-io: $(io_lines "$T/io.ref" | tr '\n' '|') qcowkit: $(head -c 300 "$T/io.all" | tr '\n' '|')"
else
  ok "io several -c"
fi

# reads past the end of the image fail (qemu-io: "read failed: Input/output error")
for req in 'read 2M 512' 'read 2096640 1k' 'read -P 0 3M 4k'; do
  run_qk "$T/io.out" "$T/io.err" io -r a.qcow2 -c "$req"
  if [ "$qk_rc" -eq 0 ] || crashed "$qk_rc"; then
    bad "io $req past the end" "exit $qk_rc, want a failure"
  elif grep -qE '^read [0-9]+/[0-9]+ bytes' "$T/io.out" || ! grep -q . "$T/io.out" "$T/io.err"; then
    bad "io $req past the end" "no error message or claims success: $(cat "$T/io.out" "$T/io.err" | head -c 200)"
  else
    ok "io $req past the end"
  fi
done
# the last sector is readable
cmp_io "io read -P 0, last sector" a.qcow2 'read -P 0 2096640 512'

# missing file
run_qk "$T/io.out" "$T/io.err" io -r nonexist.qcow2 -c 'read 0 512'
if [ "$qk_rc" -ne 0 ] && ! crashed "$qk_rc" && [ -s "$T/io.err" ]; then ok "io missing file"
else bad "io missing file" "exit $qk_rc, stderr: $(head -c 200 "$T/io.err")"; fi

# ---- compare -----------------------------------------------------------------------
# stdout and exit status as qemu-img's
cmp_text "compare qcow2 vs raw, identical" compare a.qcow2 a.raw
cmp_text "compare raw vs qcow2, identical" compare a.raw a.qcow2
cmp_text "compare qcow2 vs qcow2, identical" compare a.qcow2 a-copy.qcow2
setup qemu-img convert -O raw top.qcow2 top.raw
cmp_text "compare chain vs raw, identical" compare top.qcow2 top.raw
cmp_text "compare -f qcow2 -F raw" compare -f qcow2 -F raw a.qcow2 a.raw
cmp_text "compare, one byte differs" compare a.qcow2 b.raw
cmp_text "compare, one byte differs (raw vs raw)" compare a.raw b.raw
cmp_text "compare, differs where unallocated" compare a.qcow2 c.raw
cmp_text "compare, differs where unallocated (reversed)" compare c.raw a.qcow2
cmp_text "compare -f raw -F raw qcow2 vs raw" compare -f raw -F raw a.qcow2 a.raw
cmp_text "compare, size mismatch, identical" compare a.qcow2 big.qcow2
cmp_text "compare, size mismatch, identical (reversed)" compare big.qcow2 a.qcow2
cmp_text "compare, size mismatch, data in the tail" compare a.qcow2 bigx.qcow2
cmp_text "compare, size mismatch, data in the tail (reversed)" compare bigx.qcow2 a.qcow2
cmp_text "compare -s, identical qcow2 copies" compare -s a.qcow2 a-copy.qcow2
cmp_text "compare -s, allocation differs" compare -s a.qcow2 a.raw
cmp_text "compare -s, size mismatch" compare -s big.qcow2 a.qcow2
cmp_text "compare -s, content differs" compare -s a.raw b.raw
# errors: exit 2 and a message on stderr
for args in "a.qcow2 nonexist.qcow2" "nonexist.qcow2 a.raw" "-F qcow2 a.qcow2 a.raw"; do
  # shellcheck disable=SC2086
  run_qk "$T/cmp.out" "$T/cmp.err" compare $args
  if [ "$qk_rc" -eq 2 ] && [ -s "$T/cmp.err" ]; then ok "compare $args"
  else bad "compare $args" "exit $qk_rc (want 2), stderr: $(head -c 200 "$T/cmp.err")"; fi
done

# ---- map --start-offset / --max-length ------------------------------------------------
for range in "--start-offset=65536 --max-length=1M" "--start-offset=1000 --max-length=1048900" \
             "--start-offset=1M" "--max-length=100000" "--start-offset=1048577 --max-length=100" \
             "--start-offset=1M --max-length=10M" "--start-offset=2097000"; do
  # shellcheck disable=SC2086
  cmp_json "map json $range" map --output=json $range p.qcow2
  # shellcheck disable=SC2086
  cmp_text "map human $range" map $range p.qcow2
  # shellcheck disable=SC2086
  cmp_json "map json $range, chain" map --output=json $range top.qcow2
done
cmp_json "map json ranges, compressed image" map --output=json --start-offset=64k --max-length=1600k a.qcow2
# human map stops at a compressed cluster (qemu-img: "File contains external,
# encrypted or compressed clusters.", exit 1) after printing the rows before it
cmp_text "map human, compressed image" map a.qcow2
cmp_text "map human, range before the compressed cluster" map --max-length=1792k a.qcow2

# ---- errors on a missing file: exit 1, one line on stderr, nothing on stdout ----------
for cmd in "info" "info --output=json" "map" "map --output=json"; do
  # shellcheck disable=SC2086
  run_qk "$T/e.out" "$T/e.err" $cmd nonexist.qcow2
  lines=$(wc -l <"$T/e.err")
  if [ "$qk_rc" -ne 1 ]; then bad "$cmd missing file" "exit $qk_rc, want 1 (stderr: $(head -c 200 "$T/e.err"))"
  elif [ "$lines" -ne 1 ] || [ ! -s "$T/e.err" ]; then bad "$cmd missing file" "want one line on stderr, got $lines: $(head -c 300 "$T/e.err")"
  elif [ -s "$T/e.out" ]; then bad "$cmd missing file" "stdout not empty: $(head -c 200 "$T/e.out")"
  elif ! grep -q nonexist.qcow2 "$T/e.err"; then bad "$cmd missing file" "message does not name the file: $(cat "$T/e.err")"
  else ok "$cmd missing file"; fi
done
run_qk "$T/e.out" "$T/e.err" convert -O raw nonexist.qcow2 "$T/never.raw"
if [ "$qk_rc" -ne 0 ] && ! crashed "$qk_rc" && [ -s "$T/e.err" ] && [ ! -e "$T/never.raw" ]; then ok "convert missing file"
else bad "convert missing file" "exit $qk_rc, output created: $([ -e "$T/never.raw" ] && echo yes || echo no), stderr: $(head -c 200 "$T/e.err")"; fi

# ---- format detection and -f ------------------------------------------------------------
# -f raw on a qcow2 file reads the file itself
rm -f "$T/asraw.raw"
run_qk "$T/f.out" "$T/f.err" convert -f raw -O raw p.qcow2 "$T/asraw.raw"
if [ "$qk_rc" -ne 0 ]; then bad "convert -f raw of a qcow2 file" "$(qk_why "$T/f.err")"
elif cmp -s p.qcow2 "$T/asraw.raw"; then ok "convert -f raw of a qcow2 file"
else bad "convert -f raw of a qcow2 file" "output differs from the file's bytes: $(cmp p.qcow2 "$T/asraw.raw" 2>&1 | head -1)"; fi
cmp_convert "convert -f raw of a qcow2 file (vs qemu-img)" a.qcow2 -f raw
cmp_json "info -f raw of a qcow2 file" info -f raw --output=json p.qcow2
cmp_json "map -f raw of a qcow2 file" map -f raw --output=json p.qcow2
cmp_text "info -f raw of a qcow2 file, human" info -f raw p.qcow2
cmp_json "info -f qcow2 of a qcow2 file" info -f qcow2 --output=json p.qcow2
cmp_json "info of a raw file (probed)" info --output=json a.raw
# -f qcow2 on a raw file is an error (qemu-img: "Image is not in qcow2 format", exit 1)
for cmd in "info" "map" "convert -O raw"; do
  rm -f "$T/never.raw"
  out=()
  [ "$cmd" = "convert -O raw" ] && out=("$T/never.raw")
  # shellcheck disable=SC2086
  run_qk "$T/f.out" "$T/f.err" $cmd -f qcow2 a.raw "${out[@]}"
  if [ "$qk_rc" -ne 0 ] && ! crashed "$qk_rc" && [ -s "$T/f.err" ]; then ok "$cmd -f qcow2 of a raw file"
  else bad "$cmd -f qcow2 of a raw file" "exit $qk_rc, stderr: $(head -c 200 "$T/f.err")"; fi
done

# ---- bench ---------------------------------------------------------------------------
# bench_check NAME WANT_OK ARGS...: the "Sending ..." line equals qemu-img's
# (when qemu-img knows the flags), a "Run completed in" line, exit status.
bench_check() {
  local n=$1 ref=$2; shift 2
  run_qk "$T/b.out" "$T/b.err" bench "$@"
  if [ "$qk_rc" -ne 0 ]; then bad "$n" "$(qk_why "$T/b.err")"; return; fi
  if ! grep -q '^Run completed in [0-9.]* seconds\.$' "$T/b.out"; then
    bad "$n" "no 'Run completed in N seconds.' line: $(head -c 300 "$T/b.out")"; return
  fi
  if [ "$ref" = ref ]; then
    local want
    want=$(qemu-img bench "$@" 2>/dev/null | grep '^Sending')
    if [ -z "$want" ]; then bad "$n" "test bug: qemu-img bench $* printed no Sending line"; return; fi
    if ! grep -qxF "$want" "$T/b.out"; then
      bad "$n" "want '$want', got: $(head -c 300 "$T/b.out")"; return
    fi
  elif ! grep -q 'Sending 100 read requests' "$T/b.out"; then
    bad "$n" "no 'Sending 100 read requests' line: $(head -c 300 "$T/b.out")"; return
  fi
  ok "$n"
}
bench_check "bench -c 100 -s 4k" ref -c 100 -s 4k a.qcow2
bench_check "bench -d 4 -t none" ref -c 100 -s 4k -d 4 -t none a.qcow2
bench_check "bench -S -o -t writeback" ref -c 100 -s 4k -S 8k -o 64k -t writeback a.qcow2
bench_check "bench wraps around the end" ref -c 1000 -s 4k a.qcow2
bench_check "bench -f raw" ref -c 100 -s 4k -f raw a.raw
bench_check "bench on a chain" ref -c 100 -s 64k top.qcow2
bench_check "bench --random" noref -c 100 -s 4k --random a.qcow2
run_qk "$T/b.out" "$T/b.err" bench -c 10 -s 4k -o 3M a.qcow2
if [ "$qk_rc" -ne 0 ] && ! crashed "$qk_rc"; then ok "bench past the end fails"
else bad "bench past the end fails" "exit $qk_rc (qemu-img: 1, 'Failed request')"; fi

finish
