#!/usr/bin/env bash
# bench/measure.sh -- `qcowkit measure` against `qemu-img measure`, side by
# side.
#
# Usage: bench/measure.sh [--clean | --clean-only] [QCOWKIT_BINARY] [ROUNDS]
#   QCOWKIT_BINARY  default: <repo>/build/qcowkit
#   ROUNDS          default: 5
#
# Images (made once in ${BENCH_DIR:-/tmp}/qkmbench and reused): quarter.raw,
# a 4 GiB sparse raw file with every fourth 64 KiB block written (1 GiB of
# data in 16,384 runs: the worst case for block status), and quarter.qcow2,
# the same after qemu-img convert (64 KiB clusters). Each round measures,
# with each tool: the qcow2 image for a qcow2 target (default geometry and
# 2 MiB clusters) and the raw image for a qcow2 target; the numbers must
# agree. Prints the seconds of each run and, per row, the median of
# qemu-img time / qcowkit time over the rounds (> 1: qcowkit faster).
set -euo pipefail
export LC_ALL=C

# shellcheck source=common.bash
. "$(dirname "${BASH_SOURCE[0]}")/common.bash"
bench_args 5 "$@"
bench_workdir qkmbench
if [ ! -f "$W/quarter.qcow2" ]; then
  python3 - "$W/quarter.raw" <<'PY'
import os, sys
block, size = 65536, 4 << 30
data = os.urandom(block)
with open(sys.argv[1], "wb") as f:
    f.truncate(size)
    for off in range(0, size, 4 * block):
        f.seek(off)
        f.write(data)
PY
  qemu-img convert -f raw -O qcow2 "$W/quarter.raw" "$W/quarter.qcow2"
  sync
fi

rows=("qcow2-in:-O qcow2:quarter.qcow2" "qcow2-in-2M:-O qcow2 -o cluster_size=2M:quarter.qcow2"
      "raw-in:-f raw -O qcow2:quarter.raw")
declare -A ratios
printf '%-12s %5s %10s %10s %7s\n' row round qemu-img qcowkit ratio
for r in $(seq "$ROUNDS"); do
  for row in "${rows[@]}"; do
    IFS=: read -r name args img <<<"$row"
    # shellcheck disable=SC2086 # the row's words
    q=$(bench_secs "$W/q.out" qemu-img measure $args "$W/$img")
    # shellcheck disable=SC2086
    k=$(bench_secs "$W/k.out" "$QCOWKIT" measure $args "$W/$img")
    cmp -s "$W/q.out" "$W/k.out" ||
      { echo "measure.sh: $name: the numbers differ" >&2; diff "$W/q.out" "$W/k.out" >&2; exit 1; }
    ratio=$(echo "$q / $k" | bc -l)
    ratios[$name]="${ratios[$name]:-} $ratio"
    printf '%-12s %5d %10.3f %10.3f %7.2f\n' "$name" "$r" "$q" "$k" "$ratio"
  done
done
echo
echo "median qemu-img time / qcowkit time (> 1: qcowkit faster):"
for row in "${rows[@]}"; do
  name=${row%%:*}
  # shellcheck disable=SC2086
  printf '  %-12s %.2f\n' "$name" "$(printf '%s\n' ${ratios[$name]} | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')"
done
