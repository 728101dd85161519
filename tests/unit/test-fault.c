/*
 * test-fault: the fault backend (lib/io/fault.c) on a memory file.
 *   - operations are counted per kind (pwrite, set_size, discard and
 *     zero_range are writes);
 *   - the Nth read, write or sync fails with the errno asked for, once or
 *     from then on, changing nothing, with a one-line message;
 *   - the durable image follows completed syncs only; a failed sync
 *     applies nothing;
 *   - a power cut at write N keeps the durable image, lands the whole
 *     sectors of the first bytes asked for of write N (none of a write
 *     shorter than a sector that was not asked for whole), or with
 *     keep_pending every earlier write too, and fails everything after;
 *   - the volatile view is kept when the file closes;
 *   - the metadata cache on a failing disk: when its dirty tables cannot be
 *     written back it still reads other tables (it grows, bounded, and
 *     then returns the write error), keeps the changes, and writes them
 *     once the disk works again.
 */
#include "tap.h"
#include "qcow2/qcow2.h"

static struct qk__file *open_fault(struct qk__fault *ft, size_t len, uint8_t fill)
{
	uint8_t *init = malloc(len);
	struct qk__file *mem, *f = NULL;
	if (!init)
		abort();
	memset(init, fill, len);
	if (qk__file_open_mem(init, len, "fault-test", &mem) < 0 ||
	    qk__file_open_fault(ft, mem, &f) < 0)
		abort();
	free(init);
	return f;
}

static bool all_are(const uint8_t *p, size_t len, uint8_t v)
{
	for (size_t i = 0; i < len; i++)
		if (p[i] != v)
			return false;
	return true;
}

static void test_counts_and_errors(void)
{
	struct qk__fault *ft = qk__fault_new();
	struct qk__file *f = open_fault(ft, 4096, 0x11);
	uint8_t buf[1024];
	memset(buf, 0x22, sizeof buf);
	qk__fault_fail(ft, QK__FAULT_WRITE, 2, ENOSPC, false);
	CHECK_EQ(f->ops->pwrite(f, buf, 512, 0), 0, "write 1");
	qk__api_enter("test");
	CHECK_EQ(f->ops->pwrite(f, buf, 512, 512), (uint64_t)-ENOSPC, "write 2 fails");
	CHECK(tap_one_line(qk_last_error()) && tap_contains(qk_last_error(), strerror(ENOSPC)),
	      "message names the error: %s", qk_last_error());
	CHECK_EQ(f->ops->pwrite(f, buf, 512, 512), 0, "write 3 (once only)");
	CHECK_EQ(f->ops->set_size(f, 8192), 0, "set_size");
	CHECK_EQ(f->ops->discard(f, 0, 512), 0, "discard");
	CHECK_EQ(f->ops->zero_range(f, 512, 512), 0, "zero_range");
	CHECK_EQ(qk__fault_count(ft, QK__FAULT_WRITE), 6, "writes counted, the failed one too");
	qk__fault_fail(ft, QK__FAULT_READ, 2, EIO, true);
	CHECK_EQ(f->ops->pread(f, buf, 16, 0), 0, "read 1");
	CHECK_EQ(f->ops->pread(f, buf, 16, 0), (uint64_t)-EIO, "read 2 fails");
	CHECK_EQ(f->ops->pread(f, buf, 16, 0), (uint64_t)-EIO, "read 3 fails (sticky)");
	qk__fault_fail(ft, QK__FAULT_READ, 0, 0, false);
	CHECK_EQ(f->ops->pread(f, buf, 16, 1024), 0, "reads again when turned off");
	CHECK(all_are(buf, 16, 0x11), "untouched bytes read as before");
	CHECK_EQ(qk__fault_injected(ft), 3, "errors injected");

	/* A failed sync makes nothing durable; a completed one does. */
	size_t len;
	const uint8_t *d = qk__fault_durable(ft, &len);
	CHECK(len == 4096 && all_are(d, 4096, 0x11), "nothing durable before a sync");
	qk__fault_fail(ft, QK__FAULT_SYNC, 1, EIO, false);
	CHECK_EQ(f->ops->sync(f), (uint64_t)-EIO, "sync 1 fails");
	d = qk__fault_durable(ft, &len);
	CHECK(len == 4096 && all_are(d, 4096, 0x11), "a failed sync applies nothing");
	CHECK_EQ(f->ops->sync(f), 0, "sync 2");
	d = qk__fault_durable(ft, &len);
	CHECK_EQ(len, 8192, "set_size durable");
	CHECK(all_are(d, 512, 0) && all_are(d + 512, 512, 0) && all_are(d + 1024, 3072, 0x11) &&
	      all_are(d + 4096, 4096, 0), "discard and zero_range durable as zeros");
	qk__file_close(f);
	const uint8_t *v = qk__fault_volatile(ft, &len);
	CHECK(v && len == 8192 && all_are(v + 1024, 3072, 0x11), "volatile view kept at close");
	qk__fault_free(ft);
}

/* Two writes after a sync, the power cut at the third. */
static void cut_case(uint64_t torn, bool keep, const char *what, size_t third_len,
		     uint64_t third_off, size_t want_third)
{
	struct qk__fault *ft = qk__fault_new();
	struct qk__file *f = open_fault(ft, 8192, 0x11);
	uint8_t a[4096], b[4096];
	memset(a, 0xaa, sizeof a);
	memset(b, 0xbb, sizeof b);
	CHECK_EQ(f->ops->pwrite(f, a, 512, 0), 0, "write 1");
	CHECK_EQ(f->ops->sync(f), 0, "sync");
	CHECK_EQ(f->ops->pwrite(f, a, 512, 512), 0, "write 2");
	qk__fault_cut(ft, 3, torn, keep);
	CHECK_EQ(f->ops->pwrite(f, b, third_len, third_off), (uint64_t)-EIO, "write 3 cut");
	CHECK(qk__fault_was_cut(ft), "%s: cut", what);
	CHECK_EQ(f->ops->pwrite(f, a, 512, 0), (uint64_t)-EIO, "writes fail after the cut");
	CHECK_EQ(f->ops->sync(f), (uint64_t)-EIO, "syncs fail after the cut");
	uint8_t r[16];
	CHECK_EQ(f->ops->pread(f, r, 16, 0), (uint64_t)-EIO, "reads fail after the cut");
	size_t len;
	const uint8_t *d = qk__fault_durable(ft, &len);
	CHECK(all_are(d, 512, 0xaa), "%s: synced write durable", what);
	CHECK(all_are(d + 512, 512, keep ? 0xaa : 0x11), "%s: unsynced write %s", what,
	      keep ? "kept" : "lost");
	CHECK(all_are(d + third_off, want_third, 0xbb) &&
	      all_are(d + third_off + want_third, third_len - want_third, 0x11),
	      "%s: %zu bytes of the cut write landed", what, want_third);
	qk__file_close(f);
	qk__fault_free(ft);
}

static void test_cache_on_failing_disk(void)
{
	struct qk__fault *ft = qk__fault_new();
	struct qk__file *f = open_fault(ft, 128 * 512, 0x11);
	struct qk__cache c;
	void *t;
	int ret;
	CHECK_EQ(qk__cache_init(&c, f, 512, 4, NULL, NULL), 0, "cache init");
	for (uint64_t i = 1; i <= 4; i++) {
		CHECK_EQ(qk__cache_get(&c, i * 512, &t), 0, "get");
		((uint8_t *)t)[0] = (uint8_t)i;
		qk__cache_mark_dirty(&c, i * 512);
		qk__cache_put(&c, i * 512);
	}
	qk__fault_fail(ft, QK__FAULT_WRITE, 1, ENOSPC, true);
	bool reads = true;
	for (uint64_t i = 5; i <= 40; i++) {
		ret = qk__cache_get(&c, i * 512, &t);
		reads = reads && ret == 0 && all_are(t, 512, 0x11);
		if (ret == 0)
			qk__cache_put(&c, i * 512);
	}
	CHECK(reads, "clean tables read while the dirty ones cannot be written back");
	bool kept = true;
	for (uint64_t i = 1; i <= 4; i++) {
		kept = kept && qk__cache_get(&c, i * 512, &t) == 0 && ((uint8_t *)t)[0] == i;
		qk__cache_put(&c, i * 512);
	}
	CHECK(kept, "the changed tables keep their changes");
	/* Every slot dirty: the cache grows to its bound, then says why not. */
	ret = 0;
	for (uint64_t i = 41; i < 128 && ret == 0; i++) {
		ret = qk__cache_get(&c, i * 512, &t);
		if (ret == 0) {
			qk__cache_mark_dirty(&c, i * 512);
			qk__cache_put(&c, i * 512);
		}
	}
	CHECK_EQ(ret, (uint64_t)-ENOSPC, "the write error once the growth bound is reached");
	CHECK(c.nslots <= 2 * 4 + 64, "growth bounded: %u slots", c.nslots);
	qk__fault_fail(ft, QK__FAULT_WRITE, 0, 0, false);
	CHECK_EQ(qk__cache_flush(&c), 0, "flush once the disk works again");
	uint8_t b = 0;
	bool written = true;
	for (uint64_t i = 1; i <= 4; i++)
		written = written && f->ops->pread(f, &b, 1, i * 512) == 0 && b == i;
	CHECK(written, "the changes reached the file");
	qk__cache_destroy(&c);
	qk__file_close(f);
	qk__fault_free(ft);
}

int main(void)
{
	tap_watchdog(60);
	test_counts_and_errors();
	cut_case(0, false, "lost", 4096, 2048, 0);
	cut_case(0, true, "process crash", 4096, 2048, 0);
	cut_case(1500, false, "torn", 4096, 2048, 1024);
	cut_case(UINT64_MAX, false, "landed whole", 4096, 2048, 4096);
	cut_case(4, false, "short write not asked for", 8, 4096, 0);
	cut_case(8, false, "short write asked for", 8, 4096, 8);
	test_cache_on_failing_disk();
	return tap_done();
}
