# Shared helpers for the shell tests. Source it: . "$(dirname "$0")/../lib.sh"
#
# Environment (set by ctest, see CMakeLists.txt; defaults for running by hand):
#   QCOWKIT   the qcowkit binary under test      (default: build/qcowkit)
#   QK_SRC    the repository root
# Every test gets its own scratch directory $T, removed on any exit.
# A test ends with `finish`, which prints "N passed, N failed" and exits
# 0 when nothing failed, 1 otherwise. `skip "why"` exits 77 (ctest: skipped),
# only for an optional external tool that is truly absent.
set -u
QK_SRC=${QK_SRC:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
QCOWKIT=${QCOWKIT:-$QK_SRC/build/qcowkit}
T=$(mktemp -d "${TMPDIR:-/tmp}/qktest.XXXXXX")
trap 'rm -rf "$T"' EXIT
trap 'exit 130' INT TERM
qk_pass=0
qk_fail=0

# ok NAME: record a pass.  bad NAME WHY: record a failure and say why.
ok()  { qk_pass=$((qk_pass + 1)); }
bad() { qk_fail=$((qk_fail + 1)); echo "FAIL: $1: ${2:-}" >&2; }

# check NAME CMD...: run CMD; pass if it exits 0.
check() { local n=$1; shift; if "$@"; then ok "$n"; else bad "$n" "command failed: $*"; fi; }

# need TOOL...: skip the whole test when an optional external tool is absent.
need() { local t; for t in "$@"; do command -v "$t" >/dev/null 2>&1 || skip "$t not installed"; done; }
skip() { echo "SKIP: $*"; trap - EXIT; rm -rf "$T"; exit 77; }

# crashed RC: true when an exit status means a signal or a sanitizer report.
crashed() { [ "$1" -ge 124 ] || [ "$1" -eq 23 ]; }

finish() {
  echo "$qk_pass passed, $qk_fail failed"
  [ "$qk_fail" -eq 0 ]
  exit $?
}
