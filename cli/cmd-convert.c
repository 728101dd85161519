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

/* convert's command line. */
struct convert_args {
	struct cli_opts o;        /* -f, -U: of the source */
	const char *out_fmt;      /* -O, "raw" by default */
	const char *backing;      /* -B */
	const char *backing_fmt;  /* -F */
	char *olist;              /* every -o, joined (malloc'd) */
	bool compress;            /* -c */
	bool progress;            /* -p (and not -q) */
	bool quiet;               /* -q */
	bool skip_create;         /* -n */
	bool target_is_zero;      /* --target-is-zero */
	bool direct;              /* -T none: read the source around the page cache */
	bool target_direct;       /* -t none: write the target so too */
	bool target_unsafe;       /* -t unsafe, the default: never flushed */
	bool workers_given;       /* -m */
	uint64_t nworkers;        /* -m */
	uint64_t sparse;          /* -S bytes, 0 = allocate everything */
	const char *snapshot;     /* -l: the source's internal snapshot */
	bool bitmaps;             /* --bitmaps */
	bool skip_broken;         /* --skip-broken-bitmaps */
};

/* -S: 0 or a multiple of 512 up to 16 MiB. Returns 0, or -1 after
 * qemu-img's message. */
static int parse_sparse(const char *arg, uint64_t *sparse)
{
	if (cli_parse_size(arg, sparse) < 0 || *sparse % 512 != 0 ||
	    *sparse > (16u << 20)) {
		cli_error("Invalid buffer size for sparse output specified. "
			  "Valid sizes are multiples of 512 up to 16777216. "
			  "Select 0 to disable sparse detection (fully "
			  "allocates output).");
		return -1;
	}
	return 0;
}

/* -m: 1 to MAX_WORKERS. Returns 0, or -1 after qemu-img's message. */
static int parse_workers(const char *arg, uint64_t *n)
{
	if (cli_parse_uint(arg, n) < 0 || *n < 1 || *n > MAX_WORKERS) {
		cli_error("Invalid number of coroutines. Allowed number of "
			  "coroutines is between 1 and %d", MAX_WORKERS);
		return -1;
	}
	return 0;
}

/* Parse convert's options into *a. Returns CLI_GO, or the exit status after
 * --help or a message. */
static int parse_args(int argc, char **argv, struct convert_args *a)
{
	enum { OPT_TARGET_IS_ZERO = 256, OPT_UNSUPPORTED, OPT_BITMAPS, OPT_SKIP_BROKEN };
	static const struct option longopts[] = {
		{ "help", no_argument, NULL, 'h' },
		{ "force-share", no_argument, NULL, 'U' },
		{ "target-is-zero", no_argument, NULL, OPT_TARGET_IS_ZERO },
		{ "bitmaps", no_argument, NULL, OPT_BITMAPS },
		{ "skip-broken-bitmaps", no_argument, NULL, OPT_SKIP_BROKEN },
		{ "salvage", no_argument, NULL, OPT_UNSUPPORTED },
		{ "image-opts", no_argument, NULL, OPT_UNSUPPORTED },
		{ "target-image-opts", no_argument, NULL, OPT_UNSUPPORTED },
		{ "object", required_argument, NULL, OPT_UNSUPPORTED },
		{ NULL, 0, NULL, 0 },
	};
	int c;

	while ((c = cli_getopt(&a->o, argc, argv,
			       ":hf:O:B:CcF:o:l:S:pt:T:qnm:WUr:", longopts)) > 0) {
		switch (c) {
		case 'O':
			a->out_fmt = optarg;
			break;
		case 'p':
			a->progress = true;
			break;
		case 'q':
			a->quiet = true;
			break;
		case 'n':
			a->skip_create = true;
			break;
		case 'W':
			/* Pieces are always written out of order. */
			break;
		case 'S':
			if (parse_sparse(optarg, &a->sparse) < 0)
				return CLI_EXIT_FAILURE;
			break;
		case 'm':
			a->workers_given = true;
			if (parse_workers(optarg, &a->nworkers) < 0)
				return CLI_EXIT_FAILURE;
			break;
		case 't':
			/* Target cache mode. By default the target is
			 * written through the page cache and never flushed,
			 * as with qemu-img's default "unsafe". */
			a->target_unsafe = strcmp(optarg, "unsafe") == 0;
			if (cli_parse_cache(optarg, &a->target_direct) < 0) {
				cli_error("Invalid cache option: %s", optarg);
				return CLI_EXIT_FAILURE;
			}
			break;
		case 'T':
			if (cli_parse_cache(optarg, &a->direct) < 0) {
				cli_error("Invalid source cache option: %s",
					  optarg);
				return CLI_EXIT_FAILURE;
			}
			break;
		case OPT_TARGET_IS_ZERO:
			a->target_is_zero = true;
			break;
		case OPT_BITMAPS:
			a->bitmaps = true;
			break;
		case OPT_SKIP_BROKEN:
			a->skip_broken = true;
			break;
		case 'c':
			a->compress = true;
			break;
		case 'B':
			a->backing = optarg;
			break;
		case 'F':
			a->backing_fmt = optarg;
			break;
		case 'o':
			cli_append_opts(&a->olist, optarg);
			break;
		case 'l':
			a->snapshot = optarg;
			break;
		case 'C':
			return unsupported("copy offloading (-C)");
		case 'r':
			return unsupported("rate limiting (-r)");
		case OPT_UNSUPPORTED:
			return unsupported(argv[optind - 1]);
		}
	}
	return c < 0 ? a->o.status : CLI_GO;
}

/* The operands, and the combinations of options refused, in qemu-img's
 * order. Returns CLI_GO, or the exit status after a message. */
static int check_args(int argc, const struct convert_args *a)
{
	if (a->skip_broken && !a->bitmaps) {
		cli_error("Use of --skip-broken-bitmaps requires --bitmaps");
		return CLI_EXIT_FAILURE;
	}
	if (argc - optind < 2)
		return cli_usage_error("convert", CLI_EXIT_FAILURE,
				       "Expecting a source and a target file "
				       "name");
	if (argc - optind > 2)
		return unsupported("concatenating several source images");
	if (strcmp(a->out_fmt, "raw") != 0 && strcmp(a->out_fmt, "qcow2") != 0) {
		cli_error("Unknown file format '%s'", a->out_fmt);
		return CLI_EXIT_FAILURE;
	}
	if (strcmp(a->out_fmt, "raw") == 0) {
		if (a->backing != NULL) {
			cli_error("Backing file not supported for file format 'raw'");
			return CLI_EXIT_FAILURE;
		}
		if (a->compress) {
			cli_error("Compression not supported for this file format");
			return CLI_EXIT_FAILURE;
		}
		if (a->olist != NULL)
			return unsupported("target options (-o) for raw output");
	}
	if (a->target_is_zero && !a->skip_create) {
		cli_error("--target-is-zero requires use of -n flag");
		return CLI_EXIT_FAILURE;
	}
	return CLI_GO;
}

/* --bitmaps: the source must have persistent bitmaps to copy (a qcow2 v3
 * image) and, without --skip-broken-bitmaps, no inconsistent one, as
 * qemu-img checks before creating the target. Returns 0, or -1 after a
 * message. */
static int check_source_bitmaps(const struct convert_args *a, qk_image *src)
{
	struct qk_info info = { .struct_size = sizeof info };
	const struct qk_bitmap *list;
	size_t n = 0;

	if (!a->bitmaps)
		return 0;
	if (qk_get_info(src, &info) < 0 || info.format != QK_FORMAT_QCOW2 ||
	    info.qcow2_version < 3 || qk_list_bitmaps(src, &list, &n) < 0) {
		cli_error("Source lacks bitmap support");
		return -1;
	}
	for (size_t i = 0; i < n && !a->skip_broken; i++) {
		if (list[i].flags & QK_BITMAP_IN_USE) {
			char *esc = cli_escape(list[i].name);
			cli_error("Cannot copy inconsistent bitmap '%s' (try --skip-broken-bitmaps, or "
				  "use 'qcowkit bitmap --remove' to delete it)", esc);
			free(esc);
			return -1;
		}
	}
	return 0;
}

/* convert -O qcow2 of the open source `src` (convert-qcow2.c). Returns the
 * exit status. */
static int to_qcow2(const struct convert_args *a, qk_image *src,
		    const char *dst_path)
{
	struct convert_qcow2 q = {
		.src = src, .dst_path = dst_path, .olist = a->olist,
		.backing = a->backing, .backing_fmt = a->backing_fmt,
		.compress = a->compress, .skip_create = a->skip_create,
		.target_is_zero = a->target_is_zero, .progress = a->progress,
		.quiet = a->quiet, .sparse = a->sparse,
		.workers = a->workers_given ? (unsigned)a->nworkers : qcow2_workers(),
		.bitmaps = a->bitmaps, .skip_broken = a->skip_broken,
		.open_flags = (a->target_direct ? QK_OPEN_DIRECT : 0) |
			      (a->target_unsafe ? QK_OPEN_UNSAFE : 0),
	};

	return convert_qcow2(&q);
}

/*
 * Open and lock the raw target into j->fd and make it ready for the copy
 * of j->size bytes. A target this call creates is sized, reads as zero
 * (j->zero_init) and has its first block allocated, as qemu-img's raw
 * create leaves it; an existing one (-n, a device) must be large enough,
 * and reads as zero only with --target-is-zero. Returns 0, or -1 after a
 * message.
 */
static int prepare_target(struct convert_job *j, const struct convert_args *a,
			  const char *dst_path)
{
	struct stat st;

	j->fd = open_target(dst_path, !a->skip_create);
	if (j->fd < 0)
		return -1;
	if (a->bitmaps) {
		/* Created, then refused, as qemu-img does. */
		cli_error("Format driver 'raw' does not support bitmaps");
		return -1;
	}
	if (fstat(j->fd, &st) < 0) {
		cli_error("Could not stat '%s': %s", dst_path, strerror(errno));
		return -1;
	}
	if (!S_ISREG(st.st_mode) || a->skip_create) {
		/* An existing target (-n, a device) may hold old data. */
		off_t end = lseek(j->fd, 0, SEEK_END);

		if (end >= 0 && (uint64_t)end < j->size) {
			cli_error("output file is smaller than input file");
			return -1;
		}
		j->zero_init = a->target_is_zero;
		return 0;
	}
	/* Emptied first: the copy skips what reads as zero, so no byte of
	 * an old file may survive (the lock is held: the file is ours). */
	if (ftruncate(j->fd, 0) < 0 || ftruncate(j->fd, (off_t)j->size) < 0) {
		cli_error("Could not resize '%s': %s", dst_path,
			  strerror(errno));
		return -1;
	}
	j->zero_init = true;
	/* qemu-img's raw create allocates the first block (so that O_DIRECT
	 * alignment probing works later); do the same so the two tools
	 * leave identical allocation maps. */
	if (j->size > 0) {
		static const char zeros[4096];
		uint64_t n = j->size < 4096 ? 512 : 4096;
		int r = pwrite_all(j->fd, zeros, n < j->size ? n : j->size, 0);

		if (r < 0) {
			cli_error("Could not write to '%s': %s", dst_path,
				  strerror(-r));
			return -1;
		}
	}
	return 0;
}

/* How the workers write (see the design note). -t none / directsync:
 * around the page cache through a second, O_DIRECT descriptor, as
 * qemu-img does (if the file system refuses O_DIRECT, they fall back
 * silently). Otherwise a fresh target is filled through a shared mapping;
 * without one, pwrite() does the same job slower. */
static void choose_write_path(struct convert_job *j,
			      const struct convert_args *a,
			      const char *dst_path)
{
	void *m;
	struct sigaction sa;

	if (a->target_direct) {
		j->dfd = open(dst_path, O_WRONLY | O_CLOEXEC | O_DIRECT);
		return;
	}
	if (!j->zero_init || j->size == 0 || j->size > MAP_MAX)
		return;
	m = mmap(NULL, (size_t)j->size, PROT_READ | PROT_WRITE, MAP_SHARED,
		 j->fd, 0);
	if (m == MAP_FAILED)
		return;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_sigbus;
	sigaction(SIGBUS, &sa, NULL);
	j->map = m;
	/* O_DIRECT source reads into file pages, and holes finer than a
	 * page, are left to the buffered path. */
	j->map_read_ok = !a->direct && j->sparse % 4096 == 0;
}

/* Copy on a->nworkers threads, showing progress with -p. Returns 0, or
 * -1 after a message. */
static int copy(struct convert_job *j, const struct convert_args *a)
{
	progress_init(&j->prog, a->progress, 1.0f);
	progress_print(&j->prog, 0, 100);
	if (a->progress) {
		int r = count_work(j, &j->work_total);

		if (r < 0) {
			progress_end(&j->prog);
			cli_lib_error(r);
			return -1;
		}
	}
	if (cli_run_progress((unsigned)a->nworkers, worker, j, &j->prog,
			     &j->failed) < 0)
		return -1;
	if (j->failed) {
		cli_error("%s", j->errmsg);
		return -1;
	}
	return 0;
}

/* convert -O raw of the open source `src` into `dst_path`. Returns the
 * exit status. */
static int to_raw(const struct convert_args *a, qk_image *src,
		  const char *dst_path)
{
	struct convert_job j;
	int ret = CLI_EXIT_FAILURE;

	memset(&j, 0, sizeof(j));
	j.src = src;
	j.fd = -1;
	j.dfd = -1;
	atomic_init(&j.direct_ok, true);
	j.sparse = a->sparse;
	j.size = qk_get_size(src);
	pthread_mutex_init(&j.lock, NULL);
	if (prepare_target(&j, a, dst_path) < 0)
		goto out;
	choose_write_path(&j, a, dst_path);
	if (copy(&j, a) < 0)
		goto out;
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
	pthread_mutex_destroy(&j.lock);
	return ret;
}

int cmd_convert(int argc, char **argv)
{
	struct convert_args a = {
		.o = { .cmd = "convert", .usage_code = CLI_EXIT_FAILURE },
		.out_fmt = "raw", .target_unsafe = true,
		.nworkers = DEFAULT_WORKERS, .sparse = 4096,
	};
	const char *dst_path;
	qk_image *src = NULL;
	qk_format fmt;
	int ret = parse_args(argc, argv, &a);

	if (ret != CLI_GO || (ret = check_args(argc, &a)) != CLI_GO)
		goto out;
	ret = CLI_EXIT_FAILURE;
	if (cli_parse_format(a.o.fmtname, &fmt) < 0)
		goto out;
	if (a.quiet)
		a.progress = false;
	if (a.direct)
		a.o.open_flags |= QK_OPEN_DIRECT;
	dst_path = argv[optind + 1];
	if (cli_open_snapshot(argv[optind], fmt, a.o.open_flags, a.snapshot, &src) < 0)
		goto out;
	/* Writing a file the source reads would lose it under our feet. */
	if (cli_check_target(src, dst_path) < 0 || check_source_bitmaps(&a, src) < 0)
		goto out;
	if (strcmp(a.out_fmt, "qcow2") == 0)
		ret = to_qcow2(&a, src, dst_path);
	else
		ret = to_raw(&a, src, dst_path);
out:
	qk_close(src);
	free(a.olist);
	return ret;
}
