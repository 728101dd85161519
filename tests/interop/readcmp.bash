# Comparison helpers for the read-side interop and cli tests (sourced after
# ../lib.sh; deliberately not named *.sh so ctest does not run it as a test).
#
# Every helper runs the same command line through qemu-img 7.2 (the reference)
# and through $QCOWKIT, records exactly one ok/bad, prints a short account of
# what differed, and never aborts the calling script.
#
#   cmp_convert  NAME IMG [ARGS...]  convert [ARGS] -O raw IMG: outputs equal (cmp)
#   cmp_json     NAME SUBCMD ARGS... both outputs parsed as JSON; every qemu-img
#                                    key must be present with an equal value of
#                                    the same JSON type, lists entry by entry;
#                                    extra keys are allowed, except keys qemu-img
#                                    emits only sometimes (COND in jsub.py, e.g.
#                                    "offset", "backing-filename", "snapshots"):
#                                    those must be absent when qemu-img omits them
#   cmp_text     NAME SUBCMD ARGS... stdout text and exit status identical
#   cmp_sparse   NAME IMG            qcowkit convert -O raw output keeps holes
#   cmp_read_all NAME IMG [FMT]      convert + map json + info json + the image
#                                    is unchanged by them (4 results)
#
# Commands run in the current directory, so a caller may cd first to test
# relative file names; scratch files live in $T. QK_TIMEOUT (seconds, default
# 120) bounds each qcowkit run.

QK_TIMEOUT=${QK_TIMEOUT:-120}
export LC_ALL=C
# QK_KEEP=1 keeps the scratch directory (images included) for debugging.
if [ -n "${QK_KEEP:-}" ]; then trap 'echo "scratch kept in $T" >&2' EXIT; fi

# run_qk OUT ERR ARGS...: run qcowkit; sets qk_rc (124 = timed out).
run_qk() {
  local o=$1 e=$2; shift 2
  qk_rc=0
  timeout "$QK_TIMEOUT" "$QCOWKIT" "$@" >"$o" 2>"$e" </dev/null || qk_rc=$?
}

# qk_why ERRFILE: one-line description of a failed qcowkit run.
qk_why() {
  local what="exit $qk_rc"
  if [ "$qk_rc" -eq 124 ]; then what="timed out after ${QK_TIMEOUT}s"
  elif [ "$qk_rc" -eq 126 ] || [ "$qk_rc" -eq 127 ]; then what="could not be run (exit $qk_rc; QCOWKIT=$QCOWKIT)"
  elif crashed "$qk_rc"; then what="CRASHED (exit $qk_rc)"; fi
  echo "qcowkit $what: $(head -c 300 "$1" | tr '\n' ' ')"
}

# settle: fsync the images so that their allocation (st_blocks, which
# info's actual-size and qemu's map heuristics depend on) no longer changes
# under delayed allocation while the two programs run one after the other.
settle() {
  find "$T" -type f \( -name '*.qcow2' -o -name '*.raw' -o -name '*.data' \) \
    -newer "$T/.settled" -exec sync {} + 2>/dev/null
  touch "$T/.settled"
}
touch -d '1970-01-02' "$T/.settled"

# Reference setup failures are test bugs or a broken environment: count them
# as failures so they are noticed.
setup() {
  if ! "$@" >"$T/setup.out" 2>&1; then
    bad "setup" "$* failed: $(grep -v -e "^wrote " -e " ops; " "$T/setup.out" | tail -c 300 | tr '\n' ' ')"
    return 1
  fi
}

cat >"$T/jsub.py" <<'PYEOF'
import json, sys

# Keys qemu-img emits only in some cases: when qemu-img leaves one out,
# qcowkit must leave it out too (a script tests for their presence).
COND = {"offset", "backing-filename", "full-backing-filename",
        "backing-filename-format", "snapshots", "bitmaps", "data-file",
        "data-file-raw", "encrypted", "encrypt", "cluster-size",
        "format-specific", "lazy-refcounts", "corrupt", "extended-l2",
        "icount"}

def load(path, who):
    try:
        with open(path) as f:
            return json.load(f)
    except Exception as e:
        with open(path, errors="replace") as f:
            head = f.read(200)
        print("%s output is not valid JSON (%s): %r" % (who, e, head))
        sys.exit(1)

ref = load(sys.argv[1], "qemu-img")
act = load(sys.argv[2], "qcowkit")
diffs = []

def short(v):
    s = json.dumps(v, sort_keys=True)
    return s if len(s) <= 160 else s[:157] + "..."

def walk(r, a, path):
    """Append differences of a (qcowkit) against r (qemu-img)."""
    if isinstance(r, dict):
        if not isinstance(a, dict):
            diffs.append("%s: qemu-img %s, qcowkit %s" % (path or "top", short(r), short(a)))
            return
        for k, v in r.items():
            if k not in a:
                diffs.append("%s.%s missing (qemu-img: %s)" % (path, k, short(v)))
            else:
                walk(v, a[k], "%s.%s" % (path, k))
        for k in a:
            if k in COND and k not in r:
                diffs.append("%s.%s present but qemu-img has none (qcowkit: %s)" % (path, k, short(a[k])))
    elif isinstance(r, list):
        if not isinstance(a, list):
            diffs.append("%s: qemu-img %s, qcowkit %s" % (path or "top", short(r), short(a)))
            return
        if len(r) != len(a):
            diffs.append("%s: qemu-img has %d entries, qcowkit %d" % (path or "top", len(r), len(a)))
        for i in range(min(len(r), len(a))):
            before = len(diffs)
            walk(r[i], a[i], "%s[%d]" % (path, i))
            if len(diffs) > before and isinstance(r[i], dict):
                # one line per differing entry is enough; show both entries
                del diffs[before:]
                diffs.append("%s[%d]: qemu-img %s\n      qcowkit  %s" % (path, i, short(r[i]), short(a[i])))
    else:
        if type(r) is not type(a) or r != a:
            diffs.append("%s: qemu-img %s, qcowkit %s" % (path or "top", short(r), short(a)))

walk(ref, act, "")
if diffs:
    for d in diffs[:6]:
        print("    " + d)
    if len(diffs) > 6:
        print("    ... %d more differences" % (len(diffs) - 6))
    sys.exit(1)
PYEOF

# cmp_json NAME SUBCMD ARGS...
cmp_json() {
  local n=$1; shift
  local ref_rc=0
  settle
  qemu-img "$@" >"$T/cj.ref" 2>"$T/cj.referr" || ref_rc=$?
  if [ "$ref_rc" -ne 0 ]; then
    bad "$n" "reference qemu-img $* failed: $(head -c 300 "$T/cj.referr" | tr '\n' ' ')"
    return
  fi
  run_qk "$T/cj.out" "$T/cj.err" "$@"
  if [ "$qk_rc" -ne 0 ]; then bad "$n" "$(qk_why "$T/cj.err") [qcowkit $*]"; return; fi
  if python3 "$T/jsub.py" "$T/cj.ref" "$T/cj.out" >"$T/cj.diff" 2>&1; then
    ok "$n"
  else
    bad "$n" "qcowkit $* differs from qemu-img:
$(cat "$T/cj.diff")"
  fi
}

# cmp_text NAME SUBCMD ARGS...: exact stdout and exit status.
cmp_text() {
  local n=$1; shift
  local ref_rc=0
  settle
  qemu-img "$@" >"$T/ct.ref" 2>"$T/ct.referr" || ref_rc=$?
  run_qk "$T/ct.out" "$T/ct.err" "$@"
  if [ "$qk_rc" -ne "$ref_rc" ]; then
    bad "$n" "exit $qk_rc, qemu-img exits $ref_rc [qcowkit $*] $( [ "$qk_rc" -ne 0 ] && qk_why "$T/ct.err")"
    return
  fi
  if cmp -s "$T/ct.ref" "$T/ct.out"; then
    ok "$n"
  else
    bad "$n" "qcowkit $* output differs from qemu-img (- qemu-img, + qcowkit):
$(diff -u "$T/ct.ref" "$T/ct.out" | sed -n '3,16p')"
  fi
}

# cmp_convert NAME IMG [ARGS...]: ARGS (e.g. -f raw) go before -O raw.
cmp_convert() {
  local n=$1 img=$2; shift 2
  settle
  rm -f "$T/cc.ref.raw" "$T/cc.out.raw"
  if ! qemu-img convert "$@" -O raw "$img" "$T/cc.ref.raw" >"$T/cc.referr" 2>&1; then
    bad "$n" "reference qemu-img convert failed: $(head -c 300 "$T/cc.referr" | tr '\n' ' ')"
    return
  fi
  run_qk "$T/cc.qout" "$T/cc.err" convert "$@" -O raw "$img" "$T/cc.out.raw"
  if [ "$qk_rc" -ne 0 ]; then bad "$n" "$(qk_why "$T/cc.err") [qcowkit convert $* -O raw $img]"; return; fi
  if [ ! -f "$T/cc.out.raw" ]; then bad "$n" "qcowkit convert wrote no output file"; return; fi
  if cmp "$T/cc.ref.raw" "$T/cc.out.raw" >"$T/cc.cmp" 2>&1; then
    ok "$n"
  else
    local rs qs
    rs=$(stat -c %s "$T/cc.ref.raw"); qs=$(stat -c %s "$T/cc.out.raw")
    bad "$n" "raw image of $img differs from qemu-img convert (sizes $rs vs $qs): $(head -2 "$T/cc.cmp" | tr '\n' ' ')$(cmp -l "$T/cc.ref.raw" "$T/cc.out.raw" 2>/dev/null | head -3 | awk '{printf " [byte %d: qemu-img %s qcowkit %s (octal)]", $1-1, $2, $3}')"
  fi
}

# cmp_sparse NAME IMG: the raw output of a mostly-empty image must keep holes:
# allocated bytes at most an eighth of the size and at most 1 MiB more than
# qemu-img's own sparse output.
cmp_sparse() {
  local n=$1 img=$2
  settle
  rm -f "$T/cs.ref.raw" "$T/cs.out.raw"
  setup qemu-img convert -O raw "$img" "$T/cs.ref.raw" || return
  run_qk "$T/cs.qout" "$T/cs.err" convert -O raw "$img" "$T/cs.out.raw"
  if [ "$qk_rc" -ne 0 ]; then bad "$n" "$(qk_why "$T/cs.err")"; return; fi
  if [ ! -f "$T/cs.out.raw" ]; then bad "$n" "qcowkit convert wrote no output file"; return; fi
  local size alloc ralloc
  size=$(stat -c %s "$T/cs.out.raw")
  alloc=$(( $(stat -c %b "$T/cs.out.raw") * $(stat -c %B "$T/cs.out.raw") ))
  ralloc=$(( $(stat -c %b "$T/cs.ref.raw") * $(stat -c %B "$T/cs.ref.raw") ))
  if [ "$size" -ne "$(stat -c %s "$T/cs.ref.raw")" ]; then
    bad "$n" "output size $size, qemu-img's $(stat -c %s "$T/cs.ref.raw")"
  elif [ "$alloc" -gt $((size / 8)) ] || [ "$alloc" -gt $((ralloc + 1048576)) ]; then
    bad "$n" "output not sparse: $alloc bytes allocated of $size (qemu-img's output: $ralloc)"
  else
    ok "$n"
  fi
}

# cmp_read_all NAME IMG [FMT]: convert + map JSON + info JSON, and the image
# file is unchanged afterwards (reads never write) -- 4 comparisons.
cmp_read_all() {
  local n=$1 img=$2 fmt=${3:-} before after
  before=$(cksum <"$img")
  if [ -n "$fmt" ]; then
    cmp_convert "$n: convert" "$img" -f "$fmt"
    cmp_json "$n: map json" map -f "$fmt" --output=json "$img"
    cmp_json "$n: info json" info -f "$fmt" --output=json "$img"
  else
    cmp_convert "$n: convert" "$img"
    cmp_json "$n: map json" map --output=json "$img"
    cmp_json "$n: info json" info --output=json "$img"
  fi
  after=$(cksum <"$img")
  if [ "$before" = "$after" ]; then ok "$n: image unchanged"
  else bad "$n: image unchanged" "$img was modified by read-only commands"; fi
}
