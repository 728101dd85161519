# Sourced by commit.sh and rebase.sh (not named *.sh, so ctest does not run
# it): chains made with qemu-img and qemu-io, and one image described as
# both tests compare it.

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
