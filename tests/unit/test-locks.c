/*
 * test-locks: the destination guards of the public API, on real files in a
 * scratch directory (locks and inodes need a file system).
 *   - qk_uses_file(): the image itself, each file of its backing chain and
 *     external data files, by any name (symbolic and hard links), and the
 *     layer that reads them; 0 for other and missing files; -EINVAL.
 *   - qk_lock_fd(): conflicts with an image opened read-write (another
 *     open of the same file, in this process too), read locks that share,
 *     -EBADF; the message is QEMU's.
 *   - qk_create() under a conflicting lock, on the image or its data file:
 *     -EAGAIN, an existing file keeps its bytes, a new one is removed.
 */
#include "tap.h"

#include <fcntl.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

static char dir[256];

/* dir/name, in a static ring so several may be live at once. */
static const char *p(const char *name)
{
	static char bufs[8][512];
	static int i;
	char *b = bufs[i++ % 8];
	snprintf(b, 512, "%s/%s", dir, name);
	return b;
}

static int make(const char *name, uint64_t size, const char *backing, const char *bfmt,
		const char *data_file, qk_format fmt)
{
	struct qk_create_options o;
	qk_create_options_init(&o);
	o.format = fmt;
	o.size = size;
	o.backing_file = backing;
	o.backing_format = bfmt;
	o.data_file = data_file;
	return qk_create(p(name), &o);
}

static void write_bytes(const char *name, size_t len, int byte)
{
	char *buf = malloc(len);
	memset(buf, byte, len);
	FILE *f = fopen(p(name), "wb");
	CHECK(f && fwrite(buf, 1, len, f) == len, "write %s", name);
	if (f)
		fclose(f);
	free(buf);
}

/* 1 when the file holds exactly len bytes of `byte`. */
static bool holds(const char *name, size_t len, int byte)
{
	struct stat st;
	if (stat(p(name), &st) < 0 || (size_t)st.st_size != len)
		return false;
	FILE *f = fopen(p(name), "rb");
	int c;
	size_t n = 0;
	while (f && (c = fgetc(f)) != EOF && c == byte)
		n++;
	if (f)
		fclose(f);
	return n == len;
}

static void test_uses_file(void)
{
	qk_image *top, *layer;
	struct qk_open_options o;

	CHECK_EQ(make("base.raw", 1 << 20, NULL, NULL, NULL, QK_FORMAT_RAW), 0, "create base");
	CHECK_EQ(make("mid.qcow2", 1 << 20, "base.raw", "raw", NULL, QK_FORMAT_QCOW2), 0,
		 "create mid");
	CHECK_EQ(make("top.qcow2", 1 << 20, "mid.qcow2", "qcow2", NULL, QK_FORMAT_QCOW2), 0,
		 "create top");
	CHECK_EQ(make("d.qcow2", 1 << 20, NULL, NULL, "d.data", QK_FORMAT_QCOW2), 0,
		 "create with data file");
	CHECK(symlink("base.raw", p("sym")) == 0, "symlink");
	CHECK(link(p("mid.qcow2"), p("hard")) == 0, "hard link");
	write_bytes("other", 512, 1);

	qk_open_options_init(&o);
	if (qk_open(p("top.qcow2"), &o, &top) < 0) {
		CHECK(0, "open top: %s", qk_last_error());
		return;
	}
	qk_image *mid = qk_get_backing(top), *base = mid ? qk_get_backing(mid) : NULL;
	CHECK(mid && base, "chain of three");

	CHECK_EQ(qk_uses_file(top, p("top.qcow2"), &layer), QK_USES_IMAGE, "itself");
	CHECK(layer == top, "itself: layer");
	CHECK_EQ(qk_uses_file(top, p("mid.qcow2"), &layer), QK_USES_IMAGE, "backing");
	CHECK(layer == mid, "backing: layer");
	CHECK_EQ(qk_uses_file(top, p("base.raw"), &layer), QK_USES_IMAGE, "bottom");
	CHECK(layer == base, "bottom: layer");
	CHECK_EQ(qk_uses_file(top, p("sym"), &layer), QK_USES_IMAGE, "symlink to bottom");
	CHECK(layer == base, "symlink: layer");
	CHECK_EQ(qk_uses_file(top, p("hard"), &layer), QK_USES_IMAGE, "hard link to backing");
	CHECK(layer == mid, "hard link: layer");
	CHECK_EQ(qk_uses_file(mid, p("top.qcow2"), NULL), 0, "an overlay is not read");
	layer = top;
	CHECK_EQ(qk_uses_file(top, p("other"), &layer), 0, "another file");
	CHECK(layer == NULL, "another file: layer NULL");
	CHECK_EQ(qk_uses_file(top, p("missing"), NULL), 0, "missing file");
	CHECK_EQ(qk_uses_file(top, p("other/x"), NULL), 0, "below a non-directory");
	CHECK_EQ(qk_uses_file(top, dir, NULL), 0, "the directory");
	CHECK_EQ(qk_uses_file(NULL, p("top.qcow2"), NULL), -EINVAL, "NULL image");
	CHECK_EQ(qk_uses_file(top, NULL, NULL), -EINVAL, "NULL path");
	CHECK(strncmp(qk_last_error(), "qk_uses_file: ", 14) == 0, "message: %s", qk_last_error());
	qk_close(top);

	qk_image *d;
	if (qk_open(p("d.qcow2"), &o, &d) < 0) {
		CHECK(0, "open d: %s", qk_last_error());
		return;
	}
	CHECK_EQ(qk_uses_file(d, p("d.data"), &layer), QK_USES_DATA_FILE, "data file");
	CHECK(layer == d, "data file: layer");
	CHECK_EQ(qk_uses_file(d, p("d.qcow2"), NULL), QK_USES_IMAGE, "data file image itself");
	qk_close(d);

	/* Without the chain opened, only the top is read. */
	o.flags = QK_OPEN_NO_BACKING;
	if (qk_open(p("top.qcow2"), &o, &top) == 0) {
		CHECK_EQ(qk_uses_file(top, p("mid.qcow2"), NULL), 0, "NO_BACKING: backing not read");
		qk_close(top);
	}
}

static void test_lock_fd(void)
{
	struct qk_open_options o;
	qk_image *img;
	int fd = open(p("other"), O_RDWR), fd2 = open(p("other"), O_RDONLY);

	CHECK(fd >= 0 && fd2 >= 0, "open other");
	CHECK_EQ(qk_lock_fd(fd2, "other", 0), 0, "read lock");
	CHECK_EQ(qk_lock_fd(fd, "other", QK_OPEN_RDWR), -EAGAIN, "write lock over a reader");
	CHECK(tap_one_line(qk_last_error()) &&
	      tap_contains(qk_last_error(), "qk_lock_fd: Failed to get \"write\" lock: "
			   "Is another process using the image [other]?"),
	      "message: %s", qk_last_error());
	close(fd2);
	close(fd);

	fd = open(p("other"), O_RDWR);
	CHECK_EQ(qk_lock_fd(fd, NULL, QK_OPEN_RDWR), 0, "write lock");
	qk_open_options_init(&o);
	CHECK_EQ(qk_open(p("other"), &o, &img), -EAGAIN, "qk_open read over the write lock");
	o.flags = QK_OPEN_FORCE_SHARE;
	CHECK_EQ(qk_open(p("other"), &o, &img), 0, "force-share open over the write lock");
	qk_close(img);
	fd2 = open(p("other"), O_RDONLY);
	CHECK_EQ(qk_lock_fd(fd2, NULL, 0), -EAGAIN, "read lock over the writer");
	CHECK(tap_contains(qk_last_error(), "[fd "), "NULL name: %s", qk_last_error());
	CHECK_EQ(qk_lock_fd(fd2, NULL, QK_OPEN_FORCE_SHARE), 0, "force-share lock over the writer");
	close(fd2);
	close(fd);
	/* Closed: the locks are gone. */
	fd = open(p("other"), O_RDWR);
	CHECK_EQ(qk_lock_fd(fd, "other", QK_OPEN_RDWR), 0, "write lock after close");
	close(fd);

	CHECK_EQ(qk_lock_fd(-1, "x", 0), -EBADF, "fd -1");
	fd = open(p("other"), O_WRONLY);
	CHECK_EQ(qk_lock_fd(fd, "other", QK_OPEN_RDWR), -EBADF, "write-only descriptor");
	close(fd);

	/* An image open read-write in this process keeps others out. */
	o.flags = QK_OPEN_RDWR;
	if (qk_open(p("d.qcow2"), &o, &img) == 0) {
		fd = open(p("d.qcow2"), O_RDONLY);
		CHECK_EQ(qk_lock_fd(fd, "d.qcow2", 0), -EAGAIN, "read lock over an open image");
		close(fd);
		fd = open(p("d.data"), O_RDONLY);
		CHECK_EQ(qk_lock_fd(fd, "d.data", 0), -EAGAIN, "read lock over its data file");
		close(fd);
		qk_close(img);
	}
}

static void test_create_locked(void)
{
	int fd;

	/* The image is held: it keeps its bytes. */
	write_bytes("held", 4096, 7);
	fd = open(p("held"), O_RDONLY);
	CHECK_EQ(qk_lock_fd(fd, "held", 0), 0, "hold");
	CHECK_EQ(make("held", 1 << 20, NULL, NULL, NULL, QK_FORMAT_QCOW2), -EAGAIN,
		 "create qcow2 over a held file");
	CHECK(tap_one_line(qk_last_error()) &&
	      strncmp(qk_last_error(), "qk_create: Failed to get \"write\" lock", 37) == 0,
	      "message: %s", qk_last_error());
	CHECK(holds("held", 4096, 7), "held qcow2: unchanged");
	CHECK_EQ(make("held", 1 << 20, NULL, NULL, NULL, QK_FORMAT_RAW), -EAGAIN,
		 "create raw over a held file");
	CHECK(holds("held", 4096, 7), "held raw: unchanged");

	/* Its data file is held: a new image goes again, an old one stays. */
	CHECK_EQ(make("new.qcow2", 1 << 20, NULL, NULL, "held", QK_FORMAT_QCOW2), -EAGAIN,
		 "create with a held data file");
	CHECK(access(p("new.qcow2"), F_OK) < 0 && errno == ENOENT, "new image removed");
	write_bytes("old.qcow2", 1000, 9);
	CHECK_EQ(make("old.qcow2", 1 << 20, NULL, NULL, "held", QK_FORMAT_QCOW2), -EAGAIN,
		 "create over an old image with a held data file");
	CHECK(holds("old.qcow2", 1000, 9), "old image unchanged");
	CHECK(holds("held", 4096, 7), "held data file unchanged");
	close(fd);

	/* The data file is the image: refused before anything changes. */
	CHECK_EQ(make("old.qcow2", 1 << 20, NULL, NULL, "old.qcow2", QK_FORMAT_QCOW2), -EINVAL,
		 "data file is the image");
	CHECK(holds("old.qcow2", 1000, 9), "image as its data file: unchanged");

	/* Released: it is replaced. */
	CHECK_EQ(make("held", 1 << 20, NULL, NULL, NULL, QK_FORMAT_RAW), 0, "create after release");
	CHECK(holds("held", 1 << 20, 0), "replaced by zeros");
}

int main(void)
{
	tap_watchdog(60);
	snprintf(dir, sizeof dir, "%s/qk-locks.XXXXXX", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
	if (strlen(dir) >= sizeof dir - 1 || !mkdtemp(dir)) {
		fprintf(stderr, "cannot make a scratch directory\n");
		return 1;
	}
	test_uses_file();
	test_lock_fd();
	test_create_locked();
	char cmd[300];
	snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
	if (system(cmd) != 0)
		fprintf(stderr, "could not remove %s\n", dir);
	return tap_done();
}
