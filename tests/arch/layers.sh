#!/usr/bin/env bash
# The architecture of lib/README.md, checked (tests/arch/layers.py): layers
# called only downward, no circle between files, programs on the public
# header only, no function over 120 lines.
. "$(dirname "$0")/../lib.sh"
need python3
if python3 "$QK_SRC/tests/arch/layers.py" "$QK_SRC" >"$T/out" 2>&1; then ok layers
else bad layers "$(grep FAIL "$T/out" | head -5 | tr '\n' ' ')"; fi
cat "$T/out"
finish
