/*
 * commit.c - qk_commit() and qk_rebase(): an image's data moved down its
 * backing chain, and its backing file changed, as qemu-img 7.2 commit and
 * rebase do. Both are built on the public calls of the handles they are
 * given (reads through the chain, writes, block status, qk_make_empty(),
 * qk_set_backing()); what they add is which ranges to copy, and the order
 * that makes a power cut harmless (each function's comment in qcowkit.h).
 */
#include "internal.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#define COMMIT_CHUNK (4u << 20) /* bytes read and written at a time */
#define REBASE_CHUNK (2u << 20) /* qemu-img rebase's IO_BUF_SIZE */
#define SECTOR 512u

static void progress(qk_progress_fn fn, void *opaque, uint64_t done, uint64_t total)
{
	if (fn)
		fn(opaque, done, total);
}

/* ---- commit ------------------------------------------------------------------- */

struct commit {
	qk_image *top, *base;
	uint32_t depth;       /* of the layer committed into, below top */
	uint64_t zend;        /* short_end() */
	uint64_t size;        /* of top */
	uint64_t gran;        /* chunk size */
	bool zero_ok;         /* base can hold zero clusters */
	uint8_t *buf;
};

/* The end of the shortest layer strictly between top and depth: past it
 * the guest reads zeros whatever lies below, which QEMU counts as
 * allocated above the base (it commits them as zeros). */
static uint64_t short_end(qk_image *top, uint32_t depth)
{
	uint64_t end = UINT64_MAX;
	qk_image *l = top->backing;
	for (uint32_t d = 1; l && d < depth; d++, l = l->backing)
		end = qk_min_u64(end, l->size);
	return end;
}

/* What QEMU's commit (a mirror job) works in: the base's cluster size
 * within [4 KiB, 64 KiB], 64 KiB when it has none (raw); and whether
 * zeros may go in as zero clusters (not on a version 2 image with a
 * backing file, which has none). */
static int granularity(struct commit *c)
{
	struct qk_info info = { .struct_size = sizeof info };
	int ret = qk_get_info(c->base, &info);
	if (ret < 0)
		return ret;
	c->zero_ok = info.qcow2_version != 2 || !info.backing_file;
	c->gran = 65536;
	if (info.cluster_size > 0)
		c->gran = info.cluster_size < 4096 ? 4096 : qk_min_u64(info.cluster_size, 65536);
	return 0;
}

/*
 * Classify [off, off+n) of top: *above when a layer above the base
 * allocates part of it (or it lies past a shorter layer between), *zero
 * when all of it reads as zeros. *next is where the run that starts at
 * off ends, when it is not above the base. Returns 0 or a negative errno.
 */
static int classify(const struct commit *c, uint64_t off, uint64_t n, bool *above, bool *zero,
		    uint64_t *next)
{
	uint64_t end = off + n;
	*above = false;
	*zero = true;
	*next = end;
	for (bool first = true; off < end; first = false) {
		struct qk_extent e;
		uint64_t lim = off < c->zend && c->zend < c->size ? c->zend : c->size;
		int ret = qk_block_status(c->top, off, qk_min_u64(lim, end) - off, &e);
		if (ret < 0)
			return ret;
		bool up = off >= c->zend || ((e.flags & QK_EXTENT_PRESENT) && e.depth < c->depth);
		if (first && !up)
			*next = off + e.length;
		*above |= up;
		*zero &= (e.flags & QK_EXTENT_ZERO) != 0;
		off += e.length;
	}
	return 0;
}

/* Copy [off, off+len) from top into base. */
static int copy_range(const struct commit *c, uint64_t off, uint64_t len)
{
	while (len > 0) {
		size_t n = (size_t)qk_min_u64(len, COMMIT_CHUNK);
		int ret = qk_pread(c->top, c->buf, n, off);
		if (ret == 0)
			ret = qk_pwrite(c->base, c->buf, n, off);
		if (ret < 0)
			return ret;
		off += n;
		len -= n;
	}
	return 0;
}

/*
 * Write into base every chunk (aligned) of which the layers above `depth`
 * allocate some part, as QEMU's mirror job does: a chunk that reads as
 * zeros throughout as zeros, any other as its data read through top.
 * Adjacent data chunks are copied together, up to COMMIT_CHUNK at a time.
 */
static int commit_data(struct commit *c, const struct qk_commit_options *o)
{
	uint64_t off = 0, run = 0, run_len = 0;     /* data chunks not copied yet */
	int ret = granularity(c);
	/* grown durably first: a raw base's size is its guest size, and a
	 * cut must leave it the old or the new one */
	if (ret == 0 && c->base->size < c->size) {
		ret = qk_resize(c->base, c->size, 0);
		if (ret == 0)
			ret = qk_flush(c->base);
	}
	while (ret == 0 && off < c->size) {
		uint64_t n = qk_min_u64(c->gran, c->size - off), next;
		bool above, zero;
		ret = classify(c, off, n, &above, &zero, &next);
		bool data = ret == 0 && above && !(zero && c->zero_ok);
		if (ret == 0 && run_len && (!data || run + run_len != off ||
					    run_len + n > COMMIT_CHUNK)) {
			ret = copy_range(c, run, run_len);
			run_len = 0;
		}
		if (ret < 0)
			break;
		if (!above) {
			/* skip the whole chunks the run not above the base covers */
			off = next - next % c->gran > off ? next - next % c->gran : off + n;
			continue;
		}
		if (data) {
			if (!run_len)
				run = off;
			run_len += n;
		} else {
			ret = qk_write_zeroes(c->base, off, n, 0);
		}
		off += n;
		progress(o->progress, o->progress_opaque, off, c->size);
	}
	if (ret == 0 && run_len)
		ret = copy_range(c, run, run_len);
	if (ret == 0)
		progress(o->progress, o->progress_opaque, c->size, c->size);
	return ret == 0 ? qk_flush(c->base) : ret;
}

QK_EXPORT void qk_commit_options_init(struct qk_commit_options *opts)
{
	if (!opts)
		return;
	memset(opts, 0, sizeof *opts);
	opts->struct_size = sizeof *opts;
}

QK_EXPORT int qk_commit(qk_image *top, qk_image *layer, qk_image *base,
			const struct qk_commit_options *opts)
{
	struct qk_commit_options o;
	struct commit c = { .top = top, .base = base };
	static const char api[] = "qk_commit";

	qk__api_enter(api);
	qk_commit_options_init(&o);
	if (opts) {
		int ret = qk__struct_size_ok(opts->struct_size, sizeof o, "qk_commit_options");
		if (ret < 0)
			return ret;
		qk__struct_in(&o, sizeof o, opts);
	}
	if (!top || !layer || !base)
		return qk__err(EINVAL, "top, layer and base are required");
	if (o.flags & ~(uint32_t)QK_COMMIT_EMPTY)
		return qk__err(EINVAL, "unknown flags 0x%x", o.flags);
	qk_image *l = top->backing;
	for (c.depth = 1; l && l != layer; l = l->backing)
		c.depth++;
	if (!l)
		return qk__err(EINVAL, "'%s' is not in the backing chain of '%s'", layer->filename,
			       top->filename);
	if (base == top || base == layer)
		return qk__err(EINVAL, "base must be a read-write handle of its own");
	if (!(base->flags & QK_OPEN_RDWR))
		return qk__err(EPERM, "'%s' was opened read-only", base->filename);
	if ((o.flags & QK_COMMIT_EMPTY) && c.depth != 1)
		return qk__err(EINVAL, "only an image committed into its own backing file is emptied");
	if ((o.flags & QK_COMMIT_EMPTY) && !(top->flags & QK_OPEN_RDWR))
		return qk__err(EPERM, "'%s' was opened read-only", top->filename);
	c.size = top->size;
	c.zend = short_end(top, c.depth);
	c.buf = malloc(COMMIT_CHUNK);
	if (!c.buf)
		return qk__err(ENOMEM, "out of memory");
	progress(o.progress, o.progress_opaque, 0, c.size);
	int ret = commit_data(&c, &o);
	free(c.buf);
	if (ret == 0 && (o.flags & QK_COMMIT_EMPTY)) {
		ret = qk_make_empty(top);
		if (ret == 0)
			ret = qk_flush(top);
	}
	return qk__api_resume(ret, api);
}

/* ---- rebase ------------------------------------------------------------------- */

struct rebase {
	qk_image *img, *nb;
	uint32_t flags;
	uint64_t cluster;     /* of img, for QK_REBASE_COMPRESS */
	uint8_t *old, *nu, *cbuf;
};

/* Write [off, off+len) of the old view (held in r->old from `base` on)
 * into img: as is, or compressed, the whole clusters around it. */
static int put_old(const struct rebase *r, uint64_t base, uint64_t off, uint64_t len)
{
	if (!(r->flags & QK_REBASE_COMPRESS) || !r->cluster)
		return qk_pwrite(r->img, r->old + (off - base), len, off);
	uint64_t cs = r->cluster, size = r->img->size;
	for (uint64_t c = off - off % cs; c < off + len; c += cs) {
		size_t n = (size_t)qk_min_u64(cs, size - c);
		int ret = qk_pread(r->img, r->cbuf, n, c);
		if (ret == 0)
			ret = qk_write_compressed(r->img, r->cbuf, n, c);
		if (ret < 0)
			return ret;
	}
	return 0;
}

/* Compare the old and new views over [off, off+n) by sectors, writing
 * into img the runs that differ. */
static int write_diffs(const struct rebase *r, uint64_t off, uint64_t n)
{
	bool whole = (r->flags & QK_REBASE_COMPRESS) && r->cluster;
	uint64_t i = 0, done_to = 0;
	while (i < n) {
		uint64_t s = qk_min_u64(SECTOR, n - i);
		bool diff = memcmp(r->old + i, r->nu + i, s) != 0;
		uint64_t j = i + s;
		while (j < n) {
			uint64_t t = qk_min_u64(SECTOR, n - j);
			if ((memcmp(r->old + j, r->nu + j, t) != 0) != diff)
				break;
			j += t;
		}
		/* compressed, a cluster is written once, whatever its runs */
		if (diff && off + j > done_to) {
			int ret = put_old(r, off, off + i, j - i);
			if (ret < 0)
				return ret;
			done_to = whole ? off + j + r->cluster - 1 - (off + j - 1) % r->cluster
					: off + j;
		}
		i = j;
	}
	return 0;
}

/* Read [off, off+n) of the new backing file (zeros without one, and past
 * its end). */
static int read_new(const struct rebase *r, uint64_t off, uint64_t n)
{
	uint64_t size = r->nb ? r->nb->size : 0, have = off < size ? qk_min_u64(size - off, n) : 0;
	memset(r->nu + have, 0, n - have);
	return have ? qk_pread(r->nb, r->nu, have, off) : 0;
}

/* Copy into img what differs between its old view and the new one. */
static int copy_diffs(struct rebase *r, const struct qk_rebase_options *o)
{
	uint64_t size = r->img->size, off = 0;
	int ret = 0;
	progress(o->progress, o->progress_opaque, 0, size);
	while (ret == 0 && off < size) {
		struct qk_extent e;
		ret = qk_block_status(r->img, off, qk_min_u64(REBASE_CHUNK, size - off), &e);
		if (ret == 0 && !(e.depth == 0 && (e.flags & QK_EXTENT_PRESENT))) {
			ret = qk_pread(r->img, r->old, e.length, off);
			if (ret == 0)
				ret = read_new(r, off, e.length);
			if (ret == 0)
				ret = write_diffs(r, off, e.length);
		}
		if (ret == 0)
			off += e.length;
		progress(o->progress, o->progress_opaque, off, size);
	}
	return ret;
}

QK_EXPORT void qk_rebase_options_init(struct qk_rebase_options *opts)
{
	if (!opts)
		return;
	memset(opts, 0, sizeof *opts);
	opts->struct_size = sizeof *opts;
}

QK_EXPORT int qk_rebase(qk_image *img, qk_image *new_backing, const char *name,
			const char *format, const struct qk_rebase_options *opts)
{
	struct qk_rebase_options o;
	struct rebase r = { .img = img, .nb = new_backing };
	static const char api[] = "qk_rebase";
	int ret = 0;

	qk__api_enter(api);
	qk_rebase_options_init(&o);
	if (opts) {
		ret = qk__struct_size_ok(opts->struct_size, sizeof o, "qk_rebase_options");
		if (ret < 0)
			return ret;
		qk__struct_in(&o, sizeof o, opts);
	}
	if (!img)
		return qk__err(EINVAL, "image is required");
	if (o.flags & ~(uint32_t)(QK_REBASE_UNSAFE | QK_REBASE_COMPRESS | QK_REBASE_COPY_ONLY))
		return qk__err(EINVAL, "unknown flags 0x%x", o.flags);
	if (new_backing && (!name || !*name))
		return qk__err(EINVAL, "a new backing file needs its name");
	if (!(img->flags & QK_OPEN_RDWR))
		return qk__err(EPERM, "'%s' was opened read-only", img->filename);
	if (!img->drv->set_backing)
		return qk__err(ENOTSUP, "'%s' is a %s image: it has no backing file",
			       img->filename, img->drv->name);
	r.flags = o.flags;
	if (!(o.flags & QK_REBASE_UNSAFE)) {
		struct qk_info info = { .struct_size = sizeof info };
		ret = qk_get_info(img, &info);
		r.cluster = info.cluster_size;
		r.old = malloc(REBASE_CHUNK);
		r.nu = malloc(REBASE_CHUNK);
		r.cbuf = malloc(r.cluster ? r.cluster : 1);
		if (ret == 0 && (!r.old || !r.nu || !r.cbuf))
			ret = qk__err(ENOMEM, "out of memory");
		if (ret == 0)
			ret = copy_diffs(&r, &o);
		free(r.old);
		free(r.nu);
		free(r.cbuf);
		if (ret == 0)
			ret = qk_flush(img);
	}
	if (ret == 0 && !(o.flags & QK_REBASE_COPY_ONLY))
		ret = qk_set_backing(img, name, format);
	return qk__api_resume(ret, api);
}
