/*
 * test-map: QCOW2 guest-to-host translation (lib/qcow2/map.c) on the
 * memory backend. Each scenario builds an image with known L2 entries and
 * records, for every cluster (or subcluster with extended L2) it sets, what
 * block status must say about it; reads must return the guest pattern in
 * data units and zeros elsewhere (no backing file). Then qk_pread,
 * qk_preadv and qk_block_status are compared with that model at unit and
 * table boundaries and at random places. Corrupt metadata must give -EIO
 * with a message naming the problem.
 *
 * QK_TEST_DUMP=dir writes every scenario image to dir/<name>.qcow2 with the
 * expected guest content (<name>.raw, sparse) and the expected status of
 * each unit (<name>.units: offset, size, QK_EXTENT_* flags, host offset),
 * so the model itself can be checked against QEMU: `qemu-img compare -f
 * qcow2 -F raw x.qcow2 x.raw` and `qemu-img map --output=json x.qcow2`
 * (both agreed when these tests were written). QK_TEST_VERBOSE=1 prints
 * the corruption messages.
 */
#include "tap.h"

/* Block status of one unit, as qk_block_status reports it without a
 * backing file. */
#define F_UNALLOC    (QK_EXTENT_ZERO)
#define F_UALLOC     (QK_EXTENT_ZERO | QK_EXTENT_OFFSET)
#define F_ZERO_PLAIN (QK_EXTENT_PRESENT | QK_EXTENT_ZERO)
#define F_ZERO_ALLOC (QK_EXTENT_PRESENT | QK_EXTENT_ZERO | QK_EXTENT_OFFSET)
#define F_NORMAL     (QK_EXTENT_PRESENT | QK_EXTENT_DATA | QK_EXTENT_OFFSET)
#define F_COMP       (QK_EXTENT_PRESENT | QK_EXTENT_DATA | QK_EXTENT_COMPRESSED)

struct unit {
	uint64_t idx;        /* unit number: guest offset >> unit_bits */
	uint32_t flags;
	uint64_t host;       /* host offset of the unit when F has OFFSET */
};

struct model {
	const char *name;
	struct qb b;
	uint32_t unit_bits;
	uint64_t us;         /* unit size */
	struct unit *u;
	size_t n, cap;
	bool sorted;
};

static void model_init(struct model *m, const char *name, uint32_t version, uint32_t cb,
		       uint64_t size, bool extl2, uint32_t compression)
{
	memset(m, 0, sizeof *m);
	m->name = name;
	qb_init(&m->b, version, cb, size);
	m->b.extl2 = extl2;
	m->b.compression = compression;
	qb_layout(&m->b);
	m->unit_bits = extl2 ? cb - 5 : cb;
	m->us = 1ull << m->unit_bits;
}

static void model_free(struct model *m)
{
	qb_free(&m->b);
	free(m->u);
}

static void model_set(struct model *m, uint64_t idx, uint32_t flags, uint64_t host)
{
	for (size_t i = 0; i < m->n; i++)
		if (m->u[i].idx == idx) {
			m->u[i].flags = flags;
			m->u[i].host = host;
			return;
		}
	if (m->n == m->cap) {
		m->cap = m->cap ? 2 * m->cap : 64;
		m->u = realloc(m->u, m->cap * sizeof *m->u);
		if (!m->u)
			abort();
	}
	m->u[m->n++] = (struct unit){ idx, flags, host };
	m->sorted = false;
}

static int unit_cmp(const void *a, const void *b)
{
	const struct unit *x = a, *y = b;
	return x->idx < y->idx ? -1 : x->idx > y->idx;
}

static void model_sort(struct model *m)
{
	if (!m->sorted) {
		qsort(m->u, m->n, sizeof *m->u, unit_cmp);
		m->sorted = true;
	}
}

/* The unit idx, or NULL when the model does not mention it (unallocated). */
static const struct unit *model_find(struct model *m, uint64_t idx)
{
	size_t lo = 0, hi = m->n;
	while (lo < hi) {
		size_t mid = (lo + hi) / 2;
		if (m->u[mid].idx < idx)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo < m->n && m->u[lo].idx == idx ? &m->u[lo] : NULL;
}

/* The first unit mentioned at or after idx, or UINT64_MAX. */
static uint64_t model_next(struct model *m, uint64_t idx)
{
	size_t lo = 0, hi = m->n;
	while (lo < hi) {
		size_t mid = (lo + hi) / 2;
		if (m->u[mid].idx < idx)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo < m->n ? m->u[lo].idx : UINT64_MAX;
}

/* ---- building scenario images, keeping the model in step ----------------------- */

static uint64_t per_cluster(struct model *m)
{
	return m->b.extl2 ? SUBCLUSTERS : 1;
}

/* A normal cluster at host (0: a fresh cluster). */
static uint64_t m_normal(struct model *m, uint64_t gc, uint64_t host)
{
	if (!host)
		host = qb_normal(&m->b, gc);
	else
		qb_normal_at(&m->b, gc, host);
	uint64_t k = per_cluster(m);
	for (uint64_t i = 0; i < k; i++)
		model_set(m, gc * k + i, F_NORMAL, host + i * m->us);
	return host;
}

/* Zero cluster (standard L2, v3): host 0 for ZERO_PLAIN. The host cluster
 * of ZERO_ALLOC holds junk that must never be read. */
static void m_zero(struct model *m, uint64_t gc, uint64_t host)
{
	if (host)
		memset(m->b.buf + host, 0xee, m->b.cs);
	qb_set_l2(&m->b, gc, host | QCOW_OFLAG_ZERO | (host ? QCOW_OFLAG_COPIED : 0), 0);
	model_set(m, gc, host ? F_ZERO_ALLOC : F_ZERO_PLAIN, host);
}

/* An explicitly unallocated entry (the L2 table exists). */
static void m_unalloc(struct model *m, uint64_t gc)
{
	qb_set_l2(&m->b, gc, 0, 0);
}

static void m_compressed(struct model *m, uint64_t gc)
{
	qb_compressed(&m->b, gc);
	uint64_t k = per_cluster(m);
	for (uint64_t i = 0; i < k; i++)
		model_set(m, gc * k + i, F_COMP, 0);
}

/* Extended L2 entry: host (0 = unallocated, else allocated at host) and
 * the bitmap; allocated subclusters get the guest pattern, the others junk. */
static void m_ext(struct model *m, uint64_t gc, uint64_t host, uint64_t bm)
{
	uint32_t alloc = (uint32_t)bm, zero = (uint32_t)(bm >> 32);
	if (host) {
		memset(m->b.buf + host, 0xee, m->b.cs);
		for (unsigned sc = 0; sc < SUBCLUSTERS; sc++)
			if (alloc & (1u << sc))
				qb_fill(&m->b, host + sc * m->us, m->us, gc * m->b.cs + sc * m->us);
	}
	qb_set_l2(&m->b, gc, host ? host | QCOW_OFLAG_COPIED : 0, bm);
	for (unsigned sc = 0; sc < SUBCLUSTERS; sc++) {
		uint32_t bit = 1u << sc;
		uint32_t f;
		if (!host)
			f = (zero & bit) ? F_ZERO_PLAIN : F_UNALLOC;
		else if (zero & bit)
			f = F_ZERO_ALLOC;
		else if (alloc & bit)
			f = F_NORMAL;
		else
			f = F_UALLOC;
		model_set(m, gc * SUBCLUSTERS + sc, f, host ? host + sc * m->us : 0);
	}
}

static void model_finish(struct model *m)
{
	qb_finish(&m->b);
	model_sort(m);
	const char *dir = getenv("QK_TEST_DUMP");
	if (dir) {
		char path[512];
		snprintf(path, sizeof path, "%s/%s.qcow2", dir, m->name);
		FILE *f = fopen(path, "wb");
		if (f) {
			fwrite(m->b.buf, 1, m->b.len, f);
			fclose(f);
		}
		/* The expected guest content as a sparse raw file, and the
		 * expected status of every unit the model mentions. */
		snprintf(path, sizeof path, "%s/%s.raw", dir, m->name);
		f = fopen(path, "wb");
		uint8_t *u = malloc(m->us);
		for (size_t i = 0; f && u && i < m->n; i++) {
			uint64_t off = m->u[i].idx << m->unit_bits;
			if (!(m->u[i].flags & QK_EXTENT_DATA) || off >= m->b.size)
				continue;
			size_t n = (size_t)qk_min_u64(m->us, m->b.size - off);
			qb_pat_fill(u, n, off);
			fseeko(f, (off_t)off, SEEK_SET);
			fwrite(u, 1, n, f);
		}
		free(u);
		if (f) {
			if (ftruncate(fileno(f), (off_t)m->b.size) < 0)
				perror("ftruncate");
			fclose(f);
		}
		snprintf(path, sizeof path, "%s/%s.units", dir, m->name);
		f = fopen(path, "w");
		for (size_t i = 0; f && i < m->n; i++)
			fprintf(f, "%llu %llu 0x%x %llu\n", (unsigned long long)(m->u[i].idx << m->unit_bits),
				(unsigned long long)m->us, m->u[i].flags, (unsigned long long)m->u[i].host);
		if (f)
			fclose(f);
	}
}

/* ---- expectations ------------------------------------------------------------------------- */

/* Expected bytes of guest [off, off+len). */
static void expect_read(struct model *m, uint8_t *buf, size_t len, uint64_t off)
{
	size_t done = 0;
	while (done < len) {
		uint64_t pos = off + done;
		uint64_t idx = pos >> m->unit_bits;
		uint64_t unit_end = (idx + 1) << m->unit_bits;
		size_t n = (size_t)qk_min_u64(unit_end - pos, len - done);
		const struct unit *u = model_find(m, idx);
		if (u && (u->flags & QK_EXTENT_DATA)) {
			qb_pat_fill(buf + done, n, pos);
		} else if (!u) {
			/* Unmentioned units up to the next mentioned one are zeros. */
			uint64_t next = model_next(m, idx);
			uint64_t zend = next == UINT64_MAX ? UINT64_MAX : next << m->unit_bits;
			n = (size_t)qk_min_u64(zend - pos, len - done);
			memset(buf + done, 0, n);
		} else {
			memset(buf + done, 0, n);
		}
		done += n;
	}
}

/* Expected block status at off (< size), at most max_len bytes. */
static void expect_status(struct model *m, uint64_t off, uint64_t max_len, struct qk_extent *e)
{
	uint64_t size = m->b.size;
	uint64_t end = off + qk_min_u64(max_len, size - off);
	uint64_t idx = off >> m->unit_bits;
	const struct unit *u = model_find(m, idx);
	uint32_t flags = u ? u->flags : F_UNALLOC;
	uint64_t host = u && (flags & QK_EXTENT_OFFSET) ? u->host + (off & (m->us - 1)) : 0;
	uint64_t pos = (idx + 1) << m->unit_bits;
	while (pos < end) {
		uint64_t i = pos >> m->unit_bits;
		const struct unit *v = model_find(m, i);
		if (!v) {
			if (flags != F_UNALLOC)
				break;
			uint64_t next = model_next(m, i);
			if (next == UINT64_MAX || next > (end >> m->unit_bits) + 1) {
				pos = end;
				break;
			}
			pos = next << m->unit_bits;
			continue;
		}
		if (v->flags != flags)
			break;
		if ((flags & QK_EXTENT_OFFSET) && v->host != host + (pos - off))
			break;
		pos += m->us;
	}
	e->start = off;
	e->length = qk_min_u64(pos, end) - off;
	e->flags = flags;
	e->depth = 0;
	e->offset = host;
}

/* ---- the checks ---------------------------------------------------------------------- */

struct ctx {
	struct model *m;
	qk_image *img;
	const char *variant;
	uint8_t *got, *want;
	size_t buf_len;
	int read_fail, status_fail;
};

static void check_read(struct ctx *c, uint64_t off, size_t len)
{
	struct model *m = c->m;
	if (off > m->b.size)
		return;
	if (len > m->b.size - off)
		len = (size_t)(m->b.size - off);
	if (len > c->buf_len)
		len = c->buf_len;
	memset(c->got, 0xa5, len);
	int ret = qk_pread(c->img, c->got, len, off);
	expect_read(m, c->want, len, off);
	bool ok = ret == 0 && memcmp(c->got, c->want, len) == 0;
	if (!ok && c->read_fail++ < 5) {
		size_t at = 0;
		while (at < len && c->got[at] == c->want[at])
			at++;
		CHECK(0, "%s/%s: pread %zu bytes at 0x%llx: ret %d (%s), first difference at +%zu "
		      "(got 0x%02x, want 0x%02x)", m->name, c->variant, len, (unsigned long long)off,
		      ret, ret ? qk_last_error() : "", at, at < len ? c->got[at] : 0,
		      at < len ? c->want[at] : 0);
	} else if (ok) {
		CHECK(1, "read");
	}
}

static void check_status(struct ctx *c, uint64_t off, uint64_t max_len)
{
	struct model *m = c->m;
	if (off >= m->b.size)
		return;
	struct qk_extent got, want;
	memset(&got, 0x5a, sizeof got);
	int ret = qk_block_status(c->img, off, max_len, &got);
	expect_status(m, off, max_len, &want);
	bool ok = ret == 0 && got.start == want.start && got.length == want.length &&
		  got.flags == want.flags && got.depth == 0 &&
		  (!(want.flags & QK_EXTENT_OFFSET) || got.offset == want.offset) &&
		  (!(want.flags & QK_EXTENT_OFFSET) || got.file != NULL);
	if (!ok && c->status_fail++ < 5) {
		CHECK(0, "%s/%s: block status at 0x%llx max 0x%llx: ret %d, got start 0x%llx len 0x%llx "
		      "flags 0x%x offset 0x%llx depth %u; want len 0x%llx flags 0x%x offset 0x%llx",
		      m->name, c->variant, (unsigned long long)off, (unsigned long long)max_len, ret,
		      (unsigned long long)got.start, (unsigned long long)got.length, got.flags,
		      (unsigned long long)got.offset, got.depth, (unsigned long long)want.length,
		      want.flags, (unsigned long long)want.offset);
	} else if (ok) {
		CHECK(1, "status");
	}
}

/* qk_preadv with the range split into several buffers equals qk_pread. */
static void check_preadv(struct ctx *c, uint64_t off, size_t len, uint64_t *seed)
{
	struct model *m = c->m;
	if (off > m->b.size)
		return;
	len = (size_t)qk_min_u64(qk_min_u64(len, m->b.size - off), c->buf_len);
	struct iovec iov[8];
	int n = 1 + (int)(tap_rand(seed) % 8);
	size_t left = len, pos = 0;
	for (int i = 0; i < n; i++) {
		size_t part = i == n - 1 ? left : (left ? (size_t)(tap_rand(seed) % (left + 1)) : 0);
		iov[i].iov_base = c->got + pos;
		iov[i].iov_len = part;
		pos += part;
		left -= part;
	}
	memset(c->got, 0xa5, len);
	int ret = qk_preadv(c->img, iov, n, off);
	expect_read(m, c->want, len, off);
	CHECK(ret == 0 && memcmp(c->got, c->want, len) == 0,
	      "%s/%s: preadv of %zu bytes in %d buffers at 0x%llx: %d %s", m->name, c->variant,
	      len, n, (unsigned long long)off, ret, qk_last_error());
}

/* Offsets worth testing: around every unit the model mentions, around L2
 * table boundaries near them, and the ends of the image. */
static uint64_t *interesting(struct model *m, size_t *count)
{
	uint64_t l2_span = m->b.cs * m->b.l2_entries;
	size_t cap = m->n * 8 + 16, n = 0;
	uint64_t *v = malloc(cap * sizeof *v);
	if (!v)
		abort();
	uint64_t last_cluster = UINT64_MAX;
	for (size_t i = 0; i < m->n; i++) {
		uint64_t s = m->u[i].idx << m->unit_bits;
		uint64_t cl = s >> m->b.cluster_bits;
		v[n++] = s;
		v[n++] = s + 1;
		v[n++] = s + m->us - 1;
		if (s)
			v[n++] = s - 1;
		if (cl != last_cluster) {
			uint64_t t = (s / l2_span) * l2_span;
			v[n++] = t;
			if (t)
				v[n++] = t - 1;
			v[n++] = t + l2_span - 1;
			v[n++] = t + l2_span;
			last_cluster = cl;
		}
		if (n + 16 > cap) {
			cap *= 2;
			v = realloc(v, cap * sizeof *v);
			if (!v)
				abort();
		}
	}
	v[n++] = 0;
	v[n++] = m->b.size ? m->b.size - 1 : 0;
	v[n++] = m->b.size > 700 ? m->b.size - 700 : 0;
	size_t k = 0;
	for (size_t i = 0; i < n; i++)
		if (v[i] < m->b.size)
			v[k++] = v[i];
	*count = k;
	return v;
}

static void check_image(struct model *m, const char *variant, const struct qk_open_options *o,
			int random_reads)
{
	struct ctx c = { .m = m, .variant = variant };
	int ret = qb_open_named(&m->b, m->name, o, &c.img);
	CHECK(ret == 0, "%s/%s: open: %d %s", m->name, variant, ret, qk_last_error());
	if (ret < 0)
		return;
	c.buf_len = (size_t)qk_min_u64(4 * m->b.cs + 4096, 9u << 20);
	c.got = malloc(c.buf_len);
	c.want = malloc(c.buf_len);
	if (!c.got || !c.want)
		abort();
	uint64_t size = m->b.size, cs = m->b.cs;
	uint64_t seed = 0x9e3779b97f4a7c15ull ^ cs ^ size;

	size_t ni;
	uint64_t *offs = interesting(m, &ni);
	for (size_t i = 0; i < ni; i++) {
		check_read(&c, offs[i], 1);
		check_read(&c, offs[i], 513);
		check_read(&c, offs[i], (size_t)m->us + 1);
		if (i % 4 == 0)
			check_read(&c, offs[i], (size_t)qk_min_u64(3 * cs, 1u << 20) + 3);
		check_status(&c, offs[i], UINT64_MAX);
		check_status(&c, offs[i], 1);
		check_status(&c, offs[i], m->us + 5);
		check_status(&c, offs[i], 2 * cs + 3);
	}
	free(offs);

	/* Random reads and status queries near the mentioned units. */
	for (int i = 0; i < random_reads; i++) {
		uint64_t base = m->n ? m->u[tap_rand(&seed) % m->n].idx << m->unit_bits : 0;
		uint64_t off = base + tap_rand(&seed) % (3 * cs) - qk_min_u64(base, cs);
		if (off >= size)
			off = tap_rand(&seed) % size;
		size_t len = (size_t)(tap_rand(&seed) % (qk_min_u64(2 * cs, 256u << 10) + 1));
		check_read(&c, off, len);
		check_status(&c, off, 1 + tap_rand(&seed) % (4 * cs));
		if (i % 8 == 0)
			check_preadv(&c, off, len, &seed);
	}
	/* A few whole random places anywhere in the image. */
	for (int i = 0; i < random_reads / 8; i++) {
		uint64_t off = tap_rand(&seed) % size;
		check_read(&c, off, (size_t)(tap_rand(&seed) % (cs + 1)));
		check_status(&c, off, UINT64_MAX);
	}

	/* Walk the whole image with block status: extents tile it. */
	uint64_t off = 0;
	int steps = 0;
	while (off < size && steps < 100000) {
		struct qk_extent e;
		ret = qk_block_status(c.img, off, UINT64_MAX, &e);
		if (ret < 0 || e.length == 0 || e.start != off) {
			CHECK(0, "%s/%s: walk at 0x%llx: %d len %llu", m->name, variant,
			      (unsigned long long)off, ret, (unsigned long long)e.length);
			break;
		}
		check_status(&c, off, UINT64_MAX);
		off += e.length;
		steps++;
	}
	CHECK_EQ(off, size, "block status walk ends at the size");

	/* Edges. */
	uint8_t byte;
	CHECK_EQ(qk_pread(c.img, &byte, 0, size), 0, "zero-length read at the end");
	CHECK_EQ(qk_pread(c.img, NULL, 0, size), 0, "zero-length read at the end, NULL buffer");
	ret = qk_pread(c.img, c.got, 2, size - 1);
	CHECK(ret == -EINVAL, "%s: read straddling the end: %d", m->name, ret);
	CHECK(tap_one_line(qk_last_error()) && tap_contains(qk_last_error(), "qk_pread: ") &&
	      tap_contains(qk_last_error(), "past the end"), "past-the-end message: %s", qk_last_error());
	CHECK_EQ(qk_pread(c.img, &byte, 0, size + 1), (uint64_t)-EINVAL, "zero-length read past the end");
	CHECK_EQ(qk_pread(c.img, &byte, 1, UINT64_MAX), (uint64_t)-EINVAL, "read at UINT64_MAX");
	CHECK_EQ(qk_pread(c.img, c.got, SIZE_MAX, 1), (uint64_t)-EINVAL, "read of SIZE_MAX bytes");
	struct iovec big[2] = { { c.got, SIZE_MAX }, { c.got, 2 } };
	CHECK_EQ(qk_preadv(c.img, big, 2, 0), (uint64_t)-EINVAL, "preadv with overflowing lengths");
	struct iovec tail[2] = { { c.got, 1 }, { c.got + 1, 1 } };
	CHECK_EQ(qk_preadv(c.img, tail, 2, size - 1), (uint64_t)-EINVAL, "preadv past the end");
	CHECK_EQ(qk_preadv(c.img, tail, 0, size), 0, "preadv of no buffers at the end");
	CHECK_EQ(qk_preadv(c.img, tail, -1, 0), (uint64_t)-EINVAL, "preadv with a negative count");
	CHECK_EQ(qk_pread(NULL, c.got, 1, 0), (uint64_t)-EINVAL, "pread without an image");
	CHECK_EQ(qk_pread(c.img, NULL, 1, 0), (uint64_t)-EINVAL, "pread without a buffer");

	/* qk_pread_batch: eight reads spread over the image read what the
	 * model says (on this backend each is made at once), and its ranges
	 * are all checked before any is read. */
	{
		size_t piece = c.buf_len / 16 ? c.buf_len / 16 : 1;
		struct qk_read_op ops[8];
		for (int i = 0; i < 8; i++) {
			ops[i].buf = c.got + 2 * (size_t)i * piece;
			ops[i].len = piece;
			ops[i].offset = (size - piece) / 7 * (uint64_t)i;
		}
		memset(c.got, 0xa5, c.buf_len);
		ret = qk_pread_batch(c.img, ops, 8);
		bool same = ret == 0;
		for (int i = 0; same && i < 8; i++) {
			expect_read(m, c.want, piece, ops[i].offset);
			same = memcmp(ops[i].buf, c.want, piece) == 0;
		}
		CHECK(same, "%s: a batch of eight reads: %d %s", m->name, ret, ret ? qk_last_error() : "");
		CHECK_EQ(qk_pread_batch(c.img, ops, 0), 0, "an empty batch");
		CHECK_EQ(qk_pread_batch(c.img, NULL, 0), 0, "an empty batch without reads");
		CHECK_EQ(qk_pread_batch(NULL, ops, 1), (uint64_t)-EINVAL, "a batch without an image");
		CHECK_EQ(qk_pread_batch(c.img, NULL, 1), (uint64_t)-EINVAL, "a batch without reads");
		memset(c.got, 0xa5, c.buf_len);
		ops[7].offset = size - piece + 1;
		ret = qk_pread_batch(c.img, ops, 8);
		CHECK(ret == -EINVAL && tap_contains(qk_last_error(), "qk_pread_batch: ") &&
		      tap_contains(qk_last_error(), "past the end") && c.got[0] == 0xa5,
		      "%s: a batch with a read past the end reads nothing: %d %s", m->name, ret,
		      qk_last_error());
		ops[7].offset = 0;
		ops[3].buf = NULL;
		CHECK(qk_pread_batch(c.img, ops, 8) == -EINVAL &&
		      tap_contains(qk_last_error(), "read 3 of the batch"),
		      "a batch read without a buffer: %s", qk_last_error());
	}
	struct qk_extent e;
	CHECK_EQ(qk_block_status(c.img, 0, 1, NULL), (uint64_t)-EINVAL, "block status without an extent");
	CHECK_EQ(qk_block_status(NULL, 0, 1, &e), (uint64_t)-EINVAL, "block status without an image");
	CHECK_EQ(qk_block_status(c.img, size, 1, &e), (uint64_t)-EINVAL, "block status at the end");
	CHECK_EQ(qk_block_status(c.img, 0, 0, &e), (uint64_t)-EINVAL, "block status of 0 bytes");

	/* Whole-image read when small enough. */
	if (size <= c.buf_len)
		check_read(&c, 0, (size_t)size);

	CHECK_EQ(qk_close(c.img), 0, "close");
	free(c.got);
	free(c.want);
}

/* Run the checks with the default cache and with the smallest one. */
static void check_both(struct model *m, int random_reads)
{
	struct qk_open_options o;
	qk_open_options_init(&o);
	check_image(m, "default-cache", &o, random_reads);
	o.l2_cache_size = 1;
	o.format = QK_FORMAT_QCOW2;
	check_image(m, "tiny-cache", &o, random_reads);
}

/* ---- scenarios ------------------------------------------------------------------------------- */

/* 512-byte clusters: 64 entries per L2 table (32 KiB of guest per table). */
static void scenario_512(uint32_t version)
{
	struct model m;
	model_init(&m, version == 3 ? "c512-v3" : "c512-v2", version, 9, 263680 - 100, false,
		   QK_COMPRESSION_ZLIB);
	struct qb *b = &m.b;
	uint64_t cs = b->cs;

	uint64_t h = qb_alloc(b, 4);            /* contiguous gc 0..3 */
	for (uint64_t i = 0; i < 4; i++)
		m_normal(&m, i, h + i * cs);
	h = qb_alloc(b, 2);                     /* gc 4, 5 swapped */
	m_normal(&m, 4, h + cs);
	m_normal(&m, 5, h);
	if (version == 3) {
		m_zero(&m, 6, 0);
		h = qb_alloc(b, 2);
		m_zero(&m, 7, h);
		m_zero(&m, 8, h + cs);          /* zero-alloc run with contiguous hosts */
	}
	m_unalloc(&m, 9);
	m_compressed(&m, 10);
	m_compressed(&m, 11);                   /* packed: unaligned host offsets */
	m_compressed(&m, 12);
	m_normal(&m, 13, 0);
	h = qb_alloc(b, 11);                    /* gc 60..70 across tables 0/1 */
	for (uint64_t i = 0; i < 11; i++)
		m_normal(&m, 60 + i, h + i * cs);
	if (version == 3)
		m_zero(&m, 71, 0);
	/* L1[2] (gc 128..191) has no table; data right after it. */
	m_normal(&m, 192, 0);
	m_normal(&m, 200, 0);
	if (version == 3) {
		m_zero(&m, 255, 0);             /* zero-plain across tables 3/4 */
		m_zero(&m, 256, 0);
	}
	m_compressed(&m, 319);                  /* compressed across tables 4/5 */
	m_compressed(&m, 320);
	m_unalloc(&m, 384);                     /* L1[6]: a table of nothing */
	h = qb_alloc(b, 2);
	m_normal(&m, 448, h);                   /* then two clusters... */
	m_normal(&m, 449, h + cs);
	m_normal(&m, 450, h + 3 * cs);          /* ...and one past a gap (file grows) */
	h = qb_alloc(b, 3);
	m_normal(&m, (b->size - 1) / cs - 1, h); /* the last two clusters, the last partial */
	m_normal(&m, (b->size - 1) / cs, h + cs);
	/* An L1 entry without COPIED (shared table) reads the same. */
	b->l1[3] &= ~QCOW_OFLAG_COPIED;
	model_finish(&m);
	check_both(&m, 3000);
	model_free(&m);
}

/* 64 KiB clusters: 8192 entries per table (512 MiB of guest). */
static void scenario_64k(uint32_t version, uint32_t compression)
{
	struct model m;
	const char *name = version == 2 ? "c64k-v2" : compression ? "c64k-v3-zstd" : "c64k-v3";
	model_init(&m, name, version, 16, (1ull << 30) + 3 * 65536, false, compression);
	struct qb *b = &m.b;
	uint64_t cs = b->cs;

	uint64_t h = qb_alloc(b, 3);
	for (uint64_t i = 0; i < 3; i++)
		m_normal(&m, i, h + i * cs);
	if (version == 3) {
		m_zero(&m, 3, qb_alloc(b, 1));
		m_zero(&m, 9, 0);
	}
	m_compressed(&m, 4);
	m_compressed(&m, 5);
	m_normal(&m, 6, 0);
	h = qb_alloc(b, 4);
	for (uint64_t i = 0; i < 4; i++)
		m_normal(&m, 8190 + i, h + i * cs);  /* across tables 0/1 */
	m_unalloc(&m, 16383);
	m_normal(&m, 16384, 0);                 /* first cluster of table 2 */
	m_compressed(&m, 16385);
	m_normal(&m, (b->size - 1) / cs, 0);
	model_finish(&m);
	check_both(&m, 1500);
	model_free(&m);
}

/* 2 MiB clusters: 262144 entries per table (512 GiB of guest). */
static void scenario_2m(void)
{
	struct model m;
	model_init(&m, "c2m-v3", 3, 21, (512ull << 30) + (6ull << 20) + 4096, false, QK_COMPRESSION_ZLIB);
	struct qb *b = &m.b;
	uint64_t cs = b->cs;
	m_normal(&m, 0, 0);
	m_zero(&m, 1, 0);
	m_compressed(&m, 2);
	m_normal(&m, 3, 0);
	uint64_t h = qb_alloc(b, 2);
	m_normal(&m, 262143, h);                /* across tables 0/1 */
	m_normal(&m, 262144, h + cs);
	m_zero(&m, 262145, qb_alloc(b, 1));
	m_normal(&m, (b->size - 1) / cs, 0);    /* last, mostly past the end */
	model_finish(&m);
	check_both(&m, 150);
	model_free(&m);
}

/* Extended L2: every subcluster type. */
static void scenario_extl2(uint32_t cb, uint32_t compression, int random_reads)
{
	struct model m;
	char name[32];
	snprintf(name, sizeof name, "extl2-c%u%s", cb, compression ? "-zstd" : "");
	uint64_t cs = 1ull << cb;
	uint64_t entries = cs / 16;
	model_init(&m, name, 3, cb, entries * cs + 8 * cs, true, compression);
	struct qb *b = &m.b;

	uint64_t h = qb_alloc(b, 2);
	/* gc 0: sc 0-3 normal, 4-5 zero-alloc, 6-7 unallocated-alloc, 8-15
	 * normal, 16 zero-alloc, 17-30 unallocated-alloc, 31 normal. */
	uint32_t alloc = 0x0000ff0fu | 0x80000000u, zero = 0x00000030u | 0x00010000u;
	m_ext(&m, 0, h, (uint64_t)zero << 32 | alloc);
	m_ext(&m, 1, h + cs, SC_ALLOC_MASK);    /* joins gc 0's last subcluster */
	m_ext(&m, 2, 0, 0xffff000000000000ull); /* 0-15 unallocated, 16-31 zero-plain */
	m_ext(&m, 3, 0, 0);                     /* unallocated */
	m_ext(&m, 4, 0, SC_ZERO_MASK);          /* zero-plain */
	m_ext(&m, 5, qb_alloc(b, 1), SC_ZERO_MASK); /* zero-alloc */
	m_compressed(&m, 6);
	m_compressed(&m, 7);
	m_ext(&m, 8, qb_alloc(b, 1), 0);        /* unallocated-alloc */
	/* gc 9: odd subclusters normal, even ones zero-alloc. */
	m_ext(&m, 9, qb_alloc(b, 1), 0x55555555aaaaaaaaull);
	h = qb_alloc(b, 4);
	m_ext(&m, entries - 1, h, SC_ALLOC_MASK);   /* across tables 0/1 */
	m_ext(&m, entries, h + cs, SC_ALLOC_MASK);
	m_ext(&m, entries + 1, h + 2 * cs, 0x55555555u);   /* normal / unallocated-alloc */
	m_ext(&m, entries + 2, h + 3 * cs, SC_ALLOC_MASK);
	m_compressed(&m, entries + 7);          /* last cluster */
	model_finish(&m);
	check_both(&m, random_reads);
	model_free(&m);
}

/* ---- corruption ----------------------------------------------------------------------------- */

struct corrupt_case {
	const char *name;
	const char *kw;        /* the message mentions this */
	bool status_too;       /* block status fails as well */
};

/*
 * Build corrupt image i: the damage is in guest cluster 1 (of L1 index 0),
 * while guest cluster 0 (same table) and the last cluster (another table,
 * where relevant) stay healthy. Returns false past the last case.
 */
static bool corrupt_case(int i, struct qb *b, struct corrupt_case *c)
{
	memset(c, 0, sizeof *c);
	c->status_too = true;
	uint32_t version = 3, cb = 16;
	bool extl2 = false;
	uint32_t comp = QK_COMPRESSION_ZLIB;
	switch (i) {
	case 3: version = 2; break;
	case 4: case 5: case 11: case 12: extl2 = true; break;
	case 7: case 15: comp = QK_COMPRESSION_ZSTD; break;
	default: break;
	}
	if (i > 17)
		return false;
	qb_init(b, version, cb, 64ull << 30);
	b->extl2 = extl2;
	b->compression = comp;
	qb_layout(b);
	uint64_t cs = b->cs;
	qb_normal(b, 0);
	qb_normal(b, (b->size - 1) / cs);
	uint64_t h;
	switch (i) {
	case 0:
		c->name = "unaligned L2 table offset in L1"; c->kw = "L2 table offset";
		b->l1[0] = (b->l1[0] & L1E_OFFSET_MASK) + 512;
		break;
	case 1:
		c->name = "reserved bit 56 in L1"; c->kw = "reserved";
		b->l1[0] |= 1ull << 56;
		break;
	case 2:
		c->name = "unaligned data offset"; c->kw = "unaligned";
		h = qb_alloc(b, 2);
		qb_set_l2(b, 1, (h + 4096) | QCOW_OFLAG_COPIED, 0);
		break;
	case 3:
		c->name = "zero flag in a v2 image"; c->kw = "version 2";
		qb_set_l2(b, 1, qb_alloc(b, 1) | QCOW_OFLAG_ZERO, 0);
		break;
	case 4:
		c->name = "subcluster both allocated and zero"; c->kw = "both allocated and zero";
		qb_set_l2(b, 1, qb_alloc(b, 1) | QCOW_OFLAG_COPIED, 0x0000000400000004ull);
		break;
	case 5:
		c->name = "compressed entry with subcluster bits"; c->kw = "subcluster";
		qb_set_l2(b, 1, qb_compressed(b, 1), 1);
		break;
	case 6: {
		c->name = "garbage deflate data"; c->kw = "compressed"; c->status_too = false;
		uint8_t junk[700];
		uint64_t seed = 42;
		for (size_t k = 0; k < sizeof junk; k++)
			junk[k] = (uint8_t)tap_rand(&seed);
		junk[0] = 0xff;     /* reserved block type 3: invalid deflate */
		qb_set_l2(b, 1, qb_store_compressed(b, junk, sizeof junk), 0);
		break;
	}
	case 7: {
		c->name = "garbage zstd data"; c->kw = "compressed"; c->status_too = false;
		uint8_t junk[700];
		memset(junk, 0x77, sizeof junk);
		qb_set_l2(b, 1, qb_store_compressed(b, junk, sizeof junk), 0);
		break;
	}
	case 8: {
		c->name = "deflate data one byte short of a cluster"; c->kw = "compressed"; c->status_too = false;
		uint8_t *plain = malloc(cs);
		qb_pat_fill(plain, cs, cs);
		size_t n;
		uint8_t *z = qb_compress(QK_COMPRESSION_ZLIB, plain, cs - 1, &n);
		qb_set_l2(b, 1, qb_store_compressed(b, z, n), 0);
		free(z);
		free(plain);
		break;
	}
	case 9:
		c->name = "L2 table past the end of the file"; c->kw = "past the end";
		b->l1[0] = (1ull << 40) | QCOW_OFLAG_COPIED;
		break;
	case 10:
		c->name = "data cluster past the end of the file"; c->kw = "past the end";
		qb_set_l2(b, 1, (1ull << 40) | QCOW_OFLAG_COPIED, 0);
		break;
	case 11:
		c->name = "unallocated extended entry with allocated subclusters"; c->kw = "unallocated";
		qb_set_l2(b, 1, 0, 0x3);
		break;
	case 12:
		c->name = "extended entry with the zero flag"; c->kw = "zero flag";
		qb_set_l2(b, 1, qb_alloc(b, 1) | QCOW_OFLAG_COPIED | QCOW_OFLAG_ZERO, SC_ALLOC_MASK);
		break;
	case 13:
		c->name = "reserved bit 1 in an L2 entry"; c->kw = "reserved";
		qb_set_l2(b, 1, qb_alloc(b, 1) | QCOW_OFLAG_COPIED | 2, 0);
		break;
	case 14:
		c->name = "reserved bit 56 in an L2 entry"; c->kw = "reserved";
		qb_set_l2(b, 1, qb_alloc(b, 1) | QCOW_OFLAG_COPIED | (1ull << 56), 0);
		break;
	case 15: {
		c->name = "zstd frame of half a cluster"; c->kw = "compressed"; c->status_too = false;
		uint8_t *plain = malloc(cs);
		qb_pat_fill(plain, cs, cs);
		size_t n;
		uint8_t *z = qb_compress(QK_COMPRESSION_ZSTD, plain, cs / 2, &n);
		qb_set_l2(b, 1, qb_store_compressed(b, z, n), 0);
		free(z);
		free(plain);
		break;
	}
	case 16:
		c->name = "compressed data past the end of the file"; c->kw = "past the end"; c->status_too = false;
		qb_set_l2(b, 1, QCOW_OFLAG_COMPRESSED | (1ull << 40), 0);
		break;
	case 17:
		c->name = "reserved bit 0 in L1"; c->kw = "reserved";
		b->l1[0] |= 1;
		break;
	}
	qb_finish(b);
	return true;
}

static void test_corruption(void)
{
	for (int i = 0;; i++) {
		struct qb b;
		struct corrupt_case c;
		if (!corrupt_case(i, &b, &c))
			break;
		qk_image *img;
		char what[128];
		snprintf(what, sizeof what, "corrupt #%d %s", i, c.name);
		int ret = qb_open(&b, NULL, &img);
		CHECK(ret == 0, "%s: open: %d %s", what, ret, qk_last_error());
		if (ret < 0) {
			qb_free(&b);
			continue;
		}
		uint64_t cs = b.cs;
		uint8_t *buf = malloc(2 * cs), *want = malloc(cs);
		ret = qk_pread(img, buf, cs, cs);
		const char *msg = qk_last_error();
		CHECK(ret == -EIO, "%s: pread got %d, want -EIO (%s)", what, ret,
		      ret ? msg : "the read succeeded");
		CHECK(tap_one_line(msg) && strncmp(msg, "qk_pread: ", 10) == 0 &&
		      tap_contains(msg, c.kw), "%s: message \"%s\" lacks \"%s\"", what, msg, c.kw);
		CHECK_EQ(qk_last_errno(), EIO, what);
		/* The message names the image and where the damage is. */
		if (c.status_too || i == 16)
			CHECK(tap_contains(msg, "'mem.qcow2'"), "%s: message does not name the image: %s",
			      what, msg);
		else
			CHECK_BUG(tap_contains(msg, "'mem.qcow2'") && tap_contains(msg, "offset 0x"),
				  "COMPRESSED-MSG", "%s: message names neither the image nor the offset "
				  "of the compressed data: %s", what, msg);
		if (getenv("QK_TEST_VERBOSE"))
			printf("%s: %d %s\n", what, ret, msg);
		/* A read covering the bad cluster fails too, from any offset. */
		ret = qk_pread(img, buf, 2 * cs, 100);
		CHECK(ret == -EIO, "%s: straddling read got %d", what, ret);
		struct qk_extent e;
		ret = qk_block_status(img, cs, cs, &e);
		if (c.status_too)
			CHECK(ret == -EIO, "%s: block status got %d", what, ret);
		else
			CHECK(ret == 0 && (e.flags & QK_EXTENT_COMPRESSED), "%s: block status %d flags 0x%x",
			      what, ret, e.flags);
		/* The healthy clusters still read. */
		bool l1_damage = i == 0 || i == 1 || i == 9 || i == 17;
		if (!l1_damage) {
			qb_pat_fill(want, cs, 0);
			ret = qk_pread(img, buf, cs, 0);
			CHECK(ret == 0 && memcmp(buf, want, cs) == 0, "%s: healthy cluster 0: %d", what, ret);
		}
		uint64_t last = (b.size - 1) / cs * cs;
		qb_pat_fill(want, cs, last);
		ret = qk_pread(img, buf, (size_t)(b.size - last), last);
		CHECK(ret == 0 && memcmp(buf, want, (size_t)(b.size - last)) == 0,
		      "%s: healthy last cluster: %d %s", what, ret, qk_last_error());
		qk_close(img);
		free(buf);
		free(want);
		qb_free(&b);
	}
}

/* Compressed clusters whose data runs past the end of the file (QEMU's
 * files end right after the last compressed bytes) and whose sector count
 * covers more than the data. */
static void test_compressed_edges(void)
{
	for (uint32_t comp = 0; comp <= 1; comp++) {
		struct model m;
		model_init(&m, comp ? "ctail-zstd" : "ctail-zlib", 3, 12, 1 << 20, false, comp);
		m_compressed(&m, 0);
		m_compressed(&m, 1);
		m_compressed(&m, 255);
		model_finish(&m);
		CHECK(m.b.len % m.b.cs != 0, "file ends mid-cluster");
		/* Claim the largest sector count: the reader must stop at the
		 * end of the frame and ignore the rest. */
		uint64_t l2 = m.b.l1[0] & L1E_OFFSET_MASK;
		uint64_t e = qk_be64(m.b.buf + l2 + 255 * 8);
		unsigned shift = 62 - (12 - 8);
		e |= 15ull << shift;
		qb_put64(&m.b, l2 + 255 * 8, e);
		check_both(&m, 200);
		model_free(&m);
	}
}

/* A backing file named in the header but not opened (QK_OPEN_NO_BACKING):
 * unallocated ranges read as zeros and report ZERO without PRESENT. */
static void test_no_backing(void)
{
	struct model m;
	model_init(&m, "nobacking", 3, 16, 4 << 20, false, QK_COMPRESSION_ZLIB);
	m.b.backing_file = "base.qcow2";
	m.b.backing_fmt = "qcow2";
	m_normal(&m, 1, 0);
	m_zero(&m, 2, 0);
	model_finish(&m);
	struct qk_open_options o;
	qk_open_options_init(&o);
	o.flags = QK_OPEN_NO_BACKING;
	check_image(&m, "no-backing", &o, 100);
	model_free(&m);
}

int main(void)
{
	tap_watchdog(120);
	scenario_512(3);
	scenario_512(2);
	scenario_64k(3, QK_COMPRESSION_ZLIB);
	scenario_64k(3, QK_COMPRESSION_ZSTD);
	scenario_64k(2, QK_COMPRESSION_ZLIB);
	scenario_2m();
	scenario_extl2(16, QK_COMPRESSION_ZLIB, 1500);
	scenario_extl2(14, QK_COMPRESSION_ZSTD, 1500);
	scenario_extl2(21, QK_COMPRESSION_ZLIB, 150);
	test_compressed_edges();
	test_no_backing();
	test_corruption();
	return tap_done();
}
