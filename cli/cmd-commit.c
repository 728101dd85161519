/*
 * commit: write an image's changes into a file below it in its backing
 * chain, as qemu-img commit (7.2).
 *   qcowkit commit [-f FMT] [-b BASE] [-d] [-p] [-q] [-t CACHE] [-r RATE] FILE
 *
 * Every range that a layer above the base allocates is read through the
 * top image and written into the base (zero ranges as zeros); the base
 * grows first when it is smaller than the top. Then, without -d and
 * without -b (which implies -d, as in qemu-img), the top is emptied so
 * that it reads as its backing file again.
 *
 * Power cuts: the base only receives data the top (or a layer between)
 * also holds, and the top is emptied only after the base is flushed; so
 * a cut at any point leaves the guest view of the top unchanged.
 *
 * Locks: the base is opened read-write with its own chain; the top (and
 * its chain) is opened force-share, so that its read of the base does not
 * conflict with our own write lock on it.
 */
#include "cli.h"

#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define COMMIT_CHUNK (4u << 20) /* bytes read and written at a time */

struct commit_args {
	const char *file, *base;
	qk_format fmt;
	bool drop, quiet, progress, direct;
};

/* Whether `name` names the backing file `b` of layer `l`, as QEMU's
 * bdrv_find_backing_image: the name l stores, or the same file as `name`
 * taken relative to l's directory. */
static bool names_backing(qk_image *l, qk_image *b, const char *name)
{
	struct qk_info info = { .struct_size = sizeof info };
	qk_image *layer = NULL;
	if (qk_get_info(l, &info) == 0 && info.backing_file && strcmp(info.backing_file, name) == 0)
		return true;
	char *path = cli_sibling_path(qk_get_filename(l), name);
	bool same = qk_uses_file(b, path, &layer) == QK_USES_IMAGE && layer == b;
	free(path);
	return same;
}

/* The layer of top's chain that `a->base` names (or top's backing file),
 * with its depth. Returns 0, or 1 after qemu-img's message. */
static int find_base(qk_image *top, const struct commit_args *a, qk_image **base,
		     uint32_t *depth)
{
	qk_image *l = top, *b = qk_get_backing(top);
	if (!b) {
		cli_error("Image does not have a backing file");
		return 1;
	}
	*depth = 1;
	while (a->base && b && !names_backing(l, b, a->base)) {
		l = b;
		b = qk_get_backing(b);
		(*depth)++;
	}
	if (!b) {
		cli_error("Did not find '%s' in the backing chain of '%s'", a->base, a->file);
		return 1;
	}
	*base = b;
	return 0;
}

/* Copy [off, off+len) from top into base through buf. */
static int copy_range(qk_image *top, qk_image *base, uint8_t *buf, uint64_t off, uint64_t len)
{
	while (len > 0) {
		size_t n = len < COMMIT_CHUNK ? (size_t)len : COMMIT_CHUNK;
		int ret = qk_pread(top, buf, n, off);
		if (ret == 0)
			ret = qk_pwrite(base, buf, n, off);
		if (ret < 0)
			return ret;
		off += n;
		len -= n;
	}
	return 0;
}

/* The end of the shortest layer strictly between top and depth: past it
 * the guest reads zeros whatever lies below, which QEMU counts as
 * allocated above the base (it commits them as zeros). */
static uint64_t short_end(qk_image *top, uint32_t depth)
{
	uint64_t end = UINT64_MAX;
	qk_image *l = qk_get_backing(top);
	for (uint32_t d = 1; l && d < depth; d++, l = qk_get_backing(l))
		if (qk_get_size(l) < end)
			end = qk_get_size(l);
	return end;
}

/* What QEMU's commit (a mirror job) works in: the base's cluster size
 * within [4 KiB, 64 KiB], 64 KiB when it has none (raw). */
static uint64_t granularity(qk_image *base, bool *zero_flag)
{
	struct qk_info info = { .struct_size = sizeof info };
	uint64_t g = 65536;
	*zero_flag = false;
	if (qk_get_info(base, &info) == 0)
		*zero_flag = info.qcow2_version != 2 || !info.backing_file;
	if (info.cluster_size > 0)
		g = info.cluster_size < 4096 ? 4096 : info.cluster_size > 65536 ? 65536
										 : info.cluster_size;
	return g;
}

struct chunk {
	qk_image *top;
	uint32_t depth;       /* of the base */
	uint64_t zend;        /* short_end() */
	uint64_t size;        /* of the top */
};

/*
 * Classify [off, off+n) of the top: *above when a layer above the base
 * allocates part of it (or it lies past a shorter layer between), *zero
 * when all of it reads as zeros. *next is where the run that starts at
 * off ends, when it is not above the base. Returns 0 or a negative errno.
 */
static int classify(const struct chunk *c, uint64_t off, uint64_t n, bool *above, bool *zero,
		    uint64_t *next)
{
	uint64_t end = off + n;
	*above = false;
	*zero = true;
	*next = end;
	for (bool first = true; off < end; first = false) {
		struct qk_extent e;
		uint64_t lim = off < c->zend && c->zend < c->size ? c->zend : c->size;
		int ret = qk_block_status(c->top, off, lim - off, &e);
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

/*
 * Write into base every chunk of `g` bytes (aligned) of which the layers
 * above `depth` allocate some part, as QEMU's mirror job does: a chunk
 * that reads as zeros throughout as zeros, any other as its data read
 * through the top.
 */
static int commit_data(qk_image *top, qk_image *base, uint32_t depth, struct cli_progress *pr)
{
	struct chunk c = { top, depth, short_end(top, depth), qk_get_size(top) };
	bool zero_flag;
	uint64_t off = 0, g = granularity(base, &zero_flag);
	uint8_t *buf = cli_xmalloc(COMMIT_CHUNK);
	int ret = 0;
	if (qk_get_size(base) < c.size)
		ret = qk_resize(base, c.size, 0);
	while (ret == 0 && off < c.size) {
		uint64_t n = g < c.size - off ? g : c.size - off, next;
		bool above, zero;
		ret = classify(&c, off, n, &above, &zero, &next);
		if (ret == 0 && !above) {
			/* skip whole chunks the run not above the base covers */
			off = next - next % g > off ? next - next % g : off + n;
			continue;
		}
		if (ret == 0 && zero && zero_flag)
			ret = qk_write_zeroes(base, off, n, 0);
		else if (ret == 0)
			ret = copy_range(top, base, buf, off, n);
		off += n;
		progress_print(pr, (float)off * 100 / (float)c.size, 0);
	}
	free(buf);
	if (ret == 0)
		ret = qk_flush(base);
	return ret;
}

/* Commit with the images open. Returns the exit status. */
static int commit(const struct commit_args *a)
{
	uint32_t dflag = a->direct ? QK_OPEN_DIRECT : 0, depth = 0;
	bool empty = !a->drop && !a->base;
	qk_image *top = NULL, *layer = NULL, *base = NULL;
	struct cli_progress pr;
	int ret;

	if (cli_open(a->file, a->fmt, QK_OPEN_FORCE_SHARE | dflag | (empty ? QK_OPEN_RDWR : 0),
		     &top) < 0)
		return 1;
	if (find_base(top, a, &layer, &depth) != 0) {
		qk_close(top);
		return 1;
	}
	if (cli_open(qk_get_filename(layer), qk_get_format(layer), QK_OPEN_RDWR | dflag,
		     &base) < 0) {
		qk_close(top);
		return 1;
	}
	progress_init(&pr, a->progress, 1.0f);
	progress_print(&pr, 0, 0);
	ret = commit_data(top, base, depth, &pr);
	if (ret == 0 && empty)
		ret = qk_make_empty(top);
	if (ret == 0)
		ret = qk_flush(top);
	progress_end(&pr);
	if (ret < 0)
		cli_lib_error(ret);
	int r1 = qk_close(base), r2 = qk_close(top);
	if (ret == 0 && (r1 < 0 || r2 < 0)) {
		cli_lib_error(r1 < 0 ? r1 : r2);
		ret = -1;
	}
	return ret < 0 ? 1 : 0;
}

int cmd_commit(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct cli_opts o = { .cmd = "commit", .usage_code = CLI_EXIT_FAILURE };
	struct commit_args a = { 0 };
	uint64_t rate;
	int c;

	while ((c = cli_getopt(&o, argc, argv, ":f:b:dpqt:r:h", longopts)) > 0) {
		switch (c) {
		case 'b':
			a.base = optarg;
			break;
		case 'd':
			a.drop = true;
			break;
		case 'p':
			a.progress = true;
			break;
		case 'q':
			a.quiet = true;
			break;
		case 't':
			if (cli_parse_cache(optarg, &a.direct) < 0) {
				cli_error("Invalid cache option: %s", optarg);
				return 1;
			}
			break;
		case 'r': /* accepted as qemu-img does; one local copy needs no limit */
			if (cli_cvtnum("rate limit", optarg, 0, INT64_MAX, &rate) < 0)
				return 1;
			break;
		}
	}
	if ((a.file = cli_one_image(&o, c, argc, argv)) == NULL)
		return o.status;
	if (cli_parse_format(o.fmtname, &a.fmt) < 0)
		return 1;
	if (a.quiet)
		a.progress = false;
	int ret = commit(&a);
	if (ret == 0 && !a.quiet)
		printf("Image committed.\n");
	return ret;
}
