/*
 * test-snapshots: the internal snapshot calls of the public API on real
 * files: ids as QEMU allocates them, unique names, lookups by id then
 * name, a snapshot opened read-only shows the disk as it was, apply brings
 * it back, and every refusal (read-only handle, raw image, duplicate name,
 * unknown snapshot, no room in 1-bit refcounts) changes nothing and says
 * why in one line. The content and layout are checked against qemu-img by
 * tests/interop/snapshots.sh.
 */
#include "tap.h"

static char dir[256];

static char *path_of(const char *name)
{
	static char p[2][300];
	static int k;
	k ^= 1;
	snprintf(p[k], sizeof p[k], "%s/%s", dir, name);
	return p[k];
}

static qk_image *open_img(const char *name, uint32_t flags, const char *snapshot)
{
	struct qk_open_options o;
	qk_open_options_init(&o);
	o.flags = flags;
	o.snapshot = snapshot;
	qk_image *img = NULL;
	int ret = qk_open(path_of(name), &o, &img);
	CHECK(ret == 0, "open %s%s%s: %s", name, snapshot ? " snapshot " : "",
	      snapshot ? snapshot : "", qk_last_error());
	return img;
}

static void make(const char *name, uint64_t size, uint32_t refcount_bits, qk_format fmt)
{
	struct qk_create_options o;
	qk_create_options_init(&o);
	o.size = size;
	o.format = fmt;
	if (refcount_bits)
		o.refcount_bits = refcount_bits;
	CHECK(qk_create(path_of(name), &o) == 0, "create %s: %s", name, qk_last_error());
}

static void fill(qk_image *img, uint8_t byte, uint64_t off, size_t len)
{
	uint8_t *buf = malloc(len);
	memset(buf, byte, len);
	CHECK(qk_pwrite(img, buf, len, off) == 0, "write 0x%x at %llu: %s", byte,
	      (unsigned long long)off, qk_last_error());
	free(buf);
}

static bool holds(qk_image *img, uint8_t byte, uint64_t off, size_t len)
{
	uint8_t *buf = malloc(len);
	bool ok = qk_pread(img, buf, len, off) == 0;
	for (size_t i = 0; ok && i < len; i++)
		ok = buf[i] == byte;
	free(buf);
	return ok;
}

static size_t count(qk_image *img, const struct qk_snapshot **l)
{
	size_t n = 0;
	CHECK(qk_list_snapshots(img, l, &n) == 0, "list: %s", qk_last_error());
	return n;
}

static void clean(qk_image *img, const char *when)
{
	struct qk_check_result r = { .struct_size = sizeof r };
	CHECK(qk_flush(img) == 0, "%s: flush: %s", when, qk_last_error());
	CHECK(qk_check(img, 0, &r, NULL, NULL) == 0, "%s: check ran: %s", when, qk_last_error());
	CHECK(r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0,
	      "%s: check clean (%llu corruptions, %llu leaks)", when,
	      (unsigned long long)r.corruptions, (unsigned long long)r.leaks);
}

static void test_ids_and_names(void)
{
	const struct qk_snapshot *l;
	make("ids.qcow2", 1 << 20, 0, QK_FORMAT_QCOW2);
	qk_image *img = open_img("ids.qcow2", 0, NULL);
	CHECK_EQ(qk_snapshot_create(img, "a"), -EPERM, "read-only handle refused");
	qk_close(img);

	img = open_img("ids.qcow2", QK_OPEN_RDWR, NULL);
	CHECK_EQ(qk_snapshot_create(img, "a"), 0, "take a");
	CHECK_EQ(qk_snapshot_create(img, "b"), 0, "take b");
	CHECK_EQ(qk_snapshot_create(img, "a"), -EEXIST, "a second 'a' refused");
	CHECK(tap_contains(qk_last_error(), "already has a snapshot named 'a'"), "message: %s",
	      qk_last_error());
	CHECK_EQ(count(img, &l), 2, "two snapshots");
	CHECK_STR(l[0].id, "1", "first id");
	CHECK_STR(l[1].id, "2", "second id");
	CHECK_EQ(l[1].disk_size, 1 << 20, "disk size recorded");
	CHECK_EQ(l[1].icount, 0, "icount as qemu-img records it");
	CHECK_EQ(qk_snapshot_find(img, "2"), 1, "find by id");
	CHECK_EQ(qk_snapshot_find(img, "b"), 1, "find by name");
	CHECK_EQ(qk_snapshot_find(img, "zz"), -ENOENT, "unknown snapshot");
	CHECK_EQ(qk_snapshot_delete(img, NULL, NULL), -EINVAL, "delete needs an id or a name");
	CHECK_EQ(qk_snapshot_delete(img, "1", "b"), -ENOENT, "id and name must both match");
	CHECK_EQ(qk_snapshot_delete(img, NULL, "a"), 0, "delete a by name");
	CHECK_EQ(qk_snapshot_create(img, "c"), 0, "take c");
	CHECK_EQ(count(img, &l), 2, "two snapshots again");
	CHECK_STR(l[1].id, "3", "next id: the largest plus one");
	CHECK_EQ(qk_snapshot_delete(img, "2", NULL), 0, "delete by id");
	clean(img, "after takes and deletes");
	CHECK_EQ(qk_close(img), 0, "close");

	img = open_img("ids.qcow2", 0, NULL);
	CHECK_EQ(count(img, &l), 1, "one snapshot after reopening");
	CHECK_STR(l[0].name, "c", "the one left");
	qk_close(img);
}

static void test_content(void)
{
	make("data.qcow2", 4 << 20, 0, QK_FORMAT_QCOW2);
	qk_image *img = open_img("data.qcow2", QK_OPEN_RDWR, NULL);
	fill(img, 0x11, 0, 1 << 20);
	CHECK_EQ(qk_snapshot_create(img, "one"), 0, "take one");
	fill(img, 0x22, 512 << 10, 1 << 20);
	CHECK_EQ(qk_resize(img, 8 << 20, 0), 0, "grow");
	fill(img, 0x33, 7 << 20, 64 << 10);
	CHECK(holds(img, 0x22, 512 << 10, 1 << 20), "new data reads");
	clean(img, "after copy-on-write of shared clusters");
	CHECK_EQ(qk_close(img), 0, "close");

	qk_image *sn = open_img("data.qcow2", 0, "one");
	CHECK_EQ(qk_get_size(sn), 4 << 20, "the snapshot's size");
	CHECK(holds(sn, 0x11, 0, 1 << 20), "the snapshot's data");
	CHECK(holds(sn, 0, 1 << 20, 3 << 20), "the snapshot's zeros");
	qk_close(sn);
	sn = open_img("data.qcow2", 0, "1");
	CHECK(sn && holds(sn, 0x11, 512 << 10, 512 << 10), "opened by id");
	qk_close(sn);

	struct qk_open_options o;
	qk_open_options_init(&o);
	o.flags = QK_OPEN_RDWR;
	o.snapshot = "one";
	CHECK_EQ(qk_open(path_of("data.qcow2"), &o, &sn), -EINVAL, "a snapshot opens read-only only");
	o.flags = 0;
	o.snapshot = "nope";
	CHECK_EQ(qk_open(path_of("data.qcow2"), &o, &sn), -ENOENT, "unknown snapshot");
	/* A caller built before the field: its struct ends before it, and
	 * whatever follows in memory is not read. */
	struct { struct qk_open_options o; char junk[64]; } old;
	memset(&old, 0x41, sizeof old);
	old.o.struct_size = (uint32_t)offsetof(struct qk_open_options, snapshot);
	old.o.format = QK_FORMAT_AUTO;
	old.o.flags = 0;
	old.o.l2_cache_size = 0;
	old.o.max_chain_depth = 0;
	CHECK_EQ(qk_open(path_of("data.qcow2"), &old.o, &sn), 0, "an older caller opens the active image");
	CHECK_EQ(qk_get_size(sn), 8 << 20, "the active size");
	qk_close(sn);

	img = open_img("data.qcow2", QK_OPEN_RDWR, NULL);
	CHECK_EQ(qk_snapshot_apply(img, "nope"), -ENOENT, "apply an unknown snapshot");
	CHECK(qk_snapshot_apply(img, "one") == 0, "apply one: %s", qk_last_error());
	CHECK_EQ(qk_get_size(img), 4 << 20, "size back");
	CHECK(holds(img, 0x11, 0, 1 << 20) && holds(img, 0, 1 << 20, 3 << 20), "content back");
	fill(img, 0x44, 0, 64 << 10);
	clean(img, "after apply and a write");
	CHECK_EQ(qk_snapshot_delete(img, NULL, "one"), 0, "delete one");
	CHECK(holds(img, 0x44, 0, 64 << 10) && holds(img, 0x11, 64 << 10, 960 << 10),
	      "the active image keeps its data");
	clean(img, "after delete");
	qk_close(img);
}

static void test_refusals(void)
{
	const struct qk_snapshot *l;
	make("raw.img", 1 << 20, 0, QK_FORMAT_RAW);
	qk_image *img = open_img("raw.img", QK_OPEN_RDWR, NULL);
	CHECK_EQ(qk_snapshot_create(img, "a"), -ENOTSUP, "raw images have no snapshots");
	qk_close(img);
	struct qk_open_options o;
	qk_open_options_init(&o);
	o.snapshot = "a";
	CHECK_EQ(qk_open(path_of("raw.img"), &o, &img), -ENOTSUP, "nor snapshots to open");

	/* 1-bit refcounts: a shared cluster cannot be counted. */
	make("one-bit.qcow2", 1 << 20, 1, QK_FORMAT_QCOW2);
	img = open_img("one-bit.qcow2", QK_OPEN_RDWR, NULL);
	fill(img, 0x55, 0, 64 << 10);
	CHECK_EQ(qk_flush(img), 0, "flush");
	CHECK_EQ(qk_snapshot_create(img, "a"), -ERANGE, "no room for a second reference");
	CHECK(tap_contains(qk_last_error(), "refcount_bits=1"), "message: %s", qk_last_error());
	CHECK_EQ(count(img, &l), 0, "no snapshot");
	clean(img, "after the refusal");
	fill(img, 0x66, 0, 4096);
	CHECK(holds(img, 0x66, 0, 4096), "still writable");
	qk_close(img);
}

int main(void)
{
	tap_watchdog(60);
	snprintf(dir, sizeof dir, "%s/qk-snap.XXXXXX", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
	if (strlen(dir) >= sizeof dir - 1 || !mkdtemp(dir)) {
		fprintf(stderr, "cannot make a scratch directory\n");
		return 1;
	}
	test_ids_and_names();
	test_content();
	test_refusals();
	char cmd[300];
	snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
	if (system(cmd) != 0)
		fprintf(stderr, "could not remove %s\n", dir);
	return tap_done();
}
