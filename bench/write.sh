#!/usr/bin/env bash
# bench/write.sh -- write-path benchmark: qcowkit vs qemu-img.
#
# Usage: bench/write.sh [--clean | --clean-only] [QCOWKIT_BINARY] [ROUNDS]
#   QCOWKIT_BINARY  default: <repo>/build/qcowkit
#   ROUNDS          default: 3 (every round runs every tool on every row)
#   --clean         remove the work directory when the script exits
#   --clean-only    remove the work directory and exit (no benchmark)
#
# Rows: allocating 4 KiB writes (`bench -w`) into fresh empty 4 GiB qcow2
# images at depth 1 and 16, and `convert -f raw -O qcow2` of a compressible
# raw source: plain, `-c` (zlib) and `-c -o compression_type=zstd`, the
# compressed ones also against `qemu-img convert -W`.
#
# Environment:
#   BENCH_DIR           parent of the work directory (default /tmp); the work
#                       directory is $BENCH_DIR/qkwbench and the convert
#                       source in it is reused between runs when its size
#                       matches
#   BENCH_CSIZE         convert source size, e.g. 512M (default), 1G; multiple
#                       of 1 MiB. The default is 512M, not 1G, to keep a
#                       default run at 5-6 minutes: `qemu-img convert -c`
#                       (zlib) runs at about 20 MiB/s here, so 1G adds about
#                       4 minutes
#   BENCH_WCOUNT        requests per `bench -w` run (default 50000; each one
#                       allocates a new 64 KiB cluster, so an image grows to
#                       about BENCH_WCOUNT * 64 KiB)
#   BENCH_CODEC_SAMPLE  how much of the source the one-core codec rate is
#                       measured on (default 256M; 0 skips it)
#
# The machine is noisy, so the only figures to trust are ratios of runs made
# in the same round: within one round every tool runs once per row, back to
# back, in an order rotated from round to round. See bench/README.md.
#
# Exit status: 0 all ran and every check passed; 1 setup error, a qcowkit
# run failed / is unsupported, or a qcowkit result failed `qemu-img check`
# or `qemu-img compare` (the table is still printed, with FAIL or WRONG in
# its cells).

set -euo pipefail
export LC_ALL=C

prog=write.sh
die()  { echo "$prog: error: $*" >&2; exit 1; }
note() { echo "$prog: $*" >&2; }
usage() { sed -n '2,/^$/{s/^# \{0,1\}//;p}' "$0"; }

# ---------------------------------------------------------------- arguments
clean_after=0
clean_only=0
pos=()
for a in "$@"; do
  case $a in
    --clean)      clean_after=1 ;;
    --clean-only) clean_only=1 ;;
    -h|--help)    usage; exit 0 ;;
    -*)           die "unknown option '$a' (try --help)" ;;
    *)            pos+=("$a") ;;
  esac
done
[ ${#pos[@]} -le 2 ] || die "too many arguments (try --help)"

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
QCOWKIT=${pos[0]:-$repo/build/qcowkit}
ROUNDS=${pos[1]:-3}
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer, got '$ROUNDS'"

W=${BENCH_DIR:-/tmp}/qkwbench
SRC=$W/source.raw
STAMP=$W/ready              # written last; holds the size and generator of a complete source
GEN=textmix-v1              # bump when the generator changes, so old sources are remade
OUT=$W/convert-out.qcow2    # convert destination, deleted after every run
TMP=$W/tmp

remove_workdir() {
  # The path always ends in /qkwbench; refuse anything odd all the same.
  [ "$(basename "$W")" = qkwbench ] || die "refusing to remove '$W'"
  if [ -d "$W" ]; then drop_files "$W"/*.qcow2 "$W"/*.raw "$W"/*.tmp; rm -rf -- "$W"; note "removed $W"; fi
}

# drop_files FILE...: delete files, cheaply. The root file system here is
# mounted with `discard`, and an image made by `bench -w` has two extents per
# cluster (4 KiB written, 60 KiB unwritten); a plain rm of a 50000-cluster
# image then takes 40-60 s, one discard per extent. Zeroing the whole file
# first (FALLOC_FL_ZERO_RANGE) turns it into a few unwritten extents, and the
# rm takes well under a second. Where that is not supported, it is a plain rm.
drop_files() {
  local f len
  for f in "$@"; do
    [ -f "$f" ] || continue
    len=$(stat -c %s -- "$f" 2>/dev/null) || len=0
    if [ "$len" -gt 0 ]; then fallocate -z -o 0 -l "$len" -- "$f" 2>/dev/null || true; fi
    rm -f -- "$f"
  done
}

if [ $clean_only = 1 ]; then remove_workdir; exit 0; fi

# ------------------------------------------------------------------- sizes
parse_size() {   # 4G, 256M, 4GiB, 1048576 -> bytes (binary units)
  local s=$1 n u
  [[ $s =~ ^([0-9]+)([KkMmGgTt]?)(i?[Bb])?$ ]] || return 1
  n=${BASH_REMATCH[1]}; u=${BASH_REMATCH[2]}
  case $u in
    [Kk]) n=$((n << 10)) ;; [Mm]) n=$((n << 20)) ;;
    [Gg]) n=$((n << 30)) ;; [Tt]) n=$((n << 40)) ;;
  esac
  echo "$n"
}
CSIZE=$(parse_size "${BENCH_CSIZE:-512M}") || die "BENCH_CSIZE '${BENCH_CSIZE}' is not a size like 512M or 1G"
[ $((CSIZE % (1 << 20))) -eq 0 ] || die "BENCH_CSIZE must be a multiple of 1 MiB"
[ "$CSIZE" -ge $((16 << 20)) ]   || die "BENCH_CSIZE must be at least 16M"
WCOUNT=${BENCH_WCOUNT:-50000}
[[ $WCOUNT =~ ^[1-9][0-9]*$ ]] || die "BENCH_WCOUNT must be a positive integer"
CODEC_SAMPLE=$(parse_size "${BENCH_CODEC_SAMPLE:-256M}") || die "BENCH_CODEC_SAMPLE '${BENCH_CODEC_SAMPLE}' is not a size like 256M (or 0)"
[ "$CODEC_SAMPLE" -le "$CSIZE" ] || CODEC_SAMPLE=$CSIZE

WSIZE=$((4 << 30))          # bench -w image size
WSTEP=4100096               # 62.56 clusters: every request lands in a new cluster
gib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1073741824 }'; }
human() { awk -v b="$1" 'BEGIN { if (b >= 1073741824) printf "%.1f GiB", b / 1073741824
                                 else printf "%d MiB", b / 1048576 }'; }

# ------------------------------------------------------------------- tools
for t in qemu-img python3 awk df stat fallocate; do
  command -v "$t" >/dev/null 2>&1 || die "'$t' is required but not installed"
done
case $QCOWKIT in /*) ;; *) QCOWKIT=$PWD/$QCOWKIT ;; esac
[ -e "$QCOWKIT" ] || die "qcowkit binary not found: $QCOWKIT (build it first, or pass its path as the first argument)"
[ -x "$QCOWKIT" ] || die "qcowkit binary is not executable: $QCOWKIT"

# ------------------------------------------------------------ space check
have_src=0
if [ -f "$STAMP" ] && [ -f "$SRC" ] && [ "$(cat "$STAMP")" = "$CSIZE $GEN" ]; then
  have_src=1
fi
# Needed at once: the source unless reusable, plus the larger of (a) the two
# bench -w images of one row (one 64 KiB cluster per request, at most the
# whole 4 GiB, plus metadata) and (b) one convert output (at most the source
# size, plus metadata); 5% + 64 MiB of slack.
wclusters=$WCOUNT; [ "$wclusters" -le $((WSIZE / 65536)) ] || wclusters=$((WSIZE / 65536))
wimg=$((wclusters * 65536 + (8 << 20)))
phase=$((2 * wimg)); [ "$phase" -ge $((CSIZE + (8 << 20))) ] || phase=$((CSIZE + (8 << 20)))
need=$phase
[ $have_src = 1 ] || need=$((need + CSIZE))
need=$((need + need / 20 + (64 << 20)))
probe_dir=$W
while [ ! -d "$probe_dir" ]; do probe_dir=$(dirname "$probe_dir"); done
free_b=$(( $(df -Pk "$probe_dir" | awk 'NR == 2 { print $4 }') * 1024 ))
echo "disk: $(gib "$free_b") GiB free on $(df -P "$probe_dir" | awk 'NR == 2 { print $6 }') ($probe_dir), $(gib "$need") GiB needed"
if [ "$free_b" -lt "$need" ]; then
  die "not enough free disk space: need $(gib "$need") GiB, have $(gib "$free_b") GiB (set BENCH_DIR to a bigger file system, or BENCH_WCOUNT / BENCH_CSIZE lower)"
fi
avail_kb=$(awk '/^MemAvailable:/ { print $2 }' /proc/meminfo)
if [ -n "$avail_kb" ] && [ $((avail_kb * 1024)) -lt $((CSIZE + phase)) ]; then
  note "warning: only $(gib $((avail_kb * 1024))) GiB of memory available; the source and the"
  note "         outputs ($(gib $((CSIZE + phase))) GiB) will not all stay in the page cache,"
  note "         so part of what is measured is the disk"
fi

mkdir -p "$W" "$TMP" "$W/results"
WIMG_Q=$W/bench-qemu-img.qcow2
WIMG_K=$W/bench-qcowkit.qcow2
cleanup() {
  drop_files "$OUT" "$WIMG_Q" "$WIMG_K" "$SRC.tmp"
  rm -rf -- "$TMP"
  if [ $clean_after = 1 ]; then remove_workdir; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ------------------------------------------------------------ the source
if [ $have_src = 1 ]; then
  echo "source: reusing $SRC ($(human "$CSIZE"))"
else
  rm -f -- "$STAMP"; drop_files "$SRC"
  echo "source: writing $(human "$CSIZE") of mixed compressible data to $SRC ..."
  # bench/mixed-data.py says what the data are.
  python3 "$(dirname "${BASH_SOURCE[0]}")/mixed-data.py" "$SRC.tmp" "$CSIZE" || die "could not write $SRC.tmp"
  mv -f -- "$SRC.tmp" "$SRC"
  echo "$CSIZE $GEN" >"$STAMP"
fi

warm() { cat -- "$SRC" >/dev/null; }
echo "page cache: warming ..."
warm

# ------------------------------------------------------------ measurement
stamp=$(date +%Y%m%d-%H%M%S)
TSV=$W/results/write-$stamp.tsv
CHECKS=$W/results/write-$stamp.checks
CODEC=$W/results/write-$stamp.codec
printf 'round\trow\ttool\tstatus\tsecs\twall_secs\tbytes\tops\ttiming\tout_bytes\n' >"$TSV"
: >"$CHECKS"

declare -A broken=()   # "tool" or "tool/row" -> reason; such runs are skipped
declare -A checked=()  # row -> 1 once a qcowkit result of that row was checked
failures=0

show_failure() {   # show_failure WHAT RC OUTPUT_FILE
  note "FAILED ($1), exit status $2: ${CMD[*]}"
  sed 's/^/    | /' "$3" | tail -n 15 >&2
}

# record ROUND ROW TOOL STATUS SECS WALL BYTES OPS TIMING OUT_BYTES
record() { local IFS=$'\t'; echo "$*" >>"$TSV"; }

# check WHAT CMD...: run a check (qemu-img check / compare); log the result.
# Returns non-zero, after saying so loudly, if it did not pass.
check() {
  local what=$1 rc=0; shift
  CMD=("$@")
  "${CMD[@]}" >"$TMP/check.txt" 2>&1 || rc=$?
  if [ $rc -eq 0 ]; then
    printf '%s\tok\n' "$what" >>"$CHECKS"
    return 0
  fi
  show_failure "check: $what" $rc "$TMP/check.txt"
  printf '%s\tFAILED (exit %s)\n' "$what" "$rc" >>"$CHECKS"
  failures=$((failures + 1))
  return 1
}

# wbench_cmd TOOL DEPTH IMAGE: the bench -w command line, in the array CMD.
wbench_cmd() {
  local tool=$1 depth=$2 img=$3 bin=qemu-img
  [ "$tool" = qcowkit ] && bin=$QCOWKIT
  CMD=("$bin" bench -w -c "$WCOUNT" -d "$depth" -s 4k -S "$WSTEP" "$img")
}

# run_wbench ROUND ROW DEPTH TOOL IMAGE: one timed bench -w run.
run_wbench() {
  local round=$1 row=$2 depth=$3 tool=$4 img=$5
  local bytes=$((WCOUNT * 4096)) out=$TMP/out.txt rc=0 t0 t1 wall secs src
  if [ -n "${broken[$tool]:-}${broken[$tool/$row]:-}" ]; then
    record "$round" "$row" "$tool" fail "" "" "$bytes" "$WCOUNT" "" ""
    return
  fi
  wbench_cmd "$tool" "$depth" "$img"
  sync   # start from no dirty data, outside the timing
  t0=$EPOCHREALTIME
  "${CMD[@]}" >"$out" 2>&1 || rc=$?
  t1=$EPOCHREALTIME
  wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.6f", b - a }')
  if [ $rc -ne 0 ]; then
    show_failure "$tool, $row, round $round" $rc "$out"
    [ "$tool" = qemu-img ] && die "qemu-img bench failed; the machine or the setup is broken"
    broken[$tool/$row]="exit $rc"; failures=$((failures + 1))
    record "$round" "$row" "$tool" fail "" "$wall" "$bytes" "$WCOUNT" "" ""
    return
  fi
  secs=$(sed -n 's/^Run completed in \([0-9.]*\) seconds.*/\1/p' "$out" | tail -n 1)
  src=tool
  if [ -z "$secs" ] || awk -v s="$secs" 'BEGIN { exit !(s <= 0) }'; then
    secs=$wall; src=wall
  fi
  record "$round" "$row" "$tool" ok "$secs" "$wall" "$bytes" "$WCOUNT" "$src" "$(stat -c %s -- "$img")"
  printf '  %-14s %-11s %9.3f s  %9.1f MiB/s\n' "$row" "$tool" "$secs" \
    "$(awk -v b="$bytes" -v s="$secs" 'BEGIN { print b / 1048576 / s }')" >&2
}

# convert_cmd TOOL ROW SRC DST: the convert command line, in the array CMD.
convert_cmd() {
  local tool=$1 row=$2 src=$3 dst=$4 opts=()
  case $row in
    convert-qcow2) opts=() ;;
    convert-zlib)  opts=(-c) ;;
    convert-zstd)  opts=(-c -o compression_type=zstd) ;;
  esac
  case $tool in
    qemu-img)   CMD=(qemu-img convert -f raw -O qcow2 "${opts[@]}" "$src" "$dst") ;;
    qemu-img-W) CMD=(qemu-img convert -W -f raw -O qcow2 "${opts[@]}" "$src" "$dst") ;;
    qcowkit)    CMD=("$QCOWKIT" convert -f raw -O qcow2 "${opts[@]}" "$src" "$dst") ;;
  esac
}

# check_compressed IMAGE TYPE: IMAGE has compressed clusters, of TYPE.
check_compressed() {
  python3 - "$1" "$2" <<'EOF'
import json, subprocess, sys
img, want = sys.argv[1], sys.argv[2]
c = json.loads(subprocess.check_output(["qemu-img", "check", "--output=json", "-f", "qcow2", img]))
i = json.loads(subprocess.check_output(["qemu-img", "info", "--output=json", "-f", "qcow2", img]))
got = i.get("format-specific", {}).get("data", {}).get("compression-type", "zlib")
n = c.get("compressed-clusters", 0)
print("compressed clusters: %d, compression type: %s" % (n, got))
sys.exit(0 if n > 0 and got == want else 1)
EOF
}

# check_convert ROW: the checks of a qcowkit convert output; 0 if it passed.
check_convert() {
  local row=$1 ok=0
  check "$row: qemu-img check of the qcowkit output" qemu-img check -f qcow2 "$OUT" || ok=1
  check "$row: qemu-img compare -f raw -F qcow2 source qcowkit-output" \
    qemu-img compare -f raw -F qcow2 "$SRC" "$OUT" || ok=1
  # -c must really compress, and zstd must really be zstd.
  if [ "$row" != convert-qcow2 ]; then
    local want=zlib; [ "$row" = convert-zstd ] && want=zstd
    check "$row: output has compressed clusters of type $want" check_compressed "$OUT" "$want" || ok=1
  fi
  return $ok
}

# run_convert ROUND ROW TOOL: one timed convert of the source, wall clock.
run_convert() {
  local round=$1 row=$2 tool=$3 out=$TMP/out.txt rc=0 t0 t1 secs size
  if [ -n "${broken[$tool]:-}${broken[$tool/$row]:-}" ]; then
    record "$round" "$row" "$tool" fail "" "" "$CSIZE" 1 "" ""
    return
  fi
  convert_cmd "$tool" "$row" "$SRC" "$OUT"
  drop_files "$OUT"; sync   # start from no dirty data, outside the timing
  t0=$EPOCHREALTIME
  "${CMD[@]}" >"$out" 2>&1 || rc=$?
  t1=$EPOCHREALTIME
  secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.6f", b - a }')
  if [ $rc -ne 0 ]; then
    show_failure "$tool $row, round $round" $rc "$out"
    [ "$tool" = qcowkit ] || die "$tool convert failed; the machine or the setup is broken"
    broken[$tool/$row]="exit $rc"; failures=$((failures + 1))
    record "$round" "$row" "$tool" fail "" "$secs" "$CSIZE" 1 "" ""
    drop_files "$OUT"; return
  fi
  size=$(stat -c %s -- "$OUT")
  # A wrong result makes the time meaningless: check qcowkit's first output.
  if [ "$tool" = qcowkit ] && [ -z "${checked[$row]:-}" ]; then
    checked[$row]=1
    if ! check_convert "$row"; then
      broken[$tool/$row]=wrong
      record "$round" "$row" "$tool" wrong "$secs" "$secs" "$CSIZE" 1 wall "$size"
      drop_files "$OUT"; return
    fi
  fi
  record "$round" "$row" "$tool" ok "$secs" "$secs" "$CSIZE" 1 wall "$size"
  printf '  %-14s %-11s %9.3f s  %9.1f MiB/s  (output %s)\n' "$row" "$tool" "$secs" \
    "$(awk -v b="$CSIZE" -v s="$secs" 'BEGIN { print b / 1048576 / s }')" "$(human "$size")" >&2
  drop_files "$OUT"
}

# ----------------------------------------------- can this qcowkit do it?
probe() {   # probe KEY CMD...: a tiny run; on failure mark KEY broken.
  local key=$1 rc=0; shift
  CMD=("$@")
  "${CMD[@]}" >"$TMP/probe.txt" 2>&1 || rc=$?
  if [ $rc -ne 0 ]; then
    show_failure "probe: $key" $rc "$TMP/probe.txt"
    broken[$key]="probe failed"
    failures=$((failures + 1))
  fi
}
for depth in 1 16; do
  rm -f -- "$TMP/probe.qcow2"
  qemu-img create -q -f qcow2 -o cluster_size=65536 "$TMP/probe.qcow2" 64M || die "qemu-img create failed"
  probe "qcowkit/alloc-4k-d$depth" "$QCOWKIT" bench -w -c 32 -d "$depth" -s 4k -S "$WSTEP" "$TMP/probe.qcow2"
done
head -c $((2 << 20)) "$SRC" >"$TMP/probe.raw"
for row in convert-qcow2 convert-zlib convert-zstd; do
  rm -f -- "$TMP/probe-out.qcow2"
  convert_cmd qcowkit "$row" "$TMP/probe.raw" "$TMP/probe-out.qcow2"
  probe "qcowkit/$row" "${CMD[@]}"
done
rm -f -- "$TMP/probe.qcow2" "$TMP/probe.raw" "$TMP/probe-out.qcow2"
qk_version=$("$QCOWKIT" --version 2>/dev/null | head -n 1) || qk_version="(no --version)"

# ------------------------------------------------------------------ header
{
  echo "# qcowkit write benchmark, $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "# host: $(uname -srm), $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "# qcowkit: $QCOWKIT ${qk_version:+($qk_version)}"
  echo "# $(qemu-img --version | head -n 1)"
  echo "# bench -w: $WCOUNT x 4 KiB, step $WSTEP, into a fresh empty $(human "$WSIZE") qcow2 (64 KiB clusters) per run"
  echo "# convert: $(human "$CSIZE") raw source ($GEN), wall clock, output deleted and synced between runs; $ROUNDS rounds"
  echo "# results: $TSV (every run), write-$stamp.txt (this table)"
} | tee "$W/results/write-$stamp.header" >&2

# ------------------------------------------------- one-core codec rate
# The compression limit for reference: every non-zero 64 KiB cluster of the
# first CODEC_SAMPLE bytes, compressed on one core as qcow2 does it (zlib:
# raw deflate, window bits -12, default level, memLevel 9; zstd: default
# level, if the python3 zstandard module is there). Zero clusters are left
# out, as convert skips them.
if [ "$CODEC_SAMPLE" -gt 0 ]; then
  note "codec: one-core rate on the first $(human "$CODEC_SAMPLE") of the source ..."
  python3 - "$SRC" "$CODEC_SAMPLE" >"$CODEC" <<'EOF' || die "the codec rate measurement failed"
import sys, time, zlib
path, sample = sys.argv[1], int(sys.argv[2])
CL, CHUNK = 65536, 16 << 20
zero = bytes(CL)

def chunks():   # the non-zero clusters of the sample, 16 MiB at a time
    with open(path, "rb") as f:
        left = sample
        while left > 0:
            data = f.read(min(CHUNK, left))
            if not data:
                break
            left -= len(data)
            yield [c for c in (data[i:i + CL] for i in range(0, len(data), CL)) if c != zero]

def run(name, compress):   # only the compress calls are timed
    secs, nzb, out = 0.0, 0, 0
    for nz in chunks():
        t0 = time.perf_counter()
        n = [len(compress(c)) for c in nz]
        secs += time.perf_counter() - t0
        nzb += sum(map(len, nz))
        out += sum(min(a, len(c)) for a, c in zip(n, nz))   # a cluster that does not shrink is stored as is
    print("%s\t%d\t%d\t%.6f\t%d" % (name, sample, nzb, secs, out))

def deflate(c):
    z = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12, 9)
    return z.compress(c) + z.flush()
run("zlib", deflate)
try:
    import zstandard
except ImportError:
    print("zstd\t%d\t\t\t" % sample)
else:
    zc = zstandard.ZstdCompressor()
    run("zstd", zc.compress)
EOF
fi

# ------------------------------------------------------------------ rounds
WROWS=("alloc-4k-d1 1" "alloc-4k-d16 16")
WTOOLS=(qemu-img qcowkit)
CROWS=(convert-qcow2 convert-zlib convert-zstd)
for ((r = 1; r <= ROUNDS; r++)); do
  note "round $r/$ROUNDS"
  for spec in "${WROWS[@]}"; do
    read -r row depth <<<"$spec"
    drop_files "$WIMG_Q" "$WIMG_K"
    for img in "$WIMG_Q" "$WIMG_K"; do
      qemu-img create -q -f qcow2 -o cluster_size=65536 "$img" "$WSIZE" || die "qemu-img create $img failed"
    done
    # Rotate the tool order each round so no tool always runs first or last.
    for ((k = 0; k < ${#WTOOLS[@]}; k++)); do
      t=${WTOOLS[$(((k + r - 1) % ${#WTOOLS[@]}))]}
      if [ "$t" = qcowkit ]; then img=$WIMG_K; else img=$WIMG_Q; fi
      run_wbench "$r" "$row" "$depth" "$t" "$img"
    done
    # A wrong result makes the time meaningless: check qcowkit's first image.
    if [ -z "${checked[$row]:-}" ] && [ -z "${broken[qcowkit/$row]:-}" ]; then
      checked[$row]=1
      ok=0
      check "$row: qemu-img check of the qcowkit image" qemu-img check -f qcow2 "$WIMG_K" || ok=1
      check "$row: qemu-img compare qemu-img-image qcowkit-image" \
        qemu-img compare -f qcow2 -F qcow2 "$WIMG_Q" "$WIMG_K" || ok=1
      if [ $ok = 1 ]; then
        broken[qcowkit/$row]=wrong
        awk -v r="$r" -v row="$row" 'BEGIN { FS = OFS = "\t" }
          $1 == r && $2 == row && $3 == "qcowkit" && $4 == "ok" { $4 = "wrong" } 1' "$TSV" >"$TSV.tmp"
        mv -f -- "$TSV.tmp" "$TSV"
      fi
    fi
    drop_files "$WIMG_Q" "$WIMG_K"
  done

  warm
  # An untimed convert first: on this VM memory that has been free for a
  # while is handed back to the host and is slow to fault in again (see
  # read.sh); the primer leaves freshly freed page-cache memory for the
  # timed runs that follow.
  drop_files "$OUT"; qemu-img convert -f raw -O qcow2 "$SRC" "$OUT" >/dev/null 2>&1 || true
  for row in "${CROWS[@]}"; do
    if [ "$row" = convert-qcow2 ]; then ctools=(qemu-img qcowkit); else ctools=(qemu-img qemu-img-W qcowkit); fi
    for ((k = 0; k < ${#ctools[@]}; k++)); do
      run_convert "$r" "$row" "${ctools[$(((k + r - 1) % ${#ctools[@]}))]}"
    done
  done
done

# ------------------------------------------------------------------- table
python3 - "$TSV" "$CHECKS" "$CODEC" "$WCOUNT" "$CSIZE" <<'EOF' | tee "$W/results/write-$stamp.txt"
import csv, os, statistics as st, sys
tsv, checks, codec, wcount, csize = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
rows, order = {}, []
with open(tsv) as f:
    for d in csv.DictReader(f, delimiter="\t"):
        key = (d["row"], d["tool"])
        if d["row"] not in order:
            order.append(d["row"])
        rows.setdefault(key, {})[d["round"]] = d

def mibs(d):   # MiB/s of one run, None unless it ran and was right
    if not d or d["status"] != "ok":
        return None
    return int(d["bytes"]) / 1048576 / float(d["secs"])

def outsize(d):
    if not d or d["status"] != "ok" or not d["out_bytes"]:
        return None
    return int(d["out_bytes"])

def status(row, tool):
    s = {d["status"] for d in rows.get((row, tool), {}).values()}
    return "WRONG" if "wrong" in s else "FAIL" if "fail" in s else "n/a"

def med(row, tool, fn):
    v = [x for x in (fn(d) for d in rows.get((row, tool), {}).values()) if x]
    return st.median(v) if v else None

def ratio(row, a, b, fn):
    """median and range of the per-round ratio a/b (same round only)"""
    ra, rb = rows.get((row, a), {}), rows.get((row, b), {})
    v = []
    for r in ra:
        x, y = fn(ra[r]), fn(rb.get(r))
        if x and y:
            v.append(x / y)
    if not v:
        return "n/a"
    return "%.2f [%.2f-%.2f]" % (st.median(v), min(v), max(v))

def cell(row, tool, fn, fmt):
    m = med(row, tool, fn)
    return fmt % m if m else status(row, tool)

def line(c, w):
    print("  ".join(str(x).rjust(n) if i else str(x).ljust(n) for i, (x, n) in enumerate(zip(c, w))))

wrows = [r for r in order if r.startswith("alloc-")]
crows = [r for r in order if r.startswith("convert-")]

print()
print("bench -w: %d allocating 4 KiB writes into an empty 4 GiB qcow2, each in a new 64 KiB cluster" % wcount)
print("MiB/s (median of rounds); ratio is per-round qcowkit/qemu-img, median [min-max]; > 1: qcowkit faster")
w = [14, 10, 10, 19]
line(["row", "qemu-img", "qcowkit", "qcowkit/qemu-img"], w)
for r in wrows:
    line([r, cell(r, "qemu-img", mibs, "%.1f"), cell(r, "qcowkit", mibs, "%.1f"),
          ratio(r, "qcowkit", "qemu-img", mibs)], w)

print()
print("convert -f raw -O qcow2 of a %d MiB source, MiB/s of source, wall clock (median of rounds);" % (csize >> 20))
print("ratios are per-round qcowkit/other, median [min-max]; > 1: qcowkit faster; size: qcowkit/qemu-img output size")
w = [14, 10, 10, 10, 19, 19, 6]
line(["row", "qemu-img", "qemu-img-W", "qcowkit", "qcowkit/qemu-img", "qcowkit/qemu-img-W", "size"], w)
for r in crows:
    wcell = cell(r, "qemu-img-W", mibs, "%.1f") if (r, "qemu-img-W") in rows else "-"
    wrat = ratio(r, "qcowkit", "qemu-img-W", mibs) if (r, "qemu-img-W") in rows else "-"
    sq, sk = med(r, "qemu-img", outsize), med(r, "qcowkit", outsize)
    line([r, cell(r, "qemu-img", mibs, "%.1f"), wcell, cell(r, "qcowkit", mibs, "%.1f"),
          ratio(r, "qcowkit", "qemu-img", mibs), wrat, "%.3f" % (sk / sq) if sq and sk else "n/a"], w)
sizes = []
for r in crows:
    sq = med(r, "qemu-img", outsize)
    if sq:
        sizes.append("%s %.0f%%" % (r[len("convert-"):], 100.0 * sq / csize))
if sizes:
    print("qemu-img output size, share of the source: " + ", ".join(sizes))

if os.path.exists(codec) and os.path.getsize(codec):
    print()
    first = open(codec).readline().split("\t")
    print("one-core codec rate (python zlib, wbits -12), non-zero 64 KiB clusters of the first %d MiB of the source:"
          % (int(first[1]) >> 20))
    for l in open(codec):
        name, sample, nzb, secs, out = (l.rstrip("\n").split("\t") + [""] * 5)[:5]
        if not secs:
            print("  %-5s not measured (python3 module zstandard not installed)" % name)
            continue
        sample, nzb, secs, out = int(sample), int(nzb), float(secs), int(out)
        print("  %-5s %6.1f MiB/s of non-zero input (%d of %d MiB non-zero; output %.0f%% of it);"
              " convert limit %.1f MiB/s of source on one core, %.1f on two"
              % (name, nzb / 1048576 / secs, nzb >> 20, sample >> 20, 100.0 * out / nzb,
                 sample / 1048576 / secs, 2 * sample / 1048576 / secs))

if os.path.getsize(checks):
    print()
    print("checks of the first qcowkit result of each row:")
    for l in open(checks):
        what, res = l.rstrip("\n").split("\t", 1)
        print("  %-74s %s" % (what, res))

walls = sorted({d["tool"] for v in rows.values() for d in v.values()
                if d["status"] == "ok" and d["timing"] == "wall" and d["row"].startswith("alloc-")})
print()
print("bench -w is timed by each tool's own 'Run completed in' time (no process start or image open); convert by")
print("the wall clock of the whole command. qemu-img-W is qemu-img convert -W (out-of-order writes, parallel")
print("compression); qcowkit runs with its defaults.")
if walls:
    print("bench -w timed by wall clock (no own elapsed time printed): " + ", ".join(walls))
EOF

if [ $failures -gt 0 ]; then
  note "$failures qcowkit probe(s)/run(s)/check(s) failed or are unsupported; see FAILED above"
  exit 1
fi
