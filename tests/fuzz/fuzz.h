/*
 * fuzz.h - what the fuzz targets share, header only: open a fuzzed image
 * on the memory backend, and fail loudly when an invariant breaks.
 *
 * The image never reaches the file system: the backing chain is not opened
 * (QK_OPEN_NO_BACKING) and an external data file of a memory image is an
 * empty memory file (lib/qcow2/header.c), so a crafted name cannot make a
 * target read or write a file on disk.
 */
#ifndef QK_FUZZ_H
#define QK_FUZZ_H

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#define FUZZ_NAME "fuzz.qcow2"
#define FUZZ_MAX_FILE (64u << 20)   /* bytes a fuzzed image may grow to */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* A crafted image may make the allocator write far out (a real file would
 * be sparse there); memory is not, so writes may not grow the file past
 * FUZZ_MAX_FILE: they fail as on a full disk. The memory backend's own
 * ops do the rest. */
static const struct qk__io_ops *fuzz_mem_ops;
static struct qk__io_ops fuzz_limited_ops;

static int fuzz_pwrite(struct qk__file *f, const void *buf, size_t len, uint64_t off)
{
	if (off > FUZZ_MAX_FILE || len > FUZZ_MAX_FILE - off)
		return qk__err(ENOSPC, "fuzzed image would grow past %u bytes", FUZZ_MAX_FILE);
	return fuzz_mem_ops->pwrite(f, buf, len, off);
}

static int fuzz_set_size(struct qk__file *f, uint64_t size)
{
	if (size > FUZZ_MAX_FILE)
		return qk__err(ENOSPC, "fuzzed image would grow past %u bytes", FUZZ_MAX_FILE);
	return fuzz_mem_ops->set_size(f, size);
}

static inline void fuzz_limit(struct qk__file *f)
{
	if (!fuzz_mem_ops) {
		fuzz_mem_ops = f->ops;
		fuzz_limited_ops = *f->ops;     /* same name: still a memory file */
		fuzz_limited_ops.pwrite = fuzz_pwrite;
		fuzz_limited_ops.set_size = fuzz_set_size;
	}
	f->ops = &fuzz_limited_ops;
}

/* Open `size` bytes at `data` (copied) as an image of format `fmt`
 * (QK_FORMAT_AUTO: detected) with open `flags` (QK_OPEN_*). Returns 0 and
 * sets *img, or a negative errno. */
static inline int fuzz_open_as(const void *data, size_t size, qk_format fmt, uint32_t flags,
			       qk_image **img)
{
	struct qk__file *f;
	struct qk_open_options o;
	qk__api_enter("fuzz_open");
	int ret = qk__file_open_mem(data, size, FUZZ_NAME, &f);
	if (ret < 0)
		return ret;
	fuzz_limit(f);
	qk_open_options_init(&o);
	o.format = fmt;
	o.flags = flags | QK_OPEN_NO_BACKING;
	return qk__image_open_file(f, FUZZ_NAME, &o, NULL, img);
}

/* Open as a QCOW2 image (see fuzz_open_as). */
static inline int fuzz_open(const void *data, size_t size, uint32_t flags, qk_image **img)
{
	return fuzz_open_as(data, size, QK_FORMAT_QCOW2, flags, img);
}

/* A copy of the bytes of img's file as they are now (after a flush, what a
 * reopen would see); *len gets its length. NULL when out of memory. */
static inline uint8_t *fuzz_snapshot(qk_image *img, size_t *len)
{
	const void *p = qk__file_mem_data(img->file, len);
	uint8_t *copy = malloc(*len ? *len : 1);
	if (copy && *len)
		memcpy(copy, p, *len);
	return copy;
}

/* An invariant broke: say which, and abort so the fuzzer keeps the input
 * (and the replay test fails). */
#define FUZZ_ASSERT(cond, ...)                                                \
	do {                                                                  \
		if (!(cond)) {                                                \
			fprintf(stderr, "%s:%d: invariant broken: ", __FILE__, __LINE__); \
			fprintf(stderr, __VA_ARGS__);                         \
			fprintf(stderr, " (last error: %s)\n", qk_last_error() ? qk_last_error() : "none"); \
			abort();                                              \
		}                                                             \
	} while (0)

#endif /* QK_FUZZ_H */
