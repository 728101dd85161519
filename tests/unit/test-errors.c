/*
 * test-errors.c - the whole text of error messages: the API name first,
 * the innermost cause last, an outer frame's context in between
 * (qk__err_prepend), one line without control characters, and the errno
 * of the cause.
 */
#include "tap.h"

static void expect(const char *what, int ret, int err, const char *msg)
{
	CHECK(ret == -err, "%s: returned %d, want %d", what, ret, -err);
	CHECK_EQ(qk_last_errno(), err, what);
	CHECK_STR(qk_last_error(), msg, what);
	CHECK(tap_one_line(qk_last_error()), "%s: not one line", what);
}

static void test_prepend(void)
{
	qk__api_enter("t_api");
	int ret = qk__err(EIO, "the inner cause");
	ret = qk__err_prepend(EINVAL, "the outer context %d", 7);
	expect("prepend over an inner message", ret, EIO, "t_api: the outer context 7: the inner cause");
	ret = qk__err_prepend(EINVAL, "outermost");
	expect("prepend twice", ret, EIO, "t_api: outermost: the outer context 7: the inner cause");

	qk__api_enter("t_api");
	ret = qk__err_prepend(EINVAL, "context alone");
	expect("prepend with nothing recorded", ret, EINVAL, "t_api: context alone");

	/* The first (innermost) message wins over later plain records. */
	qk__api_enter("t_api");
	qk__err(ENOSPC, "first");
	ret = qk__err(EIO, "second");
	CHECK(ret == -EIO, "a later qk__err still returns its own errno");
	CHECK_STR(qk_last_error(), "t_api: first", "innermost wins");
	CHECK_EQ(qk_last_errno(), ENOSPC, "innermost errno");

	/* Names from images never bring control characters along. */
	qk__api_enter("t_api");
	ret = qk__err(EIO, "name 'a\x1b[31mb\nc\td\x7f'");
	expect("control characters", ret, EIO, "t_api: name 'a?[31mb c d?'");
	qk__api_enter("t_api");
	qk__err(EIO, "inner");
	ret = qk__err_prepend(EIO, "ctx \x1b]0;x\x07");
	expect("control characters in a context", ret, EIO, "t_api: ctx ?]0;x?: inner");
}

static void test_public_messages(void)
{
	qk_image *img;
	int ret = qk_open("/nonexistent-dir/x.qcow2", NULL, &img);
	expect("open of a missing file", ret, ENOENT,
	       "qk_open: Could not open '/nonexistent-dir/x.qcow2': No such file or directory");

	/* A raw image: check and forensic say which format they need. */
	struct qb b;
	qb_init(&b, 3, 16, 1 << 20);
	qb_layout(&b);
	qb_finish(&b);
	struct qk_open_options o;
	qk_open_options_init(&o);
	o.format = QK_FORMAT_RAW;
	ret = qb_open_named(&b, "mem.raw", &o, &img);
	CHECK(ret == 0, "raw open: %s", qk_last_error());
	if (ret == 0) {
		struct qk_check_result res = { .struct_size = sizeof res };
		ret = qk_check(img, 0, &res, NULL, NULL);
		expect("check of a raw image", ret, ENOTSUP,
		       "qk_check: This image format does not support checks");
		ret = qk_forensic(img, NULL, NULL);
		expect("forensic without a callback", ret, EINVAL,
		       "qk_forensic: image and callback are required");
		qk_close(img);
	}
	qb_free(&b);
}

static int no_item(void *opaque, const struct qk_forensic_item *it)
{
	(void)opaque;
	(void)it;
	return 0;
}

static void test_forensic_raw(void)
{
	struct qb b;
	qb_init(&b, 3, 16, 1 << 20);
	qb_layout(&b);
	qb_finish(&b);
	struct qk_open_options o;
	qk_open_options_init(&o);
	o.format = QK_FORMAT_RAW;
	qk_image *img;
	int ret = qb_open_named(&b, "mem.raw", &o, &img);
	CHECK(ret == 0, "raw open: %s", qk_last_error());
	if (ret == 0) {
		ret = qk_forensic(img, no_item, NULL);
		expect("forensic of a raw image", ret, ENOTSUP,
		       "qk_forensic: 'mem.raw' is a raw image: forensic reports are for qcow2 images");
		qk_close(img);
	}
	qb_free(&b);
}

/* A dirty lazy-refcounts image opened read-write is rebuilt; when that
 * cannot be done, the message says so first and why after. Here two L2
 * entries share a cluster that 1-bit refcounts cannot count twice. */
static void test_dirty_context(void)
{
	struct qb b;
	qb_init(&b, 3, 16, 1 << 20);
	b.refcount_order = 0;
	b.incompat = INCOMPAT_DIRTY;
	b.compat = COMPAT_LAZY_REFCOUNTS;
	qb_layout(&b);
	uint64_t host = qb_normal(&b, 0);
	qb_normal_at(&b, 1, host);
	qb_finish(&b);
	struct qk_open_options o;
	qk_open_options_init(&o);
	o.flags = QK_OPEN_RDWR;
	qk_image *img = NULL;
	int ret = qb_open(&b, &o, &img);
	char want[256];
	snprintf(want, sizeof want, "qk_open: 'mem.qcow2' is dirty and its refcounts could not be "
		 "rebuilt: image 'mem.qcow2' is corrupt: cluster at 0x%llx has 2 references, more "
		 "than 1-bit refcounts hold; the image is now marked corrupt", (unsigned long long)host);
	expect("dirty image that cannot be rebuilt", ret, EIO, want);
	qk_close(img);
	qb_free(&b);
}

int main(void)
{
	test_prepend();
	test_public_messages();
	test_forensic_raw();
	test_dirty_context();
	return tap_done();
}
