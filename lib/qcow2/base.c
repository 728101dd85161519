/*
 * base.c - the QCOW2 driver's primitives, which every other file of
 * lib/qcow2 may call and which call nothing of lib/qcow2 above the cache:
 * the one corruption path, durable metadata writes (a header field, an L1
 * or refcount table entry), the incompatible feature bits, and the
 * external data file.
 */
#include "qcow2/qcow2.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/*
 * The one corruption path. On an image open for writing, the corrupt bit
 * is set in the header (so neither we nor QEMU write it again before a
 * repair; version 2 has no such bit) and every later write of this handle
 * fails; reads go on.
 */
int qk__qcow2_corrupt(qk_image *img, const char *fmt, ...)
{
	struct qcow2 *q = qcow2_of(img);
	char msg[384];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	const char *marked = "";
	if ((img->flags & QK_OPEN_RDWR) && !(img->flags & QK_OPEN_CHECK))
		q->write_refused = true;
	if ((img->flags & QK_OPEN_RDWR) && !(img->flags & QK_OPEN_CHECK) && q->version >= 3 &&
	    !(q->incompat & INCOMPAT_CORRUPT)) {
		uint8_t be[8];
		qk_put_be64(be, q->incompat | INCOMPAT_CORRUPT);
		if (qk__qcow2_write_durable(img, HDR_INCOMPAT, be, 8) == 0)
			marked = "; the image is now marked corrupt";
		q->incompat |= INCOMPAT_CORRUPT;
	}
	return qk__err(EIO, "image '%s' is corrupt: %s%s", img->filename, msg, marked);
}

const char *qk__qcow2_feature_name(struct qcow2 *q, unsigned bit)
{
	static const char *const known[] = {
		"dirty bit", "corrupt bit", "external data file",
		"compression type", "extended L2 entries",
	};
	if (bit < 64 && q->feature_names[bit])
		return q->feature_names[bit];
	if (bit < sizeof known / sizeof known[0])
		return known[bit];
	return NULL;
}

int qk__qcow2_write_durable(qk_image *img, uint64_t off, const void *buf, size_t len)
{
	int ret = qk__file_pwrite(img->file, buf, len, off);
	if (ret == 0)
		ret = qk__file_sync(img->file);
	return ret;
}

int qk__qcow2_write_incompat(qk_image *img, uint64_t incompat)
{
	struct qcow2 *q = qcow2_of(img);
	uint8_t be[8];
	qk_put_be64(be, incompat);
	int ret = qk__qcow2_write_durable(img, HDR_INCOMPAT, be, 8);
	if (ret == 0)
		q->incompat = incompat;
	return ret;
}

/*
 * Open the external data file (the image is open: its name and flags are
 * known): at open, or with QK_OPEN_DEFER_DATA at the first guest I/O, so
 * describing an image never touches the file it names. Read-write opens
 * lock it for writing (and open it read-only, with writes refused, when
 * confined). A data file that is the image file itself is refused: guest
 * data would land on metadata.
 */
static int open_data_file(qk_image *img)
{
	struct qcow2 *q = qcow2_of(img);
	bool rw = (img->flags & QK_OPEN_RDWR) && !(img->flags & QK_OPEN_CONFINE);
	struct qk__file *f;
	if (!q->data_file_name)
		return qk__err(EINVAL, "'%s' needs an external data file but its header names none",
			       img->filename);
	int ret = img->host->open_data_file(img->host, img->filename, q->data_file_name,
					    q->data_file_path, rw, img->flags, &f);
	if (ret < 0)
		return ret;
	if (qk__file_same(f, img->file)) {
		qk__file_close(f);
		return qk__err(EPERM, "external data file '%s' of '%s' is the image file itself",
			       q->data_file_name, img->filename);
	}
	/* a layer below the top shares as its chain does */
	ret = qk__file_lock(f, rw, (img->flags & QK_OPEN_FORCE_SHARE) ||
				  (img->depth > 0 && (img->flags & QK_OPEN_SHARE_CHAIN)));
	if (ret < 0) {
		qk__file_close(f);
		return ret;
	}
	__atomic_store_n(&q->data_file, f, __ATOMIC_RELEASE);
	return 0;
}

int qk__qcow2_data_file(qk_image *img, struct qk__file **f)
{
	struct qcow2 *q = qcow2_of(img);
	int ret = 0;
	/* Opened once, then only read: the common case takes no lock. */
	*f = __atomic_load_n(&q->data_file, __ATOMIC_ACQUIRE);
	if (*f)
		return 0;
	qk__qcow2_lock(q);
	if (!q->data_file)
		ret = open_data_file(img);
	*f = q->data_file;
	qk__qcow2_unlock(q);
	return ret;
}

