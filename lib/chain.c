/*
 * Backing chains: the rules for opening the next file down. A chain is a
 * list of images, top first, each opened read-only below the one that
 * names it (img->backing down, img->overlay up); lib/image.c builds it,
 * layer by layer, with qk__chain_open_file. Invariants: depth never exceeds the caller's limit
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

int qk__chain_open_file(qk_image *img, const char *name, const char *fmt,
			const struct qk_open_options *opts, struct qk__file **file, char **path,
			struct qk_open_options *bo)
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
	*bo = *opts;
	bo->flags &= ~(uint32_t)QK_OPEN_RDWR;
	bo->snapshot = NULL;    /* a snapshot is the top image's alone */
	bo->format = QK_FORMAT_AUTO;
	if (fmt) {
		if (strcmp(fmt, "qcow2") == 0)
			bo->format = QK_FORMAT_QCOW2;
		else if (strcmp(fmt, "raw") == 0)
			bo->format = QK_FORMAT_RAW;
		else
			return qk__err(ENOTSUP, "backing file '%s' of '%s' has format '%s', which is not supported",
				       name, img->filename, fmt);
	}
	if (!(*path = qk__file_resolve(img->filename, name)))
		return qk__err(ENOMEM, "out of memory");
	int ret = img->host->open_backing(img->host, img->filename, name, *path, opts->flags, file);
	if (ret == 0) {
		ret = qk__file_lock(*file, false,
				    opts->flags & (QK_OPEN_FORCE_SHARE | QK_OPEN_SHARE_CHAIN));
		if (ret < 0)
			qk__file_close(*file);
	}
	if (ret == 0 && in_chain(img, *file)) {
		qk__file_close(*file);
		ret = qk__err(ELOOP, "backing chain of '%s' loops back to '%s'",
			      chain_top(img)->filename, *path);
	}
	if (ret < 0) {
		free(*path);
		*path = NULL;
	}
	return ret;
}
