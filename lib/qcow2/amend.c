/*
 * amend.c - changing an image's options in place, as qemu-img amend does
 * (QEMU's qcow2_amend_options): the version (upgrade; downgrade with the
 * zero clusters expanded), the refcount width, lazy refcounts, the virtual
 * size, and the external data file's name and raw flag.
 *
 * Design. Everything QEMU refuses on the way is checked before anything
 * changes (check_plan), in QEMU's order so that the first message is the
 * one QEMU gives; QEMU checks as it goes and can leave an image half
 * amended (a new refcount width, then "Cannot amend the backing file").
 * The steps then run in QEMU's order: upgrade, refcount width, data file,
 * lazy refcounts, size, downgrade.
 *
 * Power cuts, step by step:
 * - refcount width: the new blocks and table go past every cluster the
 *   image uses or names, and count exactly what the old ones count, less
 *   the old structure itself (free in the new one) and plus the new one;
 *   they are synced, then one write of header bytes 48..100 (table offset
 *   and clusters, the fields between as they are, refcount order), inside
 *   the first sector, switches to them. Before that write the old
 *   structure is in force (the new clusters are unreferenced bytes past
 *   what it counts); after it the new one, the old clusters free. The old
 *   structure is never written; QEMU allocates the new one in it and frees
 *   it afterwards, with the same outcome.
 * - downgrade: zero clusters are expanded in the order ordinary writes
 *   keep (refcounts, then the zeros, then the L2 entry), so a cut leaves a
 *   version 3 image with leaks at most; then the header cluster is written
 *   as version 2 in one write (QEMU's qcow2_update_header).
 * - upgrade: a snapshot table that version 3 would refuse is rewritten
 *   first (written and synced, then count and offset switched in one
 *   header write, then the old one freed); then the header cluster.
 * - lazy refcounts and the raw flag: one header field, synced; turning
 *   lazy refcounts off flushes and clears the dirty bit first.
 */
#include "qcow2/qcow2.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Refcounts read at a time while converting (a bounded buffer whatever the
 * width and cluster size). */
#define SCAN_CHUNK 65536
/* Bytes of new refcount blocks written at a time. */
#define WRITE_BATCH (1u << 20)
/* Progress units per step. */
#define STEP_UNITS 1000000ull

/* What the amend will do, from the options and the image. */
struct plan {
	uint32_t version;          /* after the amend */
	uint32_t order;            /* refcount order after the amend */
	bool lazy;                 /* lazy refcounts after the amend */
	uint64_t size;             /* new virtual size, 0: unchanged */
	const char *data_file;     /* new data file name ("" none), NULL: unchanged */
	bool raw_off;              /* clear the raw external data flag */
	bool backing;              /* compare the backing file and format */
	const char *backing_file, *backing_format;
	void (*progress)(void *, uint64_t, uint64_t);
	void *opaque;
	uint32_t steps, step;      /* long steps (refcounts, downgrade); the current */
};

/* Progress of the current step: done out of total. */
static void report(struct plan *p, uint64_t done, uint64_t total)
{
	if (!p->progress || !p->steps)
		return;
	uint64_t in = total ? qk_min_u64(done, total) * STEP_UNITS / total : STEP_UNITS;
	p->progress(p->opaque, p->step * STEP_UNITS + in, p->steps * STEP_UNITS);
}

/* Write the metadata caches back when they hold changes, each in its
 * order (a cache flushes what it depends on first, and syncs once): no
 * sync when nothing changed, as the steps write durably already and a
 * sync costs a disk round trip. Image lock held. */
static int flush_if_dirty(qk_image *img)
{
	struct qcow2 *q = qcow2_of(img);
	if (q->write_refused)
		return qk__qcow2_flush_locked(img);     /* says what was lost */
	int ret = qk__cache_flush(&q->l2_cache);
	if (ret == 0 && q->rt)
		ret = qk__cache_flush(&q->rb_cache);
	return ret;
}

static bool str_differs(const char *a, const char *b)
{
	return (a == NULL) != (b == NULL) || (a && strcmp(a, b) != 0);
}

/* ---- walking the tables ----------------------------------------------------------- */

/* Called for each L2 table of each L1 table (a table shared by several L1
 * tables comes once for each): 0 to go on, > 0 to stop the walk (returned),
 * or a negative errno. */
typedef int (*table_fn)(qk_image *img, void *ctx, uint64_t l1i, uint64_t l2_off);

/* The L2 table snapshot L1 entry e (index i) names, checked as the active
 * one's are; 0 when none. */
static int snapshot_l2(qk_image *img, uint64_t i, uint64_t e, uint64_t *t)
{
	struct qcow2 *q = qcow2_of(img);
	*t = e & L1E_OFFSET_MASK;
	if (e & L1E_RESERVED_MASK)
		return qk__qcow2_corrupt(img, "snapshot L1 entry %llu (0x%016llx) has reserved bits set",
					 (unsigned long long)i, (unsigned long long)e);
	if (*t && (*t & (q->cluster_size - 1)))
		return qk__qcow2_corrupt(img, "snapshot L2 table offset 0x%llx unaligned (L1 index %llu)",
					 (unsigned long long)*t, (unsigned long long)i);
	uint64_t size = q->file_size;
	if (*t && *t >= size && (qk__file_get_size(img->file, &size) < 0 || *t >= size))
		return qk__qcow2_corrupt(img, "snapshot L2 table at offset 0x%llx (L1 index %llu) lies "
					 "past the end of the file", (unsigned long long)*t,
					 (unsigned long long)i);
	return 0;
}

/* Every L2 table of the active image, then of every snapshot, through fn;
 * p (may be NULL) hears of the L1 entries done. Image lock held. */
static int walk_tables(qk_image *img, table_fn fn, void *ctx, struct plan *p)
{
	struct qcow2 *q = qcow2_of(img);
	uint64_t total = q->l1_size, done = 0, off;
	for (uint32_t s = 0; s < q->n_snapshots; s++)
		total += q->snapshots[s].l1_size;
	int ret = 0;
	for (uint32_t i = 0; ret == 0 && i < q->l1_size; i++, done++) {
		ret = qk__qcow2_l2_table(img, i, &off);
		if (ret == 0 && off)
			ret = fn(img, ctx, i, off);
		if (p && (i & 63) == 0)
			report(p, done, total);
	}
	for (uint32_t s = 0; ret == 0 && s < q->n_snapshots; s++) {
		uint64_t *l1;
		ret = qk__qcow2_snapshot_l1(img, &q->snapshots[s], &l1);
		for (uint32_t i = 0; ret == 0 && i < q->snapshots[s].l1_size; i++, done++) {
			ret = snapshot_l2(img, i, l1[i], &off);
			if (ret == 0 && off)
				ret = fn(img, ctx, i, off);
		}
		free(l1);
		if (p)
			report(p, done, total);
	}
	return ret;
}

/* table_fn: 1 when the table holds a compressed cluster. */
static int has_compressed(qk_image *img, void *ctx, uint64_t l1i, uint64_t l2_off)
{
	struct qcow2 *q = qcow2_of(img);
	uint64_t *t;
	(void)ctx;
	(void)l1i;
	int ret = qk__cache_get(&q->l2_cache, l2_off, (void **)&t);
	if (ret < 0)
		return ret;
	uint64_t n = q->cluster_size / q->l2_entry_size, step = q->l2_entry_size / 8;
	for (uint64_t j = 0; ret == 0 && j < n; j++)
		if (t[j * step] & QCOW_OFLAG_COMPRESSED)
			ret = 1;
	qk__cache_put(&q->l2_cache, l2_off);
	return ret;
}

/* ---- the refcount width ------------------------------------------------------------ */

/* A change of the refcount width (QEMU's qcow2_change_refcount_order). */
struct rc_change {
	uint32_t order;            /* the new refcount order */
	uint32_t eb;               /* log2 of refcounts per new block */
	uint64_t covered;          /* the old table covers clusters [0, covered) */
	uint64_t end;              /* every refcount left is in [0, end) */
	uint8_t *used;             /* per new range below `covered`: some refcount left */
	uint64_t *old;             /* the old structure's clusters, sorted */
	uint64_t n_old;
	uint64_t area, nb, tc;     /* the new structure: nb blocks, then tc table
	                            * clusters, from cluster `area` */
	uint64_t ranges;           /* new refcount table entries in use */
	bool old_shared;           /* an old structure cluster has other references */
};

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

/* The clusters of the current refcount structure, sorted, into rc->old,
 * and what the table covers. Refcounts loaded, image lock held. */
static int old_structure(qk_image *img, struct rc_change *rc)
{
	struct qcow2 *q = qcow2_of(img);
	uint32_t eb = q->cluster_bits + 3 - q->refcount_order;
	rc->old = malloc((q->rt_entries + q->rt_clusters) * sizeof *rc->old);
	if (!rc->old)
		return qk__err(ENOMEM, "out of memory");
	rc->n_old = 0;
	rc->covered = 0;
	for (uint32_t i = 0; i < q->rt_clusters; i++)
		rc->old[rc->n_old++] = (q->rt_offset >> q->cluster_bits) + i;
	for (uint64_t i = 0; i < q->rt_entries; i++) {
		if (!(q->rt[i] & ~RT_RESERVED_MASK))
			continue;
		rc->old[rc->n_old++] = (q->rt[i] & ~RT_RESERVED_MASK) >> q->cluster_bits;
		rc->covered = (i + 1) << eb;
	}
	qsort(rc->old, rc->n_old, sizeof *rc->old, cmp_u64);
	return 0;
}

/* Judge the refcounts v[0..n) of clusters first.. (see scan_refcounts). */
static int scan_chunk(qk_image *img, struct rc_change *rc, bool check, uint64_t first,
		      const uint64_t *v, uint64_t n, uint64_t *k)
{
	uint64_t bits = 1ull << rc->order;
	for (uint64_t i = 0; i < n; i++) {
		uint64_t c = first + i, x = v[i];
		if (!x)
			continue;
		if (check && bits < 64 && (x >> bits))
			return qk__err(EINVAL, "Cannot decrease refcount entry width to %u bits: Cluster "
				       "at offset %#llx has a refcount of %llu", (unsigned)bits,
				       (unsigned long long)(c << qcow2_of(img)->cluster_bits),
				       (unsigned long long)x);
		while (*k < rc->n_old && rc->old[*k] < c)
			(*k)++;
		if (*k < rc->n_old && rc->old[*k] == c && x-- > 1)
			rc->old_shared = true;  /* corrupt: left as it is */
		if (x) {
			rc->end = c + 1;
			rc->used[c >> rc->eb] = 1;
		}
	}
	return 0;
}

/*
 * Read every refcount the old blocks hold, in cluster order (a range
 * without a block holds none: skipped, so a crafted table entry far out
 * costs nothing). With `check` (narrowing), the first that the new width
 * cannot hold is refused with QEMU's message. Sets rc->end and rc->used
 * from what is left once the old structure's own clusters are counted
 * out. Image lock held.
 */
static int scan_refcounts(qk_image *img, struct rc_change *rc, bool check, struct plan *p)
{
	struct qcow2 *q = qcow2_of(img);
	uint32_t old_eb = q->cluster_bits + 3 - q->refcount_order;
	uint64_t k = 0, *v = malloc(SCAN_CHUNK * sizeof *v);
	free(rc->used);
	rc->used = calloc((rc->covered >> rc->eb) + 1, 1);
	if (!v || !rc->used) {
		free(v);
		return qk__err(ENOMEM, "out of memory");
	}
	rc->end = 0;
	int ret = 0;
	for (uint64_t r = 0; ret == 0 && r < rc->covered >> old_eb; r++) {
		if (!(q->rt[r] & ~RT_RESERVED_MASK))
			continue;
		for (uint64_t i = 0; ret == 0 && i < 1ull << old_eb; i += SCAN_CHUNK) {
			uint64_t first = (r << old_eb) + i, n = qk_min_u64(SCAN_CHUNK, (1ull << old_eb) - i);
			ret = qk__qcow2_get_refcounts(img, first, n, v);
			if (ret == 0)
				ret = scan_chunk(img, rc, check, first, v, n, &k);
		}
		if (p)
			report(p, r + 1, 2 * (rc->covered >> old_eb));
	}
	free(v);
	return ret;
}

/* Where the new structure goes: the first clusters past the file, the
 * refcounts and anything metadata names (a corrupt entry past the end of
 * the file must not come to point into it); how many blocks (one per range
 * that keeps a refcount, every range the structure meets) and table
 * clusters it takes. Image lock held. */
static int plan_layout(qk_image *img, struct rc_change *rc)
{
	struct qcow2 *q = qcow2_of(img);
	uint64_t cs = q->cluster_size, fsize, hit;
	int ret = qk__file_get_size(img->file, &fsize);
	if (ret < 0)
		return ret;
	uint64_t area = qk_max_u64(rc->end, (qk_max_u64(fsize, q->file_size) + cs - 1) >> q->cluster_bits);
	uint64_t below_used = 0, counted = 0;   /* used ranges wholly below `area` */
	for (;;) {
		uint64_t ra = area >> rc->eb, nb = 0, tc = 0, total;
		for (; counted < ra; counted++)
			below_used += counted <= (rc->covered >> rc->eb) && rc->used[counted];
		for (int iter = 0; iter < 64; iter++) {
			total = area + nb + tc;
			uint64_t ranges = ((total - 1) >> rc->eb) + 1;
			uint64_t nnb = below_used + ranges - ra, ntc = (ranges * 8 + cs - 1) / cs;
			if (nnb == nb && ntc == tc)
				break;
			nb = nnb;
			tc = ntc;
		}
		total = area + nb + tc;
		if (tc * cs > MAX_REFTABLE_BYTES)
			return qk__err(EFBIG, "This operation would make the refcount table grow beyond "
				       "the maximum size supported by QEMU, aborting");
		if (total << q->cluster_bits > MAX_HOST_OFFSET)
			return qk__err(EFBIG, "'%s' is full: host offsets would pass 2^56", img->filename);
		ret = qk__qcow2_meta_find(img, area, nb + tc, &hit);
		if (ret < 0)
			return ret;
		if (ret == 0) {
			rc->area = area;
			rc->nb = nb;
			rc->tc = tc;
			rc->ranges = ((total - 1) >> rc->eb) + 1;
			return 0;
		}
		area = hit + 1;
	}
}

/* Set entry i of a zeroed refcount block to v (which fits). */
static void put_refcount(uint8_t *b, uint64_t i, uint32_t order, uint64_t v)
{
	switch (order) {
	case 0: case 1: case 2: {
		uint32_t w = 1u << order, per = 8 / w;
		b[i / per] |= (uint8_t)(v << (w * (i % per)));
		break;
	}
	case 3: b[i] = (uint8_t)v; break;
	case 4: qk_put_be16(b + 2 * i, (uint16_t)v); break;
	case 5: qk_put_be32(b + 4 * i, (uint32_t)v); break;
	default: qk_put_be64(b + 8 * i, v); break;
	}
}

/* Fill the new block of range r (zeroed): the refcounts left of the old
 * structure's clusters [.., end), 1 for the new structure. `v` holds
 * SCAN_CHUNK values; *k walks rc->old. Image lock held. */
static int fill_block(qk_image *img, struct rc_change *rc, uint64_t r, uint8_t *blk, uint64_t *v,
		      uint64_t *k)
{
	uint64_t first = r << rc->eb, last = (r + 1) << rc->eb;
	uint64_t total = rc->area + rc->nb + rc->tc;
	for (uint64_t c0 = first; c0 < qk_min_u64(last, rc->end); c0 += SCAN_CHUNK) {
		uint64_t n = qk_min_u64(SCAN_CHUNK, qk_min_u64(last, rc->end) - c0);
		int ret = qk__qcow2_get_refcounts(img, c0, n, v);
		if (ret < 0)
			return ret;
		for (uint64_t i = 0; i < n; i++) {
			uint64_t c = c0 + i, x = v[i];
			if (!x)
				continue;
			while (*k < rc->n_old && rc->old[*k] < c)
				(*k)++;
			if (*k < rc->n_old && rc->old[*k] == c)
				x--;
			if (x)
				put_refcount(blk, c - first, rc->order, x);
		}
	}
	for (uint64_t c = qk_max_u64(first, rc->area); c < qk_min_u64(last, total); c++)
		put_refcount(blk, c - first, rc->order, 1);
	return 0;
}

/* Write the new blocks, a batch at a time, and fill the new table (host
 * order). Image lock held. */
static int write_blocks(qk_image *img, struct rc_change *rc, uint64_t *table, struct plan *p)
{
	struct qcow2 *q = qcow2_of(img);
	uint64_t cs = q->cluster_size, per = qk_max_u64(1, WRITE_BATCH / cs), slot = 0, k = 0;
	uint8_t *buf = calloc(per, cs);
	uint64_t *v = malloc(SCAN_CHUNK * sizeof *v);
	int ret = buf && v ? 0 : qk__err(ENOMEM, "out of memory");
	uint64_t inbuf = 0, ra = rc->area >> rc->eb;
	for (uint64_t r = 0; ret == 0 && r < rc->ranges; r++) {
		if (r < ra && !(r <= (rc->covered >> rc->eb) && rc->used[r]))
			continue;       /* no refcount left in the range: no block */
		uint8_t *blk = buf + inbuf * cs;
		memset(blk, 0, cs);
		ret = fill_block(img, rc, r, blk, v, &k);
		table[r] = (rc->area + slot + inbuf) << q->cluster_bits;
		if (ret == 0 && ++inbuf == per) {
			ret = qk__file_pwrite(img->file, buf, inbuf * cs, (rc->area + slot) << q->cluster_bits);
			slot += inbuf;
			inbuf = 0;
		}
		if (p)
			report(p, rc->ranges + r + 1, 2 * rc->ranges);
	}
	if (ret == 0 && inbuf)
		ret = qk__file_pwrite(img->file, buf, inbuf * cs, (rc->area + slot) << q->cluster_bits);
	if (ret == 0 && slot + inbuf != rc->nb)
		ret = qk__err(EIO, "internal error: %llu refcount blocks written, %llu planned",
			      (unsigned long long)(slot + inbuf), (unsigned long long)rc->nb);
	free(buf);
	free(v);
	return ret;
}

/* The new table written and synced (with the blocks before it), then the
 * header switched to it: bytes 48..100 in one synced write. */
static int switch_structure(qk_image *img, struct rc_change *rc, uint64_t *table)
{
	struct qcow2 *q = qcow2_of(img);
	uint64_t toff = (rc->area + rc->nb) << q->cluster_bits, entries = rc->tc * q->cluster_size / 8;
	for (uint64_t i = 0; i < entries; i++)
		qk_put_be64(&table[i], table[i]);
	int ret = qk__qcow2_write_durable(img, toff, table, rc->tc * q->cluster_size);
	uint8_t h[HDR_HEADER_LENGTH - HDR_RT_OFFSET];
	if (ret == 0)
		ret = qk__file_pread(img->file, h, sizeof h, HDR_RT_OFFSET);
	if (ret < 0)
		return ret;
	qk_put_be64(h, toff);
	qk_put_be32(h + HDR_RT_CLUSTERS - HDR_RT_OFFSET, (uint32_t)rc->tc);
	qk_put_be32(h + HDR_REFCOUNT_ORDER - HDR_RT_OFFSET, rc->order);
	return qk__qcow2_write_durable(img, HDR_RT_OFFSET, h, sizeof h);
}

/* After the switch: the handle forgets the old structure (loaded again
 * from the header's new one when next needed) and its clusters, free now,
 * become holes in the file. */
static void adopt_structure(qk_image *img, struct rc_change *rc)
{
	struct qcow2 *q = qcow2_of(img);
	uint64_t end = (rc->area + rc->nb + rc->tc) << q->cluster_bits;
	qk__qcow2_free_refcounts(q);
	qk__qcow2_meta_invalidate(img);
	q->rt_offset = (rc->area + rc->nb) << q->cluster_bits;
	q->rt_clusters = (uint32_t)rc->tc;
	q->refcount_order = rc->order;
	q->file_size = qk_max_u64(q->file_size, end);
	q->alloc_end = qk_max_u64(q->alloc_end, end);
	q->free_hint = 1;
	q->free_byte = 0;
	q->freed_lo = q->freed_hi = 0;
	for (uint64_t i = 0, run = 1; !rc->old_shared && i < rc->n_old; i += run) {
		for (run = 1; i + run < rc->n_old && rc->old[i + run] == rc->old[i] + run; run++)
			;
		qk__file_discard(img->file, rc->old[i] << q->cluster_bits, run << q->cluster_bits);
	}
}

static void rc_free(struct rc_change *rc)
{
	free(rc->used);
	free(rc->old);
}

/* Check that every refcount fits `order` bits (narrowing only), as the
 * first walk of QEMU's qcow2_change_refcount_order does. Image lock held. */
static int check_width(qk_image *img, uint32_t order)
{
	struct qcow2 *q = qcow2_of(img);
	struct rc_change rc = { .order = order, .eb = q->cluster_bits + 3 - order };
	if (order >= q->refcount_order)
		return 0;
	int ret = qk__qcow2_load_refcounts(img);
	if (ret == 0)
		ret = old_structure(img, &rc);
	if (ret == 0)
		ret = scan_refcounts(img, &rc, true, NULL);
	rc_free(&rc);
	return ret;
}

/* The refcount width becomes 2^order bits. Image lock held. */
static int change_refcount_order(qk_image *img, struct plan *p)
{
	struct qcow2 *q = qcow2_of(img);
	struct rc_change rc = { .order = p->order, .eb = q->cluster_bits + 3 - p->order };
	uint64_t *table = NULL;
	int ret = flush_if_dirty(img);              /* the refcounts on disk are current */
	if (ret == 0)
		ret = qk__qcow2_load_refcounts(img);
	if (ret == 0)
		ret = old_structure(img, &rc);
	if (ret == 0)
		ret = scan_refcounts(img, &rc, p->order < q->refcount_order, p);
	if (ret == 0)
		ret = plan_layout(img, &rc);
	if (ret == 0 && !(table = calloc(rc.tc, q->cluster_size)))
		ret = qk__err(ENOMEM, "out of memory for the new refcount table");
	if (ret == 0)
		ret = write_blocks(img, &rc, table, p);
	if (ret == 0)
		ret = switch_structure(img, &rc, table);
	if (ret == 0)
		adopt_structure(img, &rc);
	free(table);
	rc_free(&rc);
	p->step++;
	return ret;
}

/* ---- zero clusters (downgrade) ------------------------------------------------------ */

struct expand {
	bool backing;              /* the image has a backing file */
	bool moved;                /* a shared cluster was replaced: COPIED flags to redo */
	uint8_t *zeros;            /* a cluster of zeros, when the file system
	                            * cannot zero a range */
};

/* Make host cluster `off` read as zeros (not over metadata); the zeros
 * reach the disk before any L2 entry is written. A cluster at or past the
 * end of the file is written (zeroing a range need not grow the file). */
static int zero_cluster(qk_image *img, struct expand *x, uint64_t off)
{
	struct qcow2 *q = qcow2_of(img);
	uint64_t size;
	int ret = qk__qcow2_meta_check(img, off, q->cluster_size, 0, "zeroing a cluster");
	if (ret == 0)
		ret = qk__file_get_size(img->file, &size);
	if (ret == 0)
		ret = off + q->cluster_size <= size ?
		      qk__file_zero_range(img->file, off, q->cluster_size) : -ENOTSUP;
	if (ret == -ENOTSUP) {
		if (!x->zeros && !(x->zeros = calloc(1, q->cluster_size)))
			return qk__err(ENOMEM, "out of memory");
		ret = qk__file_pwrite_data(img->file, x->zeros, q->cluster_size, off);
	}
	if (ret == 0)
		q->l2_cache.sync_first = img->file;
	return ret;
}

/* A new zeroed cluster for an entry of an L2 table that `l2rc` L1 tables
 * share: each of them references it. Its refcount reaches the disk before
 * the entry, and so do its zeros. */
static int new_zero_cluster(qk_image *img, struct expand *x, uint64_t l2rc, uint64_t *off)
{
	struct qcow2 *q = qcow2_of(img);
	int ret = qk__qcow2_alloc_clusters(img, 1, off);
	if (ret == 0 && l2rc > 1)
		ret = qk__qcow2_set_refcount(img, *off >> q->cluster_bits, l2rc);
	if (ret == 0)
		ret = zero_cluster(img, x, *off);
	if (ret == 0 && *off + q->cluster_size > q->file_size)
		q->file_size = *off + q->cluster_size;
	if (ret == 0 && !q->lazy)
		ret = qk__cache_set_dependency(&q->l2_cache, &q->rb_cache);
	return ret;
}

/*
 * The entry replacing zero cluster entry e of an L2 table shared by l2rc
 * L1 tables (QEMU's expand_zero_clusters_in_l1): its own cluster zeroed;
 * unallocated without a backing file; else a new zeroed cluster. A cluster
 * that other L2 tables reference too (its refcount above l2rc) may hold
 * data they read: it is not zeroed but replaced, its l2rc references go
 * to *drop. Image lock held.
 */
static int expand_entry(qk_image *img, struct expand *x, uint64_t gc, uint64_t e, uint64_t l2rc,
			uint64_t *ne, uint64_t *drop)
{
	uint64_t off = e & L2E_OFFSET_MASK, rc;
	int ret = qk__qcow2_check_entry(img, gc, e, 0);
	*drop = 0;
	if (ret == 0 && off) {
		ret = qk__qcow2_get_refcount(img, off >> qcow2_of(img)->cluster_bits, &rc);
		if (ret == 0 && rc <= l2rc) {
			*ne = off | (l2rc == 1 ? QCOW_OFLAG_COPIED : 0);
			return zero_cluster(img, x, off);
		}
		*drop = off;
		off = 0;
	}
	if (ret < 0)
		return ret;
	if (!x->backing) {
		*ne = 0;
		return 0;
	}
	ret = new_zero_cluster(img, x, l2rc, &off);
	*ne = off | (l2rc == 1 ? QCOW_OFLAG_COPIED : 0);
	return ret;
}

/* table_fn: expand the zero clusters of one L2 table. */
static int expand_table(qk_image *img, void *ctx, uint64_t l1i, uint64_t l2_off)
{
	struct qcow2 *q = qcow2_of(img);
	struct expand *x = ctx;
	uint64_t l2rc, *t, n = q->cluster_size / 8;
	int ret = qk__qcow2_get_refcount(img, l2_off >> q->cluster_bits, &l2rc);
	if (ret == 0 && l2rc == 0)
		ret = qk__qcow2_corrupt(img, "L2 table at offset 0x%llx has refcount 0",
					(unsigned long long)l2_off);
	if (ret == 0)
		ret = qk__cache_get(&q->l2_cache, l2_off, (void **)&t);
	if (ret < 0)
		return ret;
	for (uint64_t j = 0; ret == 0 && j < n; j++) {
		uint64_t e = t[j], ne, drop;
		if ((e & QCOW_OFLAG_COMPRESSED) || !(e & QCOW_OFLAG_ZERO))
			continue;
		ret = expand_entry(img, x, (l1i << q->l2_bits) | j, e, l2rc, &ne, &drop);
		if (ret < 0)
			break;
		t[j] = ne;
		qk__cache_mark_dirty(&q->l2_cache, l2_off);
		if (!drop)
			continue;
		/* The entry stops naming the cluster on disk before its
		 * references drop (and a freed cluster is reused only then). */
		x->moved = true;
		ret = qk__cache_flush(&q->l2_cache);
		for (uint64_t k = 0; ret == 0 && k < l2rc; k++)
			ret = qk__qcow2_update_refcount(img, drop, q->cluster_size, -1);
	}
	qk__cache_put(&q->l2_cache, l2_off);
	return ret;
}

/* COPIED of the active L1 and L2 entries from the refcounts (after shared
 * clusters were replaced, some are their tables' alone now). Image lock
 * held. */
static int fix_copied(qk_image *img)
{
	struct qcow2 *q = qcow2_of(img);
	bool l1_changed = false;
	int ret = 0;
	for (uint32_t i = 0; ret == 0 && i < q->l1_size; i++) {
		uint64_t off, rc, *t;
		ret = qk__qcow2_l2_table(img, i, &off);
		if (ret < 0 || !off)
			continue;
		ret = qk__qcow2_get_refcount(img, off >> q->cluster_bits, &rc);
		uint64_t ne = (q->l1[i] & ~QCOW_OFLAG_COPIED) | (rc == 1 ? QCOW_OFLAG_COPIED : 0);
		l1_changed |= ne != q->l1[i];
		q->l1[i] = ne;
		if (ret == 0)
			ret = qk__cache_get(&q->l2_cache, off, (void **)&t);
		if (ret < 0)
			break;
		for (uint64_t j = 0; ret == 0 && j < q->cluster_size / 8; j++) {
			uint64_t host = t[j] & L2E_OFFSET_MASK;
			if ((t[j] & QCOW_OFLAG_COMPRESSED) || !host)
				continue;
			ret = qk__qcow2_get_refcount(img, host >> q->cluster_bits, &rc);
			uint64_t e = (t[j] & ~QCOW_OFLAG_COPIED) | (rc == 1 ? QCOW_OFLAG_COPIED : 0);
			if (ret == 0 && e != t[j]) {
				t[j] = e;
				qk__cache_mark_dirty(&q->l2_cache, off);
			}
		}
		qk__cache_put(&q->l2_cache, off);
	}
	if (ret < 0 || !l1_changed)
		return ret;
	uint64_t *be = malloc((size_t)q->l1_size * 8);
	if (!be)
		return qk__err(ENOMEM, "out of memory");
	for (uint32_t i = 0; i < q->l1_size; i++)
		qk_put_be64(&be[i], q->l1[i]);
	ret = qk__qcow2_write_durable(img, q->l1_offset, be, (size_t)q->l1_size * 8);
	free(be);
	return ret;
}

/* QEMU's qcow2_expand_zero_clusters, over the active image and every
 * snapshot. Image lock held. */
static int expand_zero_clusters(qk_image *img, struct plan *p)
{
	struct qcow2 *q = qcow2_of(img);
	struct expand x = { .backing = q->backing_file != NULL };
	int ret = walk_tables(img, expand_table, &x, p);
	if (ret == 0)
		ret = flush_if_dirty(img);
	if (ret == 0 && x.moved)
		ret = fix_copied(img);
	if (ret == 0)
		ret = flush_if_dirty(img);
	free(x.zeros);
	return ret;
}

/* ---- the header ------------------------------------------------------------------------ */


/* Append one header extension at *p of h (cs bytes); -ENOSPC when it does
 * not fit. */
static int put_ext(uint8_t *h, uint64_t cs, uint64_t *p, uint32_t type, const void *data,
		   uint64_t len)
{
	uint64_t total = 8 + ((len + 7) & ~7ull);
	if (*p + total > cs)
		return -ENOSPC;
	qk_put_be32(h + *p, type);
	qk_put_be32(h + *p + 4, (uint32_t)len);
	if (len)
		memcpy(h + *p + 8, data, len);
	*p += total;
	return 0;
}

/* The fixed fields of a header of `version` from the handle's state. */
static void put_fixed(qk_image *img, uint8_t *h, uint32_t version, uint32_t hlen)
{
	struct qcow2 *q = qcow2_of(img);
	qk_put_be32(h + HDR_MAGIC, QCOW2_MAGIC);
	qk_put_be32(h + HDR_VERSION, version);
	qk_put_be32(h + HDR_CLUSTER_BITS, q->cluster_bits);
	qk_put_be64(h + HDR_SIZE, img->size);
	qk_put_be32(h + HDR_CRYPT_METHOD, q->crypt_method);
	qk_put_be32(h + HDR_L1_SIZE, q->l1_size);
	qk_put_be64(h + HDR_L1_OFFSET, q->l1_offset);
	qk_put_be64(h + HDR_RT_OFFSET, q->rt_offset);
	qk_put_be32(h + HDR_RT_CLUSTERS, q->rt_clusters);
	qk_put_be32(h + HDR_NB_SNAPSHOTS, q->nb_snapshots);
	qk_put_be64(h + HDR_SNAPSHOTS_OFFSET, q->snapshots_offset);
	if (version < 3)
		return;
	qk_put_be64(h + HDR_INCOMPAT, q->incompat);
	qk_put_be64(h + HDR_COMPAT, q->compat);
	qk_put_be64(h + HDR_AUTOCLEAR, q->autoclear);
	qk_put_be32(h + HDR_REFCOUNT_ORDER, q->refcount_order);
	qk_put_be32(h + HDR_HEADER_LENGTH, hlen);
	h[HDR_COMPRESSION_TYPE] = (uint8_t)q->compression_type;
}

/* The extensions a rewrite keeps as they were (bitmaps, and the types this
 * library does not know), from the old header cluster `old`, appended to
 * h at *p. */
static int keep_extensions(qk_image *img, const uint8_t *old, uint8_t *h, uint64_t *p)
{
	struct qcow2 *q = qcow2_of(img);
	uint64_t cs = q->cluster_size, boff = qk_be64(old + HDR_BACKING_OFFSET);
	uint64_t off = q->header_length, end = boff ? qk_min_u64(boff, cs) : cs;
	while (off + 8 <= end) {
		uint32_t type = qk_be32(old + off), len = qk_be32(old + off + 4);
		if (type == EXT_END || len > end - off - 8)
			break;
		bool known = type == EXT_BACKING_FMT || type == EXT_FEATURES || type == EXT_CRYPTO ||
			     type == EXT_DATA_FILE;
		if (!known && put_ext(h, cs, p, type, old + off + 8, len) < 0)
			return -ENOSPC;
		off += 8 + qk_min_u64(((uint64_t)len + 7) & ~7ull, end - off - 8);
	}
	return 0;
}

/* Build the header cluster for `version` into h (cs bytes): QEMU's layout
 * (qcow2_update_header). `data_file`: the data file name to store. */
static int build_header(qk_image *img, const uint8_t *old, uint8_t *h, uint32_t version,
			const char *data_file)
{
	struct qcow2 *q = qcow2_of(img);
	uint64_t cs = q->cluster_size;
	/* Version 3 header fields past QEMU's, which a newer writer put there. */
	uint32_t unknown = q->version >= 3 && q->header_length > V3_HEADER_LENGTH ?
			   q->header_length - V3_HEADER_LENGTH : 0;
	uint64_t p = version >= 3 ? V3_HEADER_LENGTH + unknown : HDR_V2_LENGTH;
	memset(h, 0, cs);
	put_fixed(img, h, version, (uint32_t)p);
	if (version >= 3 && unknown)
		memcpy(h + V3_HEADER_LENGTH, old + V3_HEADER_LENGTH, unknown);
	int ret = 0;
	if (q->backing_format)
		ret = put_ext(h, cs, &p, EXT_BACKING_FMT, q->backing_format, strlen(q->backing_format));
	if (ret == 0 && q->has_data_file && data_file)
		ret = put_ext(h, cs, &p, EXT_DATA_FILE, data_file, strlen(data_file));
	if (ret == 0 && version >= 3 && cs >= FEATURE_TABLE_MIN_CLUSTER) {
		uint8_t t[FEATURE_TABLE_LEN];
		qk__qcow2_feature_table(t);
		ret = put_ext(h, cs, &p, EXT_FEATURES, t, sizeof t);
	}
	if (ret == 0)
		ret = keep_extensions(img, old, h, &p);
	if (ret == 0)
		ret = put_ext(h, cs, &p, EXT_END, NULL, 0);
	if (ret == 0 && q->backing_file) {
		size_t len = strlen(q->backing_file);
		if (p + len > cs)
			return -ENOSPC;
		memcpy(h + p, q->backing_file, len);
		qk_put_be64(h + HDR_BACKING_OFFSET, p);
		qk_put_be32(h + HDR_BACKING_SIZE, (uint32_t)len);
	}
	return ret;
}

/* How far the header in cluster h (of `cs` bytes; fixed part `hlen`
 * bytes) reaches: its extensions, their end marker and the backing file
 * name. */
static uint64_t header_extent(const uint8_t *h, uint64_t cs, uint64_t hlen)
{
	uint64_t off = hlen, boff = qk_be64(h + HDR_BACKING_OFFSET);
	uint64_t end = boff && boff < cs ? boff : cs;
	while (off + 8 <= end) {
		uint32_t type = qk_be32(h + off), len = qk_be32(h + off + 4);
		off += 8;
		if (type == EXT_END || len > end - off)
			break;
		off += qk_min_u64(((uint64_t)len + 7) & ~7ull, end - off);
	}
	if (boff && boff < cs)
		off = qk_max_u64(off, boff + qk_be32(h + HDR_BACKING_SIZE));
	return qk_min_u64(off, cs);
}

/*
 * Write the whole header again, as `version`, from the handle's state (the
 * fields q holds, the backing file and format, `data_file` as the data
 * file's name), keeping the extensions it does not rebuild; synced.
 * Updates q->version and q->header_length. A sector is written whole or
 * not at all, a cluster need not be: where the new header fits in the
 * first sector, that sector is written first (the rest of the cluster then
 * holds nothing it names); where the old one did, the rest goes first and
 * the first sector last. Either way a power cut leaves one header or the
 * other. Only when both pass the first sector is the cluster written in
 * one go, as QEMU writes it.
 */
static int write_header(qk_image *img, uint32_t version, const char *data_file)
{
	struct qcow2 *q = qcow2_of(img);
	uint64_t cs = q->cluster_size, sector = 512;
	uint8_t *old = malloc(cs), *h = malloc(cs);
	int ret = old && h ? qk__file_pread(img->file, old, cs, 0) : qk__err(ENOMEM, "out of memory");
	if (ret == 0 && build_header(img, old, h, version, data_file) < 0)
		ret = qk__err(ENOSPC, "Failed to update the image header: the header of '%s' does "
			      "not fit in its cluster", img->filename);
	uint32_t hlen = ret == 0 && version >= 3 ? qk_be32(h + HDR_HEADER_LENGTH) : HDR_V2_LENGTH;
	bool new_fits = ret == 0 && header_extent(h, cs, hlen) <= sector;
	bool old_fits = ret == 0 && header_extent(old, cs, q->header_length) <= sector;
	if (ret == 0 && cs > sector && (new_fits || old_fits)) {
		uint64_t first = new_fits ? 0 : sector, second = new_fits ? sector : 0;
		ret = qk__qcow2_write_durable(img, first, h + first, first ? cs - sector : sector);
		if (ret == 0)
			ret = qk__qcow2_write_durable(img, second, h + second, second ? cs - sector : sector);
	} else if (ret == 0) {
		ret = qk__qcow2_write_durable(img, 0, h, cs);
	}
	if (ret == 0) {
		q->version = version;
		q->header_length = hlen;
	}
	free(old);
	free(h);
	return ret;
}

/* Write the 8-byte header field at `off` (compat, autoclear), synced. */
static int write_field(qk_image *img, uint64_t off, uint64_t v)
{
	uint8_t be[8];
	qk_put_be64(be, v);
	return qk__qcow2_write_durable(img, off, be, 8);
}

/* ---- versions -------------------------------------------------------------------------- */

/* Does an entry of the snapshot table on disk have less extra data than
 * version 3 requires (the 64-bit VM state size and the disk size)? */
static int snapshots_short(qk_image *img, bool *is_short)
{
	struct qcow2 *q = qcow2_of(img);
	*is_short = false;
	if (!q->n_snapshots || !q->snapshots_bytes)
		return 0;
	uint8_t *t = malloc(q->snapshots_bytes);
	int ret = t ? qk__file_pread(img->file, t, q->snapshots_bytes, q->snapshots_offset) :
		  qk__err(ENOMEM, "out of memory");
	for (uint64_t off = 0, i = 0; ret == 0 && i < q->n_snapshots; i++) {
		if (off + SNAP_FIXED_LEN > q->snapshots_bytes)
			break;
		uint32_t extra = qk_be32(t + off + 36);
		*is_short |= extra < SNAP_EXTRA_V3_MIN;
		off += (SNAP_FIXED_LEN + extra + qk_be16(t + off + 12) + qk_be16(t + off + 14) + 7) & ~7ull;
	}
	free(t);
	return ret;
}

/* Write the snapshot table again in version 3's form (QEMU's
 * qcow2_write_snapshots): new clusters, synced, then count and offset in
 * one header write, then the old table freed. Image lock held. */
static int rewrite_snapshots(qk_image *img)
{
	struct qcow2 *q = qcow2_of(img);
	uint64_t bytes = 0, len = 0, off = 0;
	for (uint32_t i = 0; i < q->n_snapshots; i++)
		bytes += (SNAP_FIXED_LEN + SNAP_EXTRA_LEN + q->snap_extra[i].len +
			  strlen(q->snapshots[i].id) + strlen(q->snapshots[i].name) + 7) & ~7ull;
	uint8_t *buf = malloc(bytes);
	if (!buf)
		return qk__err(ENOMEM, "Failed to update the snapshot table: out of memory");
	for (uint32_t i = 0; i < q->n_snapshots; i++)
		qk__qcow2_put_snapshot_entry(buf, &len, &q->snapshots[i], q->snap_extra[i].bytes, q->snap_extra[i].len);
	uint64_t n = (bytes + q->cluster_size - 1) >> q->cluster_bits;
	int ret = qk__qcow2_alloc_clusters(img, n, &off);
	if (ret == 0)
		ret = qk__cache_flush(&q->rb_cache);
	if (ret == 0)
		ret = qk__qcow2_meta_add(img, off, n << q->cluster_bits, META_SNAPTABLE);
	if (ret == 0)
		ret = qk__qcow2_write_durable(img, off, buf, bytes);
	free(buf);
	uint8_t hdr[12];
	qk_put_be32(hdr, q->n_snapshots);
	qk_put_be64(hdr + 4, off);
	if (ret == 0)
		ret = qk__qcow2_write_durable(img, HDR_NB_SNAPSHOTS, hdr, sizeof hdr);
	if (ret < 0)
		return ret;
	uint64_t old = q->snapshots_offset, old_bytes = q->snapshots_bytes;
	q->nb_snapshots = q->n_snapshots;
	q->snapshots_offset = off;
	q->snapshots_bytes = bytes;
	q->file_size = qk_max_u64(q->file_size, off + (n << q->cluster_bits));
	if (!old || !old_bytes)
		return 0;
	qk__qcow2_meta_del(img, old, old_bytes);
	return qk__qcow2_update_refcount(img, old, old_bytes, -1);
}

/* Version 2 to 3 (QEMU's qcow2_upgrade). Image lock held. */
static int upgrade(qk_image *img)
{
	struct qcow2 *q = qcow2_of(img);
	bool is_short;
	int ret = snapshots_short(img, &is_short);
	if (ret == 0 && is_short)
		ret = rewrite_snapshots(img);
	if (ret == 0)
		ret = qk__qcow2_flush_locked(img);
	if (ret < 0)
		return ret;
	q->incompat = q->compat = q->autoclear = 0;
	q->refcount_order = 4;
	q->compression_type = QK_COMPRESSION_ZLIB;
	return write_header(img, 3, q->data_file_name);
}

/* Flush, then clear the dirty bit (lazy refcounts), as QEMU's
 * qcow2_mark_clean. Image lock held. */
static int mark_clean(qk_image *img)
{
	struct qcow2 *q = qcow2_of(img);
	int ret = flush_if_dirty(img);
	if (ret == 0 && (q->incompat & INCOMPAT_DIRTY))
		ret = qk__qcow2_write_incompat(img, q->incompat & ~INCOMPAT_DIRTY);
	if (ret == 0)
		q->lazy = false;
	return ret;
}

/* Version 3 to 2 (QEMU's qcow2_downgrade, checked by check_downgrade).
 * Image lock held. */
static int downgrade(qk_image *img, struct plan *p)
{
	struct qcow2 *q = qcow2_of(img);
	int ret = mark_clean(img);
	if (ret == 0)
		ret = expand_zero_clusters(img, p);
	if (ret < 0)
		return ret;
	q->incompat = q->compat = q->autoclear = 0;
	q->compression_type = QK_COMPRESSION_ZLIB;     /* no compressed cluster (checked) */
	ret = write_header(img, 2, NULL);
	p->step++;
	return ret;
}

/* ---- the checks, before anything changes ---------------------------------------------- */

/* The options on their own (QEMU's option loop). */
static int plan_options(qk_image *img, const struct qk_amend_options *o, struct plan *p)
{
	struct qcow2 *q = qcow2_of(img);
	*p = (struct plan){ .version = q->version, .order = q->refcount_order,
			    .lazy = q->compat & COMPAT_LAZY_REFCOUNTS, .progress = o->progress,
			    .opaque = o->progress_opaque };
	if (o->fields & QK_AMEND_SIZE)
		p->size = o->size;
	if (o->fields & QK_AMEND_VERSION) {
		if (o->version != 2 && o->version != 3)
			return qk__err(EINVAL, "Unknown compatibility level %u", o->version);
		p->version = o->version;
	}
	if (o->fields & QK_AMEND_BACKING) {
		p->backing = true;
		p->backing_file = o->backing_file;
		p->backing_format = o->backing_format;
	}
	if (o->fields & QK_AMEND_DATA_FILE) {
		if (!q->has_data_file)
			return qk__err(EINVAL, "data-file can only be set for images that use an external "
				       "data file");
		if (!o->data_file || strlen(o->data_file) > MAX_DATA_FILE_NAME)
			return qk__err(EINVAL, "a data file name of at most %u bytes is required",
				       MAX_DATA_FILE_NAME);
		for (const char *c = o->data_file; *c; c++)
			if ((unsigned char)*c < 0x20 || *c == 0x7f)
				return qk__err(EINVAL, "the data file name holds a control character");
		p->data_file = o->data_file;
	}
	if (o->fields & QK_AMEND_DATA_FILE_RAW) {
		if (o->data_file_raw && !(q->autoclear & AUTOCLEAR_DATA_RAW))
			return qk__err(EINVAL, "data-file-raw cannot be set on existing images");
		p->raw_off = !o->data_file_raw;
	}
	if (o->fields & QK_AMEND_LAZY_REFCOUNTS)
		p->lazy = o->lazy_refcounts != 0;
	if (o->fields & QK_AMEND_REFCOUNT_BITS) {
		if (!qk_is_pow2(o->refcount_bits) || o->refcount_bits > 64)
			return qk__err(EINVAL, "Refcount width must be a power of two and may not exceed "
				       "64 bits");
		p->order = (uint32_t)__builtin_ctz(o->refcount_bits);
	}
	return 0;
}

/* What the size step would refuse (qk__qcow2_resize's and QEMU's checks),
 * for an image of `version` then. */
static int check_size(qk_image *img, struct plan *p, uint32_t version)
{
	struct qcow2 *q = qcow2_of(img);
	uint64_t size = p->size;
	if (!size || size == img->size)
		return 0;
	if (size % 512)
		return qk__err(EINVAL, "The new size must be a multiple of 512");
	if (size > (uint64_t)INT64_MAX - q->cluster_size)
		return qk__err(EFBIG, "size %llu is too large", (unsigned long long)size);
	if (version < 3 && q->n_snapshots)
		return qk__err(ENOTSUP, "Can't resize a v2 image which has snapshots");
	if (q->n_bitmaps)
		return qk__err(ENOTSUP, "resizing '%s' is not supported yet: it has persistent bitmaps",
			       img->filename);
	if (version < 3 && size > img->size && q->backing_file &&
	    (!img->backing || img->backing->size > img->size))
		return qk__err(ENOTSUP, "cannot grow v2 image '%s' over its backing file: the new "
			       "area would show the backing file's data (compat=1.1 images can)",
			       img->filename);
	return 0;
}

/* What QEMU's qcow2_downgrade refuses, in its order. Image lock held. */
static int check_downgrade(qk_image *img, struct plan *p)
{
	struct qcow2 *q = qcow2_of(img);
	uint64_t size = p->size ? p->size : img->size;
	if (p->order != 4)
		return qk__err(ENOTSUP, "compat=0.10 requires refcount_bits=16");
	if (q->has_data_file)
		return qk__err(ENOTSUP, "Cannot downgrade an image with a data file");
	for (uint32_t i = 0; i < q->n_snapshots; i++)
		if (q->snapshots[i].vm_state_size > UINT32_MAX || q->snapshots[i].disk_size != size)
			return qk__err(ENOTSUP, "Internal snapshots prevent downgrade of image");
	if (q->n_bitmaps)
		return qk__err(ENOTSUP, "Cannot downgrade an image with persistent bitmaps: compat=0.10 "
			       "cannot keep them (qemu-img 7.2 drops them and leaks their clusters); "
			       "remove them first");
	uint64_t bad = q->incompat & ~(INCOMPAT_DIRTY | INCOMPAT_COMPRESSION);
	if (bad)
		return qk__err(ENOTSUP, "Cannot downgrade an image with incompatible features 0x%llx set",
			       (unsigned long long)bad);
	/* QEMU looks at the active image only; a snapshot's compressed
	 * clusters would be unreadable as zlib too. */
	int ret = q->compression_type != QK_COMPRESSION_ZLIB ?
		  walk_tables(img, has_compressed, NULL, NULL) : 0;
	if (ret > 0)
		return qk__err(ENOTSUP, "Cannot downgrade an image with zstd compression type and "
			       "existing compressed clusters");
	return ret;
}

/* Every refusal of the steps QEMU takes, in its order, before the first
 * change. Image lock held. */
static int check_plan(qk_image *img, struct plan *p)
{
	struct qcow2 *q = qcow2_of(img);
	uint32_t version = qk_max_u64(q->version, p->version);   /* after the upgrade */
	int ret = 0;
	if (p->order != q->refcount_order) {
		if (p->version < 3 && p->order != 4)
			return qk__err(EINVAL, "Refcount widths other than 16 bits require compatibility "
				       "level 1.1 or above (use compat=1.1 or greater)");
		ret = check_width(img, p->order);
		if (ret < 0)
			return ret;
	}
	if (p->backing && (str_differs(p->backing_file, q->backing_file) ||
			   str_differs(p->backing_format, q->backing_format)))
		return qk__err(EINVAL, "Cannot amend the backing file (qemu-img rebase changes it)");
	bool lazy = q->compat & COMPAT_LAZY_REFCOUNTS;
	if (p->lazy && !lazy && p->version < 3)
		return qk__err(EINVAL, "Lazy refcounts only supported with compatibility level 1.1 and "
			       "above (use compat=1.1 or greater)");
	ret = check_size(img, p, version);
	if (ret == 0 && p->version < version)
		ret = check_downgrade(img, p);
	return ret;
}

/* ---- the steps ------------------------------------------------------------------------ */

/* The data file's name and raw flag (QEMU's header update). Image lock
 * held. */
static int amend_data_file(qk_image *img, struct plan *p)
{
	struct qcow2 *q = qcow2_of(img);
	int ret = 0;
	if (p->raw_off && (q->autoclear & AUTOCLEAR_DATA_RAW)) {
		ret = write_field(img, HDR_AUTOCLEAR, q->autoclear & ~AUTOCLEAR_DATA_RAW);
		if (ret == 0)
			q->autoclear &= ~AUTOCLEAR_DATA_RAW;
	}
	if (ret < 0 || !p->data_file)
		return ret;
	const char *name = p->data_file[0] ? p->data_file : NULL;
	char *n = name ? strdup(name) : NULL, *path = name ? qk__file_resolve(img->filename, name) : NULL;
	if (name && (!n || !path))
		ret = qk__err(ENOMEM, "out of memory");
	if (ret == 0)
		ret = write_header(img, q->version, name);
	if (ret < 0) {
		free(n);
		free(path);
		return ret;
	}
	free(q->data_file_name);
	free(q->data_file_path);
	q->data_file_name = n;
	q->data_file_path = path;
	return 0;
}

/* Lazy refcounts on or off. Image lock held. */
static int amend_lazy(qk_image *img, struct plan *p)
{
	struct qcow2 *q = qcow2_of(img);
	bool lazy = q->compat & COMPAT_LAZY_REFCOUNTS;
	if (p->lazy == lazy)
		return 0;
	int ret = p->lazy ? 0 : mark_clean(img);
	uint64_t compat = p->lazy ? q->compat | COMPAT_LAZY_REFCOUNTS : q->compat & ~COMPAT_LAZY_REFCOUNTS;
	if (ret == 0)
		ret = write_field(img, HDR_COMPAT, compat);
	if (ret == 0)
		q->compat = compat;
	return ret;
}

/* Upgrade, refcount width, data file, lazy refcounts: the steps before
 * the size. Locks held. */
static int first_steps(qk_image *img, struct plan *p)
{
	struct qcow2 *q = qcow2_of(img);
	int ret = 0;
	if (p->version > q->version)
		ret = upgrade(img);
	if (ret == 0 && p->order != q->refcount_order)
		ret = change_refcount_order(img, p);
	if (ret == 0)
		ret = amend_data_file(img, p);
	if (ret == 0)
		ret = amend_lazy(img, p);
	if (ret == 0)
		ret = flush_if_dirty(img);
	return ret;
}

int qk__qcow2_amend(qk_image *img, const struct qk_amend_options *o)
{
	struct qcow2 *q = qcow2_of(img);
	struct plan p;
	int ret = plan_options(img, o, &p);
	if (ret < 0)
		return ret;
	ret = qk__qcow2_begin_change(img, 0, 0);
	if (ret == 0)
		ret = check_plan(img, &p);
	p.steps = (p.order != q->refcount_order) + (p.version < qk_max_u64(q->version, p.version));
	if (ret == 0)
		ret = first_steps(img, &p);
	qk__qcow2_end_change(img);
	if (ret == 0 && p.size && p.size != img->size)
		ret = qk__qcow2_resize(img, p.size, QK_RESIZE_SHRINK);
	if (ret == 0 && p.version < q->version) {
		ret = qk__qcow2_begin_change(img, 0, 0);
		if (ret == 0)
			ret = downgrade(img, &p);
		if (ret == 0)
			ret = flush_if_dirty(img);
		qk__qcow2_end_change(img);
	}
	return ret;
}
