/*
 * measure.c - qk_measure(): how large a new image would be, as qemu-img
 * 7.2 measure says. The target format's driver does the arithmetic
 * (qcow2/measure.c, raw.c); this file describes the input to it: the
 * virtual size to measure, its persistent bitmaps, and, when the driver
 * asks with its cluster size, how many bytes of whole clusters hold data.
 *
 * Data are found as QEMU's qcow2_measure() finds them, with block status
 * through the backing chain (bdrv_block_status_above): a run that reads as
 * zeros, or that nothing in the chain allocates, needs nothing; a run of
 * data needs every target cluster it touches. So the count is the number
 * of target clusters holding a byte of data, whatever the input's own
 * cluster size or the way its runs are cut.
 */
#include "internal.h"

#include <errno.h>

/*
 * Block status of [off, end) of src's input, as QEMU sees it: an input
 * opened at a snapshot smaller than the active image is measured over the
 * active size, and past the snapshot's end its L1 table maps nothing, so
 * the backing chain shows through there (zeros past its end). Fills *e.
 * Returns 0 or a negative errno (recorded).
 */
static int status_at(const struct qk__measure_src *src, uint64_t off, uint64_t end,
		     struct qk_extent *e)
{
	qk_image *img = src->img;

	if (off >= img->size) {
		img = img->backing;
		if (!img || off >= img->size) {
			*e = (struct qk_extent){ .start = off, .length = end - off,
						 .flags = QK_EXTENT_ZERO };
			return 0;
		}
	}
	return qk__image_block_status(img, off, qk_min_u64(end, img->size) - off, e);
}

/*
 * count_data for qk__measure_src: bytes of the `cs`-byte clusters of
 * [0, src->size) that hold data. Returns 0 with *bytes, or the block
 * status error (recorded, "Unable to get block status" in front, as
 * qemu-img words it).
 */
static int count_data(const struct qk__measure_src *src, uint64_t cs, uint64_t *bytes)
{
	uint64_t end = src->size, off = 0, n = 0;

	while (off < end) {
		struct qk_extent e;
		int ret = status_at(src, off, end, &e);

		if (ret < 0)
			return qk__err_prepend(ret, "Unable to get block status");
		off = e.start + e.length;
		if ((e.flags & QK_EXTENT_DATA) && !(e.flags & QK_EXTENT_ZERO)) {
			/* From the start of the cluster holding the run's first
			 * byte to the end of the one holding its last. */
			uint64_t first = e.start / cs * cs;

			if (qk_align_up_overflow(off, cs, &off))
				return qk__err(EFBIG, "The image size is too large");
			n += off - first;
		}
	}
	*bytes = n;
	return 0;
}

/* Describe input `in` into *src. Returns 0 or a negative errno (recorded). */
static int describe(qk_image *in, struct qk__measure_src *src)
{
	struct qk_info info = { .struct_size = sizeof info };
	int ret = in->drv->get_info ? in->drv->get_info(in, &info) : 0;

	if (ret < 0)
		return ret;
	src->img = in;
	src->size = in->at_snapshot ? in->active_size : in->size;
	src->count_data = count_data;
	/* QEMU's bdrv_supports_persistent_dirty_bitmap(): qcow2 v3. */
	src->bitmaps_supported = in->drv->format == QK_FORMAT_QCOW2 && info.qcow2_version >= 3;
	src->bitmaps = NULL;
	src->n_bitmaps = 0;
	if (src->bitmaps_supported && in->drv->list_bitmaps)
		ret = in->drv->list_bitmaps(in, &src->bitmaps, &src->n_bitmaps);
	return ret;
}

QK_EXPORT int qk_measure(qk_image *in, const struct qk_create_options *opts,
			 struct qk_measure *res)
{
	struct qk_create_options o;
	struct qk__measure_src src;
	struct qk_measure r = { .struct_size = sizeof r };
	const struct qk__driver *drv;
	int ret;

	qk__api_enter("qk_measure");
	if (!opts || !res)
		return qk__err(EINVAL, "options and result are required");
	ret = qk__struct_size_ok(opts->struct_size, QK__CREATE_OPTIONS_V1, "qk_create_options");
	if (ret == 0)
		ret = qk__struct_size_ok(res->struct_size, QK__MEASURE_V1, "qk_measure");
	if (ret < 0)
		return ret;
	qk_create_options_init(&o);
	qk__struct_in(&o, sizeof o, opts);
	if (o.format == QK_FORMAT_RAW)
		drv = &qk__raw_driver;
	else if (o.format == QK_FORMAT_QCOW2)
		drv = &qk__qcow2_driver;
	else
		return qk__err(EINVAL, "Unknown file format %d (QK_FORMAT_QCOW2 or QK_FORMAT_RAW)",
			       (int)o.format);
	if (in && (ret = describe(in, &src)) < 0)
		return ret;
	ret = drv->measure(&o, in ? &src : NULL, &r);
	if (ret == 0)
		qk__struct_out(res, &r, sizeof r);
	return ret;
}
