/*
 * internal.h - the library's one private header: the byte I/O backend
 * table, the image driver table, and the qk__ functions shared between
 * files, a section per .c file. Format details of QCOW2 live in
 * lib/qcow2/format.h and lib/qcow2/qcow2.h.
 */
#ifndef QK_INTERNAL_H
#define QK_INTERNAL_H

#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>

#include "qcowkit.h"
#include "util/checked.h"
#include "util/endian.h"
#include "util/buf.h"

#define QK_EXPORT __attribute__((visibility("default")))
#define QK_UNUSED __attribute__((unused))

/* Longest backing chain accepted by default, counting the top image. */
#define QK_DEFAULT_MAX_CHAIN_DEPTH 64

/* ---- error.c -------------------------------------------------------------- */

/* Name the public API being run, for the message prefix; clears the
 * "already recorded" state of the previous call. */
void qk__api_enter(const char *api);
/* Record "API: <fmt...>" as this thread's last error (unless a deeper frame
 * of this call already recorded one) and return -errnum. */
int qk__err(int errnum, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Put "context: " in front of the message a deeper frame of this call
 * recorded ("API: context: inner"), keeping its errno, which is returned
 * (negative); with none recorded, record the context alone with errnum. */
int qk__err_prepend(int errnum, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* After a public call made from inside another (qk_commit calling
 * qk_pwrite), name `api` again: the message the inner call recorded reads
 * "api: ..." instead of "inner: ...". Returns ret. */
int qk__api_resume(int ret, const char *api);
/* Record "API: WHAT: strerror(errnum)" and return -errnum. */
int qk__err_sys(int errnum, const char *what);

/* ---- io/: byte I/O backends ------------------------------------------------
 *
 * Every byte of I/O the library does goes through a struct qk__file and the
 * qk__file_* functions below (never through the ops table directly), so a
 * test backend (memory, fault injection, power cuts: tests/support/) slots
 * in beneath the whole library. Contract, for every backend:
 * - pread reads exactly len bytes at off. Bytes past the end of the file
 *   read as zeros (as a block device past a short file does in QEMU); it
 *   returns 0 or a negative errno and records the message.
 * - pwrite writes exactly len bytes, growing the file as needed.
 * - sync makes every completed write durable.
 * - get_size reports the current length of the file.
 * - The optional operations may be NULL; the wrappers then say what the
 *   contract of each says.
 * - Every call may run concurrently with any other on the same file.
 */
struct qk__file;

struct qk__io_ops {
	int (*pread)(struct qk__file *f, void *buf, size_t len, uint64_t off);
	int (*pwrite)(struct qk__file *f, const void *buf, size_t len, uint64_t off);
	/* As pwrite, for guest data written into an image file (never
	 * metadata); optional (then pwrite). A test backend checks that it
	 * lands on no metadata (the fuzz oracle). */
	int (*pwrite_data)(struct qk__file *f, const void *buf, size_t len, uint64_t off);
	int (*sync)(struct qk__file *f);
	int (*get_size)(struct qk__file *f, uint64_t *size);
	int (*set_size)(struct qk__file *f, uint64_t size);
	/* Bytes the storage holds for this file (st_blocks); optional. */
	int (*allocated_size)(struct qk__file *f, uint64_t *bytes);
	/* Whether [off, off+len) begins with data or a hole and how far that
	 * lasts (*pnum > 0); optional (then all is data). */
	int (*block_status)(struct qk__file *f, uint64_t off, uint64_t len,
			    bool *is_data, uint64_t *pnum);
	/* Deallocate [off, off+len) keeping the size; reads give zeros after.
	 * Optional; -ENOTSUP (not recorded) when the file system cannot. */
	int (*discard)(struct qk__file *f, uint64_t off, uint64_t len);
	/* Make [off, off+len) read as zeros without writing them (space stays
	 * allocated). Optional; -ENOTSUP (not recorded) when it cannot. */
	int (*zero_range)(struct qk__file *f, uint64_t off, uint64_t len);
	/* Reserve storage for [off, off+len), growing the file to cover it
	 * (posix_fallocate). Optional. */
	int (*allocate)(struct qk__file *f, uint64_t off, uint64_t len);
	/* Take the image lock (QEMU-compatible): for writing or reading, and
	 * with force_share, without keeping others from writing. -EAGAIN when
	 * another process holds a conflicting lock. Optional. */
	int (*lock)(struct qk__file *f, bool write, bool force_share);
	/* Device and inode identity; optional. */
	int (*identity)(struct qk__file *f, uint64_t *dev, uint64_t *ino);
	/* As pread, for guest data going straight to the caller (nothing in
	 * the library looks at it after), while a batch is open on this
	 * thread (qk__io_batch_begin): the read may be queued and completed
	 * at qk__io_batch_end. Optional (then pread, at once). */
	int (*pread_batched)(struct qk__file *f, void *buf, size_t len, uint64_t off);
	void (*close)(struct qk__file *f);
};

struct qk__file {
	const struct qk__io_ops *ops;
	char *path;    /* for messages */
	void *priv;
};

static inline int qk__file_pread(struct qk__file *f, void *buf, size_t len, uint64_t off)
{
	return f->ops->pread(f, buf, len, off);
}
static inline int qk__file_pwrite(struct qk__file *f, const void *buf, size_t len, uint64_t off)
{
	return f->ops->pwrite(f, buf, len, off);
}
/* Batched reads of guest data (qk_pread_batch), per thread: between
 * begin and end, qk__file_pread_data may queue a read instead of making
 * it; end makes every queued read (in flight together) and waits for all.
 * end returns 0 or the first failure's negative errno, recording its
 * message only when `report`. In io/file.c. */
int qk__io_batch_begin(void);   /* -EBUSY: one is open on this thread */
int qk__io_batch_end(bool report);
bool qk__io_batching(void);
/* Read guest data that goes straight to the caller (see pread_batched). */
static inline int qk__file_pread_data(struct qk__file *f, void *buf, size_t len, uint64_t off)
{
	if (f->ops->pread_batched && qk__io_batching())
		return f->ops->pread_batched(f, buf, len, off);
	return f->ops->pread(f, buf, len, off);
}
/* Write guest data (see pwrite_data in the ops table). */
static inline int qk__file_pwrite_data(struct qk__file *f, const void *buf, size_t len,
				       uint64_t off)
{
	return (f->ops->pwrite_data ? f->ops->pwrite_data : f->ops->pwrite)(f, buf, len, off);
}
static inline int qk__file_sync(struct qk__file *f)
{
	return f->ops->sync(f);
}
static inline int qk__file_get_size(struct qk__file *f, uint64_t *size)
{
	return f->ops->get_size(f, size);
}
static inline int qk__file_set_size(struct qk__file *f, uint64_t size)
{
	return f->ops->set_size(f, size);
}
/* -ENOTSUP (not recorded) when the backend cannot say. */
static inline int qk__file_allocated_size(struct qk__file *f, uint64_t *bytes)
{
	return f->ops->allocated_size ? f->ops->allocated_size(f, bytes) : -ENOTSUP;
}
/* Without the operation all is data. */
static inline int qk__file_block_status(struct qk__file *f, uint64_t off, uint64_t len,
					bool *is_data, uint64_t *pnum)
{
	if (!f->ops->block_status) {
		*is_data = true;
		*pnum = len;
		return 0;
	}
	return f->ops->block_status(f, off, len, is_data, pnum);
}
/* -ENOTSUP (not recorded) when the backend or file system cannot. */
static inline int qk__file_discard(struct qk__file *f, uint64_t off, uint64_t len)
{
	return f->ops->discard ? f->ops->discard(f, off, len) : -ENOTSUP;
}
/* -ENOTSUP (not recorded) when the backend or file system cannot. */
static inline int qk__file_zero_range(struct qk__file *f, uint64_t off, uint64_t len)
{
	return f->ops->zero_range ? f->ops->zero_range(f, off, len) : -ENOTSUP;
}
/* Reserve [off, off+len): -ENOTSUP (recorded) without the operation. */
int qk__file_allocate(struct qk__file *f, uint64_t off, uint64_t len);
static inline int qk__file_lock(struct qk__file *f, bool write, bool force_share)
{
	return f->ops->lock ? f->ops->lock(f, write, force_share) : 0;
}
/* -ENOTSUP (not recorded) when the backend has no identity. */
static inline int qk__file_identity(struct qk__file *f, uint64_t *dev, uint64_t *ino)
{
	return f->ops->identity ? f->ops->identity(f, dev, ino) : -ENOTSUP;
}
/* Are a and b the same file (device and inode)? False when either cannot say. */
bool qk__file_same(struct qk__file *a, struct qk__file *b);
void qk__file_close(struct qk__file *f);

/* io/file.c: POSIX files. QK_OPEN_DIRECT in open_flags asks for O_DIRECT
 * (falling back to the page cache where the file system refuses it);
 * QK_OPEN_UNSAFE makes syncs no-ops. */
int qk__file_open_posix(const char *path, bool writable, uint32_t open_flags,
			struct qk__file **out);
/* Open `path` for writing, creating it when missing (mode 0644 less the
 * umask; *created says whether this call did), and take the write lock
 * (as a read-write open does), changing nothing in a file that was
 * there: the caller truncates once it holds every lock it needs. Returns
 * 0, or a negative errno with "Could not create 'PATH': <reason>" or the
 * lock's message recorded (-EAGAIN: another process, or another open in
 * this one, holds the file); a file this call created is removed again
 * on failure. */
int qk__file_create_posix(const char *path, bool *created, struct qk__file **out);
/* Take QEMU's image lock (see qk__file_lock) on descriptor fd, which is
 * open for reading; `name` is for messages. */
int qk__lock_fd(int fd, const char *name, bool write, bool force_share);
/* Make f at least `to` bytes long, where [from, to) is space the caller has
 * not written: left sparse (QK_PREALLOC_OFF, QK_PREALLOC_METADATA),
 * reserved (QK_PREALLOC_FALLOC), or written with zeros (QK_PREALLOC_FULL).
 * A longer file keeps its length. With from == 0 (a new, empty file) its
 * first block is written, as QEMU's file driver does. Returns 0 or a
 * negative errno (recorded): -EFBIG/-EINVAL for sizes the file system
 * refuses, -ENOSPC, -EIO, -ENOTSUP (no preallocation here). */
int qk__file_grow(struct qk__file *f, uint64_t from, uint64_t to, int prealloc);
/* A name an image holds, resolved against the directory of the image file
 * `image_path`: absolute names as they are, relative ones against that
 * directory. A malloc'd path, or NULL (out of memory). */
char *qk__file_resolve(const char *image_path, const char *name);

/*
 * How an image opens the files it names (its backing file, its external
 * data file): through its host, set when the image is opened, so tests and
 * fuzzers give memory files instead of touching the disk. Each opens the
 * file that image `image` names `name` (`path` is the name resolved
 * against the image's directory).
 */
struct qk__host {
	int (*open_backing)(const struct qk__host *host, const char *image, const char *name,
			    const char *path, uint32_t open_flags, struct qk__file **out);
	int (*open_data_file)(const struct qk__host *host, const char *image, const char *name,
			      const char *path, bool writable, uint32_t open_flags,
			      struct qk__file **out);
};
/* The host of images opened from files: POSIX files, and only regular
 * files and block devices, not on a pseudo file system (procfs, sysfs...),
 * opened non-blocking (a FIFO never hangs the open) and never as a
 * controlling terminal. With QK_OPEN_CONFINE in open_flags, `name` must
 * lead to a file beneath the image's directory. Both return 0, or -EPERM
 * (refused, the message says why) or the open's errno, recorded. */
extern const struct qk__host qk__posix_host;

/* ---- the struct_size policy (qcowkit.h, "ABI") -----------------------------
 * The size of each sized struct's first published version: a caller's
 * struct_size below it is refused. */
#define QK__OPEN_OPTIONS_V1   (offsetof(struct qk_open_options, max_chain_depth) + sizeof(uint32_t))
#define QK__CREATE_OPTIONS_V1 (offsetof(struct qk_create_options, data_file_raw) + sizeof(int))
#define QK__INFO_V1           (offsetof(struct qk_info, nb_bitmaps) + sizeof(uint32_t))
#define QK__CHECK_RESULT_V1   (offsetof(struct qk_check_result, overlaps) + sizeof(uint64_t))
#define QK__MEASURE_V1        (offsetof(struct qk_measure, bitmaps) + sizeof(uint64_t))
#define QK__AMEND_OPTIONS_V1  (offsetof(struct qk_amend_options, progress_opaque) + sizeof(void *))
/* A caller's struct of `size` bytes (its struct_size) for a struct whose
 * first version has `v1` bytes: 0, or -EINVAL (recorded) naming `what`. */
int qk__struct_size_ok(uint32_t size, size_t v1, const char *what);
/* Copy a caller's struct `src` (its struct_size first) over `dst` (the
 * library's full struct of `full` bytes, set to defaults), as far as the
 * caller's reaches; dst keeps struct_size = full. */
void qk__struct_in(void *dst, size_t full, const void *src);
/* Copy the library's full result `src` to the caller's struct `dst`, as far
 * as dst's struct_size reaches (which stays as it was). */
void qk__struct_out(void *dst, const void *src, size_t full);

/* ---- image.c: drivers and the image handle ------------------------------- */

/* One layer's answer for a guest range (driver block_status). */
struct qk__status {
	uint64_t bytes;      /* length of the run, > 0 */
	uint32_t flags;      /* QK_EXTENT_*; no PRESENT = look in the backing file */
	uint64_t offset;     /* host offset when QK_EXTENT_OFFSET */
	const char *file;    /* name of the file holding offset */
};

/* What qk_measure (measure.c) tells the target format's driver about the
 * input image. */
struct qk__measure_src {
	qk_image *img;
	uint64_t size;               /* virtual size to measure (the active
	                              * image's at a snapshot, as QEMU's -l) */
	bool bitmaps_supported;      /* qcow2 v3: can carry persistent bitmaps */
	const struct qk_bitmap *bitmaps;
	size_t n_bitmaps;
	/* Bytes of the `cluster`-sized clusters of [0, size) that hold data
	 * somewhere in the chain, into *bytes. Returns 0 or a negative errno
	 * (recorded). */
	int (*count_data)(const struct qk__measure_src *src, uint64_t cluster,
			  uint64_t *bytes);
};

/* A change of persistent bitmaps (qk_bitmap_add() and the others). */
enum qk__bitmap_op { QK__BM_ADD, QK__BM_REMOVE, QK__BM_CLEAR, QK__BM_ENABLE, QK__BM_DISABLE,
		     QK__BM_MERGE };
struct qk__bitmap_change {
	enum qk__bitmap_op op;
	const char *name;
	uint64_t granularity;    /* ADD: bytes per bit, 0 for the default */
	bool disabled;           /* ADD */
	qk_image *src;           /* MERGE: the image holding src_name */
	const char *src_name;
};

struct qk__driver {
	const char *name;
	qk_format format;
	/* Create an image at `path` (qk_create; options complete, struct_size
	 * current). */
	int (*create)(const char *path, const struct qk_create_options *o);
	/* Parse the image on img->file; fill img->size and the driver state. */
	int (*open)(qk_image *img, const struct qk_open_options *opts);
	void (*close)(qk_image *img);
	/* Read [off, off+len), which lies inside the image. */
	int (*pread)(qk_image *img, void *buf, size_t len, uint64_t off);
	/* Write [off, off+len), inside the image, opened read-write. */
	int (*pwrite)(qk_image *img, const void *buf, size_t len, uint64_t off);
	/* Write one cluster compressed (see qk_write_compressed); NULL when
	 * the format has no compression. */
	int (*write_compressed)(qk_image *img, const void *buf, size_t len, uint64_t off);
	/* Check (and with flags repair) the image; NULL: no checks. */
	int (*check)(qk_image *img, uint32_t flags, struct qk_check_result *res,
		     void (*report)(void *, const char *), void *opaque);
	/* Forensic report (see qk_forensic); NULL: not for this format. */
	int (*forensic)(qk_image *img, int (*found)(void *, const struct qk_forensic_item *),
			void *opaque);
	/* Make every completed write durable. */
	int (*flush)(qk_image *img);
	/* Change the virtual size; the new area reads as zeros. */
	int (*resize)(qk_image *img, uint64_t size, uint32_t flags);
	/* On close of a read-write image, after the flush; may be NULL. */
	int (*mark_clean)(qk_image *img);
	/* Drop [off, off+len) so it reads as zeros (whole clusters only for
	 * qcow2; the rest is ignored, as discard is a hint). */
	int (*discard)(qk_image *img, uint64_t off, uint64_t len);
	/* Make [off, off+len) read as zeros; QK_ZERO_* flags. */
	int (*write_zeroes)(qk_image *img, uint64_t off, uint64_t len, uint32_t flags);
	/* This layer only: st->flags lacks PRESENT where the backing chain
	 * decides. [off, off+len) lies inside the image; len > 0. */
	int (*block_status)(qk_image *img, uint64_t off, uint64_t len,
			    struct qk__status *st);
	/* The backing file the image names, as stored, and its format (each
	 * NULL when absent); may be NULL for formats without backing files. */
	void (*backing)(qk_image *img, const char **name, const char **format);
	/* Fill the format-specific fields of *info. */
	int (*get_info)(qk_image *img, struct qk_info *info);
	int (*list_snapshots)(qk_image *img, const struct qk_snapshot **list, size_t *n);
	/* Internal snapshots (see qcowkit.h); NULL: the format has none.
	 * `sn` is an index into list_snapshots' list. */
	int (*snapshot_create)(qk_image *img, const char *name);
	int (*snapshot_apply)(qk_image *img, uint32_t sn);
	int (*snapshot_delete)(qk_image *img, uint32_t sn);
	int (*list_bitmaps)(qk_image *img, const struct qk_bitmap **list, size_t *n);
	/* Persistent bitmaps (see qk_bitmap_add() and the others); NULL: the
	 * format has none. */
	int (*bitmap_change)(qk_image *img, const struct qk__bitmap_change *ch);
	int (*bitmap_status)(qk_image *img, const char *name, uint64_t off, uint64_t len,
			     uint64_t *run);
	/* The external data file this layer reads: *f once opened (else
	 * NULL), *path its resolved name (NULL: none). May be NULL for
	 * formats without one. */
	void (*data_file)(qk_image *img, struct qk__file **f, const char **path);
	/* qk_measure with this format as the target (options complete,
	 * struct_size current); src NULL: no input. Fills *res. */
	int (*measure)(const struct qk_create_options *o, const struct qk__measure_src *src,
		       struct qk_measure *res);
	/* Change the image's options in place (see qk_amend; options
	 * complete, struct_size current, the image read-write); NULL: the
	 * format has none to change. */
	int (*amend)(qk_image *img, const struct qk_amend_options *o);
	/* Name `name` (NULL: none) as the backing file, of format `fmt`
	 * (NULL: unnamed), durably; the open chain is left as it is. NULL
	 * for formats without backing files. */
	int (*set_backing)(qk_image *img, const char *name, const char *fmt);
	/* Unallocate every cluster: reads fall through to the backing file.
	 * NULL for formats that cannot. */
	int (*make_empty)(qk_image *img);
};

extern const struct qk__driver qk__raw_driver;
extern const struct qk__driver qk__qcow2_driver;

struct qk_image {
	const struct qk__driver *drv;
	void *drv_state;
	struct qk__file *file;
	char *filename;          /* as given to open */
	uint32_t flags;          /* QK_OPEN_* */
	uint64_t size;           /* virtual size */
	const struct qk__host *host; /* opens the files the image names */
	/* Reads [off, off+len) where this layer holds nothing: from the
	 * backing chain, zeros past its end or without one (set by image.c:
	 * the driver's way down the chain). */
	int (*read_below)(qk_image *img, void *buf, size_t len, uint64_t off);
	qk_image *backing;       /* NULL at the bottom */
	qk_image *overlay;       /* the image above, NULL at the top */
	uint32_t depth;          /* 0 for the top image of a chain */
	/* Opened at an internal snapshot (qk_open_options.snapshot): `size`
	 * is the snapshot's, active_size the active image's. */
	bool at_snapshot;
	uint64_t active_size;
};

/* Open `file` (ownership passes to the image, also on failure) as an image
 * named `filename`, below `overlay` (NULL for the top of a chain); the files
 * it names are opened through `host`. */
int qk__image_open_file(const struct qk__host *host, struct qk__file *file,
			const char *filename, const struct qk_open_options *opts,
			qk_image *overlay, qk_image **out);
void qk__image_free(qk_image *img);
/* Read [off, off+len) of img, which must lie inside it. */
int qk__image_pread(qk_image *img, void *buf, size_t len, uint64_t off);
/* qk_block_status's body, for callers inside the library (their API name
 * stays on the messages). */
int qk__image_block_status(qk_image *img, uint64_t off, uint64_t max_len,
			   struct qk_extent *ext);

/* Magic-based detection of the first bytes of a file: the format to open,
 * or a negative errno with a message naming the format we refuse. */
int qk__probe(const uint8_t *buf, size_t len, uint64_t file_size, qk_format *fmt);

/* ---- chain.c: backing chains ----------------------------------------------- */

/* Open the backing file `name` of img (format `fmt`, or NULL to detect),
 * through img's host, read-only and locked, enforcing the depth limit and
 * refusing loops (by device and inode). Returns 0 with *file, *path (the
 * resolved name, malloc'd) and *bo (the options for the backing layer), or
 * a negative errno (recorded; nothing to free). */
int qk__chain_open_file(qk_image *img, const char *name, const char *fmt,
			const struct qk_open_options *opts, struct qk__file **file, char **path,
			struct qk_open_options *bo);

/* ---- compress (qcow2/compress.c) ---------------------------------------------- */

/* Inflate one compressed cluster: exactly dst_len bytes must come out of
 * src (trailing input ignored), with the calling thread's codec state,
 * kept from call to call. Returns 0; or -EIO with the reason written
 * to `why` (not recorded, so the caller can name the cluster); or -ENOMEM
 * (recorded). */
int qk__decompress(uint32_t type, const void *src, size_t src_len,
		   void *dst, size_t dst_len, char *why, size_t why_len);
/* Compressed data staged for decompression: a buffer of `len` bytes, the
 * calling thread's own (kept for its next call, so no thread keeps more
 * than QK__SCRATCH_KEEP) when len is at most that, else allocated for this
 * call. Give it back with qk__codec_scratch_done(). NULL after recording
 * ENOMEM. */
#define QK__SCRATCH_KEEP (256u << 10)
void *qk__codec_scratch(size_t len);
void qk__codec_scratch_done(void *buf);
/* Compress `len` bytes into at most `cap` bytes of dst (QEMU's formats).
 * Returns the compressed length, -ENOSPC (not recorded) when it does not
 * fit, or another negative errno (recorded). Thread-safe. */
ssize_t qk__compress(uint32_t type, const void *src, size_t len, void *dst, size_t cap);

#endif /* QK_INTERNAL_H */
