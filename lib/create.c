/*
 * create.c - qk_create(): option defaults, the format dispatch, raw images,
 * and the file-level steps every format shares (creating a file, growing
 * it with or without preallocation).
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

/* ---- shared with qcow2/create.c --------------------------------------------
 * These belong in internal.h (a "create.c" section); until they move there
 * each file that uses them repeats the declarations.
 */
int qk__create_open(const char *path, bool *created, struct qk__file **out);
int qk__create_empty(struct qk__file *f);
int qk__create_grow(struct qk__file *f, uint64_t from, uint64_t to, int prealloc);
int qk__create_sync(struct qk__file *f);
int qk__qcow2_create(const char *path, const struct qk_create_options *o);

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

/*
 * Open `path` for a new image, creating it when missing (mode 0644 less the
 * umask; *created says whether this call did), and take its write lock,
 * through the POSIX backend (all byte I/O of the library goes through the
 * backend table). Nothing in an existing file changes yet: the caller
 * empties it with qk__create_empty() once it holds every file it needs.
 * Returns 0, or a negative errno (recorded): "Could not create 'PATH':
 * <reason>" (qemu-img's words), or -EAGAIN with the lock's message when
 * another process uses the file. A file created here is removed again
 * on failure.
 */
int qk__create_open(const char *path, bool *created, struct qk__file **out)
{
	return qk__file_create_posix(path, created, out);
}

/* Truncate a file opened by qk__create_open() to length 0. Returns 0 or a
 * negative errno (recorded). */
int qk__create_empty(struct qk__file *f)
{
	return qk__file_set_size(f, 0);
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
int qk__create_grow(struct qk__file *f, uint64_t from, uint64_t to, int prealloc)
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

/* Make everything written durable (the backend names the file on failure). */
int qk__create_sync(struct qk__file *f)
{
	return qk__file_sync(f);
}

/*
 * A raw image: the file itself, `size` rounded up to whole sectors, as
 * qemu-img's file driver does (truncate to 0 first, then grow with the
 * requested preallocation).
 */
static int create_raw(const char *path, const struct qk_create_options *o)
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

	ret = qk__create_open(path, &created, &f);
	if (ret < 0)
		return ret;
	ret = qk__create_empty(f);
	if (ret == 0)
		ret = qk__create_grow(f, 0, size, o->preallocation);
	if (ret == 0 && o->preallocation != QK_PREALLOC_OFF)
		ret = qk__create_sync(f);
	qk__file_close(f);
	if (ret < 0 && created)
		unlink(path);
	return ret;
}

QK_EXPORT int qk_create(const char *path, const struct qk_create_options *opts)
{
	struct qk_create_options o;

	qk__api_enter("qk_create");
	if (!path || !opts)
		return qk__err(EINVAL, "path and options are required");
	if (path[0] == '\0')
		return qk__err(ENOENT, "Could not create '': %s", strerror(ENOENT));
	/* An older caller's shorter structure: copy what it has over the
	 * defaults; a newer one's extra fields are not ours to read. */
	qk_create_options_init(&o);
	if (opts->struct_size < offsetof(struct qk_create_options, size) + sizeof o.size)
		return qk__err(EINVAL, "options not initialised (struct_size %u; "
			       "call qk_create_options_init)", opts->struct_size);
	memcpy((char *)&o + sizeof o.struct_size,
	       (const char *)opts + sizeof o.struct_size,
	       (opts->struct_size < sizeof o ? opts->struct_size : sizeof o) -
	       sizeof o.struct_size);
	o.struct_size = sizeof o;

	switch (o.format) {
	case QK_FORMAT_RAW:
		return create_raw(path, &o);
	case QK_FORMAT_QCOW2:
		return qk__qcow2_create(path, &o);
	default:
		return qk__err(EINVAL, "Unknown file format %d (QK_FORMAT_QCOW2 or QK_FORMAT_RAW)",
			       (int)o.format);
	}
}
