#!/usr/bin/env bash
# nbdfuse as a client, against qcowkit serve and qemu-nbd: the export
# mounted as a file; its bytes equal qemu-img convert -O raw of the
# image; dd writes through it (and fsync); after unmounting and stopping
# the server, qemu-img check is clean and the written bytes are in the
# image. (The kernel's nbd-client needs /dev/nbd*, which a container
# usually lacks; nbdfuse goes through FUSE instead.)
# shellcheck source=../lib.sh
. "$(dirname "$0")/../lib.sh"
# shellcheck source=nbd.bash
. "$(dirname "$0")/nbd.bash"
need qemu-img qemu-io nbdfuse fusermount3
[ -c /dev/fuse ] || skip "no /dev/fuse on this machine"
cd "$T" || exit 1

qemu-img create -q -f qcow2 img.qcow2 16M
qemu-io -f qcow2 -c 'write -P 0x5a 1M 2M' -c 'write -z 4M 1M' img.qcow2 >/dev/null
qemu-img convert -O raw img.qcow2 want.raw
head -c 300000 /dev/urandom >new.bin

mounted=
cleanup_mount() { [ -n "$mounted" ] && fusermount3 -u "$T/mnt" 2>/dev/null; mounted=; }
trap 'cleanup_mount; nbd_cleanup' EXIT

for srv in $NBD_SERVERS; do
  cp img.qcow2 "$srv.qcow2"
  serve_start "$srv" "$srv.qcow2" -t -f qcow2 || continue
  mkdir -p mnt
  nbdfuse mnt/disk --unix "$SOCK" >fuse.log 2>&1 &
  fpid=$!
  for i in $(seq 100); do [ -e mnt/disk ] && break; sleep 0.05; done
  if [ ! -e mnt/disk ]; then
    kill $fpid 2>/dev/null
    bad "$srv: mount" "$(cat fuse.log)"
    serve_stop "$srv"
    continue
  fi
  mounted=1
  cmp -s mnt/disk want.raw && ok "$srv: read" || bad "$srv: read" "content differs"
  dd if=new.bin of=mnt/disk bs=4096 seek=1000 conv=notrunc,fsync status=none &&
    ok "$srv: dd write" || bad "$srv: dd write" "failed"
  cmp -s <(dd if=mnt/disk bs=4096 skip=1000 count=$((300000 / 4096 + 1)) status=none | head -c 300000) new.bin &&
    ok "$srv: read back" || bad "$srv: read back" "differs"
  cleanup_mount
  wait $fpid
  serve_stop "$srv"
  qemu-img check -q "$srv.qcow2" && ok "$srv: check" || bad "$srv: check" "not clean"
  dd if=new.bin of=want.raw bs=4096 seek=1000 conv=notrunc status=none
  qemu-img compare -q -F raw "$srv.qcow2" want.raw && ok "$srv: content" ||
    bad "$srv: content" "differs"
  qemu-img convert -O raw img.qcow2 want.raw
done
finish
