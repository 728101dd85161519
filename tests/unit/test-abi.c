/*
 * test-abi.c - the struct_size policy of qcowkit.h: a sized struct below
 * its first version is refused with -EINVAL; the library reads and writes
 * no byte past the caller's struct_size; a newer caller's larger struct is
 * accepted (its extra bytes are neither read nor written); the version
 * macros and qk_version() agree.
 */
#include "tap.h"

#include <stdalign.h>

/* A caller's struct of `size` bytes followed by canary bytes. */
struct padded {
	alignas(8) uint8_t bytes[512];
};

static qk_image *open_image(struct qb *b)
{
	qk_image *img = NULL;
	qb_init(b, 3, 16, 1 << 20);
	qb_layout(b);
	qb_normal(b, 0);
	qb_finish(b);
	CHECK(qb_open(b, NULL, &img) == 0, "open: %s", qk_last_error());
	return img;
}

static void test_info(qk_image *img)
{
	struct padded p;
	struct qk_info *info = (struct qk_info *)p.bytes;

	memset(&p, 0x5a, sizeof p);
	info->struct_size = 0;
	CHECK(qk_get_info(img, info) == -EINVAL, "info: struct_size 0 refused");
	CHECK(tap_contains(qk_last_error(), "struct_size 0"), "info: message names it: %s",
	      qk_last_error());

	/* An older, shorter struct: only its bytes are written. */
	uint32_t small = (uint32_t)offsetof(struct qk_info, nb_bitmaps) + 4;
	memset(&p, 0x5a, sizeof p);
	info->struct_size = small;
	CHECK(qk_get_info(img, info) == 0, "info: first-version size: %s", qk_last_error());
	CHECK(info->struct_size == small, "info: struct_size kept");
	CHECK(info->virtual_size == 1 << 20, "info: virtual size %llu",
	      (unsigned long long)info->virtual_size);
	bool canary = true;
	for (size_t i = small; i < sizeof p; i++)
		canary &= p.bytes[i] == 0x5a;
	CHECK(canary, "info: nothing written past struct_size");

	/* A newer caller's larger struct. */
	memset(&p, 0x5a, sizeof p);
	info->struct_size = sizeof p;
	CHECK(qk_get_info(img, info) == 0, "info: larger struct: %s", qk_last_error());
	canary = true;
	for (size_t i = sizeof *info; i < sizeof p; i++)
		canary &= p.bytes[i] == 0x5a;
	CHECK(canary, "info: a newer caller's fields are not ours to write");
}

static void test_check_result(qk_image *img)
{
	struct padded p;
	struct qk_check_result *res = (struct qk_check_result *)p.bytes;
	memset(&p, 0x5a, sizeof p);
	res->struct_size = 8;
	CHECK(qk_check(img, 0, res, NULL, NULL) == -EINVAL, "check: short struct refused");
	memset(&p, 0x5a, sizeof p);
	res->struct_size = sizeof *res;
	CHECK(qk_check(img, 0, res, NULL, NULL) == 0, "check: %s", qk_last_error());
	/* (The builder leaves refcounts out: what matters is that the result
	 * reached the caller's struct.) */
	CHECK(res->allocated_clusters == 1 && res->total_clusters == 16,
	      "check: results (%llu allocated, %llu total)", (unsigned long long)res->allocated_clusters,
	      (unsigned long long)res->total_clusters);
	bool canary = true;
	for (size_t i = sizeof *res; i < sizeof p; i++)
		canary &= p.bytes[i] == 0x5a;
	CHECK(canary, "check: nothing written past struct_size");
}

static void test_options(void)
{
	struct qk_open_options o;
	qk_image *img;
	qk_open_options_init(&o);
	CHECK(o.struct_size == sizeof o, "open options: init sets struct_size");
	o.struct_size = 4;
	CHECK(qk_open("/nonexistent", &o, &img) == -EINVAL &&
	      tap_contains(qk_last_error(), "qk_open_options"),
	      "open options: below the first version refused: %s", qk_last_error());

	struct qk_create_options c;
	qk_create_options_init(&c);
	CHECK(c.struct_size == sizeof c, "create options: init sets struct_size");
	c.struct_size = 16;
	CHECK(qk_create("/nonexistent-dir/x.qcow2", &c) == -EINVAL &&
	      tap_contains(qk_last_error(), "qk_create_options"),
	      "create options: below the first version refused: %s", qk_last_error());
}

/* qk_amend's options: sized as the others; a read-only handle refused. */
static void test_amend_options(qk_image *img)
{
	struct qk_amend_options a;
	qk_amend_options_init(&a);
	CHECK(a.struct_size == sizeof a && a.fields == 0, "amend options: init");
	a.struct_size = 8;
	CHECK(qk_amend(img, &a) == -EINVAL && tap_contains(qk_last_error(), "qk_amend_options"),
	      "amend options: below the first version refused: %s", qk_last_error());
	qk_amend_options_init(&a);
	a.fields = 1u << 31;
	CHECK(qk_amend(img, &a) == -EINVAL, "amend options: unknown field refused");
	a.fields = QK_AMEND_LAZY_REFCOUNTS;
	a.lazy_refcounts = 1;
	CHECK(qk_amend(img, &a) == -EPERM && tap_contains(qk_last_error(), "qk_amend: "),
	      "amend: a read-only handle refused: %s", qk_last_error());
}

static void test_version(void)
{
	char want[32];
	snprintf(want, sizeof want, "%d.%d.%d", QK_VERSION_MAJOR, QK_VERSION_MINOR, QK_VERSION_PATCH);
	CHECK_STR(qk_version(), want, "qk_version()");
	CHECK_STR(QK_VERSION_STRING, want, "QK_VERSION_STRING");
	CHECK_EQ(qk_version_number(), QK_VERSION_NUMBER, "qk_version_number()");
}

int main(void)
{
	struct qb b;
	qk_image *img = open_image(&b);
	if (img) {
		test_info(img);
		test_check_result(img);
		test_amend_options(img);
		qk_close(img);
	}
	qb_free(&b);
	test_options();
	test_version();
	return tap_done();
}
