/*
 * cmd-convert.c - "qcowkit convert": copy an image's guest content into a
 * sparse raw file (-O raw; qcow2 output comes later).
 *
 * Design note. The target is created (or truncated) and sized first, so
 * every byte not written reads as zero. Workers (-m N threads, default 2)
 * share one cursor over the guest address space, guarded by a mutex: a
 * worker asks qk_block_status() at the cursor, skips runs that read as
 * zero, and takes the next piece of a data run (at most CHUNK bytes, ends
 * aligned to CHUNK). It then reads the piece with qk_pread() into its own
 * buffer (the library handle is thread-safe) and writes it with pwrite(),
 * leaving out every -S sized, -S aligned block that is all zero, so those
 * stay holes, as qemu-img's default -S 4k does. Pieces finish in any order,
 * which is fine for a raw file (qemu-img -W). With -S 0 (or a target that
 * is not a fresh regular file) nothing is assumed zero: zero runs are
 * allocated with fallocate() or written out.
 *
 * SPDX-License-Identifier: MIT
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cli.h"

#define CHUNK (2u << 20)          /* bytes per read, as qemu-img's buffer */
#define MAX_WORKERS 16            /* qemu-img's -m limit */
#define DEFAULT_WORKERS 2

struct convert_job {
	qk_image *src;
	int fd;
	int dfd;                  /* the target again with O_DIRECT, or -1 */
	atomic_bool direct_ok;    /* cleared when O_DIRECT writes fail */
	uint64_t size;
	uint64_t sparse;          /* -S bytes; 0 = allocate everything */
	bool zero_init;           /* unwritten target bytes read as zero */

	pthread_mutex_t lock;     /* guards everything below */
	uint64_t cursor;
	bool failed;
	char errmsg[1024];
	struct cli_progress prog;
	uint64_t work_total, work_done;
};

struct piece {
	uint64_t off, len;
	bool zero;                /* the source reads as zero here */
};

/* Record the first failure; later ones are consequences. Lock held. */
static void fail_locked(struct convert_job *j, const char *msg)
{
	if (!j->failed) {
		j->failed = true;
		snprintf(j->errmsg, sizeof(j->errmsg), "%s", msg);
	}
}

static void fail(struct convert_job *j, const char *msg)
{
	pthread_mutex_lock(&j->lock);
	fail_locked(j, msg);
	pthread_mutex_unlock(&j->lock);
}

/* Whether the source range must be written even though it reads as zero. */
static bool zeros_need_writing(const struct convert_job *j)
{
	return j->sparse == 0 || !j->zero_init;
}

/*
 * Take the next piece of work at the shared cursor. Lock held.
 * Returns true and fills *p, or false at the end or after a failure.
 */
static bool next_piece(struct convert_job *j, struct piece *p)
{
	while (!j->failed && j->cursor < j->size) {
		struct qk_extent ext;
		uint64_t off = j->cursor, len;
		int r = qk_block_status(j->src, off, j->size - off, &ext);

		if (r < 0) {
			fail_locked(j, qk_last_error());
			return false;
		}
		if (ext.length == 0 || ext.length > j->size - off) {
			fail_locked(j, "qk_block_status: bad extent length");
			return false;
		}
		p->zero = (ext.flags & QK_EXTENT_ZERO) != 0;
		if (p->zero && !zeros_need_writing(j)) {
			j->cursor += ext.length;
			continue;
		}
		/* Zero runs are cheap to allocate, so take bigger bites. */
		len = p->zero ? 64u * CHUNK : CHUNK - off % CHUNK;
		if (len > ext.length)
			len = ext.length;
		p->off = off;
		p->len = len;
		j->cursor = off + len;
		return true;
	}
	return false;
}

static int pwrite_all(int fd, const char *buf, size_t len, uint64_t off)
{
	while (len > 0) {
		ssize_t n = pwrite(fd, buf, len, (off_t)off);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		buf += n;
		len -= (size_t)n;
		off += (uint64_t)n;
	}
	return 0;
}

/*
 * Write to the target, through the O_DIRECT descriptor when the buffer,
 * offset and length are all 4 KiB aligned (see the design note), else
 * through the page cache. Returns 0 or -errno.
 */
static _Thread_local bool tl_direct;
static atomic_int worker_idx;

static int target_write(struct convert_job *j, const char *buf, uint64_t len,
			uint64_t off)
{
	if (tl_direct && j->dfd >= 0 && atomic_load_explicit(&j->direct_ok,
						memory_order_relaxed) &&
	    (uintptr_t)buf % 4096 == 0 && off % 4096 == 0 &&
	    len % 4096 == 0) {
		int r;

		if (getenv("QK_FALLOC"))
			fallocate(j->dfd, 0, (off_t)off, (off_t)len);
		r = pwrite_all(j->dfd, buf, len, off);
		if (r != -EINVAL)
			return r;
		/* The file system refuses O_DIRECT after all: rewrite the
		 * whole range buffered from now on. */
		atomic_store(&j->direct_ok, false);
	}
	return pwrite_all(j->fd, buf, len, off);
}

static bool is_zero(const char *buf, size_t len)
{
	/* glibc's vectorised memcmp against the buffer shifted by one byte
	 * checks "all bytes equal buf[0]" at memory speed. */
	return len == 0 || (buf[0] == 0 && memcmp(buf, buf + 1, len - 1) == 0);
}

/*
 * Write `len` bytes of `buf` to target offset `off`, leaving out the
 * blocks of j->sparse bytes (aligned to absolute multiples of it) that are
 * all zero when the target already reads zero there. Returns 0 or -errno.
 */
static int write_data(struct convert_job *j, const char *buf,
		      uint64_t len, uint64_t off)
{
	uint64_t pos = 0, run = 0;   /* run: start of pending non-zero run */
	bool in_run = false;

	if (zeros_need_writing(j))
		return target_write(j, buf, len, off);
	while (pos < len) {
		uint64_t abs = off + pos;
		uint64_t blen = j->sparse - abs % j->sparse;

		if (blen > len - pos)
			blen = len - pos;
		if (is_zero(buf + pos, blen)) {
			if (in_run) {
				int r = target_write(j, buf + run, pos - run,
						   off + run);
				if (r < 0)
					return r;
				in_run = false;
			}
		} else if (!in_run) {
			run = pos;
			in_run = true;
		}
		pos += blen;
	}
	if (in_run)
		return target_write(j, buf + run, len - run, off + run);
	return 0;
}

/* Make [off, off+len) of the target read as zero and be allocated. */
static int write_zeroes(struct convert_job *j, char *zbuf,
			uint64_t off, uint64_t len)
{
	if (j->zero_init && fallocate(j->fd, 0, (off_t)off, (off_t)len) == 0)
		return 0;
	while (len > 0) {
		size_t n = len < CHUNK ? (size_t)len : CHUNK;
		int r = target_write(j, zbuf, n, off);

		if (r < 0)
			return r;
		off += n;
		len -= n;
	}
	return 0;
}

static void *worker(void *arg)
{
	struct convert_job *j = arg;
	char *buf = NULL, *zbuf = NULL;
	struct piece p;
	int idx = atomic_fetch_add(&worker_idx, 1);
	const char *nb = getenv("QK_NBUF");

	tl_direct = idx >= (nb ? atoi(nb) : 0);
	if (posix_memalign((void **)&buf, 4096, CHUNK) != 0) {
		fail(j, "out of memory");
		return NULL;
	}
	for (;;) {
		int r;
		char msg[256];

		pthread_mutex_lock(&j->lock);
		if (!next_piece(j, &p)) {
			pthread_mutex_unlock(&j->lock);
			break;
		}
		pthread_mutex_unlock(&j->lock);

		if (p.zero) {
			if (zbuf == NULL) {
				if (posix_memalign((void **)&zbuf, 4096,
						   CHUNK) != 0)
					zbuf = NULL;
				if (zbuf != NULL)
					memset(zbuf, 0, CHUNK);
				if (zbuf == NULL) {
					fail(j, "out of memory");
					break;
				}
			}
			r = write_zeroes(j, zbuf, p.off, p.len);
		} else {
			r = qk_pread(j->src, buf, (size_t)p.len, p.off);
			if (r < 0) {
				fail(j, qk_last_error());
				break;
			}
			r = write_data(j, buf, p.len, p.off);
		}
		if (r < 0) {
			snprintf(msg, sizeof(msg),
				 "error while writing at byte %llu: %s",
				 (unsigned long long)p.off, strerror(-r));
			fail(j, msg);
			break;
		}
		pthread_mutex_lock(&j->lock);
		j->work_done += p.len;
		if (j->work_total > 0)
			progress_print(&j->prog,
				       (float)(100.0 * (double)j->work_done /
					       (double)j->work_total), 0);
		pthread_mutex_unlock(&j->lock);
	}
	free(buf);
	free(zbuf);
	return NULL;
}

/* Bytes the copy will process, for the progress percentage (qemu-img
 * counts data runs, and zero runs too when it must write them). */
static int count_work(struct convert_job *j, uint64_t *total)
{
	uint64_t off = 0;

	*total = 0;
	while (off < j->size) {
		struct qk_extent ext;
		int r = qk_block_status(j->src, off, j->size - off, &ext);

		if (r < 0)
			return r;
		if (ext.length == 0)
			return -EIO;
		if (!(ext.flags & QK_EXTENT_ZERO) || zeros_need_writing(j))
			*total += ext.length;
		off += ext.length;
	}
	return 0;
}

static int unsupported(const char *what)
{
	cli_error("convert: %s is not supported yet", what);
	return CLI_EXIT_FAILURE;
}

int cmd_convert(int argc, char **argv)
{
	enum { OPT_TARGET_IS_ZERO = 256, OPT_UNSUPPORTED };
	static const struct option longopts[] = {
		{ "help", no_argument, NULL, 'h' },
		{ "force-share", no_argument, NULL, 'U' },
		{ "target-is-zero", no_argument, NULL, OPT_TARGET_IS_ZERO },
		{ "bitmaps", no_argument, NULL, OPT_UNSUPPORTED },
		{ "salvage", no_argument, NULL, OPT_UNSUPPORTED },
		{ "image-opts", no_argument, NULL, OPT_UNSUPPORTED },
		{ "target-image-opts", no_argument, NULL, OPT_UNSUPPORTED },
		{ "object", required_argument, NULL, OPT_UNSUPPORTED },
		{ NULL, 0, NULL, 0 },
	};
	const char *fmtname = NULL, *out_fmt = "raw", *src_path, *dst_path;
	bool progress = false, quiet = false, skip_create = false;
	bool target_is_zero = false, direct = false, dummy;
	uint64_t sparse = 4096, nworkers = DEFAULT_WORKERS;
	uint32_t flags = 0;
	struct convert_job j;
	pthread_t tids[MAX_WORKERS];
	unsigned started = 0;
	struct stat st_src, st_dst;
	qk_format fmt;
	int c, ret = CLI_EXIT_FAILURE, oflags;

	while ((c = getopt_long(argc, argv, ":hf:O:B:CcF:o:l:S:pt:T:qnm:WUr:",
				longopts, NULL)) != -1) {
		switch (c) {
		case 'f':
			fmtname = optarg;
			break;
		case 'O':
			out_fmt = optarg;
			break;
		case 'p':
			progress = true;
			break;
		case 'q':
			quiet = true;
			break;
		case 'n':
			skip_create = true;
			break;
		case 'W':
			/* Pieces are always written out of order. */
			break;
		case 'U':
			flags |= QK_OPEN_FORCE_SHARE;
			break;
		case 'S':
			if (cli_parse_size(optarg, &sparse) < 0 ||
			    sparse % 512 != 0 || sparse > (16u << 20)) {
				cli_error("Invalid buffer size for sparse output "
					  "specified. Valid sizes are multiples "
					  "of 512 up to 16777216. Select 0 to "
					  "disable sparse detection (fully "
					  "allocates output).");
				return CLI_EXIT_FAILURE;
			}
			break;
		case 'm':
			if (cli_parse_uint(optarg, &nworkers) < 0 ||
			    nworkers < 1 || nworkers > MAX_WORKERS) {
				cli_error("Invalid number of coroutines. Allowed "
					  "number of coroutines is between 1 "
					  "and %d", MAX_WORKERS);
				return CLI_EXIT_FAILURE;
			}
			break;
		case 't':
			/* Target cache mode: the raw target is written
			 * through the page cache and never flushed, as with
			 * qemu-img's default "unsafe". */
			if (cli_parse_cache(optarg, &dummy) < 0) {
				cli_error("Invalid cache option: %s", optarg);
				return CLI_EXIT_FAILURE;
			}
			break;
		case 'T':
			if (cli_parse_cache(optarg, &direct) < 0) {
				cli_error("Invalid source cache option: %s",
					  optarg);
				return CLI_EXIT_FAILURE;
			}
			break;
		case OPT_TARGET_IS_ZERO:
			target_is_zero = true;
			break;
		case 'c':
			return unsupported("compressed output (-c)");
		case 'B':
		case 'F':
			return unsupported("a backing file for the target (-B)");
		case 'o':
			return unsupported("target options (-o)");
		case 'l':
			return unsupported("converting a snapshot (-l)");
		case 'C':
			return unsupported("copy offloading (-C)");
		case 'r':
			return unsupported("rate limiting (-r)");
		case OPT_UNSUPPORTED:
			return unsupported(argv[optind - 1]);
		case 'h':
			cli_print_usage(stdout, cli_find_command("convert"));
			return CLI_EXIT_OK;
		default:
			return cli_bad_option("convert", c, argv,
					      CLI_EXIT_FAILURE);
		}
	}
	if (argc - optind < 2)
		return cli_usage_error("convert", CLI_EXIT_FAILURE,
				       "Expecting a source and a target file "
				       "name");
	if (argc - optind > 2)
		return unsupported("concatenating several source images");
	if (strcmp(out_fmt, "raw") != 0) {
		if (strcmp(out_fmt, "qcow2") == 0)
			return unsupported("-O qcow2");
		cli_error("Unknown file format '%s'", out_fmt);
		return CLI_EXIT_FAILURE;
	}
	if (target_is_zero && !skip_create) {
		cli_error("--target-is-zero requires use of -n flag");
		return CLI_EXIT_FAILURE;
	}
	if (cli_parse_format(fmtname, &fmt) < 0)
		return CLI_EXIT_FAILURE;
	src_path = argv[optind];
	dst_path = argv[optind + 1];
	if (quiet)
		progress = false;
	if (direct)
		flags |= QK_OPEN_DIRECT;

	memset(&j, 0, sizeof(j));
	j.fd = -1;
	j.dfd = -1;
	atomic_init(&j.direct_ok, true);
	j.sparse = sparse;
	pthread_mutex_init(&j.lock, NULL);
	if (cli_open(src_path, fmt, flags, &j.src) < 0)
		goto out;
	j.size = qk_get_size(j.src);

	/* Truncating the source under our own feet would lose it. */
	if (stat(src_path, &st_src) == 0 && stat(dst_path, &st_dst) == 0 &&
	    st_src.st_dev == st_dst.st_dev && st_src.st_ino == st_dst.st_ino) {
		cli_error("Cannot convert '%s' onto itself", src_path);
		goto out;
	}
	oflags = O_WRONLY | O_CLOEXEC | (skip_create ? 0 : O_CREAT | O_TRUNC);
	j.fd = open(dst_path, oflags, 0644);
	if (j.fd < 0) {
		cli_error("Could not %s '%s': %s",
			  skip_create ? "open" : "create", dst_path,
			  strerror(errno));
		goto out;
	}
	if (fstat(j.fd, &st_dst) < 0) {
		cli_error("Could not stat '%s': %s", dst_path, strerror(errno));
		goto out;
	}
	if (S_ISREG(st_dst.st_mode) && !skip_create) {
		if (ftruncate(j.fd, (off_t)j.size) < 0) {
			cli_error("Could not resize '%s': %s", dst_path,
				  strerror(errno));
			goto out;
		}
		j.zero_init = true;
		/* qemu-img's raw create allocates the first block (so that
		 * O_DIRECT alignment probing works later); do the same so
		 * the two tools leave identical allocation maps. */
		if (j.size > 0) {
			static const char zeros[4096];
			uint64_t n = j.size < 4096 ? 512 : 4096;
			int r = pwrite_all(j.fd, zeros, n < j.size ? n : j.size,
					   0);

			if (r < 0) {
				cli_error("Could not write to '%s': %s",
					  dst_path, strerror(-r));
				goto out;
			}
		}
	} else {
		/* An existing target (-n, a device) may hold old data. */
		off_t end = lseek(j.fd, 0, SEEK_END);

		if (end >= 0 && (uint64_t)end < j.size) {
			cli_error("output file is smaller than input file");
			goto out;
		}
		j.zero_init = target_is_zero;
	}

	if (getenv("QK_CONVERT_DIRECT") != NULL)
		j.dfd = open(dst_path, O_WRONLY | O_CLOEXEC | O_DIRECT);

	progress_init(&j.prog, progress, 1.0f);
	progress_print(&j.prog, 0, 100);
	if (progress) {
		int r = count_work(&j, &j.work_total);

		if (r < 0) {
			progress_end(&j.prog);
			cli_lib_error(r);
			goto out;
		}
	}

	for (; started < nworkers; started++) {
		int r = pthread_create(&tids[started], NULL, worker, &j);

		if (r != 0) {
			if (started > 0)
				break;   /* fewer workers still do the job */
			cli_error("Could not start a thread: %s", strerror(r));
			goto out;
		}
	}
	for (unsigned i = 0; i < started; i++)
		pthread_join(tids[i], NULL);

	if (!j.failed)
		progress_print(&j.prog, 100, 0);
	progress_end(&j.prog);
	if (j.failed) {
		cli_error("%s", j.errmsg);
		goto out;
	}
	if (close(j.fd) < 0) {
		j.fd = -1;
		cli_error("error while closing '%s': %s", dst_path,
			  strerror(errno));
		goto out;
	}
	j.fd = -1;
	ret = CLI_EXIT_OK;
out:
	if (j.dfd >= 0)
		close(j.dfd);
	if (j.fd >= 0)
		close(j.fd);
	qk_close(j.src);
	pthread_mutex_destroy(&j.lock);
	return ret;
}
