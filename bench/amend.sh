#!/usr/bin/env bash
# bench/amend.sh -- `qcowkit amend` against `qemu-img amend`, side by side.
#
# Usage: bench/amend.sh [--clean | --clean-only] [QCOWKIT_BINARY] [ROUNDS]
#   QCOWKIT_BINARY  default: <repo>/build/qcowkit
#   ROUNDS          default: 5 (each round runs both tools on every row, in
#                   an order that alternates between rounds)
#
# Image (made once in ${BENCH_DIR:-/tmp}/qkabench and reused, about 40 s):
#   big-100G  a 100 GiB qcow2 (64 KiB clusters, 16-bit refcounts) with every
#             other cluster allocated: 819200 data clusters, 200 L2 tables
#             and 25 refcount blocks, refcounts alternating 1 and 0 (made
#             with preallocation=metadata, then qemu-io discarding every
#             other cluster; a sparse file of about 16 MiB on disk, the
#             data clusters holes)
# Rows (BENCH_ROWS, a space-separated list of -o option lists):
#   refcount_bits=64  16-bit to 64-bit refcounts: a new refcount structure
#   compat=0.10       downgrade: the 819200 zero clusters the discards left
#                     become unallocated
# Each run amends a fresh copy (cp --sparse=always, then sync, untimed) and
# is timed with the wall clock of the whole command, process start and
# image open included. The first qcowkit result of each row is checked:
# qemu-img check finds nothing, qemu-img info --output=json equals that of
# qemu-img's result (but for the file name and size on disk), and the guest
# content is the same (qemu-img compare). Prints the median times and the
# per-round ratio qemu-img time / qcowkit time (> 1: qcowkit faster).
set -euo pipefail
export LC_ALL=C

# shellcheck source=common.bash
. "$(dirname "${BASH_SOURCE[0]}")/common.bash"
bench_args 5 "$@"
ROWS=${BENCH_ROWS:-"refcount_bits=64 compat=0.10"}
bench_workdir qkabench

if [ ! -f "$W/ready" ]; then
  echo "image: big-100G (preallocation=metadata, then 819200 discards, about 40 s) ..." >&2
  rm -f "$W/big-100G.qcow2"
  qemu-img create -q -f qcow2 -o preallocation=metadata "$W/big-100G.qcow2" 100G
  python3 -c '
import sys
w = sys.stdout.write
for c in range(0, 100 * 16384, 2):
    w("discard %d 65536\n" % (c * 65536))' | qemu-io "$W/big-100G.qcow2" >/dev/null
  out=$(qemu-img check --output=json "$W/big-100G.qcow2")
  case $out in
    *'"allocated-clusters": 819200'*) ;;
    *) echo "amend.sh: the image did not come out as planned: $out" >&2; exit 1 ;;
  esac
  touch "$W/ready"
fi

python3 - "$QCOWKIT" "$ROUNDS" "$W" "$ROWS" <<'PYEOF'
import os, statistics, subprocess, sys, time
qk, rounds, w, rows = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4].split()
src = os.path.join(w, "big-100G.qcow2")
tools = {"qemu-img": ["qemu-img", "amend", "-o"], "qcowkit": [qk, "amend", "-o"]}

def fresh(name):
    dst = os.path.join(w, name)
    subprocess.run(["cp", "--sparse=always", src, dst], check=True)
    subprocess.run(["sync"], check=True)
    return dst

def info(path):
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", path],
                         capture_output=True, text=True, check=True).stdout
    return [l for l in out.splitlines() if '"actual-size"' not in l and '"filename"' not in l]

def verify(row, q, k):
    chk = subprocess.run(["qemu-img", "check", k], capture_output=True, text=True)
    if chk.returncode != 0:
        return "qemu-img check exit %d: %s" % (chk.returncode, chk.stdout.strip()[-300:])
    if info(q) != info(k):
        return "qemu-img info differs from qemu-img's result"
    cmp = subprocess.run(["qemu-img", "compare", "-U", q, k], capture_output=True, text=True)
    if cmp.returncode != 0:
        return "qemu-img compare: " + cmp.stdout.strip()
    return None

times = {(r, t): [] for r in rows for t in tools}
ratios = {r: [] for r in rows}
bad = 0
for rnd in range(rounds):
    for row in rows:
        order = list(tools) if rnd % 2 == 0 else list(tools)[::-1]
        got, paths = {}, {}
        for t in order:
            path = fresh(t + ".qcow2")
            t0 = time.monotonic()
            p = subprocess.run(tools[t] + [row, path], capture_output=True, text=True)
            secs = time.monotonic() - t0
            if p.returncode != 0:
                print("FAILED %s -o %s: %s" % (t, row, p.stderr.strip()), file=sys.stderr)
                sys.exit(1)
            got[t], paths[t] = secs, path
            times[(row, t)].append(secs)
            print("  round %d  %-18s %-9s %7.3f s" % (rnd + 1, row, t, secs), file=sys.stderr)
        if rnd == 0:
            why = verify(row, paths["qemu-img"], paths["qcowkit"])
            if why:
                print("WRONG %s: %s" % (row, why), file=sys.stderr)
                bad = 1
        ratios[row].append(got["qemu-img"] / got["qcowkit"])
for t in tools:
    try:
        os.unlink(os.path.join(w, t + ".qcow2"))
    except OSError:
        pass

print("amend of big-100G (100 GiB, 819200 of 1638400 clusters allocated), wall-clock seconds "
      "(median of %d rounds); ratio: qemu-img time / qcowkit time per round, median [min-max]" % rounds)
print("%-18s %10s %10s   %s" % ("-o", "qemu-img", "qcowkit", "qemu-img/qcowkit"))
for row in rows:
    r = ratios[row]
    print("%-18s %9.3fs %9.3fs   %.2f [%.2f-%.2f]%s" % (
        row, statistics.median(times[(row, "qemu-img")]), statistics.median(times[(row, "qcowkit")]),
        statistics.median(r), min(r), max(r), "  WRONG" if bad else ""))
sys.exit(bad)
PYEOF
