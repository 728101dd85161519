"""An NBD client for tests/nbd/dirty-bitmap.sh: block status of several
meta contexts in one session, and an incremental backup's copy.

    python3 dirtymap.py map SOCKET STEP CONTEXT...
        One connection: structured replies, SET_META_CONTEXT with every
        CONTEXT, then BLOCK_STATUS requests of STEP bytes (the last one
        shorter) over the whole export, and the same again with REQ_ONE.
        Prints, per request, each chunk as "CONTEXT: length/flags ..."
        (contexts named by what the server replied for their ids), so that
        two servers can be compared line by line.
    python3 dirtymap.py copy SOCKET MAP.json TARGET
        Reads every extent that MAP.json (nbdinfo --map --json of a
        qemu:dirty-bitmap context) marks dirty (type 1) from the export and
        writes it at the same offset of the file TARGET: the step of an
        incremental backup. Prints the bytes copied.
"""
import json
import os
import socket
import struct
import sys

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPMAGIC = 0x0003E889045565A9
OPT_GO, OPT_STRUCTURED, OPT_SET_META = 7, 8, 10
REP_ACK, REP_META = 1, 4
CMD_READ, CMD_DISC, CMD_BLOCK_STATUS = 0, 2, 7
FLAG_REQ_ONE = 8
SIMPLE_MAGIC, STRUCT_MAGIC = 0x67446698, 0x668E33EF
REPLY_BLOCK_STATUS, REPLY_FLAG_DONE = 5, 1
MAX_READ = 32 << 20


class Conn:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(60)
        self.s.connect(path)
        magic, opt, flags = struct.unpack(">QQH", self.recv(18))
        if magic != NBDMAGIC or opt != IHAVEOPT:
            sys.exit("not a fixed newstyle NBD server")
        self.s.sendall(struct.pack(">I", 3))     # fixed newstyle, no zeroes
        self.size = None
        self.cookie = 0

    def recv(self, n):
        b = b""
        while len(b) < n:
            d = self.s.recv(n - len(b))
            if not d:
                sys.exit("the server closed the connection")
            b += d
        return b

    def opt(self, opt, data=b""):
        self.s.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)

    def reps(self, opt):
        """Replies to option `opt` up to its ACK: [(type, data)]."""
        out = []
        while True:
            magic, o, typ, ln = struct.unpack(">QIII", self.recv(20))
            data = self.recv(ln)
            if magic != REPMAGIC or o != opt:
                sys.exit("bad option reply")
            if typ & 0x80000000:
                sys.exit("option %d refused: %r" % (opt, data))
            out.append((typ, data))
            if typ == REP_ACK:
                return out

    def go(self, contexts=()):
        ids = {}
        if contexts:
            self.opt(OPT_STRUCTURED)
            self.reps(OPT_STRUCTURED)
            q = b"".join(struct.pack(">I", len(c)) + c.encode() for c in contexts)
            self.opt(OPT_SET_META, struct.pack(">I", 0) + struct.pack(">I", len(contexts)) + q)
            for typ, data in self.reps(OPT_SET_META):
                if typ == REP_META:
                    ids[struct.unpack(">I", data[:4])[0]] = data[4:].decode()
        self.opt(OPT_GO, struct.pack(">IH", 0, 0))
        for typ, data in self.reps(OPT_GO):
            if typ == 3 and struct.unpack(">H", data[:2])[0] == 0:
                self.size = struct.unpack(">Q", data[2:10])[0]
        return ids

    def req(self, typ, off, ln, flags=0):
        self.cookie += 1
        self.s.sendall(struct.pack(">IHHQQI", 0x25609513, flags, typ, self.cookie, off, ln))
        return self.cookie

    def block_status(self, off, ln, flags):
        """[(context id, [(length, flags)...])], one per chunk."""
        cookie = self.req(CMD_BLOCK_STATUS, off, ln, flags)
        chunks = []
        while True:
            magic, fl, typ, ck, ln2 = struct.unpack(">IHHQI", self.recv(20))
            data = self.recv(ln2)
            if magic != STRUCT_MAGIC or ck != cookie:
                sys.exit("bad block status reply")
            if typ & 0x8000:
                sys.exit("block status failed: %r" % data)
            if typ == REPLY_BLOCK_STATUS:
                ctx = struct.unpack(">I", data[:4])[0]
                ext = [struct.unpack(">II", data[i:i + 8]) for i in range(4, len(data), 8)]
                chunks.append((ctx, ext))
            if fl & REPLY_FLAG_DONE:
                return chunks

    def read(self, off, ln):
        cookie = self.req(CMD_READ, off, ln)
        magic, err, ck = struct.unpack(">IIQ", self.recv(16))
        if magic != SIMPLE_MAGIC or ck != cookie or err:
            sys.exit("read at %d failed (error %d)" % (off, err))
        return self.recv(ln)

    def close(self):
        self.req(CMD_DISC, 0, 0)
        self.s.close()


def do_map(path, step, contexts):
    c = Conn(path)
    ids = c.go(contexts)
    for flags in (0, FLAG_REQ_ONE):
        off = 0
        while off < c.size:
            ln = min(step, c.size - off)
            for ctx, ext in c.block_status(off, ln, flags):
                print("%d+%d%s %s: %s" % (off, ln, " req-one" if flags else "", ids[ctx],
                                         " ".join("%d/%d" % e for e in ext)))
            off += ln
    c.close()


def do_copy(path, map_json, target):
    c = Conn(path)
    c.go()
    copied = 0
    fd = os.open(target, os.O_WRONLY)
    for e in json.load(open(map_json)):
        if e["type"] != 1:
            continue
        off, end = e["offset"], e["offset"] + e["length"]
        while off < end:
            n = min(MAX_READ, end - off)
            os.pwrite(fd, c.read(off, n), off)
            off += n
            copied += n
    os.close(fd)
    c.close()
    print(copied)


if __name__ == "__main__":
    if sys.argv[1] == "map":
        do_map(sys.argv[2], int(sys.argv[3]), sys.argv[4:])
    else:
        do_copy(sys.argv[2], sys.argv[3], sys.argv[4])
