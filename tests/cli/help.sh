#!/usr/bin/env bash
# `qcowkit --help` tells the truth. Every command it lists under "Commands:"
# runs: `CMD --help` exits 0 and prints "usage: qcowkit" and the synopsis
# --help lists, and `CMD` on a nonexistent file fails with one error line
# ("qcowkit: ...", never "not implemented"). The commands main.c's table
# runs through cmd_not_implemented are exactly those under "Not built yet:",
# and each says "not implemented yet". The README's command table (the rows
# of "## Commands" that start with "| `") names exactly the built commands,
# and main.c's table holds exactly the listed ones.
# shellcheck source=../lib.sh
. "$(dirname "$0")/../lib.sh"

cd "$T" || exit 1
MAIN_C=$QK_SRC/cli/main.c
README=$QK_SRC/README.md

# ---- what --help says -------------------------------------------------------
rc=0
"$QCOWKIT" --help >help.out 2>help.err || rc=$?
if [ "$rc" -ne 0 ] || [ -s help.err ]; then
  bad "--help" "exit $rc, stderr: $(head -c 200 help.err)"
fi
# The synopses: the indented lines after "Commands:", up to the blank line.
sed -n '/^Commands:$/,/^$/{/^  /s/^  //p}' help.out >synopses
cut -d' ' -f1 synopses | sort >listed
sed -n 's/^Not built yet: *//p' help.out | tr ',' '\n' | tr -d ' ' | sed '/^$/d' | sort >unbuilt
if [ -s listed ]; then ok "--help lists commands"; else bad "--help lists commands" "none under Commands:"; fi

# ---- main.c's table ------------------------------------------------------------
# Entries read `{ "name", cmd_function,`.
grep -oE '^[[:space:]]*\{ "[a-z0-9_-]+", cmd_[a-z0-9_]+' "$MAIN_C" |
  sed -E 's/^[[:space:]]*\{ "([^"]+)", (cmd_[a-z0-9_]+)$/\1 \2/' >table
awk '$2 != "cmd_not_implemented" { print $1 }' table | sort >table-built
awk '$2 == "cmd_not_implemented" { print $1 }' table | sort >table-unbuilt
if [ ! -s table ]; then
  bad "main.c table" "no entries found in $MAIN_C"
fi
if cmp -s listed table-built; then ok "built = main.c"; else
  bad "built = main.c" "--help lists [$(tr '\n' ' ' <listed)], main.c runs [$(tr '\n' ' ' <table-built)]"
fi
if cmp -s unbuilt table-unbuilt; then ok "not built = main.c"; else
  bad "not built = main.c" "--help says not built [$(tr '\n' ' ' <unbuilt)], main.c marks [$(tr '\n' ' ' <table-unbuilt)]"
fi

# ---- every listed command runs ---------------------------------------------------
while read -r cmd; do
  synopsis=$(grep -m1 "^$cmd " synopses)
  rc=0
  "$QCOWKIT" "$cmd" --help >cmd.out 2>cmd.err || rc=$?
  if [ "$rc" -ne 0 ]; then
    bad "$cmd --help" "exit $rc: $(head -c 200 cmd.err)"
  elif [ "$(head -n1 cmd.out)" != "usage: qcowkit $synopsis" ]; then
    bad "$cmd --help" "first line '$(head -n1 cmd.out)', --help lists 'qcowkit $synopsis'"
  else
    ok "$cmd --help"
  fi

  rc=0
  "$QCOWKIT" "$cmd" "$T/nonexistent.img" </dev/null >cmd.out 2>cmd.err || rc=$?
  lines=$(wc -l <cmd.err)
  if crashed "$rc"; then
    bad "$cmd FILE" "exit $rc: $(head -c 300 cmd.err)"
  elif [ "$rc" -eq 0 ]; then
    bad "$cmd FILE" "exit 0 on a nonexistent file"
  elif [ "$lines" -ne 1 ] || ! grep -q '^qcowkit: ' cmd.err; then
    bad "$cmd FILE" "want one 'qcowkit: ' error line, got $lines: $(head -c 300 cmd.err | tr '\n' '|')"
  elif grep -qi 'not implemented' cmd.err; then
    bad "$cmd FILE" "listed as built, but: $(cat cmd.err)"
  elif [ -s cmd.out ]; then
    bad "$cmd FILE" "printed on stdout: $(head -c 200 cmd.out)"
  else
    ok "$cmd FILE"
  fi
done <listed

# ---- every command not built yet says so ---------------------------------------------
while read -r cmd; do
  rc=0
  "$QCOWKIT" "$cmd" "$T/nonexistent.img" >cmd.out 2>cmd.err || rc=$?
  if [ "$rc" -eq 0 ] || crashed "$rc"; then
    bad "$cmd (not built)" "exit $rc"
  elif [ "$(cat cmd.err)" != "qcowkit: $cmd is not implemented yet" ]; then
    bad "$cmd (not built)" "stderr: $(head -c 200 cmd.err)"
  else
    ok "$cmd (not built)"
  fi
  rc=0
  "$QCOWKIT" "$cmd" --help >cmd.out 2>cmd.err || rc=$?
  if [ "$rc" -eq 0 ] && head -n1 cmd.out | grep -q "^usage: qcowkit $cmd "; then
    ok "$cmd --help (not built)"
  else
    bad "$cmd --help (not built)" "exit $rc: $(cat cmd.out cmd.err | head -c 200)"
  fi
done <table-unbuilt

# ---- the README's command table ------------------------------------------------------------
sed -n '/^## Commands$/,/^## /p' "$README" | grep '^| `' |
  sed -E 's/^\| `([a-z0-9_-]+).*/\1/' | sort -u >readme
if [ ! -s readme ]; then
  bad "README" "no command rows under '## Commands' in $README"
elif cmp -s readme listed; then
  ok "README = built"
else
  bad "README = built" "README lists [$(tr '\n' ' ' <readme)], --help [$(tr '\n' ' ' <listed)]"
fi

finish
