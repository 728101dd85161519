/*
 * io.c - what the I/O seam offers over any backend: closing a file, the
 * optional operations' fallbacks, file identity, names resolved against an
 * image's directory, and growing a new image file with or without
 * preallocation.
 */
#include "internal.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

char *qk__file_resolve(const char *image_path, const char *name)
{
	if (name[0] == '/')
		return strdup(name);
	const char *slash = strrchr(image_path, '/');
	if (!slash)
		return strdup(name);
	size_t dir = (size_t)(slash - image_path) + 1;
	size_t nlen = strlen(name);
	char *p = malloc(dir + nlen + 1);
	if (!p)
		return NULL;
	memcpy(p, image_path, dir);
	memcpy(p + dir, name, nlen + 1);
	return p;
}

int qk__file_allocate(struct qk__file *f, uint64_t off, uint64_t len)
{
	if (!f->ops->allocate)
		return qk__err(ENOTSUP, "Could not preallocate new data: %s", strerror(ENOTSUP));
	return f->ops->allocate(f, off, len);
}

bool qk__file_same(struct qk__file *a, struct qk__file *b)
{
	uint64_t da, ia, db, ib;
	return qk__file_identity(a, &da, &ia) == 0 && qk__file_identity(b, &db, &ib) == 0 &&
	       da == db && ia == ib;
}

void qk__file_close(struct qk__file *f)
{
	if (!f)
		return;
	f->ops->close(f);
	free(f->path);
	free(f);
}

/* Write zeros over [from, to) of f, 64 KiB at a time. */
static int write_zeros(struct qk__file *f, uint64_t from, uint64_t to)
{
	static const uint8_t zeros[65536];
	while (from < to) {
		size_t n = (size_t)qk_min_u64(to - from, sizeof zeros);
		int ret = qk__file_pwrite(f, zeros, n, from);
		if (ret < 0)
			return qk__err(-ret, "Could not write zeros for preallocation: %s",
				       strerror(-ret));
		from += n;
	}
	return 0;
}

/*
 * QEMU's file driver writes zeros over the first block of a file it grows
 * from empty (allocate_first_block(), for its alignment probing), so that
 * block is allocated, and `map` of a raw image reports it as data. We do
 * the same so maps agree: 512 bytes for files under 4 KiB, else 4 KiB.
 */
static int allocate_first_block(struct qk__file *f, uint64_t size)
{
	static const uint8_t zeros[4096];
	size_t n = size < sizeof zeros ? 512 : sizeof zeros;

	if (size < n)
		return 0;
	return qk__file_pwrite(f, zeros, n, 0);
}

/*
 * Make the file at least `to` bytes long, where [from, to) is space the
 * caller has not written: left sparse (QK_PREALLOC_OFF, QK_PREALLOC_METADATA),
 * reserved with the backend's allocate (posix_fallocate; QK_PREALLOC_FALLOC),
 * or written with zeros (QK_PREALLOC_FULL). A file already longer than `to`
 * keeps its length. With from == 0 (a new, empty file) its first block is
 * allocated, as QEMU's file driver does. Returns 0 or a negative errno
 * (recorded): -EFBIG/-EINVAL for sizes the file system refuses, -ENOSPC,
 * -EIO, -ENOTSUP (no preallocation on this backend).
 */
int qk__file_grow(struct qk__file *f, uint64_t from, uint64_t to, int prealloc)
{
	uint64_t size;
	int ret;

	if (to > (uint64_t)INT64_MAX)
		return qk__err(EINVAL, "Could not resize file: %s", strerror(EINVAL));
	if ((ret = qk__file_get_size(f, &size)) < 0)
		return ret;
	if (from < to && prealloc == QK_PREALLOC_FALLOC) {
		ret = qk__file_allocate(f, from, to - from);
		if (ret < 0)
			return ret;
	} else if (size < to && (ret = qk__file_set_size(f, to)) < 0) {
		return ret;
	}
	if (from < to && prealloc == QK_PREALLOC_FULL)
		return write_zeros(f, from, to);
	if (from == 0 && to > 0) {
		ret = allocate_first_block(f, to);
		if (ret < 0)
			return qk__err(-ret, "Could not write to a new file: %s", strerror(-ret));
	}
	return 0;
}
