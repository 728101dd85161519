#!/bin/bash
# Names an image carries reach the terminal escaped. Images with escape
# sequences, C1 controls, bidirectional overrides, backslashes and invalid
# UTF-8 in a snapshot's id and name, bitmap names, the backing file name and
# format, and the data file name; for info (plain and --backing-chain), map
# and the error message that quotes a missing backing file:
#   - the human output (stdout and stderr) holds no C0 control byte but
#     newline, no DEL, no C1 control, no bidirectional control, and is valid
#     UTF-8; each name appears in the escaped form cli/cli.h documents,
#     computed here by an independent Python version of the rules; valid
#     non-ASCII text (é, 雪) passes unchanged;
#   - the JSON output parses, escapes control characters as JSON requires,
#     and gives back each name exactly (invalid UTF-8 as U+FFFD, as
#     qemu-img does).
. "$(dirname "$0")/../lib.sh"
need qemu-img qemu-io python3
cd "$T" || exit 1
export LC_ALL=C

# run OUT ERR ARGS...: run qcowkit; sets rc.
run() {
  local o=$1 e=$2; shift 2
  rc=0
  timeout 120 "$QCOWKIT" "$@" >"$o" 2>"$e" </dev/null || rc=$?
  if crashed "$rc"; then bad "crash" "qcowkit $* exited $rc: $(head -c 300 "$e")"; fi
}

cat >tool.py <<'PYEOF'
import json, struct, sys

SPECIAL = set(range(0x80, 0xA0)) | set(range(0x2028, 0x202F)) | set(range(0x2066, 0x206A))
NAMED = {7: "a", 8: "b", 9: "t", 10: "n", 11: "v", 12: "f", 13: "r"}

def esc(b):
    """The escaping of cli_escape(), written again from its description."""
    out, i = [], 0
    while i < len(b):
        c = b[i]
        if 0x20 <= c < 0x7F:
            out.append("\\\\" if c == 0x5C else chr(c)); i += 1; continue
        if c < 0x80:
            out.append("\\" + NAMED[c] if c in NAMED else "\\x%02x" % c); i += 1; continue
        n = 2 if 0xC2 <= c <= 0xDF else 3 if 0xE0 <= c <= 0xEF else 4 if 0xF0 <= c <= 0xF4 else 0
        try:
            ch = b[i:i + n].decode("utf-8", "strict") if n else None
        except UnicodeDecodeError:
            ch = None
        if ch is None or len(ch) != 1:
            out.append("\\x%02x" % c); i += 1; continue
        out.append("\\u%04x" % ord(ch) if ord(ch) in SPECIAL else ch); i += n
    return "".join(out)

def arg(s):
    """A command-line argument back to its bytes."""
    return s.encode("utf-8", "surrogateescape")

cmd = sys.argv[1]
if cmd == "esc":                  # esc NAME: print the escaped form
    sys.stdout.write(esc(arg(sys.argv[2])))
elif cmd == "safe":               # safe FILE...: terminal-safe text?
    for p in sys.argv[2:]:
        data = open(p, "rb").read()
        bad = [c for c in data if (c < 0x20 and c != 10) or c == 0x7F]
        try:
            text = data.decode("utf-8", "strict")
        except UnicodeDecodeError as e:
            print("%s: invalid UTF-8: %s" % (p, e)); sys.exit(1)
        bad += [ord(ch) for ch in text if ord(ch) in SPECIAL]
        if bad:
            print("%s: holds raw control characters %s" % (p, sorted(set(bad)))); sys.exit(1)
elif cmd == "snapname":           # snapname IMG ID NAME: rewrite the only snapshot's id and name
    img, sid, name = sys.argv[2], arg(sys.argv[3]), arg(sys.argv[4])
    f = open(img, "r+b")
    h = f.read(104)
    cs = 1 << struct.unpack(">I", h[20:24])[0]
    nb, off = struct.unpack(">IQ", h[60:72])
    assert nb == 1
    f.seek(off)
    fixed = bytearray(f.read(40))
    extra = struct.unpack(">I", fixed[36:40])[0]
    ext = f.read(extra)
    fixed[12:16] = struct.pack(">HH", len(sid), len(name))
    ent = bytes(fixed) + ext + sid + name
    ent += bytes(-len(ent) % 8)
    assert len(ent) <= cs
    f.seek(off); f.write(ent)
elif cmd == "backingfmt":         # backingfmt IMG NEW: same-length backing format name
    img, new = sys.argv[2], arg(sys.argv[3])
    f = open(img, "r+b")
    h = f.read(104)
    pos = struct.unpack(">I", h[100:104])[0]
    while True:
        f.seek(pos)
        magic, ln = struct.unpack(">II", f.read(8))
        assert magic != 0, "no backing format extension"
        if magic == 0xE2792ACA:
            assert ln == len(new), (ln, len(new))
            f.write(new); break
        pos += 8 + ((ln + 7) & ~7)
elif cmd == "json":               # json FILE PYEXPR: evaluate over the parsed JSON d
    d = json.load(open(sys.argv[2]))
    if not eval(sys.argv[3]):
        print("JSON does not satisfy %s: %s" % (sys.argv[3], json.dumps(d)[:600])); sys.exit(1)
PYEOF
esc() { python3 tool.py esc "$1"; }
# has FILE TEXT: FILE holds TEXT (a fixed string)
has() { grep -qF -- "$2" "$1"; }
safe() { local out; if out=$(python3 tool.py safe "$@"); then ok; else bad "$n: raw control" "$out"; fi; }

# ---- a snapshot name with escape sequences, as qemu-img writes it
sname=$'\e[31mred\e]0;title\a'
qemu-img create -q -f qcow2 snap.qcow2 1M
qemu-img snapshot -c "$sname" snap.qcow2
n="snapshot name"
run out err info snap.qcow2
safe out err
if [ "$rc" -eq 0 ] && grep -q "^1 *$(esc "$sname" | sed 's/[][\\.*^$]/\\&/g') " out; then ok
else bad "$n: human" "exit $rc: $(grep -a '^1 ' out | od -c | head -3 | tr '\n' ' ')"; fi
run out err info --output=json snap.qcow2
if [ "$rc" -eq 0 ] && python3 tool.py json out "d['snapshots'][0]['name'] == sys.argv[4]" "$sname"; then ok
else bad "$n: json" "exit $rc"; fi

# ---- a snapshot id and name with bytes the library keeps: DEL, backslash,
# C1 CSI (U+009B), a bidirectional override (U+202E), invalid UTF-8 (a
# lone 0x9b, a cut sequence), and plain non-ASCII text
sid=$'7\x7f\xc2\x9b'
sname2=$'caf\xc3\xa9 \xe9\x9b\xaa a\\b \xe2\x80\xaeevil \xc2\x9b31m \x9b \xe2\x82 end'
sname2v=$'caf\xc3\xa9 \xe9\x9b\xaa a\\b \xe2\x80\xaeevil \xc2\x9b31m end'
for v in 1 2; do
  cp snap.qcow2 "snap$v.qcow2"
  if [ "$v" = 1 ]; then nm=$sname2; else nm=$sname2v; fi
  python3 tool.py snapname "snap$v.qcow2" "$sid" "$nm"
  n="snapshot id and name $v"
  qemu-img check "snap$v.qcow2" >/dev/null 2>&1 || bad "$n: setup" "qemu-img check fails on the patched image"
  run out err info "snap$v.qcow2"
  safe out err
  row="$(esc "$sid") $(esc "$nm")"
  if [ "$rc" -eq 0 ] && grep -a '^7' out | grep -qF -- "$(esc "$sid")" && grep -a '^7' out | grep -qF -- "$(esc "$nm")" &&
     has out "café 雪 a\\\\b \\u202eevil \\u009b31m"; then ok
  else bad "$n: human" "exit $rc, want '$row' in: $(grep -a '^7' out)"; fi
  run out err info --output=json "snap$v.qcow2"
  if [ "$v" = 2 ]; then
    want="d['snapshots'][0]['name'] == sys.argv[4].encode('utf-8', 'surrogateescape').decode('utf-8')"
  else   # invalid UTF-8 reads as U+FFFD in JSON
    want="d['snapshots'][0]['name'] == sys.argv[4].encode('utf-8', 'surrogateescape').decode('utf-8', 'replace')"
  fi
  if [ "$rc" -eq 0 ] && python3 tool.py json out "$want and d['snapshots'][0]['id'] == '7\\x7f\\x9b'" "$nm"; then ok
  else bad "$n: json" "exit $rc: $(grep -a '"name"\|"id"' out)"; fi
done

# ---- bitmap names, added by qemu-img (it takes any bytes)
bname=$'bm\e[1mX\e]0;t\a'
bname2=$'b\\x\xe2\x80\xaeZ\x9b\n2'
qemu-img create -q -f qcow2 bm.qcow2 1M
qemu-img bitmap --add bm.qcow2 "$bname"
qemu-img bitmap --add bm.qcow2 "$bname2"
n="bitmap names"
run out err info bm.qcow2
safe out err
if [ "$rc" -eq 0 ] && has out "name: $(esc "$bname")" && has out "name: $(esc "$bname2")" &&
   has out 'name: bm\x1b[1mX\x1b]0;t\a' && has out 'name: b\\x\u202eZ\x9b\n2'; then ok
else bad "$n: human" "exit $rc: $(grep -a 'name:' out | tr '\n' '|')"; fi
run out err info --output=json bm.qcow2
if [ "$rc" -eq 0 ] && python3 tool.py json out \
   "[b['name'] for b in d['format-specific']['data']['bitmaps']] == [sys.argv[4], sys.argv[5].encode('utf-8', 'surrogateescape').decode('utf-8', 'replace')]" \
   "$bname" "$bname2" && grep -q '\\u001B\[1mX' out; then ok
else bad "$n: json" "exit $rc: $(grep -a '"name"' out)"; fi

# ---- a backing file and a data file whose names hold a C1 CSI, a
# bidirectional override and invalid UTF-8 (the library refuses C0 and DEL
# in these names), and a backing format name of the same kind
bfile=$'base\xc2\x9b[31m\xe2\x80\xae\xff.qcow2'
dfile=$'data\xc2\x9b[7m\xfe.raw'
qemu-img create -q -f qcow2 "$bfile" 1M
qemu-io -f qcow2 -c 'write -P 1 0 64k' "$bfile" >/dev/null
qemu-img create -q -f qcow2 -b "$bfile" -F qcow2 top.qcow2 1M
qemu-img create -q -f qcow2 -o data_file="$dfile" dtop.qcow2 1M
qemu-io -f qcow2 -c 'write -P 2 0 64k' dtop.qcow2 >/dev/null
n="backing file name"
run out err info top.qcow2
safe out err
if [ "$rc" -eq 0 ] && has out "backing file: $(esc "$bfile")" &&
   has out 'backing file: base\u009b[31m\u202e\xff.qcow2'; then ok
else bad "$n: human" "exit $rc: $(grep -a 'backing' out | tr '\n' '|')"; fi
n="backing chain"
run out err info --backing-chain top.qcow2
safe out err
if [ "$rc" -eq 0 ] && has out "image: $(esc "$bfile")" && [ "$(grep -c '^image: ' out)" -eq 2 ]; then ok
else bad "$n: human" "exit $rc: $(grep -a 'image:' out | tr '\n' '|') $(head -c 200 err)"; fi
run out err info --output=json top.qcow2
if [ "$rc" -eq 0 ] && python3 tool.py json out "d['backing-filename'] == sys.argv[4].encode('utf-8', 'surrogateescape').decode('utf-8', 'replace')" "$bfile"; then ok
else bad "$n: json" "exit $rc: $(grep -a 'backing' out)"; fi
n="data file name"
run out err info dtop.qcow2
safe out err
if [ "$rc" -eq 0 ] && has out "data file: $(esc "$dfile")" && has out 'data file: data\u009b[7m\xfe.raw'; then ok
else bad "$n: info" "exit $rc: $(grep -a 'data file' out | tr '\n' '|')"; fi
run out err map dtop.qcow2
safe out err
if [ "$rc" -eq 0 ] && grep -q "^0  *0x10000  *0  *$(esc "$dfile" | sed 's/[][\\.*^$]/\\&/g')$" out; then ok
else bad "$n: map" "exit $rc: $(tr '\n' '|' <out) $(head -c 200 err)"; fi
n="backing format name"
cp top.qcow2 fmt.qcow2
python3 tool.py backingfmt fmt.qcow2 $'\xc2\x9b\x9bqw'
run out err info fmt.qcow2
safe out err
if [ "$rc" -eq 0 ] && has out 'backing file format: \u009b\x9bqw'; then ok
else bad "$n: human" "exit $rc: $(grep -a 'format' out | tr '\n' '|') $(head -c 200 err)"; fi
run out err info --backing-chain fmt.qcow2
safe out err
if [ "$rc" -eq 1 ] && [ "$(wc -l <err)" -eq 1 ]; then ok
else bad "$n: refused" "exit $rc: $(head -c 300 err)"; fi

# ---- an error message quoting the image's backing file name: one line, escaped
n="missing backing file"
mv "$bfile" elsewhere.qcow2
run out err info --backing-chain top.qcow2
safe out err
if [ "$rc" -eq 1 ] && [ "$(wc -l <err)" -eq 1 ] && grep -q '^qcowkit: ' err && has err "$(esc "$bfile")"; then ok
else bad "$n" "exit $rc: $(od -c err | head -5 | tr '\n' ' ')"; fi
finish
