#!/usr/bin/env bash
# libnbd's tools (and nbd-client's export listing) as clients, against
# qcowkit serve and qemu-nbd, on a two-layer image (data, zero clusters,
# unallocated ranges, a backing file):
#   - nbdinfo --json: the size, both meta contexts, the flags of a writable
#     export (flush, FUA, trim, zero, fast zero, DF) and of a read-only one;
#     multi-conn with -e 2; the export name and description;
#   - nbdinfo --map (base:allocation) matches qcowkit map's zero/data per
#     byte, and --map=qemu:allocation-depth matches its depth/present;
#   - nbdcopy of the whole export equals qemu-img convert -O raw, and
#     nbdcopy into the export writes the image;
#   - nbdinfo --list and nbd-client -l over TCP (-p, -b) list the export.
# shellcheck source=../lib.sh
. "$(dirname "$0")/../lib.sh"
# shellcheck source=nbd.bash
. "$(dirname "$0")/nbd.bash"
need qemu-img qemu-io nbdinfo nbdcopy python3
cd "$T" || exit 1

qemu-img create -q -f qcow2 base.qcow2 32M
qemu-io -f qcow2 -c 'write -P 0x11 0 4M' -c 'write -P 0x22 16M 1M' -c 'write -z 20M 1M' \
  base.qcow2 >/dev/null
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 img.qcow2
qemu-io -f qcow2 -c 'write -P 0x33 1M 512k' -c 'write -z 2M 1M' -c 'write -P 0x44 24M 64k' \
  -c 'write -P 0x45 31M 1M' img.qcow2 >/dev/null
qemu-img convert -O raw img.qcow2 want.raw
"$QCOWKIT" map --output=json img.qcow2 >map.json

# byte-range comparison of two extent lists: "start length value" lines
cat >cmpmap.py <<'PYEOF'
import json, sys
def runs(pairs):
    out = []
    for s, l, v in pairs:
        if out and out[-1][2] == v and out[-1][0] + out[-1][1] == s:
            out[-1][1] += l
        else:
            out.append([s, l, v])
    return out
mode, mapf, nbdf = sys.argv[1:4]
m = json.load(open(mapf))
n = json.load(open(nbdf))
if mode == "alloc":
    # base:allocation: hole unless data, zero as reported
    want = [(e["start"], e["length"], (0 if e["data"] else 1) | (2 if e["zero"] else 0)) for e in m]
else:
    want = [(e["start"], e["length"], e["depth"] + 1 if e["present"] else 0) for e in m]
got = [(e["offset"], e["length"], e["type"]) for e in n]
a, b = runs(want), runs(got)
if a != b:
    print("want", a, "\ngot ", b)
    sys.exit(1)
PYEOF

jq_get() { python3 -c 'import json,sys; d=json.load(open(sys.argv[1]))["exports"][0]; print(d.get(sys.argv[2]))' "$@"; }

for srv in $NBD_SERVERS; do
  cp img.qcow2 "$srv.qcow2"
  serve_start "$srv" "$srv.qcow2" -t -f qcow2 -x "" || continue
  nbdinfo --json "$URI" >info.json || bad "$srv: nbdinfo" "failed"
  want="export-size=33554432 is_read_only=False can_flush=True can_fua=True can_trim=True"
  want="$want can_zero=True can_fast_zero=True can_df=True can_multi_conn=False"
  got=""
  for k in export-size is_read_only can_flush can_fua can_trim can_zero can_fast_zero can_df can_multi_conn; do
    got="$got $k=$(jq_get info.json $k)"
  done
  [ "${got# }" = "$want" ] && ok "$srv: flags" || bad "$srv: flags" "got${got}"
  ctx=$(python3 -c 'import json; print(",".join(sorted(json.load(open("info.json"))["exports"][0]["contexts"])))')
  [ "$ctx" = "base:allocation,qemu:allocation-depth" ] && ok "$srv: contexts" || bad "$srv: contexts" "$ctx"
  [ "$(jq_get info.json structured)" = None ] || true
  python3 -c 'import json,sys; sys.exit(0 if json.load(open("info.json"))["structured"] else 1)' &&
    ok "$srv: structured" || bad "$srv: structured" "no structured replies"

  nbdinfo --map --json "$URI" >nbdmap.json &&
    python3 cmpmap.py alloc map.json nbdmap.json && ok "$srv: map" || bad "$srv: map" "differs"
  nbdinfo --map=qemu:allocation-depth --json "$URI" >depth.json &&
    python3 cmpmap.py depth map.json depth.json && ok "$srv: depth map" ||
    bad "$srv: depth map" "differs"
  # a map of a middle range only
  nbdinfo --map --totals "$URI" >totals.txt && grep -q . totals.txt &&
    ok "$srv: totals" || bad "$srv: totals" "nbdinfo --totals failed"

  rm -f copy.raw
  nbdcopy "$URI" copy.raw && cmp -s copy.raw want.raw && ok "$srv: nbdcopy out" ||
    bad "$srv: nbdcopy out" "content differs"
  # and back in: a pattern file over the export, then the file compared
  python3 -c 'import sys; sys.stdout.buffer.write(bytes(range(256)) * (32 << 12))' >pattern.raw
  nbdcopy pattern.raw "$URI" && ok "$srv: nbdcopy in" || bad "$srv: nbdcopy in" "failed"
  serve_stop "$srv"
  qemu-img check -q "$srv.qcow2" && ok "$srv: check" || bad "$srv: check" "not clean"
  qemu-img compare -q -F raw "$srv.qcow2" pattern.raw && ok "$srv: nbdcopy in content" ||
    bad "$srv: nbdcopy in content" "differs"

  # read-only, shared, with a name and a description
  serve_start "$srv" img.qcow2 -t -r -e 2 -x disk -D "a test disk" -f qcow2 || continue
  nbdinfo --json "nbd+unix:///disk?socket=$SOCK" >info.json
  got=""
  for k in export-name description is_read_only can_trim can_zero can_multi_conn; do
    got="$got $k=$(jq_get info.json $k)"
  done
  want=" export-name=disk description=a test disk is_read_only=True can_trim=False"
  want="$want can_zero=False can_multi_conn=True"
  [ "$got" = "$want" ] && ok "$srv: ro flags" || bad "$srv: ro flags" "got$got"
  nbdinfo --list --json "$URI" >list.json &&
    python3 -c 'import json,sys; e=json.load(open("list.json"))["exports"]; sys.exit(0 if [x["export-name"] for x in e] == ["disk"] else 1)' &&
    ok "$srv: list" || bad "$srv: list" "$(cat list.json)"
  serve_stop "$srv ro"

  # TCP on the loopback, listed by nbd-client
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  serve_start "$srv" img.qcow2 -t -r -p "$port" -b 127.0.0.1 -x tcpdisk -f qcow2 || continue
  nbdinfo --size "nbd://127.0.0.1:$port/tcpdisk" | grep -qx 33554432 &&
    ok "$srv: tcp" || bad "$srv: tcp" "nbdinfo over TCP failed"
  if command -v nbd-client >/dev/null 2>&1; then
    out=$(timeout 10 nbd-client -l 127.0.0.1 "$port" 2>&1)
    grep -qx tcpdisk <<<"$out" && ok "$srv: nbd-client -l" || bad "$srv: nbd-client -l" "$out"
  fi
  serve_stop "$srv tcp"
done
finish
