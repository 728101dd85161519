#!/usr/bin/env bash
# Read side, every cluster size (512 B .. 2 MiB) x compat 0.10/1.1 x
# uncompressed / zlib / zstd: images written by qemu-io, read back by qcowkit
# (convert -O raw, map, info) and compared with qemu-img 7.2.
# shellcheck source=../lib.sh
. "$(dirname "$0")/../lib.sh"
# shellcheck source=readcmp.bash
. "$(dirname "$0")/readcmp.bash"
need qemu-img qemu-io python3

cd "$T" || exit 1
V=12M           # virtual size; spans several L2 tables for clusters <= 8 KiB
SIZES="512 1024 2048 4096 8192 16384 32768 65536 131072 262144 524288 1048576 2097152"

# plain_writes CS: fills W with qemu-io commands: data in several L2 tables,
# partial clusters, the image's last bytes, zero-plain (3M, 8M..10M) and
# zero-alloc (4M) clusters in v3 (v2 deallocates instead), partial zero
# writes (6M+1k, and 3M/7M inside allocated 2M clusters).
plain_writes() {
  local cs=$1 za
  za=$(( cs > 65536 ? cs : 65536 ))
  W=(-c "write -P 0x11 0 4k"
     -c "write -P 0x22 40k 3k"
     -c "write -P 0x33 1M 64k"
     -c "write -P 0x45 2097664 512"
     -c "write -z 3M 64k"
     -c "write -P 0x66 4M $za" -c "write -z 4M $za"
     -c "write -P 0x67 6M 8k" -c "write -z 6292480 1k"
     -c "write -z 7M $(( cs < 1048576 ? cs : 1048576 ))"
     -c "write -z 8M 2M"
     -c "write -P 0x44 12578816 4k")
}

# compressed_writes CS: a normal cluster, single compressed clusters, and a
# run of consecutive compressed clusters (packed into shared host clusters).
compressed_writes() {
  local cs=$1
  W=(-c "write -P 0x11 0 4k"
     -c "write -c -P 0x55 2M $cs"
     -c "write -c -P 0x56 $((2097152 + 2 * cs)) $cs")
  if [ "$cs" -le 262144 ]; then W+=(-c "write -c -P 0x57 1M $((2 * cs))"); fi
  W+=(-c "write -P 0x44 12578816 4k")
}

for cs in $SIZES; do
  for variant in v2 v3 v2-zlib v3-zlib v3-zstd; do
    img=c$cs-$variant.qcow2
    case $variant in
      v2)      opts=compat=0.10 ;;
      v3)      opts=compat=1.1 ;;
      v2-zlib) opts=compat=0.10 ;;
      v3-zlib) opts=compat=1.1,compression_type=zlib ;;
      v3-zstd) opts=compat=1.1,compression_type=zstd ;;
    esac
    setup qemu-img create -q -f qcow2 -o "cluster_size=$cs,$opts" "$img" "$V" || continue
    case $variant in
      v2|v3) plain_writes "$cs" ;;
      *)     compressed_writes "$cs" ;;
    esac
    setup qemu-io "${W[@]}" "$img" || continue
    cmp_read_all "cluster $cs $variant" "$img"
    case $variant in
      v2|v3) cmp_text "cluster $cs $variant: map human" map "$img" ;;
    esac
    rm -f "$img"
  done
done

finish
