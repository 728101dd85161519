#!/usr/bin/env bash
# bench/compressed.sh -- reading compressed images: `qcowkit convert` of a
# zstd and a zlib qcow2 to raw against `qemu-img convert`, and sequential
# NBD reads of them against qemu-nbd, side by side.
#
# Usage: bench/compressed.sh [--clean | --clean-only] [QCOWKIT_BINARY] [ROUNDS]
#   QCOWKIT_BINARY  default: <repo>/build/qcowkit
#   ROUNDS          default: 3
#   BENCH_SIZE      bytes of guest data (default 2 GiB)
#
# Images (made once in ${BENCH_DIR:-/tmp}/qkzbench and reused): src.raw,
# mixed compressible data (bench/mixed-data.py); zlib.qcow2 and zstd.qcow2,
# `qemu-img convert -c` of it (64 KiB clusters). Rows, each run by both
# tools in every round with the page cache warm:
#   convert-zstd, convert-zlib  convert -O raw IMAGE OUT (OUT removed first)
#   nbd-zstd, nbd-zlib          the whole disk read by `nbdcopy` (4
#                               connections where the server allows them)
#                               from `qcowkit serve -r` and from `qemu-nbd
#                               -r`, over a Unix socket, into /dev/null
# The converted files must equal src.raw (first round). Also printed: one
# core's decompression rate for the image (`qcowkit bench` reading it,
# with one request in flight), a reference for the codec's limit.
# Prints MiB/s per run and the median qemu/qcowkit time ratio per row.
set -euo pipefail
export LC_ALL=C

# shellcheck source=common.bash
. "$(dirname "${BASH_SOURCE[0]}")/common.bash"
bench_args 3 "$@"
SIZE=${BENCH_SIZE:-$((2 << 30))}
bench_workdir qkzbench
for t in qemu-img qemu-nbd nbdcopy; do
  command -v $t >/dev/null || { echo "compressed.sh: $t is needed" >&2; exit 1; }
done
if [ "$(cat "$W/stamp" 2>/dev/null)" != "$SIZE" ]; then
  rm -f -- "$W"/*.qcow2 "$W/src.raw" "$W/stamp"
  python3 "$repo/bench/mixed-data.py" "$W/src.raw" "$SIZE"
  qemu-img convert -f raw -O qcow2 -c "$W/src.raw" "$W/zlib.qcow2"
  qemu-img convert -f raw -O qcow2 -c -o compression_type=zstd "$W/src.raw" "$W/zstd.qcow2"
  echo "$SIZE" >"$W/stamp"
fi
cat "$W"/*.qcow2 >/dev/null

SOCK=$W/nbd.sock
PIDF=$W/nbd.pid
stop_server() {
  if [ -s "$PIDF" ]; then kill "$(cat "$PIDF")" 2>/dev/null || true; fi
  for _ in $(seq 50); do [ -e "$SOCK" ] || break; sleep 0.1; done
  rm -f -- "$SOCK" "$PIDF"
}
trap 'stop_server; if [ "$clean_after" = 1 ]; then rm -rf -- "$W"; fi' EXIT
# serve TOOL IMAGE: start TOOL's server on $SOCK, read-only.
serve() {
  stop_server
  case $1 in
    qemu) qemu-nbd -r -f qcow2 -k "$SOCK" --pid-file "$PIDF" -e 4 "$2" & ;;
    qcowkit) "$QCOWKIT" serve -r -f qcow2 -k "$SOCK" --pid-file "$PIDF" -e 4 "$2" & ;;
  esac
  for _ in $(seq 100); do [ -S "$SOCK" ] && [ -s "$PIDF" ] && return; sleep 0.05; done
  echo "compressed.sh: the $1 server did not start" >&2
  exit 1
}

# run ROW TOOL: one run; prints its seconds.
run() {
  local row=$1 tool=$2 img=$W/${1#*-}.qcow2
  case $row in
    convert-*)
      rm -f -- "$W/out.raw"
      sync    # the last run's output written back, outside the timing
      if [ "$tool" = qemu ]; then
        bench_secs /dev/null qemu-img convert -f qcow2 -O raw "$img" "$W/out.raw"
      else
        bench_secs /dev/null "$QCOWKIT" convert -f qcow2 -O raw "$img" "$W/out.raw"
      fi ;;
    nbd-*)
      serve "$tool" "$img"
      bench_secs /dev/null nbdcopy "nbd+unix:///?socket=$SOCK" null:
      stop_server ;;
  esac
}

echo "one core's decompression (qcowkit bench, 64 KiB requests, depth 1):"
for c in zstd zlib; do
  out=$("$QCOWKIT" bench -f qcow2 -c $((SIZE / 65536)) -s 64k -d 1 "$W/$c.qcow2" | tail -1)
  echo "  $c: $out"
done

rows=(convert-zstd convert-zlib nbd-zstd nbd-zlib)
declare -A ratios
printf '%-13s %5s %12s %12s %7s\n' row round qemu-MiB/s qcowkit-MiB/s ratio
for r in $(seq "$ROUNDS"); do
  for row in "${rows[@]}"; do
    q=$(run "$row" qemu)
    k=$(run "$row" qcowkit)
    if [ "$r" = 1 ] && [ "${row%%-*}" = convert ] && ! cmp -s "$W/out.raw" "$W/src.raw"; then
      echo "compressed.sh: $row: qcowkit's output differs from the source" >&2
      exit 1
    fi
    ratio=$(echo "$q / $k" | bc -l)
    ratios[$row]="${ratios[$row]:-} $ratio"
    printf '%-13s %5d %12.0f %12.0f %7.2f\n' "$row" "$r" "$(echo "$SIZE / 1048576 / $q" | bc -l)" \
      "$(echo "$SIZE / 1048576 / $k" | bc -l)" "$ratio"
  done
done
rm -f -- "$W/out.raw"
echo
echo "median qemu time / qcowkit time (> 1: qcowkit faster):"
for row in "${rows[@]}"; do
  # shellcheck disable=SC2086
  printf '  %-13s %.2f\n' "$row" "$(printf '%s\n' ${ratios[$row]} | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')"
done
