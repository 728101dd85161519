# Sourced by commit.sh and rebase.sh (not named *.sh, so ctest does not run
# it): chains made with qemu-img and qemu-io, one image described as both
# tests compare it, and the comparison of the two tools' results.

# io FMT FILE CMD...: qemu-io CMD on FILE.  mk ARGS...: qemu-img create -q.
io() { qemu-io -f "$1" "${@:3}" "$2" >/dev/null || bad setup "qemu-io $*"; }
mk() { qemu-img create -q "$@" || bad setup "qemu-img create $*"; }

# One image's description: info fields and map entries without host offsets.
desc() {
  qemu-img info -U --output=json "$1" | python3 -c '
import json, sys; i = json.load(sys.stdin)
print(i["virtual-size"], i.get("backing-filename"), i.get("backing-filename-format"))'
  qemu-img map -U --output=json "$1" | python3 -c '
import json, sys
out = []
for e in json.load(sys.stdin):
    # a range reading zeros in the image itself: allocated as zeros or
    # not, as each tool found cheaper (QEMU zeroes a v2 cluster in place)
    k = (e["depth"], "zero") if e["zero"] and e["depth"] == 0 else \
        (e["depth"], e["present"], e["zero"], e["data"])
    if out and out[-1][2] == k and out[-1][0] + out[-1][1] == e["start"]:
        out[-1][1] += e["length"]
    else:
        out.append([e["start"], e["length"], k])
for s, n, k in out:
    print(s, n, *k)'
}

# same_results NAME REF_OUT OUR_OUT: after both tools ran on copies of
# NAME/src (NAME/ref by qemu-img, NAME/our by qcowkit), their messages and
# exit status agree, and so does every file: guest content, info and map
# (desc); each qcow2 of ours also checks clean.
same_results() {
  local name=$1 r=$2 o=$3 f
  [ "$r" = "${o//qcowkit/qemu-img}" ] && ok "$name out" || bad "$name out" "qemu-img: $r / ours: $o"
  for f in $(cd "$name/src" && find . -type f | sort); do
    if ! qemu-img compare -U -q "$name/ref/$f" "$name/our/$f" 2>/dev/null; then
      bad "$name $f" "guest content differs"; continue; fi
    if [ "$(cd "$name/ref" && desc "$f")" = "$(cd "$name/our" && desc "$f")" ]; then
      ok "$name $f desc"
    else
      bad "$name $f" "info/map differ"
      diff <(cd "$name/ref" && desc "$f") <(cd "$name/our" && desc "$f") >&2
    fi
    case $f in *.qcow2) qemu-img check -q "$name/our/$f" && ok "$name $f check" ||
                        bad "$name $f" "qemu-img check";; esac
  done
}
