/*
 * request.c - the NBD transmission phase: requests in, replies out.
 *
 * Design note. The thread that ran the handshake becomes the connection's
 * reader: it reads one request (header and, for WRITE, the payload), puts
 * it on the queue and reads the next, so a client's pipelined requests run
 * at once on a pool of NBD_WORKERS threads and are answered in whatever
 * order they finish. Invariants:
 * - At most NBD_MAX_INFLIGHT requests are queued or running, and their
 *   READ/WRITE payloads add up to at most NBD_INFLIGHT_BYTES (one request
 *   of any allowed size may always run alone): the reader waits for room
 *   before allocating, so a client cannot make the server hold more.
 * - A reply is built whole and written with one nbd_send_iov() call under
 *   send_lock, so replies never interleave on the wire.
 * - The reader never touches the image; workers do, concurrently, through
 *   the library's thread-safe calls.
 * - When the reader stops (DISC, EOF, a protocol violation, or shutdown()
 *   of the socket by the server), queued requests are still run and
 *   answered; then the workers exit, a writable image is flushed, and the
 *   connection ends. A failed send shuts the socket down, which ends the
 *   reader too.
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
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "conn.h"

#define NBD_WORKERS        8
#define NBD_MAX_INFLIGHT   32
#define NBD_INFLIGHT_BYTES (64u << 20)
/* Chunks of one structured READ reply (holes and data alternating); the
 * rest of a longer read goes out as one data chunk. */
#define NBD_READ_MAX_CHUNKS 64
/* Library extents looked at for one BLOCK_STATUS request; the reply then
 * covers less than asked, which the protocol allows. */
#define NBD_BS_MAX_EXTENTS 65536

struct request {
	struct request *next;
	uint16_t flags;
	uint16_t type;
	uint64_t cookie;
	uint64_t offset;
	uint32_t length;
	size_t charge;          /* bytes counted against NBD_INFLIGHT_BYTES */
	uint8_t *payload;       /* WRITE data */
};

struct tx {
	struct nbd_conn *c;
	pthread_mutex_t lock;
	pthread_cond_t work;    /* workers: a request is queued, or closing */
	pthread_cond_t room;    /* reader: a request finished */
	struct request *head, *tail;
	unsigned inflight;      /* queued + running */
	size_t bytes;           /* sum of their charges */
	bool closing;
	pthread_mutex_t send_lock;
	bool send_failed;
};

/* ---- replies ---------------------------------------------------------------- */

static void send_locked(struct tx *t, struct iovec *iov, int n)
{
	pthread_mutex_lock(&t->send_lock);
	if (!t->send_failed && nbd_send_iov(t->c->fd, iov, n) < 0) {
		t->send_failed = true;
		/* Wake the reader: nothing more can be answered. */
		shutdown(t->c->fd, SHUT_RDWR);
	}
	pthread_mutex_unlock(&t->send_lock);
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
	send_locked(t, &iov, 1);
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
		send_locked(t, &iov, 1);
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
	send_locked(t, &iov, 1);
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

static void cmd_read(struct tx *t, const struct request *rq)
{
	struct nbd_conn *c = t->c;
	struct piece p[NBD_READ_MAX_CHUNKS];
	uint8_t hdr[NBD_READ_MAX_CHUNKS][NBD_CHUNK_HEADER_SIZE + 12];
	struct iovec iov[2 * NBD_READ_MAX_CHUNKS];
	uint8_t *buf = NULL;
	int n, k = 0, r;

	if (rq->length == 0) {
		/* Nothing to read: a NONE chunk (or an empty simple reply). */
		if (c->structured)
			put_chunk(hdr[0], rq->cookie, NBD_REPLY_FLAG_DONE,
				  NBD_REPLY_TYPE_NONE, 0);
		else
			put_simple(hdr[0], rq->cookie, 0);
		iov[0].iov_base = hdr[0];
		iov[0].iov_len = c->structured ? NBD_CHUNK_HEADER_SIZE
					       : NBD_SIMPLE_REPLY_SIZE;
		send_locked(t, iov, 1);
		return;
	}
	buf = malloc(rq->length);
	if (buf == NULL) {
		reply_err(t, rq, NBD_ENOMEM, "out of memory for a %u-byte read",
			  rq->length);
		return;
	}
	if (!c->structured || (rq->flags & NBD_CMD_FLAG_DF)) {
		p[0].off = rq->offset;
		p[0].len = rq->length;
		p[0].hole = false;
		n = 1;
	} else {
		n = split_read(t, rq->offset, rq->length, p);
	}
	for (int i = 0; i < n; i++) {
		if (p[i].hole)
			continue;
		r = qk_pread(c->img, buf + (p[i].off - rq->offset), p[i].len,
			     p[i].off);
		if (r < 0) {
			reply_lib_err(t, rq, r);
			free(buf);
			return;
		}
	}
	if (!c->structured) {
		put_simple(hdr[0], rq->cookie, 0);
		iov[0].iov_base = hdr[0];
		iov[0].iov_len = NBD_SIMPLE_REPLY_SIZE;
		iov[1].iov_base = buf;
		iov[1].iov_len = rq->length;
		send_locked(t, iov, 2);
		free(buf);
		return;
	}
	for (int i = 0; i < n; i++) {
		uint16_t fl = i == n - 1 ? NBD_REPLY_FLAG_DONE : 0;
		uint8_t *h = hdr[i];

		if (p[i].hole) {
			put_chunk(h, rq->cookie, fl, NBD_REPLY_TYPE_OFFSET_HOLE, 12);
			nbd_put64(h + NBD_CHUNK_HEADER_SIZE, p[i].off);
			nbd_put32(h + NBD_CHUNK_HEADER_SIZE + 8, (uint32_t)p[i].len);
			iov[k].iov_base = h;
			iov[k++].iov_len = NBD_CHUNK_HEADER_SIZE + 12;
		} else {
			put_chunk(h, rq->cookie, fl, NBD_REPLY_TYPE_OFFSET_DATA,
				  8 + (uint32_t)p[i].len);
			nbd_put64(h + NBD_CHUNK_HEADER_SIZE, p[i].off);
			iov[k].iov_base = h;
			iov[k++].iov_len = NBD_CHUNK_HEADER_SIZE + 8;
			iov[k].iov_base = buf + (p[i].off - rq->offset);
			iov[k++].iov_len = p[i].len;
		}
	}
	send_locked(t, iov, k);
	free(buf);
}

/* One extent of a BLOCK_STATUS chunk being built. */
struct bs_ext {
	uint32_t len;
	uint32_t flags;
};

struct bs_list {
	struct bs_ext *e;
	size_t n;
};

static void bs_add(struct bs_list *l, uint64_t len, uint32_t flags)
{
	if (l->n > 0 && l->e[l->n - 1].flags == flags) {
		l->e[l->n - 1].len += (uint32_t)len;
		return;
	}
	l->e[l->n].len = (uint32_t)len;
	l->e[l->n].flags = flags;
	l->n++;
}

/* Chunk of one context: header, context id, extents (sent from `wire`). */
static uint8_t *bs_chunk(const struct request *rq, uint32_t id,
			 const struct bs_list *l, bool done, size_t *size)
{
	size_t len = 4 + 8 * l->n;
	uint8_t *w = malloc(NBD_CHUNK_HEADER_SIZE + len);

	if (w == NULL)
		return NULL;
	put_chunk(w, rq->cookie, done ? NBD_REPLY_FLAG_DONE : 0,
		  NBD_REPLY_TYPE_BLOCK_STATUS, (uint32_t)len);
	nbd_put32(w + NBD_CHUNK_HEADER_SIZE, id);
	for (size_t i = 0; i < l->n; i++) {
		nbd_put32(w + NBD_CHUNK_HEADER_SIZE + 4 + 8 * i, l->e[i].len);
		nbd_put32(w + NBD_CHUNK_HEADER_SIZE + 8 + 8 * i, l->e[i].flags);
	}
	*size = NBD_CHUNK_HEADER_SIZE + len;
	return w;
}

static void cmd_block_status(struct tx *t, const struct request *rq)
{
	struct nbd_conn *c = t->c;
	bool one = rq->flags & NBD_CMD_FLAG_REQ_ONE;
	size_t cap = one ? 1 : NBD_BS_MAX_EXTENTS;
	struct bs_list alloc = { NULL, 0 }, depth = { NULL, 0 };
	uint8_t *w1 = NULL, *w2 = NULL;
	struct iovec iov[2];
	uint64_t pos = rq->offset, end = rq->offset + rq->length;
	size_t raw = 0;
	int r, k = 0;

	alloc.e = malloc(cap * sizeof(*alloc.e));
	depth.e = malloc(cap * sizeof(*depth.e));
	if (alloc.e == NULL || depth.e == NULL) {
		reply_err(t, rq, NBD_ENOMEM, "out of memory for block status");
		goto out;
	}
	while (pos < end && raw < cap) {
		struct qk_extent e;
		uint64_t len;

		r = qk_block_status(c->img, pos, end - pos, &e);
		if (r < 0) {
			if (raw > 0)
				break;   /* answer for what is known */
			reply_lib_err(t, rq, r);
			goto out;
		}
		len = e.length;
		if (len == 0 || len > end - pos)
			len = end - pos;
		bs_add(&alloc, len,
		       (e.flags & QK_EXTENT_DATA ? 0 : NBD_STATE_HOLE) |
		       (e.flags & QK_EXTENT_ZERO ? NBD_STATE_ZERO : 0));
		bs_add(&depth, len,
		       e.flags & QK_EXTENT_PRESENT ? e.depth + 1 : 0);
		pos += len;
		raw++;
	}
	if (c->ctx_allocation) {
		size_t sz;
		w1 = bs_chunk(rq, NBD_CTX_ID_ALLOCATION, &alloc, !c->ctx_depth, &sz);
		if (w1 == NULL)
			goto nomem;
		iov[k].iov_base = w1;
		iov[k++].iov_len = sz;
	}
	if (c->ctx_depth) {
		size_t sz;
		w2 = bs_chunk(rq, NBD_CTX_ID_DEPTH, &depth, true, &sz);
		if (w2 == NULL)
			goto nomem;
		iov[k].iov_base = w2;
		iov[k++].iov_len = sz;
	}
	send_locked(t, iov, k);
	goto out;
nomem:
	reply_err(t, rq, NBD_ENOMEM, "out of memory for block status");
out:
	free(w1);
	free(w2);
	free(alloc.e);
	free(depth.e);
}

/* After a write-type command: FUA makes it durable before the reply. */
static void finish_write(struct tx *t, const struct request *rq, int r)
{
	if (r >= 0 && (rq->flags & NBD_CMD_FLAG_FUA))
		r = qk_flush(t->c->img);
	if (r < 0)
		reply_lib_err(t, rq, r);
	else
		reply_ok(t, rq);
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

/* Validate and run one request, and answer it. */
static void handle(struct tx *t, const struct request *rq)
{
	struct nbd_conn *c = t->c;
	uint64_t off = rq->offset, len = rq->length;
	bool past_end = off > c->size || len > c->size - off;
	bool writes = rq->type == NBD_CMD_WRITE || rq->type == NBD_CMD_TRIM ||
		      rq->type == NBD_CMD_WRITE_ZEROES;
	uint32_t zflags;
	int r;

	if (rq->type > NBD_CMD_BLOCK_STATUS || rq->type == NBD_CMD_CACHE) {
		reply_err(t, rq, NBD_EINVAL, "invalid request type (%u) received",
			  rq->type);
		return;
	}
	if (rq->flags & ~allowed_flags(c, rq->type)) {
		reply_err(t, rq, NBD_EINVAL, "unsupported flags for %s (got 0x%x)",
			  cmd_name(rq->type), rq->flags);
		return;
	}
	if (writes && c->exp->readonly) {
		reply_err(t, rq, NBD_EPERM, "%s on a read-only export",
			  cmd_name(rq->type));
		return;
	}
	if (rq->type != NBD_CMD_FLUSH && past_end) {
		reply_err(t, rq, rq->type == NBD_CMD_WRITE ||
			  rq->type == NBD_CMD_WRITE_ZEROES ? NBD_ENOSPC : NBD_EINVAL,
			  "operation past EOF; From: %llu, Len: %llu, Size: %llu",
			  (unsigned long long)off, (unsigned long long)len,
			  (unsigned long long)c->size);
		return;
	}

	switch (rq->type) {
	case NBD_CMD_READ:
		if (len > NBD_MAX_PAYLOAD) {
			reply_err(t, rq, NBD_EINVAL, "len (%llu) is larger than "
				  "max len (%u)", (unsigned long long)len,
				  NBD_MAX_PAYLOAD);
			return;
		}
		cmd_read(t, rq);
		return;
	case NBD_CMD_WRITE:
		r = len ? qk_pwrite(c->img, rq->payload, len, off) : 0;
		finish_write(t, rq, r);
		return;
	case NBD_CMD_FLUSH:
		r = qk_flush(c->img);
		if (r < 0)
			reply_lib_err(t, rq, r);
		else
			reply_ok(t, rq);
		return;
	case NBD_CMD_TRIM:
		r = len ? qk_discard(c->img, off, len) : 0;
		finish_write(t, rq, r);
		return;
	case NBD_CMD_WRITE_ZEROES:
		zflags = 0;
		if (!(rq->flags & NBD_CMD_FLAG_NO_HOLE))
			zflags |= QK_ZERO_MAY_UNMAP;
		if (rq->flags & NBD_CMD_FLAG_FAST_ZERO)
			zflags |= QK_ZERO_NO_FALLBACK;
		r = len ? qk_write_zeroes(c->img, off, len, zflags) : 0;
		if (r == -ENOTSUP && (rq->flags & NBD_CMD_FLAG_FAST_ZERO)) {
			reply_err(t, rq, NBD_ENOTSUP, "fast zero not possible here");
			return;
		}
		finish_write(t, rq, r);
		return;
	case NBD_CMD_BLOCK_STATUS:
		if (!c->ctx_allocation && !c->ctx_depth) {
			reply_err(t, rq, NBD_EINVAL, "CMD_BLOCK_STATUS not negotiated");
			return;
		}
		if (len == 0) {
			reply_err(t, rq, NBD_EINVAL, "zero-length block status");
			return;
		}
		cmd_block_status(t, rq);
		return;
	}
}

/* ---- the worker pool and the reader ------------------------------------------------ */

static void *worker(void *arg)
{
	struct tx *t = arg;

	pthread_mutex_lock(&t->lock);
	for (;;) {
		struct request *rq;

		while (t->head == NULL && !t->closing)
			pthread_cond_wait(&t->work, &t->lock);
		if (t->head == NULL)
			break;
		rq = t->head;
		t->head = rq->next;
		if (t->head == NULL)
			t->tail = NULL;
		pthread_mutex_unlock(&t->lock);

		handle(t, rq);

		pthread_mutex_lock(&t->lock);
		t->inflight--;
		t->bytes -= rq->charge;
		pthread_cond_signal(&t->room);
		free(rq->payload);
		free(rq);
	}
	pthread_mutex_unlock(&t->lock);
	return NULL;
}

/* Read requests and queue them until the client leaves. Returns as
 * nbd_transmission. */
static int read_requests(struct tx *t)
{
	struct nbd_conn *c = t->c;
	uint8_t h[NBD_REQUEST_SIZE];

	for (;;) {
		struct request *rq;
		size_t charge = 0;
		int r;

		r = nbd_recv_all(c->fd, h, sizeof(h));
		if (r < 0)
			return r == -EPIPE ? 0 : r;
		if (nbd_get32(h) != NBD_REQUEST_MAGIC)
			return -EPROTO;
		rq = calloc(1, sizeof(*rq));
		if (rq == NULL)
			return -ENOMEM;
		rq->flags = nbd_get16(h + 4);
		rq->type = nbd_get16(h + 6);
		rq->cookie = nbd_get64(h + 8);
		rq->offset = nbd_get64(h + 16);
		rq->length = nbd_get32(h + 24);

		if (rq->type == NBD_CMD_DISC) {
			free(rq);
			return 0;
		}
		if (rq->type == NBD_CMD_WRITE && rq->length > NBD_MAX_PAYLOAD) {
			/* The payload cannot be taken in: answer, then drop the
			 * connection, which is out of step now. */
			reply_err(t, rq, NBD_EINVAL, "len (%u) is larger than "
				  "max len (%u)", rq->length, NBD_MAX_PAYLOAD);
			free(rq);
			return -EPROTO;
		}
		if ((rq->type == NBD_CMD_READ || rq->type == NBD_CMD_WRITE) &&
		    rq->length <= NBD_MAX_PAYLOAD)
			charge = rq->length;

		pthread_mutex_lock(&t->lock);
		while (!t->send_failed &&
		       (t->inflight >= NBD_MAX_INFLIGHT ||
			(t->inflight > 0 && t->bytes + charge > NBD_INFLIGHT_BYTES)))
			pthread_cond_wait(&t->room, &t->lock);
		t->inflight++;
		t->bytes += charge;
		pthread_mutex_unlock(&t->lock);
		rq->charge = charge;

		if (rq->type == NBD_CMD_WRITE && rq->length > 0) {
			rq->payload = malloc(rq->length);
			r = rq->payload ? nbd_recv_all(c->fd, rq->payload,
						       rq->length) : -ENOMEM;
			if (r < 0) {
				pthread_mutex_lock(&t->lock);
				t->inflight--;
				t->bytes -= charge;
				pthread_mutex_unlock(&t->lock);
				free(rq->payload);
				free(rq);
				/* EOF inside a request breaks the protocol. */
				return r == -EPIPE ? -EPROTO : r;
			}
		}

		pthread_mutex_lock(&t->lock);
		if (t->tail)
			t->tail->next = rq;
		else
			t->head = rq;
		t->tail = rq;
		pthread_cond_signal(&t->work);
		pthread_mutex_unlock(&t->lock);
	}
}

int nbd_transmission(struct nbd_conn *c)
{
	struct tx t;
	pthread_t tids[NBD_WORKERS];
	unsigned n = 0;
	int r;

	memset(&t, 0, sizeof(t));
	t.c = c;
	pthread_mutex_init(&t.lock, NULL);
	pthread_mutex_init(&t.send_lock, NULL);
	pthread_cond_init(&t.work, NULL);
	pthread_cond_init(&t.room, NULL);
	for (; n < NBD_WORKERS; n++)
		if (pthread_create(&tids[n], NULL, worker, &t) != 0)
			break;
	if (n == 0) {
		r = -EAGAIN;
		goto out;
	}

	r = read_requests(&t);

	pthread_mutex_lock(&t.lock);
	t.closing = true;
	pthread_cond_broadcast(&t.work);
	pthread_mutex_unlock(&t.lock);
	for (unsigned i = 0; i < n; i++)
		pthread_join(tids[i], NULL);
	if (!c->exp->readonly)
		(void)qk_flush(c->img);
out:
	pthread_cond_destroy(&t.room);
	pthread_cond_destroy(&t.work);
	pthread_mutex_destroy(&t.send_lock);
	pthread_mutex_destroy(&t.lock);
	return r;
}
