/*
 * measure.c - the size of a new QCOW2 image, as qemu-img 7.2 measure
 * computes it: QEMU's qcow2_measure(), qcow2_calc_prealloc_size() and
 * qcow2_get_persistent_dirty_bitmap_size().
 *
 * Design note. QEMU does not lay the new image out (create.c does that, to
 * the cluster). It takes the worst case, a fully allocated image: one
 * header cluster, an L2 entry for every cluster, the L1 table for those,
 * every data cluster, and the refcount structures that count all of it.
 * `required` is that size less the data clusters the input leaves
 * unwritten, so it keeps the metadata of the full image and is an upper
 * bound of what convert makes. Persistent bitmaps are counted apart, as if
 * every bitmap cluster were allocated. Scripts compare these numbers with
 * qemu-img's, so the arithmetic is QEMU's step by step, its checks in its
 * order and words; where QEMU's int64_t arithmetic would overflow (inputs
 * of 2^62 bytes and more) we refuse instead.
 */
#include "qcow2/qcow2.h"

#include <errno.h>
#include <string.h>

#define L1E_SIZE 8
/* A bitmap directory entry: the fixed part, then the name, padded to 8
 * (calc_dir_entry_size() with no extra data). */
#define BM_DIR_ALIGN 8

static inline uint64_t div_up(uint64_t a, uint64_t b)
{
	return a / b + (a % b != 0);
}

/* qcow2_measure()'s option checks, in its order (cluster size, version,
 * refcount width, preallocation). Returns 0 or -EINVAL (recorded). */
static int check_options(const struct qk_create_options *o)
{
	uint64_t cs = o->cluster_size;

	if (!qk_is_pow2(cs) || cs < (1u << MIN_CLUSTER_BITS) || cs > (1u << MAX_CLUSTER_BITS))
		return qk__err(EINVAL, "Cluster size must be a power of two between %d and %dk",
			       1 << MIN_CLUSTER_BITS, 1 << (MAX_CLUSTER_BITS - 10));
	if (o->extended_l2 && cs < (1u << MIN_EXTL2_CLUSTER_BITS))
		return qk__err(EINVAL, "Extended L2 entries are only supported with cluster "
			       "sizes of at least %u bytes", 1u << MIN_EXTL2_CLUSTER_BITS);
	if (o->version != 2 && o->version != 3)
		return qk__err(EINVAL, "Invalid compatibility level: version %u "
			       "(2 for 0.10, 3 for 1.1)", o->version);
	if (o->refcount_bits > 64 || !qk_is_pow2(o->refcount_bits))
		return qk__err(EINVAL, "Refcount width must be a power of two and may not "
			       "exceed 64 bits");
	if (o->version < 3 && o->refcount_bits != 16)
		return qk__err(EINVAL, "Different refcount widths than 16 bits require "
			       "compatibility level 1.1 or above (use compat=1.1 or greater)");
	if (o->preallocation < QK_PREALLOC_OFF || o->preallocation > QK_PREALLOC_FULL)
		return qk__err(EINVAL, "Invalid preallocation mode %d", o->preallocation);
	return 0;
}

/*
 * QEMU's size check: the L1 table of an image of `size` bytes must fit in
 * QCOW_MAX_L1_SIZE. As in QEMU the size rounds up to a cluster in 64-bit
 * unsigned arithmetic (a size within a cluster of 2^64 wraps to 0 and
 * passes; only -o size can be that large, and then an input's size counts).
 */
static int check_size(uint64_t size, uint64_t cs, uint64_t l2e)
{
	uint64_t virt = (size + cs - 1) & ~(cs - 1);

	if (div_up(virt / cs, cs / l2e) > MAX_L1_BYTES / L1E_SIZE)
		return qk__err(EFBIG, "The image size is too large (try using a larger "
			       "cluster size)");
	return 0;
}

/*
 * qcow2_calc_prealloc_size(): bytes of an image of `virt` bytes (cluster
 * aligned, below 2^63) with every cluster allocated. Returns 0 with *out,
 * or -EFBIG (recorded) past 2^63 - 1, where QEMU's int64_t wraps.
 */
static int prealloc_size(uint64_t virt, uint64_t cs, uint32_t order, uint64_t l2e,
			 uint64_t *out)
{
	uint64_t meta = cs, nl2e, nl1e, total;

	nl2e = div_up(virt / cs, cs / l2e) * (cs / l2e);
	meta += nl2e * l2e;
	nl1e = div_up(nl2e * l2e / cs, cs / L1E_SIZE) * (cs / L1E_SIZE);
	meta += nl1e * L1E_SIZE;
	meta += qk__qcow2_refcount_metadata((meta + virt) / cs, cs, order, false, NULL);
	if (qk_add_overflow(meta, virt, &total) || total > (uint64_t)INT64_MAX)
		return qk__err(EFBIG, "The image size is too large");
	*out = total;
	return 0;
}

/*
 * qcow2_get_persistent_dirty_bitmap_size(): the bytes to copy the input's
 * persistent bitmaps into an image of `cs`-byte clusters: each bitmap's
 * clusters (all assumed allocated) and its table, then the directory. A
 * bitmap covers the input's virtual size (src->size).
 */
static uint64_t bitmaps_size(const struct qk__measure_src *src, uint64_t cs)
{
	uint64_t total = 0, dir = 0;

	for (size_t i = 0; i < src->n_bitmaps; i++) {
		const struct qk_bitmap *bm = &src->bitmaps[i];
		/* granularity: a power of two, 1 to 2^63 (bitmap.c) */
		uint64_t bytes = div_up(div_up(src->size, bm->granularity), 8);
		uint64_t clusters = div_up(bytes, cs);

		total += clusters * cs + div_up(clusters * 8, cs) * cs;
		dir += div_up(BM_DIR_FIXED_LEN + strlen(bm->name), BM_DIR_ALIGN) * BM_DIR_ALIGN;
	}
	return total + div_up(dir, cs) * cs;
}

/*
 * The driver's measure (see qk_measure() in qcowkit.h; `o` complete).
 * Returns 0 with *res filled, -EINVAL (an option), -EFBIG (too large), or
 * the input's read error; each recorded.
 */
int qk__qcow2_measure(const struct qk_create_options *o, const struct qk__measure_src *src,
		      struct qk_measure *res)
{
	uint64_t cs = o->cluster_size, l2e = o->extended_l2 ? 16 : 8;
	uint64_t virt = 0, data = 0, full = 0;
	int ret = check_options(o);

	if (ret == 0)
		ret = check_size(o->size, cs, l2e);
	if (ret < 0)
		return ret;
	if (!src)
		virt = (o->size + cs - 1) & ~(cs - 1);
	else if (qk_align_up_overflow(src->size, cs, &virt))
		return qk__err(EFBIG, "The image size is too large");
	else if (o->backing_file)
		data = virt;        /* what the backing file shares is unknown */
	else if ((ret = src->count_data(src, cs, &data)) < 0)
		return ret;
	if (o->preallocation == QK_PREALLOC_FULL || o->preallocation == QK_PREALLOC_FALLOC)
		data = virt;

	ret = prealloc_size(virt, cs, (uint32_t)__builtin_ctz(o->refcount_bits), l2e, &full);
	if (ret < 0)
		return ret;
	res->fully_allocated = full;
	res->required = full - virt + data;
	/* Bitmaps only when both ends support them. */
	res->has_bitmaps = o->version >= 3 && src && src->bitmaps_supported;
	res->bitmaps = res->has_bitmaps ? bitmaps_size(src, cs) : 0;
	return 0;
}
