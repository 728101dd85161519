#!/bin/bash
# EIO (once) and ENOSPC (from then on) at every third write point of the
# workload of tests/fault/fault-walk.c, and EIO at every third sync and read: the
# caller gets the errno and a one-line message naming it, the handle still
# reads what it wrote (a failed snapshot call: the old state or the new),
# and the image left behind checks consistent (leaks at most) with every
# flushed byte and every snapshot's content intact. The same on a
# lazy_refcounts image, every sixth point, and on one with extended L2
# entries.
. "$(dirname "$0")/../lib.sh"
. "$(dirname "$0")/images.bash"
need qemu-img qemu-io
walk io-errors errors off 3 21
walk io-errors-lazy errors on 6 42
walk io-errors-extl2 errors off 2 9 cluster_size=16k,extended_l2=on
finish
