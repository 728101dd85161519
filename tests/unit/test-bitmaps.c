/*
 * test-bitmaps: the persistent bitmap calls (qk_bitmap_*) and resize of an
 * image with bitmaps, crash safety first. A sequence of changes (add,
 * writes, merge, disable, clear, enable, remove, add disabled, merge across
 * granularities, resize up and down, flush, close) runs on the fault
 * backend; a first run records every bitmap's bits after each step. Then
 * the power is cut at every write of the sequence, in turn: the writes
 * since the last sync lost; lost, and the write at the cut torn at a
 * sector boundary; or all kept but that write (a process crash). The
 * durable image (each of the three at every write) must open, check with no corruption (leaks allowed), and
 * each bitmap in it must be inconsistent (in use) or hold exactly the bits
 * it had at one of the steps. Also the contract: a read-only handle, a raw
 * image, a version 2 image, unknown names and bad ranges are refused with
 * one-line messages and change nothing. What each change does, bit by
 * bit, is judged against qemu-img by tests/interop/bitmaps-cmd.sh.
 */
#include "tap.h"
#include "support.h"

#include <fcntl.h>
#include <unistd.h>

#define SIZE (4ull * 1048576 + 3000)
#define MAX_STATES 4096

static char dir[256];
static uint8_t *start_buf;
static size_t start_len;
/* "name gran runs..." of every bitmap after every step of the first run. */
static char *states[MAX_STATES];
static size_t n_states;

static char *path_of(const char *name)
{
	static char p[300];
	snprintf(p, sizeof p, "%s/%s", dir, name);
	return p;
}

static void fill(qk_image *img, uint8_t byte, uint64_t off, size_t len)
{
	uint8_t *buf = malloc(len);
	memset(buf, byte, len);
	qk_pwrite(img, buf, len, off);
	free(buf);
}

/* The bits of bitmap `name` as runs, or NULL when it cannot be read. */
static char *signature(qk_image *img, const char *name, uint64_t gran)
{
	size_t cap = 4096, used = 0;
	char *s = malloc(cap);
	uint64_t off = 0, size = qk_get_size(img), len;
	used += (size_t)snprintf(s, cap, "%s %llu %llu:", name, (unsigned long long)gran,
				 (unsigned long long)size);
	while (off < size) {
		int r = qk_bitmap_status(img, name, off, size - off, &len);
		if (r < 0 || len == 0) {
			free(s);
			return NULL;
		}
		if (r) {
			if (cap - used < 64)
				s = realloc(s, cap *= 2);
			used += (size_t)snprintf(s + used, cap - used, " %llu+%llu",
						 (unsigned long long)off, (unsigned long long)len);
		}
		off += len;
	}
	return s;
}

/* Record the bits of every bitmap of img (first run only). */
static void record(qk_image *img)
{
	const struct qk_bitmap *list;
	size_t n;
	if (qk_list_bitmaps(img, &list, &n) < 0)
		return;
	for (size_t i = 0; i < n && n_states < MAX_STATES; i++) {
		char *sig = signature(img, list[i].name, list[i].granularity);
		if (sig)
			states[n_states++] = sig;
	}
}

static bool recorded(const char *sig)
{
	for (size_t i = 0; i < n_states; i++)
		if (strcmp(states[i], sig) == 0)
			return true;
	return false;
}

/* The sequence of changes; errors (after a cut) are ignored. */
static void sequence(qk_image *img, bool rec)
{
	int step = 0;
	for (;; step++) {
		switch (step) {
		case 0: qk_bitmap_add(img, "new", 0, 0); break;
		case 1: fill(img, 0x31, 3 * 1048576 + 100, 300000); break;
		case 2: qk_bitmap_merge(img, "b0", img, "b1"); break;
		case 3: qk_bitmap_disable(img, "b0"); break;
		case 4: qk_bitmap_clear(img, "b1"); break;
		case 5: fill(img, 0x32, 100000, 5000); break;
		case 6: qk_bitmap_enable(img, "b2"); break;
		case 7: qk_bitmap_remove(img, "b1"); break;
		case 8: qk_bitmap_add(img, "fine", 512, QK_BITMAP_ADD_DISABLED); break;
		case 9: qk_bitmap_merge(img, "fine", img, "new"); break;
		case 10: qk_resize(img, SIZE + 1048576, 0); break;
		case 11: fill(img, 0x33, SIZE + 1000, 4096); break;
		case 12: qk_resize(img, SIZE - 524288 - 512, QK_RESIZE_SHRINK); break;
		case 13: qk_flush(img); break;
		default: return;
		}
		if (rec)
			record(img);
	}
}

static int open_mem(const void *bytes, size_t len, struct qk__fault *ft, uint32_t flags,
		    qk_image **img)
{
	struct qk__file *mem, *f;
	struct qk_open_options o;
	qk_open_options_init(&o);
	o.flags = flags;
	qk__api_enter("qk_open");
	int ret = qk__file_open_mem(bytes, len, "bitmaps.qcow2", &mem);
	if (ret == 0 && ft)
		ret = qk__file_open_fault(ft, mem, &f);
	else if (ret == 0)
		f = mem;
	if (ret == 0)
		ret = qk__image_open_file(&qk__mem_host, f, "bitmaps.qcow2", &o, NULL, img);
	return ret;
}

/* Judge the durable image after a cut; `what` names the point. */
static void judge(const void *bytes, size_t len, const char *what)
{
	qk_image *img;
	int ret = open_mem(bytes, len, NULL, QK_OPEN_RDWR | QK_OPEN_CHECK, &img);
	CHECK(ret == 0, "%s: the image opens: %s", what, qk_last_error());
	if (ret < 0)
		return;
	struct qk_check_result res = { .struct_size = sizeof res };
	ret = qk_check(img, 0, &res, NULL, NULL);
	CHECK(ret == 0 && res.corruptions == 0 && res.check_errors == 0,
	      "%s: check: ret %d, %llu corruptions, %llu check errors (%s)", what, ret,
	      (unsigned long long)res.corruptions, (unsigned long long)res.check_errors,
	      qk_last_error());
	const struct qk_bitmap *list;
	size_t n = 0;
	qk_list_bitmaps(img, &list, &n);
	for (size_t i = 0; i < n; i++) {
		if (list[i].flags & QK_BITMAP_IN_USE)
			continue;       /* inconsistent: nothing to say of its bits */
		char *sig = signature(img, list[i].name, list[i].granularity);
		CHECK(sig && recorded(sig), "%s: bitmap '%s' holds bits it never had: %s (%s)", what,
		      list[i].name, sig ? sig : "unreadable", qk_last_error());
		free(sig);
	}
	/* Repaired (stale bitmaps removed, leaks freed), it takes changes. */
	ret = qk_check(img, QK_CHECK_FIX_LEAKS | QK_CHECK_FIX_ERRORS, &res, NULL, NULL);
	CHECK(ret == 0 && res.corruptions == 0 && res.leaks == 0 && res.stale_bitmaps == 0,
	      "%s: check -r all: ret %d, %llu corruptions, %llu leaks, %llu stale", what, ret,
	      (unsigned long long)res.corruptions, (unsigned long long)res.leaks,
	      (unsigned long long)res.stale_bitmaps);
	qk_close(img);
}

static void test_power_cuts(void)
{
	struct qk__fault *ft = qk__fault_new();
	qk_image *img;
	CHECK(open_mem(start_buf, start_len, ft, QK_OPEN_RDWR, &img) == 0, "open: %s", qk_last_error());
	record(img);
	sequence(img, true);
	CHECK(qk_close(img) == 0, "close: %s", qk_last_error());
	uint64_t writes = qk__fault_count(ft, QK__FAULT_WRITE);
	qk__fault_free(ft);
	printf("# %llu writes, %zu states\n", (unsigned long long)writes, n_states);
	CHECK(writes > 20 && n_states > 20, "the sequence writes (%llu writes, %zu states)",
	      (unsigned long long)writes, n_states);
	int failed_before = tap_failed;
	for (uint64_t k = 3; k < 3 * (writes + 1) && tap_failed == failed_before; k++) {
		uint64_t w = k / 3;
		ft = qk__fault_new();
		bool keep = k % 3 == 2;
		qk__fault_cut(ft, w, k % 3 == 1 ? 512 : 0, keep);
		if (open_mem(start_buf, start_len, ft, QK_OPEN_RDWR, &img) == 0) {
			sequence(img, false);
			qk_close(img);
		}
		CHECK(qk__fault_was_cut(ft), "power cut at write %llu happened", (unsigned long long)w);
		size_t len;
		const void *d = qk__fault_durable(ft, &len);
		char what[96];
		snprintf(what, sizeof what, "power cut at write %llu/%llu (%s)", (unsigned long long)w,
			 (unsigned long long)writes, keep ? "process crash" : k % 3 == 1 ? "torn" : "lost");
		void *copy = malloc(len);
		memcpy(copy, d, len);
		judge(copy, len, what);
		free(copy);
		qk__fault_free(ft);
	}
}

/* Refusals: one line, nothing changed. */
static void test_refusals(void)
{
	qk_image *img, *ro, *raw;
	uint64_t len;
	CHECK(open_mem(start_buf, start_len, NULL, 0, &ro) == 0, "open read-only");
	CHECK_EQ(qk_bitmap_add(ro, "x", 0, 0), (uint64_t)-EPERM, "add on a read-only handle");
	CHECK(tap_one_line(qk_last_error()) && tap_contains(qk_last_error(), "qk_bitmap_add: "),
	      "its message: %s", qk_last_error());
	CHECK_EQ(qk_bitmap_status(ro, "b0", 0, SIZE, &len), 0, "status of a read-only handle");
	CHECK_EQ(len, 2 * 1048576, "the clean run before the first write");
	CHECK_EQ(qk_bitmap_status(ro, "b0", 2 * 1048576 + 7, SIZE, &len), 1, "a dirty run");
	CHECK_EQ(len, 131072 - 7, "to the end of its last granule");
	CHECK_EQ(qk_bitmap_status(ro, "b0", qk_get_size(ro), 1, &len), (uint64_t)-EINVAL,
		 "status past the end");
	CHECK_EQ(qk_bitmap_status(ro, "nope", 0, 1, &len), (uint64_t)-ENOENT, "status of no bitmap");
	CHECK(tap_contains(qk_last_error(), "Dirty bitmap 'nope' not found"), "%s", qk_last_error());
	CHECK(open_mem(start_buf, start_len, NULL, QK_OPEN_RDWR, &img) == 0, "open read-write");
	CHECK_EQ(qk_bitmap_add(img, "x", 0, 2), (uint64_t)-EINVAL, "unknown flags");
	CHECK_EQ(qk_bitmap_add(img, "b0", 0, 0), (uint64_t)-EEXIST, "an existing name");
	CHECK(tap_contains(qk_last_error(), "Bitmap already exists: b0"), "%s", qk_last_error());
	CHECK_EQ(qk_bitmap_add(img, "", 0, 0), (uint64_t)-EINVAL, "an empty name");
	CHECK_EQ(qk_bitmap_add(img, "x", 1000, 0), (uint64_t)-EINVAL, "granularity 1000");
	CHECK_EQ(qk_bitmap_add(img, "x", 1ull << 32, 0), (uint64_t)-EINVAL, "granularity 4 GiB");
	CHECK_EQ(qk_bitmap_remove(img, "nope"), (uint64_t)-ENOENT, "remove of no bitmap");
	CHECK_EQ(qk_bitmap_merge(img, "b0", img, "nope"), (uint64_t)-ENOENT, "merge of no bitmap");
	CHECK_EQ(qk_bitmap_merge(img, "b0", NULL, "b1"), (uint64_t)-EINVAL, "merge of no image");
	CHECK_EQ(qk_bitmap_merge(img, "b0", ro, "b1"), 0, "merge from another handle");
	const struct qk_bitmap *list;
	size_t n;
	CHECK(qk_list_bitmaps(img, &list, &n) == 0 && n == 3, "still three bitmaps (%zu)", n);
	/* A resize refused, before or after the bitmaps were marked for it,
	 * leaves the disabled one consistent and as it was. */
	char *before = signature(img, "b2", 65536);
	CHECK_EQ(qk_resize(img, 0, QK_RESIZE_SHRINK), (uint64_t)-ENOTSUP, "resize to 0 with bitmaps");
	CHECK(qk_resize(img, 1ull << 61, 0) < 0, "resize past the L1 table's limit");
	CHECK(qk_list_bitmaps(img, &list, &n) == 0 && n == 3 && !(list[2].flags & QK_BITMAP_IN_USE),
	      "b2 not left in use (flags 0x%x)", n == 3 ? list[2].flags : 0u);
	char *after = signature(img, "b2", 65536);
	CHECK(before && after && strcmp(before, after) == 0, "b2 unchanged: %s / %s", before, after);
	free(before);
	free(after);
	qk_close(img);
	qk_close(ro);

	struct qk_create_options o;
	qk_create_options_init(&o);
	o.size = SIZE;
	o.format = QK_FORMAT_RAW;
	CHECK(qk_create(path_of("raw.img"), &o) == 0, "create raw");
	struct qk_open_options oo;
	qk_open_options_init(&oo);
	oo.flags = QK_OPEN_RDWR;
	CHECK(qk_open(path_of("raw.img"), &oo, &raw) == 0, "open raw");
	CHECK_EQ(qk_bitmap_add(raw, "x", 0, 0), (uint64_t)-ENOTSUP, "add to a raw image");
	CHECK_EQ(qk_bitmap_clear(raw, "x"), (uint64_t)-ENOENT, "clear in a raw image");
	qk_close(raw);
	o.format = QK_FORMAT_QCOW2;
	o.version = 2;
	CHECK(qk_create(path_of("v2.qcow2"), &o) == 0, "create v2");
	CHECK(qk_open(path_of("v2.qcow2"), &oo, &raw) == 0, "open v2");
	CHECK_EQ(qk_bitmap_add(raw, "x", 0, 0), (uint64_t)-ENOTSUP, "add to a version 2 image");
	CHECK(tap_contains(qk_last_error(), "Cannot store dirty bitmaps in qcow2 v2 files"), "%s",
	      qk_last_error());
	qk_close(raw);
}

/* The start image: data, b0 (64 KiB, enabled), b1 (4 KiB), b2 (disabled)
 * with bits set, made through the library on a real file. */
static void make_start(void)
{
	struct qk_create_options o;
	qk_create_options_init(&o);
	o.size = SIZE;
	CHECK(qk_create(path_of("start.qcow2"), &o) == 0, "create: %s", qk_last_error());
	struct qk_open_options oo;
	qk_open_options_init(&oo);
	oo.flags = QK_OPEN_RDWR;
	qk_image *img;
	CHECK(qk_open(path_of("start.qcow2"), &oo, &img) == 0, "open: %s", qk_last_error());
	fill(img, 0x11, 0, 1048576);
	CHECK(qk_bitmap_add(img, "b0", 0, 0) == 0, "add b0: %s", qk_last_error());
	CHECK(qk_bitmap_add(img, "b1", 4096, 0) == 0, "add b1: %s", qk_last_error());
	CHECK(qk_bitmap_add(img, "b2", 0, QK_BITMAP_ADD_DISABLED) == 0, "add b2: %s", qk_last_error());
	fill(img, 0x12, 2 * 1048576 + 7, 100000);
	CHECK(qk_bitmap_merge(img, "b2", img, "b1") == 0, "merge: %s", qk_last_error());
	fill(img, 0x13, SIZE - 2000, 2000);
	CHECK(qk_close(img) == 0, "close: %s", qk_last_error());
	int fd = open(path_of("start.qcow2"), O_RDONLY);
	off_t end = lseek(fd, 0, SEEK_END);
	start_buf = malloc((size_t)end);
	CHECK(pread(fd, start_buf, (size_t)end, 0) == end, "read the start image");
	start_len = (size_t)end;
	close(fd);
}

int main(void)
{
	tap_watchdog(300);
	snprintf(dir, sizeof dir, "%s/qk-bitmaps.XXXXXX", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
	if (!mkdtemp(dir)) {
		fprintf(stderr, "cannot make a scratch directory\n");
		return 1;
	}
	make_start();
	test_refusals();
	test_power_cuts();
	char cmd[300];
	snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
	if (system(cmd) != 0)
		fprintf(stderr, "could not remove %s\n", dir);
	for (size_t i = 0; i < n_states; i++)
		free(states[i]);
	free(start_buf);
	return tap_done();
}
