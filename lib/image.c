/*
 * The image handle: format probing, driver choice, and the public entry
 * points. Each public function names itself for error messages, checks its
 * arguments, and calls the unlocked driver body; drivers do their own
 * locking so reads of stable data never wait on one image-wide lock.
 */
#include "internal.h"

#include <assert.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define PROBE_LEN 512

QK_EXPORT const char *qk_version(void)
{
	return QK_VERSION_STRING;
}

QK_EXPORT int qk_version_number(void)
{
	return QK_VERSION_NUMBER;
}

QK_EXPORT const char *qk_format_name(qk_format fmt)
{
	switch (fmt) {
	case QK_FORMAT_RAW:
		return "raw";
	case QK_FORMAT_QCOW2:
		return "qcow2";
	default:
		return "auto";
	}
}

/* Formats we recognise and refuse: a magic at a fixed offset. */
struct magic {
	const char *name;
	size_t off;
	size_t len;
	const char *bytes;
};

static const struct magic foreign[] = {
	{ "vmdk", 0, 4, "KDMV" },
	{ "vmdk", 0, 4, "COWD" },
	{ "vmdk", 0, 21, "# Disk DescriptorFile" },
	{ "vdi", 0x40, 4, "\x7f\x10\xda\xbe" },
	{ "vdi", 0, 39, "<<< Oracle VM VirtualBox Disk Image >>>" },
	{ "vpc (VHD)", 0, 8, "conectix" },
	{ "vhdx", 0, 8, "vhdxfile" },
	{ "qed", 0, 4, "QED\0" },
	{ "luks", 0, 6, "LUKS\xba\xbe" },
	{ "android sparse", 0, 4, "\x3a\xff\x26\xed" },
	{ "zstd-compressed", 0, 4, "\x28\xb5\x2f\xfd" },
	{ "gzip-compressed", 0, 3, "\x1f\x8b\x08" },
	{ "xz-compressed", 0, 6, "\xfd" "7zXZ\0" },
	{ "parallels", 0, 16, "WithoutFreeSpace" },
	{ "parallels", 0, 16, "WithouFreSpacExt" },
	{ "bochs", 0, 21, "Bochs Virtual HD Image" },
};

int qk__probe(const uint8_t *buf, size_t len, uint64_t file_size, qk_format *fmt)
{
	(void)file_size;
	if (len >= 4 && memcmp(buf, "QFI\xfb", 4) == 0) {
		uint32_t version = len >= 8 ? qk_be32(buf + 4) : 0;
		if (version == 1)
			return qk__err(ENOTSUP, "image is in the qcow (version 1) format, which is not supported");
		if (version != 2 && version != 3)
			return qk__err(ENOTSUP, "Unsupported qcow2 version %u", version);
		*fmt = QK_FORMAT_QCOW2;
		return 0;
	}
	for (size_t i = 0; i < sizeof foreign / sizeof foreign[0]; i++) {
		const struct magic *m = &foreign[i];
		if (m->off + m->len > len)
			continue;
		if (memcmp(buf + m->off, m->bytes, m->len) == 0)
			return qk__err(ENOTSUP, "image is in the %s format, which is not supported "
				       "(use -f raw to read its bytes as a raw image)", m->name);
	}
	*fmt = QK_FORMAT_RAW;
	return 0;
}

QK_EXPORT void qk_open_options_init(struct qk_open_options *opts)
{
	memset(opts, 0, sizeof *opts);
	opts->struct_size = sizeof *opts;
	opts->format = QK_FORMAT_AUTO;
}

void qk__image_free(qk_image *img)
{
	if (!img)
		return;
	if (img->backing)
		qk__image_free(img->backing);
	if (img->drv && img->drv->close)
		img->drv->close(img);
	qk__file_close(img->file);
	free(img->filename);
	free(img);
}

/* Reads where a layer has nothing (qk_image.read_below): from its backing
 * image, zeros past that image's end or without one. */
static int read_below(qk_image *img, void *buf, size_t len, uint64_t off)
{
	qk_image *b = img->backing;
	if (!b || off >= b->size) {
		memset(buf, 0, len);
		return 0;
	}
	size_t n = qk_min_u64(len, b->size - off);
	int ret = qk__image_pread(b, buf, n, off);
	if (ret == 0 && n < len)
		memset((uint8_t *)buf + n, 0, len - n);
	return ret;
}

/* The backing image img names, opened below it (unless QK_OPEN_NO_BACKING). */
static int open_backing(qk_image *img, const struct qk_open_options *opts)
{
	const char *name = NULL, *fmt = NULL;
	if (img->drv->backing)
		img->drv->backing(img, &name, &fmt);
	if (!name || (opts->flags & QK_OPEN_NO_BACKING))
		return 0;
	struct qk__file *f;
	struct qk_open_options bo;
	char *path = NULL;
	int ret = qk__chain_open_file(img, name, fmt, opts, &f, &path, &bo);
	if (ret == 0)
		ret = qk__image_open_file(img->host, f, path, &bo, img, &img->backing);
	free(path);
	return ret;
}

int qk__image_open_file(const struct qk__host *host, struct qk__file *file,
			const char *filename, const struct qk_open_options *opts,
			qk_image *overlay, qk_image **out)
{
	qk_image *img = calloc(1, sizeof *img);
	char *name = strdup(filename);
	if (!img || !name) {
		free(img);
		free(name);
		qk__file_close(file);
		return qk__err(ENOMEM, "out of memory");
	}
	img->file = file;
	img->host = host;
	img->read_below = read_below;
	img->filename = name;
	img->flags = opts->flags;
	img->overlay = overlay;
	img->depth = overlay ? overlay->depth + 1 : 0;

	qk_format fmt = opts->format;
	int ret = 0;
	if (fmt == QK_FORMAT_AUTO) {
		uint8_t buf[PROBE_LEN];
		uint64_t fsize;
		ret = qk__file_get_size(file, &fsize);
		if (ret == 0)
			ret = qk__file_pread(file, buf, sizeof buf, 0);
		if (ret == 0)
			ret = qk__probe(buf, qk_min_u64(sizeof buf, fsize), fsize, &fmt);
		if (ret < 0)
			goto fail;
	}
	switch (fmt) {
	case QK_FORMAT_RAW:
		img->drv = &qk__raw_driver;
		break;
	case QK_FORMAT_QCOW2:
		img->drv = &qk__qcow2_driver;
		break;
	default:
		ret = qk__err(EINVAL, "unknown format %d", (int)fmt);
		goto fail;
	}
	if (opts->snapshot && !img->drv->snapshot_create) {
		ret = qk__err(ENOTSUP, "'%s' is a %s image: it has no internal snapshots",
			      filename, img->drv->name);
		goto fail;
	}
	if (opts->snapshot && (opts->flags & QK_OPEN_RDWR)) {
		ret = qk__err(EINVAL, "snapshot '%s' of '%s' can only be opened read-only",
			      opts->snapshot, filename);
		goto fail;
	}
	ret = img->drv->open(img, opts);
	if (ret < 0) {
		img->drv = NULL;        /* open cleans up after itself */
		goto fail;
	}
	ret = open_backing(img, opts);
	if (ret < 0)
		goto fail;
	*out = img;
	return 0;
fail:
	qk__image_free(img);
	return ret;
}

QK_EXPORT int qk_open(const char *path, const struct qk_open_options *opts,
		      qk_image **out)
{
	struct qk_open_options defaults;
	qk__api_enter("qk_open");
	if (!path || !out)
		return qk__err(EINVAL, "path and out are required");
	*out = NULL;
	qk_open_options_init(&defaults);
	if (opts) {
		int ret = qk__struct_size_ok(opts->struct_size, QK__OPEN_OPTIONS_V1, "qk_open_options");
		if (ret < 0)
			return ret;
		qk__struct_in(&defaults, sizeof defaults, opts);
	}
	opts = &defaults;
	struct qk__file *f;
	int ret = qk__file_open_posix(path, opts->flags & QK_OPEN_RDWR, opts->flags, &f);
	if (ret < 0)
		return ret;
	ret = qk__file_lock(f, opts->flags & QK_OPEN_RDWR, opts->flags & QK_OPEN_FORCE_SHARE);
	if (ret < 0) {
		qk__file_close(f);
		return ret;
	}
	return qk__image_open_file(&qk__posix_host, f, path, opts, NULL, out);
}

QK_EXPORT int qk_lock_fd(int fd, const char *name, uint32_t flags)
{
	char buf[32];

	qk__api_enter("qk_lock_fd");
	if (fd < 0)
		return qk__err(EBADF, "invalid file descriptor %d", fd);
	if (!name) {
		snprintf(buf, sizeof buf, "fd %d", fd);
		name = buf;
	}
	return qk__lock_fd(fd, name, flags & QK_OPEN_RDWR, flags & QK_OPEN_FORCE_SHARE);
}

/* 1 when f is the file st describes, 0 when not (or f cannot say: memory
 * files), or a negative errno (recorded). */
static int is_file(struct qk__file *f, const struct stat *st)
{
	uint64_t dev, ino;
	int ret;

	if (!f)
		return 0;
	ret = qk__file_identity(f, &dev, &ino);
	if (ret == -ENOTSUP)
		return 0;
	if (ret < 0)
		return ret;
	return dev == (uint64_t)st->st_dev && ino == (uint64_t)st->st_ino;
}

QK_EXPORT int qk_uses_file(qk_image *img, const char *path, qk_image **layer)
{
	struct stat st;

	qk__api_enter("qk_uses_file");
	if (layer)
		*layer = NULL;
	if (!img || !path)
		return qk__err(EINVAL, "image and path are required");
	if (stat(path, &st) < 0) {
		int e = errno;
		if (e == ENOENT || e == ENOTDIR)
			return 0;
		return qk__err(e, "Could not look up '%s': %s", path, strerror(e));
	}
	for (qk_image *i = img; i; i = i->backing) {
		int what = QK_USES_IMAGE, ret = is_file(i->file, &st);

		if (ret == 0 && i->drv->data_file) {
			struct qk__file *df;
			const char *dpath;
			struct stat ds;
			what = QK_USES_DATA_FILE;
			i->drv->data_file(i, &df, &dpath);
			if (df)
				ret = is_file(df, &st);
			else    /* not opened yet (read-only opens open it late) */
				ret = dpath && stat(dpath, &ds) == 0 && ds.st_dev == st.st_dev &&
				      ds.st_ino == st.st_ino;
		}
		if (ret < 0)
			return ret;
		if (ret > 0) {
			if (layer)
				*layer = i;
			return what;
		}
	}
	return 0;
}

QK_EXPORT int qk_close(qk_image *img)
{
	qk__api_enter("qk_close");
	int ret = 0;
	if (img && (img->flags & QK_OPEN_RDWR) && img->drv->flush)
		ret = img->drv->flush(img);
	if (ret == 0 && img && (img->flags & QK_OPEN_RDWR) && img->drv->mark_clean)
		ret = img->drv->mark_clean(img);
	qk__image_free(img);
	return ret;
}

QK_EXPORT uint64_t qk_get_size(const qk_image *img)
{
	return img ? img->size : 0;
}

QK_EXPORT qk_format qk_get_format(const qk_image *img)
{
	return img ? img->drv->format : QK_FORMAT_AUTO;
}

QK_EXPORT const char *qk_get_filename(const qk_image *img)
{
	return img ? img->filename : NULL;
}

QK_EXPORT qk_image *qk_get_backing(const qk_image *img)
{
	return img ? img->backing : NULL;
}

QK_EXPORT int qk_get_info(qk_image *img, struct qk_info *info)
{
	qk__api_enter("qk_get_info");
	if (!img || !info)
		return qk__err(EINVAL, "image and info are required");
	int ret = qk__struct_size_ok(info->struct_size, QK__INFO_V1, "qk_info");
	if (ret < 0)
		return ret;
	struct qk_info full = { .struct_size = sizeof full };
	full.format = img->drv->format;
	full.virtual_size = img->size;
	ret = qk__file_get_size(img->file, &full.file_size);
	if (ret < 0)
		return ret;
	ret = qk__file_allocated_size(img->file, &full.actual_size);
	if (ret < 0 && ret != -ENOTSUP)
		return ret;
	ret = img->drv->get_info ? img->drv->get_info(img, &full) : 0;
	if (ret == 0)
		qk__struct_out(info, &full, sizeof full);
	return ret;
}

int qk__image_pread(qk_image *img, void *buf, size_t len, uint64_t off)
{
	if (len == 0)
		return 0;
	return img->drv->pread(img, buf, len, off);
}

static int check_range(const qk_image *img, uint64_t off, uint64_t len, const char *what)
{
	if (off > img->size || len > img->size - off)
		return qk__err(EINVAL, "%s of %llu bytes at offset %llu is past the end of the image (%llu bytes)",
			       what, (unsigned long long)len, (unsigned long long)off,
			       (unsigned long long)img->size);
	return 0;
}

QK_EXPORT int qk_pread(qk_image *img, void *buf, size_t len, uint64_t off)
{
	qk__api_enter("qk_pread");
	if (!img || (!buf && len))
		return qk__err(EINVAL, "image and buffer are required");
	int ret = check_range(img, off, len, "read");
	if (ret < 0)
		return ret;
	return qk__image_pread(img, buf, len, off);
}

QK_EXPORT int qk_preadv(qk_image *img, const struct iovec *iov, int iovcnt,
			uint64_t off)
{
	qk__api_enter("qk_preadv");
	if (!img || iovcnt < 0 || (!iov && iovcnt))
		return qk__err(EINVAL, "image and iovec are required");
	uint64_t total = 0;
	for (int i = 0; i < iovcnt; i++)
		if (qk_add_overflow(total, iov[i].iov_len, &total))
			return qk__err(EINVAL, "iovec length overflows");
	int ret = check_range(img, off, total, "read");
	if (ret < 0)
		return ret;
	for (int i = 0; i < iovcnt && ret == 0; i++) {
		ret = qk__image_pread(img, iov[i].iov_base, iov[i].iov_len, off);
		off += iov[i].iov_len;
	}
	return ret;
}

QK_EXPORT int qk_pread_batch(qk_image *img, const struct qk_read_op *ops, size_t n)
{
	qk__api_enter("qk_pread_batch");
	if (!img || (!ops && n))
		return qk__err(EINVAL, "image and reads are required");
	for (size_t i = 0; i < n; i++) {
		if (!ops[i].buf && ops[i].len)
			return qk__err(EINVAL, "read %zu of the batch has no buffer", i);
		int ret = check_range(img, ops[i].offset, ops[i].len, "read");
		if (ret < 0)
			return ret;
	}
	if (qk__io_batch_begin() < 0)
		return qk__err(EBUSY, "a batch is already being read on this thread");
	int ret = 0;
	for (size_t i = 0; i < n && ret == 0; i++)
		ret = qk__image_pread(img, ops[i].buf, ops[i].len, ops[i].offset);
	/* Every queued read is waited for, even after a failure: the
	 * buffers are the caller's again on return. */
	int end = qk__io_batch_end(ret == 0);
	return ret < 0 ? ret : end;
}

/* Common checks of the write entry points. */
static int check_writable(const qk_image *img, uint64_t off, uint64_t len)
{
	if (!(img->flags & QK_OPEN_RDWR))
		return qk__err(EPERM, "'%s' was opened read-only", img->filename);
	return check_range(img, off, len, "write");
}

QK_EXPORT int qk_pwrite(qk_image *img, const void *buf, size_t len, uint64_t off)
{
	qk__api_enter("qk_pwrite");
	if (!img || (!buf && len))
		return qk__err(EINVAL, "image and buffer are required");
	int ret = check_writable(img, off, len);
	if (ret < 0 || len == 0)
		return ret;
	return img->drv->pwrite(img, buf, len, off);
}

QK_EXPORT int qk_write_compressed(qk_image *img, const void *buf, size_t len, uint64_t off)
{
	qk__api_enter("qk_write_compressed");
	if (!img || (!buf && len))
		return qk__err(EINVAL, "image and buffer are required");
	int ret = check_writable(img, off, len);
	if (ret < 0)
		return ret;
	if (!img->drv->write_compressed)
		return qk__err(ENOTSUP, "'%s' is a %s image: it cannot hold compressed data",
			       img->filename, img->drv->name);
	return img->drv->write_compressed(img, buf, len, off);
}

QK_EXPORT int qk_check(qk_image *img, uint32_t flags, struct qk_check_result *res,
		       void (*report)(void *opaque, const char *line), void *opaque)
{
	qk__api_enter("qk_check");
	if (!img || !res)
		return qk__err(EINVAL, "image and result are required");
	if (flags & ~(uint32_t)(QK_CHECK_FIX_LEAKS | QK_CHECK_FIX_ERRORS))
		return qk__err(EINVAL, "unknown flags 0x%x", flags);
	if (flags && !(img->flags & QK_OPEN_RDWR))
		return qk__err(EPERM, "'%s' was opened read-only: it cannot be repaired", img->filename);
	int ret = qk__struct_size_ok(res->struct_size, QK__CHECK_RESULT_V1, "qk_check_result");
	if (ret < 0)
		return ret;
	if (!img->drv->check)
		return qk__err(ENOTSUP, "This image format does not support checks");
	struct qk_check_result full = { .struct_size = sizeof full };
	ret = img->drv->check(img, flags, &full, report, opaque);
	qk__struct_out(res, &full, sizeof full);      /* what the check found, also on failure */
	return ret;
}

QK_EXPORT int qk_forensic(qk_image *img,
			  int (*found)(void *opaque, const struct qk_forensic_item *it), void *opaque)
{
	qk__api_enter("qk_forensic");
	if (!img || !found)
		return qk__err(EINVAL, "image and callback are required");
	if (!img->drv->forensic)
		return qk__err(ENOTSUP, "'%s' is a %s image: forensic reports are for qcow2 images",
			       img->filename, img->drv->name);
	return img->drv->forensic(img, found, opaque);
}

QK_EXPORT int qk_pwritev(qk_image *img, const struct iovec *iov, int iovcnt, uint64_t off)
{
	qk__api_enter("qk_pwritev");
	if (!img || iovcnt < 0 || (!iov && iovcnt))
		return qk__err(EINVAL, "image and iovec are required");
	uint64_t total = 0;
	for (int i = 0; i < iovcnt; i++)
		if (qk_add_overflow(total, iov[i].iov_len, &total))
			return qk__err(EINVAL, "iovec length overflows");
	int ret = check_writable(img, off, total);
	for (int i = 0; i < iovcnt && ret == 0; i++) {
		if (iov[i].iov_len)
			ret = img->drv->pwrite(img, iov[i].iov_base, iov[i].iov_len, off);
		off += iov[i].iov_len;
	}
	return ret;
}

QK_EXPORT int qk_discard(qk_image *img, uint64_t off, uint64_t len)
{
	qk__api_enter("qk_discard");
	if (!img)
		return qk__err(EINVAL, "image is required");
	int ret = check_writable(img, off, len);
	if (ret < 0 || len == 0)
		return ret;
	return img->drv->discard(img, off, len);
}

QK_EXPORT int qk_write_zeroes(qk_image *img, uint64_t off, uint64_t len, uint32_t flags)
{
	qk__api_enter("qk_write_zeroes");
	if (!img)
		return qk__err(EINVAL, "image is required");
	if (flags & ~(uint32_t)(QK_ZERO_MAY_UNMAP | QK_ZERO_NO_FALLBACK))
		return qk__err(EINVAL, "unknown flags 0x%x", flags);
	int ret = check_writable(img, off, len);
	if (ret < 0 || len == 0)
		return ret;
	return img->drv->write_zeroes(img, off, len, flags);
}

QK_EXPORT int qk_resize(qk_image *img, uint64_t size, uint32_t flags)
{
	qk__api_enter("qk_resize");
	if (!img)
		return qk__err(EINVAL, "image is required");
	if (!(img->flags & QK_OPEN_RDWR))
		return qk__err(EPERM, "'%s' was opened read-only", img->filename);
	if (flags & ~(uint32_t)QK_RESIZE_SHRINK)
		return qk__err(EINVAL, "unknown flags 0x%x", flags);
	if (size < img->size && !(flags & QK_RESIZE_SHRINK))
		return qk__err(EINVAL, "Use the --shrink option to perform a shrink operation "
			       "(shrinking '%s' from %llu to %llu bytes drops data)", img->filename,
			       (unsigned long long)img->size, (unsigned long long)size);
	if (img->drv->format == QK_FORMAT_RAW && size % 512)
		return qk__err(EINVAL, "raw image size must be a multiple of 512 bytes");
	if (size == img->size)
		return 0;
	return img->drv->resize(img, size, flags);
}

QK_EXPORT int qk_flush(qk_image *img)
{
	qk__api_enter("qk_flush");
	if (!img)
		return qk__err(EINVAL, "image is required");
	if (!(img->flags & QK_OPEN_RDWR))
		return 0;
	return img->drv->flush(img);
}

int qk__image_block_status(qk_image *img, uint64_t off, uint64_t max_len,
			   struct qk_extent *ext)
{
	if (off >= img->size || max_len == 0)
		return qk__err(EINVAL, "block status at offset %llu: outside the image (%llu bytes)",
			       (unsigned long long)off, (unsigned long long)img->size);
	uint64_t len = qk_min_u64(max_len, img->size - off);
	qk_image *layer = img;
	uint32_t depth = 0;
	for (;;) {
		struct qk__status st = { 0 };
		int ret = layer->drv->block_status(layer, off, len, &st);
		if (ret < 0)
			return ret;
		/* A driver's run is never empty nor longer than asked (and a
		 * release build still refuses one rather than loop on it). */
		assert(st.bytes > 0 && st.bytes <= len);
		if (st.bytes == 0 || st.bytes > len)
			return qk__err(EIO, "internal error: block status of %s returned %llu bytes",
				       layer->filename, (unsigned long long)st.bytes);
		len = st.bytes;
		bool below = !(st.flags & QK_EXTENT_PRESENT) && layer->backing &&
			     off < layer->backing->size;
		if (!below) {
			if (!(st.flags & QK_EXTENT_PRESENT) && !layer->backing)
				st.flags |= QK_EXTENT_ZERO;
			ext->start = off;
			ext->length = len;
			ext->flags = st.flags;
			ext->depth = depth;
			ext->offset = (st.flags & QK_EXTENT_OFFSET) ? st.offset : 0;
			ext->file = (st.flags & QK_EXTENT_OFFSET) ? st.file : NULL;
			if (!(st.flags & QK_EXTENT_PRESENT) && layer->backing)
				ext->flags |= QK_EXTENT_ZERO;  /* past the backing file's end */
			return 0;
		}
		len = qk_min_u64(len, layer->backing->size - off);
		layer = layer->backing;
		depth++;
	}
}

QK_EXPORT int qk_block_status(qk_image *img, uint64_t off, uint64_t max_len,
			      struct qk_extent *ext)
{
	qk__api_enter("qk_block_status");
	if (!img || !ext)
		return qk__err(EINVAL, "image and extent are required");
	return qk__image_block_status(img, off, max_len, ext);
}

QK_EXPORT int qk_list_snapshots(qk_image *img, const struct qk_snapshot **list,
				size_t *count)
{
	qk__api_enter("qk_list_snapshots");
	if (!img || !list || !count)
		return qk__err(EINVAL, "image, list and count are required");
	*list = NULL;
	*count = 0;
	return img->drv->list_snapshots ? img->drv->list_snapshots(img, list, count) : 0;
}

QK_EXPORT int qk_list_bitmaps(qk_image *img, const struct qk_bitmap **list,
			      size_t *count)
{
	qk__api_enter("qk_list_bitmaps");
	if (!img || !list || !count)
		return qk__err(EINVAL, "image, list and count are required");
	*list = NULL;
	*count = 0;
	return img->drv->list_bitmaps ? img->drv->list_bitmaps(img, list, count) : 0;
}

/* qk_snapshot_find's rule: an id first, else the first name. */
static int find_snapshot(qk_image *img, const char *id_or_name)
{
	const struct qk_snapshot *list;
	size_t n;
	if (!img || !id_or_name)
		return qk__err(EINVAL, "image and snapshot are required");
	int ret = img->drv->list_snapshots ? img->drv->list_snapshots(img, &list, &n) : 0;
	if (!img->drv->list_snapshots)
		n = 0;
	for (size_t i = 0; ret == 0 && i < n; i++)
		if (strcmp(list[i].id, id_or_name) == 0)
			return (int)i;
	for (size_t i = 0; ret == 0 && i < n; i++)
		if (strcmp(list[i].name, id_or_name) == 0)
			return (int)i;
	return ret < 0 ? ret : qk__err(ENOENT, "'%s' has no snapshot '%s'", img->filename, id_or_name);
}

QK_EXPORT int qk_snapshot_find(qk_image *img, const char *id_or_name)
{
	qk__api_enter("qk_snapshot_find");
	return find_snapshot(img, id_or_name);
}

/* The read-write handle of a format with snapshots, for the calls below. */
static int snapshot_target(qk_image *img)
{
	if (!img)
		return qk__err(EINVAL, "image is required");
	if (!img->drv->snapshot_create)
		return qk__err(ENOTSUP, "'%s' is a %s image: it has no internal snapshots",
			       img->filename, img->drv->name);
	if (!(img->flags & QK_OPEN_RDWR))
		return qk__err(EPERM, "'%s' was opened read-only", img->filename);
	return 0;
}

QK_EXPORT int qk_snapshot_create(qk_image *img, const char *name)
{
	qk__api_enter("qk_snapshot_create");
	int ret = snapshot_target(img);
	if (ret < 0)
		return ret;
	if (!name || strlen(name) > 65535)
		return qk__err(EINVAL, "a snapshot name of at most 65535 bytes is required");
	return img->drv->snapshot_create(img, name);
}

QK_EXPORT int qk_snapshot_apply(qk_image *img, const char *id_or_name)
{
	qk__api_enter("qk_snapshot_apply");
	int ret = snapshot_target(img);
	if (ret == 0)
		ret = find_snapshot(img, id_or_name);
	if (ret < 0)
		return ret;
	return img->drv->snapshot_apply(img, (uint32_t)ret);
}

QK_EXPORT int qk_snapshot_delete(qk_image *img, const char *id, const char *name)
{
	const struct qk_snapshot *list;
	size_t n;
	qk__api_enter("qk_snapshot_delete");
	int ret = snapshot_target(img);
	if (ret < 0)
		return ret;
	if (!id && !name)
		return qk__err(EINVAL, "a snapshot id or name is required");
	ret = img->drv->list_snapshots(img, &list, &n);
	for (size_t i = 0; ret == 0 && i < n; i++)
		if ((!id || strcmp(list[i].id, id) == 0) && (!name || strcmp(list[i].name, name) == 0))
			return img->drv->snapshot_delete(img, (uint32_t)i);
	return ret < 0 ? ret : qk__err(ENOENT, "'%s' has no snapshot %s%s%s", img->filename,
				       name ? "named '" : "with id '", name ? name : id, "'");
}

QK_EXPORT void qk_amend_options_init(struct qk_amend_options *opts)
{
	if (!opts)
		return;
	memset(opts, 0, sizeof *opts);
	opts->struct_size = sizeof *opts;
}

QK_EXPORT int qk_amend(qk_image *img, const struct qk_amend_options *opts)
{
	struct qk_amend_options o;

	qk__api_enter("qk_amend");
	if (!img || !opts)
		return qk__err(EINVAL, "image and options are required");
	int ret = qk__struct_size_ok(opts->struct_size, QK__AMEND_OPTIONS_V1, "qk_amend_options");
	if (ret < 0)
		return ret;
	qk_amend_options_init(&o);
	qk__struct_in(&o, sizeof o, opts);
	if (o.fields & ~(uint32_t)(QK_AMEND_VERSION | QK_AMEND_REFCOUNT_BITS | QK_AMEND_LAZY_REFCOUNTS |
				   QK_AMEND_SIZE | QK_AMEND_BACKING | QK_AMEND_DATA_FILE |
				   QK_AMEND_DATA_FILE_RAW))
		return qk__err(EINVAL, "unknown fields 0x%x", o.fields);
	if (!img->drv->amend)
		return qk__err(ENOTSUP, "Format driver '%s' does not support option amendment",
			       img->drv->name);
	if (!(img->flags & QK_OPEN_RDWR))
		return qk__err(EPERM, "'%s' was opened read-only", img->filename);
	return img->drv->amend(img, &o);
}

/* The read-write handle of a format with backing files, for the calls below. */
static int backing_target(qk_image *img, bool supported)
{
	if (!img)
		return qk__err(EINVAL, "image is required");
	if (!supported)
		return qk__err(ENOTSUP, "'%s' is a %s image: it has no backing file",
			       img->filename, img->drv->name);
	if (!(img->flags & QK_OPEN_RDWR))
		return qk__err(EPERM, "'%s' was opened read-only", img->filename);
	return 0;
}

QK_EXPORT int qk_set_backing(qk_image *img, const char *name, const char *format)
{
	qk__api_enter("qk_set_backing");
	int ret = backing_target(img, img && img->drv->set_backing);
	if (ret < 0)
		return ret;
	return img->drv->set_backing(img, name, format);
}

QK_EXPORT int qk_make_empty(qk_image *img)
{
	qk__api_enter("qk_make_empty");
	int ret = backing_target(img, img && img->drv->make_empty);
	if (ret < 0)
		return ret;
	return img->drv->make_empty(img);
}

/* ---- persistent bitmaps ------------------------------------------------------ */

/* The checks every bitmap change makes, then the driver. */
static int bitmap_change(qk_image *img, const struct qk__bitmap_change *ch)
{
	if (!img || !ch->name)
		return qk__err(EINVAL, "image and bitmap name are required");
	if (!(img->flags & QK_OPEN_RDWR))
		return qk__err(EPERM, "'%s' was opened read-only", img->filename);
	if (!img->drv->bitmap_change && ch->op == QK__BM_ADD)
		return qk__err(ENOTSUP, "Can't store persistent bitmaps to '%s': Operation not "
			       "supported", img->filename);
	if (!img->drv->bitmap_change)
		return qk__err(ENOENT, "Dirty bitmap '%s' not found", ch->name);
	return img->drv->bitmap_change(img, ch);
}

QK_EXPORT int qk_bitmap_add(qk_image *img, const char *name, uint64_t granularity, uint32_t flags)
{
	qk__api_enter("qk_bitmap_add");
	if (flags & ~(uint32_t)QK_BITMAP_ADD_DISABLED)
		return qk__err(EINVAL, "unknown flags 0x%x", flags);
	struct qk__bitmap_change ch = { .op = QK__BM_ADD, .name = name, .granularity = granularity,
					.disabled = flags & QK_BITMAP_ADD_DISABLED };
	return bitmap_change(img, &ch);
}

QK_EXPORT int qk_bitmap_remove(qk_image *img, const char *name)
{
	qk__api_enter("qk_bitmap_remove");
	return bitmap_change(img, &(struct qk__bitmap_change){ .op = QK__BM_REMOVE, .name = name });
}

QK_EXPORT int qk_bitmap_clear(qk_image *img, const char *name)
{
	qk__api_enter("qk_bitmap_clear");
	return bitmap_change(img, &(struct qk__bitmap_change){ .op = QK__BM_CLEAR, .name = name });
}

QK_EXPORT int qk_bitmap_enable(qk_image *img, const char *name)
{
	qk__api_enter("qk_bitmap_enable");
	return bitmap_change(img, &(struct qk__bitmap_change){ .op = QK__BM_ENABLE, .name = name });
}

QK_EXPORT int qk_bitmap_disable(qk_image *img, const char *name)
{
	qk__api_enter("qk_bitmap_disable");
	return bitmap_change(img, &(struct qk__bitmap_change){ .op = QK__BM_DISABLE, .name = name });
}

QK_EXPORT int qk_bitmap_merge(qk_image *img, const char *name, qk_image *src, const char *src_name)
{
	qk__api_enter("qk_bitmap_merge");
	if (!src || !src_name)
		return qk__err(EINVAL, "source image and bitmap name are required");
	struct qk__bitmap_change ch = { .op = QK__BM_MERGE, .name = name, .src = src,
					.src_name = src_name };
	return bitmap_change(img, &ch);
}

QK_EXPORT int qk_bitmap_status(qk_image *img, const char *name, uint64_t off, uint64_t max_len,
			       uint64_t *len)
{
	qk__api_enter("qk_bitmap_status");
	if (!img || !name || !len)
		return qk__err(EINVAL, "image, bitmap name and length are required");
	if (off >= img->size || max_len == 0)
		return qk__err(EINVAL, "bitmap status at offset %llu: outside the image (%llu bytes)",
			       (unsigned long long)off, (unsigned long long)img->size);
	if (!img->drv->bitmap_status)
		return qk__err(ENOENT, "Dirty bitmap '%s' not found", name);
	return img->drv->bitmap_status(img, name, off, qk_min_u64(max_len, img->size - off), len);
}
