#!/usr/bin/env bash
# bench/scaling.sh -- how qcowkit's cost grows with the work, against
# qemu-img, qemu-nbd and nbdkit side by side, as a report with plots.
#
# Usage: bench/scaling.sh [--clean | --clean-only] [QCOWKIT_BINARY] [ROUNDS]
#   QCOWKIT_BINARY  default: <repo>/build/qcowkit
#   ROUNDS          default: 2 (each round runs every tool at every point,
#                   the order of the tools alternating from round to round)
#
# Four series, each point measured for every tool in the same round:
#   open   `info` of an empty qcow2 from 1 GiB to 1 PiB: wall-clock time
#          (mean of BENCH_OPEN_RUNS runs, default 30) and peak memory, with
#          a process that does nothing (/bin/true) as the floor
#   read   `bench -d 1 -s 4k -S 2147479552 -c BENCH_READ_COUNT` (default
#          100000) with the default L2 cache (32 MiB for both tools) on
#          preallocation=metadata images from 1 GiB to 4 TiB. 32 MiB of
#          8-byte entries maps 256 GiB of 64 KiB clusters; the plot marks
#          that size. Each read is about 2 GiB past the last, so it touches
#          one L2 table in four: 512 tables at 1 TiB, what the cache holds,
#          and 2048 at 4 TiB, where every read needs a table read.
#   check  `check --output=json` on the same images (16 Ki to 64 Mi
#          allocated clusters): time and peak memory
#   nbd    random 4 KiB reads from fio's nbd engine at queue depth 1 to 64
#          (BENCH_RUNTIME seconds each, default 3) against `serve`,
#          qemu-nbd (both on a fully written 1 GiB qcow2) and nbdkit's file
#          plugin on its raw copy (when nbdkit is installed)
# The images live in ${BENCH_DIR:-/tmp}/qkscale (about 750 MiB on disk,
# sparse) and are reused. Output in $W/report: one .tsv per series with
# every round, report.md (the tables, both rounds side by side) and one
# .png per series drawn by gnuplot (apt-get install gnuplot-nox time).
set -euo pipefail
export LC_ALL=C

# shellcheck source=common.bash
. "$(dirname "${BASH_SOURCE[0]}")/common.bash"
bench_args 2 "$@"
bench_workdir qkscale
case $QCOWKIT in /*) ;; *) QCOWKIT=$PWD/$QCOWKIT ;; esac
for t in qemu-img qemu-nbd fio python3 gnuplot /usr/bin/time; do
  command -v "$t" >/dev/null 2>&1 || { echo "scaling.sh: '$t' is required but not installed" >&2; exit 1; }
done

mkdir -p "$W/report"
for s in 1G 16G 256G 4T 64T 1P; do
  [ -f "$W/empty-$s.qcow2" ] || qemu-img create -q -f qcow2 "$W/empty-$s.qcow2" "$s"
done
for s in 1G 4G 16G 64G 256G 1T 4T; do
  if [ ! -f "$W/meta-$s.ready" ]; then
    echo "images: meta-$s (preallocation=metadata) ..." >&2
    qemu-img create -q -f qcow2 -o preallocation=metadata "$W/meta-$s.qcow2" "$s"
    touch "$W/meta-$s.ready"
  fi
done
if [ ! -f "$W/data.ready" ]; then
  echo "images: data (1 GiB of random bytes, raw and qcow2) ..." >&2
  head -c 16M /dev/urandom >"$W/chunk"
  for _ in $(seq 64); do cat "$W/chunk"; done >"$W/data.raw"
  rm -f "$W/chunk"
  qemu-img convert -f raw -O qcow2 "$W/data.raw" "$W/data.qcow2"
  touch "$W/data.ready"
fi
# Into the page cache: the data images whole; the metadata images' tables
# by one check each (their files are mostly holes, terabytes long), and
# the holes the read rows touch by one untimed run (the first read of a
# hole fills the page cache with zeroed pages, which would otherwise be
# charged to whichever tool goes first).
cat "$W/data.raw" "$W/data.qcow2" >/dev/null
for s in 1G 4G 16G 64G 256G 1T 4T; do
  "$QCOWKIT" check -q "$W/meta-$s.qcow2"
  "$QCOWKIT" bench -f qcow2 -t writeback -d 1 -s 4k -S 2147479552 \
    -c "${BENCH_READ_COUNT:-100000}" "$W/meta-$s.qcow2" >/dev/null
done

python3 - "$QCOWKIT" "$ROUNDS" "$W" <<'PYEOF'
import json, os, statistics, subprocess, sys, time
qk, rounds, w = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rep = os.path.join(w, "report")
open_runs = int(os.environ.get("BENCH_OPEN_RUNS", "30"))
read_count = int(os.environ.get("BENCH_READ_COUNT", "100000"))
runtime = int(os.environ.get("BENCH_RUNTIME", "3"))
GiB = 1 << 30
size_of = {"1G": GiB, "4G": 4 * GiB, "16G": 16 * GiB, "64G": 64 * GiB, "256G": 256 * GiB,
           "1T": 1024 * GiB, "4T": 4096 * GiB, "64T": 65536 * GiB, "1P": 1048576 * GiB}

rss_file = os.path.join(w, "rss")
def run(cmd, out=subprocess.DEVNULL):
    """Run cmd; return (seconds, peak RSS in KiB, exit status). The peak
    comes from /usr/bin/time, whose child starts small: a child forked
    from this Python would count Python's own pages."""
    t = time.monotonic()
    rc = subprocess.call(["/usr/bin/time", "-f", "%M", "-o", rss_file] + cmd, stdout=out,
                         stderr=subprocess.DEVNULL)
    d = time.monotonic() - t
    with open(rss_file) as f:
        rss = int(f.read().split()[-1])
    return d, rss, rc

def order(tools, rnd):
    return tools if rnd % 2 == 0 else tools[::-1]

def write_tsv(name, header, rows):
    with open(os.path.join(rep, name + ".tsv"), "w") as f:
        f.write("# " + "\t".join(header) + "\n")
        for r in rows:
            f.write("\t".join(str(x) for x in r) + "\n")

md = []
def table(title, header, rows):
    md.append("### " + title + "\n")
    md.append("| " + " | ".join(header) + " |")
    md.append("|" + "---|" * len(header))
    for r in rows:
        md.append("| " + " | ".join(str(x) for x in r) + " |")
    md.append("")
    print("\n".join(md[-len(rows) - 4:]))

def both(vals, fmt):
    return " / ".join(fmt % v for v in vals)

# ---- open ---------------------------------------------------------------
tools = {"qcowkit": [qk, "info"], "qemu-img": ["qemu-img", "info"], "true": ["/bin/true"]}
sizes = ["1G", "16G", "256G", "4T", "64T", "1P"]
got = {}   # (size, tool, round) -> (mean ms, peak KiB)
for rnd in range(rounds):
    for s in sizes:
        img = os.path.join(w, "empty-%s.qcow2" % s)
        for t in order(list(tools), rnd):
            secs, peak = 0.0, 0
            for _ in range(open_runs):
                cmd = tools[t] + ([img] if t != "true" else [])
                d, rss, rc = run(cmd)
                if rc != 0:
                    sys.exit("scaling.sh: %s failed on %s" % (t, img))
                secs += d
                peak = max(peak, rss)
            got[(s, t, rnd)] = (secs / open_runs * 1000, peak)
rows = []
for s in sizes:
    for rnd in range(rounds):
        rows.append([size_of[s], s, rnd + 1] + ["%.3f\t%d" % got[(s, t, rnd)] for t in tools])
write_tsv("open", ["bytes", "size", "round"] + ["%s_ms\t%s_kib" % (t, t) for t in tools], rows)
table("open: `info` of an empty image, ms per run (round 1 / round 2) and peak MiB",
      ["size", "qcowkit ms", "qemu-img ms", "/bin/true ms", "qcowkit over true", "qcowkit MiB", "qemu-img MiB"],
      [[s, both([got[(s, "qcowkit", r)][0] for r in range(rounds)], "%.2f"),
        both([got[(s, "qemu-img", r)][0] for r in range(rounds)], "%.2f"),
        both([got[(s, "true", r)][0] for r in range(rounds)], "%.2f"),
        both([got[(s, "qcowkit", r)][0] - got[(s, "true", r)][0] for r in range(rounds)], "%.2f"),
        "%.1f" % (max(got[(s, "qcowkit", r)][1] for r in range(rounds)) / 1024),
        "%.1f" % (max(got[(s, "qemu-img", r)][1] for r in range(rounds)) / 1024)] for s in sizes])

# ---- read and check -------------------------------------------------------
msizes = ["1G", "4G", "16G", "64G", "256G", "1T", "4T"]
bench = ["bench", "-f", "qcow2", "-t", "writeback", "-d", "1", "-s", "4k",
         "-S", "2147479552", "-c", str(read_count)]
rtools = {"qcowkit": [qk] + bench, "qemu-img": ["qemu-img"] + bench}
ctools = {"qcowkit": [qk, "check", "--output=json"],
          "qemu-img": ["qemu-img", "check", "--output=json"]}
rd, ck = {}, {}
for rnd in range(rounds):
    for s in msizes:
        img = os.path.join(w, "meta-%s.qcow2" % s)
        for t in order(list(rtools), rnd):
            secs, rss, rc = run(rtools[t] + [img])
            if rc != 0:
                sys.exit("scaling.sh: %s bench failed on %s" % (t, img))
            rd[(s, t, rnd)] = (read_count * 4096 / secs / (1 << 20), rss)
        res = {}
        for t in order(list(ctools), rnd):
            with open(os.path.join(w, "check.json"), "w") as out:
                secs, rss, rc = run(ctools[t] + [img], out)
            with open(os.path.join(w, "check.json")) as f:
                j = json.load(f)
            res[t] = (j.get("corruptions", 0), j.get("leaks", 0), j.get("allocated-clusters"))
            ck[(s, t, rnd)] = (secs, rss, j.get("allocated-clusters", 0))
        if res["qcowkit"] != res["qemu-img"]:
            sys.exit("scaling.sh: check results differ on %s: %s" % (img, res))
rows = []
for s in msizes:
    for rnd in range(rounds):
        rows.append([size_of[s], s, rnd + 1] + ["%.1f\t%d" % rd[(s, t, rnd)] for t in rtools])
write_tsv("read", ["bytes", "size", "round"] + ["%s_mibs\t%s_kib" % (t, t) for t in rtools], rows)
table("read: 4 KiB reads about 2 GiB apart, default L2 cache, MiB/s (round 1 / round 2)",
      ["size", "qcowkit", "qemu-img", "qcowkit / qemu-img", "qcowkit MiB", "qemu-img MiB"],
      [[s, both([rd[(s, "qcowkit", r)][0] for r in range(rounds)], "%.0f"),
        both([rd[(s, "qemu-img", r)][0] for r in range(rounds)], "%.0f"),
        both([rd[(s, "qcowkit", r)][0] / rd[(s, "qemu-img", r)][0] for r in range(rounds)], "%.2f"),
        "%.1f" % (max(rd[(s, "qcowkit", r)][1] for r in range(rounds)) / 1024),
        "%.1f" % (max(rd[(s, "qemu-img", r)][1] for r in range(rounds)) / 1024)] for s in msizes])
rows = []
for s in msizes:
    for rnd in range(rounds):
        rows.append([ck[(s, "qcowkit", rnd)][2], s, rnd + 1] +
                    ["%.4f\t%d" % ck[(s, t, rnd)][:2] for t in ctools])
write_tsv("check", ["clusters", "size", "round"] + ["%s_s\t%s_kib" % (t, t) for t in ctools], rows)
table("check: seconds (round 1 / round 2) and peak MiB against allocated clusters",
      ["allocated clusters", "qcowkit s", "qemu-img s", "qemu-img / qcowkit", "qcowkit MiB", "qemu-img MiB"],
      [[ck[(s, "qcowkit", 0)][2], both([ck[(s, "qcowkit", r)][0] for r in range(rounds)], "%.3f"),
        both([ck[(s, "qemu-img", r)][0] for r in range(rounds)], "%.3f"),
        both([ck[(s, "qemu-img", r)][0] / ck[(s, "qcowkit", r)][0] for r in range(rounds)], "%.1f"),
        "%.1f" % (max(ck[(s, "qcowkit", r)][1] for r in range(rounds)) / 1024),
        "%.1f" % (max(ck[(s, "qemu-img", r)][1] for r in range(rounds)) / 1024)] for s in msizes])

# ---- nbd ----------------------------------------------------------------
sock = os.path.join(w, "nbd.sock")
servers = {"qcowkit": [qk, "serve", "-k", sock, "-t", "-r", "-f", "qcow2", os.path.join(w, "data.qcow2")],
           "qemu-nbd": ["qemu-nbd", "-k", sock, "-t", "-r", "-f", "qcow2", os.path.join(w, "data.qcow2")]}
if subprocess.run(["sh", "-c", "command -v nbdkit"], stdout=subprocess.DEVNULL).returncode == 0:
    servers["nbdkit"] = ["nbdkit", "-f", "-r", "-U", sock, "file", os.path.join(w, "data.raw")]
depths = [1, 2, 4, 8, 16, 32, 64]
nb = {}
for rnd in range(rounds):
    for d in depths:
        for t in order(list(servers), rnd):
            if os.path.exists(sock):
                os.unlink(sock)
            srv = subprocess.Popen(servers[t], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for _ in range(200):
                if os.path.exists(sock):
                    break
                time.sleep(0.05)
            else:
                srv.kill()
                sys.exit("scaling.sh: %s did not start" % t)
            p = subprocess.run(["fio", "--name=scale", "--ioengine=nbd",
                                "--uri=nbd+unix:///?socket=" + sock, "--rw=randread", "--bs=4k",
                                "--iodepth=%d" % d, "--size=1G", "--time_based=1",
                                "--runtime=%d" % runtime, "--ramp_time=1", "--randrepeat=0",
                                "--output-format=json"], capture_output=True, text=True)
            srv.terminate()
            srv.wait()
            if p.returncode != 0:
                sys.exit("scaling.sh: fio against %s failed: %s" % (t, p.stderr.strip()[-300:]))
            j = json.loads(p.stdout[p.stdout.index("{"):])["jobs"][0]["read"]
            nb[(d, t, rnd)] = j["iops"]
rows = [[d, rnd + 1] + ["%.0f" % nb[(d, t, rnd)] for t in servers] for d in depths for rnd in range(rounds)]
write_tsv("nbd", ["depth", "round"] + list(servers), rows)
hdr = ["depth"] + ["%s IOPS" % t for t in servers] + ["qcowkit / %s" % t for t in servers if t != "qcowkit"]
table("nbd: random 4 KiB reads, IOPS (round 1 / round 2)", hdr,
      [[d] + [both([nb[(d, t, r)] for r in range(rounds)], "%.0f") for t in servers] +
       [both([nb[(d, "qcowkit", r)] / nb[(d, t, r)] for r in range(rounds)], "%.2f")
        for t in servers if t != "qcowkit"] for d in depths])
with open(os.path.join(rep, "report.md"), "w") as f:
    f.write("\n".join(md) + "\n")
with open(os.path.join(rep, "servers"), "w") as f:
    f.write(" ".join(servers) + "\n")
PYEOF

# ---- plots: the mean of the rounds at each point ------------------------
cd "$W/report"
nbdkit_plot=
grep -qw nbdkit servers && nbdkit_plot=", 'nbd.tsv' using 1:5 smooth unique with linespoints title 'nbdkit (file plugin, raw)'"
gnuplot <<EOF
set terminal pngcairo size 900,600 font ',10'
set grid
set key top left
set logscale x 2
set format x '%.0b %BB'

set output 'open.png'
set multiplot layout 2,1 title 'open: info of an empty qcow2 (mean of $ROUNDS rounds)'
set ylabel 'ms per run'
plot 'open.tsv' using 1:4 smooth unique with linespoints title 'qcowkit', \
     '' using 1:6 smooth unique with linespoints title 'qemu-img', \
     '' using 1:8 smooth unique with lines dashtype 2 title '/bin/true'
set ylabel 'peak MiB'
set xlabel 'virtual size'
plot 'open.tsv' using 1:(\$5/1024) smooth unique with linespoints title 'qcowkit', \
     '' using 1:(\$7/1024) smooth unique with linespoints title 'qemu-img'
unset multiplot

set output 'read.png'
set title 'read: 4 KiB reads 2 GiB apart, default 32 MiB L2 cache'
set xlabel 'virtual size (preallocation=metadata)'
set ylabel 'MiB/s'
set arrow 1 from 274877906944, graph 0 to 274877906944, graph 1 nohead dashtype 2
set label 1 'L2 cache covers the image up to here (256 GiB)' at 274877906944, graph 0.95 right offset -1,0
plot 'read.tsv' using 1:4 smooth unique with linespoints title 'qcowkit', \
     '' using 1:6 smooth unique with linespoints title 'qemu-img'
unset arrow 1
unset label 1

set output 'check.png'
set format x '%.0b%B'
set multiplot layout 2,1 title 'check: against allocated clusters (mean of $ROUNDS rounds)'
set title ''
set logscale y 10
set ylabel 'seconds'
set xlabel ''
plot 'check.tsv' using 1:4 smooth unique with linespoints title 'qcowkit', \
     '' using 1:6 smooth unique with linespoints title 'qemu-img'
set ylabel 'peak MiB'
set xlabel 'allocated clusters'
plot 'check.tsv' using 1:(\$5/1024) smooth unique with linespoints title 'qcowkit', \
     '' using 1:(\$7/1024) smooth unique with linespoints title 'qemu-img'
unset multiplot
unset logscale y

set output 'nbd.png'
set title 'NBD: random 4 KiB reads, fio nbd engine, 1 GiB image in the page cache'
set format x '%.0f'
set xlabel 'queue depth'
set ylabel 'IOPS'
set yrange [0:*]
plot 'nbd.tsv' using 1:3 smooth unique with linespoints title 'qcowkit serve', \
     '' using 1:4 smooth unique with linespoints title 'qemu-nbd' $nbdkit_plot
EOF
echo "report: $W/report/report.md and open.png, read.png, check.png, nbd.png" >&2
