# Sourced by the bench scripts: their common command line.
#
# bench_args ROUNDS "$@": parse [--clean | --clean-only] [-h | --help]
# [QCOWKIT_BINARY] [ROUNDS]; sets clean_after and clean_only (0 or 1),
# repo (the repository root), QCOWKIT (default build/qcowkit) and ROUNDS
# (default the first argument). --help prints the script's opening
# comment and exits; an unknown option exits 1.
bench_args() {
  local default_rounds=$1 a pos=()
  shift
  clean_after=0
  clean_only=0
  for a in "$@"; do
    case $a in
      --clean) clean_after=1 ;;
      --clean-only) clean_only=1 ;;
      -h|--help) sed -n '2,/^set -e/{/^set -e/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
      -*) echo "$(basename "$0"): unknown option '$a'" >&2; exit 1 ;;
      *) pos+=("$a") ;;
    esac
  done
  repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  QCOWKIT=${pos[0]:-$repo/build/qcowkit}
  ROUNDS=${pos[1]:-$default_rounds}
}

# bench_workdir NAME: W=${BENCH_DIR:-/tmp}/NAME, the script's work
# directory: removed instead of a run with --clean-only (exit 0), after
# the run with --clean; the qcowkit binary must exist.
bench_workdir() {
  W=${BENCH_DIR:-/tmp}/$1
  if [ "$clean_only" = 1 ]; then rm -rf -- "$W"; exit 0; fi
  [ -x "$QCOWKIT" ] || { echo "$(basename "$0"): no qcowkit binary at $QCOWKIT" >&2; exit 1; }
  mkdir -p "$W"
  if [ "$clean_after" = 1 ]; then trap 'rm -rf -- "$W"' EXIT; fi
}

# bench_secs OUT CMD...: run CMD with its stdout to OUT; print its
# wall-clock seconds.
bench_secs() {
  local out=$1 t0 t1
  shift
  t0=$(date +%s.%N)
  "$@" >"$out"
  t1=$(date +%s.%N)
  echo "$t1 - $t0" | bc -l
}
