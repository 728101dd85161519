#!/usr/bin/env bash
# Compressed clusters read in runs: qcowkit reads the compressed data of
# guest-consecutive clusters that lie together in the file with one pread
# and decompresses each straight into the caller's buffer. Here the runs
# are broken every way a writer breaks them (clusters written in reverse
# order, a compressed cluster turned into a normal one by a partial write,
# one written again compressed elsewhere, a zero cluster and an unallocated
# one between, a partial last cluster), for zlib and zstd at 512 B, 64 KiB
# and 2 MiB clusters; reads of many offsets and lengths (one byte, unaligned
# spans, more than the largest batch) must show what qemu-io shows, byte
# for byte, and convert -O raw what qemu-img's does.
# shellcheck source=../lib.sh
. "$(dirname "$0")/../lib.sh"
# shellcheck source=readcmp.bash
. "$(dirname "$0")/readcmp.bash"
need qemu-img qemu-io

QK=$(cd "$(dirname "$QCOWKIT")" && pwd)/$(basename "$QCOWKIT")
cd "$T" || exit 1

# dump TOOL IMG OFF LEN: the hex dump of the read (timing lines left out).
dump() {
  if [ "$1" = qemu ]; then
    qemu-io -f qcow2 -r -c "read -v $3 $4" "$2"
  else
    "$QK" io -f qcow2 -r -c "read -v $3 $4" "$2"
  fi | grep -v ' ops; \|^read ' | sha256sum
}

# reads IMG "OFF LEN"...: each read shows the same bytes through both
# (lengths cut to 4 MiB, so the dumps stay small).
reads() {
  local img=$1 r
  shift
  for r in "$@"; do
    set -- $r
    [ "$2" -gt 4194304 ] && set -- "$1" 4194304
    if [ "$(dump qemu "$img" "$1" "$2")" = "$(dump qk "$img" "$1" "$2")" ]; then
      ok "$img read $1 $2"
    else
      bad "$img read $1 $2" "qcowkit's bytes differ from qemu-io's"
    fi
  done
}

for cs in 512 65536 2097152; do
  n=24                                # clusters of guest data
  size=$((n * cs + cs / 2))           # and half a cluster more
  for ct in zlib zstd; do
    img=r$cs-$ct.qcow2
    setup qemu-img create -q -f qcow2 -o "cluster_size=$cs,compression_type=$ct" "$img" "$size" || continue
    W=()
    for i in 7 6 5 4 3 2 1 0; do W+=(-c "write -c -P $((0x30 + i)) $((i * cs)) $cs"); done
    for i in $(seq 8 19); do W+=(-c "write -c -P $((0x40 + i)) $((i * cs)) $cs"); done
    W+=(-c "write -P 0x77 $((12 * cs + cs / 4)) $((cs / 8))"     # compressed -> normal
        -c "discard $((16 * cs)) $cs" -c "write -c -P 0x78 $((16 * cs)) $cs"  # elsewhere
        -c "write -z $((14 * cs)) $cs"                            # a zero cluster
        -c "write -c -P 0x79 $((21 * cs)) $cs" -c "write -c -P 0x7a $((22 * cs)) $cs"
        -c "write -P 0x7b $((n * cs)) $((cs / 2))")               # the partial last one
    setup qemu-io -f qcow2 "${W[@]}" "$img" || continue
    cmp_convert "$img convert" "$img"
    reads "$img" "0 $size" "0 1" "$((cs - 1)) 2" "100 $((8 * cs))" "$((3 * cs)) $((10 * cs))" \
      "$((11 * cs + 7)) $((7 * cs - 14))" "$((19 * cs)) $((size - 19 * cs))" \
      "$((n * cs + 3)) $((cs / 2 - 3))" "$((15 * cs)) $((2 * cs))"
  done
done
# Compressed data larger than one batch (256 KiB): 64 KiB clusters that
# compress to about half (random bytes and zeros alternating).
python3 - half.raw <<'EOF'
import random, sys
rng = random.Random(7)
with open(sys.argv[1], "wb") as f:
    for i in range(8 << 20 >> 12):
        f.write(rng.randbytes(2048) + bytes(2048))
EOF
for ct in zlib zstd; do
  img=half-$ct.qcow2
  setup qemu-img convert -f raw -O qcow2 -c -o compression_type=$ct half.raw "$img" || continue
  cmp_convert "$img convert" "$img"
  reads "$img" "0 4194304" "4095 3000000" "$((3 << 20)) $((5 << 20))"
done
finish
