#!/usr/bin/env bash
# The trust boundary (tests/bad/trust.py): guest writes aimed at every kind
# of metadata, entries past the end of the file or with reserved bits, a
# table cut short by the end of the file, forbidden header extensions,
# host files that are not regular files, and --confine. Prints "qemu:"
# lines with what QEMU 7.2 does on the same inputs.
. "$(dirname "$0")/../lib.sh"
need qemu-img qemu-io python3 zstd
python3 "$QK_SRC/tests/bad/trust.py"
