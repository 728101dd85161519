#!/usr/bin/env bash
# convert -O qcow2, judged by QEMU. For every case qcowkit and qemu-img run
# the same convert command line on the same source, then:
#   - qemu-img check of ours: no errors, no leaks (exit 0);
#   - qemu-img compare SRC OURS: identical guest content;
#   - qemu-img map --output=json of ours and of qemu-img's output agree in
#     start, length, present, zero and depth (which clusters hold data, which
#     are zero clusters, which are left to the backing file); with -c the
#     number of compressed and allocated clusters (check --output=json)
#     matches instead, since packing offsets differ. With -B qemu-img writes
#     every cluster the source allocates; we write only the clusters that
#     differ from the new backing file, so there the map must show exactly
#     those (1M +128k and 5M +64k, where newbase.raw was changed);
#   - qemu-img info of ours shows the options asked for.
# Sources: a raw file of mixed text, random data and zero runs with an odd
# size; a qcow2 chain (flattened); a qcow2 with compressed and zero clusters.
# Targets: defaults, -c with zlib and zstd, cluster sizes 512 to 2M, compat
# 0.10, refcount widths 1 and 64, extended L2, lazy refcounts,
# preallocation=metadata, -S 0, -m 1 / -m 4 -W, -t none / writeback (the
# default is unsafe, as qemu-img's), -B with -F (only what
# differs from the new backing file is written), -n into an existing image.
# Then the errors qemu-img also gives: -B without -F, -c or -B with -O raw.
# shellcheck source=../lib.sh
. "$(dirname "$0")/../lib.sh"
# shellcheck source=readcmp.bash
. "$(dirname "$0")/readcmp.bash"
need qemu-img qemu-io python3

cd "$T" || exit 1
M=1048576

# src.raw: 9 MiB + 3 KiB; text (compressible), random (not), zero runs, and
# zero runs shorter than a cluster inside data.
python3 - <<'PYEOF' || { bad setup "python3 could not write src.raw"; finish; }
import random
r = random.Random(7)
words = [bytes(r.choice(b"abcdefghij ") for _ in range(r.randint(2, 9))) for _ in range(500)]
def text(n):
    b = bytearray()
    while len(b) < n:
        b += r.choice(words) + b" "
    return bytes(b[:n])
M = 1 << 20
with open("src.raw", "wb") as f:
    for i in range(9):
        if i in (2, 6):
            f.write(b"\0" * M)
        elif i == 4:
            f.write(bytes(r.getrandbits(8) for _ in range(M)))
        else:
            blk = bytearray(text(M))
            blk[300000:300000 + 70000] = b"\0" * 70000   # a zero cluster or two
            f.write(bytes(blk))
    f.write(text(3072))
PYEOF

# A chain to flatten, and an image with compressed and zero clusters.
setup qemu-img create -q -f qcow2 base.qcow2 8M &&
setup qemu-io -f qcow2 -c 'write -P 0x11 0 3M' -c 'write -c -P 0x22 3M 1M' base.qcow2 &&
setup qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2 &&
setup qemu-io -f qcow2 -c 'write -P 0x33 1M 64k' -c 'write -z 2M 128k' -c 'write -P 0x44 7M 512k' top.qcow2 &&
setup qemu-img convert -c -O qcow2 src.raw comp.qcow2 &&
setup qemu-io -f qcow2 -c 'write -z 0 1M' comp.qcow2 || finish
# A new backing file for -B: the raw source with some clusters changed.
setup cp src.raw newbase.raw &&
setup qemu-io -f raw -c 'write -P 0x55 1M 128k' -c 'write -z 5M 64k' newbase.raw || finish

mkdir ref our
cp newbase.raw ref/ && cp newbase.raw our/

# mapcmp A B: maps agree in start, length, present, zero, depth.
cat >mapcmp.py <<'PYEOF'
import json, subprocess, sys
def m(p):
    out = subprocess.run(["qemu-img", "map", "--output=json", p], check=True,
                         capture_output=True, text=True).stdout
    keys = ("start", "length", "present", "zero", "depth")
    # merge neighbours that agree once offsets are dropped
    res = []
    for e in json.loads(out):
        e = {k: e[k] for k in keys}
        if res and all(res[-1][k] == e[k] for k in keys if k not in ("start", "length")) \
           and res[-1]["start"] + res[-1]["length"] == e["start"]:
            res[-1]["length"] += e["length"]
        else:
            res.append(e)
    return res
a, b = m(sys.argv[1]), m(sys.argv[2])
if a != b:
    print("qemu-img's map %s | ours %s" % (json.dumps(a)[:500], json.dumps(b)[:500]))
    sys.exit(1)
PYEOF
# ccount IMG: "allocated compressed" clusters from check --output=json.
ccount() {
  qemu-img check --output=json "$1" 2>/dev/null | python3 -c '
import json, sys
d = json.load(sys.stdin)
print(d.get("allocated-clusters"), d.get("compressed-clusters"))'
}

# case NAME SRC SRCFMT [ARGS...]: convert with both tools and judge ours.
case_() {
  local name=$1 src=$2 sfmt=$3; shift 3
  local args=("$@") rc=0 out
  rm -f ref/out.qcow2 our/out.qcow2
  if ! qemu-img convert -f "$sfmt" -O qcow2 "${args[@]}" "$src" ref/out.qcow2 >"$T/ref.err" 2>&1; then
    bad "$name" "qemu-img convert failed: $(head -c 300 "$T/ref.err")"
    return
  fi
  run_qk "$T/qk.out" "$T/qk.err" convert -f "$sfmt" -O qcow2 "${args[@]}" "$src" our/out.qcow2
  if [ "$qk_rc" -ne 0 ]; then
    bad "$name" "$(qk_why "$T/qk.err")"
    return
  fi
  qemu-img check our/out.qcow2 >"$T/chk" 2>&1 || rc=$?
  if [ "$rc" -ne 0 ]; then
    bad "$name/check" "qemu-img check exit $rc: $(tr '\n' ' ' <"$T/chk" | head -c 400)"
  else
    ok
  fi
  if out=$(qemu-img compare -f "$sfmt" -F qcow2 "$src" our/out.qcow2 2>&1); then ok
  else bad "$name/compare" "$out"; fi
  local compressed=false backing=false a
  for a in "${args[@]}"; do
    [ "$a" = -c ] && compressed=true
    [ "$a" = -B ] && backing=true
  done
  if $backing; then
    out=$(qemu-img map --output=json our/out.qcow2 | python3 -c '
import json, sys
got = []
for e in json.load(sys.stdin):
    if e["depth"] != 0:
        continue
    if got and got[-1][0] + got[-1][1] == e["start"]:
        got[-1] = (got[-1][0], got[-1][1] + e["length"])
    else:
        got.append((e["start"], e["length"]))
want = [(1 << 20, 128 << 10), (5 << 20, 64 << 10)]
if got != want:
    print("clusters written over the backing file: %s, expected %s" % (got, want))
    sys.exit(1)') && ok || bad "$name/map" "$out"
  elif $compressed; then
    local r o
    r=$(ccount ref/out.qcow2) o=$(ccount our/out.qcow2)
    if [ "$r" = "$o" ]; then ok
    else bad "$name/clusters" "qemu-img's allocated/compressed: $r, ours: $o"; fi
  elif out=$(python3 mapcmp.py ref/out.qcow2 our/out.qcow2 2>&1); then ok
  else bad "$name/map" "$out"; fi
}

# info_has NAME KEY VALUE: the last output's info JSON has format-specific
# data KEY equal to VALUE (JSON text).
info_has() {
  local got
  got=$(qemu-img info --output=json our/out.qcow2 | python3 -c "
import json, sys
d = json.load(sys.stdin)
fs = d.get('format-specific', {}).get('data', {})
print(json.dumps(d['$2'] if '$2' in d else fs.get('$2')))")
  if [ "$got" = "$3" ]; then ok; else bad "$1/info" "$2 is $got, expected $3"; fi
}

case_ raw-default src.raw raw
info_has raw-default cluster-size 65536
case_ raw-zlib src.raw raw -c
info_has raw-zlib compression-type '"zlib"'
case_ raw-zstd src.raw raw -c -o compression_type=zstd
info_has raw-zstd compression-type '"zstd"'
case_ raw-zstd-4k src.raw raw -c -o compression_type=zstd,cluster_size=4k
case_ raw-zlib-v2 src.raw raw -c -o compat=0.10
for cs in 512 4k 2M; do
  case_ "raw-cs$cs" src.raw raw -o cluster_size=$cs
done
info_has raw-cs2M cluster-size 2097152
case_ raw-v2 src.raw raw -o compat=0.10
info_has raw-v2 compat '"0.10"'
case_ raw-rc1 src.raw raw -o refcount_bits=1
case_ raw-rc1-zlib src.raw raw -c -o refcount_bits=1
case_ raw-rc64 src.raw raw -o refcount_bits=64,cluster_size=4k
info_has raw-rc64 refcount-bits 64
case_ raw-extl2 src.raw raw -o extended_l2=on
info_has raw-extl2 extended-l2 true
case_ raw-lazy src.raw raw -o lazy_refcounts=on
case_ raw-prealloc src.raw raw -o preallocation=metadata
case_ raw-S0 src.raw raw -S 0
case_ raw-m1 src.raw raw -m 1
case_ raw-t-none src.raw raw -t none
case_ raw-t-writeback-512 src.raw raw -t writeback -o cluster_size=512
case_ raw-t-none-zlib src.raw raw -t none -c
case_ raw-m4W src.raw raw -m 4 -W
case_ raw-zlib-m4W src.raw raw -c -m 4 -W
case_ chain-flatten top.qcow2 qcow2
case_ chain-flatten-zlib top.qcow2 qcow2 -c
case_ compressed-src comp.qcow2 qcow2
case_ raw-B src.raw raw -B newbase.raw -F raw
info_has raw-B backing-filename '"newbase.raw"'
case_ raw-B-v2 src.raw raw -B newbase.raw -F raw -o compat=0.10
case_ raw-B-zlib src.raw raw -c -B newbase.raw -F raw

# -n into an existing image (old content is overwritten, zeros included).
rm -f our/n.qcow2
setup qemu-img create -q -f qcow2 our/n.qcow2 9M
setup qemu-io -f qcow2 -c 'write -P 0x77 0 9M' our/n.qcow2 &&
  setup qemu-img resize -q our/n.qcow2 10M
run_qk "$T/qk.out" "$T/qk.err" convert -n -f raw -O qcow2 src.raw our/n.qcow2
if [ "$qk_rc" -ne 0 ]; then bad "-n" "$(qk_why "$T/qk.err")"
elif ! qemu-img check our/n.qcow2 >/dev/null 2>&1; then bad "-n/check" "qemu-img check failed"
elif ! out=$(qemu-io -f qcow2 -c "read -P 0 $((9 * M + 3072)) $((M - 3072))" our/n.qcow2 2>&1) || [[ $out == *Pattern* ]]; then
  bad "-n/tail" "the part past the source changed: $out"
elif ! out=$(qemu-img compare -f raw -F qcow2 src.raw our/n.qcow2 2>&1) &&
     [[ $out != *"size mismatch"* ]] && [[ $out != *"Images are identical"* ]]; then
  bad "-n/compare" "$out"
else
  # compare the first 9 MiB + 3 KiB exactly
  qemu-img convert -O raw our/n.qcow2 "$T/n.raw" && head -c "$(stat -c %s src.raw)" "$T/n.raw" >"$T/n9.raw"
  if cmp -s src.raw "$T/n9.raw"; then ok; else bad "-n/content" "differs from the source"; fi
fi

# -p prints qemu-img's progress, ending at 100%.
rm -f our/p.qcow2
run_qk "$T/qk.out" "$T/qk.err" convert -p -f raw -O qcow2 src.raw our/p.qcow2
if [ "$qk_rc" -eq 0 ] && grep -q '(100.00/100%)' "$T/qk.out"; then ok
else bad "-p" "no final progress line: $(tr '\r\n' '  ' <"$T/qk.out" | tail -c 200) $(head -c 200 "$T/qk.err")"; fi

# Errors, each one line and exit 1, as qemu-img.
err_case() {
  local name=$1; shift
  run_qk "$T/qk.out" "$T/qk.err" convert "$@"
  if [ "$qk_rc" -eq 1 ] && [ "$(wc -l <"$T/qk.err")" -eq 1 ]; then ok
  else bad "$name" "exit $qk_rc, stderr: $(head -c 300 "$T/qk.err")"; fi
}
err_case B-without-F -f raw -O qcow2 -B newbase.raw src.raw our/e1.qcow2
err_case raw-with-c -f raw -O raw -c src.raw our/e2.raw
err_case raw-with-B -f raw -O raw -B newbase.raw -F raw src.raw our/e3.raw
err_case bad-option -f raw -O qcow2 -o cluster_size=3k src.raw our/e4.qcow2
err_case onto-itself -f qcow2 -O qcow2 -n comp.qcow2 comp.qcow2
finish
