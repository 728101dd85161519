#!/usr/bin/env bash
# Several clients at once (-e 4), against qcowkit serve and qemu-nbd:
#   - four qemu-io clients write disjoint regions at the same time (many
#     small writes each, allocating clusters concurrently, some zero
#     writes); then qemu-img check is clean and every region holds its own
#     pattern, read from the file;
#   - four fio jobs (four connections) write and verify disjoint regions
#     with crc32c at queue depth 8;
#   - without -t the server exits 0 once the last of them has left.
# shellcheck source=../lib.sh
. "$(dirname "$0")/../lib.sh"
# shellcheck source=nbd.bash
. "$(dirname "$0")/nbd.bash"
need qemu-img qemu-io
cd "$T" || exit 1
have_fio=
fio --enghelp=nbd >/dev/null 2>&1 && have_fio=1

for srv in $NBD_SERVERS; do
  qemu-img create -q -f qcow2 "$srv.qcow2" 64M
  serve_start "$srv" "$srv.qcow2" -t -e 4 -f qcow2 || continue
  pids=()
  for i in 0 1 2 3; do
    args=()
    base=$((i * 8 << 20))
    # 4 KiB writes scattered over the client's 8 MiB, interleaved with the
    # other clients' in time; every 8th a zero write
    for j in $(seq 0 63); do
      off=$((base + (j * 37 % 64) * 128 * 1024 + (j % 3) * 4096))
      if [ $((j % 8)) -eq 7 ]; then
        args+=(-c "write -z $off 4k")
      else
        args+=(-c "write -P $((0x40 + i)) $off 4k")
      fi
    done
    qemu-io -f raw "${args[@]}" "$URI" >"client$i.log" 2>&1 &
    pids+=($!)
  done
  fails=0
  for p in "${pids[@]}"; do wait "$p" || fails=$((fails + 1)); done
  [ $fails -eq 0 ] && ! grep -qi 'fail\|error' client*.log && ok "$srv: 4 writers" ||
    bad "$srv: 4 writers" "$fails failed: $(cat client*.log | grep -i 'fail\|error' | head -3)"
  if [ -n "$have_fio" ]; then
    if fio --name=multi --ioengine=nbd --uri="$URI" --numjobs=4 --offset=32M \
         --offset_increment=8M --size=8M --rw=randwrite --bs=4k --iodepth=8 \
         --verify=crc32c --verify_fatal=1 --do_verify=1 >fio.log 2>&1 &&
       ! grep -q 'verify: bad' fio.log; then
      ok "$srv: fio 4 jobs"
    else
      bad "$srv: fio 4 jobs" "$(tail -5 fio.log)"
    fi
  fi
  serve_stop "$srv multi"
  qemu-img check -q "$srv.qcow2" && ok "$srv: check" || bad "$srv: check" "not clean"
  for i in 0 1 2 3; do
    args=()
    base=$((i * 8 << 20))
    for j in $(seq 0 63); do
      off=$((base + (j * 37 % 64) * 128 * 1024 + (j % 3) * 4096))
      if [ $((j % 8)) -eq 7 ]; then p=0; else p=$((0x40 + i)); fi
      args+=(-c "read -P $p $off 4k")
    done
    # and something never written in between stays zero
    args+=(-c "read -P 0 $((base + 64 * 1024)) 4k")
    out=$(qemu-io -f qcow2 -r "${args[@]}" "$srv.qcow2" 2>&1)
    [ $? -eq 0 ] && ! grep -qi 'fail\|mismatch' <<<"$out" && ok "$srv: region $i" ||
      bad "$srv: region $i" "$(grep -i 'fail\|mismatch' <<<"$out" | head -3)"
  done

  # without -t: two clients, then the server leaves by itself
  serve_start "$srv" "$srv.qcow2" -r -e 2 -f qcow2 || continue
  qemu-io -r -f raw -c 'read 0 1M' -c 'sleep 1500' "$URI" >/dev/null 2>&1 &
  p1=$!
  sleep 0.3
  qemu-io -r -f raw -c 'read 1M 1M' "$URI" >/dev/null 2>&1
  r2=$?
  wait $p1
  r1=$?
  [ $r1 -eq 0 ] && [ $r2 -eq 0 ] && ok "$srv: two readers" || bad "$srv: two readers" "$r1 $r2"
  serve_wait_exit "$srv last client"
done
finish
