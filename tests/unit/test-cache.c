/*
 * test-cache: the metadata table cache (lib/qcow2/cache.c) on a memory
 * file. Hit and miss counting, CLOCK eviction with its second chance,
 * slots in use never evicted (-EBUSY when all are), load errors passed
 * through, and 100k random operations compared with a simple model of the
 * documented algorithm (linear search instead of the hash).
 */
#include "tap.h"
#include "qcow2/qcow2.h"

#define ES 64   /* bytes per table in most tests: 8 words */

/* The memory file: table at offset (k+1)*es holds words off*1000+i, big-endian. */
static struct qk__file *make_file(uint32_t pool, size_t es)
{
	size_t len = (pool + 1) * es;
	uint8_t *buf = calloc(1, len);
	if (!buf)
		abort();
	for (uint32_t k = 0; k < pool; k++) {
		uint64_t off = (uint64_t)(k + 1) * es;
		for (size_t i = 0; i < es / 8; i++)
			qk_put_be64(buf + off + 8 * i, off * 1000 + i);
	}
	struct qk__file *f;
	if (qk__file_open_mem(buf, len, "cache-file", &f) < 0)
		abort();
	free(buf);
	return f;
}

/* The load callback: byte-swap, count, and fail where told. */
struct loader {
	size_t es;
	uint64_t calls;
	uint64_t fail_off;      /* fail loads of this offset... */
	int fail_err;           /* ...with this negative errno (0: never) */
	uint64_t fail_mod;      /* or every offset with (off/es) % fail_mod == 1 */
};

static int load(void *opaque, void *table, uint64_t off)
{
	struct loader *l = opaque;
	l->calls++;
	if (l->fail_err && (off == l->fail_off || (l->fail_mod && (off / l->es) % l->fail_mod == 1))) {
		qk__api_enter("load");
		return qk__err(-l->fail_err, "test loader refuses offset %llu", (unsigned long long)off);
	}
	qk_be64_table_to_host(table, l->es / 8);
	return 0;
}

static bool table_ok(const void *t, uint64_t off, size_t es)
{
	const uint64_t *w = t;
	for (size_t i = 0; i < es / 8; i++)
		if (w[i] != off * 1000 + i)
			return false;
	return true;
}

static bool cached(const struct qk__cache *c, uint64_t off)
{
	for (uint32_t i = 0; i < c->nslots; i++)
		if (c->slots[i].offset == off)
			return true;
	return false;
}

static uint32_t n_cached(const struct qk__cache *c)
{
	uint32_t n = 0;
	for (uint32_t i = 0; i < c->nslots; i++)
		n += c->slots[i].offset != 0;
	return n;
}

/* Every cached slot appears exactly once in the hash, and the hash points
 * only at cached slots. */
static bool hash_consistent(const struct qk__cache *c)
{
	uint32_t members = 0;
	for (uint32_t b = 0; b <= c->hash_mask; b++) {
		uint32_t s = c->hash[b];
		if (!s)
			continue;
		if (s > c->nslots || c->slots[s - 1].offset == 0)
			return false;
		members++;
		for (uint32_t b2 = b + 1; b2 <= c->hash_mask; b2++)
			if (c->hash[b2] == s)
				return false;
	}
	return members == n_cached(c);
}

static void test_basics(void)
{
	struct qk__file *f = make_file(16, ES);
	struct loader l = { .es = ES };
	struct qk__cache c;
	void *t, *t2;

	CHECK_EQ(qk__cache_init(&c, f, ES, 1, load, &l), 0, "init with 1 slot");
	CHECK_EQ(c.nslots, 2, "at least two slots");
	CHECK(c.hash_mask + 1 >= 2 * c.nslots, "hash at most half full");
	qk__cache_destroy(&c);
	CHECK_EQ(qk__cache_init(&c, f, ES, 0, load, &l), 0, "init with 0 slots");
	CHECK_EQ(c.nslots, 2, "0 slots become two");
	qk__cache_destroy(&c);
	qk__cache_destroy(&c);  /* twice is harmless */

	CHECK_EQ(qk__cache_init(&c, f, ES, 4, load, &l), 0, "init");
	CHECK_EQ(c.hits, 0, "no hits yet");
	CHECK_EQ(c.misses, 0, "no misses yet");
	/* Four misses fill the cache. */
	for (uint64_t k = 1; k <= 4; k++) {
		int ret = qk__cache_get(&c, k * ES, &t);
		CHECK(ret == 0 && table_ok(t, k * ES, ES), "get table %llu: %d", (unsigned long long)k, ret);
		qk__cache_put(&c, k * ES);
	}
	CHECK_EQ(c.misses, 4, "four misses");
	CHECK_EQ(c.hits, 0, "no hits");
	CHECK_EQ(l.calls, 4, "four loads");
	CHECK_EQ(n_cached(&c), 4, "four cached");
	/* Then hits, without loading, returning the same memory. */
	CHECK_EQ(qk__cache_get(&c, 2 * ES, &t), 0, "hit");
	CHECK_EQ(qk__cache_get(&c, 2 * ES, &t2), 0, "second hit while held");
	CHECK(t == t2 && table_ok(t, 2 * ES, ES), "hits return the same table");
	qk__cache_put(&c, 2 * ES);
	qk__cache_put(&c, 2 * ES);
	for (uint64_t k = 1; k <= 4; k++) {
		CHECK_EQ(qk__cache_get(&c, k * ES, &t), 0, "hit");
		qk__cache_put(&c, k * ES);
	}
	CHECK_EQ(c.hits, 6, "six hits");
	CHECK_EQ(c.misses, 4, "still four misses");
	CHECK_EQ(l.calls, 4, "no loads on hits");
	CHECK(hash_consistent(&c), "hash consistent");

	/* A fifth table evicts exactly one. */
	CHECK_EQ(qk__cache_get(&c, 5 * ES, &t), 0, "fifth table");
	CHECK(table_ok(t, 5 * ES, ES), "fifth table content");
	qk__cache_put(&c, 5 * ES);
	CHECK_EQ(c.misses, 5, "fifth miss");
	CHECK_EQ(n_cached(&c), 4, "still four cached");
	CHECK(cached(&c, 5 * ES), "fifth cached");
	int gone = 0;
	for (uint64_t k = 1; k <= 4; k++)
		gone += !cached(&c, k * ES);
	CHECK_EQ(gone, 1, "one table evicted");

	/* Second chance: after an eviction pass every old slot has lost its
	 * "recent" mark; a table used again must survive the next eviction,
	 * while one not used since goes. */
	uint64_t keep = 0;
	for (uint64_t k = 1; k <= 4 && !keep; k++)
		if (cached(&c, k * ES))
			keep = k * ES;
	CHECK_EQ(qk__cache_get(&c, keep, &t), 0, "touch");
	qk__cache_put(&c, keep);
	CHECK_EQ(qk__cache_get(&c, 6 * ES, &t), 0, "sixth table");
	qk__cache_put(&c, 6 * ES);
	CHECK(cached(&c, keep), "recently used table survives the eviction");
	CHECK(cached(&c, 5 * ES), "newest table survives the eviction");
	CHECK(cached(&c, 6 * ES), "sixth cached");
	CHECK(hash_consistent(&c), "hash consistent after evictions");

#ifdef NDEBUG
	/* Putting what is not cached, or putting too often, breaks the
	 * contract (builds with assertions stop there); a release build
	 * changes nothing. */
	qk__cache_put(&c, 15 * ES);
	qk__cache_put(&c, 6 * ES);
	qk__cache_put(&c, 6 * ES);
	for (uint32_t i = 0; i < c.nslots; i++)
		CHECK_EQ(c.slots[i].refs, 0, "no refs left (no underflow)");
#endif
	qk__cache_destroy(&c);

	/* Entries of a whole cluster, as the L2 cache uses them. */
	qk__file_close(f);
	f = make_file(8, 65536);
	struct loader big = { .es = 65536 };
	CHECK_EQ(qk__cache_init(&c, f, 65536, 3, load, &big), 0, "init 64 KiB entries");
	for (int round = 0; round < 3; round++)
		for (uint64_t k = 1; k <= 8; k++) {
			int ret = qk__cache_get(&c, k * 65536, &t);
			CHECK(ret == 0 && table_ok(t, k * 65536, 65536), "64 KiB table %llu: %d",
			      (unsigned long long)k, ret);
			qk__cache_put(&c, k * 65536);
		}
	CHECK_EQ(c.misses, 24, "cyclic access larger than the cache always misses");
	qk__cache_destroy(&c);

	/* No load callback: the bytes as read. */
	CHECK_EQ(qk__cache_init(&c, f, 65536, 2, NULL, NULL), 0, "init without loader");
	CHECK_EQ(qk__cache_get(&c, 65536, &t), 0, "get without loader");
	CHECK_EQ(qk_be64(t), 65536ull * 1000, "raw big-endian bytes");
	qk__cache_put(&c, 65536);
	qk__cache_destroy(&c);
	qk__file_close(f);
}

/* A slot in use is never evicted, whatever else happens. */
/* qk__cache_peek: a cached table as it stands (changes included), else
 * the file's, loaded, without taking a slot or counting a miss. */
static void test_peek(void)
{
	struct qk__file *f = make_file(8, ES);
	struct loader l = { .es = ES };
	struct qk__cache c;
	uint64_t buf[ES / 8];
	void *t;

	CHECK_EQ(qk__cache_init(&c, f, ES, 2, load, &l), 0, "init");
	CHECK_EQ(qk__cache_peek(&c, 3 * ES, buf), 0, "peek an uncached table");
	CHECK(table_ok(buf, 3 * ES, ES), "peek: the file's table, loaded");
	CHECK(!cached(&c, 3 * ES) && c.misses == 0 && c.hits == 0 && l.calls == 1,
	      "peek takes no slot and counts nothing");
	CHECK_EQ(qk__cache_get(&c, 2 * ES, &t), 0, "get");
	((uint64_t *)t)[1] = 77;
	qk__cache_mark_dirty(&c, 2 * ES);
	qk__cache_put(&c, 2 * ES);
	CHECK_EQ(qk__cache_peek(&c, 2 * ES, buf), 0, "peek a cached table");
	CHECK(buf[1] == 77 && buf[0] == 2 * ES * 1000, "peek sees the cached change");
	l.fail_err = EIO;
	l.fail_off = 5 * ES;
	CHECK_EQ(qk__cache_peek(&c, 5 * ES, buf), -EIO, "a load error is passed through");
	qk__cache_discard(&c, 2 * ES);
	qk__cache_destroy(&c);
	qk__file_close(f);
}

static void test_in_use(void)
{
	struct qk__file *f = make_file(64, ES);
	struct loader l = { .es = ES };
	struct qk__cache c;
	void *held, *t;
	uint64_t seed = 7;

	for (uint32_t nslots = 2; nslots <= 5; nslots++) {
		CHECK_EQ(qk__cache_init(&c, f, ES, nslots, load, &l), 0, "init");
		CHECK_EQ(qk__cache_get(&c, 3 * ES, &held), 0, "hold");
		bool ok = true;
		for (int i = 0; i < 2000 && ok; i++) {
			uint64_t off = (1 + tap_rand(&seed) % 64) * ES;
			if (off == 3 * ES)
				continue;
			int ret = qk__cache_get(&c, off, &t);
			ok = ret == 0 && table_ok(t, off, ES) && cached(&c, 3 * ES) &&
			     table_ok(held, 3 * ES, ES);
			if (ret == 0)
				qk__cache_put(&c, off);
		}
		CHECK(ok, "%u slots: held table stays cached and intact", nslots);
		uint64_t hits = c.hits;
		CHECK_EQ(qk__cache_get(&c, 3 * ES, &t), 0, "held table hit");
		CHECK(t == held && c.hits == hits + 1, "%u slots: the held table is a hit", nslots);
		qk__cache_put(&c, 3 * ES);
		qk__cache_put(&c, 3 * ES);
		/* Once released it can go. */
		for (uint64_t k = 10; k < 10 + 2 * nslots; k++) {
			CHECK_EQ(qk__cache_get(&c, k * ES, &t), 0, "churn");
			qk__cache_put(&c, k * ES);
		}
		CHECK(!cached(&c, 3 * ES), "%u slots: released table evicted eventually", nslots);
		qk__cache_destroy(&c);
	}
	qk__file_close(f);
}

/* With every slot held, a miss must fail with -EBUSY and leave the cache
 * as it was. Runs in a child process: the first version of the cache
 * dereferenced a NULL victim here. */
static void all_in_use(void *arg)
{
	uint32_t nslots = (uint32_t)(uintptr_t)arg;
	struct qk__file *f = make_file(16, ES);
	struct loader l = { .es = ES };
	struct qk__cache c;
	void *t;
	qk__cache_init(&c, f, ES, nslots, load, &l);
	for (uint64_t k = 1; k <= nslots; k++)
		CHECK_EQ(qk__cache_get(&c, k * ES, &t), 0, "fill");
	qk__api_enter("test");
	int ret = qk__cache_get(&c, 15 * ES, &t);
	CHECK(ret == -EBUSY, "%u slots all in use: got %d, want -EBUSY", nslots, ret);
	CHECK(ret != -EBUSY || (qk_last_errno() == EBUSY && tap_one_line(qk_last_error())),
	      "-EBUSY recorded as the last error: %s", qk_last_error());
	for (uint64_t k = 1; k <= nslots; k++)
		CHECK(cached(&c, k * ES), "held table %llu still cached", (unsigned long long)k);
	CHECK(!cached(&c, 15 * ES), "refused table not cached");
	/* A hit still works, and after a put the miss succeeds. */
	CHECK_EQ(qk__cache_get(&c, 1 * ES, &t), 0, "hit with all slots held");
	qk__cache_put(&c, 1 * ES);
	qk__cache_put(&c, 1 * ES);
	ret = qk__cache_get(&c, 15 * ES, &t);
	CHECK(ret == 0 && table_ok(t, 15 * ES, ES), "miss after a release: %d", ret);
	CHECK(!cached(&c, 1 * ES), "the released slot was the victim");
	qk__cache_destroy(&c);
	qk__file_close(f);
}

static void test_load_errors(void)
{
	struct qk__file *f = make_file(16, ES);
	struct loader l = { .es = ES };
	struct qk__cache c;
	void *t;
	static const int errs[] = { EIO, EINVAL, ENOMEM, EFBIG };

	CHECK_EQ(qk__cache_init(&c, f, ES, 3, load, &l), 0, "init");
	for (uint64_t k = 1; k <= 3; k++) {
		CHECK_EQ(qk__cache_get(&c, k * ES, &t), 0, "fill");
		qk__cache_put(&c, k * ES);
	}
	for (size_t i = 0; i < sizeof errs / sizeof errs[0]; i++) {
		l.fail_off = 9 * ES;
		l.fail_err = errs[i];
		uint64_t calls = l.calls;
		int ret = qk__cache_get(&c, 9 * ES, &t);
		CHECK(ret == -errs[i], "load error %s: got %d", strerror(errs[i]), ret);
		CHECK(tap_contains(qk_last_error(), "refuses offset 576"), "loader's message kept: %s",
		      qk_last_error());
		CHECK(!cached(&c, 9 * ES), "failed table not cached");
		CHECK(hash_consistent(&c), "hash consistent after a failed load");
		ret = qk__cache_get(&c, 9 * ES, &t);
		CHECK(ret == -errs[i] && l.calls == calls + 2, "a failed load is retried, not cached: %d", ret);
		/* Refs must not leak from failed gets: every slot is free. */
		for (uint32_t s = 0; s < c.nslots; s++)
			CHECK_EQ(c.slots[s].refs, 0, "no refs after failed loads");
	}
	l.fail_err = 0;
	int ret = qk__cache_get(&c, 9 * ES, &t);
	CHECK(ret == 0 && table_ok(t, 9 * ES, ES), "loads once the error is gone: %d", ret);
	qk__cache_put(&c, 9 * ES);
	CHECK(hash_consistent(&c), "hash consistent");
	/* The other tables still read right (from cache or reloaded). */
	for (uint64_t k = 1; k <= 3; k++) {
		ret = qk__cache_get(&c, k * ES, &t);
		CHECK(ret == 0 && table_ok(t, k * ES, ES), "table %llu after errors: %d",
		      (unsigned long long)k, ret);
		qk__cache_put(&c, k * ES);
	}
	qk__cache_destroy(&c);
	qk__file_close(f);
}

/* ---- the model ---------------------------------------------------------------------- */

struct mslot {
	uint64_t off;
	bool recent;
	uint32_t refs;
};

struct mcache {
	uint32_t n;
	struct mslot *s;
	uint32_t hand;
	uint64_t hits, misses;
};

/* The model's get: returns the slot index, or -1 for a failed load. */
static int model_get(struct mcache *m, uint64_t off, bool load_fails, bool *hit)
{
	for (uint32_t i = 0; i < m->n; i++)
		if (m->s[i].off == off) {
			m->s[i].recent = true;
			m->s[i].refs++;
			m->hits++;
			*hit = true;
			return (int)i;
		}
	*hit = false;
	int victim = -1;
	for (uint32_t k = 0; k < 2 * m->n; k++) {
		struct mslot *s = &m->s[m->hand];
		uint32_t idx = m->hand;
		m->hand = (m->hand + 1) % m->n;
		if (s->refs)
			continue;
		if (s->off && s->recent) {
			s->recent = false;
			continue;
		}
		victim = (int)idx;
		break;
	}
	if (victim < 0)
		abort();   /* the random test never holds every slot */
	m->misses++;
	m->s[victim].off = 0;
	if (load_fails)
		return -1;
	m->s[victim].off = off;
	m->s[victim].recent = true;
	m->s[victim].refs = 1;
	return victim;
}

static void model_put(struct mcache *m, uint64_t off)
{
	for (uint32_t i = 0; i < m->n; i++)
		if (m->s[i].off == off && m->s[i].refs)
			m->s[i].refs--;
}

static void random_run(uint32_t nslots, uint32_t pool, uint64_t fail_mod, int ops, uint64_t seed)
{
	struct qk__file *f = make_file(pool, ES);
	struct loader l = { .es = ES, .fail_err = fail_mod ? EIO : 0, .fail_mod = fail_mod };
	struct qk__cache c;
	struct mcache m = { .n = nslots };
	m.s = calloc(nslots, sizeof *m.s);
	uint64_t *held = calloc(nslots, sizeof *held);
	uint32_t nheld = 0;
	CHECK_EQ(qk__cache_init(&c, f, ES, nslots, load, &l), 0, "init");
	int bad = 0;
	for (int op = 0; op < ops && bad < 3; op++) {
		uint64_t r = tap_rand(&seed);
		uint32_t what = (uint32_t)(r % 10);
		if (what == 9 && nheld) {
			uint32_t i = (uint32_t)((r >> 8) % nheld);
			qk__cache_put(&c, held[i]);
			model_put(&m, held[i]);
			held[i] = held[--nheld];
			continue;
		}
		/* Skew towards a hot set so that hits and evictions mix. */
		uint64_t k = (r >> 16) % 4 == 0 ? (r >> 20) % pool : (r >> 20) % (nslots + nslots / 2 + 1) % pool;
		uint64_t off = (k + 1) * ES;
		bool load_fails = fail_mod && (off / ES) % fail_mod == 1;
		bool mhit;
		uint64_t hits = c.hits;
		void *t = NULL;
		int ret = qk__cache_get(&c, off, &t);
		int ms = model_get(&m, off, load_fails, &mhit);
		bool ok;
		if (ms < 0) {
			ok = ret == -EIO && !cached(&c, off);
		} else {
			ok = ret == 0 && t == c.slots[ms].data && c.slots[ms].offset == off &&
			     table_ok(t, off, ES) && (c.hits == hits + 1) == mhit;
		}
		ok = ok && c.hits == m.hits && c.misses == m.misses;
		if (!ok) {
			bad++;
			CHECK(0, "random %u slots/%u tables, op %d: get 0x%llx: ret %d, model slot %d "
			      "(hit %d), lib hits %llu misses %llu, model %llu %llu", nslots, pool, op,
			      (unsigned long long)off, ret, ms, mhit, (unsigned long long)c.hits,
			      (unsigned long long)c.misses, (unsigned long long)m.hits,
			      (unsigned long long)m.misses);
		}
		if (ret == 0) {
			if (what >= 7 && nheld + 1 < nslots) {
				held[nheld++] = off;
			} else {
				qk__cache_put(&c, off);
				model_put(&m, off);
			}
		}
		if (op % 997 == 0 || op == ops - 1) {
			bool same = true;
			for (uint32_t i = 0; i < nslots; i++)
				same = same && c.slots[i].offset == m.s[i].off &&
				       c.slots[i].refs == m.s[i].refs && c.slots[i].recent == m.s[i].recent;
			if (!same || !hash_consistent(&c)) {
				bad++;
				CHECK(0, "random %u slots/%u tables, op %d: slots or hash differ from the model",
				      nslots, pool, op);
			}
		}
	}
	CHECK(bad == 0, "random %u slots/%u tables%s: %d ops match the model", nslots, pool,
	      fail_mod ? " with load errors" : "", ops);
	CHECK(m.hits > 0 && m.misses > (uint64_t)nslots, "random run mixes hits (%llu) and misses (%llu)",
	      (unsigned long long)m.hits, (unsigned long long)m.misses);
	while (nheld)
		qk__cache_put(&c, held[--nheld]);
	qk__cache_destroy(&c);
	qk__file_close(f);
	free(m.s);
	free(held);
}

int main(void)
{
	tap_watchdog(120);
	test_basics();
	test_peek();
	test_in_use();
	test_load_errors();
	random_run(2, 5, 0, 20000, 1);
	random_run(3, 40, 0, 20000, 2);
	random_run(8, 1000, 0, 100000, 3);
	random_run(64, 200, 0, 100000, 4);
	random_run(100, 1000, 0, 50000, 5);
	random_run(16, 300, 7, 100000, 6);
	for (uint32_t n = 2; n <= 4; n++)
		tap_isolate("all slots in use -> -EBUSY", all_in_use,
			    (void *)(uintptr_t)n);
	return tap_done();
}
