/*
 * Reference counts: the refcount table, loaded on first use, and refcount
 * blocks through their own cache. Entries are 1 to 64 bits wide
 * (refcount_order 0..6): widths of 8 bits and more are big-endian
 * integers; narrower ones pack several per byte, lowest index in the
 * lowest bits.
 *
 * Allocation design. A refcount block covers a "range" of epb clusters
 * (epb = entries per block). A range without a block has every refcount 0.
 * Cluster allocation finds a free run with room at its head for the blocks
 * of the ranges it meets that have none; those blocks are counted, flushed,
 * and only then entered in the table (one synced write). A block needed
 * outside allocation (a count raised in an uncovered range) goes to the
 * first cluster of its range, which is free, and counts itself. When the
 * table itself is full, a new area is built at the start of the first
 * uncovered range: k new blocks, then the new table, all counted by those
 * blocks; it is written and synced before the header points at it, and
 * only then is the old table freed. So on disk a
 * refcount never drops below the references to its cluster, and a crash
 * at any point leaks at most.
 */
#include "qcow2/qcow2.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>


/* Cache loader for refcount blocks: for a writer, a block must start
 * inside the file (one cut short by the end of the file reads as far as
 * it goes), or counting into it would grow the file to wherever a crafted
 * table entry points. Readers and check (which judges such blocks itself)
 * read zeros there. Blocks this handle creates never pass here (they are
 * new in the cache). */
static int load_refblock(void *opaque, void *table, uint64_t offset)
{
	qk_image *img = opaque;
	struct qcow2 *q = qcow2_of(img);
	(void)table;
	if ((img->flags & (QK_OPEN_RDWR | QK_OPEN_CHECK)) != QK_OPEN_RDWR)
		return 0;
	if (offset >= q->file_size) {
		uint64_t size;
		if (qk__file_get_size(img->file, &size) == 0)
			q->file_size = size;
	}
	if (offset >= q->file_size)
		return qk__qcow2_corrupt(img, "refcount block at offset 0x%llx lies past the end of the file",
					 (unsigned long long)offset);
	return 0;
}

static int load_reftable(qk_image *img, struct qcow2 *q)
{
	uint64_t bytes = (uint64_t)q->rt_clusters * q->cluster_size;  /* checked at open */
	uint64_t end = q->rt_offset + bytes;
	if (end > q->file_size)
		return qk__qcow2_corrupt(img, "refcount table at offset 0x%llx (%llu bytes) lies past the end of the file",
					 (unsigned long long)q->rt_offset, (unsigned long long)bytes);
	uint64_t *rt = malloc(bytes);
	if (!rt)
		return qk__err(ENOMEM, "out of memory for the refcount table");
	int ret = qk__file_pread(img->file, rt, bytes, q->rt_offset);
	if (ret < 0) {
		free(rt);
		return ret;
	}
	qk_be64_table_to_host(rt, bytes / 8);
	uint32_t slots = q->l2_cache.nslots / 4;
	ret = qk__cache_init(&q->rb_cache, img->file, q->cluster_size, slots < 4 ? 4 : slots,
			     load_refblock, img);
	q->rb_cache.pre_write = qk__qcow2_pre_write_refblock;
	if (ret < 0) {
		free(rt);
		return ret;
	}
	q->rt = rt;
	q->rt_entries = bytes / 8;
	/* A metadata map built before the table was needed learns of it now. */
	ret = qk__qcow2_meta_add(img, q->rt_offset, bytes, META_REFTABLE);
	for (uint64_t i = 0; ret == 0 && i < q->rt_entries; i++)
		if (rt[i] & ~RT_RESERVED_MASK)
			ret = qk__qcow2_meta_add(img, rt[i] & ~RT_RESERVED_MASK, q->cluster_size,
						 META_REFBLOCK);
	return ret;
}

int qk__qcow2_load_refcounts(qk_image *img)
{
	struct qcow2 *q = qcow2_of(img);
	return q->rt ? 0 : load_reftable(img, q);
}

/* Extract entry i of a refcount block. */
static uint64_t rb_entry(const uint8_t *rb, uint64_t i, uint32_t order)
{
	switch (order) {
	case 0: case 1: case 2: {
		uint32_t bits = 1u << order, per_byte = 8 / bits;
		uint8_t b = rb[i / per_byte];
		return (b >> (bits * (i % per_byte))) & ((1u << bits) - 1);
	}
	case 3:
		return rb[i];
	case 4:
		return qk_be16(rb + 2 * i);
	case 5:
		return qk_be32(rb + 4 * i);
	default:
		return qk_be64(rb + 8 * i);
	}
}

int qk__qcow2_get_refcount(qk_image *img, uint64_t cluster, uint64_t *rc)
{
	struct qcow2 *q = qcow2_of(img);
	QK_LOCK_HELD(q);
	int lret = qk__qcow2_load_refcounts(img);
	if (lret < 0)
		return lret;
	uint32_t entries_bits = q->cluster_bits + 3 - q->refcount_order;
	uint64_t rt_index = cluster >> entries_bits;
	if (rt_index >= q->rt_entries) {
		*rc = 0;
		return 0;
	}
	uint64_t rte = q->rt[rt_index];
	uint64_t rb_off = rte & ~RT_RESERVED_MASK;
	if (rb_off == 0) {
		*rc = 0;
		return 0;
	}
	if ((rb_off & (q->cluster_size - 1)) || rb_off > MAX_HOST_OFFSET)
		return qk__qcow2_corrupt(img, "refcount block offset 0x%llx invalid (refcount table index %llu)",
					 (unsigned long long)rb_off, (unsigned long long)rt_index);
	void *rb;
	int ret = qk__cache_get(&q->rb_cache, rb_off, &rb);
	if (ret < 0)
		return ret;
	*rc = rb_entry(rb, cluster & ((1ull << entries_bits) - 1), q->refcount_order);
	qk__cache_put(&q->rb_cache, rb_off);
	return 0;
}

int qk__qcow2_get_refcounts(qk_image *img, uint64_t first, uint64_t n, uint64_t *out)
{
	struct qcow2 *q = qcow2_of(img);
	uint32_t eb = q->cluster_bits + 3 - q->refcount_order;
	uint64_t per = 1ull << eb;
	while (n > 0) {
		uint64_t rt_index = first >> eb, in = first & (per - 1);
		uint64_t k = qk_min_u64(n, per - in);
		uint64_t rb_off = rt_index < q->rt_entries ? q->rt[rt_index] & ~RT_RESERVED_MASK : 0;
		if (!rb_off) {
			memset(out, 0, k * sizeof *out);
		} else {
			/* One lookup per block; a bad offset is reported there. */
			uint64_t rc;
			int ret = qk__qcow2_get_refcount(img, first, &rc);
			if (ret < 0)
				return ret;
			void *rb;
			if ((ret = qk__cache_get(&q->rb_cache, rb_off, &rb)) < 0)
				return ret;
			if (q->refcount_order == 4) {     /* the default width: tight loop */
				const uint8_t *p = (const uint8_t *)rb + 2 * in;
				for (uint64_t i = 0; i < k; i++)
					out[i] = (uint64_t)p[2 * i] << 8 | p[2 * i + 1];
			} else {
				for (uint64_t i = 0; i < k; i++)
					out[i] = rb_entry(rb, in + i, q->refcount_order);
			}
			qk__cache_put(&q->rb_cache, rb_off);
		}
		out += k;
		first += k;
		n -= k;
	}
	return 0;
}

int qk__qcow2_refcount_ones(qk_image *img, uint64_t n, uint8_t *one, uint8_t *wide,
			    unsigned wide_shift)
{
	struct qcow2 *q = qcow2_of(img);
	QK_LOCK_HELD(q);
	int ret = qk__qcow2_load_refcounts(img);
	uint32_t order = q->refcount_order, eb = q->cluster_bits + 3 - order;
	uint64_t per = 1ull << eb;      /* at least 64: whole bytes of one[] */
	uint8_t *rb = ret == 0 ? malloc(q->cluster_size) : NULL;
	if (ret == 0 && !rb)
		ret = qk__err(ENOMEM, "out of memory");
	for (uint64_t first = 0; ret == 0 && first < n; first += per) {
		uint64_t i = first >> eb, k = qk_min_u64(per, n - first);
		uint64_t rb_off = i < q->rt_entries ? q->rt[i] & ~RT_RESERVED_MASK : 0;
		if (!rb_off)
			continue;
		/* A bad offset is reported where the single lookup reports it;
		 * the group is left to the caller's own lookups. */
		uint64_t rc;
		if ((rb_off & (q->cluster_size - 1)) || rb_off > MAX_HOST_OFFSET) {
			ret = qk__qcow2_get_refcount(img, first, &rc);
			for (uint64_t g = first >> wide_shift; g <= (first + k - 1) >> wide_shift; g++)
				wide[g] = 1;
			continue;
		}
		if ((ret = qk__cache_peek(&q->rb_cache, rb_off, rb)) < 0)
			break;
		for (uint64_t j = 0; j < k; j += 8) {
			unsigned bits = 0;
			uint64_t above = 0;
			if (order == 4 && j + 8 <= k) {     /* the default width */
				const uint8_t *p = rb + 2 * j;
				for (unsigned b = 0; b < 8; b++) {
					above |= p[2 * b] | (p[2 * b + 1] & ~1u);
					bits |= (unsigned)(p[2 * b + 1] & 1) << b;
				}
				if (above)      /* then bit b may stand for 3, 5... */
					for (unsigned b = 0; b < 8; b++)
						if (qk_be16(p + 2 * b) != 1)
							bits &= ~(1u << b);
			} else {
				for (unsigned b = 0; b < 8 && j + b < k; b++) {
					uint64_t v = rb_entry(rb, j + b, order);
					above |= v & ~1ull;
					bits |= (unsigned)(v == 1) << b;
				}
			}
			one[(first + j) / 8] = (uint8_t)bits;
			if (above)
				wide[(first + j) >> wide_shift] = 1;
		}
	}
	free(rb);
	return ret;
}

/* Set entry i of a refcount block to v (v fits the width). */
static void rb_set(uint8_t *rb, uint64_t i, uint32_t order, uint64_t v)
{
	switch (order) {
	case 0: case 1: case 2: {
		uint32_t bits = 1u << order, per_byte = 8 / bits, shift = bits * (i % per_byte);
		uint8_t mask = (uint8_t)(((1u << bits) - 1) << shift);
		rb[i / per_byte] = (uint8_t)((rb[i / per_byte] & ~mask) | ((v << shift) & mask));
		break;
	}
	case 3:
		rb[i] = (uint8_t)v;
		break;
	case 4:
		qk_put_be16(rb + 2 * i, (uint16_t)v);
		break;
	case 5:
		qk_put_be32(rb + 4 * i, (uint32_t)v);
		break;
	default:
		qk_put_be64(rb + 8 * i, v);
	}
}

static uint64_t rc_max(const struct qcow2 *q)
{
	return q->refcount_order == 6 ? UINT64_MAX : (1ull << (1u << q->refcount_order)) - 1;
}

static uint32_t epb_bits(const struct qcow2 *q)
{
	return q->cluster_bits + 3 - q->refcount_order;
}

/*
 * Grow the refcount table so that it has an entry `rt_index`: a new area
 * of k blocks and the new table at cluster `area`, which lies past what
 * the old table covers (so it is free). The new blocks cover the ranges
 * the area meets and count the area; ranges between the old end and the
 * area stay without a block. See the design note for the order of writes.
 */
static int grow_reftable(qk_image *img, uint64_t rt_index, uint64_t area)
{
	struct qcow2 *q = qcow2_of(img);
	QK_LOCK_HELD(q);
	uint64_t cs = q->cluster_size;
	uint32_t eb = epb_bits(q);
	uint64_t old = q->rt_entries;
	uint64_t want = qk_max_u64(rt_index + 1, old + old / 2);
	uint64_t tc = 0, k = 1, r0 = area >> eb;
	if (area < old << eb)
		return qk__qcow2_corrupt(img, "refcount table growth inside the covered area (cluster %llu)",
					 (unsigned long long)area);
	for (int iter = 0; iter < 64; iter++) {
		want = qk_max_u64(want, r0 + k);
		tc = (want * 8 + cs - 1) / cs;
		uint64_t k2 = ((area + k + tc - 1) >> eb) - r0 + 1;   /* ranges the area meets */
		if (k2 <= k)
			break;
		k = k2;
	}
	want = tc * cs / 8;
	if (tc * cs > MAX_REFTABLE_BYTES)
		return qk__err(EFBIG, "refcount table of '%s' cannot grow past %llu bytes",
			       img->filename, MAX_REFTABLE_BYTES);
	uint64_t area_off = area << q->cluster_bits;
	uint64_t table_off = (area + k) << q->cluster_bits;
	if (table_off + tc * cs > MAX_HOST_OFFSET)
		return qk__err(EFBIG, "'%s' is full: host offsets would pass 2^56", img->filename);

	int ret = qk__qcow2_meta_check(img, area_off, (k + tc) * cs, 0, "refcount table growth");
	if (ret < 0)
		return ret;
	uint8_t *blk = calloc(1, cs);
	uint64_t *nt = calloc(tc * cs / 8, 8);
	if (!blk || !nt) {
		ret = qk__err(ENOMEM, "out of memory growing the refcount table");
		goto out;
	}
	/* Blocks first: block j covers range r0+j and counts the area's
	 * clusters that lie in it. */
	for (uint64_t j = 0; j < k && ret == 0; j++) {
		memset(blk, 0, cs);
		for (uint64_t c = area; c < area + k + tc; c++)
			if (c >> eb == r0 + j)
				rb_set(blk, c & ((1ull << eb) - 1), q->refcount_order, 1);
		uint64_t boff = (area + j) << q->cluster_bits;
		qk__cache_discard(&q->rb_cache, boff);
		ret = qk__file_pwrite(img->file, blk, cs, boff);
	}
	if (ret < 0)
		goto out;
	for (uint64_t i = 0; i < old; i++)
		qk_put_be64(&nt[i], q->rt[i]);
	for (uint64_t j = 0; j < k; j++)
		qk_put_be64(&nt[r0 + j], (area + j) << q->cluster_bits);
	ret = qk__qcow2_write_durable(img, table_off, nt, tc * cs);
	if (ret < 0)
		goto out;
	/* Now the header: offset and cluster count in one write. */
	uint8_t hdr[12];
	qk_put_be64(hdr, table_off);
	qk_put_be32(hdr + 8, (uint32_t)tc);
	ret = qk__qcow2_write_durable(img, HDR_RT_OFFSET, hdr, sizeof hdr);
	if (ret < 0)
		goto out;
	uint64_t old_off = q->rt_offset, old_clusters = q->rt_clusters;
	qk_be64_table_to_host(nt, want);
	free(q->rt);
	q->rt = nt;
	nt = NULL;
	q->rt_entries = want;
	q->rt_offset = table_off;
	q->rt_clusters = (uint32_t)tc;
	if (area_off + (k + tc) * cs > q->file_size)
		q->file_size = area_off + (k + tc) * cs;
	qk__qcow2_meta_del(img, old_off, old_clusters * cs);
	ret = qk__qcow2_meta_add(img, area_off, k * cs, META_REFBLOCK);
	if (ret == 0)
		ret = qk__qcow2_meta_add(img, table_off, tc * cs, META_REFTABLE);
	/* The old table is garbage now; a failure here only leaks it. */
	if (ret == 0)
		ret = qk__qcow2_update_refcount(img, old_off, old_clusters * cs, -1);
out:
	free(blk);
	free(nt);
	return ret;
}

/*
 * Make sure refcount table entry rt_index has a block. Sets *placed when
 * metadata had to be created (the caller's free run may be gone).
 */
static int ensure_block(qk_image *img, uint64_t rt_index, bool *placed)
{
	struct qcow2 *q = qcow2_of(img);
	QK_LOCK_HELD(q);
	if (rt_index >= q->rt_entries) {
		int ret = grow_reftable(img, rt_index, q->rt_entries << epb_bits(q));
		if (ret < 0)
			return ret;
		*placed = true;
		if (q->rt[rt_index])
			return 0;
	}
	if (q->rt[rt_index])
		return 0;
	if (rt_index == 0)
		return qk__qcow2_corrupt(img, "refcount table entry 0 is empty");
	uint64_t boff = (rt_index << epb_bits(q)) << q->cluster_bits;
	if (boff + q->cluster_size > MAX_HOST_OFFSET)
		return qk__err(EFBIG, "'%s' is full: host offsets would pass 2^56", img->filename);
	int ret = qk__qcow2_meta_check(img, boff, q->cluster_size, 0, "a new refcount block");
	if (ret < 0)
		return ret;
	/* The new block counts itself, then reaches the disk before the
	 * table entry that points at it. */
	void *rb;
	ret = qk__cache_get_empty(&q->rb_cache, boff, &rb);
	if (ret < 0)
		return ret;
	rb_set(rb, 0, q->refcount_order, 1);
	qk__cache_put(&q->rb_cache, boff);
	ret = qk__cache_flush(&q->rb_cache);
	if (ret < 0)
		return ret;
	uint8_t be[8];
	qk_put_be64(be, boff);
	ret = qk__qcow2_write_durable(img, q->rt_offset + 8 * rt_index, be, 8);
	if (ret < 0)
		return ret;
	q->rt[rt_index] = boff;
	if (boff + q->cluster_size > q->file_size)
		q->file_size = boff + q->cluster_size;
	*placed = true;
	return qk__qcow2_meta_add(img, boff, q->cluster_size, META_REFBLOCK);
}

/* The refcount block holding cluster c's refcount, made when missing, from
 * the cache: *boff its offset (for qk__cache_put), *rb its bytes, *i the
 * entry index in it. The table is loaded. Image lock held. */
static int block_of(qk_image *img, uint64_t c, uint64_t *boff_out, void **rb, uint64_t *i)
{
	struct qcow2 *q = qcow2_of(img);
	QK_LOCK_HELD(q);
	uint32_t eb = epb_bits(q);
	uint64_t rt_index = c >> eb;
	bool placed = false;
	int ret = ensure_block(img, rt_index, &placed);
	if (ret < 0)
		return ret;
	uint64_t boff = q->rt[rt_index] & ~RT_RESERVED_MASK;
	if ((q->rt[rt_index] & RT_RESERVED_MASK) || (boff & (q->cluster_size - 1)) ||
	    boff > MAX_HOST_OFFSET)
		return qk__qcow2_corrupt(img, "refcount table entry %llu (0x%016llx) is invalid",
					 (unsigned long long)rt_index, (unsigned long long)q->rt[rt_index]);
	if ((ret = qk__cache_get(&q->rb_cache, boff, rb)) < 0)
		return ret;
	*boff_out = boff;
	*i = c & ((1ull << eb) - 1);
	return 0;
}

/* Cluster c's refcount became v: the allocator's hints follow. */
static void refcount_set_to(struct qcow2 *q, uint64_t c, uint64_t v)
{
	if (v == 0 && c < q->free_hint)
		q->free_hint = c;
	if (v == 0 && q->free_byte >> q->cluster_bits == c)
		q->free_byte = 0;       /* nothing more may be packed there */
}

int qk__qcow2_update_refcount(qk_image *img, uint64_t offset, uint64_t length, int delta)
{
	struct qcow2 *q = qcow2_of(img);
	QK_LOCK_HELD(q);
	if (length == 0)
		return 0;
	int lret = qk__qcow2_load_refcounts(img);
	if (lret < 0)
		return lret;
	uint64_t first = offset >> q->cluster_bits;
	uint64_t last = (offset + length - 1) >> q->cluster_bits;
	uint64_t max = rc_max(q);
	for (uint64_t c = first; c <= last; c++) {
		uint64_t boff, i;
		void *rb;
		uint64_t rt_index = c >> epb_bits(q);
		if (delta < 0 && (rt_index >= q->rt_entries || !q->rt[rt_index]))
			/* No block: the count is 0 (and making one to say so
			 * would place metadata wherever the reference points). */
			return qk__qcow2_corrupt(img, "refcount of cluster at offset 0x%llx would drop below 0 "
						 "(refcount 0)", (unsigned long long)(c << q->cluster_bits));
		int ret = block_of(img, c, &boff, &rb, &i);
		if (ret < 0)
			return ret;
		uint64_t v = rb_entry(rb, i, q->refcount_order);
		if ((delta < 0 && v == 0) || (delta > 0 && v == max)) {
			qk__cache_put(&q->rb_cache, boff);
			return qk__qcow2_corrupt(img, "refcount of cluster at offset 0x%llx would %s (refcount %llu)",
						 (unsigned long long)(c << q->cluster_bits),
						 delta < 0 ? "drop below 0" : "overflow", (unsigned long long)v);
		}
		v = delta < 0 ? v - 1 : v + 1;
		rb_set(rb, i, q->refcount_order, v);
		qk__cache_mark_dirty(&q->rb_cache, boff);
		qk__cache_put(&q->rb_cache, boff);
		if (v == 0 && delta < 0) {
			if (!q->freed_hi || c < q->freed_lo)
				q->freed_lo = c;
			if (c + 1 > q->freed_hi)
				q->freed_hi = c + 1;
		}
		refcount_set_to(q, c, v);
	}
	return 0;
}

int qk__qcow2_add_refcounts(qk_image *img, uint64_t first, uint64_t n, int delta, uint64_t *after)
{
	struct qcow2 *q = qcow2_of(img);
	QK_LOCK_HELD(q);
	if (delta == 0)
		return after ? qk__qcow2_get_refcounts(img, first, n, after) : 0;
	int ret = qk__qcow2_load_refcounts(img);
	uint64_t per = 1ull << epb_bits(q), max = rc_max(q);
	while (ret == 0 && n > 0) {
		uint64_t rt_index = first >> epb_bits(q), k = qk_min_u64(n, per - (first & (per - 1)));
		if (delta < 0 && (rt_index >= q->rt_entries || !q->rt[rt_index]))
			return qk__qcow2_corrupt(img, "refcount of cluster at offset 0x%llx would drop below 0 "
						 "(refcount 0)", (unsigned long long)(first << q->cluster_bits));
		uint64_t boff, in;
		void *rb;
		if ((ret = block_of(img, first, &boff, &rb, &in)) < 0)
			return ret;
		/* Every entry checked before any changes: a refusal leaves the
		 * block as it was. */
		for (uint64_t j = 0; j < k; j++) {
			uint64_t v = rb_entry(rb, in + j, q->refcount_order);
			if ((delta < 0 && v == 0) || (delta > 0 && v == max)) {
				qk__cache_put(&q->rb_cache, boff);
				return qk__qcow2_corrupt(img, "refcount of cluster at offset 0x%llx would %s (refcount %llu)",
							 (unsigned long long)((first + j) << q->cluster_bits),
							 delta < 0 ? "drop below 0" : "overflow", (unsigned long long)v);
			}
		}
		for (uint64_t j = 0; j < k; j++) {
			uint64_t c = first + j, v = rb_entry(rb, in + j, q->refcount_order);
			v = delta < 0 ? v - 1 : v + 1;
			rb_set(rb, in + j, q->refcount_order, v);
			if (after)
				after[j] = v;
			if (v == 0) {
				if (!q->freed_hi || c < q->freed_lo)
					q->freed_lo = c;
				if (c + 1 > q->freed_hi)
					q->freed_hi = c + 1;
			}
			refcount_set_to(q, c, v);
		}
		qk__cache_mark_dirty(&q->rb_cache, boff);
		qk__cache_put(&q->rb_cache, boff);
		first += k;
		n -= k;
		if (after)
			after += k;
	}
	return ret;
}

int qk__qcow2_set_refcount(qk_image *img, uint64_t cluster, uint64_t value)
{
	struct qcow2 *q = qcow2_of(img);
	QK_LOCK_HELD(q);
	if (value > rc_max(q))
		return qk__err(ERANGE, "refcount %llu does not fit %u-bit refcounts",
			       (unsigned long long)value, 1u << q->refcount_order);
	int lret = qk__qcow2_load_refcounts(img);
	if (lret < 0)
		return lret;
	uint64_t boff, i;
	void *rb;
	int ret = block_of(img, cluster, &boff, &rb, &i);
	if (ret < 0)
		return ret;
	rb_set(rb, i, q->refcount_order, value);
	qk__cache_mark_dirty(&q->rb_cache, boff);
	qk__cache_put(&q->rb_cache, boff);
	refcount_set_to(q, cluster, value);
	return 0;
}

/* How many of the refcount ranges that [start, start+len) meets have no
 * block yet (past the table counts as none). Sets *past_table when one
 * lies beyond the refcount table. */
static uint64_t missing_blocks(const struct qcow2 *q, uint64_t start, uint64_t len,
			       bool *past_table)
{
	uint32_t eb = epb_bits(q);
	uint64_t m = 0;
	for (uint64_t r = start >> eb; r <= (start + len - 1) >> eb; r++) {
		if (r >= q->rt_entries)
			*past_table = true;
		if (r >= q->rt_entries || !q->rt[r])
			m++;
	}
	return m;
}

/*
 * Create the m missing refcount blocks of the ranges that [start, start+len)
 * meets, in the clusters start .. start+m-1 (free, and inside those
 * ranges). Every new block is counted, then all of them reach the disk
 * (one flush) before the refcount table entries that point at them (one
 * synced write of the span of entries). On failure the new blocks are
 * forgotten; at most a leak remains. Image lock held.
 */
static int place_blocks(qk_image *img, uint64_t start, uint64_t len, uint64_t m)
{
	struct qcow2 *q = qcow2_of(img);
	QK_LOCK_HELD(q);
	uint32_t eb = epb_bits(q);
	uint64_t r0 = start >> eb, r1 = (start + len - 1) >> eb, next = start;
	int ret = 0;
	for (uint64_t r = r0; r <= r1; r++) {
		if (q->rt[r])
			continue;
		uint64_t boff = next++ << q->cluster_bits;
		void *rb;
		ret = qk__cache_get_empty(&q->rb_cache, boff, &rb);
		if (ret < 0)
			break;
		qk__cache_put(&q->rb_cache, boff);
		q->rt[r] = boff;
	}
	if (ret == 0)
		ret = qk__qcow2_update_refcount(img, start << q->cluster_bits, m << q->cluster_bits, +1);
	if (ret == 0)
		ret = qk__cache_flush(&q->rb_cache);
	if (ret == 0) {
		uint64_t span = r1 - r0 + 1;
		uint8_t *be = malloc(span * 8);
		if (!be)
			ret = qk__err(ENOMEM, "out of memory");
		for (uint64_t i = 0; be && i < span; i++)
			qk_put_be64(be + 8 * i, q->rt[r0 + i]);
		if (be)
			ret = qk__qcow2_write_durable(img, q->rt_offset + 8 * r0, be, span * 8);
		free(be);
	}
	if (ret < 0) {
		for (uint64_t b = start; b < next; b++) {
			uint64_t boff = b << q->cluster_bits;
			qk__cache_discard(&q->rb_cache, boff);
			for (uint64_t r = r0; r <= r1; r++)
				if (q->rt[r] == boff)
					q->rt[r] = 0;
		}
		return ret;
	}
	if (next << q->cluster_bits > q->file_size)
		q->file_size = next << q->cluster_bits;
	return qk__qcow2_meta_add(img, start << q->cluster_bits, (next - start) << q->cluster_bits,
				  META_REFBLOCK);
}

/*
 * Allocate n contiguous free clusters. The run is found together with room
 * for the refcount blocks its ranges still lack, placed at its head, so
 * that a run may span many new ranges (a large L1 table with small
 * clusters). When the refcount table itself is too short it grows first,
 * and the search starts again (the new area may take part of the run).
 *
 * Clusters past both the end of the file (and the one cluster after it that
 * a reference ending inside it may name) and everything this handle
 * allocated are free whatever their stored refcount: nothing can be stored
 * there, so a count is a leak (a crash leaves those), and honouring a
 * crafted block of such counts would push the allocation, and the file,
 * as far as the counts reach. Such a cluster gets refcount 1, not one more.
 * No cluster handed out may be named by metadata (the metadata map): a
 * refcount of 0 there is corruption, reported as such.
 */
int qk__qcow2_alloc_clusters(qk_image *img, uint64_t n, uint64_t *offset)
{
	struct qcow2 *q = qcow2_of(img);
	QK_LOCK_HELD(q);
	int ret = qk__qcow2_load_refcounts(img);
	if (ret < 0)
		return ret;
	if (n == 0)
		return qk__err(EINVAL, "allocation of 0 clusters");
	if (q->free_hint == 0)
		q->free_hint = 1;       /* cluster 0 is the header */
	uint64_t fsize;
	if ((ret = qk__file_get_size(img->file, &fsize)) < 0)
		return ret;
	q->file_size = qk_max_u64(q->file_size, fsize);
	for (;;) {
		/* The first cluster no reference can name: a reference may end
		 * less than a cluster past the end of the file (QEMU counts it). */
		uint64_t eof = ((qk_max_u64(q->file_size, q->alloc_end) + q->cluster_size - 1) >>
				q->cluster_bits) + 1;
		uint64_t start = q->free_hint, run = 0, need = n, m = 0, first_free = UINT64_MAX;
		bool past_table = false;
		/* The refcounts scanned, read a block's worth at a time. */
		uint64_t rcs[512], rcs_first = 0, rcs_n = 0;
		for (uint64_t c = start; run < need; c++) {
			uint64_t rc = 0;
			if ((c + 1) << q->cluster_bits > MAX_HOST_OFFSET)
				return qk__err(EFBIG, "'%s' is full: host offsets would pass 2^56", img->filename);
			if (c < eof && (c < rcs_first || c >= rcs_first + rcs_n)) {
				rcs_first = c;
				rcs_n = qk_min_u64(eof - c, sizeof rcs / sizeof rcs[0]);
				if ((ret = qk__qcow2_get_refcounts(img, c, rcs_n, rcs)) < 0)
					return ret;
			}
			if (c < eof)
				rc = rcs[c - rcs_first];
			if (!rc && first_free == UINT64_MAX)
				first_free = c;
			if (rc) {
				run = 0;
				start = c + 1;
				need = n;
				continue;
			}
			if (++run == need) {
				past_table = false;
				m = missing_blocks(q, start, run, &past_table);
				need = n + m;
			}
		}
		if (past_table) {
			ret = grow_reftable(img, (start + need - 1) >> epb_bits(q), start + need);
			if (ret < 0)
				return ret;
			continue;       /* the new table's area may have taken the run */
		}
		ret = qk__qcow2_meta_check(img, start << q->cluster_bits, need << q->cluster_bits, 0,
					   "a new cluster");
		if (ret < 0)
			return ret;
		if (q->freed_hi && start < q->freed_hi && start + need > q->freed_lo) {
			/* The run reuses clusters freed since the last flush: the
			 * mappings that stopped using them reach the disk before
			 * anything is written there. */
			if ((ret = qk__cache_flush(&q->l2_cache)) < 0)
				return ret;
			q->freed_lo = q->freed_hi = 0;
		}
		if (m && (ret = place_blocks(img, start, need, m)) < 0)
			return ret;
		uint64_t first = start + m, below = first < eof ? qk_min_u64(n, eof - first) : 0;
		ret = qk__qcow2_update_refcount(img, first << q->cluster_bits, below << q->cluster_bits, +1);
		for (uint64_t c = first + below; ret == 0 && c < first + n; c++)
			ret = qk__qcow2_set_refcount(img, c, 1);
		if (ret < 0)
			return ret;
		/* Everything below the first free cluster seen is in use. */
		q->free_hint = first_free == start ? first + n : first_free;
		q->alloc_end = qk_max_u64(q->alloc_end, (first + n) << q->cluster_bits);
		*offset = first << q->cluster_bits;
		return 0;
	}
}

/*
 * As QEMU does: compressed data goes right after the previous compressed
 * data while the rest of that cluster holds it, or spills into the next
 * cluster when that one is the next free one; otherwise it starts a new
 * cluster. A cluster whose refcount is at its maximum takes no more.
 */
int qk__qcow2_alloc_bytes(qk_image *img, uint64_t len, uint64_t *offset)
{
	struct qcow2 *q = qcow2_of(img);
	QK_LOCK_HELD(q);
	uint64_t cs = q->cluster_size, off = q->free_byte, rc = 0;
	if (len == 0 || len > cs)
		return qk__err(EINVAL, "compressed allocation of %llu bytes", (unsigned long long)len);
	if (off) {
		int ret = qk__qcow2_get_refcount(img, off >> q->cluster_bits, &rc);
		if (ret < 0)
			return ret;
		if (rc == 0 || rc >= rc_max(q))
			off = 0;
	}
	uint64_t room = off ? cs - (off & (cs - 1)) : 0;
	int ret;
	if (off && room >= len) {
		ret = qk__qcow2_update_refcount(img, off, 1, +1);
	} else {
		uint64_t nc;
		ret = qk__qcow2_alloc_clusters(img, 1, &nc);
		if (ret < 0)
			return ret;
		if (off && nc == off + room)
			ret = qk__qcow2_update_refcount(img, off, 1, +1);  /* spills over */
		else
			off = nc;
	}
	if (ret < 0)
		return ret;
	*offset = off;
	q->free_byte = (off + len) & (cs - 1) ? off + len : 0;
	return 0;
}

void qk__qcow2_free_refcounts(struct qcow2 *q)
{
	qk__cache_destroy(&q->rb_cache);
	free(q->rt);
	q->rt = NULL;
}
