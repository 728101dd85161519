#!/bin/bash
# Hostile / malformed images: qcowkit must never crash, hang or damage a file,
# must refuse bad images with one clear line on stderr that names the problem,
# and must still read the images that are odd but valid (corrupt bit, dirty
# bit, unknown compat features, ...).
#
# mkbad.py builds the images and the manifest cases.txt (one case per line:
# file, args, expect, regex, rawsha, reason; see mkbad.py's docstring for what
# each `expect` word means per command). tests/bad/cases.txt is a copy of the
# generated manifest kept for reading; the test checks it is in sync.
# Regenerate it with:  python3 tests/bad/mkbad.py /tmp/x && cp /tmp/x/cases.txt tests/bad/
#
# Every case runs these commands, each under `timeout 20` (5 once a command of
# the same case has hung) and (unless
# QK_SANITIZE is set, as ulimit -v breaks AddressSanitizer) `ulimit -v 4000000`:
#   info | info --output=json | info --backing-chain | map --output=json |
#   convert -O raw FILE OUT | io -r FILE -c 'read 0 64k'
# (`check` is not implemented yet and is not run.)
. "$(dirname "$0")/../lib.sh"
HERE=$(cd "$(dirname "$0")" && pwd)

if [ ! -x "$QCOWKIT" ]; then
  bad setup "qcowkit binary missing or not executable: $QCOWKIT"
  finish
fi
need python3 qemu-img qemu-io timeout sha256sum

IMG=$T/img
if ! python3 "$HERE/mkbad.py" "$IMG" >"$T/mkbad.log" 2>&1; then
  bad mkbad "image generator failed: $(tail -n 3 "$T/mkbad.log")"
  finish
fi
if [ -f "$HERE/cases.txt" ] &&
   cmp -s <(grep -v '^#' "$HERE/cases.txt") <(grep -v '^#' "$IMG/cases.txt"); then
  ok manifest
else
  bad manifest "tests/bad/cases.txt differs from what mkbad.py generates; regenerate it"
fi

cd "$T" || exit 1          # not the image dir: backing names must resolve against the image
(cd "$IMG" && sha256sum -- *) >"$T/all.sha"

# run OUT ERR CMD...: run a command capped in time ($tmo s) and memory; returns its status.
run() {
  local o=$1 e=$2
  shift 2
  (
    if [ -z "${QK_SANITIZE:-}" ]; then ulimit -v 4000000; fi
    exec timeout -k 5 "$tmo" "$@"
  ) >"$o" 2>"$e" </dev/null
}

# want EXPECT CMD -> R (must fail, regex), O (must succeed),
#                    E (either; a failure is one line), M (either; a failure is one line matching regex)
want() {
  case $1 in
    refuse) echo R ;;
    open) echo O ;;
    either) echo E ;;
    data) case $2 in info|json|chain) echo M ;; *) echo R ;; esac ;;
    read) case $2 in info|json|chain|map) echo M ;; *) echo R ;; esac ;;
    chain) case $2 in info|json) echo M ;; *) echo R ;; esac ;;
    meta) case $2 in info|json|chain) echo R ;; *) echo M ;; esac ;;
    *) echo "?" ;;
  esac
}

one_line() { [ "$(awk 'END { print NR }' "$1")" = 1 ] && grep -q '[^[:space:]]' "$1"; }
valid_json() { python3 -c 'import json, sys; json.load(sys.stdin)' <"$1" 2>/dev/null; }
show() { head -c 400 "$1" | tr '\n' '|'; }

CMDS="info json chain map convert io"
start=$SECONDS
budget=900            # seconds; only a hanging binary gets anywhere near this
ncases=0

while IFS=$'\t' read -r name args expect regex rawsha reason; do
  case $name in ''|'#'*) continue ;; esac
  ncases=$((ncases + 1))
  if [ $((SECONDS - start)) -gt $budget ]; then
    bad "$name" "not run: time budget of ${budget}s used up (hangs?)"
    continue
  fi
  [ "$args" = - ] && args=
  f=$IMG/$name
  sum0=$(sha256sum <"$f")
  tmo=20                # after one hang in a case, give its other commands 5 s
  for c in $CMDS; do
    w=$(want "$expect" "$c")
    tag="$name: $c"
    o=$T/out.$c
    e=$T/err.$c
    rm -f "$T/out.raw"
    # shellcheck disable=SC2086  # $args is a word list on purpose
    case $c in
      info) run "$o" "$e" "$QCOWKIT" info $args "$f" ;;
      json) run "$o" "$e" "$QCOWKIT" info $args --output=json "$f" ;;
      chain) run "$o" "$e" "$QCOWKIT" info $args --backing-chain "$f" ;;
      map) run "$o" "$e" "$QCOWKIT" map $args --output=json "$f" ;;
      convert) run "$o" "$e" "$QCOWKIT" convert $args -O raw "$f" "$T/out.raw" ;;
      io) run "$o" "$e" "$QCOWKIT" io $args -r "$f" -c 'read 0 64k' ;;
    esac
    rc=$?
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
      bad "$tag" "HANG: killed after $tmo s ($reason)"
      tmo=5
      continue
    elif [ "$rc" -eq 126 ] || [ "$rc" -eq 127 ]; then
      bad "$tag" "could not execute $QCOWKIT (rc $rc): $(show "$e")"
      continue
    elif [ "$rc" -eq 23 ]; then
      bad "$tag" "SANITIZER report: $(grep -m1 -E 'ERROR|runtime error' "$e")"
      continue
    elif crashed "$rc"; then
      bad "$tag" "CRASH: exit status $rc (signal $((rc - 128))); stderr: $(show "$e")"
      continue
    fi
    why=
    case $w in
      R)
        if [ "$rc" -eq 0 ]; then
          why="accepted a bad image (exit 0); expected a refusal matching /$regex/"
        elif ! one_line "$e"; then
          why="refusal is not exactly one non-empty stderr line: $(show "$e")"
        elif ! grep -Eiq -- "$regex" "$e"; then
          why="error does not match /$regex/: $(show "$e")"
        fi ;;
      O)
        if [ "$rc" -ne 0 ]; then
          why="failed (rc $rc) on a readable image: $(show "$e")"
        elif [ "$c" = convert ] && [ "$rawsha" != - ] &&
             [ "$(sha256sum <"$T/out.raw" 2>/dev/null | cut -d' ' -f1)" != "$rawsha" ]; then
          why="converted data differs from qemu-img's"
        fi ;;
      E | M)
        if [ "$rc" -ne 0 ]; then
          if ! one_line "$e"; then
            why="error is not exactly one non-empty stderr line: $(show "$e")"
          elif [ "$w" = M ] && ! grep -Eiq -- "$regex" "$e"; then
            why="error does not match /$regex/: $(show "$e")"
          fi
        fi ;;
      *) why="manifest: unknown expectation '$expect'" ;;
    esac
    if [ -z "$why" ] && [ "$rc" -eq 0 ] && { [ "$c" = json ] || [ "$c" = map ]; } &&
       ! valid_json "$o"; then
      why="exit 0 but stdout is not valid JSON: $(show "$o")"
    fi
    if [ -n "$why" ]; then bad "$tag" "$why [case: $reason]"; else ok "$tag"; fi
  done
  if [ "$(sha256sum <"$f")" = "$sum0" ]; then ok "$name: unchanged"; else bad "$name: unchanged" "image file was modified"; fi
done <"$IMG/cases.txt"

if [ "$ncases" -lt 40 ]; then bad manifest "only $ncases cases"; else ok manifest-size; fi
if (cd "$IMG" && sha256sum --quiet -c "$T/all.sha" >"$T/sha.log" 2>&1); then
  ok all-files-unchanged
else
  bad all-files-unchanged "files changed: $(grep -v ': OK$' "$T/sha.log" | head -5 | tr '\n' ' ')"
fi
rm -f "$T/out.raw"
finish
