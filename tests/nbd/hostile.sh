#!/usr/bin/env bash
# Hostile clients (hostile.py says what each does and checks), against
# qcowkit serve and qemu-nbd, all scenarios at once, each with a server of
# its own (read-only exports of one image):
#   - a client trickling a valid handshake one byte at a time, one that
#     stays silent, and one that floods options without reading a reply
#     are dropped when the handshake limit passes, counted from the
#     connect; meanwhile a second client is served: with -e 1 as soon as
#     the first has lost its place, with -e 2 at once;
#   - without -t, the server goes on after a client dropped in the
#     handshake, and exits once a client that got through has left;
#   - a client that reaches transmission, sends READs and reads nothing is
#     dropped when the send stall limit passes, and a second client is
#     served then (-e 1) or meanwhile (-e 2);
#   - a client reading a 4 MiB reply at 1 MiB/s is not dropped, though the
#     reply takes more than twice the send stall limit;
#   - under a low `ulimit -n`, clients beyond the descriptors wait, the
#     server does not spin on accept(), and it serves again as soon as a
#     descriptor comes free;
#   - the memory a client pins with unread 32 MiB READs stays under the
#     per-connection cap (release builds only: the sanitizers' shadow
#     memory and quarantine would count too).
# qcowkit runs with its limits shortened to 2 s (handshake) and 1.5 s
# (send stall) by QCOWKIT_NBD_TEST_LIMITS, and once with the real ones
# (10 s and 30 s: a silent client, and the non-reading one with the
# memory check); qemu-nbd with its own.
# What qemu-nbd 7.2 does (measured): it drops the trickling, silent and
# flooding clients 10.0 s after the connect and serves the second client,
# and without -t does not count clients dropped in the handshake, as
# qcowkit. But the flooder's place is given back only when the flooder
# closes its end (its socket is shut down at 10 s, the stuck reply write
# is not abandoned), so with -e 1 the second client would wait for that:
# the flood runs with -e 2 against it. It keeps a client that reads no
# reply for ever (still there after 70 s, its 16 stuck 32 MiB READs
# holding 512 MiB), so against qemu-nbd that scenario checks the second
# client only. On EMFILE it spins at 100% of a core (3.0 s of CPU in 3 s),
# so the EMFILE scenario runs against qcowkit alone.
# shellcheck source=../lib.sh
. "$(dirname "$0")/../lib.sh"
# shellcheck source=nbd.bash
. "$(dirname "$0")/nbd.bash"
need qemu-img qemu-io python3
cd "$T" || exit 1
py=$QK_SRC/tests/nbd/hostile.py
sanitized=${QK_SANITIZE:-}${QK_TSAN:-}
margin=2
[ -n "$sanitized" ] && margin=3
short=2000,1500       # QCOWKIT_NBD_TEST_LIMITS: handshake, send stall (ms)
hs=2 st=1.5           # the same in seconds, for the clients

qemu-img create -q -f qcow2 img.qcow2 64M
qemu-io -f qcow2 -c 'write -P 0x5a 0 8M' img.qcow2 >/dev/null

declare -A S_PID S_KIND S_LOG S_SOCK C_PID
hostile_cleanup() {
  local p
  for p in "${C_PID[@]}" "${S_PID[@]}"; do kill -KILL "$p" 2>/dev/null; done
  nbd_cleanup
}
trap hostile_cleanup EXIT

has() { [[ " $NBD_SERVERS " == *" $1 "* ]]; }

# start TAG KIND OPTION...: a server of its own for one scenario (the
# environment passes through, QCOWKIT_NBD_TEST_LIMITS for one).
start() {
  local tag=$1 kind=$2
  shift 2
  SRV_TAG=$tag serve_start "$kind" img.qcow2 -f qcow2 -r "$@" || return 1
  S_PID[$tag]=$SRV_PID S_KIND[$tag]=$SRV_KIND S_LOG[$tag]=$SRV_LOG S_SOCK[$tag]=$SOCK
  SRV_PID=
}

# run TAG SCENARIO KEY=VALUE...: its client, in the background, into TAG.out
run() {
  local tag=$1
  shift
  [ -n "${S_PID[$tag]:-}" ] || return 0
  python3 "$py" "$1" "${S_SOCK[$tag]}" margin=$margin "${@:2}" >"$tag.out" 2>&1 &
  C_PID[$tag]=$!
}

# judge TAG [exit]: count the client's checks, then stop the server, or
# (exit) see that it has left by itself.
judge() {
  local tag=$1 line rc
  [ -n "${C_PID[$tag]:-}" ] || return 0
  wait "${C_PID[$tag]}"
  rc=$?
  unset "C_PID[$tag]"
  [ $rc -eq 0 ] || bad "$tag: client" "exit status $rc"
  while IFS= read -r line; do
    case $line in
    ok\ *) ok "$tag: ${line#ok }" ;;
    bad\ *) bad "$tag: ${line#bad }" ;;
    info\ *) echo "$tag: ${line#info }" ;;
    *) bad "$tag: client" "$line" ;;
    esac
  done <"$tag.out"
  grep -q '^ok ' "$tag.out" || bad "$tag: client" "no check passed"
  SRV_PID=${S_PID[$tag]} SRV_KIND=${S_KIND[$tag]} SRV_LOG=${S_LOG[$tag]}
  unset "S_PID[$tag]"
  if [ "${2:-}" = exit ]; then serve_wait_exit "$tag"; else serve_stop "$tag"; fi
}

tags=()
# The long ones first: qcowkit with its real limits, qemu-nbd with its own.
if has qcowkit; then
  start k-silent-real qcowkit -e 1 -t &&
    run k-silent-real silent limit=10 shared=1
  rss=()
  [ -z "$sanitized" ] && rss=(rss_cap=140)
  start k-noread-real qcowkit -e 1 -t &&
    run k-noread-real noread limit=30 shared=1 count=64 size=$((32 << 20)) \
      pid="${S_PID[k-noread-real]}" "${rss[@]}"
  tags+=(k-silent-real k-noread-real)
fi
if has qemu-nbd; then
  start q-trickle1 qemu-nbd -e 1 -t && run q-trickle1 trickle limit=10 shared=1
  start q-trickle2 qemu-nbd -e 2 -t && run q-trickle2 trickle limit=10 shared=2
  start q-silent qemu-nbd -e 1 && run q-silent silent limit=10 shared=1
  start q-flood qemu-nbd -e 2 -t && run q-flood flood limit=10 shared=2
  start q-noread2 qemu-nbd -e 2 -t &&
    run q-noread2 noread limit=$st shared=2 drop=0 window=4
  start q-slowread qemu-nbd -t && run q-slowread slowread limit=$st
  tags+=(q-trickle1 q-trickle2 q-silent q-flood q-noread2 q-slowread)
fi
if has qcowkit; then
  export QCOWKIT_NBD_TEST_LIMITS=$short
  start k-trickle1 qcowkit -e 1 -t && run k-trickle1 trickle limit=$hs shared=1
  start k-trickle2 qcowkit -e 2 -t && run k-trickle2 trickle limit=$hs shared=2
  start k-silent qcowkit -e 1 && run k-silent silent limit=$hs shared=1
  start k-flood qcowkit -e 1 -t && run k-flood flood limit=$hs shared=1
  start k-noread1 qcowkit -e 1 -t && run k-noread1 noread limit=$st shared=1
  start k-noread2 qcowkit -e 2 -t && run k-noread2 noread limit=$st shared=2
  start k-slowread qcowkit -t && run k-slowread slowread limit=$st
  # Descriptors for a few dozen clients only.
  printf '#!/bin/sh\nulimit -n 32 || exit 1\nexec %q "$@"\n' "$QCOWKIT" >lowfd.sh
  chmod +x lowfd.sh
  QCOWKIT=$T/lowfd.sh start k-emfile qcowkit -e 0 -t &&
    run k-emfile emfile pid="${S_PID[k-emfile]}"
  unset QCOWKIT_NBD_TEST_LIMITS
  tags+=(k-trickle1 k-trickle2 k-silent k-flood k-noread1 k-noread2 k-slowread k-emfile)
fi

for tag in "${tags[@]}"; do
  case $tag in
  *-silent) judge "$tag" exit ;;  # no -t: B's leaving ends the server
  *) judge "$tag" ;;
  esac
done
finish
