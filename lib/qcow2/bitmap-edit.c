/*
 * bitmap-edit.c - changing persistent bitmaps, as qemu-img bitmap (QEMU's
 * block-dirty-bitmap-add, -remove, -clear, -enable, -disable and -merge)
 * does: the driver's qk_bitmap_*() calls. Each takes the handle's
 * allocation and image locks and readies it to write (qk__qcow2_begin_change,
 * which also starts keeping the enabled bitmaps true), builds the directory
 * it wants as an edit of the current one, and commits it (bitmap.c: new
 * clusters, then the header in one write, then the old clusters freed).
 *
 * A bitmap added enabled, or enabled, is tracked from then on (in use on
 * disk until close, as the others this handle keeps true); one disabled
 * stops being tracked and is written, as it is, to new clusters with its
 * in-use flag clear. Errors name things in QEMU's words.
 */
#include "qcow2/qcow2.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

/* Bits a bitmap of granularity 2^gb needs for `size` bytes. */
static uint64_t nbits_for(uint64_t size, uint32_t gb)
{
	return (size >> gb) + ((size & ((1ull << gb) - 1)) != 0);
}

/* Why a bitmap cannot be used (QEMU's bdrv_dirty_bitmap_check). */
static int inconsistent(const char *name)
{
	return qk__err(EUCLEAN, "Bitmap '%s' is inconsistent and cannot be used", name);
}

/* The bitmap named `name` of img, usable: its index, or -ENOENT or
 * -EUCLEAN (recorded). Image lock held. */
static int64_t usable(qk_image *img, const char *name)
{
	struct qcow2 *q = qcow2_of(img);
	int64_t i = qk__qcow2_bitmap_find(q, name);
	if (i < 0)
		return qk__err(ENOENT, "Dirty bitmap '%s' not found", name);
	if (qk__qcow2_bitmap_inconsistent(q, (uint32_t)i))
		return inconsistent(name);
	return i;
}

/* The checks of qemu-img bitmap --add, in QEMU's order and words. */
static int add_checks(qk_image *img, const struct qk__bitmap_change *ch, uint32_t *gb)
{
	struct qcow2 *q = qcow2_of(img);
	uint64_t g = ch->granularity;
	if (!ch->name[0])
		return qk__err(EINVAL, "Bitmap name cannot be empty");
	if (g == 0) /* QEMU's default: the cluster size, within 4 KiB and 64 KiB */
		g = qk_min_u64(qk_max_u64(q->cluster_size, 4096), 65536);
	if (g < 512 || !qk_is_pow2(g))
		return qk__err(EINVAL, "Granularity must be power of 2 and at least 512");
	if (qk__qcow2_bitmap_find(q, ch->name) >= 0)
		return qk__err(EEXIST, "Bitmap already exists: %s", ch->name);
	const char *pre = "Can't make bitmap";
	if (q->version < 3)
		return qk__err(ENOTSUP, "%s '%s' persistent in '%s': Cannot store dirty bitmaps in "
			       "qcow2 v2 files", pre, ch->name, img->filename);
	*gb = (uint32_t)__builtin_ctzll(g);
	if (*gb > BM_MAX_GRAN_BITS)
		return qk__err(EINVAL, "%s '%s' persistent in '%s': Granularity exceeds maximum "
			       "(%llu bytes)", pre, ch->name, img->filename, 1ull << BM_MAX_GRAN_BITS);
	uint64_t bytes = (nbits_for(img->size, *gb) + 7) / 8;
	if (bytes > BM_MAX_PHYS_BYTES || bytes > BM_MAX_TABLE_ENTRIES * q->cluster_size)
		return qk__err(EFBIG, "%s '%s' persistent in '%s': Too much space will be occupied by "
			       "the bitmap. Use larger granularity", pre, ch->name, img->filename);
	if (strlen(ch->name) > BM_MAX_NAME) /* the name cut short: the message must fit */
		return qk__err(EINVAL, "%s '%.64s...' persistent in '%s': Name length exceeds maximum "
			       "(%u characters)", pre, ch->name, img->filename, BM_MAX_NAME);
	if (q->n_bitmaps >= MAX_BITMAPS)
		return qk__err(EFBIG, "%s '%s' persistent in '%s': Maximum number of persistent bitmaps "
			       "is already reached", pre, ch->name, img->filename);
	if (img->size == 0)
		return qk__err(EINVAL, "%s '%s' persistent in '%s': the image has 0 bytes, a bitmap of "
			       "it would have no bits", pre, ch->name, img->filename);
	return 0;
}

static int op_add(qk_image *img, const struct qk__bitmap_change *ch)
{
	struct qcow2 *q = qcow2_of(img);
	struct qk__bitmap_edit e;
	uint32_t gb = 0;
	int ret = add_checks(img, ch, &gb);
	if (ret == 0)
		ret = qk__qcow2_bitmap_edit_init(img, &e, 1);
	if (ret < 0)
		return ret;
	uint32_t i = e.n;
	struct qk__bitmap_bits *bits;
	ret = qk__qcow2_bits_new(q, nbits_for(img->size, gb), NULL, &bits);
	if (ret == 0 && !(e.bm[i].name = strdup(ch->name))) {
		qk__qcow2_bits_free(bits);
		ret = qk__err(ENOMEM, "out of memory");
	}
	if (ret == 0) {
		e.n++;
		e.bm[i].type = BM_TYPE_DIRTY;
		e.bm[i].granularity = 1ull << gb;
		e.bm[i].flags = ch->disabled ? 0 : QK_BITMAP_AUTO | QK_BITMAP_IN_USE;
		e.priv[i].gran_bits = gb;
		e.priv[i].tracked = !ch->disabled;
		e.priv[i].bits = bits;
		e.from[i] = -1;
		e.fresh[i] = true;
		ret = qk__qcow2_bitmaps_commit(img, &e);
	}
	if (ret < 0)
		qk__qcow2_bitmap_edit_free(img, &e);
	return ret;
}

/* Commit e, or free it after a failure. */
static int commit(qk_image *img, struct qk__bitmap_edit *e)
{
	int ret = qk__qcow2_bitmaps_commit(img, e);
	if (ret < 0)
		qk__qcow2_bitmap_edit_free(img, e);
	return ret;
}

/* remove, clear, enable and disable of the bitmap at index i. */
static int op_one(qk_image *img, enum qk__bitmap_op op, uint32_t i)
{
	struct qcow2 *q = qcow2_of(img);
	struct qk__bitmap_edit e;
	bool enabled = q->bitmaps[i].flags & QK_BITMAP_AUTO;
	if ((op == QK__BM_ENABLE && enabled) || (op == QK__BM_DISABLE && !enabled))
		return 0;
	/* An enabled bitmap becomes tracked: its bits come from the disk. */
	int ret = op == QK__BM_ENABLE ? qk__qcow2_bitmap_load(img, i) : 0;
	if (ret == 0)
		ret = qk__qcow2_bitmap_edit_init(img, &e, 0);
	if (ret < 0)
		return ret;
	struct qk__bitmap_bits *bits = NULL;
	switch (op) {
	case QK__BM_REMOVE:
		qk__qcow2_bitmap_edit_remove(img, &e, i);
		break;
	case QK__BM_CLEAR:
		ret = qk__qcow2_bits_new(q, nbits_for(img->size, e.priv[i].gran_bits), NULL, &bits);
		e.priv[i].bits = bits;
		e.fresh[i] = true;
		break;
	case QK__BM_ENABLE:
		e.bm[i].flags |= QK_BITMAP_AUTO | QK_BITMAP_IN_USE;
		e.priv[i].tracked = true;
		break;
	case QK__BM_DISABLE:
		/* Its bits as they are now, in new clusters, no longer in use. */
		e.bm[i].flags &= ~(uint32_t)(QK_BITMAP_AUTO | QK_BITMAP_IN_USE);
		e.fresh[i] = e.priv[i].tracked;
		e.priv[i].tracked = false;
		break;
	default:
		break;
	}
	if (ret < 0) {
		qk__qcow2_bitmap_edit_free(img, &e);
		return ret;
	}
	return commit(img, &e);
}

/* A source bitmap for merge, copied out of its image. */
struct source {
	int err;                     /* 0, -ENOENT or -EUCLEAN (not recorded yet) */
	struct qk__bitmap_bits *bits;
	uint32_t gb;
	uint64_t size;               /* of its image */
};

/* Copy bitmap `name` of src (a qcow2 image other than the one changed)
 * under src's own lock, so that two merges in opposite directions do not
 * wait for each other. Not-found and inconsistent are left in s->err for
 * the caller to report in QEMU's order; other failures are returned. */
static int copy_source(qk_image *src, const char *name, struct source *s)
{
	memset(s, 0, sizeof *s);
	s->size = src->size;
	if (src->drv->format != QK_FORMAT_QCOW2) {
		s->err = -ENOENT;
		return 0;
	}
	struct qcow2 *sq = qcow2_of(src);
	qk__qcow2_lock(sq);
	int64_t i = qk__qcow2_bitmap_find(sq, name);
	int ret = 0;
	if (i < 0)
		s->err = -ENOENT;
	else if (qk__qcow2_bitmap_inconsistent(sq, (uint32_t)i))
		s->err = -EUCLEAN;
	else
		ret = qk__qcow2_bitmap_load(src, (uint32_t)i);
	if (ret == 0 && !s->err) {
		s->gb = sq->bitmap_priv[i].gran_bits;
		ret = qk__qcow2_bits_new(sq, sq->bitmap_priv[i].bits->nbits, sq->bitmap_priv[i].bits,
					 &s->bits);
	}
	qk__qcow2_unlock(sq);
	return ret;
}

/* merge: bitmap ch->name |= the source bitmap, granularities apart or not
 * (each dirty byte range of the source marks the bits that cover it). */
static int op_merge(qk_image *img, const struct qk__bitmap_change *ch, struct source *s)
{
	struct qcow2 *q = qcow2_of(img);
	struct qk__bitmap_edit e;
	int64_t i = usable(img, ch->name), si = -1;
	if (i < 0)
		return (int)i;
	if (ch->src == img && (si = usable(img, ch->src_name)) < 0)
		return (int)si;
	if (s->err == -ENOENT)
		return qk__err(ENOENT, "Dirty bitmap '%s' not found", ch->src_name);
	if (s->err == -EUCLEAN)
		return inconsistent(ch->src_name);
	if (s->size != img->size)
		return qk__err(EINVAL, "Bitmaps are of different sizes (destination size is %llu, source "
			       "size is %llu) and can't be merged", (unsigned long long)img->size,
			       (unsigned long long)s->size);
	int ret = qk__qcow2_bitmap_load(img, (uint32_t)i);
	if (ret == 0 && si >= 0 && !(ret = qk__qcow2_bitmap_load(img, (uint32_t)si))) {
		s->gb = q->bitmap_priv[si].gran_bits;
		ret = qk__qcow2_bits_new(q, q->bitmap_priv[si].bits->nbits, q->bitmap_priv[si].bits,
					 &s->bits);
	}
	if (ret == 0)
		ret = qk__qcow2_bitmap_edit_init(img, &e, 0);
	if (ret < 0)
		return ret;
	struct qk__bitmap_bits *nb;
	ret = qk__qcow2_bits_new(q, e.priv[i].bits->nbits, e.priv[i].bits, &nb);
	if (ret < 0) {
		qk__qcow2_bitmap_edit_free(img, &e);
		return ret;
	}
	for (uint64_t k = qk__qcow2_bits_run(s->bits, 0, false); k < s->bits->nbits;) {
		uint64_t end = qk__qcow2_bits_run(s->bits, k, true);
		uint64_t off = k << s->gb, stop = qk_min_u64(end << s->gb, s->size);
		qk__qcow2_bits_set(q, nb, e.priv[i].gran_bits, off, stop - off);
		k = qk__qcow2_bits_run(s->bits, end, false);
	}
	e.priv[i].bits = nb;
	e.fresh[i] = true;
	return commit(img, &e);
}

int qk__qcow2_bitmap_change(qk_image *img, const struct qk__bitmap_change *ch)
{
	struct source s = { .size = img->size };
	int ret = 0;
	if (ch->op == QK__BM_MERGE && ch->src != img)
		ret = copy_source(ch->src, ch->src_name, &s);
	if (ret < 0)
		return ret;
	ret = qk__qcow2_begin_change(img, 0, 0);
	int64_t i = 0;
	if (ret == 0 && ch->op != QK__BM_ADD && ch->op != QK__BM_MERGE) {
		struct qcow2 *q = qcow2_of(img);
		i = qk__qcow2_bitmap_find(q, ch->name);
		if (i < 0)
			ret = qk__err(ENOENT, "Dirty bitmap '%s' not found", ch->name);
		else if (ch->op != QK__BM_REMOVE && qk__qcow2_bitmap_inconsistent(q, (uint32_t)i))
			ret = inconsistent(ch->name);
	}
	if (ret == 0) {
		if (ch->op == QK__BM_ADD)
			ret = op_add(img, ch);
		else if (ch->op == QK__BM_MERGE)
			ret = op_merge(img, ch, &s);
		else
			ret = op_one(img, ch->op, (uint32_t)i);
	}
	qk__qcow2_end_change(img);
	qk__qcow2_bits_free(s.bits);
	return ret;
}
