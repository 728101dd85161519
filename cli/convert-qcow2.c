/*
 * convert-qcow2.c - "qcowkit convert -O qcow2": copy an image's guest
 * content into a new (or, with -n, an existing) qcow2 image through the
 * library's write path.
 *
 * Design note. Workers (-m N threads) share a cursor over the guest space
 * and take pieces of up to CHUNK bytes, aligned to the target's clusters;
 * zero runs that the target already reads as zero are skipped without
 * reading. For each piece a worker reads the source, and compares it,
 * block by block (-S bytes, default 4 KiB, as qemu-img; whole clusters
 * with -c), with what the target reads there now (its backing file with
 * -B, its old content with -n; nothing to read for a fresh target, which
 * reads as zeros):
 *   - the same: nothing is written (-B writes only what differs);
 *   - all zero: the block is made zero (zero clusters in v3);
 *   - otherwise the data is written: runs of blocks in one qk_pwrite()
 *     (the library completes partial clusters, so a cluster is allocated
 *     when any of its blocks holds data, a subcluster with extended L2),
 *     or each cluster through qk_write_compressed(), which
 *     compresses in the calling thread, so -m workers compress on -m cores
 *     at once.
 * -S 0 turns the comparison off (every cluster is written as data) except
 * over a backing file. Pieces finish in any order, as with qemu-img -W;
 * the result is the same. The library orders its own metadata writes, and
 * qk_close() flushes. As with qemu-img, the target's default cache mode is
 * "unsafe": nothing is synced (syncs would make the copy wait for the disk
 * several times over); -t writeback or none make the flushes real.
 *
 * SPDX-License-Identifier: MIT
 */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"

#define CHUNK (2u << 20)

struct job {
	const struct convert_qcow2 *a;
	qk_image *dst;
	uint64_t size, cs;
	uint64_t unit;            /* bytes judged at once: -S blocks, or clusters
	                           * when compressing (absolute multiples) */
	bool baseline_zero;       /* the target reads as zeros before we write */
	bool compare;             /* skip clusters that already read the same */

	pthread_mutex_t lock;     /* guards everything below */
	uint64_t cursor;
	uint64_t data_end;        /* the source holds data up to here */
	bool failed;
	char errmsg[1024];
	struct cli_progress prog;
	uint64_t done;
};

static void fail(struct job *j, const char *what, int r)
{
	pthread_mutex_lock(&j->lock);
	if (!j->failed) {
		j->failed = true;
		snprintf(j->errmsg, sizeof j->errmsg, "%s", r < 0 ? qk_last_error() : what);
	}
	pthread_mutex_unlock(&j->lock);
}

static bool is_zero(const uint8_t *buf, size_t len)
{
	return len == 0 || (buf[0] == 0 && memcmp(buf, buf + 1, len - 1) == 0);
}

/* Does `img` read as zeros over all of [off, off+len)? */
static int reads_zero(qk_image *img, uint64_t off, uint64_t len, uint64_t *run)
{
	struct qk_extent ext;
	int r = qk_block_status(img, off, len, &ext);

	if (r < 0)
		return r;
	*run = ext.length;
	return (ext.flags & QK_EXTENT_ZERO) != 0;
}

/*
 * Take the next piece at the cursor. Lock held. Zero runs are skipped
 * when the target already reads as zeros there (a fresh target without
 * backing, or the backing file reads zero too). Returns true with
 * [*off, *off + *len), or false at the end or after a failure.
 */
static bool next_piece(struct job *j, uint64_t *off, uint64_t *len)
{
	while (!j->failed && j->cursor < j->size) {
		uint64_t at = j->cursor, run = 0, brun = 0;
		int z = 0;

		/* One block status call per source extent, not per piece. */
		if (at >= j->data_end && (j->compare || j->baseline_zero)) {
			z = reads_zero(j->a->src, at, j->size - at, &run);
			if (z == 0)
				j->data_end = at + run;
		}

		if (z > 0 && !j->baseline_zero) {
			/* Over a backing file or old content: skip only where
			 * that reads zero as well. */
			int bz = reads_zero(j->dst, at, run, &brun);

			if (bz < 0)
				z = bz;
			else
				run = bz ? brun : 0;
		}
		if (z < 0) {
			j->failed = true;
			snprintf(j->errmsg, sizeof j->errmsg, "%s", qk_last_error());
			return false;
		}
		if (z > 0 && j->a->sparse != 0) {
			/* Whole target clusters only (or up to the end). */
			uint64_t end = at + run == j->size ? j->size : (at + run) / j->cs * j->cs;

			if (end > at) {
				j->done += end - at;
				j->cursor = end;
				continue;
			}
		}
		uint64_t piece = CHUNK > j->cs ? CHUNK : j->cs;
		uint64_t end = (at / piece + 1) * piece;

		*off = at;
		*len = (end < j->size ? end : j->size) - at;
		j->cursor = at + *len;
		return true;
	}
	return false;
}

/* Write clusters [s, e) of the piece at `off` plainly, or each compressed. */
static int write_data(struct job *j, const uint8_t *buf, uint64_t off, uint64_t s, uint64_t e)
{
	if (!j->a->compress)
		return qk_pwrite(j->dst, buf + s, (size_t)(e - s), off + s);
	for (uint64_t c = s; c < e; c += j->cs) {
		uint64_t n = e - c < j->cs ? e - c : j->cs;
		int r = qk_write_compressed(j->dst, buf + c, (size_t)n, off + c);

		if (r < 0)
			return r;
	}
	return 0;
}

static int do_piece(struct job *j, uint8_t *sbuf, uint8_t *bbuf, uint64_t off, uint64_t len)
{
	int r = qk_pread(j->a->src, sbuf, (size_t)len, off);

	if (r < 0)
		return r;
	if (j->compare && !j->baseline_zero && (r = qk_pread(j->dst, bbuf, (size_t)len, off)) < 0)
		return r;
	uint64_t run = 0;          /* start of the pending data run */
	bool in_run = false;
	for (uint64_t c = 0; c < len;) {
		uint64_t n = j->unit - (off + c) % j->unit;
		const uint8_t *s = sbuf + c;
		bool write = false, zero = false;

		if (n > len - c)
			n = len - c;
		if (!j->compare)
			write = true;
		else if (j->baseline_zero ? is_zero(s, n) : memcmp(s, bbuf + c, n) == 0)
			write = false;
		else if (is_zero(s, n))
			zero = true;
		else
			write = true;
		if (write && !in_run) {
			run = c;
			in_run = true;
		} else if (!write && in_run) {
			if ((r = write_data(j, sbuf, off, run, c)) < 0)
				return r;
			in_run = false;
		}
		if (zero && (r = qk_write_zeroes(j->dst, off + c, n, QK_ZERO_MAY_UNMAP)) < 0)
			return r;
		c += n;
	}
	return in_run ? write_data(j, sbuf, off, run, len) : 0;
}

static void *worker(void *arg)
{
	struct job *j = arg;
	uint64_t piece = CHUNK > j->cs ? CHUNK : j->cs;
	uint8_t *sbuf = malloc(piece), *bbuf = malloc(piece);
	uint64_t off, len;

	if (sbuf == NULL || bbuf == NULL) {
		fail(j, "out of memory", 0);
		goto out;
	}
	for (;;) {
		pthread_mutex_lock(&j->lock);
		bool more = next_piece(j, &off, &len);
		pthread_mutex_unlock(&j->lock);
		if (!more)
			break;
		int r = do_piece(j, sbuf, bbuf, off, len);

		if (r < 0) {
			fail(j, NULL, r);
			break;
		}
		pthread_mutex_lock(&j->lock);
		j->done += len;
		progress_print(&j->prog, j->size ? (float)(100.0 * (double)j->done / (double)j->size) : 100, 0);
		pthread_mutex_unlock(&j->lock);
	}
out:
	free(sbuf);
	free(bbuf);
	return NULL;
}

/* Refuse a target data file (its name as stored in the target) that the
 * source reads. Returns 0 or -1 after a message. */
static int check_data_file(const struct convert_qcow2 *a, const char *name)
{
	char *path = cli_sibling_path(a->dst_path, name);
	int r = cli_check_target(a->src, path);

	free(path);
	return r;
}

/* Create the target as qemu-img convert does: the source's size, the -o
 * options, -B/-F as its backing file. Returns 0 or -1 after a message. */
static int create_target(const struct convert_qcow2 *a, uint64_t size)
{
	struct qk_create_options o;
	struct cli_create_opts *h = cli_create_opts_parse(QK_FORMAT_QCOW2, a->olist, &o);
	int r;

	if (h == NULL)
		return -1;
	o.size = size;
	if (a->backing != NULL) {
		if (o.backing_file != NULL) {
			cli_error("-B and -o backing_file are mutually exclusive");
			cli_create_opts_free(h);
			return -1;
		}
		o.backing_file = a->backing;
		o.backing_format = a->backing_fmt;
	}
	if (o.backing_file != NULL && o.backing_format == NULL) {
		cli_error("Use of backing file requires explicit backing format");
		cli_create_opts_free(h);
		return -1;
	}
	/* Creating the data file empties it: not one the source reads. */
	if (o.data_file != NULL && check_data_file(a, o.data_file) < 0) {
		cli_create_opts_free(h);
		return -1;
	}
	r = qk_create(a->dst_path, &o);
	cli_create_opts_free(h);
	if (r < 0) {
		cli_lib_error(r);
		return -1;
	}
	return 0;
}

/*
 * --bitmaps: each persistent bitmap of the source, added to the target
 * with its granularity and enabled or disabled as it is, then filled by a
 * merge, as qemu-img convert --bitmaps does once the data is copied (so
 * the copy itself dirties nothing). Inconsistent ones are skipped with a
 * warning (--skip-broken-bitmaps; without it convert refused them
 * before). Returns 0, or -1 after a message.
 */
static int copy_bitmaps(const struct convert_qcow2 *a, qk_image *dst)
{
	const struct qk_bitmap *list;
	size_t n = 0;
	int r = qk_list_bitmaps(a->src, &list, &n);

	for (size_t i = 0; r >= 0 && i < n; i++) {
		const struct qk_bitmap *b = &list[i];
		char *esc = cli_escape(b->name);

		if (b->flags & QK_BITMAP_IN_USE) {
			fprintf(stderr, "qcowkit: warning: Skipping inconsistent bitmap '%s'\n", esc);
		} else if ((r = qk_bitmap_add(dst, b->name, b->granularity,
					      b->flags & QK_BITMAP_AUTO ? 0 : QK_BITMAP_ADD_DISABLED)) < 0) {
			cli_error("Failed to create bitmap %s: %s", esc, cli_lib_message());
		} else if ((r = qk_bitmap_merge(dst, b->name, a->src, b->name)) < 0) {
			cli_error("Failed to populate bitmap %s: %s", esc, cli_lib_message());
			qk_bitmap_remove(dst, b->name);
		}
		free(esc);
	}
	if (r < 0 && n == 0)
		cli_lib_error(r);
	return r < 0 ? -1 : 0;
}

int convert_qcow2(const struct convert_qcow2 *a)
{
	struct job j;
	struct qk_info info = { .struct_size = sizeof info };
	int r, ret = CLI_EXIT_FAILURE;

	memset(&j, 0, sizeof j);
	j.a = a;
	j.size = qk_get_size(a->src);
	pthread_mutex_init(&j.lock, NULL);
	if (!a->skip_create && create_target(a, j.size) < 0)
		goto out;
	if (cli_open(a->dst_path, QK_FORMAT_QCOW2, QK_OPEN_RDWR | a->open_flags, &j.dst) < 0)
		goto out;
	if ((r = qk_get_info(j.dst, &info)) < 0) {
		cli_lib_error(r);
		goto out;
	}
	if (info.format != QK_FORMAT_QCOW2) {
		cli_error("'%s' is not a qcow2 image", a->dst_path);
		goto out;
	}
	/* An existing target (-n) may keep its data in a file the source
	 * reads (the caller checked the image file itself). */
	if (info.data_file != NULL && check_data_file(a, info.data_file) < 0)
		goto out;
	if (a->bitmaps && info.qcow2_version < 3) {
		cli_error("Format driver 'qcow2' does not support bitmaps");
		goto out;
	}
	if (qk_get_size(j.dst) < j.size) {
		cli_error("output file is smaller than input file");
		goto out;
	}
	j.cs = info.cluster_size;
	j.baseline_zero = (!a->skip_create || a->target_is_zero) && info.backing_file == NULL;
	j.compare = a->sparse != 0 || info.backing_file != NULL;
	j.unit = a->compress || a->sparse == 0 ? j.cs : a->sparse;
	progress_init(&j.prog, a->progress && !a->quiet, 1.0f);
	progress_print(&j.prog, 0, 100);
	if (cli_run_progress(a->workers, worker, &j, &j.prog, &j.failed) < 0)
		goto out;
	if (j.failed) {
		cli_error("error while writing '%s': %s", a->dst_path, j.errmsg);
		goto out;
	}
	if (a->bitmaps && copy_bitmaps(a, j.dst) < 0)
		goto out;
	r = qk_close(j.dst);
	j.dst = NULL;
	if (r < 0) {
		cli_error("error while closing '%s': %s", a->dst_path, qk_last_error());
		goto out;
	}
	ret = CLI_EXIT_OK;
out:
	qk_close(j.dst);
	pthread_mutex_destroy(&j.lock);
	return ret;
}
