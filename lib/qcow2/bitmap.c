/*
 * Persistent bitmaps: the directory (names, flags and granularity, for
 * listing; at most MAX_BITMAPS entries in a directory of at most
 * MAX_BITMAP_DIR_BYTES inside the file), and the enabled bitmaps' data,
 * kept true while the image is written (below).
 */
#include "qcow2/qcow2.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

static void free_tracked(struct qcow2 *q);

void qk__qcow2_free_bitmaps(struct qcow2 *q)
{
	free_tracked(q);
	for (uint32_t i = 0; i < q->n_bitmaps; i++)
		free((char *)q->bitmaps[i].name);
	free(q->bitmaps);
	free(q->bitmap_priv);
	q->bitmap_priv = NULL;
	q->bitmaps = NULL;
	q->n_bitmaps = 0;
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
		if (dir_size - pos < BM_DIR_FIXED_LEN) {
			ret = qk__err(EINVAL, "bitmap directory of '%s' ends inside entry %u",
				      img->filename, i);
			break;
		}
		const uint8_t *e = dir + pos;
		uint32_t extra = qk_be32(e + 20);
		uint16_t name_len = qk_be16(e + 18);
		uint64_t entry_len = (BM_DIR_FIXED_LEN + (uint64_t)extra + name_len + 7) & ~7ull;
		if (name_len == 0 || entry_len > dir_size - pos) {
			ret = qk__err(EINVAL, "bitmap directory entry %u of '%s' is malformed",
				      i, img->filename);
			break;
		}
		uint8_t gran_bits = e[17];
		if (gran_bits > 63) {
			ret = qk__err(EINVAL, "bitmap %u of '%s' has granularity 2^%u",
				      i, img->filename, gran_bits);
			break;
		}
		struct qk_bitmap *b = &q->bitmaps[i];
		b->table_offset = qk_be64(e);
		b->table_size = qk_be32(e + 8);
		uint32_t flags = qk_be32(e + 12);
		b->flags = (flags & BM_FLAG_IN_USE ? QK_BITMAP_IN_USE : 0) |
			   (flags & BM_FLAG_AUTO ? QK_BITMAP_AUTO : 0);
		q->bitmap_priv[i].extra_flags = flags & ~(uint32_t)(BM_FLAG_IN_USE | BM_FLAG_AUTO);
		q->bitmap_priv[i].entry_off = dir_offset + pos;
		b->type = e[16];
		b->granularity = 1ull << gran_bits;
		char *name = malloc(name_len + 1u);
		if (!name) {
			ret = qk__err(ENOMEM, "out of memory");
			break;
		}
		memcpy(name, e + BM_DIR_FIXED_LEN + extra, name_len);
		name[name_len] = '\0';
		b->name = name;
		q->n_bitmaps = i + 1;
		pos += entry_len;
	}
	free(dir);
	return ret;
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

#define BMT_RESERVED_MASK 0xff000000000001feull
#define BMT_ALL_ONES      1ull
#define MAX_TRACKED_BYTES (256ull << 20)   /* bitmap data held in memory */

struct qk__tracked_bitmap {
	uint32_t index;           /* in q->bitmaps */
	uint32_t gran_bits;
	uint64_t nbits;
	uint64_t *table;          /* host order */
	uint8_t *data;            /* table_size clusters */
	uint8_t *changed;         /* per table entry */
	bool any_changed;
};

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

static int load_one(qk_image *img, uint32_t i, struct qk__tracked_bitmap *t)
{
	struct qcow2 *q = qcow2_of(img);
	const struct qk_bitmap *b = &q->bitmaps[i];
	uint64_t cs = q->cluster_size;
	uint32_t gb = 0;
	while ((1ull << gb) < b->granularity)
		gb++;
	t->index = i;
	t->gran_bits = gb;
	t->nbits = (img->size + b->granularity - 1) >> gb;
	uint64_t want = ((t->nbits + 7) / 8 + cs - 1) / cs;
	if (b->table_size != want)
		return qk__err(EINVAL, "bitmap '%s' of '%s' has %u table entries, %llu expected for its "
			       "size", b->name, img->filename, b->table_size, (unsigned long long)want);
	if (want * cs > MAX_TRACKED_BYTES)
		return qk__err(ENOTSUP, "bitmap '%s' of '%s' is too large to keep updated (%llu bytes)",
			       b->name, img->filename, (unsigned long long)(want * cs));
	uint64_t tbytes = want * 8, end;
	if ((b->table_offset & (cs - 1)) || !b->table_offset ||
	    qk_add_overflow(b->table_offset, tbytes, &end) || end > q->file_size)
		return qk__qcow2_corrupt(img, "bitmap table of '%s' at offset 0x%llx is invalid",
					 b->name, (unsigned long long)b->table_offset);
	t->table = malloc(tbytes ? tbytes : 1);
	t->data = malloc(want ? want * cs : 1);
	t->changed = calloc(want ? want : 1, 1);
	if (!t->table || !t->data || !t->changed)
		return qk__err(ENOMEM, "out of memory");
	int ret = qk__file_pread(img->file, t->table, tbytes, b->table_offset);
	for (uint64_t j = 0; ret == 0 && j < want; j++) {
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

static void free_tracked(struct qcow2 *q)
{
	for (uint32_t i = 0; i < q->n_tracked; i++) {
		free(q->tracked[i].table);
		free(q->tracked[i].data);
		free(q->tracked[i].changed);
	}
	free(q->tracked);
	q->tracked = NULL;
	q->n_tracked = 0;
}

int qk__qcow2_bitmaps_start(qk_image *img)
{
	struct qcow2 *q = qcow2_of(img);
	int ret = 0;
	q->tracked = calloc(q->n_bitmaps, sizeof *q->tracked);
	if (!q->tracked)
		return qk__err(ENOMEM, "out of memory");
	for (uint32_t i = 0; ret == 0 && i < q->n_bitmaps; i++) {
		const struct qk_bitmap *b = &q->bitmaps[i];
		if ((b->flags & QK_BITMAP_IN_USE) || !(b->flags & QK_BITMAP_AUTO))
			continue;
		if (b->type != 1)
			ret = qk__err(ENOTSUP, "bitmap '%s' of '%s' has unknown type %u", b->name,
				      img->filename, b->type);
		else
			ret = load_one(img, i, &q->tracked[q->n_tracked++]);
	}
	/* In use on disk before the first change. */
	for (uint32_t k = 0; ret == 0 && k < q->n_tracked; k++) {
		struct qk_bitmap *b = &q->bitmaps[q->tracked[k].index];
		b->flags |= QK_BITMAP_IN_USE;
		ret = write_flags(img, q->tracked[k].index);
	}
	if (ret == 0 && q->n_tracked)
		ret = qk__file_sync(img->file);
	if (ret < 0) {
		for (uint32_t k = 0; k < q->n_tracked; k++)
			q->bitmaps[q->tracked[k].index].flags &= ~(uint32_t)QK_BITMAP_IN_USE;
		free_tracked(q);
	}
	return ret;
}

void qk__qcow2_bitmaps_mark(qk_image *img, uint64_t off, uint64_t len)
{
	struct qcow2 *q = qcow2_of(img);
	if (!q->n_tracked || len == 0)
		return;
	uint64_t bpc = q->cluster_size * 8;     /* bits per data cluster */
	for (uint32_t k = 0; k < q->n_tracked; k++) {
		struct qk__tracked_bitmap *t = &q->tracked[k];
		if (t->nbits == 0)
			continue;       /* an empty image has no bits */
		uint64_t a = off >> t->gran_bits, z = (off + len - 1) >> t->gran_bits;
		if (z >= t->nbits)
			z = t->nbits - 1;
		for (uint64_t bit = a; bit <= z;) {
			uint8_t *p = &t->data[bit / 8];
			if (bit % 8 == 0 && z - bit >= 7) {
				if (*p != 0xff) {
					*p = 0xff;
					t->changed[bit / bpc] = 1;
					t->any_changed = true;
				}
				bit += 8;
				continue;
			}
			uint8_t m = (uint8_t)(1u << (bit % 8));
			if (!(*p & m)) {
				*p |= m;
				t->changed[bit / bpc] = 1;
				t->any_changed = true;
			}
			bit++;
		}
	}
}

int qk__qcow2_bitmaps_store(qk_image *img)
{
	struct qcow2 *q = qcow2_of(img);
	uint64_t cs = q->cluster_size;
	int ret = 0;
	if (!q->n_tracked)
		return 0;
	qk__qcow2_lock(q);
	for (uint32_t k = 0; ret == 0 && k < q->n_tracked; k++) {
		struct qk__tracked_bitmap *t = &q->tracked[k];
		const struct qk_bitmap *b = &q->bitmaps[t->index];
		bool table_changed = false;
		for (uint64_t j = 0; ret == 0 && t->any_changed && j < b->table_size; j++) {
			if (!t->changed[j])
				continue;
			uint64_t off = t->table[j] & L2E_OFFSET_MASK;
			if (!off) {
				ret = qk__qcow2_alloc_clusters(img, 1, &off);
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
				ret = qk__file_pwrite(img->file, be, (size_t)b->table_size * 8,
							     b->table_offset);
			free(be);
		}
	}
	/* Data and tables on disk before the bitmaps are declared true. */
	if (ret == 0)
		ret = qk__file_sync(img->file);
	for (uint32_t k = 0; ret == 0 && k < q->n_tracked; k++) {
		struct qk_bitmap *b = &q->bitmaps[q->tracked[k].index];
		b->flags &= ~(uint32_t)QK_BITMAP_IN_USE;
		ret = write_flags(img, q->tracked[k].index);
	}
	if (ret == 0)
		ret = qk__file_sync(img->file);
	if (ret == 0)
		free_tracked(q);
	qk__qcow2_unlock(q);
	return ret;
}
