/*
 * create.c - qk_create(): option defaults and the dispatch to the format's
 * driver (raw.c, qcow2/create.c); the file-level steps every format shares
 * are in lib/io/io.c.
 *
 * Behaviour follows qemu-img 7.2's `create`, which is what scripts know:
 * raw sizes round up to whole 512-byte sectors, an existing file is
 * truncated, `falloc` reserves the space and `full` writes zeros. Every
 * file is locked for writing (QEMU's lock) before any of them changes, so
 * a file another process uses is left as it was. A file this call created
 * is removed again when a later step fails, as QEMU does; one that was
 * there before stays (emptied, when the failure came after that).
 */
#include "internal.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

QK_EXPORT void qk_create_options_init(struct qk_create_options *opts)
{
	if (!opts)
		return;
	memset(opts, 0, sizeof *opts);
	opts->struct_size = sizeof *opts;
	opts->format = QK_FORMAT_QCOW2;
	opts->cluster_size = 65536;
	opts->version = 3;
	opts->refcount_bits = 16;
	opts->compression_type = QK_COMPRESSION_ZLIB;
	opts->preallocation = QK_PREALLOC_OFF;
}



QK_EXPORT int qk_create(const char *path, const struct qk_create_options *opts)
{
	struct qk_create_options o;

	qk__api_enter("qk_create");
	if (!path || !opts)
		return qk__err(EINVAL, "path and options are required");
	if (path[0] == '\0')
		return qk__err(ENOENT, "Could not create '': %s", strerror(ENOENT));
	/* An older caller's shorter structure: what it has, over the defaults. */
	int ret = qk__struct_size_ok(opts->struct_size, QK__CREATE_OPTIONS_V1, "qk_create_options");
	if (ret < 0)
		return ret;
	qk_create_options_init(&o);
	qk__struct_in(&o, sizeof o, opts);

	switch (o.format) {
	case QK_FORMAT_RAW:
		return qk__raw_driver.create(path, &o);
	case QK_FORMAT_QCOW2:
		return qk__qcow2_driver.create(path, &o);
	default:
		return qk__err(EINVAL, "Unknown file format %d (QK_FORMAT_QCOW2 or QK_FORMAT_RAW)",
			       (int)o.format);
	}
}
