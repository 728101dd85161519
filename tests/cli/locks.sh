#!/usr/bin/env bash
# Destinations are locked before they change, and never one the source reads.
#
# 1. An image held by a server (qemu-nbd, then `qcowkit serve`): every
#    qcowkit command that would write it (create -f qcow2/raw, convert
#    -O qcow2/raw with and without -n, resize, io write, bench -w,
#    check -r) fails with one line naming the lock, and the image keeps
#    its bytes (sha256). qemu-img / qemu-io refuse the same commands with
#    'Failed to get "write" lock', which proves the setup. commit into the
#    held image (its overlay's backing file) is refused the same way, and
#    so is commit of an overlay another process holds.
# 2. create -o data_file=X with X held: refused, X unchanged, a new image
#    file removed again, an existing one unchanged.
# 3. convert onto a file the source reads (itself, its backing file, a
#    file deeper in the chain, a symbolic or hard link to one, its external
#    data file; -O raw and qcow2, with -n, with -U, and as -o data_file):
#    refused with one line naming the relation, nothing changed.
#    create -b onto its own backing file under another name: refused.
# 4. Regressions: create and convert onto existing unlocked files still
#    replace them, and make the target of a dangling symbolic link.
# shellcheck source=../lib.sh
. "$(dirname "$0")/../lib.sh"
need qemu-img qemu-io qemu-nbd
cd "$T" || exit 1

HOLDER_PID=
# hold KIND FMT FILE: start KIND ("qemu-nbd" or "qcowkit") serving FILE
# read-write, so it holds the write lock; wait until it listens.
hold() {
  local kind=$1 fmt=$2 file=$3
  rm -f "$T/hold.sock" "$T/hold.pid"
  case $kind in
  qemu-nbd) qemu-nbd -k "$T/hold.sock" --pid-file "$T/hold.pid" -f "$fmt" "$file" \
              >"$T/hold.log" 2>&1 & ;;
  qcowkit) "$QCOWKIT" serve -k "$T/hold.sock" --pid-file "$T/hold.pid" -f "$fmt" "$file" \
              >"$T/hold.log" 2>&1 & ;;
  esac
  HOLDER_PID=$!
  for _ in $(seq 200); do
    [ -S "$T/hold.sock" ] && [ -s "$T/hold.pid" ] && return 0
    kill -0 "$HOLDER_PID" 2>/dev/null || break
    sleep 0.05
  done
  bad "$kind holds $file" "did not start: $(cat "$T/hold.log")"
  release
  return 1
}
# release [NAME]: stop the holder; with NAME, it must exit 0 and (qcowkit
# under a sanitizer) report nothing.
release() {
  local rc
  [ -n "$HOLDER_PID" ] || return 0
  kill -TERM "$HOLDER_PID" 2>/dev/null
  wait "$HOLDER_PID" 2>/dev/null; rc=$?
  HOLDER_PID=
  [ -n "${1:-}" ] || return 0
  if [ $rc -eq 0 ] && ! grep -q 'Sanitizer\|runtime error' "$T/hold.log"; then
    ok "$1"
  else
    bad "$1" "rc $rc: $(head -20 "$T/hold.log")"
  fi
}
trap 'release; rm -rf "$T"' EXIT

quiet() { "$@" >/dev/null; }
sum() { sha256sum "$@" | awk '{print $1}' | tr '\n' ' '; }

# refused NAME PATTERN FILES -- CMD...: CMD must exit 1 (not crash) with
# exactly one line on stderr matching PATTERN, and leave FILES unchanged.
refused() {
  local name=$1 pat=$2 files=() before rc
  shift 2
  while [ "$1" != -- ]; do files+=("$1"); shift; done
  shift
  before=$(sum "${files[@]}")
  "$@" >out 2>err; rc=$?
  if crashed $rc; then bad "$name" "crashed ($rc): $(head -5 err)"; return; fi
  [ $rc -eq 1 ] && ok "$name: exit" || bad "$name: exit" "rc $rc: $(cat err)"
  [ "$(wc -l <err)" -eq 1 ] && ok "$name: one line" || bad "$name: one line" "$(cat err)"
  grep -q -- "$pat" err && ok "$name: message" || bad "$name: message" "want /$pat/: $(cat err)"
  [ "$(sum "${files[@]}")" = "$before" ] && ok "$name: unchanged" ||
    bad "$name: unchanged" "${files[*]} changed"
}

# qemu_refuses NAME FILES -- CMD...: qemu-img/qemu-io refuse too (with its
# lock message) and change nothing: the setup really holds the lock.
qemu_refuses() {
  local name=$1 files=() before rc
  shift
  while [ "$1" != -- ]; do files+=("$1"); shift; done
  shift
  before=$(sum "${files[@]}")
  "$@" >out 2>err; rc=$?
  [ $rc -ne 0 ] && grep -q 'Failed to get "write" lock' err && ok "$name" ||
    bad "$name" "qemu refused not as expected (rc $rc): $(cat err)"
  [ "$(sum "${files[@]}")" = "$before" ] && ok "$name: unchanged" ||
    bad "$name: unchanged" "${files[*]} changed"
}

qemu-img create -q -f qcow2 src.qcow2 4M &&
  qemu-io -c 'write -P 0x44 0 1M' src.qcow2 >/dev/null || { bad setup "src.qcow2"; finish; }

# ---- 1. an image another process serves --------------------------------
L='Failed to get "write" lock: Is another process using the image \[img.qcow2\]?'
for holder in qemu-nbd qcowkit; do
  rm -f img.qcow2 new.qcow2
  qemu-img create -q -f qcow2 img.qcow2 4M &&
    qemu-io -c 'write -P 0x33 0 1M' img.qcow2 >/dev/null || { bad "$holder setup" img; continue; }
  qemu-img create -q -f qcow2 -b img.qcow2 -F qcow2 ov.qcow2 &&
    qemu-io -c 'write -P 0x55 0 64k' ov.qcow2 >/dev/null || { bad "$holder setup" ov; continue; }
  hold "$holder" qcow2 img.qcow2 || continue
  h="held by $holder"
  refused "create qcow2, $h" "$L" img.qcow2 -- "$QCOWKIT" create -q -f qcow2 img.qcow2 1M
  refused "create raw, $h" "$L" img.qcow2 -- "$QCOWKIT" create -q -f raw img.qcow2 1M
  refused "convert -O qcow2, $h" "$L" img.qcow2 -- "$QCOWKIT" convert -O qcow2 src.qcow2 img.qcow2
  refused "convert -O raw, $h" "$L" img.qcow2 -- "$QCOWKIT" convert -O raw src.qcow2 img.qcow2
  refused "convert -n -O qcow2, $h" "$L" img.qcow2 -- "$QCOWKIT" convert -n -O qcow2 src.qcow2 img.qcow2
  refused "convert -n -O raw, $h" "$L" img.qcow2 -- "$QCOWKIT" convert -n -O raw src.qcow2 img.qcow2
  refused "resize, $h" "$L" img.qcow2 -- "$QCOWKIT" resize img.qcow2 +1M
  refused "io write, $h" "$L" img.qcow2 -- "$QCOWKIT" io -c 'write -P 1 0 512' img.qcow2
  refused "bench -w, $h" "$L" img.qcow2 -- "$QCOWKIT" bench -w -c 1 img.qcow2
  refused "check -r all, $h" "$L" img.qcow2 -- "$QCOWKIT" check -r all img.qcow2
  # A data file another process holds: the new image goes again.
  refused "create data_file=held, $h" "$L" img.qcow2 -- \
    "$QCOWKIT" create -q -f qcow2 -o data_file=img.qcow2 new.qcow2 1M
  [ ! -e new.qcow2 ] && ok "create data_file=held, $h: new image removed" ||
    bad "create data_file=held, $h: new image removed" "new.qcow2 left behind"
  # ... and an image that was there keeps its bytes.
  head -c 70000 /dev/urandom >new.qcow2
  refused "create data_file=held over an existing image, $h" "$L" img.qcow2 new.qcow2 -- \
    "$QCOWKIT" create -q -f qcow2 -o data_file=img.qcow2 new.qcow2 1M

  # commit into a held base: refused before any write
  refused "commit into the held base, $h" "$L" img.qcow2 ov.qcow2 -- "$QCOWKIT" commit ov.qcow2
  refused "commit -b into the held base, $h" "$L" img.qcow2 ov.qcow2 -- \
    "$QCOWKIT" commit -b img.qcow2 ov.qcow2
  qemu-img commit ov.qcow2 >out 2>&1 && bad "qemu-img commit into the held base, $h" "it ran" ||
    { grep -q 'Failed to get shared "write" lock' out && ok "qemu-img commit, $h" ||
        bad "qemu-img commit into the held base, $h" "$(cat out)"; }
  qemu_refuses "qemu-img create, $h" img.qcow2 -- qemu-img create -q -f qcow2 img.qcow2 1M
  qemu_refuses "qemu-img convert -O qcow2, $h" img.qcow2 -- qemu-img convert -O qcow2 src.qcow2 img.qcow2
  qemu_refuses "qemu-img convert -O raw, $h" img.qcow2 -- qemu-img convert -O raw src.qcow2 img.qcow2
  qemu_refuses "qemu-img convert -n, $h" img.qcow2 -- qemu-img convert -n -O qcow2 src.qcow2 img.qcow2
  qemu_refuses "qemu-img resize, $h" img.qcow2 -- qemu-img resize img.qcow2 +1M
  qemu_refuses "qemu-io write, $h" img.qcow2 -- qemu-io -c 'write 0 512' img.qcow2
  qemu_refuses "qemu-img check -r all, $h" img.qcow2 -- qemu-img check -r all img.qcow2
  qemu_refuses "qemu-img create data_file=held, $h" img.qcow2 -- \
    qemu-img create -q -f qcow2 -o data_file=img.qcow2 new.qcow2 1M
  release "$holder exits cleanly"
done

# A top another process writes is not committed (its backing file free).
rm -f ov.qcow2 img.qcow2
qemu-img create -q -f qcow2 img.qcow2 4M &&
  qemu-img create -q -f qcow2 -b img.qcow2 -F qcow2 ov.qcow2 &&
  qemu-io -c 'write -P 0x56 0 64k' ov.qcow2 >/dev/null || bad "held top setup" ov
if hold qemu-nbd qcow2 ov.qcow2; then
  refused "commit of a held top" 'Failed to get "write" lock: Is another process using the image \[ov.qcow2\]?' \
    ov.qcow2 img.qcow2 -- "$QCOWKIT" commit ov.qcow2
  refused "commit -d of a held top" 'Failed to get shared "write" lock' ov.qcow2 img.qcow2 -- \
    "$QCOWKIT" commit -d ov.qcow2
  release "qemu-nbd exits cleanly"
fi

# ---- 3. files the source reads ---------------------------------------------
rm -f new.qcow2
head -c 1M /dev/urandom >base.raw
qemu-img create -q -f qcow2 -b base.raw -F raw overlay.qcow2 &&
  qemu-io -c 'write -P 0x55 0 64k' overlay.qcow2 >/dev/null &&
  qemu-img create -q -f qcow2 -o data_file=data.raw dsrc.qcow2 1M &&
  qemu-io -c 'write -P 0x66 0 64k' dsrc.qcow2 >/dev/null &&
  qemu-img create -q -f qcow2 -b overlay.qcow2 -F qcow2 top.qcow2 &&
  ln -s base.raw sym.raw && ln base.raw hard.raw &&
  ln -s overlay.qcow2 sym.qcow2 || { bad setup "chain"; finish; }
ALL=(base.raw overlay.qcow2 top.qcow2 dsrc.qcow2 data.raw)
for O in raw qcow2; do
  for n in "" -n; do
    for U in "" -U; do
      c="convert $n $U -O $O"
      refused "$c onto the backing file" "'base.raw' is the backing file of 'overlay.qcow2': refusing" \
        "${ALL[@]}" -- "$QCOWKIT" convert $n $U -O $O overlay.qcow2 base.raw
      refused "$c onto itself" "'overlay.qcow2' is the source image: refusing" \
        "${ALL[@]}" -- "$QCOWKIT" convert $n $U -O $O overlay.qcow2 overlay.qcow2
      refused "$c onto a symlink to the backing file" "'sym.raw' is the backing file of 'overlay.qcow2'" \
        "${ALL[@]}" -- "$QCOWKIT" convert $n $U -O $O overlay.qcow2 sym.raw
      refused "$c onto a hard link to the backing file" "'hard.raw' is the backing file of 'overlay.qcow2'" \
        "${ALL[@]}" -- "$QCOWKIT" convert $n $U -O $O overlay.qcow2 hard.raw
      refused "$c onto a symlink to itself" "'sym.qcow2' is the source image 'overlay.qcow2': refusing" \
        "${ALL[@]}" -- "$QCOWKIT" convert $n $U -O $O overlay.qcow2 sym.qcow2
      refused "$c onto the chain's bottom" "'base.raw' is the backing file of 'overlay.qcow2'" \
        "${ALL[@]}" -- "$QCOWKIT" convert $n $U -O $O top.qcow2 base.raw
      refused "$c onto the middle of the chain" "'overlay.qcow2' is the backing file of 'top.qcow2'" \
        "${ALL[@]}" -- "$QCOWKIT" convert $n $U -O $O top.qcow2 overlay.qcow2
      refused "$c onto the data file" "'data.raw' is the external data file of 'dsrc.qcow2': refusing" \
        "${ALL[@]}" -- "$QCOWKIT" convert $n $U -O $O dsrc.qcow2 data.raw
    done
  done
done
# The new image's data file is the source's backing file.
refused "convert -o data_file=backing" "'base.raw' is the backing file of 'overlay.qcow2'" \
  "${ALL[@]}" -- "$QCOWKIT" convert -O qcow2 -o data_file=base.raw overlay.qcow2 new.qcow2
[ ! -e new.qcow2 ] && ok "convert -o data_file=backing: no target" || bad "convert -o data_file=backing: no target" "new.qcow2 made"
# An existing target (-n) whose data file the source reads.
qemu-img create -q -f qcow2 -o data_file=base.raw tgt.qcow2 1M 2>/dev/null
# (qemu-img truncated base.raw to make it: make a fresh one)
head -c 1M /dev/urandom >base.raw
refused "convert -n -U into a target whose data file is the source's backing" \
  "'base.raw' is the backing file of 'overlay.qcow2'" "${ALL[@]}" -- \
  "$QCOWKIT" convert -n -U -O qcow2 overlay.qcow2 tgt.qcow2
# create -b: the new image is its backing file under another name.
refused "create -b onto its own backing file" "'overlay.qcow2' is the backing file 'sym.qcow2' itself" \
  "${ALL[@]}" -- "$QCOWKIT" create -q -f qcow2 -b sym.qcow2 -F qcow2 overlay.qcow2
# qemu-img refuses by its locks (the source holds them), except under -U.
for O in raw qcow2; do
  qemu_refuses "qemu-img convert -O $O onto the backing file" "${ALL[@]}" -- \
    qemu-img convert -O $O overlay.qcow2 base.raw
  qemu_refuses "qemu-img convert -O $O onto the data file" "${ALL[@]}" -- \
    qemu-img convert -O $O dsrc.qcow2 data.raw
done

# ---- 4. unlocked existing files are still replaced ---------------------
head -c 3M /dev/urandom >old.img
check "create over an existing file" "$QCOWKIT" create -q -f qcow2 old.img 2M
check "  it checks clean" qemu-img check -q old.img
[ "$(qemu-img info --output=json old.img | python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])')" = 2097152 ] &&
  ok "  its size" || bad "  its size" "$(qemu-img info old.img)"
head -c 3M /dev/urandom >old.raw
check "create raw over an existing file" "$QCOWKIT" create -q -f raw old.raw 1M
[ "$(stat -c %s old.raw)" = 1048576 ] && [ "$(sum old.raw)" = "$(head -c 1M /dev/zero | sum)" ] &&
  ok "  emptied" || bad "  emptied" "size $(stat -c %s old.raw)"
head -c 9M /dev/urandom >old.raw
check "convert -O raw over an existing file" "$QCOWKIT" convert -O raw overlay.qcow2 old.raw
check "  same content" qemu-img compare -q -f qcow2 -F raw overlay.qcow2 old.raw
head -c 9M /dev/urandom >old.qcow2
check "convert -O qcow2 over an existing file" "$QCOWKIT" convert -O qcow2 overlay.qcow2 old.qcow2
check "  same content" qemu-img compare -q overlay.qcow2 old.qcow2
check "  checks clean" qemu-img check -q old.qcow2
check "convert -n -O raw into an existing file" "$QCOWKIT" convert -n -O raw dsrc.qcow2 old.raw
check "  same content" qemu-img compare -q -f qcow2 -F raw dsrc.qcow2 old.raw
check "convert -n -O qcow2 into an existing image" "$QCOWKIT" convert -n -O qcow2 dsrc.qcow2 old.qcow2
check "  same content" qemu-img compare -q dsrc.qcow2 old.qcow2
head -c 2M /dev/urandom >old.data
check "create with an existing data file" "$QCOWKIT" create -q -f qcow2 -o data_file=old.data new2.qcow2 1M
check "  checks clean" qemu-img check -q new2.qcow2
check "  reads zeros" quiet qemu-io -c 'read -P 0 0 1M' new2.qcow2
rm -f fresh.raw fresh.qcow2
check "convert -O raw to a new file" "$QCOWKIT" convert -O raw overlay.qcow2 fresh.raw
check "convert -O qcow2 to a new file" "$QCOWKIT" convert -O qcow2 overlay.qcow2 fresh.qcow2
check "  same content" qemu-img compare -q fresh.raw fresh.qcow2
# A dangling symbolic link: its target is made, as qemu-img does.
ln -s made.qcow2 dangle.qcow2 && ln -s made.raw dangle.raw
check "create through a dangling symlink" "$QCOWKIT" create -q -f qcow2 dangle.qcow2 1M
check "  made its target" qemu-img check -q made.qcow2
check "convert -O raw through a dangling symlink" "$QCOWKIT" convert -O raw overlay.qcow2 dangle.raw
check "  same content" qemu-img compare -q -F raw overlay.qcow2 made.raw
finish
