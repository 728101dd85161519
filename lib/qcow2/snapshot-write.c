/*
 * snapshot-write.c - taking, applying and deleting internal snapshots, in
 * QEMU's layout (qcow2-snapshot.c): a snapshot is an L1 table of its own
 * whose L2 tables and data clusters it shares with the active image, each
 * shared cluster counting one reference per L1 table that reaches it.
 *
 * Order, for power cuts:
 * - a version 3 image is marked dirty first and clean last, so a cut
 *   anywhere leaves refcounts the next read-write open rebuilds (QEMU does
 *   the same on open) and COPIED flags it corrects; after a failed call
 *   the bit outlives the handle (a lazy refcounts close keeps it too);
 * - every new structure (a snapshot's L1 table, the snapshot table, the
 *   active L1 table of apply) is written and synced before the header
 *   points at it, in one write of the header fields that name it (within
 *   the first sector: the switch is atomic), and the old one is freed only
 *   after that;
 * - references are raised before the header exposes them and dropped after
 *   it stops exposing them, and COPIED flags are cleared before a refcount
 *   rises to 2 and set only after it drops to 1, so a version 2 image (no
 *   dirty bit) is left with at most leaks and COPIED flags missing where
 *   a cluster is no longer shared: safe to write through (a write copies
 *   the cluster once more), and `check -r all` sets them. QEMU's order
 *   can leave the flag on a shared cluster.
 * Apply never overwrites the active L1 table in place: a cut leaves the
 * old disk or the snapshot's, never a mix.
 */
#include "qcow2/qcow2.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_SNAPSHOTS_BYTES (64ull << 20)  /* QCOW_MAX_SNAPSHOTS_SIZE */

/* ---- the dirty bit for the duration ---------------------------------------- */

enum busy { BUSY_NOT, BUSY_BEGUN, BUSY_MARKED };

/* Mark a version 3 image dirty (unless it is: lazy refcounts), so that a
 * cut before busy_end leaves refcounts to rebuild, not corruption. *b says
 * whether the change may begin, and whether the bit is ours to clear. */
static int busy_begin(qk_image *img, enum busy *b)
{
	struct qcow2 *q = qcow2_of(img);
	*b = BUSY_BEGUN;
	if (q->version < 3 || (q->incompat & INCOMPAT_DIRTY))
		return 0;
	int ret = qk__qcow2_write_incompat(img, q->incompat | INCOMPAT_DIRTY);
	*b = ret == 0 ? BUSY_MARKED : BUSY_NOT;
	return ret;
}

/* Flush everything, then clear the dirty bit busy_begin set. After a
 * failure the bit stays: the next read-write open rebuilds. A lazy
 * refcounts image (dirty already) would have it cleared at close, over
 * the refcounts and COPIED flags the failure left half changed: from then
 * on this handle leaves it set. */
static int busy_end(qk_image *img, enum busy b, int ret)
{
	struct qcow2 *q = qcow2_of(img);
	if (ret == 0)
		ret = qk__qcow2_flush_locked(img);
	if (ret == 0 && b == BUSY_MARKED)
		ret = qk__qcow2_write_incompat(img, q->incompat & ~INCOMPAT_DIRTY);
	if (ret < 0 && b != BUSY_NOT)
		q->lazy = false;
	/* The metadata changed wholesale: the overlap map is rebuilt when
	 * next needed, and no cached decompressed cluster may outlive a
	 * cluster freed here. */
	qk__qcow2_meta_invalidate(img);
	q->cbuf_valid = false;
	q->prealloc_checked = false;
	return ret;
}

/* Refcounts and COPIED flags may lag on disk while the dirty bit is set
 * (the next read-write open rebuilds them), so only what the header is
 * about to name needs a sync of its own: one before each header switch.
 * Without it (version 2), every step is synced in the order the header
 * comment gives. */
static bool relaxed(const struct qcow2 *q)
{
	return q->incompat & INCOMPAT_DIRTY;
}

/* Write new metadata that the header will name: synced at once, or, while
 * relaxed, by the sync before the switch (switch_sync). */
static int write_new(qk_image *img, uint64_t off, const void *buf, size_t len)
{
	if (relaxed(qcow2_of(img)))
		return qk__file_pwrite(img->file, buf, len, off);
	return qk__qcow2_write_durable(img, off, buf, len);
}

/* Before a header switch: what write_new wrote while relaxed is durable. */
static int switch_sync(qk_image *img)
{
	return relaxed(qcow2_of(img)) ? qk__file_sync(img->file) : 0;
}

/* Flush the caches in order (version 2); nothing while relaxed (busy_end
 * flushes once). */
static int step_flush(qk_image *img)
{
	return relaxed(qcow2_of(img)) ? 0 : qk__qcow2_flush_locked(img);
}

/* ---- walking a table's references -------------------------------------------- */

/* The L2 table L1 entry e (index i of the table `which`) names, checked as
 * the read path checks the active one's; 0 when none. */
static int l2_of(qk_image *img, const char *which, uint64_t i, uint64_t e, uint64_t *t)
{
	struct qcow2 *q = qcow2_of(img);
	*t = e & L1E_OFFSET_MASK;
	if (e & L1E_RESERVED_MASK)
		return qk__qcow2_corrupt(img, "%s L1 entry %llu (0x%016llx) has reserved bits set",
					 which, (unsigned long long)i, (unsigned long long)e);
	if (*t && (*t & (q->cluster_size - 1)))
		return qk__qcow2_corrupt(img, "%s L2 table offset 0x%llx unaligned (L1 index %llu)",
					 which, (unsigned long long)*t, (unsigned long long)i);
	uint64_t size = q->file_size;
	if (*t && *t >= size && (qk__file_get_size(img->file, &size) < 0 || *t >= size))
		return qk__qcow2_corrupt(img, "%s L2 table at offset 0x%llx (L1 index %llu) lies past "
					 "the end of the file", which, (unsigned long long)*t,
					 (unsigned long long)i);
	return 0;
}

/* The host range L2 entry e counts a reference to (len 0: none). */
static void entry_range(const struct qcow2 *q, uint64_t e, uint64_t *off, uint64_t *len)
{
	if (e & QCOW_OFLAG_COMPRESSED) {
		*off = qk__qcow2_compressed_offset(q, e);
		*len = qk__qcow2_compressed_size(q, e);
	} else {
		*off = e & L2E_OFFSET_MASK;
		*len = *off ? q->cluster_size : 0;
	}
}

/* The largest refcount the image's width holds. */
static uint64_t rc_limit(const struct qcow2 *q)
{
	return q->refcount_order == 6 ? UINT64_MAX : (1ull << (1u << q->refcount_order)) - 1;
}

/* Refuse a new reference: cluster c, with refcount rc, has no room. */
static int no_room(qk_image *img, uint64_t c, uint64_t rc)
{
	struct qcow2 *q = qcow2_of(img);
	return qk__err(ERANGE, "the cluster at host offset 0x%llx of '%s' has refcount %llu, and "
		       "refcount_bits=%u holds at most %llu: the references a snapshot adds do not "
		       "fit (amend -o refcount_bits=16 makes room)",
		       (unsigned long long)(c << q->cluster_bits), img->filename,
		       (unsigned long long)rc, 1u << q->refcount_order,
		       (unsigned long long)rc_limit(q));
}

/* Before raising the references of a table: every cluster it reaches has
 * room for one more (twice as many for clusters holding compressed data,
 * whose every entry counts one), so the change cannot fail half way on a
 * narrow refcount width. QEMU fails half way and leaks. */
static int room_for(qk_image *img, uint64_t off, uint64_t len, bool compressed)
{
	struct qcow2 *q = qcow2_of(img);
	uint64_t max = rc_limit(q);
	for (uint64_t c = off >> q->cluster_bits; c <= (off + len - 1) >> q->cluster_bits; c++) {
		uint64_t rc;
		int ret = qk__qcow2_get_refcount(img, c, &rc);
		if (ret < 0)
			return ret;
		if (rc >= max || (compressed && rc > max - rc))
			return no_room(img, c, rc);
	}
	return 0;
}

struct pass {
	const char *which;     /* "active", "snapshot": for messages */
	int delta;             /* +1, -1, or 0 to set the COPIED flags alone */
	bool dry;              /* room_for every reference, change nothing */
	bool l1_changed;       /* out: a COPIED flag of the L1 table changed */
	uint64_t *host;        /* scratch, an entry per L2 entry: data cluster index */
	uint64_t *rc;          /* scratch: its refcount after the change */
};

/* The data clusters of one table, host[n] (UINT64_MAX: none), in runs of
 * consecutive clusters: their refcounts changed by p->delta (or, dry,
 * checked for room) block by block, the results in p->rc. */
static int pass_runs(qk_image *img, struct pass *p, uint64_t n)
{
	uint64_t max = rc_limit(qcow2_of(img));
	for (uint64_t j = 0, k; j < n; j = k) {
		k = j + 1;
		if (p->host[j] == UINT64_MAX)
			continue;
		while (k < n && p->host[k] == p->host[j] + (k - j))
			k++;
		int ret = qk__qcow2_add_refcounts(img, p->host[j], k - j, p->dry ? 0 : p->delta, p->rc + j);
		for (uint64_t i = j; ret == 0 && p->dry && i < k; i++)
			if (p->rc[i] >= max)
				ret = no_room(img, p->host[i], p->rc[i]);
		if (ret < 0)
			return ret;
	}
	return 0;
}

/* One L2 table of a pass: each entry's reference changed by p->delta, its
 * COPIED flag set exactly when the cluster's refcount is then 1. */
static int pass_l2(qk_image *img, struct pass *p, uint64_t l1i, uint64_t t)
{
	struct qcow2 *q = qcow2_of(img);
	uint64_t *tab;
	int ret = qk__cache_get(&q->l2_cache, t, (void **)&tab);
	if (ret < 0)
		return ret;
	uint32_t step = q->l2_entry_size / 8;
	uint64_t n = q->cluster_size / q->l2_entry_size;
	for (uint64_t j = 0; ret == 0 && j < n; j++) {
		uint64_t e = tab[j * step], off, len;
		p->host[j] = UINT64_MAX;
		ret = qk__qcow2_check_entry(img, (l1i << q->l2_bits) | j, e, step > 1 ? tab[j * step + 1] : 0);
		entry_range(q, e, &off, &len);
		if (ret < 0 || !len)
			continue;
		if (!(e & QCOW_OFLAG_COMPRESSED))
			p->host[j] = off >> q->cluster_bits;
		else if (p->dry)
			ret = room_for(img, off, len, true);
		else if (p->delta)
			ret = qk__qcow2_update_refcount(img, off, len, p->delta);
	}
	if (ret == 0)
		ret = pass_runs(img, p, n);
	for (uint64_t j = 0; ret == 0 && !p->dry && j < n; j++) {
		uint64_t e = tab[j * step];
		bool copied = p->host[j] != UINT64_MAX && p->rc[j] == 1;
		uint64_t ne = (e & ~QCOW_OFLAG_COPIED) | (copied ? QCOW_OFLAG_COPIED : 0);
		if (ne != e) {
			tab[j * step] = ne;
			qk__cache_mark_dirty(&q->l2_cache, t);
		}
	}
	qk__cache_put(&q->l2_cache, t);
	return ret;
}

/* A pass over the L1 table l1[n]: every L2 table and data cluster it
 * reaches gains (delta +1) or loses (-1) one reference, and the COPIED
 * flags of the entries walked (and of l1[] in memory) are set from the
 * new refcounts, as QEMU's qcow2_update_snapshot_refcount does. L2 tables
 * freed on the way are dropped from the cache. */
static int pass_l1_tables(qk_image *img, struct pass *p, uint64_t *l1, uint32_t n)
{
	struct qcow2 *q = qcow2_of(img);
	for (uint32_t i = 0; i < n; i++) {
		uint64_t t, rc;
		int ret = l2_of(img, p->which, i, l1[i], &t);
		if (ret == 0 && t && p->dry)
			ret = room_for(img, t, q->cluster_size, false);
		if (ret == 0 && t)
			ret = pass_l2(img, p, i, t);
		if (ret < 0)
			return ret;
		if (!t || p->dry)
			continue;
		if (p->delta)
			ret = qk__qcow2_update_refcount(img, t, q->cluster_size, p->delta);
		if (ret == 0)
			ret = qk__qcow2_get_refcount(img, t >> q->cluster_bits, &rc);
		if (ret < 0)
			return ret;
		if (rc == 0)
			qk__cache_discard(&q->l2_cache, t);
		uint64_t ne = (l1[i] & ~QCOW_OFLAG_COPIED) | (rc == 1 ? QCOW_OFLAG_COPIED : 0);
		if (ne != l1[i]) {
			l1[i] = ne;
			p->l1_changed = true;
		}
	}
	return 0;
}

static int pass_l1(qk_image *img, struct pass *p, uint64_t *l1, uint32_t n)
{
	struct qcow2 *q = qcow2_of(img);
	uint64_t entries = q->cluster_size / q->l2_entry_size;
	p->host = malloc(entries * sizeof *p->host);
	p->rc = malloc(entries * sizeof *p->rc);
	int ret = p->host && p->rc ? pass_l1_tables(img, p, l1, n) : qk__err(ENOMEM, "out of memory");
	free(p->host);
	free(p->rc);
	p->host = p->rc = NULL;
	return ret;
}

/* ---- writing tables -------------------------------------------------------------- */

/* Write l1[n] (host order) at `off` (see write_new). */
static int write_l1(qk_image *img, uint64_t off, const uint64_t *l1, uint32_t n)
{
	if (n == 0)
		return 0;
	uint64_t *be = malloc((size_t)n * 8);
	if (!be)
		return qk__err(ENOMEM, "out of memory");
	for (uint32_t i = 0; i < n; i++)
		qk_put_be64(&be[i], l1[i]);
	int ret = write_new(img, off, be, (size_t)n * 8);
	free(be);
	return ret;
}

/* Allocate clusters for `bytes` of a new table of kind `type` (0 bytes:
 * offset 0), after flushing the refcounts that count them. */
static int alloc_table(qk_image *img, uint64_t bytes, unsigned type, uint64_t *off)
{
	struct qcow2 *q = qcow2_of(img);
	*off = 0;
	if (!bytes)
		return 0;
	uint64_t n = (bytes + q->cluster_size - 1) >> q->cluster_bits;
	int ret = qk__qcow2_alloc_clusters(img, n, off);
	if (ret == 0 && !relaxed(q))
		ret = qk__cache_flush(&q->rb_cache);
	if (ret == 0 && *off + (n << q->cluster_bits) > q->file_size)
		q->file_size = *off + (n << q->cluster_bits);
	return ret < 0 ? ret : qk__qcow2_meta_add(img, *off, n << q->cluster_bits, type);
}

/*
 * Write a new snapshot table: the current entries but `skip` (UINT32_MAX:
 * none), then `add` (NULL: none); sync it; point the header at it (count
 * and offset in one write); free the old table. The in-memory list is the
 * caller's to update. Image lock held.
 */
static int write_table(qk_image *img, uint32_t skip, const struct qk_snapshot *add)
{
	struct qcow2 *q = qcow2_of(img);
	uint64_t bytes = 0;
	uint32_t count = 0;
	for (uint32_t i = 0; i <= q->n_snapshots; i++) {
		const struct qk_snapshot *sn = i < q->n_snapshots ? &q->snapshots[i] : add;
		if (i == skip || !sn)
			continue;
		uint32_t extra = i < q->n_snapshots ? q->snap_extra[i].len : 0;
		bytes += (SNAP_FIXED_LEN + SNAP_EXTRA_LEN + extra + strlen(sn->id) + strlen(sn->name) + 7) & ~7ull;
		count++;
	}
	if (bytes > MAX_SNAPSHOTS_BYTES)
		return qk__err(EFBIG, "the snapshot table of '%s' would pass %llu MiB", img->filename,
			       MAX_SNAPSHOTS_BYTES >> 20);
	uint8_t *buf = malloc(bytes ? bytes : 1);
	if (!buf)
		return qk__err(ENOMEM, "out of memory for the snapshot table");
	uint64_t len = 0, off;
	for (uint32_t i = 0; i <= q->n_snapshots; i++) {
		const struct qk_snapshot *sn = i < q->n_snapshots ? &q->snapshots[i] : add;
		if (i != skip && sn)
			qk__qcow2_put_snapshot_entry(buf, &len, sn, i < q->n_snapshots ? q->snap_extra[i].bytes : NULL,
				  i < q->n_snapshots ? q->snap_extra[i].len : 0);
	}
	int ret = alloc_table(img, bytes, META_SNAPTABLE, &off);
	if (ret == 0 && bytes)
		ret = write_new(img, off, buf, bytes);
	free(buf);
	uint8_t hdr[12];
	qk_put_be32(hdr, count);
	qk_put_be64(hdr + 4, off);
	if (ret == 0)
		ret = switch_sync(img);
	if (ret == 0)
		ret = qk__qcow2_write_durable(img, HDR_NB_SNAPSHOTS, hdr, sizeof hdr);
	if (ret < 0)
		return ret;
	uint64_t old = q->snapshots_offset, old_bytes = q->snapshots_bytes;
	q->nb_snapshots = count;
	q->snapshots_offset = off;
	q->snapshots_bytes = bytes;
	if (old && old_bytes) {
		qk__qcow2_meta_del(img, old, old_bytes);
		ret = qk__qcow2_update_refcount(img, old, old_bytes, -1);
	}
	return ret;
}

/* ---- the in-memory list ----------------------------------------------------------- */

static int list_append(struct qcow2 *q, const struct qk_snapshot *sn)
{
	struct qk_snapshot *l = realloc(q->snapshots, (q->n_snapshots + 1) * sizeof *l);
	if (l)
		q->snapshots = l;
	void *x = realloc(q->snap_extra, (q->n_snapshots + 1) * sizeof *q->snap_extra);
	if (x)
		q->snap_extra = x;
	if (!l || !x)
		return qk__err(ENOMEM, "out of memory");
	q->snapshots[q->n_snapshots] = *sn;
	q->snap_extra[q->n_snapshots].bytes = NULL;
	q->snap_extra[q->n_snapshots].len = 0;
	q->n_snapshots++;
	return 0;
}

static void list_remove(struct qcow2 *q, uint32_t i)
{
	free((char *)q->snapshots[i].id);
	free((char *)q->snapshots[i].name);
	free(q->snap_extra[i].bytes);
	memmove(&q->snapshots[i], &q->snapshots[i + 1], (q->n_snapshots - i - 1) * sizeof *q->snapshots);
	memmove(&q->snap_extra[i], &q->snap_extra[i + 1], (q->n_snapshots - i - 1) * sizeof *q->snap_extra);
	q->n_snapshots--;
}

/* ---- the three operations ------------------------------------------------------------ */

/* What QEMU refuses for every snapshot operation. */
static int snapshot_refused(qk_image *img)
{
	struct qcow2 *q = qcow2_of(img);
	if (q->has_data_file)
		return qk__err(ENOTSUP, "'%s' has an external data file, which internal snapshots "
			       "cannot share (QEMU refuses them too)", img->filename);
	return 0;
}

/* One more than the largest numeric id, as QEMU's find_new_snapshot_id. */
static void next_id(const struct qcow2 *q, char *id, size_t len)
{
	unsigned long max = 0;
	for (uint32_t i = 0; i < q->n_snapshots; i++) {
		unsigned long v = strtoul(q->snapshots[i].id, NULL, 10);
		if (v > max)
			max = v;
	}
	snprintf(id, len, "%lu", max + 1);
}

static int create_locked(qk_image *img, struct qk_snapshot *sn)
{
	struct qcow2 *q = qcow2_of(img);
	/* The disk as it is, durable first: the snapshot shares its L2 tables
	 * and data, which the header will name. */
	int ret = qk__qcow2_flush_locked(img);
	/* The snapshot's L1 table: a copy of the active one. */
	if (ret == 0)
		ret = alloc_table(img, (uint64_t)q->l1_size * 8, META_SNAP_L1, &sn->l1_table_offset);
	if (ret == 0)
		ret = write_l1(img, sn->l1_table_offset, q->l1, q->l1_size);
	/* Its references, and COPIED cleared where they are now shared: the
	 * cleared flags reach the disk first. */
	struct pass p = { .which = "active", .delta = 1 };
	if (ret == 0)
		ret = qk__cache_set_dependency(&q->rb_cache, &q->l2_cache);
	if (ret == 0)
		ret = pass_l1(img, &p, q->l1, q->l1_size);
	if (ret == 0)
		ret = step_flush(img);
	if (ret == 0 && p.l1_changed)
		ret = write_l1(img, q->l1_offset, q->l1, q->l1_size);
	if (ret == 0)
		ret = write_table(img, UINT32_MAX, sn);
	return ret;
}

int qk__qcow2_snapshot_create(qk_image *img, const char *name)
{
	struct qcow2 *q = qcow2_of(img);
	char id[24];
	int ret = snapshot_refused(img);
	if (ret < 0)
		return ret;
	enum busy b = BUSY_NOT;
	ret = qk__qcow2_begin_change(img, 0, 0);
	for (uint32_t i = 0; ret == 0 && i < q->n_snapshots; i++)
		if (strcmp(q->snapshots[i].name, name) == 0)
			ret = qk__err(EEXIST, "'%s' already has a snapshot named '%s' (id %s)",
				      img->filename, name, q->snapshots[i].id);
	if (ret == 0 && q->n_snapshots >= MAX_SNAPSHOTS)
		ret = qk__err(EFBIG, "'%s' has the most snapshots an image may have (%u)",
			      img->filename, MAX_SNAPSHOTS);
	struct timespec now;
	clock_gettime(CLOCK_REALTIME, &now);
	next_id(q, id, sizeof id);
	struct qk_snapshot sn = {
		.id = id, .name = name, .disk_size = img->size, .l1_size = q->l1_size,
		.date_sec = (uint32_t)now.tv_sec,
		.date_nsec = (uint32_t)(now.tv_nsec / 1000 * 1000),
	};
	/* Room for one more reference everywhere, checked before anything
	 * changes (the dirty bit included): a refusal leaves the file as it
	 * was. */
	struct pass p = { .which = "active", .dry = true };
	if (ret == 0)
		ret = pass_l1(img, &p, q->l1, q->l1_size);
	if (ret == 0)
		ret = busy_begin(img, &b);
	if (ret == 0)
		ret = create_locked(img, &sn);
	if (ret == 0) {
		sn.id = strdup(id);
		sn.name = strdup(name);
		ret = sn.id && sn.name ? list_append(q, &sn) : qk__err(ENOMEM, "out of memory");
		if (ret < 0) {
			free((char *)sn.id);
			free((char *)sn.name);
		}
	}
	ret = busy_end(img, b, ret);
	qk__qcow2_end_change(img);
	return ret;
}

/* Drop the references of an L1 table no header names any more (l1[n]
 * at `off`): what only it reached is freed, and the table itself. */
static int drop_table(qk_image *img, const char *which, uint64_t *l1, uint32_t n, uint64_t off)
{
	struct pass p = { .which = which, .delta = -1 };
	int ret = pass_l1(img, &p, l1, n);
	if (ret == 0 && n) {
		qk__qcow2_meta_del(img, off, (uint64_t)n * 8);
		ret = qk__qcow2_update_refcount(img, off, (uint64_t)n * 8, -1);
	}
	return ret;
}

/* The COPIED flags of the active tables, from the final refcounts; then
 * the caches flushed (see step_flush) and the active L1 table rewritten
 * when a flag of it changed. */
static int settle_active(qk_image *img)
{
	struct qcow2 *q = qcow2_of(img);
	struct pass p = { .which = "active" };
	int ret = pass_l1(img, &p, q->l1, q->l1_size);
	if (ret == 0)
		ret = step_flush(img);
	if (ret == 0 && p.l1_changed)
		ret = write_l1(img, q->l1_offset, q->l1, q->l1_size);
	return ret;
}

/* Apply: the snapshot's references raised, a new active L1 table (the
 * snapshot's, grown to the snapshot's size) written, the header switched
 * to it and to the snapshot's size in one write, then the old table's
 * references dropped. */
static int apply_locked(qk_image *img, const struct qk_snapshot *sn, uint64_t *sl1)
{
	struct qcow2 *q = qcow2_of(img);
	uint64_t per_l1 = q->cluster_size << q->l2_bits;
	uint64_t need = sn->disk_size / per_l1 + (sn->disk_size % per_l1 != 0);
	uint32_t n = (uint32_t)qk_max_u64(sn->l1_size, need);
	if ((uint64_t)n * 8 > MAX_L1_BYTES)
		return qk__err(EFBIG, "the L1 table of snapshot '%s' would be too large", sn->name);
	/* (room_for every one of them was checked before.) */
	struct pass p = { .which = "snapshot", .delta = 1 };
	int ret = pass_l1(img, &p, sl1, sn->l1_size);
	if (ret == 0)
		ret = step_flush(img);
	uint64_t *nl1 = calloc(n ? n : 1, 8), off = 0;
	if (!nl1)
		return ret < 0 ? ret : qk__err(ENOMEM, "out of memory");
	memcpy(nl1, sl1, (size_t)sn->l1_size * 8);
	if (ret == 0)
		ret = alloc_table(img, (uint64_t)n * 8, META_L1, &off);
	if (ret == 0)
		ret = write_l1(img, off, nl1, n);
	uint8_t hdr[24];
	qk_put_be64(hdr, sn->disk_size);
	qk_put_be32(hdr + 8, q->crypt_method);
	qk_put_be32(hdr + 12, n);
	qk_put_be64(hdr + 16, off);
	if (ret == 0)
		ret = switch_sync(img);
	if (ret == 0)
		ret = qk__qcow2_write_durable(img, HDR_SIZE, hdr, sizeof hdr);
	if (ret < 0) {
		free(nl1);
		return ret;
	}
	uint64_t *old = q->l1, old_off = q->l1_offset;
	uint32_t old_n = q->l1_size;
	q->l1 = nl1;
	q->l1_size = n;
	q->l1_offset = off;
	img->size = sn->disk_size;
	/* The old disk's references go; what only it reached is freed. */
	ret = drop_table(img, "former active", old, old_n, old_off);
	free(old);
	return ret < 0 ? ret : settle_active(img);
}

int qk__qcow2_snapshot_apply(qk_image *img, uint32_t i)
{
	struct qcow2 *q = qcow2_of(img);
	int ret = snapshot_refused(img);
	if (ret == 0 && q->n_bitmaps)
		/* As QEMU 7.2, enabled or not: their bits would not describe
		 * the reverted disk. */
		ret = qk__err(ENOTSUP, "Device has active dirty bitmaps ('%s' has persistent "
			      "bitmaps, which would not describe the reverted disk)", img->filename);
	if (ret < 0)
		return ret;
	enum busy b = BUSY_NOT;
	uint64_t *sl1 = NULL;
	ret = qk__qcow2_begin_change(img, 0, 0);
	if (ret == 0)
		ret = qk__qcow2_snapshot_l1(img, &q->snapshots[i], &sl1);
	/* Room for one more reference to everything the snapshot reaches,
	 * checked before anything changes (the dirty bit included). */
	struct pass p = { .which = "snapshot", .dry = true };
	if (ret == 0)
		ret = pass_l1(img, &p, sl1, q->snapshots[i].l1_size);
	if (ret == 0)
		ret = busy_begin(img, &b);
	if (ret == 0)
		ret = apply_locked(img, &q->snapshots[i], sl1);
	free(sl1);
	ret = busy_end(img, b, ret);
	qk__qcow2_end_change(img);
	return ret;
}

/* Delete: the table without the snapshot written and switched to, then
 * its references dropped and the active COPIED flags set from the new
 * refcounts. */
static int delete_locked(qk_image *img, uint32_t i, uint64_t *sl1)
{
	struct qcow2 *q = qcow2_of(img);
	uint64_t l1_off = q->snapshots[i].l1_table_offset;
	uint32_t l1_n = q->snapshots[i].l1_size;
	int ret = write_table(img, i, NULL);
	if (ret < 0)
		return ret;
	list_remove(q, i);
	/* Its references dropped, then COPIED set where a cluster is no
	 * longer shared: the refcounts reach the disk first. */
	ret = qk__cache_set_dependency(&q->l2_cache, &q->rb_cache);
	if (ret == 0)
		ret = drop_table(img, "deleted snapshot", sl1, l1_n, l1_off);
	return ret < 0 ? ret : settle_active(img);
}

int qk__qcow2_snapshot_delete(qk_image *img, uint32_t i)
{
	struct qcow2 *q = qcow2_of(img);
	int ret = snapshot_refused(img);
	if (ret < 0)
		return ret;
	enum busy b = BUSY_NOT;
	uint64_t *sl1 = NULL;
	ret = qk__qcow2_begin_change(img, 0, 0);
	if (ret == 0)
		ret = qk__qcow2_snapshot_l1(img, &q->snapshots[i], &sl1);
	if (ret == 0)
		ret = busy_begin(img, &b);
	if (ret == 0)
		ret = delete_locked(img, i, sl1);
	free(sl1);
	ret = busy_end(img, b, ret);
	qk__qcow2_end_change(img);
	return ret;
}
