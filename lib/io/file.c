/*
 * POSIX file backend. Reads past the end of the file return zeros (see the
 * backend contract in internal.h). With O_DIRECT, requests whose buffer,
 * offset or length are not aligned go through an aligned bounce buffer.
 */
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/magic.h>
#include <linux/openat2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <unistd.h>
#ifdef QK_HAVE_URING
#include <liburing.h>
#include <pthread.h>
#endif

#define DIRECT_ALIGN 4096u

struct posix_file {
	int fd;
	int bfd;                /* with O_DIRECT: the file again, buffered, for
	                         * writes that are not block aligned; or -1 */
	bool direct;
	bool no_punch;          /* PUNCH_HOLE refused once */
	bool no_zero_range;     /* ZERO_RANGE refused once */
	bool no_sync;           /* QK_OPEN_UNSAFE: syncs are no-ops */
};

static int fd_of(struct qk__file *f)
{
	return ((struct posix_file *)f->priv)->fd;
}

/* Plain full read; zero-fill from EOF on. 0 or -errno, nothing recorded. */
static int read_full_quiet(int fd, void *buf, size_t len, uint64_t off)
{
	uint8_t *p = buf;
	while (len > 0) {
		ssize_t n = pread(fd, p, len, (off_t)off);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (n == 0) {
			memset(p, 0, len);
			return 0;
		}
		p += n;
		len -= (size_t)n;
		off += (uint64_t)n;
	}
	return 0;
}

/* The message of a failed read of [off, off+len) of f; returns ret. */
static int read_failed(struct qk__file *f, int ret, size_t len, uint64_t off)
{
	return qk__err(-ret, "read of %zu bytes at offset %llu of %s failed: %s", len,
		       (unsigned long long)off, f->path, strerror(-ret));
}

/* read_full_quiet, recording the message of a failure. */
static int read_full(struct qk__file *f, void *buf, size_t len, uint64_t off)
{
	int ret = read_full_quiet(fd_of(f), buf, len, off);
	return ret < 0 ? read_failed(f, ret, len, off) : 0;
}

static int file_pread(struct qk__file *f, void *buf, size_t len, uint64_t off)
{
	struct posix_file *pf = f->priv;
	if (off > (uint64_t)INT64_MAX || len > (uint64_t)INT64_MAX - off)
		return qk__err(EINVAL, "read at offset %llu of %s is out of range",
			       (unsigned long long)off, f->path);
	if (!pf->direct || ((uintptr_t)buf % DIRECT_ALIGN == 0 &&
			    off % DIRECT_ALIGN == 0 && len % DIRECT_ALIGN == 0))
		return read_full(f, buf, len, off);

	/* Unaligned under O_DIRECT: bounce through an aligned window, no
	 * larger than the request needs (a 4 KiB read must not map and
	 * unmap a megabyte). */
	uint64_t start = off & ~(uint64_t)(DIRECT_ALIGN - 1);
	size_t chunk = (size_t)qk_min_u64(1u << 20, ((off - start) + len + 2 * DIRECT_ALIGN - 1) &
							~(uint64_t)(DIRECT_ALIGN - 1));
	void *bounce;
	if (posix_memalign(&bounce, DIRECT_ALIGN, chunk))
		return qk__err(ENOMEM, "out of memory");
	uint8_t *out = buf;
	int ret = 0;
	while (len > 0) {
		size_t skip = (size_t)(off - start);
		size_t n = qk_min_u64(len, chunk - skip);
		size_t rlen = (skip + n + DIRECT_ALIGN - 1) & ~(size_t)(DIRECT_ALIGN - 1);
		ret = read_full(f, bounce, rlen, start);
		if (ret < 0)
			break;
		memcpy(out, (uint8_t *)bounce + skip, n);
		out += n;
		len -= n;
		off += n;
		start = off & ~(uint64_t)(DIRECT_ALIGN - 1);
	}
	free(bounce);
	return ret;
}

/*
 * Under O_DIRECT, block-aligned ranges go straight out (through an aligned
 * bounce buffer when only the memory is misaligned); other ranges go
 * through a second, buffered descriptor: the kernel writes cached pages of
 * a range back before O_DIRECT reads or writes it, so both paths see the
 * same bytes, and no read-modify-write of a shared block is needed.
 */
/* Plain full write of buf to fd. */
static int write_full(struct qk__file *f, int fd, const uint8_t *p, size_t len, uint64_t off)
{
	while (len > 0) {
		ssize_t n = pwrite(fd, p, len, (off_t)off);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return qk__err(errno, "write of %zu bytes at offset %llu of %s failed: %s",
				       len, (unsigned long long)off, f->path, strerror(errno));
		}
		p += n;
		len -= (size_t)n;
		off += (uint64_t)n;
	}
	return 0;
}

static int file_pwrite(struct qk__file *f, const void *buf, size_t len, uint64_t off)
{
	struct posix_file *pf = f->priv;
	const uint8_t *p = buf;
	if (pf->direct && (off % DIRECT_ALIGN || len % DIRECT_ALIGN) && pf->bfd >= 0)
		return write_full(f, pf->bfd, p, len, off);
	if (!pf->direct || (uintptr_t)buf % DIRECT_ALIGN == 0)
		return write_full(f, pf->fd, p, len, off);
	/* aligned range, misaligned memory: through an aligned copy */
	size_t chunk = qk_min_u64(len, 1u << 20);
	void *bounce;
	if (posix_memalign(&bounce, DIRECT_ALIGN, chunk))
		return qk__err(ENOMEM, "out of memory");
	int ret = 0;
	for (size_t done = 0; ret == 0 && done < len; done += chunk) {
		size_t n = qk_min_u64(chunk, len - done);
		memcpy(bounce, p + done, n);
		ret = write_full(f, pf->fd, bounce, n, off + done);
	}
	free(bounce);
	return ret;
}

static int file_sync(struct qk__file *f)
{
	if (((struct posix_file *)f->priv)->no_sync)
		return 0;
	if (fdatasync(fd_of(f)) < 0)
		return qk__err(errno, "sync of %s failed: %s", f->path, strerror(errno));
	return 0;
}

static int file_get_size(struct qk__file *f, uint64_t *size)
{
	struct stat st;
	if (fstat(fd_of(f), &st) < 0)
		return qk__err(errno, "stat of %s failed: %s", f->path, strerror(errno));
	if (S_ISBLK(st.st_mode)) {
		off_t end = lseek(fd_of(f), 0, SEEK_END);
		if (end < 0)
			return qk__err(errno, "size of %s: %s", f->path, strerror(errno));
		*size = (uint64_t)end;
		return 0;
	}
	*size = (uint64_t)st.st_size;
	return 0;
}

static int file_set_size(struct qk__file *f, uint64_t size)
{
	if (ftruncate(fd_of(f), (off_t)size) < 0)
		return qk__err(errno, "resizing %s failed: %s", f->path, strerror(errno));
	return 0;
}

static int file_allocated_size(struct qk__file *f, uint64_t *bytes)
{
	struct stat st;
	if (fstat(fd_of(f), &st) < 0)
		return qk__err(errno, "stat of %s failed: %s", f->path, strerror(errno));
	*bytes = (uint64_t)st.st_blocks * 512;
	return 0;
}

/* SEEK_DATA/SEEK_HOLE; a file system without them reports all data. */
static int file_block_status(struct qk__file *f, uint64_t off, uint64_t len,
			     bool *is_data, uint64_t *pnum)
{
	int fd = fd_of(f);
	off_t data = lseek(fd, (off_t)off, SEEK_DATA);
	if (data < 0) {
		if (errno == ENXIO) {           /* only a hole up to EOF */
			*is_data = false;
			*pnum = len;
			return 0;
		}
		*is_data = true;                /* unsupported: assume data */
		*pnum = len;
		return 0;
	}
	if ((uint64_t)data > off) {
		*is_data = false;
		*pnum = qk_min_u64(len, (uint64_t)data - off);
		return 0;
	}
	off_t hole = lseek(fd, (off_t)off, SEEK_HOLE);
	*is_data = true;
	if (hole < 0 || (uint64_t)hole <= off)
		*pnum = len;
	else
		*pnum = qk_min_u64(len, (uint64_t)hole - off);
	return 0;
}

/* fallocate modes, probed on first use: a refusal is remembered so the
 * next call falls back at once. */
static int falloc(struct qk__file *f, int mode, uint64_t off, uint64_t len, bool *refused)
{
	if (*refused)
		return -ENOTSUP;
	if (fallocate(fd_of(f), mode, (off_t)off, (off_t)len) == 0)
		return 0;
	if (errno == EOPNOTSUPP || errno == ENOSYS || errno == EINVAL) {
		*refused = true;
		return -ENOTSUP;
	}
	return qk__err(errno, "fallocate on %s failed: %s", f->path, strerror(errno));
}

static int file_discard(struct qk__file *f, uint64_t off, uint64_t len)
{
	struct posix_file *pf = f->priv;
	return falloc(f, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, len, &pf->no_punch);
}

static int file_zero_range(struct qk__file *f, uint64_t off, uint64_t len)
{
	struct posix_file *pf = f->priv;
	return falloc(f, FALLOC_FL_ZERO_RANGE, off, len, &pf->no_zero_range);
}

static int file_allocate(struct qk__file *f, uint64_t off, uint64_t len)
{
	if (off > (uint64_t)INT64_MAX || len > (uint64_t)INT64_MAX - off)
		return qk__err(EINVAL, "Could not preallocate new data: %s", strerror(EINVAL));
	int e = posix_fallocate(fd_of(f), (off_t)off, (off_t)len);
	if (e != 0)
		return qk__err(e, "Could not preallocate new data: %s", strerror(e));
	return 0;
}

/*
 * Image locking, compatible with QEMU's: OFD read locks on single bytes,
 * 100 + p for each permission p held and 200 + p for each permission not
 * shared with others (p: 0 consistent read, 1 write, 2 write unchanged,
 * 3 resize). A reader holds 100 and refuses to share 201 and 203; a
 * writer also holds 101 and 103; force-share holds 100 only. Conflicts
 * are tested first (F_OFD_GETLK), then the bytes are taken. The locks
 * belong to the open file description: another open of the same file
 * conflicts with them even in this process, and they go with the last
 * descriptor of that open. F_RDLCK needs a descriptor open for reading.
 */
#define LOCK_PERM_BASE   100
#define LOCK_SHARED_BASE 200
static const char *const perm_names[] = { "consistent read", "write", "write unchanged", "resize" };

static int lock_byte(int fd, int cmd, short type, off_t byte, bool *conflict)
{
	struct flock fl = { .l_type = type, .l_whence = SEEK_SET, .l_start = byte, .l_len = 1 };
	if (fcntl(fd, cmd, &fl) < 0)
		return -errno;
	if (conflict)
		*conflict = fl.l_type != F_UNLCK;
	return 0;
}

int qk__lock_fd(int fd, const char *name, bool write, bool force_share)
{
	unsigned held = write ? 0xb : 0x1;              /* bits: 0, 1, 3 / 0 */
	unsigned unshared = force_share ? 0 : 0xa;      /* bits 1 and 3 */
	for (unsigned p = 0; p < 4; p++) {
		bool conflict = false;
		int ret = 0;
		if (held & (1u << p)) {
			ret = lock_byte(fd, F_OFD_GETLK, F_WRLCK, LOCK_SHARED_BASE + p, &conflict);
			if (ret == 0 && conflict)
				return qk__err(EAGAIN, "Failed to get \"%s\" lock: Is another process using the image [%s]?",
					       perm_names[p], name);
		}
		if (ret == 0 && (unshared & (1u << p))) {
			ret = lock_byte(fd, F_OFD_GETLK, F_WRLCK, LOCK_PERM_BASE + p, &conflict);
			if (ret == 0 && conflict)
				return qk__err(EAGAIN, "Failed to get shared \"%s\" lock: Is another process using the image [%s]?",
					       perm_names[p], name);
		}
		if (ret == -EINVAL || ret == -ENOTSUP || ret == -ENOLCK)
			return 0;       /* no OFD locks here (old kernel, some NFS): go on unlocked */
		if (ret < 0)
			return qk__err(-ret, "locking '%s' failed: %s", name, strerror(-ret));
	}
	for (unsigned p = 0; p < 4; p++) {
		int ret = 0;
		if (held & (1u << p))
			ret = lock_byte(fd, F_OFD_SETLK, F_RDLCK, LOCK_PERM_BASE + p, NULL);
		if (ret == 0 && (unshared & (1u << p)))
			ret = lock_byte(fd, F_OFD_SETLK, F_RDLCK, LOCK_SHARED_BASE + p, NULL);
		if (ret == -EAGAIN || ret == -EACCES)
			return qk__err(EAGAIN, "Failed to lock byte %u: Is another process using the image [%s]?",
				       (held & (1u << p)) ? LOCK_PERM_BASE + p : LOCK_SHARED_BASE + p, name);
		if (ret < 0 && ret != -EINVAL && ret != -ENOTSUP && ret != -ENOLCK)
			return qk__err(-ret, "locking '%s' failed: %s", name, strerror(-ret));
	}
	return 0;
}

static int file_lock(struct qk__file *f, bool write, bool force_share)
{
	return qk__lock_fd(fd_of(f), f->path, write, force_share);
}

static int file_identity(struct qk__file *f, uint64_t *dev, uint64_t *ino)
{
	struct stat st;
	if (fstat(fd_of(f), &st) < 0)
		return qk__err(errno, "stat of %s failed: %s", f->path, strerror(errno));
	*dev = (uint64_t)st.st_dev;
	*ino = (uint64_t)st.st_ino;
	return 0;
}

static void file_close(struct qk__file *f)
{
	struct posix_file *pf = f->priv;
	close(pf->fd);
	if (pf->bfd >= 0)
		close(pf->bfd);
	free(pf);
}

/*
 * Batched reads (qk_pread_batch). Each thread has its own queue, and with
 * liburing its own ring, made at its first batch and closed when the
 * thread ends. Only aligned reads of an O_DIRECT file are queued: they
 * are the ones that wait for the device, so it pays to have many in
 * flight; any other read is made at once. A short read (the end of the
 * file) or an interrupted one is finished by read_full, as file_pread
 * would have done it.
 */
#define IO_BATCH_MAX 64u

struct batch_item {
	struct qk__file *f;
	void *buf;
	size_t len;
	uint64_t off;
};

static _Thread_local struct {
	bool on;
	unsigned n;
	struct batch_item it[IO_BATCH_MAX];
} batch;

#ifdef QK_HAVE_URING
static pthread_key_t ring_key;
static pthread_once_t ring_once = PTHREAD_ONCE_INIT;
static bool ring_key_ok;

/* A thread's ring, and the process that made it (a child after fork()
 * must not submit on its parent's). */
struct ring {
	struct io_uring r;
	pid_t pid;
};

static void ring_free(void *p)
{
	io_uring_queue_exit(&((struct ring *)p)->r);
	free(p);
}

static void ring_key_init(void)
{
	ring_key_ok = pthread_key_create(&ring_key, ring_free) == 0;
}

static _Thread_local bool ring_refused;

/* Give up this thread's ring for good (every read it took was reaped). */
static void ring_drop(void)
{
	struct ring *r = pthread_getspecific(ring_key);
	if (r) {
		(void)pthread_setspecific(ring_key, NULL);
		ring_free(r);
	}
	ring_refused = true;
}

/* This thread's ring, or NULL when the system has none to give (no
 * io_uring, or one without IORING_OP_READ, before Linux 5.6). */
static struct io_uring *ring_get(void)
{
	pthread_once(&ring_once, ring_key_init);
	if (!ring_key_ok || ring_refused)
		return NULL;
	struct ring *r = pthread_getspecific(ring_key);
	if (r && r->pid == getpid())
		return &r->r;
	if (r) {                /* inherited through fork(): ours to close */
		(void)pthread_setspecific(ring_key, NULL);
		ring_free(r);
	}
	r = calloc(1, sizeof *r);
	if (r && io_uring_queue_init(IO_BATCH_MAX, &r->r, 0) == 0) {
		struct io_uring_probe *probe = io_uring_get_probe_ring(&r->r);
		bool reads = probe && io_uring_opcode_supported(probe, IORING_OP_READ);
		if (probe)
			io_uring_free_probe(probe);
		r->pid = getpid();
		if (reads && pthread_setspecific(ring_key, r) == 0)
			return &r->r;
		io_uring_queue_exit(&r->r);
	}
	free(r);
	ring_refused = true;    /* plain reads from now on */
	return NULL;
}

/* Submit the `n` reads prepared in ring r and reap them all into res[]
 * (bytes read, or -errno). Returns how many the kernel took: the first
 * ones, in order. When it took fewer, the rest are still in the ring's
 * queue, where they must not stay: the caller drops the ring. */
static unsigned ring_run(struct io_uring *r, unsigned n, int *res)
{
	unsigned taken = 0, got = 0;
	while (taken < n) {
		int s = io_uring_submit(r);
		if (s > 0) {
			taken += (unsigned)s;
			continue;
		}
		if (s == -EINTR)
			continue;
		if ((s == -EAGAIN || s == -EBUSY) && got < taken) {
			/* No room: let completions out, then go on. */
			struct io_uring_cqe *cqe;
			if (io_uring_wait_cqe(r, &cqe) == 0) {
				res[(uintptr_t)io_uring_cqe_get_data(cqe)] = cqe->res;
				io_uring_cqe_seen(r, cqe);
				got++;
			}
			continue;
		}
		break;
	}
	while (got < taken) {
		struct io_uring_cqe *cqe;
		int w = io_uring_wait_cqe(r, &cqe);
		if (w == -EINTR || w == -EAGAIN)
			continue;
		if (w < 0)
			abort();        /* the kernel may still write into the buffers */
		res[(uintptr_t)io_uring_cqe_get_data(cqe)] = cqe->res;
		io_uring_cqe_seen(r, cqe);
		got++;
	}
	return taken;
}
#endif

/* Make every queued read, and wait for them all. The first failure's
 * message is recorded when `report`. */
static int batch_run(bool report)
{
	unsigned n = batch.n, done = 0;
	int res[IO_BATCH_MAX], ret = 0;
	batch.n = 0;
#ifdef QK_HAVE_URING
	struct io_uring *r = n > 1 ? ring_get() : NULL;
	if (r) {
		for (unsigned i = 0; i < n; i++) {
			struct io_uring_sqe *sqe = io_uring_get_sqe(r);   /* n <= its size */
			io_uring_prep_read(sqe, fd_of(batch.it[i].f), batch.it[i].buf,
					   (unsigned)batch.it[i].len, batch.it[i].off);
			io_uring_sqe_set_data(sqe, (void *)(uintptr_t)i);
		}
		done = ring_run(r, n, res);
		if (done < n)
			ring_drop();    /* its queue still holds the rest */
	}
#endif
	for (unsigned i = 0; i < n; i++) {
		const struct batch_item *it = &batch.it[i];
		int one = 0;
		if (i >= done) {
			one = read_full_quiet(fd_of(it->f), it->buf, it->len, it->off);
		} else if (res[i] < 0 || (size_t)res[i] != it->len) {
			/* Short (the end of the file), interrupted, or refused by
			 * the ring: finished, or failed, as file_pread would. */
			size_t got = res[i] > 0 ? (size_t)res[i] : 0;
			one = read_full_quiet(fd_of(it->f), (uint8_t *)it->buf + got, it->len - got,
					      it->off + got);
		}
		if (one < 0 && ret == 0)
			ret = report ? read_failed(it->f, one, it->len, it->off) : one;
	}
	return ret;
}

int qk__io_batch_begin(void)
{
	if (batch.on)
		return -EBUSY;
	batch.on = true;
	batch.n = 0;
	return 0;
}

bool qk__io_batching(void)
{
	return batch.on;
}

int qk__io_batch_end(bool report)
{
	int ret = batch_run(report);
	batch.on = false;
	return ret;
}

static int file_pread_batched(struct qk__file *f, void *buf, size_t len, uint64_t off)
{
	struct posix_file *pf = f->priv;
	if (!pf->direct || (uintptr_t)buf % DIRECT_ALIGN || off % DIRECT_ALIGN ||
	    len % DIRECT_ALIGN || len > (1u << 30) || off > (uint64_t)INT64_MAX - len)
		return file_pread(f, buf, len, off);
	if (batch.n == IO_BATCH_MAX) {
		int ret = batch_run(true);
		if (ret < 0)
			return ret;
	}
	batch.it[batch.n++] = (struct batch_item){ .f = f, .buf = buf, .len = len, .off = off };
	return 0;
}

static const struct qk__io_ops posix_ops = {
	.pread = file_pread,
	.pwrite = file_pwrite,
	.sync = file_sync,
	.get_size = file_get_size,
	.set_size = file_set_size,
	.allocated_size = file_allocated_size,
	.block_status = file_block_status,
	.discard = file_discard,
	.zero_range = file_zero_range,
	.allocate = file_allocate,
	.identity = file_identity,
	.pread_batched = file_pread_batched,
	.lock = file_lock,
	.close = file_close,
};

/* A file for descriptor fd (closed on failure). */
static int wrap_fd(const char *path, int fd, struct qk__file **out)
{
	struct qk__file *f = calloc(1, sizeof *f);
	struct posix_file *pf = calloc(1, sizeof *pf);
	char *p = strdup(path);
	if (!f || !pf || !p) {
		free(f);
		free(pf);
		free(p);
		close(fd);
		return qk__err(ENOMEM, "out of memory");
	}
	pf->fd = fd;
	pf->bfd = -1;
	f->ops = &posix_ops;
	f->priv = pf;
	f->path = p;
	*out = f;
	return 0;
}

int qk__file_open_posix(const char *path, bool writable, uint32_t open_flags,
			struct qk__file **out)
{
	bool direct = open_flags & QK_OPEN_DIRECT;
	int flags = (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC;
	int fd = open(path, flags | (direct ? O_DIRECT : 0));
	if (fd < 0 && direct && errno == EINVAL) {
		/* The file system refuses O_DIRECT: use the page cache. */
		direct = false;
		fd = open(path, flags);
	}
	if (fd < 0)
		return qk__err(errno, "Could not open '%s': %s", path, strerror(errno));
	struct stat st;
	if (fstat(fd, &st) == 0 && S_ISDIR(st.st_mode)) {
		close(fd);
		return qk__err(EISDIR, "Could not open '%s': Is a directory", path);
	}
	int ret = wrap_fd(path, fd, out);
	if (ret < 0)
		return ret;
	struct posix_file *pf = (*out)->priv;
	pf->bfd = direct && writable ? open(path, flags) : -1;
	pf->direct = direct;
	pf->no_sync = open_flags & QK_OPEN_UNSAFE;
	return 0;
}

/* What kind of file st describes, for a refusal. */
static const char *kind_of(const struct stat *st)
{
	if (S_ISFIFO(st->st_mode))
		return "a FIFO";
	if (S_ISSOCK(st->st_mode))
		return "a socket";
	if (S_ISDIR(st->st_mode))
		return "a directory";
	if (S_ISCHR(st->st_mode))
		return "a character device";
	return "not a regular file";
}

/* Pseudo file systems whose files are views of the kernel or of processes
 * (memory, environment, settings), never disk images: the name of the one
 * with magic f_type, or NULL. */
static const char *pseudo_fs_name(long f_type)
{
	static const struct { long magic; const char *name; } pseudo[] = {
		{ PROC_SUPER_MAGIC, "procfs" }, { SYSFS_MAGIC, "sysfs" },
		{ DEBUGFS_MAGIC, "debugfs" }, { TRACEFS_MAGIC, "tracefs" },
		{ SECURITYFS_MAGIC, "securityfs" }, { CGROUP_SUPER_MAGIC, "cgroupfs" },
		{ CGROUP2_SUPER_MAGIC, "cgroup2fs" }, { BPF_FS_MAGIC, "bpffs" },
		{ EFIVARFS_MAGIC, "efivarfs" }, { DEVPTS_SUPER_MAGIC, "devpts" },
	};
	for (size_t i = 0; i < sizeof pseudo / sizeof pseudo[0]; i++)
		if (f_type == pseudo[i].magic)
			return pseudo[i].name;
	return NULL;
}

static const char *pseudo_fs(int fd)
{
	struct statfs sfs;
	return fstatfs(fd, &sfs) == 0 ? pseudo_fs_name((long)sfs.f_type) : NULL;
}

/* Does `name` hold a ".." component? */
static bool has_dotdot(const char *name)
{
	for (const char *p = name; (p = strstr(p, "..")) != NULL; p += 2)
		if ((p == name || p[-1] == '/') && (p[2] == '\0' || p[2] == '/'))
			return true;
	return false;
}

/*
 * Open `name` confined to the directory of `image`: resolved beneath that
 * directory (openat2 RESOLVE_BENEATH: no absolute name, no "..", no
 * symlink leading out; where the kernel lacks openat2, the file opened
 * must resolve under the directory's resolved path). Returns the
 * descriptor or -errno (-EXDEV: leads out), nothing recorded.
 */
static int open_beneath(const char *image, const char *name, int flags)
{
	if (name[0] == '/' || has_dotdot(name))
		return -EXDEV;
	const char *slash = strrchr(image, '/');
	char *dir = slash ? strndup(image, (size_t)(slash - image) + 1) : strdup(".");
	if (!dir)
		return -ENOMEM;
	int dfd = open(dir, O_PATH | O_DIRECTORY | O_CLOEXEC);
	int fd = dfd < 0 ? -1 : 0, e = errno;
	if (dfd >= 0) {
		struct open_how how = { .flags = (uint64_t)flags,
					.resolve = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS };
		fd = (int)syscall(SYS_openat2, dfd, name, &how, sizeof how);
		e = errno;
	}
	if (fd < 0 && e == ENOSYS) {
		fd = openat(dfd, name, flags);
		e = errno;
		char fdlink[64];
		snprintf(fdlink, sizeof fdlink, "/proc/self/fd/%d", fd);
		char *real = fd >= 0 ? realpath(fdlink, NULL) : NULL;
		char *rdir = fd >= 0 ? realpath(dir, NULL) : NULL;
		size_t n = rdir ? strlen(rdir) : 0;
		if (fd >= 0 && (!real || !rdir || strncmp(real, rdir, n) != 0 ||
				(real[n] != '/' && strcmp(rdir, "/") != 0))) {
			close(fd);
			fd = -1;
			e = EXDEV;
		}
		free(real);
		free(rdir);
	}
	if (dfd >= 0)
		close(dfd);
	free(dir);
	return fd < 0 ? -e : fd;
}

/* Open the file an image names (see qk__posix_host); `what` says which, for
 * messages. */
static int open_named(const char *image, const char *name, const char *path, bool writable,
		      uint32_t open_flags, const char *what, struct qk__file **out)
{
	bool direct = open_flags & QK_OPEN_DIRECT;
	bool confine = open_flags & QK_OPEN_CONFINE;
	/* Non-blocking: opening a FIFO must not wait for a writer; no
	 * controlling terminal, whatever the name is. */
	int flags = (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC | O_NONBLOCK | O_NOCTTY;
	int fd;
	for (;;) {
		int f = flags | (direct ? O_DIRECT : 0);
		fd = confine ? open_beneath(image, name, f) : open(path, f);
		if (!confine && fd < 0)
			fd = -errno;
		if (fd == -EINVAL && direct) {
			direct = false;         /* no O_DIRECT here: the page cache */
			continue;
		}
		break;
	}
	if (fd == -EXDEV && confine)
		return qk__err(EPERM, "%s '%s' of '%s' leads out of the image's directory (a confined "
			       "open takes only names beneath it: no absolute name, no '..', no "
			       "symlink leading out)", what, name, image);
	struct stat st;
	const char *refuse = NULL, *fs;
	if (fd < 0) {
		/* A socket cannot be opened, a pseudo file may refuse write
		 * access: say what the name is, not only that open failed. */
		struct statfs sfs;
		if (stat(path, &st) == 0 && !S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode))
			refuse = kind_of(&st);
		else if (statfs(path, &sfs) == 0)
			refuse = pseudo_fs_name(sfs.f_type);
		if (!refuse)
			return qk__err(-fd, "Could not open %s '%s' of '%s': %s", what, path, image,
				       strerror(-fd));
		return qk__err(EPERM, "%s '%s' of '%s' is refused: %s %s; only regular files and block "
			       "devices are opened", what, name, image,
			       S_ISREG(st.st_mode) ? "it lies on" : "it is", refuse);
	}
	if (fstat(fd, &st) < 0) {
		int e = errno;
		close(fd);
		return qk__err(e, "stat of '%s' failed: %s", path, strerror(e));
	}
	if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode))
		refuse = kind_of(&st);
	else if ((fs = pseudo_fs(fd)) != NULL)
		refuse = fs;
	if (refuse) {
		close(fd);
		return qk__err(EPERM, "%s '%s' of '%s' is refused: %s %s; only regular files and block "
			       "devices are opened", what, name, image,
			       S_ISREG(st.st_mode) ? "it lies on" : "it is", refuse);
	}
	fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
	int ret = wrap_fd(path, fd, out);
	if (ret < 0)
		return ret;
	struct posix_file *pf = (*out)->priv;
	if (direct && writable) {
		/* The buffered twin, of this very file (not of the name again). */
		char fdlink[64];
		snprintf(fdlink, sizeof fdlink, "/proc/self/fd/%d", fd);
		pf->bfd = open(fdlink, (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC);
	}
	pf->direct = direct;
	pf->no_sync = open_flags & QK_OPEN_UNSAFE;
	return 0;
}

int qk__file_create_posix(const char *path, bool *created, struct qk__file **out)
{
	int fd = -1, e = 0;

	*created = false;
	/* O_EXCL tells a file we make from one that was there; a file that
	 * comes or goes between the two opens sends us round again. A
	 * dangling symbolic link (EEXIST, then ENOENT) makes its target, as
	 * QEMU does; that counts as not created, so no failure removes the
	 * link. */
	for (int tries = 0; fd < 0 && tries < 16; tries++) {
		struct stat st;

		fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
		if (fd >= 0) {
			*created = true;
			break;
		}
		e = errno;
		if (e != EEXIST)
			break;
		fd = open(path, O_RDWR | O_CLOEXEC);
		e = errno;
		if (fd < 0 && e == ENOENT && lstat(path, &st) == 0 && S_ISLNK(st.st_mode)) {
			fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
			e = errno;
		}
		if (fd < 0 && e != ENOENT)
			break;
	}
	if (fd < 0)
		return qk__err(e, "Could not create '%s': %s", path, strerror(e));
	int ret = qk__lock_fd(fd, path, true, false);
	if (ret == 0)
		ret = wrap_fd(path, fd, out);
	else
		close(fd);
	if (ret < 0 && *created) {
		unlink(path);
		*created = false;
	}
	return ret;
}

static int posix_open_backing(const struct qk__host *host, const char *image, const char *name,
			      const char *path, uint32_t open_flags, struct qk__file **out)
{
	(void)host;
	return open_named(image, name, path, false, open_flags, "backing file", out);
}

static int posix_open_data_file(const struct qk__host *host, const char *image, const char *name,
				const char *path, bool writable, uint32_t open_flags,
				struct qk__file **out)
{
	(void)host;
	return open_named(image, name, path, writable, open_flags, "external data file", out);
}

const struct qk__host qk__posix_host = {
	.open_backing = posix_open_backing,
	.open_data_file = posix_open_data_file,
};




