#!/usr/bin/env python3
"""mkbad.py OUTDIR [--qemu-report]

Build hostile / malformed disk images for qcowkit's bad-image test, plus the
manifest OUTDIR/cases.txt. Python 3 standard library only; small valid images
are made with qemu-img / qemu-io and then patched (all QCOW2 integers are
big-endian).

Manifest: '#' lines are comments; every other line has nine TAB-separated
fields (an empty field is written as '-'):

  file    image name inside OUTDIR
  args    words to pass to qcowkit before the file (e.g. "-f qcow2")
  expect  refuse  every command fails with a one-line error matching regex
          open    every command succeeds; convert output has sha256 rawsha
          either  any command may fail (one clean line) or succeed
          data    info (all three forms) may succeed; map, convert and io
                  must fail (the mapping metadata, L1/L2, is broken)
          read    info and map may succeed; convert and io must fail (the
                  guest data of cluster 0 cannot be produced)
          chain   info (without --backing-chain) may succeed; everything that
                  needs the backing chain must fail
          meta    info (all three forms) must fail: it has to read the broken
                  snapshot table; map, convert and io may succeed (the active
                  layer is intact)
          In the "may" positions a failure must still be one clean line that
          matches regex (except for "either", where any clean line will do).
  check   the exit statuses `qcowkit check` may give, as digits: 0 clean,
          1 refused (one line), 2 corruptions, 3 leaks only
  regex   case-insensitive extended regex for the error line
  good    regions that must read right where the image opens, as
          PATTERN@OFFSET+LENGTH[,...] (io -r ... read -P PATTERN OFFSET
          LENGTH), '-' for none
  rawsha  sha256 of the raw guest content (qemu-img convert -O raw) for open
          cases, '-' otherwise
  source  where the case comes from, "KIND: reference" with KIND one of
          cve (a CVE, with the fix or advisory that names it), iotest (a
          qemu-iotests test and its section), spec (a rule of
          docs/interop/qcow2.txt, by section) or peer (a bug report against
          another implementation)
  reason  what the image is and what QEMU 7.2 does with it; "qemu:" quotes
          what qemu-img 7.2 says about the same file

--qemu-report additionally runs qemu-img/qemu-io 7.x on every case and prints
what QEMU does (used to write the reason column; not needed by the test).
"""

import gzip
import hashlib
import lzma
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import zlib

MIB = 1 << 20
QCOW_MAGIC = b"QFI\xfb"
EXT_END = 0
EXT_BACKING_FMT = 0xE2792ACA
EXT_FEATURES = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441
OFF_MASK = 0x00FFFFFFFFFFFE00
COPIED = 1 << 63
COMPRESSED = 1 << 62
SIZE = 4 * MIB          # virtual size of every crafted image

OUT = None
TPL = None
CASES = []              # (file, args, expect, regex, reason)
SUPPORT = []            # extra files that cases refer to (backing files ...)


def die(msg):
    sys.stderr.write("mkbad.py: %s\n" % msg)
    sys.exit(1)


def run(*argv, cwd=None, ok=True, timeout=None):
    try:
        p = subprocess.run(argv, cwd=cwd or TPL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        if ok:
            die("%s timed out" % " ".join(argv))
        return subprocess.CompletedProcess(argv, 124, b"", b"TIMEOUT (killed after %ss)" % str(timeout).encode())
    if ok and p.returncode != 0:
        die("%s failed: %s" % (" ".join(argv), p.stderr.decode(errors="replace").strip()))
    return p


def qimg_create(name, size=SIZE, opts=None, backing=None, cwd=None):
    argv = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if opts:
        argv += ["-o", opts]
    if backing:
        argv += ["-u", "-b", backing, "-F", "qcow2"]
    argv += [name, str(size)]
    run(*argv, cwd=cwd)
    return os.path.join(cwd or TPL, name)


def qio(path, *cmds):
    argv = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        argv += ["-c", c]
    argv.append(path)
    p = run(*argv)
    if b"error" in p.stdout.lower() or b"error" in p.stderr.lower():
        die("qemu-io %s: %s %s" % (cmds, p.stdout, p.stderr))


# Standard guest content of every data-bearing template: distinct patterns in
# the first cluster (which `io read 0 64k` hits), the second, one in the
# middle and the last, so that convert/compare sees every L2 region.
STD_WRITES = ["write -P 0x22 64k 64k", "write -P 0x33 1M 64k",
              "write -P 0x44 4032k 64k"]


class Img:
    """A QCOW2 file loaded into memory for patching."""

    def __init__(self, path):
        with open(path, "rb") as f:
            self.b = bytearray(f.read())

    def _grow(self, end):
        if end > len(self.b):
            self.b.extend(b"\0" * (end - len(self.b)))

    def put(self, off, data):
        self._grow(off + len(data))
        self.b[off:off + len(data)] = data

    def u16(self, off, v=None):
        if v is None:
            return struct.unpack_from(">H", self.b, off)[0]
        self.put(off, struct.pack(">H", v))

    def u32(self, off, v=None):
        if v is None:
            return struct.unpack_from(">I", self.b, off)[0]
        self.put(off, struct.pack(">I", v & 0xFFFFFFFF))

    def u64(self, off, v=None):
        if v is None:
            return struct.unpack_from(">Q", self.b, off)[0]
        self.put(off, struct.pack(">Q", v & 0xFFFFFFFFFFFFFFFF))

    # header fields
    @property
    def version(self): return self.u32(4)
    @property
    def cluster_bits(self): return self.u32(20)
    @property
    def cs(self): return 1 << self.cluster_bits
    @property
    def l1_off(self): return self.u64(40)
    @property
    def hdr_len(self): return 72 if self.version == 2 else self.u32(100)
    @property
    def extl2(self): return self.version >= 3 and bool(self.u64(72) & (1 << 4))

    def set_incompat(self, bits): self.u64(72, self.u64(72) | bits)
    def set_compat(self, bits): self.u64(80, self.u64(80) | bits)
    def set_autoclear(self, bits): self.u64(88, self.u64(88) | bits)

    def l1(self, i, v=None):
        return self.u64(self.l1_off + 8 * i, v)

    def l2_table(self, l1i=0):
        off = self.l1(l1i) & OFF_MASK
        if not off:
            die("template has no L2 table at L1 index %d" % l1i)
        return off

    def l2(self, i, v=None, l1i=0):
        es = 16 if self.extl2 else 8
        return self.u64(self.l2_table(l1i) + es * i, v)

    def l2_bitmap(self, i, v=None, l1i=0):
        return self.u64(self.l2_table(l1i) + 16 * i + 8, v)

    def compressed(self, i=0):
        """(coffset, nb_sectors_field, entry-offset-in-file) of compressed L2 entry i."""
        e = self.l2(i)
        if not e & COMPRESSED:
            die("L2 entry %d is not compressed" % i)
        shift = 62 - (self.cluster_bits - 8)
        mask = (1 << (self.cluster_bits - 8)) - 1
        return e & ((1 << shift) - 1), (e >> shift) & mask

    def set_compressed(self, i, coffset, length):
        shift = 62 - (self.cluster_bits - 8)
        nsec = (coffset + length - 1) // 512 - coffset // 512
        self.l2(i, COMPRESSED | (nsec << shift) | coffset)

    def exts(self):
        """List of (position, type, length) of the header extensions."""
        res, pos = [], self.hdr_len
        end = self.u64(8) or self.cs
        while pos + 8 <= min(end, self.cs):
            t, n = struct.unpack_from(">II", self.b, pos)
            res.append((pos, t, n))
            if t == EXT_END:
                break
            pos += 8 + ((n + 7) & ~7)
        return res

    def find_ext(self, typ):
        for pos, t, n in self.exts():
            if t == typ:
                return pos, n
        die("template lacks header extension %#x" % typ)

    def rebuild_exts(self, exts, backing=None, boff=None, bsize=None):
        """Rewrite the extension area: exts is [(type, data)], then the end
        marker, then the backing file name (offset/size overridable)."""
        pos = self.hdr_len
        self.put(pos, b"\0" * (self.cs - pos))
        for t, data in exts:
            self.put(pos, struct.pack(">II", t, len(data)) + data)
            pos += 8 + ((len(data) + 7) & ~7)
        self.put(pos, b"\0" * 8)
        pos += 8
        if backing is None:
            self.u64(8, 0)
            self.u32(16, 0)
        else:
            self.put(pos, backing)
            self.u64(8, pos if boff is None else boff)
            self.u32(16, len(backing) if bsize is None else bsize)

    def save(self, name):
        with open(os.path.join(OUT, name), "wb") as f:
            f.write(self.b)


# Where each case comes from and what `check` and reads of its intact parts
# must give. source: "KIND: reference" with KIND one of cve (a QEMU or
# OpenStack CVE, with the fix that names it), iotest (a qemu-iotests test
# and its section), spec (a rule of docs/interop/qcow2.txt, by section) or
# peer (a bug report against another implementation). check: the exit
# statuses `qcowkit check` may give (0 clean, 2 corruptions, 3 leaks only,
# 1 refused with one line). good: regions that must read their pattern
# (PATTERN@OFFSET+LENGTH, comma separated) in images that open.
STD_GOOD = "0x22@64k+64k,0x33@1M+64k,0x44@4032k+64k"
V144 = ("ELSA-2014-0420 / RHSA-2014:0420 qemu-kvm changelog, bz#1079452")
META = {
    "ok-std.qcow2": ("spec: positive control (valid v3 image)", "0", None),
    "ok-comp.qcow2": ("spec: positive control (Compressed Clusters Descriptor, deflate)", "0", None),
    "ok-zstd.qcow2": ("spec: positive control (compression type 1, zstd)", "0", None),
    "ok-v2.qcow2": ("spec: positive control (version 2)", "0", None),
    "ok-extl2.qcow2": ("spec: positive control (Extended L2 Entries)", "0", None),
    "ok-snap.qcow2": ("spec: positive control (Snapshots)", "0", None),
    "ok-bitmap.qcow2": ("spec: positive control (Bitmaps extension)", "0", None),
    "empty.qcow2": ("spec: Header (bytes 0-103 must exist)", "1", None),
    "trunc-header.qcow2": ("spec: Header (a v3 header is at least 104 bytes)", "1", None),
    "trunc-header-probe.qcow2": ("spec: Header (a v3 header is at least 104 bytes)", "01", None),
    "bad-magic.qcow2": ("spec: Header, magic QFI\\xfb", "1", None),
    "version1.qcow2": ("spec: Header, version (valid values are 2 and 3)", "1", None),
    "version4.qcow2": ("spec: Header, version (valid values are 2 and 3)", "1", None),
    "cluster-bits-8.qcow2": ("spec: Header, cluster_bits (must not be less than 9)", "1", None),
    "cluster-bits-22.qcow2": ("spec: Header, cluster_bits (QEMU supports at most 2 MiB)", "1", None),
    "cluster-bits-31.qcow2": ("peer: ublk-org/qcow2-rs PR #8 (cluster_bits checked against 9..30 after a crafted value overflowed the cluster-size shift)", "1", None),
    "cluster-bits-63.qcow2": ("peer: ublk-org/qcow2-rs PR #8, a crafted cluster_bits overflowed the shift that makes the cluster size (panic)", "1", None),
    "cluster-bits-40.qcow2": ("peer: ublk-org/qcow2-rs PR #8, a crafted cluster_bits overflowed the shift that makes the cluster size (panic)", "1", None),
    "l1-size-huge.qcow2": ("cve: CVE-2014-0144, qcow2: Validate active L1 table offset and size (" + V144 + "); qemu-iotests 080 '== Invalid L1 table =='", "1", None),
    "l1-size-over-limit.qcow2": ("cve: CVE-2014-0144, qcow2: Validate active L1 table offset and size (" + V144 + ")", "1", None),
    "l1-too-small.qcow2": ("iotest: 080 '== Invalid L1 table (with internal snapshot in the image) ==' (L1 table is too small)", "1", None),
    "l1-unaligned.qcow2": ("cve: CVE-2014-0144, qcow2: Validate active L1 table offset and size (" + V144 + ")", "1", None),
    "l1-past-eof.qcow2": ("spec: Header, l1_table_offset (the active L1 table lies in the file)", "1", None),
    "l1-at-header.qcow2": ("spec: Host cluster management (cluster 0 is the header, not an L1 table)", "12", None),
    "hdrlen-short.qcow2": ("spec: Header, header_length (at least 104 bytes for version 3)", "1", None),
    "hdrlen-unaligned.qcow2": ("spec: Header, header_length (a multiple of 8)", "1", None),
    "hdrlen-over-cluster.qcow2": ("iotest: 080 '== Huge header size ==' (qcow2 header exceeds cluster size)", "1", None),
    "ext-len-over-cluster.qcow2": ("iotest: 080 '== Huge unknown header extension ==' (Header extension too large)", "1", None),
    "ext-len-wrap.qcow2": ("iotest: 080 '== Huge unknown header extension ==' (length rounding wraps)", "1", None),
    "vsize-2e63.qcow2": ("spec: Header, size (virtual disk size in bytes)", "1", None),
    "vsize-max.qcow2": ("spec: Header, size (virtual disk size in bytes)", "1", None),
    "incompat-bit20.qcow2": ("iotest: 036 '=== Image with unknown incompatible feature bit ==='", "1", None),
    "encrypt-aes.qcow2": ("spec: Header, crypt_method 1 (AES)", "1", None),
    "encrypt-luks.qcow2": ("spec: Header, crypt_method 2 (LUKS) and the Full disk encryption header pointer", "1", None),
    "encrypt-method3.qcow2": ("spec: Header, crypt_method (0, 1 or 2)", "1", None),
    "corrupt-bit.qcow2": ("iotest: 060 '=== Testing L2 reference into L1 ===' (a corrupt image still opens read-only)", "0", None),
    "dirty-lazy.qcow2": ("spec: Header, incompatible bit 0 (dirty) with compatible bit 0 (lazy refcounts)", "023", None),
    "dirty-nolazy.qcow2": ("spec: Header, incompatible bit 0 (dirty)", "023", None),
    "unknown-compat.qcow2": ("iotest: 036 '=== Create image with unknown autoclear feature bit ===' (unknown compatible/autoclear bits are ignored)", "0", None),
    "datafile-no-ext.qcow2": ("spec: Header, incompatible bit 2 (external data file) and the External data file name extension", "1", None),
    "datafile-missing.qcow2": ("iotest: 061 (an image whose data file cannot be opened; see the CVE-2024-4467 fix, QEMU commit bd385a52)", "1", None),
    "ok-datafile.qcow2": ("spec: positive control (External data file name extension)", "0", None),
    "comptype1-nobit.qcow2": ("spec: Header, compression_type (incompatible bit 3 must be set for a type other than 0)", "1", None),
    "compbit-type0.qcow2": ("spec: Header, compression_type (incompatible bit 3 set with type 0)", "1", None),
    "comptype2.qcow2": ("spec: Header, compression_type (0 zlib, 1 zstd)", "1", None),
    "refcount-order-7.qcow2": ("iotest: 112 '=== refcount_bits limits ===' (may not exceed 64)", "1", None),
    "refcount-table-unaligned.qcow2": ("iotest: 080 '== Misaligned refcount table =='", "1", None),
    "refcount-table-past-eof.qcow2": ("spec: Header, refcount_table_offset (the table lies in the file)", "12", None),
    "refcount-table-none.qcow2": ("iotest: 060 '=== Testing zero refcount table size ===' (QEMU commit 951053a9, LP#1728615)", "1", None),
    "refcount-table-huge.qcow2": ("cve: CVE-2014-0144, qcow2: Check refcount table size (" + V144 + ")", "1", None),
    "l2-unaligned.qcow2": ("iotest: 060 '=== Testing unaligned L1 entry ==='", "2", None),
    "l2-past-eof.qcow2": ("spec: Cluster mapping, L1 table entry (offset of an L2 table in the file)", "2", None),
    "l1-reserved.qcow2": ("spec: Cluster mapping, L1 table entry bits 1-8 and 56-62 reserved", "2", None),
    "l2-reserved.qcow2": ("spec: Cluster mapping, Standard Cluster Descriptor bits 1-8 and 56-61 reserved", "2", STD_GOOD),
    "data-unaligned.qcow2": ("iotest: 060 '=== Testing unaligned L2 entry ==='", "2", STD_GOOD),
    "data-past-eof.qcow2": ("iotest: 080 '== Invalid L2 entry (huge physical offset) =='", "2", STD_GOOD),
    "data-shared.qcow2": ("spec: Cluster mapping, L2 entry bit 63 (COPIED means a refcount of exactly one)", "2", "0x11@64k+64k,0x33@1M+64k,0x44@4032k+64k"),
    "v2-zero-flag.qcow2": ("spec: Cluster mapping, Standard Cluster Descriptor bit 0 (zero flag, version 3 only)", "0", STD_GOOD),
    "extl2-alloc-zero.qcow2": ("spec: Extended L2 Entries (a subcluster both allocated and zero is invalid)", "2", STD_GOOD),
    "extl2-unalloc-bits.qcow2": ("spec: Extended L2 Entries (allocated subclusters of an unallocated cluster are invalid)", "2", STD_GOOD),
    "extl2-cluster-bits-12.qcow2": ("spec: Extended L2 Entries (32 subclusters; QEMU needs 16 KiB clusters)", "1", None),
    "comp-past-eof.qcow2": ("spec: Compressed Clusters Descriptor (host offset in the file)", "2", STD_GOOD),
    "comp-garbage-deflate.qcow2": ("spec: Compressed Clusters Descriptor (deflate stream)", "0", STD_GOOD),
    "comp-short-deflate.qcow2": ("spec: Compressed Clusters Descriptor (a stream decompresses to a whole cluster)", "0", STD_GOOD),
    "comp-overlong-deflate.qcow2": ("spec: Compressed Clusters Descriptor (a stream decompresses to a whole cluster)", "0", STD_GOOD),
    "comp-max-sectors.qcow2": ("spec: Compressed Clusters Descriptor (additional sectors field)", "2", STD_GOOD),
    "comp-garbage-zstd.qcow2": ("spec: Compressed Clusters Descriptor with compression type 1 (zstd frame)", "0", STD_GOOD),
    "comp-overlong-zstd.qcow2": ("spec: Compressed Clusters Descriptor with compression type 1 (a frame decompresses to a whole cluster)", "0", STD_GOOD),
    "ok-zstd-rle.qcow2": ("spec: positive control (zstd frame with an RLE block)", "0", None),
    "snap-nb-huge.qcow2": ("cve: CVE-2014-0144, qcow2: Validate snapshot table offset/size (" + V144 + "); qemu-iotests 080 '== Invalid snapshot table =='", "1", None),
    "snap-past-eof.qcow2": ("spec: Snapshots (the snapshot table lies in the file)", "1", None),
    "snap-unaligned.qcow2": ("cve: CVE-2014-0144, qcow2: Validate snapshot table offset/size (" + V144 + ")", "1", None),
    "snap-extra-huge.qcow2": ("iotest: 261 '=== Reject too much unknown extra data ==='", "1", None),
    "snap-name-past-eof.qcow2": ("spec: Snapshots (id and name lie within the table)", "1", None),
    "bitmap-nb-huge.qcow2": ("spec: Bitmaps extension, nb_bitmaps (QEMU supports at most 65535)", "1", None),
    "bitmap-dir-past-eof.qcow2": ("spec: Bitmaps extension, bitmap_directory_offset", "1", None),
    "bitmap-dir-size-huge.qcow2": ("spec: Bitmaps extension, bitmap_directory_size", "1", None),
    "backing-fmt-twice.qcow2": ("spec: Header extensions (each type appears at most once)", "1", None),
    "backing-fmt-long.qcow2": ("spec: Header extensions, Backing file format name (QEMU holds at most 15 bytes)", "1", None),
    "backing-off-past-cluster.qcow2": ("cve: CVE-2014-0144, qcow2: Check backing_file_offset (" + V144 + ")", "1", None),
    "backing-size-past-cluster.qcow2": ("iotest: 080 '== Invalid backing file size ==' (Backing file name too long)", "1", None),
    "ok-backing-name-1020.qcow2": ("spec: Header, backing_file_size (must not be longer than 1023 bytes)", "0", None),
    "backing-name-1024.qcow2": ("spec: Header, backing_file_size (must not be longer than 1023 bytes)", "1", None),
    "backing-self.qcow2": ("spec: Header, backing_file_offset (a chain that names itself has no end)", "1", None),
    "backing-loop-a.qcow2": ("spec: Header, backing_file_offset (a chain that loops has no end)", "1", None),
    "chain70.qcow2": ("spec: Header, backing_file_offset (qcowkit caps chains at 64 images)", "1", None),
    "backing-missing.qcow2": ("spec: Header, backing_file_offset", "1", None),
    "ok-backing.qcow2": ("spec: positive control (backing file)", "0", None),
    "backing-probe-vmdk.qcow2": ("cve: CVE-2008-2004 (format probing of a backing file; QEMU block.c: 'This is not a good idea when your image is raw')", "1", None),
    "backing-fmt-vmdk.qcow2": ("cve: CVE-2022-47951 (a VMDK backing file can name host files as extents: OpenStack nova/glance/cinder, Debian DSA-5338-1)", "1", None),
    "foreign-qcow1.img": ("cve: CVE-2014-0222 (qcow version 1 L2 table size overflow; qcowkit has no qcow1 driver and must say so)", "1", None),
    "foreign-vmdk.img": ("spec: Header, magic (not QFI\\xfb: another format, named)", "1", None),
    "foreign-vmdk-desc.img": ("cve: CVE-2022-47951 (VMDK descriptor naming host files as extents: OpenStack nova/glance/cinder, Debian DSA-5338-1)", "1", None),
    "foreign-vdi.img": ("spec: Header, magic (not QFI\\xfb: another format, named)", "1", None),
    "foreign-vdi-sig.img": ("spec: Header, magic (not QFI\\xfb: another format, named)", "1", None),
    "foreign-vdi-text.img": ("spec: Header, magic (not QFI\\xfb: another format, named)", "1", None),
    "foreign-vhd.img": ("spec: Header, magic (not QFI\\xfb: another format, named)", "1", None),
    "foreign-vhdx.img": ("spec: Header, magic (not QFI\\xfb: another format, named)", "1", None),
    "foreign-qed.img": ("spec: Header, magic (not QFI\\xfb: another format, named)", "1", None),
    "foreign-luks.img": ("spec: Header, magic (not QFI\\xfb: a LUKS volume must not be read as raw)", "1", None),
    "foreign-android-sparse.img": ("spec: Header, magic (not QFI\\xfb: another format, named)", "1", None),
    "foreign-zstd.img": ("spec: Header, magic (not QFI\\xfb: a compressed file, named)", "1", None),
    "foreign-gzip.img": ("spec: Header, magic (not QFI\\xfb: a compressed file, named)", "1", None),
    "foreign-xz.img": ("spec: Header, magic (not QFI\\xfb: a compressed file, named)", "1", None),
}


def tpl(name):
    return Img(os.path.join(TPL, name))


def case(name, args, expect, regex, reason, source=None, check=None, good=None):
    """Record a case; source, check and good come from META when not given."""
    assert expect in ("refuse", "open", "either", "data", "read", "chain",
                      "meta"), expect
    if source is None:
        if name not in META:
            die("case %s has no entry in META" % name)
        source, check, good = META[name]
    assert re.match(r"(cve|iotest|spec|peer): ", source), source
    assert check and set(check) <= set("0123"), check
    for f in (reason, source, good or ""):
        assert "\t" not in f and "\n" not in f
    if not os.path.exists(os.path.join(OUT, name)):
        die("case %s: file was not written" % name)
    CASES.append((name, args or "-", expect, check, regex or "-", good or "-",
                  source, reason))


def write_file(name, data):
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(data)


def support(name):
    SUPPORT.append(name)


def sparse_copy(src, dst):
    """Copy src to dst leaving holes where src has zero clusters."""
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        while True:
            blk = fi.read(65536)
            if not blk:
                break
            if blk.count(0) == len(blk):
                fo.seek(len(blk), 1)
            else:
                fo.write(blk)
        fo.truncate()


# --------------------------------------------------------------------------
# small hand-made compressed streams

def raw_deflate(data, wbits=-12):
    c = zlib.compressobj(6, zlib.DEFLATED, wbits, 9)
    return c.compress(data) + c.flush()


def zstd_rle_frame(byte, blocks, block_size=0x10000):
    """A valid zstd frame made of RLE blocks (no library needed)."""
    total = blocks * block_size
    out = b"\x28\xb5\x2f\xfd"                  # magic (0xFD2FB528 LE)
    out += bytes([0xA0])                       # FHD: FCS 4 bytes, single segment
    out += struct.pack("<I", total)            # Frame_Content_Size
    for i in range(blocks):
        last = 1 if i == blocks - 1 else 0
        hdr = last | (1 << 1) | (block_size << 3)   # type 1 = RLE
        out += struct.pack("<I", hdr)[:3] + bytes([byte])
    return out


# --------------------------------------------------------------------------
# templates

def make_templates():
    # std: v3, 64k clusters, zlib, data in cluster 0 (uncompressed)
    p = qimg_create("std.qcow2")
    qio(p, "write -P 0x11 0 64k", *STD_WRITES)
    # comp: cluster 0 compressed with deflate
    p = qimg_create("comp.qcow2")
    qio(p, "write -c -P 0x11 0 64k", *STD_WRITES)
    # zstd: cluster 0 compressed with zstd
    p = qimg_create("zstd.qcow2", opts="compression_type=zstd")
    qio(p, "write -c -P 0x11 0 64k", *STD_WRITES)
    # v2 (compat=0.10)
    p = qimg_create("v2.qcow2", opts="compat=0.10")
    qio(p, "write -P 0x11 0 64k", *STD_WRITES)
    # extended L2, 64k clusters (2k subclusters); first cluster partly written
    p = qimg_create("extl2.qcow2", opts="extended_l2=on")
    qio(p, "write -P 0x11 0 4k", *STD_WRITES)
    # empty image (no data; reads go to the backing file)
    qimg_create("empty.qcow2")
    # snapshot: std + one internal snapshot, then the active layer changes
    p = qimg_create("snap.qcow2")
    qio(p, "write -P 0x55 0 64k", *STD_WRITES)
    run("qemu-img", "snapshot", "-c", "s1", p)
    qio(p, "write -P 0x11 0 64k")
    # bitmap: std + one persistent dirty bitmap
    p = qimg_create("bitmap.qcow2")
    qio(p, "write -P 0x11 0 64k", *STD_WRITES)
    run("qemu-img", "bitmap", "--add", p, "b0")
    qio(p, "write -P 0x11 0 64k")   # note: qemu-io does not track the bitmap
    # encrypted with the legacy AES method (qemu-img 7.2 can still create it)
    p = run("qemu-img", "create", "-q", "-f", "qcow2", "--object",
            "secret,id=s0,data=abc", "-o",
            "encrypt.format=aes,encrypt.key-secret=s0", "aes.qcow2", str(SIZE),
            ok=False)
    if p.returncode != 0:
        i = tpl("std.qcow2")
        i.u32(32, 1)
        i.save("tpl/aes.qcow2")


def luks1_header(payload_sectors=4096):
    """A LUKS1 header (enough for format detection)."""
    h = b"LUKS\xba\xbe" + struct.pack(">H", 1)
    h += b"aes".ljust(32, b"\0") + b"xts-plain64".ljust(32, b"\0")
    h += b"sha256".ljust(32, b"\0")
    h += struct.pack(">II", payload_sectors, 64)
    h += bytes(20) + bytes(32) + struct.pack(">I", 1000)
    h += b"3f1b9e0c-7b55-4b0e-9b1e-2c0f3d9a4c11".ljust(40, b"\0")
    for k in range(8):
        h += struct.pack(">II", 0x0000DEAD, 1000) + bytes(32) + \
            struct.pack(">II", 8 + k * 512, 4000)
    return h.ljust(4096, b"\0")


# --------------------------------------------------------------------------
# the cases

def header_cases():
    write_file("empty.qcow2", b"")
    case("empty.qcow2", "-f qcow2", "refuse",
         "header|short|small|truncat|empty|end of file|eof|magic",
         "0-byte file forced as qcow2; a 104-byte v3 header cannot be read. "
         "qemu: Image is not in qcow2 format")

    hdr = tpl("std.qcow2").b[:50]
    write_file("trunc-header.qcow2", bytes(hdr))
    case("trunc-header.qcow2", "-f qcow2", "refuse",
         "header|short|small|truncat|end of file|eof",
         "50-byte file starting with QFI\\xfb v3, forced qcow2: header truncated. "
         "qemu: qcow2 header too short")
    write_file("trunc-header-probe.qcow2", bytes(hdr))
    case("trunc-header-probe.qcow2", "-", "either",
         "header|short|small|truncat|end of file|eof|qcow",
         "same 50-byte file, format probed (no -f): detecting it as a "
         "truncated qcow2 (QEMU: qcow2 header too short) or as raw are both "
         "acceptable")

    i = tpl("std.qcow2")
    i.put(0, b"QFI\xfa")
    i.save("bad-magic.qcow2")
    case("bad-magic.qcow2", "-f qcow2", "refuse", r"magic|not .{0,12}qcow",
         "magic QFI\\xfa forced as qcow2. qemu: Image is not in qcow2 format")

    i = tpl("std.qcow2")
    i.u32(4, 1)
    i.save("version1.qcow2")
    case("version1.qcow2", "-f qcow2", "refuse",
         r"version[^0-9]{0,4}1([^0-9]|$)|qcow[^0-9]{0,6}1([^0-9]|$)|v1([^0-9]|$)",
         "qcow2 image with version=1 (qcow v1), forced qcow2; must be refused "
         "naming the version. spec: version 2 or 3. qemu: Unsupported qcow2 version 1")

    i = tpl("std.qcow2")
    i.u32(4, 4)
    i.save("version4.qcow2")
    case("version4.qcow2", "-", "refuse", r"version",
         "version=4 (probed by magic). qemu: Unsupported qcow2 version 4")

    for bits, why in ((8, "below the spec minimum 9"),
                      (22, "4 MiB, above QEMU's 2 MiB maximum"),
                      (31, "2 GiB: 1 << 31 overflows a 32-bit int"),
                      (40, "absurd: 1 TiB clusters, shifts overflow 32-bit maths"),
                      (63, "2^63-byte clusters: every shift by it overflows")):
        i = tpl("std.qcow2")
        i.u32(20, bits)
        i.save("cluster-bits-%d.qcow2" % bits)
        case("cluster-bits-%d.qcow2" % bits, "-", "refuse", r"cluster",
             "cluster_bits=%d, %s. qemu: Unsupported cluster size: 2^%d" % (bits, why, bits))

    i = tpl("std.qcow2")
    i.u32(36, 0x7FFFFFFF)
    i.save("l1-size-huge.qcow2")
    case("l1-size-huge.qcow2", "-", "refuse", r"l1",
         "l1_size=0x7fffffff (16 GiB of L1). QEMU limit 32 MiB (validation "
         "added by the CVE-2014-0143/0144 fixes). qemu: Active L1 table too large")

    i = tpl("std.qcow2")
    i.u32(36, (32 * MIB) // 8 + 1)
    i.save("l1-size-over-limit.qcow2")
    case("l1-size-over-limit.qcow2", "-", "refuse", r"l1",
         "l1_size=0x400001, one entry over QEMU's 32 MiB L1 limit "
         "(QCOW_MAX_L1_SIZE). qemu: Active L1 table too large")

    i = tpl("std.qcow2")
    i.u64(24, 1 << 30)       # 1 GiB needs 2 L1 entries with 64k clusters
    i.save("l1-too-small.qcow2")
    case("l1-too-small.qcow2", "-", "refuse", r"l1",
         "virtual size 1 GiB but l1_size=1 (covers 512 MiB). "
         "qemu: L1 table is too small")

    i = tpl("std.qcow2")
    i.u64(40, i.l1_off + 0x208)
    i.save("l1-unaligned.qcow2")
    case("l1-unaligned.qcow2", "-", "refuse", r"l1",
         "l1_table_offset not cluster aligned. qemu: Active L1 table offset invalid")

    i = tpl("std.qcow2")
    i.u64(40, 1 << 40)
    i.save("l1-past-eof.qcow2")
    case("l1-past-eof.qcow2", "-", "data",
         r"l1|end of file|eof|past|beyond|truncat|short|outside",
         "l1_table_offset 1 TiB, file is < 1 MiB. QEMU zero-fills reads past "
         "EOF, so qemu-img info/convert succeed reading all zeros; a hardened "
         "reader must not silently invent an empty L1 (qemu-img check reports "
         "only a leak)")

    i = tpl("std.qcow2")
    i.u64(40, 0)
    i.save("l1-at-header.qcow2")
    case("l1-at-header.qcow2", "-", "either", r"l1|l2|reserved|overlap|header",
         "l1_table_offset 0: the L1 is the header itself, its first entry "
         "(magic+version) has reserved bits set and points far past EOF. "
         "Only no crash and a clean result are required")

    i = tpl("std.qcow2")
    i.u32(100, 72)
    i.save("hdrlen-short.qcow2")
    case("hdrlen-short.qcow2", "-", "refuse", r"header",
         "v3 header_length 72 < 104. qemu: qcow2 header too short")

    i = tpl("std.qcow2")
    i.u32(100, 108)
    i.save("hdrlen-unaligned.qcow2")
    case("hdrlen-unaligned.qcow2", "-", "refuse", r"header",
         "v3 header_length 108, not a multiple of 8 (spec rule; extensions "
         "would start misaligned). QEMU 7.2 has no such check; its extension "
         "walk from offset 108 then fails: Header extension too large")

    i = tpl("std.qcow2")
    i.u32(100, 0x10008)
    i.save("hdrlen-over-cluster.qcow2")
    case("hdrlen-over-cluster.qcow2", "-", "refuse", r"header|cluster",
         "header_length 0x10008 > cluster size. qemu: qcow2 header exceeds cluster size")

    i = tpl("std.qcow2")
    pos, n = i.find_ext(EXT_FEATURES)
    i.u32(pos + 4, 0x10000)
    i.save("ext-len-over-cluster.qcow2")
    case("ext-len-over-cluster.qcow2", "-", "refuse", r"extension|header",
         "feature-table extension length 0x10000 runs past cluster 0. "
         "qemu: Header extension too large")

    i = tpl("std.qcow2")
    pos, n = i.find_ext(EXT_FEATURES)
    i.u32(pos + 4, 0xFFFFFFF9)
    i.save("ext-len-wrap.qcow2")
    case("ext-len-wrap.qcow2", "-", "refuse", r"extension|header",
         "extension length 0xfffffff9: rounding up to 8 wraps a 32-bit "
         "length to 0 (infinite loop / overflow bait). qemu: Header extension too large")

    i = tpl("std.qcow2")
    i.u64(24, 1 << 63)
    i.save("vsize-2e63.qcow2")
    case("vsize-2e63.qcow2", "-", "refuse", r"size|big|large|l1",
         "virtual size 2^63 (negative as int64; l1_size 1). "
         "qemu: Image is too big")

    i = tpl("std.qcow2")
    i.u64(24, 0xFFFFFFFFFFFFFE00)
    i.save("vsize-max.qcow2")
    case("vsize-max.qcow2", "-", "refuse", r"size|big|large|l1",
         "virtual size 2^64-512: size-to-cluster rounding overflows. "
         "qemu: Could not refresh total sector count: File too large")


def feature_cases():
    i = tpl("std.qcow2")
    i.set_incompat(1 << 20)
    i.save("incompat-bit20.qcow2")
    case("incompat-bit20.qcow2", "-", "refuse",
         r"(feature|incompat).*(20|100000)|(20|100000).*(feature|incompat)",
         "unknown incompatible feature bit 20; the message must name it. "
         "spec: refuse unknown incompat bits. qemu: Unsupported qcow2 "
         "feature(s): Unknown incompatible feature: 100000")

    shutil.copy(os.path.join(TPL, "aes.qcow2"), os.path.join(OUT, "encrypt-aes.qcow2"))
    case("encrypt-aes.qcow2", "-", "read", r"encrypt|aes|cipher",
         "crypt_method 1 (legacy AES-CBC, made by qemu-img 7.2). qcowkit has "
         "no encryption. qemu-img info works (encrypted: yes); reading: "
         "Parameter 'encrypt.key-secret' is required for cipher")

    # LUKS-in-qcow2 without the slow real pbkdf: crypt_method 2 + FDE header
    # pointer extension to a cluster that holds a LUKS1 header.
    i = tpl("std.qcow2")
    i.u32(32, 2)
    luks_off = len(i.b) // i.cs * i.cs + i.cs
    i.put(luks_off, luks1_header())
    exts = [(EXT_CRYPTO, struct.pack(">QQ", luks_off, 4096))]
    i.rebuild_exts(exts)
    i.save("encrypt-luks.qcow2")
    case("encrypt-luks.qcow2", "-", "read", r"encrypt|luks",
         "crypt_method 2 (LUKS) with a full-disk-encryption header extension "
         "pointing at a LUKS1 header. qcowkit has no encryption. qemu-img info "
         "works; reading: Parameter 'encrypt.key-secret' is required for cipher")

    i = tpl("std.qcow2")
    i.u32(32, 3)
    i.save("encrypt-method3.qcow2")
    case("encrypt-method3.qcow2", "-", "refuse", r"encrypt|crypt",
         "unknown crypt_method 3. qemu: Unsupported encryption method 3")

    i = tpl("std.qcow2")
    i.set_incompat(1 << 1)
    i.save("corrupt-bit.qcow2")
    case("corrupt-bit.qcow2", "-", "open", "-",
         "POSITIVE: incompat bit 1 (corrupt) set on a sound image: QEMU "
         "refuses read-write opens but read-only ones (info, map, convert, "
         "io -r) work. The bit must not be cleared by read-only commands")

    i = tpl("std.qcow2")
    i.set_incompat(1 << 0)
    i.set_compat(1 << 0)
    i.save("dirty-lazy.qcow2")
    case("dirty-lazy.qcow2", "-", "open", "-",
         "POSITIVE: dirty bit + lazy_refcounts, as left by a crash. Reading "
         "needs no refcounts; read-only opens must work and not repair")

    i = tpl("std.qcow2")
    i.set_incompat(1 << 0)
    i.save("dirty-nolazy.qcow2")
    case("dirty-nolazy.qcow2", "-", "open", "-",
         "POSITIVE: dirty bit without the lazy_refcounts compat bit; QEMU "
         "reads it read-only without complaint")

    i = tpl("std.qcow2")
    i.set_compat(1 << 17)
    i.set_autoclear(1 << 40)
    i.rebuild_exts([(0x12345678, b"hello, unknown extension\0\0\0")] +
                   [(t, bytes(i.b[p + 8:p + 8 + n])) for p, t, n in i.exts()
                    if t == EXT_FEATURES])
    i.save("unknown-compat.qcow2")
    case("unknown-compat.qcow2", "-", "open", "-",
         "POSITIVE: unknown compatible bit 17, unknown autoclear bit 40 and "
         "an unknown header extension 0x12345678: spec says ignore them")

    i = tpl("std.qcow2")
    i.set_incompat(1 << 2)
    i.save("datafile-no-ext.qcow2")
    case("datafile-no-ext.qcow2", "-", "read", r"data.?file|external",
         "incompat bit 2 (external data file) without a data-file name "
         "extension and no data file. qemu-img info works; reading: 'data-file' "
         "is required for this image")

    p = qimg_create("datafile-missing.qcow2", opts="data_file=" + os.path.join(OUT, "datafile-missing.raw"), cwd=OUT)
    os.unlink(os.path.join(OUT, "datafile-missing.raw"))
    case("datafile-missing.qcow2", "-", "read",
         r"data.?file|external|no such|missing|not found|datafile-missing\.raw",
         "external data file (absolute name in the DATA extension) does not "
         "exist. qemu: Could not open '.../datafile-missing.raw': No such file "
         "or directory (qemu-img info still succeeds)")

    p = qimg_create("ok-datafile.qcow2", opts="data_file=" + os.path.join(OUT, "ok-datafile.raw"), cwd=OUT)
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 64k", "-c",
        "write -P 0x33 1M 64k", p)
    support("ok-datafile.raw")
    case("ok-datafile.qcow2", "-", "open", "-",
         "POSITIVE control: valid image with an external data file (absolute "
         "name: QEMU 7.2 resolves a relative data-file name against the "
         "current directory, not the image's)")

    i = tpl("std.qcow2")
    i.b[104] = 1
    i.save("comptype1-nobit.qcow2")
    case("comptype1-nobit.qcow2", "-", "refuse", r"compress",
         "compression_type 1 (zstd) but incompat bit 3 clear. qemu: "
         "Compression type incompatible feature bit must be set")

    i = tpl("std.qcow2")
    i.set_incompat(1 << 3)
    i.save("compbit-type0.qcow2")
    case("compbit-type0.qcow2", "-", "refuse", r"compress",
         "incompat bit 3 set but compression_type 0. qemu: Compression type "
         "incompatible feature bit must not be set")

    i = tpl("std.qcow2")
    i.set_incompat(1 << 3)
    i.b[104] = 2
    i.save("comptype2.qcow2")
    case("comptype2.qcow2", "-", "refuse", r"compress",
         "compression_type 2 (unknown) with incompat bit 3. "
         "qemu: qcow2: unknown compression type: 2")

    i = tpl("std.qcow2")
    i.u32(96, 7)
    i.save("refcount-order-7.qcow2")
    case("refcount-order-7.qcow2", "-", "refuse", r"refcount",
         "refcount_order 7 (128-bit refcounts), spec max 6. "
         "qemu: Reference count entry width too large; may not exceed 64 bits")

    for name, patch, why in (
            ("refcount-table-unaligned", lambda i: i.u64(48, i.u64(48) + 0x200),
             "refcount_table_offset not cluster aligned. qemu: Reference count table offset invalid"),
            ("refcount-table-past-eof", lambda i: i.u64(48, 1 << 40),
             "refcount_table_offset 1 TiB, past EOF (QEMU zero-fills and opens)"),
            ("refcount-table-none", lambda i: i.u32(56, 0),
             "refcount_table_clusters 0 (crashed QEMU before commit 951053a9, "
             "LP#1728615). qemu: Image does not contain a reference count table"),
            ("refcount-table-huge", lambda i: i.u32(56, 0x10000000),
             "refcount_table_clusters 2^28 (16 TiB of table). qemu: Reference count table too large")):
        i = tpl("std.qcow2")
        patch(i)
        i.save(name + ".qcow2")
        case(name + ".qcow2", "-", "either", r"refcount",
             why + ". Reading needs no refcounts: a read-only info/convert may "
             "succeed or fail cleanly (only no crash/hang is required)")


def l1l2_cases():
    i = tpl("std.qcow2")
    i.l1(0, (i.l1(0) + 0x200) | COPIED)
    i.save("l2-unaligned.qcow2")
    case("l2-unaligned.qcow2", "-", "data", r"l2|align|boundary",
         "L1[0] points at an L2 table offset 512 bytes into a cluster. qemu: "
         "L2 table offset 0x40200 unaligned (L1 index: 0) -> EIO")

    i = tpl("std.qcow2")
    i.l1(0, (1 << 40) | COPIED)
    i.save("l2-past-eof.qcow2")
    case("l2-past-eof.qcow2", "-", "data",
         r"l2|end of file|eof|past|beyond|truncat|short|outside",
         "L1[0] -> L2 table at 1 TiB, past EOF. QEMU zero-fills the read and "
         "maps everything as unallocated (silent data loss); a hardened "
         "reader refuses")

    i = tpl("std.qcow2")
    i.l1(0, i.l1(0) | (1 << 56) | 0x1)
    i.save("l1-reserved.qcow2")
    case("l1-reserved.qcow2", "-", "either", r"reserved|l1",
         "L1[0] with reserved bits 56 and 0 set. QEMU masks them and reads "
         "the data; qemu-img check reports a corruption. Either is fine")

    i = tpl("std.qcow2")
    i.l2(0, i.l2(0) | (1 << 57) | 0x2)
    i.save("l2-reserved.qcow2")
    case("l2-reserved.qcow2", "-", "either", r"reserved|l2",
         "L2[0] with reserved bits 57 and 1 set. QEMU masks them and reads "
         "the data. Either is fine")

    i = tpl("std.qcow2")
    i.l2(0, i.l2(0) + 0x200)
    i.save("data-unaligned.qcow2")
    case("data-unaligned.qcow2", "-", "data", r"align|boundary|offset",
         "L2[0] data cluster offset 512 bytes into a cluster. qemu: Cluster "
         "allocation offset 0x...200 unaligned (L2 offset: 0x40000, L2 index: 0) -> EIO")

    i = tpl("std.qcow2")
    i.l2(0, COPIED | (1 << 40))
    i.save("data-past-eof.qcow2")
    case("data-past-eof.qcow2", "-", "either",
         r"end of file|eof|past|beyond|truncat|short|outside|read",
         "L2[0] -> data cluster at 1 TiB, past EOF. QEMU zero-fills and reads "
         "zeros. Either is fine (not a metadata structure)")

    i = tpl("std.qcow2")
    i.l2(1, i.l2(0))
    i.save("data-shared.qcow2")
    case("data-shared.qcow2", "-", "either", r"refcount|copied|shared|overlap",
         "L2[0] and L2[1] both point at the same host cluster with COPIED "
         "set (refcount 1). Reading is well defined; either is fine")

    i = tpl("v2.qcow2")
    i.l2(0, i.l2(0) | 1)
    i.save("v2-zero-flag.qcow2")
    case("v2-zero-flag.qcow2", "-", "data", r"zero|v2|version|pre-v3|compat|0\.10",
         "zero flag (bit 0) in an L2 entry of a v2 image. qemu: Zero cluster "
         "entry found in pre-v3 image (L2 offset: 0x40000, L2 index: 0) -> EIO")

    i = tpl("extl2.qcow2")
    i.l2_bitmap(0, i.l2_bitmap(0) | (1 << 32))
    i.save("extl2-alloc-zero.qcow2")
    case("extl2-alloc-zero.qcow2", "-", "data", r"subcluster|l2|invalid|zero|alloc",
         "extended L2 entry 0: subcluster 0 has both its allocation and its "
         "zero bit. spec: invalid. qemu: Invalid cluster entry found "
         "(L2 offset: ..., L2 index: 0) -> EIO")

    i = tpl("extl2.qcow2")
    i.l2(0, 0)
    i.save("extl2-unalloc-bits.qcow2")
    case("extl2-unalloc-bits.qcow2", "-", "data", r"subcluster|l2|invalid|alloc",
         "extended L2 entry 0 has host offset 0 (unallocated) but allocation "
         "bits set in its bitmap. spec: invalid. qemu: Invalid cluster entry -> EIO")

    i = tpl("extl2.qcow2")
    i.u32(20, 12)
    i.save("extl2-cluster-bits-12.qcow2")
    case("extl2-cluster-bits-12.qcow2", "-", "refuse", r"extended|subcluster|cluster",
         "extended L2 with cluster_bits 12 (128-byte subclusters). QEMU needs "
         ">= 16 KiB clusters. qemu: Unsupported subcluster size: 128")


def compressed_cases():
    i = tpl("comp.qcow2")
    shift = 62 - (i.cluster_bits - 8)
    i.l2(0, (i.l2(0) & ~((1 << shift) - 1)) | (1 << 40))
    i.save("comp-past-eof.qcow2")
    case("comp-past-eof.qcow2", "-", "read",
         r"compress|end of file|eof|past|beyond|short|truncat|read|inflate|deflate",
         "compressed descriptor of cluster 0 points at 1 TiB, past EOF. "
         "qemu: zero-filled read, inflate fails -> EIO")

    i = tpl("comp.qcow2")
    co, nsec = i.compressed(0)
    n = (nsec + 1) * 512 - (co & 511)
    i.put(co, b"\xff" + random.Random(1).randbytes(n - 1))
    i.save("comp-garbage-deflate.qcow2")
    case("comp-garbage-deflate.qcow2", "-", "read",
         r"compress|inflate|deflate|zlib|decompress|corrupt",
         "compressed cluster 0 bytes replaced by garbage (0xff: invalid "
         "deflate block type, then random). qemu: EIO on read")

    i = tpl("comp.qcow2")
    co, nsec = i.compressed(0)
    data = raw_deflate(b"\x5a" * 100)
    i.put(co, data)
    i.set_compressed(0, co, len(data))
    i.save("comp-short-deflate.qcow2")
    case("comp-short-deflate.qcow2", "-", "read",
         r"compress|inflate|deflate|zlib|decompress|short|size|corrupt",
         "compressed cluster 0 is a valid deflate stream of only 100 bytes, "
         "not a whole cluster. qemu: EIO (needs exactly cluster_size bytes)")

    i = tpl("comp.qcow2")
    co, nsec = i.compressed(0)
    data = raw_deflate(b"\x5a" * (4 * MIB))
    i.put(co, data)
    i.set_compressed(0, co, len(data))
    i.save("comp-overlong-deflate.qcow2")
    case("comp-overlong-deflate.qcow2", "-", "either",
         r"compress|inflate|deflate|zlib|decompress|long|size|corrupt",
         "compressed cluster 0 inflates to 4 MiB (a 64 KiB cluster): the "
         "decoder must stop at the cluster buffer (overflow bait). QEMU "
         "accepts it (Z_BUF_ERROR with a full buffer) and returns the first 64 KiB")

    i = tpl("comp.qcow2")
    shift = 62 - (i.cluster_bits - 8)
    co, nsec = i.compressed(0)
    i.l2(0, COMPRESSED | (((1 << (i.cluster_bits - 8)) - 1) << shift) | co)
    i.save("comp-max-sectors.qcow2")
    case("comp-max-sectors.qcow2", "-", "either",
         r"compress|inflate|deflate|size|end of file|eof",
         "compressed descriptor with the maximum sector count (128 sectors = "
         "2 clusters of input) for a tiny stream: the input range covers the "
         "next data cluster and runs past EOF. QEMU reads it fine")

    i = tpl("zstd.qcow2")
    co, nsec = i.compressed(0)
    n = (nsec + 1) * 512 - (co & 511)
    i.put(co + 4, random.Random(2).randbytes(n - 4))
    i.save("comp-garbage-zstd.qcow2")
    case("comp-garbage-zstd.qcow2", "-", "read",
         r"compress|zstd|decompress|corrupt",
         "zstd image; compressed cluster 0 keeps the zstd magic but the rest "
         "is random. qemu: EIO on read")

    i = tpl("zstd.qcow2")
    co, nsec = i.compressed(0)
    data = zstd_rle_frame(0x5A, 4, 0x10000)
    i.put(co, data)
    i.set_compressed(0, co, len(data))
    i.save("comp-overlong-zstd.qcow2")
    case("comp-overlong-zstd.qcow2", "-", "either",
         r"compress|zstd|decompress|long|size|corrupt",
         "zstd cluster 0 is a valid frame declaring and producing 256 KiB "
         "(4 RLE blocks) for a 64 KiB cluster: overflow bait. qemu: EIO on "
         "read (unlike deflate, where QEMU accepts the overlong stream)")

    i = tpl("zstd.qcow2")
    co, nsec = i.compressed(0)
    data = zstd_rle_frame(0x5A, 1, 0x10000)
    i.put(co, data)
    i.set_compressed(0, co, len(data))
    i.save("ok-zstd-rle.qcow2")
    case("ok-zstd-rle.qcow2", "-", "open", "-",
         "POSITIVE: zstd cluster 0 is a hand-made valid frame of one RLE "
         "block (64 KiB of 0x5a); any conforming zstd decoder reads it")


def snapshot_cases():
    i = tpl("snap.qcow2")
    i.u32(60, 0xFFFFFFFF)
    i.save("snap-nb-huge.qcow2")
    case("snap-nb-huge.qcow2", "-", "meta", r"snapshot",
         "nb_snapshots 0xffffffff (QEMU max 65536): allocation bomb (snapshot "
         "table validation came with the CVE-2014-0144 fixes). qemu: Snapshot "
         "table too large")

    i = tpl("snap.qcow2")
    i.u64(64, 1 << 40)
    i.save("snap-past-eof.qcow2")
    case("snap-past-eof.qcow2", "-", "meta",
         r"snapshot",
         "snapshots_offset 1 TiB, past EOF. QEMU zero-fills the read and "
         "opens it (info lists a snapshot with empty id and name)")

    i = tpl("snap.qcow2")
    i.u64(64, i.u64(64) + 8)
    i.save("snap-unaligned.qcow2")
    case("snap-unaligned.qcow2", "-", "meta", r"snapshot",
         "snapshots_offset not cluster aligned. qemu: Snapshot table offset invalid")

    i = tpl("snap.qcow2")
    so = i.u64(64)
    i.u32(so + 36, 1032)
    i.save("snap-extra-huge.qcow2")
    case("snap-extra-huge.qcow2", "-", "meta", r"snapshot|extra",
         "snapshot entry extra_data_size 1032 > 1024. qemu: Too much extra "
         "metadata in snapshot table entry 0")

    # move the (single-entry) table to the very end of the file, then make
    # the name run 64 KiB past EOF
    i = tpl("snap.qcow2")
    so = i.u64(64)
    extra, idn, namen = i.u32(so + 36), i.u16(so + 12), i.u16(so + 14)
    n = (40 + extra + idn + namen + 7) & ~7
    new = (len(i.b) + i.cs - 1) // i.cs * i.cs
    i.put(new, bytes(i.b[so:so + n]))
    i.u64(64, new)
    i.u16(new + 14, 0xFFFF)
    i.save("snap-name-past-eof.qcow2")
    case("snap-name-past-eof.qcow2", "-", "meta", r"snapshot",
         "snapshot table is the last thing in the file and its entry's "
         "name_size 65535 runs past EOF. QEMU zero-fills and opens it")


def bitmap_cases():
    i = tpl("bitmap.qcow2")
    pos, n = i.find_ext(EXT_BITMAPS)
    i.u32(pos + 8, 0xFFFFFFFF)
    i.save("bitmap-nb-huge.qcow2")
    case("bitmap-nb-huge.qcow2", "-", "either", r"bitmap",
         "bitmaps extension nb_bitmaps 0xffffffff (QEMU max 65535). qemu: "
         "bitmaps_ext: Image has 4294967295 bitmaps, exceeding the QEMU "
         "supported maximum of 65535. Bitmaps are autoclear metadata a reader "
         "may ignore, so either")

    i = tpl("bitmap.qcow2")
    pos, n = i.find_ext(EXT_BITMAPS)
    i.u64(pos + 8 + 16, 1 << 40)
    i.save("bitmap-dir-past-eof.qcow2")
    case("bitmap-dir-past-eof.qcow2", "-", "either", r"bitmap",
         "bitmap directory offset 1 TiB, past EOF. qemu: Bitmap '' doesn't "
         "satisfy the constraints. Bitmaps are autoclear metadata a reader may "
         "ignore, so either")

    i = tpl("bitmap.qcow2")
    pos, n = i.find_ext(EXT_BITMAPS)
    i.u64(pos + 8 + 8, 0x7FFFFFFFFFFFFFF8)
    i.save("bitmap-dir-size-huge.qcow2")
    case("bitmap-dir-size-huge.qcow2", "-", "either", r"bitmap",
         "bitmap directory_size 2^63-8 (allocation bomb). qemu: bitmaps_ext: "
         "bitmap directory size (9223372036854775800) exceeds the maximum "
         "supported size (67107840). Either")


def backing_cases():
    empty = tpl("empty.qcow2")
    fmt = (EXT_BACKING_FMT, b"qcow2")

    i = tpl("std.qcow2")
    i.save("base.qcow2")
    support("base.qcow2")

    i = Img(os.path.join(TPL, "empty.qcow2"))
    i.rebuild_exts([fmt, (EXT_BACKING_FMT, b"raw")], b"base.qcow2")
    i.save("backing-fmt-twice.qcow2")
    case("backing-fmt-twice.qcow2", "-", "refuse",
         r"twice|duplicate|more than once|repeated|extension|backing.?f(ile.)?ormat",
         "two conflicting backing-format extensions ('qcow2' then 'raw'). spec: "
         "each extension type appears at most once. QEMU 7.2 does not check; "
         "the last one wins and it reads the qcow2 base as raw")

    i = Img(os.path.join(TPL, "empty.qcow2"))
    i.rebuild_exts([(EXT_BACKING_FMT, b"qcow2qcow2qcow2q")], b"base.qcow2")
    i.save("backing-fmt-long.qcow2")
    case("backing-fmt-long.qcow2", "-", "refuse", r"backing|format|extension",
         "backing-format name of 16 bytes. qemu: ERROR: ext_backing_format: "
         "len=16 too large (>=16)")

    i = Img(os.path.join(TPL, "empty.qcow2"))
    i.rebuild_exts([fmt], b"base.qcow2", boff=0x10000 + 8)
    i.save("backing-off-past-cluster.qcow2")
    case("backing-off-past-cluster.qcow2", "-", "refuse", r"backing",
         "backing_file_offset 0x10008 beyond cluster 0. qemu: Invalid "
         "backing file offset")

    i = Img(os.path.join(TPL, "empty.qcow2"))
    i.rebuild_exts([fmt], b"base.qcow2", boff=0xFFF0, bsize=100)
    i.save("backing-size-past-cluster.qcow2")
    case("backing-size-past-cluster.qcow2", "-", "refuse", r"backing",
         "backing file name at 0xfff0 with size 100 runs past cluster 0. "
         "qemu: Backing file name too long")

    i = Img(os.path.join(TPL, "empty.qcow2"))
    i.rebuild_exts([fmt], b"./" * 505 + b"base.qcow2")   # 1020 bytes
    i.save("ok-backing-name-1020.qcow2")
    case("ok-backing-name-1020.qcow2", "-", "open", "-",
         "POSITIVE: backing file name of 1020 bytes ('./'*505 + base.qcow2), "
         "just under the 1023 limit")

    i = Img(os.path.join(TPL, "empty.qcow2"))
    i.rebuild_exts([fmt], b"./" * 507 + b"base.qcow2")   # 1024 bytes
    i.save("backing-name-1024.qcow2")
    case("backing-name-1024.qcow2", "-", "refuse", r"backing|name|long",
         "backing file name of 1024 bytes > spec max 1023. qemu: Backing "
         "file name too long")

    i = Img(os.path.join(TPL, "empty.qcow2"))
    i.rebuild_exts([fmt], b"backing-self.qcow2")
    i.save("backing-self.qcow2")
    case("backing-self.qcow2", "-", "chain",
         r"loop|cycl|circular|recurs|itself|deep|depth",
         "image names itself as backing file. qemu-img info --backing-chain: "
         "Backing file '...' creates an infinite loop. QEMU 7.2 qemu-io, "
         "convert and check spin at 100% CPU forever on it")

    for a, b in (("backing-loop-a.qcow2", "backing-loop-b.qcow2"),
                 ("backing-loop-b.qcow2", "backing-loop-a.qcow2")):
        i = Img(os.path.join(TPL, "empty.qcow2"))
        i.rebuild_exts([fmt], b.encode())
        i.save(a)
    support("backing-loop-b.qcow2")
    case("backing-loop-a.qcow2", "-", "chain",
         r"loop|cycl|circular|recurs|itself|deep|depth",
         "a -> b -> a backing loop. qemu-img info --backing-chain: Backing "
         "file '...' creates an infinite loop; qemu-io/convert/check hang")

    # 70 images: chain70.qcow2 -> chain-68 -> ... -> chain-00 (has data)
    tpl("std.qcow2").save("chain-00.qcow2")
    support("chain-00.qcow2")
    for k in range(1, 69):
        i = Img(os.path.join(TPL, "empty.qcow2"))
        i.rebuild_exts([fmt], b"chain-%02d.qcow2" % (k - 1))
        i.save("chain-%02d.qcow2" % k)
        support("chain-%02d.qcow2" % k)
    i = Img(os.path.join(TPL, "empty.qcow2"))
    i.rebuild_exts([fmt], b"chain-68.qcow2")
    i.save("chain70.qcow2")
    case("chain70.qcow2", "-", "chain", r"deep|depth|chain|too many|level|64",
         "backing chain of 70 images (> 64). QEMU has no limit and reads it; "
         "qcowkit caps chain depth at 64 so a chain cannot exhaust fds/stack")

    i = Img(os.path.join(TPL, "empty.qcow2"))
    i.rebuild_exts([fmt], b"no-such-backing.qcow2")
    i.save("backing-missing.qcow2")
    case("backing-missing.qcow2", "-", "chain",
         r"backing|no such|not found|missing|exist|no-such-backing",
         "backing file does not exist. qemu-img info works (it does not open "
         "backing files); qemu-io: Could not open backing file: Could not "
         "open 'no-such-backing.qcow2': No such file or directory")

    i = tpl("std.qcow2")
    i.save("ok-backing-base.qcow2")
    support("ok-backing-base.qcow2")
    p = qimg_create("ok-backing.qcow2", backing="ok-backing-base.qcow2", cwd=OUT)
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x66 64k 64k", p)
    case("ok-backing.qcow2", "-", "open", "-",
         "POSITIVE control: 2-level chain (top has cluster 1, base the rest)")

    # backing file of another format, without a backing-format extension
    run("qemu-img", "create", "-q", "-f", "vmdk", "backing.vmdk", str(SIZE), cwd=OUT)
    support("backing.vmdk")
    i = Img(os.path.join(TPL, "empty.qcow2"))
    i.rebuild_exts([], b"backing.vmdk")
    i.save("backing-probe-vmdk.qcow2")
    case("backing-probe-vmdk.qcow2", "-", "chain", r"vmdk",
         "backing file is a VMDK and no backing format is recorded: the probe "
         "must name the format and refuse, never fall back to raw (probing "
         "CVE-2008-2004 class). QEMU probes and opens the VMDK")

    i = Img(os.path.join(TPL, "empty.qcow2"))
    i.rebuild_exts([(EXT_BACKING_FMT, b"vmdk")], b"backing.vmdk")
    i.save("backing-fmt-vmdk.qcow2")
    case("backing-fmt-vmdk.qcow2", "-", "chain", r"vmdk",
         "backing-format extension says 'vmdk', a format qcowkit does not "
         "support. QEMU opens it")


def foreign_cases():
    def mk(fmt, name, opts=None, synth=None):
        argv = ["qemu-img", "create", "-q", "-f", fmt]
        if opts:
            argv += ["-o", opts]
        p = run(*(argv + [name, str(SIZE)]), cwd=OUT, ok=False)
        if p.returncode != 0:
            if synth is None:
                die("qemu-img create -f %s failed" % fmt)
            write_file(name, synth)

    mk("qcow", "foreign-qcow1.img")
    case("foreign-qcow1.img", "-", "refuse",
         r"qcow[^0-9]{0,12}1([^0-9]|$)|version[^0-9]{0,4}1([^0-9]|$)|v1([^0-9]|$)",
         "real qcow v1 image (qemu-img create -f qcow): 'QFI\\xfb' version 1, "
         "must be refused by name, not read as raw (QEMU opens it with its "
         "qcow driver)")

    mk("vmdk", "foreign-vmdk.img")
    case("foreign-vmdk.img", "-", "refuse", r"vmdk",
         "real monolithicSparse VMDK ('KDMV' at 0)")

    mk("vmdk", "foreign-vmdk-desc.img", opts="subformat=monolithicFlat")
    support("foreign-vmdk-desc-flat.img")
    case("foreign-vmdk-desc.img", "-", "refuse", r"vmdk",
         "VMDK text descriptor ('# Disk DescriptorFile', monolithicFlat); "
         "read as raw it would expose the descriptor, not the disk")

    mk("vdi", "foreign-vdi.img")
    case("foreign-vdi.img", "-", "refuse", r"vdi|virtualbox",
         "real VDI (text at 0, signature 0xbeda107f LE at 0x40)")

    b = bytearray(512)
    struct.pack_into("<II", b, 0x40, 0xBEDA107F, 0x00010001)
    write_file("foreign-vdi-sig.img", bytes(b) + bytes(65536))
    case("foreign-vdi-sig.img", "-", "refuse", r"vdi|virtualbox",
         "only the VDI signature 0xbeda107f (LE) at 0x40, zeros elsewhere "
         "(QEMU's vdi probe looks only at the signature)")

    write_file("foreign-vdi-text.img",
               b"<<< Oracle VM VirtualBox Disk Image >>>\n".ljust(512, b"\0") + bytes(65536))
    case("foreign-vdi-text.img", "-", "refuse", r"vdi|virtualbox",
         "only the VirtualBox text '<<< Oracle VM VirtualBox Disk Image >>>' at "
         "0 (QEMU's probe ignores the text and opens this as raw)")

    mk("vpc", "foreign-vhd.img", opts="subformat=dynamic")
    case("foreign-vhd.img", "-", "refuse", r"vhd|vpc|virtual ?pc",
         "real dynamic VHD ('conectix' at 0)")

    mk("vhdx", "foreign-vhdx.img")
    case("foreign-vhdx.img", "-", "refuse", r"vhdx",
         "real VHDX ('vhdxfile' at 0)")

    mk("qed", "foreign-qed.img")
    case("foreign-qed.img", "-", "refuse", r"qed",
         "real QED image ('QED\\0' at 0)")

    write_file("foreign-luks.img", luks1_header() + bytes(65536))
    case("foreign-luks.img", "-", "refuse", r"luks",
         "LUKS1 header ('LUKS\\xba\\xbe' at 0); reading it as raw would "
         "expose ciphertext as a disk")

    sp = struct.pack("<IHHHHIIII", 0xED26FF3A, 1, 0, 28, 12, 4096, 1024, 1, 0)
    sp += struct.pack("<HHII", 0xCAC3, 0, 1024, 12)      # DONT_CARE chunk
    write_file("foreign-android-sparse.img", sp)
    case("foreign-android-sparse.img", "-", "refuse", r"sparse|android|simg",
         "Android sparse image (magic 0xed26ff3a LE at 0); QEMU 7.2 probes it "
         "as raw")

    write_file("foreign-zstd.img", zstd_rle_frame(0, 1, 0x10000))
    case("foreign-zstd.img", "-", "refuse", r"zstd|zstandard|compress",
         "a zstd frame (28 b5 2f fd): a compressed file, not a disk image; "
         "QEMU probes it as raw")

    write_file("foreign-gzip.img", gzip.compress(bytes(65536), mtime=0))
    case("foreign-gzip.img", "-", "refuse", r"gzip|gz|compress",
         "a gzip file (1f 8b): e.g. a downloaded .qcow2.gz not unpacked; QEMU "
         "probes it as raw")

    write_file("foreign-xz.img", lzma.compress(bytes(65536), format=lzma.FORMAT_XZ))
    case("foreign-xz.img", "-", "refuse", r"xz|compress",
         "an xz file (fd 37 7a 58 5a 00); QEMU probes it as raw")


def t64(name, opts=None, writes=(), snapshot=None, after=()):
    """A 64 MiB image as qemu-iotests 080/060/112 make them (qemu-img create,
    then qemu-io writes), so their offsets hold: header 0, refcount table
    0x10000, refcount block 0x20000, L1 0x30000, first L2 0x40000."""
    p = qimg_create(name, size=64 * MIB, opts=opts)
    if writes:
        qio(p, *writes)
    if snapshot:
        run("qemu-img", "snapshot", "-c", snapshot, p)
    if after:
        qio(p, *after)
    return Img(p)


IT080 = "iotest: 080 '%s'"
IT060 = "iotest: 060 '%s'"
# std-like content of the iotest images: cluster 0 and one at 1 MiB
T64_WRITES = ("write -P 0x11 0 64k", "write -P 0x33 1M 64k")
T64_GOOD = "0x33@1M+64k"


def iotest080_cases():
    for v in (0xFFFFFFFF, 0x7FFFFFFF):
        i = t64("t.qcow2")
        i.u32(100, v)
        n = "i080-hdrlen-%x.qcow2" % v
        i.save(n)
        case(n, "-", "refuse", r"header", "header_length %#x. qemu: qcow2 header "
             "exceeds cluster size" % v, IT080 % "== Huge header size ==", "1")

    # (080 pokes the first extension at 104, the v3 header length of its
    # time; images now have 112-byte headers, so at header_length)
    for bfo, n, why in ((0xFFFFFFFFFFFFFFFF, "max", "backing_file_offset 2^64-1. qemu: Invalid backing file offset"),
                        (None, "in-ext", "backing_file_offset pointing inside the extension. qemu: Header extension too large"),
                        (0, "0", "no backing file. qemu: Header extension too large")):
        i = t64("t.qcow2")
        h = i.hdr_len
        i.u64(8, h + 4 if bfo is None else bfo)
        i.u32(h, 0x12345678)
        i.u32(h + 4, 0x7FFFFFFF)
        n = "i080-ext-huge-bfo-%s.qcow2" % n
        i.save(n)
        case(n, "-", "refuse", r"extension|header|backing",
             "unknown header extension 0x12345678 of length 0x7fffffff; " + why,
             IT080 % "== Huge unknown header extension ==", "1")

    for v in (0xFFFFFFFF, 0x00020001):
        i = t64("t.qcow2")
        i.u32(56, v)
        n = "i080-reftable-clusters-%x.qcow2" % v
        i.save(n)
        case(n, "-", "refuse", r"refcount|reference count",
             "refcount_table_clusters %#x. qemu: Reference count table too large" % v,
             IT080 % "== Huge refcount table size ==" +
             "; cloud-hypervisor PR #8679 (refcount_table_clusters not bounded: OOM)", "1")

    i = t64("t.qcow2")
    i.u64(48, 0x1234567890ABCDEF)
    i.save("i080-reftable-misaligned.qcow2")
    case("i080-reftable-misaligned.qcow2", "-", "refuse", r"refcount|reference count",
         "refcount_table_offset 0x1234567890abcdef. qemu: Invalid reference count table offset",
         IT080 % "== Misaligned refcount table ==", "1")

    i = t64("t.qcow2")
    i.u64(48, 0xFFFFFFFFFFFF0000)
    i.u32(56, 0x7F)
    i.save("i080-reftable-offset-huge.qcow2")
    case("i080-reftable-offset-huge.qcow2", "-", "refuse", r"refcount|reference count",
         "refcount_table_offset 0xffffffffffff0000 with 127 clusters: offset + size "
         "overflows. qemu: Invalid reference count table offset",
         IT080 % "== Huge refcount offset ==", "1")

    for off, nb, why in ((None, 0xFFFFFFFF, "nb_snapshots 0xffffffff. qemu: Too many snapshots"),
                         (None, 0x7FFFFFFF, "nb_snapshots 0x7fffffff. qemu: Too many snapshots"),
                         (0xFFFFFFFFFFFF0000, 0xFFFF, "snapshots_offset 0xffffffffffff0000, 65535 "
                          "snapshots. qemu: Invalid snapshot table offset"),
                         (0x1234567890ABCDEF, 0, "snapshots_offset 0x1234567890abcdef, no "
                          "snapshots. qemu: Invalid snapshot table offset")):
        i = t64("t.qcow2")
        if off is not None:
            i.u64(64, off)
        i.u32(60, nb)
        n = "i080-snaptable-%x-%x.qcow2" % ((off or 0) & 0xFFFF, nb)
        i.save(n)
        case(n, "-", "meta", r"snapshot", why, IT080 % "== Invalid snapshot table ==", "1")

    i = t64("t.qcow2")
    i.u64(64, 0x1000000)
    i.u32(60, 0x10000)
    i.save("i080-snaptable-limit.qcow2")
    case("i080-snaptable-limit.qcow2", "-", "meta", r"snapshot",
         "65536 snapshots at 16 MiB, past the end of a 192 KiB file. QEMU "
         "zero-fills and reads", IT080 % "== Hitting snapshot table size limit ==", "1")

    for off, size, why in ((None, 0xFFFFFFFF, "l1_size 0xffffffff. qemu: Active L1 table too large"),
                           (0x7FFFFFFFFFFF0000, 0xFFFF, "l1_table_offset 0x7fffffffffff0000, "
                            "l1_size 65535. qemu: Invalid L1 table offset"),
                           (0x1234567890ABCDEF, 1, "l1_table_offset 0x1234567890abcdef. "
                            "qemu: Invalid L1 table offset")):
        i = t64("t.qcow2")
        if off is not None:
            i.u64(40, off)
        i.u32(36, size)
        n = "i080-l1-%x-%x.qcow2" % ((off or 0) & 0xFFFF, size)
        i.save(n)
        case(n, "-", "refuse", r"l1", why, IT080 % "== Invalid L1 table ==", "1")

    i = t64("t.qcow2", snapshot="foo")
    i.u32(36, 0)
    i.save("i080-l1-size0-snapshot.qcow2")
    case("i080-l1-size0-snapshot.qcow2", "-", "refuse", r"l1",
         "l1_size 0 in an image with an internal snapshot. qemu: L1 table is too small",
         IT080 % "== Invalid L1 table (with internal snapshot in the image) ==", "1")

    i = t64("t.qcow2")
    i.u64(8, 0x1000)
    i.u32(16, 0xFFFFFFFF)
    i.save("i080-backing-size-huge.qcow2")
    case("i080-backing-size-huge.qcow2", "-", "refuse", r"backing",
         "backing_file_offset 0x1000, backing_file_size 0xffffffff. qemu: Backing "
         "file name too long", IT080 % "== Invalid backing file size ==", "1")

    for v, why in ((0xBFFFFFFFFFFF0000, "reserved bits 56-61 and a host offset near 2^56"),
                   (0x800000FFFFFF0000, "a data cluster near 1 TiB, past the end of the file")):
        i = t64("t.qcow2", writes=T64_WRITES)
        i.l2(0, v)
        n = "i080-l2-%x.qcow2" % (v >> 48)
        i.save(n)
        case(n, "-", "either", r"l2|reserved|past|end of file|eof|beyond|outside|read",
             "L2[0] = %#x: %s. QEMU reads zeros; snapshot creation fails" % (v, why),
             IT080 % "== Invalid L2 entry (huge physical offset) ==", "2", T64_GOOD)

    for field, val, n, why in ((0, 0x400200, "i080-snap-l1-unaligned.qcow2",
                                "snapshot L1 table offset 0x400200 (unaligned). qemu: "
                                "Snapshot L1 table offset invalid"),
                               (8, 0x10000000, "i080-snap-l1-huge.qcow2",
                                "snapshot l1_size 0x10000000. qemu: Snapshot L1 table too large")):
        i = t64("t.qcow2", writes=T64_WRITES, snapshot="test")
        so = i.u64(64)
        if field == 0:
            i.u64(so, val)
        else:
            i.u32(so + 8, val)
        i.save(n)
        case(n, "-", "either", r"snapshot|l1", why + ". The active layer is intact",
             IT080 % ("== Invalid snapshot L1 table %s ==" % ("offset" if field == 0 else "size")),
             "12", "0x11@0+64k," + T64_GOOD)


def iotest060_cases():
    base = lambda: t64("t.qcow2", writes=T64_WRITES)

    i = base()
    i.l1(0, COPIED | i.l1_off)
    i.save("i060-l2-into-l1.qcow2")
    case("i060-l2-into-l1.qcow2", "-", "either", r"l1|l2|overlap|metadata",
         "L1[0] names the L1 table itself as its L2 table (COPIED set). qemu-img "
         "check reports the overlap; reading is well defined",
         IT060 % "=== Testing L2 reference into L1 ===", "2")

    i = base()
    rb = i.u64(i.u64(48)) & OFF_MASK
    i.l2(0, COPIED | rb)
    i.save("i060-data-into-refblock.qcow2")
    case("i060-data-into-refblock.qcow2", "-", "either", r"refcount|overlap|metadata",
         "L2[0] maps guest cluster 0 onto the refcount block. qemu-img check -r all "
         "repairs it", IT060 % "=== Testing cluster data reference into refcount block ===",
         "2", T64_GOOD)

    i = t64("t.qcow2", writes=("write -P 1 0 512",) + T64_WRITES[1:], snapshot="foo",
            after=("write -P 2 0 512",))
    so = i.u64(64)
    snap_l1 = i.u64(so)
    inactive_l2 = i.u64(snap_l1) & OFF_MASK
    i.l2(0, COPIED | inactive_l2)
    i.save("i060-data-into-inactive-l2.qcow2")
    case("i060-data-into-inactive-l2.qcow2", "-", "either", r"l2|overlap|metadata|snapshot",
         "active L2[0] maps guest cluster 0 onto the snapshot's L2 table",
         IT060 % "=== Testing cluster data reference into inactive L2 table ===", "2", T64_GOOD)

    i = base()
    i.l1(0, COPIED | (i.l2_table() + 0x2A00))
    i.save("i060-l1-entry-unaligned.qcow2")
    case("i060-l1-entry-unaligned.qcow2", "-", "data", r"l2|align|boundary",
         "L1[0] = L2 offset + 0x2a00. qemu: L2 table offset 0x42a00 unaligned -> EIO",
         IT060 % "=== Testing unaligned L1 entry ===", "2")

    i = base()
    i.l2(0, COPIED | ((i.l2(0) & OFF_MASK) + 0x2A00))
    i.save("i060-l2-entry-unaligned.qcow2")
    case("i060-l2-entry-unaligned.qcow2", "-", "data", r"align|boundary|offset",
         "L2[0] = data offset + 0x2a00. qemu: Cluster allocation offset 0x52a00 unaligned -> EIO",
         IT060 % "=== Testing unaligned L2 entry ===", "2", T64_GOOD)

    for name, off, sec in (("i060-zero-unaligned.qcow2", None,
                            "=== Testing unaligned pre-allocated zero cluster ==="),
                           ("i060-zero-in-header.qcow2", 0x2A00,
                            "=== Writing to an unaligned preallocated zero cluster ===")):
        i = base()
        host = (i.l2(0) & OFF_MASK) + 0x2A00 if off is None else off
        i.l2(0, COPIED | host | 1)
        i.save(name)
        case(name, "-", "either", r"align|boundary|offset|zero",
             "L2[0] = zero flag with preallocated host offset %#x (unaligned). QEMU "
             "signals a corruption when it needs the offset" % host, IT060 % sec, "2", T64_GOOD)

    for name, patch, sec, why in (
            ("i060-reftable-entry-unaligned.qcow2",
             lambda i: i.u64(i.u64(48), i.u64(i.u64(48)) + 0x2A00),
             "=== Testing unaligned reftable entry ===", "refcount table entry 0 = block + 0x2a00"),
            ("i060-reftable-empty.qcow2", lambda i: i.u64(i.u64(48), 0),
             "=== Testing empty refcount table ===", "refcount table entry 0 is 0: no refcount block"),
            ("i060-unallocated-header.qcow2",
             lambda i: i.put(i.u64(i.u64(48)) & OFF_MASK, bytes(2)),
             "=== Testing unallocated image header ===", "refcount of cluster 0 (the header) is 0"),
            ("i060-refblock-empty.qcow2",
             lambda i: i.put(i.u64(i.u64(48)) & OFF_MASK, bytes(8)),
             "=== Testing empty refcount block ===", "refcounts of clusters 0-3 (header, tables) are 0"),
            ("i060-reftable-offset-0.qcow2", lambda i: i.u64(48, 0),
             "=== Testing incorrect refcount table offset ===", "refcount_table_offset 0: the header is read as the refcount table. qcowkit refuses to open it"),
            ("i060-dirty-refblock-unaligned.qcow2",
             lambda i: (i.u64(i.u64(48), 0xFFFF2A00), i.set_incompat(1)),
             "=== Testing dirty corrupt image ===", "refcount table entry 0 = 0xffff2a00 and the dirty bit set; a read-only open must not repair"),
            ("i060-refblock-past-eof.qcow2", lambda i: i.u64(i.u64(48) + 8, 0x00FFFFFF00000000),
             "=== Discarding an out-of-bounds refblock ===", "refcount table entry 1 = 0xffffff00000000, far past the end of the file")):
        i = base()
        patch(i)
        i.save(name)
        case(name, "-", "either", r"refcount|reference count|align|header",
             why + ". Reading needs no refcounts", IT060 % sec, "12",
             None if "offset-0" in name else "0x11@0+64k," + T64_GOOD)

    for name, extra, sec in (("i060-rc1-refblock-uncovered.qcow2", None,
                              "=== Discarding a non-covered in-bounds refblock ==="),
                             ("i060-rc1-refblock-unaligned.qcow2", 0x200,
                              "=== Discarding a refblock covered by an unaligned refblock ===")):
        i = t64("t.qcow2", opts="refcount_bits=1", writes=T64_WRITES)
        rt = i.u64(48)
        i.u64(rt + 8, 0x1000000000)
        if extra:
            i.u64(rt + 16, extra)
        i.save(name)
        case(name, "-", "either", r"refcount|reference count|align|past|end of file",
             "refcount_bits=1; refcount table entry 1 = 64 GiB (a block no refcount "
             "covers)%s. Reading needs no refcounts" %
             ("; entry 2 = 0x200 (unaligned)" if extra else ""),
             IT060 % sec, "12", "0x11@0+64k," + T64_GOOD)

    i = base()
    i.l1(0, 0x2A2A2A2A)
    i.save("i060-inactive-l1-unaligned.qcow2")
    case("i060-inactive-l1-unaligned.qcow2", "-", "data", r"l2|align|boundary",
         "L1[0] = 0x2a2a2a2a (unaligned, COPIED clear). qemu: a read-only open reports "
         "the corruption without marking the image", IT060 % "=== Testing incoming inactive corrupted image ===", "2")


def iotest112_cases():
    i = t64("t.qcow2", opts="refcount_bits=1", writes=T64_WRITES)
    i.l2(1, i.l2(0))
    i.save("i112-rc1-two-refs.qcow2")
    case("i112-rc1-two-refs.qcow2", "-", "either", r"refcount|reference|copied",
         "refcount_bits=1; L2[1] = L2[0]: two references to one cluster, a count 1-bit "
         "refcounts cannot hold. qemu-img check -r all: please use amend",
         "iotest: 112 '=== Testing too many references for check ==='", "2",
         "0x11@0+64k,0x11@64k+64k," + T64_GOOD)

    for name, val, sec in (("i112-rc64-msb.qcow2", 1 << 63, "=== MSb set in 64 bit refcount ==="),
                           ("i112-rc64-max.qcow2", (1 << 64) - 1,
                            "=== Snapshot on maximum 64 bit refcount value ===")):
        i = t64("t.qcow2", opts="refcount_bits=64", writes=T64_WRITES)
        rb = i.u64(i.u64(48)) & OFF_MASK
        data = i.l2(0) & OFF_MASK
        i.u64(rb + 8 * (data // i.cs), val)
        i.l2(0, data)            # COPIED cleared, as the test does
        i.save(name)
        case(name, "-", "either", r"refcount|reference|copied",
             "refcount_bits=64; the data cluster's refcount is %#x, COPIED clear" % val,
             "iotest: 112 '%s'" % sec, "23", "0x11@0+64k," + T64_GOOD)


def refcount_past_eof_case():
    # a refcount of 2^63 for a cluster past the end of the file: nothing can
    # be there; dropping it one reference at a time would never end
    i = t64("t.qcow2", opts="refcount_bits=64", writes=T64_WRITES)
    rb = i.u64(i.u64(48)) & OFF_MASK
    i.u64(rb + 8 * 100, 1 << 63)
    i.save("rc64-past-eof-huge.qcow2")
    case("rc64-past-eof-huge.qcow2", "-", "either", r"refcount|reference",
         "refcount_bits=64; cluster 100, past the end of a 7-cluster file, has a "
         "refcount of 2^63. QEMU does not look past the end of the file",
         "spec: Host cluster management (refcounts of clusters past the end of the "
         "file have nothing to count)", "03", "0x11@0+64k," + T64_GOOD)


def iotest261_cases():
    # 64 KiB of unknown extra data in a snapshot table entry
    i = tpl("snap.qcow2")
    so = i.u64(64)
    i.u32(so + 36, 0x10000)
    i.save("i261-extra-64k.qcow2")
    case("i261-extra-64k.qcow2", "-", "meta", r"snapshot|extra",
         "snapshot entry extra_data_size 65536. qemu: Too much extra metadata in "
         "snapshot table entry 0", "iotest: 261 '=== Reject too much unknown extra data ==='", "1")

    # 131072 all-zero v2 snapshot table entries at 1 MiB
    i = tpl("v2.qcow2")
    i.u64(64, 0x100000)
    i.u32(60, 0x20000)
    i._grow(0x100000 + 40 * 0x20000)
    i.save("i261-too-many.qcow2")
    case("i261-too-many.qcow2", "-", "meta", r"snapshot",
         "v2 image with 131072 (all-zero) snapshot table entries. qemu: Snapshot "
         "table too large / too many snapshots", "iotest: 261 '=== Too many snapshots ==='", "1")


def peer_cases():
    i = tpl("std.qcow2")
    i.l2(1, COPIED | i.l2_table())
    i.save("peer-data-over-l2.qcow2")
    case("peer-data-over-l2.qcow2", "-", "either", r"l2|overlap|metadata",
         "L2[1] maps guest cluster 1 onto the live L2 table itself (a cluster that is "
         "both an L2 table and data)",
         "peer: cloud-hypervisor issue #8606 (free-cluster allocator handed out live L2 "
         "tables; clusters referenced both as L2 table and as data)", "2",
         "0x33@1M+64k,0x44@4032k+64k")

    p = qimg_create("pb.qcow2", size=1 << 50)
    sparse_copy(p, os.path.join(OUT, "cve-2015-5162-petabyte.qcow2"))
    case("cve-2015-5162-petabyte.qcow2", "-", "either", r"size|large|big|space|file",
         "a file of a few MiB claiming a 1 PiB disk (16 MiB L1 table): every command "
         "must finish quickly in bounded memory; convert to raw may fail (the file "
         "system cannot hold 1 PiB)",
         "cve: CVE-2015-5162 (OpenStack: qemu-img on a crafted image not limited in "
         "memory and time, GHSA-g2j5-7vgx-6xrx)", "0")


def positive_controls():
    for t, why in (("std", "v3, 64k clusters, data in 4 places"),
                   ("comp", "deflate-compressed cluster 0"),
                   ("zstd", "zstd-compressed cluster 0"),
                   ("v2", "compat=0.10 (v2)"),
                   ("extl2", "extended L2, cluster 0 partly allocated (subclusters)"),
                   ("snap", "one internal snapshot"),
                   ("bitmap", "one persistent dirty bitmap")):
        shutil.copy(os.path.join(TPL, t + ".qcow2"), os.path.join(OUT, "ok-%s.qcow2" % t))
        case("ok-%s.qcow2" % t, "-", "open", "-",
             "POSITIVE control: untouched template (%s) that the crafted "
             "images are made from" % why)


# --------------------------------------------------------------------------

def raw_sha(name, args):
    tmp = os.path.join(TPL, "out.raw")
    argv = ["qemu-img", "convert", "-U"] + ([] if args == "-" else args.split()) + \
        ["-O", "raw", os.path.join(OUT, name), tmp]
    p = run(*argv, ok=False)
    if p.returncode != 0:
        die("positive case %s: qemu-img convert failed: %s" %
            (name, p.stderr.decode(errors="replace").strip()))
    h = hashlib.sha256()
    with open(tmp, "rb") as f:
        for blk in iter(lambda: f.read(1 << 20), b""):
            h.update(blk)
    os.unlink(tmp)
    return h.hexdigest()


def qemu_report():
    def last(p):
        lines = [l for l in p.stderr.decode(errors="replace").splitlines() if l.strip()]
        return lines[-1] if lines else ""
    for name, args, expect, _check, regex, _good, _source, reason in CASES:
        a = [] if args == "-" else args.split()
        f = os.path.join(OUT, name)
        r1 = run("qemu-img", "info", "-U", *a, f, ok=False, timeout=10)
        r2 = run("qemu-img", "info", "-U", "--backing-chain", *a, f, ok=False, timeout=10)
        r3 = run("qemu-io", "-r", *a, "-c", "read 0 64k", f, ok=False, timeout=10)
        r3err = last(r3)
        if not r3err:
            for l in r3.stdout.decode(errors="replace").splitlines():
                if "error" in l.lower() or "failed" in l.lower():
                    r3err = l
        r4 = run("qemu-img", "convert", "-U", *a, "-O", "raw", f,
                 os.path.join(TPL, "q.raw"), ok=False, timeout=10)
        r5 = run("qemu-img", "check", "-U", *a, f, ok=False, timeout=10)
        print("%-32s %-6s info=%d chain=%d io=%d convert=%d check=%d" %
              (name, expect, r1.returncode, r2.returncode, r3.returncode,
               r4.returncode, r5.returncode))
        for tag, msg in (("info", last(r1)), ("chain", last(r2)), ("io", r3err),
                         ("convert", last(r4)), ("check", last(r5))):
            if msg:
                print("    %-7s %s" % (tag, msg))


def main():
    global OUT, TPL
    argv = [a for a in sys.argv[1:] if not a.startswith("--")]
    if len(argv) != 1:
        die("usage: mkbad.py OUTDIR [--qemu-report]")
    OUT = os.path.abspath(argv[0])
    TPL = os.path.join(OUT, "tpl")
    os.makedirs(TPL, exist_ok=True)
    for tool in ("qemu-img", "qemu-io"):
        if not shutil.which(tool):
            die("%s is required" % tool)

    make_templates()
    positive_controls()
    header_cases()
    feature_cases()
    l1l2_cases()
    compressed_cases()
    snapshot_cases()
    bitmap_cases()
    backing_cases()
    foreign_cases()
    iotest080_cases()
    iotest060_cases()
    iotest112_cases()
    refcount_past_eof_case()
    iotest261_cases()
    peer_cases()

    names = [c[0] for c in CASES]
    if len(set(names)) != len(names):
        die("duplicate case names")
    for n in names + SUPPORT:
        st = os.stat(os.path.join(OUT, n))
        if st.st_blocks * 512 > 10 * MIB or st.st_size > 10 * MIB and n.endswith(".img"):
            die("%s is too big" % n)

    lines = ["# generated by tests/bad/mkbad.py -- do not edit; see its docstring",
             "# file\targs\texpect\tcheck\tregex\tgood\trawsha\tsource\treason"]
    for name, args, expect, check, regex, good, source, reason in CASES:
        sha = raw_sha(name, args) if expect == "open" else "-"
        lines.append("\t".join((name, args, expect, check, regex, good, sha,
                                 source, reason)))
    with open(os.path.join(OUT, "cases.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")

    if "--qemu-report" in sys.argv:
        qemu_report()
    shutil.rmtree(TPL)


if __name__ == "__main__":
    main()
