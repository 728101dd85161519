#!/bin/bash
# Power cuts at every write of the seeded workload of tests/fault/fault-walk.c
# (lazy_refcounts=off), internal snapshot create, apply and delete among its
# calls: after each, the image opens, qemu-img check finds no corruption
# (after the repairing open when a snapshot call left it dirty), check -r
# leaks leaves it clean, every byte a completed flush acknowledged reads
# back, and every snapshot listed (the old list or the new) holds what the
# guest had when it was taken. Then the same on an image with extended L2
# entries (16 KiB clusters: copy-on-write of subclusters).
. "$(dirname "$0")/../lib.sh"
. "$(dirname "$0")/images.bash"
need qemu-img qemu-io
walk power-cut cut off 1 8
walk power-cut-extl2 cut off 1 5 cluster_size=16k,extended_l2=on
finish
