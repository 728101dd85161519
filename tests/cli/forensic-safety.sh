#!/bin/bash
# check --forensic --extract DIR writes bytes an image chooses, as many files
# as it declares leaks; the report lists as many findings. This proves:
#   - DIR must be new or empty: a symbolic link (or a file) planted in it
#     is refused before anything is written, and what the link points to
#     is unchanged (sha256); DIR itself a symbolic link (dangling, to a
#     directory, with a trailing slash) is refused and not followed;
#   - a new DIR is mode 0700 and its files 0600;
#   - only leaked clusters holding non-zero bytes are extracted: an image
#     with two leaked data clusters and two leaked clusters of written
#     zeros gives exactly two files, named by host offset, with the right
#     bytes; a sparse image that leaks a million zero clusters gives none;
#   - the limits: --extract-max-files and --extract-max-bytes stop the copy
#     at exactly the limit with one line on stderr, the report goes on
#     (every leak listed, exit 3); the default limit stops 16384 files;
#   - all three kinds of finding in one image, interleaved by the library,
#     land in their JSON arrays with the right offsets (valid JSON, the
#     keys as before) and in the human lines;
#   - memory is bounded: a million leaks (a crafted 1-bit refcount image,
#     512 MiB sparse) raise qcowkit's peak RSS by less than 32 MiB over a
#     4096-cluster version of the same image, in human and JSON output.
. "$(dirname "$0")/../lib.sh"
need qemu-img qemu-io python3
cd "$T" || exit 1
umask 022

# run OUT ERR ARGS...: run qcowkit; sets rc.
run() {
  local o=$1 e=$2; shift 2
  rc=0
  timeout 300 "$QCOWKIT" "$@" >"$o" 2>"$e" </dev/null || rc=$?
  if crashed "$rc"; then bad "crash" "qcowkit $* exited $rc: $(head -c 300 "$e")"; fi
}
# one_line ERR PATTERN: stderr is exactly one line "qcowkit: ..." matching PATTERN
one_line() {
  [ "$(wc -l <"$1")" -eq 1 ] && grep -q "^qcowkit: .*$2" "$1"
}

cat >poke.py <<'PYEOF'
import struct, sys
img, action = sys.argv[1], sys.argv[2]
f = open(img, "r+b")
h = bytearray(f.read(104))
cb = struct.unpack(">I", h[20:24])[0]
cs = 1 << cb
l1_off = struct.unpack(">Q", h[40:48])[0]
rt_off = struct.unpack(">Q", h[48:56])[0]
order = struct.unpack(">I", h[96:100])[0]
def rd(o, n):
    f.seek(o); return f.read(n)
def l2_slot(gc):
    per = cs // 8
    l1e = struct.unpack(">Q", rd(l1_off + 8 * (gc // per), 8))[0]
    l2 = l1e & 0x00fffffffffffe00
    assert l2, "no L2 table"
    return l2 + 8 * (gc % per)
def rc_slot(c):
    per = cs * 8 >> order
    rte = struct.unpack(">Q", rd(rt_off + 8 * (c // per), 8))[0]
    assert rte, "no refcount block"
    return rte + ((c % per) << order) // 8
if action == "host":          # host offset of a guest cluster
    v = struct.unpack(">Q", rd(l2_slot(int(sys.argv[3])), 8))[0]
    print(v & 0x00fffffffffffe00)
elif action == "unmap":       # zero the L2 entries of guest clusters: they leak
    for gc in sys.argv[3:]:
        f.seek(l2_slot(int(gc))); f.write(bytes(8))
elif action == "unmap-l1":    # zero the whole L1 table: L2 tables and data leak
    n = struct.unpack(">I", h[36:40])[0]
    f.seek(l1_off); f.write(bytes(8 * n))
elif action == "rc0":         # a 16-bit refcount set to 0
    assert order == 4
    f.seek(rc_slot(int(sys.argv[3]) // cs)); f.write(bytes(2))
elif action == "many-leaks":
    # A 1-bit refcount image N clusters long (sparse) whose new refcount
    # table and blocks, at the end of the used part, give every cluster
    # refcount 1: all but the few in use leak, as zeros. Prints the
    # expected leak count and how many of them hold data (the old refcount
    # table and block).
    n = int(sys.argv[3])
    assert order == 0
    f.seek(0, 2)
    first = (f.tell() + cs - 1) // cs
    old_rt = rt_off // cs
    per = cs * 8
    blocks = (n + per - 1) // per
    rtc = (blocks * 8 + cs - 1) // cs
    blk0 = first + rtc
    assert blk0 + blocks <= n
    old_used = [c for c in range(first) if c == 0 or c == l1_off // cs]
    f.seek(first * cs)
    f.write(b"".join(struct.pack(">Q", (blk0 + i) * cs) for i in range(blocks)).ljust(rtc * cs, b"\0"))
    f.write(b"\xff" * (blocks * cs))
    f.truncate(n * cs)
    h[48:56] = struct.pack(">Q", first * cs)
    h[56:60] = struct.pack(">I", rtc)
    f.seek(0); f.write(h)
    # in use: header, L1 table, new table and blocks; data: old table, old block(s)
    used = len(old_used) + rtc + blocks
    olddata = first - len(old_used)
    print(n - used, olddata)
PYEOF

# ---- an image with leaks: guest clusters 0, 1 hold 0x11, 0x22; 2, 3 hold
# written zeros; 4 holds 0x44 and stays mapped. 0-3 are unmapped: 4 leaks,
# 2 of them with data.
qemu-img create -q -f qcow2 leaks.qcow2 8M
qemu-io -f qcow2 -c 'write -P 0x11 0 64k' -c 'write -P 0x22 64k 64k' -c 'write -P 0 128k 64k' \
  -c 'write -P 0 192k 64k' -c 'write -P 0x44 256k 64k' leaks.qcow2 >/dev/null
for g in 0 1 2 3; do eval "h$g=$(python3 poke.py leaks.qcow2 host $g)"; done
# shellcheck disable=SC2154
if [ "$h0" -gt 0 ] && [ "$h1" -gt 0 ] && [ "$h2" -gt 0 ] && [ "$h3" -gt 0 ]; then ok
else bad "setup" "written zeros did not allocate clusters: $h0 $h1 $h2 $h3"; fi
python3 poke.py leaks.qcow2 unmap 0 1 2 3
ref=$(qemu-img check --output=json leaks.qcow2 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin).get("leaks"))')
if [ "$ref" = 4 ]; then ok; else bad "setup" "qemu-img check finds $ref leaks, not 4"; fi
name() { printf 'cluster-%016x.bin' "$1"; }

# ---- a symbolic link planted in DIR: refused, its target unchanged
echo "precious data" >victim
sum=$(sha256sum <victim)
mkdir planted
ln -s ../victim "planted/$(name "$h0")"
run out err check --forensic --extract planted leaks.qcow2
if [ "$rc" -eq 1 ] && one_line err "'planted' is not empty"; then ok
else bad "planted link" "exit $rc: $(head -c 300 err)"; fi
if [ "$(sha256sum <victim)" = "$sum" ] && [ ! -s out ]; then ok
else bad "planted link" "the link's target changed, or a report was printed"; fi
if [ "$(ls -A planted)" = "$(name "$h0")" ] && [ -L "planted/$(name "$h0")" ]; then ok
else bad "planted link" "DIR changed: $(ls -lA planted | tr '\n' ' ')"; fi
# ... also as JSON, and a plain file planted
run out err check --forensic --output=json --extract planted leaks.qcow2
if [ "$rc" -eq 1 ] && one_line err "not empty" && [ "$(sha256sum <victim)" = "$sum" ]; then ok
else bad "planted link, json" "exit $rc: $(head -c 300 err)"; fi
mkdir planted2 && echo old >planted2/notes
run out err check --forensic --extract planted2 leaks.qcow2
if [ "$rc" -eq 1 ] && one_line err "'planted2' is not empty" && [ "$(cat planted2/notes)" = old ] &&
   [ "$(ls -A planted2)" = notes ]; then ok
else bad "planted file" "exit $rc: $(head -c 300 err)"; fi

# ---- DIR itself a symbolic link: to an empty directory, with a trailing
# slash, dangling: refused, nothing created through it
mkdir realdir
ln -s realdir linkdir
ln -s nowhere dangling
for d in linkdir linkdir/ dangling; do
  run out err check --forensic --extract "$d" leaks.qcow2
  if [ "$rc" -eq 1 ] && one_line err "'${d%/}' is a symbolic link"; then ok
  else bad "DIR a link ($d)" "exit $rc: $(head -c 300 err)"; fi
done
if [ -z "$(ls -A realdir)" ] && [ ! -e nowhere ] && [ "$(stat -c %a realdir)" = 755 ]; then ok
else bad "DIR a link" "something was created through the link: $(ls -lA realdir nowhere 2>&1 | tr '\n' ' ')"; fi

# ---- a fresh DIR: 0700, files 0600, only the two data clusters, their bytes
run out err check --forensic --output=json --extract fresh/ leaks.qcow2
if [ "$rc" -eq 3 ] && [ ! -s err ]; then ok; else bad "extract" "exit $rc: $(head -c 300 err)"; fi
if [ "$(stat -c %a fresh)" = 700 ]; then ok; else bad "extract" "DIR mode $(stat -c %a fresh)"; fi
files=$(cd fresh && ls -A | tr '\n' ' ')
if [ "$files" = "$(name "$h0") $(name "$h1") " ]; then ok
else bad "extract" "files are '$files', want the two data clusters $(name "$h0") $(name "$h1")"; fi
modes=$(stat -c %a fresh/* | sort -u | tr '\n' ' ')
if [ "$modes" = "600 " ]; then ok; else bad "extract" "file modes $modes"; fi
if cmp -s "fresh/$(name "$h0")" <(head -c 65536 /dev/zero | tr '\0' '\021') &&
   cmp -s "fresh/$(name "$h1")" <(head -c 65536 /dev/zero | tr '\0' '\042'); then ok
else bad "extract" "the files do not hold 64 KiB of 0x11 and of 0x22"; fi
if out=$(python3 - out "$h0" "$h1" "$h2" "$h3" <<'PYEOF'
import json, sys
d = json.load(open(sys.argv[1]))
h = [int(x) for x in sys.argv[2:]]
keys = {"filename", "unreferenced-clusters", "leaked-clusters", "leaked-clusters-with-data",
        "snapshot-only-clusters", "unreferenced", "leaked", "snapshot-only"}
assert keys <= set(d), "keys missing: %s" % (keys - set(d))
assert d["filename"] == "leaks.qcow2"
assert (d["leaked-clusters"], d["leaked-clusters-with-data"]) == (4, 2), d
assert (d["extracted-files"], d["extracted-bytes"], d["extract-limit-reached"]) == (2, 131072, False), d
got = sorted((e["host-offset"], e["refcount"], e["data"], e.get("file")) for e in d["leaked"])
want = sorted([(h[0], 1, True, "fresh/cluster-%016x.bin" % h[0]), (h[1], 1, True, "fresh/cluster-%016x.bin" % h[1]),
               (h[2], 1, False, None), (h[3], 1, False, None)])
assert got == want, "leaked %s, want %s" % (got, want)
assert d["unreferenced"] == [] and d["snapshot-only"] == [] and d["unreferenced-clusters"] == 0
PYEOF
); then ok; else bad "extract json" "$out"; fi
# an existing empty directory is fine, and keeps its mode
mkdir empty && chmod 750 empty
run out err check --forensic --extract empty leaks.qcow2
if [ "$rc" -eq 3 ] && [ "$(ls -A empty | wc -l)" -eq 2 ] && [ "$(stat -c %a empty)" = 750 ] &&
   grep -q "^Leaked cluster at host offset $(printf '0x%x' "$h0"): refcount 1, holds data, saved as 'empty/$(name "$h0")'$" out &&
   grep -q "^Leaked cluster at host offset $(printf '0x%x' "$h2"): refcount 1, all zeros$" out &&
   grep -q "^Leaked clusters: 4 (2 hold non-zero data)$" out &&
   grep -q "^Saved 2 clusters (131072 bytes) in 'empty'$" out; then ok
else bad "extract into an empty DIR" "exit $rc: $(head -c 600 out | tr '\n' '|') $(head -c 200 err)"; fi

# ---- limits: 40 leaked data clusters of 512 B
qemu-img create -q -f qcow2 -o cluster_size=512 cap.qcow2 1M
qemu-io -f qcow2 -c 'write -P 0x5a 0 20k' cap.qcow2 >/dev/null
python3 poke.py cap.qcow2 unmap $(seq 0 39)
run out err check --forensic --output=json --extract cap1 --extract-max-files=10 cap.qcow2
if [ "$rc" -eq 3 ] && one_line err "--extract stopped after 10 files, 5120 bytes in 'cap1'" &&
   [ "$(ls -A cap1 | wc -l)" -eq 10 ]; then ok
else bad "--extract-max-files" "exit $rc, $(ls -A cap1 2>/dev/null | wc -l) files: $(head -c 300 err)"; fi
if out=$(python3 - out <<'PYEOF'
import json, sys
d = json.load(open(sys.argv[1]))
assert d["leaked-clusters"] == 40 and d["leaked-clusters-with-data"] == 40, d["leaked-clusters"]
assert (d["extracted-files"], d["extracted-bytes"], d["extract-limit-reached"]) == (10, 5120, True)
hosts = [e["host-offset"] for e in d["leaked"]]
assert hosts == sorted(hosts) and len(hosts) == 40
# the first ten in host order have a file, the rest none
assert [("file" in e) for e in d["leaked"]] == [True] * 10 + [False] * 30
PYEOF
); then ok; else bad "--extract-max-files json" "$out"; fi
run out err check --forensic --extract cap2 --extract-max-bytes=2k cap.qcow2
if [ "$rc" -eq 3 ] && one_line err "stopped after 4 files, 2048 bytes" && [ "$(ls -A cap2 | wc -l)" -eq 4 ] &&
   [ "$(grep -c '^Leaked cluster at' out)" -eq 40 ] && [ "$(grep -c "saved as" out)" -eq 4 ] &&
   grep -q "^Saved 4 clusters (2048 bytes) in 'cap2', stopped at the limit$" out; then ok
else bad "--extract-max-bytes" "exit $rc, $(ls -A cap2 2>/dev/null | wc -l) files: $(head -c 300 err)"; fi
run out err check --forensic --extract-max-files=3 cap.qcow2
if [ "$rc" -eq 1 ] && one_line err "need --extract"; then ok; else bad "limit without --extract" "exit $rc"; fi
run out err check --forensic --extract cap3 --extract-max-files=0 cap.qcow2
if [ "$rc" -eq 1 ] && one_line err "at least 1" && [ ! -e cap3 ]; then ok; else bad "--extract-max-files=0" "exit $rc"; fi
# the default limit: 16384 files (10 MiB of 512 B clusters leak: 20480 data
# clusters and their L2 tables)
qemu-img create -q -f qcow2 -o cluster_size=512 big.qcow2 16M
qemu-io -f qcow2 -c 'write -P 0x77 0 10M' big.qcow2 >/dev/null
python3 poke.py big.qcow2 unmap-l1
run out err check --forensic --extract bigx big.qcow2
if [ "$rc" -eq 3 ] && one_line err "stopped after 16384 files, 8388608 bytes in 'bigx' (limits: --extract-max-files=16384 --extract-max-bytes=1073741824)" &&
   [ "$(ls -A bigx | wc -l)" -eq 16384 ] && [ "$(grep -c '^Leaked cluster at' out)" -gt 20480 ]; then ok
else bad "default limit" "exit $rc, $(ls -A bigx 2>/dev/null | wc -l) files: $(head -c 300 err)"; fi

# ---- every kind in one image, as JSON and as human lines: guest clusters
# 0-3 written, a snapshot, 0-1 rewritten (their old clusters are
# snapshot-only), 4 and 5 written, 4 unmapped (a leak holding 0x04), 5's
# refcount set to 0 (unreferenced, mapped at guest offset 5 * 64k)
qemu-img create -q -f qcow2 kinds.qcow2 8M
for g in 0 1 2 3; do qemu-io -f qcow2 -c "write -P $g $((g * 65536)) 64k" kinds.qcow2 >/dev/null; done
s0=$(python3 poke.py kinds.qcow2 host 0) s1=$(python3 poke.py kinds.qcow2 host 1)
qemu-img snapshot -c s1 kinds.qcow2
qemu-io -f qcow2 -c 'write -P 9 0 128k' -c 'write -P 4 256k 64k' -c 'write -P 5 320k 64k' kinds.qcow2 >/dev/null
k4=$(python3 poke.py kinds.qcow2 host 4) k5=$(python3 poke.py kinds.qcow2 host 5)
python3 poke.py kinds.qcow2 unmap 4
python3 poke.py kinds.qcow2 rc0 "$k5"
before=$(sha256sum <kinds.qcow2)
run out err check --forensic --output=json kinds.qcow2
if [ "$rc" -eq 3 ] && out=$(python3 - out "$s0" "$s1" "$k4" "$k5" <<'PYEOF'
import json, sys
d = json.load(open(sys.argv[1]))
s0, s1, k4, k5 = (int(x) for x in sys.argv[2:])
assert d["unreferenced"] == [{"host-offset": k5, "guest-offset": 5 * 65536}], d["unreferenced"]
assert d["leaked"] == [{"refcount": 1, "host-offset": k4, "data": True}], d["leaked"]
assert d["snapshot-only"] == [{"host-offset": s0}, {"host-offset": s1}], d["snapshot-only"]
assert (d["unreferenced-clusters"], d["leaked-clusters"], d["leaked-clusters-with-data"],
        d["snapshot-only-clusters"]) == (1, 1, 1, 2)
assert "extracted-files" not in d
PYEOF
); then ok; else bad "every kind, json" "exit $rc: $out $(head -c 200 err)"; fi
run out err check --forensic kinds.qcow2
want=$(printf '%s\n' "Forensic report of 'kinds.qcow2' (the image was not changed)" \
  "Unreferenced cluster at host offset $(printf 0x%x "$k5"): mapped at guest offset 0x50000, refcount 0" \
  "Snapshot-only data cluster at host offset $(printf 0x%x "$s0")" \
  "Snapshot-only data cluster at host offset $(printf 0x%x "$s1")" \
  "Leaked cluster at host offset $(printf 0x%x "$k4"): refcount 1, holds data" \
  "Mapped but unreferenced clusters (refcount 0): 1" "Leaked clusters: 1 (1 hold non-zero data)" \
  "Data clusters only snapshots reference: 2")
# the header, one line per finding (in the library's order: sorted here),
# the counts
if [ "$rc" -eq 3 ] && [ "$(wc -l <out)" -eq 8 ] && [ "$(head -1 out)" = "$(head -1 <<<"$want")" ] &&
   [ "$(tail -3 out)" = "$(tail -3 <<<"$want")" ] &&
   [ "$(sed -n 2,5p out | sort)" = "$(sed -n 2,5p <<<"$want" | sort)" ]; then ok
else bad "every kind, human" "exit $rc: $(tr '\n' '|' <out)"; fi
if [ "$(sha256sum <kinds.qcow2)" = "$before" ]; then ok; else bad "every kind" "the image changed"; fi

# ---- a million leaks: bounded memory, nothing extracted from zeros
# peak PAT ARGS...: run qcowkit ARGS with stdout counted, not kept; prints
# "RSS LINES MATCHES EXIT": its peak RSS in KiB, the lines printed, those
# holding PAT, and its exit status; peak.tail keeps the last line. GNU
# time measures the RSS when present; else Python's getrusage, whose figure
# cannot fall below Python's own size (the child is a copy of it until it
# runs qcowkit), which hides small growth only.
peak() {
  PAT=$1 python3 - "$QCOWKIT" "${@:2}" <<'PYEOF'
import os, resource, subprocess, sys
pat = os.environ["PAT"].encode()
gnu = os.access("/usr/bin/time", os.X_OK)
cmd = (["/usr/bin/time", "-f", "%M", "-o", "peak.rss"] if gnu else []) + sys.argv[1:]
p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open("peak.err", "wb"))
lines = matches = 0
line = b""
for line in p.stdout:
    lines += 1
    matches += pat in line
rc = p.wait()
open("peak.tail", "wb").write(line)
rss = int(open("peak.rss").read().split()[-1]) if gnu else resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(rss, lines, matches, rc)
PYEOF
}
qemu-img create -q -f qcow2 -o cluster_size=512,refcount_bits=1 small.qcow2 1M
qemu-img create -q -f qcow2 -o cluster_size=512,refcount_bits=1 huge.qcow2 1M
read -r want_s _ < <(python3 poke.py small.qcow2 many-leaks 4096)
read -r want_b wdata_b < <(python3 poke.py huge.qcow2 many-leaks 1048576)
# qemu-img agrees on the small one
ref=$(qemu-img check --output=json small.qcow2 2>/dev/null | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d.get("leaks"), d.get("corruptions", 0))')
if [ "$ref" = "$want_s 0" ]; then ok; else bad "many leaks setup" "qemu-img check: $ref, want $want_s leaks"; fi
read -r rss_h_s _ m_h_s rc_h_s < <(peak "Leaked cluster at" check --forensic small.qcow2)
read -r rss_j_s _ m_j_s rc_j_s < <(peak '"refcount": 1' check --forensic --output=json small.qcow2)
read -r rss_j_b _ m_j_b rc_j_b < <(peak '"refcount": 1' check --forensic --output=json huge.qcow2)
# last: peak.tail keeps its summary line
read -r rss_h_b _ m_h_b rc_h_b < <(peak "Leaked cluster at" check --forensic --extract mx huge.qcow2)
echo "peak RSS (KiB): human $rss_h_s -> $rss_h_b, json $rss_j_s -> $rss_j_b ($want_s -> $want_b leaks)"
if [ "$rc_h_s" = 3 ] && [ "$rc_h_b" = 3 ] && [ "$rc_j_s" = 3 ] && [ "$rc_j_b" = 3 ] &&
   [ "$m_h_s" = "$want_s" ] && [ "$m_h_b" = "$want_b" ] &&
   [ "$m_j_s" = "$want_s" ] && [ "$m_j_b" = "$want_b" ] && [ "$want_b" -gt 1000000 ]; then ok
else bad "many leaks" "exit $rc_h_s/$rc_h_b/$rc_j_s/$rc_j_b, leaks listed $m_h_s/$m_h_b/$m_j_s/$m_j_b, want $want_s/$want_b: $(head -c 200 peak.err)"; fi
if [ $((rss_h_b - rss_h_s)) -lt 32768 ] && [ $((rss_j_b - rss_j_s)) -lt 32768 ]; then ok
else bad "many leaks: memory" "peak RSS grew by $((rss_h_b - rss_h_s)) KiB (human), $((rss_j_b - rss_j_s)) KiB (json) for a million leaks"; fi
# only the old refcount table and block hold data: two files
if [ "$wdata_b" -eq 2 ] && [ "$(find mx -type f | wc -l)" -eq 2 ] &&
   grep -q "^Saved 2 clusters (1024 bytes) in 'mx'$" peak.tail; then ok
else bad "many leaks: extract" "$(find mx -type f | wc -l) files, want $wdata_b: $(cat peak.tail)"; fi
finish
