/*
 * fault-walk: power cuts and I/O errors at every point of a seeded
 * workload, on the fault backend (lib/io/fault.c).
 *
 *   fault-walk cut|errors START DIR [STRIDE [OFFSET]]
 *
 * START is a QCOW2 image in DIR (with its backing file there too); it is
 * loaded into memory and opened read-write through the fault backend. The
 * workload (fixed seed) writes, zeroes, discards, writes compressed
 * clusters, resizes and flushes so that every metadata path runs: data
 * cluster and L2 table allocation, L1 growth, refcount block allocation
 * and refcount table growth, zero clusters, discards, copy-on-write from
 * the backing file, from compressed clusters and from clusters a snapshot
 * shares. Between them it takes, applies and deletes internal snapshots
 * (s1, START's own, among them): a snapshot of the 1 MiB disk applied
 * after the resize to 4 MiB (the size and the L1 table go back), L2 tables
 * and clusters copied on write after each snapshot is taken, deletes that
 * free what only the snapshot reached. A first run counts its writes,
 * syncs and reads (and must end with the L1 table and the refcount table
 * grown); then:
 *
 *   cut     for every write N (every STRIDE-th, from OFFSET), the power is
 *           cut at write N, in one of three ways taken in turn: writes
 *           since the last sync lost; lost, and of write N the whole
 *           sectors of its first 2 to 5.5 KiB landed (shorter writes land
 *           whole); all earlier writes kept and write N lost (a process
 *           crash). The 50th and the 250th dirty image left (lazy
 *           refcounts, or a cut inside a snapshot call), if there are so
 *           many, are also cut at every write of the repair that the next
 *           read-write open makes.
 *   errors  every write N fails with EIO (once) or ENOSPC (from then on),
 *           in turn, then every sync N and every read N of the image file
 *           with EIO (once).
 *
 * After each run the resulting image (the durable bytes after a cut, the
 * file as left after an error) is written to DIR/cut.qcow2 and must: pass
 * `qemu-img check` with no corruptions and no check errors (leaks
 * allowed), as it is or, when it is dirty (lazy refcounts, a snapshot
 * call cut short), after the read-write open that repairs it; open
 * read-write; after a leak repair (qk_check, or every 16th point the
 * program's `check -r leaks`) check clean; and read back, for every byte,
 * what the model says: the content at the last completed flush for bytes
 * not written since, else that or a value written since. Each snapshot
 * call flushes: it is done on return, and a cut during one leaves the
 * image before or after it: an apply shows the old disk (as above) or the
 * snapshot's whole (its size and content), a create or delete the old or
 * the new snapshot list (ids, names, sizes). Every snapshot listed, opened
 * read-only, must hold the content the guest had when it was taken.
 * After an error the failing call must have returned that errno with a
 * one-line message naming it, and the handle must still read every byte
 * as the model says (the failed call's range old or new; a failed apply
 * the old disk or the snapshot's) and list the old or the new snapshots.
 * With lazy refcounts some cut must have left the image dirty. The
 * summary lines count the points that fell inside snapshot calls.
 *
 * Environment: QCOWKIT (the program, for check -r leaks), QEMU_IMG
 * (default qemu-img); FAULT_WALK_LIST=1 prints the workload and
 * FAULT_WALK_TRACE=1 the write, sync and read count at each operation,
 * to find the operation of a failing point, and the message of each
 * error; FAULT_WALK_OTHER=1 takes a starting image of any cluster size up
 * to 64 KiB (to explore other layouts). The first failing image is kept as
 * DIR/cut.qcow2.fail. Prints one summary line per mode; exit 0 when every
 * point passed.
 */
#include "tap.h"
#include "walk-util.h"

#include <time.h>

#define MAX_SIZE (4u << 20)     /* the guest size after the resize */
#define MAX_OPS 512

#define MAX_SNAPS 8

enum op_kind {
	OP_WRITE, OP_ZERO, OP_ZERO_UNMAP, OP_DISCARD, OP_COMPRESSED, OP_FLUSH, OP_RESIZE,
	OP_SNAP_CREATE, OP_SNAP_APPLY, OP_SNAP_DELETE
};

struct op {
	enum op_kind kind;
	uint64_t off, len;      /* OP_RESIZE: the new size in off */
	const char *snap;       /* OP_SNAP_*: the snapshot's name */
};

static bool is_snap(enum op_kind k)
{
	return k == OP_SNAP_CREATE || k == OP_SNAP_APPLY || k == OP_SNAP_DELETE;
}

static struct op ops[MAX_OPS];
static size_t n_ops;
static uint64_t cs = 512;

/* ---- the workload ------------------------------------------------------------ */

static void add(enum op_kind k, uint64_t off, uint64_t len)
{
	if (n_ops == MAX_OPS)
		qb_die("too many operations");
	ops[n_ops++] = (struct op){ k, off, len, NULL };
}

static void add_snap(enum op_kind k, const char *name)
{
	add(k, 0, 0);
	ops[n_ops - 1].snap = name;
}

/* The starting image (made by the shell driver) holds, with 512-byte
 * clusters: data in [0, 64k) and compressed clusters in [64k, 96k) and
 * zero clusters in [96k, 104k), all shared with snapshot s1; private data
 * in [128k, 160k); the backing file shows through everywhere else. */
static void make_workload(uint64_t seed)
{
	uint64_t s = seed;
	/* A: each path once, in the first megabyte. */
	add(OP_WRITE, 1000, 100);               /* shared cluster and L2 table: COW */
	add(OP_WRITE, 70000, 3000);             /* COW from compressed clusters */
	add(OP_FLUSH, 0, 0);
	add(OP_WRITE, 200013, 700);             /* COW from backing, new L2 table */
	add(OP_WRITE, 131072 + 512, 512);       /* in place */
	add(OP_ZERO, 40000, 2100);              /* zero flags and real zeros */
	add(OP_FLUSH, 0, 0);
	add(OP_ZERO_UNMAP, 8192, 4096);         /* shared clusters unmapped */
	add(OP_DISCARD, 16384, 4096);           /* shared clusters discarded */
	add(OP_DISCARD, 140 * 1024, 2048);      /* private: refcount to 0, punched */
	add(OP_FLUSH, 0, 0);
	for (int i = 0; i < 6; i++)
		add(OP_COMPRESSED, 320 * 1024 + (uint64_t)i * cs, cs);
	add(OP_WRITE, 320 * 1024 + 100, 300);   /* COW from our compressed cluster */
	add(OP_WRITE, 400 * 1024, 64 * 1024);   /* a run of clusters, L2 tables, refcount blocks */
	add(OP_WRITE, 500 * 1024 + 77, 1500);   /* unflushed when the snapshot is taken */
	/* Snapshot a shares all of that (and what s1 shares): every L2
	 * table and cluster after it is copied on write. */
	add_snap(OP_SNAP_CREATE, "a");
	add(OP_WRITE, 64 * 1024, 1024);         /* overwrite compressed, whole clusters */
	add(OP_ZERO, 0, 512);                   /* zero over a cluster already copied */
	add(OP_WRITE, 320 * 1024 + 700, 200);   /* COW from a compressed cluster a shares */
	add(OP_FLUSH, 0, 0);
	/* B: L1 growth. */
	add(OP_RESIZE, MAX_SIZE, 0);
	add(OP_FLUSH, 0, 0);
	/* The snapshots of the 1 MiB disk applied to the 4 MiB one: the size
	 * goes back (the L1 table with it), and what only the disk left
	 * reached is freed, new L2 tables past the old end among it. */
	add(OP_WRITE, (2u << 20) + 100, 3000);
	add(OP_WRITE, MAX_SIZE - 4096, 4096);
	add_snap(OP_SNAP_APPLY, "a");
	add(OP_WRITE, 100 * 1024 + 10, 2000);   /* COW: an L2 table shared with a */
	add_snap(OP_SNAP_APPLY, "s1");          /* the starting image's own snapshot */
	/* Clusters only s1 and the disk share (a has its own copies, made in
	 * A) copied, whole and from compressed ones ... */
	add(OP_WRITE, 512, 1024);
	add(OP_WRITE, 70000, 3000);
	add_snap(OP_SNAP_DELETE, "s1");         /* ... so deleting s1 frees them */
	add(OP_RESIZE, MAX_SIZE, 0);            /* the L1 table grows again */
	add(OP_WRITE, 600 * 1024, 3000);        /* unflushed when c is taken */
	/* Snapshot c of the 4 MiB disk: what C and D write over it is
	 * copied on write, and it stays to the end. */
	add_snap(OP_SNAP_CREATE, "c");
	/* C: fill the new area (the file passes what one refcount table
	 * cluster covers, so the table grows), with small operations between. */
	uint64_t off = 1u << 20;
	while (off < (7u << 19)) {
		uint64_t len = (64 + tap_rand(&s) % 192) * 1024;
		add(OP_WRITE, off, len);
		off += len;
		uint64_t r = tap_rand(&s);
		uint64_t at = (tap_rand(&s) % (off / cs)) * cs;
		switch (r % 4) {
		case 0: add(OP_WRITE, at + r % 300, 1 + r % 2000); break;
		case 1: add(OP_ZERO, at, cs * (1 + r % 8)); break;
		case 2: add(OP_DISCARD, at, cs * (1 + r % 8)); break;
		default: add(OP_FLUSH, 0, 0); break;
		}
	}
	add(OP_FLUSH, 0, 0);
	/* D: a random mix over the whole disk; on the way, a is deleted
	 * (what only it reached is freed) once the refcount table has grown. */
	for (int i = 0; i < 60; i++) {
		if (i == 30)
			add_snap(OP_SNAP_DELETE, "a");
		uint64_t r = tap_rand(&s);
		uint64_t at = tap_rand(&s) % MAX_SIZE;
		uint64_t c = at & ~(cs - 1);
		switch (r % 8) {
		case 0: case 1: case 2:
			add(OP_WRITE, at, qk_min_u64(1 + r % 5000, MAX_SIZE - at));
			break;
		case 3:
			add(OP_ZERO, at, qk_min_u64(1 + r % 3000, MAX_SIZE - at));
			break;
		case 4:
			add(OP_ZERO_UNMAP, c, qk_min_u64(cs * (1 + r % 6), MAX_SIZE - c));
			break;
		case 5:
			add(OP_DISCARD, c, qk_min_u64(cs * (1 + r % 6), MAX_SIZE - c));
			break;
		case 6:
			add(OP_COMPRESSED, c, cs);
			break;
		default:
			add(OP_FLUSH, 0, 0);
		}
	}
	add(OP_FLUSH, 0, 0);
}

/* The bytes operation i writes at guest offset o. */
static uint8_t op_byte(size_t i, uint64_t o)
{
	uint64_t v = (o + 1) * 0x9E3779B97F4A7C15ull ^ (i + 1) * 0xC2B2AE3D27D4EB4Full;
	return (uint8_t)((v >> 56) | 1);
}

static void op_fill(size_t i, uint8_t *buf, uint64_t off, uint64_t len)
{
	for (uint64_t j = 0; j < len; j++)
		buf[j] = op_byte(i, off + j);
}

/* ---- the model ------------------------------------------------------------------- */

/* An internal snapshot: its id, name, and the guest content and size when
 * it was taken. */
struct msnap {
	char id[24], name[32];
	uint64_t size;
	uint8_t *data;          /* MAX_SIZE bytes, the first `size` of them its content */
};

/* Guest content now and at the last completed flush (zeros past the
 * size), and the operations since it (the one that failed included); the
 * snapshots, as of the last snapshot call that completed (each of those
 * flushes, so an unfinished one is always the last operation since the
 * flush). */
struct model {
	uint64_t size, flushed_size;
	uint8_t *cur, *flushed;
	size_t since[MAX_OPS];
	size_t n_since;
	struct msnap snaps[MAX_SNAPS];  /* buffers of deleted ones kept past n_snaps */
	size_t n_snaps;
};

static uint8_t *initial;        /* guest content of START */
static uint64_t initial_size;
static struct msnap initial_snaps[MAX_SNAPS];   /* START's snapshots */
static size_t n_initial_snaps;

static void *xmalloc(size_t n)
{
	void *p = malloc(n);
	if (!p)
		qb_die("out of memory");
	return p;
}

/* Copy snapshot s into d, whose buffer is kept or made. */
static void snap_copy(struct msnap *d, const struct msnap *s)
{
	uint8_t *data = d->data ? d->data : xmalloc(MAX_SIZE);
	*d = *s;
	d->data = data;
	memcpy(d->data, s->data, s->size);
}

static void model_init(struct model *m)
{
	if (!m->cur) {
		m->cur = xmalloc(MAX_SIZE);
		m->flushed = xmalloc(MAX_SIZE);
	}
	memset(m->cur, 0, MAX_SIZE);
	memcpy(m->cur, initial, initial_size);
	memcpy(m->flushed, m->cur, MAX_SIZE);
	m->size = m->flushed_size = initial_size;
	m->n_since = 0;
	for (size_t k = 0; k < n_initial_snaps; k++)
		snap_copy(&m->snaps[k], &initial_snaps[k]);
	m->n_snaps = n_initial_snaps;
}

static void model_free(struct model *m)
{
	free(m->cur);
	free(m->flushed);
	for (size_t k = 0; k < MAX_SNAPS; k++)
		free(m->snaps[k].data);
}

/* The model's snapshot named `name`, or NULL. */
static const struct msnap *snap_named(const struct model *m, const char *name)
{
	for (size_t k = 0; k < m->n_snaps; k++)
		if (strcmp(m->snaps[k].name, name) == 0)
			return &m->snaps[k];
	return NULL;
}

/* The id qk_snapshot_create gives: one more than the largest numeric id. */
static void snap_next_id(const struct model *m, char *id, size_t len)
{
	unsigned long max = 0;
	for (size_t k = 0; k < m->n_snaps; k++)
		max = qk_max_u64(max, strtoul(m->snaps[k].id, NULL, 10));
	snprintf(id, len, "%lu", max + 1);
}

/* The range an operation may have changed: [*lo, *hi). */
static void op_range(const struct op *o, uint64_t *lo, uint64_t *hi)
{
	if (o->kind == OP_DISCARD) {    /* whole clusters only */
		*lo = (o->off + cs - 1) & ~(cs - 1);
		*hi = (o->off + o->len) & ~(cs - 1);
		if (*hi < *lo)
			*hi = *lo;
	} else if (o->kind == OP_RESIZE || o->kind == OP_FLUSH || is_snap(o->kind)) {
		*lo = *hi = 0;
	} else {
		*lo = o->off;
		*hi = o->off + o->len;
	}
}

/* May byte b read v, given what operation i does? */
static bool op_allows(size_t i, uint64_t b, uint8_t v)
{
	const struct op *o = &ops[i];
	uint64_t lo, hi;
	op_range(o, &lo, &hi);
	if (b < lo || b >= hi)
		return false;
	if (o->kind == OP_WRITE || o->kind == OP_COMPRESSED)
		return v == op_byte(i, b);
	return v == 0;
}

static void model_flush(struct model *m)
{
	uint64_t lo, hi;
	/* Only what changed since the last flush differs. */
	for (size_t k = 0; k < m->n_since; k++) {
		op_range(&ops[m->since[k]], &lo, &hi);
		memcpy(m->flushed + lo, m->cur + lo, hi - lo);
	}
	m->flushed_size = m->size;
	m->n_since = 0;
}

/* A snapshot call, done: its change, then the flush it makes. */
static void model_snapshot(struct model *m, const struct op *o)
{
	struct msnap *s;
	switch (o->kind) {
	case OP_SNAP_CREATE:
		if (m->n_snaps == MAX_SNAPS)
			qb_die("too many snapshots");
		s = &m->snaps[m->n_snaps];
		if (!s->data)
			s->data = xmalloc(MAX_SIZE);
		snap_next_id(m, s->id, sizeof s->id);
		snprintf(s->name, sizeof s->name, "%s", o->snap);
		s->size = m->size;
		memcpy(s->data, m->cur, m->size);
		m->n_snaps++;
		break;
	case OP_SNAP_APPLY:     /* all of the disk changes */
		if (!(s = (struct msnap *)snap_named(m, o->snap)))
			qb_die("the workload applies a snapshot that is not there");
		memcpy(m->cur, s->data, s->size);
		if (m->size > s->size)
			memset(m->cur + s->size, 0, m->size - s->size);
		uint64_t span = qk_max_u64(qk_max_u64(m->size, m->flushed_size), s->size);
		memcpy(m->flushed, m->cur, span);
		m->size = s->size;
		break;
	default:        /* OP_SNAP_DELETE: its buffer moves past the list */
		if (!(s = (struct msnap *)snap_named(m, o->snap)))
			qb_die("the workload deletes a snapshot that is not there");
		struct msnap gone = *s;
		size_t k = (size_t)(s - m->snaps);
		memmove(s, s + 1, (m->n_snaps - k - 1) * sizeof *s);
		m->snaps[--m->n_snaps] = gone;
		break;
	}
	model_flush(m);
}

static void model_apply(struct model *m, size_t i)
{
	const struct op *o = &ops[i];
	uint64_t lo, hi;
	if (o->kind == OP_FLUSH) {
		model_flush(m);
		return;
	}
	if (is_snap(o->kind)) {
		model_snapshot(m, o);
		return;
	}
	if (o->kind == OP_RESIZE) {
		m->size = o->off;
		return;
	}
	op_range(o, &lo, &hi);
	if (o->kind == OP_WRITE || o->kind == OP_COMPRESSED)
		op_fill(i, m->cur + lo, lo, hi - lo);
	else
		memset(m->cur + lo, 0, hi - lo);
}

/* The snapshot call the model is in the middle of (it failed, or the
 * power went during it), or NULL. */
static const struct op *unfinished_snap(const struct model *m)
{
	const struct op *o = m->n_since ? &ops[m->since[m->n_since - 1]] : NULL;
	return o && is_snap(o->kind) ? o : NULL;
}

/*
 * Does `got` (the guest content, `size` bytes) agree with the model? With
 * `exact`, every completed operation must show (the handle that did them
 * reads); else the content at the last flush, or a value written since.
 * During an unfinished apply the snapshot's whole disk (size and content)
 * passes too. Says where it does not, into why.
 */
static bool model_matches(const struct model *m, const uint8_t *got, uint64_t size, bool exact,
			  char *why, size_t why_len)
{
	/* An unfinished apply: the snapshot's disk, whole, or the old one. */
	const struct op *u = unfinished_snap(m);
	const struct msnap *sn = u && u->kind == OP_SNAP_APPLY ? snap_named(m, u->snap) : NULL;
	if (sn && size == sn->size && memcmp(got, sn->data, size) == 0)
		return true;
	bool size_ok = size == m->flushed_size || size == m->size;
	for (size_t k = 0; k < m->n_since && !size_ok; k++)
		size_ok = ops[m->since[k]].kind == OP_RESIZE && ops[m->since[k]].off == size;
	if (!size_ok) {
		snprintf(why, why_len, "guest size %llu, want %llu (flushed %llu)%s",
			 (unsigned long long)size, (unsigned long long)m->size,
			 (unsigned long long)m->flushed_size,
			 sn ? ", or the applied snapshot's whole disk" : "");
		return false;
	}
	const uint8_t *ref = exact ? m->cur : m->flushed;
	for (uint64_t b = 0; b < size; b++) {
		if (b % 4096 == 0 && size - b >= 4096 && memcmp(got + b, ref + b, 4096) == 0) {
			b += 4095;
			continue;
		}
		if (got[b] == ref[b])
			continue;
		bool ok = false;
		/* exact: only the last, failed, operation may be half done */
		size_t from = exact && m->n_since ? m->n_since - 1 : 0;
		for (size_t k = from; k < m->n_since && !ok; k++)
			ok = op_allows(m->since[k], b, got[b]);
		if (!ok) {
			snprintf(why, why_len, "guest byte %llu reads 0x%02x, want 0x%02x%s%s",
				 (unsigned long long)b, got[b], ref[b],
				 exact ? "" : " (as flushed) or a value written since",
				 sn ? ", or the applied snapshot's whole disk" : "");
			return false;
		}
	}
	return true;
}

/* Does the listing l[n] name the snapshots want[nw], in order (ids,
 * names, sizes)? */
static bool list_is(const struct qk_snapshot *l, size_t n, const struct msnap *const *want,
		    size_t nw)
{
	if (n != nw)
		return false;
	for (size_t k = 0; k < n; k++)
		if (strcmp(l[k].id, want[k]->id) || strcmp(l[k].name, want[k]->name) ||
		    l[k].disk_size != want[k]->size)
			return false;
	return true;
}

/* "id name, id name" of a listing or of a model's list, into buf. */
static void list_text(const struct qk_snapshot *l, const struct msnap *const *w, size_t n,
		      char *buf, size_t len)
{
	size_t at = 0;
	buf[0] = '\0';
	for (size_t k = 0; k < n && at < len; k++)
		at += (size_t)snprintf(buf + at, len - at, "%s%s %s", k ? ", " : "",
				       l ? l[k].id : w[k]->id, l ? l[k].name : w[k]->name);
}

static char image_name[4096];    /* DIR/cut.qcow2: the name the backing resolves from */

/*
 * Does the handle img list the model's snapshots, or, when a create or
 * delete is unfinished, the list it makes? With `content`, each snapshot
 * listed is then opened from image_name (read-only, by its id) and must
 * hold the model's content for it: for a create in progress, the guest
 * content when it started. Says where not, into why.
 */
static bool snaps_match(const struct model *m, qk_image *img, bool content, char *why,
			size_t why_len)
{
	const struct qk_snapshot *l;
	size_t n;
	if (qk_list_snapshots(img, &l, &n) < 0) {
		snprintf(why, why_len, "listing the snapshots failed: %s", qk_last_error());
		return false;
	}
	const struct msnap *old[MAX_SNAPS], *new[MAX_SNAPS + 1];
	size_t n_old = m->n_snaps, n_new = 0;
	struct msnap made = { .size = m->size, .data = m->cur };
	const struct op *u = unfinished_snap(m);
	for (size_t k = 0; k < n_old; k++) {
		old[k] = &m->snaps[k];
		if (!u || u->kind != OP_SNAP_DELETE || strcmp(old[k]->name, u->snap))
			new[n_new++] = old[k];
	}
	if (u && u->kind == OP_SNAP_CREATE) {
		snap_next_id(m, made.id, sizeof made.id);
		snprintf(made.name, sizeof made.name, "%s", u->snap);
		new[n_new++] = &made;
	}
	const struct msnap *const *want = old;
	size_t nw = n_old;
	if (!list_is(l, n, old, n_old)) {
		want = new;
		nw = n_new;
		if (!u || u->kind == OP_SNAP_APPLY || !list_is(l, n, new, n_new)) {
			char got[96], w1[96], w2[96];
			list_text(l, NULL, n, got, sizeof got);
			list_text(NULL, old, n_old, w1, sizeof w1);
			list_text(NULL, new, n_new, w2, sizeof w2);
			snprintf(why, why_len, "snapshots listed: [%s], want [%s]%s%s%s", got, w1,
				 u && u->kind != OP_SNAP_APPLY ? " or [" : "",
				 u && u->kind != OP_SNAP_APPLY ? w2 : "",
				 u && u->kind != OP_SNAP_APPLY ? "]" : "");
			return false;
		}
	}
	static uint8_t *buf;
	if (!buf)
		buf = xmalloc(MAX_SIZE);
	for (size_t k = 0; content && k < nw; k++) {
		struct qk_open_options o;
		qk_image *si;
		qk_open_options_init(&o);
		o.snapshot = want[k]->id;
		if (qk_open(image_name, &o, &si) < 0) {
			snprintf(why, why_len, "opening snapshot %s failed: %s", want[k]->id,
				 qk_last_error());
			return false;
		}
		uint64_t size = qk_get_size(si);
		int ret = size == want[k]->size ? qk_pread(si, buf, size, 0) : 0;
		char err[256];
		snprintf(err, sizeof err, "%s", ret < 0 ? qk_last_error() : "");
		bool same = size == want[k]->size && ret == 0 && memcmp(buf, want[k]->data, size) == 0;
		uint64_t b = 0;
		while (!same && ret == 0 && b < size && buf[b] == want[k]->data[b])
			b++;
		qk_close(si);
		if (size != want[k]->size)
			snprintf(why, why_len, "snapshot %s %s: guest size %llu, want %llu",
				 want[k]->id, want[k]->name, (unsigned long long)size,
				 (unsigned long long)want[k]->size);
		else if (ret < 0)
			snprintf(why, why_len, "snapshot %s %s: read failed: %s", want[k]->id,
				 want[k]->name, err);
		else if (!same)
			snprintf(why, why_len, "snapshot %s %s: guest byte %llu reads 0x%02x, want 0x%02x",
				 want[k]->id, want[k]->name, (unsigned long long)b, buf[b],
				 want[k]->data[b]);
		if (!same)
			return false;
	}
	return true;
}

/* ---- one run of the workload ------------------------------------------------------ */

static uint8_t *start_buf;
static size_t start_len;

struct run {
	size_t failed_op;        /* index of the failing operation, or n_ops */
	int ret;                 /* its return */
	int err;                 /* qk_last_errno() then */
	char msg[512];
	bool read_ok;            /* after the failure, the handle read as the model */
	char read_why[512];
};

static int do_op(qk_image *img, size_t i, uint8_t *buf)
{
	const struct op *o = &ops[i];
	switch (o->kind) {
	case OP_WRITE:
		op_fill(i, buf, o->off, o->len);
		return qk_pwrite(img, buf, o->len, o->off);
	case OP_COMPRESSED:
		op_fill(i, buf, o->off, o->len);
		return qk_write_compressed(img, buf, o->len, o->off);
	case OP_ZERO:
		return qk_write_zeroes(img, o->off, o->len, 0);
	case OP_ZERO_UNMAP:
		return qk_write_zeroes(img, o->off, o->len, QK_ZERO_MAY_UNMAP);
	case OP_DISCARD:
		return qk_discard(img, o->off, o->len);
	case OP_FLUSH:
		return qk_flush(img);
	case OP_RESIZE:
		return qk_resize(img, o->off, 0);
	case OP_SNAP_CREATE:
		return qk_snapshot_create(img, o->snap);
	case OP_SNAP_APPLY:
		return qk_snapshot_apply(img, o->snap);
	case OP_SNAP_DELETE:
		return qk_snapshot_delete(img, NULL, o->snap);
	}
	return -EINVAL;
}

/* Run the workload on a fresh copy of START through controller ft, until
 * the first failure. `check_handle`: then read the whole guest through the
 * handle and compare. The handle is closed at the end. */
static bool trace;

static int run_workload(struct qk__fault *ft, struct model *m, struct run *r, bool check_handle)
{
	struct qk__file *mem, *f;
	struct qk_open_options o;
	qk_image *img;
	static uint8_t *buf;
	if (!buf && !(buf = malloc(MAX_SIZE)))
		qb_die("out of memory");
	memset(r, 0, sizeof *r);
	r->failed_op = n_ops;
	r->read_ok = true;
	model_init(m);
	qk_open_options_init(&o);
	o.flags = QK_OPEN_RDWR;
	qk__api_enter("qk_open");
	int ret = qk__file_open_mem(start_buf, start_len, image_name, &mem);
	if (ret == 0)
		ret = qk__file_open_fault(ft, mem, &f);
	if (ret == 0)
		ret = qk__image_open_file(&qk__posix_host, f, image_name, &o, NULL, &img);
	if (ret < 0) {
		r->failed_op = 0;
		r->ret = ret;
		r->err = qk_last_errno();
		snprintf(r->msg, sizeof r->msg, "%s", qk_last_error());   /* "qk_open: ..." */
		return ret;
	}
	for (size_t i = 0; i < n_ops; i++) {
		m->since[m->n_since++] = i;
		if (trace)
			fprintf(stderr, "op %zu (kind %d) starts after write %llu, sync %llu, read %llu\n",
				i, (int)ops[i].kind,
				(unsigned long long)qk__fault_count(ft, QK__FAULT_WRITE),
				(unsigned long long)qk__fault_count(ft, QK__FAULT_SYNC),
				(unsigned long long)qk__fault_count(ft, QK__FAULT_READ));
		ret = do_op(img, i, buf);
		if (ret < 0) {
			r->failed_op = i;
			r->ret = ret;
			r->err = qk_last_errno();
			snprintf(r->msg, sizeof r->msg, "%s", qk_last_error());
			break;
		}
		model_apply(m, i);
	}
	if (ret < 0 && check_handle) {
		uint64_t size = qk_get_size(img);
		int rr = qk_pread(img, buf, size, 0);
		if (rr < 0) {
			r->read_ok = false;
			snprintf(r->read_why, sizeof r->read_why, "read failed: %s", qk_last_error());
		} else {
			r->read_ok = model_matches(m, buf, size, true, r->read_why, sizeof r->read_why);
		}
		/* The handle's list: the old one or the new (the contents are
		 * checked in the image left, after the close). */
		if (r->read_ok)
			r->read_ok = snaps_match(m, img, false, r->read_why, sizeof r->read_why);
	}
	qk_close(img);
	return ret;
}

/* ---- checking an image ------------------------------------------------------------- */

static const char *qemu_img = "qemu-img";
static const char *qcowkit_prog;

/* qemu-img check of the image: no corruptions, no check errors (leaks
 * allowed; *rc 3 says there are some). False with the reason in why. */
static bool qemu_check(char *out, size_t cap, int *rc, char *why, size_t why_len)
{
	char *qargv[] = { (char *)qemu_img, "check", "--output=json", "-f", "qcow2",
			  image_name, NULL };
	*rc = run_prog(qargv, out, cap);
	uint64_t corrupt = json_num(out, "corruptions"), cerr = json_num(out, "check-errors");
	if ((*rc != 0 && *rc != 3) || corrupt || cerr || !strstr(out, "\"check-errors\"")) {
		snprintf(why, why_len, "qemu-img check: exit %d, %llu corruptions, %llu check errors",
			 *rc, (unsigned long long)corrupt, (unsigned long long)cerr);
		return false;
	}
	return true;
}

struct stats {
	uint64_t points, failed, leaky, dirty, torn, kept, errors_seen, no_error;
	uint64_t repair_points;  /* of the points: cuts during the repair of a dirty image */
	uint64_t snap_points;    /* of the points: the cut or error during a snapshot call */
};

static void count_snap(struct stats *st, const struct run *r)
{
	if (r->failed_op < n_ops && is_snap(ops[r->failed_op].kind))
		st->snap_points++;
}

/*
 * The checks of one image (bytes, len) against model m; `point` names it
 * in messages. Returns true when all passed.
 */
static bool check_image(const void *bytes, size_t len, const struct model *m, const char *point,
			struct stats *st, bool use_cli)
{
	char why[512] = "";
	char out[8192];
	qk_image *img = NULL;
	struct qk_open_options o;
	uint8_t *got = NULL;
	bool ok = false;
	if (!write_file(image_name, bytes, len)) {
		snprintf(why, sizeof why, "cannot write the image file");
		goto done;
	}
	bool dirty = len >= HDR_INCOMPAT + 8 &&
		     (qk_be64((const uint8_t *)bytes + HDR_INCOMPAT) & INCOMPAT_DIRTY);
	int rc = 0;
	/* qemu-img check sees the image as the cut left it; a dirty one
	 * (lazy refcounts) only after the read-write open that repairs it. */
	if (!dirty && !qemu_check(out, sizeof out, &rc, why, sizeof why))
		goto done;
	/* The image opens read-write. */
	qk_open_options_init(&o);
	o.flags = QK_OPEN_RDWR;
	if (qk_open(image_name, &o, &img) < 0) {
		snprintf(why, sizeof why, "read-write open failed: %s", qk_last_error());
		goto done;
	}
	if (qk_close(img) < 0) {
		img = NULL;
		snprintf(why, sizeof why, "close after the read-write open failed: %s", qk_last_error());
		goto done;
	}
	img = NULL;
	if (dirty) {
		st->dirty++;
		if (!qemu_check(out, sizeof out, &rc, why, sizeof why))
			goto done;
	}
	if (rc == 3)
		st->leaky++;
	/* Leaks repaired: by the program every so often, else in process. */
	if (use_cli && qcowkit_prog) {
		char *cargv[] = { (char *)qcowkit_prog, "check", "-r", "leaks", image_name, NULL };
		rc = run_prog(cargv, out, sizeof out);
		if (rc != 0) {
			snprintf(why, sizeof why, "qcowkit check -r leaks: exit %d", rc);
			goto done;
		}
	} else {
		struct qk_check_result res = { .struct_size = sizeof res };
		o.flags = QK_OPEN_RDWR | QK_OPEN_CHECK;
		if (qk_open(image_name, &o, &img) < 0 ||
		    qk_check(img, QK_CHECK_FIX_LEAKS, &res, NULL, NULL) < 0) {
			snprintf(why, sizeof why, "check -r leaks failed: %s", qk_last_error());
			goto done;
		}
		int cr = qk_close(img);
		img = NULL;
		if (cr < 0 || res.corruptions || res.leaks || res.check_errors) {
			snprintf(why, sizeof why, "after check -r leaks: %llu corruptions, %llu leaks, "
				 "%llu check errors%s", (unsigned long long)res.corruptions,
				 (unsigned long long)res.leaks, (unsigned long long)res.check_errors,
				 cr < 0 ? ", close failed" : "");
			goto done;
		}
	}
	/* Clean now, and the content is what was flushed. */
	struct qk_check_result res = { .struct_size = sizeof res };
	qk_open_options_init(&o);
	if (qk_open(image_name, &o, &img) < 0) {
		snprintf(why, sizeof why, "read-only open failed: %s", qk_last_error());
		goto done;
	}
	if (qk_check(img, 0, &res, NULL, NULL) < 0 || res.corruptions || res.leaks ||
	    res.check_errors) {
		snprintf(why, sizeof why, "not clean after the repair: %llu corruptions, %llu leaks",
			 (unsigned long long)res.corruptions, (unsigned long long)res.leaks);
		goto done;
	}
	uint64_t size = qk_get_size(img);
	if (size > MAX_SIZE) {
		snprintf(why, sizeof why, "guest size %llu", (unsigned long long)size);
		goto done;
	}
	if (!(got = malloc(size ? size : 1)))
		qb_die("out of memory");
	if (qk_pread(img, got, size, 0) < 0) {
		snprintf(why, sizeof why, "read failed: %s", qk_last_error());
		goto done;
	}
	ok = model_matches(m, got, size, false, why, sizeof why) &&
	     snaps_match(m, img, true, why, sizeof why);
done:
	if (img)
		qk_close(img);
	free(got);
	st->points++;
	if (!ok) {
		st->failed++;
		fprintf(stderr, "FAIL: %s: %s\n", point, why);
		/* Keep the first failing image for a look. */
		char keep[4200];
		snprintf(keep, sizeof keep, "%s.fail", image_name);
		if (access(keep, F_OK) != 0)
			write_file(keep, bytes, len);
	}
	return ok;
}

/* ---- the walks -------------------------------------------------------------------- */

/* Open the image in bytes read-write through controller ft, as the
 * repair of a dirty image does, and close it. */
static int open_through(struct qk__fault *ft, const void *bytes, size_t len)
{
	struct qk__file *mem, *f;
	struct qk_open_options o;
	qk_image *img;
	qk_open_options_init(&o);
	o.flags = QK_OPEN_RDWR;
	qk__api_enter("qk_open");
	int ret = qk__file_open_mem(bytes, len, image_name, &mem);
	if (ret == 0)
		ret = qk__file_open_fault(ft, mem, &f);
	if (ret == 0)
		ret = qk__image_open_file(&qk__posix_host, f, image_name, &o, NULL, &img);
	return ret < 0 ? ret : qk_close(img);
}

/*
 * A dirty image (lazy refcounts) is repaired by the next read-write open:
 * cut the power at every write of that repair too. What is left must be
 * repaired by the open after, and pass the same checks.
 */
static void walk_repair(const void *bytes, size_t len, const struct model *m, const char *what,
			struct stats *st)
{
	uint8_t *copy = malloc(len ? len : 1);
	struct qk__fault *ft = qk__fault_new();
	char point[256];
	if (!copy || !ft)
		qb_die("out of memory");
	memcpy(copy, bytes, len);       /* check_image below reuses nothing of it */
	if (open_through(ft, copy, len) < 0) {
		st->points++;
		st->failed++;
		fprintf(stderr, "FAIL: %s: the repairing open failed: %s\n", what, qk_last_error());
	}
	uint64_t writes = qk__fault_count(ft, QK__FAULT_WRITE);
	qk__fault_free(ft);
	for (uint64_t n = 1; n <= writes; n++) {
		ft = qk__fault_new();
		if (!ft)
			qb_die("out of memory");
		qk__fault_cut(ft, n, 0, n % 2 == 0);
		open_through(ft, copy, len);
		snprintf(point, sizeof point, "%s, then a power cut at write %llu/%llu of its repair",
			 what, (unsigned long long)n, (unsigned long long)writes);
		size_t dlen;
		const void *d = qk__fault_durable(ft, &dlen);
		st->repair_points++;
		check_image(d, dlen, m, point, st, false);
		qk__fault_free(ft);
	}
	free(copy);
}

static int walk_cut(uint64_t writes, uint64_t stride, uint64_t offset, struct stats *st)
{
	struct model m = { 0 };
	char point[128];
	uint64_t dirty_seen = 0;
	for (uint64_t n = 1 + offset; n <= writes; n += stride) {
		struct qk__fault *ft = qk__fault_new();
		if (!ft)
			qb_die("out of memory");
		/* The variant turns with the point number divided by the stride,
		 * so every variant comes up whatever the stride. */
		unsigned variant = (unsigned)((n / stride) % 3);
		bool keep = variant == 2;
		/* Torn: the first 2 to 5.5 KiB land, in whole sectors; a shorter
		 * write (most metadata updates) lands whole. */
		uint64_t torn = variant == 1 ? 2048 + 512 * (n % 8) : 0;
		struct run r;
		qk__fault_cut(ft, n, torn, keep);
		run_workload(ft, &m, &r, false);
		snprintf(point, sizeof point, "power cut at write %llu/%llu (%s), during operation %zu",
			 (unsigned long long)n, (unsigned long long)writes,
			 keep ? "earlier writes kept" : torn ? "torn" : "unsynced writes lost",
			 r.failed_op);
		if (!qk__fault_was_cut(ft)) {
			st->points++;
			st->failed++;
			fprintf(stderr, "FAIL: %s: the workload never reached it\n", point);
		} else {
			size_t len;
			const void *d = qk__fault_durable(ft, &len);
			count_snap(st, &r);
			if (torn)
				st->torn++;
			if (keep)
				st->kept++;
			bool dirty = len >= HDR_INCOMPAT + 8 &&
				     (qk_be64((const uint8_t *)d + HDR_INCOMPAT) & INCOMPAT_DIRTY);
			/* check_image writes the file; the repair walk works
			 * on the bytes, so take them first. */
			uint8_t *keepd = NULL;
			if (dirty)
				dirty_seen++;
			/* Two of them (one under the sanitizers), at different
			 * stages of the workload. */
			if (dirty && (dirty_seen == 50 || dirty_seen == 250) && (keepd = malloc(len)))
				memcpy(keepd, d, len);
			check_image(d, len, &m, point, st, n % 16 == 1);
			if (keepd)
				walk_repair(keepd, len, &m, point, st);
			free(keepd);
		}
		qk__fault_free(ft);
	}
	model_free(&m);
	return 0;
}

static void walk_errors(enum qk__fault_kind kind, uint64_t count, uint64_t stride,
			uint64_t offset, struct stats *st)
{
	struct model m = { 0 };
	char point[160];
	for (uint64_t n = 1 + offset; n <= count; n += stride) {
		struct qk__fault *ft = qk__fault_new();
		if (!ft)
			qb_die("out of memory");
		bool nospc = kind == QK__FAULT_WRITE && (n / stride) % 2;
		int err = nospc ? ENOSPC : EIO;
		qk__fault_fail(ft, kind, n, err, nospc);
		struct run r;
		run_workload(ft, &m, &r, true);
		snprintf(point, sizeof point, "%s %llu/%llu fails with %s%s, during operation %zu",
			 kind == QK__FAULT_WRITE ? "write" : kind == QK__FAULT_SYNC ? "sync" : "read",
			 (unsigned long long)n,
			 (unsigned long long)count, nospc ? "ENOSPC" : "EIO",
			 nospc ? " from then on" : " once", r.failed_op);
		bool ok = true;
		if (r.failed_op == n_ops) {
			/* Some writes may fail harmlessly (a hole not punched, a
			 * zeroing that falls back): success is a fine answer too. */
			st->no_error++;
		} else {
			st->errors_seen++;
			count_snap(st, &r);
			if (trace)
				fprintf(stderr, "%s: \"%s\"\n", point, r.msg);
			char want[64];
			snprintf(want, sizeof want, "%s", strerror(err));
			if (r.ret != -err || r.err != err || !tap_one_line(r.msg) ||
			    !tap_contains(r.msg, want) || strncmp(r.msg, "qk_", 3) != 0) {
				fprintf(stderr, "FAIL: %s: returned %d, errno %d, message \"%s\"\n",
					point, r.ret, r.err, r.msg);
				ok = false;
			}
			if (!r.read_ok) {
				fprintf(stderr, "FAIL: %s: the handle then reads wrong: %s\n", point,
					r.read_why);
				ok = false;
			}
		}
		size_t len;
		const void *v = qk__fault_volatile(ft, &len);
		if (!v) {
			fprintf(stderr, "FAIL: %s: no image left\n", point);
			ok = false;
		}
		if (!ok) {
			st->points++;
			st->failed++;
		} else {
			check_image(v, len, &m, point, st, n % 16 == 1);
		}
		qk__fault_free(ft);
	}
	model_free(&m);
}

int main(int argc, char **argv)
{
	if (argc < 4 || (strcmp(argv[1], "cut") && strcmp(argv[1], "errors"))) {
		fprintf(stderr, "usage: fault-walk cut|errors START DIR [STRIDE [OFFSET]]\n");
		return 2;
	}
	uint64_t stride = argc > 4 ? strtoull(argv[4], NULL, 10) : 1;
	uint64_t offset = argc > 5 ? strtoull(argv[5], NULL, 10) : 0;
	if (stride == 0)
		stride = 1;
	if (getenv("QEMU_IMG"))
		qemu_img = getenv("QEMU_IMG");
	qcowkit_prog = getenv("QCOWKIT");
	snprintf(image_name, sizeof image_name, "%s/cut.qcow2", argv[3]);
	if (!read_whole(argv[2], &start_buf, &start_len)) {
		fprintf(stderr, "fault-walk: cannot read %s\n", argv[2]);
		return 2;
	}
	/* The starting guest content, read by the library. */
	qk_image *img;
	struct qk_open_options o;
	qk_open_options_init(&o);
	if (qk_open(argv[2], &o, &img) < 0) {
		fprintf(stderr, "fault-walk: %s\n", qk_last_error());
		return 2;
	}
	initial_size = qk_get_size(img);
	struct qk_info info = { .struct_size = sizeof info };
	/* FAULT_WALK_OTHER=1: any cluster size (other starting images, for
	 * exploring), without the growth checks that need 512 bytes. */
	bool other = getenv("FAULT_WALK_OTHER") != NULL;
	if (initial_size > MAX_SIZE || qk_get_info(img, &info) < 0 ||
	    (info.cluster_size != cs && !other) || info.cluster_size > 65536 ||
	    !(initial = calloc(1, MAX_SIZE)) ||
	    qk_pread(img, initial, initial_size, 0) < 0) {
		fprintf(stderr, "fault-walk: %s: not the starting image expected (%s)\n", argv[2],
			qk_last_error());
		return 2;
	}
	cs = info.cluster_size;
	/* Its snapshots and their contents (s1). */
	const struct qk_snapshot *sl;
	size_t sn;
	if (qk_list_snapshots(img, &sl, &sn) < 0 || sn > MAX_SNAPS) {
		fprintf(stderr, "fault-walk: %s: cannot list its snapshots (%s)\n", argv[2],
			qk_last_error());
		return 2;
	}
	for (size_t k = 0; k < sn; k++) {
		struct msnap *s = &initial_snaps[k];
		qk_image *si;
		snprintf(s->id, sizeof s->id, "%s", sl[k].id);
		snprintf(s->name, sizeof s->name, "%s", sl[k].name);
		s->size = sl[k].disk_size;
		s->data = calloc(1, MAX_SIZE);
		o.snapshot = s->id;
		if (!s->data || s->size > MAX_SIZE || qk_open(argv[2], &o, &si) < 0 ||
		    qk_pread(si, s->data, s->size, 0) < 0) {
			fprintf(stderr, "fault-walk: %s: cannot read snapshot %s (%s)\n", argv[2],
				s->id, qk_last_error());
			return 2;
		}
		qk_close(si);
	}
	n_initial_snaps = sn;
	qk_close(img);
	make_workload(0x5eed);
	trace = getenv("FAULT_WALK_TRACE") != NULL;
	if (getenv("FAULT_WALK_LIST"))          /* for a look at a failing point */
		for (size_t i = 0; i < n_ops; i++)
			fprintf(stderr, "op %zu: kind %d off %llu len %llu%s%s\n", i, (int)ops[i].kind,
				(unsigned long long)ops[i].off, (unsigned long long)ops[i].len,
				ops[i].snap ? " snapshot " : "", ops[i].snap ? ops[i].snap : "");

	/* The counting run: no faults; the image must end as the model. */
	struct stats st = { 0 };
	struct model m = { 0 };
	struct run r;
	struct qk__fault *ft = qk__fault_new();
	if (!ft)
		return 2;
	clock_t t0 = clock();
	run_workload(ft, &m, &r, false);
	uint64_t writes = qk__fault_count(ft, QK__FAULT_WRITE);
	uint64_t syncs = qk__fault_count(ft, QK__FAULT_SYNC);
	uint64_t reads = qk__fault_count(ft, QK__FAULT_READ);
	if (r.failed_op != n_ops) {
		fprintf(stderr, "FAIL: the workload without faults failed at operation %zu: %s\n",
			r.failed_op, r.msg);
		return 1;
	}
	size_t len;
	const void *d = qk__fault_durable(ft, &len);
	check_image(d, len, &m, "the workload without faults", &st, true);
	/* It did grow the L1 table and move the refcount table (both need
	 * what is in use to pass a cluster of each). */
	const uint8_t *h0 = start_buf, *h1 = d;
	if (!other && (len < 112 || qk_be32(h1 + HDR_L1_SIZE) <= qk_be32(h0 + HDR_L1_SIZE) ||
		       qk_be32(h1 + HDR_RT_CLUSTERS) <= qk_be32(h0 + HDR_RT_CLUSTERS))) {
		fprintf(stderr, "FAIL: the workload did not grow both the L1 table and the refcount table\n");
		st.failed++;
	}
	model_free(&m);
	qk__fault_free(ft);
	printf("workload: %zu operations, %llu writes, %llu syncs, %llu reads of the image file\n",
	       n_ops, (unsigned long long)writes, (unsigned long long)syncs,
	       (unsigned long long)reads);
	fflush(stdout);
	if (st.failed)
		return 1;
	memset(&st, 0, sizeof st);
	if (strcmp(argv[1], "cut") == 0) {
		walk_cut(writes, stride, offset, &st);
		bool lazy = start_len >= 112 && (qk_be64(start_buf + HDR_COMPAT) & COMPAT_LAZY_REFCOUNTS);
		if (lazy && !st.dirty) {
			fprintf(stderr, "FAIL: lazy refcounts, yet no cut left a dirty image\n");
			st.failed++;
		}
		printf("power cuts: %llu points (%llu torn, %llu with earlier writes kept, %llu "
		       "during the repair of a dirty image, %llu during snapshot calls): %llu "
		       "passed, %llu failed; %llu left leaks, %llu opened dirty (repaired)\n",
		       (unsigned long long)st.points, (unsigned long long)st.torn,
		       (unsigned long long)st.kept, (unsigned long long)st.repair_points,
		       (unsigned long long)st.snap_points,
		       (unsigned long long)(st.points - st.failed),
		       (unsigned long long)st.failed, (unsigned long long)st.leaky,
		       (unsigned long long)st.dirty);
	} else {
		walk_errors(QK__FAULT_WRITE, writes, stride, offset, &st);
		walk_errors(QK__FAULT_SYNC, syncs, stride, offset, &st);
		walk_errors(QK__FAULT_READ, reads, stride, offset, &st);
		printf("I/O errors: %llu points (%llu reported, %llu of them by snapshot calls; "
		       "%llu absorbed): %llu passed, %llu failed; %llu left leaks\n",
		       (unsigned long long)st.points, (unsigned long long)st.errors_seen,
		       (unsigned long long)st.snap_points, (unsigned long long)st.no_error,
		       (unsigned long long)(st.points - st.failed), (unsigned long long)st.failed,
		       (unsigned long long)st.leaky);
	}
	printf("%.1f s of CPU\n", (double)(clock() - t0) / CLOCKS_PER_SEC);
	return st.failed ? 1 : 0;
}
