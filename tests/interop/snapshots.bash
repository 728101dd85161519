# Helpers for the snapshot tests (snapshots*.sh), sourced after ../lib.sh
# and readcmp.bash (not named *.sh: ctest does not run it). Each records
# its results with ok/bad and never aborts the calling script.
#
#   chk NAME IMG             qemu-img check: no errors, no leaks (exit 0)
#   sn NAME TOOL IMG ARGS... `snapshot ARGS IMG` by TOOL (qk: qcowkit,
#                            qemu: qemu-img) succeeds, then chk (2 results;
#                            returns 1 when the command failed)
#   content NAME TOOL IMG RAW [CONVERT ARGS...]
#                            TOOL's convert [ARGS] -O raw IMG equals RAW
#   unchanged NAME A B       files A and B are byte for byte equal
#   refused NAME PATTERN ARGS...
#                            qcowkit ARGS exits 1 with PATTERN (grep -E)
#                            in its message
#   reads NAME IMG           info, map and check --output=json equal
#                            qemu-img's (jsub.py's rules), info's
#                            "snapshots" lists identical, and snapshot -l,
#                            info and map (human) printed as qemu-img
#                            prints them (7 results)

chk() {
  if qemu-img check "$2" >"$T/chk.out" 2>&1; then ok
  else bad "$1: qemu-img check" "$(grep -v '^$' "$T/chk.out" | head -6 | tr '\n' '|')"; fi
}

sn() {
  local n=$1 tool=$2 img=$3
  shift 3
  if [ "$tool" = qk ]; then
    run_qk "$T/sn.out" "$T/sn.err" snapshot "$@" "$img"
    if [ "$qk_rc" -ne 0 ]; then bad "$n" "$(qk_why "$T/sn.err") [qcowkit snapshot $* $img]"; return 1; fi
  elif ! qemu-img snapshot "$@" "$img" >"$T/sn.err" 2>&1; then
    bad "$n" "qemu-img snapshot $* $img failed: $(head -c 300 "$T/sn.err")"
    return 1
  fi
  ok
  chk "$n" "$img"
}

# Without a cache mode both tools would sync every raw copy: -t unsafe.
content() {
  local n=$1 tool=$2 img=$3 raw=$4
  shift 4
  # a fresh target: qcowkit convert -O raw over an existing file keeps old
  # bytes where the source reads as zero (a bug outside these tests' scope)
  rm -f "$T/content.raw"
  if [ "$tool" = qk ]; then
    run_qk "$T/content.out" "$T/content.err" convert -t unsafe "$@" -O raw "$img" "$T/content.raw"
    if [ "$qk_rc" -ne 0 ]; then bad "$n" "$(qk_why "$T/content.err") [qcowkit convert $*]"; return; fi
  elif ! qemu-img convert -t unsafe "$@" -O raw "$img" "$T/content.raw" >"$T/content.err" 2>&1; then
    bad "$n" "qemu-img convert $* failed: $(head -c 300 "$T/content.err")"
    return
  fi
  if cmp "$T/content.raw" "$raw" >"$T/content.cmp" 2>&1; then ok
  else bad "$n" "$tool convert $* $img differs from $raw: $(head -c 200 "$T/content.cmp")"; fi
}

unchanged() {
  if cmp -s "$2" "$3"; then ok; else bad "$1" "$2 changed"; fi
}

refused() {
  local n=$1 pat=$2
  shift 2
  run_qk "$T/rf.out" "$T/rf.err" "$@"
  if [ "$qk_rc" -ne 1 ]; then bad "$n" "exit $qk_rc, want 1: $(head -c 300 "$T/rf.err")"
  elif ! grep -Eq -- "$pat" "$T/rf.err"; then bad "$n" "message lacks /$pat/: $(head -c 300 "$T/rf.err")"
  else ok; fi
}

# One python run for the four JSON comparisons (python starts slowly).
reads() {
  local n=$1 img=$2 c okc
  settle
  for c in info map check; do
    qemu-img "$c" --output=json "$img" >"$T/rd-$c.ref" 2>"$T/rd-$c.referr"
    run_qk "$T/rd-$c.out" "$T/rd-$c.err" "$c" --output=json "$img"
    [ "$qk_rc" -eq 0 ] || echo "qcowkit $c: $(qk_why "$T/rd-$c.err")" >"$T/rd-$c.out"
  done
  python3 - "$T" >"$T/rd.res" 2>&1 <<'PYEOF'
import contextlib, io, json, runpy, sys
t = sys.argv[1]
for c in ("info", "map", "check"):
    sys.argv = ["jsub.py", "%s/rd-%s.ref" % (t, c), "%s/rd-%s.out" % (t, c)]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(t + "/jsub.py", run_name="__main__")
        print("ok %s json" % c)
    except SystemExit:
        print("bad %s json:\n%s" % (c, out.getvalue()))
try:
    r = json.load(open(t + "/rd-info.ref")).get("snapshots")
    a = json.load(open(t + "/rd-info.out")).get("snapshots")
except Exception as e:
    r, a = str(e), None
if r == a and r:
    print("ok info snapshots")
else:
    print("bad info snapshots: qemu-img %s\n  qcowkit %s" % (json.dumps(r)[:300], json.dumps(a)[:300]))
PYEOF
  okc=$(grep -c '^ok ' "$T/rd.res")
  for ((c = 0; c < okc; c++)); do ok; done
  [ "$okc" -eq 4 ] || bad "$n: json" "$(grep -v '^ok ' "$T/rd.res" | head -16)"
  cmp_text "$n: snapshot -l" snapshot -l "$img"
  cmp_text "$n: info" info "$img"
  cmp_text "$n: map" map "$img"
}
