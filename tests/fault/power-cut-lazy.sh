#!/bin/bash
# Power cuts as in power-cut.sh, with lazy_refcounts=on: the image left
# dirty is repaired by the next read-write open, then must check clean and
# hold every flushed byte. Every second write point; and two of the dirty
# images are cut again at every write of that repair.
. "$(dirname "$0")/../lib.sh"
. "$(dirname "$0")/images.bash"
need qemu-img qemu-io
walk power-cut-lazy cut on 2 8
finish
