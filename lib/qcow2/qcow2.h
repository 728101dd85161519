/*
 * qcow2.h - the QCOW2 driver's state and the functions its files share.
 * Private to lib/qcow2/.
 */
#ifndef QK_QCOW2_H
#define QK_QCOW2_H

#include "internal.h"
#include "qcow2/format.h"

/* ---- cache.c: metadata table cache -----------------------------------------
 *
 * A fixed number of slots, each holding one table (an L2 table now;
 * refcount blocks later) keyed by its host offset, evicted by the CLOCK
 * approximation of least recently used. Lookups hash the offset. A slot in use (refs > 0) is never evicted.
 * The cache has no lock of its own: callers hold the image lock.
 */
struct qk__cache_slot {
	uint64_t offset;       /* host offset of the table; 0 = empty */
	bool recent;           /* used since the clock hand last passed */
	uint32_t refs;
	void *data;            /* entry_size bytes, host byte order */
};

struct qk__cache {
	struct qk__file *file;
	size_t entry_size;     /* bytes per table on disk */
	uint32_t nslots;
	struct qk__cache_slot *slots;
	uint32_t *hash;        /* open addressing: slot index + 1, 0 = free */
	uint32_t hash_mask;
	uint32_t hand;         /* CLOCK hand: next slot to consider */
	uint64_t hits, misses;
	/* Converts a freshly read table to host order and validates it. */
	int (*load)(void *opaque, void *table, uint64_t offset);
	void *opaque;
};

int qk__cache_init(struct qk__cache *c, struct qk__file *file, size_t entry_size,
		   uint32_t nslots, int (*load)(void *, void *, uint64_t), void *opaque);
void qk__cache_destroy(struct qk__cache *c);
/* Find or load the table at `offset`; *table points into the cache until
 * the matching qk__cache_put(offset). Returns 0 or a negative errno (-EBUSY
 * when every slot is in use). */
int qk__cache_get(struct qk__cache *c, uint64_t offset, void **table);
void qk__cache_put(struct qk__cache *c, uint64_t offset);

/* ---- driver state ----------------------------------------------------------- */

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
	struct qk__file *data_file; /* external data file, or NULL */

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
	struct qk_bitmap *bitmaps;
	uint32_t n_bitmaps;
};

static inline struct qcow2 *qcow2_of(qk_image *img)
{
	return img->drv_state;
}

/* ---- header.c ----------------------------------------------------------------- */
/* Report corrupt metadata found while reading: "<what> at offset N: ..." and
 * -EIO. (Writers will also mark the image corrupt here.) */
int qk__qcow2_corrupt(qk_image *img, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* A name for the incompatible bit `bit` (from the feature table, if any). */
const char *qk__qcow2_feature_name(struct qcow2 *q, unsigned bit);

/* ---- snapshot.c / bitmap.c --------------------------------------------------- */
int qk__qcow2_read_snapshots(qk_image *img);
void qk__qcow2_free_snapshots(struct qcow2 *q);
int qk__qcow2_read_bitmaps(qk_image *img, uint64_t dir_offset, uint64_t dir_size,
			   uint32_t nb_bitmaps);
void qk__qcow2_free_bitmaps(struct qcow2 *q);

/* ---- refcount.c --------------------------------------------------------------- */
/* The refcount of host cluster `cluster`; 0 past the table. Image lock held. */
int qk__qcow2_get_refcount(qk_image *img, uint64_t cluster, uint64_t *rc);
void qk__qcow2_free_refcounts(struct qcow2 *q);

/* ---- map.c -------------------------------------------------------------------- */
int qk__qcow2_pread(qk_image *img, void *buf, size_t len, uint64_t off);
int qk__qcow2_block_status(qk_image *img, uint64_t off, uint64_t len,
			   struct qk__status *st);
/* Cache loader for L2 tables. */
int qk__qcow2_load_l2(void *opaque, void *table, uint64_t offset);

#endif
