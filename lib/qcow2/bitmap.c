/*
 * Persistent bitmaps: the directory (read at open, at most MAX_BITMAPS
 * entries in a directory of at most MAX_BITMAP_DIR_BYTES inside the file),
 * the enabled bitmaps kept true while the image is written, which ranges
 * a bitmap marks dirty, and writing the directory again (the changes of
 * bitmap-edit.c, resize, check -r all).
 *
 * Design note. q->bitmaps[i] is the public view of directory entry i, and
 * q->bitmap_priv[i] the rest: where the entry lies, its granularity, and
 * its bits once loaded. Invariants:
 * - A bitmap whose in-use flag is clear on disk describes the guest disk,
 *   so its table and data clusters are never written in place. A change
 *   writes new ones and a new directory, flushes the refcounts and syncs,
 *   and only then rewrites the header's bitmaps extension (and the
 *   autoclear bit beside it) in one write; the old clusters are freed
 *   after that. A power cut leaves the old bitmaps or the new ones, and
 *   at most leaked clusters (qk__qcow2_bitmaps_commit).
 * - A tracked bitmap is enabled, was consistent, and this handle marked
 *   it in use on disk before the first change of the guest disk; its bits
 *   are loaded and every write, zero write and discard sets them. Being in
 *   use on disk, its clusters may be written in place: at close its
 *   changed clusters are, everything is synced, and only then is the flag
 *   cleared (qk__qcow2_bitmaps_store).
 * - A bitmap in use on disk that this handle does not track is
 *   inconsistent (a program had the image open for writing and never
 *   closed it): its bits mean nothing. It stays as it is; only removing
 *   it is allowed (qk_bitmap_remove, check -r all).
 * Everything here runs under the image lock.
 */
#include "qcow2/qcow2.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define BMT_RESERVED_MASK 0xff000000000001feull
#define BMT_ALL_ONES      1ull
#define MAX_TRACKED_BYTES (256ull << 20)   /* bitmap data held in memory */

void qk__qcow2_bits_free(struct qk__bitmap_bits *b)
{
	if (!b)
		return;
	free(b->table);
	free(b->data);
	free(b->changed);
	free(b);
}

/* Table entries (clusters of bits) a bitmap of `nbits` bits needs. */
static uint64_t table_entries(const struct qcow2 *q, uint64_t nbits)
{
	return ((nbits + 7) / 8 + q->cluster_size - 1) >> q->cluster_bits;
}

/* Bits a bitmap of granularity 2^gb needs for `size` bytes. */
static uint64_t nbits_for(uint64_t size, uint32_t gb)
{
	return (size >> gb) + ((size & ((1ull << gb) - 1)) != 0);
}

int qk__qcow2_bits_new(const struct qcow2 *q, uint64_t nbits, const struct qk__bitmap_bits *from,
		       struct qk__bitmap_bits **out)
{
	uint64_t n = table_entries(q, nbits);
	struct qk__bitmap_bits *b = calloc(1, sizeof *b);
	if (b) {
		b->nbits = nbits;
		b->table = calloc(n ? n : 1, 8);
		b->data = calloc(n ? n : 1, q->cluster_size);
		b->changed = calloc(n ? n : 1, 1);
	}
	if (!b || !b->table || !b->data || !b->changed) {
		qk__qcow2_bits_free(b);
		return qk__err(ENOMEM, "out of memory for a bitmap of %llu bits",
			       (unsigned long long)nbits);
	}
	if (from) {
		/* The bits both have, the rest clean. */
		uint64_t keep = qk_min_u64(nbits, from->nbits);
		memcpy(b->data, from->data, keep / 8);
		if (keep % 8)
			b->data[keep / 8] = from->data[keep / 8] & (uint8_t)((1u << (keep % 8)) - 1);
	}
	*out = b;
	return 0;
}

void qk__qcow2_bits_set(const struct qcow2 *q, struct qk__bitmap_bits *b, uint32_t gb, uint64_t off,
			uint64_t len)
{
	uint64_t bpc = q->cluster_size * 8;     /* bits per data cluster */
	if (b->nbits == 0 || len == 0)
		return;       /* an empty image has no bits */
	uint64_t a = off >> gb, z = (off + len - 1) >> gb;
	if (z >= b->nbits)
		z = b->nbits - 1;
	for (uint64_t bit = a; bit <= z;) {
		uint8_t *p = &b->data[bit / 8];
		if (bit % 8 == 0 && z - bit >= 7) {
			if (*p != 0xff) {
				*p = 0xff;
				b->changed[bit / bpc] = 1;
				b->any_changed = true;
			}
			bit += 8;
			continue;
		}
		uint8_t m = (uint8_t)(1u << (bit % 8));
		if (!(*p & m)) {
			*p |= m;
			b->changed[bit / bpc] = 1;
			b->any_changed = true;
		}
		bit++;
	}
}

uint64_t qk__qcow2_bits_run(const struct qk__bitmap_bits *b, uint64_t k, bool set)
{
	const uint64_t word = set ? ~0ull : 0;
	while (k < b->nbits) {
		if (k % 64 == 0 && b->nbits - k >= 64) {
			uint64_t w;
			memcpy(&w, b->data + k / 8, 8);
			if (w == word) {
				k += 64;
				continue;
			}
		}
		if (k % 8 == 0 && b->nbits - k >= 8 && b->data[k / 8] == (uint8_t)word) {
			k += 8;
			continue;
		}
		if (!!(b->data[k / 8] & (1u << (k % 8))) != set)
			return k;
		k++;
	}
	return b->nbits;
}

void qk__qcow2_free_bitmaps(struct qcow2 *q)
{
	for (uint32_t i = 0; i < q->n_bitmaps; i++) {
		free((char *)q->bitmaps[i].name);
		if (q->bitmap_priv)
			qk__qcow2_bits_free(q->bitmap_priv[i].bits);
	}
	free(q->bitmaps);
	free(q->bitmap_priv);
	q->bitmap_priv = NULL;
	q->bitmaps = NULL;
	q->n_bitmaps = 0;
	q->n_tracked = 0;
}

/* Parse directory entry i at dir[pos] (dir_size bytes in all): its length
 * in *entry_len. 0 or -EINVAL (recorded). */
static int parse_entry(qk_image *img, const uint8_t *dir, uint64_t dir_size, uint64_t pos,
		       uint32_t i, uint64_t *entry_len)
{
	struct qcow2 *q = qcow2_of(img);
	if (dir_size - pos < BM_DIR_FIXED_LEN)
		return qk__err(EINVAL, "bitmap directory of '%s' ends inside entry %u", img->filename, i);
	const uint8_t *e = dir + pos;
	uint32_t extra = qk_be32(e + 20);
	uint16_t name_len = qk_be16(e + 18);
	*entry_len = (BM_DIR_FIXED_LEN + (uint64_t)extra + name_len + 7) & ~7ull;
	if (name_len == 0 || *entry_len > dir_size - pos)
		return qk__err(EINVAL, "bitmap directory entry %u of '%s' is malformed", i, img->filename);
	uint8_t gran_bits = e[17];
	if (gran_bits > 63)
		return qk__err(EINVAL, "bitmap %u of '%s' has granularity 2^%u", i, img->filename,
			       gran_bits);
	struct qk_bitmap *b = &q->bitmaps[i];
	struct qk__bitmap_priv *p = &q->bitmap_priv[i];
	b->table_offset = qk_be64(e);
	b->table_size = qk_be32(e + 8);
	uint32_t flags = qk_be32(e + 12);
	b->flags = (flags & BM_FLAG_IN_USE ? QK_BITMAP_IN_USE : 0) |
		   (flags & BM_FLAG_AUTO ? QK_BITMAP_AUTO : 0);
	p->extra_flags = flags & ~(uint32_t)(BM_FLAG_IN_USE | BM_FLAG_AUTO);
	p->extra_len = extra;
	p->gran_bits = gran_bits;
	p->entry_off = q->bitmap_dir_offset + pos;
	b->type = e[16];
	b->granularity = 1ull << gran_bits;
	char *name = malloc(name_len + 1u);
	if (!name)
		return qk__err(ENOMEM, "out of memory");
	memcpy(name, e + BM_DIR_FIXED_LEN + extra, name_len);
	name[name_len] = '\0';
	b->name = name;
	return 0;
}

int qk__qcow2_read_bitmaps(qk_image *img, uint64_t dir_offset, uint64_t dir_size,
			   uint32_t nb_bitmaps)
{
	struct qcow2 *q = qcow2_of(img);
	uint64_t end;
	if (nb_bitmaps == 0 || nb_bitmaps > MAX_BITMAPS)
		return qk__err(EINVAL, "bitmaps extension of '%s' names %u bitmaps (1 to %u allowed)",
			       img->filename, nb_bitmaps, MAX_BITMAPS);
	if (dir_size == 0 || dir_size > MAX_BITMAP_DIR_BYTES)
		return qk__err(EINVAL, "bitmap directory of '%s' has a bad size (%llu bytes)",
			       img->filename, (unsigned long long)dir_size);
	if (dir_offset % q->cluster_size || dir_offset == 0 ||
	    qk_add_overflow(dir_offset, dir_size, &end) || end > q->file_size)
		return qk__err(EINVAL, "bitmap directory of '%s' (offset 0x%llx, %llu bytes) lies outside the file",
			       img->filename, (unsigned long long)dir_offset, (unsigned long long)dir_size);
	uint8_t *dir = malloc(dir_size);
	q->bitmaps = calloc(nb_bitmaps, sizeof *q->bitmaps);
	q->bitmap_priv = calloc(nb_bitmaps, sizeof *q->bitmap_priv);
	if (!dir || !q->bitmaps || !q->bitmap_priv) {
		free(dir);
		return qk__err(ENOMEM, "out of memory");
	}
	q->bitmap_dir_offset = dir_offset;
	q->bitmap_dir_size = dir_size;
	int ret = qk__file_pread(img->file, dir, dir_size, dir_offset);
	uint64_t pos = 0;
	for (uint32_t i = 0; ret == 0 && i < nb_bitmaps; i++) {
		uint64_t len = 0;
		ret = parse_entry(img, dir, dir_size, pos, i, &len);
		if (ret == 0)
			q->n_bitmaps = i + 1;
		pos += len;
	}
	free(dir);
	return ret;
}

int64_t qk__qcow2_bitmap_find(const struct qcow2 *q, const char *name)
{
	for (uint32_t i = 0; i < q->n_bitmaps; i++)
		if (strcmp(q->bitmaps[i].name, name) == 0)
			return i;
	return -1;
}

bool qk__qcow2_bitmap_inconsistent(const struct qcow2 *q, uint32_t i)
{
	return (q->bitmaps[i].flags & QK_BITMAP_IN_USE) && !q->bitmap_priv[i].tracked;
}

/* Write bitmap i's flags (as q->bitmaps[i] has them now) to its entry. */
static int write_flags(qk_image *img, uint32_t i)
{
	struct qcow2 *q = qcow2_of(img);
	const struct qk_bitmap *b = &q->bitmaps[i];
	uint8_t be[4];
	qk_put_be32(be, (b->flags & QK_BITMAP_IN_USE ? BM_FLAG_IN_USE : 0) |
		    (b->flags & QK_BITMAP_AUTO ? BM_FLAG_AUTO : 0) | q->bitmap_priv[i].extra_flags);
	return qk__file_pwrite(img->file, be, 4, q->bitmap_priv[i].entry_off + 12);
}

/* Read bitmap i's table and data into t (nbits set, buffers allocated). */
static int read_bits(qk_image *img, uint32_t i, struct qk__bitmap_bits *t)
{
	struct qcow2 *q = qcow2_of(img);
	const struct qk_bitmap *b = &q->bitmaps[i];
	uint64_t cs = q->cluster_size, n = b->table_size, tbytes = n * 8, end;
	if ((b->table_offset & (cs - 1)) || !b->table_offset ||
	    qk_add_overflow(b->table_offset, tbytes, &end) || end > q->file_size)
		return qk__qcow2_corrupt(img, "bitmap table of '%s' at offset 0x%llx is invalid",
					 b->name, (unsigned long long)b->table_offset);
	int ret = qk__file_pread(img->file, t->table, tbytes, b->table_offset);
	for (uint64_t j = 0; ret == 0 && j < n; j++) {
		uint64_t e = qk_be64(&t->table[j]), off = e & L2E_OFFSET_MASK;
		t->table[j] = e;
		uint8_t *d = t->data + j * cs;
		if ((e & BMT_RESERVED_MASK) || (off & (cs - 1)) || off >= q->file_size ||
		    (off && (e & BMT_ALL_ONES)))
			return qk__qcow2_corrupt(img, "bitmap '%s': table entry %llu (0x%016llx) is invalid",
						 b->name, (unsigned long long)j, (unsigned long long)e);
		if (off)
			ret = qk__file_pread(img->file, d, cs, off);
		else
			memset(d, e & BMT_ALL_ONES ? 0xff : 0, cs);
	}
	return ret;
}

int qk__qcow2_bitmap_load(qk_image *img, uint32_t i)
{
	struct qcow2 *q = qcow2_of(img);
	const struct qk_bitmap *b = &q->bitmaps[i];
	struct qk__bitmap_priv *p = &q->bitmap_priv[i];
	QK_LOCK_HELD(q);
	if (p->bits)
		return 0;
	if (b->type != BM_TYPE_DIRTY)
		return qk__err(ENOTSUP, "bitmap '%s' of '%s' has unknown type %u", b->name,
			       img->filename, b->type);
	uint64_t nbits = nbits_for(img->size, p->gran_bits), want = table_entries(q, nbits);
	if (b->table_size != want)
		return qk__err(EINVAL, "bitmap '%s' of '%s' has %u table entries, %llu expected for its "
			       "size", b->name, img->filename, b->table_size, (unsigned long long)want);
	if (want * q->cluster_size > MAX_TRACKED_BYTES)
		return qk__err(ENOTSUP, "bitmap '%s' of '%s' is too large to hold in memory (%llu bytes)",
			       b->name, img->filename, (unsigned long long)(want * q->cluster_size));
	struct qk__bitmap_bits *t;
	int ret = qk__qcow2_bits_new(q, nbits, NULL, &t);
	if (ret == 0)
		ret = read_bits(img, i, t);
	if (ret < 0) {
		qk__qcow2_bits_free(t);
		return ret;
	}
	p->bits = t;
	return 0;
}

static void count_tracked(struct qcow2 *q)
{
	q->n_tracked = 0;
	for (uint32_t i = 0; i < q->n_bitmaps; i++)
		q->n_tracked += q->bitmap_priv[i].tracked;
}

/* ---- keeping enabled bitmaps true while writing ------------------------------
 *
 * As QEMU does while it has an image open read-write: every enabled
 * ("auto") bitmap that is consistent is loaded whole into memory on the
 * first write and marked in use on disk (so a crash leaves it flagged
 * inconsistent, never silently wrong); every write, zero write and discard
 * sets its bits; on close the changed parts are written back (in place
 * where a data cluster exists, into new clusters where the table said "all
 * zeros"), the table is updated, everything is synced, and only then is
 * the in-use flag cleared. Disabled bitmaps do not change; bitmaps already
 * in use stay as they are (inconsistent).
 */

int qk__qcow2_bitmaps_start(qk_image *img)
{
	struct qcow2 *q = qcow2_of(img);
	int ret = 0;
	uint32_t marked = 0;
	for (uint32_t i = 0; ret == 0 && i < q->n_bitmaps; i++) {
		const struct qk_bitmap *b = &q->bitmaps[i];
		if ((b->flags & QK_BITMAP_IN_USE) || !(b->flags & QK_BITMAP_AUTO))
			continue;
		ret = qk__qcow2_bitmap_load(img, i);
	}
	/* In use on disk before the first change. */
	for (uint32_t i = 0; ret == 0 && i < q->n_bitmaps; i++) {
		struct qk_bitmap *b = &q->bitmaps[i];
		if ((b->flags & QK_BITMAP_IN_USE) || !(b->flags & QK_BITMAP_AUTO))
			continue;
		b->flags |= QK_BITMAP_IN_USE;
		q->bitmap_priv[i].tracked = true;
		marked++;
		ret = write_flags(img, i);
	}
	if (ret == 0 && marked)
		ret = qk__file_sync(img->file);
	if (ret < 0) {
		/* Not tracked; a flag that reached the disk says inconsistent,
		 * which is safe. */
		for (uint32_t i = 0; i < q->n_bitmaps; i++) {
			if (q->bitmap_priv[i].tracked)
				q->bitmaps[i].flags &= ~(uint32_t)QK_BITMAP_IN_USE;
			q->bitmap_priv[i].tracked = false;
		}
	}
	count_tracked(q);
	return ret;
}

void qk__qcow2_bitmaps_mark(qk_image *img, uint64_t off, uint64_t len)
{
	struct qcow2 *q = qcow2_of(img);
	if (!q->n_tracked || len == 0)
		return;
	if (off >= q->bm_quiet_lo && off + len <= q->bm_quiet_hi)
		return;
	for (uint32_t i = 0; i < q->n_bitmaps; i++)
		if (q->bitmap_priv[i].tracked)
			qk__qcow2_bits_set(q, q->bitmap_priv[i].bits, q->bitmap_priv[i].gran_bits, off, len);
}

/* Write tracked bitmap i's changed clusters in place (new clusters where
 * the table has none), and its table when it changed. */
static int store_one(qk_image *img, uint32_t i)
{
	struct qcow2 *q = qcow2_of(img);
	struct qk__bitmap_bits *t = q->bitmap_priv[i].bits;
	const struct qk_bitmap *b = &q->bitmaps[i];
	uint64_t cs = q->cluster_size;
	bool table_changed = false;
	int ret = 0;
	for (uint64_t j = 0; ret == 0 && t->any_changed && j < b->table_size; j++) {
		if (!t->changed[j])
			continue;
		uint64_t off = t->table[j] & L2E_OFFSET_MASK;
		if (!off) {
			ret = qk__qcow2_alloc_clusters(img, 1, &off);
			if (ret == 0)
				ret = qk__qcow2_meta_add(img, off, cs, META_BITMAP);
			if (ret < 0)
				break;
			t->table[j] = off;
			table_changed = true;
		}
		ret = qk__file_pwrite(img->file, t->data + j * cs, cs, off);
		if (ret == 0 && off + cs > q->file_size)
			q->file_size = off + cs;
	}
	if (ret == 0 && table_changed) {
		/* New data clusters counted before the table names them. */
		ret = qk__cache_flush(&q->rb_cache);
		uint8_t *be = ret == 0 ? malloc((size_t)b->table_size * 8) : NULL;
		if (ret == 0 && !be)
			ret = qk__err(ENOMEM, "out of memory");
		for (uint64_t j = 0; be && j < b->table_size; j++)
			qk_put_be64(be + 8 * j, t->table[j]);
		if (be)
			ret = qk__file_pwrite(img->file, be, (size_t)b->table_size * 8, b->table_offset);
		free(be);
	}
	if (ret == 0) {
		memset(t->changed, 0, b->table_size);
		t->any_changed = false;
	}
	return ret;
}

int qk__qcow2_bitmaps_store(qk_image *img)
{
	struct qcow2 *q = qcow2_of(img);
	int ret = 0;
	if (!q->n_tracked)
		return 0;
	qk__qcow2_lock(q);
	for (uint32_t i = 0; ret == 0 && i < q->n_bitmaps; i++)
		if (q->bitmap_priv[i].tracked)
			ret = store_one(img, i);
	/* Data and tables on disk before the bitmaps are declared true. */
	if (ret == 0)
		ret = qk__file_sync(img->file);
	for (uint32_t i = 0; ret == 0 && i < q->n_bitmaps; i++) {
		if (!q->bitmap_priv[i].tracked)
			continue;
		q->bitmaps[i].flags &= ~(uint32_t)QK_BITMAP_IN_USE;
		q->bitmap_priv[i].tracked = false;
		ret = write_flags(img, i);
	}
	if (ret == 0)
		ret = qk__file_sync(img->file);
	count_tracked(q);
	qk__qcow2_unlock(q);
	return ret;
}

/* ---- which ranges are dirty ------------------------------------------------- */

int qk__qcow2_bitmap_status(qk_image *img, const char *name, uint64_t off, uint64_t len,
			    uint64_t *run)
{
	struct qcow2 *q = qcow2_of(img);
	qk__qcow2_lock(q);
	int64_t i = qk__qcow2_bitmap_find(q, name);
	int ret;
	if (i < 0)
		ret = qk__err(ENOENT, "Dirty bitmap '%s' not found", name);
	else if (qk__qcow2_bitmap_inconsistent(q, (uint32_t)i))
		ret = qk__err(EUCLEAN, "Bitmap '%s' is inconsistent and cannot be used", name);
	else
		ret = qk__qcow2_bitmap_load(img, (uint32_t)i);
	if (ret == 0) {
		const struct qk__bitmap_bits *b = q->bitmap_priv[i].bits;
		uint32_t gb = q->bitmap_priv[i].gran_bits;
		uint64_t k = off >> gb, end = off + len;
		bool set = k < b->nbits && (b->data[k / 8] & (1u << (k % 8)));
		uint64_t e = k < b->nbits ? qk__qcow2_bits_run(b, k, set) : b->nbits;
		if (e < b->nbits)
			end = qk_min_u64(end, e << gb);
		*run = end - off;
		ret = set;
	}
	qk__qcow2_unlock(q);
	return ret;
}

/* ---- writing the directory again ---------------------------------------------- */

/* Can the directory be written again from what we know of it? */
static int rewritable(qk_image *img)
{
	struct qcow2 *q = qcow2_of(img);
	for (uint32_t i = 0; i < q->n_bitmaps; i++)
		if (q->bitmap_priv[i].extra_len || q->bitmap_priv[i].extra_flags ||
		    q->bitmaps[i].type != BM_TYPE_DIRTY)
			return qk__err(ENOTSUP, "bitmap '%s' of '%s' has extra data, flags or a type this "
				       "version does not know: its directory cannot be written again",
				       q->bitmaps[i].name, img->filename);
	return 0;
}

int qk__qcow2_bitmap_edit_init(qk_image *img, struct qk__bitmap_edit *e, uint32_t room)
{
	struct qcow2 *q = qcow2_of(img);
	memset(e, 0, sizeof *e);
	int ret = rewritable(img);
	if (ret < 0)
		return ret;
	e->cap = q->n_bitmaps + room;
	e->bm = calloc(e->cap ? e->cap : 1, sizeof *e->bm);
	e->priv = calloc(e->cap ? e->cap : 1, sizeof *e->priv);
	e->from = calloc(e->cap ? e->cap : 1, sizeof *e->from);
	e->fresh = calloc(e->cap ? e->cap : 1, sizeof *e->fresh);
	if (!e->bm || !e->priv || !e->from || !e->fresh) {
		qk__qcow2_bitmap_edit_free(img, e);
		return qk__err(ENOMEM, "out of memory");
	}
	for (uint32_t i = 0; i < q->n_bitmaps; i++) {
		e->bm[i] = q->bitmaps[i];
		e->priv[i] = q->bitmap_priv[i];
		e->from[i] = i;
		if (!(e->bm[i].name = strdup(q->bitmaps[i].name))) {
			qk__qcow2_bitmap_edit_free(img, e);
			return qk__err(ENOMEM, "out of memory");
		}
		e->n = i + 1;
	}
	e->n = q->n_bitmaps;
	return 0;
}

/* Does entry i of e own its bits (not shared with the current entry)? */
static bool owns_bits(const struct qcow2 *q, const struct qk__bitmap_edit *e, uint32_t i)
{
	int64_t f = e->from[i];
	return !(f >= 0 && f < q->n_bitmaps && q->bitmap_priv[f].bits == e->priv[i].bits);
}

void qk__qcow2_bitmap_edit_remove(qk_image *img, struct qk__bitmap_edit *e, uint32_t i)
{
	struct qcow2 *q = qcow2_of(img);
	free((char *)e->bm[i].name);
	if (owns_bits(q, e, i))
		qk__qcow2_bits_free(e->priv[i].bits);
	memmove(&e->bm[i], &e->bm[i + 1], (e->n - i - 1) * sizeof *e->bm);
	memmove(&e->priv[i], &e->priv[i + 1], (e->n - i - 1) * sizeof *e->priv);
	memmove(&e->from[i], &e->from[i + 1], (e->n - i - 1) * sizeof *e->from);
	memmove(&e->fresh[i], &e->fresh[i + 1], (e->n - i - 1) * sizeof *e->fresh);
	e->n--;
}

void qk__qcow2_bitmap_edit_free(qk_image *img, struct qk__bitmap_edit *e)
{
	struct qcow2 *q = qcow2_of(img);
	for (uint32_t i = 0; e->bm && i < e->n; i++) {
		free((char *)e->bm[i].name);
		if (owns_bits(q, e, i))
			qk__qcow2_bits_free(e->priv[i].bits);
	}
	free(e->bm);
	free(e->priv);
	free(e->from);
	free(e->fresh);
	memset(e, 0, sizeof *e);
}

/* Clusters a change allocated, freed again when it fails. */
struct allocs {
	struct { uint64_t off, len; } *v;
	size_t n, cap;
};

/* Allocate `len` bytes of new clusters for a bitmap structure, checked
 * against the metadata already there and noted in `al`. */
static int alloc_meta(qk_image *img, uint64_t len, struct allocs *al, uint64_t *off)
{
	struct qcow2 *q = qcow2_of(img);
	uint64_t n = (len + q->cluster_size - 1) >> q->cluster_bits;
	if (al->n == al->cap) {
		size_t cap = al->cap ? 2 * al->cap : 16;
		void *v = realloc(al->v, cap * sizeof *al->v);
		if (!v)
			return qk__err(ENOMEM, "out of memory");
		al->v = v;
		al->cap = cap;
	}
	int ret = qk__qcow2_alloc_clusters(img, n, off);
	if (ret < 0)
		return ret;
	al->v[al->n].off = *off;
	al->v[al->n++].len = n << q->cluster_bits;
	ret = qk__qcow2_meta_check(img, *off, len, 0, "a new bitmap structure");
	if (ret == 0)
		ret = qk__qcow2_meta_add(img, *off, n << q->cluster_bits, META_BITMAP);
	if (ret == 0 && *off + (n << q->cluster_bits) > q->file_size)
		q->file_size = *off + (n << q->cluster_bits);
	return ret;
}

/* Give back what a failed change allocated (best effort: a failure leaks). */
static void undo_allocs(qk_image *img, struct allocs *al)
{
	for (size_t k = 0; k < al->n; k++) {
		qk__qcow2_meta_del(img, al->v[k].off, al->v[k].len);
		qk__qcow2_update_refcount(img, al->v[k].off, al->v[k].len, -1);
	}
}

/*
 * Write entry i's bits to new clusters: a data cluster for each cluster
 * of bits with one set (none for clean ones: entry 0), then the table.
 * Sets e->bm[i]'s table and *table (host order, for the tracked bits).
 */
static int write_fresh(qk_image *img, struct qk__bitmap_edit *e, uint32_t i, uint64_t **table,
		       struct allocs *al)
{
	struct qcow2 *q = qcow2_of(img);
	const struct qk__bitmap_bits *b = e->priv[i].bits;
	uint64_t cs = q->cluster_size, n = table_entries(q, b->nbits), toff;
	if (n == 0)
		return qk__err(EINVAL, "'%s' has 0 bytes: a bitmap of it would have no bits (QEMU "
			       "refuses an empty bitmap table)", img->filename);
	uint64_t *t = calloc(n, 8);
	uint8_t *be = malloc(n ? n * 8 : 1);
	int ret = t && be ? 0 : qk__err(ENOMEM, "out of memory");
	for (uint64_t j = 0; ret == 0 && j < n; j++) {
		const uint8_t *d = b->data + j * cs;
		if (qk_is_zero(d, cs))
			continue;
		ret = alloc_meta(img, cs, al, &t[j]);
		if (ret == 0)
			ret = qk__file_pwrite(img->file, d, cs, t[j]);
	}
	for (uint64_t j = 0; ret == 0 && j < n; j++)
		qk_put_be64(be + 8 * j, t[j]);
	if (ret == 0)
		ret = alloc_meta(img, n * 8, al, &toff);
	if (ret == 0)
		ret = qk__file_pwrite(img->file, be, n * 8, toff);
	free(be);
	if (ret < 0) {
		free(t);
		return ret;
	}
	e->bm[i].table_offset = toff;
	e->bm[i].table_size = (uint32_t)n;
	*table = t;
	return 0;
}

/* Write the directory `e` describes to new clusters; entry offsets go to
 * e->priv[i].entry_off. */
static int write_dir(qk_image *img, struct qk__bitmap_edit *e, uint64_t *dir_off,
		     uint64_t *dir_size, struct allocs *al)
{
	uint64_t size = 0;
	for (uint32_t i = 0; i < e->n; i++)
		size += (BM_DIR_FIXED_LEN + strlen(e->bm[i].name) + 7) & ~7ull;
	if (size > MAX_BITMAP_DIR_BYTES)
		return qk__err(EFBIG, "Not enough space in the bitmap directory");
	uint8_t *dir = calloc(1, size);
	if (!dir)
		return qk__err(ENOMEM, "out of memory");
	uint64_t pos = 0;
	for (uint32_t i = 0; i < e->n; i++) {
		const struct qk_bitmap *b = &e->bm[i];
		size_t nl = strlen(b->name);
		uint8_t *p = dir + pos;
		qk_put_be64(p, b->table_offset);
		qk_put_be32(p + 8, b->table_size);
		qk_put_be32(p + 12, (b->flags & QK_BITMAP_IN_USE ? BM_FLAG_IN_USE : 0) |
			    (b->flags & QK_BITMAP_AUTO ? BM_FLAG_AUTO : 0));
		p[16] = BM_TYPE_DIRTY;
		p[17] = (uint8_t)e->priv[i].gran_bits;
		qk_put_be16(p + 18, (uint16_t)nl);
		memcpy(p + BM_DIR_FIXED_LEN, b->name, nl);
		e->priv[i].entry_off = pos;
		pos += (BM_DIR_FIXED_LEN + nl + 7) & ~7ull;
	}
	int ret = alloc_meta(img, size, al, dir_off);
	if (ret == 0)
		ret = qk__file_pwrite(img->file, dir, size, *dir_off);
	free(dir);
	for (uint32_t i = 0; ret == 0 && i < e->n; i++)
		e->priv[i].entry_off += *dir_off;
	*dir_size = size;
	return ret;
}

/*
 * The header's side of a change: the bitmaps extension (count, directory
 * size and offset) and the autoclear bit that makes readers trust it. Each
 * write below is synced, and each changes one sector or only bytes no
 * header field names, so that a power cut, even one that tears a write at
 * a sector boundary, leaves a header that reads as the old bitmaps or the
 * new ones:
 * - changing the extension: its 24 bytes in place, one write (when they
 *   straddle a sector boundary, the autoclear bit is cleared first and set
 *   after, so a cut between leaves no bitmaps rather than a mix);
 * - adding it (the first bitmap): the autoclear bit clear, the extension
 *   written where the end of the extensions was (the backing file name
 *   moved first to the end of the header cluster when it is in the way,
 *   and the bytes past it zeroed), then the autoclear bit set: that one
 *   write is the switch;
 * - removing it (the last bitmap): the autoclear bit cleared (the switch),
 *   then the extension zeroed (when unknown extensions follow it, they move
 *   up in one write).
 */
struct hdr_exts {
	uint8_t *h;          /* the header cluster */
	uint64_t bpos;       /* the bitmaps extension, 0: none */
	uint64_t epos;       /* the end of the extensions */
	uint64_t boff;       /* backing file name (0: none), its length */
	uint32_t blen;
};

/* Write h[off, off+len) to the header and sync. */
static int put_hdr(qk_image *img, const struct hdr_exts *x, uint64_t off, uint64_t len)
{
	return qk__qcow2_write_durable(img, off, x->h + off, len);
}

/* The autoclear bitmaps bit, on disk (one 8-byte write) and in q. */
static int set_autoclear(qk_image *img, struct hdr_exts *x, bool on)
{
	struct qcow2 *q = qcow2_of(img);
	uint64_t ac = on ? q->autoclear | AUTOCLEAR_BITMAPS : q->autoclear & ~AUTOCLEAR_BITMAPS;
	if (ac == qk_be64(x->h + HDR_AUTOCLEAR))
		return 0;
	qk_put_be64(x->h + HDR_AUTOCLEAR, ac);
	int ret = put_hdr(img, x, HDR_AUTOCLEAR, 8);
	if (ret == 0)
		q->autoclear = ac;
	return ret;
}

/* Read the header cluster and find its extensions (checked at open). */
static int read_exts(qk_image *img, struct hdr_exts *x)
{
	struct qcow2 *q = qcow2_of(img);
	memset(x, 0, sizeof *x);
	if (!(x->h = malloc(q->cluster_size)))
		return qk__err(ENOMEM, "out of memory");
	int ret = qk__file_pread(img->file, x->h, q->cluster_size, 0);
	if (ret < 0)
		return ret;
	x->boff = qk_be64(x->h + HDR_BACKING_OFFSET);
	x->blen = x->boff ? qk_be32(x->h + HDR_BACKING_SIZE) : 0;
	uint64_t limit = x->boff ? x->boff : q->cluster_size, off = q->header_length;
	while (off + 8 <= limit && qk_be32(x->h + off) != EXT_END) {
		if (qk_be32(x->h + off) == EXT_BITMAPS)
			x->bpos = off;
		off += 8 + (((uint64_t)qk_be32(x->h + off + 4) + 7) & ~7ull);
	}
	x->epos = qk_min_u64(off, limit);
	return 0;
}

/* Make room for an extension of 32 bytes at x->epos (and the end marker
 * after it): the backing file name, when in the way, is copied to the end
 * of the header cluster (bytes nothing names), then named there; the bytes
 * the extension will take are zeroed. */
static int make_room(qk_image *img, struct hdr_exts *x)
{
	struct qcow2 *q = qcow2_of(img);
	uint64_t need = x->epos + 40, cs = q->cluster_size;
	if (x->boff && need > x->boff) {
		uint64_t to = (cs - x->blen) & ~7ull;
		if (x->blen > cs || to < need || to < x->boff + x->blen)
			return qk__err(EFBIG, "no room in the header cluster of '%s' for the bitmaps "
				       "extension", img->filename);
		memmove(x->h + to, x->h + x->boff, x->blen);
		int ret = put_hdr(img, x, to, x->blen);
		qk_put_be64(x->h + HDR_BACKING_OFFSET, to);
		if (ret == 0)
			ret = put_hdr(img, x, HDR_BACKING_OFFSET, 8);
		if (ret < 0)
			return ret;
		x->boff = to;
	}
	if (need > cs)
		return qk__err(EFBIG, "no room in the header cluster of '%s' for the bitmaps extension",
			       img->filename);
	memset(x->h + x->epos + 8, 0, 32);
	return put_hdr(img, x, x->epos + 8, 32);
}

/*
 * Point the header at the bitmap directory (n entries, dir_size bytes at
 * dir_off; n == 0: no bitmaps extension), as the note above says.
 */
static int write_ext(qk_image *img, uint32_t n, uint64_t dir_size, uint64_t dir_off)
{
	struct hdr_exts x;
	uint8_t pay[24] = { 0 };
	qk_put_be32(pay, n);
	qk_put_be64(pay + 8, dir_size);
	qk_put_be64(pay + 16, dir_off);
	int ret = read_exts(img, &x);
	if (ret == 0 && x.bpos && n) {
		bool torn = (x.bpos + 8) / 512 != (x.bpos + 31) / 512;
		memcpy(x.h + x.bpos + 8, pay, 24);
		if (torn)
			ret = set_autoclear(img, &x, false);
		if (ret == 0)
			ret = put_hdr(img, &x, x.bpos + 8, 24);
	} else if (ret == 0 && n) {
		ret = set_autoclear(img, &x, false);
		if (ret == 0)
			ret = make_room(img, &x);
		qk_put_be32(x.h + x.epos, EXT_BITMAPS);
		qk_put_be32(x.h + x.epos + 4, 24);
		memcpy(x.h + x.epos + 8, pay, 24);
		if (ret == 0)
			ret = put_hdr(img, &x, x.epos, 32);
	} else if (ret == 0 && x.bpos) {
		ret = set_autoclear(img, &x, false);
		memmove(x.h + x.bpos, x.h + x.bpos + 32, x.epos - x.bpos - 32);
		memset(x.h + x.epos - 32, 0, 32);
		if (ret == 0)
			ret = put_hdr(img, &x, x.bpos, x.epos - x.bpos);
	}
	if (ret == 0)
		ret = set_autoclear(img, &x, n != 0);
	free(x.h);
	return ret;
}

/* Free a bitmap table and the data clusters it names (those that are
 * sound: a wrong entry leaks rather than frees someone else's cluster). */
static int free_table(qk_image *img, uint64_t toff, uint32_t tsize)
{
	struct qcow2 *q = qcow2_of(img);
	uint64_t cs = q->cluster_size, bytes = (uint64_t)tsize * 8, end;
	if (!toff || (toff & (cs - 1)) || qk_add_overflow(toff, bytes, &end) || end > q->file_size)
		return 0;
	uint64_t *t = malloc(bytes ? bytes : 1);
	if (!t)
		return qk__err(ENOMEM, "out of memory");
	int ret = qk__file_pread(img->file, t, bytes, toff);
	for (uint32_t j = 0; ret == 0 && j < tsize; j++) {
		uint64_t e = qk_be64(&t[j]), off = e & L2E_OFFSET_MASK;
		if (!off || (e & BMT_RESERVED_MASK) || (off & (cs - 1)) || off >= q->file_size)
			continue;
		qk__qcow2_meta_del(img, off, cs);
		ret = qk__qcow2_update_refcount(img, off, cs, -1);
	}
	free(t);
	if (ret == 0 && bytes) {
		qk__qcow2_meta_del(img, toff, bytes);
		ret = qk__qcow2_update_refcount(img, toff, bytes, -1);
	}
	return ret;
}

/* After the header switched: take `e` in as the directory, and free what
 * the old one had that the new one does not keep. */
static int install(qk_image *img, struct qk__bitmap_edit *e, uint64_t **tables, uint64_t dir_off,
		   uint64_t dir_size)
{
	struct qcow2 *q = qcow2_of(img);
	struct qk_bitmap *old = q->bitmaps;
	struct qk__bitmap_priv *oldp = q->bitmap_priv;
	uint32_t old_n = q->n_bitmaps;
	uint64_t old_off = q->bitmap_dir_offset, old_size = q->bitmap_dir_size;
	uint8_t *keep = calloc(old_n ? old_n : 1, 1);   /* bit 0: table, bit 1: bits */
	for (uint32_t i = 0; i < e->n; i++) {
		int64_t f = e->from[i];
		if (keep && f >= 0 && !e->fresh[i])
			keep[f] |= 1;
		if (keep && f >= 0 && e->priv[i].bits == oldp[f].bits)
			keep[f] |= 2;
		if (e->fresh[i]) {
			struct qk__bitmap_bits *b = e->priv[i].bits;
			free(b->table);
			b->table = tables[i];
			tables[i] = NULL;
			memset(b->changed, 0, e->bm[i].table_size ? e->bm[i].table_size : 1);
			b->any_changed = false;
		}
	}
	q->bitmaps = e->bm;
	q->bitmap_priv = e->priv;
	q->n_bitmaps = e->n;
	q->bitmap_dir_offset = dir_off;
	q->bitmap_dir_size = dir_size;
	count_tracked(q);
	free(e->from);
	free(e->fresh);
	memset(e, 0, sizeof *e);
	int ret = keep ? 0 : qk__err(ENOMEM, "out of memory: old bitmap clusters leaked");
	if (ret == 0 && old_size) {
		qk__qcow2_meta_del(img, old_off, old_size);
		ret = qk__qcow2_update_refcount(img, old_off, old_size, -1);
	}
	for (uint32_t j = 0; j < old_n; j++) {
		if (ret == 0 && !(keep[j] & 1))
			ret = free_table(img, old[j].table_offset, old[j].table_size);
		if (keep && !(keep[j] & 2))
			qk__qcow2_bits_free(oldp[j].bits);
		free((char *)old[j].name);
	}
	free(old);
	free(oldp);
	free(keep);
	return ret;
}

int qk__qcow2_bitmaps_commit(qk_image *img, struct qk__bitmap_edit *e)
{
	struct qcow2 *q = qcow2_of(img);
	QK_LOCK_HELD(q);
	if (q->version < 3)
		return qk__err(ENOTSUP, "Cannot store dirty bitmaps in qcow2 v2 files");
	if (e->n > MAX_BITMAPS)
		return qk__err(EFBIG, "Maximum number of persistent bitmaps is already reached");
	struct allocs al = { 0 };
	uint64_t **tables = calloc(e->n ? e->n : 1, sizeof *tables);
	uint64_t dir_off = 0, dir_size = 0;
	int ret = tables ? 0 : qk__err(ENOMEM, "out of memory");
	for (uint32_t i = 0; ret == 0 && i < e->n; i++) {
		if (e->fresh[i]) {
			ret = write_fresh(img, e, i, &tables[i], &al);
		} else {
			e->bm[i].table_offset = q->bitmaps[e->from[i]].table_offset;
			e->bm[i].table_size = q->bitmaps[e->from[i]].table_size;
		}
	}
	if (ret == 0 && e->n)
		ret = write_dir(img, e, &dir_off, &dir_size, &al);
	/* Everything new, and the refcounts that count it, on disk before the
	 * header names it. */
	if (ret == 0)
		ret = qk__cache_flush(&q->rb_cache);
	if (ret == 0)
		ret = qk__file_sync(img->file);
	bool switching = ret == 0;
	if (ret == 0)
		ret = write_ext(img, e->n, dir_size, dir_off);
	if (ret < 0) {
		/* A failed header write may have landed: then the new clusters
		 * are named, and must leak rather than be handed out again. */
		if (!switching)
			undo_allocs(img, &al);
		for (uint32_t i = 0; tables && i < e->n; i++)
			free(tables[i]);
	} else {
		ret = install(img, e, tables, dir_off, dir_size);
	}
	free(tables);
	free(al.v);
	return ret;
}

/* ---- resize and repair ------------------------------------------------------- */

int qk__qcow2_bitmaps_resize_prepare(qk_image *img, uint64_t size)
{
	struct qcow2 *q = qcow2_of(img);
	bool marked = false;
	int ret = 0;
	QK_LOCK_HELD(q);
	for (uint32_t i = 0; i < q->n_bitmaps; i++) {
		const struct qk_bitmap *b = &q->bitmaps[i];
		uint64_t bytes = (nbits_for(size, q->bitmap_priv[i].gran_bits) + 7) / 8;
		if (qk__qcow2_bitmap_inconsistent(q, i))
			return qk__err(ENOTSUP, "Bitmap '%s' is inconsistent and cannot be used (remove it "
				       "to resize '%s')", b->name, img->filename);
		if (size == 0 || bytes > BM_MAX_PHYS_BYTES || bytes > MAX_TRACKED_BYTES ||
		    table_entries(q, nbits_for(size, q->bitmap_priv[i].gran_bits)) > BM_MAX_TABLE_ENTRIES)
			return qk__err(ENOTSUP, "bitmap '%s' cannot follow '%s' to a size of %llu bytes",
				       b->name, img->filename, (unsigned long long)size);
	}
	ret = rewritable(img);
	for (uint32_t i = 0; ret == 0 && i < q->n_bitmaps; i++)
		ret = qk__qcow2_bitmap_load(img, i);
	/* The others in use too: from here to the end of the resize the
	 * bitmaps on disk do not fit the size. */
	for (uint32_t i = 0; ret == 0 && i < q->n_bitmaps; i++) {
		if (q->bitmap_priv[i].tracked)
			continue;
		q->bitmaps[i].flags |= QK_BITMAP_IN_USE;
		q->bitmap_priv[i].resizing = true;
		marked = true;
		ret = write_flags(img, i);
	}
	if (ret == 0 && marked)
		ret = qk__file_sync(img->file);
	return ret;
}

/* A resize refused before the size changed: the bitmaps resize_prepare
 * marked in use are unchanged, and consistent again. */
static int unmark(qk_image *img)
{
	struct qcow2 *q = qcow2_of(img);
	bool marked = false;
	int ret = 0;
	for (uint32_t i = 0; ret == 0 && i < q->n_bitmaps; i++) {
		if (!q->bitmap_priv[i].resizing)
			continue;
		q->bitmaps[i].flags &= ~(uint32_t)QK_BITMAP_IN_USE;
		q->bitmap_priv[i].resizing = false;
		marked = true;
		ret = write_flags(img, i);
	}
	return ret == 0 && marked ? qk__file_sync(img->file) : ret;
}

int qk__qcow2_bitmaps_resize(qk_image *img, int resized)
{
	struct qcow2 *q = qcow2_of(img);
	struct qk__bitmap_edit e;
	if (resized == 0)
		return unmark(img);
	int ret = resized > 0 ? qk__qcow2_bitmap_edit_init(img, &e, 0) : -EIO;
	for (uint32_t i = 0; ret == 0 && i < e.n; i++) {
		struct qk__bitmap_bits *nb;
		ret = qk__qcow2_bits_new(q, nbits_for(img->size, e.priv[i].gran_bits),
					 q->bitmap_priv[i].bits, &nb);
		if (ret < 0)
			break;
		e.priv[i].bits = nb;
		e.fresh[i] = true;
		e.priv[i].resizing = false;
		if (!e.priv[i].tracked)
			e.bm[i].flags &= ~(uint32_t)QK_BITMAP_IN_USE;
	}
	if (ret == 0)
		ret = qk__qcow2_bitmaps_commit(img, &e);
	if (ret < 0 && resized > 0 && e.bm)
		qk__qcow2_bitmap_edit_free(img, &e);
	if (ret < 0) {
		/* Left in use on disk, sized for the old size: inconsistent
		 * from now on, never stored as if true. */
		for (uint32_t i = 0; i < q->n_bitmaps; i++)
			q->bitmap_priv[i].tracked = q->bitmap_priv[i].resizing = false;
		count_tracked(q);
	}
	return ret;
}

int qk__qcow2_bitmaps_drop_inconsistent(qk_image *img, void (*report)(void *, const char *),
					void *opaque)
{
	struct qcow2 *q = qcow2_of(img);
	struct qk__bitmap_edit e;
	QK_LOCK_HELD(q);
	int ret = qk__qcow2_load_refcounts(img);
	if (ret == 0)
		ret = qk__qcow2_meta_ready(img);
	if (ret == 0)
		ret = qk__qcow2_bitmap_edit_init(img, &e, 0);
	if (ret < 0)
		return ret;
	for (uint32_t i = 0; i < e.n;) {
		int64_t f = e.from[i];
		if (!qk__qcow2_bitmap_inconsistent(q, (uint32_t)f)) {
			i++;
			continue;
		}
		if (report) {
			char line[1200];
			snprintf(line, sizeof line, "Repairing bitmap '%s': removed (it was left in use, "
				 "its bits may miss changes)", e.bm[i].name);
			report(opaque, line);
		}
		qk__qcow2_bitmap_edit_remove(img, &e, i);
	}
	ret = qk__qcow2_bitmaps_commit(img, &e);
	if (ret < 0)
		qk__qcow2_bitmap_edit_free(img, &e);
	return ret;
}
