#!/bin/bash
# Run the libFuzzer targets of a QK_FUZZ build (see `make fuzz`).
# Usage: run.sh BUILD_DIR SECONDS [TARGET...]   (default: every target)
# Each target runs SECONDS with ASan+UBSan, on a working corpus kept in
# BUILD_DIR/corpus/<target> (the qemu-img seeds, tests/fuzz/corpus/<target>
# and tests/fuzz/crashes/<target> are read as well); crashing inputs land
# in BUILD_DIR/crashes/, logs in BUILD_DIR/logs/<target>.log. With
# FUZZ_FORK=1 a target carries on past crashes (libFuzzer's fork mode).
# Exits non-zero when a target found a crash.
set -u
build=$(cd "$1" && pwd)
secs=$2
shift 2
src=$(cd "$(dirname "$0")" && pwd)
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
	for f in "$src"/fuzz-*.c; do targets+=("$(basename "$f" .c)"); done
fi
mkdir -p "$build/crashes" "$build/logs"
status=0
for t in "${targets[@]}"; do
	[ -x "$build/$t" ] || { echo "fuzz: $build/$t not built" >&2; status=1; continue; }
	mkdir -p "$build/corpus/$t"
	dirs=("$build/corpus/$t")
	for d in "$src/corpus/$t" "$src/crashes/$t"; do [ -d "$d" ] && dirs+=("$d"); done
	case $t in fuzz-read|fuzz-check|fuzz-write) dirs+=("$build/fuzz-seeds") ;; esac
	fork=()
	[ "${FUZZ_FORK:-0}" = 1 ] && fork=(-fork=1 -ignore_crashes=1 -ignore_ooms=1 -ignore_timeouts=1)
	echo "fuzz: $t for ${secs}s, log in $build/logs/$t.log"
	ASAN_OPTIONS=detect_leaks=1:allocator_may_return_null=1 \
	UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	"$build/$t" "${fork[@]}" -max_total_time="$secs" -rss_limit_mb=2048 -malloc_limit_mb=1024 \
		-timeout=10 -max_len=524288 -print_final_stats=1 \
		-artifact_prefix="$build/crashes/$t-" "${dirs[@]}" >"$build/logs/$t.log" 2>&1 ||
		status=1
	grep -E '^#[0-9]+.*DONE|stat::number_of_executed_units|SUMMARY' "$build/logs/$t.log" | tail -3
done
exit $status
