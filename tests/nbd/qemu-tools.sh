#!/usr/bin/env bash
# QEMU's own tools as NBD clients, against qcowkit serve and qemu-nbd:
#   - qemu-img info / convert / compare against nbd+unix://: the size, and
#     the export converted to raw equals the image converted by qemu-img;
#   - qemu-io over NBD: write (also with FUA), write -z (with and without
#     unmap), discard, read -P back through the server; then, the server
#     stopped, qemu-img check finds the served file clean and qemu-io reads
#     the written patterns from the file itself;
#   - read-only (-r): reads work, a writable open is refused, the file
#     stays as it was;
#   - a named export (-x): the name selects it, another name is refused.
# shellcheck source=../lib.sh
. "$(dirname "$0")/../lib.sh"
# shellcheck source=nbd.bash
. "$(dirname "$0")/nbd.bash"
need qemu-img qemu-io
cd "$T" || exit 1

qemu-img create -q -f qcow2 base.qcow2 16M
qemu-io -f qcow2 -c 'write -P 0x11 0 4M' -c 'write -P 0x22 8M 1M' base.qcow2 >/dev/null
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 img.qcow2
qemu-io -f qcow2 -c 'write -P 0x33 1M 1M' -c 'write -z 2M 512k' -c 'write -P 0x44 12M 64k' \
  img.qcow2 >/dev/null
qemu-img convert -O raw img.qcow2 want.raw

# qio IMG-OR-URI CMD...: qemu-io on an NBD URI (or a file), one -c per CMD.
qio() {
  local target=$1 a args=()
  shift
  for a in "$@"; do args+=(-c "$a"); done
  if [[ $target == nbd* ]]; then
    qemu-io -f raw "${args[@]}" "$target"
  else
    qemu-io -f qcow2 "${args[@]}" "$target"
  fi
}

for srv in $NBD_SERVERS; do
  cp img.qcow2 "$srv.qcow2"

  # ---- reads: info, convert, compare ------------------------------------
  serve_start "$srv" "$srv.qcow2" -t -f qcow2 || continue
  size=$(qemu-img info --output=json "$URI" | python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])')
  [ "$size" = 16777216 ] && ok "$srv: info size" || bad "$srv: info size" "$size"
  qemu-img convert -f raw -O raw "$URI" got.raw &&
    cmp -s got.raw want.raw && ok "$srv: convert" || bad "$srv: convert" "content differs"
  qemu-img compare -f raw -F qcow2 "$URI" img.qcow2 >/dev/null &&
    ok "$srv: compare" || bad "$srv: compare" "exit $?"
  # convert to qcow2 from NBD keeps the holes (block status reached it)
  qemu-img convert -f raw -O qcow2 "$URI" got.qcow2 &&
    qemu-img compare -q got.qcow2 img.qcow2 && ok "$srv: convert qcow2" ||
    bad "$srv: convert qcow2" "differs"
  alloc=$(qemu-img map --output=json got.qcow2 | python3 -c '
import json, sys
print(sum(e["length"] for e in json.load(sys.stdin) if e["data"]))')
  # written data: 4M + 1M from the backing file, 1M + 64k on top, less the
  # 512k zeroed inside the first 4M
  [ "$alloc" = $(( (4 << 20) - (512 << 10) + (1 << 20) + (64 << 10) )) ] &&
    ok "$srv: sparse convert" || bad "$srv: sparse convert" "allocated $alloc"

  # ---- writes over NBD ----------------------------------------------------
  out=$(qio "$URI" 'write -P 0x55 0 64k' 'write -P 0x56 -f 5M 100k' \
    'write -z 9M 64k' 'write -z -u 3M 128k' 'discard 8M 64k' \
    'write -P 0x57 1000 3000' 'read -P 0x55 0 1000' 'read -P 0x57 1000 3000' \
    'read -P 0x56 5M 100k' 'read -P 0 9M 64k' 'read -P 0 3M 128k' 2>&1)
  if [ $? -eq 0 ] && ! grep -qi 'fail\|error\|mismatch' <<<"$out"; then
    ok "$srv: qemu-io writes"
  else
    bad "$srv: qemu-io writes" "$out"
  fi
  serve_stop "$srv writes"
  qemu-img check -q "$srv.qcow2" && ok "$srv: check clean" || bad "$srv: check" "not clean"
  out=$(qio "$srv.qcow2" 'read -P 0x55 0 1000' 'read -P 0x57 1000 3000' \
    'read -P 0x55 4000 61536' \
    'read -P 0x56 5M 100k' 'read -P 0 9M 64k' 'read -P 0 3M 128k' \
    'read -P 0x33 1M 1M' 'read -P 0x44 12M 64k' 'read -P 0x11 64k 936k' 2>&1)
  if [ $? -eq 0 ] && ! grep -qi 'fail\|error\|mismatch' <<<"$out"; then
    ok "$srv: file content"
  else
    bad "$srv: file content" "$out"
  fi

  # ---- read-only --------------------------------------------------------------
  cp img.qcow2 "$srv-ro.qcow2"
  serve_start "$srv" "$srv-ro.qcow2" -t -r -f qcow2 || continue
  out=$(qemu-io -r -f raw -c 'read -P 0x33 1M 1M' "$URI" 2>&1) &&
    ! grep -qi 'fail' <<<"$out" && ok "$srv: ro read" || bad "$srv: ro read" "$out"
  # a writable open of a read-only export is refused by the client itself
  # (it reads the READ_ONLY flag); malformed.sh sends the writes anyway
  qemu-io -f raw -c 'write -P 0x99 0 4k' "$URI" >/dev/null 2>&1 &&
    bad "$srv: ro open" "writable open accepted" || ok "$srv: ro open"
  serve_stop "$srv ro"
  qemu-img compare -q "$srv-ro.qcow2" img.qcow2 && ok "$srv: ro unchanged" ||
    bad "$srv: ro unchanged" "file changed"

  # ---- export names ------------------------------------------------------------
  serve_start "$srv" "$srv-ro.qcow2" -t -r -x disk1 -f qcow2 || continue
  qemu-img compare -f raw -F qcow2 "nbd+unix:///disk1?socket=$SOCK" img.qcow2 >/dev/null &&
    ok "$srv: named export" || bad "$srv: named export" "compare failed"
  qemu-img info "nbd+unix:///other?socket=$SOCK" >/dev/null 2>&1 &&
    bad "$srv: unknown export" "was accepted" || ok "$srv: unknown export"
  serve_stop "$srv named"
done
finish
