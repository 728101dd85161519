#!/bin/bash
# Power cuts at every write of the seeded workload of tests/fault/fault-walk.c
# (lazy_refcounts=off): after each, the image opens, qemu-img check finds no
# corruption, check -r leaks leaves it clean, and every byte a completed
# flush acknowledged reads back.
. "$(dirname "$0")/../lib.sh"
. "$(dirname "$0")/images.bash"
need qemu-img qemu-io
walk power-cut cut off 1 6
finish
