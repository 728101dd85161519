#!/usr/bin/env bash
# bench/chain.sh -- `qcowkit commit`, `rebase` and `measure` against
# qemu-img's, side by side, on a 4 GiB two-level chain.
#
# Usage: bench/chain.sh [--clean | --clean-only] [QCOWKIT_BINARY] [ROUNDS]
#   QCOWKIT_BINARY  default: <repo>/build/qcowkit
#   ROUNDS          default: 3
#
# Images (made once in ${BENCH_DIR:-/tmp}/qkcbench and reused): base.qcow2,
# 4 GiB with every other 64 KiB cluster written (2 GiB of data); top.qcow2
# over it with two of every eight clusters written (25% of the top
# allocated, half of it over base data); newbase.qcow2, base.qcow2 with every eighth
# cluster rewritten (the other base of the safe rebase). Each round runs,
# with each tool, on fresh copies made outside the timing:
#   commit       commit top.qcow2 (into base.qcow2, the top emptied)
#   rebase-safe  rebase -b newbase.qcow2 -F qcow2 top.qcow2
#   rebase-none  rebase -b "" top.qcow2 (everything copied in)
#   measure      measure -O qcow2 top.qcow2
# In the first round the results are compared (qemu-img compare of the two
# tools' images, cmp of measure's output) and checked (qemu-img check).
# Prints the seconds of each run and, per row, the median of qemu-img time
# / qcowkit time over the rounds (> 1: qcowkit faster). The page cache is
# warm, but commit and rebase end with a flush that writes their data to
# the disk, the same for both tools.
set -euo pipefail
export LC_ALL=C

# shellcheck source=common.bash
. "$(dirname "${BASH_SOURCE[0]}")/common.bash"
bench_args 3 "$@"
bench_workdir qkcbench

# writes STEP FIRST PATTERN0: qemu-io commands writing every STEP-th 64 KiB
# cluster of 4 GiB from cluster FIRST, with patterns from PATTERN0 on.
writes() {
  local step=$1 first=$2 p=$3 i
  for ((i = first; i < 65536; i += step)); do
    echo "write -q -P $(((p + i / step) % 251 + 1)) $((i * 65536)) 64k"
  done
}
if [ ! -f "$W/newbase.qcow2" ]; then
  qemu-img create -q -f qcow2 "$W/base.qcow2" 4G
  writes 2 0 1 | qemu-io "$W/base.qcow2" >/dev/null
  qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "$W/top.qcow2"
  writes 8 1 50 | qemu-io "$W/top.qcow2" >/dev/null
  writes 8 2 100 | qemu-io "$W/top.qcow2" >/dev/null
  cp --sparse=always "$W/base.qcow2" "$W/newbase.qcow2"
  writes 8 0 150 | qemu-io "$W/newbase.qcow2" >/dev/null
  sync
fi

# fresh TOOL: copies of the chain for TOOL (q or k) in $W/TOOL/, outside
# the timing, written back to the disk (so that neither tool pays for the
# copies' writeback) and read once (both start with a warm cache).
fresh() {
  rm -rf -- "${W:?}/$1"
  mkdir -p "$W/$1"
  local f
  for f in base top newbase; do
    cp --sparse=always "$W/$f.qcow2" "$W/$1/$f.qcow2"
    cat "$W/$1/$f.qcow2" >/dev/null
  done
  sync
}

# run ROW TOOL-PROGRAM...: the row's command, by either tool.
run() {
  local row=$1 d=$2
  shift 2
  case $row in
    commit) "$@" commit -q "$d/top.qcow2" ;;
    rebase-safe) "$@" rebase -q -b newbase.qcow2 -F qcow2 "$d/top.qcow2" ;;
    rebase-none) "$@" rebase -q -b "" "$d/top.qcow2" ;;
    measure) "$@" measure -O qcow2 "$d/top.qcow2" ;;
  esac
}

# same ROW: the two tools' results agree, and qcowkit's images check clean.
same() {
  case $1 in
    commit)
      qemu-img compare -q "$W/q/base.qcow2" "$W/k/base.qcow2" &&
        qemu-img compare -q "$W/q/top.qcow2" "$W/k/top.qcow2" &&
        qemu-img check -q "$W/k/base.qcow2" && qemu-img check -q "$W/k/top.qcow2" ;;
    rebase-*)
      qemu-img compare -q "$W/q/top.qcow2" "$W/k/top.qcow2" &&
        [ "$(qemu-img info "$W/q/top.qcow2" | grep '^backing file:')" = \
          "$(qemu-img info "$W/k/top.qcow2" | grep '^backing file:' | sed "s|$W/k|$W/q|")" ] &&
        qemu-img check -q "$W/k/top.qcow2" ;;
    measure) cmp -s "$W/q.out" "$W/k.out" ;;
  esac
}

rows=(commit rebase-safe rebase-none measure)
declare -A ratios
printf '%-12s %5s %10s %10s %7s\n' row round qemu-img qcowkit ratio
for r in $(seq "$ROUNDS"); do
  for row in "${rows[@]}"; do
    fresh q
    fresh k
    q=$(bench_secs "$W/q.out" run "$row" "$W/q" qemu-img)
    k=$(bench_secs "$W/k.out" run "$row" "$W/k" "$QCOWKIT")
    if [ "$r" = 1 ] && ! same "$row"; then
      echo "chain.sh: $row: qcowkit's result differs from qemu-img's, or does not check clean" >&2
      exit 1
    fi
    ratio=$(echo "$q / $k" | bc -l)
    ratios[$row]="${ratios[$row]:-} $ratio"
    printf '%-12s %5d %10.3f %10.3f %7.2f\n' "$row" "$r" "$q" "$k" "$ratio"
  done
done
rm -rf -- "${W:?}/q" "${W:?}/k"
echo
echo "median qemu-img time / qcowkit time (> 1: qcowkit faster):"
for row in "${rows[@]}"; do
  # shellcheck disable=SC2086
  printf '  %-12s %.2f\n' "$row" "$(printf '%s\n' ${ratios[$row]} | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')"
done
