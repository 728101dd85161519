/*
 * fuzz-write.c - writes on a fuzzed image: opened read-write, then up to
 * MAX_OPS operations (write, unaligned write, compressed cluster write,
 * zero, zero with unmap, discard, flush, internal snapshot take, apply and
 * delete, resize) whose kinds, offsets and lengths
 * come from the last bytes of the input, then closed.
 *
 * Invariants when the image checked clean before the first write: every
 * write and zero that succeeded reads back, and after the last operation
 * the flushed bytes, opened again, still check clean (after a snapshot
 * call failed, once the read-write open has rebuilt what the dirty bit
 * says may be stale).
 */
#include "fuzz.h"

#define MAX_OPS   12
#define OP_BYTES  5
#define MAX_LEN   (256u << 10)

static uint8_t wbuf[MAX_LEN], rbuf[MAX_LEN];

static bool clean(qk_image *img)
{
	struct qk_check_result res = { .struct_size = sizeof res };
	return qk_check(img, 0, &res, NULL, NULL) == 0 && res.corruptions == 0 &&
	       res.leaks == 0 && res.check_errors == 0;
}

/* After a successful write or zero of [off, off+len), it reads back. */
static void verify(qk_image *img, uint64_t off, size_t len, const uint8_t *want, const char *what)
{
	if (qk_pread(img, rbuf, len, off) < 0)
		return;         /* an error is allowed; wrong bytes are not */
	for (size_t i = 0; i < len; i++)
		FUZZ_ASSERT(rbuf[i] == (want ? want[i] : 0),
			    "%s at %llu+%zu reads back 0x%02x at byte %zu, want 0x%02x",
			    what, (unsigned long long)off, len, rbuf[i], i, want ? want[i] : 0);
}

/* Take (k 1), apply (2) or delete (3) an internal snapshot, chosen by
 * byte b: k = b >> 6. */
static int snapshot_op(qk_image *img, uint8_t b, size_t i)
{
	const struct qk_snapshot *l;
	size_t n = 0;
	char name[64];
	if (b >> 6 == 1) {
		snprintf(name, sizeof name, "f%zu", i);
		return qk_snapshot_create(img, name);
	}
	if (qk_list_snapshots(img, &l, &n) < 0 || n == 0)
		return 0;
	snprintf(name, sizeof name, "%.63s", l[b % n].id);
	if (b >> 6 == 2)
		return qk_snapshot_apply(img, name);
	return qk_snapshot_delete(img, name, NULL);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	qk_image *img;
	if (size < OP_BYTES || fuzz_open(data, size, QK_OPEN_RDWR | QK_OPEN_UNSAFE, &img) < 0)
		return 0;
	uint64_t vsize = qk_get_size(img);
	struct qk_info info = { .struct_size = sizeof info };
	uint64_t cs = qk_get_info(img, &info) == 0 && info.cluster_size ? info.cluster_size : 65536;
	bool was_clean = clean(img);
	size_t nops = qk_min_u64(size / OP_BYTES, MAX_OPS);
	const uint8_t *op = data + size - nops * OP_BYTES;
	bool failed = false, snap_failed = false;

	for (size_t i = 0; i < nops && vsize; i++, op += OP_BYTES) {
		/* Offsets on a grid of 512-byte sectors spread over the whole
		 * guest range, sometimes cluster aligned, sometimes not. */
		uint32_t pos = (uint32_t)op[1] << 16 | (uint32_t)op[2] << 8 | op[3];
		uint64_t off = (uint64_t)((unsigned __int128)vsize * pos >> 24);
		uint64_t len = (uint64_t)(op[4] % 64 + 1) * 512;
		if (op[0] & 0x80)
			off &= ~(cs - 1);
		if (op[0] & 0x40)
			off = (off + (op[4] & 0x3f)) % vsize;
		len = qk_min_u64(qk_min_u64(len, MAX_LEN), vsize - off);
		memset(wbuf, (int)(i + 1) * 0x11 + op[4], len);
		wbuf[0] ^= 0x5a;
		int ret = 0;
		switch (op[0] & 7) {
		case 0: case 1:
			ret = qk_pwrite(img, wbuf, len, off);
			if (ret == 0 && was_clean && !failed)
				verify(img, off, len, wbuf, "write");
			break;
		case 2: {
			/* One whole cluster, compressed (the last may be short). */
			uint64_t c = off & ~(cs - 1);
			uint64_t l = qk_min_u64(qk_min_u64(cs, MAX_LEN), vsize - c);
			memset(wbuf, op[4], l);
			if (l == qk_min_u64(cs, vsize - c))
				ret = qk_write_compressed(img, wbuf, l, c);
			if (ret == 0 && was_clean && !failed && l == qk_min_u64(cs, vsize - c))
				verify(img, c, l, wbuf, "compressed write");
			break;
		}
		case 3: case 4:
			ret = qk_write_zeroes(img, off, len, (op[0] & 7) == 4 ? QK_ZERO_MAY_UNMAP : 0);
			if (ret == 0 && was_clean && !failed)
				verify(img, off, len, NULL, "zero write");
			break;
		case 5:
			ret = qk_discard(img, off, len);
			break;
		case 6:
			if (op[4] >> 6 == 0) {
				ret = qk_flush(img);
			} else {
				ret = snapshot_op(img, op[4], i);
				vsize = qk_get_size(img);
				snap_failed |= ret < 0;
			}
			break;
		case 7:
			if (op[4] & 0x80) {
				/* Grow by a few sectors, or shrink back. */
				uint64_t cut = qk_min_u64(len, vsize / 2) & ~511ull;
				uint64_t to = op[4] & 0x40 ? vsize - cut : vsize + len;
				if (to < vsize && !(op[4] & 0x40))
					break;          /* would wrap */
				ret = qk_resize(img, to, op[4] & 0x40 ? QK_RESIZE_SHRINK : 0);
				vsize = qk_get_size(img);
				FUZZ_ASSERT(ret < 0 || vsize == to, "resize to %llu left %llu",
					    (unsigned long long)to, (unsigned long long)vsize);
			} else {
				ret = qk_pwrite(img, wbuf, qk_min_u64(len, 3), off);
			}
			break;
		}
		if (getenv("FUZZ_TRACE"))       /* what ran, when looking at an input */
			fprintf(stderr, "op %zu: kind %u off %llu len %llu -> %d %s\n", i, op[0] & 7,
				(unsigned long long)off, (unsigned long long)len, ret,
				ret < 0 ? qk_last_error() : "");
		/* After an error the image may hold leaked clusters, no more:
		 * the final check then only rules out corruptions. */
		if (ret < 0)
			failed = true;
	}
	if (was_clean && qk_flush(img) == 0) {
		size_t len;
		uint8_t *bytes = fuzz_snapshot(img, &len);
		qk_image *again;
		/* A failed snapshot call may leave the dirty bit: the
		 * read-write open rebuilds, as QEMU's does. */
		if (bytes && snap_failed && fuzz_open(bytes, len, QK_OPEN_RDWR, &again) == 0) {
			free(bytes);
			bytes = qk_flush(again) == 0 ? fuzz_snapshot(again, &len) : NULL;
			qk_close(again);
		}
		if (bytes && fuzz_open(bytes, len, QK_OPEN_CHECK, &again) == 0) {
			struct qk_check_result res = { .struct_size = sizeof res };
			int ret = qk_check(again, 0, &res, NULL, NULL);
			const char *dump = getenv("FUZZ_DUMP");
			if (dump && (ret < 0 || res.corruptions)) {
				FILE *o = fopen(dump, "wb");
				if (o) {
					fwrite(bytes, 1, len, o);
					fclose(o);
				}
			}
			FUZZ_ASSERT(ret == 0 && res.corruptions == 0 && res.check_errors == 0 &&
				    (failed || res.leaks == 0),
				    "after writes on a clean image: ret %d, %llu corruptions, %llu leaks, "
				    "%llu check errors", ret, (unsigned long long)res.corruptions,
				    (unsigned long long)res.leaks, (unsigned long long)res.check_errors);
			qk_close(again);
		} else if (bytes) {
			FUZZ_ASSERT(0, "a clean image does not open after writes");
		}
		free(bytes);
	}
	qk_close(img);
	return 0;
}
