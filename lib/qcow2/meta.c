/*
 * The metadata map: which host clusters of the image file hold metadata,
 * and of which kind, so that no write lands on metadata it was not meant
 * for (the overlap check).
 *
 * Design note. The map is a hash set of host cluster indices with open
 * addressing (linear probing, backward-shift deletion, at most half full),
 * each with the kinds of structure found there (META_* bits) and how many
 * references from other metadata name it (an L2 table is named by the
 * active L1 and by every snapshot L1 that shares it). Invariants:
 * - Built on the first write of a handle (and again after a change of the
 *   whole refcount structure) from what the metadata names: the header,
 *   the active L1 table and every L2 table it names, the refcount table
 *   and every block it names, the snapshot table, every snapshot's L1
 *   table and the L2 tables those name, the bitmap directory, the bitmap
 *   tables and their data clusters. Entries are taken as they are, reserved
 *   bits masked off, whether or not they are valid: a cluster some table
 *   names is never handed to guest data, even past the end of the file.
 * - Kept up to date by the writers that create or drop such a reference
 *   (a new L2 table, a new L1 table, new refcount blocks or table, bitmap
 *   data), so a check costs one hash lookup per cluster written, whatever
 *   the size of the image (QEMU's cached check walks the L1 and refcount
 *   tables on every write).
 * - A cluster leaves the map only when its last reference goes: a freed
 *   refcount alone never takes a cluster out (a wrong refcount of 0 is how
 *   an allocator would be led to hand metadata out as data).
 * Memory: 12 bytes a slot, at most twice the clusters named; the image
 * lock guards the map.
 */
#include "qcow2/qcow2.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#define META_COUNT_SHIFT 8
#define META_COUNT_MAX   ((1u << 24) - 1)   /* saturates: then kept for good */
#define META_TYPE_MASK   0xffu

static const char *const meta_names[] = {
	"the header", "the active L1 table", "an L2 table", "the refcount table",
	"a refcount block", "the snapshot table", "a snapshot L1 table", "a bitmap structure",
};

/* A name for the first kind in `types`. */
static const char *meta_name(unsigned types)
{
	for (unsigned i = 0; i < sizeof meta_names / sizeof meta_names[0]; i++)
		if (types & (1u << i))
			return meta_names[i];
	return "metadata";
}

static uint64_t slot_of(const struct qk__metamap *m, uint64_t key)
{
	return (key * 0x9E3779B97F4A7C15ull >> 17) & m->mask;
}

/* Slot holding cluster c, or the free slot where it would go. */
static uint64_t find(const struct qk__metamap *m, uint64_t c, bool *found)
{
	uint64_t key = c + 1, s = slot_of(m, key);
	while (m->keys[s]) {
		if (m->keys[s] == key) {
			*found = true;
			return s;
		}
		s = (s + 1) & m->mask;
	}
	*found = false;
	return s;
}

static int grow(struct qk__metamap *m)
{
	uint64_t cap = m->keys ? 2 * (m->mask + 1) : 1024;
	struct qk__metamap n = { .mask = cap - 1 };
	n.keys = calloc(cap, sizeof *n.keys);
	n.vals = calloc(cap, sizeof *n.vals);
	if (!n.keys || !n.vals) {
		free(n.keys);
		free(n.vals);
		return qk__err(ENOMEM, "out of memory for the metadata map");
	}
	for (uint64_t i = 0; m->keys && i <= m->mask; i++) {
		if (!m->keys[i])
			continue;
		bool found;
		uint64_t s = find(&n, m->keys[i] - 1, &found);
		n.keys[s] = m->keys[i];
		n.vals[s] = m->vals[i];
	}
	n.used = m->used;
	free(m->keys);
	free(m->vals);
	*m = n;
	return 0;
}

void qk__qcow2_meta_free(struct qcow2 *q)
{
	free(q->meta.keys);
	free(q->meta.vals);
	memset(&q->meta, 0, sizeof q->meta);
	q->meta_ready = false;
}

/* One more reference of kind `type` to each cluster meeting [off, off+len). */
static int meta_add(struct qcow2 *q, uint64_t off, uint64_t len, unsigned type)
{
	struct qk__metamap *m = &q->meta;
	if (len == 0 || off > MAX_HOST_OFFSET)
		return 0;       /* beyond any offset a write can reach */
	uint64_t first = off >> q->cluster_bits;
	uint64_t last = (qk_min_u64(off + len - 1, MAX_HOST_OFFSET)) >> q->cluster_bits;
	for (uint64_t c = first; c <= last; c++) {
		if (2 * (m->used + 1) > (m->keys ? m->mask + 1 : 0)) {
			int ret = grow(m);
			if (ret < 0)
				return ret;
		}
		bool found;
		uint64_t s = find(m, c, &found);
		if (!found) {
			m->keys[s] = c + 1;
			m->vals[s] = 0;
			m->used++;
		}
		uint32_t count = m->vals[s] >> META_COUNT_SHIFT;
		if (count < META_COUNT_MAX)
			count++;
		m->vals[s] = (m->vals[s] & META_TYPE_MASK) | type | count << META_COUNT_SHIFT;
	}
	return 0;
}

static void remove_slot(struct qk__metamap *m, uint64_t hole)
{
	m->keys[hole] = 0;
	m->vals[hole] = 0;
	m->used--;
	for (uint64_t s = (hole + 1) & m->mask; m->keys[s]; s = (s + 1) & m->mask) {
		uint64_t home = slot_of(m, m->keys[s]);
		if (((s - home) & m->mask) >= ((s - hole) & m->mask)) {
			m->keys[hole] = m->keys[s];
			m->vals[hole] = m->vals[s];
			m->keys[s] = 0;
			m->vals[s] = 0;
			hole = s;
		}
	}
}

int qk__qcow2_meta_add(qk_image *img, uint64_t off, uint64_t len, unsigned type)
{
	struct qcow2 *q = qcow2_of(img);
	QK_LOCK_HELD(q);
	return q->meta_ready ? meta_add(q, off, len, type) : 0;
}

void qk__qcow2_meta_del(qk_image *img, uint64_t off, uint64_t len)
{
	struct qcow2 *q = qcow2_of(img);
	QK_LOCK_HELD(q);
	struct qk__metamap *m = &q->meta;
	if (!q->meta_ready || len == 0)
		return;
	uint64_t first = off >> q->cluster_bits, last = (off + len - 1) >> q->cluster_bits;
	for (uint64_t c = first; c <= last; c++) {
		bool found;
		uint64_t s = find(m, c, &found);
		if (!found)
			continue;
		uint32_t count = m->vals[s] >> META_COUNT_SHIFT;
		if (count == META_COUNT_MAX)
			continue;
		if (count <= 1)
			remove_slot(m, s);
		else
			m->vals[s] -= 1u << META_COUNT_SHIFT;
	}
}

/* Add an L1 table at l1_off (l1_size entries, in host order in `l1`, or
 * read from the file when NULL) and the L2 tables it names. */
static int add_l1(qk_image *img, uint64_t l1_off, uint32_t l1_size, const uint64_t *l1,
		  unsigned type)
{
	struct qcow2 *q = qcow2_of(img);
	uint64_t bytes = (uint64_t)l1_size * 8;
	int ret = meta_add(q, l1_off, bytes, type);
	if (ret < 0 || bytes == 0)
		return ret;
	uint64_t *own = NULL;
	if (!l1) {
		/* A snapshot's table: read when it lies in the file (the snapshot
		 * table was checked at open; a table past the end names nothing). */
		uint64_t end;
		if (bytes > MAX_L1_BYTES || qk_add_overflow(l1_off, bytes, &end) || end > q->file_size)
			return 0;
		if (!(own = malloc(bytes)))
			return qk__err(ENOMEM, "out of memory");
		if ((ret = qk__file_pread(img->file, own, bytes, l1_off)) < 0) {
			free(own);
			return ret;
		}
		qk_be64_table_to_host(own, l1_size);
		l1 = own;
	}
	for (uint32_t i = 0; ret == 0 && i < l1_size; i++) {
		uint64_t l2 = l1[i] & L1E_OFFSET_MASK;
		if (l2)
			ret = meta_add(q, l2, q->cluster_size, META_L2);
	}
	free(own);
	return ret;
}

/* The bitmap directory, every bitmap table and the data clusters they name
 * (tables read a chunk at a time: they may be large). */
static int add_bitmaps(qk_image *img)
{
	struct qcow2 *q = qcow2_of(img);
	enum { CHUNK = 8192 };          /* table entries read at once */
	int ret = meta_add(q, q->bitmap_dir_offset, q->bitmap_dir_size, META_BITMAP);
	uint64_t *t = NULL;
	for (uint32_t i = 0; ret == 0 && i < q->n_bitmaps; i++) {
		const struct qk_bitmap *b = &q->bitmaps[i];
		uint64_t bytes = (uint64_t)b->table_size * 8, end;
		ret = meta_add(q, b->table_offset, bytes, META_BITMAP);
		if (ret < 0 || bytes == 0 || qk_add_overflow(b->table_offset, bytes, &end) ||
		    end > q->file_size)
			continue;       /* a table outside the file names nothing */
		if (!t && !(t = malloc(CHUNK * sizeof *t)))
			ret = qk__err(ENOMEM, "out of memory");
		for (uint64_t j = 0; ret == 0 && j < b->table_size; j += CHUNK) {
			uint64_t k = qk_min_u64(CHUNK, b->table_size - j);
			ret = qk__file_pread(img->file, t, k * 8, b->table_offset + 8 * j);
			for (uint64_t x = 0; ret == 0 && x < k; x++) {
				uint64_t off = qk_be64(&t[x]) & L2E_OFFSET_MASK;
				if (off)
					ret = meta_add(q, off, q->cluster_size, META_BITMAP);
			}
		}
	}
	free(t);
	return ret;
}

/* Build the map from what the metadata names now. The refcount blocks are
 * in it when the refcount table is loaded; refcount.c adds them when it
 * loads the table later. Image lock held. */
static int build(qk_image *img)
{
	struct qcow2 *q = qcow2_of(img);
	QK_LOCK_HELD(q);
	qk__qcow2_meta_free(q);
	int ret = meta_add(q, 0, q->cluster_size, META_HEADER);
	if (ret == 0)
		ret = add_l1(img, q->l1_offset, q->l1_size, q->l1, META_L1);
	if (ret == 0 && q->rt)
		ret = meta_add(q, q->rt_offset, (uint64_t)q->rt_clusters * q->cluster_size, META_REFTABLE);
	for (uint64_t i = 0; ret == 0 && i < q->rt_entries; i++) {
		uint64_t b = q->rt[i] & ~RT_RESERVED_MASK;
		if (b)
			ret = meta_add(q, b, q->cluster_size, META_REFBLOCK);
	}
	if (ret == 0 && q->nb_snapshots)
		ret = meta_add(q, q->snapshots_offset, q->snapshots_bytes, META_SNAPTABLE);
	for (uint32_t i = 0; ret == 0 && i < q->n_snapshots; i++)
		ret = add_l1(img, q->snapshots[i].l1_table_offset, q->snapshots[i].l1_size, NULL,
			     META_SNAP_L1);
	if (ret == 0 && q->n_bitmaps)
		ret = add_bitmaps(img);
	if (ret < 0) {
		qk__qcow2_meta_free(q);
		return ret;
	}
	q->meta_ready = true;
	return 0;
}

int qk__qcow2_meta_ready(qk_image *img)
{
	return qcow2_of(img)->meta_ready ? 0 : build(img);
}

void qk__qcow2_meta_invalidate(qk_image *img)
{
	qk__qcow2_meta_free(qcow2_of(img));
}

unsigned qk__qcow2_meta_hit(qk_image *img, uint64_t off, uint64_t len, unsigned allowed,
			     uint64_t *cluster_off)
{
	struct qcow2 *q = qcow2_of(img);
	QK_LOCK_HELD(q);
	const struct qk__metamap *m = &q->meta;
	if (len == 0 || !q->meta_ready)
		return 0;
	uint64_t first = off >> q->cluster_bits;
	uint64_t last = qk_min_u64(off + len - 1, MAX_HOST_OFFSET) >> q->cluster_bits;
	for (uint64_t c = first; c <= last; c++) {
		bool found;
		uint64_t s = find(m, c, &found);
		unsigned types = found ? m->vals[s] & META_TYPE_MASK & ~allowed : 0;
		if (types) {
			*cluster_off = c << q->cluster_bits;
			return types;
		}
	}
	return 0;
}

int qk__qcow2_meta_refuse(qk_image *img, const char *what, uint64_t off, unsigned types,
			  uint64_t cluster_off)
{
	return qk__qcow2_corrupt(img, "preventing %s at offset 0x%llx: it overlaps %s (cluster at 0x%llx)",
				 what, (unsigned long long)off, meta_name(types),
				 (unsigned long long)cluster_off);
}

int qk__qcow2_meta_check(qk_image *img, uint64_t off, uint64_t len, unsigned allowed,
			 const char *what)
{
	uint64_t at;
	int ret = len ? qk__qcow2_meta_ready(img) : 0;
	if (ret < 0)
		return ret;
	unsigned types = qk__qcow2_meta_hit(img, off, len, allowed, &at);
	return types ? qk__qcow2_meta_refuse(img, what, off, types, at) : 0;
}

int qk__qcow2_meta_find(qk_image *img, uint64_t first, uint64_t n, uint64_t *hit)
{
	struct qcow2 *q = qcow2_of(img);
	int ret = qk__qcow2_meta_ready(img);
	if (ret < 0)
		return ret;
	for (uint64_t c = first; c < first + n; c++) {
		bool found;
		find(&q->meta, c, &found);
		if (found) {
			*hit = c;
			return 1;
		}
	}
	return 0;
}

int qk__qcow2_pre_write_l2(void *opaque, uint64_t offset)
{
	qk_image *img = opaque;
	return qk__qcow2_meta_check(img, offset, qcow2_of(img)->cluster_size, META_L2,
				    "an L2 table write");
}

int qk__qcow2_pre_write_refblock(void *opaque, uint64_t offset)
{
	qk_image *img = opaque;
	return qk__qcow2_meta_check(img, offset, qcow2_of(img)->cluster_size, META_REFBLOCK,
				    "a refcount block write");
}
