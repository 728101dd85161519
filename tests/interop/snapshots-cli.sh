#!/usr/bin/env bash
# The edges of internal snapshots, against qemu-img 7.2 (layouts and
# seeded workloads: snapshots.sh):
#   - refcount_bits=1: a snapshot of an empty image works (nothing is
#     shared); of an image with data it is refused with exit 1, the file
#     byte for byte unchanged and check clean (QEMU fails half way and
#     leaks); refcount_bits=2 at its limit (the third snapshot, an apply
#     that would need a fourth reference, a host cluster holding two
#     compressed clusters): refused the same way; after a delete the
#     apply works;
#   - L2 tables shared with a snapshot, copied by one qcowkit io process
#     for a write and for a discard that changes nothing in the table;
#   - persistent bitmaps, enabled and disabled: create and delete work and
#     keep the bitmaps; apply is refused with exit 1, "Device has active
#     dirty bitmaps" (qemu-img's words) and nothing changed;
#   - an external data file: create refused (qemu-img refuses too), the
#     image and the data file unchanged;
#   - names with spaces and unicode, the empty name, a name that is another
#     snapshot's id: listed as qemu-img lists them, read, applied and
#     deleted as qemu-img does (-a and -l look up an id first, -d a name);
#   - duplicate names: qcowkit refuses them (exit 1, the file unchanged);
#     duplicates QEMU made are listed, read, applied and deleted as
#     qemu-img does (the first of the name);
#   - ids after deletes: the largest numeric id + 1, as QEMU, whichever
#     tool took the earlier snapshots;
#   - not-found and usage errors: exit codes as qemu-img, and the messages
#     of -d, convert -l (names, snapshot.id=, snapshot.name=, bad keys);
#     "Cannot mix"; -q; -U on an image a running qemu-nbd holds (without
#     it the lock is refused as by qemu-img; -c refused with and without);
#     raw images; an image of size 0;
#   - apply gives back the snapshot's disk size (v3: taken, resized larger
#     by qemu-img, written, snapshotted again; applied both ways by both
#     tools; convert -l reads a snapshot at its own size where qemu-img
#     reads it at the current one: equal where they overlap), and a v2
#     image with snapshots cannot be resized.
# qemu-img check finds no errors and no leaks after every change.
# shellcheck source=../lib.sh
. "$(dirname "$0")/../lib.sh"
# shellcheck source=readcmp.bash
. "$(dirname "$0")/readcmp.bash"
# shellcheck source=snapshots.bash
. "$(dirname "$0")/snapshots.bash"
need qemu-img qemu-io python3

cd "$T" || exit 1
M=1048576
HELD_PID=
cleanup() {
  [ -n "$HELD_PID" ] && kill "$HELD_PID" 2>/dev/null
  rm -rf "$T"
}
trap cleanup EXIT

# raw IMG OUT: the guest content now.
raw() { setup qemu-img convert -t unsafe -O raw "$1" "$2"; }

# vsize IMG: virtual size as qemu-img reports it.
vsize() {
  qemu-img info --output=json "$1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])'
}

# tagcols IMG: the ID and TAG columns of qemu-img snapshot -l.
tagcols() { qemu-img snapshot -l "$1" | awk 'NR > 2 { print $1, $2 }'; }

# both NAME ARGS...: qcowkit and qemu-img run ARGS; the exit codes must be
# equal; leaves the messages (program name cut) in $T/both.qk, both.ref.
both() {
  local n=$1 ref_rc=0
  shift
  qemu-img "$@" >"$T/both.refout" 2>"$T/both.referr" || ref_rc=$?
  run_qk "$T/both.out" "$T/both.err" "$@"
  sed 's/^qemu-img: //' "$T/both.referr" >"$T/both.ref"
  sed 's/^qcowkit: //' "$T/both.err" >"$T/both.qk"
  if crashed "$qk_rc"; then bad "$n" "$(qk_why "$T/both.err")"
  elif [ "$qk_rc" -ne "$ref_rc" ]; then
    bad "$n" "exit $qk_rc, qemu-img exits $ref_rc [$*]: $(head -c 200 "$T/both.err")"
  else ok; fi
}

# same_msg NAME: the two messages of the last `both` are identical.
same_msg() {
  if cmp -s "$T/both.ref" "$T/both.qk"; then ok
  else bad "$1" "qemu-img: $(head -c 200 "$T/both.ref") | qcowkit: $(head -c 200 "$T/both.qk")"; fi
}

# ---- refcount_bits=1 and 2 -----------------------------------------------------

qemu-img create -q -f qcow2 -o refcount_bits=1 rc1e.qcow2 1M
cp rc1e.qcow2 rc1e-q.qcow2
sn "rc1: empty image, create (qk)" qk rc1e.qcow2 -c s1
sn "rc1: empty image, create (qemu)" qemu rc1e-q.qcow2 -c s1
# data written after it is the active image's alone
setup qemu-io -f qcow2 -c 'write -P 0x11 0 128k' rc1e.qcow2
chk "rc1: written after the snapshot" rc1e.qcow2
cp rc1e.qcow2 rc1.before
refused "rc1: create with data refused" 'refcount_bits=1' snapshot -c s2 rc1e.qcow2
unchanged "rc1: refused create changes nothing" rc1e.qcow2 rc1.before
chk "rc1: refused create" rc1e.qcow2
sn "rc1: apply of the empty snapshot (qk)" qk rc1e.qcow2 -a s1
sn "rc1: delete (qk)" qk rc1e.qcow2 -d s1
# QEMU (not asserted beyond refusing): what it leaves behind
cp rc1.before rc1q.qcow2
if qemu-img snapshot -c s2 rc1q.qcow2 >/dev/null 2>&1; then
  bad "rc1: qemu-img create" "test premise: qemu-img took a refcount_bits=1 snapshot of data"
else
  ok
  echo "note: qemu-img's failed refcount_bits=1 snapshot leaves: $(qemu-img check rc1q.qcow2 2>&1 | grep -c 'Leaked cluster') leaked clusters"
fi

qemu-img create -q -f qcow2 -o refcount_bits=2,cluster_size=4k rc2.qcow2 1M
setup qemu-io -f qcow2 -c 'write -P 0x21 0 64k' -c 'write -P 0x22 512k 8k' rc2.qcow2
raw rc2.qcow2 rc2-s1.raw
sn "rc2: create 1" qk rc2.qcow2 -c s1                  # data refcount 2
setup qemu-io -f qcow2 -c 'write -P 0x23 512k 4k' rc2.qcow2
raw rc2.qcow2 rc2-s2.raw
sn "rc2: create 2" qemu rc2.qcow2 -c s2                # 3: the limit
cp rc2.qcow2 rc2.before
refused "rc2: create 3 refused" 'refcount_bits=2 holds at most 3' snapshot -c s3 rc2.qcow2
unchanged "rc2: refused create changes nothing" rc2.qcow2 rc2.before
# apply raises the snapshot's references before dropping the old disk's
# (QEMU's order too): a fourth reference does not fit
refused "rc2: apply refused" 'refcount_bits=2 holds at most 3' snapshot -a s1 rc2.qcow2
unchanged "rc2: refused apply changes nothing" rc2.qcow2 rc2.before
chk "rc2: after the refusals" rc2.qcow2
sn "rc2: delete 2 (qemu)" qemu rc2.qcow2 -d s2
sn "rc2: apply 1 after the delete" qk rc2.qcow2 -a s1 &&
  content "rc2: content of 1" qemu rc2.qcow2 rc2-s1.raw
# two compressed clusters in one host cluster: refcount 2 already, and
# a snapshot would add one per entry
qemu-img create -q -f qcow2 -o refcount_bits=2,cluster_size=4k rc2c.qcow2 64k
setup qemu-io -f qcow2 -c 'write -c -P 0x31 0 4k' -c 'write -c -P 0x32 4k 4k' rc2c.qcow2
hosts=$(qemu-img map --output=json rc2c.qcow2 | python3 -c '
import json, sys
print(len([e for e in json.load(sys.stdin) if e["data"]]))')
cp rc2c.qcow2 rc2c.before
refused "rc2: compressed host cluster, create refused" 'holds at most 3' snapshot -c s1 rc2c.qcow2
unchanged "rc2: compressed, refused create changes nothing" rc2c.qcow2 rc2c.before
[ "$hosts" = 1 ] && ok || bad "rc2: premise" "qemu-io did not map the two compressed clusters as one run ($hosts)"

# ---- L2 tables shared with a snapshot -------------------------------------------------

# One qcowkit io process copies two shared L2 tables: the second copy is
# made for a discard that changes none of its entries, with the cache
# (sized for the disk's two tables) full of dirty ones. The copy must
# still reach the disk (it once stayed all zeros: the data was lost).
for who in qk qemu; do
  qemu-img create -q -f qcow2 -o cluster_size=4k "l2-$who.qcow2" 3M
  setup qemu-io -f qcow2 -c 'write -P 0x15 700000 20000' -c 'write -P 0x16 2433024 12288' "l2-$who.qcow2"
  sn "shared L2: snapshot ($who)" "$who" "l2-$who.qcow2" -c s1
  cp "l2-$who.qcow2" l2-ref.qcow2
  ops=(-c 'write -P 0x17 724992 14848' -c 'discard 2356736 10240')
  setup qemu-io -f qcow2 "${ops[@]}" l2-ref.qcow2
  run_qk l2.out l2.err io -f qcow2 "l2-$who.qcow2" "${ops[@]}"
  [ "$qk_rc" -eq 0 ] && ok || bad "shared L2 ($who): io" "$(qk_why l2.err)"
  chk "shared L2 ($who): io" "l2-$who.qcow2"
  qemu-img compare -q l2-ref.qcow2 "l2-$who.qcow2" && ok || bad "shared L2 ($who): content" "differs from qemu-io's"
done

# ---- persistent bitmaps and external data files -------------------------------------

for kind in enabled disabled; do
  img=bm-$kind.qcow2
  qemu-img create -q -f qcow2 "$img" 4M
  setup qemu-io -f qcow2 -c 'write -P 0x41 0 1M' "$img"
  if [ $kind = enabled ]; then setup qemu-img bitmap --add "$img" b0
  else setup qemu-img bitmap --add --disable "$img" b0; fi
  qemu-img info --output=json "$img" | python3 -c 'import json,sys; print(json.load(sys.stdin)["format-specific"]["data"]["bitmaps"])' >bm.want
  sn "bitmaps $kind: create" qk "$img" -c s1
  setup qemu-io -f qcow2 -c 'write -P 0x42 0 64k' "$img"
  cp "$img" bm.before
  refused "bitmaps $kind: apply refused" 'Device has active dirty bitmaps' snapshot -a s1 "$img"
  unchanged "bitmaps $kind: refused apply changes nothing" "$img" bm.before
  chk "bitmaps $kind: after the refusal" "$img"
  qemu-img snapshot -a s1 bm.before >bm.qerr 2>&1 &&
    bad "bitmaps $kind: premise" "qemu-img applied it" ||
    { grep -q 'Device has active dirty bitmaps' bm.qerr && ok ||
      bad "bitmaps $kind: premise" "qemu-img says: $(cat bm.qerr)"; }
  sn "bitmaps $kind: delete" qk "$img" -d s1
  qemu-img info --output=json "$img" | python3 -c 'import json,sys; print(json.load(sys.stdin)["format-specific"]["data"]["bitmaps"])' >bm.got
  unchanged "bitmaps $kind: bitmaps kept" bm.got bm.want
done

qemu-img create -q -f qcow2 -o data_file=df.data df.qcow2 1M
setup qemu-io -f qcow2 -c 'write -P 0x51 0 64k' df.qcow2
cp df.qcow2 df.before
cp df.data df.data.before
refused "data file: create refused" 'external data file' snapshot -c s1 df.qcow2
unchanged "data file: image unchanged" df.qcow2 df.before
unchanged "data file: data file unchanged" df.data df.data.before
if qemu-img snapshot -c s1 df.before >/dev/null 2>&1; then
  bad "data file: premise" "qemu-img took a snapshot of an image with a data file"
else ok; fi

# ---- names -----------------------------------------------------------------------

qemu-img create -q -f qcow2 n.qcow2 1M
uni='my snap ü 雪'
setup qemu-io -f qcow2 -c 'write -P 0x61 0 64k' n.qcow2
raw n.qcow2 n-1.raw
sn "names: unicode (qk)" qk n.qcow2 -c "$uni"
setup qemu-io -f qcow2 -c 'write -P 0x62 0 64k' n.qcow2
raw n.qcow2 n-2.raw
sn "names: spaces (qemu)" qemu n.qcow2 -c 'two  spaces'
setup qemu-io -f qcow2 -c 'write -P 0x63 0 64k' n.qcow2
raw n.qcow2 n-3.raw
sn "names: empty (qk)" qk n.qcow2 -c ''
reads "names" n.qcow2
content "names: qemu-img reads the unicode one" qemu n.qcow2 n-1.raw -l "$uni"
content "names: qcowkit reads the unicode one" qk n.qcow2 n-1.raw -l "$uni"
content "names: qcowkit reads 'two  spaces'" qk n.qcow2 n-2.raw -l 'two  spaces'
content "names: qcowkit reads snapshot.name=" qk n.qcow2 n-1.raw -l "snapshot.name=$uni"
# duplicates: refused, nothing changed
cp n.qcow2 n.before
refused "names: duplicate refused" 'already has a snapshot named' snapshot -c 'two  spaces' n.qcow2
unchanged "names: refused duplicate changes nothing" n.qcow2 n.before
refused "names: duplicate empty name refused" 'already has a snapshot named' snapshot -c '' n.qcow2
unchanged "names: refused duplicate empty name changes nothing" n.qcow2 n.before
# duplicates QEMU made: id 4 is named as id 2
setup qemu-io -f qcow2 -c 'write -P 0x64 0 64k' n.qcow2
sn "names: duplicate (qemu allows)" qemu n.qcow2 -c 'two  spaces'
reads "names: duplicates" n.qcow2
content "names: convert -l of a duplicate takes the first" qk n.qcow2 n-2.raw -l 'two  spaces'
refused "names: duplicate of a duplicate refused" 'already has a snapshot named' snapshot -c 'two  spaces' n.qcow2
cp n.qcow2 dq.qcow2
cp n.qcow2 dk.qcow2
sn "names: delete a duplicate (qemu)" qemu dq.qcow2 -d 'two  spaces'
sn "names: delete a duplicate (qk)" qk dk.qcow2 -d 'two  spaces'
qemu-img snapshot -l dq.qcow2 >dq.list
qemu-img snapshot -l dk.qcow2 >dk.list
unchanged "names: the same duplicate deleted" dk.list dq.list
cp n.qcow2 dq.qcow2
cp n.qcow2 dk.qcow2
sn "names: apply a duplicate (qemu)" qemu dq.qcow2 -a 'two  spaces'
sn "names: apply a duplicate (qk)" qk dk.qcow2 -a 'two  spaces' &&
  content "names: the first duplicate applied" qemu dk.qcow2 n-2.raw
# a name that is another snapshot's id: -a and -l take the id, -d the name
qemu-img create -q -f qcow2 num.qcow2 1M
setup qemu-io -f qcow2 -c 'write -P 0x71 0 64k' num.qcow2
raw num.qcow2 num-x.raw
sn "names: x (qk)" qk num.qcow2 -c x
setup qemu-io -f qcow2 -c 'write -P 0x72 0 64k' num.qcow2
sn "names: '1' (qk)" qk num.qcow2 -c 1
cmp_convert "names: convert -l 1 as qemu-img" num.qcow2 -l 1
content "names: convert -l 1 is id 1" qk num.qcow2 num-x.raw -l 1
cp num.qcow2 numq.qcow2
cp num.qcow2 numk.qcow2
sn "names: apply 1 (qemu)" qemu numq.qcow2 -a 1
sn "names: apply 1 (qk)" qk numk.qcow2 -a 1 && content "names: apply 1 is id 1" qemu numk.qcow2 num-x.raw
sn "names: delete 1 (qemu)" qemu numq.qcow2 -d 1
sn "names: delete 1 (qk)" qk numk.qcow2 -d 1
[ "$(tagcols numk.qcow2)" = "$(tagcols numq.qcow2)" ] && [ "$(tagcols numk.qcow2)" = "1 x" ] && ok ||
  bad "names: delete 1 deletes the name" "qcowkit left '$(tagcols numk.qcow2)', qemu-img '$(tagcols numq.qcow2)'"

# ---- ids after deletes ----------------------------------------------------------------

for tool in qk qemu; do
  qemu-img create -q -f qcow2 "ids-$tool.qcow2" 1M
  setup qemu-io -f qcow2 -c 'write -P 0x81 0 64k' "ids-$tool.qcow2"
  for step in "-c a" "-c b" "-c c" "-d c" "-c d" "-d a" "-c e" "-d d" "-c f"; do
    # shellcheck disable=SC2086
    sn "ids ($tool): $step" "$tool" "ids-$tool.qcow2" $step
  done
done
want=$'2 b\n4 e\n5 f'
[ "$(tagcols ids-qk.qcow2)" = "$want" ] && ok || bad "ids: qcowkit" "$(tagcols ids-qk.qcow2 | tr '\n' ' ')"
[ "$(tagcols ids-qemu.qcow2)" = "$want" ] && ok || bad "ids: premise" "qemu-img: $(tagcols ids-qemu.qcow2 | tr '\n' ' ')"
# each tool carries on from the other's table
sn "ids: qemu-img after qcowkit" qemu ids-qk.qcow2 -c g
sn "ids: qcowkit after qemu-img" qk ids-qemu.qcow2 -c g
[ "$(tagcols ids-qk.qcow2)" = "$(tagcols ids-qemu.qcow2)" ] && [ "$(tagcols ids-qk.qcow2 | tail -1)" = "6 g" ] && ok ||
  bad "ids: across tools" "$(tagcols ids-qk.qcow2 | tr '\n' ' ') vs $(tagcols ids-qemu.qcow2 | tr '\n' ' ')"

# ---- messages, exit codes, -q, -U -------------------------------------------------------

qemu-img create -q -f qcow2 m.qcow2 1M
setup qemu-io -f qcow2 -c 'write -P 0x91 0 64k' m.qcow2
setup qemu-img snapshot -c s1 m.qcow2
cp m.qcow2 m.before
both "msg: -a not found" snapshot -a nope m.qcow2
grep -q "^Could not apply snapshot 'nope': " "$T/both.qk" && ok || bad "msg: -a not found" "$(cat "$T/both.qk")"
both "msg: -d not found" snapshot -d nope m.qcow2
same_msg "msg: -d not found"
both "msg: -a id not found" snapshot -a 9 m.qcow2
both "msg: -d by id is by name" snapshot -d 1 m.qcow2
same_msg "msg: -d by id is by name"
both "msg: mix -l -a" snapshot -l -a s1 m.qcow2
grep -q "Cannot mix '-l', '-a', '-c', '-d'" "$T/both.qk" && ok || bad "msg: mix" "$(cat "$T/both.qk")"
both "msg: mix -c -d" snapshot -c x -d s1 m.qcow2
both "msg: -U with -c" snapshot -U -c x m.qcow2
same_msg "msg: -U with -c"
both "msg: missing file" snapshot -l nonexistent.qcow2
for spec in nope 9 snapshot.id=9 snapshot.name=nope 'snapshot.id=1,snapshot.name=other' \
  snapshot.foo=1 'snapshot.id=1,snapshot.foo=2'; do
  both "msg: convert -l $spec" convert -l "$spec" -O raw m.qcow2 "$T/m.raw"
  same_msg "msg: convert -l $spec"
done
unchanged "msg: the errors changed nothing" m.qcow2 m.before
# raw images have no snapshots: listing is empty, the rest refused
truncate -s 1M plain.raw
both "raw: -l" snapshot -l plain.raw
[ ! -s "$T/both.out" ] && ok || bad "raw: -l" "listed $(cat "$T/both.out")"
refused "raw: -c refused" 'no internal snapshots' snapshot -f raw -c x plain.raw
refused "raw: convert -l refused" 'does not support' convert -f raw -l x -O raw plain.raw "$T/p.raw"
# -q: nothing printed by -c, -a, -d; -l still lists
for a in "-c q1" "-a q1" "-d q1"; do
  # shellcheck disable=SC2086
  run_qk q.out q.err snapshot -q $a m.qcow2
  [ "$qk_rc" -eq 0 ] && [ ! -s q.out ] && [ ! -s q.err ] && ok || bad "-q $a" "exit $qk_rc: $(cat q.out q.err)"
  chk "-q $a" m.qcow2
done
cmp_text "-q -l" snapshot -q -l m.qcow2
# an image of size 0
qemu-img create -q -f qcow2 zero.qcow2 0
sn "size 0: create (qk)" qk zero.qcow2 -c s1
sn "size 0: apply (qemu)" qemu zero.qcow2 -a s1
sn "size 0: apply (qk)" qk zero.qcow2 -a s1
cmp_text "size 0: snapshot -l" snapshot -l zero.qcow2
sn "size 0: delete (qk)" qk zero.qcow2 -d s1

# -U: a qemu-nbd holds the image (write lock)
if command -v qemu-nbd >/dev/null 2>&1; then
  cp m.qcow2 held.qcow2
  raw held.qcow2 held.raw
  sn "held: snapshot" qk held.qcow2 -c held1
  qemu-nbd -f qcow2 -k "$T/held.sock" --pid-file "$T/held.pid" --fork held.qcow2 >held.log 2>&1
  HELD_PID=$(cat "$T/held.pid" 2>/dev/null)
  if [ -n "$HELD_PID" ]; then
    cp held.qcow2 held.before
    both "held: -l without -U" snapshot -l held.qcow2
    grep -q 'lock' "$T/both.qk" && ok || bad "held: -l without -U" "$(cat "$T/both.qk")"
    cmp_text "held: -U -l" snapshot -U -l held.qcow2
    content "held: convert -U -l" qk held.qcow2 held.raw -U -l held1
    both "held: -c refused" snapshot -c x held.qcow2
    both "held: -d refused" snapshot -d held1 held.qcow2
    unchanged "held: nothing changed" held.qcow2 held.before
    kill "$HELD_PID"
    for _ in $(seq 100); do kill -0 "$HELD_PID" 2>/dev/null || break; sleep 0.05; done
    HELD_PID=
    sn "held: delete once released" qk held.qcow2 -d held1
  else
    bad "held: qemu-nbd" "did not start: $(cat held.log)"
  fi
fi

# ---- apply gives back the snapshot's size -------------------------------------------

qemu-img create -q -f qcow2 -o cluster_size=4k sz.qcow2 4M
setup qemu-io -f qcow2 -c 'write -P 0xa1 0 1M' -c 'write -P 0xa2 3M 1M' sz.qcow2
raw sz.qcow2 sz-small.raw
sn "size: small (qk)" qk sz.qcow2 -c small
setup qemu-img resize -q sz.qcow2 12M
setup qemu-io -f qcow2 -c 'write -P 0xa3 10M 1M' -c 'write -P 0xa4 0 4k' sz.qcow2
raw sz.qcow2 sz-big.raw
sn "size: big (qemu)" qemu sz.qcow2 -c big
reads "size" sz.qcow2
# convert -l reads a snapshot at its own size; qemu-img 7.2 at the image's
# current size (zeros past the snapshot's end, or the snapshot cut short):
# equal where they overlap
content "size: convert -l small at its size" qk sz.qcow2 sz-small.raw -l small
qemu-img convert -O raw -l small sz.qcow2 sz-q.raw
[ "$(stat -c %s sz-q.raw)" = $((12 * M)) ] && cmp -s -n $((4 * M)) sz-q.raw sz-small.raw &&
  cmp -s -i $((4 * M)):0 -n $((8 * M)) sz-q.raw /dev/zero && ok ||
  bad "size: qemu-img convert -l small (premise)" "not the snapshot then zeros up to 12M"
for tool in qk qemu; do
  cp sz.qcow2 "sz-$tool.qcow2"
  sn "size: apply small ($tool)" "$tool" "sz-$tool.qcow2" -a small
  [ "$(vsize "sz-$tool.qcow2")" = $((4 * M)) ] && ok || bad "size: small ($tool)" "virtual size $(vsize "sz-$tool.qcow2")"
  content "size: small content ($tool)" qemu "sz-$tool.qcow2" sz-small.raw
  content "size: big still there ($tool)" qk "sz-$tool.qcow2" sz-big.raw -l big
  sn "size: apply big ($tool)" "$tool" "sz-$tool.qcow2" -a big
  [ "$(vsize "sz-$tool.qcow2")" = $((12 * M)) ] && ok || bad "size: big ($tool)" "virtual size $(vsize "sz-$tool.qcow2")"
  content "size: big content ($tool)" qemu "sz-$tool.qcow2" sz-big.raw
done
# and qemu-img reads what qcowkit's apply left as it reads its own
cmp_text "size: map after the applies" map sz-qk.qcow2
# a v2 image with snapshots cannot change size (no per-snapshot size)
qemu-img create -q -f qcow2 -o compat=0.10 v2.qcow2 1M
sn "size: v2 snapshot" qk v2.qcow2 -c s1
both "size: v2 resize refused" resize v2.qcow2 2M

finish
