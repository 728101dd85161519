"""A raw NBD client for the malformed-input tests (tests/nbd/malformed.sh).

    python3 rawclient.py SOCKET MODE SPEC

MODE is "rw" (a writable export, 64 MiB), "ro" (the same, read-only) or
"bad" (read-only, 0x61 in the first 1 MiB but the cluster at 512 KiB
corrupt: only the read_fails_midway case runs);
SPEC is 1 when the server must answer errors as the specification says
(ENOSPC for writes past the end, EPERM for writes to a read-only export),
0 when EINVAL is accepted for those too (qemu-nbd). Every case opens its
own connection; a case fails when the server answers wrongly, and the
run fails when any case failed or the server stopped answering. Prints
one line per failure and "N cases" at the end.
"""
import os
import random
import socket
import struct
import sys

SOCK, MODE, SPEC = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
SIZE = 64 << 20

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPMAGIC = 0x0003E889045565A9
REQ_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
STRUCT_MAGIC = 0x668E33EF

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS = 1, 2, 3, 5
OPT_INFO, OPT_GO, OPT_STRUCTURED, OPT_LIST_META, OPT_SET_META = 6, 7, 8, 9, 10
REP_ACK, REP_SERVER, REP_INFO, REP_META = 1, 2, 3, 4
ERR_UNSUP, ERR_POLICY, ERR_INVALID, ERR_UNKNOWN = (0x80000001, 0x80000002,
                                                  0x80000003, 0x80000006)
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM = 0, 1, 2, 3, 4
CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = 6, 7
FLAG_FUA, FLAG_NO_HOLE, FLAG_DF, FLAG_REQ_ONE = 1, 2, 4, 8
EPERM, EIO, EINVAL, ENOSPC = 1, 5, 22, 28

failures = []
cases = 0


class Closed(Exception):
    pass


class Conn:
    def __init__(self):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(20)
        self.s.connect(SOCK)

    def recv(self, n):
        b = b""
        while len(b) < n:
            d = self.s.recv(n - len(b))
            if not d:
                raise Closed()
            b += d
        return b

    def send(self, b):
        self.s.sendall(b)

    def closed(self):
        """True when the server has dropped the connection (after an
        error reply, perhaps: qemu-nbd sends one first)."""
        try:
            for _ in range(64):
                if self.s.recv(65536) == b"":
                    return True
            return False
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False

    def close(self):
        self.s.close()

    # ---- handshake ----
    def greet(self, cflags=3):
        magic, opts, hflags = struct.unpack(">QQH", self.recv(18))
        assert magic == NBDMAGIC and opts == IHAVEOPT, "bad greeting"
        self.send(struct.pack(">I", cflags))
        return hflags

    def opt(self, opt, data=b""):
        self.send(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)

    def rep(self):
        magic, opt, typ, ln = struct.unpack(">QIII", self.recv(20))
        assert magic == REPMAGIC, "bad option reply magic"
        return opt, typ, self.recv(ln)

    def reps(self):
        """Replies to one option up to the final one (ACK or an error)."""
        out = []
        while True:
            r = self.rep()
            out.append(r)
            if r[1] == REP_ACK or r[1] & 0x80000000:
                return out

    def go(self, name=b"", structured=True, contexts=(b"base:allocation",)):
        self.greet()
        if structured:
            self.opt(OPT_STRUCTURED)
            assert self.reps()[-1][1] == REP_ACK
            if contexts:
                q = b"".join(struct.pack(">I", len(c)) + c for c in contexts)
                self.opt(OPT_SET_META, struct.pack(">I", len(name)) + name +
                         struct.pack(">I", len(contexts)) + q)
                assert self.reps()[-1][1] == REP_ACK
        self.opt(OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
        r = self.reps()
        assert r[-1][1] == REP_ACK, "GO refused: %x" % r[-1][1]
        for _, typ, data in r:
            if typ == REP_INFO and struct.unpack(">H", data[:2])[0] == 0:
                self.size, self.tflags = struct.unpack(">QH", data[2:12])
        self.structured = structured
        return self

    # ---- transmission ----
    def req(self, typ, off=0, ln=0, flags=0, cookie=1, payload=b""):
        self.send(struct.pack(">IHHQQI", REQ_MAGIC, flags, typ, cookie, off, ln) + payload)

    def reply(self, read_len=0):
        """One whole reply: (cookie, error, data chunks, block status)."""
        magic = struct.unpack(">I", self.recv(4))[0]
        if magic == SIMPLE_MAGIC:
            err, cookie = struct.unpack(">IQ", self.recv(12))
            data = self.recv(read_len) if err == 0 and read_len else b""
            return cookie, err, [(0, data)] if data else [], []
        assert magic == STRUCT_MAGIC, "bad reply magic %x" % magic
        err, chunks, bs = 0, [], []
        while True:
            flags, typ, cookie, ln = struct.unpack(">HHQI", self.recv(16))
            body = self.recv(ln)
            if typ == 1:
                chunks.append((struct.unpack(">Q", body[:8])[0], body[8:]))
            elif typ == 2:
                off, hl = struct.unpack(">QI", body)
                chunks.append((off, bytes(hl)))
            elif typ == 5:
                ctx = struct.unpack(">I", body[:4])[0]
                ext = [struct.unpack(">II", body[i:i + 8]) for i in range(4, ln, 8)]
                bs.append((ctx, ext))
            elif typ & 0x8000:
                err = struct.unpack(">I", body[:4])[0]
            if flags & 1:
                return cookie, err, chunks, bs
            if magic != STRUCT_MAGIC:
                break
            magic = struct.unpack(">I", self.recv(4))[0]
            assert magic == STRUCT_MAGIC


def case(fn):
    global cases
    cases += 1
    try:
        fn()
    except AssertionError as e:
        failures.append("%s: %s" % (fn.__name__, e))
    except Closed:
        failures.append("%s: connection closed unexpectedly" % fn.__name__)
    except Exception as e:  # noqa: BLE001 - any surprise is a failure
        failures.append("%s: %r" % (fn.__name__, e))
    return fn


def want_err(got, spec_err):
    if SPEC:
        assert got == spec_err, "error %d, want %d" % (got, spec_err)
    else:
        assert got in (spec_err, EINVAL), "error %d" % got


def assemble(off, ln, chunks):
    buf = bytearray(ln)
    ranges = []
    for o, d in chunks:
        assert off <= o and o + len(d) <= off + ln, "chunk outside the request"
        buf[o - off:o - off + len(d)] = d
        ranges.append((o, o + len(d)))
    ranges.sort()
    pos = off
    for a, b in ranges:
        assert a == pos, "chunks overlap or leave a gap at %d" % pos
        pos = b
    assert pos == off + ln, "chunks cover %d of %d bytes" % (pos - off, ln)
    return bytes(buf)


def finish():
    for f in failures:
        print("FAIL:", f)
    print("%d cases" % cases)
    sys.exit(1 if failures else 0)


if MODE == "bad":
    @case
    def read_fails_midway():
        # A 1 MiB read over the corrupt cluster: EIO, and whatever data
        # came before the error is the image's own (qcowkit sends the
        # clusters before the corrupt one, then an ERROR chunk).
        c = Conn().go()
        c.req(CMD_READ, 0, 1 << 20, cookie=3)
        cookie, err, chunks, _ = c.reply()
        assert cookie == 3 and err == EIO, "error %d, want EIO" % err
        got = 0
        for o, d in chunks:
            assert o + len(d) <= 512 << 10, "data from the corrupt cluster"
            assert d == b"\x61" * len(d), "content of a chunk at %d" % o
            got += len(d)
        if SPEC:
            assert got == 512 << 10, "%d bytes before the error" % got
        c.req(CMD_READ, 0, 512 << 10, cookie=4)
        cookie, err, chunks, _ = c.reply()
        assert err == 0 and assemble(0, 512 << 10, chunks) == b"\x61" * (512 << 10)
        c.req(CMD_DISC)
    finish()


# ---- handshake cases ------------------------------------------------------

@case
def close_at_once():
    Conn().close()


@case
def close_after_greeting():
    c = Conn()
    c.recv(18)
    c.close()


@case
def unknown_client_flags():
    c = Conn()
    c.greet(cflags=0x80000001)
    assert c.closed(), "unknown client flags accepted"


@case
def bad_option_magic():
    c = Conn()
    c.greet()
    c.send(struct.pack(">QII", 0x1122334455667788, OPT_GO, 0))
    assert c.closed(), "bad option magic accepted"


@case
def option_errors():
    c = Conn()
    c.greet()
    c.opt(99)
    assert c.reps()[-1][1] == ERR_UNSUP, "unknown option"
    c.opt(OPT_LIST, b"x")
    assert c.reps()[-1][1] == ERR_INVALID, "LIST with data"
    c.opt(OPT_STARTTLS)
    assert c.reps()[-1][1] in (ERR_UNSUP, ERR_POLICY), "STARTTLS"
    c.opt(OPT_SET_META, struct.pack(">II", 0, 0))
    assert c.reps()[-1][1] == ERR_INVALID, "SET_META_CONTEXT unstructured"
    c.opt(OPT_GO, struct.pack(">I", 100) + b"abc")
    assert c.reps()[-1][1] == ERR_INVALID, "GO name past the data"
    c.opt(OPT_INFO, struct.pack(">I", 4) + b"nope" + struct.pack(">H", 0))
    assert c.reps()[-1][1] == ERR_UNKNOWN, "INFO unknown export"
    c.opt(OPT_STRUCTURED, b"zz")
    assert c.reps()[-1][1] == ERR_INVALID, "STRUCTURED_REPLY with data"
    c.opt(OPT_STRUCTURED)
    assert c.reps()[-1][1] == REP_ACK
    c.opt(OPT_SET_META, struct.pack(">II", 0, 1) + struct.pack(">I", 1000) + b"x")
    assert c.reps()[-1][1] == ERR_INVALID, "query past the data"
    c.opt(OPT_LIST)
    r = c.reps()
    assert [t for _, t, _ in r] == [REP_SERVER, REP_ACK], "LIST"
    # after all that, the export still works
    c.opt(OPT_GO, struct.pack(">IH", 0, 0))
    assert c.reps()[-1][1] == REP_ACK
    c.req(CMD_READ, 0, 512)
    assert c.reply(512)[1] == 0
    c.req(CMD_DISC)
    assert c.closed(), "DISC did not close"


@case
def huge_option_then_close():
    c = Conn()
    c.greet()
    c.send(struct.pack(">QII", IHAVEOPT, OPT_GO, 0xFFFFFFFF) + b"\0" * 1000)
    c.close()


@case
def half_option_header():
    c = Conn()
    c.greet()
    c.send(struct.pack(">QI", IHAVEOPT, OPT_GO))
    c.close()


@case
def export_name_unknown():
    c = Conn()
    c.greet()
    c.opt(OPT_EXPORT_NAME, b"nosuch")
    assert c.closed(), "unknown EXPORT_NAME accepted"


@case
def export_name_ok():
    c = Conn()
    c.greet(cflags=3)
    c.opt(OPT_EXPORT_NAME, b"")
    size, tflags = struct.unpack(">QH", c.recv(10))
    assert size == SIZE, "size %d" % size
    c.req(CMD_READ, 4096, 4096, cookie=7)
    cookie, err, chunks, _ = c.reply(4096)
    assert cookie == 7 and err == 0 and len(chunks[0][1]) == 4096


@case
def abort():
    c = Conn()
    c.greet()
    c.opt(OPT_ABORT)
    try:
        r = c.reps()
        assert r[-1][1] == REP_ACK
    except Closed:
        pass


# ---- transmission cases -----------------------------------------------------

@case
def bad_request_magic():
    c = Conn().go()
    c.send(struct.pack(">IHHQQI", 0xDEADBEEF, 0, CMD_READ, 1, 0, 512))
    assert c.closed(), "bad request magic accepted"


@case
def request_errors():
    c = Conn().go()
    c.req(99, 0, 512, cookie=1)
    assert c.reply()[1] == EINVAL, "unknown command"
    c.req(CMD_READ, SIZE - 512, 1024, cookie=2)
    assert c.reply()[1] == EINVAL, "read past the end"
    c.req(CMD_READ, 0, 512, flags=0x4000, cookie=3)
    assert c.reply()[1] == EINVAL, "unknown flag"
    c.req(CMD_READ, 1 << 62, 512, cookie=4)
    assert c.reply()[1] == EINVAL, "read at 2^62"
    if MODE == "rw":
        c.req(CMD_WRITE, SIZE - 512, 1024, cookie=5, payload=b"\1" * 1024)
        want_err(c.reply()[1], ENOSPC)
        c.req(CMD_WRITE_ZEROES, SIZE, 4096, cookie=6)
        want_err(c.reply()[1], ENOSPC)
        c.req(CMD_WRITE, 0xFFFFFFFFFFFFF000, 8192, cookie=8, payload=b"\2" * 8192)
        want_err(c.reply()[1], ENOSPC)
        c.req(CMD_TRIM, SIZE - 512, 1024, cookie=9)
        assert c.reply()[1] != 0, "trim past the end"
    else:
        c.req(CMD_WRITE, 0, 1024, cookie=5, payload=b"\1" * 1024)
        want_err(c.reply()[1], EPERM)
        c.req(CMD_TRIM, 0, 4096, cookie=6)
        want_err(c.reply()[1], EPERM)
        c.req(CMD_WRITE_ZEROES, 0, 4096, cookie=7)
        want_err(c.reply()[1], EPERM)
    # the connection is still in step
    c.req(CMD_READ, 0, 4096, cookie=10)
    cookie, err, chunks, _ = c.reply(4096)
    assert cookie == 10 and err == 0
    assemble(0, 4096, chunks)


@case
def block_status_not_negotiated():
    c = Conn().go(contexts=())
    c.req(CMD_BLOCK_STATUS, 0, 4096)
    assert c.reply()[1] == EINVAL


@case
def block_status():
    c = Conn().go()
    c.req(CMD_BLOCK_STATUS, 0, SIZE, cookie=3)
    cookie, err, _, bs = c.reply()
    assert err == 0 and len(bs) == 1
    total = sum(ln for ln, _ in bs[0][1])
    assert 0 < total <= SIZE and all(ln > 0 for ln, _ in bs[0][1])
    c.req(CMD_BLOCK_STATUS, 4096, 1 << 20, flags=FLAG_REQ_ONE, cookie=4)
    cookie, err, _, bs = c.reply()
    assert err == 0 and len(bs) == 1 and len(bs[0][1]) == 1, "REQ_ONE: %r" % (bs,)
    assert 0 < bs[0][1][0][0] <= 1 << 20
    c.req(CMD_BLOCK_STATUS, SIZE - 512, 1024, cookie=5)
    assert c.reply()[1] == EINVAL, "block status past the end"


@case
def read_structured_and_df():
    c = Conn().go()
    c.req(CMD_READ, 1 << 20, 3 << 20, cookie=9)
    cookie, err, chunks, _ = c.reply()
    assert err == 0
    a = assemble(1 << 20, 3 << 20, chunks)
    assert a == b"\x61" * (1 << 20) + bytes(2 << 20), "content of a long read"
    c.req(CMD_READ, 1 << 20, 3 << 20, flags=FLAG_DF, cookie=10)
    cookie, err, chunks2, _ = c.reply()
    assert err == 0 and len(chunks2) == 1, "DF gave %d chunks" % len(chunks2)
    assert assemble(1 << 20, 3 << 20, chunks2) == a
    c.req(CMD_READ, 0, 0, cookie=11)
    assert c.reply()[1] == 0, "zero-length read"


@case
def pipelined():
    c = Conn().go()
    n = 48
    if MODE == "rw":
        for i in range(n):
            c.req(CMD_WRITE, (8 << 20) + i * 65536, 65536, cookie=1000 + i,
                  payload=bytes([i]) * 65536)
        got = sorted(c.reply()[0:2] for _ in range(n))
        assert got == [(1000 + i, 0) for i in range(n)], "write cookies"
    for i in range(n):
        c.req(CMD_READ, (8 << 20) + i * 65536, 65536, cookie=2000 + i)
    seen = {}
    for _ in range(n):
        cookie, err, chunks, _ = c.reply(65536)
        assert err == 0 and cookie not in seen
        seen[cookie] = assemble((8 << 20) + (cookie - 2000) * 65536, 65536, chunks)
    assert sorted(seen) == [2000 + i for i in range(n)], "read cookies"
    if MODE == "rw":
        for i in range(n):
            assert seen[2000 + i] == bytes([i]) * 65536, "content of write %d" % i
        c.req(CMD_FLUSH, cookie=5)
        assert c.reply()[1] == 0


@case
def disconnect_mid_write():
    c = Conn().go()
    c.req(CMD_WRITE, 0, 65536, payload=b"\7" * 1000)
    c.close()


@case
def disconnect_mid_header():
    c = Conn().go()
    c.send(struct.pack(">IHH", REQ_MAGIC, 0, CMD_READ))
    c.close()


@case
def disconnect_with_replies_pending():
    c = Conn().go()
    for i in range(32):
        c.req(CMD_READ, i * 1048576, 1048576, cookie=i)
    c.close()


@case
def oversized_write():
    c = Conn().go()
    c.req(CMD_WRITE, 0, 0x7FFFFFFF)
    try:
        c.reply()
    except Closed:
        pass
    assert c.closed(), "a 2 GiB write payload was waited for"


@case
def garbage_streams():
    rnd = random.Random(1)
    for i in range(40):
        c = Conn()
        if i % 2:
            c.go()
            prefix = struct.pack(">I", REQ_MAGIC) if i % 4 == 1 else b""
        else:
            c.greet()
            prefix = struct.pack(">Q", IHAVEOPT) if i % 4 == 0 else b""
        try:
            c.send(prefix + bytes(rnd.getrandbits(8) for _ in range(rnd.randint(1, 300))))
        except (BrokenPipeError, ConnectionResetError):
            pass
        c.close()


@case
def still_serving():
    c = Conn().go()
    c.req(CMD_READ, 0, 65536, cookie=77)
    cookie, err, chunks, _ = c.reply(65536)
    assert cookie == 77 and err == 0
    assemble(0, 65536, chunks)
    c.req(CMD_DISC)


finish()
