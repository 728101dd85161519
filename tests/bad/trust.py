#!/usr/bin/env python3
"""The trust boundary: crafted images that aim guest writes at metadata,
table entries past the end of the file or with reserved bits, tables cut
short by the end of the file, forbidden header extensions, and names of
host files that are not regular files or that lead out of the image's
directory (with and without --confine).

Every image is made by qemu-img and qemu-io, then patched here. For each
case the test asserts what qcowkit does (one-line refusals naming the
structure, bytes left as they were, no growth, no hang) and, where QEMU
7.2 is asked the same, prints what it did ("qemu:" lines) for comparison.

Run by tests/bad/trust.sh; QCOWKIT names the binary.
"""
import hashlib
import json
import os
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile

QK = os.environ.get("QCOWKIT") or os.path.join(os.path.dirname(__file__), "../../build/qcowkit")
T = tempfile.mkdtemp(prefix="qktrust.")
passed = 0
failed = 0
CS = 65536
COPIED = 1 << 63
OFF_MASK = 0x00FFFFFFFFFFFE00


def ok(name):
    global passed
    passed += 1


def bad(name, why):
    global failed
    failed += 1
    print("FAIL: %s: %s" % (name, why), file=sys.stderr)


def check(name, cond, why=""):
    if cond:
        ok(name)
    else:
        bad(name, why)
    return cond


def run(args, timeout=20, cwd=None):
    """(rc, stdout, stderr); rc 124 on a timeout."""
    try:
        p = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True,
                           timeout=timeout, cwd=cwd)
        return p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")
    except subprocess.TimeoutExpired:
        return 124, "", "timeout after %d s" % timeout


def qk(*args, **kw):
    return run([QK] + list(args), **kw)


def qimg(*args, cwd=None):
    rc, out, err = run(["qemu-img"] + list(args), timeout=60, cwd=cwd)
    if rc != 0:
        raise SystemExit("qemu-img %s failed: %s" % (" ".join(args), err))
    return out


def qio(path, *cmds, fmt="qcow2"):
    """qemu-io: (rc, "", what it printed); it reports failed commands on
    stdout and exits 0 or 1."""
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    rc, out, err = run(args + [path], timeout=60)
    msgs = [l for l in (err + out).split("\n") if l.strip() and not l.startswith(("wrote ", "read "))
            and "ops/sec" not in l]
    return rc, "", "\n".join(msgs)


def one_line_error(err):
    lines = [l for l in err.split("\n") if l.strip()]
    return len(lines) == 1 and lines[0].startswith("qcowkit: ")


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def be64(d, off):
    return struct.unpack_from(">Q", d, off)[0]


def be32(d, off):
    return struct.unpack_from(">I", d, off)[0]


class Image:
    """The offsets of an image's metadata, read from its bytes."""

    def __init__(self, path):
        self.path = path
        d = open(path, "rb").read()
        self.cs = 1 << be32(d, 20)
        self.l1 = be64(d, 40)
        self.l1_size = be32(d, 36)
        self.rt = be64(d, 48)
        self.rb = be64(d, self.rt) & ~0x1FF
        self.order = be32(d, 96)
        self.snap_table = be64(d, 64)
        self.nb_snap = be32(d, 60)
        self.l2 = be64(d, self.l1) & OFF_MASK
        self.snap_l1 = be64(d, self.snap_table) if self.nb_snap else 0
        self.snap_l2 = be64(d, self.snap_l1) & OFF_MASK if self.nb_snap else 0
        self.bm_dir = self.bm_table = self.bm_data = 0
        off = be32(d, 100)
        while off + 8 <= self.cs:
            typ, ln = be32(d, off), be32(d, off + 4)
            if typ == 0:
                break
            if typ == 0x23852875:
                self.bm_dir = be64(d, off + 8 + 16)
                self.bm_table = be64(d, self.bm_dir)
                self.bm_data = be64(d, self.bm_table) & OFF_MASK
            off += 8 + ((ln + 7) & ~7)

    def l2e(self, idx):
        return be64(open(self.path, "rb").read(), self.l2 + 8 * idx)


def patch(path, off, fmt, *vals):
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(struct.pack(fmt, *vals))


def set_refcount(img, cluster, value):
    """16-bit refcounts, clusters covered by the first refcount block."""
    patch(img.path, img.rb + 2 * cluster, ">H", value)


def qemu_says(name, rc, err):
    first = err.strip().split("\n")[0] if err.strip() else "(nothing on stderr)"
    print("qemu: %s: exit %d: %s" % (name, rc, first[:200]))


def is_corrupt(path):
    rc, out, _ = run(["qemu-img", "info", "-U", "--output=json", path])
    try:
        return json.loads(out)["format-specific"]["data"].get("corrupt", False)
    except (ValueError, KeyError):
        return None


# ---- the template: every kind of metadata present -------------------------

def make_template():
    """64 KiB clusters: data in guest clusters 0-3, a snapshot, then a
    write that gives the active image its own L2 table (the snapshot keeps
    the old one), and a persistent bitmap with bits set (data cluster)."""
    p = os.path.join(T, "template.qcow2")
    qimg("create", "-q", "-f", "qcow2", p, "16M")
    rc, _, err = qio(p, "write -P 0x11 0 256k")
    assert rc == 0, err
    qimg("snapshot", "-c", "s1", p)
    qimg("bitmap", "--add", p, "b0")
    rc, _, err = qio(p, "write -P 0x22 64k 64k", "write -P 0x33 1M 64k")
    assert rc == 0, err
    return p


def copy_of(tpl, name):
    p = os.path.join(T, name)
    shutil.copyfile(tpl, p)
    return p


# ---- 1. guest data never lands on metadata ----------------------------------

def test_overlaps(tpl):
    t = Image(tpl)
    # (The header cannot be aimed at: host offset 0 means "unallocated".)
    kinds = [
        ("active L1", t.l1, "the active L1 table", True),
        ("active L2", t.l2, "an L2 table", True),
        ("refcount table", t.rt, "the refcount table", True),
        ("refcount block", t.rb, "a refcount block", True),
        ("snapshot table", t.snap_table, "the snapshot table", True),
        ("snapshot L1", t.snap_l1, "a snapshot L1 table", True),
        ("snapshot-only L2", t.snap_l2, "an L2 table", False),
        ("bitmap directory", t.bm_dir, "a bitmap structure", True),
        ("bitmap table", t.bm_table, "a bitmap structure", False),
        ("bitmap data", t.bm_data, "a bitmap structure", False),
    ]
    check("template has a snapshot L2 of its own", t.snap_l2 and t.snap_l2 != t.l2,
          "snapshot L2 0x%x, active 0x%x" % (t.snap_l2, t.l2))
    check("template has bitmap data", t.bm_data != 0, "no bitmap data cluster")
    for name, off, what, qemu_checks in kinds:
        # In place: L2 entry of guest cluster 2 points at the structure,
        # COPIED set, as if it were the image's own data cluster.
        p = copy_of(tpl, "ov.qcow2")
        patch(p, t.l2 + 16, ">Q", off | COPIED)
        before = open(p, "rb").read()
        rc, out, err = qk("io", p, "-c", "write -P 0xaa 128k 4k")
        after = open(p, "rb").read()
        tag = "overlap %s in place" % name
        check(tag + ": refused", rc != 0, "exit 0")
        check(tag + ": one line naming it", one_line_error(err) and what in err and
              "overlaps" in err, err.strip()[:300])
        # Nothing but the corrupt bit (header byte 79) and the bitmap's
        # in-use flag (set on the first write, as QEMU does at a
        # read-write open) changed.
        flags = t.bm_dir + 12
        same = (before[:72] + before[80:flags] + before[flags + 4:] ==
                after[:72] + after[80:flags] + after[flags + 4:])
        check(tag + ": nothing else written", same, "bytes changed")
        check(tag + ": marked corrupt", is_corrupt(p) is True, "corrupt bit not set")
        rc2, _, err2 = qk("io", p, "-c", "write -P 0xbb 0 4k")
        check(tag + ": later writes refused", rc2 != 0 and "corrupt" in err2, err2[:200])
        # QEMU on the same input.
        q = copy_of(tpl, "ovq.qcow2")
        patch(q, t.l2 + 16, ">Q", off | COPIED)
        qb = open(q, "rb").read()
        qrc, _, qerr = qio(q, "write -P 0xaa 128k 4k")
        qa = open(q, "rb").read()
        damaged = qb[off:off + CS] != qa[off:off + CS]
        qemu_says(tag, qrc, qerr if qrc else ("accepted; the %s was %s" %
                                              (name, "overwritten" if damaged else "left alone")))
        if qemu_checks:
            check(tag + ": qemu refuses too (test sanity)", qrc != 0, "qemu-io accepted")

    # Through allocation: the structure's refcount is 0, so the allocator
    # would hand it out for a new cluster.
    for name, off, what in [("active L2", t.l2, "an L2 table"),
                            ("refcount block", t.rb, "a refcount block"),
                            ("snapshot table", t.snap_table, "the snapshot table"),
                            ("snapshot-only L2", t.snap_l2, "an L2 table"),
                            ("bitmap table", t.bm_table, "a bitmap structure"),
                            ("bitmap data", t.bm_data, "a bitmap structure")]:
        p = copy_of(tpl, "al.qcow2")
        im = Image(p)
        # The allocator scans from cluster 1: every earlier cluster is made
        # to look used (leaks), the structure's own refcount 0.
        d = open(p, "rb").read()
        for c in range(1, off // CS):
            if struct.unpack_from(">H", d, im.rb + 2 * c)[0] == 0:
                set_refcount(im, c, 1)
        set_refcount(im, off // CS, 0)
        rc, _, err = qk("io", p, "-c", "write -P 0xaa 4M 64k")
        after = open(p, "rb").read()
        tag = "allocation over %s" % name
        check(tag + ": refused", rc != 0 and "a new cluster" in err and what in err and
              one_line_error(err), "rc %d: %s" % (rc, err.strip()[:300]))
        check(tag + ": no guest data there", b"\xaa" * 4096 not in after[off:off + CS], "overwritten")

    # An L1 entry that names a refcount block as its L2 table.
    p = copy_of(tpl, "l1rb.qcow2")
    patch(p, t.l1, ">Q", t.rb | COPIED)
    before = open(p, "rb").read()
    rc, _, err = qk("io", p, "-c", "write -P 0xaa 0 4k")
    after = open(p, "rb").read()
    check("L1 entry naming a refcount block: write refused",
          rc != 0 and "a refcount block" in err and one_line_error(err), err[:300])
    check("L1 entry naming a refcount block: block intact",
          before[t.rb:t.rb + CS] == after[t.rb:t.rb + CS], "overwritten")
    q = copy_of(tpl, "l1rbq.qcow2")
    patch(q, t.l1, ">Q", t.rb | COPIED)
    qrc, _, qerr = qio(q, "write -P 0xaa 0 4k")
    qemu_says("L1 entry naming a refcount block", qrc, qerr or "accepted")

    # A freed cluster still named by metadata is never punched out: guest
    # cluster 2 maps the L2 table itself (refcount 1, counted once); a
    # discard drops that count to 0.
    p = copy_of(tpl, "punch.qcow2")
    patch(p, t.l2 + 16, ">Q", t.l2)     # COPIED clear: the discard frees it
    before = open(p, "rb").read()
    rc, _, err = qk("io", p, "-c", "discard 128k 64k")
    after = open(p, "rb").read()
    check("discard of a cluster that is an L2 table: the table stays",
          after[t.l2:t.l2 + CS] != bytes(CS), "the table was punched out")


# ---- 2/3. entries past the end of the file, reserved bits -------------------

def io_msg(err):
    """What a corruption message says is wrong (after "is corrupt: ", before
    "; the image is now marked corrupt"): the same for a read and a write."""
    line = err.strip().split("\n")[0]
    return line.split("' is corrupt: ", 1)[-1].split(";")[0]


def test_entries(tpl):
    t = Image(tpl)
    size0 = os.path.getsize(tpl)
    cases = [
        ("L1 entry past the end", lambda p: patch(p, t.l1, ">Q", (1 << 40) | COPIED), "0"),
        ("L1 entry with reserved bits", lambda p: patch(p, t.l1, ">Q", be64(open(tpl, "rb").read(), t.l1) | 2), "0"),
        ("L2 entry past the end", lambda p: patch(p, t.l2, ">Q", (1 << 40) | COPIED), "0"),
        ("L2 entry with reserved bits", lambda p: patch(p, t.l2, ">Q", t.l2e(0) | 2), "0"),
        ("compressed entry past the end", lambda p: patch(p, t.l2, ">Q", (1 << 62) | (1 << 40)), "0"),
        ("L2 entry unaligned", lambda p: patch(p, t.l2, ">Q", (t.l2e(0) & OFF_MASK) + 512 | COPIED), "0"),
    ]
    for name, mk, off in cases:
        p = copy_of(tpl, "ent.qcow2")
        mk(p)
        rrc, _, rerr = qk("io", "-r", p, "-c", "read 0 4k")
        for w in ("write -P 0xaa 0 4k", "write -P 0xaa 0 64k", "write -z 0 64k", "discard 0 64k"):
            q = copy_of(p, "ent-w.qcow2")
            wrc, _, werr = qk("io", q, "-c", w)
            tag = "%s: %s" % (name, w)
            check(tag + ": read refused", rrc != 0 and one_line_error(rerr), rerr[:200])
            check(tag + ": write refused as the read is", wrc != 0 and one_line_error(werr) and
                  io_msg(werr) == io_msg(rerr),
                  "read: %s | write: %s" % (rerr.strip()[:200], werr.strip()[:200]))
            check(tag + ": file not grown", os.path.getsize(q) == os.path.getsize(p),
                  "%d -> %d" % (os.path.getsize(p), os.path.getsize(q)))
        q = copy_of(p, "ent-q.qcow2")
        qrc, _, qerr = qio(q, "write -P 0xaa 0 4k")
        qemu_says(name + " (write)", qrc, qerr or "accepted, file %d -> %d bytes" %
                  (os.path.getsize(p), os.path.getsize(q)))

    # A refcount table entry past the end: the next allocation must not
    # grow the file to reach it.
    p = copy_of(tpl, "rtpast.qcow2")
    patch(p, t.rt, ">Q", 1 << 40)
    before = os.path.getsize(p)
    rc, _, err = qk("io", p, "-c", "write -P 0xaa 4M 64k")
    check("refcount block past the end: write refused", rc != 0 and "refcount block" in err and
          one_line_error(err), err[:300])
    check("refcount block past the end: file not grown", os.path.getsize(p) == before,
          "%d -> %d" % (before, os.path.getsize(p)))
    q = copy_of(tpl, "rtpastq.qcow2")
    patch(q, t.rt, ">Q", 1 << 40)
    qrc, _, qerr = qio(q, "write -P 0xaa 4M 64k")
    qemu_says("refcount block past the end (write)", qrc, qerr or "accepted, file %d -> %d bytes" %
              (before, os.path.getsize(q)))

    # Refcounts of clusters past the end of the file (leaks a crash or a
    # crafted block leaves) do not push allocations outward.
    p = copy_of(tpl, "leakpast.qcow2")
    im = Image(p)
    eof = os.path.getsize(p) // CS
    with open(p, "r+b") as f:
        f.seek(im.rb + 2 * eof)
        f.write(b"\xff\xff" * (CS // 2 - eof))
    before = os.path.getsize(p)
    rc, _, err = qk("io", p, "-c", "write -P 0xaa 4M 64k")
    after = os.path.getsize(p)
    check("leaked refcounts past the end: write accepted", rc == 0, err[:200])
    check("leaked refcounts past the end: file grows by what the write needs",
          after - before <= 4 * CS, "%d -> %d bytes" % (before, after))
    rc, _, err = qk("io", "-r", p, "-c", "read -P 0xaa 4M 64k")
    check("leaked refcounts past the end: data reads back", rc == 0, err[:200])
    rc, out, _ = run(["qemu-img", "check", "--output=json", p])
    check("leaked refcounts past the end: no corruption", json.loads(out).get("corruptions", 0) == 0, out)
    q = copy_of(tpl, "leakpastq.qcow2")
    with open(q, "r+b") as f:
        f.seek(im.rb + 2 * eof)
        f.write(b"\xff\xff" * (CS // 2 - eof))
    qrc, _, qerr = qio(q, "write -P 0xaa 4M 64k")
    qemu_says("leaked refcounts past the end (write)", qrc,
              qerr or "accepted, file %d -> %d bytes" % (before, os.path.getsize(q)))
    del size0


# ---- 4. a table cut short by the end of the file ----------------------------

def test_truncated():
    p = os.path.join(T, "trunc.qcow2")
    qimg("create", "-q", "-f", "qcow2", p, "64M")
    rc, _, err = qio(p, "write -P 0x11 0 64k", "write -P 0x22 1M 64k")
    assert rc == 0, err
    im = Image(p)
    d = bytearray(open(p, "rb").read())
    new = len(d)
    d += d[im.l2:im.l2 + 4096]          # the L2 table moved to the end, cut at 4 KiB
    struct.pack_into(">Q", d, im.l1, COPIED | new)
    struct.pack_into(">H", d, im.rb + 2 * (im.l2 // CS), 0)
    struct.pack_into(">H", d, im.rb + 2 * (new // CS), 1)
    open(p, "wb").write(d)
    want = os.path.join(T, "trunc-qemu.raw")
    qimg("convert", "-O", "raw", p, want)
    got = os.path.join(T, "trunc-qk.raw")
    rc, _, err = qk("convert", "-O", "raw", p, got)
    check("cut-short L2: reads as far as it goes", rc == 0 and sha(got) == sha(want), err[:200])
    rc, _, err = qk("io", "-r", p, "-c", "read -P 0x11 0 64k", "-c", "read -P 0x22 1M 64k",
                    "-c", "read -P 0 32M 64k")
    check("cut-short L2: surviving entries read, missing part zeros", rc == 0, err[:200])
    rc, out, err = qk("check", p)
    check("cut-short L2: check reports it", rc == 2 and "cut short by the end of the file" in err,
          "rc %d %s" % (rc, err[:200]))
    qrc, _, _ = run(["qemu-img", "check", p])
    print("qemu: cut-short L2: qemu-img check exits %d (reports nothing)" % qrc)
    rc, out, err = qk("check", "-r", "all", p)
    check("cut-short L2: check -r all repairs it", rc == 0, "rc %d %s" % (rc, err[:200]))
    rc, out, err = run(["qemu-img", "check", p])
    check("cut-short L2: qemu-img check clean after the repair", rc == 0, out + err)
    rc, _, err = qk("convert", "-O", "raw", p, got)
    check("cut-short L2: content unchanged by the repair", rc == 0 and sha(got) == sha(want), err[:200])


# ---- 5. forbidden header extensions -----------------------------------------

def add_extension(path, typ, payload):
    """Insert an extension before the end marker (the header cluster has room)."""
    d = bytearray(open(path, "rb").read())
    off = be32(d, 100)
    while be32(d, off) != 0:
        off += 8 + ((be32(d, off + 4) + 7) & ~7)
    ext = struct.pack(">II", typ, len(payload)) + payload
    ext += b"\0" * ((8 - len(payload) % 8) % 8)
    d[off:off] = ext
    del d[CS:CS + len(ext)]             # keep cluster 0 its size (the tail is zeros)
    open(path, "wb").write(d)


def test_extensions():
    for name, typ, payload, words in [
            ("encryption header on a plain image", 0x0537BE77, struct.pack(">QQ", 2 * CS, 4096),
             "full disk encryption header"),
            ("bitmaps extension of 16 bytes", 0x23852875, b"\0" * 16, "bitmaps extension"),
    ]:
        p = os.path.join(T, "ext.qcow2")
        qimg("create", "-q", "-f", "qcow2", p, "1M")
        add_extension(p, typ, payload)
        rc, _, err = qk("info", p)
        check("%s: refused by name" % name, rc != 0 and words in err and one_line_error(err), err[:200])
        qrc, _, qerr = run(["qemu-img", "info", p])
        qemu_says(name, qrc, qerr)


# ---- 6. host files an image names --------------------------------------------

def test_host_files():
    d = os.path.join(T, "hf")
    os.mkdir(d)
    base = os.path.join(d, "base.raw")
    open(base, "wb").write(b"\x5a" * (1 << 20))
    fifo = os.path.join(d, "fifo")
    os.mkfifo(fifo)
    sock = os.path.join(d, "sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(sock)
    sysfile = next((os.path.join(r, f) for r, _, fs in os.walk("/sys/kernel") for f in fs
                    if os.access(os.path.join(r, f), os.R_OK)
                    and stat.S_ISREG(os.stat(os.path.join(r, f)).st_mode)), None)
    targets = [("a FIFO", fifo, "FIFO"), ("a socket", sock, "socket"),
               ("a directory", d, "directory"), ("a character device", "/dev/null", "character device"),
               ("procfs", "/proc/self/environ", "procfs"), ("procfs mem", "/proc/self/mem", "procfs")]
    if sysfile:
        targets.append(("sysfs", sysfile, "sysfs"))
    top = os.path.join(d, "top.qcow2")
    for name, target, word in targets:
        # As a backing file.
        qimg("create", "-q", "-f", "qcow2", "-u", "-b", target, "-F", "raw", top, "1M")
        for cmd in (["map", top], ["convert", "-O", "raw", top, os.path.join(d, "out.raw")],
                    ["check", top], ["info", "--backing-chain", top],
                    ["compare", top, base], ["io", "-r", top, "-c", "read 0 4k"]):
            rc, _, err = qk(*cmd, timeout=10)
            tag = "backing file %s: %s" % (name, cmd[0])
            check(tag + ": refused in time", rc not in (0, 124), "rc %d" % rc)
            check(tag + ": says why", word in err and one_line_error(err) if cmd[0] != "compare"
                  else word in err, err[:200])
        # As an external data file.
        p = os.path.join(d, "df.qcow2")
        qimg("create", "-q", "-f", "qcow2", "-o", "data_file=" + base, p, "1M")
        with open(p, "r+b") as f:
            dd = f.read(CS)
            i = dd.index(base.encode())
            f.seek(i - 4)
            tb = target.encode()
            f.write(struct.pack(">I", len(tb)) + tb + b"\0" * (len(base) - len(tb) if len(base) > len(tb) else 0))
        if len(target) > len(base):
            continue            # the name does not fit the extension made for base
        rc, out, err = qk("info", p, timeout=10)
        check("data file %s: info does not open it" % name, rc == 0 and target in out, err[:200])
        for cmd in (["map", p], ["convert", "-O", "raw", p, os.path.join(d, "out.raw")],
                    ["io", "-r", p, "-c", "read 0 4k"], ["io", p, "-c", "write 0 4k"]):
            rc, _, err = qk(*cmd, timeout=10)
            tag = "data file %s: %s" % (name, cmd[0])
            check(tag + ": refused in time", rc not in (0, 124) and word in err and
                  one_line_error(err), "rc %d %s" % (rc, err[:200]))
        if name == "procfs mem":
            # Served over NBD, as in the reported attack: refused at start.
            rc, _, err = qk("serve", "-r", "-k", os.path.join(d, "nbd.sock"), p, timeout=10)
            check("data file /proc/self/mem: serve refuses it", rc not in (0, 124) and "procfs" in err,
                  "rc %d %s" % (rc, err[:200]))
            qrc, _, qerr = run(["qemu-img", "convert", "-O", "raw", p, os.path.join(d, "q.raw")])
            qemu_says("data file /proc/self/mem: qemu-img convert", qrc, qerr or "accepted")
    s.close()

    # The image file as its own data file.
    p = os.path.join(d, "self.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-o", "data_file=" + base, p, "1M")
    with open(p, "r+b") as f:
        dd = f.read(CS)
        i = dd.index(base.encode())
        f.seek(i - 4)
        name = b"self.qcow2"
        f.write(struct.pack(">I", len(name)) + name + b"\0" * (len(base) - len(name)))
    rc, _, err = qk("io", p, "-c", "write -P 0xaa 0 4k")
    check("image as its own data file: refused", rc != 0 and "image file itself" in err, err[:200])

    # A read past the end of the named file reads zeros.
    p = os.path.join(d, "short.qcow2")
    short = os.path.join(d, "short.raw")
    qimg("create", "-q", "-f", "qcow2", "-o", "data_file=" + short, p, "1M")
    rc, _, err = qio(p, "write -P 0x66 0 1M")
    os.truncate(short, 4096)
    rc, _, err = qk("io", "-r", p, "-c", "read -P 0x66 0 4k", "-c", "read -P 0 4k 64k")
    check("read past the end of a data file reads zeros", rc == 0, err[:200])


# ---- 6b. confinement ---------------------------------------------------------

def test_confine():
    d = os.path.join(T, "cf")
    os.makedirs(os.path.join(d, "img", "sub"))
    os.makedirs(os.path.join(d, "out"))
    outside = os.path.join(d, "out", "base.qcow2")
    qimg("create", "-q", "-f", "qcow2", outside, "1M")
    inside = os.path.join(d, "img", "sub", "base.qcow2")
    qimg("create", "-q", "-f", "qcow2", inside, "1M")
    qio(inside, "write -P 0x44 0 64k")
    os.symlink("../out/base.qcow2", os.path.join(d, "img", "link-out.qcow2"))
    os.symlink("sub/base.qcow2", os.path.join(d, "img", "link-in.qcow2"))
    top = os.path.join(d, "img", "top.qcow2")
    for backing, allowed in [("../out/base.qcow2", False), (outside, False),
                             ("link-out.qcow2", False), ("sub/../sub/base.qcow2", False),
                             ("sub/base.qcow2", True), ("link-in.qcow2", True)]:
        qimg("create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "qcow2", top, "1M")
        for cmd in (["map", top], ["convert", "-O", "raw", top, os.path.join(d, "o.raw")],
                    ["check", top], ["compare", top, top], ["io", "-r", top, "-c", "read 0 4k"],
                    ["info", "--backing-chain", top]):
            rc, _, err = qk(cmd[0], "--confine", *cmd[1:])
            tag = "confined, backing %s: %s" % (backing, cmd[0])
            if allowed:
                check(tag + ": allowed", rc == 0, err[:200])
            else:
                check(tag + ": refused", rc != 0 and "leads out" in err, "rc %d %s" % (rc, err[:200]))
            rc, _, err = qk(*cmd)
            check("unconfined, backing %s: %s works" % (backing, cmd[0]), rc == 0, err[:200])
    # Confined data file: read, never written.
    data = os.path.join(d, "img", "data.raw")
    p = os.path.join(d, "img", "df.qcow2")
    # QEMU 7.2 resolves a relative data file name against its working
    # directory (qcowkit: against the image's), so it runs from there.
    qimg("create", "-q", "-f", "qcow2", "-o", "data_file=data.raw", "df.qcow2", "1M",
         cwd=os.path.dirname(p))
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x55 0 64k", "df.qcow2"], cwd=os.path.dirname(p))
    sum0 = sha(data)
    rc, _, err = qk("io", "--confine", "-r", p, "-c", "read -P 0x55 0 64k")
    check("confined data file: reads", rc == 0, err[:200])
    rc, _, err = qk("io", "--confine", p, "-c", "write -P 0x66 0 4k")
    check("confined data file: writes refused", rc != 0 and "only reads" in err and one_line_error(err),
          err[:200])
    check("confined data file: unchanged", sha(data) == sum0, "data file changed")
    rc, _, err = qk("io", p, "-c", "write -P 0x66 0 4k")
    check("unconfined data file: writes", rc == 0, err[:200])


# ---- 11. bounded decompression ----------------------------------------------

def test_zstd_window():
    """A zstd frame that asks for a 128 MiB window (not single-segment, no
    content size, as a streaming encoder writes it) in a 64 KiB cluster."""
    p = os.path.join(T, "zw.qcow2")
    qimg("create", "-q", "-f", "qcow2", "-o", "compression_type=zstd", p, "1M")
    rnd = os.path.join(T, "rnd")
    open(rnd, "wb").write(os.urandom(CS // 2) + b"\0" * (CS // 2))
    rc, _, err = run(["qemu-io", "-f", "qcow2", "-c", "write -c -s %s 0 64k" % rnd, p])
    assert rc == 0, err
    im = Image(p)
    e = im.l2e(0)
    shift = 62 - (16 - 8)
    coff = e & ((1 << shift) - 1)
    csize = (((e >> shift) & ((1 << 8) - 1)) + 1) * 512 - (coff & 511)
    frame = subprocess.run(["zstd", "--zstd=wlog=27", "-c", "-q"], input=b"\x42" * CS,
                           capture_output=True).stdout
    check("zstd window: test frame declares a 128 MiB window", frame[:4] == b"\x28\xb5\x2f\xfd" and
          len(frame) <= csize and frame[4] & 0x20 == 0 and (frame[5] >> 3) + 10 == 27, frame[:8].hex())
    patch(p, coff, "%ds" % csize, frame + b"\0" * (csize - len(frame)))
    rc, _, err = qk("io", "-r", p, "-c", "read 0 64k")
    check("zstd window over a cluster: refused in one line", rc != 0 and one_line_error(err) and
          "zstd" in err, "rc %d %s" % (rc, err[:200]))
    qrc, _, qerr = qio(p, "read -P 0x42 0 64k")
    qemu_says("zstd frame with a 128 MiB window in a 64 KiB cluster", qrc,
              qerr or "read it (allocating the window)")


def main():
    tpl = make_template()
    test_overlaps(tpl)
    test_entries(tpl)
    test_truncated()
    test_extensions()
    test_host_files()
    test_confine()
    test_zstd_window()
    shutil.rmtree(T, ignore_errors=True)
    print("%d passed, %d failed" % (passed, failed))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
