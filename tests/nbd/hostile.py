"""Hostile clients for tests/nbd/hostile.sh.

    python3 hostile.py SCENARIO SOCKET [KEY=VALUE ...]

Each scenario plays one misbehaving client A against a server listening on
the Unix socket SOCKET and, where it says, a well-behaved client B next to
it (greeting, NBD_OPT_GO, a 4 KiB READ, DISC), measures what the server
does, and prints one line per check, "ok NAME" or "bad NAME: WHY", which
the script counts, and "info ..." lines with the figures measured. Times
are seconds from A's connect.

Scenarios:
  trickle   A sends a valid handshake one byte at a time, slower than the
            handshake limit allows in all: it must be dropped at the limit.
  silent    A connects and sends nothing: dropped at the limit.
  flood     A floods NBD_OPT_LIST without reading a reply: dropped at the
            limit.
  noread    A reaches transmission, sends COUNT pipelined READs of SIZE
            bytes and reads nothing: dropped LIMIT (the send stall limit)
            after its requests (drop=1), or only watched for WINDOW
            seconds (drop=0: a server without the limit). With pid and
            rss_cap (MiB): the server's resident memory grows, by no more
            than rss_cap, while the replies are stuck.
  slowread  A reads a SIZE-byte reply (0x5a bytes) at RATE bytes/s: slower
            than the send stall LIMIT would allow for the whole reply, but
            never still for long; it must get all of it.
  emfile    Connections are opened (and taken to transmission) until the
            server, under a low `ulimit -n`, can accept no more; its CPU
            time over 3 s must stay small (no accept() spinning), and once
            one connection closes the first waiting one is served.

Keys: limit (s), margin (s of slack for a loaded machine), shared (the
server's -e: 1, B waits for A's place; 2, B is served beside A), drop,
window, count, size, rate, pid, rss_cap.
"""
import os
import select
import socket
import struct
import sys
import threading
import time

SCENARIO, SOCK = sys.argv[1], sys.argv[2]
ARGS = dict(a.split("=", 1) for a in sys.argv[3:])
LIMIT = float(ARGS.get("limit", "10"))
MARGIN = float(ARGS.get("margin", "2"))
SHARED = int(ARGS.get("shared", "1"))

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPMAGIC = 0x0003E889045565A9
REQ_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
OPT_LIST, OPT_GO = 3, 7
REP_ACK = 1
CMD_READ, CMD_DISC = 0, 2

T0 = time.monotonic()


def now():
    return time.monotonic() - T0


def ok(name):
    print("ok %s" % name, flush=True)


def bad(name, why):
    print("bad %s: %s" % (name, why), flush=True)


def check(name, cond, why):
    if cond:
        ok(name)
    else:
        bad(name, why)


def info(msg):
    print("info %s" % msg, flush=True)


def connect():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(SOCK)
    return s


def recv_exact(s, n):
    b = b""
    while len(b) < n:
        d = s.recv(n - len(b))
        if not d:
            raise EOFError("connection closed after %d of %d bytes" % (len(b), n))
        b += d
    return b


def opt(o, data=b""):
    return struct.pack(">QII", IHAVEOPT, o, len(data)) + data


GO_DATA = struct.pack(">IH", 0, 0)          # the default export, no info requests
HANDSHAKE = struct.pack(">I", 3) + opt(OPT_GO, GO_DATA)


def go(s):
    """Client flags and GO on a greeted socket; reads the replies."""
    s.sendall(HANDSHAKE)
    while True:
        magic, o, typ, ln = struct.unpack(">QIII", recv_exact(s, 20))
        assert magic == REPMAGIC and o == OPT_GO, "bad option reply"
        recv_exact(s, ln)
        if typ == REP_ACK:
            return
        assert not typ & 0x80000000, "GO refused: %x" % typ


def greeting(s):
    magic, opts, _ = struct.unpack(">QQH", recv_exact(s, 18))
    assert magic == NBDMAGIC and opts == IHAVEOPT, "bad greeting"


def read_req(off, ln, cookie):
    return struct.pack(">IHHQQI", REQ_MAGIC, 0, CMD_READ, cookie, off, ln)


def serve_b(s, res):
    """Be client B on a connected socket: greeting, GO, READ, DISC."""
    greeting(s)
    res["greet"] = now()
    go(s)
    s.sendall(read_req(0, 4096, 77))
    magic, err, cookie = struct.unpack(">IIQ", recv_exact(s, 16))
    assert magic == SIMPLE_MAGIC and err == 0 and cookie == 77, "READ failed"
    assert recv_exact(s, 4096) == b"\x5a" * 4096, "READ content"
    s.sendall(struct.pack(">IHHQQI", REQ_MAGIC, 0, CMD_DISC, 78, 0, 0))
    res["done"] = now()


def client_b(delay, timeout):
    """Start B in a thread after `delay` s; returns its result dict."""
    res = {}

    def run():
        time.sleep(delay)
        try:
            s = connect()
            s.settimeout(timeout)
            serve_b(s, res)
            s.close()
        except Exception as e:  # noqa: BLE001 - reported as a failure
            res["error"] = repr(e)
    th = threading.Thread(target=run, daemon=True)
    th.start()
    res["thread"] = th
    return res


DROP_EVENTS = select.POLLHUP | select.POLLERR | select.POLLRDHUP


def dropped(s, timeout):
    """Has the server dropped s (closed or shut down its side)? Waits up
    to `timeout` s. Unread data does not hide it."""
    p = select.poll()
    p.register(s, DROP_EVENTS)
    return bool(p.poll(max(0, int(timeout * 1000))))


def wait_drop(s, until):
    """Time of the drop, or None if s is still up at time `until`."""
    while now() < until:
        if dropped(s, min(0.05, until - now())):
            return now()
    return None


def judge_b(b, t_drop, t_from=0.0):
    """B's checks: with -e 1 it is served only after A lost its place (and
    then at once); with more places, at once, while A is still there."""
    b["thread"].join(LIMIT + 3 * MARGIN + 10)
    if "error" in b or "done" not in b:
        bad("B served", b.get("error", "no answer"))
        return
    info("B greeted at %.2f s, done at %.2f s" % (b["greet"], b["done"]))
    if SHARED == 1:
        check("B waited for A's place", t_drop is not None and b["greet"] >= t_drop - 0.1,
              "greeted at %.2f s, A dropped at %s" % (b["greet"], t_drop))
        check("B served by the limit", b["done"] <= t_from + LIMIT + MARGIN,
              "done at %.2f s" % b["done"])
    else:
        check("B served beside A", b["done"] <= t_from + LIMIT + MARGIN and
              (t_drop is None or b["done"] < t_drop),
              "done at %.2f s, A dropped at %s" % (b["done"], t_drop))


def judge_drop(name, t_drop, t_from=0.0):
    lo, hi = t_from + LIMIT - 0.3, t_from + LIMIT + MARGIN
    info("%s: A dropped at %s s (expected %.1f to %.1f)" %
         (name, "%.2f" % t_drop if t_drop is not None else "never", lo, hi))
    check("A dropped at the limit", t_drop is not None and lo <= t_drop <= hi,
          "dropped at %s, expected %.1f to %.1f s" % (t_drop, lo, hi))


def trickle():
    a = connect()
    b = client_b(0.2, LIMIT + 2 * MARGIN + 5)
    # One byte every `gap` seconds: the whole handshake would take longer
    # than the limit plus twice the margin, though no read waits long.
    gap = (LIMIT + 2 * MARGIN) / (len(HANDSHAKE) - 1)
    sent, t_drop = 0, None
    for byte in HANDSHAKE:
        try:
            a.send(bytes([byte]))
        except OSError:
            t_drop = now()
            break
        sent += 1
        t_drop = wait_drop(a, now() + gap)
        if t_drop is not None:
            break
    if t_drop is None:
        t_drop = wait_drop(a, LIMIT + 2 * MARGIN)
    info("trickle: %d of %d bytes sent, one every %.2f s" % (sent, len(HANDSHAKE), gap))
    judge_drop("trickle", t_drop)
    check("A dropped mid-handshake", sent < len(HANDSHAKE),
          "all %d bytes were taken" % sent)
    judge_b(b, t_drop)


def silent():
    a = connect()
    b = client_b(0.2, LIMIT + 2 * MARGIN + 5)
    t_drop = wait_drop(a, LIMIT + 2 * MARGIN)
    judge_drop("silent", t_drop)
    judge_b(b, t_drop)


def flood():
    a = connect()
    a.settimeout(LIMIT)
    greeting(a)
    a.sendall(struct.pack(">I", 3))
    b = client_b(0.2, LIMIT + 2 * MARGIN + 5)
    a.setblocking(False)
    batch = opt(OPT_LIST) * 64
    sent, t_drop = 0, None
    while now() < LIMIT + 2 * MARGIN:
        try:
            # (an option cut short at the end does not matter: the
            # server stops reading long before, stuck sending replies)
            sent += a.send(batch[sent % len(batch):])
        except BlockingIOError:
            pass
        except OSError:
            t_drop = now()
            break
        if dropped(a, 0.01):
            t_drop = now()
            break
    n = sent // 16
    info("flood: %d options sent, no reply read" % n)
    judge_drop("flood", t_drop)
    check("A flooded", n >= 1000, "only %d options went out" % n)
    judge_b(b, t_drop)


def rss_mib(pid):
    with open("/proc/%s/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmRSS")


def noread():
    count = int(ARGS.get("count", "64"))
    size = int(ARGS.get("size", str(1 << 20)))
    pid, cap = ARGS.get("pid"), ARGS.get("rss_cap")
    a = connect()
    a.settimeout(10)
    greeting(a)
    go(a)
    base = rss_mib(pid) if pid and cap else None
    b = client_b(0.3, LIMIT + 2 * MARGIN + 10)
    reqs = b"".join(read_req(0, size, i) for i in range(count))
    a.sendall(reqs)
    t_req = now()
    if pid and cap:
        # the replies are stuck: see what the server holds meanwhile
        time.sleep(min(2.0, LIMIT / 2))
        grown = rss_mib(pid) - base
        info("noread: server RSS grew by %.1f MiB with %d x %d-byte READs unread"
             % (grown, count, size))
        check("server holds the stuck replies", grown >= 32,
              "grew by %.1f MiB only" % grown)
        check("memory of one connection capped", grown <= float(cap),
              "grew by %.1f MiB, cap %s MiB" % (grown, cap))
    if ARGS.get("drop", "1") == "1":
        t_drop = wait_drop(a, t_req + LIMIT + 2 * MARGIN)
        judge_drop("noread", t_drop, t_req)
        judge_b(b, t_drop, t_req)
    else:
        window = float(ARGS.get("window", "4"))
        t_drop = wait_drop(a, t_req + window)
        info("noread: A %s" % ("dropped at %.2f s" % t_drop if t_drop is not None
                               else "still connected %.1f s after its requests" % window))
        judge_b(b, t_drop, t_req)


def slowread():
    size = int(ARGS.get("size", str(4 << 20)))
    rate = float(ARGS.get("rate", str(1 << 20)))
    a = connect()
    a.settimeout(LIMIT + MARGIN + 10)
    greeting(a)
    go(a)
    t1 = now()
    a.sendall(read_req(0, size, 5))
    try:
        magic, err, cookie = struct.unpack(">IIQ", recv_exact(a, 16))
        got = bytearray()
        while len(got) < size:
            d = a.recv(min(65536, size - len(got)))
            if not d:
                break
            got += d
            time.sleep(len(d) / rate)
        elapsed = now() - t1
        info("slowread: %d of %d bytes in %.2f s" % (len(got), size, elapsed))
        check("slow reader gets all", err == 0 and cookie == 5 and len(got) == size and
              got == b"\x5a" * size, "error %d, %d bytes" % (err, len(got)))
        check("slow read outlasts the limit", elapsed >= 2 * LIMIT,
              "took %.2f s only" % elapsed)
        a.sendall(struct.pack(">IHHQQI", REQ_MAGIC, 0, CMD_DISC, 6, 0, 0))
    except (OSError, EOFError) as e:
        bad("slow reader gets all", "dropped: %r" % e)


def cpu_seconds(pid):
    with open("/proc/%s/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of stat(5); [0] here is field 3
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def emfile():
    pid = ARGS["pid"]
    greeted, waiting = [], []
    while len(waiting) < 3 and len(greeted) + len(waiting) < 300:
        s = connect()
        # (long enough for a greeting on a loaded machine: a client taken
        # for waiting that is greeted later fails "still wait" below)
        if select.select([s], [], [], 1.5)[0]:
            s.settimeout(10)
            greeting(s)
            go(s)
            greeted.append(s)
        else:
            waiting.append(s)
    info("emfile: %d clients served, then %d left waiting" % (len(greeted), len(waiting)))
    check("descriptors ran out", greeted and len(waiting) == 3,
          "%d served, %d waiting" % (len(greeted), len(waiting)))
    c1 = cpu_seconds(pid)
    time.sleep(3)
    cpu = cpu_seconds(pid) - c1
    info("emfile: server CPU time %.2f s over 3 s with clients waiting" % cpu)
    check("no accept() spinning", cpu <= 0.3, "%.2f s of CPU in 3 s" % cpu)
    check("waiting clients still wait", not select.select(waiting, [], [], 0)[0],
          "one was greeted: descriptors had not run out")
    if not greeted or not waiting:
        return
    greeted.pop(0).close()
    t1 = now()
    w = waiting.pop(0)
    try:
        w.settimeout(MARGIN + 1)
        res = {}
        serve_b(w, res)
        info("emfile: a waiting client served %.2f s after a descriptor came free"
             % (res["done"] - t1))
        check("served once a descriptor is free", res["done"] - t1 <= MARGIN,
              "%.2f s" % (res["done"] - t1))
    except (OSError, EOFError, AssertionError) as e:
        bad("served once a descriptor is free", repr(e))
    for s in greeted + waiting + [w]:
        s.close()
    time.sleep(0.5)
    try:
        s = connect()
        s.settimeout(MARGIN + 5)
        serve_b(s, {})
        ok("served after the others left")
    except (OSError, EOFError, AssertionError) as e:
        bad("served after the others left", repr(e))


{"trickle": trickle, "silent": silent, "flood": flood, "noread": noread,
 "slowread": slowread, "emfile": emfile}[SCENARIO]()
