/*
 * test-write-threads: one read-write image (a real file, through qk_open
 * and the POSIX backend) written by 8 threads at once.
 *
 * Per configuration (64k clusters; 4k clusters with 64-bit refcounts and a
 * two-table L2 cache; v2), on an image prefilled with data, zero,
 * unallocated and (when qemu-io is there) compressed clusters:
 *   B. 8 writers write whole 512-byte sectors tagged with (sector, seq)
 *      into their own interleaved clusters (allocating, copy-on-write from
 *      zero and compressed clusters, in place), with flushes, while 3
 *      readers read random ranges: every 8-byte word must be old or new
 *      content of that very sector (never another sector's), and a sector
 *      no write touched during the read must be whole (one write or the
 *      initial content, no torn mix).
 *   A. 8 threads own interleaved cluster stripes and write unaligned
 *      sub-ranges in them (pwrite, pwritev, write_zeroes with and without
 *      unmap, whole- and partial-cluster discard), reading their own
 *      ranges back; the image must then equal the byte model.
 *   C. every thread writes the SAME cluster (unallocated, zero, allocated
 *      or compressed before) with a whole-cluster write of its own
 *      pattern, many rounds: afterwards the cluster holds exactly one
 *      thread's pattern.
 * Then flush, close, reopen read-only and compare with the model; and
 * `qemu-img check` (no errors, no leaks) and `qemu-img compare` with the
 * model when qemu-img is installed.
 *
 * Finally a single-threaded barrier count: one write allocating 64
 * clusters must not sync the file once per cluster.
 */
#include "tap.h"

#include <fcntl.h>
#include <stdatomic.h>
#include <sys/stat.h>
#include <time.h>

#define NW 8          /* writer threads */
#define NR 3          /* reader threads in phase B */
#define SECT 512u

struct cfg {
	const char *name;
	uint32_t cluster_size;
	uint32_t refcount_bits;
	uint32_t version;
	uint64_t size;
	uint64_t l2_cache;       /* 0 = default */
	int ops_a, ops_b, rounds_c;
};

static const struct cfg cfgs[] = {
	{ "v3 64k", 65536, 16, 3, 12u << 20, 0, 250, 250, 24 },
	{ "v3 4k refcount 64, small cache", 4096, 64, 3, 3u << 20, 2 * 4096, 150, 120, 24 },
	{ "v2 64k", 65536, 16, 2, 6u << 20, 0, 150, 150, 16 },
};

/* One image under test and its expected content. */
struct t_image {
	const struct cfg *cfg;
	char path[256];
	qk_image *img;
	uint64_t size, cs, nclusters, nsect;
	uint8_t *model;          /* expected bytes */
	uint8_t *initial;        /* content before phase B */
	bool *compressed;        /* per cluster, prefilled compressed */
	/* phase B: per-sector sequence numbers (0 = initial content) */
	_Atomic uint32_t *started, *done;
	atomic_int writers_left;
};

/* What the prefill puts in guest cluster gc: 0..23 data, 24..33 zero,
 * 34..43 compressed (with qemu-io), else nothing. */
static uint64_t prefill_hash(uint64_t gc)
{
	return (gc * 0x9E3779B97F4A7C15ull) >> 58;
}

static bool have_tool(const char *name)
{
	char cmd[128];
	snprintf(cmd, sizeof cmd, "command -v %s >/dev/null 2>&1", name);
	return system(cmd) == 0;
}

/* Compare [off, off+len) of the image with the model; one check. */
static void verify_range(struct t_image *ti, qk_image *img, const char *what)
{
	size_t chunk = 1u << 20;
	uint8_t *buf = malloc(chunk);
	uint64_t bad_at = UINT64_MAX;
	int ret = 0;
	for (uint64_t off = 0; off < ti->size && ret == 0 && bad_at == UINT64_MAX; off += chunk) {
		size_t n = (size_t)qk_min_u64(chunk, ti->size - off);
		ret = qk_pread(img, buf, n, off);
		if (ret == 0 && memcmp(buf, ti->model + off, n) != 0)
			for (size_t i = 0; i < n; i++)
				if (buf[i] != ti->model[off + i]) {
					bad_at = off + i;
					break;
				}
	}
	CHECK(ret == 0, "%s: %s: read failed: %s", ti->cfg->name, what, qk_last_error());
	CHECK(bad_at == UINT64_MAX, "%s: %s: content differs from the model at offset %llu "
	      "(cluster %llu)", ti->cfg->name, what, (unsigned long long)bad_at,
	      (unsigned long long)(bad_at / ti->cs));
	free(buf);
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* ---- setup ------------------------------------------------------------------ */

static bool setup(struct t_image *ti, const struct cfg *c)
{
	memset(ti, 0, sizeof *ti);
	ti->cfg = c;
	ti->size = c->size;
	ti->cs = c->cluster_size;
	ti->nclusters = c->size / c->cluster_size;
	ti->nsect = c->size / SECT;
	const char *tmp = getenv("TMPDIR");
	snprintf(ti->path, sizeof ti->path, "%s/qk-write-threads-XXXXXX", tmp && *tmp ? tmp : "/tmp");
	int fd = mkstemp(ti->path);
	CHECK(fd >= 0, "%s: mkstemp: %s", c->name, strerror(errno));
	if (fd < 0)
		return false;
	close(fd);

	struct qk_create_options co;
	qk_create_options_init(&co);
	co.size = c->size;
	co.cluster_size = c->cluster_size;
	co.refcount_bits = c->refcount_bits;
	co.version = c->version;
	int ret = qk_create(ti->path, &co);
	CHECK(ret == 0, "%s: qk_create: %s", c->name, qk_last_error());
	if (ret < 0)
		return false;

	ti->model = calloc(1, ti->size);
	ti->initial = malloc(ti->size);
	ti->compressed = calloc(ti->nclusters, sizeof *ti->compressed);
	ti->started = calloc(ti->nsect, sizeof *ti->started);
	ti->done = calloc(ti->nsect, sizeof *ti->done);
	if (!ti->model || !ti->initial || !ti->compressed || !ti->started || !ti->done)
		abort();

	/* Prefill: data (the offset pattern), zero and unallocated clusters. */
	struct qk_open_options o;
	qk_open_options_init(&o);
	o.flags = QK_OPEN_RDWR;
	qk_image *img;
	ret = qk_open(ti->path, &o, &img);
	CHECK(ret == 0, "%s: open for prefill: %s", c->name, qk_last_error());
	if (ret < 0)
		return false;
	uint8_t *buf = malloc(ti->cs);
	for (uint64_t gc = 0; gc < ti->nclusters && ret == 0; gc++) {
		uint64_t h = prefill_hash(gc);
		uint64_t off = gc * ti->cs;
		if (h < 24) {
			qb_pat_fill(buf, ti->cs, off);
			ret = qk_pwrite(img, buf, ti->cs, off);
			memcpy(ti->model + off, buf, ti->cs);
		} else if (h < 34) {
			/* partly written, then zeroed: a zero cluster (v3) */
			qb_pat_fill(buf, ti->cs, off);
			ret = qk_pwrite(img, buf, ti->cs / 2, off);
			if (ret == 0)
				ret = qk_write_zeroes(img, off, ti->cs, h & 1 ? QK_ZERO_MAY_UNMAP : 0);
		}
	}
	free(buf);
	CHECK(ret == 0, "%s: prefill: %s", c->name, qk_last_error());
	ret = qk_close(img);
	CHECK(ret == 0, "%s: close after prefill: %s", c->name, qk_last_error());

	/* Compressed clusters, when qemu-io can make them: every unallocated
	 * cluster with a hash in the right range. */
	if (have_tool("qemu-io")) {
		size_t cap = 64 + ti->nclusters * 64;
		char *cmd = malloc(cap);
		size_t n = (size_t)snprintf(cmd, cap, "qemu-io -f qcow2 '%s'", ti->path);
		int count = 0;
		for (uint64_t gc = 0; gc < ti->nclusters; gc++) {
			uint64_t h = prefill_hash(gc);
			if (h >= 34 && h < 44) {
				n += (size_t)snprintf(cmd + n, cap - n, " -c 'write -c -P 0x5a %llu %llu'",
						      (unsigned long long)(gc * ti->cs),
						      (unsigned long long)ti->cs);
				ti->compressed[gc] = true;
				memset(ti->model + gc * ti->cs, 0x5a, ti->cs);
				count++;
			}
		}
		snprintf(cmd + n, cap - n, " >/dev/null 2>&1");
		if (count) {
			int st = system(cmd);
			CHECK(st == 0, "%s: qemu-io could not write compressed clusters (%d)", c->name, st);
		}
		free(cmd);
	}
	qk_open_options_init(&o);
	o.flags = QK_OPEN_RDWR;
	o.l2_cache_size = c->l2_cache;
	ret = qk_open(ti->path, &o, &ti->img);
	CHECK(ret == 0, "%s: open: %s", c->name, qk_last_error());
	if (ret < 0)
		return false;
	verify_range(ti, ti->img, "after prefill");
	return true;
}

static void teardown(struct t_image *ti)
{
	if (ti->img)
		qk_close(ti->img);
	unlink(ti->path);
	free(ti->model);
	free(ti->initial);
	free(ti->compressed);
	free((void *)ti->started);
	free((void *)ti->done);
}

/* ---- phase B: tagged sectors, writers and readers ----------------------------- */

static uint64_t tag(uint64_t sector, int t, uint32_t seq)
{
	return sector << 32 | (uint64_t)(t & 0xff) << 24 | (seq & 0xffffff);
}

struct b_arg {
	struct t_image *ti;
	int t;
	uint64_t seed;
	int errors, bad;
	long reads, torn_overlapped;
	char msg[256];
};

static pthread_barrier_t b_start;

static void *b_writer(void *p)
{
	struct b_arg *a = p;
	struct t_image *ti = a->ti;
	uint64_t spc = ti->cs / SECT, mine = (ti->nclusters - a->t + NW - 1) / NW;
	uint64_t *buf = malloc(ti->cs);
	pthread_barrier_wait(&b_start);
	for (uint32_t seq = 1; seq <= (uint32_t)ti->cfg->ops_b && !a->errors; seq++) {
		uint64_t gc = (uint64_t)a->t + NW * (tap_rand(&a->seed) % mine);
		uint64_t s0 = tap_rand(&a->seed) % spc, ns = 1 + tap_rand(&a->seed) % (spc - s0);
		if (tap_rand(&a->seed) % 4 == 0)
			s0 = 0, ns = spc;
		uint64_t first = gc * spc + s0;
		for (uint64_t s = 0; s < ns; s++) {
			atomic_store_explicit(&ti->started[first + s], seq, memory_order_release);
			for (unsigned w = 0; w < SECT / 8; w++) {
				uint64_t v = tag(first + s, a->t, seq);
				memcpy((uint8_t *)buf + s * SECT + w * 8, &v, 8);
			}
		}
		int ret = qk_pwrite(ti->img, buf, ns * SECT, first * SECT);
		if (ret < 0 && !a->errors++)
			snprintf(a->msg, sizeof a->msg, "pwrite: %s", qk_last_error());
		for (uint64_t s = 0; s < ns; s++)
			atomic_store_explicit(&ti->done[first + s], seq, memory_order_release);
		if (tap_rand(&a->seed) % 32 == 0 && (ret = qk_flush(ti->img)) < 0 && !a->errors++)
			snprintf(a->msg, sizeof a->msg, "flush: %s", qk_last_error());
	}
	atomic_fetch_sub(&ti->writers_left, 1);
	free(buf);
	return NULL;
}

/* Is word w (at byte `pos` of sector s) old or new content of sector s
 * for a read that began after write `lo` completed and ended before any
 * write after `hi` started? Sets *seq (0 = initial content). */
static bool word_ok(const struct t_image *ti, uint64_t s, unsigned pos, uint64_t w, uint32_t lo,
		    uint32_t hi, uint32_t *seq)
{
	if (w >> 32 == s) {
		*seq = (uint32_t)(w & 0xffffff);
		if (*seq >= (lo ? lo : 1) && *seq <= hi)
			return true;
	}
	uint64_t init;
	memcpy(&init, ti->initial + s * SECT + pos, 8);
	*seq = 0;
	return lo == 0 && w == init;
}

static void *b_reader(void *p)
{
	struct b_arg *a = p;
	struct t_image *ti = a->ti;
	const unsigned max_sect = 64;
	uint8_t *buf = malloc(max_sect * SECT);
	uint32_t lo[64], hi[64];
	pthread_barrier_wait(&b_start);
	while (atomic_load(&ti->writers_left) > 0 && !a->bad && a->errors < 1) {
		uint64_t s0 = tap_rand(&a->seed) % ti->nsect;
		unsigned ns = 1 + (unsigned)(tap_rand(&a->seed) % max_sect);
		if (s0 + ns > ti->nsect)
			ns = (unsigned)(ti->nsect - s0);
		for (unsigned i = 0; i < ns; i++)
			lo[i] = atomic_load_explicit(&ti->done[s0 + i], memory_order_acquire);
		int ret = qk_pread(ti->img, buf, ns * SECT, s0 * SECT);
		for (unsigned i = 0; i < ns; i++)
			hi[i] = atomic_load_explicit(&ti->started[s0 + i], memory_order_acquire);
		a->reads++;
		if (ret < 0) {
			if (!a->errors++)
				snprintf(a->msg, sizeof a->msg, "pread: %s", qk_last_error());
			continue;
		}
		for (unsigned i = 0; i < ns && !a->bad; i++) {
			uint64_t s = s0 + i;
			uint32_t first_seq = 0, seq;
			bool mixed = false;
			for (unsigned w = 0; w < SECT / 8; w++) {
				uint64_t v;
				memcpy(&v, buf + i * SECT + w * 8, 8);
				if (!word_ok(ti, s, w * 8, v, lo[i], hi[i], &seq)) {
					a->bad++;
					snprintf(a->msg, sizeof a->msg,
						 "sector %llu (cluster %llu) word %u: 0x%016llx is neither "
						 "old nor new content (writes %u..%u possible; word names "
						 "sector %llu seq %llu)", (unsigned long long)s,
						 (unsigned long long)(s * SECT / ti->cs), w,
						 (unsigned long long)v, lo[i], hi[i],
						 (unsigned long long)(v >> 32),
						 (unsigned long long)(v & 0xffffff));
					break;
				}
				if (w == 0)
					first_seq = seq;
				else if (seq != first_seq)
					mixed = true;
			}
			if (!a->bad && mixed) {
				if (lo[i] == hi[i]) {
					a->bad++;
					snprintf(a->msg, sizeof a->msg,
						 "sector %llu: torn (content of several writes) though no "
						 "write to it overlapped the read (last write %u)",
						 (unsigned long long)s, lo[i]);
				} else {
					/* an in-place write raced the read: the
					 * page cache does not make that atomic */
					a->torn_overlapped++;
				}
			}
		}
	}
	free(buf);
	return NULL;
}

static void phase_b(struct t_image *ti)
{
	pthread_t th[NW + NR];
	struct b_arg args[NW + NR];
	memcpy(ti->initial, ti->model, ti->size);
	atomic_store(&ti->writers_left, NW);
	pthread_barrier_init(&b_start, NULL, NW + NR);
	for (int i = 0; i < NW + NR; i++) {
		memset(&args[i], 0, sizeof args[i]);
		args[i].ti = ti;
		args[i].t = i;
		args[i].seed = 0x1234567ull * (uint64_t)(i + 1) + ti->cs;
		pthread_create(&th[i], NULL, i < NW ? b_writer : b_reader, &args[i]);
	}
	long reads = 0, torn = 0;
	for (int i = 0; i < NW + NR; i++) {
		pthread_join(th[i], NULL);
		CHECK(args[i].errors == 0, "%s: phase B %s %d: %d errors, first: %s", ti->cfg->name,
		      i < NW ? "writer" : "reader", i, args[i].errors, args[i].msg);
		if (i >= NW) {
			CHECK(args[i].bad == 0, "%s: phase B reader %d: %s", ti->cfg->name, i, args[i].msg);
			reads += args[i].reads;
			torn += args[i].torn_overlapped;
		}
	}
	pthread_barrier_destroy(&b_start);
	CHECK(reads > 0, "%s: phase B: the readers read nothing", ti->cfg->name);
	if (torn)
		printf("# %s: %ld sectors read while an in-place write to them ran held two "
		       "writes' words (page cache, tolerated)\n", ti->cfg->name, torn);
	/* The model: the last write of every sector. */
	for (uint64_t s = 0; s < ti->nsect; s++) {
		uint32_t seq = atomic_load(&ti->done[s]);
		if (!seq)
			continue;
		int owner = (int)((s * SECT / ti->cs) % NW);
		for (unsigned w = 0; w < SECT / 8; w++) {
			uint64_t v = tag(s, owner, seq);
			memcpy(ti->model + s * SECT + w * 8, &v, 8);
		}
	}
	verify_range(ti, ti->img, "after phase B");
}

/* ---- phase A: stripes, unaligned writes, zeroes, discards ----------------------- */

struct a_arg {
	struct t_image *ti;
	int t;
	uint64_t seed;
	int errors, bad_readback;
	char msg[256];
};

static void *a_worker(void *p)
{
	struct a_arg *a = p;
	struct t_image *ti = a->ti;
	uint64_t cs = ti->cs, mine = (ti->nclusters - a->t + NW - 1) / NW;
	uint8_t *buf = malloc(cs), *back = malloc(cs);
	for (int op = 0; op < ti->cfg->ops_a && !a->errors; op++) {
		uint64_t gc = (uint64_t)a->t + NW * (tap_rand(&a->seed) % mine);
		uint64_t start = gc * cs;
		uint64_t x = tap_rand(&a->seed) % 100;
		uint64_t in = tap_rand(&a->seed) % cs;
		uint64_t n = 1 + tap_rand(&a->seed) % (cs - in);
		if (tap_rand(&a->seed) % 5 == 0)
			in = 0, n = cs;
		uint8_t *m = ti->model + start + in;
		int ret = 0;
		const char *what = "";
		if (x < 45) {
			what = "pwrite";
			for (uint64_t i = 0; i < n; i++)
				buf[i] = (uint8_t)(tap_rand(&a->seed) >> 56);
			ret = qk_pwrite(ti->img, buf, n, start + in);
			memcpy(m, buf, n);
		} else if (x < 55) {
			what = "pwritev";
			uint8_t fill = (uint8_t)(0x10 + a->t);
			struct iovec iov[3];
			uint64_t c1 = n / 3, c2 = n / 2;
			memset(buf, fill, n);
			for (uint64_t i = 0; i < n; i += 7)
				buf[i] = (uint8_t)(i >> 3);
			iov[0].iov_base = buf;
			iov[0].iov_len = c1;
			iov[1].iov_base = buf + c1;
			iov[1].iov_len = c2 - c1;
			iov[2].iov_base = buf + c2;
			iov[2].iov_len = n - c2;
			ret = qk_pwritev(ti->img, iov, 3, start + in);
			memcpy(m, buf, n);
		} else if (x < 70) {
			what = "write_zeroes";
			ret = qk_write_zeroes(ti->img, start + in, n, x & 1 ? QK_ZERO_MAY_UNMAP : 0);
			memset(m, 0, n);
		} else if (x < 78) {
			what = "discard (whole cluster)";
			ret = qk_discard(ti->img, start, cs);
			memset(ti->model + start, 0, cs);
		} else if (x < 83) {
			/* a part of a cluster: a hint, left alone */
			what = "discard (partial)";
			if (n == cs)
				n = cs - 1;
			ret = qk_discard(ti->img, start + in, qk_min_u64(n, cs - in - (in == 0)));
		} else if (x < 85) {
			what = "flush";
			ret = qk_flush(ti->img);
		} else {
			what = "read back";
			ret = qk_pread(ti->img, back, n, start + in);
			if (ret == 0 && memcmp(back, m, n) != 0 && !a->bad_readback++) {
				uint64_t i = 0;
				while (back[i] == m[i])
					i++;
				snprintf(a->msg, sizeof a->msg, "read back of %llu bytes at %llu: byte "
					 "%llu is 0x%02x, want 0x%02x", (unsigned long long)n,
					 (unsigned long long)(start + in), (unsigned long long)(start + in + i),
					 back[i], m[i]);
			}
		}
		if (ret < 0 && !a->errors++)
			snprintf(a->msg, sizeof a->msg, "%s of %llu bytes at %llu: %s", what,
				 (unsigned long long)n, (unsigned long long)(start + in), qk_last_error());
	}
	free(buf);
	free(back);
	return NULL;
}

static void phase_a(struct t_image *ti)
{
	pthread_t th[NW];
	struct a_arg args[NW];
	for (int i = 0; i < NW; i++) {
		memset(&args[i], 0, sizeof args[i]);
		args[i].ti = ti;
		args[i].t = i;
		args[i].seed = 0xabcdef12345ull * (uint64_t)(i + 3) + ti->cs;
		pthread_create(&th[i], NULL, a_worker, &args[i]);
	}
	for (int i = 0; i < NW; i++) {
		pthread_join(th[i], NULL);
		CHECK(args[i].errors == 0 && args[i].bad_readback == 0, "%s: phase A thread %d: %s",
		      ti->cfg->name, i, args[i].msg);
	}
	verify_range(ti, ti->img, "after phase A");
}

/* ---- phase C: everyone writes the same cluster --------------------------------- */

struct c_arg {
	struct t_image *ti;
	int t;
	int errors;
	char msg[256];
};

static pthread_barrier_t c_bar;
static _Atomic uint64_t c_cluster;
static atomic_bool c_stop;

/* Thread t's pattern for a whole cluster. */
static void c_pattern(uint8_t *buf, uint64_t cs, int t)
{
	for (uint64_t i = 0; i < cs; i++)
		buf[i] = (uint8_t)((0x80 + t * 13) ^ ((i >> 9) & 0x0f));
}

static void *c_worker(void *p)
{
	struct c_arg *a = p;
	struct t_image *ti = a->ti;
	uint8_t *buf = malloc(ti->cs);
	c_pattern(buf, ti->cs, a->t);
	for (;;) {
		pthread_barrier_wait(&c_bar);             /* round starts */
		if (atomic_load(&c_stop))
			break;
		uint64_t gc = atomic_load(&c_cluster);
		int ret = qk_pwrite(ti->img, buf, ti->cs, gc * ti->cs);
		if (ret < 0 && !a->errors++)
			snprintf(a->msg, sizeof a->msg, "pwrite of cluster %llu: %s",
				 (unsigned long long)gc, qk_last_error());
		pthread_barrier_wait(&c_bar);             /* round ends */
	}
	free(buf);
	return NULL;
}

static void phase_c(struct t_image *ti)
{
	pthread_t th[NW];
	struct c_arg args[NW];
	uint8_t *pat[NW], *got = malloc(ti->cs);
	pthread_barrier_init(&c_bar, NULL, NW + 1);
	atomic_store(&c_stop, false);
	for (int i = 0; i < NW; i++) {
		memset(&args[i], 0, sizeof args[i]);
		args[i].ti = ti;
		args[i].t = i;
		pat[i] = malloc(ti->cs);
		c_pattern(pat[i], ti->cs, i);
		pthread_create(&th[i], NULL, c_worker, &args[i]);
	}
	int bad = 0, winners[NW] = { 0 };
	uint64_t comp_next = 0, data_next = 0;
	for (int r = 0; r < ti->cfg->rounds_c; r++) {
		/* The state of the cluster before the round, by turns:
		 * unallocated, zero, allocated, compressed (when there is one
		 * left from the prefill, else allocated). */
		uint64_t gc = (uint64_t)(r * 7 + 3) % ti->nclusters, start;
		int ret = 0;
		switch (r % 4) {
		case 0:
			ret = qk_discard(ti->img, gc * ti->cs, ti->cs);
			memset(ti->model + gc * ti->cs, 0, ti->cs);   /* no backing file */
			break;
		case 1:
			ret = qk_write_zeroes(ti->img, gc * ti->cs, ti->cs, 0);
			memset(ti->model + gc * ti->cs, 0, ti->cs);
			break;
		case 2:
			while (data_next < ti->nclusters && prefill_hash(data_next) >= 24)
				data_next++;
			if (data_next < ti->nclusters)
				gc = data_next++;
			break;
		case 3:
			while (comp_next < ti->nclusters && !ti->compressed[comp_next])
				comp_next++;
			if (comp_next < ti->nclusters)
				gc = comp_next++;
			break;
		}
		CHECK(ret == 0, "%s: phase C: preparing cluster %llu: %s", ti->cfg->name,
		      (unsigned long long)gc, qk_last_error());
		start = gc * ti->cs;
		atomic_store(&c_cluster, gc);
		pthread_barrier_wait(&c_bar);
		pthread_barrier_wait(&c_bar);
		ret = qk_pread(ti->img, got, ti->cs, start);
		int who = -1;
		for (int i = 0; i < NW && ret == 0; i++)
			if (memcmp(got, pat[i], ti->cs) == 0)
				who = i;
		if (who < 0 && !bad++) {
			uint64_t i = 1;
			while (i < ti->cs && got[i] == got[0])
				i++;
			CHECK(0, "%s: phase C round %d: cluster %llu (kind %d) holds no single thread's "
			      "pattern (read %d; bytes 0x%02x.. then 0x%02x at +%llu)", ti->cfg->name, r,
			      (unsigned long long)gc, r % 4, ret, got[0], i < ti->cs ? got[i] : 0,
			      (unsigned long long)i);
		}
		if (who >= 0) {
			winners[who]++;
			memcpy(ti->model + start, pat[who], ti->cs);
		}
	}
	CHECK(bad == 0, "%s: phase C: %d of %d rounds left a mixed cluster", ti->cfg->name, bad,
	      ti->cfg->rounds_c);
	atomic_store(&c_stop, true);
	pthread_barrier_wait(&c_bar);
	for (int i = 0; i < NW; i++) {
		pthread_join(th[i], NULL);
		CHECK(args[i].errors == 0, "%s: phase C thread %d: %s", ti->cfg->name, i, args[i].msg);
		free(pat[i]);
	}
	pthread_barrier_destroy(&c_bar);
	free(got);
	verify_range(ti, ti->img, "after phase C");
}

/* ---- after: flush, close, reopen, QEMU's opinion -------------------------------- */

static void finish_image(struct t_image *ti)
{
	int ret = qk_flush(ti->img);
	CHECK(ret == 0, "%s: flush: %s", ti->cfg->name, qk_last_error());
	ret = qk_close(ti->img);
	ti->img = NULL;
	CHECK(ret == 0, "%s: close: %s", ti->cfg->name, qk_last_error());

	qk_image *img;
	ret = qk_open(ti->path, NULL, &img);
	CHECK(ret == 0, "%s: reopen: %s", ti->cfg->name, qk_last_error());
	if (ret == 0) {
		verify_range(ti, img, "after reopening");
		qk_close(img);
	}

	if (!have_tool("qemu-img")) {
		printf("# qemu-img not installed: no qemu-img check\n");
		return;
	}
	char cmd[700], raw[300];
	snprintf(cmd, sizeof cmd, "qemu-img check -f qcow2 '%s' >'%s.check' 2>&1", ti->path, ti->path);
	int st = system(cmd);
	if (st != 0) {
		char line[200];
		snprintf(raw, sizeof raw, "%s.check", ti->path);
		FILE *f = fopen(raw, "r");
		while (f && fgets(line, sizeof line, f))
			fprintf(stderr, "#   %s", line);
		if (f)
			fclose(f);
	}
	CHECK(st == 0, "%s: qemu-img check: exit %d (errors or leaks)", ti->cfg->name,
	      WIFEXITED(st) ? WEXITSTATUS(st) : -1);
	snprintf(raw, sizeof raw, "%s.check", ti->path);
	unlink(raw);

	snprintf(raw, sizeof raw, "%s.raw", ti->path);
	FILE *f = fopen(raw, "wb");
	bool wrote = f && fwrite(ti->model, 1, ti->size, f) == ti->size;
	if (f)
		fclose(f);
	CHECK(wrote, "%s: writing the model to %s", ti->cfg->name, raw);
	snprintf(cmd, sizeof cmd, "qemu-img compare -f qcow2 -F raw '%s' '%s' >/dev/null 2>&1",
		 ti->path, raw);
	st = system(cmd);
	CHECK(st == 0, "%s: qemu-img compare with the model: exit %d", ti->cfg->name,
	      WIFEXITED(st) ? WEXITSTATUS(st) : -1);
	unlink(raw);
}

/* ---- barriers: one allocating write must not sync per cluster ----------------------- */

static atomic_int sync_count;
static int (*real_sync)(struct qk__file *f);

static int counting_sync(struct qk__file *f)
{
	atomic_fetch_add(&sync_count, 1);
	return real_sync(f);
}

static void sync_per_cluster(void)
{
	char path[256];
	const char *tmp = getenv("TMPDIR");
	snprintf(path, sizeof path, "%s/qk-write-sync-XXXXXX", tmp && *tmp ? tmp : "/tmp");
	int fd = mkstemp(path);
	if (fd < 0) {
		CHECK(0, "mkstemp: %s", strerror(errno));
		return;
	}
	close(fd);
	struct qk_create_options co;
	qk_create_options_init(&co);
	co.size = 4u << 20;
	co.cluster_size = 512;
	int ret = qk_create(path, &co);
	CHECK(ret == 0, "barriers: qk_create: %s", qk_last_error());

	/* The file's bytes on the memory backend, whose sync we count. */
	struct stat sb;
	uint8_t *data = NULL;
	fd = open(path, O_RDONLY);
	if (ret == 0 && fd >= 0 && fstat(fd, &sb) == 0 && (data = malloc((size_t)sb.st_size)) &&
	    pread(fd, data, (size_t)sb.st_size, 0) == sb.st_size) {
		struct qk__file *f;
		static struct qk__io_ops ops;
		qk__api_enter("qk_open");
		ret = qk__file_open_mem(data, (size_t)sb.st_size, "sync.qcow2", &f);
		CHECK(ret == 0, "barriers: memory file: %s", qk_last_error());
		if (ret == 0) {
			ops = *f->ops;
			real_sync = ops.sync;
			ops.sync = counting_sync;
			f->ops = &ops;
			struct qk_open_options o;
			qk_open_options_init(&o);
			o.flags = QK_OPEN_RDWR;
			qk_image *img;
			ret = qk__image_open_file(&qk__mem_host, f, "sync.qcow2", &o, NULL, &img);
			CHECK(ret == 0, "barriers: open: %s", qk_last_error());
			if (ret == 0) {
				uint8_t buf[64 * 512];
				memset(buf, 0x42, sizeof buf);
				/* The first L2 table and refcount block come first. */
				ret = qk_pwrite(img, buf, 512, 0);
				atomic_store(&sync_count, 0);
				if (ret == 0)
					ret = qk_pwrite(img, buf, sizeof buf, 512);
				int syncs = atomic_load(&sync_count);
				CHECK(ret == 0, "barriers: write: %s", qk_last_error());
				/* QEMU needs none until a flush; allow a few for
				 * cache pressure. */
				CHECK_BUG(syncs <= 8, "sync-per-cluster",
					  "one qk_pwrite allocating 64 clusters (512 bytes each) synced "
					  "the file %d times", syncs);
				uint8_t back[64 * 512];
				ret = qk_pread(img, back, sizeof back, 512);
				CHECK(ret == 0 && memcmp(back, buf, sizeof buf) == 0,
				      "barriers: read back");
				CHECK(qk_close(img) == 0, "barriers: close: %s", qk_last_error());
			}
		}
	} else {
		CHECK(0, "barriers: reading %s back failed", path);
	}
	if (fd >= 0)
		close(fd);
	free(data);
	unlink(path);
}

int main(void)
{
	tap_watchdog(120);
	for (size_t i = 0; i < sizeof cfgs / sizeof cfgs[0]; i++) {
		struct t_image ti;
		double t[5];
		t[0] = now();
		if (setup(&ti, &cfgs[i])) {
			t[1] = now();
			phase_c(&ti);   /* first, while compressed clusters remain */
			t[2] = now();
			phase_b(&ti);
			t[3] = now();
			phase_a(&ti);
			t[4] = now();
			finish_image(&ti);
			printf("# %s: setup %.2fs, C %.2fs, B %.2fs, A %.2fs, finish %.2fs\n",
			       cfgs[i].name, t[1] - t[0], t[2] - t[1], t[3] - t[2], t[4] - t[3],
			       now() - t[4]);
		}
		teardown(&ti);
	}
	sync_per_cluster();
	return tap_done();
}
