#!/bin/sh
# `make run`: make a small sample image chain and show what qcowkit does
# with it in a few seconds.
set -eu
QK=${1:-build/qcowkit}
case $QK in /*) ;; *) QK=$(pwd)/$QK ;; esac
dir=$(mktemp -d "${TMPDIR:-/tmp}/qcowkit-demo.XXXXXX")
trap 'rm -rf "$dir"' EXIT
cd "$dir"

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

echo "Making a sample chain with qemu-img: base.qcow2 <- top.qcow2"
qemu-img create -q -f qcow2 base.qcow2 64M
qemu-io -c 'write -P 0x11 0 4M' -c 'write -c -P 0x22 8M 1M' base.qcow2 >/dev/null
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2
qemu-io -c 'write -P 0x33 1M 64k' -c 'write -z 2M 64k' top.qcow2 >/dev/null

step "$QK" info --backing-chain top.qcow2
step "$QK" map top.qcow2 --output=json
step "$QK" io -r top.qcow2 -c 'read -P 0x33 1M 64k' -c 'read -P 0x22 8M 1M'
step "$QK" convert -O raw top.qcow2 top.raw
step "$QK" compare top.qcow2 top.raw
step "$QK" bench -c 20000 -s 4k -d 4 top.qcow2
