#!/usr/bin/env bash
# serve -l SNAPSHOT, against qemu-nbd -l: an internal snapshot exported
# read-only. The image has two snapshots (one taken by qemu-img, one by
# qcowkit) and an active disk that differs from both; each snapshot, named
# by name, by id or as snapshot.id=/snapshot.name=, is served and:
#   - its size is right (qemu-img info and nbdinfo over NBD), and the
#     export is read-only (nbdinfo);
#   - qemu-img convert and nbdcopy read exactly what qemu-img convert -l
#     reads from the file;
#   - a raw client's WRITE, WRITE_ZEROES and TRIM are refused with EPERM
#     (qemu-nbd: EPERM or EINVAL), the connection stays usable and reads
#     the snapshot; qemu-io refuses a writable open;
#   - the image file is byte for byte unchanged afterwards.
# A snapshot that does not exist: exit 1 and qemu-nbd's message, nothing
# left listening (qemu-nbd leaves its socket file behind).
# After the image grew, qcowkit exports a snapshot at its own size (as
# convert -l reads it), where qemu-nbd 7.2 uses the image's current size
# (zeros past the snapshot's end; and a snapshot larger than the image is
# cut short): the bytes they share must be equal, qemu-nbd's tail zero.
# shellcheck source=../lib.sh
. "$(dirname "$0")/../lib.sh"
# shellcheck source=nbd.bash
. "$(dirname "$0")/nbd.bash"
need qemu-img qemu-io python3
cd "$T" || exit 1
rawc=$QK_SRC/tests/nbd/rawclient.py
M=1048576

qemu-img create -q -f qcow2 img.qcow2 8M
qemu-io -f qcow2 -c 'write -P 0x11 0 2M' -c 'write -c -P 0x12 4M 256k' -c 'write -z 5M 64k' \
  img.qcow2 >/dev/null
qemu-img snapshot -c first img.qcow2
qemu-io -f qcow2 -c 'write -P 0x21 1M 2M' -c 'discard 4M 128k' -c 'write -P 0x22 8388096 512' \
  img.qcow2 >/dev/null
"$QCOWKIT" snapshot -c 'snap two' img.qcow2 || bad "setup" "qcowkit snapshot -c failed"
qemu-io -f qcow2 -c 'write -P 0x31 0 64k' -c 'write -P 0x32 7M 1M' img.qcow2 >/dev/null
qemu-img convert -O raw -l first img.qcow2 want-1.raw
qemu-img convert -O raw -l 'snap two' img.qcow2 want-2.raw
sum=$(sha256sum <img.qcow2)

# ro.py SOCKET SPEC WANT: writes refused, then a read of the first 64k
# equals WANT's.
cat >ro.py <<'PYEOF'
import os, sys
want = open(sys.argv[3], "rb").read(65536)
sys.argv = [sys.argv[0], sys.argv[1], "ro", sys.argv[2]]
exec(open(os.environ["RAWC"]).read().split("# ---- handshake cases")[0])
c = Conn().go()
assert c.tflags & 2, "export not flagged read-only"
for i, (typ, payload) in enumerate([(CMD_WRITE, b"\x99" * 4096), (CMD_WRITE_ZEROES, b""),
                                    (CMD_TRIM, b"")]):
    c.req(typ, 0, 4096, cookie=10 + i, payload=payload)
    cookie, err, _, _ = c.reply()
    assert cookie == 10 + i, "reply to %d, want %d" % (cookie, 10 + i)
    want_err(err, EPERM)
c.req(CMD_READ, 0, 65536, cookie=20)
cookie, err, chunks, _ = c.reply(65536)
assert err == 0, "read after the refusals: error %d" % err
assert assemble(0, 65536, chunks) == want, "read after the refusals: not the snapshot's data"
print("ok")
PYEOF

for srv in $NBD_SERVERS; do
  s=0
  spec "$srv" && s=1
  for spec in first 2 'snapshot.name=snap two' 'snapshot.id=1'; do
    case $spec in first | *id=1) k=1 ;; *) k=2 ;; esac
    n="$srv -l '$spec'"
    serve_start "$srv" img.qcow2 -t -f qcow2 -l "$spec" || continue
    size=$(qemu-img info -f raw --output=json "$URI" | python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])')
    [ "$size" = $((8 * M)) ] && ok || bad "$n: size" "$size, want the snapshot's $((8 * M))"
    rm -f got.raw
    qemu-img convert -f raw -O raw "$URI" got.raw &&
      cmp -s got.raw "want-$k.raw" && ok || bad "$n: qemu-img convert" "differs from convert -l"
    if command -v nbdinfo >/dev/null 2>&1; then
      nbdinfo --json "$URI" >info.json 2>&1
      python3 - info.json <<'PYEOF' >info.res 2>&1 && ok || bad "$n: nbdinfo" "$(cat info.res)"
import json, sys
d = json.load(open(sys.argv[1]))
e = d["exports"][0]
assert e["is_read_only"] is True, "not read-only"
assert e["export-size"] == 8 << 20, "size %d" % e["export-size"]
PYEOF
    fi
    if command -v nbdcopy >/dev/null 2>&1; then
      rm -f got.raw
      truncate -s $((8 * M)) got.raw
      timeout 60 nbdcopy "$URI" got.raw && cmp -s got.raw "want-$k.raw" && ok || bad "$n: nbdcopy" "differs"
    fi
    out=$(RAWC=$rawc timeout 60 python3 ro.py "$SOCK" $s "want-$k.raw" 2>&1)
    [ "$out" = ok ] && ok || bad "$n: writes refused" "$out"
    qemu-io -f raw -c 'write -P 0x99 0 4k' "$URI" >/dev/null 2>&1 &&
      bad "$n: writable open" "accepted" || ok
    serve_stop "$n"
  done
  rc=0
  if [ "$srv" = qcowkit ]; then
    timeout 30 "$QCOWKIT" serve -k "$T/nope.sock" -l nope img.qcow2 >nope.out 2>&1 || rc=$?
  else
    timeout 30 qemu-nbd -k "$T/nope.sock" -l nope img.qcow2 >nope.out 2>&1 || rc=$?
  fi
  [ "$rc" = 1 ] && grep -q "Failed to load snapshot: Can't find snapshot" nope.out && ok ||
    bad "$srv -l nope" "exit $rc: $(cat nope.out)"
  if spec "$srv"; then
    [ -e "$T/nope.sock" ] && bad "$srv -l nope" "socket left" || ok
  fi
done

# the image grown after the snapshots
cp img.qcow2 big.qcow2
qemu-img resize -q big.qcow2 12M
qemu-io -f qcow2 -c 'write -P 0x41 10M 1M' big.qcow2 >/dev/null
for srv in $NBD_SERVERS; do
  serve_start "$srv" big.qcow2 -t -f qcow2 -l 'snap two' || continue
  rm -f got.raw
  qemu-img convert -f raw -O raw "$URI" got.raw
  size=$(stat -c %s got.raw)
  if spec "$srv"; then
    [ "$size" = $((8 * M)) ] && cmp -s got.raw want-2.raw && ok ||
      bad "$srv: grown image" "size $size, or content differs from the snapshot's"
  else
    # qemu-nbd: the current size, zeros past the snapshot's 8M
    cmp -s -n $((8 * M)) got.raw want-2.raw && [ "$size" = $((12 * M)) ] &&
      cmp -s -i $((8 * M)):0 -n $((4 * M)) got.raw /dev/zero && ok ||
      bad "$srv: grown image (premise)" "size $size, or not the snapshot then zeros"
  fi
  serve_stop "$srv grown"
done
[ "$(sha256sum <img.qcow2)" = "$sum" ] && ok || bad "image unchanged" "the served file changed"
finish
