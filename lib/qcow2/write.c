/*
 * QCOW2 writes: cluster allocation with copy-on-write, L2 table
 * allocation, and flush.
 *
 * Ordering (crash safety, as QEMU): a new cluster's refcount is raised
 * (refcount cache) before any L2 entry points at it (the L2 cache depends
 * on the refcount cache); guest data is written before the L2 entry that
 * exposes it (the L2 cache syncs the file first); a new L2 table reaches
 * the disk before the L1 entry that points at it (written and synced
 * directly); a mapping is removed before the old cluster's refcount drops
 * (the refcount cache depends on the L2 cache). Barriers are taken only
 * when a cache is flushed, so sequential writes do not sync per cluster.
 *
 * Concurrency: the metadata lock (q->lock) guards L1, caches and
 * refcounts; it is never held across data I/O. Writes into clusters the
 * image owns alone (COPIED) go straight to the file. Allocating writes are
 * serialised by q->alloc_lock, so two writers never allocate for one
 * cluster; reads never take it.
 */
#include "qcow2/qcow2.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int queue_punch(qk_image *img, uint64_t off, uint64_t len);

void qk__qcow2_store_l2(void *opaque, const void *table, void *out)
{
	qk_image *img = opaque;
	struct qcow2 *q = qcow2_of(img);
	const uint64_t *t = table;
	uint8_t *o = out;
	for (uint64_t i = 0; i < q->cluster_size / 8; i++)
		qk_put_be64(o + 8 * i, t[i]);
}

/* Checks and header changes before the first write of this handle. */
static int prepare_write(qk_image *img)
{
	struct qcow2 *q = qcow2_of(img);
	QK_LOCK_HELD(q);
	if ((q->incompat & INCOMPAT_CORRUPT) || q->write_refused)
		return qk__err(EIO, "'%s' is marked corrupt: no more writes until it is repaired",
			       img->filename);
	if (q->write_ready)
		return 0;
	if (q->has_data_file && (img->flags & QK_OPEN_CONFINE))
		return qk__err(EPERM, "'%s' keeps its guest data in the external data file '%s', which "
			       "a confined open only reads: writes are refused", img->filename,
			       q->data_file_name);
	/* Every write is checked against the metadata it must not touch:
	 * the refcount structure is loaded and the map built now, once. */
	int mret = qk__qcow2_load_refcounts(img);
	if (mret == 0)
		mret = qk__qcow2_meta_ready(img);
	if (mret < 0)
		return mret;
	/* Enabled bitmaps are kept true (bitmap.c). */
	if (q->n_bitmaps) {
		int ret = qk__qcow2_bitmaps_start(img);
		if (ret < 0)
			return ret;
	}
	/* Autoclear bits this writer does not keep true (unknown ones) must
	 * be cleared before the image changes. The raw data file bit stays:
	 * writes keep the data file a valid raw image; so does the bitmaps
	 * bit, as the bitmaps are kept. */
	uint64_t keep = q->autoclear & (AUTOCLEAR_DATA_RAW | AUTOCLEAR_BITMAPS);
	if (q->version >= 3 && q->autoclear != keep) {
		uint8_t be[8];
		qk_put_be64(be, keep);
		int ret = qk__qcow2_write_durable(img, HDR_AUTOCLEAR, be, 8);
		if (ret < 0)
			return ret;
		q->autoclear = keep;
	}
	if ((q->compat & COMPAT_LAZY_REFCOUNTS) && q->version >= 3 && !(q->incompat & INCOMPAT_DIRTY)) {
		/* Lazy refcounts: mark the image dirty once, then refcounts need
		 * not reach the disk before the mappings that use them; a crash
		 * leaves the dirty bit and the next read-write open rebuilds. */
		int ret = qk__qcow2_write_incompat(img, q->incompat | INCOMPAT_DIRTY);
		if (ret < 0)
			return ret;
		q->lazy = true;
	}
	q->write_ready = true;
	return 0;
}

int qk__qcow2_mark_clean(qk_image *img)
{
	struct qcow2 *q = qcow2_of(img);
	if (q->write_refused)
		return 0;       /* corrupt: nothing more is written (bitmaps stay in use) */
	int ret = qk__qcow2_bitmaps_store(img);
	if (ret < 0 || !q->lazy)
		return ret;
	ret = qk__qcow2_flush(img);
	if (ret == 0)
		ret = qk__qcow2_write_incompat(img, q->incompat & ~INCOMPAT_DIRTY);
	if (ret == 0)
		q->lazy = false;
	return ret;
}

/*
 * The L2 table for L1 index l1i, ready to be changed: allocated when
 * missing, copied when shared (no COPIED flag). Returns it held in the
 * cache (*l2_off to put). Metadata lock held.
 */
static int l2_for_write(qk_image *img, uint64_t l1i, uint64_t *l2_off, uint64_t **table)
{
	struct qcow2 *q = qcow2_of(img);
	QK_LOCK_HELD(q);
	uint64_t l1e = q->l1[l1i], old;
	int ret = qk__qcow2_l2_table(img, l1i, &old);
	if (ret < 0)
		return ret;
	if (old && (l1e & QCOW_OFLAG_COPIED)) {
		*l2_off = old;
		return qk__cache_get(&q->l2_cache, old, (void **)table);
	}
	uint64_t t;
	ret = qk__qcow2_alloc_clusters(img, 1, &t);
	if (ret == 0)
		ret = qk__cache_flush(&q->rb_cache);     /* the table's refcount first */
	if (ret < 0)
		return ret;
	uint64_t *nt;
	ret = qk__cache_get_empty(&q->l2_cache, t, (void **)&nt);
	if (ret < 0)
		return ret;
	if (old) {
		uint64_t *ot;
		ret = qk__cache_get(&q->l2_cache, old, (void **)&ot);
		if (ret < 0) {
			qk__cache_discard(&q->l2_cache, t);
			return ret;
		}
		memcpy(nt, ot, q->cluster_size);
		qk__cache_put(&q->l2_cache, old);
		/* Loading the old table may have written the new one back
		 * (as zeros) to free a slot: the copy is dirty again. */
		qk__cache_mark_dirty(&q->l2_cache, t);
	}
	/* The table reaches the disk before the L1 entry points at it. */
	ret = qk__cache_flush(&q->l2_cache);
	if (ret < 0) {
		qk__cache_put(&q->l2_cache, t);
		return ret;
	}
	uint8_t be[8];
	qk_put_be64(be, t | QCOW_OFLAG_COPIED);
	ret = qk__qcow2_write_durable(img, q->l1_offset + 8 * l1i, be, 8);
	if (ret < 0) {
		qk__cache_put(&q->l2_cache, t);
		return ret;
	}
	q->l1[l1i] = t | QCOW_OFLAG_COPIED;
	if (t + q->cluster_size > q->file_size)
		q->file_size = t + q->cluster_size;
	qk__qcow2_meta_del(img, old, old ? q->cluster_size : 0);
	ret = qk__qcow2_meta_add(img, t, q->cluster_size, META_L2);
	if (ret == 0 && old) {
		/* Shared with a snapshot: this copy no longer references it. */
		ret = qk__qcow2_update_refcount(img, old, q->cluster_size, -1);
		if (ret < 0) {
			qk__cache_put(&q->l2_cache, t);
			return ret;
		}
	}
	*l2_off = t;
	*table = nt;
	return 0;
}

/* Release the host clusters an L2 entry held (before it was replaced).
 * The replacing entry must reach the disk first. Metadata lock held. */
static int release_entry(qk_image *img, uint64_t e)
{
	struct qcow2 *q = qcow2_of(img);
	QK_LOCK_HELD(q);
	uint64_t host = e & L2E_OFFSET_MASK;
	if (!(e & QCOW_OFLAG_COMPRESSED) && (!host || q->has_data_file))
		return 0;       /* nothing counted: no ordering to ask for */
	int ret = q->lazy ? 0 : qk__cache_set_dependency(&q->rb_cache, &q->l2_cache);
	if (ret < 0)
		return ret;
	if (e & QCOW_OFLAG_COMPRESSED)
		return qk__qcow2_update_refcount(img, qk__qcow2_compressed_offset(q, e),
						 qk__qcow2_compressed_size(q, e), -1);
	return qk__qcow2_update_refcount(img, host, q->cluster_size, -1);
}

/* An L2 entry and, with extended L2, its subcluster bitmap. */
struct entry {
	uint64_t e;
	uint64_t bm;
};

static uint64_t l2_slot(const struct qcow2 *q, uint64_t gc)
{
	uint64_t l2i = gc & ((1ull << q->l2_bits) - 1);
	return q->extl2 ? 2 * l2i : l2i;
}

/* The entry of guest cluster gc ({0, 0} when unmapped), validated as a
 * read of it validates it (so a write refuses what a read refuses, with the
 * same message). Metadata lock held. */
static int get_entry(qk_image *img, uint64_t gc, struct entry *en)
{
	struct qcow2 *q = qcow2_of(img);
	QK_LOCK_HELD(q);
	uint64_t l2_off;
	en->e = en->bm = 0;
	int ret = qk__qcow2_l2_table(img, gc >> q->l2_bits, &l2_off);
	if (ret < 0 || !l2_off)
		return ret;
	uint64_t *t;
	if ((ret = qk__cache_get(&q->l2_cache, l2_off, (void **)&t)) < 0)
		return ret;
	uint64_t slot = l2_slot(q, gc);
	en->e = t[slot];
	en->bm = q->extl2 ? t[slot + 1] : 0;
	qk__cache_put(&q->l2_cache, l2_off);
	ret = qk__qcow2_check_entry(img, gc, en->e, en->bm);
	/* A write replaces what it maps: compressed data must be sound too
	 * (before anything is allocated for the new data). */
	if (ret == 0 && (en->e & QCOW_OFLAG_COMPRESSED))
		ret = qk__qcow2_check_compressed(img, en->e);
	return ret;
}

/* Bitmap bits (alloc half) of the subclusters meeting [in, in+n). */
static uint64_t sc_mask(const struct qcow2 *q, uint64_t in, uint64_t n)
{
	uint32_t a = (uint32_t)(in >> q->sc_bits), b = (uint32_t)((in + n - 1) >> q->sc_bits);
	return (b == 31 ? 0xffffffffull : ((1ull << (b + 1)) - 1)) & ~((1ull << a) - 1);
}

/* Does the image own this entry's host cluster alone, holding data (so a
 * write may go in place)? Sets *host. */
static bool entry_owned(const struct qcow2 *q, const struct entry *en, uint64_t *host)
{
	uint64_t e = en->e, off = e & L2E_OFFSET_MASK;
	bool allocated = off || q->has_data_file; /* data file: identity, 0 is valid */
	*host = off;
	return (e & QCOW_OFLAG_COPIED) && !(e & (QCOW_OFLAG_COMPRESSED | QCOW_OFLAG_ZERO)) &&
	       !(e & L2E_RESERVED_MASK) && allocated && !(off & (q->cluster_size - 1));
}

/* Guest data may go to host cluster `host` (of guest cluster gc): not
 * over metadata (with an external data file it goes there instead).
 * Metadata lock held. */
static int data_target_ok(qk_image *img, uint64_t host, uint64_t gc)
{
	struct qcow2 *q = qcow2_of(img);
	QK_LOCK_HELD(q);
	uint64_t at;
	if (q->has_data_file)
		return 0;
	int ret = qk__qcow2_meta_ready(img);    /* built already, unless dropped */
	if (ret < 0)
		return ret;
	unsigned types = qk__qcow2_meta_hit(img, host, q->cluster_size, 0, &at);
	if (!types)
		return 0;
	char what[64];
	snprintf(what, sizeof what, "a data write for guest offset 0x%llx",
		 (unsigned long long)(gc << q->cluster_bits));
	return qk__qcow2_meta_refuse(img, what, host, types, at);
}

/* Host offset of guest cluster gc, with *owned set, when a write of
 * [in, in+n) may go straight there: the cluster is the image's alone and,
 * with extended L2, every touched subcluster is allocated. Metadata lock
 * held. */
static int owned_host(qk_image *img, uint64_t gc, uint64_t in, uint64_t n, uint64_t *host,
		      bool *owned)
{
	struct qcow2 *q = qcow2_of(img);
	*owned = false;
	uint64_t l1e = q->l1[gc >> q->l2_bits];
	if (!(l1e & QCOW_OFLAG_COPIED))
		return 0;
	struct entry en;
	int ret = get_entry(img, gc, &en);
	if (ret < 0)
		return ret;
	if (!entry_owned(q, &en, host))
		return 0;
	if (q->extl2) {
		uint64_t m = sc_mask(q, in, n);
		*owned = (en.bm & m) == m && !(en.bm & (m << 32));
	} else {
		*owned = true;
	}
	return *owned ? data_target_ok(img, *host, gc) : 0;
}

/*
 * Set the entry of guest cluster gc to `ne` (and bitmap `nbm` with
 * extended L2), releasing what the old entry held unless the new one keeps
 * its host cluster. With `punch`, freed data clusters become holes in the
 * file after the next flush. `sync_first` (may be NULL) is synced before
 * the entry reaches the disk (data before mapping). Metadata lock held.
 */
static int set_entry(qk_image *img, uint64_t gc, uint64_t ne, uint64_t nbm, bool punch,
		     struct qk__file *sync_first)
{
	struct qcow2 *q = qcow2_of(img);
	QK_LOCK_HELD(q);
	uint64_t l2_off = 0, *t = NULL;
	int ret = l2_for_write(img, gc >> q->l2_bits, &l2_off, &t);
	if (ret < 0)
		return ret;
	uint64_t slot = l2_slot(q, gc);
	uint64_t old = t[slot];
	if (old == ne && (!q->extl2 || t[slot + 1] == nbm))
		goto out;
	/* What the old entry holds is released below: it must be sound. */
	ret = qk__qcow2_check_entry(img, gc, old, q->extl2 ? t[slot + 1] : 0);
	if (ret == 0 && (old & QCOW_OFLAG_COMPRESSED))
		ret = qk__qcow2_check_compressed(img, old);
	if (ret < 0)
		goto out;
	/* Refcounts of new clusters first (unless lazy), then data, then
	 * the entry. An entry that references nothing new (zero, unmapped,
	 * the same host cluster) needs no refcount first: asking anyway
	 * would meet the refcount cache's own wait for this table (after a
	 * release) and flush both caches per cluster. */
	uint64_t new_ref = (ne & QCOW_OFLAG_COMPRESSED) ? ne & ~QCOW_OFLAG_COPIED : ne & L2E_OFFSET_MASK;
	uint64_t old_ref = (old & QCOW_OFLAG_COMPRESSED) ? old & ~QCOW_OFLAG_COPIED : old & L2E_OFFSET_MASK;
	if (!q->lazy && new_ref && new_ref != old_ref)
		ret = qk__cache_set_dependency(&q->l2_cache, &q->rb_cache);
	if (ret < 0)
		goto out;
	if (sync_first)
		q->l2_cache.sync_first = sync_first;
	t[slot] = ne;
	if (q->extl2)
		t[slot + 1] = nbm;
	qk__cache_mark_dirty(&q->l2_cache, l2_off);
	uint64_t host = old & L2E_OFFSET_MASK;
	bool compressed = old & QCOW_OFLAG_COMPRESSED;
	if (!compressed && host && (ne & L2E_OFFSET_MASK) == host && !(ne & QCOW_OFLAG_COMPRESSED))
		goto out;       /* the host cluster stays in use */
	ret = release_entry(img, old);
	if (ret == 0 && punch && host && !q->has_data_file && !compressed) {
		uint64_t rc;
		ret = qk__qcow2_get_refcount(img, host >> q->cluster_bits, &rc);
		if (ret == 0 && rc == 0)
			ret = queue_punch(img, host, q->cluster_size);
	}
out:
	qk__cache_put(&q->l2_cache, l2_off);
	return ret;
}

/*
 * Write n bytes at byte `in` of guest cluster gc when they cannot go in
 * place. What the guest reads around them now (backing chain, compressed,
 * zero or shared cluster) is copied: the whole cluster into a new host
 * cluster; or, with extended L2, only the touched subclusters, into the
 * cluster the image already owns or into a new one when the old entry held
 * nothing. alloc_lock held, metadata lock not.
 */
static int write_slow(qk_image *img, uint64_t gc, uint64_t in, const uint8_t *data, size_t n,
		      uint8_t *buf)
{
	struct qcow2 *q = qcow2_of(img);
	uint64_t cs = q->cluster_size, start = gc << q->cluster_bits;
	struct qk__file *df = q->data_file ? q->data_file : img->file;
	struct entry en;
	uint64_t host;
	qk__qcow2_lock(q);
	int ret = get_entry(img, gc, &en);
	qk__qcow2_unlock(q);
	if (ret < 0)
		return ret;
	bool owned = entry_owned(q, &en, &host);
	bool holds = (en.e & QCOW_OFLAG_COMPRESSED) || (en.e & L2E_OFFSET_MASK) ||
		     (q->has_data_file && (en.e & QCOW_OFLAG_COPIED));
	if (owned) {
		qk__qcow2_lock(q);
		ret = data_target_ok(img, host, gc);
		qk__qcow2_unlock(q);
		if (ret < 0)
			return ret;
	}

	/* The byte span to write: whole subclusters with extended L2 when the
	 * cluster is ours or held nothing, else the whole cluster. */
	uint64_t span_lo = 0, span_hi = cs, m = 0xffffffffull;
	if (q->extl2 && (owned || !holds)) {
		m = sc_mask(q, in, n);
		span_lo = (uint64_t)__builtin_ctzll(m) << q->sc_bits;
		span_hi = (uint64_t)(64 - __builtin_clzll(m)) << q->sc_bits;
	}
	uint64_t valid_hi = qk_min_u64(span_hi, img->size - start);
	if (in > span_lo || in + n < valid_hi) {
		ret = qk__qcow2_pread(img, buf + span_lo, valid_hi - span_lo, start + span_lo);
		if (ret < 0)
			return ret;
	}
	memset(buf + valid_hi, 0, span_hi - valid_hi);
	memcpy(buf + in, data, n);

	bool fresh = false;        /* the new host cluster reads as zeros */
	if (!owned) {
		/* A new host cluster: identity in a data file, else allocated. */
		host = start;
		if (!q->has_data_file) {
			qk__qcow2_lock(q);
			uint64_t end = q->file_size;
			ret = qk__qcow2_alloc_clusters(img, 1, &host);
			qk__qcow2_unlock(q);
			if (ret < 0)
				return ret;
			fresh = host >= end;    /* past the end of the file */
		}
	}
	/* A data file ends with the image; the image file gets whole clusters. */
	uint64_t wlo = span_lo, wend = q->has_data_file ? valid_hi : span_hi;
	if (!owned && !q->has_data_file && (in - span_lo) + (span_hi - in - n) >= 4096 &&
	    qk_is_zero(buf + span_lo, in - span_lo) &&
	    qk_is_zero(buf + in + n, span_hi - in - n)) {
		/* Only zeros to copy (no backing data): as QEMU, have the file
		 * system zero the new cluster (allocated, so the file does not
		 * fragment, and no zeros go through the page cache), or past
		 * the end of the file rely on it reading as zeros, and write
		 * just the data, in whole 4 KiB blocks. */
		if (qk__file_zero_range(img->file, host + span_lo, span_hi - span_lo) == 0)
			fresh = true;
		if (fresh) {
			wlo = qk_max_u64(span_lo, in & ~(uint64_t)4095);
			wend = qk_min_u64(span_hi, (in + n + 4095) & ~(uint64_t)4095);
		}
	}
	ret = qk__file_pwrite_data(df, buf + wlo, wend - wlo, host + wlo);
	qk__qcow2_lock(q);
	if (ret < 0) {
		if (!owned && !q->has_data_file)
			qk__qcow2_update_refcount(img, host, cs, -1);   /* best effort: else a leak */
		goto out;
	}
	if (!q->has_data_file && host + cs > q->file_size)
		q->file_size = host + cs;
	uint64_t nbm = 0;
	if (q->extl2) {
		uint64_t alloc = owned ? (en.bm & 0xffffffffull) | m : m;
		uint64_t zero = owned || !holds ? (en.bm >> 32) & ~m : 0;
		nbm = alloc | (zero << 32);
	}
	ret = set_entry(img, gc, host | QCOW_OFLAG_COPIED, nbm, false, df);
out:
	qk__qcow2_unlock(q);
	return ret;
}

/*
 * Write whole guest clusters from gc on that need new host clusters (no
 * copy-on-write: every byte is overwritten), up to `len` bytes: one run of
 * contiguous host clusters is allocated for as many as qualify (at most
 * MAX_RUN, and only clusters wholly inside the image), the data goes out
 * in one write, then the entries are set (the data synced first, through
 * the cache's ordering). Sets *done to the bytes written (0 when fewer
 * than two clusters qualify: the caller goes cluster by cluster).
 */
#define MAX_RUN 512
static int write_whole(qk_image *img, uint64_t gc, const uint8_t *data, size_t len, size_t *done)
{
	struct qcow2 *q = qcow2_of(img);
	uint64_t cs = q->cluster_size, k = 0, host = 0;
	*done = 0;
	pthread_mutex_lock(&q->alloc_lock);
	qk__qcow2_lock(q);
	int ret = 0;
	while (k < MAX_RUN && (k + 1) * cs <= len && ((gc + k + 1) << q->cluster_bits) <= img->size) {
		uint64_t h;
		bool owned;
		ret = owned_host(img, gc + k, 0, cs, &h, &owned);
		if (ret < 0 || owned)
			break;
		k++;
	}
	if (ret == 0 && k >= 2)
		ret = qk__qcow2_alloc_clusters(img, k, &host);
	qk__qcow2_unlock(q);
	if (ret < 0 || k < 2)
		goto out;
	ret = qk__file_pwrite_data(img->file, data, k * cs, host);
	qk__qcow2_lock(q);
	if (ret < 0) {
		qk__qcow2_update_refcount(img, host, k * cs, -1);      /* best effort: else a leak */
	} else {
		if (host + k * cs > q->file_size)
			q->file_size = host + k * cs;
		uint64_t nbm = q->extl2 ? 0xffffffffull : 0;
		for (uint64_t i = 0; ret == 0 && i < k; i++)
			ret = set_entry(img, gc + i, (host + i * cs) | QCOW_OFLAG_COPIED, nbm, false,
					img->file);
		if (ret == 0)
			*done = (size_t)(k * cs);
	}
	qk__qcow2_unlock(q);
out:
	pthread_mutex_unlock(&q->alloc_lock);
	return ret;
}

int qk__qcow2_pwrite(qk_image *img, const void *buf, size_t len, uint64_t off)
{
	struct qcow2 *q = qcow2_of(img);
	const uint8_t *p = buf;
	uint8_t *cbuf = NULL;
	int ret = 0;
	qk__qcow2_lock(q);
	ret = prepare_write(img);
	if (ret == 0)
		qk__qcow2_bitmaps_mark(img, off, len);
	qk__qcow2_unlock(q);
	while (ret == 0 && len > 0) {
		uint64_t gc = off >> q->cluster_bits;
		uint64_t in = off & (q->cluster_size - 1);
		size_t n = qk_min_u64(len, q->cluster_size - in);
		uint64_t host;
		bool owned;
		qk__qcow2_lock(q);
		ret = owned_host(img, gc, in, n, &host, &owned);
		qk__qcow2_unlock(q);
		if (ret < 0)
			break;
		if (!owned && in == 0 && !q->has_data_file && len >= 2 * q->cluster_size) {
			/* Whole clusters to allocate: as many as follow, at once. */
			size_t done = 0;
			ret = write_whole(img, gc, p, len, &done);
			if (ret < 0)
				break;
			if (done) {
				p += done;
				off += done;
				len -= done;
				continue;
			}
		}
		if (!owned) {
			pthread_mutex_lock(&q->alloc_lock);
			/* Another writer may have allocated it meanwhile. */
			qk__qcow2_lock(q);
			ret = owned_host(img, gc, in, n, &host, &owned);
			qk__qcow2_unlock(q);
			if (ret == 0 && !owned) {
				if (!cbuf && !(cbuf = malloc(q->cluster_size)))
					ret = qk__err(ENOMEM, "out of memory");
				else
					ret = write_slow(img, gc, in, p, n, cbuf);
			}
			pthread_mutex_unlock(&q->alloc_lock);
		}
		if (ret == 0 && owned) {
			struct qk__file *df = q->data_file ? q->data_file : img->file;
			ret = qk__file_pwrite_data(df, p, n, host + in);
		}
		p += n;
		off += n;
		len -= n;
	}
	free(cbuf);
	return ret;
}

/*
 * Write guest cluster `off` (aligned; `len` the cluster size, or the rest
 * of the image in its last cluster, padded with zeros) compressed. The
 * compression runs in the caller's thread with no lock held, so several
 * threads compress at once. Data that does not shrink is written plain, as
 * QEMU does. Order: data, then its refcounts, then the L2 entry.
 */
int qk__qcow2_write_compressed(qk_image *img, const void *buf, size_t len, uint64_t off)
{
	struct qcow2 *q = qcow2_of(img);
	uint64_t cs = q->cluster_size;
	if ((off & (cs - 1)) || len == 0 || len > cs || (len < cs && off + len != img->size))
		return qk__err(EINVAL, "a compressed write covers one whole cluster (offset %llu, "
			       "length %zu, cluster size %llu)", (unsigned long long)off, len,
			       (unsigned long long)cs);
	if (q->has_data_file)
		return qk__err(ENOTSUP, "compressed writes to '%s' are not possible: its data is "
			       "in an external data file", img->filename);
	struct entry en;
	qk__qcow2_lock(q);
	int ret = prepare_write(img);
	if (ret == 0)
		ret = get_entry(img, off >> q->cluster_bits, &en);   /* sound before we allocate */
	if (ret == 0)
		qk__qcow2_bitmaps_mark(img, off, len);
	qk__qcow2_unlock(q);
	if (ret < 0)
		return ret;
	uint8_t *in = NULL, *out = malloc(cs);
	if (!out)
		return qk__err(ENOMEM, "out of memory");
	const uint8_t *src = buf;
	if (len < cs) {
		if (!(in = calloc(1, cs))) {
			free(out);
			return qk__err(ENOMEM, "out of memory");
		}
		memcpy(in, buf, len);
		src = in;
	}
	ssize_t clen = qk__compress(q->compression_type, src, cs, out, cs - 1);
	if (clen == -ENOSPC) {
		free(in);
		free(out);
		return qk__qcow2_pwrite(img, buf, len, off);
	}
	ret = clen < 0 ? (int)clen : 0;
	uint64_t gc = off >> q->cluster_bits, coff = 0;
	if (ret == 0) {
		pthread_mutex_lock(&q->alloc_lock);
		qk__qcow2_lock(q);
		ret = qk__qcow2_alloc_bytes(img, (uint64_t)clen, &coff);
		qk__qcow2_unlock(q);
		if (ret == 0)
			ret = qk__file_pwrite_data(img->file, out, (size_t)clen, coff);
		qk__qcow2_lock(q);
		if (ret < 0 && coff) {
			qk__qcow2_update_refcount(img, coff, (uint64_t)clen, -1); /* else a leak */
		} else if (ret == 0) {
			if (coff + (uint64_t)clen > q->file_size)
				q->file_size = coff + (uint64_t)clen;
			unsigned shift = 62 - (q->cluster_bits - 8);
			uint64_t nsec = ((coff + (uint64_t)clen - 1) >> 9) - (coff >> 9);
			uint64_t ne = QCOW_OFLAG_COMPRESSED | (nsec << shift) | coff;
			q->cbuf_valid = false;  /* an old entry may name these bytes */
			ret = set_entry(img, gc, ne, 0, true, img->file);
		}
		qk__qcow2_unlock(q);
		pthread_mutex_unlock(&q->alloc_lock);
	}
	free(in);
	free(out);
	return ret;
}

static int punch_cmp(const void *a, const void *b)
{
	uint64_t x = ((const struct qcow2_punch *)a)->off, y = ((const struct qcow2_punch *)b)->off;
	return x < y ? -1 : x > y;
}

/* Sort the queued holes and join the ranges that touch: clusters freed in
 * guest order (qk_make_empty, a large discard) lie in a few host runs. */
static void merge_punches(struct qcow2 *q)
{
	uint32_t n = 0;
	qsort(q->punch, q->n_punch, sizeof q->punch[0], punch_cmp);
	for (uint32_t i = 0; i < q->n_punch; i++) {
		if (n && q->punch[n - 1].off + q->punch[n - 1].len >= q->punch[i].off) {
			uint64_t end = qk_max_u64(q->punch[n - 1].off + q->punch[n - 1].len,
						  q->punch[i].off + q->punch[i].len);
			q->punch[n - 1].len = end - q->punch[n - 1].off;
		} else {
			q->punch[n++] = q->punch[i];
		}
	}
	q->n_punch = n;
}

/* Queue host range [off, off+len) to be punched out of the file once the
 * metadata that stopped using it is on disk. Metadata lock held. */
static int queue_punch(qk_image *img, uint64_t off, uint64_t len)
{
	struct qcow2 *q = qcow2_of(img);
	QK_LOCK_HELD(q);
	if (q->n_punch && q->punch[q->n_punch - 1].off + q->punch[q->n_punch - 1].len == off) {
		q->punch[q->n_punch - 1].len += len;
		return 0;
	}
	if (q->n_punch == MAX_PENDING_PUNCH) {
		merge_punches(q);
		/* ranges that do not merge: punch them now, after a flush */
		int ret = q->n_punch > MAX_PENDING_PUNCH / 2 ? qk__qcow2_flush_locked(img) : 0;
		if (ret < 0)
			return ret;
	}
	q->punch[q->n_punch].off = off;
	q->punch[q->n_punch].len = len;
	q->n_punch++;
	return 0;
}

/* Flush metadata in order, sync, then punch the queued holes. */
int qk__qcow2_flush_locked(qk_image *img)
{
	struct qcow2 *q = qcow2_of(img);
	QK_LOCK_HELD(q);
	int ret = 0;
	if (q->write_refused) {
		/* Corruption was found: nothing more reaches the disk. What the
		 * caches still hold is lost, and a flush must say so. */
		if (qk__cache_is_dirty(&q->l2_cache) || (q->rt && qk__cache_is_dirty(&q->rb_cache)))
			return qk__err(EIO, "'%s' is corrupt: changes made before the corruption was "
				       "found were not written", img->filename);
		return 0;
	}
	if (q->data_file)
		ret = qk__file_sync(q->data_file);
	if (ret == 0)
		ret = qk__cache_flush(&q->l2_cache);
	if (ret == 0 && q->rt)
		ret = qk__cache_flush(&q->rb_cache);
	if (ret == 0)
		ret = qk__file_sync(img->file);
	if (ret < 0)
		return ret;
	q->freed_lo = q->freed_hi = 0;
	/* Only now is no durable entry pointing at these clusters. A cluster
	 * may have been allocated again since it was queued: punch only those
	 * still free. Holes are an optimisation: a refusal is not an error. */
	uint64_t cs = q->cluster_size;
	for (uint32_t i = 0; i < q->n_punch; i++) {
		uint64_t run = 0, start = q->punch[i].off;
		for (uint64_t o = q->punch[i].off; o <= q->punch[i].off + q->punch[i].len; o += cs) {
			uint64_t rc = 1;
			if (o < q->punch[i].off + q->punch[i].len &&
			    qk__qcow2_get_refcount(img, o >> q->cluster_bits, &rc) < 0)
				rc = 1;
			if (rc == 0) {
				if (!run)
					start = o;
				run += cs;
				continue;
			}
			/* A freed cluster that metadata still names had a wrong
			 * refcount: report it rather than punch the table out. */
			if (run && (ret = qk__qcow2_meta_check(img, start, run, 0, "a hole punch")) < 0)
				return ret;
			if (run)
				qk__file_discard(img->file, start, run);
			run = 0;
		}
	}
	q->n_punch = 0;
	return 0;
}

int qk__qcow2_flush(qk_image *img)
{
	struct qcow2 *q = qcow2_of(img);
	qk__qcow2_lock(q);
	int ret = qk__qcow2_flush_locked(img);
	qk__qcow2_unlock(q);
	return ret;
}

/* Whole clusters of [off, off+len): the first and one past the last, where
 * a range reaching the end of the image counts its last partial cluster. */
static void whole_clusters(qk_image *img, uint64_t off, uint64_t len, uint64_t *first,
			   uint64_t *end)
{
	struct qcow2 *q = qcow2_of(img);
	uint64_t cs = q->cluster_size;
	*first = (off + cs - 1) >> q->cluster_bits;
	uint64_t stop = off + len;
	*end = (stop == img->size) ? (stop + cs - 1) >> q->cluster_bits : stop >> q->cluster_bits;
	if (*end < *first)
		*end = *first;
}

/* Begin a change of [off, off+len) made in metadata alone (discard, zero
 * writes, resize): both locks taken, the handle ready to write and the
 * bitmaps marked. Returns prepare_write's result; the locks are held
 * either way, until end_change. */
int qk__qcow2_begin_change(qk_image *img, uint64_t off, uint64_t len)
{
	struct qcow2 *q = qcow2_of(img);
	pthread_mutex_lock(&q->alloc_lock);
	qk__qcow2_lock(q);
	int ret = prepare_write(img);
	if (ret == 0)
		qk__qcow2_bitmaps_mark(img, off, len);
	return ret;
}

void qk__qcow2_end_change(qk_image *img)
{
	struct qcow2 *q = qcow2_of(img);
	qk__qcow2_unlock(q);
	pthread_mutex_unlock(&q->alloc_lock);
}

int qk__qcow2_discard(qk_image *img, uint64_t off, uint64_t len)
{
	struct qcow2 *q = qcow2_of(img);
	uint64_t first, end;
	whole_clusters(img, off, len, &first, &end);
	bool has_backing = q->backing_file != NULL;
	if (q->autoclear & AUTOCLEAR_DATA_RAW)
		return 0;       /* the raw data file must keep its bytes: a hint ignored */
	int ret = qk__qcow2_begin_change(img, off, len);
	for (uint64_t gc = first; ret == 0 && gc < end; gc++) {
		struct entry en;
		ret = get_entry(img, gc, &en);
		if (ret < 0)
			break;
		bool allocated = (en.e & QCOW_OFLAG_COMPRESSED) || (en.e & L2E_OFFSET_MASK) ||
				 (en.bm & 0xffffffffull);
		/* Discarded data must read as zeros, not as the backing file:
		 * v3 says so with the zero flag (all zero bits with extended
		 * L2); v2 over a backing file cannot without writing zeros, so
		 * it keeps the data (discard is a hint). */
		uint64_t ne = en.e, nbm = en.bm;
		if (q->version >= 3 && (allocated || has_backing)) {
			ne = q->extl2 ? 0 : QCOW_OFLAG_ZERO;
			nbm = q->extl2 ? SC_ZERO_MASK : 0;
		} else if (q->version < 3 && !has_backing) {
			ne = 0;
		}
		ret = set_entry(img, gc, ne, nbm, true, NULL);
	}
	qk__qcow2_end_change(img);
	return ret;
}

/*
 * Make the whole image empty, as QEMU's bdrv_make_empty (qemu-img commit):
 * every cluster unallocated, data and zero clusters alike, so that reads
 * fall through to the backing file again; their host clusters are freed.
 * An image with internal snapshots keeps their clusters (refcounts). Not
 * durable until the next flush. Returns 0 or as set_entry.
 */
int qk__qcow2_make_empty(qk_image *img)
{
	struct qcow2 *q = qcow2_of(img);
	uint64_t end = (img->size + q->cluster_size - 1) >> q->cluster_bits;
	int ret = qk__qcow2_begin_change(img, 0, img->size);
	for (uint64_t gc = 0; ret == 0 && gc < end; gc++) {
		struct entry en;
		ret = get_entry(img, gc, &en);
		if (ret == 0 && (en.e || en.bm))
			ret = set_entry(img, gc, 0, 0, true, NULL);
	}
	qk__qcow2_end_change(img);
	return ret;
}

/* Write real zeros over [off, off+len) through the normal write path. */
static int write_zero_bytes(qk_image *img, uint64_t off, uint64_t len, uint32_t flags)
{
	struct qcow2 *q = qcow2_of(img);
	if (len == 0)
		return 0;
	if (flags & QK_ZERO_NO_FALLBACK)
		return qk__err(ENOTSUP, "zeroing [%llu, +%llu) of '%s' needs writing zeros",
			       (unsigned long long)off, (unsigned long long)len, img->filename);
	uint8_t *zeros = calloc(1, q->cluster_size);
	if (!zeros)
		return qk__err(ENOMEM, "out of memory");
	int ret = 0;
	while (ret == 0 && len > 0) {
		size_t n = qk_min_u64(len, q->cluster_size - (off & (q->cluster_size - 1)));
		ret = qk__qcow2_pwrite(img, zeros, n, off);
		off += n;
		len -= n;
	}
	free(zeros);
	return ret;
}

/*
 * Zero the whole subclusters of [a, b) inside guest cluster gc by bitmap
 * (extended L2): they become zero, keeping the host cluster. Sets *done
 * to the bytes [lo, hi) covered; a compressed cluster is left for real
 * zeros (*lo == *hi). Metadata lock held.
 */
static int zero_subclusters(qk_image *img, uint64_t gc, uint64_t a, uint64_t b, uint64_t *lo,
			    uint64_t *hi)
{
	struct qcow2 *q = qcow2_of(img);
	QK_LOCK_HELD(q);
	uint64_t scs = 1ull << q->sc_bits, start = gc << q->cluster_bits;
	uint64_t cl_end = qk_min_u64(start + q->cluster_size, img->size);
	*lo = (a + scs - 1) & ~(scs - 1);
	*hi = b == cl_end ? b : b & ~(scs - 1);   /* the image's last subcluster counts */
	if (*hi <= *lo) {
		*lo = *hi = a;
		return 0;
	}
	struct entry en;
	int ret = get_entry(img, gc, &en);
	if (ret < 0)
		return ret;
	if (en.e & QCOW_OFLAG_COMPRESSED) {
		*lo = *hi = a;
		return 0;
	}
	uint64_t m = sc_mask(q, *lo - start, *hi - *lo);
	uint64_t nbm = (en.bm & ~m) | (m << 32);
	return set_entry(img, gc, en.e, nbm, false, NULL);
}

int qk__qcow2_write_zeroes(qk_image *img, uint64_t off, uint64_t len, uint32_t flags)
{
	struct qcow2 *q = qcow2_of(img);
	uint64_t first, end;
	whole_clusters(img, off, len, &first, &end);
	bool has_backing = q->backing_file != NULL;
	bool unmap = flags & QK_ZERO_MAY_UNMAP;
	/* A raw data file must hold the zeros itself; v2 over a backing file
	 * has no way to say "zero" in metadata. */
	if ((q->autoclear & AUTOCLEAR_DATA_RAW) || (q->version < 3 && has_backing))
		return write_zero_bytes(img, off, len, flags);

	uint64_t head_end = qk_min_u64(off + len, first << q->cluster_bits);
	uint64_t tail_start = qk_max_u64(head_end, qk_min_u64(off + len, end << q->cluster_bits));
	if (!q->extl2 && (head_end > off || tail_start < off + len) && (flags & QK_ZERO_NO_FALLBACK))
		return qk__err(ENOTSUP, "zeroing part of a cluster of '%s' needs writing zeros",
			       img->filename);
	/* Byte ranges still to be written as real zeros afterwards. */
	uint64_t parts[4][2] = { { off, head_end }, { 0, 0 }, { tail_start, off + len }, { 0, 0 } };

	int ret = qk__qcow2_begin_change(img, off, len);
	for (uint64_t gc = first; ret == 0 && gc < end; gc++) {
		struct entry en;
		ret = get_entry(img, gc, &en);
		if (ret < 0)
			break;
		uint64_t host = en.e & L2E_OFFSET_MASK;
		bool keep = !unmap && !(en.e & QCOW_OFLAG_COMPRESSED) && (host || q->has_data_file) &&
			    (en.e & QCOW_OFLAG_COPIED);
		uint64_t kept = keep ? (en.e & (L2E_OFFSET_MASK | QCOW_OFLAG_COPIED)) : 0;
		if (q->version < 3)
			ret = set_entry(img, gc, 0, 0, unmap, NULL);   /* no backing: reads zeros */
		else if (q->extl2)
			ret = set_entry(img, gc, kept, SC_ZERO_MASK, unmap, NULL);
		else
			ret = set_entry(img, gc, QCOW_OFLAG_ZERO | kept, 0, unmap, NULL);
	}
	/* Extended L2: whole subclusters of the partial clusters by bitmap. */
	if (ret == 0 && q->extl2 && head_end > off) {
		uint64_t lo, hi;
		ret = zero_subclusters(img, off >> q->cluster_bits, off, head_end, &lo, &hi);
		parts[0][1] = lo;
		parts[1][0] = hi;
		parts[1][1] = head_end;
	}
	if (ret == 0 && q->extl2 && tail_start < off + len) {
		uint64_t lo, hi;
		ret = zero_subclusters(img, tail_start >> q->cluster_bits, tail_start, off + len, &lo, &hi);
		parts[2][1] = lo;
		parts[3][0] = hi;
		parts[3][1] = off + len;
	}
	qk__qcow2_end_change(img);
	for (int i = 0; i < 4 && ret == 0; i++)
		if (parts[i][1] > parts[i][0])
			ret = write_zero_bytes(img, parts[i][0], parts[i][1] - parts[i][0], flags);
	return ret;
}

/*
 * Grow the active L1 table to at least `need` entries: a new table is
 * written and synced, then the header points at it (size and offset in one
 * write), then the old table is freed. Metadata lock held.
 */
static int grow_l1(qk_image *img, uint64_t need)
{
	struct qcow2 *q = qcow2_of(img);
	QK_LOCK_HELD(q);
	uint64_t cs = q->cluster_size;
	if (need * 8 > MAX_L1_BYTES)
		return qk__err(EFBIG, "'%s' cannot grow: the L1 table would pass %llu entries",
			       img->filename, MAX_L1_BYTES / 8);
	uint64_t bytes = (need * 8 + cs - 1) & ~(cs - 1);
	uint64_t *nl1 = calloc(1, bytes);
	if (!nl1)
		return qk__err(ENOMEM, "out of memory");
	uint64_t noff;
	int ret = qk__qcow2_alloc_clusters(img, bytes / cs, &noff);
	if (ret == 0)
		ret = qk__cache_flush(&q->rb_cache);    /* the new table's refcounts first */
	for (uint64_t i = 0; i < q->l1_size; i++)
		qk_put_be64(&nl1[i], q->l1[i]);
	if (ret == 0)
		ret = qk__qcow2_write_durable(img, noff, nl1, bytes);
	uint8_t hdr[12];
	qk_put_be32(hdr, (uint32_t)need);
	qk_put_be64(hdr + 4, noff);
	if (ret == 0)
		ret = qk__qcow2_write_durable(img, HDR_L1_SIZE, hdr, sizeof hdr);
	if (ret < 0) {
		free(nl1);
		return ret;
	}
	uint64_t old_off = q->l1_offset, old_bytes = (uint64_t)q->l1_size * 8;
	qk_be64_table_to_host(nl1, need);
	free(q->l1);
	q->l1 = nl1;
	q->l1_size = (uint32_t)need;
	q->l1_offset = noff;
	if (noff + bytes > q->file_size)
		q->file_size = noff + bytes;
	qk__qcow2_meta_del(img, old_off, old_bytes);
	ret = qk__qcow2_meta_add(img, noff, bytes, META_L1);
	if (ret == 0 && old_bytes)
		ret = qk__qcow2_update_refcount(img, old_off, old_bytes, -1);
	return ret;
}

int qk__qcow2_resize(qk_image *img, uint64_t size, uint32_t flags)
{
	struct qcow2 *q = qcow2_of(img);
	uint64_t old = img->size, cs = q->cluster_size;
	if (q->version < 3 && q->nb_snapshots)
		return qk__err(ENOTSUP, "Can't resize a v2 image which has snapshots");
	if (size > (uint64_t)INT64_MAX - cs)
		return qk__err(EFBIG, "size %llu is too large", (unsigned long long)size);
	/* v2 has no zero flag: growing over a backing file that reaches past
	 * the old end would need every new cluster written with zeros, or the
	 * guest would see the backing file there. Refused, as qemu-img does. */
	if (q->version < 3 && size > old && q->backing_file &&
	    (!img->backing || img->backing->size > old))
		return qk__err(ENOTSUP, "cannot grow v2 image '%s' over its backing file: the new "
			       "area would show the backing file's data (compat=1.1 images can)",
			       img->filename);
	int ret = qk__qcow2_begin_change(img, 0, 0);
	/* Bitmaps follow the size (bitmap.c): in use on disk until then. */
	bool bitmaps = ret == 0 && q->n_bitmaps != 0;
	if (bitmaps)
		ret = qk__qcow2_bitmaps_resize_prepare(img, size);
	uint64_t per_l1 = cs << q->l2_bits;
	uint64_t need = size / per_l1 + (size % per_l1 != 0);
	if (ret == 0 && size < old) {
		/* Drop every cluster wholly past the new end; a partial last
		 * cluster keeps its bytes (invisible, zeroed if it grows again). */
		for (uint64_t gc = (size + cs - 1) >> q->cluster_bits; ret == 0 && gc < (old + cs - 1) >> q->cluster_bits; gc++) {
			struct entry en;
			ret = get_entry(img, gc, &en);
			if (ret == 0 && (en.e || en.bm))
				ret = set_entry(img, gc, 0, 0, true, NULL);
		}
		if (ret == 0)
			ret = qk__qcow2_flush_locked(img);
	} else if (ret == 0 && need > q->l1_size) {
		ret = grow_l1(img, need);
	}
	bool size_tried = ret == 0;
	if (ret == 0) {
		uint8_t be[8];
		qk_put_be64(be, size);
		ret = qk__qcow2_write_durable(img, HDR_SIZE, be, 8);
	}
	if (ret == 0)
		img->size = size;
	/* The bitmaps follow; or, refused before the size changed, are as
	 * they were; or, after a failed size write (which may have landed),
	 * stay in use. */
	if (bitmaps) {
		int bret = qk__qcow2_bitmaps_resize(img, ret == 0 ? 1 : size_tried ? -1 : 0);
		ret = ret < 0 ? ret : bret;
	}
	qk__qcow2_end_change(img);
	if (ret < 0 || size <= old)
		return ret;
	/* Growing: what lies past the old end must read as zeros, not as stale
	 * bytes of the last cluster or as a larger backing file. Not a change
	 * the bitmaps see (QEMU's new area starts clean). */
	uint64_t zero_end = qk_min_u64(size, (old + cs - 1) & ~(cs - 1));
	if (img->backing && img->backing->size > zero_end)
		zero_end = qk_min_u64(size, img->backing->size);
	else if (q->backing_file && !img->backing)
		zero_end = size;
	if (zero_end > old) {
		qk__qcow2_lock(q);
		q->bm_quiet_lo = old;
		q->bm_quiet_hi = zero_end;
		qk__qcow2_unlock(q);
		ret = qk__qcow2_write_zeroes(img, old, zero_end - old, 0);
		qk__qcow2_lock(q);
		q->bm_quiet_lo = q->bm_quiet_hi = 0;
		qk__qcow2_unlock(q);
	}
	return ret;
}
