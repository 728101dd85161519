# Helpers for the NBD tests, sourced after tests/lib.sh. Every test runs
# the same client commands against `qcowkit serve` and against qemu-nbd
# (which proves the test itself): loop over $NBD_SERVERS and call
# serve_start / serve_stop around the checks.
#
#   NBD_SERVERS   servers to run against (default "qcowkit qemu-nbd";
#                 qemu-nbd is left out when it is not installed)
#
# serve_start KIND IMAGE [OPTION...]  start KIND ("qcowkit" or "qemu-nbd")
#   on IMAGE with qemu-nbd-style options (-k is added unless -p is given),
#   wait until it listens; sets SOCK (the Unix socket), URI (nbd+unix://),
#   SRV_PID and SRV_LOG. With SRV_TAG set, the socket, pid file and log are
#   named after it too, so that several servers of one kind can run at once.
# serve_stop [NAME]  SIGTERM, wait; records a failure (NAME) unless the
#   server exits 0 (and, for qcowkit, reports nothing under a sanitizer).
# serve_wait_exit NAME  wait for a server to exit by itself; as serve_stop.
# spec KIND  true when KIND answers errors as the specification says
#   (qcowkit); qemu-nbd answers EINVAL to every request it refuses.

NBD_SERVERS=${NBD_SERVERS:-qcowkit qemu-nbd}
command -v qemu-nbd >/dev/null 2>&1 || NBD_SERVERS=${NBD_SERVERS/qemu-nbd/}
SRV_PID=
SRV_KIND=

spec() { [ "$1" = qcowkit ]; }

serve_start() {
  local kind=$1 img=$2 tcp=
  shift 2
  local a
  for a in "$@"; do [ "$a" = -p ] && tcp=1; done
  local base=$T/$kind${SRV_TAG:+-$SRV_TAG}
  SOCK=$base.sock
  SRV_LOG=$base.log
  SRV_KIND=$kind
  rm -f "$SOCK" "$base.pid"
  local sockopt=(-k "$SOCK")
  [ -n "$tcp" ] && sockopt=()
  case $kind in
  qcowkit)
    "$QCOWKIT" serve "${sockopt[@]}" --pid-file "$base.pid" "$@" "$img" \
      >"$SRV_LOG" 2>&1 &
    ;;
  qemu-nbd)
    # -A: offer qemu:allocation-depth, which qcowkit always offers;
    # --discard=unmap: TRIM really discards, as it does with qcowkit.
    qemu-nbd "${sockopt[@]}" --pid-file "$base.pid" -A --discard=unmap \
      "$@" "$img" >"$SRV_LOG" 2>&1 &
    ;;
  esac
  SRV_PID=$!
  URI="nbd+unix:///?socket=$SOCK"
  local i
  for i in $(seq 200); do
    [ -s "$base.pid" ] && return 0
    kill -0 "$SRV_PID" 2>/dev/null || break
    sleep 0.05
  done
  bad "$kind start" "server did not start: $(cat "$SRV_LOG")"
  return 1
}

# The exit status of the server, judged.
serve_judge() {
  local name=$1 rc=$2
  if [ "$rc" -ne 0 ]; then
    bad "$name: $SRV_KIND exit" "status $rc: $(tail -5 "$SRV_LOG")"
  elif grep -q 'Sanitizer\|runtime error' "$SRV_LOG"; then
    bad "$name: $SRV_KIND sanitizer" "$(head -20 "$SRV_LOG")"
  else
    ok "$name: $SRV_KIND exit"
  fi
  SRV_PID=
}

serve_stop() {
  local name=${1:-stop} rc
  [ -n "$SRV_PID" ] || return 0
  kill -TERM "$SRV_PID" 2>/dev/null
  wait "$SRV_PID"
  rc=$?
  serve_judge "$name" "$rc"
}

serve_wait_exit() {
  local name=$1 rc i
  for i in $(seq 200); do
    kill -0 "$SRV_PID" 2>/dev/null || break
    sleep 0.05
  done
  if kill -0 "$SRV_PID" 2>/dev/null; then
    bad "$name: $SRV_KIND exit" "still running"
    kill -KILL "$SRV_PID"
  fi
  wait "$SRV_PID"
  rc=$?
  serve_judge "$name" "$rc"
}

# A server left running by a failed test is stopped on the way out.
nbd_cleanup() {
  [ -n "$SRV_PID" ] && kill -KILL "$SRV_PID" 2>/dev/null
  rm -rf "$T"
}
trap nbd_cleanup EXIT
