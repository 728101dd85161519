#!/bin/sh
# Install what building and testing qcowkit needs, on Debian, when missing.
# Runs as root (as `make test` does on a fresh machine); otherwise prints
# what is missing and carries on, so a prepared machine still works.
set -eu
pkgs="build-essential cmake pkg-config zlib1g-dev libzstd-dev libdeflate-dev liburing-dev zstd qemu-utils libnbd-bin python3 fio nbd-client fuse3"
# `make fuzz` (QK_FUZZ_DEPS=1) also needs clang and its libFuzzer runtime,
# which clang only recommends.
if [ "${QK_FUZZ_DEPS:-0}" = 1 ]; then
	pkgs="$pkgs clang libclang-rt-14-dev"
fi
missing=""
for p in $pkgs; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" ||
		missing="$missing $p"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
	echo "install-deps: missing packages:$missing (run as root to install)" >&2
	exit 0
fi
echo "install-deps: installing$missing"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $missing
