#!/usr/bin/env bash
# Malformed handshakes and requests from a raw client (rawclient.py),
# against qcowkit serve and qemu-nbd: bad magics, unknown client flags,
# options with bad or huge lengths, unknown options and commands, requests
# past the end, bad flags, writes to a read-only export, block status
# without a context, a 2 GiB write, disconnects in the middle of a request
# and with replies pending, random garbage in both phases; plus pipelined
# requests answered once each, out of order, with the right content; and
# a read that meets a corrupt cluster part way (EIO, the data before it
# right).
# Errors are checked as the specification says for qcowkit (ENOSPC past
# the end, EPERM on a read-only export) and as qemu-nbd answers (EINVAL).
# Afterwards the server still serves, exits 0 on SIGTERM (under the
# sanitizers: with nothing reported), and the image checks clean.
# shellcheck source=../lib.sh
. "$(dirname "$0")/../lib.sh"
# shellcheck source=nbd.bash
. "$(dirname "$0")/nbd.bash"
need qemu-img qemu-io python3
cd "$T" || exit 1
here=$QK_SRC/tests/nbd

for srv in $NBD_SERVERS; do
  s=0
  spec "$srv" && s=1
  qemu-img create -q -f qcow2 "$srv.qcow2" 64M
  qemu-io -f qcow2 -c 'write -P 0x61 0 2M' -c 'write -z 2M 1M' "$srv.qcow2" >/dev/null
  for mode in rw ro; do
    ro=()
    [ $mode = ro ] && ro=(-r)
    serve_start "$srv" "$srv.qcow2" -t -e 8 "${ro[@]}" -f qcow2 || continue
    out=$(timeout 120 python3 "$here/rawclient.py" "$SOCK" $mode $s 2>&1)
    rc=$?
    [ $rc -eq 0 ] && ok "$srv $mode: raw client" || bad "$srv $mode: raw client" "$out"
    kill -0 "$SRV_PID" 2>/dev/null && ok "$srv $mode: alive" || bad "$srv $mode: alive" "server died"
    qemu-img info -f raw "$URI" >/dev/null 2>&1 && ok "$srv $mode: serves" ||
      bad "$srv $mode: serves" "qemu-img info failed"
    serve_stop "$srv $mode"
  done
  qemu-img check -q "$srv.qcow2" && ok "$srv: check" || bad "$srv: check" "not clean"
done

# A read that meets a corrupt cluster part way: the L2 entry of the
# cluster at 512 KiB made unaligned (QEMU and qcowkit both refuse it).
qemu-img create -q -f qcow2 bad.qcow2 64M
qemu-io -f qcow2 -c 'write -P 0x61 0 1M' bad.qcow2 >/dev/null
python3 - bad.qcow2 <<'EOF'
import struct, sys
with open(sys.argv[1], "r+b") as f:
    l1 = struct.unpack(">Q", f.read(48)[40:48])[0]
    f.seek(l1)
    l2 = struct.unpack(">Q", f.read(8))[0] & 0x00fffffffffffe00
    f.seek(l2 + 8 * 8)
    e = struct.unpack(">Q", f.read(8))[0]
    assert e & 0x00fffffffffffe00, "cluster 8 not allocated"
    f.seek(l2 + 8 * 8)
    f.write(struct.pack(">Q", e + 0x200))
EOF
sum=$(sha256sum <bad.qcow2)
for srv in $NBD_SERVERS; do
  s=0
  spec "$srv" && s=1
  serve_start "$srv" bad.qcow2 -r -f qcow2 || continue
  out=$(timeout 60 python3 "$here/rawclient.py" "$SOCK" bad $s 2>&1)
  [ $? -eq 0 ] && ok "$srv: read failing part way" || bad "$srv: read failing part way" "$out"
  serve_stop "$srv bad"
done
[ "$(sha256sum <bad.qcow2)" = "$sum" ] && ok "corrupt image unchanged" ||
  bad "corrupt image unchanged" "the served file changed"
finish
