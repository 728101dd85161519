/*
 * test-measure: qk_measure() (lib/measure.c, lib/qcow2/measure.c, raw.c)
 * on the memory backend. The expected numbers are qemu-img 7.2's (its
 * iotests 178 and 190, or `qemu-img measure` run by hand where noted);
 * tests/interop/measure.sh compares with qemu-img over a wide matrix.
 * Here: the arguments and the struct_size policy, the arithmetic without
 * an input, the data of an input counted in the target's clusters
 * (normal, compressed and zero clusters), persistent bitmaps, and a read
 * error on the way named as qemu-img names it.
 */
#include "tap.h"

static struct qk_create_options qcow2_opts(uint64_t size, uint32_t cs)
{
	struct qk_create_options o;

	qk_create_options_init(&o);
	o.size = size;
	o.cluster_size = cs;
	return o;
}

/* Measure `in` (may be NULL) with `o`; 0 or the error. */
static int measure(qk_image *in, const struct qk_create_options *o, struct qk_measure *m)
{
	memset(m, 0, sizeof *m);
	m->struct_size = sizeof *m;
	return qk_measure(in, o, m);
}

static void expect(const char *what, qk_image *in, const struct qk_create_options *o,
		   uint64_t required, uint64_t full)
{
	struct qk_measure m;
	int ret = measure(in, o, &m);

	CHECK(ret == 0, "%s: %d (%s)", what, ret, qk_last_error());
	CHECK_EQ(m.required, required, what);
	CHECK_EQ(m.fully_allocated, full, what);
}

static void expect_error(const char *what, qk_image *in, const struct qk_create_options *o,
			 int err, const char *msg)
{
	struct qk_measure m;
	int ret = measure(in, o, &m);

	CHECK(ret == -err, "%s: returned %d, want %d", what, ret, -err);
	CHECK(strstr(qk_last_error(), msg) != NULL, "%s: message '%s', want '%s'", what,
	      qk_last_error(), msg);
	CHECK(strncmp(qk_last_error(), "qk_measure: ", 12) == 0, "%s: '%s' lacks the API name",
	      what, qk_last_error());
}

static void test_arguments(void)
{
	struct qk_create_options o = qcow2_opts(1 << 20, 65536);
	struct qk_measure m = { .struct_size = sizeof m };

	CHECK(qk_measure(NULL, NULL, &m) == -EINVAL, "no options");
	CHECK(qk_measure(NULL, &o, NULL) == -EINVAL, "no result");
	m.struct_size = sizeof m - 1;
	CHECK(qk_measure(NULL, &o, &m) == -EINVAL, "a result shorter than its first version");
	CHECK(strstr(qk_last_error(), "struct_size") != NULL, "names struct_size: %s", qk_last_error());
	o.struct_size = 8;
	m.struct_size = sizeof m;
	CHECK(qk_measure(NULL, &o, &m) == -EINVAL, "options shorter than their first version");
	o = qcow2_opts(1 << 20, 65536);
	o.format = QK_FORMAT_AUTO;
	expect_error("no target format", NULL, &o, EINVAL, "Unknown file format");
}

static void test_no_input(void)
{
	struct qk_create_options o = qcow2_opts(0, 65536);

	/* iotest 178 */
	expect("qcow2, 0 bytes", NULL, &o, 196608, 196608);
	o.size = 1ull << 30;
	expect("qcow2, 1 GiB", NULL, &o, 393216, 1074135040);
	/* iotest 190 */
	o.size = 10 << 20;
	expect("qcow2, 10 MiB", NULL, &o, 327680, 10813440);
	o.size = 2ull << 40;
	expect("qcow2, 2 TiB", NULL, &o, 335806464, 2199359062016);
	o.cluster_size = 2 << 20;
	expect("qcow2, 2 TiB, 2 MiB clusters", NULL, &o, 18874368, 2199042129920);
	/* qemu-img measure by hand */
	o = qcow2_opts(1000000007, 512);
	o.refcount_bits = 1;
	expect("512 B clusters, 1-bit refcounts", NULL, &o, 16122368, 1016122880);
	o = qcow2_opts(1000000007, 2 << 20);
	o.refcount_bits = 64;
	o.extended_l2 = 1;
	expect("2 MiB clusters, 64-bit refcounts, extended L2", NULL, &o, 10485760, 1010827264);
	o = qcow2_opts(4 << 20, 65536);
	o.preallocation = QK_PREALLOC_FULL;
	expect("full preallocation needs it all", NULL, &o, 4521984, 4521984);
	o.preallocation = QK_PREALLOC_METADATA;
	expect("metadata preallocation is counted anyway", NULL, &o, 327680, 4521984);
	/* qemu-img measure checks less than create does */
	o = qcow2_opts(1ull << 30, 65536);
	o.version = 2;
	o.extended_l2 = 1;
	expect("extended L2 on v2 is measured", NULL, &o, 524288, 1074266112);

	o = qcow2_opts(1000, 0);
	o.format = QK_FORMAT_RAW;
	expect("raw rounds up to a sector", NULL, &o, 1024, 1024);
	o.size = INT64_MAX;
	expect("raw, the largest size", NULL, &o, 1ull << 63, 1ull << 63);
}

static void test_option_errors(void)
{
	struct qk_create_options o = qcow2_opts(1 << 20, 1000);

	expect_error("cluster size", NULL, &o, EINVAL, "Cluster size must be a power of two "
		     "between 512 and 2048k");
	o = qcow2_opts(1 << 20, 8192);
	o.extended_l2 = 1;
	expect_error("extended L2, small clusters", NULL, &o, EINVAL,
		     "cluster sizes of at least 16384 bytes");
	o = qcow2_opts(1 << 20, 65536);
	o.refcount_bits = 3;
	expect_error("refcount width", NULL, &o, EINVAL, "Refcount width must be a power of two");
	o.refcount_bits = 8;
	o.version = 2;
	expect_error("refcount width on v2", NULL, &o, EINVAL, "(use compat=1.1 or greater)");
	o = qcow2_opts(16ull << 40, 512);
	expect_error("too large", NULL, &o, EFBIG, "The image size is too large (try using a "
		     "larger cluster size)");
}

/* A 4 MiB image of 64 KiB clusters (version `version`): data in clusters
 * 0 and 3, a compressed cluster 5, a zero cluster 7 (v3). */
static void build(struct qb *b, uint32_t version)
{
	qb_init(b, version, 16, 4 << 20);
	qb_layout(b);
	qb_normal(b, 0);
	qb_normal(b, 3);
	qb_compressed(b, 5);
	if (version >= 3)
		qb_set_l2(b, 7, QCOW_OFLAG_ZERO, 0);
}

static void test_input(void)
{
	struct qk_create_options o = qcow2_opts(0, 65536);
	struct qk_measure m;
	qk_image *img;
	struct qb b;

	build(&b, 3);
	qb_add_bitmap(&b, "a", 9, BM_FLAG_AUTO);
	qb_add_bitmap(&b, "bb", 16, 0);
	qb_finish(&b);
	if (qb_open(&b, NULL, &img) < 0) {
		CHECK(0, "open: %s", qk_last_error());
		qb_free(&b);
		return;
	}
	/* 3 data clusters of 64 KiB, in the metadata of a 4 MiB image */
	expect("64 KiB target", img, &o, 327680 + 3 * 65536, 4521984);
	o.cluster_size = 4096;
	expect("4 KiB target", img, &o, 24576 + 3 * 65536, 4218880);
	o.cluster_size = 2 << 20;
	expect("2 MiB target: all data in one cluster", img, &o, 10485760 + (2 << 20), 14680064);
	o.cluster_size = 65536;
	o.backing_file = "base.qcow2";
	expect("with a backing file, all of it", img, &o, 4521984, 4521984);
	o.backing_file = NULL;
	o.size = 16ull << 40;
	o.cluster_size = 512;
	expect_error("-o size is still checked", img, &o, EFBIG, "The image size is too large");

	/* bitmap a: 8192 bits, bb: 64 bits; each one cluster and one table
	 * cluster, then one directory cluster */
	o = qcow2_opts(0, 65536);
	CHECK(measure(img, &o, &m) == 0, "bitmaps: %s", qk_last_error());
	CHECK(m.has_bitmaps, "a v3 input and a v3 target have bitmaps");
	CHECK_EQ(m.bitmaps, 5 * 65536, "bitmaps size");
	o.version = 2;
	CHECK(measure(img, &o, &m) == 0 && !m.has_bitmaps, "no bitmaps for a v2 target");
	o = qcow2_opts(0, 0);
	o.format = QK_FORMAT_RAW;
	expect("raw target", img, &o, 4 << 20, 4 << 20);
	CHECK(!m.has_bitmaps, "no bitmaps for a raw target");
	qk_close(img);
	qb_free(&b);

	build(&b, 2);
	qb_finish(&b);
	if (qb_open(&b, NULL, &img) == 0) {
		o = qcow2_opts(0, 65536);
		CHECK(measure(img, &o, &m) == 0 && !m.has_bitmaps, "a v2 input has no bitmaps");
		CHECK_EQ(m.required, 327680 + 3 * 65536, "v2 input");
		qk_close(img);
	}
	qb_free(&b);
}

static void test_read_error(void)
{
	struct qk_create_options o = qcow2_opts(0, 65536);
	qk_image *img;
	struct qb b;

	build(&b, 3);
	/* cluster 9 points past the end of the file */
	qb_set_l2(&b, 9, (1ull << 40) | QCOW_OFLAG_COPIED, 0);
	qb_finish(&b);
	if (qb_open(&b, NULL, &img) == 0) {
		expect_error("metadata pointing outside the file", img, &o, EIO,
			     "qk_measure: Unable to get block status: ");
		qk_close(img);
	} else {
		CHECK(0, "open: %s", qk_last_error());
	}
	qb_free(&b);
}

int main(void)
{
	test_arguments();
	test_no_input();
	test_option_errors();
	test_input();
	test_read_error();
	return tap_done();
}
