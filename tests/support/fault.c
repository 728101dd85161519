/*
 * Fault backend: wraps another backend (usually a memory file) and injects
 * errors and power cuts, for the tests that walk every I/O point of a
 * workload (tests/fault).
 *
 * Design note. The wrapped file is the *volatile* view: what a process
 * reads back while the machine runs (the page cache). Next to it the
 * controller keeps the *durable* image: the bytes storage would hold after
 * a power cut, as of the last sync that completed. Every operation that
 * changes the file since then is kept in a redo log, in order; a completed
 * sync applies the log to the durable image and empties it. So:
 *
 * - pwrite, discard (punch hole), zero_range and set_size are all "writes"
 *   (counted together, numbered from 1): each changes the volatile view at
 *   once and the durable image only at the next completed sync. discard
 *   and zero_range are logged as the zeros they leave; set_size as a
 *   truncation or zero extension. A failed sync applies nothing.
 * - A power cut "at write N" freezes the durable image at the moment write
 *   N is issued: the writes logged since the last sync are lost (their
 *   number and order do not matter: none reaches storage), or, in the
 *   `keep_pending` variant (a process crash with the kernel alive), all of
 *   them land. Write N itself lands in part, torn at a sector boundary
 *   (QK__FAULT_SECTOR): only the sectors wholly inside its first
 *   `torn_bytes` bytes are kept; 0 keeps nothing, `torn_bytes` of at least
 *   its length keeps it whole (a sector is atomic: an 8-byte header update
 *   lands whole or not at all). Writes other than pwrite (set_size,
 *   discard, zero_range) never land at the cut. From the cut on, every
 *   operation fails with -EIO ("power cut"), so the library's later
 *   actions change nothing.
 * - An error injection fails the Nth read, write or sync (1-based, counted
 *   per kind) with a chosen errno, once or for every later one of that
 *   kind too (a full disk). A failed operation changes nothing.
 * - Operations are counted whether or not they fail; counting starts when
 *   the file is opened, so a workload run twice with the same seed meets
 *   the same points.
 *
 * The controller outlives the files it opens (the image handle closes its
 * file), so the harness reads the durable image after the handle is gone.
 * One lock guards the controller: every call may run concurrently.
 */
#include "support.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum log_kind { LOG_WRITE, LOG_ZERO, LOG_SIZE };

struct log_rec {
	enum log_kind kind;
	uint64_t off, len;          /* LOG_SIZE: the new size in off */
	uint8_t *data;              /* LOG_WRITE */
};

struct qk__fault {
	pthread_mutex_t lock;
	uint64_t count[QK__FAULT_NKINDS];
	/* error injection, per kind: nth == 0 is off */
	struct {
		uint64_t nth;
		int err;
		bool sticky;
	} fail[QK__FAULT_NKINDS];
	uint64_t injected;
	/* power cut */
	uint64_t cut_at;            /* write number, 0 = none */
	uint64_t torn_bytes;
	bool keep_pending;
	bool cut;                   /* it happened */
	/* the durable image and the writes since the last completed sync */
	uint8_t *durable;
	size_t dlen, dcap;
	struct log_rec *log;
	size_t nlog, logcap;
	bool opened;
	/* the volatile view, copied when the file is closed */
	uint8_t *vol;
	size_t vlen;
};

struct fault_file {
	struct qk__fault *ft;
	struct qk__file *inner;
};

struct qk__fault *qk__fault_new(void)
{
	struct qk__fault *ft = calloc(1, sizeof *ft);
	if (!ft) {
		qk__err(ENOMEM, "out of memory");
		return NULL;
	}
	pthread_mutex_init(&ft->lock, NULL);
	return ft;
}

static void clear_log(struct qk__fault *ft)
{
	for (size_t i = 0; i < ft->nlog; i++)
		free(ft->log[i].data);
	ft->nlog = 0;
}

void qk__fault_free(struct qk__fault *ft)
{
	if (!ft)
		return;
	clear_log(ft);
	free(ft->log);
	free(ft->durable);
	free(ft->vol);
	pthread_mutex_destroy(&ft->lock);
	free(ft);
}

void qk__fault_fail(struct qk__fault *ft, enum qk__fault_kind kind, uint64_t nth, int err,
		    bool sticky)
{
	pthread_mutex_lock(&ft->lock);
	ft->fail[kind].nth = nth;
	ft->fail[kind].err = err;
	ft->fail[kind].sticky = sticky;
	pthread_mutex_unlock(&ft->lock);
}

void qk__fault_cut(struct qk__fault *ft, uint64_t nth_write, uint64_t torn_bytes,
		   bool keep_pending)
{
	pthread_mutex_lock(&ft->lock);
	ft->cut_at = nth_write;
	ft->torn_bytes = torn_bytes;
	ft->keep_pending = keep_pending;
	pthread_mutex_unlock(&ft->lock);
}

uint64_t qk__fault_count(struct qk__fault *ft, enum qk__fault_kind kind)
{
	pthread_mutex_lock(&ft->lock);
	uint64_t n = ft->count[kind];
	pthread_mutex_unlock(&ft->lock);
	return n;
}

uint64_t qk__fault_injected(struct qk__fault *ft)
{
	pthread_mutex_lock(&ft->lock);
	uint64_t n = ft->injected;
	pthread_mutex_unlock(&ft->lock);
	return n;
}

bool qk__fault_was_cut(struct qk__fault *ft)
{
	pthread_mutex_lock(&ft->lock);
	bool c = ft->cut;
	pthread_mutex_unlock(&ft->lock);
	return c;
}

const void *qk__fault_durable(struct qk__fault *ft, size_t *len)
{
	*len = ft->dlen;
	return ft->durable;
}

const void *qk__fault_volatile(struct qk__fault *ft, size_t *len)
{
	*len = ft->vlen;
	return ft->vol;
}

/* ---- the durable image ---------------------------------------------------- */

static int durable_size(struct qk__fault *ft, uint64_t size)
{
	if (size > SIZE_MAX / 2)
		return -EFBIG;
	if (size > ft->dcap) {
		size_t cap = ft->dcap ? ft->dcap : 65536;
		while (cap < size)
			cap *= 2;
		uint8_t *p = realloc(ft->durable, cap);
		if (!p)
			return -ENOMEM;
		ft->durable = p;
		ft->dcap = cap;
	}
	if (size > ft->dlen)
		memset(ft->durable + ft->dlen, 0, (size_t)size - ft->dlen);
	ft->dlen = (size_t)size;
	return 0;
}

/* Apply one logged change (or its first `limit` bytes) to the durable image. */
static int apply(struct qk__fault *ft, const struct log_rec *r, uint64_t limit)
{
	uint64_t len = qk_min_u64(r->len, limit);
	int ret;
	switch (r->kind) {
	case LOG_SIZE:
		return durable_size(ft, r->off);
	case LOG_WRITE:
		if (len == 0)
			return 0;
		if (r->off + len > ft->dlen && (ret = durable_size(ft, r->off + len)) < 0)
			return ret;
		memcpy(ft->durable + r->off, r->data, (size_t)len);
		return 0;
	case LOG_ZERO:
		if (r->off < ft->dlen)
			memset(ft->durable + r->off, 0, (size_t)qk_min_u64(len, ft->dlen - r->off));
		return 0;
	}
	return 0;
}

static int log_add(struct qk__fault *ft, enum log_kind kind, uint64_t off, uint64_t len,
		   const void *data)
{
	if (ft->nlog == ft->logcap) {
		size_t cap = ft->logcap ? 2 * ft->logcap : 64;
		struct log_rec *p = realloc(ft->log, cap * sizeof *p);
		if (!p)
			return qk__err(ENOMEM, "out of memory");
		ft->log = p;
		ft->logcap = cap;
	}
	struct log_rec *r = &ft->log[ft->nlog];
	r->kind = kind;
	r->off = off;
	r->len = len;
	r->data = NULL;
	if (kind == LOG_WRITE && len) {
		if (!(r->data = malloc(len)))
			return qk__err(ENOMEM, "out of memory");
		memcpy(r->data, data, len);
	}
	ft->nlog++;
	return 0;
}

/*
 * The power cut, as write `r` (not logged) is issued: the durable image
 * keeps what the last sync left (or, keep_pending, every logged write) and
 * the whole sectors of r's first torn_bytes bytes.
 */
static void power_cut(struct qk__fault *ft, const struct log_rec *r)
{
	if (ft->keep_pending)
		for (size_t i = 0; i < ft->nlog; i++)
			apply(ft, &ft->log[i], UINT64_MAX);
	clear_log(ft);
	if (r->kind == LOG_WRITE && ft->torn_bytes >= r->len) {
		apply(ft, r, UINT64_MAX);
	} else if (r->kind == LOG_WRITE && ft->torn_bytes) {
		uint64_t end = (r->off + ft->torn_bytes) & ~(uint64_t)(QK__FAULT_SECTOR - 1);
		uint64_t start = (r->off + QK__FAULT_SECTOR - 1) & ~(uint64_t)(QK__FAULT_SECTOR - 1);
		if (end > start) {
			struct log_rec part = *r;
			part.off = start;
			part.data = r->data + (start - r->off);
			apply(ft, &part, end - start);
		}
	}
	ft->cut = true;
}

/* ---- the backend ------------------------------------------------------------ */

/*
 * Count an operation of `kind` and decide its fate: 0 to go on, or the
 * injected negative errno (recorded with a message naming the file). For
 * writes, `r` describes the change, for the power cut. Lock held.
 */
static int gate(struct qk__fault *ft, struct qk__file *f, enum qk__fault_kind kind,
		const struct log_rec *r, const char *what)
{
	/* The message names the request as the POSIX backend's do. */
	char req[160];
	if (r && r->kind == LOG_SIZE)
		snprintf(req, sizeof req, "%s of %s to %llu bytes", what, f->path,
			 (unsigned long long)r->off);
	else if (r)
		snprintf(req, sizeof req, "%s of %llu bytes at offset %llu of %s", what,
			 (unsigned long long)r->len, (unsigned long long)r->off, f->path);
	else
		snprintf(req, sizeof req, "%s of %s", what, f->path);
	if (ft->cut)
		return qk__err(EIO, "%s failed: %s (power cut)", req, strerror(EIO));
	uint64_t n = ++ft->count[kind];
	if (kind == QK__FAULT_WRITE && ft->cut_at && n == ft->cut_at) {
		power_cut(ft, r);
		return qk__err(EIO, "%s failed: %s (power cut)", req, strerror(EIO));
	}
	uint64_t nth = ft->fail[kind].nth;
	if (nth && (n == nth || (ft->fail[kind].sticky && n > nth))) {
		int e = ft->fail[kind].err;
		ft->injected++;
		return qk__err(e, "%s failed: %s", req, strerror(e));
	}
	return 0;
}

static int fault_pread(struct qk__file *f, void *buf, size_t len, uint64_t off)
{
	struct fault_file *ff = f->priv;
	pthread_mutex_lock(&ff->ft->lock);
	struct log_rec r = { LOG_WRITE, off, len, NULL };
	int ret = gate(ff->ft, f, QK__FAULT_READ, &r, "read");
	pthread_mutex_unlock(&ff->ft->lock);
	return ret < 0 ? ret : ff->inner->ops->pread(ff->inner, buf, len, off);
}

/* A change: gate it, make it in the volatile view, log it for the
 * durable one. The lock is held throughout, so the log's order is the
 * order of the volatile changes. */
enum change_op { CH_WRITE, CH_SIZE, CH_DISCARD, CH_ZERO };

static int change(struct qk__file *f, enum change_op op, const void *buf, uint64_t len,
		  uint64_t off, const char *what)
{
	struct fault_file *ff = f->priv;
	struct qk__fault *ft = ff->ft;
	enum log_kind kind = op == CH_WRITE ? LOG_WRITE : op == CH_SIZE ? LOG_SIZE : LOG_ZERO;
	struct log_rec r = { kind, off, len, (uint8_t *)buf };
	pthread_mutex_lock(&ft->lock);
	int ret = gate(ft, f, QK__FAULT_WRITE, &r, what);
	if (ret == 0) {
		struct qk__file *in = ff->inner;
		switch (op) {
		case CH_WRITE:
			ret = in->ops->pwrite(in, buf, (size_t)len, off);
			break;
		case CH_SIZE:
			ret = in->ops->set_size(in, off);
			break;
		case CH_DISCARD:
			ret = in->ops->discard ? in->ops->discard(in, off, len) : -ENOTSUP;
			break;
		case CH_ZERO:
			ret = in->ops->zero_range ? in->ops->zero_range(in, off, len) : -ENOTSUP;
			break;
		}
	}
	if (ret == 0)
		ret = log_add(ft, kind, off, len, buf);
	pthread_mutex_unlock(&ft->lock);
	return ret;
}

static int fault_pwrite(struct qk__file *f, const void *buf, size_t len, uint64_t off)
{
	return change(f, CH_WRITE, buf, len, off, "write");
}

static int fault_set_size(struct qk__file *f, uint64_t size)
{
	return change(f, CH_SIZE, NULL, 0, size, "resize");
}

static int fault_discard(struct qk__file *f, uint64_t off, uint64_t len)
{
	return change(f, CH_DISCARD, NULL, len, off, "discard");
}

static int fault_zero_range(struct qk__file *f, uint64_t off, uint64_t len)
{
	return change(f, CH_ZERO, NULL, len, off, "zero range");
}

static int fault_sync(struct qk__file *f)
{
	struct fault_file *ff = f->priv;
	struct qk__fault *ft = ff->ft;
	pthread_mutex_lock(&ft->lock);
	int ret = gate(ft, f, QK__FAULT_SYNC, NULL, "sync");
	if (ret == 0)
		ret = ff->inner->ops->sync(ff->inner);
	for (size_t i = 0; ret == 0 && i < ft->nlog; i++)
		ret = apply(ft, &ft->log[i], UINT64_MAX);
	if (ret < 0 && ret != -EIO && ret != -ENOSPC)
		ret = qk__err(-ret, "sync of %s failed: %s", f->path, strerror(-ret));
	if (ret == 0)
		clear_log(ft);
	pthread_mutex_unlock(&ft->lock);
	return ret;
}

static int fault_get_size(struct qk__file *f, uint64_t *size)
{
	struct fault_file *ff = f->priv;
	if (qk__fault_was_cut(ff->ft))
		return qk__err(EIO, "size of %s: %s (power cut)", f->path, strerror(EIO));
	return ff->inner->ops->get_size(ff->inner, size);
}

static int fault_allocated_size(struct qk__file *f, uint64_t *bytes)
{
	struct fault_file *ff = f->priv;
	if (!ff->inner->ops->allocated_size)
		return ff->inner->ops->get_size(ff->inner, bytes);
	return ff->inner->ops->allocated_size(ff->inner, bytes);
}

static int fault_block_status(struct qk__file *f, uint64_t off, uint64_t len, bool *is_data,
			      uint64_t *pnum)
{
	struct fault_file *ff = f->priv;
	if (!ff->inner->ops->block_status) {
		*is_data = true;
		*pnum = len;
		return 0;
	}
	return ff->inner->ops->block_status(ff->inner, off, len, is_data, pnum);
}

/* Keep the volatile view for the harness (what a process that lived on
 * would read), then close the wrapped file. */
static void fault_close(struct qk__file *f)
{
	struct fault_file *ff = f->priv;
	struct qk__fault *ft = ff->ft;
	struct qk__file *in = ff->inner;
	uint64_t size;
	pthread_mutex_lock(&ft->lock);
	free(ft->vol);
	ft->vol = NULL;
	ft->vlen = 0;
	if (in->ops->get_size(in, &size) == 0 && size < SIZE_MAX / 2 &&
	    (ft->vol = malloc(size ? (size_t)size : 1)) != NULL) {
		if (in->ops->pread(in, ft->vol, (size_t)size, 0) == 0) {
			ft->vlen = (size_t)size;
		} else {
			free(ft->vol);
			ft->vol = NULL;
		}
	}
	pthread_mutex_unlock(&ft->lock);
	qk__file_close(in);
	free(ff);
}

static const struct qk__io_ops fault_ops = {
	.pread = fault_pread,
	.pwrite = fault_pwrite,
	.sync = fault_sync,
	.get_size = fault_get_size,
	.set_size = fault_set_size,
	.allocated_size = fault_allocated_size,
	.block_status = fault_block_status,
	.discard = fault_discard,
	.zero_range = fault_zero_range,
	.close = fault_close,
};

int qk__file_open_fault(struct qk__fault *ft, struct qk__file *inner, struct qk__file **out)
{
	uint64_t size;
	int ret = qk__file_get_size(inner, &size);
	if (ret < 0)
		goto fail;
	pthread_mutex_lock(&ft->lock);
	if (ft->opened) {
		pthread_mutex_unlock(&ft->lock);
		ret = qk__err(EBUSY, "a fault controller serves one file");
		goto fail;
	}
	ret = durable_size(ft, size);
	if (ret == 0 && size)
		ret = inner->ops->pread(inner, ft->durable, (size_t)size, 0);
	if (ret == 0)
		ft->opened = true;
	pthread_mutex_unlock(&ft->lock);
	if (ret < 0) {
		ret = qk__err(-ret, "cannot copy %s: %s", inner->path, strerror(-ret));
		goto fail;
	}
	struct qk__file *f = calloc(1, sizeof *f);
	struct fault_file *ff = calloc(1, sizeof *ff);
	char *p = strdup(inner->path);
	if (!f || !ff || !p) {
		free(f);
		free(ff);
		free(p);
		ret = qk__err(ENOMEM, "out of memory");
		goto fail;
	}
	ff->ft = ft;
	ff->inner = inner;
	f->ops = &fault_ops;
	f->priv = ff;
	f->path = p;
	*out = f;
	return 0;
fail:
	qk__file_close(inner);
	return ret;
}
