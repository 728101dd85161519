/*
 * Guest-to-host translation, reads and block status for QCOW2.
 *
 * Design: every question about a guest range is answered by get_run(),
 * which walks L1 -> L2 under the image lock and returns the longest run
 * from the start offset whose units (clusters, or subclusters with
 * extended L2) share one type and, for types with a host cluster, lie at
 * contiguous host offsets. Runs span L2 tables, so a sequential read of
 * contiguous clusters becomes a single preadv straight into the caller's
 * buffer. The lock is held only for the table walk (and an L2 load on a
 * cache miss), never for data I/O, so reads of cached metadata proceed in
 * parallel.
 *
 * Invariants checked on every access (corruption → -EIO naming the table
 * and offset): L1 and L2 entries carry no reserved bits, table and data
 * offsets are cluster aligned, L2 tables lie inside the file, zero flags
 * appear only in v3, compressed entries have no subcluster bits, and no
 * subcluster is both allocated and zero.
 */
#include "qcow2/qcow2.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct run {
	enum qk__ctype type;
	uint64_t host;      /* host offset of the run's first byte (if any) */
	uint64_t bytes;
	uint64_t l2e;       /* the L2 entry, for compressed clusters */
	bool status;        /* block status: compressed clusters join runs */
};

static bool type_has_host(enum qk__ctype t)
{
	return t == CT_NORMAL || t == CT_ZERO_ALLOC || t == CT_UNALLOCATED_ALLOC;
}

int qk__qcow2_load_l2(void *opaque, void *table, uint64_t offset)
{
	qk_image *img = opaque;
	struct qcow2 *q = qcow2_of(img);
	qk_be64_table_to_host(table, q->cluster_size / 8);
	return 0;
}

/*
 * Add a piece [host, +n) of type t to the run. Returns false when the piece
 * does not continue the run (the run is complete).
 */
static bool extend(struct run *r, enum qk__ctype t, uint64_t host, uint64_t n)
{
	if (r->bytes == 0) {
		r->type = t;
		r->host = host;
		r->bytes = n;
		return t != CT_COMPRESSED || r->status;
	}
	if (t != r->type || (t == CT_COMPRESSED && !r->status))
		return false;
	if (type_has_host(t) && host != r->host + r->bytes)
		return false;
	r->bytes += n;
	return true;
}

/* Does host offset `off` start past the end of the image file? The file
 * may have grown since open: ask again before saying yes. */
static bool past_eof(qk_image *img, uint64_t off)
{
	struct qcow2 *q = qcow2_of(img);
	if (off < q->file_size)
		return false;
	uint64_t size;
	if (qk__file_get_size(img->file, &size) == 0)
		q->file_size = size;
	return off >= q->file_size;
}

int qk__qcow2_l2_table(qk_image *img, uint64_t l1i, uint64_t *l2_off)
{
	struct qcow2 *q = qcow2_of(img);
	QK_LOCK_HELD(q);
	*l2_off = 0;
	if (l1i >= q->l1_size)
		return 0;
	uint64_t l1e = q->l1[l1i], off = l1e & L1E_OFFSET_MASK;
	if (l1e & L1E_RESERVED_MASK)
		return qk__qcow2_corrupt(img, "L1 entry %llu (0x%016llx) has reserved bits set",
					 (unsigned long long)l1i, (unsigned long long)l1e);
	if (!off)
		return 0;
	if (off & (q->cluster_size - 1))
		return qk__qcow2_corrupt(img, "L2 table offset 0x%llx unaligned (L1 index %llu)",
					 (unsigned long long)off, (unsigned long long)l1i);
	if (past_eof(img, off))
		return qk__qcow2_corrupt(img, "L2 table at offset 0x%llx (L1 index %llu) lies past the end of the file",
					 (unsigned long long)off, (unsigned long long)l1i);
	uint64_t at;
	unsigned types = qk__qcow2_meta_hit(img, off, q->cluster_size, META_L2, &at);
	if (types) {
		char what[64];
		snprintf(what, sizeof what, "the L2 table of L1 index %llu", (unsigned long long)l1i);
		return qk__qcow2_meta_refuse(img, what, off, types, at);
	}
	*l2_off = off;
	return 0;
}

int qk__qcow2_check_compressed(qk_image *img, uint64_t e)
{
	struct qcow2 *q = qcow2_of(img);
	QK_LOCK_HELD(q);
	uint64_t coff = qk__qcow2_compressed_offset(q, e);
	if (coff > MAX_HOST_OFFSET || past_eof(img, coff))
		return qk__qcow2_corrupt(img, "compressed cluster data at host offset 0x%llx lies past the end of the file",
					 (unsigned long long)coff);
	return 0;
}

int qk__qcow2_check_entry(qk_image *img, uint64_t gc, uint64_t e, uint64_t bm)
{
	struct qcow2 *q = qcow2_of(img);
	QK_LOCK_HELD(q);
	unsigned long long guest = (unsigned long long)(gc << q->cluster_bits);
	if (e & QCOW_OFLAG_COMPRESSED) {
		if (q->has_data_file)
			return qk__qcow2_corrupt(img, "compressed cluster at guest offset 0x%llx in an image "
						 "with an external data file", guest);
		if (q->extl2 && bm)
			return qk__qcow2_corrupt(img, "compressed cluster at guest offset 0x%llx has subcluster bits set",
						 guest);
		return 0;
	}
	if (e & L2E_RESERVED_MASK)
		return qk__qcow2_corrupt(img, "L2 entry for guest offset 0x%llx (0x%016llx) has reserved bits set",
					 guest, (unsigned long long)e);
	uint64_t host = e & L2E_OFFSET_MASK;
	bool allocated = host != 0 || (q->has_data_file && (e & QCOW_OFLAG_COPIED));
	if (!q->extl2) {
		if ((e & QCOW_OFLAG_ZERO) && q->version < 3)
			return qk__qcow2_corrupt(img, "zero cluster entry at guest offset 0x%llx in a version 2 image",
						 guest);
	} else {
		uint32_t alloc = (uint32_t)(bm & SC_ALLOC_MASK), zero = (uint32_t)(bm >> 32);
		if (e & QCOW_OFLAG_ZERO)
			return qk__qcow2_corrupt(img, "extended L2 entry at guest offset 0x%llx has the zero flag set",
						 guest);
		if (alloc & zero)
			return qk__qcow2_corrupt(img, "subclusters at guest offset 0x%llx are both allocated and zero (bitmap 0x%016llx)",
						 guest, (unsigned long long)bm);
		if (!allocated && alloc)
			return qk__qcow2_corrupt(img, "unallocated cluster at guest offset 0x%llx has allocated subclusters",
						 guest);
	}
	if (q->has_data_file && allocated && host != (gc << q->cluster_bits))
		/* The specification: the offset must match the guest offset (else
		 * two guest clusters may share data no refcount accounts for). */
		return qk__qcow2_corrupt(img, "L2 entry for guest offset 0x%llx maps offset 0x%llx of the "
					 "external data file (it must map the guest offset)", guest,
					 (unsigned long long)host);
	if (!host)
		return 0;
	if (host & (q->cluster_size - 1))
		return qk__qcow2_corrupt(img, "cluster allocation offset 0x%llx unaligned (guest offset 0x%llx)",
					 (unsigned long long)host, guest);
	if (!q->has_data_file && past_eof(img, host))
		return qk__qcow2_corrupt(img, "data cluster at host offset 0x%llx (guest offset 0x%llx) "
					 "lies past the end of the file (%llu bytes)",
					 (unsigned long long)host, guest, (unsigned long long)q->file_size);
	return 0;
}

/*
 * Classify the units of one L2 entry from byte `in` of its cluster to the
 * cluster's end, feeding pieces to the run. Returns 1 when the run goes on
 * into the next entry, 0 when it is complete, or a negative errno.
 */
static int scan_entry(qk_image *img, uint64_t guest_cluster, uint64_t e, uint64_t bm,
		      uint64_t in, struct run *r)
{
	struct qcow2 *q = qcow2_of(img);
	uint64_t cs = q->cluster_size;
	int ret = qk__qcow2_check_entry(img, guest_cluster, e, bm);
	if (ret < 0)
		return ret;
	if (e & QCOW_OFLAG_COMPRESSED) {
		if (r->bytes == 0)
			r->l2e = e;
		return extend(r, CT_COMPRESSED, 0, cs - in) ? 1 : 0;
	}
	uint64_t host = e & L2E_OFFSET_MASK;
	bool allocated = host != 0 || (q->has_data_file && (e & QCOW_OFLAG_COPIED));

	if (!q->extl2) {
		enum qk__ctype t;
		if (e & QCOW_OFLAG_ZERO)
			t = host ? CT_ZERO_ALLOC : CT_ZERO_PLAIN;
		else
			t = allocated ? CT_NORMAL : CT_UNALLOCATED;
		return extend(r, t, host + in, cs - in) ? 1 : 0;
	}

	/* Extended L2: one type per 1/32 of the cluster. */
	uint32_t alloc = (uint32_t)(bm & SC_ALLOC_MASK), zero = (uint32_t)(bm >> 32);
	uint64_t scs = 1ull << q->sc_bits;
	for (uint32_t sc = (uint32_t)(in >> q->sc_bits); sc < SUBCLUSTERS; sc++) {
		enum qk__ctype t;
		uint32_t bit = 1u << sc;
		if (!allocated)
			t = (zero & bit) ? CT_ZERO_PLAIN : CT_UNALLOCATED;
		else if (zero & bit)
			t = CT_ZERO_ALLOC;
		else if (alloc & bit)
			t = CT_NORMAL;
		else
			t = CT_UNALLOCATED_ALLOC;
		uint64_t from = qk_max_u64(in, (uint64_t)sc * scs);
		uint64_t n = (uint64_t)(sc + 1) * scs - from;
		if (!extend(r, t, host + from, n))
			return 0;
	}
	return 1;
}

/*
 * Find the run starting at guest offset `off`, at most `len` bytes (which
 * stay inside the image). For reads a compressed cluster is a run of its
 * own; for block status (`status`) compressed clusters join into one run.
 * Takes the image lock for the walk.
 */
static int get_run(qk_image *img, uint64_t off, uint64_t len, bool status, struct run *r)
{
	struct qcow2 *q = qcow2_of(img);
	uint64_t cs = q->cluster_size;
	uint64_t l2_entries = 1ull << q->l2_bits;
	int ret = 0;
	memset(r, 0, sizeof *r);
	r->status = status;

	qk__qcow2_lock(q);
	while (r->bytes < len) {
		uint64_t cur = off + r->bytes;
		uint64_t cluster = cur >> q->cluster_bits;
		uint64_t l1i = cluster >> q->l2_bits;
		uint64_t l2i = cluster & (l2_entries - 1);
		uint64_t in = cur & (cs - 1);
		uint64_t l2_off;
		ret = qk__qcow2_l2_table(img, l1i, &l2_off);
		if (ret < 0)
			break;
		if (!l2_off) {
			/* No L2 table: the whole table's range is unallocated. */
			uint64_t n = (l2_entries - l2i) * cs - in;
			if (!extend(r, CT_UNALLOCATED, 0, n))
				break;
			continue;
		}
		void *table;
		ret = qk__cache_get(&q->l2_cache, l2_off, &table);
		if (ret < 0)
			break;
		const uint64_t *t = table;
		int more = 1;
		for (uint64_t i = l2i; i < l2_entries && more == 1 && r->bytes < len; i++) {
			uint64_t e = q->extl2 ? t[2 * i] : t[i];
			uint64_t bm = q->extl2 ? t[2 * i + 1] : 0;
			more = scan_entry(img, (l1i << q->l2_bits) + i, e, bm, i == l2i ? in : 0, r);
		}
		qk__cache_put(&q->l2_cache, l2_off);
		if (more < 0) {
			ret = more;
			break;
		}
		if (more == 0)
			break;
	}
	qk__qcow2_unlock(q);
	if (ret == 0 && r->bytes > len)
		r->bytes = len;
	assert(ret < 0 || r->bytes > 0);        /* a run is never empty */
	return ret;
}

/* Compressed data read with one pread at most (more when one cluster's
 * own data is larger): what a thread keeps for staging it. */
#define COMPRESSED_SPAN QK__SCRATCH_KEEP

/* Decompress the cluster `e` describes from src (its compressed bytes)
 * into dst (one cluster). */
static int inflate_entry(qk_image *img, uint64_t e, const uint8_t *src, uint8_t *dst)
{
	struct qcow2 *q = qcow2_of(img);
	uint64_t coffset = qk__qcow2_compressed_offset(q, e);
	char why[160];
	int ret = qk__decompress(q->compression_type, src, qk__qcow2_compressed_size(q, e), dst,
				 q->cluster_size, why, sizeof why);
	if (ret == -EIO)
		ret = qk__qcow2_corrupt(img, "compressed cluster at host offset 0x%llx: %s",
					(unsigned long long)coffset, why);
	return ret;
}

/* Read from a compressed cluster: bytes [in, in+n) of the cluster `e`
 * describes. Keeps the last decompressed cluster (small reads come
 * cluster after cluster in pieces). */
static int read_compressed(qk_image *img, uint64_t e, uint64_t in, void *buf, size_t n)
{
	struct qcow2 *q = qcow2_of(img);
	size_t cs = q->cluster_size;

	qk__qcow2_lock(q);
	if (q->cbuf_valid && q->cbuf_entry == e) {
		memcpy(buf, q->cbuf + in, n);
		qk__qcow2_unlock(q);
		return 0;
	}
	int ret = qk__qcow2_check_compressed(img, e);
	qk__qcow2_unlock(q);
	if (ret < 0)
		return ret;

	uint64_t csize = qk__qcow2_compressed_size(q, e);
	uint8_t *src = qk__codec_scratch(csize);
	uint8_t *dst = malloc(cs);
	if (!src || !dst) {
		qk__codec_scratch_done(src);
		free(dst);
		return qk__err(ENOMEM, "out of memory");
	}
	/* Data may end before the last sector: past EOF reads as zeros. */
	ret = qk__file_pread(img->file, src, csize, qk__qcow2_compressed_offset(q, e));
	if (ret == 0)
		ret = inflate_entry(img, e, src, dst);
	if (ret == 0) {
		memcpy(buf, dst + in, n);
		qk__qcow2_lock(q);
		uint8_t *old = q->cbuf;
		q->cbuf = dst;
		q->cbuf_entry = e;
		q->cbuf_valid = true;
		qk__qcow2_unlock(q);
		dst = old;
	}
	qk__codec_scratch_done(src);
	free(dst);
	return ret;
}

/*
 * Read whole compressed clusters from guest offset `off` (cluster aligned,
 * `len` at least one cluster; the first is `e`): as many as follow one
 * another in the guest and whose compressed data lie together in the file
 * (QEMU and qcowkit pack them back to back), up to COMPRESSED_SPAN of it,
 * are read with one pread and decompressed straight into buf. Sets *done
 * to the bytes read (whole clusters).
 */
static int read_compressed_run(qk_image *img, uint64_t e, uint64_t off, uint64_t len,
			       uint8_t *buf, uint64_t *done)
{
	enum { MAX_BATCH = 64 };
	struct qcow2 *q = qcow2_of(img);
	uint64_t cs = q->cluster_size, ents[MAX_BATCH];
	uint64_t start = qk__qcow2_compressed_offset(q, e);
	uint64_t end = start + qk__qcow2_compressed_size(q, e);
	size_t k = 1;
	ents[0] = e;
	while (k < MAX_BATCH && len - k * cs >= cs) {
		struct run r;
		int ret = get_run(img, off + k * cs, len - k * cs, false, &r);
		if (ret < 0)
			return ret;
		if (r.type != CT_COMPRESSED || r.bytes < cs)
			break;
		uint64_t co = qk__qcow2_compressed_offset(q, r.l2e);
		uint64_t ce = co + qk__qcow2_compressed_size(q, r.l2e);
		if (co < start || co > end || qk_max_u64(end, ce) - start > COMPRESSED_SPAN)
			break;
		end = qk_max_u64(end, ce);
		ents[k++] = r.l2e;
	}
	qk__qcow2_lock(q);
	int ret = 0;
	for (size_t i = 0; ret == 0 && i < k; i++)
		ret = qk__qcow2_check_compressed(img, ents[i]);
	qk__qcow2_unlock(q);
	uint8_t *src = ret == 0 ? qk__codec_scratch(end - start) : NULL;
	if (ret == 0 && !src)
		ret = -ENOMEM;
	/* Data may end before the last sector: past EOF reads as zeros. */
	if (ret == 0)
		ret = qk__file_pread(img->file, src, end - start, start);
	for (size_t i = 0; ret == 0 && i < k; i++)
		ret = inflate_entry(img, ents[i], src + (qk__qcow2_compressed_offset(q, ents[i]) - start),
				    buf + i * cs);
	if (src)
		qk__codec_scratch_done(src);
	*done = k * cs;
	return ret;
}

int qk__qcow2_pread(qk_image *img, void *buf, size_t len, uint64_t off)
{
	struct qcow2 *q = qcow2_of(img);
	uint8_t *p = buf;
	struct qk__file *df = img->file;
	/* Guest I/O needs the data file (opened here when the open deferred it). */
	if (q->has_data_file) {
		int ret = qk__qcow2_data_file(img, &df);
		if (ret < 0)
			return ret;
	}
	while (len > 0) {
		struct run r;
		int ret = get_run(img, off, len, false, &r);
		if (ret < 0)
			return ret;
		size_t n = r.bytes;
		uint64_t done = n;
		switch (r.type) {
		case CT_UNALLOCATED:
		case CT_UNALLOCATED_ALLOC:
			ret = img->read_below(img, p, n, off);
			break;
		case CT_ZERO_PLAIN:
		case CT_ZERO_ALLOC:
			memset(p, 0, n);
			break;
		case CT_NORMAL:
		case CT_NORMAL_HOLE:
			ret = qk__file_pread_data(df, p, n, r.host);
			break;
		case CT_COMPRESSED:
			if (n == q->cluster_size)    /* whole: with the ones after it */
				ret = read_compressed_run(img, r.l2e, off, len, p, &done);
			else
				ret = read_compressed(img, r.l2e, off & (q->cluster_size - 1), p,
						      n);
			break;
		}
		if (ret < 0)
			return ret;
		p += done;
		off += done;
		len -= done;
	}
	return 0;
}

/*
 * QEMU's test for an image preallocated with metadata (it changes what
 * block status reports, and map must agree with qemu-img): more clusters
 * carry a refcount than the file system stores. Counted over the file's
 * clusters until the threshold is met; an error means "no", as in QEMU.
 */
static bool detect_metadata_prealloc(qk_image *img)
{
	struct qcow2 *q = qcow2_of(img);
	uint64_t file_size, allocated;
	if (qk__file_get_size(img->file, &file_size) < 0 ||
	    qk__file_allocated_size(img->file, &allocated) < 0)
		return false;
	uint64_t real = allocated / q->cluster_size;
	uint64_t threshold = qk_max_u64(real * 10 / 9, real + 2);
	uint64_t end = (file_size + q->cluster_size - 1) >> q->cluster_bits;
	uint64_t count = 0;
	for (uint64_t i = 0; i < end && count < threshold; i++) {
		uint64_t rc;
		if (qk__qcow2_get_refcount(img, i, &rc) < 0)
			return false;
		count += rc != 0;
	}
	return count >= threshold;
}

int qk__qcow2_block_status(qk_image *img, uint64_t off, uint64_t len, struct qk__status *st)
{
	struct qcow2 *q = qcow2_of(img);
	struct run r;
	struct qk__file *f = img->file;
	if (q->has_data_file) {
		int ret = qk__qcow2_data_file(img, &f);
		if (ret < 0)
			return ret;
	}
	qk__qcow2_lock(q);
	if (!q->prealloc_checked) {
		q->metadata_prealloc = detect_metadata_prealloc(img);
		q->prealloc_checked = true;
	}
	qk__qcow2_unlock(q);
	int ret = get_run(img, off, len, true, &r);
	if (ret < 0)
		return ret;
	if (r.type == CT_NORMAL && q->metadata_prealloc) {
		/* Ask the file system whether the clusters hold data; a hole
		 * (or space past the end of the file) reads as zeros. */
		bool data = true;
		uint64_t n = r.bytes;
		if (qk__file_block_status(f, r.host, r.bytes, &data, &n) == 0) {
			r.bytes = n;
			if (!data)
				r.type = CT_NORMAL_HOLE;
		}
	}
	st->bytes = r.bytes;
	st->offset = r.host;
	st->file = q->has_data_file ? q->data_file_path : img->filename;
	switch (r.type) {
	case CT_UNALLOCATED:
		st->flags = 0;
		break;
	case CT_UNALLOCATED_ALLOC:
		st->flags = QK_EXTENT_OFFSET;
		break;
	case CT_ZERO_PLAIN:
		st->flags = QK_EXTENT_PRESENT | QK_EXTENT_ZERO;
		break;
	case CT_ZERO_ALLOC:
		st->flags = QK_EXTENT_PRESENT | QK_EXTENT_ZERO | QK_EXTENT_OFFSET;
		break;
	case CT_NORMAL:
		st->flags = QK_EXTENT_PRESENT | QK_EXTENT_DATA | QK_EXTENT_OFFSET;
		break;
	case CT_NORMAL_HOLE:
		st->flags = QK_EXTENT_PRESENT | QK_EXTENT_DATA | QK_EXTENT_ZERO | QK_EXTENT_OFFSET;
		break;
	case CT_COMPRESSED:
		st->flags = QK_EXTENT_PRESENT | QK_EXTENT_DATA | QK_EXTENT_COMPRESSED;
		break;
	}
	return 0;
}
