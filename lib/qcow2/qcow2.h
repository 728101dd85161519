/*
 * qcow2.h - the QCOW2 driver's state and the functions its files share,
 * private to lib/qcow2/. The sections follow the layers of lib/README.md,
 * lowest first: a file calls only what the sections above its own declare.
 */
#ifndef QK_QCOW2_H
#define QK_QCOW2_H

#include <assert.h>

#include "internal.h"
#include "qcow2/format.h"

#define MAX_PENDING_PUNCH 256

struct qcow2;

/* ---- types ----------------------------------------------------------------------- */

/* cache.c: a metadata table cache (see the note at its functions). */
struct qk__cache_slot {
	uint64_t offset;       /* host offset of the table; 0 = empty */
	bool recent;           /* used since the clock hand last passed */
	bool dirty;            /* changed since it was read or written */
	uint32_t refs;
	void *data;            /* entry_size bytes, in the cache's order */
};

struct qk__cache {
	struct qk__file *file;
	size_t entry_size;     /* bytes per table on disk */
	uint32_t nslots;
	uint32_t max_slots;    /* growth bound (take_slot), 0 until needed */
	struct qk__cache_slot *slots;
	uint32_t *hash;        /* open addressing: slot index + 1, 0 = free */
	uint32_t hash_mask;
	uint32_t hand;         /* CLOCK hand: next slot to consider */
	uint64_t hits, misses;
	/* Converts a freshly read table to host order (NULL: kept as read). */
	int (*load)(void *opaque, void *table, uint64_t offset);
	/* Converts a table to disk order into `out` (NULL: written as is). */
	void (*store)(void *opaque, const void *table, void *out);
	/* Called before each table write: the overlap check. */
	int (*pre_write)(void *opaque, uint64_t offset);
	void *opaque;
	struct qk__cache *depends;  /* flush this cache before writing ours */
	struct qk__file *sync_first; /* sync this file before writing ours */
	void *scratch;              /* entry_size bytes for store() */
};

/* meta.c: the metadata map. */
/* Kinds of metadata a host cluster may hold. */
#define META_HEADER    (1u << 0)
#define META_L1        (1u << 1)   /* the active L1 table */
#define META_L2        (1u << 2)   /* an L2 table, active or a snapshot's */
#define META_REFTABLE  (1u << 3)
#define META_REFBLOCK  (1u << 4)
#define META_SNAPTABLE (1u << 5)
#define META_SNAP_L1   (1u << 6)
#define META_BITMAP    (1u << 7)   /* bitmap directory, tables and data */

struct qk__metamap {
	uint64_t *keys;        /* host cluster index + 1; 0 = free slot */
	uint32_t *vals;        /* META_* bits | references << 8 */
	uint64_t mask;         /* slots - 1 */
	uint64_t used;
};

/* bitmap.c: a persistent bitmap's bits in memory, laid out as its table
 * lays them out on disk (bit k is bit k % 8 of byte k / 8), in whole
 * clusters, one per table entry. */
struct qk__bitmap_bits {
	uint64_t nbits;        /* bits the image's size needs */
	uint64_t *table;       /* host order: the table on disk (tracked bitmaps
	                        * write changed clusters back through it) */
	uint8_t *data;         /* table entries x cluster size bytes */
	uint8_t *changed;      /* per table entry: changed since last written */
	bool any_changed;
};

/* bitmap.c: what the driver keeps of directory entry i besides the public
 * struct qk_bitmap (see the design note of bitmap.c). */
struct qk__bitmap_priv {
	uint64_t entry_off;    /* file offset of its directory entry */
	uint32_t extra_flags;  /* flag bits other than in-use and auto */
	uint32_t extra_len;    /* bytes of extra data in its entry */
	uint32_t gran_bits;
	bool tracked;          /* kept true by this handle's writes */
	bool resizing;         /* marked in use by a resize (bitmap.c) */
	struct qk__bitmap_bits *bits; /* loaded, or NULL */
};

/* bitmap.c: the directory a change wants (qk__qcow2_bitmap_edit_init()
 * copies the current one, the change edits it, qk__qcow2_bitmaps_commit()
 * writes it). Entry i came from entry from[i] of the current directory (-1:
 * new); with fresh[i], priv[i].bits is written to new clusters, else the
 * table of entry from[i] is kept. */
struct qk__bitmap_edit {
	uint32_t n, cap;
	struct qk_bitmap *bm;          /* names owned by the edit */
	struct qk__bitmap_priv *priv;  /* bits shared with the current entry
	                                * from[i], or owned by the edit */
	int64_t *from;
	bool *fresh;
};

/* ---- the driver's state --------------------------------------------------- */

/* What a guest unit (a cluster, or a subcluster with extended L2) is. */
enum qk__ctype {
	CT_UNALLOCATED,        /* read from the backing chain */
	CT_UNALLOCATED_ALLOC,  /* host cluster reserved, data from backing (ext L2) */
	CT_ZERO_PLAIN,         /* zeros, no host cluster */
	CT_ZERO_ALLOC,         /* zeros, host cluster kept */
	CT_NORMAL,             /* data at a host offset */
	CT_COMPRESSED,         /* compressed cluster */
	CT_NORMAL_HOLE,        /* block status only: data cluster over a file hole */
};

struct qcow2 {
	pthread_mutex_t lock;       /* metadata: L1, cache, compressed cache */
	pthread_t lock_owner;       /* who holds `lock` (assertions only) */
	pthread_mutex_t alloc_lock; /* serialises allocating writes (write.c) */
	bool write_ready;           /* prepare_write done */
	uint64_t snapshots_bytes;   /* length of the snapshot table */
	/* host ranges to punch after the next metadata flush (write.c) */
	struct qcow2_punch { uint64_t off, len; } punch[MAX_PENDING_PUNCH];
	uint32_t n_punch;
	bool has_data_file;         /* incompatible bit 2: guest data elsewhere */
	struct qk__file *data_file; /* that file once opened (base.c), or NULL */

	/* header */
	uint32_t version;
	uint32_t cluster_bits;
	uint64_t cluster_size;
	uint32_t crypt_method;
	uint32_t l1_size;
	uint64_t l1_offset;
	uint64_t rt_offset;
	uint32_t rt_clusters;
	uint32_t nb_snapshots;
	uint64_t snapshots_offset;
	uint64_t incompat, compat, autoclear;
	uint32_t refcount_order;
	uint32_t header_length;
	uint32_t compression_type;
	char *backing_file;
	char *backing_format;
	char *data_file_name;
	char *data_file_path;       /* data_file_name resolved against the image's directory */
	char *full_backing_file;
	/* feature name table: names for incompatible bits, for messages */
	char *feature_names[64];

	/* translation */
	bool extl2;
	uint32_t l2_entry_size;     /* 8 or 16 bytes */
	uint32_t l2_bits;           /* log2 of entries per table */
	uint32_t sc_bits;           /* log2 of subcluster size */
	uint64_t *l1;               /* host order, l1_size entries */
	struct qk__cache l2_cache;
	uint64_t file_size;         /* image file length at open */

	/* refcounts, loaded on first use (refcount.c) */
	uint64_t *rt;               /* host order, rt_entries */
	uint64_t rt_entries;
	struct qk__cache rb_cache;
	uint64_t free_hint;         /* no free cluster below this index */
	uint64_t free_byte;         /* end of the last compressed data when it
	                             * ends inside a cluster, else 0 */
	/* Clusters [freed_lo, freed_hi) hold every cluster whose refcount
	 * dropped to 0 since the L2 tables were last flushed: the disk may
	 * still map them, so they are handed out again only after a flush
	 * (freed_hi 0: none). */
	uint64_t freed_lo, freed_hi;

	/* QEMU's guess that the image was preallocated with metadata, which
	 * makes block status ask the file system where data clusters hold
	 * holes (map.c) */
	bool prealloc_checked;
	bool metadata_prealloc;

	/* last decompressed cluster, keyed by its L2 entry */
	uint64_t cbuf_entry;
	bool cbuf_valid;
	uint8_t *cbuf;

	struct qk_snapshot *snapshots;
	uint32_t n_snapshots;
	struct {
		uint8_t *bytes;         /* extra data past the 24 bytes known */
		uint32_t len;
	} *snap_extra;              /* n_snapshots */
	struct qk_bitmap *bitmaps;
	uint32_t n_bitmaps;
	uint64_t bitmap_dir_offset, bitmap_dir_size;
	struct qk__bitmap_priv *bitmap_priv; /* n_bitmaps (bitmap.c) */
	uint32_t n_tracked;         /* bitmaps kept true by writes (bitmap.c) */
	/* Guest range whose changes the bitmaps ignore: the zeroing of a new
	 * end by resize, which QEMU does not count as a change. */
	uint64_t bm_quiet_lo, bm_quiet_hi;
	bool lazy;                  /* refcount writes deferred: image marked dirty */
	bool write_refused;         /* corruption found: no more writes (v2 has
	                             * no corrupt bit to say so on disk) */
	struct qk__metamap meta;    /* metadata clusters (meta.c) */
	bool meta_ready;
	uint64_t alloc_end;         /* end of the clusters this handle allocated */
};

static inline struct qcow2 *qcow2_of(qk_image *img)
{
	return img->drv_state;
}

/* The image lock (q->lock), with its owner recorded in builds with
 * assertions (the sanitizer build that make test runs), so functions that
 * need it held can say so: QK_LOCK_HELD(q). */
static inline void qk__qcow2_lock(struct qcow2 *q)
{
	pthread_mutex_lock(&q->lock);
#ifndef NDEBUG
	__atomic_store_n(&q->lock_owner, pthread_self(), __ATOMIC_RELAXED);
#endif
}

static inline void qk__qcow2_unlock(struct qcow2 *q)
{
#ifndef NDEBUG
	__atomic_store_n(&q->lock_owner, (pthread_t)0, __ATOMIC_RELAXED);
#endif
	pthread_mutex_unlock(&q->lock);
}

#define QK_LOCK_HELD(q) \
	assert(pthread_equal(__atomic_load_n(&(q)->lock_owner, __ATOMIC_RELAXED), pthread_self()))

static inline uint64_t qk__qcow2_compressed_offset(const struct qcow2 *q, uint64_t e)
{
	return e & ((1ull << (62 - (q->cluster_bits - 8))) - 1);
}

static inline uint64_t qk__qcow2_compressed_size(const struct qcow2 *q, uint64_t e)
{
	unsigned shift = 62 - (q->cluster_bits - 8);
	uint64_t sectors = ((e >> shift) & ((1ull << (q->cluster_bits - 8)) - 1)) + 1;
	return sectors * 512 - (qk__qcow2_compressed_offset(q, e) & 511);
}

/* ---- arithmetic of the layout (create.c, measure.c) ------------------------------- */

/*
 * QEMU's qcow2_refcount_metadata_size(): the refcount blocks and refcount
 * table clusters that count `clusters` clusters and themselves, found as a
 * fixed point (counting structures need counting too). `generous` leaves
 * room for half as many table clusters again, as QEMU's refcount table
 * growth does. `cs` is the cluster size, `order` the log2 of the refcount
 * width. *blocks (may be NULL) gets the refcount block count; returns the
 * bytes of blocks and table. Callers keep `clusters` below 2^56, so
 * nothing overflows.
 */
static inline uint64_t qk__qcow2_refcount_metadata(uint64_t clusters, uint64_t cs, uint32_t order,
						   bool generous, uint64_t *blocks)
{
	uint64_t per_table = cs / 8, per_block = cs * 8 >> order;
	uint64_t table = 0, b = 0, last, n = 0;

	do {
		last = n;
		b = (clusters + table + b + per_block - 1) / per_block;
		table = (b + per_table - 1) / per_table;
		n = clusters + b + table;
		if (n == last && generous) {
			clusters += (table + 1) / 2;
			n = 0;
			generous = false;
		}
	} while (n != last);
	if (blocks)
		*blocks = b;
	return (b + table) * cs;
}

/* ---- base.c: primitives -------------------------------------------------------- */
/* The one corruption path: report corrupt metadata ("image 'X' is corrupt:
 * <what> at offset N ...") and return -EIO. A handle open for writing
 * refuses every later write, and a version 3 image gets its corrupt bit
 * (so neither we nor QEMU write it before a repair). */
int qk__qcow2_corrupt(qk_image *img, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Write metadata bytes that later writes depend on (a header field, an L1
 * or refcount table entry, a new table) and sync the file. 0 or a negative
 * errno (recorded). */
int qk__qcow2_write_durable(qk_image *img, uint64_t off, const void *buf, size_t len);
/* Set the incompatible feature bits, durably, and remember them. */
int qk__qcow2_write_incompat(qk_image *img, uint64_t incompat);
/* A name for the incompatible bit `bit` (from the feature table, if any). */
const char *qk__qcow2_feature_name(struct qcow2 *q, unsigned bit);
/* The external data file, opened on first use (see driver.c). Returns 0 or
 * a negative errno (recorded). Takes the image lock. */
int qk__qcow2_data_file(qk_image *img, struct qk__file **f);
/* Host offset and stored length of compressed L2 entry e (the one decoder
 * of compressed descriptors). */
static inline uint64_t qk__qcow2_compressed_offset(const struct qcow2 *q, uint64_t e);
static inline uint64_t qk__qcow2_compressed_size(const struct qcow2 *q, uint64_t e);

/* ---- cache.c: metadata table cache -----------------------------------------
 *
 * A fixed number of slots, each holding one table (an L2 table or a
 * refcount block) keyed by its host offset, evicted by the CLOCK
 * approximation of least recently used. Lookups hash the offset. A slot in
 * use (refs > 0) is never evicted. The cache has no lock of its own:
 * callers hold the image lock.
 *
 * Write ordering lives here, as in QEMU: a dirty table reaches the disk
 * only after the cache it depends on has been flushed (written and
 * synced), e.g. L2 tables after the refcount blocks that count their
 * clusters, and, when `sync_first` is set, after a sync of that file
 * (guest data before the L2 entry that exposes it). Eviction of a dirty
 * table flushes the whole cache, so the order holds there too.
 */

int qk__cache_init(struct qk__cache *c, struct qk__file *file, size_t entry_size,
		   uint32_t nslots, int (*load)(void *, void *, uint64_t), void *opaque);
void qk__cache_destroy(struct qk__cache *c);
/* Find or load the table at `offset`; *table points into the cache until
 * the matching qk__cache_put(offset). Returns 0 or a negative errno (-EBUSY
 * when every slot is in use). */
int qk__cache_get(struct qk__cache *c, uint64_t offset, void **table);
/* A copy of the table at `offset` into buf (entry_size bytes): the
 * cached one, changes included, or else read and checked as a load is,
 * without taking a slot. For a pass over many tables that would only
 * evict the ones in use. */
int qk__cache_peek(struct qk__cache *c, uint64_t offset, void *buf);
/* As qk__cache_get for a table that is new on disk: not read, zero-filled
 * and dirty. */
int qk__cache_get_empty(struct qk__cache *c, uint64_t offset, void **table);
void qk__cache_put(struct qk__cache *c, uint64_t offset);
/* Mark the (held) table at `offset` changed. */
void qk__cache_mark_dirty(struct qk__cache *c, uint64_t offset);
/* Write every dirty table, dependencies first, then sync the file. */
int qk__cache_flush(struct qk__cache *c);
/* Forget the table at `offset` without writing it (it was freed). */
void qk__cache_discard(struct qk__cache *c, uint64_t offset);
/* Record that `c` must not be written before `dep` is flushed. */
int qk__cache_set_dependency(struct qk__cache *c, struct qk__cache *dep);
/* True when some table is dirty. */
bool qk__cache_is_dirty(const struct qk__cache *c);

/* ---- meta.c: the metadata map (overlap checks) ------------------------------- */



/* Refuse (as corruption, naming both) `what` ("a data write", "a new
 * cluster", ...) to [off, off+len) when a cluster of it holds metadata
 * of a kind outside `allowed` (META_* bits; 0 for guest data). Builds the
 * map on first use. Image lock held. Returns 0, -EIO (recorded, the image
 * marked corrupt) or -ENOMEM. */
int qk__qcow2_meta_check(qk_image *img, uint64_t off, uint64_t len, unsigned allowed,
			 const char *what);
/* The kinds of metadata outside `allowed` at the first cluster of
 * [off, off+len) that holds some (0: none; no map yet: 0), its offset in
 * *cluster_off: the overlap check without its message, for hot paths. */
unsigned qk__qcow2_meta_hit(qk_image *img, uint64_t off, uint64_t len, unsigned allowed,
			     uint64_t *cluster_off);
/* Report what qk__qcow2_meta_hit found, as qk__qcow2_meta_check does. */
int qk__qcow2_meta_refuse(qk_image *img, const char *what, uint64_t off, unsigned types,
			  uint64_t cluster_off);
/* The first host cluster of [first, first+n) (cluster indices) that
 * metadata names: 1 and *hit, or 0 when none does, or a negative errno
 * (the map could not be built). For placing new structures past the end of
 * the file where no table entry already points. Image lock held. */
int qk__qcow2_meta_find(qk_image *img, uint64_t first, uint64_t n, uint64_t *hit);
/* Build the map unless it is built (the first write of a handle). */
int qk__qcow2_meta_ready(qk_image *img);
/* A new reference of kind `type` to [off, off+len) (a table was written
 * there); a no-op until the map is built. Returns 0 or -ENOMEM. */
int qk__qcow2_meta_add(qk_image *img, uint64_t off, uint64_t len, unsigned type);
/* One reference to [off, off+len) is gone (the table there was dropped). */
void qk__qcow2_meta_del(qk_image *img, uint64_t off, uint64_t len);
/* Cache pre-write hooks (the overlap check of L2 tables and refcount
 * blocks): the table at `offset` may hold nothing but its own kind. */
int qk__qcow2_pre_write_l2(void *opaque, uint64_t offset);
int qk__qcow2_pre_write_refblock(void *opaque, uint64_t offset);
/* Forget the map (the metadata changed wholesale); rebuilt when next needed. */
void qk__qcow2_meta_invalidate(qk_image *img);
void qk__qcow2_meta_free(struct qcow2 *q);

/* ---- refcount.c --------------------------------------------------------------- */
/* Load the refcount table (once); 0 or a negative errno. Image lock held. */
int qk__qcow2_load_refcounts(qk_image *img);
/* The refcount of host cluster `cluster`; 0 past the table. Image lock held. */
int qk__qcow2_get_refcount(qk_image *img, uint64_t cluster, uint64_t *rc);
/* The refcounts of clusters [first, first+n) into out[], block by block. */
int qk__qcow2_get_refcounts(qk_image *img, uint64_t first, uint64_t n, uint64_t *out);
/* The refcounts of clusters [0, n) as bits: bit c of one[] (n / 8 + 1
 * bytes, zeroed by the caller) is set when cluster c's refcount is 1, and
 * wide[c >> wide_shift] is set to 1 when some refcount of that group is
 * above 1 (wide_shift >= 3). The blocks are read past the cache (see
 * qk__cache_peek), one at a time. Image lock held. */
int qk__qcow2_refcount_ones(qk_image *img, uint64_t n, uint8_t *one, uint8_t *wide,
			    unsigned wide_shift);
/* Add delta (+1 or -1) to the refcount of every cluster overlapping
 * [offset, offset+length), creating refcount blocks as needed. Changes
 * stay in the refcount cache until it is flushed. -EIO (corruption) on an
 * underflow or overflow. Image lock held. */
int qk__qcow2_update_refcount(qk_image *img, uint64_t offset, uint64_t length, int delta);
/* Add delta (+1, -1, or 0 to only read) to the refcounts of clusters
 * [first, first+n), block by block, and (after not NULL) store the new
 * values in after[n]. A block whose entry would underflow or overflow is
 * left unchanged and reported as corruption (-EIO). Image lock held. */
int qk__qcow2_add_refcounts(qk_image *img, uint64_t first, uint64_t n, int delta, uint64_t *after);
/* Set the refcount of host cluster `cluster` to value in one step, whatever
 * it was (a leak of 2^63 references is dropped at once). Creates the
 * refcount block when needed; changes stay in the refcount cache. -ERANGE
 * when value does not fit the refcount width. Image lock held. */
int qk__qcow2_set_refcount(qk_image *img, uint64_t cluster, uint64_t value);
/* Allocate n contiguous free clusters (refcount raised to 1). */
int qk__qcow2_alloc_clusters(qk_image *img, uint64_t n, uint64_t *offset);
/* Allocate `len` bytes (at most a cluster) for compressed data, packed
 * after the previous ones; every cluster the bytes touch gains one
 * reference. */
int qk__qcow2_alloc_bytes(qk_image *img, uint64_t len, uint64_t *offset);
void qk__qcow2_free_refcounts(struct qcow2 *q);

/* ---- map.c -------------------------------------------------------------------- */
int qk__qcow2_pread(qk_image *img, void *buf, size_t len, uint64_t off);
int qk__qcow2_block_status(qk_image *img, uint64_t off, uint64_t len,
			   struct qk__status *st);
/* Cache loader for L2 tables. */
int qk__qcow2_load_l2(void *opaque, void *table, uint64_t offset);
/*
 * The L2 table that active L1 entry l1i names, validated as every path
 * that follows it needs (reads and writes alike): no reserved bits, cluster
 * aligned, starting inside the file (a table cut short by the end of the
 * file reads as far as it goes, the rest as zeros, as QEMU reads it), and,
 * once the metadata map is built (a handle that writes), not over other
 * metadata. *l2_off 0: no table. Returns 0 or -EIO (corruption, recorded).
 * Image lock held.
 */
int qk__qcow2_l2_table(qk_image *img, uint64_t l1i, uint64_t *l2_off);
/*
 * Validate L2 entry e (and its subcluster bitmap bm with extended L2) of
 * guest cluster gc as reads and writes both need it: no reserved bits,
 * zero flags only where the version allows, consistent subcluster bits,
 * aligned offsets, and data inside the file. Returns 0 or -EIO
 * (corruption, recorded). Image lock held.
 */
int qk__qcow2_check_entry(qk_image *img, uint64_t gc, uint64_t e, uint64_t bm);

/* Compressed entry e's data must start inside the file (its content is
 * judged when it is inflated). Returns 0 or -EIO (recorded). Lock held. */
int qk__qcow2_check_compressed(qk_image *img, uint64_t e);

/* ---- snapshot.c / bitmap.c --------------------------------------------------- */
int qk__qcow2_read_snapshots(qk_image *img);
void qk__qcow2_free_snapshots(struct qcow2 *q);
/* Read the L1 table of snapshot sn (host order, l1_size entries, at least
 * one allocated) into *l1 (to free), its offset and size checked against
 * the file and the limits. Returns 0 or a negative errno (recorded). */
int qk__qcow2_snapshot_l1(qk_image *img, const struct qk_snapshot *sn, uint64_t **l1);
/* Append snapshot table entry sn, with extra_len bytes of unknown extra
 * data, at buf + *len in QEMU's layout (24 bytes of known extra data,
 * padded to 8 bytes); *len grows by the entry's length. */
void qk__qcow2_put_snapshot_entry(uint8_t *buf, uint64_t *len, const struct qk_snapshot *sn,
				  const uint8_t *extra, uint32_t extra_len);
int qk__qcow2_read_bitmaps(qk_image *img, uint64_t dir_offset, uint64_t dir_size,
			   uint32_t nb_bitmaps);
void qk__qcow2_free_bitmaps(struct qcow2 *q);
/* On the first write: load the enabled, consistent bitmaps and mark them
 * in use on disk. */
int qk__qcow2_bitmaps_start(qk_image *img);
/* Guest range [off, off+len) changed: set its bits. Image lock held. */
void qk__qcow2_bitmaps_mark(qk_image *img, uint64_t off, uint64_t len);
/* Write the changed bitmaps back and clear their in-use flags. */
int qk__qcow2_bitmaps_store(qk_image *img);
/* The index of the bitmap named `name`, or -1. */
int64_t qk__qcow2_bitmap_find(const struct qcow2 *q, const char *name);
/* Is bitmap i inconsistent: in use on disk, not tracked by this handle? */
bool qk__qcow2_bitmap_inconsistent(const struct qcow2 *q, uint32_t i);
/* Load the bits of bitmap i (once; they stay until close), its table
 * checked. 0 or a negative errno (recorded). Image lock held. */
int qk__qcow2_bitmap_load(qk_image *img, uint32_t i);
/* Zeroed bits for a bitmap of `nbits` bits, or a copy of `from` (NULL: zeroed). 0, -ENOMEM (recorded). */
int qk__qcow2_bits_new(const struct qcow2 *q, uint64_t nbits, const struct qk__bitmap_bits *from,
		       struct qk__bitmap_bits **out);
void qk__qcow2_bits_free(struct qk__bitmap_bits *b);
/* Set the bits (of granularity 2^gb) covering guest bytes [off, off+len). */
void qk__qcow2_bits_set(const struct qcow2 *q, struct qk__bitmap_bits *b, uint32_t gb, uint64_t off,
			uint64_t len);
/* The first bit from bit `k` on whose state is not `set` (b->nbits: none). */
uint64_t qk__qcow2_bits_run(const struct qk__bitmap_bits *b, uint64_t k, bool set);
/* The driver's qk_bitmap_status(); takes the image lock. */
int qk__qcow2_bitmap_status(qk_image *img, const char *name, uint64_t off, uint64_t len,
			    uint64_t *run);
/* Start an edit from the current directory, with room for `room` more
 * entries. -ENOTSUP when an entry holds what this version cannot write
 * again (extra data, unknown flags or type). */
int qk__qcow2_bitmap_edit_init(qk_image *img, struct qk__bitmap_edit *e, uint32_t room);
/* Drop entry i of an edit. */
void qk__qcow2_bitmap_edit_remove(qk_image *img, struct qk__bitmap_edit *e, uint32_t i);
/* Free an edit that was not committed (bits it does not share). */
void qk__qcow2_bitmap_edit_free(qk_image *img, struct qk__bitmap_edit *e);
/* Make the directory what `e` says, crash-safely (see bitmap.c): on
 * success e is emptied (its entries are the image's now); on failure the
 * image is as before and e unchanged. Image lock held, handle ready to
 * write (refcounts loaded, overlap map built). */
int qk__qcow2_bitmaps_commit(qk_image *img, struct qk__bitmap_edit *e);
/* Before resizing to `size`: refuse inconsistent bitmaps and sizes a
 * bitmap cannot follow, load every bitmap and mark the untracked ones in
 * use on disk (so a cut leaves them inconsistent, never wrong).
 * qk__qcow2_bitmaps_resize(img, 1), once the size is written: every
 * bitmap rewritten for the new size (bits past it dropped, new ones clean),
 * as QEMU does; (img, 0) when the resize failed before the size changed:
 * the marks taken off again; (img, -1) when the size write failed (it may
 * have landed): every bitmap left in use, none kept true. Image lock held. */
int qk__qcow2_bitmaps_resize_prepare(qk_image *img, uint64_t size);
int qk__qcow2_bitmaps_resize(qk_image *img, int resized);
/* check -r all: remove the inconsistent bitmaps, each reported. */
int qk__qcow2_bitmaps_drop_inconsistent(qk_image *img, void (*report)(void *, const char *),
					void *opaque);

/* ---- header.c: parsing ---------------------------------------------------------- */
/*
 * Parse the header of the image on img->file into q (zeroed, set up by the
 * driver): the fixed fields, the extensions (backing format, feature names,
 * bitmaps, data file name), the backing file name, the L1 table and the
 * snapshot table, each checked against its limits. Returns 0 or a negative
 * errno (recorded); q keeps what was read, for the driver's close.
 */
int qk__qcow2_parse_header(qk_image *img, struct qcow2 *q, const struct qk_open_options *opts);

/* ---- write.c ------------------------------------------------------------------ */
int qk__qcow2_pwrite(qk_image *img, const void *buf, size_t len, uint64_t off);
int qk__qcow2_flush(qk_image *img);
int qk__qcow2_write_compressed(qk_image *img, const void *buf, size_t len, uint64_t off);
/* After a final flush: clear the dirty bit that lazy refcounts set. */
int qk__qcow2_mark_clean(qk_image *img);
int qk__qcow2_discard(qk_image *img, uint64_t off, uint64_t len);
int qk__qcow2_write_zeroes(qk_image *img, uint64_t off, uint64_t len, uint32_t flags);
/* Unallocate every cluster (reads fall through to the backing file). */
int qk__qcow2_make_empty(qk_image *img);
int qk__qcow2_resize(qk_image *img, uint64_t size, uint32_t flags);
/* Flush metadata in order (refcounts, then L2 tables), sync, punch the
 * queued holes. Image lock held. */
int qk__qcow2_flush_locked(qk_image *img);
/* Begin a change of [off, off+len) made in metadata alone (discard, zero
 * writes, resize, snapshots): the allocation lock and the image lock
 * taken, the handle ready to write (refcounts loaded, overlap map built,
 * bitmaps started) and the range marked in the bitmaps. Returns 0 or the
 * refusal; the locks are held either way, until qk__qcow2_end_change. */
int qk__qcow2_begin_change(qk_image *img, uint64_t off, uint64_t len);
void qk__qcow2_end_change(qk_image *img);
/* Cache store hook for L2 tables: host order to big-endian. */
void qk__qcow2_store_l2(void *opaque, const void *table, void *out);

/* ---- create.c ----------------------------------------------------------------- */
/* qk_create for qcow2 (the driver's create). */
int qk__qcow2_create(const char *path, const struct qk_create_options *o);

/* ---- measure.c ---------------------------------------------------------------- */
/* qk_measure with a qcow2 target (the driver's measure). */
int qk__qcow2_measure(const struct qk_create_options *o, const struct qk__measure_src *src,
		      struct qk_measure *res);

/* ---- bitmap-edit.c (above the operations) ------------------------------------- */
/* The driver's qk_bitmap_add() and the other changes (internal.h). */
int qk__qcow2_bitmap_change(qk_image *img, const struct qk__bitmap_change *ch);

/* ---- snapshot-write.c (above the operations) ---------------------------------- */
/* The driver's internal snapshot calls (see qk_snapshot_create() and the
 * others in qcowkit.h); `sn` indexes q->snapshots. */
int qk__qcow2_snapshot_create(qk_image *img, const char *name);
int qk__qcow2_snapshot_apply(qk_image *img, uint32_t sn);
int qk__qcow2_snapshot_delete(qk_image *img, uint32_t sn);

/* ---- amend.c (above the operations) ------------------------------------------- */
/* qk_amend for qcow2 (the driver's amend). */
int qk__qcow2_amend(qk_image *img, const struct qk_amend_options *o);

/* ---- backing.c (above the operations) ------------------------------------------ */
/* The driver's set_backing: name NULL or "" for none; durable. */
int qk__qcow2_set_backing(qk_image *img, const char *name, const char *fmt);

/* ---- check.c ------------------------------------------------------------------ */
/* Count every reference, correct the active COPIED flags, and write a new
 * refcount structure that matches (crash-safe switch). Metadata lock held
 * or the image not shared yet. */
int qk__qcow2_rebuild_refcounts(qk_image *img);
/* qk_forensic for qcow2. */
int qk__qcow2_forensic(qk_image *img, int (*found)(void *opaque, const struct qk_forensic_item *it),
		       void *opaque);
/* qk_check for qcow2. */
int qk__qcow2_check(qk_image *img, uint32_t flags, struct qk_check_result *res,
		    void (*report)(void *, const char *), void *opaque);

#endif
