#!/bin/bash
# Hostile / malformed images: qcowkit must never crash, hang, use unbounded
# memory or damage a file; it must refuse bad images with one clear line on
# stderr that names the problem, or open them with the damaged part failing
# cleanly while the intact parts read the right bytes; and it must still read
# the images that are odd but valid (corrupt bit, dirty bit, unknown compat
# features, ...).
#
# mkbad.py builds the images and the manifest cases.txt (one case per line:
# file, args, expect, check, regex, good, rawsha, source, reason; see
# mkbad.py's docstring). Every case names its source: a CVE, a qemu-iotests
# bad-image test, a rule of the qcow2 specification or a bug report against
# another implementation. tests/bad/cases.txt is a copy of the generated
# manifest kept for reading; the test checks it is in sync.
# Regenerate it with:  python3 tests/bad/mkbad.py /tmp/x && cp /tmp/x/cases.txt tests/bad/
#
# Every case runs these commands, each under `timeout 20` (5 once a command of
# the same case has hung) and a memory cap (`ulimit -v` of 1 GB; under
# AddressSanitizer, where ulimit -v cannot work, its hard_rss_limit_mb and
# max_allocation_size_mb instead):
#   info | info --output=json | info --backing-chain | map --output=json |
#   convert -O raw FILE OUT | io -r FILE -c 'read 0 64k' |
#   check | check --output=json | check -r all COPY
# then, where the manifest names intact regions, io -r reads them with -P.
# `check` must give one of the exit statuses the manifest allows, its JSON
# must agree with its exit status, and `check -r all` on a copy (made next to
# the image, so backing names resolve) must either leave an image that
# `qemu-img check` finds free of corruptions and that still reads the intact
# regions (and, for valid images, the same guest bytes), or refuse with one
# line and leave the copy as it was. No input file may change. Cases run two
# at a time; their results are reported in manifest order.
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

MEM_KB=1000000                  # ulimit -v for every command
if [ -n "${QK_SANITIZE:-}" ]; then
  export ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}hard_rss_limit_mb=1500:max_allocation_size_mb=1000:allocator_may_return_null=1"
fi

# run OUT ERR CMD...: run a command capped in time ($tmo s); returns its
# status. The memory cap is set once per case (one_case runs in a subshell).
run() {
  local o=$1 e=$2
  shift 2
  timeout -k 5 "$tmo" "$@" >"$o" 2>"$e" </dev/null
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
# a refusal of check: exactly one "qcowkit:" line and it is the last line
check_refusal() { [ "$(grep -c '^qcowkit: ' "$1")" = 1 ] && tail -n 1 "$1" | grep -q '^qcowkit: '; }
show() { head -c 400 "$1" | tr '\n' '|'; }
sum() { sha256sum <"$1" | cut -d' ' -f1; }

# JSON outputs are kept as $T/json/N.CMD (N.checkjson-RC for check) and
# judged at the end by one python run (valid JSON; check's counts say what
# its exit status says), which prints ok/bad lines as one_case does.
judge_json() {
  python3 - "$T/json" "$T/names" <<'EOF'
import json, os, sys
names = open(sys.argv[2]).read().split("\n")
for f in sorted(os.listdir(sys.argv[1]), key=lambda x: (int(x.split(".")[0]), x)):
    n, kind = f.split(".", 1)
    cmd, _, rc = kind.partition("-")
    tag = "%s: %s-output" % (names[int(n) - 1], cmd)
    try:
        d = json.load(open(os.path.join(sys.argv[1], f)))
    except ValueError as e:
        print("bad %s\texit 0 but stdout is not valid JSON: %s" % (tag, str(e)[:200]))
        continue
    if cmd == "checkjson":
        c, l = d.get("corruptions", 0), d.get("leaks", 0)
        good = {0: c == 0 and l == 0, 2: c > 0, 3: c == 0 and l > 0}[int(rc)]
        if not good or "image-end-offset" not in d:
            print("bad %s\tJSON does not agree with exit status %s: %s" % (tag, rc, json.dumps(d)[:200]))
            continue
    print("ok " + tag)
EOF
}

# reads FILE ARGS GOOD: io -r reads every PATTERN@OFF+LEN region of GOOD.
reads() {
  local f=$1 a=$2 g=$3 r cmds=()
  IFS=, read -ra regions <<<"$g"
  for r in "${regions[@]}"; do
    cmds+=(-c "read -P ${r%%@*} $(r=${r#*@}; echo "${r%%+*} ${r#*+}")")
  done
  # shellcheck disable=SC2086  # $a is a word list on purpose
  run "$W/out.good" "$W/err.good" "$QCOWKIT" io $a -r "$f" "${cmds[@]}"
}

# one_case N NAME ARGS EXPECT CHECK REGEX GOOD RAWSHA REASON: run every command
# on one case; print "ok TAG" or "bad TAG<TAB>WHY" lines. Run it in a
# subshell: it sets the memory cap for everything it starts.
one_case() {
  local n=$1 name=$2 args=$3 expect=$4 cset=$5 regex=$6 good=$7 rawsha=$8 reason=$9
  local f=$IMG/$name W=$T/w/$n tmo=20 c tag o e rc why sum0
  mkdir -p "$W"
  if [ -z "${QK_SANITIZE:-}" ]; then ulimit -v "$MEM_KB"; fi
  [ "$args" = - ] && args=
  sum0=$(sum "$f")
  for c in info json chain map convert io check checkjson repair write good; do
    tag="$name: $c"
    o=$W/out.$c
    e=$W/err.$c
    why=
    rm -f "$W/out.raw"
    # shellcheck disable=SC2086  # $args is a word list on purpose
    case $c in
      info) run "$o" "$e" "$QCOWKIT" info $args "$f" ;;
      json) run "$o" "$e" "$QCOWKIT" info $args --output=json "$f" ;;
      chain) run "$o" "$e" "$QCOWKIT" info $args --backing-chain "$f" ;;
      map) run "$o" "$e" "$QCOWKIT" map $args --output=json "$f" ;;
      convert) run "$o" "$e" "$QCOWKIT" convert $args -O raw "$f" "$W/out.raw" ;;
      io) run "$o" "$e" "$QCOWKIT" io $args -r "$f" -c 'read 0 64k' ;;
      check) run "$o" "$e" "$QCOWKIT" check $args "$f" ;;
      checkjson) run "$o" "$e" "$QCOWKIT" check $args --output=json "$f" ;;
      repair)
        copy=$IMG/.rw-$n-$name
        cp --sparse=always "$f" "$copy"
        run "$o" "$e" "$QCOWKIT" check $args -r all "$copy" ;;
      write)
        # Guest writes on a copy: refused in one line, or accepted and read
        # back (reads and writes agree), growing the file only as needed.
        # (A copy still names the original's external data file: those
        # cases are left to the other steps.)
        case $name in *datafile*) continue ;; esac
        copy=$IMG/.rw-$n-$name
        cp --sparse=always "$f" "$copy"
        run "$o" "$e" "$QCOWKIT" io $args "$copy" -c 'write -P 0x5a 0 64k' &&
          run "$o" "$e" "$QCOWKIT" io $args "$copy" -c 'write -P 0x5b 196608 4k' &&
          run "$o" "$e" "$QCOWKIT" io $args "$copy" -c 'write -z 262144 64k' ;;
      good)
        [ "$good" = - ] && continue
        reads "$f" "$args" "$good" ;;
    esac
    rc=$?
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
      printf 'bad %s\tHANG: killed after %s s (%s)\n' "$tag" "$tmo" "$reason"
      tmo=5
      rm -f "$W/out.raw" "${copy:-}"
      continue
    elif [ "$rc" -eq 126 ] || [ "$rc" -eq 127 ]; then
      why="could not execute $QCOWKIT (rc $rc): $(show "$e")"
    elif [ "$rc" -eq 23 ]; then
      why="SANITIZER report: $(grep -m1 -E 'ERROR|runtime error' "$e")"
    elif crashed "$rc"; then
      why="CRASH: exit status $rc (signal $((rc - 128))); stderr: $(show "$e")"
    fi
    if [ -z "$why" ]; then
      case $c in
        check | checkjson) why=$(judge_check) ;;
        repair) why=$(judge_repair) ;;
        write) why=$(judge_write) ;;
        good) [ "$rc" -ne 0 ] && why="an intact region does not read right: $(show "$e")" ;;
        *) why=$(judge "$(want "$expect" "$c")") ;;
      esac
    fi
    rm -f "$W/out.raw" "${copy:-}"
    copy=
    if [ -n "$why" ]; then printf 'bad %s\t%s [case: %s]\n' "$tag" "$why" "$reason"; else echo "ok $tag"; fi
  done
  if [ "$(sum "$f")" = "$sum0" ]; then echo "ok $name: unchanged"
  else printf 'bad %s: unchanged\timage file was modified\n' "$name"; fi
  rm -rf "$W"
}

# judge WANT: the verdict on a read-only command (uses c, rc, o, e, regex, rawsha).
judge() {
  case $1 in
    R)
      if [ "$rc" -eq 0 ]; then
        echo "accepted a bad image (exit 0); expected a refusal matching /$regex/"
      elif ! one_line "$e"; then
        echo "refusal is not exactly one non-empty stderr line: $(show "$e")"
      elif ! grep -Eiq -- "$regex" "$e"; then
        echo "error does not match /$regex/: $(show "$e")"
      fi ;;
    O)
      if [ "$rc" -ne 0 ]; then
        echo "failed (rc $rc) on a readable image: $(show "$e")"
      elif [ "$c" = convert ] && [ "$rawsha" != - ] && [ "$(sum "$W/out.raw")" != "$rawsha" ]; then
        echo "converted data differs from qemu-img's"
      fi ;;
    E | M)
      if [ "$rc" -ne 0 ]; then
        if ! one_line "$e"; then
          echo "error is not exactly one non-empty stderr line: $(show "$e")"
        elif [ "$1" = M ] && ! grep -Eiq -- "$regex" "$e"; then
          echo "error does not match /$regex/: $(show "$e")"
        fi
      fi ;;
    *) echo "manifest: unknown expectation '$expect'" ;;
  esac
  if [ "$rc" -eq 0 ] && { [ "$c" = json ] || [ "$c" = map ]; }; then
    cp "$o" "$T/json/$n.$c"
  fi
}

# judge_check: check and check --output=json (uses c, rc, o, e, cset, regex).
judge_check() {
  case $rc in
    [0123]) ;;
    *) echo "exit status $rc is none of 0, 1, 2, 3"; return ;;
  esac
  if [ "${cset#*"$rc"}" = "$cset" ]; then
    echo "exit status $rc; this image allows only [$cset]: $(show "$e")"
  elif [ "$rc" -eq 1 ]; then
    if ! check_refusal "$e"; then
      echo "could not check, but not with one final 'qcowkit:' line: $(show "$e")"
    elif [ "$expect" = refuse ] && ! tail -n 1 "$e" | grep -Eiq -- "$regex"; then
      echo "error does not match /$regex/: $(show "$e")"
    fi
  elif [ "$c" = checkjson ]; then
    cp "$o" "$T/json/$n.checkjson-$rc"
  fi
  if [ "$c" = check ]; then echo "$rc" >"$W/check.rc"
  elif [ "$rc" != "$(cat "$W/check.rc" 2>/dev/null)" ]; then
    echo "exit status $rc differs from check without --output=json ($(cat "$W/check.rc"))"
  fi
}

# judge_repair: check -r all on the copy (uses rc, e, copy, f, args, good, rawsha).
judge_repair() {
  local qrc
  case $rc in
    1)
      if ! check_refusal "$e"; then
        echo "refused to repair, but not with one final 'qcowkit:' line: $(show "$e")"
      elif [ "$(sum "$copy")" != "$sum0" ]; then
        echo "refused to repair but changed the image: $(show "$e")"
      fi
      return ;;
    0 | 2 | 3) ;;
    *) echo "exit status $rc is none of 0, 1, 2, 3: $(show "$e")"; return ;;
  esac
  # qcowkit says it repaired what it could: qemu-img must find no corruption
  # shellcheck disable=SC2086
  run "$W/out.q" "$W/err.q" qemu-img check $args "$copy"
  qrc=$?
  if [ "$qrc" -ne 0 ] && [ "$qrc" -ne 3 ]; then
    echo "after check -r all (rc $rc) qemu-img check exits $qrc: $(show "$W/out.q") $(show "$W/err.q")"
    return
  fi
  if [ "$good" != - ] && ! reads "$copy" "$args" "$good"; then
    echo "after check -r all an intact region reads wrong: $(show "$W/err.good")"
  fi
  if [ "$rawsha" != - ]; then
    # shellcheck disable=SC2086
    if ! run "$W/out.cv" "$W/err.cv" "$QCOWKIT" convert $args -O raw "$copy" "$W/out.raw" ||
       [ "$(sum "$W/out.raw")" != "$rawsha" ]; then
      echo "check -r all changed the guest content of a valid image: $(show "$W/err.cv")"
    fi
  fi
}

# judge_write: guest writes on the copy (uses rc, e, copy, f, args).
judge_write() {
  local before after
  before=$(stat -c %s "$f")
  after=$(stat -c %s "$copy")
  if [ "$after" -gt $((before + (32 << 20))) ]; then
    echo "the writes grew the file from $before to $after bytes"
  elif [ "$rc" -ne 0 ]; then
    one_line "$e" || echo "refused the writes, but not in one line: $(show "$e")"
  else
    # shellcheck disable=SC2086
    run "$W/out.rb" "$W/err.rb" "$QCOWKIT" io $args -r "$copy" -c 'read -P 0x5a 0 64k' \
      -c 'read -P 0x5b 196608 4k' -c 'read -P 0 262144 64k' ||
      echo "accepted the writes, but they do not read back: $(show "$W/err.rb")"
  fi
}

start=$SECONDS
budget=900            # seconds; only a hanging binary gets anywhere near this
mkdir -p "$T/res" "$T/w" "$T/json"
ncases=0
jobs_max=2
while IFS=$'\t' read -r name args expect cset regex good rawsha source reason; do
  case $name in ''|'#'*) continue ;; esac
  ncases=$((ncases + 1))
  echo "${source%%:*}" >>"$T/kinds"
  echo "$name" >>"$T/names"
  if [ $((SECONDS - start)) -gt $budget ]; then
    printf 'bad %s\tnot run: time budget of %ss used up (hangs?)\n' "$name" "$budget" >"$T/res/$ncases"
    continue
  fi
  one_case "$ncases" "$name" "$args" "$expect" "$cset" "$regex" "$good" "$rawsha" "$reason" \
    >"$T/res/$ncases" 2>&1 &
  while [ "$(jobs -rp | wc -l)" -ge "$jobs_max" ]; do wait -n; done
done <"$IMG/cases.txt"
wait
judge_json >"$T/res/json"

for k in $(seq 1 "$ncases") json; do
  while IFS= read -r line; do
    case $line in
      "ok "*) ok "${line#ok }" ;;
      "bad "*) line=${line#bad }; bad "${line%%$'\t'*}" "${line#*$'\t'}" ;;
      *) bad "case $k" "unexpected output: $line" ;;
    esac
  done <"$T/res/$k"
done

echo "cases by source: $(sort "$T/kinds" | uniq -c | awk '{ printf "%s %s, ", $2, $1 }')total $ncases"
if [ "$ncases" -lt 60 ]; then bad manifest "only $ncases cases"; else ok manifest-size; fi
if [ "$(grep -cvx spec "$T/kinds")" -lt 60 ]; then
  bad manifest "fewer than 60 cases with a CVE, iotest or peer source"
else
  ok manifest-sources
fi
if (cd "$IMG" && sha256sum --quiet -c "$T/all.sha" >"$T/sha.log" 2>&1); then
  ok all-files-unchanged
else
  bad all-files-unchanged "files changed: $(grep -v ': OK$' "$T/sha.log" | head -5 | tr '\n' ' ')"
fi
echo "bad-images: $ncases cases in $((SECONDS - start)) s"
finish
