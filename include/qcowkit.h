/*
 * qcowkit.h - the public API of libqcowkit, a library for QCOW2 and raw
 * disk images.
 *
 * Conventions, for every function below unless its comment says otherwise:
 * - A function that can fail returns 0 (or a non-negative count) on success
 *   and a negative errno on failure. On failure it also records a one-line
 *   message naming the problem, kept per thread: qk_last_error() returns it
 *   and qk_last_errno() the errno. Success does not clear it.
 * - Pointers returned by the library (names, lists) are owned by the image
 *   and stay valid until qk_close() of that image.
 * - One qk_image may be used from several threads at once.
 * - ABI: a struct with a `struct_size` first member (options passed in,
 *   results filled in) is set to sizeof(struct) by the caller before the
 *   call (the _init functions do it for options). The library reads and
 *   writes only that many bytes, so a program built against an older,
 *   shorter version of the struct keeps working when fields are added at
 *   its end; a struct_size below the struct's first version is refused
 *   with -EINVAL. Every other public struct is frozen: it never changes; a
 *   new version would come as a new struct with new calls.
 *
 * SPDX-License-Identifier: MIT
 */
#ifndef QCOWKIT_H
#define QCOWKIT_H

#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#ifdef __cplusplus
extern "C" {
#endif

/* QK_VERSION_MAJOR, _MINOR, _PATCH and _STRING, from the build. */
#include "qcowkit-version.h"
#define QK_VERSION_NUMBER \
	(QK_VERSION_MAJOR * 10000 + QK_VERSION_MINOR * 100 + QK_VERSION_PATCH)

/* The runtime library's version, "MAJOR.MINOR.PATCH". */
const char *qk_version(void);
/* QK_VERSION_NUMBER of the runtime library. */
int qk_version_number(void);

/* ---- errors ---------------------------------------------------------- */

/* The message of the calling thread's last failure, "" if none. Never NULL.
 * The text begins with the API name, e.g. "qk_open: ...". */
const char *qk_last_error(void);
/* The positive errno of the calling thread's last failure, 0 if none. */
int qk_last_errno(void);

/* ---- opening and closing --------------------------------------------- */

typedef struct qk_image qk_image;

typedef enum qk_format {
	QK_FORMAT_AUTO = 0, /* detect from the content (open only) */
	QK_FORMAT_RAW = 1,
	QK_FORMAT_QCOW2 = 2,
} qk_format;

/* Open flags. */
#define QK_OPEN_RDWR        (1u << 0) /* read-write; default is read-only */
#define QK_OPEN_NO_BACKING  (1u << 1) /* do not open the backing chain: reads
                                       * of unallocated ranges return zeros */
#define QK_OPEN_DIRECT      (1u << 2) /* bypass the host page cache (O_DIRECT) */
#define QK_OPEN_FORCE_SHARE (1u << 3) /* read an image another process holds */
#define QK_OPEN_CHECK       (1u << 5) /* open for qk_check: a dirty image is not
                                       * rebuilt on a read-write open, and one
                                       * marked corrupt opens read-write */
#define QK_OPEN_UNSAFE      (1u << 4) /* never sync (qemu's cache=unsafe): writes
                                       * are ordered but not durable, and a
                                       * crash may leave the image corrupt; for
                                       * scratch targets such as convert's */
#define QK_OPEN_DEFER_DATA  (1u << 7) /* for callers that only describe the
                                       * image (info): an external data file is
                                       * opened at the first guest I/O, not by
                                       * the open (so a name it holds is never
                                       * touched just to describe it); read-only
                                       * opens only */
#define QK_OPEN_CONFINE     (1u << 6) /* for images you did not make: backing
                                       * and external data file names must lie
                                       * in the naming image's own directory
                                       * (no absolute names, no "..", no symlink
                                       * leading out), and an external data
                                       * file is only read (writes refused) */
#define QK_OPEN_SHARE_CHAIN (1u << 8) /* the backing chain's files (not the
                                       * image's own) are locked sharing writes:
                                       * for qk_commit(), whose base, a layer
                                       * of this chain, is written through a
                                       * second handle */

struct qk_open_options {
	/* sizeof(struct qk_open_options), set by qk_open_options_init(); lets
	 * the structure grow without breaking callers. */
	uint32_t struct_size;
	qk_format format;        /* QK_FORMAT_AUTO detects from the content */
	uint32_t flags;          /* QK_OPEN_* */
	/* Bytes of L2 tables kept in memory per image; 0 picks QEMU's default
	 * (enough to map the whole disk, at most 32 MiB). */
	uint64_t l2_cache_size;
	/* Longest backing chain accepted, counting the top image; 0 = 64. */
	uint32_t max_chain_depth;
	/* Open this internal snapshot (an id, or else a name, as
	 * qk_snapshot_find() looks it up) instead of the active image: the
	 * guest sees the disk as it was when the snapshot was taken, with the
	 * snapshot's size. Read-only (with QK_OPEN_RDWR the open fails with
	 * -EINVAL); -ENOENT when the image has no such snapshot. NULL: the
	 * active image. (Added after 0.1.0: callers built against 0.1.0 pass a shorter
	 * struct_size and get NULL.) */
	const char *snapshot;
};

/* Fill *opts with the defaults: detect the format, read-only. */
void qk_open_options_init(struct qk_open_options *opts);

/*
 * Open the image at `path`. `opts` may be NULL (defaults). Detection opens
 * qcow2 (versions 2 and 3) and raw, and refuses by name the other formats it
 * recognises (qcow v1, VMDK, VDI, VHD, VHDX, QED, LUKS, Android sparse, zstd,
 * gzip, xz...): a file with such a magic is read as raw only when the format
 * is forced to QK_FORMAT_RAW. The backing chain is opened read-only.
 * Files an image names (backing files, the external data file) are opened
 * only when they are regular files or block devices, not on procfs or
 * sysfs, and never as a controlling terminal; reads past their end give
 * zeros. With QK_OPEN_DEFER_DATA the external data file is opened at the
 * first guest I/O instead; with QK_OPEN_CONFINE the names are confined as
 * that flag says.
 * Returns 0 and sets *out, or:
 *   -ENOENT, -EACCES...  the file (or a backing file) could not be opened;
 *   -EPERM               a name the image holds is refused: a FIFO, socket,
 *                        directory, character device or pseudo-file, or,
 *                        confined, a name leading out of the directory;
 *   -EINVAL              the header or a table is malformed (message says which);
 *   -ENOTSUP             a format or feature this library does not read
 *                        (encryption, unknown incompatible bits, other formats),
 *                        or a dirty image opened read-write (its refcounts
 *                        need a rebuild first);
 *   -EACCES              read-write open of an image marked corrupt;
 *   -ELOOP               the backing chain loops or is too deep;
 *   -EFBIG               a table larger than the limits allow;
 *   -EAGAIN              another process holds the image (QEMU-compatible
 *                        locks: writers exclude other writers and readers
 *                        that do not force-share).
 */
int qk_open(const char *path, const struct qk_open_options *opts,
	    qk_image **out);

/* Close the image and its backing chain, flushing a read-write image
 * first. NULL is a no-op. Returns 0 or the first error met while flushing
 * (the image is freed in any case). */
int qk_close(qk_image *img);

/*
 * Take on `fd`, a descriptor of the caller's open for reading (O_RDONLY or
 * O_RDWR), the image lock qk_open() takes on the files it opens, which
 * QEMU's tools take and honour too: with QK_OPEN_RDWR in `flags`, for
 * writing (no other process may write to the file, or read it without
 * force-share); without, for reading (no other may write);
 * QK_OPEN_FORCE_SHARE keeps no other writer out (as it does for
 * qk_open()). Other QK_OPEN_* flags are ignored. Take it before changing a file (truncating included):
 * a file another process uses is then left alone. The lock belongs to the
 * open file description: it lasts until its last descriptor (dups
 * included) is closed, and another open of the same file conflicts with
 * it, in this process too. Where the file system has no OFD locks it
 * succeeds without locking, as qk_open() does. `name` names the file in
 * messages (NULL: "fd N"). Returns 0, or:
 *   -EAGAIN  another process, or another open of the file, holds a lock
 *            that conflicts (close fd: part of the lock may be held);
 *   -EBADF   fd is not an open descriptor, or not open for reading.
 */
int qk_lock_fd(int fd, const char *name, uint32_t flags);

#define QK_USES_IMAGE     1 /* the image file of a layer */
#define QK_USES_DATA_FILE 2 /* the external data file of a layer */

/*
 * Whether `path` names a file that `img` reads: the image file of img or
 * of an image in its backing chain (QK_USES_IMAGE), or the external data
 * file of one of them (QK_USES_DATA_FILE). Files are compared by device
 * and inode, following symbolic links, so a hard or symbolic link to one
 * of them counts too. Writing to such a file would change what img reads:
 * a program that writes what it reads from img (convert) checks its
 * destination with this first. `layer` (may be NULL) is set to the image
 * of the chain that reads the file (img itself, or one below it; see
 * qk_get_backing()), NULL when the answer is 0. Returns:
 *   QK_USES_IMAGE or QK_USES_DATA_FILE (> 0);
 *   0        img reads no such file, or nothing exists at `path`;
 *   -EINVAL  img or path is NULL;
 *   -EACCES, -ELOOP, -ENAMETOOLONG...  `path` could not be looked up.
 */
int qk_uses_file(qk_image *img, const char *path, qk_image **layer);

/* ---- creating ------------------------------------------------------------- */

#define QK_PREALLOC_OFF      0 /* nothing allocated */
#define QK_PREALLOC_METADATA 1 /* L2 tables and data clusters allocated, sparse */
#define QK_PREALLOC_FALLOC   2 /* as metadata, and the file space reserved */
#define QK_PREALLOC_FULL     3 /* as metadata, and zeros written */

struct qk_create_options {
	uint32_t struct_size;      /* sizeof, set by qk_create_options_init() */
	qk_format format;          /* QK_FORMAT_QCOW2 (default) or QK_FORMAT_RAW */
	uint64_t size;             /* virtual size in bytes */
	uint32_t cluster_size;     /* 512 to 2 MiB, a power of two; default 65536 */
	uint32_t version;          /* 2 ("0.10") or 3 ("1.1", default) */
	uint32_t refcount_bits;    /* 1, 2, 4, 8, 16 (default), 32 or 64 */
	int lazy_refcounts;        /* v3 only */
	uint32_t compression_type; /* QK_COMPRESSION_*; zstd needs v3 */
	int extended_l2;           /* v3, clusters of 16 KiB or more */
	int preallocation;         /* QK_PREALLOC_* */
	const char *backing_file;  /* stored as given; NULL for none */
	const char *backing_format; /* "qcow2" or "raw"; required with a backing file */
	const char *data_file;     /* external data file name (v3), or NULL */
	int data_file_raw;         /* the data file is a valid raw image too */
};

/* Fill *opts with qemu-img's defaults: qcow2 v3, 64 KiB clusters, 16-bit
 * refcounts, zlib, no preallocation. */
void qk_create_options_init(struct qk_create_options *opts);

/*
 * Create (or truncate) the image at `path`. With a data file, that file is
 * created too (its name resolved against the image's directory). Each file
 * is opened without truncating and locked for writing (see qk_lock_fd())
 * before any of them changes. On failure a file this call created is
 * removed again; one that existed before is left as it was when the
 * failure came before the locks were held (-EAGAIN, option errors), and
 * emptied otherwise. Returns 0, or:
 *   -EINVAL  options that contradict each other or the format (the message
 *            says which, in qemu-img's words where it has them);
 *   -EAGAIN  another process uses the image or data file (the message
 *            names the lock, as QEMU's does);
 *   or an errno from the file system.
 */
int qk_create(const char *path, const struct qk_create_options *opts);

/* ---- measuring ------------------------------------------------------------ */

struct qk_measure {
	uint32_t struct_size;      /* sizeof(struct qk_measure), set by the caller */
	uint64_t required;         /* bytes the new image needs for the input's data */
	uint64_t fully_allocated;  /* bytes with every cluster allocated */
	int has_bitmaps;           /* `bitmaps` applies: a qcow2 v3 target and an
	                            * input that can carry persistent bitmaps */
	uint64_t bitmaps;          /* more bytes to copy the input's persistent
	                            * bitmaps too (convert --bitmaps) */
};

/*
 * The size of a new image that qk_create() with `opts` would make and
 * that then received the guest content of `in`, computed as qemu-img 7.2
 * measure computes it (`required` counts the metadata of the fully
 * allocated image too). `in` may be NULL: an image of opts->size with
 * nothing written. Otherwise the input's virtual size counts (opts->size
 * is still held to the format's limits, as qemu-img does) and its data are
 * found through its backing chain: every cluster of the new image that
 * would hold data (not zeros) is required; all of them when
 * opts->backing_file is set (what the backing file would share is
 * unknown) or with falloc/full preallocation. An input opened at an
 * internal snapshot is measured as qemu-img measure -l does: the
 * snapshot's clusters over the active image's virtual size.
 * Of `opts` only format, size, cluster_size, version, refcount_bits,
 * extended_l2, preallocation and backing_file count, and only what
 * qemu-img measure checks is checked: combinations qk_create() refuses
 * (extended L2 entries on version 2...) are measured. Returns 0 and fills
 * *res, or:
 *   -EINVAL  an option out of range (the message says which);
 *   -EFBIG   the size is too large for the cluster size;
 *   -EIO     the input's metadata could not be read (named in the message).
 */
int qk_measure(qk_image *in, const struct qk_create_options *opts,
	       struct qk_measure *res);

/* ---- description ------------------------------------------------------ */

/* Virtual (guest-visible) size in bytes. */
uint64_t qk_get_size(const qk_image *img);
/* Format of this image (never QK_FORMAT_AUTO). */
qk_format qk_get_format(const qk_image *img);
/* "qcow2" or "raw". */
const char *qk_format_name(qk_format fmt);
/* The path this image was opened with. */
const char *qk_get_filename(const qk_image *img);
/* The backing image, or NULL at the bottom of the chain. */
qk_image *qk_get_backing(const qk_image *img);

#define QK_COMPRESSION_ZLIB 0
#define QK_COMPRESSION_ZSTD 1

struct qk_info {
	uint32_t struct_size;     /* sizeof(struct qk_info), set by the caller */
	qk_format format;
	uint64_t virtual_size;
	uint64_t actual_size;     /* bytes the host file system allocates */
	uint64_t file_size;       /* length of the image file */
	uint32_t cluster_size;    /* qcow2; 0 for raw */
	uint32_t qcow2_version;   /* 2 or 3; 0 for raw */
	uint32_t refcount_bits;
	uint32_t compression_type; /* QK_COMPRESSION_* */
	uint64_t incompatible_features;
	uint64_t compatible_features;
	uint64_t autoclear_features;
	int dirty;                /* incompatible bit 0 */
	int corrupt;              /* incompatible bit 1 */
	int lazy_refcounts;       /* compatible bit 0 */
	int extended_l2;          /* incompatible bit 4 */
	int data_file_raw;        /* autoclear bit 1 */
	int bitmaps_consistent;   /* autoclear bit 0 */
	int encrypted;
	const char *backing_file;       /* as stored in the header, or NULL */
	const char *full_backing_file;  /* resolved path, or NULL */
	const char *backing_format;     /* from the header extension, or NULL */
	const char *data_file;          /* external data file name, or NULL */
	uint32_t nb_snapshots;
	uint32_t nb_bitmaps;
};

/* Fill *info. Returns 0 or a negative errno. */
int qk_get_info(qk_image *img, struct qk_info *info);

/* ---- reading ----------------------------------------------------------- */

/*
 * Read `len` bytes at guest offset `off` into `buf`. The range must lie
 * inside the image: off + len <= virtual size (a zero-length read at the
 * end is fine). Unallocated ranges read from the backing chain, or as zeros
 * past its end or without one. Returns 0 when all `len` bytes were read, or:
 *   -EINVAL  the range extends past the end (nothing is read);
 *   -EIO     an I/O error, or metadata found corrupt on the way (the message
 *            names the structure and offset);
 *   -ENOMEM  out of memory.
 */
int qk_pread(qk_image *img, void *buf, size_t len, uint64_t off);
/* As qk_pread, scattering into `iovcnt` buffers. */
int qk_preadv(qk_image *img, const struct iovec *iov, int iovcnt,
	      uint64_t off);

/* One read of qk_pread_batch: `len` bytes at guest offset `offset` into
 * `buf`. */
struct qk_read_op {
	void *buf;
	size_t len;
	uint64_t offset;
};
/*
 * Run `n` reads as qk_pread would, one after the other, except that with
 * an image opened QK_OPEN_DIRECT their reads of guest data from the disk
 * are in flight together (through io_uring where the system offers it):
 * one call keeps up to `n` requests at the device, from one thread. Other
 * reads (metadata, compressed clusters, the page cache) are made at once.
 * Every range is checked first; none past the end is read. Returns 0 when
 * every read succeeded, or the negative errno of a failure (see qk_pread;
 * the message names it); then what the buffers hold is unspecified.
 * Buffers must not overlap. -EBUSY when called from inside another
 * qk_pread_batch on the same thread (from an I/O callback).
 */
int qk_pread_batch(qk_image *img, const struct qk_read_op *ops, size_t n);

/* ---- writing ------------------------------------------------------------ */

/*
 * Write `len` bytes from `buf` at guest offset `off` of an image opened
 * with QK_OPEN_RDWR; the range must lie inside the image. Partial clusters
 * are completed from what the guest read there before (copy-on-write from
 * the backing chain, compressed, zero or shared clusters). The data is
 * durable after qk_flush() (or qk_close()). Returns 0, or:
 *   -EPERM   the image is read-only;
 *   -EINVAL  the range extends past the end;
 *   -ENOTSUP an image this version cannot keep consistent while writing
 *            (the message says why: e.g. a persistent bitmap of an unknown
 *            type, or too large to hold in memory).
 * Enabled persistent bitmaps are kept true, as QEMU keeps them: marked in
 * use on disk from the first write, their bits set by every write, zero
 * write and discard, and written back (in-use cleared) by qk_close().
 *   -EIO     an I/O error, or corrupt metadata found (the message names the
 *            structure and offset);
 *   -ENOSPC, -EFBIG  no room left in the file or its host offsets.
 * After an error the image holds at most leaked clusters.
 */
int qk_pwrite(qk_image *img, const void *buf, size_t len, uint64_t off);
/* As qk_pwrite, gathering from `iovcnt` buffers. */
int qk_pwritev(qk_image *img, const struct iovec *iov, int iovcnt, uint64_t off);
/*
 * Write one guest cluster compressed (with the image's compression type):
 * `off` is cluster aligned and `len` the cluster size, or, in the last
 * cluster of an image whose size is not a multiple of it, the rest of the
 * image. Data that does not shrink is stored uncompressed, as QEMU does.
 * Several threads may call this at once; they compress in parallel. Returns
 * as qk_pwrite, and -EINVAL for another range, -ENOTSUP for raw images and
 * images with an external data file.
 */
int qk_write_compressed(qk_image *img, const void *buf, size_t len, uint64_t off);
#define QK_ZERO_MAY_UNMAP   (1u << 0) /* the range may be deallocated */
#define QK_ZERO_NO_FALLBACK (1u << 1) /* fail with -ENOTSUP rather than
                                       * write zeros (a "fast zero") */

/*
 * Make [off, off+len) read as zeros. QCOW2 v3 marks whole clusters zero in
 * metadata, keeping their host clusters unless QK_ZERO_MAY_UNMAP (then
 * they are freed and punched out of the file after the next flush); parts
 * of clusters, and v2 images over a backing file, get real zeros (or
 * -ENOTSUP with QK_ZERO_NO_FALLBACK). Other returns as qk_pwrite.
 */
int qk_write_zeroes(qk_image *img, uint64_t off, uint64_t len, uint32_t flags);
/*
 * Discard [off, off+len): whole clusters in it are unmapped, read as zeros
 * afterwards (not as the backing file; a v2 image over a backing file keeps
 * its data, since it cannot say "zero"), their refcounts drop, and freed
 * clusters are punched out of the file after the next flush. Partial
 * clusters are left alone: discard is a hint. Returns as qk_pwrite.
 */
int qk_discard(qk_image *img, uint64_t off, uint64_t len);
#define QK_RESIZE_SHRINK (1u << 0) /* allow a smaller size (data past it is lost) */

/*
 * Change the virtual size of a read-write image. Growing: the new area
 * reads as zeros (even over a larger backing file). Shrinking needs
 * QK_RESIZE_SHRINK: clusters past the new end are freed. Persistent
 * bitmaps follow the size, as QEMU resizes them: bits past a new smaller
 * end are dropped (a partly kept last granule keeps its bit), a larger
 * image's new area starts clean. Returns 0,
 * -EINVAL (shrink without the flag, raw size not a multiple of 512),
 * -ENOTSUP (v2 image with snapshots; an inconsistent persistent bitmap,
 * or a size a bitmap cannot have: 0, or more bits than QEMU holds),
 * -EFBIG, or as qk_pwrite.
 */
int qk_resize(qk_image *img, uint64_t size, uint32_t flags);
/* Write cached metadata in a crash-safe order and sync the file(s).
 * A no-op for read-only images. */
int qk_flush(qk_image *img);

/* ---- checking and repair ----------------------------------------------- */

struct qk_check_result {
	uint32_t struct_size;        /* sizeof(struct qk_check_result), set by the caller */
	uint64_t corruptions;        /* refcount below references, invalid entries,
	                              * wrong COPIED flags */
	uint64_t leaks;              /* clusters with refcount above references
	                              * (past the end of the file too) */
	uint64_t check_errors;       /* parts that could not be checked */
	uint64_t corruptions_fixed, leaks_fixed;
	uint64_t image_end_offset;   /* end of the last cluster in use */
	uint64_t total_clusters;     /* guest clusters */
	uint64_t allocated_clusters, fragmented_clusters, compressed_clusters;
	uint64_t copied_errors;      /* of the corruptions: wrong COPIED flags */
	uint64_t refcounts_past_eof; /* of the leaks: refcounts of clusters past
	                              * the end of the file (a crash leaves them
	                              * when a write that was to extend the
	                              * file was lost; qemu-img does not look) */
	uint64_t overlaps;           /* active data clusters mapped over metadata
	                              * (-r all moves them out) */
	uint64_t stale_bitmaps;      /* persistent bitmaps left in use by a
	                              * program that did not close the image:
	                              * inconsistent, their bits may miss
	                              * changes. Not corruptions (the metadata
	                              * is sound; qemu-img does not look), but
	                              * reported ("Warning: bitmap ..."), and
	                              * QK_CHECK_FIX_ERRORS removes them. Added
	                              * after 0.1.0. */
};

#define QK_CHECK_FIX_LEAKS  (1u << 0) /* free leaked clusters */
#define QK_CHECK_FIX_ERRORS (1u << 1) /* also rebuild wrong refcounts and COPIED flags */

/*
 * Check the image's metadata, as qemu-img check does: the references to
 * every host cluster (header, L1/L2 tables and data of the active image and
 * of every snapshot, refcount structure, snapshot table, bitmaps) against
 * the stored refcounts. `report` (may be NULL) gets one line per problem,
 * in qemu-img's words ("Leaked cluster N refcount=A reference=B", "ERROR
 * ..."). With fix flags the image (opened read-write, best with
 * QK_OPEN_CHECK) is repaired and checked again: *res then describes what
 * is left, and the *_fixed fields what was repaired. Returns 0 when the
 * check ran (whatever it found), -ENOTSUP for raw images, or an errno.
 */
int qk_check(qk_image *img, uint32_t flags, struct qk_check_result *res,
	     void (*report)(void *opaque, const char *line), void *opaque);

#define QK_FORENSIC_UNREFERENCED  1 /* mapped by the active image, refcount 0 */
#define QK_FORENSIC_LEAKED        2 /* refcount above 0, referenced by nothing */
#define QK_FORENSIC_SNAPSHOT_ONLY 3 /* data only snapshots reference */

/* Frozen (see the ABI note at the top). */
struct qk_forensic_item {
	uint32_t kind;           /* QK_FORENSIC_* */
	int nonzero;             /* LEAKED: the cluster holds non-zero bytes */
	uint64_t host;           /* host offset of the cluster */
	uint64_t guest;          /* UNREFERENCED: guest offset; else UINT64_MAX */
	uint64_t refcount;       /* the stored refcount */
	uint64_t length;         /* cluster size */
	const void *data;        /* LEAKED: the cluster's bytes, valid during the
	                          * call only; else NULL */
};

/*
 * A read-only forensic walk: calls `found` for every cluster the active
 * image maps but whose refcount is 0, every leaked cluster (with its
 * bytes, to tell remnants of deleted data), and every data cluster only
 * snapshots reference, in host order (unreferenced ones during the walk of
 * the active tables). Never writes. Memory: one u32 and one byte per
 * cluster of the file, plus one cluster. A non-zero return from `found`
 * stops the walk and is returned. Returns 0, -ENOTSUP for raw images, or
 * an errno.
 */
int qk_forensic(qk_image *img, int (*found)(void *opaque, const struct qk_forensic_item *it),
		void *opaque);

/* ---- block status ------------------------------------------------------ */

#define QK_EXTENT_PRESENT    (1u << 0) /* allocated in the layer at `depth` */
#define QK_EXTENT_ZERO       (1u << 1) /* reads as zeros */
#define QK_EXTENT_DATA       (1u << 2) /* read from stored data */
#define QK_EXTENT_OFFSET     (1u << 3) /* `offset` is a valid host offset */
#define QK_EXTENT_COMPRESSED (1u << 4) /* stored in compressed clusters */

/* Frozen (see the ABI note at the top). */
struct qk_extent {
	uint64_t start;      /* guest offset */
	uint64_t length;     /* bytes, > 0 */
	uint32_t flags;      /* QK_EXTENT_* */
	uint32_t depth;      /* 0 = this image, 1 = its backing file, ... */
	uint64_t offset;     /* host offset when QK_EXTENT_OFFSET is set */
	const char *file;    /* file holding `offset` (the image or its data
	                      * file), NULL when no offset */
};

/*
 * Describe the guest range starting at `off`: fills *ext with the longest
 * run (at most `max_len` bytes and never past the end) whose status is the
 * same throughout, looking through the backing chain. Host offsets of a run
 * are contiguous. Returns 0, -EINVAL if off >= size or max_len == 0, or
 * -EIO when metadata is corrupt.
 */
int qk_block_status(qk_image *img, uint64_t off, uint64_t max_len,
		    struct qk_extent *ext);

/* ---- snapshots and bitmaps ------------------------------------------- */

/* Frozen (see the ABI note at the top). */
struct qk_snapshot {
	const char *id;
	const char *name;
	uint64_t vm_state_size;
	uint64_t disk_size;      /* virtual size when taken */
	uint32_t date_sec;
	uint32_t date_nsec;
	uint64_t vm_clock_nsec;
	uint64_t icount;         /* UINT64_MAX when not recorded */
	uint64_t l1_table_offset;
	uint32_t l1_size;
};

/* Set *list to the internal snapshots (an array of *count) and return 0.
 * Raw images have none. The list (and the names in it) is replaced by
 * qk_snapshot_create(), _apply() and _delete() of this handle: do not
 * keep pointers into it across them. */
int qk_list_snapshots(qk_image *img, const struct qk_snapshot **list,
		      size_t *count);

/*
 * The snapshot `id_or_name` names: the one whose id it is, else the first
 * whose name it is (QEMU's rule for qemu-img snapshot -a and convert -l).
 * Returns its index in qk_list_snapshots()'s list (>= 0), -ENOENT when
 * none matches, or -EINVAL. Safe with other readers of the handle.
 */
int qk_snapshot_find(qk_image *img, const char *id_or_name);

/*
 * The internal snapshot calls below change an image opened read-write
 * (QCOW2 only; -ENOTSUP for raw images). Each is durable when it returns
 * (the image is flushed), and each writes in an order where a power cut
 * at any point leaves the old or the new snapshot table, never a mix: a
 * version 3 image is marked dirty for the duration, so a cut leaves at
 * most refcounts that the next read-write open (QEMU's or ours) rebuilds;
 * a version 2 image, which has no dirty bit, may need `check -r all`
 * after a cut inside the call, as with QEMU. They serialise with the
 * handle's other writers; other threads may read meanwhile, but must not
 * hold qk_list_snapshots() results across them. Common errors: -EPERM (read-only
 * handle), -EIO (corrupt metadata met, named in the message), -ENOSPC.
 */

/*
 * Take an internal snapshot of the active image, as qemu-img snapshot -c:
 * the next id is one more than the largest numeric id; date now, VM clock
 * and VM state size 0. `name` must not be in use as a snapshot name (QEMU
 * allows duplicates; this library refuses them: -EEXIST). Returns 0, or
 * -EEXIST, -EINVAL (name NULL or longer than 65535 bytes), -EFBIG (the
 * image has QEMU's maximum of 65536 snapshots, or the table would pass
 * 64 MiB), -ENOTSUP (an external data file: QEMU cannot snapshot those
 * either).
 */
int qk_snapshot_create(qk_image *img, const char *name);

/*
 * Revert the active image to snapshot `id_or_name` (looked up as
 * qk_snapshot_find() does), as qemu-img snapshot -a: the guest sees the
 * snapshot's content and size; the snapshot stays. Returns 0, or -ENOENT,
 * -ENOTSUP (the image has persistent bitmaps: QEMU refuses them too,
 * "Device has active dirty bitmaps").
 */
int qk_snapshot_apply(qk_image *img, const char *id_or_name);

/*
 * Delete the snapshot whose id is `id` and whose name is `name`; either
 * may be NULL to match any (qemu-img snapshot -d NAME passes the name
 * only). The clusters only it referenced are freed. Returns 0, or
 * -ENOENT, -EINVAL (both NULL).
 */
int qk_snapshot_delete(qk_image *img, const char *id, const char *name);

#define QK_BITMAP_IN_USE (1u << 0)
#define QK_BITMAP_AUTO   (1u << 1)

/* Frozen (see the ABI note at the top). */
struct qk_bitmap {
	const char *name;
	uint32_t flags;          /* QK_BITMAP_* */
	uint32_t type;           /* 1 = dirty tracking */
	uint64_t granularity;    /* bytes per bit */
	uint64_t table_offset;
	uint32_t table_size;
};

/* Set *list to the persistent bitmaps (an array of *count) and return 0.
 * QK_BITMAP_IN_USE is the flag as it is on disk: set by a program that has
 * the image open for writing (this handle too, after its first write, for
 * the enabled bitmaps it keeps true), and left set by one that crashed
 * (the bitmap is then inconsistent). The list is replaced by the
 * qk_bitmap_*() calls and qk_resize() of this handle: do not keep pointers
 * into it across them. */
int qk_list_bitmaps(qk_image *img, const struct qk_bitmap **list,
		    size_t *count);

/* ---- amend --------------------------------------------------------------- */

/* Which fields of struct qk_amend_options to apply (its `fields`); the
 * options not named keep their values, as with qemu-img amend -o. */
#define QK_AMEND_VERSION        (1u << 0) /* version: 2 ("0.10") or 3 ("1.1") */
#define QK_AMEND_REFCOUNT_BITS  (1u << 1) /* refcount_bits: 1, 2, 4, ... 64 */
#define QK_AMEND_LAZY_REFCOUNTS (1u << 2) /* lazy_refcounts: 0 or 1 */
#define QK_AMEND_SIZE           (1u << 3) /* size: the new virtual size; 0 keeps it */
#define QK_AMEND_BACKING        (1u << 4) /* backing_file and backing_format must
                                           * name what the image names (NULL:
                                           * none); they cannot be changed */
#define QK_AMEND_DATA_FILE      (1u << 5) /* data_file: the external data file's
                                           * new name ("" drops the name) */
#define QK_AMEND_DATA_FILE_RAW  (1u << 6) /* data_file_raw: 0 clears the flag */

struct qk_amend_options {
	uint32_t struct_size;      /* sizeof, set by qk_amend_options_init() */
	uint32_t fields;           /* QK_AMEND_*: what to change */
	uint32_t version;
	uint32_t refcount_bits;
	int lazy_refcounts;
	uint64_t size;
	const char *backing_file;
	const char *backing_format;
	const char *data_file;
	int data_file_raw;
	/* Called now and then with the work done so far out of `total`
	 * (units of no meaning of their own; done <= total, both grow as
	 * the steps are known); may be NULL. */
	void (*progress)(void *opaque, uint64_t done, uint64_t total);
	void *progress_opaque;
};

/* Fill *opts with nothing to change (fields 0). */
void qk_amend_options_init(struct qk_amend_options *opts);

/*
 * Change the options of an image opened read-write, in place, as qemu-img
 * amend does (QCOW2 only): the version (3 to 2 turns zero clusters into
 * zeroed data clusters, or unallocated ones where no backing file shows
 * through, in the active image and every snapshot; 2 to 3 rewrites the
 * snapshot table where its entries lack what version 3 requires), the
 * refcount width (a new refcount structure is written beside the old
 * one and synced, then the header switched to it in one write: a power
 * cut leaves the old or the new structure, never a mix), lazy refcounts
 * (turning them off flushes and clears the dirty bit first), the virtual
 * size (as qk_resize() with QK_RESIZE_SHRINK), and the external data
 * file's name and raw flag. The steps run in QEMU's order (upgrade,
 * refcount width, data file, lazy refcounts, size, downgrade), but
 * everything QEMU would refuse on the way is checked before the first
 * change, so a refusal leaves the image as it was. The image is durable
 * when the call returns. It serialises with the handle's other writers;
 * calls of other threads on the handle wait or see the image before or
 * after a step. Messages are qemu-img's. Returns 0, or:
 *   -EINVAL  a value the format does not take, or a change QEMU refuses
 *            (the backing file, data_file on an image without one,
 *            data_file_raw=on, refcount widths other than 16 or lazy
 *            refcounts with version 2, a refcount width too narrow for
 *            a refcount the image holds);
 *   -ENOTSUP a raw image; a downgrade QEMU refuses (refcount width not
 *            16, an external data file, extended L2 entries, snapshots of
 *            another size, zstd-compressed clusters) or that would lose
 *            persistent bitmaps (QEMU 7.2 drops them and leaks their
 *            clusters; remove them first); a size change QEMU refuses;
 *   -EPERM   the image was opened read-only;
 *   -EFBIG   the new refcount table would pass QEMU's limit;
 *   -EIO, -ENOSPC...  as qk_pwrite.
 */
int qk_amend(qk_image *img, const struct qk_amend_options *opts);

/* ---- backing files: commit and rebase ------------------------------------ */

/*
 * Name `name` as the backing file of `img` (opened read-write), of format
 * `format` ("qcow2", "raw"; NULL: none recorded, probed when opened), as
 * qemu-img rebase -u does: the name is stored as given (a relative name
 * is resolved against img's directory when opened); NULL or "" removes
 * the backing file (and its format). The header is rewritten in one
 * write and synced before the call returns. The handle's open backing
 * chain is NOT changed: close and reopen the image to read through the
 * new one. Returns 0, or:
 *   -EPERM    img is read-only;
 *   -ENOTSUP  a raw image (it has no backing file);
 *   -EINVAL   a name longer than 1023 bytes or a format longer than 15;
 *   -ENOSPC   the header, its extensions and the name do not fit in the
 *             first cluster;
 *   -EIO      the header could not be read or written.
 */
int qk_set_backing(qk_image *img, const char *name, const char *format);

/*
 * Unallocate every cluster of `img` (opened read-write) so that it reads
 * as its backing file again, as QEMU's bdrv_make_empty (what qemu-img
 * commit does to the top image after committing it). Zero clusters are
 * unallocated too. Freed host clusters are released at the next flush;
 * durable after qk_flush(). Returns 0, -EPERM (read-only), -ENOTSUP (raw),
 * or as qk_discard.
 */
int qk_make_empty(qk_image *img);

/* Progress of qk_commit() and qk_rebase(): bytes of the guest disk gone
 * through so far out of `total` (its size). */
typedef void (*qk_progress_fn)(void *opaque, uint64_t done, uint64_t total);

#define QK_COMMIT_EMPTY (1u << 0) /* empty the top afterwards (qemu-img commit
                                   * without -d or -b): qk_make_empty() */

struct qk_commit_options {
	uint32_t struct_size;      /* sizeof, set by qk_commit_options_init() */
	uint32_t flags;            /* QK_COMMIT_* */
	qk_progress_fn progress;   /* may be NULL */
	void *progress_opaque;
};

/* Fill *opts with the defaults: flags 0 (the top is left as it is). */
void qk_commit_options_init(struct qk_commit_options *opts);

/*
 * Commit the top image's data into a file below it, as qemu-img commit:
 * `layer` is a layer of top's backing chain (qk_get_backing(), once or
 * more), and `base` the same file opened read-write with QK_OPEN_RDWR
 * (top's chain opens it read-only: open top with QK_OPEN_FORCE_SHARE, or
 * base's lock refuses the second open). Every cluster-sized chunk (base's
 * cluster size within 4 and 64 KiB, as QEMU's mirror job) of which a layer
 * above `layer` allocates some part is read through top and written into
 * base; a chunk that reads as zeros throughout is written as zeros where
 * base can hold zero clusters. base grows first when it is smaller than
 * top. base is flushed; then, with QK_COMMIT_EMPTY (top opened read-write,
 * `layer` its own backing file), top is emptied and flushed.
 *
 * Power cuts: base only receives, chunk by chunk, the data top's guest
 * view already shows there, and top is emptied only once base is durable;
 * so a cut at any point leaves top's guest view as it was, and base, in
 * each 512-byte sector, its old content or the committed one.
 *
 * Returns 0, or -EINVAL (NULL arguments, `layer` not in top's chain, or
 * QK_COMMIT_EMPTY with layer not top's backing file), -EPERM (base, or
 * top with QK_COMMIT_EMPTY, read-only), or as qk_pread/qk_pwrite/qk_resize,
 * with the message of the failing step.
 */
int qk_commit(qk_image *top, qk_image *layer, qk_image *base,
	      const struct qk_commit_options *opts);

#define QK_REBASE_UNSAFE    (1u << 0) /* only the header changes (rebase -u) */
#define QK_REBASE_COMPRESS  (1u << 1) /* clusters copied in are compressed (-c) */
#define QK_REBASE_COPY_ONLY (1u << 2) /* copy, but leave the header as it is */

struct qk_rebase_options {
	uint32_t struct_size;      /* sizeof, set by qk_rebase_options_init() */
	uint32_t flags;            /* QK_REBASE_* */
	qk_progress_fn progress;   /* may be NULL */
	void *progress_opaque;
};

/* Fill *opts with the defaults: flags 0 (safe mode). */
void qk_rebase_options_init(struct qk_rebase_options *opts);

/*
 * Give `img` (opened read-write, with its current backing chain) the
 * backing file `name` of format `format`, as qemu-img rebase: `new_backing`
 * is that file opened read-only (NULL: none, as with name NULL or "", then
 * the image reads zeros where it allocates nothing). Safe mode: wherever
 * img allocates nothing, its view through the old chain is compared, 512
 * bytes at a time, with new_backing's (zeros past its end), and what
 * differs is written into img (copy-on-write fills the rest of those
 * clusters from the old chain; with QK_REBASE_COMPRESS each cluster that
 * holds a difference is written whole and compressed); img is flushed, and
 * only then is the header changed (qk_set_backing(): one durable write).
 * A power cut leaves the guest view as it was: until the header changes,
 * every write puts into img what the old chain shows there. The handle's
 * open chain is not changed: reopen img to read through the new one.
 * Returns 0, or -EINVAL (NULL img; unknown flags; new_backing without a
 * name), -EPERM (read-only), -ENOTSUP (raw), or as qk_set_backing() and
 * the reads and writes, with the message of the failing step.
 */
int qk_rebase(qk_image *img, qk_image *new_backing, const char *name, const char *format,
	      const struct qk_rebase_options *opts);

/* ---- changing persistent bitmaps --------------------------------------- */

/*
 * Persistent dirty bitmaps of a QCOW2 version 3 image, changed as qemu-img
 * bitmap (QEMU's block-dirty-bitmap-* commands) changes them. A bitmap has
 * one bit per `granularity` bytes of the guest disk, set when they change
 * while it is enabled (QK_BITMAP_AUTO): qk_pwrite() and the other writes
 * keep enabled bitmaps true. An image may also hold inconsistent bitmaps:
 * left in use (QK_BITMAP_IN_USE) by a program that had the image open for
 * writing and never closed it, so their bits may miss changes; they can
 * only be removed (here, or by qk_check() with QK_CHECK_FIX_ERRORS).
 *
 * The calls that change bitmaps take a handle opened with QK_OPEN_RDWR and
 * are durable and crash safe when they return: every table they change is
 * written, with a new bitmap directory, to new clusters and synced before
 * the header's bitmaps extension (rewritten in one write) names it; the
 * old clusters are freed afterwards. A power cut leaves the old bitmaps or
 * the new ones, and at most leaked clusters. They serialise with the
 * handle's other writers; other threads may read meanwhile, but must not
 * hold qk_list_bitmaps() results across them. Messages use QEMU's words.
 * Errors common to them:
 *   -EINVAL   img or a name is NULL; unknown flags;
 *   -EPERM    the handle is read-only;
 *   -ENOENT   no bitmap of that name ("Dirty bitmap 'NAME' not found"; a
 *             raw image has none);
 *   -EUCLEAN  the bitmap is inconsistent ("Bitmap 'NAME' is inconsistent
 *             and cannot be used");
 *   -ENOTSUP  an entry of the directory this version cannot write again
 *             (extra data, unknown flags or type), or a bitmap too large
 *             to hold in memory (256 MiB of bits);
 *   -EIO, -ENOSPC  as qk_pwrite.
 */

#define QK_BITMAP_ADD_DISABLED (1u << 0) /* add it disabled: it does not
                                          * follow writes */

/*
 * Add an empty bitmap `name` (at most 1023 bytes, not in use) of
 * `granularity` bytes per bit (a power of two from 512 to 2 GiB; 0: QEMU's
 * default, the cluster size within 4 KiB and 64 KiB), enabled unless
 * QK_BITMAP_ADD_DISABLED. Returns 0, or -EEXIST ("Bitmap already exists:
 * NAME"), -EINVAL (empty or long name, bad granularity, an image of 0
 * bytes), -EFBIG (65535 bitmaps already, the directory would pass 64 MiB,
 * or more than 512 MiB of bits: use a larger granularity), -ENOTSUP (raw
 * or version 2 image).
 */
int qk_bitmap_add(qk_image *img, const char *name, uint64_t granularity, uint32_t flags);
/* Remove bitmap `name`, inconsistent or not, and free its clusters. */
int qk_bitmap_remove(qk_image *img, const char *name);
/* Clear every bit of bitmap `name`. */
int qk_bitmap_clear(qk_image *img, const char *name);
/* Enable bitmap `name` (a no-op when it is): it follows writes from now. */
int qk_bitmap_enable(qk_image *img, const char *name);
/* Disable bitmap `name` (a no-op when it is): its bits stay as they are. */
int qk_bitmap_disable(qk_image *img, const char *name);
/*
 * Merge bitmap `src_name` of `src` (img itself, or another open image:
 * qemu-img bitmap --merge -b) into bitmap `name` of img: every range the
 * source marks dirty is marked dirty in `name`, whatever the two
 * granularities (a coarser bit covers more bytes). The two images must
 * have the same size. Returns as above, and -EINVAL ("Bitmaps are of
 * different sizes ..."). src is only read, under its own lock.
 */
int qk_bitmap_merge(qk_image *img, const char *name, qk_image *src, const char *src_name);
/*
 * Is the guest range at `off` dirty in bitmap `name`? Sets *len to the
 * length of the run from `off` (at most max_len, never past the end) in
 * which the answer stays the same, and returns 1 (dirty) or 0 (clean): the
 * extents qemu-nbd -B exports. Any handle (read-only too; a read-write one
 * answers with the bits it keeps true as it writes); safe from several
 * threads. The bitmap is read into memory at its first use. Returns as
 * above, or -EINVAL (off >= size, max_len 0).
 */
int qk_bitmap_status(qk_image *img, const char *name, uint64_t off, uint64_t max_len,
		     uint64_t *len);

#ifdef __cplusplus
}
#endif
#endif /* QCOWKIT_H */
