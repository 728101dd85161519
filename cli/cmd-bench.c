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

int cmd_bench(int argc, char **argv)
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
	const char *fmtname = NULL;
	uint64_t count = 75000, depth = 64, bufsize = 4096, step = 0;
	uint64_t offset = 0, flush_interval = 0, pattern = 0;
	bool direct = false, is_write = false;
	uint32_t flags = 0;
	struct bench b;
	unsigned nthreads;
	qk_format fmt;
	double t0, secs;
	int c, ret = CLI_EXIT_FAILURE;

	memset(&b, 0, sizeof(b));
	b.seed = 1;
	while ((c = getopt_long(argc, argv, ":hc:d:f:ni:o:qs:S:t:wU", longopts,
				NULL)) != -1) {
		switch (c) {
		case 'c':
			if (!parse_count(optarg, INT_MAX, &count)) {
				cli_error("Invalid request count specified");
				return CLI_EXIT_FAILURE;
			}
			break;
		case 'd':
			if (!parse_count(optarg, INT_MAX, &depth) ||
			    depth == 0) {
				cli_error("Invalid queue depth specified");
				return CLI_EXIT_FAILURE;
			}
			break;
		case 'f':
			fmtname = optarg;
			break;
		case 'n':
			/* native AIO in qemu-img; threads here */
			break;
		case 'i':
			if (strcmp(optarg, "threads") != 0 &&
			    strcmp(optarg, "native") != 0 &&
			    strcmp(optarg, "io_uring") != 0) {
				cli_error("Invalid aio option: %s", optarg);
				return CLI_EXIT_FAILURE;
			}
			break;
		case 'o':
			if (cli_cvtnum("offset", optarg, 0, INT64_MAX,
				       &offset) < 0)
				return CLI_EXIT_FAILURE;
			break;
		case 'q':
			break;
		case 's':
			if (cli_cvtnum("buffer size", optarg, 0, INT_MAX,
				       &bufsize) < 0)
				return CLI_EXIT_FAILURE;
			break;
		case 'S':
			if (cli_cvtnum("step_size", optarg, 0, INT_MAX,
				       &step) < 0)
				return CLI_EXIT_FAILURE;
			break;
		case 't':
			if (cli_parse_cache(optarg, &direct) < 0) {
				cli_error("Invalid cache mode");
				return CLI_EXIT_FAILURE;
			}
			break;
		case 'w':
			is_write = true;
			break;
		case 'U':
			flags |= QK_OPEN_FORCE_SHARE;
			break;
		case OPT_PATTERN:
			if (!parse_count(optarg, 0xff, &pattern)) {
				cli_error("Invalid pattern byte specified");
				return CLI_EXIT_FAILURE;
			}
			break;
		case OPT_FLUSH_INTERVAL:
			if (!parse_count(optarg, INT_MAX, &flush_interval)) {
				cli_error("Invalid flush interval specified");
				return CLI_EXIT_FAILURE;
			}
			break;
		case OPT_NO_DRAIN:
			break;
		case OPT_RANDOM:
			b.random = true;
			if (optarg != NULL && cli_parse_uint(optarg,
							     &b.seed) < 0) {
				cli_error("Invalid random seed specified");
				return CLI_EXIT_FAILURE;
			}
			break;
		case 'h':
			cli_print_usage(stdout, cli_find_command("bench"));
			return CLI_EXIT_OK;
		default:
			return cli_bad_option("bench", c, argv,
					      CLI_EXIT_FAILURE);
		}
	}
	if (optind != argc - 1)
		return cli_usage_error("bench", CLI_EXIT_FAILURE,
				       "Expecting one image file name");
	if (flush_interval && !is_write) {
		cli_error("--flush-interval is only available in write tests");
		return CLI_EXIT_FAILURE;
	}
	if (is_write)
		flags |= QK_OPEN_RDWR;
	b.write = is_write;
	b.pattern = (int)pattern;
	b.flush_interval = flush_interval;
	if (cli_parse_format(fmtname, &fmt) < 0)
		return CLI_EXIT_FAILURE;
	if (direct)
		flags |= QK_OPEN_DIRECT;
	if (cli_open(argv[optind], fmt, flags, &b.img) < 0)
		return CLI_EXIT_FAILURE;

	b.image_size = qk_get_size(b.img);
	b.bufsize = bufsize;
	b.step = step ? step : bufsize;
	b.offset = offset;
	b.count = count;
	atomic_init(&b.next, 0);
	atomic_init(&b.failed, false);
	pthread_mutex_init(&b.lock, NULL);
	if (b.random && bufsize > b.image_size) {
		cli_error("bench: --random needs an image of at least one "
			  "request (%llu bytes)", (unsigned long long)bufsize);
		goto out;
	}

	printf("Sending %d %s requests, %d bytes each, %d in parallel "
	       "(starting at offset %lld, step size %d)\n", (int)count,
	       is_write ? "write" : "read", (int)bufsize, (int)depth, (long long)offset,
	       (int)b.step);
	if (b.random)
		printf("Using random %d-byte aligned offsets (seed %llu)\n",
		       (int)bufsize, (unsigned long long)b.seed);
	fflush(stdout);

	nthreads = depth > MAX_THREADS ? MAX_THREADS : (unsigned)depth;
	if (count < nthreads)
		nthreads = count ? (unsigned)count : 1;
	t0 = cli_now();
	if (cli_run_threads(nthreads, bench_worker, &b) < 0)
		goto out;
	secs = cli_now() - t0;

	if (atomic_load(&b.failed)) {
		cli_error("%s", b.errmsg);
		goto out;
	}
	printf("Run completed in %3.3f seconds.\n", secs);
	if (secs > 0)
		printf("Throughput: %.2f MiB/s, %.0f ops/s\n",
		       (double)count * (double)bufsize / secs / 1048576.0,
		       (double)count / secs);
	ret = CLI_EXIT_OK;
out:
	pthread_mutex_destroy(&b.lock);
	qk_close(b.img);
	return ret;
}
