#!/usr/bin/env bash
# Read side, image features other than cluster size and backing chains:
# qemu-img convert -c (zlib, zstd, incompressible clusters), extended L2
# subclusters, virtual sizes that are not a multiple of the cluster size,
# the dirty bit, internal snapshots, persistent bitmaps, discarded clusters,
# refcount widths, preallocation, host-file holes, raw images. Every image is
# made here by qemu-img/qemu-io and read back by qcowkit (convert -O raw, map,
# info), compared with qemu-img 7.2.
# shellcheck source=../lib.sh
. "$(dirname "$0")/../lib.sh"
# shellcheck source=readcmp.bash
. "$(dirname "$0")/readcmp.bash"
need qemu-img qemu-io python3

cd "$T" || exit 1

# ---- qemu-img convert -c: zlib/zstd, compressible + incompressible data ------
# 3 MiB + 4 KiB source: text, random bytes (stored uncompressed by qemu since
# they do not shrink), zeros, a byte pattern; odd size -> partial last cluster.
python3 - <<'EOF'
import random
r = random.Random(7)
text = b"".join(b"line %06d of some highly compressible text\n" % i for i in range(20000))
out = bytearray()
out += text[:700 * 1024]
out += bytes(r.getrandbits(8) for _ in range(300 * 1024))
out += bytes(1024 * 1024)
out += b"\xa5" * (512 * 1024)
out += bytes(r.getrandbits(8) for _ in range(100 * 1024))
out += text[: 3 * 1024 * 1024 + 4096 - len(out)]
open("mixed.raw", "wb").write(out)
EOF
for cs in 512 4096 65536 2097152; do
  for ct in zlib zstd; do
    img=conv-c$cs-$ct.qcow2
    setup qemu-img convert -c -f raw -O qcow2 -o "cluster_size=$cs,compression_type=$ct" mixed.raw "$img" || continue
    cmp_read_all "convert -c cluster $cs $ct" "$img"
    rm -f "$img"
  done
done
if setup qemu-img convert -c -f raw -O qcow2 -o compat=0.10 mixed.raw conv-v2.qcow2; then
  cmp_read_all "convert -c compat 0.10" conv-v2.qcow2
  cmp_text "convert -c compat 0.10: info human" info conv-v2.qcow2
fi
rm -f conv-*.qcow2

# ---- extended L2: subcluster writes, zero subclusters, whole-cluster zero ----
for cs in 16384 32768 65536 131072 262144 524288 1048576 2097152; do
  sc=$((cs / 32))
  v=$(( 9 * cs > 4194304 ? 9 * cs : 4194304 ))
  img=ext-$cs.qcow2
  setup qemu-img create -q -f qcow2 -o "cluster_size=$cs,extended_l2=on" "$img" "$v" || continue
  setup qemu-io \
    -c "write -P 1 0 $sc" \
    -c "write -P 2 $((3 * sc)) $sc" \
    -c "write -P 3 $cs $cs" \
    -c "write -z $((cs + sc)) $sc" \
    -c "write -z $((4 * cs)) $sc" \
    -c "write -P 4 $((5 * cs + sc / 2)) $sc" \
    -c "write -P 5 $((6 * cs)) 4k" -c "write -z $((6 * cs)) $cs" \
    -c "write -P 6 $((7 * cs)) $((2 * sc))" \
    -c "write -P 7 $((v - 512)) 512" "$img" || continue
  cmp_read_all "extended_l2 cluster $cs" "$img"
  cmp_text "extended_l2 cluster $cs: map human" map "$img"
  rm -f "$img"
done
# compressed clusters in extended-L2 images
for ct in zlib zstd; do
  img=ext-c-$ct.qcow2
  setup qemu-img create -q -f qcow2 -o "extended_l2=on,compression_type=$ct" "$img" 4M || continue
  setup qemu-io -c "write -P 1 0 2k" -c "write -c -P 2 64k 128k" -c "write -z 1M 2k" \
    -c "write -c -P 3 3M 64k" "$img" || continue
  cmp_read_all "extended_l2 compressed $ct" "$img"
  cp "$img" ext-c.qcow2
done
cmp_text "extended_l2: info human" info ext-c.qcow2

# ---- virtual sizes that are not a multiple of the cluster size --------------
# 1000000 is rounded up to 1000448 by qemu-img; 3M+512.
for spec in "1000000 65536 1.1" "1000000 512 0.10" "3146240 65536 1.1" "3146240 2097152 1.1" "1000000 16384 1.1,extended_l2=on"; do
  set -- $spec
  size=$1 cs=$2 compat=$3
  img=odd-$size-$cs.qcow2
  setup qemu-img create -q -f qcow2 -o "cluster_size=$cs,compat=$compat" "$img" "$size" || continue
  vs=$(qemu-img info --output=json "$img" | python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])')
  last=$(( (vs - 1) / cs * cs ))
  setup qemu-io -c "write -P 1 0 4k" -c "write -P 2 $((vs - 1024)) 1024" "$img" || continue
  cmp_read_all "size $size cluster $cs" "$img"
  cmp_text "size $size cluster $cs: map human" map "$img"
  # compressed partial last cluster
  img=oddc-$size-$cs.qcow2
  setup qemu-img create -q -f qcow2 -o "cluster_size=$cs,compat=$compat" "$img" "$size" || continue
  setup qemu-io -c "write -c -P 3 $last $((vs - last))" "$img" || continue
  cmp_read_all "size $size cluster $cs compressed tail" "$img"
done
cmp_text "size 1000000: info human" info odd-1000000-65536.qcow2

# ---- dirty bit: lazy refcounts, writer killed --------------------------------
setup qemu-img create -q -f qcow2 -o lazy_refcounts=on dirty.qcow2 4M
# (in a subshell so that bash's "Killed" notice goes to /dev/null too)
( qemu-io -c 'write -P 1 0 64k' -c 'write -P 2 200k 8k' -c 'write -z 1M 64k' \
    -c 'write -P 3 3M 64k' -c 'sigraise 9' dirty.qcow2; true ) >/dev/null 2>&1
if qemu-img info --output=json dirty.qcow2 | grep -q '"dirty-flag": true'; then
  cmp_read_all "dirty image" dirty.qcow2
  cmp_text "dirty image: info human" info dirty.qcow2
else
  bad "setup" "dirty.qcow2 is not dirty after killing qemu-io"
fi

# ---- internal snapshots and persistent bitmaps -------------------------------
if setup qemu-img create -q -f qcow2 snap.qcow2 2M &&
   setup qemu-io -c 'write -P 1 0 64k' -c 'write -P 4 1M 64k' snap.qcow2 &&
   setup qemu-img snapshot -c snap1 snap.qcow2 &&
   setup qemu-io -c 'write -P 2 0 4k' -c 'write -P 3 512k 64k' snap.qcow2 &&
   setup qemu-img snapshot -c "second snapshot" snap.qcow2 &&
   setup qemu-io -c 'write -z 512k 64k' -c 'write -z 1M 64k' snap.qcow2 &&
   setup qemu-img bitmap --add snap.qcow2 b0 &&
   setup qemu-img bitmap --add -g 128k snap.qcow2 b1 &&
   setup qemu-img bitmap --disable snap.qcow2 b1 &&
   setup qemu-io -c 'write -P 5 1536k 4k' snap.qcow2; then
  cmp_read_all "snapshots+bitmaps" snap.qcow2
  cmp_text "snapshots+bitmaps: map human" map snap.qcow2
  cmp_text "snapshots+bitmaps: info human" info snap.qcow2
fi
# snapshots in a v2 image
if setup qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=4k snap2.qcow2 1M &&
   setup qemu-io -c 'write -P 1 0 8k' snap2.qcow2 &&
   setup qemu-img snapshot -c s1 snap2.qcow2 &&
   setup qemu-io -c 'write -P 2 4k 8k' snap2.qcow2; then
  cmp_read_all "v2 snapshot" snap2.qcow2
fi

# ---- discarded clusters (v3: zero-plain, v2: unallocated) --------------------
for compat in 1.1 0.10; do
  img=disc-$compat.qcow2
  setup qemu-img create -q -f qcow2 -o compat=$compat "$img" 2M || continue
  setup qemu-io -c 'write -P 1 0 256k' -c 'write -P 2 1M 128k' "$img" || continue
  setup qemu-io -d unmap -c 'discard 64k 64k' -c 'discard 1M 128k' "$img" || continue
  cmp_read_all "discard compat $compat" "$img"
  cmp_text "discard compat $compat: map human" map "$img"
done

# ---- refcount widths (read side unaffected; info reports them) ---------------
for rb in 1 64; do
  img=rc$rb.qcow2
  setup qemu-img create -q -f qcow2 -o "refcount_bits=$rb" "$img" 2M || continue
  setup qemu-io -c 'write -P 1 0 4k' -c 'write -c -P 2 64k 64k' -c 'write -c -P 3 128k 64k' "$img" || continue
  cmp_read_all "refcount_bits $rb" "$img"
done

# ---- preallocation and holes in the host file --------------------------------
# qemu-img map looks at the host file too: a hole under an allocated cluster
# is reported "zero": true, "data": true.
for pa in metadata falloc; do
  img=pre-$pa.qcow2
  setup qemu-img create -q -f qcow2 -o "preallocation=$pa" "$img" 1M || continue
  setup qemu-io -c 'write -P 1 64k 4k' "$img" || continue
  cmp_read_all "preallocation $pa" "$img"
done
if setup qemu-img create -q -f qcow2 hole.qcow2 1M &&
   setup qemu-io -c 'write -P 1 0 64k' -c 'write -P 2 128k 64k' hole.qcow2; then
  off=$(qemu-img map --output=json hole.qcow2 | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["offset"])')
  if setup fallocate -p -o $((off + 8192)) -l 16384 hole.qcow2; then
    cmp_read_all "host hole in a data cluster" hole.qcow2
    cmp_text "host hole in a data cluster: map human" map hole.qcow2
  fi
fi

# ---- raw images ---------------------------------------------------------------
head -c 1048576 /dev/urandom >full.raw
truncate -s 4M sparse.raw
setup qemu-io -f raw -c 'write -P 1 1M 4k' -c 'write -P 2 3149824 1k' -c 'write -P 3 4190208 4k' sparse.raw
head -c 1000001 /dev/urandom >odd.raw
for img in full.raw sparse.raw odd.raw; do
  cmp_read_all "raw $img" "$img"
  cmp_read_all "raw $img -f raw" "$img" raw
  cmp_text "raw $img: map human" map "$img"
  cmp_text "raw $img: info human" info "$img"
done

# ---- holes stay holes in convert -O raw ----------------------------------------
if setup qemu-img create -q -f qcow2 big.qcow2 64M &&
   setup qemu-io -c 'write -P 1 0 64k' -c 'write -P 2 30M 4k' -c 'write -P 3 63M 64k' \
     -c 'write -z 8M 16M' big.qcow2; then
  cmp_sparse "convert keeps holes (qcow2, mostly unallocated)" big.qcow2
fi
if setup qemu-img create -q -f qcow2 zeros.qcow2 32M &&
   setup qemu-io -c 'write -P 0 0 8M' -c 'write -P 7 8M 4k' -c 'write -z 8M 24M' zeros.qcow2; then
  cmp_sparse "convert keeps holes (zero clusters, zero data)" zeros.qcow2
fi
cmp_sparse "convert keeps holes (sparse raw)" sparse.raw

finish
