/*
 * driver.c - the QCOW2 driver: its function table, and the life of an open
 * image: open = parse the header, open the external data file, set up the
 * caches, repair a dirty image (lazy refcounts left after a crash), ready;
 * close frees what each part holds. The backing chain is opened by the
 * image layer (lib/image.c) after this open returns, from the name the
 * driver reports.
 */
#include "qcow2/qcow2.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

/* Default L2 cache: enough to map the whole disk, at most this (QEMU's
 * DEFAULT_L2_CACHE_MAX_SIZE on Linux). */
#define DEFAULT_L2_CACHE_MAX (32ull << 20)

static int setup_l2_cache(qk_image *img, struct qcow2 *q, const struct qk_open_options *opts)
{
	uint64_t table_bytes = q->cluster_size;
	/* Enough tables to map the whole disk: a larger cache is never used. */
	uint64_t clusters = img->size / q->cluster_size + 1;
	uint64_t full = clusters * q->l2_entry_size;   /* size < 2^63, no overflow */
	full = (full + table_bytes - 1) / table_bytes * table_bytes;
	uint64_t want = opts->l2_cache_size ? opts->l2_cache_size : DEFAULT_L2_CACHE_MAX;
	want = qk_min_u64(want, full);
	uint64_t slots = want / table_bytes;
	if (slots < 2)
		slots = 2;
	if (slots > (1u << 24))
		slots = 1u << 24;
	int ret = qk__cache_init(&q->l2_cache, img->file, table_bytes, (uint32_t)slots,
				 qk__qcow2_load_l2, img);
	q->l2_cache.store = qk__qcow2_store_l2;
	q->l2_cache.pre_write = qk__qcow2_pre_write_l2;
	return ret;
}

static void qcow2_close(qk_image *img)
{
	struct qcow2 *q = qcow2_of(img);
	if (!q)
		return;
	qk__cache_destroy(&q->l2_cache);
	qk__qcow2_free_refcounts(q);
	qk__qcow2_meta_free(q);
	qk__file_close(q->data_file);
	qk__qcow2_free_snapshots(q);
	qk__qcow2_free_bitmaps(q);
	for (unsigned i = 0; i < 64; i++)
		free(q->feature_names[i]);
	free(q->backing_file);
	free(q->backing_format);
	free(q->data_file_name);
	free(q->full_backing_file);
	free(q->data_file_path);
	free(q->l1);
	free(q->cbuf);
	pthread_mutex_destroy(&q->lock);
	pthread_mutex_destroy(&q->alloc_lock);
	free(q);
	img->drv_state = NULL;
}

/* A dirty image opened to be written: its refcounts may be stale (lazy
 * refcounts and no clean close), so they are rebuilt before any write, as
 * QEMU does, and the dirty bit is cleared. */
static int repair_dirty(qk_image *img)
{
	struct qcow2 *q = qcow2_of(img);
	qk__qcow2_lock(q);      /* nobody else has the image yet: for the asserts */
	int ret = qk__qcow2_rebuild_refcounts(img);
	if (ret == 0)
		ret = qk__qcow2_write_incompat(img, q->incompat & ~INCOMPAT_DIRTY);
	qk__qcow2_unlock(q);
	if (ret < 0)
		ret = qk__err_prepend(-ret, "'%s' is dirty and its refcounts could not be rebuilt",
				      img->filename);
	return ret;
}

/* Open internal snapshot `which` (an id, else a name) instead of the
 * active image: its L1 table and size take the active ones' place, for
 * reading only. */
static int open_snapshot(qk_image *img, struct qcow2 *q, const char *which)
{
	uint32_t i = 0;
	while (i < q->n_snapshots && strcmp(q->snapshots[i].id, which) != 0)
		i++;
	for (uint32_t j = 0; i == q->n_snapshots && j < q->n_snapshots; j++)
		if (strcmp(q->snapshots[j].name, which) == 0)
			i = j;
	if (i == q->n_snapshots)
		return qk__err(ENOENT, "'%s' has no snapshot '%s'", img->filename, which);
	const struct qk_snapshot *sn = &q->snapshots[i];
	uint64_t *l1;
	int ret = qk__qcow2_snapshot_l1(img, sn, &l1);
	if (ret < 0)
		return ret;
	free(q->l1);
	q->l1 = l1;
	q->l1_size = sn->l1_size;
	q->l1_offset = sn->l1_table_offset;
	img->at_snapshot = true;
	img->active_size = img->size;
	img->size = sn->disk_size;
	return 0;
}

static int qcow2_open(qk_image *img, const struct qk_open_options *opts)
{
	struct qcow2 *q = calloc(1, sizeof *q);
	if (!q)
		return qk__err(ENOMEM, "out of memory");
	pthread_mutex_init(&q->lock, NULL);
	pthread_mutex_init(&q->alloc_lock, NULL);
	img->drv_state = q;
	int ret = qk__qcow2_parse_header(img, q, opts);
	if (ret == 0 && opts->snapshot)
		ret = open_snapshot(img, q, opts->snapshot);
	if (ret == 0 && q->has_data_file &&
	    (!(opts->flags & QK_OPEN_DEFER_DATA) || (opts->flags & QK_OPEN_RDWR))) {
		struct qk__file *df;
		ret = qk__qcow2_data_file(img, &df);
	}
	if (ret == 0)
		ret = setup_l2_cache(img, q, opts);
	if (ret == 0 && (q->incompat & INCOMPAT_DIRTY) && (opts->flags & QK_OPEN_RDWR) &&
	    !(opts->flags & QK_OPEN_CHECK))
		ret = repair_dirty(img);
	if (ret < 0)
		qcow2_close(img);
	return ret;
}

static void qcow2_backing(qk_image *img, const char **name, const char **format)
{
	struct qcow2 *q = qcow2_of(img);
	*name = q->backing_file;
	*format = q->backing_format;
}

static int qcow2_get_info(qk_image *img, struct qk_info *info)
{
	struct qcow2 *q = qcow2_of(img);
	info->cluster_size = (uint32_t)q->cluster_size;
	info->qcow2_version = q->version;
	info->refcount_bits = 1u << q->refcount_order;
	info->compression_type = q->compression_type;
	info->incompatible_features = q->incompat;
	info->compatible_features = q->compat;
	info->autoclear_features = q->autoclear;
	info->dirty = !!(q->incompat & INCOMPAT_DIRTY);
	info->corrupt = !!(q->incompat & INCOMPAT_CORRUPT);
	info->lazy_refcounts = !!(q->compat & COMPAT_LAZY_REFCOUNTS);
	info->extended_l2 = q->extl2;
	info->data_file_raw = !!(q->autoclear & AUTOCLEAR_DATA_RAW);
	info->bitmaps_consistent = !!(q->autoclear & AUTOCLEAR_BITMAPS);
	info->encrypted = q->crypt_method != CRYPT_NONE;
	info->backing_file = q->backing_file;
	info->full_backing_file = q->full_backing_file;
	info->backing_format = q->backing_format;
	info->data_file = q->data_file_name;
	info->nb_snapshots = q->n_snapshots;
	info->nb_bitmaps = q->n_bitmaps;
	/* actual_size is the image file's alone, as qemu-img reports it. */
	return 0;
}

static int qcow2_list_snapshots(qk_image *img, const struct qk_snapshot **list, size_t *n)
{
	struct qcow2 *q = qcow2_of(img);
	*list = q->snapshots;
	*n = q->n_snapshots;
	return 0;
}

static int qcow2_list_bitmaps(qk_image *img, const struct qk_bitmap **list, size_t *n)
{
	struct qcow2 *q = qcow2_of(img);
	*list = q->bitmaps;
	*n = q->n_bitmaps;
	return 0;
}

static void qcow2_data_file(qk_image *img, struct qk__file **f, const char **path)
{
	struct qcow2 *q = qcow2_of(img);
	*f = __atomic_load_n(&q->data_file, __ATOMIC_ACQUIRE);
	*path = q->has_data_file ? q->data_file_path : NULL;
}

const struct qk__driver qk__qcow2_driver = {
	.create = qk__qcow2_create,
	.backing = qcow2_backing,
	.name = "qcow2",
	.format = QK_FORMAT_QCOW2,
	.open = qcow2_open,
	.close = qcow2_close,
	.pread = qk__qcow2_pread,
	.pwrite = qk__qcow2_pwrite,
	.write_compressed = qk__qcow2_write_compressed,
	.check = qk__qcow2_check,
	.forensic = qk__qcow2_forensic,
	.flush = qk__qcow2_flush,
	.mark_clean = qk__qcow2_mark_clean,
	.resize = qk__qcow2_resize,
	.discard = qk__qcow2_discard,
	.write_zeroes = qk__qcow2_write_zeroes,
	.block_status = qk__qcow2_block_status,
	.get_info = qcow2_get_info,
	.list_snapshots = qcow2_list_snapshots,
	.list_bitmaps = qcow2_list_bitmaps,
	.bitmap_change = qk__qcow2_bitmap_change,
	.bitmap_status = qk__qcow2_bitmap_status,
	.snapshot_create = qk__qcow2_snapshot_create,
	.snapshot_apply = qk__qcow2_snapshot_apply,
	.snapshot_delete = qk__qcow2_snapshot_delete,
	.data_file = qcow2_data_file,
	.measure = qk__qcow2_measure,
	.amend = qk__qcow2_amend,
	.set_backing = qk__qcow2_set_backing,
	.make_empty = qk__qcow2_make_empty,
};
