/*
 * test-commit.c - the contracts of qk_commit, qk_rebase and qk_set_backing
 * (qcowkit.h): what each refuses and with which errno and message prefix,
 * and what each leaves behind, on images the library makes in a scratch
 * directory. The power-cut guarantees are walked by tests/fault/chain-cut.sh;
 * the comparisons with qemu-img by tests/interop/commit.sh and rebase.sh.
 */
#include "tap.h"

#define SIZE (1u << 20)

static char dir[64];
static char base_path[128], top_path[128], raw_path[128];

static void die_on(int ret, const char *what)
{
	if (ret < 0) {
		fprintf(stderr, "%s: %s\n", what, qk_last_error());
		exit(1);
	}
}

static qk_image *open_img(const char *path, uint32_t flags)
{
	struct qk_open_options o;
	qk_image *img;
	qk_open_options_init(&o);
	o.flags = flags;
	die_on(qk_open(path, &o, &img), path);
	return img;
}

/* base: bytes (i % 251) + 1; top over it: 0xaa in [64k, 192k), zeros
 * in [512k, 576k). */
static void make_images(void)
{
	struct qk_create_options c;
	uint8_t *buf = malloc(SIZE);
	if (!buf)
		qb_die("out of memory");
	qk_create_options_init(&c);
	c.size = SIZE;
	die_on(qk_create(base_path, &c), "create base");
	c.backing_file = "base.qcow2";
	c.backing_format = "qcow2";
	die_on(qk_create(top_path, &c), "create top");
	qk_create_options_init(&c);
	c.format = QK_FORMAT_RAW;
	c.size = SIZE;
	die_on(qk_create(raw_path, &c), "create raw");
	qk_image *b = open_img(base_path, QK_OPEN_RDWR);
	for (uint32_t i = 0; i < SIZE; i++)
		buf[i] = (uint8_t)(i % 251 + 1);
	die_on(qk_pwrite(b, buf, SIZE, 0), "write base");
	die_on(qk_close(b), "close base");
	qk_image *t = open_img(top_path, QK_OPEN_RDWR);
	memset(buf, 0xaa, 128 << 10);
	die_on(qk_pwrite(t, buf, 128 << 10, 64 << 10), "write top");
	die_on(qk_write_zeroes(t, 512 << 10, 64 << 10, 0), "zero top");
	die_on(qk_close(t), "close top");
	free(buf);
}

/* The guest view of path, malloc'd. */
static uint8_t *view(const char *path)
{
	qk_image *img = open_img(path, QK_OPEN_FORCE_SHARE);
	uint8_t *buf = malloc(SIZE);
	if (!buf)
		qb_die("out of memory");
	die_on(qk_pread(img, buf, SIZE, 0), path);
	qk_close(img);
	return buf;
}

static bool starts_with(const char *s, const char *p)
{
	return strncmp(s, p, strlen(p)) == 0;
}

static void test_commit_refusals(void)
{
	qk_image *top = open_img(top_path, QK_OPEN_FORCE_SHARE);
	qk_image *base_ro = open_img(base_path, QK_OPEN_FORCE_SHARE);
	qk_image *other = open_img(raw_path, QK_OPEN_RDWR);
	qk_image *layer = qk_get_backing(top);
	CHECK(layer != NULL, "the top has its backing file open");
	CHECK_EQ(qk_commit(NULL, layer, other, NULL), -EINVAL, "no top");
	CHECK(starts_with(qk_last_error(), "qk_commit: "), "message names qk_commit: %s",
	      qk_last_error());
	CHECK_EQ(qk_commit(top, top, other, NULL), -EINVAL, "the top is not in its own chain");
	CHECK(strstr(qk_last_error(), "is not in the backing chain") != NULL, "%s",
	      qk_last_error());
	CHECK_EQ(qk_commit(top, layer, base_ro, NULL), -EPERM, "a read-only base");
	CHECK_EQ(qk_commit(top, layer, layer, NULL), -EINVAL, "the chain's own handle as base");
	struct qk_commit_options o;
	qk_commit_options_init(&o);
	o.flags = 0x80;
	CHECK_EQ(qk_commit(top, layer, other, &o), -EINVAL, "unknown flags");
	o.flags = QK_COMMIT_EMPTY;
	CHECK_EQ(qk_commit(top, layer, other, &o), -EPERM, "emptying a read-only top");
	o.struct_size = 4;
	CHECK_EQ(qk_commit(top, layer, other, &o), -EINVAL, "a struct_size too small");
	qk_close(other);
	qk_close(base_ro);
	qk_close(top);
}

struct prog {
	uint64_t calls, last, total;
};

static void on_progress(void *opaque, uint64_t done, uint64_t total)
{
	struct prog *p = opaque;
	CHECK(done >= p->last && done <= total, "progress %llu of %llu after %llu",
	      (unsigned long long)done, (unsigned long long)total, (unsigned long long)p->last);
	p->calls++;
	p->last = done;
	p->total = total;
}

static void test_commit(void)
{
	uint8_t *before = view(top_path);
	qk_image *top = open_img(top_path, QK_OPEN_RDWR | QK_OPEN_FORCE_SHARE);
	qk_image *base = open_img(base_path, QK_OPEN_RDWR);
	struct qk_commit_options o;
	struct prog p = { 0 };
	qk_commit_options_init(&o);
	o.flags = QK_COMMIT_EMPTY;
	o.progress = on_progress;
	o.progress_opaque = &p;
	CHECK_EQ(qk_commit(top, qk_get_backing(top), base, &o), 0, "commit");
	CHECK(p.calls >= 2 && p.last == SIZE && p.total == SIZE, "progress reached the end: %llu "
	      "calls, %llu of %llu", (unsigned long long)p.calls, (unsigned long long)p.last,
	      (unsigned long long)p.total);
	struct qk_extent e;
	CHECK_EQ(qk_block_status(top, 0, SIZE, &e), 0, "block status");
	CHECK(e.length == SIZE && !(e.depth == 0 && (e.flags & QK_EXTENT_PRESENT)),
	      "the emptied top allocates nothing (first run %llu bytes, depth %u)",
	      (unsigned long long)e.length, e.depth);
	CHECK_EQ(qk_close(base), 0, "close base");
	CHECK_EQ(qk_close(top), 0, "close top");
	uint8_t *after = view(top_path), *b = view(base_path);
	CHECK(memcmp(before, after, SIZE) == 0, "the top reads as before");
	CHECK(memcmp(before, b, SIZE) == 0, "the base reads as the top did");
	free(before);
	free(after);
	free(b);
}

static void test_set_backing(void)
{
	char long_name[1100];
	qk_image *ro = open_img(top_path, QK_OPEN_FORCE_SHARE);
	CHECK_EQ(qk_set_backing(ro, "x", "qcow2"), -EPERM, "read-only");
	qk_close(ro);
	qk_image *raw = open_img(raw_path, QK_OPEN_RDWR);
	CHECK_EQ(qk_set_backing(raw, "x", "qcow2"), -ENOTSUP, "raw");
	qk_close(raw);
	qk_image *top = open_img(top_path, QK_OPEN_RDWR);
	memset(long_name, 'a', 1024);
	long_name[1024] = '\0';
	CHECK_EQ(qk_set_backing(top, long_name, "qcow2"), -EINVAL, "a 1024-byte name");
	CHECK_EQ(qk_set_backing(top, "base.qcow2", "a-format-too-long"), -EINVAL, "a long format");
	CHECK_EQ(qk_set_backing(top, "other-name.qcow2", "raw"), 0, "set");
	qk_close(top);
	top = open_img(top_path, QK_OPEN_RDWR | QK_OPEN_NO_BACKING);
	struct qk_info info = { .struct_size = sizeof info };
	CHECK_EQ(qk_get_info(top, &info), 0, "info");
	CHECK_STR(info.backing_file ? info.backing_file : "(none)", "other-name.qcow2", "name");
	CHECK_STR(info.backing_format ? info.backing_format : "(none)", "raw", "format");
	CHECK_EQ(qk_set_backing(top, "base.qcow2", "qcow2"), 0, "set back");
	qk_close(top);
}

static void test_rebase(void)
{
	char long_name[1100];
	uint8_t *before = view(top_path);
	qk_image *top = open_img(top_path, QK_OPEN_RDWR), *nb = open_img(raw_path, 0);
	struct qk_rebase_options o;
	qk_rebase_options_init(&o);
	o.flags = 0x80;
	CHECK_EQ(qk_rebase(top, NULL, "", NULL, &o), -EINVAL, "unknown flags");
	CHECK_EQ(qk_rebase(top, nb, NULL, NULL, NULL), -EINVAL, "a new backing file without name");
	CHECK_EQ(qk_rebase(NULL, NULL, "", NULL, NULL), -EINVAL, "no image");
	/* the header step refuses: the message is qk_rebase's */
	memset(long_name, 'b', 1024);
	long_name[1024] = '\0';
	o.flags = QK_REBASE_UNSAFE;
	CHECK_EQ(qk_rebase(top, NULL, long_name, "qcow2", &o), -EINVAL, "a 1024-byte name");
	CHECK(starts_with(qk_last_error(), "qk_rebase: "), "message names qk_rebase: %s",
	      qk_last_error());
	qk_close(nb);
	/* onto nothing: everything the base showed is copied in */
	CHECK_EQ(qk_rebase(top, NULL, "", NULL, NULL), 0, "rebase onto nothing");
	qk_close(top);
	top = open_img(top_path, 0);
	CHECK(qk_get_backing(top) == NULL, "no backing file any more");
	qk_close(top);
	uint8_t *after = view(top_path);
	CHECK(memcmp(before, after, SIZE) == 0, "the guest view is unchanged");
	free(before);
	free(after);
}

int main(void)
{
	snprintf(dir, sizeof dir, "/tmp/qk-commit.XXXXXX");
	if (!mkdtemp(dir))
		qb_die("mkdtemp");
	snprintf(base_path, sizeof base_path, "%s/base.qcow2", dir);
	snprintf(top_path, sizeof top_path, "%s/top.qcow2", dir);
	snprintf(raw_path, sizeof raw_path, "%s/other.raw", dir);
	make_images();
	test_commit_refusals();
	test_set_backing();
	test_commit();
	/* the top again, over the committed base, then rebased onto nothing */
	qk_image *t = open_img(top_path, QK_OPEN_RDWR);
	uint8_t buf[4096];
	memset(buf, 0x5c, sizeof buf);
	die_on(qk_pwrite(t, buf, sizeof buf, 300 << 10), "write top");
	qk_close(t);
	test_rebase();
	unlink(base_path);
	unlink(top_path);
	unlink(raw_path);
	rmdir(dir);
	return tap_done();
}
