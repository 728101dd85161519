/*
 * Backing chains. A chain is a list of images, top first, each opened
 * read-only below the one that names it (img->backing down, img->overlay
 * up). Invariants: depth never exceeds the caller's limit
 * (QK_DEFAULT_MAX_CHAIN_DEPTH by default), and no file appears twice
 * (compared by device and inode), so reads always end.
 */
#include "internal.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

/* True when a file with this identity is img or an image above it. */
static bool in_chain(const qk_image *img, struct qk__file *f)
{
	uint64_t dev, ino;
	if (qk__file_identity(f, &dev, &ino) < 0)
		return false;
	for (const qk_image *i = img; i; i = i->overlay) {
		uint64_t d, n;
		if (qk__file_identity(i->file, &d, &n) == 0 &&
		    d == dev && n == ino)
			return true;
	}
	return false;
}

static const qk_image *chain_top(const qk_image *img)
{
	while (img->overlay)
		img = img->overlay;
	return img;
}

int qk__chain_open(qk_image *img, const char *name, const char *fmt,
		   const struct qk_open_options *opts)
{
	uint32_t limit = opts->max_chain_depth ? opts->max_chain_depth
					       : QK_DEFAULT_MAX_CHAIN_DEPTH;
	if (img->depth + 1 >= limit)
		return qk__err(ELOOP, "backing chain of '%s' is longer than %u images",
			       chain_top(img)->filename, limit);
	if (strncmp(name, "json:", 5) == 0 || strstr(name, "://") ||
	    strncmp(name, "nbd:", 4) == 0)
		return qk__err(ENOTSUP, "backing file '%s' of '%s' is not a local file",
			       name, img->filename);

	struct qk_open_options bo = *opts;
	bo.flags &= ~(uint32_t)QK_OPEN_RDWR;
	bo.format = QK_FORMAT_AUTO;
	if (fmt) {
		if (strcmp(fmt, "qcow2") == 0)
			bo.format = QK_FORMAT_QCOW2;
		else if (strcmp(fmt, "raw") == 0)
			bo.format = QK_FORMAT_RAW;
		else
			return qk__err(ENOTSUP, "backing file '%s' of '%s' has format '%s', which is not supported",
				       name, img->filename, fmt);
	}
	char *path = qk__file_resolve(img->filename, name);
	if (!path)
		return qk__err(ENOMEM, "out of memory");
	struct qk__file *f;
	int ret = img->host->open_backing(img->host, img->filename, name, path, opts->flags, &f);
	if (ret == 0) {
		ret = qk__file_lock(f, false, opts->flags & QK_OPEN_FORCE_SHARE);
		if (ret < 0)
			qk__file_close(f);
	}
	if (ret == 0 && in_chain(img, f)) {
		qk__file_close(f);
		ret = qk__err(ELOOP, "backing chain of '%s' loops back to '%s'",
			      chain_top(img)->filename, path);
	}
	if (ret == 0)
		ret = qk__image_open_file(img->host, f, path, &bo, img, &img->backing);
	free(path);
	return ret;
}

int qk__chain_read(qk_image *img, void *buf, size_t len, uint64_t off)
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
