#!/usr/bin/env bash
# bench/direct.sh -- the NBD server on cold data with the page cache
# bypassed: `qcowkit serve --cache=none` against `qemu-nbd --cache=none
# --aio=io_uring`, and fio with io_uring and O_DIRECT on the raw file (the
# device's limit), side by side.
#
# Usage: bench/direct.sh [QCOWKIT_BINARY] [ROUNDS]
#   QCOWKIT_BINARY  default: <repo>/build/qcowkit
#   ROUNDS          default: 3
#   BENCH_DIR       parent of the work directory (default /tmp; qkdbench)
#   BENCH_RUNTIME   seconds per fio run (default 10)
#
# The image: 4 GiB qcow2, every cluster data (qemu-img convert of a raw
# file of random blocks), and that raw file. Rows, each with the page cache
# dropped before each run:
#   nbd    random 4 KiB reads at depth 16 (fio's nbd engine over a Unix
#          socket; io_uring engine for the raw file)
#   bench  in-process 4 KiB reads at depth 16, BENCH_COUNT (default
#          200000) of them about 768 MiB apart (-S 805318656, the pattern
#          qemu-img bench can make): `qcowkit bench -t none` against
#          `qemu-img bench -t none -i io_uring`
# Prints IOPS and, per round, qcowkit / qemu and qcowkit / device limit.
set -euo pipefail
export LC_ALL=C
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
case ${1:-} in -h|--help) sed -n '2,/^set -e/{/^set -e/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;; esac
QCOWKIT=${1:-$repo/build/qcowkit}
ROUNDS=${2:-3}
RUNTIME=${BENCH_RUNTIME:-10}
W=${BENCH_DIR:-/tmp}/qkdbench
[ -x "$QCOWKIT" ] || { echo "direct.sh: no qcowkit binary at $QCOWKIT" >&2; exit 1; }
fio --enghelp=nbd >/dev/null 2>&1 || { echo "direct.sh: this fio has no nbd engine" >&2; exit 1; }
mkdir -p "$W"
if [ ! -f "$W/data.qcow2" ]; then
  python3 - "$W/data.raw" <<'EOF'
import os, sys
blk = os.urandom(1 << 20)
with open(sys.argv[1], "wb") as f:
    for i in range(4096):
        f.write(blk[i % 997:] + blk[:i % 997])
EOF
  qemu-img convert -f raw -O qcow2 "$W/data.raw" "$W/data.qcow2"
  sync
fi
SOCK=$W/nbd.sock
pid=

drop() { sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true; }
stop() { [ -n "$pid" ] && { kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true; }; pid=; rm -f "$SOCK"; }
trap stop EXIT
start() {
  rm -f "$SOCK"
  case $1 in
    qcowkit) "$QCOWKIT" serve -t -f qcow2 --cache=none -k "$SOCK" "$W/data.qcow2" >/dev/null 2>&1 & ;;
    qemu-nbd) qemu-nbd -t -f qcow2 --cache=none --aio=io_uring -k "$SOCK" "$W/data.qcow2" >/dev/null 2>&1 & ;;
  esac
  pid=$!
  for _ in $(seq 100); do [ -S "$SOCK" ] && return; sleep 0.05; done
  echo "direct.sh: $1 did not start" >&2
  exit 1
}

# iops JSON: the read IOPS fio reports.
iops() {
  python3 -c 'import json,sys; t=open(sys.argv[1]).read(); print("%.0f" % json.loads(t[t.index("{"):])["jobs"][0]["read"]["iops"])' "$1"
}

# run WHAT: one fio run; prints IOPS.
run() {
  drop
  if [ "$1" = device ]; then
    fio --name=dev --ioengine=io_uring --direct=1 --filename="$W/data.raw" --rw=randread \
      --bs=4k --iodepth=16 --time_based=1 --runtime="$RUNTIME" --ramp_time=1 \
      --output-format=json >"$W/fio.json" 2>"$W/fio.err"
  else
    start "$1"
    fio --name=bench --ioengine=nbd --uri="nbd+unix:///?socket=$SOCK" --rw=randread --bs=4k \
      --iodepth=16 --size=4G --time_based=1 --runtime="$RUNTIME" --ramp_time=1 \
      --output-format=json >"$W/fio.json" 2>"$W/fio.err"
    stop
  fi
  iops "$W/fio.json"
}

# bench TOOL: in-process reads with the page cache bypassed; prints ops/s.
COUNT=${BENCH_COUNT:-200000}
bench() {
  drop
  case $1 in
    qcowkit) "$QCOWKIT" bench -f qcow2 -t none -d 16 -s 4k -S 805318656 -c "$COUNT" "$W/data.qcow2" ;;
    qemu-img) qemu-img bench -f qcow2 -t none -i io_uring -d 16 -s 4k -S 805318656 -c "$COUNT" \
                "$W/data.qcow2" ;;
  esac | sed -n 's/^Run completed in \([0-9.]*\) seconds.*/\1/p' |
    { read -r secs; echo "$COUNT / $secs" | bc; }
}

printf '%-6s %5s %10s %10s %10s %9s %9s\n' row round qcowkit qemu device vs-qemu vs-device
for r in $(seq "$ROUNDS"); do
  k=$(run qcowkit)
  q=$(run qemu-nbd)
  d=$(run device)
  printf '%-6s %5d %10d %10d %10d %9.2f %9.2f\n' nbd "$r" "$k" "$q" "$d" "$(echo "$k / $q" | bc -l)" \
    "$(echo "$k / $d" | bc -l)"
  k=$(bench qcowkit)
  q=$(bench qemu-img)
  printf '%-6s %5d %10d %10d %10d %9.2f %9.2f\n' bench "$r" "$k" "$q" "$d" "$(echo "$k / $q" | bc -l)" \
    "$(echo "$k / $d" | bc -l)"
done
