/*
 * create.c - qk_create(): option defaults, the format dispatch, raw images,
 * and the file-level steps every format shares (creating a file, growing
 * it with or without preallocation).
 *
 * Behaviour follows qemu-img 7.2's `create`, which is what scripts know:
 * raw sizes round up to whole 512-byte sectors, an existing file is
 * truncated, `falloc` reserves the space and `full` writes zeros. A file
 * this call created is removed again when a later step fails, as QEMU does.
 */
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* ---- shared with qcow2/create.c --------------------------------------------
 * These belong in internal.h (a "create.c" section); until they move there
 * each file that uses them repeats the declarations.
 */
int qk__create_open(const char *path);
int qk__create_grow(int fd, uint64_t from, uint64_t to, int prealloc);
int qk__create_sync(int fd, const char *path);
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
 * Create `path` for writing, truncating an existing file, mode 0644 less
 * the umask. Returns the descriptor (>= 0), or a negative errno with
 * "Could not create 'PATH': <reason>" recorded (qemu-img's words).
 */
int qk__create_open(const char *path)
{
	int fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0) {
		int e = errno;
		return qk__err(e, "Could not create '%s': %s", path, strerror(e));
	}
	return fd;
}

/* Write zeros over [from, to) of fd, 64 KiB at a time. */
static int write_zeros(int fd, uint64_t from, uint64_t to)
{
	static const uint8_t zeros[65536];
	while (from < to) {
		size_t n = (size_t)qk_min_u64(to - from, sizeof zeros);
		ssize_t w = pwrite(fd, zeros, n, (off_t)from);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0) {
			int e = w < 0 ? errno : EIO;
			return qk__err(e, "Could not write zeros for preallocation: %s",
				       strerror(e));
		}
		from += (uint64_t)w;
	}
	return 0;
}

/*
 * QEMU's file driver writes zeros over the first block of a file it grows
 * from empty (allocate_first_block(), for its alignment probing), so that
 * block is allocated, and `map` of a raw image reports it as data. We do
 * the same so maps agree: 512 bytes for files under 4 KiB, else 4 KiB.
 */
static int allocate_first_block(int fd, uint64_t size)
{
	static const uint8_t zeros[4096];
	size_t n = size < sizeof zeros ? 512 : sizeof zeros;

	if (size < n)
		return 0;
	return pwrite(fd, zeros, n, 0) < 0 ? -errno : 0;
}

/*
 * Make the file at least `to` bytes long, where [from, to) is space the
 * caller has not written: left sparse (QK_PREALLOC_OFF, QK_PREALLOC_METADATA),
 * reserved with posix_fallocate (QK_PREALLOC_FALLOC), or written with zeros
 * (QK_PREALLOC_FULL). A file already longer than `to` keeps its length.
 * With from == 0 (a new, empty file) its first block is allocated, as
 * QEMU's file driver does. Returns 0 or a
 * negative errno (recorded): -EFBIG/-EINVAL for sizes the file system
 * refuses, -ENOSPC, -EIO.
 */
int qk__create_grow(int fd, uint64_t from, uint64_t to, int prealloc)
{
	struct stat st;
	int e;

	if (to > (uint64_t)INT64_MAX)
		return qk__err(EINVAL, "Could not resize file: %s", strerror(EINVAL));
	if (fstat(fd, &st) < 0) {
		e = errno;
		return qk__err(e, "Could not resize file: %s", strerror(e));
	}
	if (from < to && prealloc == QK_PREALLOC_FALLOC) {
		e = posix_fallocate(fd, (off_t)from, (off_t)(to - from));
		if (e != 0)
			return qk__err(e, "Could not preallocate new data: %s", strerror(e));
	} else if ((uint64_t)st.st_size < to && ftruncate(fd, (off_t)to) < 0) {
		e = errno;
		return qk__err(e, "Could not resize file: %s", strerror(e));
	}
	if (from < to && prealloc == QK_PREALLOC_FULL)
		return write_zeros(fd, from, to);
	if (from == 0 && to > 0) {
		e = allocate_first_block(fd, to);
		if (e < 0)
			return qk__err(-e, "Could not write to a new file: %s", strerror(-e));
	}
	return 0;
}

/* fsync, naming the file in the message on failure. */
int qk__create_sync(int fd, const char *path)
{
	if (fsync(fd) < 0) {
		int e = errno;
		return qk__err(e, "Could not flush '%s': %s", path, strerror(e));
	}
	return 0;
}

/*
 * A raw image: the file itself, `size` rounded up to whole sectors, as
 * qemu-img's file driver does (truncate to 0 first, then grow with the
 * requested preallocation).
 */
static int create_raw(const char *path, const struct qk_create_options *o)
{
	uint64_t size;
	int fd, ret;

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

	fd = qk__create_open(path);
	if (fd < 0)
		return fd;
	ret = qk__create_grow(fd, 0, size, o->preallocation);
	if (ret == 0 && o->preallocation != QK_PREALLOC_OFF)
		ret = qk__create_sync(fd, path);
	close(fd);
	if (ret < 0)
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
