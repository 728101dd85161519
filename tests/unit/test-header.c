/*
 * test-header: QCOW2 open (lib/qcow2/header.c) and format probing
 * (lib/image.c) on the memory backend. Valid images across versions,
 * cluster sizes and features must open and describe themselves through
 * qk_get_info; each malformed header must be refused with the documented
 * errno and a one-line message naming the problem.
 */
#include "tap.h"

static void opts_for(struct qk_open_options *o, qk_format fmt, uint32_t flags)
{
	qk_open_options_init(o);
	o->format = fmt;
	o->flags = flags;
}

/* Check that the last error is one line "qk_open: ..." mentioning kw. */
static void check_message(const char *what, const char *kw)
{
	const char *m = qk_last_error();
	CHECK(tap_one_line(m), "%s: last error is not one non-empty line: \"%s\"", what, m);
	CHECK(strncmp(m, "qk_open: ", 9) == 0, "%s: message lacks the API name: \"%s\"", what, m);
	CHECK(tap_contains(m, kw), "%s: message does not mention \"%s\": \"%s\"", what, kw, m);
}

/* ---- valid images ---------------------------------------------------------------- */

static void test_options_init(void)
{
	struct qk_open_options o;
	memset(&o, 0xff, sizeof o);
	qk_open_options_init(&o);
	CHECK_EQ(o.struct_size, sizeof o, "options struct_size");
	CHECK_EQ(o.format, QK_FORMAT_AUTO, "options format");
	CHECK_EQ(o.flags, 0, "options flags");
	CHECK_EQ(o.l2_cache_size, 0, "options l2_cache_size");
	CHECK_EQ(o.max_chain_depth, 0, "options max_chain_depth");
}

/* Every version and cluster size, both with detection and forced qcow2,
 * with features varied by cluster size. */
static void test_valid_matrix(void)
{
	for (uint32_t v = 2; v <= 3; v++) {
		for (uint32_t cb = 9; cb <= 21; cb++) {
			for (int f = 0; f < 2; f++) {
				char what[96];
				snprintf(what, sizeof what, "v%u cluster_bits %u %s", v, cb,
					 f ? "qcow2" : "auto");
				uint64_t size = (100ull << 20) + 4096 * cb;
				struct qb b;
				qb_init(&b, v, cb, size);
				bool extl2 = v == 3 && cb >= 14 && cb % 2 == 0;
				uint32_t comp = v == 3 && cb % 3 == 0 ? QK_COMPRESSION_ZSTD : QK_COMPRESSION_ZLIB;
				uint32_t order = v == 3 ? cb % 7 : 4;
				uint64_t compat = v == 3 && cb % 2 ? COMPAT_LAZY_REFCOUNTS : 0;
				if (v == 3) {
					b.extl2 = extl2;
					b.compression = comp;
					b.refcount_order = order;
					b.compat = compat;
				}
				qb_layout(&b);
				qb_normal(&b, 0);
				qb_normal(&b, (size - 1) / b.cs);
				qb_finish(&b);

				struct qk_open_options o;
				opts_for(&o, f ? QK_FORMAT_QCOW2 : QK_FORMAT_AUTO, 0);
				qk_image *img;
				int ret = qb_open(&b, &o, &img);
				CHECK(ret == 0, "%s: open failed: %d %s", what, ret, qk_last_error());
				if (ret == 0) {
					struct qk_info info = { .struct_size = sizeof info };
					memset(&info, 0xa5, sizeof info);
					info.struct_size = sizeof info;
					ret = qk_get_info(img, &info);
					CHECK(ret == 0, "%s: qk_get_info failed: %d", what, ret);
					CHECK_EQ(qk_get_format(img), QK_FORMAT_QCOW2, what);
					CHECK_EQ(qk_get_size(img), size, what);
					CHECK_STR(qk_get_filename(img), "mem.qcow2", what);
					CHECK(qk_get_backing(img) == NULL, "%s: backing", what);
					CHECK_EQ(info.format, QK_FORMAT_QCOW2, what);
					CHECK_EQ(info.virtual_size, size, what);
					CHECK_EQ(info.file_size, b.len, what);
					CHECK_EQ(info.actual_size, b.len, what);
					CHECK_EQ(info.cluster_size, 1u << cb, what);
					CHECK_EQ(info.qcow2_version, v, what);
					CHECK_EQ(info.refcount_bits, 1u << order, what);
					CHECK_EQ(info.compression_type, comp, what);
					CHECK_EQ(info.incompatible_features,
						 (extl2 ? INCOMPAT_EXTL2 : 0) | (comp ? INCOMPAT_COMPRESSION : 0), what);
					CHECK_EQ(info.compatible_features, compat, what);
					CHECK_EQ(info.autoclear_features, 0, what);
					CHECK_EQ(info.dirty, 0, what);
					CHECK_EQ(info.corrupt, 0, what);
					CHECK_EQ(info.lazy_refcounts, compat != 0, what);
					CHECK_EQ(info.extended_l2, extl2, what);
					CHECK_EQ(info.data_file_raw, 0, what);
					CHECK_EQ(info.bitmaps_consistent, 0, what);
					CHECK_EQ(info.encrypted, 0, what);
					CHECK(info.backing_file == NULL && info.full_backing_file == NULL &&
					      info.backing_format == NULL && info.data_file == NULL,
					      "%s: unexpected names", what);
					CHECK_EQ(info.nb_snapshots, 0, what);
					CHECK_EQ(info.nb_bitmaps, 0, what);
					/* And the data reads back, first and last cluster. */
					uint8_t got[256], want[256];
					qb_pat_fill(want, sizeof want, 0);
					CHECK(qk_pread(img, got, sizeof got, 0) == 0 &&
					      memcmp(got, want, sizeof got) == 0, "%s: first bytes", what);
					qb_pat_fill(want, sizeof want, size - sizeof want);
					CHECK(qk_pread(img, got, sizeof got, size - sizeof got) == 0 &&
					      memcmp(got, want, sizeof got) == 0, "%s: last bytes", what);
					CHECK_EQ(qk_close(img), 0, what);
				}
				qb_free(&b);
			}
		}
	}
}

/* Build the base image used by the feature tests: v3, 64 KiB clusters. */
static void base(struct qb *b)
{
	qb_init(b, 3, 16, 64ull << 20);
}

static void finish(struct qb *b)
{
	qb_layout(b);
	qb_normal(b, 0);
	qb_finish(b);
}

static int open_info(struct qb *b, uint32_t flags, qk_image **img, struct qk_info *info)
{
	struct qk_open_options o;
	opts_for(&o, QK_FORMAT_AUTO, flags);
	int ret = qb_open(b, &o, img);
	if (ret == 0) {
		ret = qk_get_info(*img, info);
		if (ret < 0) {
			qk_close(*img);
			*img = NULL;
		}
	}
	return ret;
}

static void test_feature_bits(void)
{
	struct qb b;
	qk_image *img;
	struct qk_info info = { .struct_size = sizeof info };
	int ret;

	/* Dirty: read-only opens work as they are. */
	base(&b);
	b.incompat = INCOMPAT_DIRTY;
	b.compat = COMPAT_LAZY_REFCOUNTS;
	finish(&b);
	ret = open_info(&b, 0, &img, &info);
	CHECK(ret == 0, "dirty read-only open: %d %s", ret, qk_last_error());
	if (ret == 0) {
		CHECK_EQ(info.dirty, 1, "dirty flag");
		CHECK_EQ(info.lazy_refcounts, 1, "lazy flag");
		CHECK_EQ(info.incompatible_features, INCOMPAT_DIRTY, "dirty incompat");
		qk_close(img);
	}
	/* Read-write rebuilds the refcounts and clears the bit, as QEMU. */
	ret = open_info(&b, QK_OPEN_RDWR, &img, &info);
	CHECK(ret == 0, "dirty read-write open rebuilds: %d %s", ret, qk_last_error());
	if (ret == 0) {
		CHECK_EQ(info.dirty, 0, "dirty bit cleared after the rebuild");
		CHECK_EQ(qk_close(img), 0, "close after the rebuild");
	}
	qb_free(&b);

	/* Corrupt: read-only works, read-write is -EACCES. */
	base(&b);
	b.incompat = INCOMPAT_CORRUPT;
	finish(&b);
	ret = open_info(&b, 0, &img, &info);
	CHECK(ret == 0, "corrupt read-only open: %d %s", ret, qk_last_error());
	if (ret == 0) {
		CHECK_EQ(info.corrupt, 1, "corrupt flag");
		CHECK_EQ(info.dirty, 0, "corrupt image not dirty");
		qk_close(img);
	}
	ret = open_info(&b, QK_OPEN_RDWR, &img, &info);
	CHECK(ret == -EACCES, "corrupt read-write open: got %d, want -EACCES", ret);
	check_message("corrupt read-write", "corrupt");
	qb_free(&b);

	/* A clean image opens read-write. */
	base(&b);
	finish(&b);
	ret = open_info(&b, QK_OPEN_RDWR, &img, &info);
	CHECK(ret == 0, "clean read-write open: %d %s", ret, qk_last_error());
	if (ret == 0)
		qk_close(img);
	qb_free(&b);

	/* Unknown compatible and autoclear bits are ignored (and reported). */
	base(&b);
	b.compat = 0x8000000000000002ull;
	b.autoclear = 0x0000010000000004ull;
	finish(&b);
	ret = open_info(&b, 0, &img, &info);
	CHECK(ret == 0, "unknown compat/autoclear bits: %d %s", ret, qk_last_error());
	if (ret == 0) {
		CHECK_EQ(info.compatible_features, 0x8000000000000002ull, "compat bits");
		CHECK_EQ(info.autoclear_features, 0x0000010000000004ull, "autoclear bits");
		CHECK_EQ(info.lazy_refcounts, 0, "no lazy refcounts");
		CHECK_EQ(info.bitmaps_consistent, 0, "bitmaps bit clear");
		CHECK_EQ(info.data_file_raw, 0, "raw data bit clear");
		qk_close(img);
	}
	qb_free(&b);

	/* The known incompatible bits together (no data file). */
	base(&b);
	b.extl2 = true;
	b.compression = QK_COMPRESSION_ZSTD;
	b.incompat = INCOMPAT_DIRTY | INCOMPAT_CORRUPT;
	finish(&b);
	ret = open_info(&b, 0, &img, &info);
	CHECK(ret == 0, "all known incompat bits: %d %s", ret, qk_last_error());
	if (ret == 0) {
		CHECK_EQ(info.incompatible_features, 0x1b, "incompat bits");
		CHECK_EQ(info.extended_l2, 1, "extended L2");
		CHECK_EQ(info.compression_type, QK_COMPRESSION_ZSTD, "zstd");
		qk_close(img);
	}
	qb_free(&b);
}

static void test_header_lengths(void)
{
	static const uint32_t lengths[] = { 104, 112, 120, 256, 4096 };
	for (size_t i = 0; i < sizeof lengths / sizeof lengths[0]; i++) {
		struct qb b;
		char what[64];
		snprintf(what, sizeof what, "header_length %u", lengths[i]);
		base(&b);
		b.header_length = lengths[i];
		b.backing_fmt = "qcow2";
		b.backing_file = "base.qcow2";
		finish(&b);
		/* Unknown bytes after the compression type must be ignored. */
		for (uint32_t p = 112; p < lengths[i]; p++)
			b.buf[p] = 0x5a;
		struct qk_open_options o;
		opts_for(&o, QK_FORMAT_AUTO, QK_OPEN_NO_BACKING);
		qk_image *img;
		int ret = qb_open(&b, &o, &img);
		CHECK(ret == 0, "%s: %d %s", what, ret, qk_last_error());
		if (ret == 0) {
			struct qk_info info = { .struct_size = sizeof info };
			CHECK_EQ(qk_get_info(img, &info), 0, what);
			CHECK_EQ(info.compression_type, 0, what);
			CHECK_STR(info.backing_format, "qcow2", what);
			CHECK_STR(info.backing_file, "base.qcow2", what);
			qk_close(img);
		}
		qb_free(&b);
	}
}

static void test_backing_names(void)
{
	struct qb b;
	qk_image *img;
	struct qk_open_options o;
	int ret;

	/* Relative name resolved against the image's directory. */
	for (uint32_t v = 2; v <= 3; v++) {
		qb_init(&b, v, 16, 1 << 20);
		b.backing_file = "base image.raw";
		b.backing_fmt = "raw";
		finish(&b);
		opts_for(&o, QK_FORMAT_AUTO, QK_OPEN_NO_BACKING);
		ret = qb_open_named(&b, "some/dir/top.qcow2", &o, &img);
		CHECK(ret == 0, "v%u backing names: %d %s", v, ret, qk_last_error());
		if (ret == 0) {
			struct qk_info info = { .struct_size = sizeof info };
			CHECK_EQ(qk_get_info(img, &info), 0, "info");
			CHECK_STR(info.backing_file, "base image.raw", "backing_file");
			CHECK_STR(info.full_backing_file, "some/dir/base image.raw", "full_backing_file");
			CHECK_STR(info.backing_format, "raw", "backing_format");
			CHECK(qk_get_backing(img) == NULL, "no backing opened with NO_BACKING");
			qk_close(img);
		}
		qb_free(&b);
	}

	/* Absolute name, no format extension; maximum length 1023. */
	qb_init(&b, 3, 16, 1 << 20);
	char longname[1024];
	longname[0] = '/';
	memset(longname + 1, 'n', sizeof longname - 2);
	longname[sizeof longname - 1] = '\0';
	b.backing_file = longname;
	finish(&b);
	opts_for(&o, QK_FORMAT_QCOW2, QK_OPEN_NO_BACKING);
	ret = qb_open_named(&b, "x/top.qcow2", &o, &img);
	CHECK(ret == 0, "absolute backing name: %d %s", ret, qk_last_error());
	if (ret == 0) {
		struct qk_info info = { .struct_size = sizeof info };
		CHECK_EQ(qk_get_info(img, &info), 0, "info");
		CHECK_STR(info.backing_file, longname, "backing_file 1023 bytes");
		CHECK_STR(info.full_backing_file, longname, "full_backing_file absolute");
		CHECK(info.backing_format == NULL, "no backing format");
		qk_close(img);
	}
	qb_free(&b);

	/* Backing format name of the maximum length (15). */
	qb_init(&b, 3, 12, 1 << 20);
	b.backing_file = "b";
	b.backing_fmt = "fifteen-chars-x";
	finish(&b);
	opts_for(&o, QK_FORMAT_AUTO, QK_OPEN_NO_BACKING);
	ret = qb_open(&b, &o, &img);
	CHECK(ret == 0, "15-byte backing format: %d %s", ret, qk_last_error());
	if (ret == 0) {
		struct qk_info info = { .struct_size = sizeof info };
		CHECK_EQ(qk_get_info(img, &info), 0, "info");
		CHECK_STR(info.backing_format, "fifteen-chars-x", "backing_format");
		qk_close(img);
	}
	qb_free(&b);
}

static void test_extensions_valid(void)
{
	struct qb b;
	qk_image *img;
	int ret;
	uint8_t junk[20] = "unknown-extension!!";

	for (uint32_t v = 2; v <= 3; v++) {
		qb_init(&b, v, 9, 1 << 20);
		qb_add_ext(&b, 0x12345678u, junk, sizeof junk);
		qb_add_feature_name(&b, 0, 4, "extended L2 entries");
		qb_add_ext(&b, 0xdeadbeefu, junk, 0);
		b.backing_fmt = "qcow2";
		b.backing_file = "base.qcow2";
		finish(&b);
		struct qk_open_options o;
		opts_for(&o, QK_FORMAT_AUTO, QK_OPEN_NO_BACKING);
		ret = qb_open(&b, &o, &img);
		CHECK(ret == 0, "v%u unknown extensions skipped: %d %s", v, ret, qk_last_error());
		if (ret == 0) {
			struct qk_info info = { .struct_size = sizeof info };
			CHECK_EQ(qk_get_info(img, &info), 0, "info");
			CHECK_STR(info.backing_format, "qcow2", "backing_format after unknown extensions");
			CHECK_EQ(info.qcow2_version, v, "version");
			qk_close(img);
		}
		qb_free(&b);
	}

	/* No end marker: extensions run to the end of cluster 0 (all zero
	 * there, which reads as an end marker anyway). */
	base(&b);
	b.no_end_marker = true;
	qb_add_ext(&b, 0x12345678u, junk, 8);
	finish(&b);
	ret = qb_open(&b, NULL, &img);
	CHECK(ret == 0, "no end marker: %d %s", ret, qk_last_error());
	if (ret == 0)
		qk_close(img);
	qb_free(&b);
}

static void test_snapshots(void)
{
	struct qb b;
	qk_image *img;
	struct qk_info info = { .struct_size = sizeof info };
	int ret;

	qb_init(&b, 3, 16, 8 << 20);
	qb_add_snapshot(&b, "1", "first", 24);
	qb_add_snapshot(&b, "2", "second snapshot", 16);
	qb_add_snapshot(&b, "17", "x", 40);
	finish(&b);
	ret = open_info(&b, 0, &img, &info);
	CHECK(ret == 0, "snapshots: %d %s", ret, qk_last_error());
	if (ret == 0) {
		CHECK_EQ(info.nb_snapshots, 3, "snapshot count");
		const struct qk_snapshot *s;
		size_t n;
		CHECK_EQ(qk_list_snapshots(img, &s, &n), 0, "list snapshots");
		CHECK_EQ(n, 3, "listed snapshots");
		if (n == 3) {
			CHECK_STR(s[0].id, "1", "snapshot 0 id");
			CHECK_STR(s[0].name, "first", "snapshot 0 name");
			CHECK_STR(s[1].name, "second snapshot", "snapshot 1 name");
			CHECK_STR(s[2].id, "17", "snapshot 2 id");
			CHECK_EQ(s[0].disk_size, 8 << 20, "snapshot disk size");
			CHECK_EQ(s[0].icount, 0, "snapshot 0 icount");
			CHECK_EQ(s[1].icount, UINT64_MAX, "snapshot 1 icount absent");
			CHECK_EQ(s[1].date_sec, 1700000001u, "snapshot 1 date");
			CHECK_EQ(s[2].vm_clock_nsec, 10000000000ull, "snapshot 2 clock");
			CHECK_EQ(s[0].l1_table_offset, b.l1_off, "snapshot L1 offset");
		}
		qk_close(img);
	}
	qb_free(&b);

	/* Version 2 snapshot without extra data. */
	qb_init(&b, 2, 12, 8 << 20);
	qb_add_snapshot(&b, "1", "old", 0);
	finish(&b);
	ret = open_info(&b, 0, &img, &info);
	CHECK(ret == 0, "v2 snapshot: %d %s", ret, qk_last_error());
	if (ret == 0) {
		CHECK_EQ(info.nb_snapshots, 1, "v2 snapshot count");
		qk_close(img);
	}
	qb_free(&b);
}

static void test_bitmaps(void)
{
	struct qb b;
	qk_image *img;
	struct qk_info info = { .struct_size = sizeof info };
	int ret;

	base(&b);
	qb_add_bitmap(&b, "b0", 16, BM_FLAG_AUTO);
	qb_add_bitmap(&b, "bitmap-two", 20, BM_FLAG_IN_USE);
	finish(&b);
	ret = open_info(&b, 0, &img, &info);
	CHECK(ret == 0, "bitmaps: %d %s", ret, qk_last_error());
	if (ret == 0) {
		CHECK_EQ(info.nb_bitmaps, 2, "bitmap count");
		CHECK_EQ(info.bitmaps_consistent, 1, "bitmaps autoclear bit");
		const struct qk_bitmap *m;
		size_t n;
		CHECK_EQ(qk_list_bitmaps(img, &m, &n), 0, "list bitmaps");
		CHECK_EQ(n, 2, "listed bitmaps");
		if (n == 2) {
			CHECK_STR(m[0].name, "b0", "bitmap 0 name");
			CHECK_EQ(m[0].granularity, 65536, "bitmap 0 granularity");
			CHECK_EQ(m[0].flags, QK_BITMAP_AUTO, "bitmap 0 flags");
			CHECK_STR(m[1].name, "bitmap-two", "bitmap 1 name");
			CHECK_EQ(m[1].flags, QK_BITMAP_IN_USE, "bitmap 1 flags");
		}
		qk_close(img);
	}
	/* Without the autoclear bit the extension is not trusted. */
	qb_put64(&b, HDR_AUTOCLEAR, 0);
	ret = open_info(&b, 0, &img, &info);
	CHECK(ret == 0, "stale bitmaps: %d %s", ret, qk_last_error());
	if (ret == 0) {
		CHECK_EQ(info.nb_bitmaps, 0, "stale bitmaps are ignored");
		CHECK_EQ(info.bitmaps_consistent, 0, "no autoclear bit");
		qk_close(img);
	}
	qb_free(&b);
}

static void test_odd_valid(void)
{
	struct qb b;
	qk_image *img;
	struct qk_info info = { .struct_size = sizeof info };
	int ret;

	/* Empty image: size 0, no L1 entries. */
	qb_init(&b, 3, 16, 0);
	qb_layout(&b);
	qb_finish(&b);
	ret = open_info(&b, 0, &img, &info);
	CHECK(ret == 0, "empty image: %d %s", ret, qk_last_error());
	if (ret == 0) {
		CHECK_EQ(info.virtual_size, 0, "empty size");
		uint8_t c;
		CHECK_EQ(qk_pread(img, &c, 0, 0), 0, "zero-length read of an empty image");
		CHECK_EQ(qk_pread(img, &c, 1, 0), (uint64_t)-EINVAL, "read past the end of an empty image");
		qk_close(img);
	}
	qb_free(&b);

	/* An L1 table larger than the size needs. */
	qb_init(&b, 3, 12, 1 << 20);
	b.l1_size = 4000;
	finish(&b);
	ret = open_info(&b, 0, &img, &info);
	CHECK(ret == 0, "oversized L1: %d %s", ret, qk_last_error());
	if (ret == 0)
		qk_close(img);
	qb_free(&b);

	/* Largest L1 the limit allows (4 Mi entries, 32 MiB). */
	qb_init(&b, 3, 21, 1 << 20);
	b.l1_size = 4u << 20;
	finish(&b);
	ret = open_info(&b, 0, &img, &info);
	CHECK(ret == 0, "L1 at the limit: %d %s", ret, qk_last_error());
	if (ret == 0)
		qk_close(img);
	qb_free(&b);

	/* A size that is not a multiple of 512. */
	qb_init(&b, 3, 16, 1000001);
	finish(&b);
	ret = open_info(&b, 0, &img, &info);
	CHECK(ret == 0, "odd size: %d %s", ret, qk_last_error());
	if (ret == 0) {
		CHECK_EQ(info.virtual_size, 1000001, "odd size");
		qk_close(img);
	}
	qb_free(&b);

	/* A qcow2 file opened as raw when the format is forced. */
	base(&b);
	finish(&b);
	struct qk_open_options o;
	opts_for(&o, QK_FORMAT_RAW, 0);
	ret = qb_open(&b, &o, &img);
	CHECK(ret == 0, "qcow2 forced raw: %d %s", ret, qk_last_error());
	if (ret == 0) {
		CHECK_EQ(qk_get_info(img, &info), 0, "raw info");
		CHECK_EQ(info.format, QK_FORMAT_RAW, "raw format");
		CHECK_EQ(info.virtual_size, b.len, "raw size is the file size");
		CHECK_EQ(info.cluster_size, 0, "raw cluster size");
		CHECK_EQ(info.qcow2_version, 0, "raw version");
		CHECK_STR(qk_format_name(info.format), "raw", "raw name");
		qk_close(img);
	}
	qb_free(&b);
	CHECK_STR(qk_format_name(QK_FORMAT_QCOW2), "qcow2", "qcow2 name");
}

/* ---- invalid images ------------------------------------------------------------------ */

struct bad {
	const char *name;
	int err;               /* expected positive errno */
	const char *kw;        /* the message mentions this */
	uint32_t flags;        /* open flags */
	uint32_t max_depth;
	bool qcow2_only;       /* detection would (rightly) read it as raw */
};

/* Build invalid image number i into b and describe it; false past the end. */
static bool bad_case(int i, struct qb *b, struct bad *c)
{
	memset(c, 0, sizeof *c);
	base(b);
	c->err = EINVAL;
	switch (i) {
	case 0:
		c->name = "version 1 (qcow)"; c->err = ENOTSUP; c->kw = "version";
		finish(b); qb_put32(b, HDR_VERSION, 1);
		break;
	case 1:
		c->name = "version 4"; c->err = ENOTSUP; c->kw = "version";
		finish(b); qb_put32(b, HDR_VERSION, 4);
		break;
	case 2:
		c->name = "version 0"; c->err = ENOTSUP; c->kw = "version";
		finish(b); qb_put32(b, HDR_VERSION, 0);
		break;
	case 3:
		c->name = "cluster_bits 8"; c->kw = "cluster";
		finish(b); qb_put32(b, HDR_CLUSTER_BITS, 8);
		break;
	case 4:
		c->name = "cluster_bits 22"; c->kw = "cluster";
		finish(b); qb_put32(b, HDR_CLUSTER_BITS, 22);
		break;
	case 5:
		c->name = "cluster_bits 64"; c->kw = "cluster";
		finish(b); qb_put32(b, HDR_CLUSTER_BITS, 64);
		break;
	case 6:
		c->name = "v2 cluster_bits 0"; c->kw = "cluster";
		b->version = 2; finish(b); qb_put32(b, HDR_CLUSTER_BITS, 0);
		break;
	case 7:
		c->name = "header_length 96"; c->kw = "header";
		b->header_length = 96; finish(b);
		break;
	case 8:
		c->name = "header_length past the cluster"; c->kw = "cluster size";
		finish(b); qb_put32(b, HDR_HEADER_LENGTH, 65544);
		break;
	case 9:
		c->name = "header_length 108"; c->kw = "header length";
		finish(b); qb_put32(b, HDR_HEADER_LENGTH, 108);
		break;
	case 10:
		c->name = "AES encryption"; c->err = ENOTSUP; c->kw = "encrypt";
		b->crypt_method = CRYPT_AES; finish(b);
		break;
	case 11:
		c->name = "LUKS encryption"; c->err = ENOTSUP; c->kw = "encrypt";
		b->crypt_method = CRYPT_LUKS; finish(b);
		break;
	case 12:
		c->name = "v2 unknown encryption"; c->err = ENOTSUP; c->kw = "encrypt";
		b->version = 2; b->crypt_method = 7; finish(b);
		break;
	case 13:
		c->name = "unknown incompatible bit 5"; c->err = ENOTSUP; c->kw = "bit 5";
		b->incompat = 1ull << 5; finish(b);
		break;
	case 14:
		c->name = "named unknown incompatible bit 40"; c->err = ENOTSUP; c->kw = "frobnicator";
		b->incompat = 1ull << 40;
		qb_add_feature_name(b, 0, 40, "frobnicator");
		finish(b);
		break;
	case 15:
		c->name = "unknown incompatible bit 63"; c->err = ENOTSUP; c->kw = "incompatible";
		b->incompat = 1ull << 63; finish(b);
		break;
	case 16:
		c->name = "compression type 2"; c->err = ENOTSUP; c->kw = "compression";
		b->compression = 2; finish(b);
		break;
	case 17:
		c->name = "compression bit with zlib"; c->kw = "compression";
		b->incompat = INCOMPAT_COMPRESSION; finish(b);
		break;
	case 18:
		c->name = "zstd without the compression bit"; c->kw = "compression";
		finish(b); b->buf[HDR_COMPRESSION_TYPE] = 1;
		break;
	case 19:
		c->name = "extended L2 with 8 KiB clusters"; c->kw = "extended L2";
		b->cluster_bits = 13; b->extl2 = true; finish(b);
		break;
	case 20:
		c->name = "refcount order 7"; c->kw = "refcount";
		b->refcount_order = 7; finish(b);
		break;
	case 21:
		c->name = "no refcount table"; c->kw = "reference count table";
		finish(b); qb_put32(b, HDR_RT_CLUSTERS, 0);
		break;
	case 22:
		c->name = "unaligned refcount table"; c->kw = "reference count table";
		finish(b); qb_put64(b, HDR_RT_OFFSET, b->rt_off + 512);
		break;
	case 23:
		c->name = "refcount table at offset 0"; c->kw = "reference count table";
		finish(b); qb_put64(b, HDR_RT_OFFSET, 0);
		break;
	case 24:
		c->name = "refcount table too large"; c->err = EFBIG; c->kw = "reference count table";
		finish(b); qb_put32(b, HDR_RT_CLUSTERS, 129);
		break;
	case 25:
		c->name = "L1 too large"; c->err = EFBIG; c->kw = "L1";
		finish(b); qb_put32(b, HDR_L1_SIZE, (4u << 20) + 1);
		break;
	case 26:
		c->name = "L1 too small"; c->kw = "L1";
		finish(b); qb_put32(b, HDR_L1_SIZE, 0);
		break;
	case 27:
		c->name = "unaligned L1"; c->kw = "L1";
		finish(b); qb_put64(b, HDR_L1_OFFSET, b->l1_off + 8);
		break;
	case 28:
		c->name = "L1 past the end of the file"; c->kw = "L1";
		finish(b); qb_put64(b, HDR_L1_OFFSET, 1ull << 40);
		break;
	case 29:
		c->name = "L1 at offset 0"; c->kw = "L1";
		finish(b); qb_put64(b, HDR_L1_OFFSET, 0);
		break;
	case 30:
		c->name = "virtual size 2^63"; c->err = EFBIG; c->kw = "size";
		finish(b); qb_put64(b, HDR_SIZE, 1ull << 63);
		break;
	case 31:
		c->name = "extension overflows cluster 0"; c->kw = "extension";
		qb_add_ext_raw(b, 0x12345678u, 0x10000, "abc", 3); finish(b);
		break;
	case 32:
		c->name = "truncated extension header"; c->kw = "extension";
		finish(b);
		qb_put64(b, HDR_BACKING_OFFSET, 116);
		qb_put32(b, HDR_BACKING_SIZE, 4);
		memcpy(b->buf + 116, "base", 4);
		qb_put32(b, 112, EXT_BACKING_FMT);
		break;
	case 33:
		c->name = "two backing format extensions"; c->kw = "extension";
		c->flags = QK_OPEN_NO_BACKING;
		b->backing_fmt = "raw"; b->backing_file = "base";
		qb_add_ext(b, EXT_BACKING_FMT, "qcow2", 5);
		finish(b);
		break;
	case 34:
		c->name = "backing format of 16 bytes"; c->kw = "backing format";
		c->flags = QK_OPEN_NO_BACKING;
		b->backing_fmt = "sixteen-chars-xx"; b->backing_file = "base";
		finish(b);
		break;
	case 35:
		c->name = "backing name of 1024 bytes"; c->kw = "backing file";
		c->flags = QK_OPEN_NO_BACKING;
		b->backing_file = "base"; finish(b);
		qb_put32(b, HDR_BACKING_SIZE, 1024);
		break;
	case 36:
		c->name = "backing name past cluster 0"; c->kw = "backing file";
		c->flags = QK_OPEN_NO_BACKING;
		b->backing_file = "base"; finish(b);
		qb_put64(b, HDR_BACKING_OFFSET, 65536 - 2);
		break;
	case 37:
		c->name = "backing name inside the header"; c->kw = "backing file";
		c->flags = QK_OPEN_NO_BACKING;
		b->backing_file = "base"; finish(b);
		qb_put64(b, HDR_BACKING_OFFSET, 40);
		break;
	case 38:
		c->name = "backing name with a newline"; c->kw = "control character";
		c->flags = QK_OPEN_NO_BACKING;
		b->backing_file = "evil\nname"; finish(b);
		break;
	case 39:
		c->name = "bad magic"; c->kw = "magic"; c->qcow2_only = true;
		finish(b); qb_put32(b, HDR_MAGIC, 0x514649fa);
		break;
	case 40:
		c->name = "file of 60 bytes"; c->kw = "short";
		finish(b); b->len = 60;
		break;
	case 41:
		c->name = "file ends inside the header"; c->kw = "truncated";
		finish(b); qb_put32(b, HDR_HEADER_LENGTH, 256); b->len = 200;
		break;
	case 42:
		c->name = "too many snapshots"; c->err = EFBIG; c->kw = "snapshots";
		qb_add_snapshot(b, "1", "a", 16); finish(b);
		qb_put32(b, HDR_NB_SNAPSHOTS, 65537);
		break;
	case 43:
		c->name = "unaligned snapshot table"; c->kw = "snapshot";
		qb_add_snapshot(b, "1", "a", 16); finish(b);
		qb_put64(b, HDR_SNAPSHOTS_OFFSET, b->snap_off + 8);
		break;
	case 44:
		c->name = "snapshot extra data 1025 bytes"; c->err = EFBIG; c->kw = "extra data";
		qb_add_snapshot(b, "1", "a", 16); finish(b);
		qb_put32(b, b->snap_off + 36, 1025);
		break;
	case 45:
		c->name = "snapshot table past the end"; c->kw = "snapshot";
		qb_add_snapshot(b, "1", "a", 16); finish(b);
		qb_put32(b, HDR_NB_SNAPSHOTS, 3000);
		break;
	case 46:
		c->name = "raw data bit without a data file"; c->kw = "external data";
		b->autoclear = AUTOCLEAR_DATA_RAW; finish(b);
		break;
	case 47:
		/* A read-write open needs the data file at once; a read-only
		 * one at the first guest read (test_data_file_lazy). */
		c->name = "data file bit without a name"; c->kw = "external data file";
		c->flags = QK_OPEN_RDWR;
		b->incompat = INCOMPAT_DATA_FILE; finish(b);
		break;
	case 48:
		c->name = "data file name of length 0"; c->kw = "external data file";
		b->incompat = INCOMPAT_DATA_FILE;
		qb_add_ext(b, EXT_DATA_FILE, "", 0); finish(b);
		break;
	case 49:
		c->name = "bitmaps extension too short"; c->kw = "bitmaps";
		b->autoclear = AUTOCLEAR_BITMAPS;
		qb_add_ext(b, EXT_BITMAPS, "0123456789abcdef", 16); finish(b);
		break;
	case 50: {
		c->name = "bitmaps extension with no bitmaps"; c->kw = "bitmaps";
		uint8_t e[24] = { 0 };
		qk_put_be64(e + 8, 32);
		qk_put_be64(e + 16, 65536);
		b->autoclear = AUTOCLEAR_BITMAPS;
		qb_add_ext(b, EXT_BITMAPS, e, sizeof e); finish(b);
		break;
	}
	case 51: {
		c->name = "unaligned bitmap directory"; c->kw = "bitmap directory";
		uint8_t e[24] = { 0 };
		qk_put_be32(e, 1);
		qk_put_be64(e + 8, 32);
		qk_put_be64(e + 16, 65536 + 8);
		b->autoclear = AUTOCLEAR_BITMAPS;
		qb_add_ext(b, EXT_BITMAPS, e, sizeof e); finish(b);
		break;
	}
	case 52:
		c->name = "backing chain deeper than the limit"; c->err = ELOOP; c->kw = "chain";
		c->max_depth = 1;
		b->backing_file = "base.qcow2"; b->backing_fmt = "qcow2"; finish(b);
		break;
	case 53:
		c->name = "backing file over the network"; c->err = ENOTSUP; c->kw = "nbd://";
		b->backing_file = "nbd://localhost/export"; finish(b);
		break;
	case 54:
		c->name = "backing format vmdk"; c->err = ENOTSUP; c->kw = "vmdk";
		b->backing_file = "base.vmdk"; b->backing_fmt = "vmdk"; finish(b);
		break;
	case 55:
		c->name = "missing backing file"; c->err = ENOENT; c->kw = "no-such-dir";
		b->backing_file = "/no-such-dir/qk-unit-base.img"; b->backing_fmt = "raw"; finish(b);
		break;
	case 56:
		c->name = "dirty and corrupt image read-write"; c->err = EACCES; c->kw = "corrupt";
		c->flags = QK_OPEN_RDWR;
		b->incompat = INCOMPAT_DIRTY | INCOMPAT_CORRUPT; finish(b);
		break;
	case 57:
		c->name = "corrupt image read-write"; c->err = EACCES; c->kw = "corrupt";
		c->flags = QK_OPEN_RDWR;
		b->incompat = INCOMPAT_CORRUPT; finish(b);
		break;
	case 59:
		c->name = "backing name in json: syntax"; c->err = ENOTSUP; c->kw = "not a local file";
		b->backing_file = "json:{\"file.filename\":\"base\"}"; finish(b);
		break;
	case 60:
		c->name = "more bitmaps than the directory holds"; c->kw = "bitmap directory";
		qb_add_bitmap(b, "b0", 16, 0);
		qb_add_bitmap(b, "b1", 16, 0);
		finish(b);
		/* The bitmaps extension is the last one written: count at +8. */
		for (uint32_t p = 112; p < 4096; p += 8)
			if (qk_be32(b->buf + p) == EXT_BITMAPS) {
				qb_put32(b, p + 8, 3);
				break;
			}
		break;
	case 61:
		c->name = "bitmap with an empty name"; c->kw = "bitmap directory";
		qb_add_bitmap(b, "b0", 16, 0);
		finish(b);
		for (uint32_t p = 112; p < 4096; p += 8)
			if (qk_be32(b->buf + p) == EXT_BITMAPS) {
				qb_put16(b, qk_be64(b->buf + p + 8 + 16) + 18, 0);
				break;
			}
		break;
	case 58:
		c->name = "backing format name with a control character"; c->kw = "control character";
		c->flags = QK_OPEN_NO_BACKING;
		b->backing_file = "base"; b->backing_fmt = "raw\x01"; finish(b);
		break;
	default:
		qb_free(b);
		return false;
	}
	return true;
}

static void test_invalid(void)
{
	int n = 0;
	for (int i = 0;; i++) {
		struct qb b;
		struct bad c;
		if (!bad_case(i, &b, &c))
			break;
		n++;
		for (int f = 0; f < 2; f++) {
			if (c.qcow2_only && f == 0)
				continue;
			char what[160];
			snprintf(what, sizeof what, "invalid #%d %s (%s)", i, c.name, f ? "qcow2" : "auto");
			struct qk_open_options o;
			opts_for(&o, f ? QK_FORMAT_QCOW2 : QK_FORMAT_AUTO, c.flags);
			o.max_chain_depth = c.max_depth;
			qk_image *img = NULL;
			int ret = qb_open(&b, &o, &img);
			CHECK(ret == -c.err, "%s: got %d, want %d (%s) [%s]", what, ret, -c.err,
			      strerror(c.err), qk_last_error());
			if (ret == 0 && img)
				qk_close(img);
			if (getenv("QK_TEST_VERBOSE"))
				printf("%s: %d %s\n", what, ret, qk_last_error());
			if (ret < 0) {
				CHECK_EQ(qk_last_errno(), c.err, what);
				check_message(what, c.kw);
			}
		}
		qb_free(&b);
	}
	CHECK(n >= 20, "only %d invalid headers", n);
}

/* A bad magic is raw for detection; a short or empty file too. */
static void test_detection_raw(void)
{
	struct qb b;
	base(&b);
	finish(&b);
	qb_put32(&b, HDR_MAGIC, 0x514649fa);
	qk_image *img;
	int ret = qb_open(&b, NULL, &img);
	CHECK(ret == 0, "bad magic detected as raw: %d %s", ret, qk_last_error());
	if (ret == 0) {
		CHECK_EQ(qk_get_format(img), QK_FORMAT_RAW, "bad magic format");
		qk_close(img);
	}
	b.len = 3;   /* "QFI" */
	ret = qb_open(&b, NULL, &img);
	CHECK(ret == 0, "3-byte file detected as raw: %d %s", ret, qk_last_error());
	if (ret == 0) {
		/* Raw images are whole 512-byte sectors, as in QEMU. */
		CHECK_EQ(qk_get_size(img), 512, "3-byte raw size");
		uint8_t sector[512], want[512] = { 'Q', 'F', 'I' };
		CHECK(qk_pread(img, sector, 512, 0) == 0 && memcmp(sector, want, 512) == 0,
		      "3-byte raw file reads as one sector with a zero tail");
		qk_close(img);
	}
	b.len = 0;
	ret = qb_open(&b, NULL, &img);
	CHECK(ret == 0, "empty file detected as raw: %d %s", ret, qk_last_error());
	if (ret == 0) {
		CHECK_EQ(qk_get_format(img), QK_FORMAT_RAW, "empty file format");
		CHECK_EQ(qk_get_size(img), 0, "empty raw size");
		qk_close(img);
	}
	qb_free(&b);
}

/* ---- probing ---------------------------------------------------------------------------- */

struct foreign {
	const char *name;      /* the message must mention it */
	size_t off;
	size_t len;
	const char *magic;
};

static const struct foreign foreigns[] = {
	{ "vmdk", 0, 4, "KDMV" },
	{ "vmdk", 0, 4, "COWD" },
	{ "vmdk", 0, 21, "# Disk DescriptorFile" },
	{ "vdi", 0x40, 4, "\x7f\x10\xda\xbe" },
	{ "vdi", 0, 39, "<<< Oracle VM VirtualBox Disk Image >>>" },
	{ "vhd", 0, 8, "conectix" },
	{ "vhdx", 0, 8, "vhdxfile" },
	{ "qed", 0, 4, "QED\0" },
	{ "luks", 0, 6, "LUKS\xba\xbe" },
	{ "android sparse", 0, 4, "\x3a\xff\x26\xed" },
	{ "zstd", 0, 4, "\x28\xb5\x2f\xfd" },
	{ "gzip", 0, 3, "\x1f\x8b\x08" },
	{ "xz", 0, 6, "\xfd" "7zXZ\0" },
	{ "qcow (version 1)", 0, 8, "QFI\xfb\0\0\0\1" },
};

static void test_probe(void)
{
	uint8_t buf[512];
	qk_format fmt;
	int ret;

	for (size_t i = 0; i < sizeof foreigns / sizeof foreigns[0]; i++) {
		const struct foreign *m = &foreigns[i];
		memset(buf, 0, sizeof buf);
		memcpy(buf + m->off, m->magic, m->len);
		for (int j = 64; j < 512; j++)
			buf[j] = (uint8_t)(j * 7);
		if (m->off == 0x40)
			memcpy(buf + m->off, m->magic, m->len);
		qk__api_enter("qk__probe");
		fmt = QK_FORMAT_AUTO;
		ret = qk__probe(buf, sizeof buf, 1 << 20, &fmt);
		CHECK(ret == -ENOTSUP, "probe %s: got %d, want -ENOTSUP", m->name, ret);
		CHECK(fmt == QK_FORMAT_AUTO, "probe %s: format set on refusal", m->name);
		const char *msg = qk_last_error();
		CHECK(tap_one_line(msg) && tap_contains(msg, m->name),
		      "probe %s: message does not name the format: \"%s\"", m->name, msg);
		CHECK_EQ(qk_last_errno(), ENOTSUP, m->name);

		/* Opening refuses it too; forcing raw reads its bytes. */
		struct qb b;
		memset(&b, 0, sizeof b);
		b.buf = buf;
		b.len = sizeof buf;
		qk_image *img;
		ret = qb_open(&b, NULL, &img);
		CHECK(ret == -ENOTSUP, "open %s: got %d, want -ENOTSUP", m->name, ret);
		CHECK(tap_contains(qk_last_error(), m->name), "open %s: message \"%s\"",
		      m->name, qk_last_error());
		struct qk_open_options o;
		opts_for(&o, QK_FORMAT_RAW, 0);
		ret = qb_open(&b, &o, &img);
		CHECK(ret == 0, "open %s forced raw: %d %s", m->name, ret, qk_last_error());
		if (ret == 0) {
			uint8_t got[512];
			CHECK(qk_pread(img, got, sizeof got, 0) == 0 && memcmp(got, buf, sizeof got) == 0,
			      "%s forced raw: bytes", m->name);
			qk_close(img);
		}
	}

	/* Short buffers: a magic cut short is not recognised. */
	qk__api_enter("qk__probe");
	ret = qk__probe((const uint8_t *)"conecti", 7, 7, &fmt);
	CHECK(ret == 0 && fmt == QK_FORMAT_RAW, "probe of a cut VHD magic: %d", ret);

	/* All zeros and random bytes are raw. */
	memset(buf, 0, sizeof buf);
	fmt = QK_FORMAT_AUTO;
	ret = qk__probe(buf, sizeof buf, 1 << 20, &fmt);
	CHECK(ret == 0 && fmt == QK_FORMAT_RAW, "zero buffer: %d fmt %d", ret, fmt);
	ret = qk__probe(buf, 0, 0, &fmt);
	CHECK(ret == 0 && fmt == QK_FORMAT_RAW, "empty buffer: %d fmt %d", ret, fmt);
	uint64_t seed = 0x1234567887654321ull;
	for (int round = 0; round < 1000; round++) {
		for (size_t j = 0; j < sizeof buf; j += 8) {
			uint64_t r = tap_rand(&seed);
			memcpy(buf + j, &r, 8);
		}
		fmt = QK_FORMAT_AUTO;
		qk__api_enter("qk__probe");
		ret = qk__probe(buf, sizeof buf, 1 << 20, &fmt);
		if (ret != 0 || fmt != QK_FORMAT_RAW) {
			CHECK(0, "random buffer %d: %d fmt %d (%s)", round, ret, fmt, qk_last_error());
			break;
		}
	}
	CHECK(1, "random buffers");

	/* QCOW2 itself. */
	for (uint32_t v = 2; v <= 3; v++) {
		memset(buf, 0, sizeof buf);
		qk_put_be32(buf, QCOW2_MAGIC);
		qk_put_be32(buf + 4, v);
		fmt = QK_FORMAT_AUTO;
		ret = qk__probe(buf, sizeof buf, 1 << 20, &fmt);
		CHECK(ret == 0 && fmt == QK_FORMAT_QCOW2, "probe qcow2 v%u: %d fmt %d", v, ret, fmt);
	}
	qk_put_be32(buf + 4, 4);
	qk__api_enter("qk__probe");
	ret = qk__probe(buf, sizeof buf, 1 << 20, &fmt);
	CHECK(ret == -ENOTSUP && tap_contains(qk_last_error(), "version 4"),
	      "probe qcow2 v4: %d %s", ret, qk_last_error());
}

int main(void)
{
	tap_watchdog(120);
	test_options_init();
	test_valid_matrix();
	test_feature_bits();
	test_header_lengths();
	test_backing_names();
	test_extensions_valid();
	test_snapshots();
	test_bitmaps();
	test_odd_valid();
	test_invalid();
	test_detection_raw();
	test_probe();
	return tap_done();
}
