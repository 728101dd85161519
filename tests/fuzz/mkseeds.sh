#!/bin/bash
# Make the seed corpus of the fuzz targets with qemu-img and qemu-io: small
# images (a few KiB to a few hundred KiB) covering what the format can hold.
# Usage: mkseeds.sh OUTDIR. Without qemu-img it makes nothing and says so
# (the replay then runs the kept corpus alone).
set -eu
mkdir -p "$1"
out=$(cd "$1" && pwd)
if ! command -v qemu-img >/dev/null || ! command -v qemu-io >/dev/null; then
	echo "mkseeds: qemu-img or qemu-io not installed, no seeds made" >&2
	exit 0
fi
tmp=$(mktemp -d "${TMPDIR:-/tmp}/qkseeds.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"                # data files named relative to the images land here

# img NAME SIZE OPTS [QEMU-IO COMMANDS...]: create, write, keep.
img() {
	local name=$1 size=$2 opts=$3 f="$tmp/$1.qcow2"
	shift 3
	qemu-img create -q -f qcow2 ${opts:+-o "$opts"} "$f" "$size"
	local args=() c
	for c in "$@"; do args+=(-c "$c"); done
	[ ${#args[@]} -eq 0 ] || qemu-io -f qcow2 "${args[@]}" "$f" >/dev/null
	cp "$f" "$out/$name.qcow2"
}
# setbyte FILE OFFSET BYTE: patch one byte (header fields, feature bits).
setbyte() { printf "\\x$3" | dd of="$1" bs=1 seek="$2" conv=notrunc status=none; }

img v2 1M compat=0.10,cluster_size=4096 "write -P 0x11 0 6k" "write -P 0x22 300k 4k"
img v3 1M cluster_size=4096 "write -P 0x11 0 6k" "write -z 64k 8k" "write -P 0x33 700k 1k" \
	"discard 0 4k"
img v3-64k 4M "" "write -P 0x11 0 64k" "write -P 0x22 1M 4k"
img c512 256k cluster_size=512 "write -P 0x11 0 3k" "write -z 8k 2k" "write -P 0x44 100k 512"
img zlib 1M cluster_size=4096 "write -c -P 0x11 0 4k" "write -c -P 0x12 8k 4k" "write -P 0x13 64k 4k"
img zstd 1M cluster_size=4096,compression_type=zstd "write -c -P 0x11 0 4k" \
	"write -c -P 0x21 16k 4k" "write -P 0x13 64k 4k"
img extl2 2M cluster_size=16384,extended_l2=on "write -P 0x11 0 1k" "write -z 4k 1k" \
	"write -P 0x22 40k 3k" "write -c -P 0x33 64k 16k"
img extl2-64k 4M extended_l2=on "write -P 0x11 2k 2k" "write -z 64k 32k"
img zero-v3 1M cluster_size=4096 "write -P 0x11 0 64k" "write -z 0 32k" "write -z -u 32k 16k"
img rc1 1M cluster_size=4096,refcount_bits=1 "write -P 0x11 0 12k" "write -P 0x22 512k 4k"
img rc64 1M cluster_size=4096,refcount_bits=64 "write -P 0x11 0 12k" "write -P 0x22 512k 4k"
img rc2 1M cluster_size=4096,refcount_bits=2 "write -P 0x11 0 12k"
img lazy 1M cluster_size=4096,lazy_refcounts=on "write -P 0x11 0 8k"
cp "$out/lazy.qcow2" "$tmp/dirty.qcow2"
setbyte "$tmp/dirty.qcow2" 79 01          # incompatible bit 0: dirty
cp "$tmp/dirty.qcow2" "$out/dirty.qcow2"
cp "$out/v3.qcow2" "$tmp/corrupt.qcow2"
setbyte "$tmp/corrupt.qcow2" 79 02        # incompatible bit 1: corrupt
cp "$tmp/corrupt.qcow2" "$out/corrupt.qcow2"

# Snapshots: data shared between the active image and two snapshots.
img snap 1M cluster_size=4096 "write -P 0x11 0 16k"
qemu-img snapshot -c one "$tmp/snap.qcow2"
qemu-io -f qcow2 -c "write -P 0x22 4k 4k" "$tmp/snap.qcow2" >/dev/null
qemu-img snapshot -c two "$tmp/snap.qcow2"
qemu-io -f qcow2 -c "write -P 0x33 8k 4k" "$tmp/snap.qcow2" >/dev/null
cp "$tmp/snap.qcow2" "$out/snap.qcow2"
img snap-v2 1M compat=0.10,cluster_size=4096 "write -P 0x11 0 8k"
qemu-img snapshot -c s "$tmp/snap-v2.qcow2"
qemu-io -f qcow2 -c "write -P 0x22 0 4k" "$tmp/snap-v2.qcow2" >/dev/null
cp "$tmp/snap-v2.qcow2" "$out/snap-v2.qcow2"

# Persistent bitmaps: one enabled with bits set, one disabled.
img bitmap 1M cluster_size=4096
qemu-img bitmap --add "$tmp/bitmap.qcow2" b0
qemu-img bitmap --add -g 16k "$tmp/bitmap.qcow2" b1
qemu-io -f qcow2 -c "write -P 0x11 0 8k" -c "write -P 0x22 600k 4k" "$tmp/bitmap.qcow2" >/dev/null
qemu-img bitmap --disable "$tmp/bitmap.qcow2" b1
cp "$tmp/bitmap.qcow2" "$out/bitmap.qcow2"

# Headers naming other files: a backing file and an external data file.
qemu-img create -q -f qcow2 -o cluster_size=4096 "$tmp/base.qcow2" 1M
img backing 1M cluster_size=4096,backing_file=base.qcow2,backing_fmt=qcow2 "write -P 0x11 4k 4k"
img datafile 1M cluster_size=4096,data_file=data.raw "write -P 0x11 0 8k"
img datafile-raw 1M cluster_size=4096,data_file=data2.raw,data_file_raw=on "write -P 0x11 0 8k"
img prealloc 256k cluster_size=4096,preallocation=metadata
img big 1T cluster_size=65536 "write -P 0x11 0 4k" "write -P 0x22 512G 4k"
echo "mkseeds: $(ls "$out" | wc -l) seeds in $out"
