/*
 * fuzz.h - what the fuzz targets share, header only: open a fuzzed image
 * on the memory backend, and fail loudly when an invariant breaks.
 *
 * The image never reaches the file system: the backing chain is not opened
 * (QK_OPEN_NO_BACKING) and an external data file of a memory image is an
 * empty memory file (fuzz_host below), so a crafted name cannot make a
 * target read or write a file on disk.
 */
#ifndef QK_FUZZ_H
#define QK_FUZZ_H

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "support.h"

#define FUZZ_NAME "fuzz.qcow2"
#define FUZZ_MAX_FILE (64u << 20)   /* bytes a fuzzed image may grow to */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

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

/* A crafted image may make the allocator write far out (a real file would
 * be sparse there); memory is not, so writes may not grow the file past
 * FUZZ_MAX_FILE: they fail as on a full disk. The memory backend's own
 * ops do the rest. */
static const struct qk__io_ops *fuzz_mem_ops;
static struct qk__io_ops fuzz_limited_ops;

/*
 * The metadata oracle. Guest data (the library's pwrite_data) may never
 * land on a cluster that the image's metadata names at that moment, as the
 * bytes of the file say: the header, L1 tables and the L2 tables they
 * name, the refcount table and its blocks, the snapshot table, the bitmap
 * directory, tables and data. A cluster the library freed first is named
 * no more. The parse below is this harness's own (it shares no code with
 * the library) and is redone after any other write changed the file.
 */
#define FUZZ_META_CLUSTERS (FUZZ_MAX_FILE / 512u)
static struct qk__file *fuzz_image_file;        /* the file the oracle watches */
static uint8_t fuzz_meta[FUZZ_META_CLUSTERS / 8];
static unsigned fuzz_meta_bits;                 /* cluster_bits of the parse */
static int fuzz_meta_stale = 1;
/* The NBD target writes from several threads: the oracle's state and the
 * file's bytes it parses are looked at under this lock. */
static pthread_mutex_t fuzz_meta_lock = PTHREAD_MUTEX_INITIALIZER;
static uint64_t fuzz_meta_checks;               /* data writes judged (for tests) */

/* Big-endian fields of d[0, n); bytes past the end read as zeros. */
static uint64_t fuzz_be64(const uint8_t *d, size_t n, uint64_t off)
{
	uint64_t v = 0;
	for (int i = 0; i < 8; i++)
		v = v << 8 | (off + (uint64_t)i < n && off + (uint64_t)i >= off ? d[off + i] : 0);
	return v;
}

static uint32_t fuzz_be32(const uint8_t *d, size_t n, uint64_t off)
{
	return (uint32_t)(fuzz_be64(d, n, off) >> 32);
}

/* Mark the clusters of [off, off+len) (those below FUZZ_MAX_FILE). */
static void fuzz_mark(uint64_t off, uint64_t len)
{
	if (len == 0 || off >= FUZZ_MAX_FILE)
		return;
	uint64_t end = off + len < off || off + len > FUZZ_MAX_FILE ? FUZZ_MAX_FILE : off + len;
	for (uint64_t c = off >> fuzz_meta_bits; c <= (end - 1) >> fuzz_meta_bits; c++)
		fuzz_meta[c / 8] |= (uint8_t)(1u << (c % 8));
}

/* An L1 table of `size` entries at `off`, and the L2 tables it names (when
 * the table lies whole in the file, as a reader would read it). */
static void fuzz_mark_l1(const uint8_t *d, size_t n, uint64_t off, uint64_t size)
{
	fuzz_mark(off, size * 8);
	if (size > (32u << 20) / 8 || off > n || size * 8 > n - off)
		return;
	for (uint64_t i = 0; i < size; i++) {
		uint64_t l2 = fuzz_be64(d, n, off + 8 * i) & 0x00fffffffffffe00ull;
		if (l2)
			fuzz_mark(l2, 1ull << fuzz_meta_bits);
	}
}

static void fuzz_meta_scan(const uint8_t *d, size_t n)
{
	memset(fuzz_meta, 0, sizeof fuzz_meta);
	fuzz_meta_bits = 0;
	unsigned cb = fuzz_be32(d, n, 20);
	if (n < 104 || fuzz_be32(d, n, 0) != 0x514649fbu || cb < 9 || cb > 21)
		return;
	uint64_t cs = 1ull << cb;
	uint32_t version = fuzz_be32(d, n, 4);
	fuzz_meta_bits = cb;
	fuzz_mark(0, cs);
	fuzz_mark_l1(d, n, fuzz_be64(d, n, 40), fuzz_be32(d, n, 36));
	uint64_t rt = fuzz_be64(d, n, 48), rt_bytes = (uint64_t)fuzz_be32(d, n, 56) << cb;
	fuzz_mark(rt, rt_bytes);
	for (uint64_t i = 0; rt < n && i < rt_bytes / 8 && rt + 8 * i < n; i++) {
		uint64_t b = fuzz_be64(d, n, rt + 8 * i) & ~0x1ffull;
		if (b)
			fuzz_mark(b, cs);
	}
	uint32_t nb_snap = fuzz_be32(d, n, 60);
	uint64_t st = fuzz_be64(d, n, 64), off = st;
	for (uint32_t i = 0; i < nb_snap && i < 65536 && off < n; i++) {
		uint32_t extra = fuzz_be32(d, n, off + 36), lens = fuzz_be32(d, n, off + 12);
		if (extra > 1024)
			break;
		fuzz_mark_l1(d, n, fuzz_be64(d, n, off), fuzz_be32(d, n, off + 8));
		off += (40 + extra + (lens >> 16) + (lens & 0xffff) + 7) & ~7ull;
	}
	if (nb_snap)
		fuzz_mark(st, off - st);
	/* Bitmaps: trusted by readers only while the autoclear bit is set. */
	if (version < 3 || !(fuzz_be64(d, n, 88) & 1))
		return;
	uint64_t bo = fuzz_be64(d, n, 8), end = bo && bo < cs ? bo : cs;
	for (uint64_t e = fuzz_be32(d, n, 100); e + 8 <= end && e + 8 <= n;) {
		uint32_t type = fuzz_be32(d, n, e), len = fuzz_be32(d, n, e + 4);
		if (type == 0)
			break;
		if (type == 0x23852875 && len == 24) {
			uint64_t dsize = fuzz_be64(d, n, e + 16), doff = fuzz_be64(d, n, e + 24);
			fuzz_mark(doff, dsize);
			for (uint64_t p = doff; dsize <= n && p + 24 <= doff + dsize && p < n;) {
				uint64_t toff = fuzz_be64(d, n, p), tsize = fuzz_be32(d, n, p + 8);
				uint64_t name = fuzz_be32(d, n, p + 16) & 0xffff, ext = fuzz_be32(d, n, p + 20);
				fuzz_mark(toff, tsize * 8);
				for (uint64_t j = 0; toff < n && j < tsize && toff + 8 * j < n; j++) {
					uint64_t b = fuzz_be64(d, n, toff + 8 * j) & 0x00fffffffffffe00ull;
					if (b)
						fuzz_mark(b, cs);
				}
				p += (24 + ext + name + 7) & ~7ull;
			}
		}
		e += 8 + (((uint64_t)len + 7) & ~7ull);
	}
}

static int fuzz_pwrite(struct qk__file *f, const void *buf, size_t len, uint64_t off)
{
	if (off > FUZZ_MAX_FILE || len > FUZZ_MAX_FILE - off)
		return qk__err(ENOSPC, "fuzzed image would grow past %u bytes", FUZZ_MAX_FILE);
	pthread_mutex_lock(&fuzz_meta_lock);
	fuzz_meta_stale = 1;
	int ret = fuzz_mem_ops->pwrite(f, buf, len, off);
	pthread_mutex_unlock(&fuzz_meta_lock);
	return ret;
}

static int fuzz_pwrite_data(struct qk__file *f, const void *buf, size_t len, uint64_t off)
{
	pthread_mutex_lock(&fuzz_meta_lock);
	if (f == fuzz_image_file && len && off < FUZZ_MAX_FILE) {
		if (fuzz_meta_stale) {
			size_t n;
			const uint8_t *d = qk__file_mem_data(f, &n);
			fuzz_meta_scan(d, n);
			fuzz_meta_stale = 0;
		}
		uint64_t end = len > FUZZ_MAX_FILE - off ? FUZZ_MAX_FILE : off + len;
		for (uint64_t c = off >> fuzz_meta_bits; fuzz_meta_bits && c <= (end - 1) >> fuzz_meta_bits; c++) {
			const char *dump = getenv("FUZZ_DUMP");  /* the file as it was, to look at */
			if (dump && (fuzz_meta[c / 8] & (1u << (c % 8)))) {
				size_t n;
				const void *d = qk__file_mem_data(f, &n);
				FILE *o = fopen(dump, "wb");
				if (o) {
					fwrite(d, 1, n, o);
					fclose(o);
				}
			}
			FUZZ_ASSERT(!(fuzz_meta[c / 8] & (1u << (c % 8))),
				    "guest data written at 0x%llx+%zu lands on metadata (cluster at 0x%llx)",
				    (unsigned long long)off, len, (unsigned long long)(c << fuzz_meta_bits));
		}
		fuzz_meta_checks++;
	}
	pthread_mutex_unlock(&fuzz_meta_lock);
	return fuzz_pwrite(f, buf, len, off);
}

static int fuzz_set_size(struct qk__file *f, uint64_t size)
{
	if (size > FUZZ_MAX_FILE)
		return qk__err(ENOSPC, "fuzzed image would grow past %u bytes", FUZZ_MAX_FILE);
	pthread_mutex_lock(&fuzz_meta_lock);
	fuzz_meta_stale = 1;
	int ret = fuzz_mem_ops->set_size(f, size);
	pthread_mutex_unlock(&fuzz_meta_lock);
	return ret;
}

static int fuzz_discard(struct qk__file *f, uint64_t off, uint64_t len)
{
	pthread_mutex_lock(&fuzz_meta_lock);
	fuzz_meta_stale = 1;
	int ret = fuzz_mem_ops->discard(f, off, len);
	pthread_mutex_unlock(&fuzz_meta_lock);
	return ret;
}

static int fuzz_zero_range(struct qk__file *f, uint64_t off, uint64_t len)
{
	pthread_mutex_lock(&fuzz_meta_lock);
	fuzz_meta_stale = 1;
	int ret = fuzz_mem_ops->zero_range(f, off, len);
	pthread_mutex_unlock(&fuzz_meta_lock);
	return ret;
}

static inline void fuzz_limit(struct qk__file *f)
{
	if (!fuzz_mem_ops) {
		fuzz_mem_ops = f->ops;
		fuzz_limited_ops = *f->ops;
		fuzz_limited_ops.pwrite = fuzz_pwrite;
		fuzz_limited_ops.pwrite_data = fuzz_pwrite_data;
		fuzz_limited_ops.set_size = fuzz_set_size;
		if (f->ops->discard)
			fuzz_limited_ops.discard = fuzz_discard;
		if (f->ops->zero_range)
			fuzz_limited_ops.zero_range = fuzz_zero_range;
	}
	f->ops = &fuzz_limited_ops;
	fuzz_image_file = f;
	fuzz_meta_stale = 1;
}

/* The fuzz targets' host: the external data file is an empty memory file
 * bound like the image (fuzz_limit's ops), and backing files are never
 * opened (the targets open with QK_OPEN_NO_BACKING), so no name an image
 * holds reaches the disk. */
static int fuzz_open_data_file(const struct qk__host *host, const char *image, const char *name,
			       const char *path, bool writable, uint32_t open_flags,
			       struct qk__file **out)
{
	int ret = qk__mem_host.open_data_file(host, image, name, path, writable, open_flags, out);
	if (ret == 0 && fuzz_mem_ops)
		(*out)->ops = &fuzz_limited_ops;
	return ret;
}

static int fuzz_open_backing(const struct qk__host *host, const char *image, const char *name,
			     const char *path, uint32_t open_flags, struct qk__file **out)
{
	(void)host; (void)image; (void)path; (void)open_flags; (void)out;
	return qk__err(EPERM, "fuzzing opens no backing file ('%s')", name);
}

static const struct qk__host fuzz_host = {
	.open_backing = fuzz_open_backing,
	.open_data_file = fuzz_open_data_file,
};

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
	return qk__image_open_file(&fuzz_host, f, FUZZ_NAME, &o, NULL, img);
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

#endif /* QK_FUZZ_H */
