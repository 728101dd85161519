/*
 * cmd-convert.c - "qcowkit convert": copy an image's guest content into a
 * sparse raw file (-O raw; -O qcow2 is in convert-qcow2.c).
 *
 * Design note. The target is created (or opened) and locked for writing,
 * then truncated and sized, so every byte not written reads as zero, and
 * a file another process uses, or one the source reads, is never touched. Workers (-m N threads, default 2)
 * share one cursor over the guest address space, guarded by a mutex: a
 * worker asks qk_block_status() at the cursor, skips runs that read as
 * zero, and takes the next piece of a data run (at most CHUNK bytes, ends
 * aligned to CHUNK). Pieces finish in any order, which is fine for a raw
 * file (qemu-img -W). Every -S sized, -S aligned block of a piece that is
 * all zero is left a hole, as qemu-img's default -S 4k does. With -S 0 (or
 * a target that is not a fresh regular file) nothing is assumed zero: zero
 * runs are allocated with fallocate() or written out.
 *
 * Where the time goes (2-CPU VM, 4 GiB all-data qcow2 in the page cache):
 * almost all of it is kernel time filling freshly allocated page-cache
 * pages of the target. write() does that under the inode lock, one thread
 * at a time, so the fresh target is instead mapped MAP_SHARED: workers
 * prefault their piece with MADV_POPULATE_WRITE (which also reserves the
 * blocks, so a full disk is an error code, not a SIGBUS) and fill it in
 * parallel. While a worker's data has had no zero blocks, qk_pread() reads
 * straight into the mapping (one copy instead of two) and the rare zero
 * blocks found afterwards are punched out again; once it meets zero
 * blocks it reads into its own buffer and copies only the non-zero runs.
 * Without a mapping (-n, devices, mmap refused) data goes out by pwrite().
 * Nothing is flushed, as with qemu-img's default target cache "unsafe".
 * With -t none or directsync, 4 KiB aligned writes use a second, O_DIRECT
 * descriptor instead (the rest still go through the page cache; the ranges
 * never overlap, so neither path sees stale data).
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
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cli.h"

#define CHUNK (2u << 20)          /* bytes per read, as qemu-img's buffer */
#define MAX_WORKERS 16            /* qemu-img's -m limit */
#define DEFAULT_WORKERS 2
/* Largest target mapped whole: far below the 128 TiB of user address space
 * and page tables exist only for the pieces written. */
#define MAP_MAX (16ull << 40)

struct convert_job {
	qk_image *src;
	int fd;
	int dfd;                  /* the target again with O_DIRECT, or -1 */
	atomic_bool direct_ok;    /* cleared when O_DIRECT writes fail */
	uint64_t size;
	uint64_t sparse;          /* -S bytes; 0 = allocate everything */
	bool zero_init;           /* unwritten target bytes read as zero */
	char *map;                /* the whole target, MAP_SHARED, or NULL */
	bool map_read_ok;         /* qk_pread() may write into the map */

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

/* A mapped target can only fault if someone truncates it under us (space
 * is reserved before each copy): end with one line, not a crash. */
static void on_sigbus(int sig)
{
	static const char msg[] = "qcowkit: convert: the target file was "
				  "truncated or could not be written while "
				  "mapped\n";
	ssize_t n = write(STDERR_FILENO, msg, sizeof(msg) - 1);

	(void)n;
	(void)sig;
	_exit(CLI_EXIT_FAILURE);
}

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
static int target_write(struct convert_job *j, const char *buf, uint64_t len,
			uint64_t off)
{
	if (j->dfd >= 0 && atomic_load_explicit(&j->direct_ok,
						memory_order_relaxed) &&
	    (uintptr_t)buf % 4096 == 0 && off % 4096 == 0 &&
	    len % 4096 == 0) {
		int r;

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

/* Populate the map pages under [off, off+len) for writing, so the copy
 * that follows does not fault page by page (and the file system reserves
 * its blocks now, where a failure is an error code, not a SIGBUS).
 * Returns 0 or -1 (then use pwrite() instead). */
static int map_populate(const struct convert_job *j, uint64_t off,
			uint64_t len)
{
	uint64_t a = off & ~(uint64_t)4095;
	uint64_t e = (off + len + 4095) & ~(uint64_t)4095;

	if (e > j->size)
		e = j->size;   /* the last page of the map is partial */
	if (madvise(j->map + a, (size_t)(e - a), MADV_POPULATE_WRITE) == 0)
		return 0;
	return -1;
}

/* Write one run of data: into the shared map when there is one (many
 * threads can fill the page cache at once that way; write() would
 * serialise them on the inode lock), else with pwrite(). */
static int write_run(struct convert_job *j, const char *buf, uint64_t len,
		     uint64_t off)
{
	if (j->map != NULL && map_populate(j, off, len) == 0) {
		memcpy(j->map + off, buf, (size_t)len);
		return 0;
	}
	return target_write(j, buf, len, off);
}

/*
 * Write `len` bytes of `buf` to target offset `off`, leaving out the
 * blocks of j->sparse bytes (aligned to absolute multiples of it) that are
 * all zero when the target already reads zero there. Sets *had_zero when
 * a block was left out. Returns 0 or -errno.
 */
static int write_data(struct convert_job *j, const char *buf,
		      uint64_t len, uint64_t off, bool *had_zero)
{
	uint64_t pos = 0, run = 0;   /* run: start of pending non-zero run */
	bool in_run = false;

	*had_zero = false;
	if (zeros_need_writing(j))
		return write_run(j, buf, len, off);
	while (pos < len) {
		uint64_t abs = off + pos;
		uint64_t blen = j->sparse - abs % j->sparse;

		if (blen > len - pos)
			blen = len - pos;
		if (is_zero(buf + pos, blen)) {
			*had_zero = true;
			if (in_run) {
				int r = write_run(j, buf + run, pos - run,
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
		return write_run(j, buf + run, len - run, off + run);
	return 0;
}

/*
 * Read a data piece straight into the shared map: one copy instead of two.
 * Blocks that turn out all zero are punched out again so the target stays
 * as sparse as the buffered path leaves it (never the first block, which
 * the create step allocated, as qemu-img does). Used only with page-sized
 * -S blocks. Sets *had_zero when a block was punched.
 * Returns 0, 1 (could not populate: use the buffered path), or -1 after
 * recording a read failure.
 */
static int read_into_map(struct convert_job *j, const struct piece *p,
			 bool *had_zero)
{
	uint64_t pos = 0, zrun = 0;
	bool in_zero = false;

	*had_zero = false;
	if (map_populate(j, p->off, p->len) < 0)
		return 1;
	if (qk_pread(j->src, j->map + p->off, (size_t)p->len, p->off) < 0) {
		fail(j, qk_last_error());
		return -1;
	}
	if (zeros_need_writing(j))
		return 0;
	while (pos <= p->len) {
		uint64_t abs = p->off + pos, blen = 0;
		bool zero = false;

		if (pos < p->len) {
			blen = j->sparse - abs % j->sparse;
			if (blen > p->len - pos)
				blen = p->len - pos;
			zero = abs >= 4096 && is_zero(j->map + abs, blen);
		}
		if (zero && !in_zero) {
			zrun = abs;
			in_zero = true;
		} else if (!zero && in_zero) {
			/* Failure only costs sparseness, never content. */
			(void)fallocate(j->fd, FALLOC_FL_PUNCH_HOLE |
					FALLOC_FL_KEEP_SIZE, (off_t)zrun,
					(off_t)(abs - zrun));
			*had_zero = true;
			in_zero = false;
		}
		if (pos == p->len)
			break;
		pos += blen;
	}
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
	bool zeros_seen = false;

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
			r = 1;
			/* Straight into the map while the data has no zero
			 * blocks; after meeting some, go through the buffer
			 * (punching holes is dearer than one more copy). */
			if (j->map_read_ok && !zeros_seen) {
				r = read_into_map(j, &p, &zeros_seen);
				if (r < 0)
					break;
			}
			if (r == 1) {
				r = qk_pread(j->src, buf, (size_t)p.len, p.off);
				if (r < 0) {
					fail(j, qk_last_error());
					break;
				}
				r = write_data(j, buf, p.len, p.off,
					       &zeros_seen);
			}
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

/*
 * Open the raw target for reading and writing (a shared writable mapping
 * needs both, and so does the lock) without changing it: created when
 * missing if `create`, and locked for writing as qemu-img does, so that
 * the caller truncates or writes only a file no other process uses.
 * Returns the descriptor, or -1 after a message; a file this call created
 * is removed again when it cannot be locked.
 */
static int open_target(const char *path, bool create)
{
	bool created = false;
	int fd = -1, e = ENOENT;

	if (!create) {
		fd = open(path, O_RDWR | O_CLOEXEC);
		e = errno;
	}
	/* O_EXCL tells a file we make from one that was there; a file that
	 * comes or goes between the two opens sends us round again. A
	 * dangling symbolic link (EEXIST, then ENOENT) makes its target,
	 * which then counts as not created: the link is never removed. */
	for (int tries = 0; create && fd < 0 && e == ENOENT && tries < 16; tries++) {
		struct stat st;

		fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
		if (fd >= 0) {
			created = true;
			break;
		}
		e = errno;
		if (e == EEXIST) {
			fd = open(path, O_RDWR | O_CLOEXEC);
			e = errno;
		}
		if (fd < 0 && e == ENOENT && lstat(path, &st) == 0 && S_ISLNK(st.st_mode)) {
			fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
			e = errno;
		}
	}
	if (fd < 0) {
		cli_error("Could not %s '%s': %s", create ? "create" : "open",
			  path, strerror(e));
		return -1;
	}
	int r = qk_lock_fd(fd, path, QK_OPEN_RDWR);

	if (r < 0) {
		cli_lib_error(r);
		close(fd);
		if (created)
			unlink(path);
		return -1;
	}
	return fd;
}

/* Default workers for a qcow2 target: one more than the CPUs, so that
 * every core keeps compressing while one worker reads or writes. */
static unsigned qcow2_workers(void)
{
	long n = sysconf(_SC_NPROCESSORS_ONLN);

	if (n < 1)
		n = 1;
	return n + 1 > MAX_WORKERS ? MAX_WORKERS : (unsigned)n + 1;
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
	const char *backing = NULL, *backing_fmt = NULL;
	char *olist = NULL;
	bool compress = false, target_unsafe = true, workers_given = false;
	bool progress = false, quiet = false, skip_create = false;
	bool target_is_zero = false, direct = false, target_direct = false;
	uint64_t sparse = 4096, nworkers = DEFAULT_WORKERS;
	uint32_t flags = 0;
	struct convert_job j;
	struct stat st_dst;
	qk_format fmt;
	int c, ret = CLI_EXIT_FAILURE;

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
				goto out_early;
			}
			break;
		case 'm':
			workers_given = true;
			if (cli_parse_uint(optarg, &nworkers) < 0 ||
			    nworkers < 1 || nworkers > MAX_WORKERS) {
				cli_error("Invalid number of coroutines. Allowed "
					  "number of coroutines is between 1 "
					  "and %d", MAX_WORKERS);
				goto out_early;
			}
			break;
		case 't':
			/* Target cache mode. By default the target is
			 * written through the page cache and never flushed,
			 * as with qemu-img's default "unsafe". */
			target_unsafe = strcmp(optarg, "unsafe") == 0;
			if (cli_parse_cache(optarg, &target_direct) < 0) {
				cli_error("Invalid cache option: %s", optarg);
				goto out_early;
			}
			break;
		case 'T':
			if (cli_parse_cache(optarg, &direct) < 0) {
				cli_error("Invalid source cache option: %s",
					  optarg);
				goto out_early;
			}
			break;
		case OPT_TARGET_IS_ZERO:
			target_is_zero = true;
			break;
		case 'c':
			compress = true;
			break;
		case 'B':
			backing = optarg;
			break;
		case 'F':
			backing_fmt = optarg;
			break;
		case 'o':
			cli_append_opts(&olist, optarg);
			break;
		case 'l':
			unsupported("converting a snapshot (-l)");
			goto out_early;
		case 'C':
			unsupported("copy offloading (-C)");
			goto out_early;
		case 'r':
			unsupported("rate limiting (-r)");
			goto out_early;
		case OPT_UNSUPPORTED:
			unsupported(argv[optind - 1]);
			goto out_early;
		case 'h':
			cli_print_usage(stdout, cli_find_command("convert"));
			free(olist);
			return CLI_EXIT_OK;
		default:
			cli_bad_option("convert", c, argv, CLI_EXIT_FAILURE);
			goto out_early;
		}
	}
	if (argc - optind < 2) {
		free(olist);
		return cli_usage_error("convert", CLI_EXIT_FAILURE,
				       "Expecting a source and a target file "
				       "name");
	}
	if (argc - optind > 2) {
		unsupported("concatenating several source images");
		goto out_early;
	}
	if (strcmp(out_fmt, "raw") != 0 && strcmp(out_fmt, "qcow2") != 0) {
		cli_error("Unknown file format '%s'", out_fmt);
		goto out_early;
	}
	if (strcmp(out_fmt, "raw") == 0) {
		if (backing != NULL) {
			cli_error("Backing file not supported for file format 'raw'");
			goto out_early;
		}
		if (compress) {
			cli_error("Compression not supported for this file format");
			goto out_early;
		}
		if (olist != NULL) {
			unsupported("target options (-o) for raw output");
			goto out_early;
		}
	}
	if (target_is_zero && !skip_create) {
		cli_error("--target-is-zero requires use of -n flag");
		goto out_early;
	}
	if (cli_parse_format(fmtname, &fmt) < 0)
		goto out_early;
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
	/* Writing a file the source reads would lose it under our feet. */
	if (cli_check_target(j.src, dst_path) < 0)
		goto out;
	j.size = qk_get_size(j.src);
	if (strcmp(out_fmt, "qcow2") == 0) {
		struct convert_qcow2 a = {
			.src = j.src, .dst_path = dst_path, .olist = olist,
			.backing = backing, .backing_fmt = backing_fmt,
			.compress = compress, .skip_create = skip_create,
			.target_is_zero = target_is_zero, .progress = progress,
			.quiet = quiet, .sparse = sparse,
			.workers = workers_given ? (unsigned)nworkers : qcow2_workers(),
			.open_flags = (target_direct ? QK_OPEN_DIRECT : 0) |
				      (target_unsafe ? QK_OPEN_UNSAFE : 0),
		};

		ret = convert_qcow2(&a);
		goto out;
	}

	j.fd = open_target(dst_path, !skip_create);
	if (j.fd < 0)
		goto out;
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

	/* -t none / directsync: write around the page cache, as qemu-img
	 * does; if the file system refuses O_DIRECT, fall back silently.
	 * Otherwise fill a fresh target through a shared mapping (see the
	 * design note); without one, pwrite() does the same job slower. */
	if (target_direct) {
		j.dfd = open(dst_path, O_WRONLY | O_CLOEXEC | O_DIRECT);
	} else if (j.zero_init && j.size > 0 && j.size <= MAP_MAX) {
		void *m = mmap(NULL, (size_t)j.size, PROT_READ | PROT_WRITE,
			       MAP_SHARED, j.fd, 0);

		if (m != MAP_FAILED) {
			struct sigaction sa;

			memset(&sa, 0, sizeof(sa));
			sa.sa_handler = on_sigbus;
			sigaction(SIGBUS, &sa, NULL);
			j.map = m;
			/* O_DIRECT source reads into file pages, and holes
			 * finer than a page, are left to the buffered path. */
			j.map_read_ok = !direct && j.sparse % 4096 == 0;
		}
	}

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

	if (cli_run_threads((unsigned)nworkers, worker, &j) < 0) {
		progress_end(&j.prog);
		goto out;
	}

	if (!j.failed)
		progress_print(&j.prog, 100, 0);
	progress_end(&j.prog);
	if (j.failed) {
		cli_error("%s", j.errmsg);
		goto out;
	}
	if (j.map != NULL) {
		munmap(j.map, (size_t)j.size);
		j.map = NULL;
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
	if (j.map != NULL)
		munmap(j.map, (size_t)j.size);
	if (j.dfd >= 0)
		close(j.dfd);
	if (j.fd >= 0)
		close(j.fd);
	qk_close(j.src);
	pthread_mutex_destroy(&j.lock);
	free(olist);
	return ret;
out_early:
	free(olist);
	return CLI_EXIT_FAILURE;
}
