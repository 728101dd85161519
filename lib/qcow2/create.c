/*
 * create.c - lay out a new QCOW2 image the way qemu-img 7.2 does.
 *
 * Design note. qemu-img create writes a three-cluster skeleton (header,
 * refcount table, one refcount block), opens it, and grows it to the
 * requested size with its ordinary allocator: the L1 table and, with
 * preallocation, every L2 table and data cluster come from
 * qcow2_alloc_clusters(), whose choices depend on a free-cluster cursor,
 * on refcount blocks allocated on the way (after which the caller searches
 * again) and on refcount-table growth. Host offsets are visible to users
 * (qemu-img map, and the file holes that map turns into "zero" runs after
 * metadata preallocation), so instead of inventing a layout we replay that
 * allocator on an in-memory model and write the result once.
 *
 * Invariants of the model:
 * - every host cluster's refcount is 0 or 1 while creating, so one bit per
 *   cluster holds it; a bit counts only while the refcount block covering
 *   it is in the refcount table (QEMU reads an absent block as zeros);
 * - `fci` is QEMU's free_cluster_index: allocation searches from it and
 *   moves it forward, a refcount dropping to 0 moves it back;
 * - -EAGAIN from refcount-block allocation makes the caller undo its
 *   partial refcount update and search again (qcow2-refcount.c);
 * - `written` marks clusters QEMU writes at some point; those no longer in
 *   use at the end (a refcount table that moved) are written with zeros,
 *   so the file's allocation, which `map` reports, matches qemu-img's;
 * - `file_end` is the length QEMU's file would have.
 * Data clusters in an external data file are mapped 1:1 and not counted.
 */
#include "qcow2/qcow2.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* ---- shared with lib/create.c ----------------------------------------------
 * These belong in internal.h (a "create.c" section); until they move there
 * each file that uses them repeats the declarations.
 */

/* BDRV_REQUEST_MAX_BYTES: the most one cluster allocation may map. */
#define REQ_MAX_BYTES 0x7ffffe00ull
/* preallocate_co() walks the disk in steps of INT_MAX bytes (cluster
 * aligned). */
#define PREALLOC_STEP 0x7fffffffull
/* The model keeps two bits per host cluster; past this many clusters
 * (1 GiB of bitmaps) we refuse rather than exhaust memory. */
#define MAX_MODEL_CLUSTERS (1ull << 32)

/* A run of guest clusters mapped to consecutive host clusters, inside one
 * L2 table. With a data file, host == guest. */
struct run {
	uint64_t guest;
	uint64_t host;
	uint64_t n;
};

struct model {
	/* geometry */
	uint32_t cbits;
	uint64_t cs;
	uint32_t order;          /* refcount order: refcounts of 1 << order bits */
	uint32_t rb_bits;        /* log2 of refcounts per refcount block */
	uint32_t l2_bits;        /* log2 of entries per L2 table */
	bool data_file;          /* data clusters live in an external file */

	/* refcount table: cluster index of each refcount block, 0 = none */
	uint64_t *rt;
	uint64_t rt_size;        /* entries */
	uint64_t rt_cluster;     /* where the table lives */
	uint64_t rt_max;         /* highest used entry (max_refcount_table_index) */

	/* one bit per host cluster: refcount, and "QEMU wrote here" */
	uint8_t *rc;
	uint8_t *written;
	uint64_t cap;            /* clusters both bitmaps cover */
	uint64_t fci;            /* QEMU's free_cluster_index */
	uint64_t file_end;       /* bytes */

	uint64_t l1_size;
	uint64_t l1_cluster;
	uint64_t *l1;            /* cluster index of each L2 table, 0 = none */
	struct run *runs;        /* in guest order */
	size_t nruns, runs_cap;

	/* refcount tables QEMU moved away from: their clusters keep the old
	 * entries where nothing reuses them */
	struct old_table {
		uint64_t cluster;
		uint64_t size;           /* entries */
		uint64_t *rt;
	} *old;
	size_t nold;

	/* falloc/full: the image's data area QEMU grows, [from, to) in bytes */
	uint64_t prealloc_from, prealloc_to;
	/* metadata preallocation (and any with a data file): zeros over the
	 * tail of the last data cluster, and the length the file holding the
	 * data is then grown to (bytes; in the data file when there is one) */
	uint64_t tail_from, tail_to;
	uint64_t grow_to;
};

static inline bool bit_get(const uint8_t *b, uint64_t i)
{
	return (b[i >> 3] >> (i & 7)) & 1;
}

static inline void bit_put(uint8_t *b, uint64_t i, bool v)
{
	if (v)
		b[i >> 3] |= (uint8_t)(1u << (i & 7));
	else
		b[i >> 3] &= (uint8_t)~(1u << (i & 7));
}

static inline uint64_t div_round_up(uint64_t a, uint64_t b)
{
	return a / b + (a % b != 0);
}

/* Grow the bitmaps to cover cluster `idx`. -EFBIG past the model's limit,
 * -ENOMEM. */
static int model_reserve(struct model *m, uint64_t idx)
{
	uint64_t cap;
	uint8_t *rc, *wr;

	if (idx < m->cap)
		return 0;
	if (idx >= MAX_MODEL_CLUSTERS)
		return qk__err(EFBIG, "Could not allocate clusters: the image would "
			       "need more than %llu clusters",
			       (unsigned long long)MAX_MODEL_CLUSTERS);
	cap = m->cap ? m->cap : 4096;
	while (cap <= idx)
		cap *= 2;
	rc = realloc(m->rc, (size_t)(cap / 8));
	if (!rc)
		return qk__err(ENOMEM, "out of memory");
	m->rc = rc;
	wr = realloc(m->written, (size_t)(cap / 8));
	if (!wr)
		return qk__err(ENOMEM, "out of memory");
	m->written = wr;
	memset(m->rc + m->cap / 8, 0, (size_t)((cap - m->cap) / 8));
	memset(m->written + m->cap / 8, 0, (size_t)((cap - m->cap) / 8));
	m->cap = cap;
	return 0;
}

/* qcow2_get_refcount(): 0 where no refcount block covers the cluster. */
static bool get_rc(const struct model *m, uint64_t idx)
{
	uint64_t ti = idx >> m->rb_bits;

	if (ti >= m->rt_size || m->rt[ti] == 0 || idx >= m->cap)
		return false;
	return bit_get(m->rc, idx);
}

/* Record that QEMU writes [off, off+len) of the image file. */
static int mark_written(struct model *m, uint64_t off, uint64_t len)
{
	uint64_t c, last = (off + len - 1) >> m->cbits;
	int ret;

	for (c = off >> m->cbits; c <= last; c++) {
		ret = model_reserve(m, c);
		if (ret < 0)
			return ret;
		bit_put(m->written, c, true);
	}
	m->file_end = qk_max_u64(m->file_end, off + len);
	return 0;
}

/* alloc_clusters_noref(): the first run of n clusters at or after the
 * cursor whose refcounts are all 0; the cursor ends past it. */
static int alloc_noref(struct model *m, uint64_t n, uint64_t *out)
{
	uint64_t i;
retry:
	for (i = 0; i < n; i++) {
		uint64_t idx = m->fci++;
		if (get_rc(m, idx))
			goto retry;
	}
	if (m->fci - 1 > (MAX_HOST_OFFSET >> m->cbits))
		return qk__err(EFBIG, "Could not allocate clusters: host offsets "
			       "would exceed 2^56");
	*out = m->fci - n;
	return 0;
}

static int alloc_refcount_block(struct model *m, uint64_t idx);
static int refcount_area(struct model *m, uint64_t start, uint64_t additional,
			 bool exact, uint64_t new_index, uint64_t new_block,
			 uint64_t *end);

/*
 * update_refcount(): add 1 to (or, with `decrease`, take 1 from) the
 * refcount of clusters [start, start+n), allocating refcount blocks as
 * needed. Returns 0; -EAGAIN when a refcount block was allocated (the
 * update is undone: the caller must search for space again); or another
 * negative errno (recorded).
 */
static int update_refcount(struct model *m, uint64_t start, uint64_t n, bool decrease)
{
	uint64_t i, last_ti = UINT64_MAX;
	int ret = 0;

	for (i = 0; i < n; i++) {
		uint64_t idx = start + i, ti = idx >> m->rb_bits;

		if (ti != last_ti) {
			ret = alloc_refcount_block(m, idx);
			/* The search restarts: QEMU tries the same clusters first. */
			if (ret == -EAGAIN && m->fci > start)
				m->fci = start;
			if (ret < 0)
				break;
		}
		last_ti = ti;
		ret = model_reserve(m, idx);
		if (ret < 0)
			break;
		if (bit_get(m->rc, idx) != decrease) {
			/* A refcount of 2, or below 0: the replay went wrong. */
			ret = qk__err(EIO, "internal error: refcount of cluster %llu "
				      "would leave 0..1", (unsigned long long)idx);
			break;
		}
		bit_put(m->rc, idx, !decrease);
		if (decrease && idx < m->fci)
			m->fci = idx;
	}
	if (ret < 0 && i > 0)
		(void)update_refcount(m, start, i, !decrease);
	return ret;
}

/*
 * alloc_refcount_block(): make sure a refcount block covers cluster `idx`.
 * Returns 0 when one already does; otherwise allocates it (a block that
 * covers itself, or one counted by another block), growing the refcount
 * table when it is too short, and returns -EAGAIN; or a negative errno.
 */
static int alloc_refcount_block(struct model *m, uint64_t idx)
{
	uint64_t ti = idx >> m->rb_bits, nb = 0, used, end;
	int ret;

	if (ti < m->rt_size && m->rt[ti] != 0)
		return 0;
	ret = alloc_noref(m, 1, &nb);
	if (ret < 0)
		return ret;
	if ((nb >> m->rb_bits) == ti) {
		ret = model_reserve(m, nb);
		if (ret < 0)
			return ret;
		bit_put(m->rc, nb, true);   /* counts itself once hooked up */
	} else {
		ret = update_refcount(m, nb, 1, false);
		if (ret < 0)
			return ret;
	}
	ret = mark_written(m, nb << m->cbits, m->cs);
	if (ret < 0)
		return ret;
	if (ti < m->rt_size) {
		m->rt[ti] = nb;
		m->rt_max = qk_max_u64(m->rt_max, ti);
		return -EAGAIN;
	}
	/* The table is too short: new self-describing structures go past
	 * everything in use, covering the new block too. */
	used = div_round_up(qk_max_u64(idx + 1, nb + 1), 1ull << m->rb_bits);
	ret = refcount_area(m, used << m->rb_bits, 0, false, ti, nb, &end);
	return ret < 0 ? ret : -EAGAIN;
}

/* Refcount blocks needed to count `clusters` clusters plus the refcount
 * structures themselves; with `generous`, room for half as many table
 * clusters again. */
static uint64_t refblocks_needed(uint64_t clusters, const struct model *m, bool generous)
{
	uint64_t blocks;

	qk__qcow2_refcount_metadata(clusters, m->cs, m->order, generous, &blocks);
	return blocks;
}

/*
 * qcow2_refcount_area(): at cluster `start` (past everything in use) put
 * the refcount blocks missing to count the image up to `additional`
 * clusters past the new structures, then a new refcount table; count them
 * all; switch to the new table and free the old one. `new_block`, when
 * not 0, is entered at `new_index` first. *end is the first cluster after
 * the new structures. Returns 0 or a negative errno (-EFBIG: the table
 * would pass QEMU's 8 MiB limit).
 */
static int refcount_area(struct model *m, uint64_t start, uint64_t additional,
			 bool exact, uint64_t new_index, uint64_t new_block,
			 uint64_t *end)
{
	uint64_t total, area_ti, size, clusters, add = 0, table, end_c, blk;
	uint64_t old_cluster = m->rt_cluster, old_size = m->rt_size, i, *t;
	int ret;

	total = refblocks_needed(start + additional, m, !exact);
	size = exact ? total : total + div_round_up(total, 2);
	size = div_round_up(size, m->cs / 8) * (m->cs / 8);
	if (size * 8 > MAX_REFTABLE_BYTES)
		return qk__err(EFBIG, "The image size is too large for file format "
			       "'qcow2': its refcount table would exceed %llu bytes",
			       (unsigned long long)MAX_REFTABLE_BYTES);
	clusters = size * 8 / m->cs;
	area_ti = start >> m->rb_bits;

	t = calloc((size_t)size, sizeof *t);
	if (!t)
		return qk__err(ENOMEM, "out of memory");
	memcpy(t, m->rt, (size_t)qk_min_u64(size, m->rt_max + 1) * sizeof *t);
	if (new_block)
		t[new_index] = new_block;
	for (i = area_ti; i < total; i++)
		add += t[i] == 0;
	table = start + add;
	end_c = table + clusters;
	ret = model_reserve(m, end_c);
	if (ret < 0)
		goto fail;

	blk = start;
	for (i = area_ti; i < total; i++) {
		uint64_t first = i << m->rb_bits, j, e;

		if (t[i] == 0)
			t[i] = blk++;
		ret = mark_written(m, t[i] << m->cbits, m->cs);
		if (ret < 0)
			goto fail;
		if (first >= end_c)
			continue;
		j = first < start ? start - first : 0;
		e = qk_min_u64(end_c - first, 1ull << m->rb_bits);
		for (; j < e; j++)
			bit_put(m->rc, first + j, true);
	}
	ret = mark_written(m, table << m->cbits, size * 8);
	if (ret < 0)
		goto fail;

	{
		struct old_table *o = realloc(m->old, (m->nold + 1) * sizeof *o);
		if (!o) {
			ret = qk__err(ENOMEM, "out of memory");
			goto fail;
		}
		m->old = o;
		m->old[m->nold++] = (struct old_table){ old_cluster, old_size, m->rt };
	}
	m->rt = t;
	m->rt_size = size;
	m->rt_cluster = table;
	for (m->rt_max = size - 1; m->rt_max > 0 && m->rt[m->rt_max] == 0; m->rt_max--)
		;
	*end = end_c;
	return update_refcount(m, old_cluster, div_round_up(old_size * 8, m->cs), true);

fail:
	free(t);
	return ret;
}

/* qcow2_alloc_clusters(): n contiguous free clusters, counted. */
static int alloc_clusters(struct model *m, uint64_t n, uint64_t *out)
{
	int ret;

	do {
		ret = alloc_noref(m, n, out);
		if (ret < 0)
			return ret;
		ret = update_refcount(m, *out, n, false);
	} while (ret == -EAGAIN);
	return ret;
}

/* qcow2_alloc_clusters_at(): as many of the n clusters from `idx` on as
 * are free, up to the first one in use; *got says how many. */
static int alloc_clusters_at(struct model *m, uint64_t idx, uint64_t n, uint64_t *got)
{
	uint64_t i;
	int ret;

	do {
		for (i = 0; i < n && !get_rc(m, idx + i); i++)
			;
		ret = update_refcount(m, idx, i, false);
	} while (ret == -EAGAIN);
	*got = i;
	return ret;
}

/* get_cluster_table(): the L2 table of L1 entry `i`, allocated (l2_allocate)
 * when missing. */
static int get_l2(struct model *m, uint64_t i)
{
	uint64_t c = 0;
	int ret;

	if (m->l1[i] != 0)
		return 0;
	ret = alloc_clusters(m, 1, &c);
	if (ret < 0)
		return ret;
	m->l1[i] = c;
	return mark_written(m, c << m->cbits, m->cs);
}

static int add_run(struct model *m, uint64_t guest, uint64_t host, uint64_t n)
{
	if (m->nruns == m->runs_cap) {
		size_t cap = m->runs_cap ? m->runs_cap * 2 : 64;
		struct run *r = realloc(m->runs, cap * sizeof *r);
		if (!r)
			return qk__err(ENOMEM, "out of memory");
		m->runs = r;
		m->runs_cap = cap;
	}
	m->runs[m->nruns++] = (struct run){ guest, host, n };
	return 0;
}

/*
 * qcow2_alloc_host_offset() for guest clusters that are all unallocated:
 * map up to *n clusters from `g` on, one L2 table's worth at a time, for
 * as long as the host clusters stay contiguous. The L2 table of the next
 * range is allocated before contiguity is tested, as QEMU's handle_copied()
 * does. On return *n is the count mapped and *host the first host cluster.
 */
static int alloc_host(struct model *m, uint64_t g, uint64_t *n, uint64_t *host)
{
	uint64_t remaining = *n, next = 0, l2_entries = 1ull << m->l2_bits;
	bool have = false;
	int ret;

	while (remaining > 0) {
		uint64_t nb, h = 0;

		ret = get_l2(m, g >> m->l2_bits);
		if (ret < 0)
			return ret;
		nb = qk_min_u64(remaining, l2_entries - (g & (l2_entries - 1)));
		nb = qk_min_u64(nb, REQ_MAX_BYTES >> m->cbits);
		if (m->data_file) {
			h = g;
		} else if (!have) {
			ret = alloc_clusters(m, nb, &h);
			if (ret < 0)
				return ret;
		} else {
			ret = alloc_clusters_at(m, next, nb, &nb);
			if (ret < 0)
				return ret;
			if (nb == 0)
				break;
			h = next;
		}
		ret = add_run(m, g, h, nb);
		if (ret < 0)
			return ret;
		if (!have)
			*host = h;
		have = true;
		next = h + nb;
		g += nb;
		remaining -= nb;
	}
	*n -= remaining;
	return 0;
}

/*
 * preallocate_co(): map every guest cluster of a `size`-byte disk. The
 * last cluster of a size that is not cluster aligned is mapped by a
 * "write" that ends early, so QEMU copies zeros over the rest of it (to
 * the end of the subcluster with extended L2) -- the tail. Then the file
 * holding the data (the image, or the data file) is grown to end where
 * the last mapping step's bytes end, unless it is already that long.
 */
static int preallocate(struct model *m, uint64_t size, bool extended_l2)
{
	uint64_t guest_clusters = div_round_up(size, m->cs);
	uint64_t g = 0, step = (PREALLOC_STEP & ~(m->cs - 1)) >> m->cbits;
	uint64_t host = 0, n = 0, g0 = 0, rem = size & (m->cs - 1);
	int ret;

	while (g < guest_clusters) {
		n = qk_min_u64(guest_clusters - g, step);
		ret = alloc_host(m, g, &n, &host);
		if (ret < 0)
			return ret;
		g0 = g;
		g += n;
	}
	if (guest_clusters == 0)
		return 0;
	if (rem != 0) {
		const struct run *r = &m->runs[m->nruns - 1];
		uint64_t last = (r->host + r->n - 1) << m->cbits;
		uint64_t granule = extended_l2 ? m->cs / SUBCLUSTERS : m->cs;

		m->tail_from = last + rem;
		m->tail_to = last + (rem + granule - 1) / granule * granule;
		if (m->tail_to == m->tail_from)
			m->tail_from = m->tail_to = 0;
	}
	/* The last step's bytes: whole clusters, except up to `size` at the end. */
	m->grow_to = (host << m->cbits) + qk_min_u64(n << m->cbits, size - (g0 << m->cbits));
	if (!m->data_file) {
		m->file_end = qk_max_u64(m->file_end, m->tail_to);
		m->file_end = qk_max_u64(m->file_end, m->grow_to);
	}
	return 0;
}

/* qcow2_co_truncate() with falloc/full and no data file: refcount
 * structures for everything first, then all data clusters in one run
 * (grown with the preallocation mode), then the L2 tables. */
static int preallocate_area(struct model *m, uint64_t guest_clusters)
{
	uint64_t last, start, got, g, h, l2_entries = 1ull << m->l2_bits;
	uint64_t l2_tables = div_round_up(guest_clusters, l2_entries) + 1;
	int ret;

	/* qcow2_get_last_cluster(): the file ends after the last cluster in use. */
	for (last = div_round_up(m->file_end, m->cs); last > 0 && !get_rc(m, last - 1); last--)
		;
	ret = refcount_area(m, last, guest_clusters + l2_tables, true, 0, 0, &start);
	if (ret < 0)
		return ret;
	ret = alloc_clusters_at(m, start, guest_clusters, &got);
	if (ret < 0)
		return ret;
	if (got < guest_clusters)
		return qk__err(EIO, "Unable to allocate %llu clusters for preallocation",
			       (unsigned long long)guest_clusters);
	m->prealloc_from = m->file_end;
	m->prealloc_to = (start + guest_clusters) << m->cbits;
	m->file_end = qk_max_u64(m->file_end, m->prealloc_to);
	for (g = 0, h = start; g < guest_clusters;) {
		uint64_t n = qk_min_u64(guest_clusters - g, l2_entries - (g & (l2_entries - 1)));
		ret = get_l2(m, g >> m->l2_bits);
		if (ret < 0)
			return ret;
		ret = add_run(m, g, h, n);
		if (ret < 0)
			return ret;
		g += n;
		h += n;
	}
	return 0;
}

static void model_free(struct model *m)
{
	for (size_t i = 0; i < m->nold; i++)
		free(m->old[i].rt);
	free(m->old);
	free(m->rt);
	free(m->rc);
	free(m->written);
	free(m->l1);
	free(m->runs);
}

/*
 * Replay qcow2_co_create(): the skeleton, its first three clusters counted,
 * the L1 table, then the preallocation. `size` is the rounded virtual size
 * and `prealloc` the effective mode.
 */
static int model_build(struct model *m, uint64_t size, int prealloc, bool extended_l2)
{
	uint64_t first = 0, guest_clusters = div_round_up(size, m->cs);
	int ret;

	m->rt_size = m->cs / 8;
	m->rt = calloc((size_t)m->rt_size, sizeof *m->rt);
	if (!m->rt)
		return qk__err(ENOMEM, "out of memory");
	m->rt[0] = 2;
	m->rt_cluster = 1;
	ret = mark_written(m, 0, 3 * m->cs);
	if (ret < 0)
		return ret;
	ret = alloc_clusters(m, 3, &first);
	if (ret < 0)
		return ret;

	m->l1_size = div_round_up(guest_clusters, 1ull << m->l2_bits);
	if (m->l1_size > 0) {
		m->l1 = calloc((size_t)m->l1_size, sizeof *m->l1);
		if (!m->l1)
			return qk__err(ENOMEM, "out of memory");
		ret = alloc_clusters(m, div_round_up(m->l1_size * 8, m->cs), &m->l1_cluster);
		if (ret < 0)
			return ret;
		ret = mark_written(m, m->l1_cluster << m->cbits, m->l1_size * 8);
		if (ret < 0)
			return ret;
	}
	switch (prealloc) {
	case QK_PREALLOC_METADATA:
		return preallocate(m, size, extended_l2);
	case QK_PREALLOC_FALLOC:
	case QK_PREALLOC_FULL:
		if (m->data_file)
			return preallocate(m, size, extended_l2);
		return preallocate_area(m, guest_clusters);
	default:
		return 0;
	}
}

/* ---- the header --------------------------------------------------------------- */


/* Append one header extension at *p; -ENOSPC when it does not fit. */
static int put_ext(uint8_t *h, uint64_t cs, size_t *p, uint32_t type,
		   const void *data, size_t len)
{
	size_t total = 8 + ((len + 7) & ~(size_t)7);

	if (*p + total > cs)
		return -ENOSPC;
	qk_put_be32(h + *p, type);
	qk_put_be32(h + *p + 4, (uint32_t)len);
	if (len)
		memcpy(h + *p + 8, data, len);
	*p += total;
	return 0;
}

/*
 * qcow2_update_header(): fill the header cluster `h` (cs zeroed bytes):
 * fixed fields, then the backing-format, data-file and feature-table
 * extensions, the end marker, and the backing file name right after it.
 * Without `with_backing` the backing file is left out (QEMU's first header
 * write, which decides the error message). Returns 0 or -ENOSPC (not
 * recorded).
 */
static int build_header(uint8_t *h, const struct model *m, const struct qk_create_options *o,
			uint64_t size, bool with_backing)
{
	bool v3 = o->version >= 3;
	size_t p = v3 ? V3_HEADER_LENGTH : HDR_V2_LENGTH;
	int ret;

	memset(h, 0, (size_t)m->cs);
	qk_put_be32(h + HDR_MAGIC, QCOW2_MAGIC);
	qk_put_be32(h + HDR_VERSION, o->version);
	qk_put_be32(h + HDR_CLUSTER_BITS, m->cbits);
	qk_put_be64(h + HDR_SIZE, size);
	qk_put_be32(h + HDR_L1_SIZE, (uint32_t)m->l1_size);
	qk_put_be64(h + HDR_L1_OFFSET, m->l1_size ? m->l1_cluster << m->cbits : 0);
	qk_put_be64(h + HDR_RT_OFFSET, m->rt_cluster << m->cbits);
	qk_put_be32(h + HDR_RT_CLUSTERS, (uint32_t)(m->rt_size * 8 / m->cs));
	if (v3) {
		uint64_t incompat = 0, compat = 0, autoclear = 0;

		if (o->data_file)
			incompat |= INCOMPAT_DATA_FILE;
		if (o->compression_type != QK_COMPRESSION_ZLIB)
			incompat |= INCOMPAT_COMPRESSION;
		if (o->extended_l2)
			incompat |= INCOMPAT_EXTL2;
		if (o->lazy_refcounts)
			compat |= COMPAT_LAZY_REFCOUNTS;
		if (o->data_file_raw)
			autoclear |= AUTOCLEAR_DATA_RAW;
		qk_put_be64(h + HDR_INCOMPAT, incompat);
		qk_put_be64(h + HDR_COMPAT, compat);
		qk_put_be64(h + HDR_AUTOCLEAR, autoclear);
		qk_put_be32(h + HDR_REFCOUNT_ORDER, m->order);
		qk_put_be32(h + HDR_HEADER_LENGTH, V3_HEADER_LENGTH);
		h[HDR_COMPRESSION_TYPE] = (uint8_t)o->compression_type;
	}
	if (with_backing && o->backing_file && o->backing_format) {
		ret = put_ext(h, m->cs, &p, EXT_BACKING_FMT, o->backing_format,
			      strlen(o->backing_format));
		if (ret < 0)
			return ret;
	}
	if (o->data_file) {
		ret = put_ext(h, m->cs, &p, EXT_DATA_FILE, o->data_file, strlen(o->data_file));
		if (ret < 0)
			return ret;
	}
	if (v3 && m->cs >= FEATURE_TABLE_MIN_CLUSTER) {
		uint8_t t[FEATURE_TABLE_LEN];

		qk__qcow2_feature_table(t);
		ret = put_ext(h, m->cs, &p, EXT_FEATURES, t, sizeof t);
		if (ret < 0)
			return ret;
	}
	ret = put_ext(h, m->cs, &p, EXT_END, NULL, 0);
	if (ret < 0)
		return ret;
	if (with_backing && o->backing_file) {
		size_t len = strlen(o->backing_file);

		if (p + len > m->cs)
			return -ENOSPC;
		memcpy(h + p, o->backing_file, len);
		qk_put_be64(h + HDR_BACKING_OFFSET, p);
		qk_put_be32(h + HDR_BACKING_SIZE, (uint32_t)len);
	}
	return 0;
}

/* ---- options ------------------------------------------------------------------- */

/*
 * qcow2_co_create()'s checks, in its order and words. Sets *size to the
 * virtual size rounded up to 512 and *prealloc to the effective mode
 * (data_file_raw implies metadata). Returns 0 or -EINVAL / -EFBIG
 * (recorded).
 */
static int check_options(const struct qk_create_options *o, uint64_t *size, int *prealloc)
{
	uint64_t cs = o->cluster_size, l2_entries, l1;

	if (o->version != 2 && o->version != 3)
		return qk__err(EINVAL, "Invalid compatibility level: version %u "
			       "(2 for 0.10, 3 for 1.1)", o->version);
	if (o->extended_l2 && o->version < 3)
		return qk__err(EINVAL, "Extended L2 entries are only supported with "
			       "compatibility level 1.1 and above (use version=v3 or greater)");
	if (!qk_is_pow2(cs) || cs < (1u << MIN_CLUSTER_BITS) || cs > (1u << MAX_CLUSTER_BITS))
		return qk__err(EINVAL, "Cluster size must be a power of two between "
			       "%d and %dk", 1 << MIN_CLUSTER_BITS,
			       1 << (MAX_CLUSTER_BITS - 10));
	if (o->extended_l2 && cs < (1u << MIN_EXTL2_CLUSTER_BITS))
		return qk__err(EINVAL, "Extended L2 entries are only supported with "
			       "cluster sizes of at least %u bytes",
			       1u << MIN_EXTL2_CLUSTER_BITS);
	if (o->preallocation < QK_PREALLOC_OFF || o->preallocation > QK_PREALLOC_FULL)
		return qk__err(EINVAL, "Invalid preallocation mode %d", o->preallocation);
	if (o->backing_file && o->preallocation != QK_PREALLOC_OFF && !o->extended_l2)
		return qk__err(EINVAL, "Backing file and preallocation can only be used "
			       "at the same time if extended_l2 is on");
	if (o->backing_format && !o->backing_file)
		return qk__err(EINVAL, "Backing format cannot be used without backing file");
	if (o->backing_file && o->backing_file[0] == '\0')
		return qk__err(EINVAL, "Expected backing file name, got empty string");
	if (o->backing_file && !o->backing_format)
		return qk__err(EINVAL, "Backing file specified without backing format");
	if (o->backing_format && strcmp(o->backing_format, "qcow2") != 0 &&
	    strcmp(o->backing_format, "raw") != 0)
		return qk__err(EINVAL, "Backing format '%s' is not supported "
			       "(qcow2 or raw)", o->backing_format);
	if (o->lazy_refcounts && o->version < 3)
		return qk__err(EINVAL, "Lazy refcounts only supported with compatibility "
			       "level 1.1 and above (use version=v3 or greater)");
	if (o->refcount_bits > 64 || !qk_is_pow2(o->refcount_bits))
		return qk__err(EINVAL, "Refcount width must be a power of two and may "
			       "not exceed 64 bits");
	if (o->version < 3 && o->refcount_bits != 16)
		return qk__err(EINVAL, "Different refcount widths than 16 bits require "
			       "compatibility level 1.1 or above (use version=v3 or greater)");
	if (o->data_file_raw && !o->data_file)
		return qk__err(EINVAL, "data-file-raw requires data-file");
	if (o->data_file_raw && o->backing_file)
		return qk__err(EINVAL, "Backing file and data-file-raw cannot be used at "
			       "the same time");
	*prealloc = o->preallocation;
	if (o->data_file_raw && *prealloc == QK_PREALLOC_OFF)
		*prealloc = QK_PREALLOC_METADATA;
	if (o->data_file && o->version < 3)
		return qk__err(EINVAL, "External data files are only supported with "
			       "compatibility level 1.1 and above (use version=v3 or greater)");
	if (o->compression_type != QK_COMPRESSION_ZLIB) {
		if (o->version < 3)
			return qk__err(EINVAL, "Non-zlib compression type is only supported "
				       "with compatibility level 1.1 and above (use "
				       "version=v3 or greater)");
		if (o->compression_type != QK_COMPRESSION_ZSTD)
			return qk__err(EINVAL, "Unknown compression type");
	}

	/* Sizes round up to whole sectors; QEMU's arithmetic then goes
	 * negative for the last 511 values below 2^63. */
	if (o->size > (uint64_t)INT64_MAX - 511)
		return qk__err(EINVAL, "Could not resize image: Image size cannot be negative");
	*size = (o->size + 511) & ~511ull;
	l2_entries = cs / (o->extended_l2 ? 16 : 8);
	l1 = div_round_up(div_round_up(*size, cs), l2_entries);
	if (l1 > MAX_L1_BYTES / 8)
		return qk__err(EFBIG, "The image size is too large for file format "
			       "'qcow2' (try using a larger cluster size)");
	return 0;
}

/* ---- writing ------------------------------------------------------------------- */

static int write_at(struct qk__file *f, const void *buf, uint64_t len, uint64_t off)
{
	const uint8_t *p = buf;

	while (len > 0) {
		size_t n = (size_t)qk_min_u64(len, 1u << 30);
		int ret = qk__file_pwrite(f, p, n, off);
		if (ret < 0)
			return ret;
		p += n;
		off += n;
		len -= n;
	}
	return 0;
}

/* The refcount block for clusters [first, first + per_block): 1 for every
 * counted cluster, at the model's width (sub-byte widths fill each byte
 * from its lowest bits; wider ones are big-endian). */
static void fill_refblock(uint8_t *b, const struct model *m, uint64_t first)
{
	uint64_t per_block = 1ull << m->rb_bits, bits = 1ull << m->order, j;

	memset(b, 0, (size_t)m->cs);
	for (j = 0; j < per_block; j += 8) {
		uint64_t idx = first + j;
		uint8_t byte;

		if (idx >= m->cap)
			break;
		byte = m->rc[idx >> 3];
		for (unsigned k = 0; byte != 0 && k < 8; k++, byte >>= 1) {
			uint64_t e = j + k;
			if (!(byte & 1))
				continue;
			if (bits >= 8)
				b[e * (bits / 8) + bits / 8 - 1] = 1;
			else
				b[e * bits / 8] |= (uint8_t)(1u << (bits * (e % (8 / bits))));
		}
	}
}

/* Write the model: data area first (so its preallocation never covers
 * metadata written after it), header, refcount table and blocks, L1, L2
 * tables, zeros over clusters QEMU wrote and abandoned, then the length. */
/* The refcount table and its blocks (marked in `live`). buf: a cluster or
 * the table, whichever is larger. */
static int write_refcounts(struct qk__file *f, const struct model *m, uint8_t *buf, uint8_t *live)
{
	uint64_t i, cs = m->cs;
	for (i = 0; i < m->rt_size; i++)
		qk_put_be64(buf + i * 8, m->rt[i] << m->cbits);
	int ret = write_at(f, buf, m->rt_size * 8, m->rt_cluster << m->cbits);
	for (i = 0; ret == 0 && i < m->rt_size * 8 / cs; i++)
		bit_put(live, m->rt_cluster + i, true);
	for (i = 0; ret == 0 && i < m->rt_size; i++) {
		if (m->rt[i] == 0)
			continue;
		fill_refblock(buf, m, i << m->rb_bits);
		ret = write_at(f, buf, cs, m->rt[i] << m->cbits);
		bit_put(live, m->rt[i], true);
	}
	return ret;
}

/* The L1 table and the L2 tables with the preallocated runs (marked in
 * `live`). buf: a cluster. */
static int write_tables(struct qk__file *f, const struct model *m, uint8_t *buf, uint8_t *live)
{
	uint64_t i, cs = m->cs, l2_entries = 1ull << m->l2_bits;
	size_t esize = (size_t)(cs >> m->l2_bits), r = 0;
	int ret = 0;
	if (m->l1_size > 0) {
		uint8_t *l1 = malloc((size_t)m->l1_size * 8);
		if (!l1)
			return qk__err(ENOMEM, "out of memory");
		for (i = 0; i < m->l1_size; i++)
			qk_put_be64(l1 + i * 8, m->l1[i] ? (m->l1[i] << m->cbits) | QCOW_OFLAG_COPIED : 0);
		ret = write_at(f, l1, m->l1_size * 8, m->l1_cluster << m->cbits);
		free(l1);
		for (i = 0; ret == 0 && i < div_round_up(m->l1_size * 8, cs); i++)
			bit_put(live, m->l1_cluster + i, true);
	}
	for (i = 0; ret == 0 && i < m->l1_size; i++) {
		if (m->l1[i] == 0)
			continue;
		memset(buf, 0, (size_t)cs);
		for (; r < m->nruns && m->runs[r].guest >> m->l2_bits == i; r++) {
			const struct run *run = &m->runs[r];
			for (uint64_t k = 0; k < run->n; k++) {
				uint64_t e = (run->guest + k) & (l2_entries - 1);
				qk_put_be64(buf + e * esize,
					    ((run->host + k) << m->cbits) | QCOW_OFLAG_COPIED);
			}
		}
		ret = write_at(f, buf, cs, m->l1[i] << m->cbits);
		bit_put(live, m->l1[i], true);
	}
	return ret;
}

/* Free clusters of moved refcount tables keep their last entries; every
 * other cluster this create wrote that nothing uses now is zeroed. */
static int write_leftovers(struct qk__file *f, const struct model *m, uint8_t *buf, uint8_t *live)
{
	uint64_t i, cs = m->cs, per = cs / 8;
	int ret = 0;
	for (size_t t = 0; ret == 0 && t < m->nold; t++) {
		const struct old_table *o = &m->old[t];
		for (i = 0; ret == 0 && i < div_round_up(o->size * 8, cs); i++) {
			uint64_t c = o->cluster + i;
			if (!bit_get(m->written, c) || bit_get(live, c) || get_rc(m, c))
				continue;
			for (uint64_t k = 0; k < per; k++)
				qk_put_be64(buf + k * 8, i * per + k < o->size ?
					    o->rt[i * per + k] << m->cbits : 0);
			ret = write_at(f, buf, cs, c << m->cbits);
			bit_put(live, c, true);
		}
	}
	memset(buf, 0, (size_t)cs);
	for (i = 0; ret == 0 && i < m->cap; i += 8) {
		uint8_t stale = m->written[i >> 3] & (uint8_t)~live[i >> 3];
		for (unsigned k = 0; ret == 0 && stale != 0; k++, stale >>= 1)
			if (stale & 1)
				ret = write_at(f, buf, cs, (i + k) << m->cbits);
	}
	if (ret == 0 && !m->data_file && m->tail_to > m->tail_from)
		ret = write_at(f, buf, m->tail_to - m->tail_from, m->tail_from);
	return ret;
}

static int write_image(struct qk__file *f, struct model *m, const uint8_t *header,
		       int prealloc)
{
	uint64_t cs = m->cs, fsize;
	uint8_t *buf = NULL, *live = NULL;
	int ret;

	if (m->prealloc_to > m->prealloc_from) {
		ret = qk__file_grow(f, m->prealloc_from, m->prealloc_to, prealloc);
		if (ret < 0)
			return ret;
	}
	buf = malloc((size_t)qk_max_u64(cs, m->rt_size * 8));
	live = calloc((size_t)(m->cap / 8), 1);
	if (!buf || !live) {
		ret = qk__err(ENOMEM, "out of memory");
		goto out;
	}
	ret = write_at(f, header, cs, 0);
	bit_put(live, 0, true);
	if (ret == 0)
		ret = write_refcounts(f, m, buf, live);
	if (ret == 0)
		ret = write_tables(f, m, buf, live);
	if (ret == 0)
		ret = write_leftovers(f, m, buf, live);
	if (ret == 0)
		ret = qk__file_get_size(f, &fsize);
	if (ret == 0 && fsize < m->file_end)
		ret = qk__file_grow(f, m->file_end, m->file_end, QK_PREALLOC_OFF);
	if (ret == 0)
		ret = qk__file_sync(f);
out:
	free(buf);
	free(live);
	return ret;
}

/*
 * The data file, created empty as QEMU does: without preallocation it is
 * grown to the virtual size; with it, the tail of the last cluster gets
 * zeros, then the file is grown to where the mapping ends with the mode
 * (metadata leaves it sparse).
 */
static int write_data_file(struct qk__file *f, const struct model *m,
			   uint64_t size, int prealloc)
{
	static const uint8_t zeros[4096];
	uint64_t len = 0;
	int ret = 0;

	if (prealloc == QK_PREALLOC_OFF) {
		ret = qk__file_grow(f, 0, size, QK_PREALLOC_OFF);
	} else {
		for (uint64_t off = m->tail_from; ret == 0 && off < m->tail_to; off += sizeof zeros)
			ret = write_at(f, zeros,
				       qk_min_u64(sizeof zeros, m->tail_to - off), off);
		len = m->tail_to;
		if (ret == 0 && m->grow_to > len)
			ret = qk__file_grow(f, len, m->grow_to,
					      prealloc == QK_PREALLOC_METADATA ?
					      QK_PREALLOC_OFF : prealloc);
	}
	if (ret == 0)
		ret = qk__file_sync(f);
	return ret;
}

/*
 * Create the QCOW2 image `path` (and its data file) from checked options.
 * Every check runs before a file is touched, and both files are locked
 * for writing before either is emptied (-EAGAIN, nothing changed, when
 * another process uses one); after that only I/O can fail, and then the
 * files created here are removed again. Returns 0 or a negative errno
 * (recorded).
 */
int qk__qcow2_create(const char *path, const struct qk_create_options *o)
{
	struct model m;
	uint8_t *header = NULL;
	char *data_path = NULL;
	int prealloc = QK_PREALLOC_OFF, ret;
	struct qk__file *f = NULL, *df = NULL;
	bool created = false, df_created = false;
	uint64_t size = 0, dev_a, ino_a;

	memset(&m, 0, sizeof m);
	if (o->backing_file && strcmp(o->backing_file, path) == 0)
		return qk__err(EINVAL, "Error: Trying to create an image with the same "
			       "filename as the backing file");
	ret = check_options(o, &size, &prealloc);
	if (ret < 0)
		return ret;
	m.cs = o->cluster_size;
	m.cbits = (uint32_t)__builtin_ctzll(m.cs);
	m.order = (uint32_t)__builtin_ctz(o->refcount_bits);
	m.rb_bits = m.cbits + 3 - m.order;
	m.l2_bits = m.cbits - (o->extended_l2 ? 4 : 3);
	m.data_file = o->data_file != NULL;

	header = malloc((size_t)m.cs);
	if (!header) {
		ret = qk__err(ENOMEM, "out of memory");
		goto out;
	}
	/* The header must fit in its cluster: first without the backing file
	 * (QEMU's first header write), then with it. */
	if (build_header(header, &m, o, size, false) < 0) {
		ret = qk__err(ENOSPC, "Could not update qcow2 header: %s", strerror(ENOSPC));
		goto out;
	}
	if (o->backing_file && strlen(o->backing_file) > MAX_BACKING_NAME) {
		ret = qk__err(EINVAL, "Could not assign backing file '%s' with format "
			      "'%s': %s", o->backing_file, o->backing_format,
			      strerror(EINVAL));
		goto out;
	}
	if (build_header(header, &m, o, size, true) < 0) {
		ret = qk__err(ENOSPC, "Could not assign backing file '%s' with format "
			      "'%s': %s", o->backing_file, o->backing_format,
			      strerror(ENOSPC));
		goto out;
	}

	ret = model_build(&m, size, prealloc, o->extended_l2);
	if (ret < 0)
		goto out;
	/* The offsets are final now. */
	build_header(header, &m, o, size, true);

	/* Both files are opened and locked before either changes. */
	ret = qk__file_create_posix(path, &created, &f);
	if (ret < 0) {
		f = NULL;
		goto out;
	}
	if (o->data_file) {
		struct stat st;

		data_path = qk__file_resolve(path, o->data_file);
		if (!data_path) {
			ret = qk__err(ENOMEM, "out of memory");
			goto out;
		}
		/* Before its lock, which would meet our own on the image. */
		if (stat(data_path, &st) == 0 && qk__file_identity(f, &dev_a, &ino_a) == 0 &&
		    (uint64_t)st.st_dev == dev_a && (uint64_t)st.st_ino == ino_a) {
			ret = qk__err(EINVAL, "The data file '%s' is the image itself",
				      o->data_file);
			goto out;
		}
		ret = qk__file_create_posix(data_path, &df_created, &df);
		if (ret < 0) {
			df = NULL;
			goto out;
		}
		ret = qk__file_set_size(df, 0);
		if (ret == 0)
			ret = write_data_file(df, &m, size, prealloc);
		if (ret < 0)
			goto out;
	}
	ret = qk__file_set_size(f, 0);
	if (ret == 0)
		ret = write_image(f, &m, header, prealloc);

out:
	/* A failure removes the files this call created, as QEMU does; files
	 * that were there stay. */
	if (df) {
		qk__file_close(df);
		if (ret < 0 && df_created)
			unlink(data_path);
	}
	if (f) {
		qk__file_close(f);
		if (ret < 0 && created)
			unlink(path);
	}
	free(data_path);
	free(header);
	model_free(&m);
	return ret;
}
