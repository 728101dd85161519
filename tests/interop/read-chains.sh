#!/usr/bin/env bash
# Read side, backing chains and external data files: qcow2 <- qcow2 <- qcow2
# (v3 and v2, with different data, zero clusters and compressed clusters in
# each layer), raw backing files, backing format recorded and not recorded,
# relative backing names resolved against the overlay's directory (images in
# a subdirectory, commands run from elsewhere), absolute backing names,
# backing files smaller than the overlay, extended-L2 overlays writing
# partial clusters over a backing file, external data files (raw and not).
# Compared with qemu-img 7.2: convert -O raw, map, info, info --backing-chain.
# shellcheck source=../lib.sh
. "$(dirname "$0")/../lib.sh"
# shellcheck source=readcmp.bash
. "$(dirname "$0")/readcmp.bash"
need qemu-img qemu-io python3

cd "$T" || exit 1
mkdir sub other

# strip_backing_fmt IMG: remove the backing-format header extension (qemu-img
# 7.2 refuses to write a backing file name without a format).
cat >"$T/strip.py" <<'EOF'
import struct, sys
with open(sys.argv[1], "r+b") as f:
    h = bytearray(f.read(4096))
    ver = struct.unpack(">I", h[4:8])[0]
    bfo, bfs = struct.unpack(">QI", h[8:20])
    name = bytes(h[bfo:bfo + bfs])
    hl = struct.unpack(">I", h[100:104])[0] if ver >= 3 else 72
    exts, o, found = [], hl, False
    while True:
        t, l = struct.unpack(">II", h[o:o + 8])
        if t == 0:
            break
        if t == 0xE2792ACA:
            found = True
        else:
            exts.append(bytes(h[o:o + 8 + ((l + 7) & ~7)]))
        o += 8 + ((l + 7) & ~7)
    if not found or bfo == 0:
        sys.exit("no backing format extension / backing file")
    blob = b"".join(exts) + b"\0" * 8
    new = blob + name
    h[hl:bfo + bfs] = new + b"\0" * (bfo + bfs - hl - len(new))
    h[8:16] = struct.pack(">Q", hl + len(blob))
    f.seek(0)
    f.write(h)
EOF
strip_backing_fmt() { setup python3 "$T/strip.py" "$1"; }

# in_dir DIR CMD...: run CMD (a function, so its ok/bad counts stay in this
# shell) with DIR as the current directory, then return to $T.
in_dir() {
  local d=$1 rc=0
  shift
  cd "$T/$d" || { bad "setup" "cd $d"; return 1; }
  "$@" || rc=$?
  cd "$T" || exit 1
  return $rc
}

# chain_checks NAME TOP [human]: the usual comparisons for the top of a chain.
chain_checks() {
  local n=$1 img=$2
  cmp_read_all "$n" "$img"
  cmp_json "$n: info --backing-chain json" info --backing-chain --output=json "$img"
  if [ "${3:-}" = human ]; then
    cmp_text "$n: map human" map "$img"
    cmp_text "$n: info human" info "$img"
    cmp_text "$n: info --backing-chain human" info --backing-chain "$img"
  fi
}

# ---- A: v3 qcow2 <- qcow2 <- qcow2 in sub/, different cluster sizes, top larger
make_chain_a() {
  setup qemu-img create -q -f qcow2 -o cluster_size=64k a-base.qcow2 4M &&
  setup qemu-io -c 'write -P 0xa1 0 1M' -c 'write -P 0xa2 2M 512k' -c 'write -P 0xa3 3584k 512k' a-base.qcow2 &&
  setup qemu-img create -q -f qcow2 -o cluster_size=4k -b a-base.qcow2 -F qcow2 a-mid.qcow2 4M &&
  setup qemu-io -c 'write -P 0xb1 512k 256k' -c 'write -z 2M 64k' -c 'write -P 0xb2 3584k 4k' \
    -c 'write -P 0xb3 3M 8k' a-mid.qcow2 &&
  setup qemu-img create -q -f qcow2 -o cluster_size=512 -b a-mid.qcow2 -F qcow2 a-top.qcow2 6M &&
  setup qemu-io -c 'write -P 0xc1 64k 4k' -c 'write -z 2304k 64k' -c 'write -P 0xc2 5M 64k' \
    -c 'write -P 0xc3 3M 1k' -c 'write -z 600k 1k' a-top.qcow2
}
in_dir sub make_chain_a
chain_checks "chain A (from parent dir)" sub/a-top.qcow2 human
in_dir other chain_checks "chain A (from sibling dir)" ../sub/a-top.qcow2 human
in_dir sub chain_checks "chain A (from image dir)" a-top.qcow2 human
cmp_read_all "chain A middle" sub/a-mid.qcow2
cmp_json "single image: info --backing-chain json" info --backing-chain --output=json sub/a-base.qcow2

# ---- B: v2 chain of depth 3 with compressed clusters in every layer ----------
make_chain_b() {
  setup qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=16k b-base.qcow2 2M &&
  setup qemu-io -c 'write -P 0xa1 0 512k' -c 'write -c -P 0xa2 1M 64k' b-base.qcow2 &&
  setup qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=16k -b b-base.qcow2 -F qcow2 b-mid.qcow2 2M &&
  setup qemu-io -c 'write -c -P 0xb1 64k 32k' -c 'write -z 1M 16k' -c 'write -P 0xb2 1536k 4k' b-mid.qcow2 &&
  setup qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=16k -b b-mid.qcow2 -F qcow2 b-top.qcow2 2M &&
  setup qemu-io -c 'write -P 0xc1 80k 4k' -c 'write -c -P 0xc2 1040k 16k' -c 'write -z 256k 32k' b-top.qcow2
}
in_dir sub make_chain_b
chain_checks "chain B v2 compressed" sub/b-top.qcow2

# v3 with zstd: compressed clusters at every depth, zero clusters over them
make_chain_z() {
  setup qemu-img create -q -f qcow2 -o compression_type=zstd z-base.qcow2 2M &&
  setup qemu-io -c 'write -c -P 0xa1 0 256k' -c 'write -P 0xa2 1M 64k' z-base.qcow2 &&
  setup qemu-img create -q -f qcow2 -o compression_type=zstd -b z-base.qcow2 -F qcow2 z-mid.qcow2 2M &&
  setup qemu-io -c 'write -z 64k 64k' -c 'write -c -P 0xb1 1M 64k' z-mid.qcow2 &&
  setup qemu-img create -q -f qcow2 -b z-mid.qcow2 -F qcow2 z-top.qcow2 2M &&
  setup qemu-io -c 'write -P 0xc1 1028k 4k' -c 'write -c -P 0xc2 192k 64k' z-top.qcow2
}
in_dir sub make_chain_z
chain_checks "chain zstd/zlib compressed" sub/z-top.qcow2

# ---- C: raw backing file, smaller than the overlay ----------------------------
make_raw_backing() {
  truncate -s 1M c-base.raw &&
  setup qemu-io -f raw -c 'write -P 0xa1 0 64k' -c 'write -P 0xa2 512k 4k' -c 'write -P 0xa3 1044480 4k' c-base.raw &&
  setup qemu-img create -q -f qcow2 -b c-base.raw -F raw c-top.qcow2 3M &&
  setup qemu-io -c 'write -P 0xc1 64k 64k' -c 'write -z 512k 4k' -c 'write -P 0xc2 2M 4k' c-top.qcow2
}
in_dir sub make_raw_backing
chain_checks "raw backing" sub/c-top.qcow2 human

# ---- D: backing format not recorded (probed): qcow2 and raw backing ----------
make_no_format() {
  setup qemu-img create -q -f qcow2 -b a-mid.qcow2 -F qcow2 d-top.qcow2 4M &&
  setup qemu-io -c 'write -P 0xd1 1M 64k' d-top.qcow2 &&
  strip_backing_fmt d-top.qcow2 &&
  setup qemu-img create -q -f qcow2 -b c-base.raw -F raw d-rawtop.qcow2 2M &&
  setup qemu-io -c 'write -P 0xd2 0 4k' d-rawtop.qcow2 &&
  strip_backing_fmt d-rawtop.qcow2 &&
  setup qemu-img create -q -f qcow2 -o compat=0.10 -b a-base.qcow2 -F qcow2 d-v2top.qcow2 4M &&
  strip_backing_fmt d-v2top.qcow2
}
in_dir sub make_no_format
if qemu-img info --output=json sub/d-top.qcow2 2>/dev/null | grep -q backing-filename-format; then
  bad "setup" "backing format still recorded in sub/d-top.qcow2"
fi
chain_checks "no backing format, qcow2 backing" sub/d-top.qcow2 human
chain_checks "no backing format, raw backing" sub/d-rawtop.qcow2 human
chain_checks "no backing format, v2 overlay" sub/d-v2top.qcow2

# ---- E: extended-L2 overlay, partial clusters over a smaller backing ---------
make_ext_overlay() {
  local cs=$1
  setup qemu-img create -q -f qcow2 -o cluster_size=64k e-base.qcow2 1000000 &&
  setup qemu-io -c 'write -P 0xa1 0 1000000' e-base.qcow2 &&
  setup qemu-img create -q -f qcow2 -o "extended_l2=on,cluster_size=$cs" -b e-base.qcow2 -F qcow2 "e-top-$cs.qcow2" 4M &&
  setup qemu-io -c 'write -P 0xc1 0 1k' -c 'write -P 0xc2 70k 2k' -c 'write -z 131072 4k' \
    -c 'write -P 0xc3 960k 64k' -c 'write -z 1048576 2k' -c 'write -P 0xc4 3M 512' "e-top-$cs.qcow2"
}
for cs in 16k 64k 2M; do
  in_dir sub make_ext_overlay "$cs"
  chain_checks "extended_l2 $cs overlay over smaller backing" "sub/e-top-$cs.qcow2" human
done

# ---- F: absolute backing name, zero-alloc in the overlay, v3 ------------------
make_abs() {
  setup qemu-img create -q -f qcow2 -b "$T/sub/a-base.qcow2" -F qcow2 f-top.qcow2 4M &&
  setup qemu-io -c 'write -P 0xf1 0 128k' -c 'write -z 0 64k' -c 'write -P 0xf2 3M 4k' f-top.qcow2
}
in_dir other make_abs
chain_checks "absolute backing name" other/f-top.qcow2 human
in_dir sub chain_checks "absolute backing name (from sub)" ../other/f-top.qcow2

# ---- G: overlay with 2M clusters over 512-byte clusters ----------------------
make_big_over_small() {
  setup qemu-img create -q -f qcow2 -o cluster_size=512 g-base.qcow2 6M &&
  setup qemu-io -c 'write -P 0xa1 0 40k' -c 'write -P 0xa2 1M 1k' -c 'write -P 0xa3 5M 512' g-base.qcow2 &&
  setup qemu-img create -q -f qcow2 -o cluster_size=2M -b g-base.qcow2 -F qcow2 g-top.qcow2 6M &&
  setup qemu-io -c 'write -P 0xc1 2M 4k' g-top.qcow2
}
in_dir sub make_big_over_small
chain_checks "2M clusters over 512-byte clusters" sub/g-top.qcow2 human

# ---- H: external data files (qemu 7.2 opens a relative data file name from
# the current directory, so these run inside the image directory) -------------
data_file_checks() {
  local raw img
  for raw in on off; do
    img=h-$raw.qcow2
    setup qemu-img create -q -f qcow2 -o "data_file=h-$raw.data,data_file_raw=$raw" "$img" 2M || continue
    setup qemu-io -c 'write -P 0xa1 64k 4k' -c 'write -z 256k 64k' -c 'write -P 0xa2 1M 64k' \
      -c 'write -z 1M 64k' -c 'write -P 0xa3 1536k 128k' -c 'write -P 0xa4 2093056 4k' "$img" || continue
    cmp_read_all "data file raw=$raw" "$img"
    cmp_text "data file raw=$raw: map human" map "$img"
    cmp_text "data file raw=$raw: info human" info "$img"
    cmp_json "data file raw=$raw: info --backing-chain json" info --backing-chain --output=json "$img"
  done
  # data file + extended L2
  if setup qemu-img create -q -f qcow2 -o data_file=h-ext.data,extended_l2=on h-ext.qcow2 2M &&
     setup qemu-io -c 'write -P 0xb1 0 2k' -c 'write -P 0xb2 70k 4k' -c 'write -z 72k 2k' h-ext.qcow2; then
    cmp_read_all "data file + extended_l2" h-ext.qcow2
    cmp_text "data file + extended_l2: map human" map h-ext.qcow2
  fi
  # data file (not raw) + backing file
  if setup qemu-img create -q -f qcow2 -o data_file=h-bk.data -b a-base.qcow2 -F qcow2 h-bk.qcow2 4M &&
     setup qemu-io -c 'write -P 0xb3 32k 4k' -c 'write -z 2M 64k' h-bk.qcow2; then
    chain_checks "data file + backing" h-bk.qcow2 human
  fi
}
in_dir sub data_file_checks

finish
