/*
 * request.c - the NBD transmission phase: requests in, replies out.
 *
 * Design note. A connection is served by up to NBD_WORKERS threads that
 * take turns as its reader (leader and followers): the leader reads one
 * request (header and, for WRITE, payload) from the socket, through an
 * input buffer that takes in as many pipelined requests as one recv()
 * brings, then gives up the reading role and runs the request itself,
 * answering it in whatever order it finishes. Invariants:
 * - Only the leader (holding tx.read_lock) touches the socket's input
 *   side and the input buffer, so requests are read whole and in order.
 * - Handing over: when more input is already waiting (buffered, or
 *   ready on the socket), or the request may be slow (flush, FUA, trim,
 *   zeroes, transfers from NBD_SLOW_LEN on, any read or write of an export
 *   that bypasses the page cache), the leader lets the reading
 *   role go to a waiting thread, starting one if none waits and fewer than
 *   NBD_WORKERS exist, so pipelined requests run at once. Otherwise (a
 *   client waiting for each reply, or every thread busy) the same thread
 *   reads, runs, answers and reads again, with no thread switch. A WRITE
 *   that is not slow stays with the leader even with more input waiting:
 *   buffered writes into one file take turns on its inode lock in the
 *   kernel, so more threads only add lock waits and wake-ups (random 4 KiB
 *   writes at depth 16 ran 15-25% faster, with 20% less server CPU per
 *   write and a tenth of the 99.9th percentile latency).
 * - With the page cache bypassed, a small READ with more requests waiting
 *   behind it in the input buffer starts a batch: the leader takes the
 *   small READs that follow it there (NBD_BATCH), hands the reading role
 *   on, and reads them all with one qk_pread_batch, so their device reads
 *   are in flight together, then answers them in one send. The batch's
 *   data lives in the thread's own buffer (at most NBD_BATCH x
 *   NBD_BATCH_LEN, under NBD_KEEP_BUF), so the memory bound below holds.
 * - Each thread owns one buffer for its request's data, kept between
 *   requests up to NBD_KEEP_BUF bytes; larger ones are allocated for the
 *   request and count against NBD_INFLIGHT_BYTES, waited for before
 *   allocating (one request of any allowed size may always run alone), so
 *   a client cannot make the server hold more.
 * - A reply, or a chunk of one, is built whole and written with one
 *   nbd_send_iov() call under send_lock, so none is cut on the wire. The
 *   leader running requests one after the other while more are already
 *   buffered holds their replies back in tx.out (whole replies or chunks,
 *   NBD_OUTBUF at most) and sends them in one piece before it could wait:
 *   before a blocking read, before handing over, and at the end.
 * - Reads up to NBD_SPLIT_MIN, and reads with DF, go out as one data
 *   chunk; longer structured ones are split into data and hole chunks by
 *   block status and read and sent a chunk of NBD_READ_PIECE at most at a
 *   time; chunks of other replies may go out between them, as the
 *   protocol allows.
 * - When the leader meets the end (DISC, EOF, a protocol violation, or
 *   shutdown() of the socket by the server) it marks the connection
 *   closing; requests already read still run and are answered; then the
 *   threads exit, a writable image is flushed, and the connection ends. A
 *   failed send shuts the socket down, which ends the reading too.
 * Memory. What one connection can make the server hold is bounded,
 * whatever the client sends or fails to read:
 * - the struct tx: the NBD_INBUF input buffer and NBD_OUTBUF of replies
 *   held back (about 330 KiB);
 * - NBD_WORKERS threads, each with the data buffer it keeps, at most
 *   NBD_KEEP_BUF: a WRITE payload, READ data (or one NBD_READ_PIECE of a
 *   long read), BLOCK_STATUS chunks (built in place, at most
 *   NBD_BS_MAX_EXTENTS extents);
 * - buffers larger than that, NBD_INFLIGHT_BYTES all together; a WRITE
 *   whose payload would exceed NBD_MAX_PAYLOAD is refused before any of
 *   it is stored, and further pipelined WRITEs wait unread in the socket
 *   while the buffers are taken.
 * Replies are never queued beyond tx.out: a thread sends its own reply,
 * waiting for the socket at most the send stall limit (nbd_send_iov).
 * So about 16 x 4 + 64 MiB + 330 KiB = 128.3 MiB at most, plus the
 * threads' stacks and, on compressed images, each thread's codec state and
 * staging buffer (lib/qcow2/compress.c: about 0.5 MiB); the handshake
 * before it holds 64 KiB (handshake.c).
 * Request validation follows the specification rather than qemu-nbd: EPERM
 * for writing a read-only export, ENOSPC for writes past the end, EINVAL
 * for reads, trims and block status past the end and for bad flags or
 * commands, ENOTSUP for a fast zero that would be slow.
 *
 * SPDX-License-Identifier: MIT
 */
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "conn.h"

#define NBD_WORKERS        16          /* threads (and requests) per client */
#define NBD_KEEP_BUF       (4u << 20)  /* data buffer a thread keeps */
#define NBD_INFLIGHT_BYTES (64u << 20)  /* larger buffers, all together */
#define NBD_INBUF          (64u << 10)  /* input buffer */
#define NBD_OUTBUF         (256u << 10) /* replies held back */
/* One request of any allowed size may run alone (get_buf), so this
 * keeps the large buffers within NBD_INFLIGHT_BYTES. */
_Static_assert(NBD_MAX_PAYLOAD <= NBD_INFLIGHT_BYTES,
	       "a largest request must fit in the in-flight budget");
/* Transfers from this size on are handed over as possibly slow. */
#define NBD_SLOW_LEN       (1u << 20)
/* Pieces (holes and data alternating) a structured READ is split into;
 * the rest of a longer read is sent as data. */
#define NBD_READ_MAX_CHUNKS 64
/* Data chunks of a split read are this long at most, each read just
 * before it is sent. */
#define NBD_READ_PIECE (128u << 10)
/* Reads up to this size are not split into data and holes. */
#define NBD_SPLIT_MIN (64u << 10)
/* With the page cache bypassed, READs of up to NBD_BATCH_LEN bytes that
 * are already waiting in the input buffer are read together, up to
 * NBD_BATCH of them, with one qk_pread_batch (their device reads in flight
 * at once), then answered. */
#define NBD_BATCH     32
#define NBD_BATCH_LEN NBD_SPLIT_MIN
_Static_assert((size_t)NBD_BATCH * NBD_BATCH_LEN <= NBD_KEEP_BUF,
	       "a batch's data fits in the buffer a thread keeps");
/* Library extents looked at for one BLOCK_STATUS request; the reply then
 * covers less than asked, which the protocol allows. */
#define NBD_BS_MAX_EXTENTS 65536

struct request {
	uint16_t flags;
	uint16_t type;
	uint64_t cookie;
	uint64_t offset;
	uint32_t length;
	uint8_t *payload;       /* WRITE data (the worker's buffer) */
};

struct tx;

/* One thread of a connection and its data buffer. */
struct worker {
	struct tx *t;
	uint8_t *buf;           /* kept between requests, NBD_KEEP_BUF at most */
	size_t cap;
	uint8_t *big;           /* a larger buffer for the current request */
	size_t charge;          /* its size, counted in tx.big_bytes */
};

struct tx {
	struct nbd_conn *c;
	pthread_mutex_t read_lock; /* held by the thread reading (the leader) */
	atomic_bool closing;    /* no more requests will be read */
	atomic_uint waiting;    /* threads waiting for read_lock */
	int result;             /* how the reading ended (nbd_transmission) */
	pthread_mutex_t lock;   /* the fields below */
	pthread_cond_t room;    /* a large buffer was given back */
	unsigned nthreads;      /* threads started besides the first */
	pthread_t tids[NBD_WORKERS];
	struct worker workers[NBD_WORKERS];
	size_t big_bytes;
	/* Input, and replies held back: only the leader touches these. */
	uint8_t in[NBD_INBUF];
	size_t in_pos, in_len;
	uint8_t out[NBD_OUTBUF];
	size_t out_len;
	pthread_mutex_t send_lock;
	atomic_bool send_failed; /* set under send_lock; no reply can go out */
	int send_error;         /* why, a negative errno (under send_lock) */
};

/* ---- replies ---------------------------------------------------------------- */

/* The connection whose replies the calling thread is holding back in
 * tx.out (it is the leader, running pipelined requests one by one). */
static _Thread_local struct tx *corking;

/* Send iov[0..n) now, under send_lock. A failure (the client gone, or
 * taking nothing for the send stall limit) ends the connection: later
 * replies are dropped, and the socket is shut down, which wakes the
 * reader. */
static void send_now(struct tx *t, struct iovec *iov, int n)
{
	int r;

	pthread_mutex_lock(&t->send_lock);
	if (!atomic_load(&t->send_failed) &&
	    (r = nbd_send_iov(&t->c->sock, iov, n)) < 0) {
		atomic_store(&t->send_failed, true);
		t->send_error = r;
		shutdown(t->c->sock.fd, SHUT_RDWR);
	}
	pthread_mutex_unlock(&t->send_lock);
}

/* Send the replies held back in t->out. Only the leader calls this. */
static void flush_out(struct tx *t)
{
	struct iovec iov;

	if (t->out_len == 0)
		return;
	iov.iov_base = t->out;
	iov.iov_len = t->out_len;
	send_now(t, &iov, 1);
	t->out_len = 0;
}

/* Send one whole reply, or, while corking, add it to t->out, which goes
 * out in one piece once no more requests are waiting (one send and one
 * wake-up of the client for a batch of small replies). */
static void send_reply(struct tx *t, struct iovec *iov, int n)
{
	if (corking == t) {
		size_t len = 0;

		for (int i = 0; i < n; i++)
			len += iov[i].iov_len;
		if (len > NBD_OUTBUF - t->out_len)
			flush_out(t);
		if (len <= NBD_OUTBUF - t->out_len) {
			for (int i = 0; i < n; i++) {
				memcpy(t->out + t->out_len, iov[i].iov_base, iov[i].iov_len);
				t->out_len += iov[i].iov_len;
			}
			return;
		}
	}
	send_now(t, iov, n);
}

static void put_simple(uint8_t *h, uint64_t cookie, uint32_t err)
{
	nbd_put32(h, NBD_SIMPLE_REPLY_MAGIC);
	nbd_put32(h + 4, err);
	nbd_put64(h + 8, cookie);
}

static void put_chunk(uint8_t *h, uint64_t cookie, uint16_t flags,
		      uint16_t type, uint32_t len)
{
	nbd_put32(h, NBD_STRUCTURED_REPLY_MAGIC);
	nbd_put16(h + 4, flags);
	nbd_put16(h + 6, type);
	nbd_put64(h + 8, cookie);
	nbd_put32(h + 16, len);
}

static void reply_ok(struct tx *t, const struct request *rq)
{
	uint8_t h[NBD_SIMPLE_REPLY_SIZE];
	struct iovec iov = { h, sizeof(h) };

	/* Simple replies are fine for everything but READ and BLOCK_STATUS,
	 * structured or not. */
	put_simple(h, rq->cookie, 0);
	send_reply(t, &iov, 1);
}

/* A failure: an ERROR chunk with the message when structured replies were
 * negotiated, else a simple reply carrying only the error value. */
static void reply_err(struct tx *t, const struct request *rq, uint32_t err,
		      const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static void reply_err(struct tx *t, const struct request *rq, uint32_t err,
		      const char *fmt, ...)
{
	uint8_t h[NBD_CHUNK_HEADER_SIZE + 6 + 256];
	struct iovec iov;
	va_list ap;
	int n;

	if (!t->c->structured) {
		put_simple(h, rq->cookie, err);
		iov.iov_base = h;
		iov.iov_len = NBD_SIMPLE_REPLY_SIZE;
		send_reply(t, &iov, 1);
		return;
	}
	va_start(ap, fmt);
	n = vsnprintf((char *)h + NBD_CHUNK_HEADER_SIZE + 6, 256, fmt, ap);
	va_end(ap);
	if (n < 0)
		n = 0;
	if (n > 255)
		n = 255;
	put_chunk(h, rq->cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR,
		  6 + (uint32_t)n);
	nbd_put32(h + NBD_CHUNK_HEADER_SIZE, err);
	nbd_put16(h + NBD_CHUNK_HEADER_SIZE + 4, (uint16_t)n);
	iov.iov_base = h;
	iov.iov_len = NBD_CHUNK_HEADER_SIZE + 6 + (size_t)n;
	send_reply(t, &iov, 1);
}

/* The NBD error value for a library failure. */
static uint32_t nbd_errno(int ret)
{
	switch (-ret) {
	case EPERM: case EACCES: case EROFS: return NBD_EPERM;
	case ENOMEM: return NBD_ENOMEM;
	case EINVAL: return NBD_EINVAL;
	case ENOSPC: case EFBIG: case EDQUOT: return NBD_ENOSPC;
	case EOVERFLOW: return NBD_EOVERFLOW;
	case ENOTSUP: return NBD_ENOTSUP;
	case ESHUTDOWN: return NBD_ESHUTDOWN;
	default: return NBD_EIO;
	}
}

static void reply_lib_err(struct tx *t, const struct request *rq, int ret)
{
	const char *msg = qk_last_error();

	reply_err(t, rq, nbd_errno(ret), "%s", msg[0] ? msg : strerror(-ret));
}

/* Answer a request that needs no data back: success, or the library's
 * error when `ret` < 0. */
static void reply_result(struct tx *t, const struct request *rq, int ret)
{
	if (ret < 0)
		reply_lib_err(t, rq, ret);
	else
		reply_ok(t, rq);
}

/* The header of an OFFSET_DATA chunk carrying `len` bytes read at `off`
 * (NBD_CHUNK_HEADER_SIZE + 8 bytes at h). */
static void put_data_chunk(uint8_t *h, uint64_t cookie, bool done,
			   uint64_t off, uint32_t len)
{
	put_chunk(h, cookie, done ? NBD_REPLY_FLAG_DONE : 0,
		  NBD_REPLY_TYPE_OFFSET_DATA, 8 + len);
	nbd_put64(h + NBD_CHUNK_HEADER_SIZE, off);
}

/* ---- commands ------------------------------------------------------------------ */

/* One piece of a structured READ reply. */
struct piece {
	uint64_t off;
	uint64_t len;
	bool hole;
};

/*
 * Split [off, off+len) into data and hole pieces by block status (ranges
 * that read as zeros become holes). At most NBD_READ_MAX_CHUNKS pieces;
 * the last one then covers the rest as data. A block status failure makes
 * the rest data too (the read reports the real error, if any).
 */
static int split_read(struct tx *t, uint64_t off, uint64_t len,
		      struct piece *p)
{
	uint64_t pos = off, end = off + len;
	int n = 0;

	while (pos < end) {
		struct qk_extent e;
		bool hole;

		if (n == NBD_READ_MAX_CHUNKS - 1 ||
		    qk_block_status(t->c->img, pos, end - pos, &e) < 0 ||
		    e.length == 0 || e.length > end - pos) {
			hole = false;
			e.length = end - pos;
		} else {
			hole = (e.flags & QK_EXTENT_ZERO) != 0;
		}
		if (n > 0 && p[n - 1].hole == hole) {
			p[n - 1].len += e.length;
		} else {
			p[n].off = pos;
			p[n].len = e.length;
			p[n].hole = hole;
			n++;
		}
		pos += e.length;
	}
	return n;
}

/* ---- data buffers ---------------------------------------------------------------- */

static void put_big(struct worker *w);

/* Can no reply reach the client any more (a send failed)? Then its
 * requests are not worth running. */
static bool gone(struct tx *t)
{
	return atomic_load(&t->send_failed);
}

/* A buffer of `len` bytes for the request `w` runs: its own, grown up to
 * NBD_KEEP_BUF, or a larger one charged against NBD_INFLIGHT_BYTES (waiting
 * for room while other large requests run). NULL when out of memory, or
 * when the client is gone() while waiting for room. */
static uint8_t *get_buf(struct worker *w, size_t len)
{
	struct tx *t = w->t;

	if (len <= w->cap)
		return w->buf;
	if (len <= NBD_KEEP_BUF) {
		size_t cap = w->cap ? w->cap : 65536;
		uint8_t *p;

		while (cap < len)
			cap *= 2;
		if (cap > NBD_KEEP_BUF)
			cap = NBD_KEEP_BUF;
		/* page aligned, so an image opened with O_DIRECT reads and
		 * writes it without a bounce buffer; its content goes */
		if (posix_memalign((void **)&p, 4096, cap) != 0)
			return NULL;
		free(w->buf);
		w->buf = p;
		w->cap = cap;
		return p;
	}
	pthread_mutex_lock(&t->lock);
	while (t->big_bytes > 0 && t->big_bytes + len > NBD_INFLIGHT_BYTES &&
	       !gone(t))
		pthread_cond_wait(&t->room, &t->lock);
	if (gone(t)) {
		pthread_mutex_unlock(&t->lock);
		return NULL;
	}
	t->big_bytes += len;
	pthread_mutex_unlock(&t->lock);
	w->charge = len;
	if (posix_memalign((void **)&w->big, 4096, len) != 0) {
		w->big = NULL;
		put_big(w);
	}
	return w->big;
}

/* Give back the large buffer of the request `w` ran, if any. */
static void put_big(struct worker *w)
{
	struct tx *t = w->t;

	if (w->charge == 0)
		return;
	free(w->big);
	w->big = NULL;
	pthread_mutex_lock(&t->lock);
	t->big_bytes -= w->charge;
	pthread_cond_broadcast(&t->room);
	pthread_mutex_unlock(&t->lock);
	w->charge = 0;
}

/* get_buf() for the data of READ `rq`, `len` bytes; when none can be had
 * the request is answered with ENOMEM and NULL returned. */
static uint8_t *get_read_buf(struct tx *t, struct worker *w,
			     const struct request *rq, size_t len)
{
	uint8_t *buf = get_buf(w, len);

	if (buf == NULL)
		reply_err(t, rq, NBD_ENOMEM, "out of memory for a %u-byte read",
			  rq->length);
	return buf;
}

/*
 * A structured read that may take several chunks: split into data and
 * holes by block status, each hole a HOLE chunk and each data piece DATA
 * chunks of NBD_READ_PIECE bytes at most, every one read just before it
 * is sent, so the bytes are still in the CPU cache when the socket copies
 * them and one piece-sized buffer serves a read of any length. A read
 * that fails after some chunks went out ends with an ERROR chunk, as the
 * protocol allows.
 */
static void read_streamed(struct tx *t, struct worker *w,
			  const struct request *rq)
{
	struct nbd_conn *c = t->c;
	struct piece p[NBD_READ_MAX_CHUNKS];
	uint8_t h[NBD_CHUNK_HEADER_SIZE + 12];
	struct iovec iov[2];
	uint8_t *buf;
	int n, r;

	buf = get_read_buf(t, w, rq, rq->length < NBD_READ_PIECE ?
					      rq->length : NBD_READ_PIECE);
	if (buf == NULL)
		return;
	n = split_read(t, rq->offset, rq->length, p);
	for (int i = 0; i < n; i++) {
		uint64_t pos = p[i].off, end = p[i].off + p[i].len;

		if (p[i].hole) {
			put_chunk(h, rq->cookie, i == n - 1 ? NBD_REPLY_FLAG_DONE : 0,
				  NBD_REPLY_TYPE_OFFSET_HOLE, 12);
			nbd_put64(h + NBD_CHUNK_HEADER_SIZE, p[i].off);
			nbd_put32(h + NBD_CHUNK_HEADER_SIZE + 8, (uint32_t)p[i].len);
			iov[0].iov_base = h;
			iov[0].iov_len = NBD_CHUNK_HEADER_SIZE + 12;
			send_reply(t, iov, 1);
			continue;
		}
		while (pos < end) {
			uint32_t len = (uint32_t)(end - pos < NBD_READ_PIECE ?
						  end - pos : NBD_READ_PIECE);
			bool last = i == n - 1 && pos + len == end;

			if (gone(t))
				return;

			r = qk_pread(c->img, buf, len, pos);
			if (r < 0) {
				reply_lib_err(t, rq, r);
				return;
			}
			put_data_chunk(h, rq->cookie, last, pos, len);
			iov[0].iov_base = h;
			iov[0].iov_len = NBD_CHUNK_HEADER_SIZE + 8;
			iov[1].iov_base = buf;
			iov[1].iov_len = len;
			send_reply(t, iov, 2);
			pos += len;
		}
	}
}

/* The successful reply to READ `rq` whose rq->length bytes are in buf: a
 * simple reply, or one data chunk. */
/* Fill iov[0..2) with that reply: its header, built in h (at least
 * NBD_CHUNK_HEADER_SIZE + 8 bytes), and the data. */
static void put_data_reply(const struct tx *t, const struct request *rq, uint8_t *h,
			   uint8_t *buf, struct iovec *iov)
{
	if (t->c->structured) {
		put_data_chunk(h, rq->cookie, true, rq->offset, rq->length);
		iov[0].iov_len = NBD_CHUNK_HEADER_SIZE + 8;
	} else {
		put_simple(h, rq->cookie, 0);
		iov[0].iov_len = NBD_SIMPLE_REPLY_SIZE;
	}
	iov[0].iov_base = h;
	iov[1].iov_base = buf;
	iov[1].iov_len = rq->length;
}

static void reply_data(struct tx *t, const struct request *rq, uint8_t *buf)
{
	uint8_t h[NBD_CHUNK_HEADER_SIZE + 8];
	struct iovec iov[2];

	put_data_reply(t, rq, h, buf, iov);
	send_reply(t, iov, 2);
}

/* READ: one reply (a simple one, or one data chunk), or the chunks of
 * read_streamed(). */
static void cmd_read(struct tx *t, struct worker *w, const struct request *rq)
{
	struct nbd_conn *c = t->c;
	uint8_t h[NBD_CHUNK_HEADER_SIZE + 8];
	struct iovec iov[2];
	uint8_t *buf;
	int r;

	if (rq->length > NBD_MAX_PAYLOAD) {
		reply_err(t, rq, NBD_EINVAL, "len (%u) is larger than max len (%u)",
			  rq->length, NBD_MAX_PAYLOAD);
		return;
	}
	if (rq->length == 0) {
		/* Nothing to read: a NONE chunk (or an empty simple reply). */
		if (c->structured)
			put_chunk(h, rq->cookie, NBD_REPLY_FLAG_DONE,
				  NBD_REPLY_TYPE_NONE, 0);
		else
			put_simple(h, rq->cookie, 0);
		iov[0].iov_base = h;
		iov[0].iov_len = c->structured ? NBD_CHUNK_HEADER_SIZE
					       : NBD_SIMPLE_REPLY_SIZE;
		send_reply(t, iov, 1);
		return;
	}
	/* Small reads go out as one data chunk: looking for holes would
	 * cost a second walk of the metadata for little to gain. */
	if (c->structured && !(rq->flags & NBD_CMD_FLAG_DF) &&
	    rq->length > NBD_SPLIT_MIN) {
		read_streamed(t, w, rq);
		return;
	}
	buf = get_read_buf(t, w, rq, rq->length);
	if (buf == NULL)
		return;
	r = qk_pread(c->img, buf, rq->length, rq->offset);
	if (r < 0) {
		reply_lib_err(t, rq, r);
		return;
	}
	reply_data(t, rq, buf);
}

static bool refuse(struct tx *t, const struct request *rq);

/* A READ of these joins a batch: up to NBD_BATCH_LEN bytes in whole 4 KiB
 * blocks. Others (512-byte sector reads) go through a bounce buffer one at
 * a time, so they are better run by threads side by side. */
static bool batch_size(uint64_t off, uint32_t len)
{
	return len > 0 && len <= NBD_BATCH_LEN && off % 4096 == 0 && len % 4096 == 0;
}

/*
 * As the leader, with the page cache bypassed: take READ `first` and the
 * small READs waiting behind it in the input buffer into rq[] (see
 * NBD_BATCH), answering any refused; returns how many to read. A request
 * the batch cannot take stays in the buffer for read_request.
 */
static size_t take_batch(struct tx *t, const struct request *first, struct request *rq)
{
	size_t n = 0;

	if (!gone(t) && !refuse(t, first))
		rq[n++] = *first;
	while (n < NBD_BATCH && t->in_len - t->in_pos >= NBD_REQUEST_SIZE) {
		const uint8_t *h = t->in + t->in_pos;
		struct request *r = &rq[n];

		if (nbd_get32(h) != NBD_REQUEST_MAGIC || nbd_get16(h + 6) != NBD_CMD_READ ||
		    !batch_size(nbd_get64(h + 16), nbd_get32(h + 24)))
			break;
		t->in_pos += NBD_REQUEST_SIZE;
		r->flags = nbd_get16(h + 4);
		r->type = NBD_CMD_READ;
		r->cookie = nbd_get64(h + 8);
		r->offset = nbd_get64(h + 16);
		r->length = nbd_get32(h + 24);
		r->payload = NULL;
		if (!refuse(t, r))      /* else answered already */
			n++;
	}
	return n;
}

/*
 * Read rq[0..n) together with one qk_pread_batch into the worker's buffer
 * (each at a page-aligned place, for O_DIRECT), and send every reply in one
 * go. When the buffer cannot be had or the batch read fails, each request
 * runs alone, for its own result and message.
 */
static void read_batch(struct tx *t, struct worker *w, const struct request *rq, size_t n)
{
	struct qk_read_op ops[NBD_BATCH];
	uint8_t h[NBD_BATCH][NBD_CHUNK_HEADER_SIZE + 8];
	struct iovec iov[2 * NBD_BATCH];
	size_t total = 0;
	uint8_t *buf;

	for (size_t i = 0; i < n; i++)
		total += ((size_t)rq[i].length + 4095) & ~(size_t)4095;
	buf = n > 1 ? get_buf(w, total) : NULL;
	for (size_t i = 0, at = 0; buf && i < n; i++) {
		ops[i].buf = buf + at;
		ops[i].len = rq[i].length;
		ops[i].offset = rq[i].offset;
		at += ((size_t)rq[i].length + 4095) & ~(size_t)4095;
	}
	if (buf == NULL || qk_pread_batch(t->c->img, ops, n) < 0) {
		for (size_t i = 0; i < n && !gone(t); i++)
			cmd_read(t, w, &rq[i]);
		return;
	}
	for (size_t i = 0; i < n; i++)
		put_data_reply(t, &rq[i], h[i], ops[i].buf, &iov[2 * i]);
	send_now(t, iov, (int)(2 * n));
}

/* Longest BLOCK_STATUS chunk: header, context id, extents. */
#define NBD_BS_CHUNK_MAX (NBD_CHUNK_HEADER_SIZE + 4 + 8 * NBD_BS_MAX_EXTENTS)

/* A BLOCK_STATUS chunk being built in place, in wire format. */
struct bs_chunk {
	uint8_t *p;             /* the chunk: header, context id, extents */
	size_t n;               /* extents so far */
};

/* Add an extent, merged with the last one when the flags agree (lengths
 * add up to at most the request's u32 length, so they cannot wrap), unless
 * a new one would pass `cap` extents: then false, nothing added. */
static bool bs_add(struct bs_chunk *b, uint64_t len, uint32_t flags, size_t cap)
{
	uint8_t *e = b->p + NBD_CHUNK_HEADER_SIZE + 4 + 8 * b->n;

	if (b->n > 0 && nbd_get32(e - 4) == flags) {
		nbd_put32(e - 8, nbd_get32(e - 8) + (uint32_t)len);
		return true;
	}
	if (b->n == cap)
		return false;
	nbd_put32(e, (uint32_t)len);
	nbd_put32(e + 4, flags);
	b->n++;
	return true;
}

/* Finish the chunk of context `id`: header and id. Returns its size. */
static size_t bs_finish(const struct request *rq, struct bs_chunk *b,
			uint32_t id, bool done)
{
	uint32_t len = 4 + 8 * (uint32_t)b->n;

	put_chunk(b->p, rq->cookie, done ? NBD_REPLY_FLAG_DONE : 0,
		  NBD_REPLY_TYPE_BLOCK_STATUS, len);
	nbd_put32(b->p + NBD_CHUNK_HEADER_SIZE, id);
	return NBD_CHUNK_HEADER_SIZE + len;
}

/* Both chunks are built in the worker's own buffer, so block status
 * takes no memory beyond the buffers counted in the design note. */
_Static_assert(2 * NBD_BS_CHUNK_MAX <= NBD_KEEP_BUF,
	       "BLOCK_STATUS chunks must fit in a worker's kept buffer");

/* Extents of one qemu:dirty-bitmap chunk: qemu-nbd's bound
 * (NBD_MAX_BLOCK_STATUS_EXTENTS), so that both cut a long reply at the
 * same place. */
#define NBD_BS_BITMAP_EXTENTS (1u << 17)

/* The qemu:allocation-depth of extent e: the layer holding it, 1 for the
 * top; past the end of a shorter backing file, that file's (its zeros
 * count as its own, as qemu-nbd counts them); 0 when no layer holds it. */
static uint32_t alloc_depth(qk_image *img, const struct qk_extent *e)
{
	if (e->flags & QK_EXTENT_PRESENT)
		return e->depth + 1;
	for (uint32_t i = 0; img && i < e->depth; i++)
		img = qk_get_backing(img);
	return img && qk_get_backing(img) ? e->depth + 2 : 0;
}

/* base:allocation and qemu:allocation-depth (as selected) from at most
 * NBD_BS_MAX_EXTENTS library extents, each chunk at most `cap` extents
 * (merged: with REQ_ONE a run goes on while its flags stay the same, as
 * qemu-nbd's does). Returns 0, or the failure of the first extent (later
 * ones end the chunks early). */
static int bs_alloc_depth(struct nbd_conn *c, const struct request *rq, size_t cap,
			  struct bs_chunk *alloc, struct bs_chunk *depth)
{
	uint64_t pos = rq->offset, end = rq->offset + rq->length;
	bool more_alloc = c->ctx_allocation, more_depth = c->ctx_depth;
	size_t raw = 0;

	while (pos < end && raw < NBD_BS_MAX_EXTENTS && (more_alloc || more_depth)) {
		struct qk_extent e;
		uint64_t len;
		int r = qk_block_status(c->img, pos, end - pos, &e);

		if (r < 0)
			return raw > 0 ? 0 : r;   /* answer for what is known */
		len = e.length;
		if (len == 0 || len > end - pos)
			len = end - pos;
		if (more_alloc)
			more_alloc = bs_add(alloc, len, (e.flags & QK_EXTENT_DATA ? 0 : NBD_STATE_HOLE) |
					    (e.flags & QK_EXTENT_ZERO ? NBD_STATE_ZERO : 0), cap);
		if (more_depth)
			more_depth = bs_add(depth, len, alloc_depth(c->img, &e), cap);
		pos += len;
		raw++;
	}
	return 0;
}

/* qemu:dirty-bitmap of the export's bitmap i: dirty and clean runs from
 * the request's offset, merged, at most `cap` extents (as qemu-nbd); past
 * the end of the image holding the bitmap (a smaller backing file) all is
 * clean. Returns 0, or the failure of the first run. */
static int bs_bitmap(struct nbd_conn *c, const struct request *rq, size_t i, size_t cap,
		     struct bs_chunk *b)
{
	qk_image *img = c->exp->bitmap_images[i];
	uint64_t pos = rq->offset, end = rq->offset + rq->length;
	uint64_t stop = end < qk_get_size(img) ? end : qk_get_size(img);

	while (pos < stop) {
		uint64_t len;
		int r = qk_bitmap_status(img, c->exp->bitmaps[i], pos, stop - pos, &len);

		if (r < 0)
			return b->n > 0 ? 0 : r;
		if (!bs_add(b, len, r ? NBD_STATE_DIRTY : 0, cap))
			return 0;
		pos += len;
	}
	if (pos < end)
		bs_add(b, end - pos, 0, cap);
	return 0;
}

/* BLOCK_STATUS: one chunk per selected context, in qemu-nbd's order:
 * base:allocation and qemu:allocation-depth with the extents of at most
 * NBD_BS_MAX_EXTENTS library extents, each bitmap with at most
 * NBD_BS_BITMAP_EXTENTS (one of each with REQ_ONE), from the request's
 * offset on; a failure after the first extent ends a chunk early instead
 * of failing the reply. */
static void cmd_block_status(struct tx *t, struct worker *w,
			     const struct request *rq)
{
	struct nbd_conn *c = t->c;
	bool one = rq->flags & NBD_CMD_FLAG_REQ_ONE;
	size_t cap = one ? 1 : NBD_BS_MAX_EXTENTS, bcap = one ? 1 : NBD_BS_BITMAP_EXTENTS;
	size_t chunk_max = NBD_CHUNK_HEADER_SIZE + 4 + 8 * cap;
	size_t bchunk_max = NBD_CHUNK_HEADER_SIZE + 4 + 8 * bcap;
	size_t nbm = (size_t)__builtin_popcount(c->ctx_bitmaps);
	size_t nctx = (c->ctx_allocation ? 1 : 0) + (c->ctx_depth ? 1 : 0) + nbm;
	struct bs_chunk ch[2 + NBD_MAX_EXPORT_BITMAPS];
	struct iovec iov[2 + NBD_MAX_EXPORT_BITMAPS];
	uint32_t ids[2 + NBD_MAX_EXPORT_BITMAPS];
	uint8_t *buf;
	int r;
	size_t k = 0;

	if (nctx == 0) {
		reply_err(t, rq, NBD_EINVAL, "CMD_BLOCK_STATUS not negotiated");
		return;
	}
	if (rq->length == 0) {
		reply_err(t, rq, NBD_EINVAL, "zero-length block status");
		return;
	}
	buf = get_buf(w, 2 * chunk_max + nbm * bchunk_max);
	if (buf == NULL) {
		reply_err(t, rq, NBD_ENOMEM, "out of memory for block status");
		return;
	}
	ch[0] = (struct bs_chunk){ buf, 0 };
	ch[1] = (struct bs_chunk){ buf + chunk_max, 0 };
	r = c->ctx_allocation || c->ctx_depth ? bs_alloc_depth(c, rq, cap, &ch[0], &ch[1]) : 0;
	if (r == 0 && c->ctx_allocation)
		ids[k++] = NBD_CTX_ID_ALLOCATION;
	if (r == 0 && c->ctx_depth) {
		ch[k] = ch[1];
		ids[k++] = NBD_CTX_ID_DEPTH;
	}
	for (size_t i = 0, j = 0; r == 0 && i < c->exp->nr_bitmaps; i++) {
		if (!(c->ctx_bitmaps & (1u << i)))
			continue;
		ch[k] = (struct bs_chunk){ buf + 2 * chunk_max + j++ * bchunk_max, 0 };
		r = bs_bitmap(c, rq, i, bcap, &ch[k]);
		ids[k++] = NBD_CTX_ID_BITMAP + (uint32_t)i;
	}
	if (r < 0) {
		reply_lib_err(t, rq, r);
		return;
	}
	for (size_t i = 0; i < k; i++) {
		iov[i].iov_base = ch[i].p;
		iov[i].iov_len = bs_finish(rq, &ch[i], ids[i], i + 1 == k);
	}
	send_reply(t, iov, (int)k);
}

/* After a write-type command: FUA makes it durable before the reply. */
static void finish_write(struct tx *t, const struct request *rq, int r)
{
	if (r >= 0 && (rq->flags & NBD_CMD_FLAG_FUA))
		r = qk_flush(t->c->img);
	reply_result(t, rq, r);
}

static void cmd_write_zeroes(struct tx *t, const struct request *rq)
{
	uint32_t zflags = 0;
	int r;

	if (!(rq->flags & NBD_CMD_FLAG_NO_HOLE))
		zflags |= QK_ZERO_MAY_UNMAP;
	if (rq->flags & NBD_CMD_FLAG_FAST_ZERO)
		zflags |= QK_ZERO_NO_FALLBACK;
	r = rq->length ? qk_write_zeroes(t->c->img, rq->offset, rq->length,
					 zflags) : 0;
	if (r == -ENOTSUP && (rq->flags & NBD_CMD_FLAG_FAST_ZERO)) {
		reply_err(t, rq, NBD_ENOTSUP, "fast zero not possible here");
		return;
	}
	finish_write(t, rq, r);
}

static const char *cmd_name(uint16_t type)
{
	static const char *const names[] = {
		"READ", "WRITE", "DISC", "FLUSH", "TRIM", "CACHE",
		"WRITE_ZEROES", "BLOCK_STATUS",
	};
	return type < sizeof(names) / sizeof(names[0]) ? names[type] : "?";
}

/* Flags each command may carry (FUA is allowed on every command). */
static uint16_t allowed_flags(const struct nbd_conn *c, uint16_t type)
{
	switch (type) {
	case NBD_CMD_READ:
		return NBD_CMD_FLAG_FUA | (c->structured ? NBD_CMD_FLAG_DF : 0);
	case NBD_CMD_WRITE_ZEROES:
		return NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE |
		       NBD_CMD_FLAG_FAST_ZERO;
	case NBD_CMD_BLOCK_STATUS:
		return NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_REQ_ONE;
	default:
		return NBD_CMD_FLAG_FUA;
	}
}

/* The checks every command passes before it runs: a known command, its
 * flags, writes on a writable export, the range within the export. Returns
 * true when the request was refused (and answered). */
static bool refuse(struct tx *t, const struct request *rq)
{
	struct nbd_conn *c = t->c;
	uint64_t off = rq->offset, len = rq->length;
	bool past_end = off > c->size || len > c->size - off;
	bool writes = rq->type == NBD_CMD_WRITE || rq->type == NBD_CMD_TRIM ||
		      rq->type == NBD_CMD_WRITE_ZEROES;

	if (rq->type > NBD_CMD_BLOCK_STATUS || rq->type == NBD_CMD_CACHE) {
		reply_err(t, rq, NBD_EINVAL, "invalid request type (%u) received",
			  rq->type);
		return true;
	}
	if (rq->flags & ~allowed_flags(c, rq->type)) {
		reply_err(t, rq, NBD_EINVAL, "unsupported flags for %s (got 0x%x)",
			  cmd_name(rq->type), rq->flags);
		return true;
	}
	if (writes && c->exp->readonly) {
		reply_err(t, rq, NBD_EPERM, "%s on a read-only export",
			  cmd_name(rq->type));
		return true;
	}
	if (rq->type != NBD_CMD_FLUSH && past_end) {
		reply_err(t, rq, rq->type == NBD_CMD_WRITE ||
			  rq->type == NBD_CMD_WRITE_ZEROES ? NBD_ENOSPC : NBD_EINVAL,
			  "operation past EOF; From: %llu, Len: %llu, Size: %llu",
			  (unsigned long long)off, (unsigned long long)len,
			  (unsigned long long)c->size);
		return true;
	}
	return false;
}

/* Validate and run one request, and answer it. */
static void handle(struct tx *t, struct worker *w, const struct request *rq)
{
	qk_image *img = t->c->img;
	uint64_t off = rq->offset, len = rq->length;

	if (gone(t) || refuse(t, rq))
		return;
	switch (rq->type) {
	case NBD_CMD_READ:
		cmd_read(t, w, rq);
		return;
	case NBD_CMD_WRITE:
		finish_write(t, rq,
			     len ? qk_pwrite(img, rq->payload, len, off) : 0);
		return;
	case NBD_CMD_FLUSH:
		reply_result(t, rq, qk_flush(img));
		return;
	case NBD_CMD_TRIM:
		finish_write(t, rq, len ? qk_discard(img, off, len) : 0);
		return;
	case NBD_CMD_WRITE_ZEROES:
		cmd_write_zeroes(t, rq);
		return;
	case NBD_CMD_BLOCK_STATUS:
		cmd_block_status(t, w, rq);
		return;
	}
}

/* ---- reading requests ------------------------------------------------------------- */

/* Have at least `need` bytes (<= NBD_INBUF) in the input buffer, taking
 * in what the socket has. Returns 0, -EPIPE at end of stream (what came
 * before it stays in the buffer), or another negative errno. */
static int fill(struct tx *t, size_t need)
{
	size_t have = t->in_len - t->in_pos, got;
	int r;

	if (have >= need)
		return 0;
	if (t->in_pos > 0) {
		memmove(t->in, t->in + t->in_pos, have);
		t->in_len = have;
		t->in_pos = 0;
	}
	/* About to wait for the client: it must have its replies. */
	flush_out(t);
	r = nbd_recv_some(&t->c->sock, t->in + t->in_len, need - have,
			  NBD_INBUF - t->in_len, &got);
	t->in_len += got;
	return r;
}

/* Is another request already waiting? Looks at the buffer, then (without
 * blocking) at the socket. */
static bool more_input(struct tx *t)
{
	size_t got;
	int r;

	if (t->in_len > t->in_pos)
		return true;
	t->in_pos = t->in_len = 0;
	r = nbd_recv_some(&t->c->sock, t->in, 0, NBD_INBUF, &got);
	t->in_len = got;
	/* End of stream or an error shows at the next fill(). */
	return r < 0 || got > 0;
}

/* Could the request take long? Then another thread goes on reading. With
 * the page cache bypassed every read and write may. */
static bool maybe_slow(const struct tx *t, const struct request *rq)
{
	return (rq->type != NBD_CMD_READ && rq->type != NBD_CMD_WRITE &&
		rq->type != NBD_CMD_BLOCK_STATUS) ||
	       (rq->flags & NBD_CMD_FLAG_FUA) || rq->length >= NBD_SLOW_LEN ||
	       (t->c->exp->direct && rq->type != NBD_CMD_BLOCK_STATUS);
}

/* Does READ rq start a batch (read_batch)? With the page cache bypassed, a
 * small one with others already waiting behind it. */
static bool batchable(const struct tx *t, const struct request *rq)
{
	return t->c->exp->direct && rq->type == NBD_CMD_READ &&
	       batch_size(rq->offset, rq->length) && t->in_len - t->in_pos >= NBD_REQUEST_SIZE;
}

/*
 * As the leader: read the next request into *rq (a WRITE's payload into a
 * buffer of `w`). Returns 1 for a request, 0 when the client left by the
 * rules (DISC, or end of stream between requests), -EPROTO when it broke
 * them, or another negative errno.
 */
static int read_request(struct tx *t, struct worker *w, struct request *rq)
{
	const uint8_t *h;
	size_t have;
	int r;

	r = fill(t, NBD_REQUEST_SIZE);
	if (r < 0)
		return r == -EPIPE ? (t->in_len == t->in_pos ? 0 : -EPROTO) : r;
	h = t->in + t->in_pos;
	t->in_pos += NBD_REQUEST_SIZE;
	if (nbd_get32(h) != NBD_REQUEST_MAGIC)
		return -EPROTO;
	rq->flags = nbd_get16(h + 4);
	rq->type = nbd_get16(h + 6);
	rq->cookie = nbd_get64(h + 8);
	rq->offset = nbd_get64(h + 16);
	rq->length = nbd_get32(h + 24);
	rq->payload = NULL;
	if (rq->type == NBD_CMD_DISC)
		return 0;
	if (rq->type != NBD_CMD_WRITE || rq->length == 0)
		return 1;
	if (rq->length > NBD_MAX_PAYLOAD) {
		/* The payload cannot be taken in: answer, then drop the
		 * connection, which is out of step now. */
		reply_err(t, rq, NBD_EINVAL, "len (%u) is larger than max len (%u)",
			  rq->length, NBD_MAX_PAYLOAD);
		return -EPROTO;
	}
	rq->payload = get_buf(w, rq->length);
	if (rq->payload == NULL)
		return -ENOMEM;
	have = t->in_len - t->in_pos;
	if (have > rq->length)
		have = rq->length;
	memcpy(rq->payload, t->in + t->in_pos, have);
	t->in_pos += have;
	if (have < rq->length) {
		r = nbd_recv_all(&t->c->sock, rq->payload + have, rq->length - have);
		if (r < 0)
			/* EOF inside a request breaks the protocol. */
			return r == -EPIPE ? -EPROTO : r;
	}
	return 1;
}

/* ---- the threads ------------------------------------------------------------------- */

static void *worker_main(void *arg);

/* Holding read_lock: is there a thread to take it over, waiting or
 * started now (fewer than NBD_WORKERS exist)? */
static bool hand_over(struct tx *t)
{
	bool ok = false;

	if (atomic_load(&t->waiting) > 0)
		return true;
	pthread_mutex_lock(&t->lock);
	if (t->nthreads + 1 < NBD_WORKERS) {
		struct worker *w = &t->workers[t->nthreads + 1];

		memset(w, 0, sizeof(*w));
		w->t = t;
		if (pthread_create(&t->tids[t->nthreads], NULL, worker_main, w) == 0) {
			t->nthreads++;
			ok = true;
		}
	}
	pthread_mutex_unlock(&t->lock);
	return ok;
}

static void *worker_main(void *arg)
{
	struct worker *w = arg;
	struct tx *t = w->t;
	bool leading = false;
	struct request rq;

	for (;;) {
		int r;

		if (!leading) {
			atomic_fetch_add(&t->waiting, 1);
			pthread_mutex_lock(&t->read_lock);
			atomic_fetch_sub(&t->waiting, 1);
			leading = true;
		}
		if (atomic_load(&t->closing)) {
			pthread_mutex_unlock(&t->read_lock);
			break;
		}
		r = read_request(t, w, &rq);
		if (r <= 0) {
			flush_out(t);
			put_big(w);
			t->result = r;
			atomic_store(&t->closing, true);
			/* Each waiting thread takes the lock, sees closing and
			 * passes it on. */
			pthread_mutex_unlock(&t->read_lock);
			break;
		}
		if (batchable(t, &rq)) {
			/* Take what waits, let another thread read on (its
			 * batch then overlaps this one at the device), and
			 * read this one. */
			struct request batch[NBD_BATCH];
			size_t n = take_batch(t, &rq, batch);

			if (hand_over(t)) {
				flush_out(t);
				pthread_mutex_unlock(&t->read_lock);
				leading = false;
			}
			read_batch(t, w, batch, n);
			put_big(w);
			continue;
		}
		if ((maybe_slow(t, &rq) || (rq.type != NBD_CMD_WRITE && more_input(t))) &&
		    hand_over(t)) {
			flush_out(t);
			pthread_mutex_unlock(&t->read_lock);
			leading = false;
		}
		/* Going on reading with a request already waiting: hold the
		 * reply back until the batch ends. */
		corking = leading && t->in_len - t->in_pos >= NBD_REQUEST_SIZE ? t : NULL;

		handle(t, w, &rq);
		corking = NULL;
		put_big(w);
	}
	free(w->buf);
	w->buf = NULL;
	return NULL;
}

int nbd_transmission(struct nbd_conn *c)
{
	struct tx *t = calloc(1, sizeof(*t));
	unsigned n;
	int r;

	if (t == NULL)
		return -ENOMEM;
	t->c = c;
	pthread_mutex_init(&t->lock, NULL);
	pthread_mutex_init(&t->read_lock, NULL);
	pthread_mutex_init(&t->send_lock, NULL);
	pthread_cond_init(&t->room, NULL);
	t->workers[0].t = t;

	/* This thread is the first worker; the others start when needed.
	 * It returns after closing was set by the thread that read last,
	 * which started any thread there is before that. */
	(void)worker_main(&t->workers[0]);
	pthread_mutex_lock(&t->lock);
	n = t->nthreads;
	pthread_mutex_unlock(&t->lock);
	for (unsigned i = 0; i < n; i++)
		pthread_join(t->tids[i], NULL);
	if (!c->exp->readonly)
		(void)qk_flush(c->img);
	/* A failed send ends the reading too (its shutdown(), or no buffer
	 * for a payload): it is the reason. */
	r = gone(t) ? t->send_error : t->result;
	pthread_cond_destroy(&t->room);
	pthread_mutex_destroy(&t->send_lock);
	pthread_mutex_destroy(&t->read_lock);
	pthread_mutex_destroy(&t->lock);
	free(t);
	return r;
}
