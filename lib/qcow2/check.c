/*
 * Reference accounting and refcount rebuild.
 *
 * Design: one pass over every structure that references host clusters
 * (header, active L1 and its L2 tables and data, snapshot table and every
 * snapshot's L1/L2/data, bitmap directory, tables and data) counts the
 * references per host cluster in an in-memory table sized by the file
 * (bounded: one u32 per cluster of the file). A rebuild then writes a new
 * refcount structure (blocks first, then the table, all counting
 * themselves) past the end of the file, syncs it, and only then points the
 * header at it, so a crash at any moment leaves either the old structure
 * or the new one in force. The old structure's clusters are simply not
 * counted: they become free space. The COPIED flags of the active tables
 * are corrected from the counts first.
 */
#include "qcow2/qcow2.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

struct refs {
	uint32_t *count;
	uint64_t n;             /* clusters covered */
};

/* Count one reference to every cluster meeting [off, off+len). */
static int add_ref(qk_image *img, struct refs *r, uint64_t off, uint64_t len, const char *what)
{
	struct qcow2 *q = qcow2_of(img);
	if (len == 0)
		return 0;
	uint64_t first = off >> q->cluster_bits, last = (off + len - 1) >> q->cluster_bits;
	if (off > MAX_HOST_OFFSET || last >= r->n)
		return qk__qcow2_corrupt(img, "%s at offset 0x%llx lies past the end of the file",
					 what, (unsigned long long)off);
	for (uint64_t c = first; c <= last; c++)
		if (r->count[c] < UINT32_MAX)
			r->count[c]++;
	return 0;
}

/* Count an L1 table, its L2 tables and their data clusters. */
static int count_l1(qk_image *img, struct refs *r, uint64_t l1_off, uint32_t l1_size,
		    const uint64_t *l1_mem)
{
	struct qcow2 *q = qcow2_of(img);
	uint64_t cs = q->cluster_size;
	int ret = add_ref(img, r, l1_off, (uint64_t)l1_size * 8, "L1 table");
	if (ret < 0)
		return ret;
	uint64_t *l1 = (uint64_t *)l1_mem;
	if (!l1) {
		if ((uint64_t)l1_size * 8 > MAX_L1_BYTES || (l1_off & (cs - 1)))
			return qk__qcow2_corrupt(img, "snapshot L1 table at 0x%llx is invalid",
						 (unsigned long long)l1_off);
		l1 = malloc((uint64_t)l1_size * 8 + 8);
		if (!l1)
			return qk__err(ENOMEM, "out of memory");
		ret = qk__file_pread(img->file, l1, (uint64_t)l1_size * 8, l1_off);
		if (ret < 0)
			goto out;
		qk_be64_table_to_host(l1, l1_size);
	}
	uint64_t *l2 = malloc(cs);
	if (!l2) {
		ret = qk__err(ENOMEM, "out of memory");
		goto out;
	}
	unsigned shift = 62 - (q->cluster_bits - 8);
	uint64_t entries = 1ull << q->l2_bits;
	for (uint32_t i = 0; i < l1_size && ret == 0; i++) {
		uint64_t l2_off = l1[i] & L1E_OFFSET_MASK;
		if (!l2_off)
			continue;
		if (l2_off & (cs - 1)) {
			ret = qk__qcow2_corrupt(img, "L2 table offset 0x%llx unaligned (L1 index %u)",
						(unsigned long long)l2_off, i);
			break;
		}
		ret = add_ref(img, r, l2_off, cs, "L2 table");
		if (ret == 0)
			ret = qk__file_pread(img->file, l2, cs, l2_off);
		if (ret < 0)
			break;
		qk_be64_table_to_host(l2, cs / 8);
		for (uint64_t j = 0; j < entries && ret == 0; j++) {
			uint64_t e = q->extl2 ? l2[2 * j] : l2[j];
			if (e & QCOW_OFLAG_COMPRESSED) {
				uint64_t coff = e & ((1ull << shift) - 1);
				uint64_t sectors = ((e >> shift) & ((1ull << (q->cluster_bits - 8)) - 1)) + 1;
				ret = add_ref(img, r, coff, sectors * 512 - (coff & 511), "compressed cluster");
				continue;
			}
			uint64_t host = e & L2E_OFFSET_MASK;
			if (host && !q->data_file) {
				if (host & (cs - 1))
					ret = qk__qcow2_corrupt(img, "data cluster offset 0x%llx unaligned",
								(unsigned long long)host);
				else
					ret = add_ref(img, r, host, cs, "data cluster");
			}
		}
	}
	free(l2);
out:
	if (l1 != l1_mem)
		free(l1);
	return ret;
}

/* Bitmap directory, tables and data clusters. */
static int count_bitmaps(qk_image *img, struct refs *r)
{
	struct qcow2 *q = qcow2_of(img);
	int ret = add_ref(img, r, q->bitmap_dir_offset, q->bitmap_dir_size, "bitmap directory");
	for (uint32_t i = 0; ret == 0 && i < q->n_bitmaps; i++) {
		const struct qk_bitmap *b = &q->bitmaps[i];
		uint64_t bytes = (uint64_t)b->table_size * 8;
		if (bytes > (512ull << 20) || (b->table_offset & (q->cluster_size - 1)))
			return qk__qcow2_corrupt(img, "bitmap table of '%s' is invalid", b->name);
		ret = add_ref(img, r, b->table_offset, bytes, "bitmap table");
		if (ret < 0 || !bytes)
			break;
		uint64_t *t = malloc(bytes);
		if (!t)
			return qk__err(ENOMEM, "out of memory");
		ret = qk__file_pread(img->file, t, bytes, b->table_offset);
		for (uint64_t j = 0; ret == 0 && j < b->table_size; j++) {
			uint64_t off = qk_be64(&t[j]) & L2E_OFFSET_MASK;
			if (off)
				ret = add_ref(img, r, off, q->cluster_size, "bitmap data");
		}
		free(t);
	}
	return ret;
}

/* Count every reference in the image except the refcount structure's own. */
static int count_references(qk_image *img, struct refs *r)
{
	struct qcow2 *q = qcow2_of(img);
	uint64_t fsize;
	int ret = qk__file_get_size(img->file, &fsize);
	if (ret < 0)
		return ret;
	r->n = (fsize + q->cluster_size - 1) >> q->cluster_bits;
	if (r->n > (1ull << 32))
		return qk__err(EFBIG, "'%s' is too large to count its references", img->filename);
	r->count = calloc(r->n ? r->n : 1, sizeof *r->count);
	if (!r->count)
		return qk__err(ENOMEM, "out of memory for %llu cluster counts", (unsigned long long)r->n);
	ret = add_ref(img, r, 0, q->cluster_size, "header");
	if (ret == 0)
		ret = count_l1(img, r, q->l1_offset, q->l1_size, q->l1);
	if (ret == 0 && q->nb_snapshots)
		ret = add_ref(img, r, q->snapshots_offset, q->snapshots_bytes, "snapshot table");
	for (uint32_t i = 0; ret == 0 && i < q->n_snapshots; i++)
		ret = count_l1(img, r, q->snapshots[i].l1_table_offset, q->snapshots[i].l1_size, NULL);
	if (ret == 0 && q->n_bitmaps)
		ret = count_bitmaps(img, r);
	return ret;
}

/* Set the COPIED flags of the active L1 and L2 tables from the counts. */
static int fix_copied(qk_image *img, const struct refs *r)
{
	struct qcow2 *q = qcow2_of(img);
	uint64_t cs = q->cluster_size, entries = 1ull << q->l2_bits;
	for (uint32_t i = 0; i < q->l1_size; i++) {
		uint64_t l2_off = q->l1[i] & L1E_OFFSET_MASK;
		if (!l2_off)
			continue;
		bool l1_copied = r->count[l2_off >> q->cluster_bits] == 1;
		uint64_t *t;
		int ret = qk__cache_get(&q->l2_cache, l2_off, (void **)&t);
		if (ret < 0)
			return ret;
		bool dirty = false;
		for (uint64_t j = 0; j < entries; j++) {
			uint64_t *e = &t[q->extl2 ? 2 * j : j];
			uint64_t host = *e & L2E_OFFSET_MASK;
			if (*e & QCOW_OFLAG_COMPRESSED)
				continue;
			bool want;
			if (q->data_file)
				want = host || (*e & QCOW_OFLAG_COPIED);
			else
				want = host && r->count[host >> q->cluster_bits] == 1;
			if (want != !!(*e & QCOW_OFLAG_COPIED)) {
				*e ^= QCOW_OFLAG_COPIED;
				dirty = true;
			}
		}
		if (dirty)
			qk__cache_mark_dirty(&q->l2_cache, l2_off);
		qk__cache_put(&q->l2_cache, l2_off);
		if (l1_copied != !!(q->l1[i] & QCOW_OFLAG_COPIED)) {
			q->l1[i] ^= QCOW_OFLAG_COPIED;
			uint8_t be[8];
			qk_put_be64(be, q->l1[i]);
			ret = img->file->ops->pwrite(img->file, be, 8, q->l1_offset + 8 * (uint64_t)i);
			if (ret < 0)
				return ret;
		}
	}
	(void)cs;
	return qk__cache_flush(&q->l2_cache);
}

int qk__qcow2_rebuild_refcounts(qk_image *img)
{
	struct qcow2 *q = qcow2_of(img);
	struct refs r = { 0 };
	uint64_t cs = q->cluster_size;
	uint32_t order = q->refcount_order;
	uint64_t epb = cs * 8 >> order;
	uint64_t max = order == 6 ? UINT64_MAX : (1ull << (1u << order)) - 1;
	uint8_t *blk = NULL;
	uint64_t *table = NULL;
	int ret = count_references(img, &r);
	if (ret == 0)
		ret = fix_copied(img, &r);
	if (ret < 0)
		goto out;
	for (uint64_t c = 0; c < r.n; c++)
		if (r.count[c] > max) {
			ret = qk__qcow2_corrupt(img, "cluster at 0x%llx has %u references, more than %u-bit refcounts hold",
						(unsigned long long)(c * cs), r.count[c], 1u << order);
			goto out;
		}
	/* New blocks and table past everything in use, counting themselves. */
	uint64_t area = r.n, blocks = 0, tc = 0;
	for (int iter = 0; iter < 64; iter++) {
		uint64_t total = area + blocks + tc;
		uint64_t nb = (total + epb - 1) / epb, ntc = (nb * 8 + cs - 1) / cs;
		if (nb == blocks && ntc == tc)
			break;
		blocks = nb;
		tc = ntc;
	}
	if (tc * cs > MAX_REFTABLE_BYTES || ((area + blocks + tc) << q->cluster_bits) > MAX_HOST_OFFSET) {
		ret = qk__err(EFBIG, "'%s' is too large for a new refcount table", img->filename);
		goto out;
	}
	blk = malloc(cs);
	table = calloc(tc, cs);
	if (!blk || !table) {
		ret = qk__err(ENOMEM, "out of memory rebuilding refcounts");
		goto out;
	}
	uint64_t total = area + blocks + tc;
	for (uint64_t b = 0; b < blocks && ret == 0; b++) {
		memset(blk, 0, cs);
		for (uint64_t i = 0; i < epb; i++) {
			uint64_t c = b * epb + i, v;
			if (c >= total)
				break;
			v = c < area ? r.count[c] : 1;    /* the new structure itself */
			if (!v)
				continue;
			switch (order) {
			case 0: case 1: case 2: {
				uint32_t bits = 1u << order, per = 8 / bits;
				blk[i / per] |= (uint8_t)(v << (bits * (i % per)));
				break;
			}
			case 3: blk[i] = (uint8_t)v; break;
			case 4: qk_put_be16(blk + 2 * i, (uint16_t)v); break;
			case 5: qk_put_be32(blk + 4 * i, (uint32_t)v); break;
			default: qk_put_be64(blk + 8 * i, v); break;
			}
		}
		uint64_t boff = (area + b) * cs;
		qk_put_be64(&table[b], boff);
		ret = img->file->ops->pwrite(img->file, blk, cs, boff);
	}
	if (ret == 0)
		ret = img->file->ops->pwrite(img->file, table, tc * cs, (area + blocks) * cs);
	if (ret == 0)
		ret = img->file->ops->sync(img->file);
	if (ret < 0)
		goto out;
	uint8_t hdr[12];
	qk_put_be64(hdr, (area + blocks) * cs);
	qk_put_be32(hdr + 8, (uint32_t)tc);
	ret = img->file->ops->pwrite(img->file, hdr, sizeof hdr, HDR_RT_OFFSET);
	if (ret == 0)
		ret = img->file->ops->sync(img->file);
	if (ret < 0)
		goto out;
	/* Switch the in-memory view to the new structure. */
	qk__qcow2_free_refcounts(q);
	q->rt_offset = (area + blocks) * cs;
	q->rt_clusters = (uint32_t)tc;
	q->file_size = total * cs;
	q->free_hint = 1;
out:
	free(r.count);
	free(blk);
	free(table);
	return ret;
}
