/*
 * fuzz-check.c - check, forensic walk and repair of a fuzzed image: check
 * read-only, check -r leaks and check -r all on writable copies. When a
 * repair leaves nothing to fix (its result says no corruptions and no
 * leaks), the repaired bytes, opened again, must check clean: that is the
 * contract of qk_check with fix flags.
 */
#include "fuzz.h"

/* Every report line is a string; looking at it catches a bad format. */
static void report(void *opaque, const char *line)
{
	*(size_t *)opaque += strlen(line);
}

static int count_item(void *opaque, const struct qk_forensic_item *it)
{
	(*(uint64_t *)opaque)++;
	return 0;
}

/* Check the repaired bytes from scratch: they must be clean. */
static void recheck(qk_image *img, const char *what)
{
	size_t len;
	uint8_t *bytes = fuzz_snapshot(img, &len);
	qk_image *again;
	if (!bytes)
		return;
	int ret = fuzz_open(bytes, len, QK_OPEN_CHECK, &again);
	FUZZ_ASSERT(ret == 0, "the image does not open after %s", what);
	struct qk_check_result res = { .struct_size = sizeof res };
	ret = qk_check(again, 0, &res, NULL, NULL);
	FUZZ_ASSERT(ret == 0 && res.corruptions == 0 && res.leaks == 0 && res.check_errors == 0,
		    "after %s that left nothing, check says ret %d, %llu corruptions, "
		    "%llu leaks, %llu check errors", what, ret,
		    (unsigned long long)res.corruptions, (unsigned long long)res.leaks,
		    (unsigned long long)res.check_errors);
	qk_close(again);
	free(bytes);
}

static void repair(const uint8_t *data, size_t size, uint32_t flags, const char *what)
{
	qk_image *img;
	if (fuzz_open(data, size, QK_OPEN_RDWR | QK_OPEN_CHECK, &img) < 0)
		return;
	struct qk_check_result res = { .struct_size = sizeof res };
	size_t chars = 0;
	int ret = qk_check(img, flags, &res, report, &chars);
	if (ret == 0 && qk_flush(img) == 0 && res.corruptions == 0 && res.leaks == 0 &&
	    res.check_errors == 0)
		recheck(img, what);
	qk_close(img);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	qk_image *img;
	if (fuzz_open(data, size, QK_OPEN_CHECK, &img) < 0)
		return 0;
	struct qk_check_result res = { .struct_size = sizeof res };
	size_t chars = 0;
	int ret = qk_check(img, 0, &res, report, &chars);
	uint64_t items = 0;
	(void)qk_forensic(img, count_item, &items);
	qk_close(img);
	if (ret < 0 || (res.corruptions == 0 && res.leaks == 0))
		return 0;
	repair(data, size, QK_CHECK_FIX_LEAKS, "check -r leaks");
	repair(data, size, QK_CHECK_FIX_LEAKS | QK_CHECK_FIX_ERRORS, "check -r all");
	return 0;
}
