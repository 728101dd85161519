#!/bin/bash
# resize: qcowkit and qemu-img resize copies of the same image (data,
# compressed clusters, with and without a backing file, v2 and v3, 512 B
# and 64 KiB clusters) with the same arguments: grow, grow by, shrink,
# shrink by, odd sizes, to zero, a shrink without --shrink, and growth
# large enough to need a bigger L1 table and new refcount blocks. The
# results must agree (exit status, content by qemu-img compare, qemu-img
# info less actual-size), ours must check clean, and a refusal is one line.
# (4G and 100G are asked only of 64 KiB clusters: with 512 B ones qemu-img
# itself spends minutes, on a 25 MiB L1 table for 100G, and over a backing
# file on zeroing every new cluster for 4G; qcowkit zeroes only the part
# the backing file covers.)
. "$(dirname "$0")/../lib.sh"
need qemu-img qemu-io
cd "$T" || exit 1

make_image() { # make_image COMPAT BACKING(0|1) CLUSTER
	rm -f a.qcow2 b.qcow2 base.qcow2
	qemu-img create -q -f qcow2 base.qcow2 8M
	qemu-io -c 'write -P 0x77 0 8M' base.qcow2 >/dev/null
	if [ "$2" = 1 ]; then
		qemu-img create -q -f qcow2 -o compat="$1",cluster_size="$3" -b base.qcow2 -F qcow2 a.qcow2 1M
	else
		qemu-img create -q -f qcow2 -o compat="$1",cluster_size="$3" a.qcow2 1M
	fi
	qemu-io -c 'write -P 1 0 700k' -c 'write -c -P 2 768k 128k' a.qcow2 >/dev/null
	cp a.qcow2 b.qcow2
}

n=0
for spec in "2M" "+3M" "--shrink 512k" "--shrink -300k" "1000001" "64M" "4G" "100G" "--shrink 0" "512k" "--shrink 999936"; do
	for compat in 1.1 0.10; do
		for back in 0 1; do
			for cs in 512 65536; do
				[ "$cs" = 512 ] && { [ "$spec" = 4G ] || [ "$spec" = 100G ]; } && continue
				make_image "$compat" "$back" "$cs"
				name="resize $spec compat=$compat backing=$back cluster=$cs"
				# shellcheck disable=SC2086
				qemu-img resize a.qcow2 $spec >/dev/null 2>&1; ra=$?
				# shellcheck disable=SC2086
				"$QCOWKIT" resize b.qcow2 $spec >out 2>err; rb=$?
				n=$((n + 1))
				if crashed $rb; then bad "$name" "crashed ($rb)"; continue; fi
				if ! qemu-img check b.qcow2 >/dev/null 2>&1; then
					bad "$name" "qemu-img check: $(qemu-img check b.qcow2 2>&1 | head -2 | tr '\n' ' ')"
					continue
				fi
				if [ $ra -ne 0 ]; then
					[ $rb -ne 0 ] && [ "$(wc -l <err)" -eq 1 ] && ok "$name" ||
						bad "$name" "qemu-img failed, qcowkit rc $rb: $(cat err)"
					continue
				fi
				[ $rb -eq 0 ] || { bad "$name" "qcowkit failed: $(cat err)"; continue; }
				grep -q "^Image resized.$" out || { bad "$name" "no 'Image resized.' line"; continue; }
				qemu-img compare -q a.qcow2 b.qcow2 || { bad "$name" "content differs from qemu-img's"; continue; }
				ia=$(qemu-img info --output=json a.qcow2 | grep -v -e actual-size -e filename)
				ib=$(qemu-img info --output=json b.qcow2 | grep -v -e actual-size -e filename)
				[ "$ia" = "$ib" ] && ok "$name" || bad "$name" "qemu-img info differs"
			done
		done
	done
done
# Shrink then grow: the bytes past the old end must read as zeros.
make_image 1.1 0 65536
"$QCOWKIT" resize --shrink b.qcow2 300k >/dev/null 2>&1 && "$QCOWKIT" resize b.qcow2 1M >/dev/null 2>&1
check "shrink then grow reads zeros" qemu-io -r -c 'read -P 1 0 300k' -c 'read -P 0 300k 724k' b.qcow2
check "shrink then grow checks clean" qemu-img check b.qcow2
echo "resize cases: $n"
finish
