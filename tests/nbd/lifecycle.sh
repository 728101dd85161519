#!/usr/bin/env bash
# The server's life, against qcowkit serve and qemu-nbd:
#   - SIGTERM and SIGINT while pipelined writes are in flight: every
#     request read is still answered (successfully), then the connection
#     ends, the server exits 0, and the answered writes are in the file;
#   - --pid-file holds the server's pid; the socket and pid file are gone
#     after it exits;
#   - -e 1: a second client waits (no greeting) until the first leaves,
#     then is served;
#   - a bad image or a busy socket path: a one-line error and exit 1.
# shellcheck source=../lib.sh
. "$(dirname "$0")/../lib.sh"
# shellcheck source=nbd.bash
. "$(dirname "$0")/nbd.bash"
need qemu-img qemu-io python3
cd "$T" || exit 1
rawc=$QK_SRC/tests/nbd/rawclient.py

# inflight.py SOCKET PID SIGNAL: 32 pipelined 1 MiB writes, the signal,
# then the replies. Prints the number of writes answered.
cat >inflight.py <<'PYEOF'
import os, signal, struct, sys
sys.argv = [sys.argv[0], sys.argv[1], "rw", "0", sys.argv[2], sys.argv[3]]
pid, sig = int(sys.argv[4]), getattr(signal, sys.argv[5])
exec(open(os.environ["RAWC"]).read().split("# ---- handshake cases")[0])
c = Conn().go()
for i in range(32):
    c.req(CMD_WRITE, i << 20, 1 << 20, cookie=i, payload=bytes([0x70 + i % 16]) * (1 << 20))
os.kill(pid, sig)
n = 0
try:
    while True:
        cookie, err, _, _ = c.reply()
        assert err == 0, "write %d failed: %d" % (cookie, err)
        n += 1
except Closed:
    pass
print(n)
PYEOF

for srv in $NBD_SERVERS; do
  for sig in SIGTERM SIGINT; do
    qemu-img create -q -f qcow2 "$srv.qcow2" 64M
    serve_start "$srv" "$srv.qcow2" -t -f qcow2 || continue
    [ "$(cat "$T/$srv.pid")" = "$SRV_PID" ] && ok "$srv: pid file" ||
      bad "$srv: pid file" "$(cat "$T/$srv.pid") is not $SRV_PID"
    n=$(RAWC=$rawc timeout 60 python3 inflight.py "$SOCK" "$SRV_PID" $sig 2>&1)
    wait "$SRV_PID"
    serve_judge "$srv $sig" $?
    if spec "$srv"; then
      # qemu-nbd drops what it has not answered yet; qcowkit answers all
      [ "$n" = 32 ] && ok "$srv $sig: all answered" || bad "$srv $sig: answered" "$n"
    fi
    case $n in ''|*[!0-9]*) bad "$srv $sig: replies" "$n"; n=0 ;; esac
    [ -e "$SOCK" ] && bad "$srv $sig: socket left" "$SOCK" || ok "$srv $sig: socket removed"
    if spec "$srv"; then
      [ -e "$T/$srv.pid" ] && bad "$srv $sig: pid file left" "" || ok "$srv $sig: pid removed"
    fi
    qemu-img check -q "$srv.qcow2" && ok "$srv $sig: check" || bad "$srv $sig: check" "not clean"
    args=()
    for i in $(seq 0 $((n - 1))); do
      args+=(-c "read -P $((0x70 + i % 16)) $((i << 20)) 1M")
    done
    if [ $n -gt 0 ]; then
      out=$(qemu-io -f qcow2 -r "${args[@]}" "$srv.qcow2" 2>&1)
      ! grep -qi 'fail\|mismatch' <<<"$out" && ok "$srv $sig: content" ||
        bad "$srv $sig: content" "$(grep -i 'fail\|mismatch' <<<"$out" | head -3)"
    fi
  done

  # -e 1: the second client gets its greeting only when the first leaves
  serve_start "$srv" "$srv.qcow2" -t -e 1 -f qcow2 || continue
  out=$(RAWC=$rawc timeout 60 python3 - "$SOCK" <<'PYEOF' 2>&1
import os, socket, sys, time
sys.argv = [sys.argv[0], sys.argv[1], "rw", "0"]
exec(open(os.environ["RAWC"]).read().split("# ---- handshake cases")[0])
a = Conn().go()
b = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
b.connect(SOCK)
b.settimeout(0.5)
try:
    print("early greeting", b.recv(18))
except socket.timeout:
    pass
a.req(CMD_DISC)
a.close()
b.settimeout(10)
g = b.recv(18)
print("greeting" if len(g) >= 8 else "no greeting")
PYEOF
)
  [ "$out" = greeting ] && ok "$srv: -e 1" || bad "$srv: -e 1" "$out"
  serve_stop "$srv -e 1"
done

# Start-up errors (qcowkit only: its messages and codes)
echo notanimage >bad.img
qemu-img create -q -f qcow2 e.qcow2 1M
"$QCOWKIT" serve -k "$T/x.sock" -f qcow2 bad.img >err.txt 2>&1
rc=$?
[ $rc -eq 1 ] && [ "$(wc -l <err.txt)" -eq 1 ] && ok "bad image" || bad "bad image" "rc $rc: $(cat err.txt)"
mkdir -p "$T/dir.sock"
"$QCOWKIT" serve -k "$T/dir.sock" e.qcow2 >err.txt 2>&1
rc=$?
[ $rc -eq 1 ] && [ "$(wc -l <err.txt)" -eq 1 ] && ok "busy path" || bad "busy path" "rc $rc: $(cat err.txt)"
"$QCOWKIT" serve -p 0 e.qcow2 >err.txt 2>&1
[ $? -eq 1 ] && ok "bad port" || bad "bad port" "$(cat err.txt)"
finish
