#!/usr/bin/env bash
# bench/check.sh -- `qcowkit check` against `qemu-img check`, side by side.
#
# Usage: bench/check.sh [--clean | --clean-only] [QCOWKIT_BINARY] [ROUNDS]
#   QCOWKIT_BINARY  default: <repo>/build/qcowkit
#   ROUNDS          default: 3 (each round runs both tools on every image,
#                   in an order that alternates between rounds)
#
# Images (made once in ${BENCH_DIR:-/tmp}/qkcbench and reused):
#   prealloc-1T  a 1 TiB qcow2 with preallocation=metadata (2048 L2 tables,
#                16 Mi data clusters, a sparse file)
#   frag-4G      a 4 GiB qcow2 with 50000 clusters written in scattered
#                order (qemu-img bench -w, step 4100096), so host order and
#                guest order differ everywhere
#   frag-512     an 8 GiB qcow2 with 512-byte clusters and 300000 clusters
#                written in the same scattered order: nearly every write
#                allocated its own L2 table, so the metadata is as scattered
#                as the data (about 600k small tables and blocks; making it
#                takes qemu-img about 25 minutes)
# For each run: wall-clock seconds and peak resident memory (ru_maxrss of
# the child), and both tools' JSON must agree on corruptions, leaks and
# allocated clusters. Prints medians and per-round ratios
# qemu-img time / qcowkit time (> 1: qcowkit faster).
set -euo pipefail
export LC_ALL=C

# shellcheck source=common.bash
. "$(dirname "${BASH_SOURCE[0]}")/common.bash"
bench_args 3 "$@"
bench_workdir qkcbench

if [ ! -f "$W/ready" ]; then
  echo "images: prealloc-1T (preallocation=metadata) ..." >&2
  rm -f "$W/prealloc-1T.qcow2" "$W/frag-4G.qcow2"
  qemu-img create -q -f qcow2 -o preallocation=metadata "$W/prealloc-1T.qcow2" 1T
  echo "images: frag-4G (50000 scattered clusters) ..." >&2
  qemu-img create -q -f qcow2 "$W/frag-4G.qcow2" 4G
  qemu-img bench -q -w -c 50000 -d 16 -s 4k -S 4100096 "$W/frag-4G.qcow2" >/dev/null
  touch "$W/ready"
fi
if [ ! -f "$W/ready-512" ]; then
  echo "images: frag-512 (300000 scattered 512-byte clusters, about 25 minutes) ..." >&2
  rm -f "$W/frag-512.qcow2"
  qemu-img create -q -f qcow2 -o cluster_size=512 "$W/frag-512.qcow2" 8G
  qemu-img bench -q -w -c 300000 -d 16 -s 512 -S 4100096 "$W/frag-512.qcow2" >/dev/null
  touch "$W/ready-512"
fi

python3 - "$QCOWKIT" "$ROUNDS" "$W" <<'PYEOF'
import json, os, resource, statistics, subprocess, sys, time
qk, rounds, w = sys.argv[1], int(sys.argv[2]), sys.argv[3]
images = ["prealloc-1T", "frag-4G", "frag-512"]
tools = {"qemu-img": ["qemu-img", "check", "--output=json"],
         "qcowkit": [qk, "check", "--output=json"]}

def run(cmd):
    # peak RSS of this child alone: fork a wrapper that reports its own
    # RUSAGE_CHILDREN after waiting for the one command
    wrapper = ("import resource, subprocess, sys, time; t = time.monotonic(); "
               "p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
               "d = time.monotonic() - t; "
               "r = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss; "
               "sys.stdout.write('%f %d %d\\n' % (d, r, p.returncode) + p.stdout)")
    out = subprocess.run([sys.executable, "-c", wrapper] + cmd, capture_output=True,
                         text=True, check=True).stdout
    head, _, body = out.partition("\n")
    secs, rss, rc = head.split()
    return float(secs), int(rss), int(rc), body

res = {(i, t): [] for i in images for t in tools}
ratios = {i: [] for i in images}
bad = 0
for rnd in range(rounds):
    for img in images:
        order = list(tools) if rnd % 2 == 0 else list(tools)[::-1]
        got = {}
        for t in order:
            secs, rss, rc, body = run(tools[t] + [os.path.join(w, img + ".qcow2")])
            try:
                d = json.loads(body)
            except ValueError:
                d = {}
            got[t] = (secs, rss, rc, {k: d.get(k, 0) for k in ("corruptions", "leaks", "allocated-clusters")})
            res[(img, t)].append((secs, rss))
            print("  round %d  %-12s %-9s %7.3f s  %7.1f MiB peak  exit %d" %
                  (rnd + 1, img, t, secs, rss / 1024, rc), file=sys.stderr)
        if got["qemu-img"][2:] != got["qcowkit"][2:]:
            print("MISMATCH on %s: qemu-img %s, qcowkit %s" % (img, got["qemu-img"][2:], got["qcowkit"][2:]))
            bad = 1
        ratios[img].append(got["qemu-img"][0] / got["qcowkit"][0])

print("check, seconds and peak memory (median of %d rounds); ratio: qemu-img time / qcowkit time per round, median [min-max]" % rounds)
print("%-13s %10s %10s %12s %12s   %s" % ("image", "qemu-img", "qcowkit", "qemu-img MiB", "qcowkit MiB", "qemu-img/qcowkit"))
for img in images:
    q = res[(img, "qemu-img")]; k = res[(img, "qcowkit")]
    r = ratios[img]
    print("%-13s %9.3fs %9.3fs %12.1f %12.1f   %.2f [%.2f-%.2f]" % (
        img, statistics.median(x[0] for x in q), statistics.median(x[0] for x in k),
        statistics.median(x[1] for x in q) / 1024, statistics.median(x[1] for x in k) / 1024,
        statistics.median(r), min(r), max(r)))
sys.exit(bad)
PYEOF
