/*
 * internal.h - the library's one private header: the byte I/O backend
 * table, the image driver table, and the qk__ functions shared between
 * files, a section per .c file. Format details of QCOW2 live in
 * lib/qcow2/format.h and lib/qcow2/qcow2.h.
 */
#ifndef QK_INTERNAL_H
#define QK_INTERNAL_H

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
/* Record "API: WHAT: strerror(errnum)" and return -errnum. */
int qk__err_sys(int errnum, const char *what);

/* ---- io/: byte I/O backends ------------------------------------------------
 *
 * Contract, for every backend:
 * - pread reads exactly len bytes at off. Bytes past the end of the file
 *   read as zeros (as a block device past a short file does in QEMU); it
 *   returns 0 or a negative errno and records the message.
 * - pwrite writes exactly len bytes, growing the file as needed.
 * - sync makes every completed write durable.
 * - get_size reports the current length of the file.
 * - block_status (optional) says whether [off, off+len) begins with data or
 *   a hole and how far that lasts (*pnum > 0); without it all is data.
 * - Every call may run concurrently with any other on the same file.
 */
struct qk__file;

struct qk__io_ops {
	const char *name;
	int (*pread)(struct qk__file *f, void *buf, size_t len, uint64_t off);
	int (*pwrite)(struct qk__file *f, const void *buf, size_t len, uint64_t off);
	/* As pwrite, for guest data written into an image file (never
	 * metadata); may be NULL (then pwrite). A test backend checks that it
	 * lands on no metadata (the fuzz oracle). */
	int (*pwrite_data)(struct qk__file *f, const void *buf, size_t len, uint64_t off);
	int (*sync)(struct qk__file *f);
	int (*get_size)(struct qk__file *f, uint64_t *size);
	int (*set_size)(struct qk__file *f, uint64_t size);
	/* Bytes the storage holds for this file (st_blocks); may be NULL. */
	int (*allocated_size)(struct qk__file *f, uint64_t *bytes);
	int (*block_status)(struct qk__file *f, uint64_t off, uint64_t len,
			    bool *is_data, uint64_t *pnum);
	/* Deallocate [off, off+len) keeping the size; reads give zeros after.
	 * May be NULL; -ENOTSUP when the file system cannot. */
	int (*discard)(struct qk__file *f, uint64_t off, uint64_t len);
	/* Make [off, off+len) read as zeros without writing them (space stays
	 * allocated). May be NULL; -ENOTSUP when the file system cannot. */
	int (*zero_range)(struct qk__file *f, uint64_t off, uint64_t len);
	/* Reserve storage for [off, off+len), growing the file to cover it
	 * (posix_fallocate). May be NULL. */
	int (*allocate)(struct qk__file *f, uint64_t off, uint64_t len);
	/* Take the image lock (QEMU-compatible): for writing or reading, and
	 * with force_share, without keeping others from writing. -EAGAIN when
	 * another process holds a conflicting lock. May be NULL. */
	int (*lock)(struct qk__file *f, bool write, bool force_share);
	/* Device and inode identity for loop detection; may be NULL. */
	int (*identity)(struct qk__file *f, uint64_t *dev, uint64_t *ino);
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
/* Write guest data (see pwrite_data in the ops table). */
static inline int qk__file_pwrite_data(struct qk__file *f, const void *buf, size_t len,
				       uint64_t off)
{
	return (f->ops->pwrite_data ? f->ops->pwrite_data : f->ops->pwrite)(f, buf, len, off);
}
static inline int qk__file_lock(struct qk__file *f, bool write, bool force_share)
{
	return f->ops->lock ? f->ops->lock(f, write, force_share) : 0;
}
static inline int qk__file_get_size(struct qk__file *f, uint64_t *size)
{
	return f->ops->get_size(f, size);
}
void qk__file_close(struct qk__file *f);

/* io/file.c: POSIX files. QK_OPEN_DIRECT in open_flags asks for O_DIRECT
 * (falling back to the page cache where the file system refuses it);
 * QK_OPEN_UNSAFE makes syncs no-ops. */
int qk__file_open_posix(const char *path, bool writable, uint32_t open_flags,
			struct qk__file **out);
/* Open a file that image `image` names (`what`: "backing file", "external
 * data file"): `path` is `name` resolved against the image's directory.
 * Only regular files and block devices, not on a pseudo file system
 * (procfs, sysfs...), opened non-blocking (a FIFO never hangs the open) and
 * never as a controlling terminal. With QK_OPEN_CONFINE in open_flags,
 * `name` must lead to a file beneath the image's directory. Returns 0, or
 * -EPERM (refused, the message says why) or the open's errno, recorded. */
int qk__file_open_named(const char *image, const char *name, const char *path, bool writable,
			uint32_t open_flags, const char *what, struct qk__file **out);
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

/* io/mem.c: a growable buffer, for unit tests and fuzzers. The data is
 * copied; `name` is used in messages. */
int qk__file_open_mem(const void *data, size_t len, const char *name,
		      struct qk__file **out);
/* The current contents of a memory file (valid until the next write). */
const void *qk__file_mem_data(struct qk__file *f, size_t *len);

/* ---- io/fault.c: fault injection and power cuts (for tests) ---------------
 *
 * A controller wraps one file (see the design note in fault.c). It counts
 * reads, writes (pwrite, set_size, discard, zero_range) and syncs from the
 * open on, can fail the Nth of a kind with an errno (once, or from then on),
 * and can cut the power at the Nth write: the durable image then holds the
 * bytes as of the last completed sync (plus, optionally, a sector-granular
 * torn prefix of write N) and every later operation fails with -EIO.
 */
#define QK__FAULT_SECTOR 512
enum qk__fault_kind { QK__FAULT_READ, QK__FAULT_WRITE, QK__FAULT_SYNC, QK__FAULT_NKINDS };
struct qk__fault;

/* A new controller, or NULL (ENOMEM, recorded). */
struct qk__fault *qk__fault_new(void);
/* Free it (after the file it serves is closed). */
void qk__fault_free(struct qk__fault *ft);
/* Open a file through the controller, taking over `inner` (closed with the
 * new file, or at once on failure). One file per controller. */
int qk__file_open_fault(struct qk__fault *ft, struct qk__file *inner, struct qk__file **out);
/* Fail operation number nth (1-based) of `kind` with -err; `sticky` fails
 * every later one of that kind too. nth 0 turns it off. */
void qk__fault_fail(struct qk__fault *ft, enum qk__fault_kind kind, uint64_t nth, int err,
		    bool sticky);
/* Cut the power as write nth_write is issued: the writes since the last
 * completed sync are lost (all land instead with keep_pending: a process
 * crash), and of write nth_write only the whole sectors of its first
 * torn_bytes bytes land. */
void qk__fault_cut(struct qk__fault *ft, uint64_t nth_write, uint64_t torn_bytes,
		   bool keep_pending);
/* Operations of `kind` issued so far (failed ones included). */
uint64_t qk__fault_count(struct qk__fault *ft, enum qk__fault_kind kind);
/* Errors injected so far (the power cut not included). */
uint64_t qk__fault_injected(struct qk__fault *ft);
/* Whether the power cut has happened. */
bool qk__fault_was_cut(struct qk__fault *ft);
/* The durable image: what storage holds after a power cut now (valid
 * until the next operation). */
const void *qk__fault_durable(struct qk__fault *ft, size_t *len);
/* The volatile view (what a process that lived on reads) as the file was
 * closed; NULL before that. */
const void *qk__fault_volatile(struct qk__fault *ft, size_t *len);

/* ---- image.c: drivers and the image handle ------------------------------- */

/* One layer's answer for a guest range (driver block_status). */
struct qk__status {
	uint64_t bytes;      /* length of the run, > 0 */
	uint32_t flags;      /* QK_EXTENT_*; no PRESENT = look in the backing file */
	uint64_t offset;     /* host offset when QK_EXTENT_OFFSET */
	const char *file;    /* name of the file holding offset */
};

struct qk__driver {
	const char *name;
	qk_format format;
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
	/* Fill the format-specific fields of *info. */
	int (*get_info)(qk_image *img, struct qk_info *info);
	int (*list_snapshots)(qk_image *img, const struct qk_snapshot **list, size_t *n);
	int (*list_bitmaps)(qk_image *img, const struct qk_bitmap **list, size_t *n);
	/* The external data file this layer reads: *f once opened (else
	 * NULL), *path its resolved name (NULL: none). May be NULL for
	 * formats without one. */
	void (*data_file)(qk_image *img, struct qk__file **f, const char **path);
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
	qk_image *backing;       /* NULL at the bottom */
	qk_image *overlay;       /* the image above, NULL at the top */
	uint32_t depth;          /* 0 for the top image of a chain */
};

/* Open `file` (ownership passes to the image, also on failure) as an image
 * named `filename`, below `overlay` (NULL for the top of a chain). */
int qk__image_open_file(struct qk__file *file, const char *filename,
			const struct qk_open_options *opts, qk_image *overlay,
			qk_image **out);
void qk__image_free(qk_image *img);
/* Read [off, off+len) of img, which must lie inside it. */
int qk__image_pread(qk_image *img, void *buf, size_t len, uint64_t off);

/* Magic-based detection of the first bytes of a file: the format to open,
 * or a negative errno with a message naming the format we refuse. */
int qk__probe(const uint8_t *buf, size_t len, uint64_t file_size, qk_format *fmt);

/* ---- chain.c: backing chains ----------------------------------------------- */

/* Resolve a backing name stored in `overlay_path`'s header: absolute names
 * as they are, relative ones against the overlay's directory. Returns a
 * malloc'd path or NULL (ENOMEM). */
char *qk__backing_path(const char *overlay_path, const char *name);
/* Open the backing file `name` (format `fmt` or NULL to detect) below img,
 * enforcing the depth limit and refusing loops. */
int qk__chain_open(qk_image *img, const char *name, const char *fmt,
		   const struct qk_open_options *opts);
/* Read [off, off+len) of the guest range where this layer has nothing: from
 * the backing image, zeros past its end or without one. */
int qk__chain_read(qk_image *img, void *buf, size_t len, uint64_t off);

/* ---- compress (qcow2/compress.c) ---------------------------------------------- */

/* Inflate one compressed cluster: exactly dst_len bytes must come out of
 * src (trailing input ignored). Returns 0; or -EIO with the reason written
 * to `why` (not recorded, so the caller can name the cluster); or -ENOMEM
 * (recorded). */
int qk__decompress(uint32_t type, const void *src, size_t src_len,
		   void *dst, size_t dst_len, char *why, size_t why_len);
/* Compress `len` bytes into at most `cap` bytes of dst (QEMU's formats).
 * Returns the compressed length, -ENOSPC (not recorded) when it does not
 * fit, or another negative errno (recorded). Thread-safe. */
ssize_t qk__compress(uint32_t type, const void *src, size_t len, void *dst, size_t cap);

#endif /* QK_INTERNAL_H */
