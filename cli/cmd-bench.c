/*
 * cmd-bench.c - "qcowkit bench": read throughput, as qemu-img bench.
 *
 * Design note. qemu-img keeps DEPTH asynchronous requests in flight; we get
 * the same concurrency from DEPTH worker threads (at most 64) issuing
 * blocking qk_pread() calls on the one shared, thread-safe image handle.
 * Request i goes to a fixed offset - sequential: OFFSET + i * STEP,
 * wrapped modulo the image size exactly as qemu-img's bench_cb() does;
 * --random: a SIZE-aligned offset drawn from a seeded hash of i - so the
 * set of requests does not depend on thread scheduling. Workers take
 * request numbers from one atomic counter; each has its own 4 KiB-aligned
 * buffer so -t none (O_DIRECT) works. With -w the buffers hold the
 * --pattern byte and requests are qk_pwrite() calls on an image opened
 * read-write; --flush-interval N makes the worker that completes every
 * Nth request call qk_flush(). As with qemu-img, the time does not include
 * closing the image (which flushes what is left).
 *
 * SPDX-License-Identifier: MIT
 */
#include <getopt.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"

#define MAX_THREADS CLI_MAX_THREADS

struct bench {
	qk_image *img;
	uint64_t image_size;
	uint64_t bufsize;
	uint64_t step;
	uint64_t offset;
	uint64_t count;
	bool random;
	uint64_t seed;
	bool write;
	int pattern;
	uint64_t flush_interval;
	unsigned batch;           /* reads per qk_pread_batch (0: qk_pread) */

	atomic_ullong next;       /* next request number */
	atomic_bool failed;
	pthread_mutex_t lock;     /* guards errmsg */
	char errmsg[1024];
};

/* splitmix64: a small, well-mixed hash for reproducible random offsets. */
static uint64_t mix64(uint64_t x)
{
	x += 0x9E3779B97F4A7C15ull;
	x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
	x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
	return x ^ (x >> 31);
}

/* Guest offset of request `i`. */
static uint64_t request_offset(const struct bench *b, uint64_t i)
{
	if (b->random) {
		uint64_t blocks = b->bufsize ? b->image_size / b->bufsize : 0;

		if (blocks == 0)
			return 0;
		return (mix64(b->seed ^ mix64(i)) % blocks) * b->bufsize;
	}
	/* qemu-img: offset += step; offset %= image_size, after each
	 * request, so only the first request may lie at OFFSET itself. */
	if (i == 0 || b->image_size == 0)
		return b->offset;
	return (uint64_t)(((unsigned __int128)b->offset +
			   (unsigned __int128)i * b->step) % b->image_size);
}

/* Record the first failure's message. */
static void bench_fail(struct bench *b, const char *msg)
{
	pthread_mutex_lock(&b->lock);
	if (!atomic_exchange(&b->failed, true))
		snprintf(b->errmsg, sizeof(b->errmsg), "%s", msg);
	pthread_mutex_unlock(&b->lock);
}

/* Reads of an image opened with -t none: b->batch requests at a time, in
 * flight together (qk_pread_batch). */
static void *bench_batch_worker(void *arg)
{
	struct bench *b = arg;
	struct qk_read_op ops[CLI_MAX_THREADS];
	uint8_t *buf;
	size_t stride = (b->bufsize + 4095) & ~(size_t)4095;

	if (posix_memalign((void **)&buf, 4096, stride * b->batch + 1) != 0) {
		bench_fail(b, "out of memory");
		return NULL;
	}
	while (!atomic_load_explicit(&b->failed, memory_order_relaxed)) {
		uint64_t i = atomic_fetch_add(&b->next, b->batch);
		size_t n = 0;

		while (n < b->batch && i + n < b->count) {
			ops[n].buf = buf + n * stride;
			ops[n].len = (size_t)b->bufsize;
			ops[n].offset = request_offset(b, i + n);
			n++;
		}
		if (n == 0)
			break;
		if (qk_pread_batch(b->img, ops, n) < 0) {
			bench_fail(b, qk_last_error());
			break;
		}
	}
	free(buf);
	return NULL;
}

static void *bench_worker(void *arg)
{
	struct bench *b = arg;
	void *buf;

	if (posix_memalign(&buf, 4096, b->bufsize ? b->bufsize : 1) != 0) {
		pthread_mutex_lock(&b->lock);
		if (!atomic_exchange(&b->failed, true))
			snprintf(b->errmsg, sizeof(b->errmsg), "out of memory");
		pthread_mutex_unlock(&b->lock);
		return NULL;
	}
	memset(buf, b->write ? b->pattern : 0, b->bufsize);
	while (!atomic_load_explicit(&b->failed, memory_order_relaxed)) {
		uint64_t i = atomic_fetch_add(&b->next, 1);
		int r;

		if (i >= b->count)
			break;
		if (b->write) {
			r = qk_pwrite(b->img, buf, (size_t)b->bufsize,
				      request_offset(b, i));
			if (r == 0 && b->flush_interval &&
			    (i + 1) % b->flush_interval == 0)
				r = qk_flush(b->img);
		} else {
			r = qk_pread(b->img, buf, (size_t)b->bufsize,
				     request_offset(b, i));
		}
		if (r < 0) {
			pthread_mutex_lock(&b->lock);
			if (!atomic_exchange(&b->failed, true))
				snprintf(b->errmsg, sizeof(b->errmsg), "%s",
					 qk_last_error());
			pthread_mutex_unlock(&b->lock);
			break;
		}
	}
	free(buf);
	return NULL;
}

/* qemu_strtoul-style option value in [0, max]; false if invalid. */
static bool parse_count(const char *s, uint64_t max, uint64_t *out)
{
	return cli_parse_uint(s, out) == 0 && *out <= max;
}

/* bench's command line. */
struct bench_args {
	struct cli_opts o;
	uint64_t count, depth, bufsize, step, offset;
	uint64_t flush_interval, pattern;
	bool direct;              /* -t none */
	bool write;               /* -w */
	bool random;              /* --random */
	uint64_t seed;            /* --random=SEED */
	const char *file;
};

/* Parse bench's command line into *a. Returns CLI_GO, or the exit status
 * after --help or a message. */
static int parse_args(int argc, char **argv, struct bench_args *a)
{
	enum { OPT_PATTERN = 256, OPT_FLUSH_INTERVAL, OPT_NO_DRAIN,
	       OPT_RANDOM };
	static const struct option longopts[] = {
		{ "help", no_argument, NULL, 'h' },
		{ "flush-interval", required_argument, NULL,
		  OPT_FLUSH_INTERVAL },
		{ "pattern", required_argument, NULL, OPT_PATTERN },
		{ "no-drain", no_argument, NULL, OPT_NO_DRAIN },
		{ "random", optional_argument, NULL, OPT_RANDOM },
		{ "force-share", no_argument, NULL, 'U' },
		{ NULL, 0, NULL, 0 },
	};
	int c;

	while ((c = cli_getopt(&a->o, argc, argv, ":hc:d:f:ni:o:qs:S:t:wU",
			       longopts)) > 0) {
		switch (c) {
		case 'c':
			if (!parse_count(optarg, INT_MAX, &a->count)) {
				cli_error("Invalid request count specified");
				return CLI_EXIT_FAILURE;
			}
			break;
		case 'd':
			if (!parse_count(optarg, INT_MAX, &a->depth) ||
			    a->depth == 0) {
				cli_error("Invalid queue depth specified");
				return CLI_EXIT_FAILURE;
			}
			break;
		case 'n':
			/* native AIO in qemu-img; threads here */
			break;
		case 'o':
			if (cli_cvtnum("offset", optarg, 0, INT64_MAX,
				       &a->offset) < 0)
				return CLI_EXIT_FAILURE;
			break;
		case 'q':
			break;
		case 's':
			if (cli_cvtnum("buffer size", optarg, 0, INT_MAX,
				       &a->bufsize) < 0)
				return CLI_EXIT_FAILURE;
			break;
		case 'S':
			if (cli_cvtnum("step_size", optarg, 0, INT_MAX,
				       &a->step) < 0)
				return CLI_EXIT_FAILURE;
			break;
		case 't':
			if (cli_parse_cache(optarg, &a->direct) < 0) {
				cli_error("Invalid cache mode");
				return CLI_EXIT_FAILURE;
			}
			break;
		case 'w':
			a->write = true;
			break;
		case OPT_PATTERN:
			if (!parse_count(optarg, 0xff, &a->pattern)) {
				cli_error("Invalid pattern byte specified");
				return CLI_EXIT_FAILURE;
			}
			break;
		case OPT_FLUSH_INTERVAL:
			if (!parse_count(optarg, INT_MAX, &a->flush_interval)) {
				cli_error("Invalid flush interval specified");
				return CLI_EXIT_FAILURE;
			}
			break;
		case OPT_NO_DRAIN:
			break;
		case OPT_RANDOM:
			a->random = true;
			if (optarg != NULL && cli_parse_uint(optarg,
							     &a->seed) < 0) {
				cli_error("Invalid random seed specified");
				return CLI_EXIT_FAILURE;
			}
			break;
		}
	}
	a->file = cli_one_image(&a->o, c, argc, argv);
	return a->file != NULL ? CLI_GO : a->o.status;
}

/* Run the requests of `b` on `depth` threads (at most MAX_THREADS, at
 * most one per request) and print qemu-img bench's lines. Returns the exit
 * status. */
static int run_bench(struct bench *b, uint64_t depth)
{
	unsigned nthreads;
	double t0, secs;

	printf("Sending %d %s requests, %d bytes each, %d in parallel "
	       "(starting at offset %lld, step size %d)\n", (int)b->count,
	       b->write ? "write" : "read", (int)b->bufsize, (int)depth,
	       (long long)b->offset, (int)b->step);
	if (b->random)
		printf("Using random %d-byte aligned offsets (seed %llu)\n",
		       (int)b->bufsize, (unsigned long long)b->seed);
	fflush(stdout);

	nthreads = depth > MAX_THREADS ? MAX_THREADS : (unsigned)depth;
	if (b->batch) {
		/* Two threads, each keeping half the depth in flight. */
		nthreads = depth > 1 ? 2 : 1;
		b->batch = (unsigned)((depth + nthreads - 1) / nthreads);
		if (b->batch > MAX_THREADS)
			b->batch = MAX_THREADS;
	}
	if (b->count < nthreads)
		nthreads = b->count ? (unsigned)b->count : 1;
	t0 = cli_now();
	if (cli_run_threads(nthreads, b->batch ? bench_batch_worker : bench_worker, b) < 0)
		return CLI_EXIT_FAILURE;
	secs = cli_now() - t0;

	if (atomic_load(&b->failed)) {
		cli_error("%s", b->errmsg);
		return CLI_EXIT_FAILURE;
	}
	printf("Run completed in %3.3f seconds.\n", secs);
	if (secs > 0)
		printf("Throughput: %.2f MiB/s, %.0f ops/s\n",
		       (double)b->count * (double)b->bufsize / secs / 1048576.0,
		       (double)b->count / secs);
	return CLI_EXIT_OK;
}

int cmd_bench(int argc, char **argv)
{
	struct bench_args a = {
		.o = { .cmd = "bench", .usage_code = CLI_EXIT_FAILURE },
		.count = 75000, .depth = 64, .bufsize = 4096, .seed = 1,
	};
	struct bench b;
	qk_format fmt;
	int ret;

	if ((ret = parse_args(argc, argv, &a)) != CLI_GO)
		return ret;
	if (a.flush_interval && !a.write) {
		cli_error("--flush-interval is only available in write tests");
		return CLI_EXIT_FAILURE;
	}
	if (cli_parse_format(a.o.fmtname, &fmt) < 0)
		return CLI_EXIT_FAILURE;
	memset(&b, 0, sizeof(b));
	if (cli_open(a.file, fmt, a.o.open_flags |
		     (a.write ? QK_OPEN_RDWR : 0) |
		     (a.direct ? QK_OPEN_DIRECT : 0), &b.img) < 0)
		return CLI_EXIT_FAILURE;

	b.image_size = qk_get_size(b.img);
	b.bufsize = a.bufsize;
	b.step = a.step ? a.step : a.bufsize;
	b.offset = a.offset;
	b.count = a.count;
	b.random = a.random;
	b.seed = a.seed;
	b.write = a.write;
	b.pattern = (int)a.pattern;
	b.flush_interval = a.flush_interval;
	/* -t none reads: batches in flight together, not a thread each. */
	b.batch = a.direct && !a.write && a.depth > 1;
	atomic_init(&b.next, 0);
	atomic_init(&b.failed, false);
	pthread_mutex_init(&b.lock, NULL);
	if (b.random && b.bufsize > b.image_size) {
		cli_error("bench: --random needs an image of at least one "
			  "request (%llu bytes)", (unsigned long long)b.bufsize);
		ret = CLI_EXIT_FAILURE;
	} else {
		ret = run_bench(&b, a.depth);
	}
	pthread_mutex_destroy(&b.lock);
	qk_close(b.img);
	return ret;
}
