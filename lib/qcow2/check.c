/*
 * Reference accounting and refcount rebuild.
 *
 * Design: one pass over every structure that references host clusters
 * (header, active L1 and its L2 tables and data, snapshot table and every
 * snapshot's L1/L2/data, bitmap directory, tables and data) counts the
 * references per host cluster in an in-memory table sized by the file
 * (bounded: one byte per cluster of the file, see "Counts" below). A rebuild then writes a new
 * refcount structure (blocks first, then the table, all counting
 * themselves) past the end of the file, syncs it, and only then points the
 * header at it, so a crash at any moment leaves either the old structure
 * or the new one in force. The old structure's clusters are simply not
 * counted: they become free space. The COPIED flags of the active tables
 * are corrected from the counts first.
 */
#include "qcow2/qcow2.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

/* Bound on the in-memory counts (a byte each, plus up to a u32 for
 * clusters with many references): 256 MiB (at most 1 GiB) for a file of
 * 16 TiB with 64 KiB clusters. A larger (sparse) file is refused rather
 * than allowed to take the machine's memory. */
#define MAX_COUNTED_CLUSTERS (1ull << 28)
#define MAX_PAST_NOTED 65536     /* past-the-end clusters remembered */
#define STORED_CHUNK_SHIFT 16
#define STORED_CHUNK (1u << STORED_CHUNK_SHIFT)   /* stored refcounts read at once */

/*
 * Counts: one byte per host cluster, `cell`. Its low six bits count the
 * references up to CNT_BIG - 1; at CNT_BIG the count lives in `big`, a
 * u32 per cluster allocated in chunks of BIG_CHUNK clusters only where
 * some cluster needs it (snapshots sharing clusters many times over).
 * The two high bits mark who uses the cluster (META_USED, DATA_USED), to
 * find data mapped over metadata. A byte instead of a u32 per cluster is
 * what makes the count of a 1 TiB image fast: the table is touched once
 * per reference and fits in far fewer pages.
 */
#define CNT_MASK    0x3fu
#define CNT_BIG     0x3fu
#define META_USED   0x40u      /* a metadata structure uses it */
#define DATA_USED   0x80u      /* guest data uses it */
#define BIG_SHIFT   16
#define BIG_CHUNK   (1ull << BIG_SHIFT)

struct refs {
	uint8_t *cell;          /* per cluster: count and marks */
	size_t cell_bytes;      /* its mapping's length */
	uint32_t **big;         /* per BIG_CHUNK clusters: counts >= CNT_BIG */
	uint64_t n_big;         /* entries of big */
	uint64_t n;             /* clusters covered */
	uint64_t fsize;         /* bytes in the file */
	uint8_t *one;           /* bit per cluster: stored refcount is 1 */
	uint8_t *wide;          /* per STORED_CHUNK clusters: some stored
	                         * refcount is above 1 (else `one` holds them) */
	uint64_t n_whole;       /* whole chunks `wide` covers */
	uint64_t n_one;         /* clusters `one` covers */
	bool past_data;         /* an active data entry lies past the end */
	uint64_t *past;         /* clusters past the end that references name */
	size_t n_past;
	/* Check mode (qk_check): problems are counted and reported, and the
	 * walk goes on; otherwise the first one fails it. */
	struct qk_check_result *res;
	void (*report)(void *opaque, const char *line);
	void *opaque;
	bool needs_rebuild;     /* a referenced cluster has refcount 0 */
	uint64_t trunc_end;     /* end of the furthest table cut short by the
	                         * end of the file (0: none) */
	uint64_t *rt_saved;     /* the refcount table before unusable entries
	                         * were dropped for the pass */
	bool rt_saved_valid;
	/* Check mode: the active entries of data mapped over metadata or
	 * past the end of the file, to move. */
	struct { uint64_t l2_off, slot; } *movers;
	size_t n_movers;
	/* Forensic mode: per cluster, who references it (K_*), and where
	 * findings go. */
	uint8_t *kind;
	int (*found)(void *opaque, const struct qk_forensic_item *it);
	void *found_opaque;
};

#define K_ACTIVE    1u      /* data of the active image */
#define K_SNAP_DATA 2u      /* data of a snapshot */

/* The references counted for cluster c (c <= r->n). */
static inline uint64_t cnt_get(const struct refs *r, uint64_t c)
{
	uint32_t v = r->cell[c] & CNT_MASK;
	return v < CNT_BIG ? v : r->big[c >> BIG_SHIFT][c & (BIG_CHUNK - 1)];
}

/* As cnt_get, for any cluster: none are counted past r->n (references
 * past the end of the file). */
static inline uint64_t cnt_at(const struct refs *r, uint64_t c)
{
	return c <= r->n ? cnt_get(r, c) : 0;
}

/* Whether the counts of clusters c to c+7 (c a multiple of 8) equal their
 * stored refcounts when these are the bits of r->one: AGREE8_NO if some
 * count differs (or lives in `big`), else 1 + the index of the last of the
 * eight that is used, or 0 when none is. Eight clusters per few
 * instructions: what keeps check's comparison pass off the profile. */
#define AGREE8_NO 9u
static inline unsigned agree8(const struct refs *r, uint64_t c)
{
	uint64_t x;
	memcpy(&x, r->cell + c, sizeof x);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
	x = __builtin_bswap64(x);
#endif
	x &= 0x3f3f3f3f3f3f3f3full;
	if (x & ~0x0101010101010101ull)
		return AGREE8_NO;
	/* The low bit of byte k to bit k: no carries, every byte being 0 or 1. */
	unsigned counted = (unsigned)((x * 0x0102040810204080ull) >> 56);
	if (counted != r->one[c / 8])
		return AGREE8_NO;
	return counted ? 32u - (unsigned)__builtin_clz(counted) : 0;
}

/* Count one more reference to cluster c, used as `mark`: 0 or -ENOMEM. */
static int cnt_inc_slow(struct refs *r, uint64_t c, uint8_t mark)
{
	uint8_t v = r->cell[c];
	uint32_t **chunk = &r->big[c >> BIG_SHIFT];
	if (!*chunk && !(*chunk = calloc(BIG_CHUNK, sizeof **chunk)))
		return qk__err(ENOMEM, "out of memory for reference counts");
	uint32_t *b = &(*chunk)[c & (BIG_CHUNK - 1)];
	if ((v & CNT_MASK) < CNT_BIG)
		*b = (v & CNT_MASK);
	if (*b < UINT32_MAX)
		(*b)++;
	r->cell[c] = (uint8_t)(v | CNT_BIG | mark);
	return 0;
}

static inline int cnt_inc(struct refs *r, uint64_t c, uint8_t mark)
{
	uint8_t v = r->cell[c];
	if ((v & CNT_MASK) < CNT_BIG - 1) {
		r->cell[c] = (uint8_t)((v + 1) | mark);
		return 0;
	}
	return cnt_inc_slow(r, c, mark);
}

/* The counts' zeroed array of `bytes`, from the system directly and in
 * huge pages where the system offers them: a 1 TiB image's 16 MiB of
 * counts then costs eight page faults, not four thousand. */
static void *cells_alloc(size_t bytes)
{
	void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		return NULL;
#ifdef MADV_HUGEPAGE
	if (bytes >= (2u << 20))
		(void)madvise(p, bytes, MADV_HUGEPAGE);
#endif
	return p;
}

static void free_counts(struct refs *r)
{
	for (uint64_t i = 0; r->big && i < r->n_big; i++)
		free(r->big[i]);
	free(r->big);
	if (r->cell)
		munmap(r->cell, r->cell_bytes);
	r->big = NULL;
	r->cell = NULL;
	r->n_big = 0;
}

/* Forensic mode: note who references data cluster `host` at guest offset
 * `guest`, and report an active mapping whose refcount is 0. */
static int note_data(qk_image *img, struct refs *r, uint64_t host, uint64_t guest, bool active)
{
	struct qcow2 *q = qcow2_of(img);
	uint64_t c = host >> q->cluster_bits, rc;
	if (!r->kind || c > r->n)
		return 0;
	r->kind[c] |= active ? K_ACTIVE : K_SNAP_DATA;
	if (!active)
		return 0;
	int ret = qk__qcow2_get_refcount(img, c, &rc);
	if (ret < 0 || rc)
		return ret;
	struct qk_forensic_item it = { .kind = QK_FORENSIC_UNREFERENCED, .host = host,
				       .guest = guest, .refcount = 0, .length = q->cluster_size };
	return r->found(r->found_opaque, &it);
}

/* A problem found while counting: in check mode one corruption (reported,
 * and 0 returned: skip the item); otherwise the failure. */
static int problem(qk_image *img, struct refs *r, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
static int problem(qk_image *img, struct refs *r, const char *fmt, ...)
{
	char line[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(line, sizeof line, fmt, ap);
	va_end(ap);
	if (!r->res)
		return qk__qcow2_corrupt(img, "%s", line);
	r->res->corruptions++;
	if (r->report) {
		char out[540];
		snprintf(out, sizeof out, "ERROR %s", line);
		r->report(r->opaque, out);
	}
	return 0;
}

/* The names of references that add_ref tells apart (compared by address:
 * the hot path). */
static const char DATA_CLUSTER[] = "data cluster";
static const char COMPRESSED_CLUSTER[] = "compressed cluster";
static const char L2_TABLE[] = "L2 table";
static const char REFCOUNT_BLOCK[] = "refcount block";

/* Count one reference to every cluster meeting [off, off+len). */
static int add_ref(qk_image *img, struct refs *r, uint64_t off, uint64_t len, const char *what)
{
	struct qcow2 *q = qcow2_of(img);
	if (len == 0)
		return 0;
	uint64_t first = off >> q->cluster_bits, last = (off + len - 1) >> q->cluster_bits;
	if (off > MAX_HOST_OFFSET || off + len > MAX_HOST_OFFSET ||
	    (off + len > r->fsize && off + len - r->fsize >= q->cluster_size) || last > r->n) {
		/* Its refcounts past the end are not reported again. */
		for (uint64_t c = qk_max_u64(first, r->n + 1); r->res && c <= last &&
		     r->n_past < MAX_PAST_NOTED && off <= MAX_HOST_OFFSET; c++)
			r->past[r->n_past++] = c;
		return problem(img, r, "counting reference for region exceeding the end of the file "
			       "by one cluster or more: %s at offset 0x%llx size 0x%llx",
			       what, (unsigned long long)off, (unsigned long long)len);
	}
	uint8_t mark = what == DATA_CLUSTER || what == COMPRESSED_CLUSTER ? DATA_USED : META_USED;
	int ret = 0;
	if ((what == L2_TABLE || what == REFCOUNT_BLOCK) && off < r->fsize && off + len > r->fsize) {
		/* Readers see the part that is there and zeros after it (as
		 * QEMU does, which does not report it); -r all restores the
		 * table's full length. */
		r->trunc_end = qk_max_u64(r->trunc_end, off + len);
		ret = problem(img, r, "%s at offset 0x%llx is cut short by the end of the file "
			      "(%llu of %llu bytes present)", what, (unsigned long long)off,
			      (unsigned long long)(r->fsize - off), (unsigned long long)len);
		if (ret < 0)
			return ret;
	}
	for (uint64_t c = first; c <= last && ret == 0; c++)
		ret = cnt_inc(r, c, mark);
	return ret;
}

/* The checks of one L2 entry that do not depend on references (check
 * mode): compressed clusters with a subcluster bitmap or an external data
 * file; subclusters both allocated and zero; an unallocated entry with
 * allocated subclusters. Each is a corruption, as QEMU counts them. */
static int check_entry_bits(qk_image *img, struct refs *r, uint64_t e, uint64_t bm,
			    uint64_t guest)
{
	struct qcow2 *q = qcow2_of(img);
	unsigned long long g = (unsigned long long)guest;
	if (e & QCOW_OFLAG_COMPRESSED) {
		if (q->has_data_file)
			return problem(img, r, "compressed cluster at guest offset 0x%llx in an image "
				       "with an external data file", g);
		if (bm)
			return problem(img, r, "compressed cluster at guest offset 0x%llx has a non-zero "
				       "subcluster bitmap (0x%016llx)", g, (unsigned long long)bm);
		return 0;
	}
	if (!q->extl2)
		return 0;
	if ((bm >> 32) & bm & 0xffffffffull)
		return problem(img, r, "subclusters of guest offset 0x%llx are both allocated and "
			       "zero (bitmap 0x%016llx)", g, (unsigned long long)bm);
	if (!(e & L2E_OFFSET_MASK) && !q->has_data_file && (bm & 0xffffffffull))
		return problem(img, r, "unallocated cluster at guest offset 0x%llx has allocated "
			       "subclusters (bitmap 0x%016llx)", g, (unsigned long long)bm);
	return 0;
}

/* COPIED of an active data entry, judged by the stored refcount of its
 * cluster hc (< r->n) when the pre-pass did not find it to be 1 or the
 * flag is clear: a mismatch is one COPIED error. */
static int check_copied_entry(qk_image *img, struct refs *r, uint64_t e, uint64_t hc)
{
	uint64_t c = 1;
	int ret = 0;
	if (!((r->one[hc / 8] >> (hc % 8)) & 1))
		ret = qk__qcow2_get_refcount(img, hc, &c);
	if (ret == 0 && (c == 1) != !!(e & QCOW_OFLAG_COPIED)) {
		r->res->copied_errors++;
		ret = problem(img, r, "OFLAG_COPIED data cluster: l2_entry=%llx refcount=%llu",
			      (unsigned long long)e, (unsigned long long)c);
	}
	return ret;
}

/*
 * The table walker that check, rebuild and forensic share: walk_l1 goes
 * over one L1 table and its L2 tables (counting the references they hold as
 * tables) and hands each L2 entry to a callback, which counts what the
 * entry references and, in check mode, judges it. The walker and its caller
 * are inlined where each mode calls them with its own callback, so the
 * per-entry call is direct.
 */
/* What a walk knows for one L1 table. Callbacks get it by value: inlined
 * into the walker, its fields stay in registers across the stores into the
 * counts (which may alias anything, being bytes). */
struct walk {
	qk_image *img;
	struct refs *r;
	uint8_t *cell;          /* r->cell */
	const uint8_t *one;     /* r->one: check mode only */
	uint64_t n_one;         /* clusters `one` covers */
	uint64_t fsize, n;      /* r->fsize, r->n */
	unsigned cb;            /* cluster_bits */
	bool active;            /* the active L1 table (else a snapshot's) */
	bool plain;             /* no data file, no extended L2: the inline path applies */
};

/* Where a walk is, and the check's statistics of the L2 table at hand
 * (contiguity is counted per L2 table, as QEMU counts it). */
struct walk_pos {
	uint64_t first_guest;   /* guest offset of entry 0 of the table */
	uint64_t prev, alloc, frag, comp;
};

/* A callback: entry j (e, and its subcluster bitmap bm with extended L2)
 * of the L2 table at hand. 0, or a negative errno that ends the walk. */
typedef int (*walk_entry_fn)(const struct walk w, struct walk_pos *p, uint64_t j, uint64_t e,
			     uint64_t bm);

/* Count a data cluster at host offset `host` (aligned): the common case,
 * a cluster inside the file, inline. */
static inline __attribute__((always_inline)) int count_data(const struct walk w, uint64_t host)
{
	uint64_t hc = host >> w.cb;
	if (host + (1ull << w.cb) <= w.fsize && hc < w.n) {
		uint8_t v = w.cell[hc];
		if ((v & CNT_MASK) < CNT_BIG - 1) {
			w.cell[hc] = (uint8_t)((v + 1) | DATA_USED);
			return 0;
		}
		return cnt_inc_slow(w.r, hc, DATA_USED);
	}
	return add_ref(w.img, w.r, host, 1ull << w.cb, DATA_CLUSTER);
}

/* Count the bytes a compressed entry references. */
static int count_compressed(qk_image *img, struct refs *r, uint64_t e)
{
	struct qcow2 *q = qcow2_of(img);
	return add_ref(img, r, qk__qcow2_compressed_offset(q, e), qk__qcow2_compressed_size(q, e),
		       COMPRESSED_CLUSTER);
}

/* Rebuild's callback: count every reference the entry holds (a data file
 * holds the data of an image that has one: nothing to count there). */
static inline __attribute__((always_inline)) int count_entry(const struct walk w, struct walk_pos *p, uint64_t j, uint64_t e,
			      uint64_t bm)
{
	uint64_t host = e & L2E_OFFSET_MASK;
	(void)bm;
	if (e & QCOW_OFLAG_COMPRESSED)
		return count_compressed(w.img, w.r, e);
	if (!host || qcow2_of(w.img)->has_data_file)
		return 0;
	if (host & ((1ull << w.cb) - 1))
		return problem(w.img, w.r, "data cluster offset 0x%llx unaligned (guest offset 0x%llx)",
			       (unsigned long long)host,
			       (unsigned long long)(p->first_guest + (j << w.cb)));
	return count_data(w, host);
}

/* An allocated active cluster, for the check's statistics. */
static inline __attribute__((always_inline)) void count_stats(struct walk_pos *p, uint64_t host, uint64_t cs, bool compressed)
{
	p->alloc++;
	if (compressed) {
		p->comp++;
		p->frag++;
		return;
	}
	if (p->prev && host != p->prev + cs)
		p->frag++;
	p->prev = host;
}

/* COPIED of an active entry e of a data cluster hc inside the counts, when
 * the pre-pass did not find its refcount to be 1 or the flag is clear. */
static inline __attribute__((always_inline)) int judge_copied(const struct walk w, uint64_t e, uint64_t hc)
{
	if (!w.one || (((w.one[hc / 8] >> (hc % 8)) & 1) && (e & QCOW_OFLAG_COPIED)))
		return 0;
	return check_copied_entry(w.img, w.r, e, hc);
}

/* Judge and count any entry, as check does (the inline path of
 * check_entry takes plain data clusters inside the file). Problems are
 * reported and counted (check and forensic modes), and what they concern
 * is not counted. */
static int check_entry_slow(qk_image *img, struct refs *r, bool active, uint64_t guest,
			    uint64_t e, uint64_t bm, struct walk_pos *p)
{
	struct qcow2 *q = qcow2_of(img);
	uint64_t cs = q->cluster_size, host = e & L2E_OFFSET_MASK;
	unsigned long long g = (unsigned long long)guest;
	int ret = 0;
	if ((q->extl2 || (e & QCOW_OFLAG_COMPRESSED)) &&
	    (ret = check_entry_bits(img, r, e, bm, guest)) < 0)
		return ret;
	if (e & QCOW_OFLAG_COMPRESSED) {
		if (e & QCOW_OFLAG_COPIED)
			ret = problem(img, r, "compressed cluster at guest offset 0x%llx has the COPIED flag", g);
		if (ret == 0)
			ret = count_compressed(img, r, e);
		if (active)
			count_stats(p, 0, cs, true);
		return ret;
	}
	if (e & L2E_RESERVED_MASK)
		return problem(img, r, "L2 entry of guest offset 0x%llx (0x%016llx) has reserved bits set",
			       g, (unsigned long long)e);
	if (active && q->has_data_file && (host || (e & QCOW_OFLAG_COPIED)) && host != guest)
		return problem(img, r, "L2 entry of guest offset 0x%llx maps offset 0x%llx of the "
			       "external data file (it must map the guest offset)", g,
			       (unsigned long long)host);
	if (!host || q->has_data_file)
		return 0;
	if (host & (cs - 1))
		return problem(img, r, "data cluster offset 0x%llx unaligned (guest offset 0x%llx)",
			       (unsigned long long)host, g);
	if (active && host >= r->fsize)
		r->past_data = true;
	struct walk w = { .img = img, .r = r, .cell = r->cell, .one = r->one, .fsize = r->fsize,
			  .n = r->n, .cb = q->cluster_bits, .active = active };
	uint64_t hc = host >> q->cluster_bits;
	ret = count_data(w, host);
	if (ret == 0 && active && hc < r->n)
		ret = judge_copied(w, e, hc);
	if (active)
		count_stats(p, host, cs, false);
	return ret;
}

/* Check's callback: count, judge the entry, and for the active table the
 * COPIED flag and the statistics. A standard data cluster inside the file
 * (nearly every entry) takes the inline path. */
static inline __attribute__((always_inline)) int check_entry(const struct walk w, struct walk_pos *p, uint64_t j, uint64_t e,
			      uint64_t bm)
{
	uint64_t cs = 1ull << w.cb, host = e & L2E_OFFSET_MASK;
	const uint64_t fast_bad = QCOW_OFLAG_COMPRESSED | L2E_RESERVED_MASK | ((cs - 1) & L2E_OFFSET_MASK);
	if ((e & fast_bad) || !host || host + cs > w.fsize || !w.plain)
		return check_entry_slow(w.img, w.r, w.active, p->first_guest + (j << w.cb), e, bm, p);
	int ret = count_data(w, host);
	if (ret == 0 && w.active)
		ret = judge_copied(w, e, host >> w.cb);
	if (w.active)
		count_stats(p, host, cs, false);
	return ret;
}

/*
 * Check's fast path for eight entries of the active table (a plain image):
 * when each maps, with COPIED its only flag, the cluster after the one
 * before, all inside the file, each counted fewer than CNT_BIG - 1 times
 * so far and stored with refcount 1 (the fully allocated image's every
 * entry), count and judge the eight at once and return true. Else change
 * nothing and return false: check_entry takes them one by one. The cell
 * arithmetic works on each byte alone, so byte order does not matter.
 */
static inline __attribute__((always_inline)) bool check_run8(const struct walk w, struct walk_pos *p,
							     const uint64_t *e)
{
	uint64_t cs = 1ull << w.cb, host = e[0] & L2E_OFFSET_MASK, hc = host >> w.cb;
	if (e[0] != (host | QCOW_OFLAG_COPIED) || !host || (host & (cs - 1)) ||
	    host + 8 * cs > w.fsize || hc + 8 > w.n || hc + 8 > w.n_one)
		return false;
	for (unsigned k = 1; k < 8; k++)
		if (e[k] != e[0] + k * cs)
			return false;
	unsigned bits = w.one[hc / 8];
	if (hc % 8)
		bits = (bits | (unsigned)w.one[hc / 8 + 1] << 8) >> (hc % 8);
	if ((bits & 0xff) != 0xff)
		return false;
	const uint64_t count = 0x3f3f3f3f3f3f3f3full, each = 0x0101010101010101ull;
	uint64_t x;
	memcpy(&x, w.cell + hc, sizeof x);
	if (((x & count) + 2 * each) & 0x4040404040404040ull)
		return false;
	x = ((x & count) + each) | (x & ~count) | (each * DATA_USED);
	memcpy(w.cell + hc, &x, sizeof x);
	p->alloc += 8;
	if (p->prev && host != p->prev + cs)
		p->frag++;
	p->prev = host + 7 * cs;
	return true;
}

/* Forensic's callback: judge and count as check does, and note who
 * references the data. */
static int forensic_entry(const struct walk w, struct walk_pos *p, uint64_t j, uint64_t e,
			  uint64_t bm)
{
	struct qcow2 *q = qcow2_of(w.img);
	uint64_t guest = p->first_guest + (j << w.cb), host = e & L2E_OFFSET_MASK;
	int ret = check_entry_slow(w.img, w.r, w.active, guest, e, bm, p);
	if (ret < 0)
		return ret;
	if (e & QCOW_OFLAG_COMPRESSED)      /* always counted */
		return note_data(w.img, w.r, qk__qcow2_compressed_offset(q, e) & ~(q->cluster_size - 1),
				 guest, w.active);
	if (host && !q->has_data_file && !(host & (q->cluster_size - 1)) && !(e & L2E_RESERVED_MASK))
		return note_data(w.img, w.r, host, guest, w.active);
	return 0;                           /* nothing counted: nothing to note */
}

/* Read the L1 table of l1_size entries at l1_off into *out (host order,
 * malloc'd): a snapshot's, whose offset and size were not checked at open. */
static int read_l1(qk_image *img, uint64_t l1_off, uint32_t l1_size, uint64_t **out)
{
	struct qcow2 *q = qcow2_of(img);
	if ((uint64_t)l1_size * 8 > MAX_L1_BYTES || (l1_off & (q->cluster_size - 1)))
		return qk__qcow2_corrupt(img, "snapshot L1 table at 0x%llx is invalid",
					 (unsigned long long)l1_off);
	uint64_t *l1 = malloc((uint64_t)l1_size * 8 + 8);
	if (!l1)
		return qk__err(ENOMEM, "out of memory");
	int ret = qk__file_pread(img->file, l1, (uint64_t)l1_size * 8, l1_off);
	if (ret < 0) {
		free(l1);
		return ret;
	}
	qk_be64_table_to_host(l1, l1_size);
	*out = l1;
	return 0;
}

/* The L2 table that L1 entry i names, judged (check mode reports the
 * problems and goes on): its offset, or 0 when there is none to walk. */
static uint64_t l2_to_walk(qk_image *img, struct refs *r, uint32_t i, uint64_t l1e, int *ret)
{
	struct qcow2 *q = qcow2_of(img);
	uint64_t l2_off = l1e & L1E_OFFSET_MASK;
	if (r->res && (l1e & L1E_RESERVED_MASK))
		*ret = problem(img, r, "L1 entry %u (0x%016llx) has reserved bits set", i,
			       (unsigned long long)l1e);
	if (!l2_off || *ret < 0)
		return 0;
	if (l2_off & (q->cluster_size - 1)) {
		*ret = problem(img, r, "L2 table offset 0x%llx unaligned (L1 index %u)",
			       (unsigned long long)l2_off, i);
		return 0;
	}
	if (r->res && (l2_off >> q->cluster_bits) >= r->n) {
		*ret = problem(img, r, "L2 table at offset 0x%llx lies past the end of the file",
			       (unsigned long long)l2_off);
		return 0;
	}
	return l2_off;
}

/* Walk an L1 table (l1_mem, or read from l1_off for a snapshot), count
 * the references of the L1 and its L2 tables, and hand each L2 entry of
 * the guest range to fn. */
static inline __attribute__((always_inline)) int
walk_l1(qk_image *img, struct refs *r, uint64_t l1_off, uint32_t l1_size, const uint64_t *l1_mem,
	walk_entry_fn fn)
{
	struct qcow2 *q = qcow2_of(img);
	uint64_t cs = q->cluster_size, entries = 1ull << q->l2_bits;
	const uint64_t *l1 = l1_mem;
	uint64_t *own = NULL, *l2 = NULL;
	int ret = add_ref(img, r, l1_off, (uint64_t)l1_size * 8, "L1 table");
	if (ret == 0 && !l1 && (ret = read_l1(img, l1_off, l1_size, &own)) == 0)
		l1 = own;
	if (ret == 0 && !(l2 = malloc(cs)))
		ret = qk__err(ENOMEM, "out of memory");
	const struct walk w = { .img = img, .r = r, .cell = r->cell, .one = r->one, .n_one = r->n_one,
				.fsize = r->fsize,
				.n = r->n, .cb = q->cluster_bits, .active = l1_mem != NULL,
				.plain = !q->has_data_file && !q->extl2 };
	const bool fast = fn == check_entry && w.active && w.plain && w.one;
	struct walk_pos p;
	for (uint32_t i = 0; i < l1_size && ret == 0; i++) {
		uint64_t l2_off = l2_to_walk(img, r, i, l1[i], &ret);
		if (!l2_off)
			continue;
		ret = add_ref(img, r, l2_off, cs, L2_TABLE);
		if (ret == 0)
			ret = qk__file_pread(img->file, l2, cs, l2_off);
		if (ret < 0)
			break;
		/* Check's fast path reads the entries in its own loop. */
		if (!fast)
			qk_be64_table_to_host(l2, cs / 8);
		memset(&p, 0, sizeof p);
		p.first_guest = ((uint64_t)i << q->l2_bits) << q->cluster_bits;
		uint64_t jmax = entries;
		if (w.active)
			jmax = p.first_guest >= img->size ? 0 :
			       qk_min_u64(entries, ((img->size - p.first_guest) + cs - 1) >> q->cluster_bits);
		if (q->extl2)
			for (uint64_t j = 0; j < jmax && ret == 0; j++)
				ret = fn(w, &p, j, l2[2 * j], l2[2 * j + 1]);
		else if (fast) {
			uint64_t j = 0, e[8];
			for (; j + 8 <= jmax && ret == 0; j += 8) {
				for (unsigned k = 0; k < 8; k++)
					e[k] = qk_be64(&l2[j + k]);
				if (!check_run8(w, &p, e))
					for (unsigned k = 0; k < 8 && ret == 0; k++)
						ret = fn(w, &p, j + k, e[k], 0);
			}
			for (; j < jmax && ret == 0; j++)
				ret = fn(w, &p, j, qk_be64(&l2[j]), 0);
		} else
			for (uint64_t j = 0; j < jmax && ret == 0; j++)
				ret = fn(w, &p, j, l2[j], 0);
		if (r->res) {
			r->res->allocated_clusters += p.alloc;
			r->res->fragmented_clusters += p.frag;
			r->res->compressed_clusters += p.comp;
		}
	}
	free(l2);
	free(own);
	return ret;
}

static void say(struct refs *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Bitmap directory, tables and data clusters. In check mode, a bitmap
 * left in use (no handle of ours keeps it) is reported and counted apart:
 * the metadata is sound, only its bits may miss changes (a crash leaves
 * that by design, and QEMU's check says nothing). */
static int count_bitmaps(qk_image *img, struct refs *r)
{
	struct qcow2 *q = qcow2_of(img);
	int ret = add_ref(img, r, q->bitmap_dir_offset, q->bitmap_dir_size, "bitmap directory");
	for (uint32_t i = 0; ret == 0 && i < q->n_bitmaps; i++) {
		const struct qk_bitmap *b = &q->bitmaps[i];
		if (r->res && !r->kind && qk__qcow2_bitmap_inconsistent(q, i)) {
			r->res->stale_bitmaps++;
			say(r, "Warning: bitmap '%s' was left in use by a program that did not close the "
			    "image: it is inconsistent, its bits may miss changes (-r all removes it)",
			    b->name);
		}
		uint64_t bytes = (uint64_t)b->table_size * 8;
		if (bytes > (512ull << 20) || (b->table_offset & (q->cluster_size - 1)))
			return qk__qcow2_corrupt(img, "bitmap table of '%s' is invalid", b->name);
		ret = add_ref(img, r, b->table_offset, bytes, "bitmap table");
		if (ret < 0 || !bytes)
			break;
		uint64_t *t = malloc(bytes);
		if (!t)
			return qk__err(ENOMEM, "out of memory");
		ret = qk__file_pread(img->file, t, bytes, b->table_offset);
		for (uint64_t j = 0; ret == 0 && j < b->table_size; j++) {
			uint64_t off = qk_be64(&t[j]) & L2E_OFFSET_MASK;
			if (off)
				ret = add_ref(img, r, off, q->cluster_size, "bitmap data");
		}
		free(t);
	}
	return ret;
}

/* Count every reference in the image except the refcount structure's own,
 * each L2 entry through fn. */
static inline __attribute__((always_inline)) int
count_references(qk_image *img, struct refs *r, walk_entry_fn fn)
{
	struct qcow2 *q = qcow2_of(img);
	uint64_t fsize;
	int ret = qk__file_get_size(img->file, &fsize);
	if (ret < 0)
		return ret;
	r->n = (fsize + q->cluster_size - 1) >> q->cluster_bits;
	if (r->n > MAX_COUNTED_CLUSTERS)
		return qk__err(EFBIG, "'%s' is too large to count its references", img->filename);
	/* One slot more: a reference may run less than a cluster past the
	 * end of the file (QEMU counts it there; a cluster or more past the
	 * end is a corruption instead, see add_ref). */
	r->fsize = fsize;
	if (r->res && !(r->past = malloc(MAX_PAST_NOTED * sizeof *r->past)))
		return qk__err(ENOMEM, "out of memory");
	r->cell_bytes = r->n + 1;
	r->cell = cells_alloc(r->cell_bytes);
	r->n_big = ((r->n + 1) >> BIG_SHIFT) + 1;
	if (r->cell)
		r->big = calloc(r->n_big, sizeof *r->big);
	if (!r->cell || !r->big)
		return qk__err(ENOMEM, "out of memory for %llu cluster counts", (unsigned long long)r->n);
	ret = add_ref(img, r, 0, q->cluster_size, "header");
	if (ret == 0 && r->res && q->has_data_file && q->nb_snapshots)
		ret = problem(img, r, "%u internal snapshots in an image with an external data file",
			      q->nb_snapshots);
	if (ret == 0)
		ret = walk_l1(img, r, q->l1_offset, q->l1_size, q->l1, fn);
	if (ret == 0 && q->nb_snapshots)
		ret = add_ref(img, r, q->snapshots_offset, q->snapshots_bytes, "snapshot table");
	for (uint32_t i = 0; ret == 0 && i < q->n_snapshots; i++)
		ret = walk_l1(img, r, q->snapshots[i].l1_table_offset, q->snapshots[i].l1_size, NULL, fn);
	if (ret == 0 && q->n_bitmaps)
		ret = count_bitmaps(img, r);
	return ret;
}

/* After counting: the slot past the end of the file joins when used. */
static void take_tail(struct refs *r)
{
	if (cnt_get(r, r->n))
		r->n++;
}

/* Set the COPIED flags of the active L1 and L2 tables from the counts. */
static int fix_copied(qk_image *img, const struct refs *r)
{
	struct qcow2 *q = qcow2_of(img);
	uint64_t cs = q->cluster_size, entries = 1ull << q->l2_bits;
	for (uint32_t i = 0; i < q->l1_size; i++) {
		uint64_t l2_off = q->l1[i] & L1E_OFFSET_MASK;
		if (!l2_off)
			continue;
		bool l1_copied = cnt_at(r, l2_off >> q->cluster_bits) == 1;
		uint64_t *t;
		int ret = qk__cache_get(&q->l2_cache, l2_off, (void **)&t);
		if (ret < 0)
			return ret;
		bool dirty = false;
		for (uint64_t j = 0; j < entries; j++) {
			uint64_t *e = &t[q->extl2 ? 2 * j : j];
			uint64_t host = *e & L2E_OFFSET_MASK;
			if (*e & QCOW_OFLAG_COMPRESSED)
				continue;
			bool want;
			if (q->has_data_file)
				want = host || (*e & QCOW_OFLAG_COPIED);
			else
				want = host && cnt_at(r, host >> q->cluster_bits) == 1;
			if (want != !!(*e & QCOW_OFLAG_COPIED)) {
				*e ^= QCOW_OFLAG_COPIED;
				dirty = true;
			}
		}
		if (dirty)
			qk__cache_mark_dirty(&q->l2_cache, l2_off);
		qk__cache_put(&q->l2_cache, l2_off);
		if (l1_copied != !!(q->l1[i] & QCOW_OFLAG_COPIED)) {
			q->l1[i] ^= QCOW_OFLAG_COPIED;
			uint8_t be[8];
			qk_put_be64(be, q->l1[i]);
			ret = qk__file_pwrite(img->file, be, 8, q->l1_offset + 8 * (uint64_t)i);
			if (ret < 0)
				return ret;
		}
	}
	(void)cs;
	return qk__cache_flush(&q->l2_cache);
}

int qk__qcow2_rebuild_refcounts(qk_image *img)
{
	struct qcow2 *q = qcow2_of(img);
	struct refs r = { 0 };
	uint64_t cs = q->cluster_size;
	uint32_t order = q->refcount_order;
	uint64_t epb = cs * 8 >> order;
	uint64_t max = order == 6 ? UINT64_MAX : (1ull << (1u << order)) - 1;
	uint8_t *blk = NULL;
	uint64_t *table = NULL;
	int ret = count_references(img, &r, count_entry);
	if (ret < 0)
		goto out;
	take_tail(&r);
	/* Before anything is written: a count the width cannot hold is a
	 * refusal that leaves the image as it was. */
	for (uint64_t c = 0; c < r.n; c++)
		if (cnt_get(&r, c) > max) {
			ret = qk__qcow2_corrupt(img, "cluster at 0x%llx has %llu references, more than %u-bit refcounts hold",
						(unsigned long long)(c * cs), (unsigned long long)cnt_get(&r, c),
						1u << order);
			goto out;
		}
	if ((ret = fix_copied(img, &r)) < 0)
		goto out;
	/* New blocks and table past everything in use, counting themselves. */
	/* ...and past any cluster a (corrupt) table entry names beyond the end
	 * of the file, so no such entry comes to point at the new structure. */
	uint64_t area = r.n, blocks = 0, tc = 0, hit;
	for (;;) {
		for (int iter = 0; iter < 64; iter++) {
			uint64_t total = area + blocks + tc;
			uint64_t nb = (total + epb - 1) / epb, ntc = (nb * 8 + cs - 1) / cs;
			if (nb == blocks && ntc == tc)
				break;
			blocks = nb;
			tc = ntc;
		}
		if (((area + blocks + tc) << q->cluster_bits) > MAX_HOST_OFFSET)
			break;          /* refused below */
		ret = qk__qcow2_meta_find(img, area, blocks + tc, &hit);
		if (ret < 0)
			goto out;
		if (ret == 0)
			break;
		area = hit + 1;
	}
	if (tc * cs > MAX_REFTABLE_BYTES || ((area + blocks + tc) << q->cluster_bits) > MAX_HOST_OFFSET) {
		ret = qk__err(EFBIG, "'%s' is too large for a new refcount table", img->filename);
		goto out;
	}
	blk = malloc(cs);
	table = calloc(tc, cs);
	if (!blk || !table) {
		ret = qk__err(ENOMEM, "out of memory rebuilding refcounts");
		goto out;
	}
	uint64_t total = area + blocks + tc;
	for (uint64_t b = 0; b < blocks && ret == 0; b++) {
		memset(blk, 0, cs);
		for (uint64_t i = 0; i < epb; i++) {
			uint64_t c = b * epb + i, v;
			if (c >= total)
				break;
			/* counted clusters; the gap skipped past clusters a corrupt
			 * entry names (free); the new structure itself */
			v = c < r.n ? cnt_get(&r, c) : c < area ? 0 : 1;
			if (!v)
				continue;
			switch (order) {
			case 0: case 1: case 2: {
				uint32_t bits = 1u << order, per = 8 / bits;
				blk[i / per] |= (uint8_t)(v << (bits * (i % per)));
				break;
			}
			case 3: blk[i] = (uint8_t)v; break;
			case 4: qk_put_be16(blk + 2 * i, (uint16_t)v); break;
			case 5: qk_put_be32(blk + 4 * i, (uint32_t)v); break;
			default: qk_put_be64(blk + 8 * i, v); break;
			}
		}
		uint64_t boff = (area + b) * cs;
		qk_put_be64(&table[b], boff);
		ret = qk__file_pwrite(img->file, blk, cs, boff);
	}
	if (ret == 0)
		ret = qk__qcow2_write_durable(img, (area + blocks) * cs, table, tc * cs);
	if (ret < 0)
		goto out;
	uint8_t hdr[12];
	qk_put_be64(hdr, (area + blocks) * cs);
	qk_put_be32(hdr + 8, (uint32_t)tc);
	ret = qk__qcow2_write_durable(img, HDR_RT_OFFSET, hdr, sizeof hdr);
	if (ret < 0)
		goto out;
	/* Switch the in-memory view to the new structure (and the metadata
	 * map with it: the old blocks are free space now). */
	qk__qcow2_free_refcounts(q);
	qk__qcow2_meta_invalidate(img);
	q->rt_offset = (area + blocks) * cs;
	q->rt_clusters = (uint32_t)tc;
	q->file_size = total * cs;
	q->free_hint = 1;
out:
	free_counts(&r);
	free(blk);
	free(table);
	return ret;
}

/* ---- qk_check ------------------------------------------------------------------ */

static void say(struct refs *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void say(struct refs *r, const char *fmt, ...)
{
	if (!r->report)
		return;
	char line[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(line, sizeof line, fmt, ap);
	va_end(ap);
	r->report(r->opaque, line);
}

/* The refcount structure's own clusters, judged as QEMU judges them: an
 * entry with reserved bits set is a corruption and does not count as a
 * reference (its block is still read, the bits masked off, as QEMU reads
 * it); a block that is unaligned or outside the file is a corruption and
 * its refcounts are taken as 0 from then on; a block whose cluster is
 * used by anything else is one too. Each needs a rebuild. */
static int count_refcount_structure(qk_image *img, struct refs *r)
{
	struct qcow2 *q = qcow2_of(img);
	int ret = add_ref(img, r, q->rt_offset, (uint64_t)q->rt_clusters * q->cluster_size,
			  "refcount table");
	for (uint64_t i = 0; ret == 0 && i < q->rt_entries; i++) {
		uint64_t b = q->rt[i] & ~RT_RESERVED_MASK, c = b >> q->cluster_bits;
		unsigned long long ii = (unsigned long long)i;
		if (!q->rt[i])
			continue;
		bool usable = !(b & (q->cluster_size - 1)) && c < r->n;
		if (q->rt[i] & RT_RESERVED_MASK) {
			ret = problem(img, r, "refcount table entry %llu has reserved bits set", ii);
		} else if (b & (q->cluster_size - 1)) {
			ret = problem(img, r, "refcount block %llu is not cluster aligned; refcount table "
				      "entry corrupted", ii);
		} else if (c >= r->n) {
			ret = problem(img, r, "refcount block %llu is outside image", ii);
		} else {
			ret = add_ref(img, r, b, q->cluster_size, REFCOUNT_BLOCK);
			if (ret == 0 && cnt_get(r, c) != 1) {
				r->needs_rebuild = true;
				ret = problem(img, r, "refcount block %llu refcount=%llu", ii,
					      (unsigned long long)cnt_get(r, c));
			}
			continue;
		}
		r->needs_rebuild = true;
		if (!usable) {
			/* Not read again during this pass; the table itself is
			 * given back afterwards (restore_reftable): the entry still
			 * names that cluster, which writers must keep off. */
			if (!r->rt_saved && !(r->rt_saved = malloc(q->rt_entries * sizeof *q->rt)))
				return qk__err(ENOMEM, "out of memory");
			if (!r->rt_saved_valid) {
				memcpy(r->rt_saved, q->rt, q->rt_entries * sizeof *q->rt);
				r->rt_saved_valid = true;
			}
			q->rt[i] = 0;
		}
	}
	return ret;
}

/* Remember an active L2 entry that -r all must give a cluster of its own. */
static int add_mover(struct refs *r, uint64_t l2_off, uint64_t slot)
{
	void *grown = realloc(r->movers, (r->n_movers + 1) * sizeof *r->movers);
	if (!grown)
		return qk__err(ENOMEM, "out of memory");
	r->movers = grown;
	r->movers[r->n_movers].l2_off = l2_off;
	r->movers[r->n_movers].slot = slot;
	r->n_movers++;
	return 0;
}

/* COPIED must be set exactly on the active entries whose cluster's stored
 * refcount is 1 (as QEMU checks it: a wrong count shows up twice). */
static int check_copied(qk_image *img, struct refs *r)
{
	struct qcow2 *q = qcow2_of(img);
	uint64_t entries = 1ull << q->l2_bits;
	int ret = 0;
	/* Data over metadata, or past the end of the file: found per entry
	 * only when the counts say some exist (rare), for the report and for
	 * -r all, which moves them. */
	bool walk = r->past_data;
	uint64_t at = 0;
	_Static_assert(META_USED << 1 == DATA_USED, "the marks are adjacent bits");
	for (; !walk && at + 8 <= r->n; at += 8) {
		/* Eight cells at a time: META_USED shifted onto DATA_USED. */
		uint64_t x;
		memcpy(&x, r->cell + at, sizeof x);
		walk = (x & (x << 1) & (0x0101010101010101ull * DATA_USED)) != 0;
	}
	for (; !walk && at < r->n; at++)
		walk = (r->cell[at] & (META_USED | DATA_USED)) == (META_USED | DATA_USED);
	for (uint32_t i = 0; ret == 0 && i < q->l1_size; i++) {
		uint64_t l2_off = q->l1[i] & L1E_OFFSET_MASK;
		if (!l2_off || (l2_off & (q->cluster_size - 1)) || (l2_off >> q->cluster_bits) >= r->n)
			continue;
		uint64_t refs;
		if ((ret = qk__qcow2_get_refcount(img, l2_off >> q->cluster_bits, &refs)) < 0)
			break;
		if ((refs == 1) != !!(q->l1[i] & QCOW_OFLAG_COPIED)) {
			r->res->copied_errors++;
			ret = problem(img, r, "OFLAG_COPIED L2 cluster: l1_index=%u l1_entry=%llx refcount=%llu",
				      i, (unsigned long long)q->l1[i], (unsigned long long)refs);
		}
		uint64_t *t;
		if (ret < 0 || !walk)
			continue;
		if ((ret = qk__cache_get(&q->l2_cache, l2_off, (void **)&t)) < 0)
			break;
		for (uint64_t j = 0; ret == 0 && j < entries; j++) {
			uint64_t e = t[q->extl2 ? 2 * j : j], host = e & L2E_OFFSET_MASK;
			if ((e & QCOW_OFLAG_COMPRESSED) || !host || q->has_data_file ||
			    (host & (q->cluster_size - 1)))
				continue;
			if (host >= r->fsize) {
				/* Past the end of the file (counted as a corruption
				 * already): it reads as zeros; -r all gives it a
				 * cluster of its own that does too. */
				ret = add_mover(r, l2_off, q->extl2 ? 2 * j : j);
				continue;
			}
			uint64_t hc = host >> q->cluster_bits;
			if (hc >= r->n || !(r->cell[hc] & META_USED))
				continue;
			/* Data mapped over metadata: QEMU cannot see this one. A
			 * corruption of its own unless the refcount already
			 * disagrees (then it is counted there). */
			uint64_t c;
			if ((ret = qk__qcow2_get_refcount(img, hc, &c)) < 0)
				break;
			r->res->overlaps++;
			if (c >= cnt_get(r, hc))
				r->res->corruptions++;
			say(r, "ERROR data cluster at guest offset 0x%llx overlaps metadata at host "
			    "offset 0x%llx", (unsigned long long)((((uint64_t)i << q->l2_bits) + j)
								 << q->cluster_bits),
			    (unsigned long long)host);
			ret = add_mover(r, l2_off, q->extl2 ? 2 * j : j);
		}
		qk__cache_put(&q->l2_cache, l2_off);
	}
	return ret;
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

#define PAST_EOF_SCAN_MAX (1ull << 26)  /* refcount entries examined past EOF */

/*
 * Refcounts of clusters past the end of the file that no reference names
 * (QEMU does not look). Nothing is stored there, so such a count is a
 * leak: what a crash leaves when a refcount reached the disk before the
 * write that was to extend the file. Counted into res (check), or with
 * `fix` dropped to 0. Bounded: a scan cut short is a check error. r->past
 * is sorted.
 */
static int past_eof_refcounts(qk_image *img, struct refs *r, struct qk_check_result *res, bool fix)
{
	struct qcow2 *q = qcow2_of(img);
	uint32_t eb = q->cluster_bits + 3 - q->refcount_order;
	uint64_t scanned = 0;
	int ret = 0;
	for (uint64_t i = r->n >> eb; i < q->rt_entries && scanned < PAST_EOF_SCAN_MAX; i++) {
		if (!q->rt[i])
			continue;
		for (uint64_t c = qk_max_u64(i << eb, r->n); c < (i + 1) << eb && scanned < PAST_EOF_SCAN_MAX;
		     c++, scanned++) {
			uint64_t stored;
			if ((ret = qk__qcow2_get_refcount(img, c, &stored)) < 0)
				return ret;
			if (!stored || bsearch(&c, r->past, r->n_past, sizeof *r->past, cmp_u64))
				continue;
			if (fix) {
				/* In one step: the count may be 2^63. */
				ret = qk__qcow2_set_refcount(img, c, 0);
				if (ret < 0)
					return ret;
				continue;
			}
			res->leaks++;
			res->refcounts_past_eof++;
			say(r, "Leaked cluster %llu refcount=%llu reference=0 (past the end of the file)",
			    (unsigned long long)c, (unsigned long long)stored);
		}
	}
	if (scanned >= PAST_EOF_SCAN_MAX && res)
		res->check_errors++;
	return 0;
}

/* Give back the refcount table entries a pass dropped (see
 * count_refcount_structure). */
static void restore_reftable(qk_image *img, struct refs *r)
{
	struct qcow2 *q = qcow2_of(img);
	if (r->rt_saved_valid && q->rt)
		memcpy(q->rt, r->rt_saved, q->rt_entries * sizeof *q->rt);
	free(r->rt_saved);
	r->rt_saved = NULL;
	r->rt_saved_valid = false;
}

static int check_pass_body(qk_image *img, struct qk_check_result *res,
			   void (*report)(void *, const char *), void *opaque, struct refs *r);

/* One check pass; no repairs. The in-memory refcount table is as before. */
static int check_pass(qk_image *img, struct qk_check_result *res,
		      void (*report)(void *, const char *), void *opaque, struct refs *r)
{
	int ret = check_pass_body(img, res, report, opaque, r);
	restore_reftable(img, r);
	return ret;
}

static int check_pass_body(qk_image *img, struct qk_check_result *res,
			   void (*report)(void *, const char *), void *opaque, struct refs *r)
{
	struct qcow2 *q = qcow2_of(img);
	uint64_t cs = q->cluster_size;
	memset(r, 0, sizeof *r);
	r->res = res;
	r->report = report;
	r->opaque = opaque;
	res->total_clusters = (img->size + cs - 1) >> q->cluster_bits;
	int ret = q->rt ? 0 : qk__qcow2_get_refcount(img, 0, &(uint64_t){ 0 });
	if (ret < 0)
		return ret;
	{
		/* Which clusters have refcount 1, for the COPIED checks made
		 * while counting, and which chunks hold no refcount above 1
		 * (there `one` says every stored count). */
		uint64_t fsize, n;
		ret = qk__file_get_size(img->file, &fsize);
		n = (fsize + cs - 1) >> q->cluster_bits;
		if (ret == 0 && n > MAX_COUNTED_CLUSTERS)
			ret = qk__err(EFBIG, "'%s' is too large to count its references", img->filename);
		if (ret == 0 && (!(r->one = calloc(n / 8 + 1, 1)) ||
				 !(r->wide = calloc(n / STORED_CHUNK + 1, 1))))
			ret = qk__err(ENOMEM, "out of memory");
		if (ret == 0)
			ret = qk__qcow2_refcount_ones(img, n, r->one, r->wide, STORED_CHUNK_SHIFT);
		r->n_whole = n / STORED_CHUNK;
		r->n_one = n;
		if (ret < 0)
			return ret;
	}
	ret = count_references(img, r, check_entry);
	if (ret == 0)
		ret = count_refcount_structure(img, r);
	if (ret == 0)
		take_tail(r);
	if (ret < 0)
		return ret;
	uint64_t last_used = 0;
	uint64_t *st = malloc(STORED_CHUNK * sizeof *st);
	if (!st)
		return qk__err(ENOMEM, "out of memory");
	bool known = false;     /* `one` holds the chunk's stored refcounts: st is not read */
	for (uint64_t c = 0; c < r->n; c++) {
		if (c % STORED_CHUNK == 0) {
			uint64_t k = qk_min_u64(STORED_CHUNK, r->n - c);
			known = c / STORED_CHUNK < r->n_whole && !r->wide[c / STORED_CHUNK] &&
				k == STORED_CHUNK;
			if (known) {
				/* Eight clusters at a time while each count equals
				 * its stored 0 or 1 (the sound image's every cluster). */
				uint64_t end = c + STORED_CHUNK, used;
				while (c < end && (used = agree8(r, c)) != AGREE8_NO) {
					if (used)
						last_used = c + used;
					c += 8;
				}
				if (c == end) {
					c--;
					continue;
				}
			} else if ((ret = qk__qcow2_get_refcounts(img, c, k, st)) < 0) {
				free(st);
				return ret;
			}
		}
		uint64_t stored = known ? (r->one[c / 8] >> (c % 8)) & 1 : st[c % STORED_CHUNK];
		uint64_t refs = cnt_get(r, c);
		if (stored || refs)
			last_used = c + 1;
		if (stored > refs) {
			res->leaks++;
			say(r, "Leaked cluster %llu refcount=%llu reference=%llu", (unsigned long long)c,
			    (unsigned long long)stored, (unsigned long long)refs);
		} else if (stored < refs) {
			if (stored == 0)
				r->needs_rebuild = true;
			res->corruptions++;
			say(r, "ERROR cluster %llu refcount=%llu reference=%llu", (unsigned long long)c,
			    (unsigned long long)stored, (unsigned long long)refs);
		}
	}
	free(st);
	/* COPIED flags, judged by the stored refcounts just read. */
	if ((ret = check_copied(img, r)) < 0)
		return ret;
	if (r->n_past)
		qsort(r->past, r->n_past, sizeof *r->past, cmp_u64);
	if ((ret = past_eof_refcounts(img, r, res, false)) < 0)
		return ret;
	res->image_end_offset = last_used * cs;
	return 0;
}

static void free_refs(struct refs *r)
{
	free(r->one);
	r->one = NULL;
	free(r->wide);
	r->wide = NULL;
	free(r->past);
	r->past = NULL;
	r->n_past = 0;
	free_counts(r);
	free(r->movers);
	r->movers = NULL;
	r->n_movers = 0;
}

/* Give every active data cluster mapped over metadata its own copy, past
 * the end of the file: data first (synced), then the L2 entries. */
static int move_intruders(qk_image *img, struct refs *r)
{
	struct qcow2 *q = qcow2_of(img);
	uint64_t cs = q->cluster_size, fsize;
	if (!r->n_movers)
		return 0;
	/* An L2 table that is itself other metadata (the L1 table, say) cannot
	 * take the new entry: refuse before copying anything. */
	for (size_t i = 0; i < r->n_movers; i++) {
		int ret = qk__qcow2_pre_write_l2(img, r->movers[i].l2_off);
		if (ret < 0)
			return ret;
	}
	int ret = qk__file_get_size(img->file, &fsize);
	uint8_t *buf = malloc(cs);
	if (ret == 0 && !buf)
		ret = qk__err(ENOMEM, "out of memory");
	uint64_t next = (fsize + cs - 1) & ~(cs - 1), hit;
	for (size_t i = 0; ret == 0 && i < r->n_movers; i++) {
		uint64_t *t;
		/* Not where a corrupt entry names a table past the end of the file. */
		while ((ret = qk__qcow2_meta_find(img, next >> q->cluster_bits, 1, &hit)) == 1)
			next += cs;
		if (ret < 0 || (ret = qk__cache_get(&q->l2_cache, r->movers[i].l2_off, (void **)&t)) < 0)
			break;
		uint64_t e = t[r->movers[i].slot], host = e & L2E_OFFSET_MASK;
		ret = qk__file_pread(img->file, buf, cs, host);
		if (ret == 0)
			ret = qk__file_pwrite_data(img->file, buf, cs, next);
		if (ret == 0)
			ret = qk__file_sync(img->file);
		if (ret == 0) {
			t[r->movers[i].slot] = (e & ~L2E_OFFSET_MASK) | next;
			qk__cache_mark_dirty(&q->l2_cache, r->movers[i].l2_off);
			next += cs;
		}
		qk__cache_put(&q->l2_cache, r->movers[i].l2_off);
	}
	free(buf);
	if (ret == 0)
		ret = qk__cache_flush(&q->l2_cache);
	if (ret == 0)
		q->file_size = next;
	return ret;
}

/* Tables cut short by the end of the file get their full length back:
 * the file grows to cover them (the missing part reads as zeros, which is
 * what every reader saw). */
static int restore_truncated(qk_image *img, const struct refs *r)
{
	struct qcow2 *q = qcow2_of(img);
	if (!r->trunc_end || r->trunc_end <= r->fsize)
		return 0;
	uint64_t end = (r->trunc_end + q->cluster_size - 1) & ~(q->cluster_size - 1);
	int ret = qk__file_set_size(img->file, end);
	if (ret == 0)
		ret = qk__file_sync(img->file);
	if (ret == 0)
		q->file_size = qk_max_u64(q->file_size, end);
	return ret;
}

/* Does a cluster at host offset off lie whole in the file, aligned? */
static bool in_file(const struct qcow2 *q, uint64_t off)
{
	return !(off & (q->cluster_size - 1)) && off < q->file_size &&
	       q->file_size - off >= q->cluster_size;
}

/* A repair of one active L2 table in the cache (entries of `step` words):
 * returns whether it changed the table. */
typedef bool (*fix_table_fn)(const struct qcow2 *q, uint64_t *t, uint64_t entries, uint64_t step);

/* Hand every active L2 table inside the file to fix, mark the changed ones
 * dirty, and flush them. */
static int fix_active_tables(qk_image *img, fix_table_fn fix)
{
	struct qcow2 *q = qcow2_of(img);
	uint64_t entries = 1ull << q->l2_bits, step = q->extl2 ? 2 : 1;
	int ret = 0;
	for (uint32_t i = 0; ret == 0 && i < q->l1_size; i++) {
		uint64_t l2_off = q->l1[i] & L1E_OFFSET_MASK, *t;
		if (!l2_off || (l2_off & (q->cluster_size - 1)) || l2_off >= q->file_size)
			continue;
		if ((ret = qk__cache_get(&q->l2_cache, l2_off, (void **)&t)) < 0)
			break;
		if (fix(q, t, entries, step))
			qk__cache_mark_dirty(&q->l2_cache, l2_off);
		qk__cache_put(&q->l2_cache, l2_off);
	}
	return ret ? ret : qk__cache_flush(&q->l2_cache);
}

/* Reserved bits of L2 entries go where what is left points into the file. */
static bool fix_reserved_l2(const struct qcow2 *q, uint64_t *t, uint64_t entries, uint64_t step)
{
	bool dirty = false;
	for (uint64_t j = 0; j < entries; j++) {
		uint64_t *e = &t[step * j], host = *e & L2E_OFFSET_MASK;
		if (!(*e & QCOW_OFLAG_COMPRESSED) && (*e & L2E_RESERVED_MASK) &&
		    (!host || q->has_data_file || in_file(q, host))) {
			*e &= ~L2E_RESERVED_MASK;
			dirty = true;
		}
	}
	return dirty;
}

/* Reserved bits of active L1 and L2 entries go where what is left points
 * into the file (the rest stays a corruption: nothing is guessed). Reads
 * refuse such entries, QEMU's ignore the bits: the repaired entry reads
 * what QEMU read. */
static int fix_reserved(qk_image *img)
{
	struct qcow2 *q = qcow2_of(img);
	for (uint32_t i = 0; i < q->l1_size; i++) {
		if ((q->l1[i] & L1E_RESERVED_MASK) && in_file(q, q->l1[i] & L1E_OFFSET_MASK)) {
			uint8_t be[8];
			q->l1[i] &= ~L1E_RESERVED_MASK;
			qk_put_be64(be, q->l1[i]);
			int ret = qk__file_pwrite(img->file, be, 8, q->l1_offset + 8 * (uint64_t)i);
			if (ret < 0)
				return ret;
		}
	}
	return fix_active_tables(img, fix_reserved_l2);
}

/* Extended L2: subclusters both allocated and zero keep their data (the
 * zero bits go); an unallocated cluster loses its allocated bits; a
 * compressed one its bitmap. None could be read before, so nothing
 * readable changes. */
static bool fix_bitmaps_l2(const struct qcow2 *q, uint64_t *t, uint64_t entries, uint64_t step)
{
	bool dirty = false;
	(void)step;
	for (uint64_t j = 0; j < entries; j++) {
		uint64_t e = t[2 * j], *bm = &t[2 * j + 1], nb = *bm;
		nb &= ~((nb & 0xffffffffull) << 32);
		if (!(e & L2E_OFFSET_MASK) && !q->has_data_file)
			nb &= ~0xffffffffull;
		if (e & QCOW_OFLAG_COMPRESSED)
			nb = 0;         /* compressed clusters have no bitmap */
		if (nb != *bm) {
			*bm = nb;
			dirty = true;
		}
	}
	return dirty;
}

static int fix_bitmaps(qk_image *img)
{
	return qcow2_of(img)->extl2 ? fix_active_tables(img, fix_bitmaps_l2) : 0;
}

int qk__qcow2_check(qk_image *img, uint32_t flags, struct qk_check_result *res,
		    void (*report)(void *, const char *), void *opaque)
{
	struct qcow2 *q = qcow2_of(img);
	struct refs r;
	struct qk__file *df;
	/* An image is checked with its data file, as QEMU opens it. */
	int ret = q->has_data_file ? qk__qcow2_data_file(img, &df) : 0;
	if (ret < 0)
		return ret;
	qk__qcow2_lock(q);
	ret = check_pass(img, res, report, opaque, &r);
	if (ret < 0 || !(flags & (QK_CHECK_FIX_LEAKS | QK_CHECK_FIX_ERRORS)) ||
	    (res->leaks == 0 && res->corruptions == 0 &&
	     !((flags & QK_CHECK_FIX_ERRORS) && res->stale_bitmaps)))
		goto out;
	struct qk_check_result before = *res;
	if (!(flags & QK_CHECK_FIX_ERRORS) && r.needs_rebuild) {
		/* Only a new refcount structure fixes this: -r all. */
		if (report)
			report(opaque, "ERROR need to rebuild refcount structures");
		res->check_errors++;
		goto out;
	}
	if ((flags & QK_CHECK_FIX_ERRORS) && res->corruptions) {
		/* Data mapped over metadata moves out (its bytes copied past
		 * the end of the file, so the guest reads what it read), never
		 * a raised refcount; then counts and COPIED flags from the
		 * references: a new refcount structure, which also drops every
		 * leak. */
		ret = restore_truncated(img, &r);
		if (ret == 0)
			ret = move_intruders(img, &r);
		if (ret == 0)
			ret = fix_reserved(img);
		if (ret == 0)
			ret = fix_bitmaps(img);
		if (ret == 0)
			ret = qk__qcow2_rebuild_refcounts(img);
	} else {
		for (uint64_t c = 0; ret == 0 && res->leaks && c < r.n; c++) {
			uint64_t stored;
			ret = qk__qcow2_get_refcount(img, c, &stored);
			/* In one step: a leak may be 2^63 references. */
			if (ret == 0 && stored > cnt_get(&r, c))
				ret = qk__qcow2_set_refcount(img, c, cnt_get(&r, c));
		}
		if (ret == 0 && res->leaks)
			ret = past_eof_refcounts(img, &r, NULL, true);
		if (ret == 0 && res->leaks)
			ret = qk__cache_flush(&q->rb_cache);
		/* COPIED flags from the counts: with -r all; with -r leaks too
		 * when they are all that is wrong besides leaks, the refcounts
		 * then being right (qemu-img does both). */
		if (ret == 0 && ((flags & QK_CHECK_FIX_ERRORS) ||
				 (res->corruptions == res->copied_errors && !res->check_errors)))
			ret = fix_copied(img, &r);
	}
	free_refs(&r);
	/* Stale bitmaps go once the refcounts are right: removing them frees
	 * their clusters. */
	if (ret == 0 && (flags & QK_CHECK_FIX_ERRORS) && before.stale_bitmaps)
		ret = qk__qcow2_bitmaps_drop_inconsistent(img, report, opaque);
	if (ret < 0)
		goto out;
	/* Check again: the result is what is left. */
	memset(res, 0, sizeof *res);
	ret = check_pass(img, res, NULL, NULL, &r);
	if (ret == 0) {
		res->leaks_fixed = before.leaks > res->leaks ? before.leaks - res->leaks : 0;
		res->corruptions_fixed = before.corruptions > res->corruptions ?
					 before.corruptions - res->corruptions : 0;
		if (res->corruptions == 0 && (q->incompat & (INCOMPAT_DIRTY | INCOMPAT_CORRUPT)))
			ret = qk__qcow2_write_incompat(img, q->incompat & ~(INCOMPAT_DIRTY | INCOMPAT_CORRUPT));
	}
out:
	free_refs(&r);
	qk__qcow2_unlock(q);
	return ret;
}

/* ---- qk_forensic ----------------------------------------------------------------- */

int qk__qcow2_forensic(qk_image *img, int (*found)(void *opaque, const struct qk_forensic_item *it),
		       void *opaque)
{
	struct qcow2 *q = qcow2_of(img);
	struct qk_check_result res;
	struct refs r;
	uint64_t cs = q->cluster_size;
	memset(&res, 0, sizeof res);
	memset(&r, 0, sizeof r);
	r.res = &res;           /* problems are counted, not fatal */
	r.found = found;
	r.found_opaque = opaque;
	uint8_t *buf = malloc(cs);
	if (!buf)
		return qk__err(ENOMEM, "out of memory");
	qk__qcow2_lock(q);
	uint64_t fsize;
	int ret = qk__file_get_size(img->file, &fsize);
	if (ret == 0) {
		uint64_t n = (fsize + cs - 1) >> q->cluster_bits;
		if (n > MAX_COUNTED_CLUSTERS)
			ret = qk__err(EFBIG, "'%s' is too large to examine", img->filename);
		else if (!(r.kind = calloc(n + 1, 1)))
			ret = qk__err(ENOMEM, "out of memory for %llu clusters", (unsigned long long)n);
	}
	if (ret == 0 && !q->rt)
		ret = qk__qcow2_get_refcount(img, 0, &(uint64_t){ 0 });
	if (ret == 0)
		ret = count_references(img, &r, forensic_entry);
	if (ret == 0)
		ret = count_refcount_structure(img, &r);
	if (ret == 0)
		take_tail(&r);
	for (uint64_t c = 0; ret == 0 && c < r.n; c++) {
		uint64_t stored;
		if ((ret = qk__qcow2_get_refcount(img, c, &stored)) < 0)
			break;
		struct qk_forensic_item it = { .host = c * cs, .guest = UINT64_MAX, .refcount = stored,
					       .length = cs };
		if (stored && !cnt_get(&r, c)) {
			ret = qk__file_pread(img->file, buf, cs, c * cs);
			if (ret < 0)
				break;
			it.kind = QK_FORENSIC_LEAKED;
			it.nonzero = !qk_is_zero(buf, cs);
			it.data = buf;
			ret = found(opaque, &it);
		} else if ((r.kind[c] & K_SNAP_DATA) && !(r.kind[c] & K_ACTIVE)) {
			it.kind = QK_FORENSIC_SNAPSHOT_ONLY;
			ret = found(opaque, &it);
		}
	}
	restore_reftable(img, &r);
	qk__qcow2_unlock(q);
	free(r.past);
	free_counts(&r);
	free(r.kind);
	free(buf);
	return ret;
}
