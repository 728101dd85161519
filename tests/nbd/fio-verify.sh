#!/usr/bin/env bash
# fio's nbd engine with verification, against qcowkit serve and qemu-nbd:
# random writes of mixed sizes at queue depth 16 (pipelined, answered out
# of order) with crc32c checksums, read back and verified in the same run;
# then a random read/write mix verified the same way; then qemu-img check
# on the served file and fio's verify-only pass on a fresh server; all of
# it through the page cache and with --cache=none.
# shellcheck source=../lib.sh
. "$(dirname "$0")/../lib.sh"
# shellcheck source=nbd.bash
. "$(dirname "$0")/nbd.bash"
need qemu-img fio
fio --enghelp=nbd >/dev/null 2>&1 || skip "fio has no nbd engine"
cd "$T" || exit 1

# fio JOB URI [options]: run, fail on any error
run_fio() {
  local name=$1 uri=$2
  shift 2
  if fio --name="$name" --ioengine=nbd --uri="$uri" --iodepth=16 \
       --verify=crc32c --verify_fatal=1 --randseed=7 "$@" >"fio-$name.log" 2>&1 &&
     ! grep -q 'verify: bad\|err= *[1-9]' "fio-$name.log"; then
    ok "$srv: fio $name"
  else
    bad "$srv: fio $name" "$(tail -15 "fio-$name.log")"
  fi
}

# Each server twice: through the page cache, and with --cache=none
# (O_DIRECT: unaligned requests bounce or go through the page cache, and
# requests in flight overlap on worker threads).
for cache in writeback none; do
for srv in $NBD_SERVERS; do
  img=$srv-$cache.qcow2
  co=()
  [ "$cache" = none ] && co=(--cache=none)
  qemu-img create -q -f qcow2 "$img" 32M
  serve_start "$srv" "$img" -t -f qcow2 "${co[@]}" || continue
  run_fio "randwrite-$cache" "$URI" --rw=randwrite --size=16M --bsrange=512-64k --blockalign=512 \
    --do_verify=1
  run_fio "randrw-$cache" "$URI" --rw=randrw --bs=4k --offset=16M --size=8M --do_verify=1 \
    --verify_backlog=64
  serve_stop "$srv fio $cache"
  qemu-img check -q "$img" && ok "$srv: check $cache" || bad "$srv: check $cache" "not clean"
  # the data survived the server: verify only, through a new server
  serve_start "$srv" "$img" -t -r -f qcow2 "${co[@]}" || continue
  run_fio "verify-$cache" "$URI" --rw=randwrite --size=16M --bsrange=512-64k --blockalign=512 \
    --verify_only=1
  serve_stop "$srv verify $cache"
done
done
finish
