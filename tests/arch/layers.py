#!/usr/bin/env python3
"""The architecture, checked: lib/README.md's layer table assigns every
file of lib/ to a layer; a file may call only functions of lower layers and
the inline functions of its own layer's headers (no call to another .c file
of its layer, none upward), so no circle can form;
cli/ and nbd/ include nothing of lib/ but the public header; no function
in lib/, cli/ or nbd/ is longer than MAX_LINES.

Usage: layers.py SRCDIR. Prints one line per problem and a summary;
exits 1 on any problem.
"""
import os
import re
import sys

MAX_LINES = 120
src = sys.argv[1]
problems = []


def rel(p):
    return os.path.relpath(p, src)


def c_files(d, ext=(".c",)):
    out = []
    for r, _, fs in os.walk(os.path.join(src, d)):
        out += [os.path.join(r, f) for f in fs if f.endswith(ext)]
    return sorted(out)


def strip(text):
    text = re.sub(r"/\*.*?\*/", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S)
    text = re.sub(r"//[^\n]*", "", text)
    return re.sub(r'"(\\.|[^"\\\n])*"', '""', text)


def functions(path):
    """(name, first line, length, static) of each function defined with its
    braces at column 0, as this code base writes them."""
    lines = open(path).read().split("\n")
    out, i = [], 0
    while i < len(lines):
        if lines[i] == "{":
            j, sig = i - 1, ""
            while j >= 0 and lines[j].strip() and not lines[j].startswith(("}", "#", "/*", " *")):
                sig = lines[j] + " " + sig
                j -= 1
            k = i + 1
            while k < len(lines) and lines[k] != "}":
                k += 1
            m = re.search(r"(\w+)\s*\(", sig)
            if m and "=" not in sig.split("(")[0]:
                out.append((m.group(1), i + 1, k - i + 1, sig.lstrip().startswith("static")))
            i = k
        i += 1
    return out


# ---- the layer table --------------------------------------------------------
layer = {}
for row in open(os.path.join(src, "lib/README.md")):
    m = re.match(r"\|\s*(\d+)\s*\|[^|]*\|([^|]*)\|", row)
    if not m:
        continue
    for pat in re.findall(r"`([^`]+)`", m.group(2)):
        d = os.path.join(src, "lib", os.path.dirname(pat))
        rx = re.compile("^" + re.escape(os.path.basename(pat)).replace("\\*", ".*") + "$")
        for f in os.listdir(d) if os.path.isdir(d) else []:
            if rx.match(f):
                layer[rel(os.path.join(d, f))] = int(m.group(1))
lib_files = [rel(p) for p in c_files("lib", (".c", ".h"))]
for f in lib_files:
    if f not in layer:
        problems.append("%s: in no layer of lib/README.md" % f)

# ---- calls --------------------------------------------------------------------
defs = {}
for f in lib_files:
    path = os.path.join(src, f)
    if f.endswith(".c"):
        for name, _, _, static in functions(path):
            if not static:
                defs[name] = f
    else:
        for m in re.finditer(r"static inline[^;{]*?\b(\w+)\s*\([^;]*?\)\s*\{", strip(open(path).read())):
            defs.setdefault(m.group(1), f)
edges = {}
for f in lib_files:
    if not f.endswith(".c"):
        continue
    text = strip(open(os.path.join(src, f)).read())
    for name in set(re.findall(r"\b(qk_\w+)\s*\(", text)):
        g = defs.get(name)
        if not g or g == f or f not in layer or g not in layer:
            continue
        edges.setdefault(f, set()).add(g)
        if layer[g] > layer[f] or (layer[g] == layer[f] and g.endswith(".c")):
            problems.append("%s (layer %d) calls %s of %s (layer %d): %s" %
                            (f, layer[f], name, g, layer[g],
                             "within its layer" if layer[g] == layer[f] else "upward"))

# Circles (strongly connected files): none can form under the rule above,
# but say so if one does.
index, low, stack, on, sccs, counter = {}, {}, [], set(), [], [0]
sys.setrecursionlimit(10000)


def scc(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in edges.get(v, ()):
        if w not in index:
            scc(w)
            low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = stack.pop()
            on.discard(w)
            comp.append(w)
            if w == v:
                break
        if len(comp) > 1:
            sccs.append(sorted(comp))


for v in list(edges):
    if v not in index:
        scc(v)
for comp in sccs:
    problems.append("files call each other in a circle: %s" % ", ".join(comp))

# ---- includes of the programs ---------------------------------------------------
for d in ("cli", "nbd"):
    for p in c_files(d, (".c", ".h")):
        for inc in re.findall(r'#include\s+"([^"]+)"', open(p).read()):
            target = os.path.normpath(os.path.join(os.path.dirname(p), inc))
            mine = os.path.exists(target) and rel(target).split(os.sep)[0] in ("cli", "nbd")
            if not mine and inc != "qcowkit.h":
                problems.append("%s includes \"%s\": the programs use only qcowkit.h" % (rel(p), inc))
for p in c_files("lib", (".c", ".h")):
    for inc in re.findall(r'#include\s+"([^"]+)"', open(p).read()):
        if inc.startswith(("cli/", "nbd/", "../cli", "../nbd")) or inc in ("cli.h", "conn.h", "server.h"):
            problems.append("%s includes \"%s\" from a program" % (rel(p), inc))

# ---- function length ------------------------------------------------------------
longest = (0, "")
for d in ("lib", "cli", "nbd"):
    for p in c_files(d):
        for name, line, n, _ in functions(p):
            if n > longest[0]:
                longest = (n, "%s:%d %s" % (rel(p), line, name))
            if n > MAX_LINES:
                problems.append("%s:%d: %s is %d lines (at most %d)" % (rel(p), line, name, n, MAX_LINES))

for p in problems:
    print("FAIL: " + p)
print("%d files in %d layers, %d calls between files, %d circles; longest function %d lines (%s)" %
      (len(layer), len(set(layer.values())), sum(len(v) for v in edges.values()), len(sccs),
       longest[0], longest[1]))
sys.exit(1 if problems else 0)
