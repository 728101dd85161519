#!/usr/bin/env bash
# Reads batched at the device: with --cache=none, serve reads the small
# READs a client has waiting with one qk_pread_batch (O_DIRECT reads in
# flight together through io_uring), and `bench -t none -d N` does the
# same. Every kind of image qemu-img makes is read whole by nbdcopy with
# 32 requests in flight (4 KiB and 64 KiB requests) and must equal
# qemu-img convert's raw output: data, zero and unallocated clusters,
# compressed clusters (read at once, not batched), a backing chain,
# extended L2 subclusters, 512-byte clusters (host offsets that O_DIRECT
# cannot take unaligned: read at once through a bounce), and a raw image.
# Then a pipelined batch with requests the server refuses in the middle
# (past the end, bad flags): each is answered once, the refused ones with
# EINVAL, the others with their data. Then bench -t none -d 16 on each.
# shellcheck source=../lib.sh
. "$(dirname "$0")/../lib.sh"
# shellcheck source=nbd.bash
. "$(dirname "$0")/nbd.bash"
need qemu-img qemu-io nbdcopy python3
cd "$T" || exit 1

io() { qemu-io "$@" >/dev/null || bad "setup" "qemu-io $*"; }

qemu-img create -q -f qcow2 plain.qcow2 16M
io -f qcow2 -c 'write -P 0x11 0 3M' -c 'write -P 0x22 5M 64k' -c 'write -z 6M 1M' \
  -c 'write -P 0x33 8M 4k' -c 'write -P 0x44 12M 2M' -c 'discard 12M 64k' plain.qcow2
python3 -c '
import os, random
random.seed(5)
with open("src.raw", "wb") as f:
    for i in range(256):
        b = bytes([i]) * 32768 + random.randbytes(32768)
        f.write(b)' 
qemu-img convert -q -c -f raw -O qcow2 src.raw comp.qcow2
qemu-img create -q -f qcow2 base.qcow2 16M
io -f qcow2 -c 'write -P 0x55 0 16M' base.qcow2
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2
io -f qcow2 -c 'write -P 0x66 1M 64k' -c 'write -P 0x67 4100k 8k' -c 'write -z 9M 128k' top.qcow2
qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=128k el2.qcow2 16M
io -f qcow2 -c 'write -P 0x77 4k 4k' -c 'write -P 0x78 132k 8k' -c 'write -z 264k 4k' \
  -c 'write -P 0x79 3M 1M' el2.qcow2
qemu-img create -q -f qcow2 -o cluster_size=512 small.qcow2 16M
io -f qcow2 -c 'write -P 0x88 0 1M' -c 'write -P 0x89 1536 512' -c 'write -P 0x8a 7M 3k' small.qcow2
cp src.raw plain.raw

for img in plain.qcow2 comp.qcow2 top.qcow2 el2.qcow2 small.qcow2 plain.raw; do
  fmt=qcow2
  case $img in *.raw) fmt=raw ;; esac
  qemu-img convert -f "$fmt" -O raw "$img" "ref-$img.raw"
  serve_start qcowkit "$img" -t -r --cache=none -f "$fmt" || continue
  for rs in 4096 65536; do
    rm -f out.raw
    if nbdcopy --requests=32 --request-size=$rs "$URI" out.raw 2>nbdcopy.err &&
       cmp -s out.raw "ref-$img.raw"; then
      ok "$img: nbdcopy, $rs-byte requests"
    else
      bad "$img: nbdcopy, $rs-byte requests" "$(head -3 nbdcopy.err) $(cmp out.raw "ref-$img.raw" 2>&1 | head -1)"
    fi
  done
  serve_stop "$img"
  rc=0
  "$QCOWKIT" bench -f "$fmt" -t none -d 16 --random -c 2000 -s 4k "$img" >b.out 2>b.err || rc=$?
  if [ "$rc" -eq 0 ] && grep -q '^Run completed' b.out; then ok "$img: bench -t none -d 16"
  else bad "$img: bench -t none -d 16" "exit $rc: $(head -c 300 b.err)"; fi
done

# A pipelined batch with refused requests inside it.
serve_start qcowkit plain.qcow2 -t -r --cache=none -f qcow2 || finish
out=$(python3 - "$SOCK" plain.qcow2 <<'PYEOF' 2>&1
import socket, struct, subprocess, sys
sock_path, img = sys.argv[1], sys.argv[2]
ref = open("ref-plain.qcow2.raw", "rb").read()
s = socket.socket(socket.AF_UNIX)
s.connect(sock_path)
def rx(n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise SystemExit("server closed the connection")
        b += c
    return b
magic, opt, flags = struct.unpack(">QQH", rx(18))
s.sendall(struct.pack(">I", 3))                          # fixed newstyle, no zeroes
s.sendall(struct.pack(">QII", 0x49484156454F5054, 1, 0))  # NBD_OPT_EXPORT_NAME ""
size, tflags = struct.unpack(">QH", rx(10))
reqs = []
for i in range(24):
    off, ln, fl = (i * 655360 + 4096 * (i % 3)) % (16 << 20), 4096 * (1 + i % 4), 0
    if i == 5:
        off = size            # past the end
    if i == 11:
        fl = 0x8000           # a flag no one defined
    reqs.append((i, off, ln, fl))
s.sendall(b"".join(struct.pack(">IHHQQI", 0x25609513, fl, 0, i, off, ln) for i, off, ln, fl in reqs))
seen = {}
while len(seen) < len(reqs):
    m, err, cookie = struct.unpack(">IIQ", rx(16))
    if m != 0x67446698 or cookie in seen:
        raise SystemExit("bad reply: magic %x cookie %d (seen: %s)" % (m, cookie, cookie in seen))
    i, off, ln, fl = reqs[cookie]
    data = rx(ln) if err == 0 else b""
    seen[cookie] = err
    if cookie in (5, 11):
        if err != 22:
            raise SystemExit("request %d: error %d, not EINVAL" % (cookie, err))
    elif err != 0 or data != ref[off:off + ln]:
        raise SystemExit("request %d: error %d or wrong data" % (cookie, err))
s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 2, 99, 0, 0))   # NBD_CMD_DISC
print("ok")
PYEOF
)
[ "$out" = ok ] && ok "pipelined batch with refused requests" || bad "pipelined batch with refused requests" "$out"
serve_stop "refused in a batch"
finish
