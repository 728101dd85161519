/* The raw driver: guest offset = file offset; holes come from the file
 * system (SEEK_HOLE). */
#include "internal.h"

#include <errno.h>
#include <unistd.h>

/* The guest sees whole 512-byte sectors, as in QEMU: a file of 1000001
 * bytes is a 1000448-byte disk whose tail reads as zeros. */
static int raw_open(qk_image *img, const struct qk_open_options *opts)
{
	uint64_t size;
	int ret = qk__file_get_size(img->file, &size);
	if (ret < 0)
		return ret;
	if (qk_align_up_overflow(size, 512, &img->size) || img->size > (uint64_t)INT64_MAX)
		return qk__err(EFBIG, "'%s' is too large", img->filename);
	return 0;
}

static int raw_pread(qk_image *img, void *buf, size_t len, uint64_t off)
{
	return qk__file_pread_data(img->file, buf, len, off);
}

static int raw_pwrite(qk_image *img, const void *buf, size_t len, uint64_t off)
{
	return qk__file_pwrite(img->file, buf, len, off);
}

static int raw_flush(qk_image *img)
{
	return qk__file_sync(img->file);
}

static int raw_discard(qk_image *img, uint64_t off, uint64_t len)
{
	int ret = qk__file_discard(img->file, off, len);
	return ret == -ENOTSUP ? 0 : ret;     /* a hint: refusal is fine */
}

static int raw_write_zeroes(qk_image *img, uint64_t off, uint64_t len, uint32_t flags)
{
	struct qk__file *f = img->file;
	int ret = -ENOTSUP;
	if (flags & QK_ZERO_MAY_UNMAP)
		ret = qk__file_discard(f, off, len);
	if (ret == -ENOTSUP)
		ret = qk__file_zero_range(f, off, len);
	if (ret != -ENOTSUP)
		return ret;
	if (flags & QK_ZERO_NO_FALLBACK)
		return qk__err(ENOTSUP, "'%s' cannot zero a range without writing zeros", img->filename);
	static const uint8_t zeros[65536];
	for (ret = 0; ret == 0 && len > 0;) {
		size_t n = qk_min_u64(len, sizeof zeros);
		ret = qk__file_pwrite(f, zeros, n, off);
		off += n;
		len -= n;
	}
	return ret;
}

static int raw_resize(qk_image *img, uint64_t size, uint32_t flags)
{
	int ret = qk__file_set_size(img->file, size);
	if (ret == 0)
		img->size = size;
	return ret;
}

static int raw_block_status(qk_image *img, uint64_t off, uint64_t len,
			    struct qk__status *st)
{
	bool data;
	uint64_t n;
	int ret = qk__file_block_status(img->file, off, len, &data, &n);
	if (ret < 0)
		return ret;
	st->bytes = n;
	st->flags = QK_EXTENT_PRESENT | QK_EXTENT_OFFSET |
		    (data ? QK_EXTENT_DATA : QK_EXTENT_ZERO);
	st->offset = off;
	st->file = img->filename;
	return 0;
}

/*
 * A raw image: the file itself, `size` rounded up to whole sectors, as
 * qemu-img's file driver does (truncate to 0 first, then grow with the
 * requested preallocation).
 */
static int raw_create(const char *path, const struct qk_create_options *o)
{
	struct qk__file *f;
	uint64_t size;
	bool created;
	int ret;

	if (o->backing_file)
		return qk__err(EINVAL, "Backing file not supported for file format 'raw'");
	if (o->backing_format)
		return qk__err(EINVAL, "Backing file format not supported for file format 'raw'");
	if (o->data_file)
		return qk__err(EINVAL, "External data files are not supported for file format 'raw'");
	if (o->data_file_raw)
		return qk__err(EINVAL, "data-file-raw is not supported for file format 'raw'");
	if (o->preallocation == QK_PREALLOC_METADATA)
		return qk__err(EINVAL, "Unsupported preallocation mode: metadata");
	if (o->preallocation < QK_PREALLOC_OFF || o->preallocation > QK_PREALLOC_FULL)
		return qk__err(EINVAL, "invalid parameter value: %d", o->preallocation);
	/* 2^63 - 1 rounds past INT64_MAX; qk__create_grow says so as QEMU's
	 * ftruncate does ("Invalid argument"). */
	size = o->size > UINT64_MAX - 511 ? UINT64_MAX : (o->size + 511) & ~511ull;

	ret = qk__file_create_posix(path, &created, &f);
	if (ret < 0)
		return ret;
	ret = qk__file_set_size(f, 0);
	if (ret == 0)
		ret = qk__file_grow(f, 0, size, o->preallocation);
	if (ret == 0 && o->preallocation != QK_PREALLOC_OFF)
		ret = qk__file_sync(f);
	qk__file_close(f);
	if (ret < 0 && created)
		unlink(path);
	return ret;
}

/*
 * qk_measure of a raw target (QEMU's raw_measure): every byte of the disk
 * is in the file, so both sizes are the input's virtual size, or the size
 * asked for rounded up to a sector. (2^63 - 1 rounds to 2^63, which
 * qemu-img prints as such, and as -2^63 in JSON.)
 */
static int raw_measure(const struct qk_create_options *o, const struct qk__measure_src *src,
		       struct qk_measure *res)
{
	uint64_t size;

	if (src)
		size = src->size;
	else if (qk_align_up_overflow(o->size, 512, &size))
		return qk__err(EFBIG, "The image size is too large");
	res->required = res->fully_allocated = size;
	res->has_bitmaps = 0;
	res->bitmaps = 0;
	return 0;
}

const struct qk__driver qk__raw_driver = {
	.name = "raw",
	.format = QK_FORMAT_RAW,
	.create = raw_create,
	.open = raw_open,
	.pread = raw_pread,
	.pwrite = raw_pwrite,
	.flush = raw_flush,
	.discard = raw_discard,
	.write_zeroes = raw_write_zeroes,
	.resize = raw_resize,
	.block_status = raw_block_status,
	.measure = raw_measure,
};
