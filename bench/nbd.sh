#!/usr/bin/env bash
# bench/nbd.sh -- NBD server benchmark: qcowkit serve vs qemu-nbd, side by
# side, fio's nbd engine over a Unix socket, on the same qcow2 image.
#
# Usage: bench/nbd.sh [QCOWKIT_BINARY] [ROUNDS]
#   QCOWKIT_BINARY  default: <repo>/build/qcowkit
#   ROUNDS          default: 3 (every round runs every server on every row,
#                   the order of the servers alternating from round to round)
#
# Environment:
#   BENCH_DIR      parent of the work directory (default /tmp); the work
#                  directory $BENCH_DIR/qknbdbench is reused between runs
#   BENCH_SIZE     image size (default 1G; M or G suffix)
#   BENCH_RUNTIME  seconds per fio run (default 5)
#   BENCH_NBDKIT   1 (default when nbdkit is installed): also run nbdkit's
#                  file plugin on the raw copy of the image, for reference
#
# Rows: random 4 KiB reads and writes at queue depth 1 and 16, sequential
# 1 MiB reads at depth 4 (fio --rw=... --bs=... --iodepth=...). The image is
# fully allocated (every cluster data), all in the page cache, so what is
# measured is the servers' cost per request. Writes overwrite allocated
# clusters. Each fio run gets a server of its own, started fresh.
# Output: IOPS (MiB/s for the sequential row), medians over the rounds, and
# the per-round ratio qcowkit/qemu-nbd as median [min-max]. See
# bench/README.md.

set -euo pipefail
export LC_ALL=C
prog=nbd.sh
die()  { echo "$prog: error: $*" >&2; exit 1; }
note() { echo "$prog: $*" >&2; }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
case ${1:-} in -h|--help) sed -n '2,/^$/{s/^# \{0,1\}//;p}' "$0"; exit 0 ;; esac
QCOWKIT=${1:-$repo/build/qcowkit}
ROUNDS=${2:-3}
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer"
case $QCOWKIT in /*) ;; *) QCOWKIT=$PWD/$QCOWKIT ;; esac
[ -x "$QCOWKIT" ] || die "qcowkit binary not found: $QCOWKIT"
for t in qemu-img qemu-nbd fio python3; do
  command -v "$t" >/dev/null 2>&1 || die "'$t' is required but not installed"
done
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd engine"
RUNTIME=${BENCH_RUNTIME:-5}
NBDKIT=${BENCH_NBDKIT:-}
if [ -z "$NBDKIT" ]; then
  command -v nbdkit >/dev/null 2>&1 && NBDKIT=1 || NBDKIT=0
fi
SIZE=${BENCH_SIZE:-1G}
[[ $SIZE =~ ^[0-9]+[MG]$ ]] || die "BENCH_SIZE must be like 512M or 1G"

W=${BENCH_DIR:-/tmp}/qknbdbench
QCOW=$W/data.qcow2
RAW=$W/data.raw
SOCK=$W/nbd.sock
mkdir -p "$W"
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -f "$SOCK" "$W/bench.qcow2"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ ! -f "$QCOW" ] || [ "$(cat "$W/ready" 2>/dev/null)" != "$SIZE" ]; then
  echo "images: writing $SIZE of random data ..."
  rm -f "$W/ready"
  qemu-img create -q -f raw "$RAW" "$SIZE"
  python3 - "$RAW" <<'EOF'
import os, sys
path = sys.argv[1]
size = os.path.getsize(path)
chunk = os.urandom(16 << 20)
with open(path, "r+b") as f:
    for off in range(0, size, len(chunk)):
        f.write(chunk[: min(len(chunk), size - off)])
EOF
  qemu-img convert -f raw -O qcow2 "$RAW" "$QCOW"
  echo "$SIZE" >"$W/ready"
fi

# Every run serves bench.qcow2, a reflink
# or plain copy made once, so the write rows leave data.qcow2 alone.
cp --reflink=auto "$QCOW" "$W/bench.qcow2"
cat "$W/bench.qcow2" "$RAW" >/dev/null

start() {   # start SERVER
  rm -f "$SOCK"
  case $1 in
  qcowkit)  "$QCOWKIT" serve -k "$SOCK" -t -f qcow2 "$W/bench.qcow2" & ;;
  qemu-nbd) qemu-nbd -k "$SOCK" -t -f qcow2 "$W/bench.qcow2" & ;;
  nbdkit)   nbdkit -f -U "$SOCK" file "$RAW" & ;;
  esac
  pid=$!
  local i
  for i in $(seq 200); do [ -S "$SOCK" ] && return 0; sleep 0.05; done
  die "$1 did not start"
}
stop() { kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true; pid=; }

# run SERVER RW BS DEPTH: prints IOPS, or MiB/s for sequential reads
run() {
  start "$1"
  fio --name=bench --ioengine=nbd --uri="nbd+unix:///?socket=$SOCK" --rw="$2" --bs="$3" \
    --iodepth="$4" --size="$SIZE" --time_based=1 --runtime="$RUNTIME" --ramp_time=1 \
    --randrepeat=0 --output-format=json >"$W/fio.json" 2>"$W/fio.err" ||
    { stop; die "fio against $1 failed: $(tail -3 "$W/fio.err")"; }
  stop
  python3 - "$W/fio.json" "$2" <<'EOF'
import json, sys
t = open(sys.argv[1]).read()
j = json.loads(t[t.index("{"):])["jobs"][0]   # the engine prints a line first
d = j["write"] if "write" in sys.argv[2] else j["read"]
print("%.1f" % (d["bw_bytes"] / 1048576) if sys.argv[2] == "read" else "%.0f" % d["iops"])
EOF
}

rows=("randread 4k 1" "randread 4k 16" "randwrite 4k 1" "randwrite 4k 16" "read 1M 4")
names=(rand-read-4k-d1 rand-read-4k-d16 rand-write-4k-d1 rand-write-4k-d16 seq-read-1M-d4)
servers=(qemu-nbd qcowkit)
[ "$NBDKIT" = 1 ] && servers+=(nbdkit)
res=$W/results.tsv
: >"$res"
echo "fio nbd engine, Unix socket, ${RUNTIME}s per run, $ROUNDS rounds, image $SIZE"
for r in $(seq "$ROUNDS"); do
  for i in "${!rows[@]}"; do
    read -r rw bs qd <<<"${rows[$i]}"
    order=("${servers[@]}")
    if [ $(( (r + i) % 2 )) -eq 0 ]; then
      order=(qcowkit qemu-nbd)
      [ "$NBDKIT" = 1 ] && order+=(nbdkit)
    fi
    for s in "${order[@]}"; do
      v=$(run "$s" "$rw" "$bs" "$qd")
      printf '%s\t%s\t%s\t%s\n' "$r" "${names[$i]}" "$s" "$v" >>"$res"
      note "round $r ${names[$i]} $s: $v"
    done
  done
done

python3 - "$res" "$NBDKIT" "${names[@]}" <<'EOF'
import statistics as st, sys
res, nbdkit, names = sys.argv[1], sys.argv[2] == "1", sys.argv[3:]
v = {}
for line in open(res):
    r, row, s, x = line.split("\t")
    v.setdefault((row, s), {})[r] = float(x)
hdr = "%-20s %12s %12s %22s" % ("row", "qemu-nbd", "qcowkit", "qcowkit/qemu-nbd")
if nbdkit:
    hdr += " %14s %18s" % ("nbdkit-raw", "qcowkit/nbdkit")
print("IOPS (seq: MiB/s), medians of rounds; ratios per round: median [min-max]; > 1: qcowkit faster")
print(hdr)
for row in names:
    q, k = v[(row, "qemu-nbd")], v[(row, "qcowkit")]
    rat = [k[r] / q[r] for r in q if q[r] > 0]
    line = "%-20s %12.1f %12.1f %10.2f [%.2f-%.2f]" % (
        row, st.median(q.values()), st.median(k.values()), st.median(rat), min(rat), max(rat))
    if nbdkit:
        n = v[(row, "nbdkit")]
        rn = [k[r] / n[r] for r in n if n[r] > 0]
        line += " %14.1f %9.2f [%.2f-%.2f]" % (st.median(n.values()), st.median(rn), min(rn), max(rn))
    print(line)
EOF
