#!/usr/bin/env bash
# Create side: `qcowkit create` against `qemu-img create` (7.2) with the same
# options. For every case both programs make an image in their own directory
# under the same relative names, then:
#   - the "Formatting ..." line is identical;
#   - qemu-img check finds no errors and no leaks in ours (exit 0);
#   - qemu-img info --output=json of both is equal except actual-size and
#     filename;
#   - qemu-img map --output=json of both is equal in start, length, present,
#     zero, data and depth (host offsets may differ; they do not);
#   - with qemu-img 7.2, every file (image and data file) is byte-identical;
#   - after the same qemu-io writes to both, ours still checks clean and
#     qemu-img compare finds the two identical.
# Bad option combinations must fail with exit 1 and one line naming the
# problem in qemu-img's words.
# shellcheck source=../lib.sh
. "$(dirname "$0")/../lib.sh"
# shellcheck source=readcmp.bash
. "$(dirname "$0")/readcmp.bash"
need qemu-img qemu-io python3

cd "$T" || exit 1
same_version=false
qemu-img --version | grep -q 'version 7\.2\.' && same_version=true

# Bases for backing files: a qcow2 with data, a raw file of an odd size.
if ! { qemu-img create -q -f qcow2 base.qcow2 3M &&
       qemu-io -f qcow2 -c 'write -P 0x11 0 1M' base.qcow2 >/dev/null &&
       head -c 5000 /dev/urandom >base.raw; }; then
  bad setup "could not make the base images"
  finish
fi

# cmpjson.py DIR_REF DIR_OUR: info.json (less actual-size and filename) and
# map.json (start, length, present, zero, data, depth of each entry) of the
# two directories must be equal; prints "vsize N" then one line per
# difference, exit status 1 when there is one.
cat >"$T/cmpjson.py" <<'PYEOF'
import json, sys
ref_dir, our_dir = sys.argv[1:3]
bad = 0
def load(d, name):
    with open("%s/%s" % (d, name)) as f:
        return json.load(f)
ri, oi = load(ref_dir, "info.json"), load(our_dir, "info.json")
print("vsize %d" % ri["virtual-size"])
for d in (ri, oi):
    for k in ("actual-size", "filename"):
        d.pop(k, None)
if ri != oi:
    print("info: qemu-img's %s\n    ours %s" % (json.dumps(ri, sort_keys=True)[:400],
                                            json.dumps(oi, sort_keys=True)[:400]))
    bad = 1
keys = ("start", "length", "present", "zero", "data", "depth")
rm = [{k: e.get(k) for k in keys} for e in load(ref_dir, "map.json")]
om = [{k: e.get(k) for k in keys} for e in load(our_dir, "map.json")]
if rm != om:
    print("map: qemu-img's %s\n    ours %s" % (json.dumps(rm)[:400], json.dumps(om)[:400]))
    bad = 1
sys.exit(bad)
PYEOF

# fresh_dirs: empty ref/ and our/, each with the base images.
fresh_dirs() {
  rm -rf "$T/ref" "$T/our"
  mkdir "$T/ref" "$T/our"
  cp base.qcow2 base.raw "$T/ref/"
  cp base.qcow2 base.raw "$T/our/"
}

# io_writes SIZE: set IO to qemu-io commands writing two patterns and
# zeros inside SIZE bytes.
io_writes() {
  local size=$1 len mid
  len=$(( size < 65536 ? size : 65536 ))
  mid=$(( size / 2 / 512 * 512 ))
  [ $((mid + len)) -gt "$size" ] && mid=$((size - len))
  IO=(-c "write -P 0x5a 0 $len" -c "write -P 0xa5 $mid $len"
      -c "write -z $((size - len)) $len")
}

# cmp_create NAME FMT SIZE [ARGS...]: `create -f FMT ARGS x.FMT SIZE` by both
# programs (SIZE "-" for none), then the checks listed at the top.
cmp_create() {
  local n=$1 fmt=$2 size=$3 img f vsize diffs
  shift 3
  img=x.$fmt
  local args=(-f "$fmt" "$@" "$img")
  [ "$size" != - ] && args+=("$size")
  fresh_dirs
  if ! (cd "$T/ref" && qemu-img create "${args[@]}" >out 2>err); then
    bad "$n: setup" "qemu-img create ${args[*]} failed: $(head -c 300 "$T/ref/err")"
    return
  fi
  cd "$T/our" && run_qk out err create "${args[@]}"
  cd "$T" || return
  if [ "$qk_rc" -ne 0 ]; then
    bad "$n: create" "$(qk_why "$T/our/err") [qcowkit create ${args[*]}]"
    return
  fi
  ok "$n: create"
  if cmp -s "$T/ref/out" "$T/our/out"; then ok "$n: formatting line"
  else bad "$n: formatting line" "qemu-img: $(cat "$T/ref/out") / qcowkit: $(cat "$T/our/out")"; fi

  if [ "$fmt" = qcow2 ]; then
    if (cd "$T/our" && qemu-img check "$img" >check.out 2>&1); then ok "$n: check"
    else bad "$n: check" "qemu-img check: $(tr '\n' ' ' <"$T/our/check.out" | head -c 400)"; fi
  fi
  for f in ref our; do
    (cd "$T/$f" && qemu-img info -f "$fmt" --output=json "$img" >info.json &&
       qemu-img map -f "$fmt" --output=json "$img" >map.json)
  done
  diffs=$(python3 "$T/cmpjson.py" "$T/ref" "$T/our")
  case $diffs in *"info: "*) bad "$n: info" "$(grep -A1 '^info: ' <<<"$diffs")" ;; *) ok "$n: info" ;; esac
  case $diffs in *"map: "*) bad "$n: map" "$(grep -A1 '^map: ' <<<"$diffs")" ;; *) ok "$n: map" ;; esac
  vsize=$(sed -n 's/^vsize //p' <<<"$diffs")
  if $same_version; then
    diffs=""
    for f in $(cd "$T/ref" && ls); do
      case $f in out|err|*.json|check.out) continue ;; esac
      cmp -s "$T/ref/$f" "$T/our/$f" || diffs="$diffs $f"
    done
    if [ -z "$diffs" ]; then ok "$n: identical files"
    else bad "$n: identical files" "differ from qemu-img's:$diffs"; fi
  fi

  # The layout must be usable: the same writes through QEMU on both.
  [ "${vsize:-0}" -gt 0 ] || return
  io_writes "$vsize"
  if ! (cd "$T/our" && qemu-io -f "$fmt" "${IO[@]}" "$img" >io.out 2>&1) ||
     ! (cd "$T/ref" && qemu-io -f "$fmt" "${IO[@]}" "$img" >io.out 2>&1); then
    bad "$n: write" "qemu-io failed: $(tr '\n' ' ' <"$T/our/io.out" | head -c 300)"
    return
  fi
  if [ "$fmt" = qcow2 ]; then
    if (cd "$T/our" && qemu-img check "$img" >check.out 2>&1); then ok "$n: check after writes"
    else bad "$n: check after writes" "qemu-img check: $(tr '\n' ' ' <"$T/our/check.out" | head -c 400)"; fi
  fi
  if same_content "$fmt" "$img"; then ok "$n: same content after writes"
  else bad "$n: same content after writes" "$(tr '\n' ' ' <"$T/cmp.out")"; fi
}

# same_content FMT IMG: ref/IMG and our/IMG read the same. QEMU 7.2 opens a
# data file relative to its working directory, so images with one are
# compared as raw copies, each made from its own directory.
same_content() {
  local fmt=$1 img=$2 rc=0
  if [ -e "$T/ref/x.data" ] || [ -e "$T/ref/x,y.data" ]; then
    { (cd "$T/ref" && qemu-img convert -O raw "$img" ../ref.raw) &&
      (cd "$T/our" && qemu-img convert -O raw "$img" ../our.raw) &&
      cmp "$T/ref.raw" "$T/our.raw"; } >"$T/cmp.out" 2>&1 || rc=1
    rm -f "$T/ref.raw" "$T/our.raw"
  else
    (cd "$T" && qemu-img compare -f "$fmt" -F "$fmt" "our/$img" "ref/$img") >"$T/cmp.out" 2>&1 || rc=1
  fi
  return $rc
}

# ---- qcow2: cluster sizes x preallocation, both compat levels ---------------
for cs in 512 4096 65536 2097152; do
  size=$(( cs * (cs > 65536 ? 3 : 37) + 1536 ))
  for p in off metadata falloc full; do
    cmp_create "cluster $cs $p" qcow2 $size -o "cluster_size=$cs,preallocation=$p"
    cmp_create "compat 0.10 cluster $cs $p" qcow2 $size -o "compat=0.10,cluster_size=$cs,preallocation=$p"
  done
done
# Preallocation over more than one L2 table (larger clusters need hundreds
# of megabytes for that, which qemu-img compare would read).
for cs in 512 4096; do
  for p in metadata falloc; do
    cmp_create "cluster $cs, 3 L2 tables, $p" qcow2 $(( (cs / 4 + 3) * cs )) -o "cluster_size=$cs,preallocation=$p"
  done
done
# Refcount blocks and table grown during preallocation (512-byte clusters),
# and a big empty image whose L1 table needs more refcount blocks.
cmp_create "cluster 512 17M metadata" qcow2 17M -o cluster_size=512,preallocation=metadata
cmp_create "cluster 512 17M falloc" qcow2 17M -o cluster_size=512,preallocation=falloc
cmp_create "cluster 512 20G" qcow2 20G -o cluster_size=512
cmp_create "cluster 64k 8T" qcow2 8T
cmp_create "size 0" qcow2 0
cmp_create "size 0 falloc" qcow2 0 -o preallocation=falloc
cmp_create "odd size" qcow2 1000001
cmp_create "compat v2 / v3 spelling" qcow2 1M -o compat=v2
cmp_create "compat 1.1" qcow2 1M -o compat=1.1

# ---- refcount widths ---------------------------------------------------------
for rb in 1 2 4 8 16 32 64; do
  cmp_create "refcount_bits $rb" qcow2 16M -o "refcount_bits=$rb"
  cmp_create "refcount_bits $rb cluster 512 metadata" qcow2 2M -o "refcount_bits=$rb,cluster_size=512,preallocation=metadata"
done

# ---- features ------------------------------------------------------------------
cmp_create "lazy refcounts" qcow2 8M -o lazy_refcounts=on
cmp_create "lazy refcounts metadata" qcow2 8M -o lazy_refcounts=on,preallocation=metadata
cmp_create "zstd" qcow2 8M -o compression_type=zstd
cmp_create "zstd + lazy + 8-bit refcounts" qcow2 8M -o compression_type=zstd,lazy_refcounts=on,refcount_bits=8
for cs in 16384 65536 2097152; do
  for p in off metadata falloc full; do
    cmp_create "extended_l2 cluster $cs $p" qcow2 $((cs * (cs > 65536 ? 3 : 20) + 1024)) -o "extended_l2=on,cluster_size=$cs,preallocation=$p"
  done
done
for p in off metadata falloc full; do
  cmp_create "data_file $p" qcow2 3000001 -o "data_file=x.data,preallocation=$p"
  cmp_create "data_file cluster 4k $p" qcow2 1M -o "data_file=x.data,cluster_size=4096,preallocation=$p"
  cmp_create "data_file extended_l2 $p" qcow2 100001 -o "data_file=x.data,extended_l2=on,preallocation=$p"
done
cmp_create "data_file_raw" qcow2 3000001 -o data_file=x.data,data_file_raw=on
cmp_create "data_file_raw cluster 512" qcow2 2M -o data_file=x.data,data_file_raw=on,cluster_size=512
cmp_create "data_file_raw full" qcow2 2M -o data_file=x.data,data_file_raw=on,preallocation=full
cmp_create "option flags and spellings" qcow2 1M -o lazy_refcounts,extended_l2=true,refcount_bits=0x10,cluster_size=32k -o compat=v3
cmp_create "comma in a file name" qcow2 1M -o "data_file=x,,y.data"

# ---- backing files ---------------------------------------------------------------
cmp_create "backing qcow2, size from it" qcow2 - -b base.qcow2 -F qcow2
cmp_create "backing qcow2 with size" qcow2 5M -b base.qcow2 -F qcow2
cmp_create "backing -u with size" qcow2 5M -u -b base.qcow2 -F qcow2
cmp_create "backing raw, size from it" qcow2 - -b base.raw -F raw
cmp_create "backing through -o" qcow2 - -o backing_file=base.qcow2,backing_fmt=qcow2
cmp_create "backing -b over -o" qcow2 - -b base.qcow2 -F qcow2 -o backing_fmt=raw
cmp_create "backing compat 0.10" qcow2 - -b base.qcow2 -F qcow2 -o compat=0.10
cmp_create "backing cluster 512" qcow2 - -b base.qcow2 -F qcow2 -o cluster_size=512
cmp_create "backing + data_file" qcow2 - -b base.qcow2 -F qcow2 -o data_file=x.data,cluster_size=4096
cmp_create "backing + extended_l2 metadata" qcow2 - -b base.qcow2 -F qcow2 -o extended_l2=on,preallocation=metadata
cmp_create "backing + extended_l2 falloc" qcow2 7M -b base.qcow2 -F qcow2 -o extended_l2=on,preallocation=falloc

# ---- raw ---------------------------------------------------------------------------
for s in 1 511 512 1001 4095 4097 1048577; do
  for p in off falloc full; do
    cmp_create "raw $s $p" raw "$s" -o "preallocation=$p"
  done
done
cmp_create "raw size 0" raw 0

# ---- bad options -------------------------------------------------------------------
# bad_case ARGS...: qemu-img and qcowkit both exit 1; ours says it on one
# line that contains qemu-img's first line (less its "qemu-img: FILE: "
# prefix); stdout (the "Formatting" line or nothing) is the same.
bad_case() {
  local n="bad: $*" ref_rc=0 want got
  fresh_dirs
  (cd "$T/ref" && qemu-img create "$@" >out 2>err) || ref_rc=$?
  cd "$T/our" && run_qk out err create "$@"
  cd "$T" || return
  want=$(head -1 "$T/ref/err" | sed -e 's/^qemu-img: //' -e 's/^x\.[a-z0-9]*: //')
  got=$(cat "$T/our/err")
  if [ "$ref_rc" -ne 1 ]; then bad "$n" "qemu-img exits $ref_rc (a test bug)"
  elif [ "$qk_rc" -ne 1 ]; then bad "$n" "$(qk_why "$T/our/err")"
  elif [ "$(wc -l <"$T/our/err")" -ne 1 ]; then bad "$n" "not one line: $got"
  elif [[ $got != qcowkit:* || $got != *"$want"* ]]; then bad "$n" "says '$got', qemu-img '$want'"
  elif ! cmp -s "$T/ref/out" "$T/our/out"; then
    bad "$n" "stdout '$(cat "$T/our/out")', qemu-img's '$(cat "$T/ref/out")'"
  else ok "$n"; fi
}
bad_case -f qcow2 -o cluster_size=1000 x.qcow2 1M
bad_case -f qcow2 -o cluster_size=256 x.qcow2 1M
bad_case -f qcow2 -o cluster_size=4M x.qcow2 1M
bad_case -f qcow2 -o cluster_size=abc x.qcow2 1M
bad_case -f qcow2 -o cluster_size=8k,extended_l2=on x.qcow2 1M
bad_case -f qcow2 -o refcount_bits=3 x.qcow2 1M
bad_case -f qcow2 -o refcount_bits=128 x.qcow2 1M
bad_case -f qcow2 -o refcount_bits=0 x.qcow2 1M
bad_case -f qcow2 -o refcount_bits=abc x.qcow2 1M
bad_case -f qcow2 -o compat=0.10,refcount_bits=8 x.qcow2 1M
bad_case -f qcow2 -o compat=0.10,lazy_refcounts=on x.qcow2 1M
bad_case -f qcow2 -o compat=0.10,compression_type=zstd x.qcow2 1M
bad_case -f qcow2 -o compat=0.10,data_file=x.data x.qcow2 1M
bad_case -f qcow2 -o compat=0.10,extended_l2=on x.qcow2 1M
bad_case -f qcow2 -o compat=0.9 x.qcow2 1M
bad_case -f qcow2 -o compression_type=lz4 x.qcow2 1M
bad_case -f qcow2 -o preallocation=foo x.qcow2 1M
bad_case -f qcow2 -o lazy_refcounts=maybe x.qcow2 1M
bad_case -f qcow2 -o data_file_raw=on x.qcow2 1M
bad_case -f qcow2 -o data_file=x.data,data_file_raw=on -b base.qcow2 -F qcow2 x.qcow2 1M
bad_case -f qcow2 -o foo=bar x.qcow2 1M
bad_case -f qcow2 -b base.qcow2 x.qcow2 1M
bad_case -f qcow2 -u -b base.qcow2 x.qcow2 1M
bad_case -f qcow2 -b missing.qcow2 -F qcow2 x.qcow2 1M
bad_case -f qcow2 -b base.qcow2 -F qcow2 -o preallocation=metadata x.qcow2 1M
bad_case -f qcow2 -o backing_fmt=qcow2 x.qcow2 1M
bad_case -f qcow2 -o backing_file= x.qcow2 1M
bad_case -f qcow2 -u -b x.qcow2 -F qcow2 x.qcow2 1M
bad_case -f qcow2 -u -b base.qcow2 -F qcow2 x.qcow2
bad_case -f qcow2 x.qcow2
bad_case -f qcow2 x.qcow2 1Q
bad_case -f qcow2 x.qcow2 8E
bad_case -f qcow2 -o size=2M x.qcow2 1M
bad_case -f qcow2 x.qcow2 1M extra
bad_case -f qcow2 -o cluster_size=512 x.qcow2 129G
bad_case -f qcow2 -o cluster_size=2M,extended_l2=on x.qcow2 2E
bad_case -f vmdk2 x.qcow2 1M
bad_case -f raw -o cluster_size=4k x.raw 1M
bad_case -f raw -b base.raw -F raw x.raw 1M
bad_case -f raw -o preallocation=metadata x.raw 1M
bad_case -f raw -o preallocation=bogus x.raw 1M

# -o help lists every option and creates nothing.
if out=$("$QCOWKIT" create -f qcow2 -o help x.qcow2 1M) && [ ! -e x.qcow2 ] &&
   [ "$(grep -c '=<' <<<"$out")" -eq 12 ]; then ok "-o help"
else bad "-o help" "$out"; fi

finish
