#!/usr/bin/env bash
# qcowkit measure against qemu-img 7.2 measure: the same command line runs
# through both, and each case must give the same exit status and, on
# success, byte-identical stdout (the numbers, and the JSON text with its
# key order, or the human lines); on failure qcowkit prints one error line
# holding qemu-img's first message.
#
# The matrix:
#   --size: sizes from 0 to the largest each cluster size allows (and past
#     it), odd ones, against every cluster size 512..2M, every refcount
#     width, extended L2 on and off, all preallocation modes and both
#     compat levels, raw and qcow2 targets, human and JSON output;
#   input images: raw (sparse, full, odd-sized, empty), qcow2 with data,
#     zero, compressed, discarded and partly written clusters (v2 and v3,
#     512 B to 2 MiB clusters, extended L2, every preallocation mode, an
#     external data file, a 16 TiB one), backing chains of depth 2 and 3
#     over raw and qcow2, persistent bitmaps (granularities 512 B to 2 MiB,
#     long names, disabled, in use), internal snapshots (-l by id, name and
#     snapshot.id=/snapshot.name=, of another size than the active image),
#     each measured for raw and for qcow2 targets of several geometries,
#     with -o backing_file, with -o size;
#   the errors: options (unknown, ill-typed, out of range, combinations),
#     -O formats qemu-img knows but cannot measure, operands, snapshots.
# shellcheck source=../lib.sh
. "$(dirname "$0")/../lib.sh"
# shellcheck source=readcmp.bash
. "$(dirname "$0")/readcmp.bash"
need qemu-img qemu-io python3

cd "$T" || exit 1
K=1024
M=$((1024 * K))
G=$((1024 * M))

# mcase ARGS...: qemu-img measure ARGS and qcowkit measure ARGS agree.
# (The two run at once: measuring never changes an image.)
mcase() {
  local rrc=0 want got pid
  qemu-img measure "$@" >m.ref 2>m.referr &
  pid=$!
  run_qk m.out m.err measure "$@"
  wait "$pid" || rrc=$?
  if crashed "$qk_rc"; then
    bad "measure $*" "$(qk_why m.err)"
  elif [ "$qk_rc" -ne "$rrc" ]; then
    bad "measure $*" "exit $qk_rc, qemu-img exits $rrc: qemu-img [$(tr '\n' ' ' <m.referr)$(tr '\n' ' ' <m.ref)] qcowkit [$(tr '\n' ' ' <m.err)$(tr '\n' ' ' <m.out)]"
  elif [ "$rrc" -eq 0 ]; then
    if cmp -s m.ref m.out; then ok
    else bad "measure $*" "output differs (- qemu-img, + qcowkit): $(diff m.ref m.out | grep '^[<>]' | tr '\n' ' ')"; fi
  else
    # qemu-img repeats the file name in open errors ("Could not open 'F':
    # Could not open 'F': ..."): there qcowkit's message (after the API
    # name) may be the end of qemu-img's.
    want=$(head -n1 m.referr | sed 's/^qemu-img: //')
    got=$(head -n1 m.err | sed 's/^qcowkit: //; s/^qk_[a-z_]*: //')
    if [ -s m.out ]; then
      bad "measure $*" "failed but printed on stdout: $(head -c 200 m.out)"
    elif ! head -n1 m.err | grep -q '^qcowkit: ' || [ -z "$got" ] ||
         { [[ $got != *"$want"* ]] && [[ $want != *"$got" ]]; }; then
      bad "measure $*" "message [$(head -n1 m.err)], qemu-img says [$want]"
    else
      ok
    fi
  fi
}

# ---- --size --------------------------------------------------------------------
clusters=(512 1024 2048 4096 8192 16384 32768 65536 131072 262144 524288 1048576 2097152)
rbits=(1 2 4 8 16 32 64)
modes=(off metadata falloc full)
sizes=(0 1 511 512 513 65535 65536 65537 1000000007 $G $((G + 512)) $((16 * 1024 * G))
       1P 4P $((1 << 61)) $((1 << 61 | 1)) 9223372036854775807)
# Every size against every cluster size; the other options turn with the
# case number so that each value meets many sizes and cluster sizes.
i=0
for s in "${sizes[@]}"; do
  for cs in "${clusters[@]}"; do
    rb=${rbits[$((i % 7))]}
    ext=$([ $((i / 7 % 2)) -eq 0 ] && echo off || echo on)
    mode=${modes[$((i / 3 % 4))]}
    compat=$([ $((i % 5)) -eq 0 ] && echo 0.10 || echo 1.1)
    [ "$compat" = 0.10 ] && rb=16
    mcase --output=json -O qcow2 -o "cluster_size=$cs,refcount_bits=$rb,extended_l2=$ext,preallocation=$mode,compat=$compat" --size "$s"
    i=$((i + 1))
  done
  mcase --output=json --size "$s"
  mcase -O qcow2 --size "$s"
done
# Every cluster size with every refcount width at one odd size, extended L2
# where it may be, both outputs.
for cs in "${clusters[@]}"; do
  for rb in "${rbits[@]}"; do
    ext=$([ "$cs" -ge 16384 ] && [ $((rb % 3)) -ne 1 ] && echo on || echo off)
    mcase --output=json -O qcow2 -o "cluster_size=$cs,refcount_bits=$rb,extended_l2=$ext" --size 3000000000
  done
  mcase -O qcow2 -o "cluster_size=$cs" --size 5G
done
for mode in "${modes[@]}"; do
  for compat in 0.10 1.1; do
    mcase -O qcow2 -o "preallocation=$mode,compat=$compat" --size 7777777
    mcase --output=json -O qcow2 -o "preallocation=$mode,compat=$compat,backing_file=b.qcow2" --size 100M
  done
  mcase -O raw -o "preallocation=$mode" --size 100001
done
# Options measure ignores, the QemuOpts syntax, the last of a key winning.
for o in lazy_refcounts=on nolazy_refcounts lazy_refcounts compression_type=zstd \
         data_file=x,data_file_raw=on backing_fmt=raw encryption=on encrypt.format=aes \
         nocow=on extent_size_hint=1M cluster_size=0x10000 cluster_size=0.5M \
         cluster_size=64k,cluster_size=4k refcount_bits=0x8 "refcount_bits= 16" \
         extended_l2=yes extended_l2=n size=1G size=16T,cluster_size=512 \
         compat=0.10,extended_l2=on compat=0.10,lazy_refcounts=on \
         backing_file=a,,b preallocation=full,backing_file=x; do
  mcase -O qcow2 -o "$o" --size 1G
done
mcase -O qcow2 -o cluster_size=4k -o refcount_bits=2 -o extended_l2=off --size 10G

# ---- input images ----------------------------------------------------------------
qio() { setup qemu-io -f "$1" "${@:3}" "$2"; }
mk() { setup qemu-img create -q "$@"; }

# raw: sparse (data at odd places), full, odd-sized, empty
truncate -s 64M sparse.raw
printf 'x%.0s' $(seq 1000) | dd of=sparse.raw bs=1 seek=$((M + 512)) conv=notrunc status=none
dd if=/dev/urandom of=sparse.raw bs=4k count=1 conv=notrunc status=none
dd if=/dev/urandom of=sparse.raw bs=128k count=1 seek=80 conv=notrunc status=none
dd if=/dev/urandom of=sparse.raw bs=1 count=100 seek=$((64 * M - 100)) conv=notrunc status=none
dd if=/dev/urandom of=full.raw bs=1M count=8 status=none
dd if=/dev/urandom of=odd.raw bs=1000001 count=1 status=none
: >empty.raw

# qcow2 v3, 64 KiB clusters: data, a partial write mid-cluster, zero
# clusters, compressed clusters, a discarded range, the last sector
mk -f qcow2 data.qcow2 $((20 * M + 512))
qio qcow2 data.qcow2 -c 'write -P 1 0 64k' -c 'write -P 2 100k 1k' -c 'write -z 1M 1M' \
  -c 'write -c -P 3 2M 64k' -c 'write -c -P 4 2176k 64k' -c 'write -P 5 3M 1M' \
  -c 'discard 3136k 512k' -c 'write -P 6 20M 512' -c 'write -z -u 5M 128k' -c 'write -P 0 8M 64k'
# v2 (no zero flag: zeros written are data or unallocated)
mk -f qcow2 -o compat=0.10 v2.qcow2 10M
qio qcow2 v2.qcow2 -c 'write -P 1 0 100k' -c 'write -z 1M 1M' -c 'write -P 2 5M 1M' -c 'discard 5M 512k'
# small and large clusters
mk -f qcow2 -o cluster_size=512 c512.qcow2 $((5 * M + 512))
qio qcow2 c512.qcow2 -c 'write -P 1 0 3k' -c 'write -P 2 1M 1' -c 'write -z 2M 64k' -c 'write -P 3 5M 512'
mk -f qcow2 -o cluster_size=2M c2m.qcow2 100M
qio qcow2 c2m.qcow2 -c 'write -P 1 0 4k' -c 'write -P 2 7M 3M' -c 'write -z 20M 4M' -c 'write -c -P 3 40M 2M'
# extended L2: subclusters written, zeroed and discarded
mk -f qcow2 -o extended_l2=on ext.qcow2 16M
qio qcow2 ext.qcow2 -c 'write -P 1 2k 2k' -c 'write -P 2 66k 4k' -c 'write -P 3 1M 256k' \
  -c 'write -z 1056k 64k' -c 'discard 1152k 32k' -c 'write -P 4 10M 2048'
# preallocation
for mode in metadata falloc full; do
  mk -f qcow2 -o preallocation=$mode pre-$mode.qcow2 8M
  qio qcow2 pre-$mode.qcow2 -c 'write -P 1 1M 64k' -c 'write -z 2M 1M'
done
# an external data file
mk -f qcow2 -o data_file=ext.data extdata.qcow2 8M
qio qcow2 extdata.qcow2 -c 'write -P 1 0 1M' -c 'write -P 2 5M 4k' -c 'write -z 6M 1M'
# a 16 TiB image, little written
mk -f qcow2 -o cluster_size=2M huge.qcow2 16T
qio qcow2 huge.qcow2 -c 'write -P 1 1G 1M' -c 'write -P 2 10T 4M'

# backing chains: raw <- qcow2 <- qcow2 (the top larger than the base),
# and qcow2 <- qcow2 with zero clusters over data
dd if=/dev/urandom of=base.raw bs=1M count=32 status=none
mk -f qcow2 -b base.raw -F raw mid.qcow2 32M
qio qcow2 mid.qcow2 -c 'write -z 0 4M' -c 'write -P 1 8M 64k' -c 'discard 16M 1M'
mk -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2 48M
qio qcow2 top.qcow2 -c 'write -P 2 1M 512' -c 'write -z 20M 2M' -c 'write -P 3 40M 1M'
mk -f qcow2 -o cluster_size=4k qbase.qcow2 16M
qio qcow2 qbase.qcow2 -c 'write -P 1 0 8M'
mk -f qcow2 -b qbase.qcow2 -F qcow2 qtop.qcow2 16M
qio qcow2 qtop.qcow2 -c 'write -z 0 2M' -c 'write -z 3M 4k' -c 'write -P 2 12M 1M'

# persistent bitmaps: granularities 512 B to 2 MiB, a long name, a disabled
# one; one image with a bitmap left in use
mk -f qcow2 bm.qcow2 $((100 * M + 4096))
qio qcow2 bm.qcow2 -c 'write -P 1 0 1M'
setup qemu-img bitmap --add -g 512 bm.qcow2 a
setup qemu-img bitmap --add bm.qcow2 bb
setup qemu-img bitmap --add -g 2M bm.qcow2 "$(printf 'n%.0s' $(seq 1000))"
setup qemu-img bitmap --add -g 4096 --disable bm.qcow2 d
mk -f qcow2 -o cluster_size=4k bm4k.qcow2 1G
setup qemu-img bitmap --add -g 65536 bm4k.qcow2 x
cp bm4k.qcow2 inuse.qcow2
python3 - inuse.qcow2 <<'PYEOF'
import struct, sys
f = open(sys.argv[1], "r+b")
hdr = f.read(104)
off = struct.unpack(">I", hdr[100:104])[0]
while True:
    f.seek(off)
    m, ln = struct.unpack(">II", f.read(8))
    if m == 0x23852875:
        nb, _, dsize, doff = struct.unpack(">IIQQ", f.read(24))
        f.seek(doff + 12)
        flags = struct.unpack(">I", f.read(4))[0]
        f.seek(doff + 12)
        f.write(struct.pack(">I", flags | 1))
        break
    if m == 0:
        sys.exit("no bitmaps extension")
    off += 8 + ((ln + 7) & ~7)
PYEOF

# internal snapshots: s1 at 10 MiB, s2 after more writes, then the image
# grows to 30 MiB
mk -f qcow2 snap.qcow2 10M
qio qcow2 snap.qcow2 -c 'write -P 1 0 2M'
setup qemu-img snapshot -c s1 snap.qcow2
qio qcow2 snap.qcow2 -c 'write -P 2 4M 1M' -c 'discard 0 1M'
setup qemu-img snapshot -c s2 snap.qcow2
setup qemu-img resize -q snap.qcow2 30M
qio qcow2 snap.qcow2 -c 'write -P 3 20M 3M'
setup qemu-img bitmap --add snap.qcow2 sb
# a snapshot smaller than the active image over a larger backing file:
# past the snapshot's end qemu-img sees the backing file
dd if=/dev/urandom of=sbase.raw bs=1M count=30 status=none
mk -f qcow2 -b sbase.raw -F raw sover.qcow2 10M
qio qcow2 sover.qcow2 -c 'write -P 1 1M 1M' -c 'write -z 4M 2M'
setup qemu-img snapshot -c s sover.qcow2
setup qemu-img resize -q sover.qcow2 40M
qio qcow2 sover.qcow2 -c 'write -P 2 35M 1M'
mk -f qcow2 zero.qcow2 0
settle

targets=(
  ""
  "-O qcow2"
  "-O qcow2 -o cluster_size=512,refcount_bits=1"
  "-O qcow2 -o cluster_size=4k,compat=0.10"
  "-O qcow2 -o cluster_size=2M,refcount_bits=64"
  "-O qcow2 -o cluster_size=16k,extended_l2=on,preallocation=metadata"
  "-O qcow2 -o backing_file=other.qcow2,cluster_size=128k"
  "-O qcow2 -o cluster_size=1M,refcount_bits=8,extended_l2=on,preallocation=falloc"
)
inputs=(sparse.raw full.raw odd.raw empty.raw data.qcow2 v2.qcow2 c512.qcow2 c2m.qcow2
        ext.qcow2 pre-metadata.qcow2 pre-falloc.qcow2 pre-full.qcow2 extdata.qcow2
        huge.qcow2 mid.qcow2 top.qcow2 qtop.qcow2 bm.qcow2 bm4k.qcow2 inuse.qcow2 snap.qcow2
        sover.qcow2 zero.qcow2)
for img in "${inputs[@]}"; do
  for t in "${targets[@]}"; do
    # shellcheck disable=SC2086 # the target's words
    mcase --output=json $t "$img"
  done
  mcase -O qcow2 "$img"
done
mcase -O raw data.qcow2
mcase -O qcow2 -o preallocation=full top.qcow2
# formats given, force-share, the input read as raw
mcase -f qcow2 -O qcow2 -U data.qcow2
mcase -f raw -O qcow2 data.qcow2
mcase -f raw -O qcow2 -o cluster_size=512 top.qcow2
mcase --force-share -O qcow2 --output=json bm.qcow2
# -o size with an input: held to the limits, otherwise ignored
mcase -O qcow2 -o size=1T data.qcow2
mcase -O qcow2 -o size=16T,cluster_size=512 data.qcow2
mcase -O qcow2 -o size=9E data.qcow2
mcase -O qcow2 -o size=18446744073709551615 data.qcow2
mcase -O raw -o size=1T data.qcow2
# snapshots
for l in s1 s2 1 2 snapshot.id=1 snapshot.name=s2 snapshot.id=2,snapshot.name=s2; do
  mcase -l "$l" --output=json -O qcow2 snap.qcow2
  mcase -l "$l" -O qcow2 -o cluster_size=4k snap.qcow2
done
mcase -l s1 snap.qcow2
mcase -l s1 -O qcow2 -o backing_file=x snap.qcow2
mcase -l s -O qcow2 sover.qcow2
mcase -l s -O qcow2 -o cluster_size=2M --output=json sover.qcow2
mcase -l s -O raw sover.qcow2

# ---- errors --------------------------------------------------------------------------
mcase -O qcow2
mcase --size 1G data.qcow2
mcase data.qcow2 snap.qcow2
mcase -f qcow2 --size 1G
mcase -l s1 --size 1G
mcase --output=xml --size 1G
mcase --size -1
mcase --size 9E
mcase --size 8E
mcase --size 1x
mcase --size ""
for o in compat=v3 compat=v2 compat=0.10,refcount_bits=8 compat= compat foo=bar nocow \
         preallocation=bogus preallocation=metadata,compat=bogus cluster_size=1000,compat=bogus \
         cluster_size=0 cluster_size=1000 cluster_size=4M cluster_size=1.5k cluster_size=64kB \
         cluster_size=16E cluster_size=9E cluster_size=abc cluster_size nocluster_size \
         cluster_size=4k,extended_l2=on cluster_size=8k,extended_l2=on extended_l2=maybe \
         extended_l2=ON refcount_bits=3 refcount_bits=0 refcount_bits=128 refcount_bits=-1 \
         refcount_bits=abc refcount_bits= refcount_bits=18446744073709551616 \
         encrypt=on encrypt.format=luks encrypt.format=luks,encrypt.key-secret=sec0 \
         encrypt.iter-time=x =x help refcount_bits=3,cluster_size=1000 \
         compat=bogus,refcount_bits=3 preallocation=bogus,refcount_bits=3 \
         encrypt.format=luks,preallocation=bogus cluster_size=512,encrypt.format=luks \
         size=abc cluster_size=64k,,x; do
  mcase -O qcow2 -o "$o" --size 1G
done
for o in ,cluster_size=64k cluster_size=64k, ""; do
  mcase -O qcow2 -o "$o" --size 1G
done
mcase -O qcow2 -o cluster_size=512 --size 16T
mcase -O qcow2 -o cluster_size=2M --size $(((1 << 61) + 1))
mcase -O raw -o cluster_size=64k --size 1G
mcase -O raw -o compat=1.1 --size 1G
mcase -O raw -o preallocation=bogus --size 1G
for f in vmdk qcow vdi vhdx vpc qed parallels file nbd dmg null-co vvfat bochs throttle luks bogus QCOW2; do
  mcase -O "$f" --size 1M
done
mcase -O luks -o key-secret=sec0 --size 1M
mcase -O luks -o cluster_size=4k --size 1M
mcase -l nosuch snap.qcow2
mcase -l snapshot.foo=1 snap.qcow2
mcase -l s1 sparse.raw
mcase nonexistent.img
mcase -O qcow2 -o cluster_size=512 -l s1 nonexistent.img

finish
