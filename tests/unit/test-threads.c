/*
 * test-threads: one in-memory image read by 8 threads at once. The L2
 * cache holds 2 tables while the image has many more, so the threads keep
 * evicting each other's tables; compressed clusters share the one
 * decompressed-cluster buffer. Every read must succeed with the right
 * bytes, and block status must stay right too.
 */
#include "tap.h"
#include "qcow2/qcow2.h"

#include <pthread.h>
#include <stdatomic.h>

#define NTHREADS 8

/* What guest cluster gc holds, for both the builder and the checkers. */
enum kind { K_UNALLOC, K_NORMAL, K_ZERO, K_COMP, K_EXT_MIXED };

struct image {
	const char *name;
	struct qb b;
	enum kind *kind;        /* per guest cluster */
	uint64_t nclusters;
	uint32_t mixed_alloc;   /* extended L2: subclusters allocated in K_EXT_MIXED */
	int ops;
};

/* The kind of guest cluster gc; only one in `density` may hold anything. */
static enum kind pick(uint64_t gc, uint32_t density)
{
	uint64_t h = gc * 0x9E3779B97F4A7C15ull;
	if ((h >> 20) % density)
		return K_UNALLOC;
	uint64_t x = h >> 59;    /* 0..31 */
	bool v3 = true;
	if (x < 16)
		return K_NORMAL;
	if (x < 22)
		return K_UNALLOC;
	if (x < 26)
		return v3 ? K_ZERO : K_UNALLOC;
	if (x < 30)
		return K_COMP;
	return v3 ? K_ZERO : K_NORMAL;
}

static void build(struct image *im, const char *name, uint32_t cb, uint64_t size, bool extl2,
		  uint32_t comp, uint32_t density, int ops)
{
	memset(im, 0, sizeof *im);
	im->name = name;
	im->ops = ops;
	qb_init(&im->b, 3, cb, size);
	im->b.extl2 = extl2;
	im->b.compression = comp;
	qb_layout(&im->b);
	im->nclusters = (size + im->b.cs - 1) / im->b.cs;
	im->kind = calloc(im->nclusters, sizeof *im->kind);
	im->mixed_alloc = 0x0f0ff00fu;
	/* Clusters in a scrambled host order, so runs are short. */
	for (uint64_t i = 0; i < im->nclusters; i++) {
		uint64_t gc = (i * 7919) % im->nclusters;
		enum kind k = pick(gc, density);
		if (extl2 && k == K_ZERO)
			k = K_EXT_MIXED;
		im->kind[gc] = k;
		switch (k) {
		case K_NORMAL:
			qb_normal(&im->b, gc);
			break;
		case K_ZERO:
			qb_set_l2(&im->b, gc, QCOW_OFLAG_ZERO, 0);
			break;
		case K_COMP:
			qb_compressed(&im->b, gc);
			break;
		case K_EXT_MIXED: {
			uint64_t h = qb_alloc(&im->b, 1);
			memset(im->b.buf + h, 0xee, im->b.cs);
			uint64_t sc = im->b.cs / 32;
			for (unsigned s = 0; s < 32; s++)
				if (im->mixed_alloc & (1u << s))
					qb_fill(&im->b, h + s * sc, sc, gc * im->b.cs + s * sc);
			/* Allocated subclusters, the rest zero-alloc. */
			qb_set_l2(&im->b, gc, h | QCOW_OFLAG_COPIED,
				  (uint64_t)~im->mixed_alloc << 32 | im->mixed_alloc);
			break;
		}
		case K_UNALLOC:
			break;
		}
	}
	qb_finish(&im->b);
}

static void expect(const struct image *im, uint8_t *buf, size_t len, uint64_t off)
{
	uint64_t cs = im->b.cs;
	size_t done = 0;
	while (done < len) {
		uint64_t pos = off + done, gc = pos / cs;
		size_t n = (size_t)qk_min_u64(cs - pos % cs, len - done);
		switch (im->kind[gc]) {
		case K_NORMAL:
		case K_COMP:
			qb_pat_fill(buf + done, n, pos);
			break;
		case K_EXT_MIXED: {
			uint64_t sc = cs / 32;
			for (size_t i = 0; i < n;) {
				uint64_t p = pos + i;
				unsigned s = (unsigned)(p % cs / sc);
				size_t m = (size_t)qk_min_u64(sc - p % sc, n - i);
				if (im->mixed_alloc & (1u << s))
					qb_pat_fill(buf + done + i, m, p);
				else
					memset(buf + done + i, 0, m);
				i += m;
			}
			break;
		}
		default:
			memset(buf + done, 0, n);
			break;
		}
		done += n;
	}
}

struct worker {
	const struct image *im;
	qk_image *img;
	uint64_t seed;
	int reads, bad_reads, errors, statuses, bad_statuses;
	char first_error[256];
};

static atomic_int go;

static void *work(void *arg)
{
	struct worker *w = arg;
	const struct image *im = w->im;
	uint64_t size = im->b.size, cs = im->b.cs;
	size_t max = (size_t)qk_min_u64(3 * cs, 256 << 10);
	uint8_t *got = malloc(max), *want = malloc(max);
	while (!atomic_load(&go))
		;
	for (int i = 0; i < im->ops; i++) {
		uint64_t off = tap_rand(&w->seed) % size;
		size_t len = (size_t)qk_min_u64(1 + tap_rand(&w->seed) % max, size - off);
		if (i % 5 == 0) {
			/* Block status: a data cluster says DATA, others not. */
			struct qk_extent e;
			int ret = qk_block_status(w->img, off, 1, &e);
			w->statuses++;
			enum kind k = im->kind[off / cs];
			if (ret < 0) {
				if (!w->errors++)
					snprintf(w->first_error, sizeof w->first_error, "status: %s", qk_last_error());
			} else if (k == K_NORMAL || k == K_COMP) {
				w->bad_statuses += !(e.flags & QK_EXTENT_DATA) ||
						   !!(e.flags & QK_EXTENT_COMPRESSED) != (k == K_COMP);
			} else if (k == K_UNALLOC || k == K_ZERO) {
				w->bad_statuses += !(e.flags & QK_EXTENT_ZERO);
			}
			continue;
		}
		int ret = qk_pread(w->img, got, len, off);
		w->reads++;
		if (ret < 0) {
			if (!w->errors++)
				snprintf(w->first_error, sizeof w->first_error, "pread: %s", qk_last_error());
			continue;
		}
		expect(im, want, len, off);
		if (memcmp(got, want, len) != 0 && !w->bad_reads++)
			snprintf(w->first_error, sizeof w->first_error,
				 "wrong bytes reading %zu at 0x%llx", len, (unsigned long long)off);
	}
	free(got);
	free(want);
	return NULL;
}

static void run(struct image *im, uint64_t cache_bytes)
{
	struct qk_open_options o;
	qk_open_options_init(&o);
	o.l2_cache_size = cache_bytes;
	qk_image *img;
	int ret = qb_open_named(&im->b, im->name, &o, &img);
	CHECK(ret == 0, "%s: open: %d %s", im->name, ret, qk_last_error());
	if (ret < 0)
		return;
	struct qcow2 *q = qcow2_of(img);
	uint64_t tables = (im->nclusters + im->b.l2_entries - 1) / im->b.l2_entries;
	CHECK(q->l2_cache.nslots == 2 && tables > 8 * q->l2_cache.nslots,
	      "%s: %u cache slots for %llu L2 tables", im->name, q->l2_cache.nslots,
	      (unsigned long long)tables);

	struct worker w[NTHREADS];
	pthread_t th[NTHREADS];
	atomic_store(&go, 0);
	for (int i = 0; i < NTHREADS; i++) {
		memset(&w[i], 0, sizeof w[i]);
		w[i].im = im;
		w[i].img = img;
		w[i].seed = 0x1000 + (uint64_t)i * 0x9E3779B97F4A7C15ull;
		CHECK(pthread_create(&th[i], NULL, work, &w[i]) == 0, "pthread_create");
	}
	atomic_store(&go, 1);
	int reads = 0, statuses = 0;
	for (int i = 0; i < NTHREADS; i++) {
		pthread_join(th[i], NULL);
		CHECK(w[i].errors == 0, "%s thread %d: %d errors (first: %s)", im->name, i,
		      w[i].errors, w[i].first_error);
		CHECK(w[i].bad_reads == 0, "%s thread %d: %d of %d reads returned wrong bytes (first: %s)",
		      im->name, i, w[i].bad_reads, w[i].reads, w[i].first_error);
		CHECK(w[i].bad_statuses == 0, "%s thread %d: %d of %d block status answers wrong",
		      im->name, i, w[i].bad_statuses, w[i].statuses);
		reads += w[i].reads;
		statuses += w[i].statuses;
	}
	CHECK(q->l2_cache.misses > (uint64_t)reads / 4, "%s: the small cache kept missing (%llu misses, %d reads)",
	      im->name, (unsigned long long)q->l2_cache.misses, reads);
	for (uint32_t i = 0; i < q->l2_cache.nslots; i++)
		CHECK_EQ(q->l2_cache.slots[i].refs, 0, "no cache references left after the threads");
	/* The image is still fine for a single reader afterwards. */
	size_t len = (size_t)qk_min_u64(im->b.size, 1 << 20);
	uint8_t *got = malloc(len), *want = malloc(len);
	expect(im, want, len, 0);
	CHECK(qk_pread(img, got, len, 0) == 0 && memcmp(got, want, len) == 0, "%s: read after the threads",
	      im->name);
	free(got);
	free(want);
	CHECK_EQ(qk_close(img), 0, "close");
	(void)statuses;
}

int main(void)
{
	tap_watchdog(300);   /* under TSan on two busy cores it takes 100-120 s */
	struct image im;

	/* 512-byte clusters: 64 entries per table, 512 tables. */
	build(&im, "threads-c512", 9, 16ull << 20, false, QK_COMPRESSION_ZLIB, 1, 15000);
	run(&im, 2 * 512);
	run(&im, 1);            /* rounds up to the minimum, two tables */
	qb_free(&im.b);
	free(im.kind);

	/* 4 KiB clusters with zstd: 512 entries per table, 32 tables. */
	build(&im, "threads-c4k-zstd", 12, 64ull << 20, false, QK_COMPRESSION_ZSTD, 4, 5000);
	run(&im, 2 * 4096);
	qb_free(&im.b);
	free(im.kind);

	/* 16 KiB clusters with extended L2: 1024 entries per table, 20 tables. */
	build(&im, "threads-extl2", 14, 320ull << 20, true, QK_COMPRESSION_ZLIB, 16, 4000);
	run(&im, 2 * 16384);
	qb_free(&im.b);
	free(im.kind);

	return tap_done();
}
