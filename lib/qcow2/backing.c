/*
 * backing.c - changing the backing file an image names (qemu-img rebase),
 * as QEMU's qcow2_change_backing_file: the name lives in the header
 * cluster after the header extensions, its format in one of them.
 *
 * Invariant, for power cuts: the whole first cluster (fixed header,
 * extensions, backing name) is rebuilt in memory from what is on disk and
 * written back in one write, then synced; nothing else changes. A sector
 * write is atomic, so a header that fits in 512 bytes (the usual case)
 * is old or new after a cut; a longer one may tear, as with QEMU.
 */
#include "qcow2/qcow2.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

/* Append extension (type, data, len) at *p of the cluster image h of cs
 * bytes, padded to 8. Returns 0, or -ENOSPC when it does not fit. */
static int put_ext(uint8_t *h, uint64_t cs, size_t *p, uint32_t type, const void *data,
		   uint32_t len)
{
	size_t padded = ((size_t)len + 7) & ~(size_t)7;
	if (*p + 8 + padded > cs)
		return -ENOSPC;
	qk_put_be32(h + *p, type);
	qk_put_be32(h + *p + 4, len);
	memset(h + *p + 8, 0, padded);
	memcpy(h + *p + 8, data, len);
	*p += 8 + padded;
	return 0;
}

/*
 * Rebuild the header cluster `old` into `h` (both cs bytes) with backing
 * name `name` and format `fmt` (NULL: none). The extensions other than
 * the backing format are kept in their order. Returns 0, -ENOSPC when the
 * result does not fit in the cluster, -EINVAL for a malformed extension.
 */
static int rebuild(struct qcow2 *q, const uint8_t *old, uint8_t *h, const char *name,
		   const char *fmt)
{
	uint64_t cs = q->cluster_size;
	size_t start = q->version >= 3 ? q->header_length : HDR_V2_LENGTH;
	size_t p = start, i = start;
	int ret = 0;
	memset(h, 0, cs);
	memcpy(h, old, start);
	if (name && fmt)
		ret = put_ext(h, cs, &p, EXT_BACKING_FMT, fmt, (uint32_t)strlen(fmt));
	while (ret == 0 && i + 8 <= cs) {
		uint32_t type = qk_be32(old + i), len = qk_be32(old + i + 4);
		if (type == EXT_END)
			break;
		if (len > cs - i - 8)
			return -EINVAL;
		if (type != EXT_BACKING_FMT)
			ret = put_ext(h, cs, &p, type, old + i + 8, len);
		i += 8 + (((size_t)len + 7) & ~(size_t)7);
	}
	if (ret == 0 && p + 8 > cs)
		ret = -ENOSPC;
	p += 8; /* the end marker: zeros */
	size_t nlen = name ? strlen(name) : 0;
	if (ret == 0 && p + nlen > cs)
		ret = -ENOSPC;
	if (ret < 0)
		return ret;
	memcpy(h + p, name ? name : "", nlen);
	qk_put_be64(h + HDR_BACKING_OFFSET, nlen ? p : 0);
	qk_put_be32(h + HDR_BACKING_SIZE, (uint32_t)nlen);
	return 0;
}

/* Replace the in-memory names once the header says so. */
static int remember(qk_image *img, struct qcow2 *q, const char *name, const char *fmt)
{
	char *n = name ? strdup(name) : NULL, *f = name && fmt ? strdup(fmt) : NULL;
	char *full = name ? qk__file_resolve(img->filename, name) : NULL;
	if ((name && (!n || !full)) || (name && fmt && !f)) {
		free(n);
		free(f);
		free(full);
		return qk__err(ENOMEM, "out of memory");
	}
	free(q->backing_file);
	free(q->backing_format);
	free(q->full_backing_file);
	q->backing_file = n;
	q->backing_format = f;
	q->full_backing_file = full;
	return 0;
}

int qk__qcow2_set_backing(qk_image *img, const char *name, const char *fmt)
{
	struct qcow2 *q = qcow2_of(img);
	if (name && !*name)
		name = NULL;
	if (name && strlen(name) > MAX_BACKING_NAME)
		return qk__err(EINVAL, "backing file name longer than %u bytes", MAX_BACKING_NAME);
	if (name && fmt && strlen(fmt) > MAX_BACKING_FMT)
		return qk__err(EINVAL, "backing format name longer than %u bytes", MAX_BACKING_FMT);
	uint8_t *old = malloc(q->cluster_size), *h = malloc(q->cluster_size);
	int ret = old && h ? 0 : qk__err(ENOMEM, "out of memory");
	qk__qcow2_lock(q);
	if (ret == 0)
		ret = qk__file_pread(img->file, old, q->cluster_size, 0);
	if (ret == 0) {
		ret = rebuild(q, old, h, name, fmt);
		if (ret == -ENOSPC)
			qk__err(ENOSPC, "the header, its extensions and the backing file name "
				"do not fit in the first cluster of '%s'", img->filename);
		else if (ret == -EINVAL)
			qk__err(EINVAL, "a header extension of '%s' overruns the first cluster",
				img->filename);
	}
	if (ret == 0)
		ret = qk__qcow2_write_durable(img, 0, h, q->cluster_size);
	if (ret == 0)
		ret = remember(img, q, name, fmt);
	qk__qcow2_unlock(q);
	free(old);
	free(h);
	return ret;
}
