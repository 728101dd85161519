#!/usr/bin/env bash
# The library's ABI: the functions qcowkit.h declares, the symbol list
# (lib/qcowkit.map) and what the built libqcowkit.so exports are the same
# set; the version is the one CMakeLists.txt gives, everywhere it shows.
. "$(dirname "$0")/../lib.sh"
need nm python3
bin=$(dirname "$QCOWKIT")
so=$bin/libqcowkit.so
[ -f "$so" ] || { bad abi "no $so"; finish; }

python3 - "$QK_SRC" "$so" "$bin" "$QCOWKIT" <<'PY' >"$T/out" 2>&1
import re, subprocess, sys
src, so, bindir, qcowkit = sys.argv[1:5]
fails = []
def bad(why):
    fails.append(why)

h = open(src + "/include/qcowkit.h").read()
h = re.sub(r"/\*.*?\*/", "", h, flags=re.S)
header = set(re.findall(r"\b(qk_\w+)\s*\(", h))
mp = open(src + "/lib/qcowkit.map").read()
mp = re.sub(r"/\*.*?\*/", "", mp, flags=re.S)
glob = mp.split("global:")[1].split("local:")[0]
listed = set(re.findall(r"\b(qk_\w+)\s*;", glob))
if "*" in glob:
    bad("the symbol list has a wildcard")
nm = subprocess.run(["nm", "-D", "--defined-only", so], capture_output=True, text=True).stdout
exported = {l.split()[-1].split("@")[0] for l in nm.splitlines() if " T " in l or " D " in l or " B " in l}
if header != listed:
    bad("header vs symbol list: only in the header %s, only in the list %s" %
        (sorted(header - listed), sorted(listed - header)))
if exported != listed:
    bad("built library vs symbol list: only exported %s, only listed %s" %
        (sorted(exported - listed), sorted(listed - exported)))
if any(not s.startswith("qk_") for s in exported):
    bad("non-qk_ symbols exported: %s" % sorted(s for s in exported if not s.startswith("qk_")))

cm = open(src + "/CMakeLists.txt").read()
ver = re.search(r"project\(qcowkit VERSION ([0-9.]+)", cm).group(1)
gen = open(bindir + "/include/qcowkit-version.h").read()
if '"%s"' % ver not in gen:
    bad("qcowkit-version.h does not say %s" % ver)
out = subprocess.run([qcowkit, "--version"], capture_output=True, text=True).stdout
if ver not in out:
    bad("qcowkit --version says %r, not %s" % (out.strip(), ver))
pc = open(bindir + "/qcowkit.pc").read()
if "Version: %s" % ver not in pc:
    bad("qcowkit.pc does not say Version: %s" % ver)
for f in ["include/qcowkit.h", "lib/image.c"]:
    if re.search(r'"\d+\.\d+\.\d+"', open(src + "/" + f).read()):
        bad("%s writes a version number of its own" % f)
print("%d functions in the header, the list and the library; version %s" % (len(header), ver))
for f in fails:
    print("FAIL: " + f)
sys.exit(1 if fails else 0)
PY
rc=$?
cat "$T/out"
if [ "$rc" -eq 0 ]; then ok abi; else bad abi "$(grep FAIL "$T/out" | head -3)"; fi
finish
