#!/usr/bin/env bash
# bench/read.sh -- read-path benchmark: qcowkit vs qemu-img vs fio.
#
# Usage: bench/read.sh [--clean | --clean-only] [QCOWKIT_BINARY] [ROUNDS]
#   QCOWKIT_BINARY  default: <repo>/build/qcowkit
#   ROUNDS          default: 3 (every round runs every tool on every row)
#   --clean         remove the work directory when the script exits
#   --clean-only    remove the work directory and exit (no benchmark)
#
# Environment:
#   BENCH_DIR           parent of the work directory (default /tmp); the work
#                       directory is $BENCH_DIR/qkbench and is reused between
#                       runs when it holds a complete image of the right size
#   BENCH_SIZE          image size, e.g. 4G (default), 256M; multiple of 1 MiB
#   BENCH_COUNT_4K      request count for the 4 KiB rows (default: calibrated so
#                       one qemu-img run takes about BENCH_TARGET_SECS)
#   BENCH_TARGET_SECS   calibration target for the 4 KiB rows (default 2)
#   BENCH_TIMING        tool (default): each tool's own elapsed time, wall
#                       clock if it prints none; wall: wall clock for every run
#   BENCH_CONVERT_SYNC  1: include `sync FILE` of the output in convert times
#   BENCH_CONVERT_REPS  convert pairs (qemu-img + qcowkit) per round (default
#                       3; 0 skips convert)
#
# The machine is noisy, so the only figures to trust are ratios of runs made
# in the same round: within one round every tool runs once per row, back to
# back, in an order rotated from round to round. See bench/README.md.
#
# Exit status: 0 all ran; 1 setup error or a qcowkit run failed / is
# unsupported (the table is still printed, with n/a or FAIL in its cells).

set -euo pipefail
export LC_ALL=C

prog=read.sh
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

W=${BENCH_DIR:-/tmp}/qkbench
RAW=$W/data.raw
QCOW=$W/data.qcow2
STAMP=$W/ready          # written last; holds the size of a complete image pair
OUT=$W/convert-out.raw  # convert destination, deleted after every run
TMP=$W/tmp

remove_workdir() {
  # The path always ends in /qkbench; refuse anything odd all the same.
  [ "$(basename "$W")" = qkbench ] || die "refusing to remove '$W'"
  if [ -d "$W" ]; then rm -rf -- "$W"; note "removed $W"; fi
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
SIZE=$(parse_size "${BENCH_SIZE:-4G}") || die "BENCH_SIZE '${BENCH_SIZE}' is not a size like 4G or 256M"
[ $((SIZE % (1 << 20))) -eq 0 ] || die "BENCH_SIZE must be a multiple of 1 MiB"
[ "$SIZE" -ge $((16 << 20)) ]   || die "BENCH_SIZE must be at least 16M"
TARGET_SECS=${BENCH_TARGET_SECS:-2}
[[ $TARGET_SECS =~ ^[0-9]+([.][0-9]+)?$ ]] || die "BENCH_TARGET_SECS must be a number"
TIMING=${BENCH_TIMING:-tool}
case $TIMING in tool|wall) ;; *) die "BENCH_TIMING must be 'tool' or 'wall'" ;; esac
CONVERT_SYNC=${BENCH_CONVERT_SYNC:-0}
CONVERT_REPS=${BENCH_CONVERT_REPS:-3}
[[ $CONVERT_REPS =~ ^[0-9]+$ ]] || die "BENCH_CONVERT_REPS must be a non-negative integer"
gib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1073741824 }'; }
human() { awk -v b="$1" 'BEGIN { if (b >= 1073741824) printf "%.1f GiB", b / 1073741824
                                 else printf "%d MiB", b / 1048576 }'; }

# ------------------------------------------------------------------- tools
for t in qemu-img fio python3 awk cmp df; do
  command -v "$t" >/dev/null 2>&1 || die "'$t' is required but not installed"
done
case $QCOWKIT in /*) ;; *) QCOWKIT=$PWD/$QCOWKIT ;; esac
[ -e "$QCOWKIT" ] || die "qcowkit binary not found: $QCOWKIT (build it first, or pass its path as the first argument)"
[ -x "$QCOWKIT" ] || die "qcowkit binary is not executable: $QCOWKIT"

# ------------------------------------------------------------ space check
have_pair=0
if [ -f "$STAMP" ] && [ -f "$RAW" ] && [ -f "$QCOW" ] && [ "$(cat "$STAMP")" = "$SIZE" ]; then
  have_pair=1
fi
# Needed: the raw file + the qcow2 (a bit larger: metadata) unless reusable,
# plus the convert destination; 5% + 64 MiB of slack.
need=$SIZE
[ $have_pair = 1 ] || need=$((need + 2 * SIZE))
need=$((need + need / 20 + (64 << 20)))
probe_dir=$W
while [ ! -d "$probe_dir" ]; do probe_dir=$(dirname "$probe_dir"); done
free_b=$(( $(df -Pk "$probe_dir" | awk 'NR == 2 { print $4 }') * 1024 ))
echo "disk: $(gib "$free_b") GiB free on $(df -P "$probe_dir" | awk 'NR == 2 { print $6 }') ($probe_dir), $(gib "$need") GiB needed"
if [ "$free_b" -lt "$need" ]; then
  die "not enough free disk space for a $(human "$SIZE") benchmark: need $(gib "$need") GiB, have $(gib "$free_b") GiB (set BENCH_DIR to a bigger file system or BENCH_SIZE lower)"
fi
avail_kb=$(awk '/^MemAvailable:/ { print $2 }' /proc/meminfo)
if [ -n "$avail_kb" ] && [ $((avail_kb * 1024)) -lt $((3 * SIZE)) ]; then
  note "warning: only $(gib $((avail_kb * 1024))) GiB of memory available; the raw file, the qcow2 and"
  note "         the convert output ($(gib $((3 * SIZE))) GiB) will not all stay in the page cache,"
  note "         so part of what is measured is the disk"
fi

mkdir -p "$W" "$TMP" "$W/results"
cleanup() {
  rm -f -- "$OUT" "$RAW.tmp" "$QCOW.tmp"
  rm -rf -- "$TMP"
  if [ $clean_after = 1 ]; then remove_workdir; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ------------------------------------------------------------ the images
if [ $have_pair = 1 ]; then
  echo "images: reusing $QCOW and $RAW ($(human "$SIZE"))"
else
  rm -f -- "$STAMP" "$RAW" "$QCOW"
  echo "images: writing $(human "$SIZE") of non-zero data to $RAW ..."
  # 16 MiB of random bytes, repeated, with the first 8 bytes of every 64 KiB
  # cluster replaced by its offset: no zero cluster, and no two clusters alike.
  python3 - "$RAW.tmp" "$SIZE" <<'EOF' || die "could not write $RAW.tmp"
import os, struct, sys
path, size = sys.argv[1], int(sys.argv[2])
chunk, cl = 16 << 20, 64 << 10
base = bytearray(os.urandom(chunk))
with open(path, "wb") as f:
    off = 0
    while off < size:
        n = min(chunk, size - off)
        buf = base[:n]
        for c in range(0, n, cl):
            struct.pack_into("<Q", buf, c, off + c)
        f.write(buf)
        off += n
EOF
  echo "images: converting to qcow2 (64 KiB clusters) ..."
  qemu-img convert -f raw -O qcow2 -o cluster_size=65536 "$RAW.tmp" "$QCOW.tmp" \
    || die "qemu-img convert to qcow2 failed"
  # Every guest cluster must be a data cluster (no zero or unallocated ones).
  qemu-img map -f qcow2 --output=json "$QCOW.tmp" | python3 -c '
import json, sys
size = int(sys.argv[1]); m = json.load(sys.stdin)
bad = [e for e in m if not e["data"] or e.get("zero")]
got = sum(e["length"] for e in m if e["data"] and not e.get("zero"))
if bad or got != size:
    sys.exit("qcow2 is not fully allocated: %d of %d bytes are data" % (got, size))
' "$SIZE" || die "the qcow2 image is not fully allocated"
  mv -f -- "$RAW.tmp" "$RAW"
  mv -f -- "$QCOW.tmp" "$QCOW"
  echo "$SIZE" >"$STAMP"
fi

warm() { cat -- "$RAW" "$QCOW" >/dev/null; }
echo "page cache: warming ..."
warm

# ------------------------------------------------------------ measurement
fio_file=${RAW//:/\\:}   # fio splits file names on ':'

# 4 KiB request count: about TARGET_SECS for qemu-img, sequential, depth 1.
if [ -n "${BENCH_COUNT_4K:-}" ]; then
  [[ $BENCH_COUNT_4K =~ ^[1-9][0-9]*$ ]] || die "BENCH_COUNT_4K must be a positive integer"
  C4K=$BENCH_COUNT_4K
else
  cal=$((SIZE / 4096)); [ $cal -le 200000 ] || cal=200000
  t0=$EPOCHREALTIME
  qemu-img bench -f qcow2 -t writeback -c $cal -d 1 -s 4096 -S 4096 "$QCOW" >/dev/null \
    || die "calibration run of qemu-img bench failed"
  t1=$EPOCHREALTIME
  C4K=$(awk -v c=$cal -v t0="$t0" -v t1="$t1" -v target="$TARGET_SECS" 'BEGIN {
          n = c / (t1 - t0) * target; n = int(n / 1000) * 1000
          if (n < 10000) n = 10000; print n }')
fi
C64K=$((SIZE / 65536))   # the whole image, once

# name size depth mode count
ROWS=(
  "seq-64k-d1  65536 1  seq  $C64K"
  "seq-64k-d16 65536 16 seq  $C64K"
  "seq-4k-d1   4096  1  seq  $C4K"
  "seq-4k-d16  4096  16 seq  $C4K"
  "rand-4k-d1  4096  1  rand $C4K"
)
TOOLS=(qemu-img qcowkit qcowkit-raw fio-psync-raw)

stamp=$(date +%Y%m%d-%H%M%S)
TSV=$W/results/read-$stamp.tsv
printf 'round\trow\ttool\tstatus\tsecs\twall_secs\tbytes\tops\ttiming\n' >"$TSV"

declare -A broken=()   # "tool" or "tool/row" -> reason; such runs are skipped
failures=0

# bench_cmd TOOL SIZE DEPTH MODE COUNT: the command line, in the array CMD.
bench_cmd() {
  local tool=$1 bs=$2 depth=$3 mode=$4 count=$5 seqstep=() rnd=()
  if [ "$mode" = seq ]; then seqstep=(-S "$bs"); else rnd=(--random); fi
  case $tool in
    qemu-img)    CMD=(qemu-img bench -f qcow2 -t writeback -c "$count" -d "$depth" -s "$bs" "${seqstep[@]}" "$QCOW") ;;
    qcowkit)     CMD=("$QCOWKIT" bench -f qcow2 -t writeback -c "$count" -d "$depth" -s "$bs" "${seqstep[@]}" "${rnd[@]}" "$QCOW") ;;
    qcowkit-raw) CMD=("$QCOWKIT" bench -f raw -t writeback -c "$count" -d "$depth" -s "$bs" "${seqstep[@]}" "${rnd[@]}" "$RAW") ;;
    fio-psync-raw)
      # The machine's limit: one thread of pread() from the page cache, same
      # block size and pattern. psync has no queue, so DEPTH does not apply.
      local rw=read; [ "$mode" = rand ] && rw=randread
      CMD=(fio --name=limit --filename="$fio_file" --readonly --ioengine=psync
           --direct=0 --invalidate=0 --numjobs=1 --rw="$rw" --bs="$bs"
           --size="$SIZE" --io_size=$((count * bs)) --output-format=json
           --output="$TMP/fio.json") ;;
  esac
}

show_failure() {   # show_failure WHAT RC OUTPUT_FILE
  note "FAILED ($1), exit status $2: ${CMD[*]}"
  sed 's/^/    | /' "$3" | tail -n 15 >&2
}

# run_bench ROUND ROWSPEC TOOL: one timed run, appended to $TSV.
run_bench() {
  local round=$1 tool=$3 name bs depth mode count
  read -r name bs depth mode count <<<"$2"
  local bytes=$((count * bs))
  if [ "$tool" = qemu-img ] && [ "$mode" = rand ]; then
    printf '%s\t%s\t%s\tna\t\t\t%s\t%s\t\n' "$round" "$name" "$tool" "$bytes" "$count" >>"$TSV"
    return
  fi
  if [ -n "${broken[$tool]:-}${broken[$tool/$name]:-}" ]; then
    printf '%s\t%s\t%s\tfail\t\t\t%s\t%s\t\n' "$round" "$name" "$tool" "$bytes" "$count" >>"$TSV"
    return
  fi
  bench_cmd "$tool" "$bs" "$depth" "$mode" "$count"
  local out=$TMP/out.txt rc=0 t0 t1 wall secs="" src
  rm -f -- "$TMP/fio.json"
  t0=$EPOCHREALTIME
  "${CMD[@]}" >"$out" 2>&1 || rc=$?
  t1=$EPOCHREALTIME
  wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.6f", b - a }')
  if [ $rc -ne 0 ]; then
    show_failure "$tool, $name, round $round" $rc "$out"
    case $tool in
      qcowkit*) broken[$tool/$name]="exit $rc"; failures=$((failures + 1))
                printf '%s\t%s\t%s\tfail\t\t%s\t%s\t%s\t\n' "$round" "$name" "$tool" "$wall" "$bytes" "$count" >>"$TSV"
                return ;;
      *)        die "the reference tool $tool failed; the machine or the setup is broken" ;;
    esac
  fi
  if [ "$tool" = fio-psync-raw ]; then
    # fio's own runtime (ms) and byte count.
    read -r secs bytes count < <(python3 -c '
import json, sys
r = json.load(open(sys.argv[1]))["jobs"][0]["read"]
print(r["runtime"] / 1000.0, r["io_bytes"], r["total_ios"])' "$TMP/fio.json") \
      || die "could not parse fio output $TMP/fio.json"
  else
    secs=$(sed -n 's/^Run completed in \([0-9.]*\) seconds.*/\1/p' "$out" | tail -n 1)
  fi
  src=tool
  if [ "$TIMING" = wall ] || [ -z "$secs" ] || awk -v s="$secs" 'BEGIN { exit !(s <= 0) }'; then
    secs=$wall; src=wall
  fi
  printf '%s\t%s\t%s\tok\t%s\t%s\t%s\t%s\t%s\n' "$round" "$name" "$tool" "$secs" "$wall" "$bytes" "$count" "$src" >>"$TSV"
  printf '  %-12s %-14s %9.3f s  %9.1f MiB/s\n' "$name" "$tool" "$secs" \
    "$(awk -v b="$bytes" -v s="$secs" 'BEGIN { print b / 1048576 / s }')" >&2
}

# run_convert ROUND TOOL: one timed `convert -O raw` of the qcow2.
run_convert() {
  local round=$1 tool=$2 out=$TMP/out.txt rc=0 t0 t1 secs
  if [ -n "${broken[$tool/convert]:-}${broken[$tool]:-}" ] && [ "$tool" != qemu-img ]; then
    printf '%s\tconvert\t%s\tfail\t\t\t%s\t1\t\n' "$round" "$tool" "$SIZE" >>"$TSV"
    return
  fi
  case $tool in
    qemu-img) CMD=(qemu-img convert -f qcow2 -O raw "$QCOW" "$OUT") ;;
    qcowkit)  CMD=("$QCOWKIT" convert -f qcow2 -O raw "$QCOW" "$OUT") ;;
  esac
  rm -f -- "$OUT"; sync   # start from no dirty data, outside the timing
  t0=$EPOCHREALTIME
  "${CMD[@]}" >"$out" 2>&1 || rc=$?
  if [ $rc -eq 0 ] && [ "$CONVERT_SYNC" = 1 ]; then sync -- "$OUT" || rc=$?; fi
  t1=$EPOCHREALTIME
  secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.6f", b - a }')
  if [ $rc -ne 0 ]; then
    show_failure "$tool convert, round $round" $rc "$out"
    [ "$tool" = qemu-img ] && die "qemu-img convert failed; the machine or the setup is broken"
    broken[$tool/convert]="exit $rc"; failures=$((failures + 1))
    printf '%s\tconvert\t%s\tfail\t\t%s\t%s\t1\t\n' "$round" "$tool" "$secs" "$SIZE" >>"$TSV"
    rm -f -- "$OUT"; return
  fi
  # A wrong result makes the time meaningless: check qcowkit's output once.
  if [ "$tool" = qcowkit ] && [ -z "${convert_checked:-}" ]; then
    convert_checked=1
    if ! cmp -s -- "$RAW" "$OUT"; then
      note "FAILED: qcowkit convert -O raw output differs from $RAW"
      broken[$tool/convert]=wrong; failures=$((failures + 1))
      printf '%s\tconvert\t%s\tfail\t\t%s\t%s\t1\t\n' "$round" "$tool" "$secs" "$SIZE" >>"$TSV"
      rm -f -- "$OUT"; return
    fi
  fi
  printf '%s\tconvert\t%s\tok\t%s\t%s\t%s\t1\twall\n' "$round" "$tool" "$secs" "$secs" "$SIZE" >>"$TSV"
  printf '  %-12s %-14s %9.3f s\n' convert "$tool" "$secs" >&2
  rm -f -- "$OUT"
}

# ----------------------------------------------- can this qcowkit do it?
probe() {   # probe KEY CMD...: a 1-request run; on failure mark KEY broken.
  local key=$1 rc=0; shift
  CMD=("$@")
  "${CMD[@]}" >"$TMP/probe.txt" 2>&1 || rc=$?
  if [ $rc -ne 0 ]; then
    show_failure "probe: $key" $rc "$TMP/probe.txt"
    broken[$key]="probe failed"
    failures=$((failures + 1))
  fi
}
probe qcowkit     "$QCOWKIT" bench -f qcow2 -t writeback -c 1 -s 4096 "$QCOW"
probe qcowkit-raw "$QCOWKIT" bench -f raw -t writeback -c 1 -s 4096 "$RAW"
if [ -z "${broken[qcowkit]:-}" ]; then
  probe qcowkit/rand-4k-d1 "$QCOWKIT" bench -f qcow2 -t writeback -c 1 -s 4096 --random "$QCOW"
fi
if [ -z "${broken[qcowkit-raw]:-}" ]; then
  probe qcowkit-raw/rand-4k-d1 "$QCOWKIT" bench -f raw -t writeback -c 1 -s 4096 --random "$RAW"
fi
qk_version=$("$QCOWKIT" --version 2>/dev/null | head -n 1) || qk_version="(no --version)"

# ------------------------------------------------------------------ header
{
  echo "# qcowkit read benchmark, $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "# host: $(uname -srm), $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "# qcowkit: $QCOWKIT ${qk_version:+($qk_version)}"
  echo "# $(qemu-img --version | head -n 1); $(fio --version)"
  echo "# image: $(human "$SIZE") qcow2, 64 KiB clusters, all data; raw copy alongside; page cache warm"
  echo "# counts: 64 KiB rows $C64K requests (whole image), 4 KiB rows $C4K requests; $ROUNDS rounds; timing: $TIMING"
  echo "# convert: $CONVERT_REPS pairs per round, wall clock$([ "$CONVERT_SYNC" = 1 ] && echo ", including sync of the output")"
  echo "# results: $TSV (every run), read-$stamp.txt (this table)"
} | tee "$W/results/read-$stamp.header" >&2

# ------------------------------------------------------------------ rounds
for ((r = 1; r <= ROUNDS; r++)); do
  note "round $r/$ROUNDS"
  warm
  for row in "${ROWS[@]}"; do
    # Rotate the tool order each round so no tool always runs first or last.
    for ((k = 0; k < ${#TOOLS[@]}; k++)); do
      run_bench "$r" "$row" "${TOOLS[$(((k + r - 1) % ${#TOOLS[@]}))]}"
    done
  done
  # An untimed convert first: on this VM memory that has been free for a
  # while is handed back to the host and is slow to fault in again, so the
  # first convert of a round would pay for it. The primer leaves freshly
  # freed page-cache memory for the timed runs that follow straight after.
  if [ "$CONVERT_REPS" -gt 0 ]; then
    rm -f -- "$OUT"; qemu-img convert -f qcow2 -O raw "$QCOW" "$OUT" >/dev/null 2>&1 || true
  fi
  # CONVERT_REPS back-to-back pairs, order alternating; each pair is one
  # sample of the ratio (round.rep in the results file).
  for ((k = 1; k <= CONVERT_REPS; k++)); do
    if [ $(((r + k) % 2)) = 0 ]; then conv=(qemu-img qcowkit); else conv=(qcowkit qemu-img); fi
    for t in "${conv[@]}"; do run_convert "$r.$k" "$t"; done
  done
done

# ------------------------------------------------------------------- table
python3 - "$TSV" <<'EOF' | tee "$W/results/read-$stamp.txt"
import csv, statistics as st, sys
rows, order = {}, []
with open(sys.argv[1]) as f:
    for d in csv.DictReader(f, delimiter="\t"):
        key = (d["row"], d["tool"])
        if d["row"] not in order:
            order.append(d["row"])
        rows.setdefault(key, {})[d["round"]] = d

def mibs(d):   # MiB/s of one run, None unless it ran
    if not d or d["status"] != "ok":
        return None
    return int(d["bytes"]) / 1048576 / float(d["secs"])

def opss(d):
    if not d or d["status"] != "ok":
        return None
    return int(d["ops"]) / float(d["secs"])

def status(row, tool):
    s = {d["status"] for d in rows.get((row, tool), {}).values()}
    return "FAIL" if "fail" in s else "n/a"

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

tools = ["qemu-img", "qcowkit", "qcowkit-raw", "fio-psync-raw"]
bench = [r for r in order if r != "convert"]
w = [12, 10, 10, 12, 14, 19, 19]
line = lambda c: print("  ".join(str(x).rjust(n) if i else str(x).ljust(n) for i, (x, n) in enumerate(zip(c, w))))

print()
print("Throughput, MiB/s (median of rounds); ratios are per-round qcowkit/other, median [min-max]; > 1: qcowkit faster")
line(["row", "qemu-img", "qcowkit", "qcowkit-raw", "fio-psync-raw", "qcowkit/qemu-img", "qcowkit/fio-psync"])
for r in bench:
    line([r] + [cell(r, t, mibs, "%.1f") for t in tools]
         + [ratio(r, "qcowkit", "qemu-img", mibs), ratio(r, "qcowkit", "fio-psync-raw", mibs)])

print()
print("Operations, kops/s (median of rounds); qcowkit/qcowkit-raw: cost of the qcow2 layer, 1 = none")
line(["row", "qemu-img", "qcowkit", "qcowkit-raw", "fio-psync-raw", "qcowkit/qcowkit-raw", ""])
for r in bench:
    line([r] + [cell(r, t, lambda d: (opss(d) or 0) / 1000, "%.1f") for t in tools]
         + [ratio(r, "qcowkit", "qcowkit-raw", mibs), ""])

if "convert" in order:
    print()
    print("convert -O raw of the qcow2, seconds (median of all runs); ratio is qcowkit/qemu-img time of back-to-back pairs; < 1: qcowkit faster")
    line(["row", "qemu-img", "qcowkit", "", "", "qcowkit/qemu-img", ""])
    secs = lambda d: float(d["secs"]) if d and d["status"] == "ok" else None
    line(["convert", cell("convert", "qemu-img", secs, "%.2f s"), cell("convert", "qcowkit", secs, "%.2f s"),
          "", "", ratio("convert", "qcowkit", "qemu-img", secs), ""])

walls = sorted({d["tool"] for v in rows.values() for d in v.values()
                if d["status"] == "ok" and d["timing"] == "wall" and d["row"] != "convert"})
print()
print("fio-psync-raw is the machine's limit: fio, ioengine=psync, ONE thread, page cache, same block size and")
print("pattern (sequential or random), reading the raw file; psync has no queue, so in the d16 rows it is the same")
print("single-threaded run as in d1. qemu-img has no random mode: its cell in rand rows is n/a.")
if walls:
    print("Timed by wall clock (no own elapsed time printed, or BENCH_TIMING=wall): " + ", ".join(walls)
          + "; that includes process start and image open.")
EOF

if [ $failures -gt 0 ]; then
  note "$failures qcowkit probe(s)/run(s) failed or are unsupported; see FAILED above"
  exit 1
fi
