#!/usr/bin/env bash
# Seeded random write workloads over a matrix of image layouts, checked
# against a byte model and by QEMU's tools.
#
# Matrix: cluster size (512, 4k, 64k, 2M) x refcount_bits (1, 16, 64) x
# compat (0.10, 1.1) x (no backing file, an overlay over a base that
# qemu-io filled with data and compressed clusters), minus what qemu-img
# create refuses (compat=0.10 takes only refcount_bits=16); plus extended L2
# (64k and 2M clusters, with and without backing), images preallocated with
# preallocation=metadata, and images with an internal snapshot (clusters
# shared, refcount 2).
#
# Per image: python3 generates a few hundred random operations (write -P,
# write -c -P (whole clusters), write -z, write -z -u, discard at random
# offsets and lengths, some at
# cluster and L2-table boundaries and at the end of the image) and keeps the
# expected bytes; they run through `qcowkit io IMG -c ... -c ...` in batches,
# one process each, some with flush between operations. Afterwards
# `qemu-img check` finds no errors and no leaks, `qemu-img compare IMG
# model.raw` says identical, qemu-io reads a few ranges back with -P, and for
# snapshot images the snapshot applied to a copy still gives the old content.
# (Writes into images with persistent bitmaps: interop/bitmaps.sh.)
#
# Model: write -> the bytes; write -z (with or without -u) -> zeros; discard
# -> the whole clusters inside the range read as zeros (a range reaching the
# end of the image also covers its last partial cluster), partial clusters
# unchanged; except v2 images with a backing file, where discard changes
# nothing. QK_SEED (default 4242) changes the workloads; a failure names the
# seed of its image.
# shellcheck source=../lib.sh
. "$(dirname "$0")/../lib.sh"
# shellcheck source=readcmp.bash
. "$(dirname "$0")/readcmp.bash"
need qemu-img qemu-io python3

cd "$T" || exit 1
SEED=${QK_SEED:-4242}
M=1048576
# 12 MiB and 7 sectors: the last cluster is partial for clusters over 4k
SIZE=$((12 * M + 3584))
BATCHES=4
OPS=50          # per batch (4 x 50 = 200 operations per image)

cat >"$T/gen.py" <<'PYEOF'
import os, random, sys

def fill(seed, size, cs, with_compressed, with_zero):
    """qemu-io commands giving an image data, compressed and zero clusters
    in disjoint cluster-aligned ranges (compressed writes need fresh
    clusters)."""
    r = random.Random(seed)
    nclusters = size // cs                 # whole clusters only
    used = [False] * nclusters
    cmds = []
    for kind in ["data"] * 10 + (["comp"] * 5 if with_compressed else []) + (["zero"] * 3 if with_zero else []):
        for _ in range(20):
            n = r.randint(1, max(1, min(8, (256 * 1024) // cs)))
            c0 = r.randrange(0, max(1, nclusters - n))
            if c0 + n > nclusters or any(used[c0:c0 + n]):
                continue
            for c in range(c0, c0 + n):
                used[c] = True
            off, ln = c0 * cs, n * cs
            pat = r.randint(1, 255)
            if kind == "data":
                cmds.append("write -P %d %d %d" % (pat, off, ln))
            elif kind == "comp":
                cmds.append("write -c -P %d %d %d" % (pat, off, ln))
            else:
                cmds.append("write -z %d %d" % (off, ln))
            break
    for c in cmds:
        print(c)

def work(seed, size, cs, discard_noop, init, outdir, nbatch, nops):
    r = random.Random(seed)
    with open(init, "rb") as f:
        model = bytearray(f.read())
    if len(model) != size:
        sys.exit("initial raw image has %d bytes, want %d" % (len(model), size))
    l2span = cs * (cs // 8)               # bytes one L2 table maps (standard entries)
    # Requests span at most 64 clusters (32k..4M): every allocating write
    # costs a few metadata barriers, and small clusters mean many of them.
    maxlen = max(32 * 1024, min(64 * cs, 4 * 1024 * 1024))

    def pick_off():
        x = r.random()
        if x < 0.3:
            return r.randrange(0, (size + cs - 1) // cs) * cs
        if x < 0.75:
            return r.randrange(0, size)
        if x < 0.87:
            return max(0, size - r.randint(1, min(maxlen, 2 * cs)))
        b = r.randrange(0, size // l2span + 1) * l2span
        return min(size - 1, max(0, b + r.randint(-2048, 2048)))

    def pick_len(off):
        x = r.random()
        if x < 0.35:
            n = r.randint(1, 4096)
        elif x < 0.65:
            n = r.randint(1, 4) * cs - (off % cs if r.random() < 0.5 else 0)
        elif x < 0.9:
            n = r.randint(1, maxlen // 4)
        else:
            n = r.randint(1, maxlen)
        n = min(n, maxlen)
        if r.random() < 0.15 and size - off <= maxlen:
            n = size - off                 # to the end of the image
        return max(1, min(n, size - off))

    for b in range(nbatch):
        lines = []
        with_flush = b % 2 == 1
        for _ in range(nops):
            off = pick_off()
            ln = pick_len(off)
            x = r.random()
            if r.random() < 0.1:
                # compressed: whole clusters (the last one may be partial)
                off = off // cs * cs
                ln = min(r.randint(1, 4) * cs, size - off)
                pat = r.randint(0, 255)
                lines.append("write -c -P %d %d %d" % (pat, off, ln))
                model[off:off + ln] = bytes([pat]) * ln
            elif x < 0.45:
                pat = r.randint(0, 255)
                lines.append("write -P %d %d %d" % (pat, off, ln))
                model[off:off + ln] = bytes([pat]) * ln
            elif x < 0.65:
                lines.append("write -z %d %d" % (off, ln))
                model[off:off + ln] = bytes(ln)
            elif x < 0.8:
                lines.append("write -z -u %d %d" % (off, ln))
                model[off:off + ln] = bytes(ln)
            else:
                lines.append("discard %d %d" % (off, ln))
                if not discard_noop:
                    first = (off + cs - 1) // cs
                    end = off + ln
                    last = (end + cs - 1) // cs if end == size else end // cs
                    if last > first:
                        a, z = first * cs, min(size, last * cs)
                        model[a:z] = bytes(z - a)
            if with_flush and r.random() < 0.1:
                lines.append("flush")
        with open(os.path.join(outdir, "batch%d.cmds" % b), "w") as f:
            f.write("\n".join(lines) + "\n")
    with open(os.path.join(outdir, "model.raw"), "wb") as f:
        f.write(model)
    # read-back ranges holding one byte value, for qemu-io read -P
    reads = []
    for _ in range(8):
        off = r.randrange(0, size)
        v = model[off]
        end = off + 1
        while end < size and end - off < 65536 and model[end] == v:
            end += 1
        reads.append("read -P %d %d %d" % (v, off, end - off))
    with open(os.path.join(outdir, "reads.cmds"), "w") as f:
        f.write("\n".join(reads) + "\n")

if sys.argv[1] == "fill":
    fill(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1", sys.argv[6] == "1")
else:
    work(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1", sys.argv[6],
         sys.argv[7], int(sys.argv[8]), int(sys.argv[9]))
PYEOF

# qemu_fill IMG SEED CS COMPRESSED ZERO: fill IMG by qemu-io (gen.py fill).
qemu_fill() {
  local -a a=()
  local c
  while IFS= read -r c; do a+=(-c "$c"); done < <(python3 "$T/gen.py" fill "$2" "$SIZE" "$3" "$4" "$5")
  [ ${#a[@]} -eq 0 ] || setup qemu-io -f qcow2 "$1" "${a[@]}"
}

# workload NAME IMG SEED CS DISCARD_NOOP: the random workload on IMG and the
# checks after it. Results: one per batch, check, compare, read-back.
workload() {
  local n=$1 img=$2 seed=$3 cs=$4 noop=$5 b c
  local w="$T/w.$seed"
  mkdir -p "$w"
  rm -f "$w/init.raw"
  setup qemu-img convert -O raw "$img" "$w/init.raw" || return
  if ! python3 "$T/gen.py" work "$seed" "$SIZE" "$cs" "$noop" "$w/init.raw" "$w" "$BATCHES" "$OPS" >"$w/gen.err" 2>&1; then
    bad "$n" "test bug: gen.py failed: $(head -c 300 "$w/gen.err")"
    return
  fi
  for ((b = 0; b < BATCHES; b++)); do
    local -a a=()
    local nops
    while IFS= read -r c; do a+=(-c "$c"); done <"$w/batch$b.cmds"
    nops=$(grep -vc '^flush$' "$w/batch$b.cmds")
    run_qk "$w/out" "$w/err" io "$img" "${a[@]}"
    if [ "$qk_rc" -ne 0 ]; then
      bad "$n: batch $b" "$(qk_why "$w/err") [seed $seed]"
    elif [ "$(grep -cE '^(wrote|discard) [0-9]+/[0-9]+ bytes at offset' "$w/out")" -ne "$nops" ]; then
      bad "$n: batch $b" "not every operation reported success [seed $seed]"
    else
      ok "$n: batch $b"
    fi
  done
  if qemu-img check -f qcow2 "$img" >"$w/chk" 2>&1; then
    ok "$n: check"
  else
    bad "$n: check" "qemu-img check exit $? [seed $seed]: $(grep -v '^$' "$w/chk" | head -8 | tr '\n' '|')"
  fi
  if qemu-img compare -f qcow2 -F raw "$img" "$w/model.raw" >"$w/cmp" 2>&1; then
    ok "$n: content"
  else
    bad "$n: content" "differs from the model [seed $seed]: $(head -c 300 "$w/cmp" | tr '\n' ' ')"
  fi
  local -a r=()
  while IFS= read -r c; do r+=(-c "$c"); done <"$w/reads.cmds"
  if qemu-io -r -f qcow2 "$img" "${r[@]}" >"$w/rd" 2>&1 && ! grep -q 'Pattern verification failed' "$w/rd"; then
    ok "$n: qemu-io read-back"
  else
    bad "$n: qemu-io read-back" "[seed $seed] $(grep -v ' ops; ' "$w/rd" | head -6 | tr '\n' '|')"
  fi
  rm -rf "$w"
}

nimg=0
# one_image NAME CS REFBITS COMPAT BACKING(0/1) [EXTRA -o OPTIONS]
one_image() {
  local n=$1 cs=$2 rb=$3 compat=$4 backing=$5 extra=${6:-}
  local seed=$((SEED * 1000 + nimg)) opts="cluster_size=$cs,refcount_bits=$rb,compat=$compat$extra"
  local img="$T/img$nimg.qcow2" base="$T/base$nimg.qcow2" noop=0 zero=1
  nimg=$((nimg + 1))
  [ "$compat" = 0.10 ] && zero=0      # qemu-io write -z on v2 deallocates: fine, but no zero clusters
  if [ "$backing" = 1 ]; then
    setup qemu-img create -q -f qcow2 -o "$opts" "$base" "$SIZE" || return
    qemu_fill "$base" "$seed" "$cs" 1 "$zero"
    setup qemu-img create -q -f qcow2 -o "$opts" -b "$base" -F qcow2 "$img" "$SIZE" || return
    qemu_fill "$img" "$((seed + 500))" "$cs" 0 "$zero"
    [ "$compat" = 0.10 ] && noop=1
  else
    setup qemu-img create -q -f qcow2 -o "$opts" "$img" "$SIZE" || return
    qemu_fill "$img" "$seed" "$cs" 1 "$zero"
  fi
  workload "$n" "$img" "$seed" "$cs" "$noop"
  rm -f "$img" "$base"
}

count=0
for cs in 512 4096 65536 2097152; do
  for rb in 1 16 64; do
    for compat in 0.10 1.1; do
      [ "$compat" = 0.10 ] && [ "$rb" != 16 ] && continue
      for backing in 0 1; do
        one_image "cs=$cs refcount_bits=$rb compat=$compat backing=$backing" "$cs" "$rb" "$compat" "$backing"
        count=$((count + 1))
      done
    done
  done
done
for cs in 65536 2097152; do
  for backing in 0 1; do
    one_image "extended_l2 cs=$cs backing=$backing" "$cs" 16 1.1 "$backing" ",extended_l2=on"
    count=$((count + 1))
  done
done

# preallocation=metadata (every cluster allocated up front, reading zeros)
for spec in "65536 16 1.1" "4096 64 1.1" "65536 16 0.10" "2097152 1 1.1"; do
  read -r cs rb compat <<<"$spec"
  img="$T/prealloc.qcow2"
  if setup qemu-img create -q -f qcow2 -o "cluster_size=$cs,refcount_bits=$rb,compat=$compat,preallocation=metadata" "$img" "$SIZE"; then
    workload "preallocated cs=$cs refcount_bits=$rb compat=$compat" "$img" "$((SEED * 1000 + 900 + count))" "$cs" 0
  fi
  count=$((count + 1))
done

# internal snapshots: the workload writes over clusters the snapshot shares
for spec in "65536 16 1.1" "4096 16 0.10" "512 64 1.1"; do
  read -r cs rb compat <<<"$spec"
  img="$T/snap.qcow2"
  n="snapshot cs=$cs refcount_bits=$rb compat=$compat"
  seed=$((SEED * 1000 + 900 + count))
  count=$((count + 1))
  setup qemu-img create -q -f qcow2 -o "cluster_size=$cs,refcount_bits=$rb,compat=$compat" "$img" "$SIZE" || continue
  zero=1
  [ "$compat" = 0.10 ] && zero=0
  qemu_fill "$img" "$seed" "$cs" 1 "$zero"
  setup qemu-img snapshot -c s1 "$img" || continue
  setup qemu-img convert -O raw "$img" "$T/old.raw" || continue
  workload "$n" "$img" "$seed" "$cs" 0
  cp "$img" "$T/snapcopy.qcow2"
  if setup qemu-img snapshot -a s1 "$T/snapcopy.qcow2"; then
    if qemu-img compare -f qcow2 -F raw "$T/snapcopy.qcow2" "$T/old.raw" >"$T/cmp" 2>&1; then
      ok "$n: snapshot content kept"
    else
      bad "$n: snapshot content kept" "[seed $seed] $(head -c 300 "$T/cmp" | tr '\n' ' ')"
    fi
    if qemu-img check "$T/snapcopy.qcow2" >"$T/chk" 2>&1; then ok "$n: check after snapshot -a"
    else bad "$n: check after snapshot -a" "[seed $seed] $(grep -v '^$' "$T/chk" | head -6 | tr '\n' '|')"; fi
  fi
  rm -f "$img" "$T/snapcopy.qcow2" "$T/old.raw"
done

echo "write matrix: $count images, $((BATCHES * OPS)) operations each (seed $SEED)"
finish
