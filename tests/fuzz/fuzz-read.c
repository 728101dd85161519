/*
 * fuzz-read.c - a fuzzed image opened read-only, with format detection
 * and then as QCOW2: info, snapshots and bitmaps listed, the whole guest
 * range mapped in pieces, and a bounded amount read (the start of every extent, and unaligned reads across
 * cluster boundaries). Any crash, sanitizer report, hang or unbounded
 * allocation is a bug; errors are fine.
 */
#include "fuzz.h"

#define MAX_EXTENTS    4096
#define MAX_READ_BYTES (4u << 20)      /* per input */
#define READ_CHUNK     (64u << 10)

static uint8_t buf[READ_CHUNK];

/* Read up to `len` bytes at off (clipped to the image and the budget). */
static void read_some(qk_image *img, uint64_t off, uint64_t len, uint64_t *budget)
{
	uint64_t size = qk_get_size(img);
	if (off >= size || *budget == 0)
		return;
	len = qk_min_u64(qk_min_u64(len, size - off), qk_min_u64(READ_CHUNK, *budget));
	*budget -= len;
	(void)qk_pread(img, buf, (size_t)len, off);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	qk_image *img;
	/* Format detection first: it must name what it refuses, never
	 * misread; a detected raw image reads as the bytes themselves. */
	if (fuzz_open_as(data, size, QK_FORMAT_AUTO, 0, &img) == 0) {
		if (qk_get_format(img) == QK_FORMAT_RAW && size >= 512) {
			FUZZ_ASSERT(qk_get_size(img) >= 512, "raw image of %zu bytes has size %llu",
				    size, (unsigned long long)qk_get_size(img));
			if (qk_pread(img, buf, 512, 0) == 0)
				FUZZ_ASSERT(memcmp(buf, data, 512) == 0, "raw image reads other bytes");
		}
		qk_close(img);
	}
	if (fuzz_open(data, size, 0, &img) < 0)
		return 0;

	struct qk_info info = { .struct_size = sizeof info };
	if (qk_get_info(img, &info) == 0)
		FUZZ_ASSERT(info.virtual_size == qk_get_size(img), "info and size disagree");
	const struct qk_snapshot *snaps;
	const struct qk_bitmap *bitmaps;
	size_t n;
	if (qk_list_snapshots(img, &snaps, &n) == 0)
		for (size_t i = 0; i < n; i++)
			FUZZ_ASSERT(snaps[i].id && snaps[i].name, "snapshot %zu without id or name", i);
	if (qk_list_bitmaps(img, &bitmaps, &n) == 0)
		for (size_t i = 0; i < n; i++)
			FUZZ_ASSERT(bitmaps[i].name, "bitmap %zu without a name", i);

	uint64_t vsize = qk_get_size(img), off = 0, budget = MAX_READ_BYTES;
	for (int i = 0; i < MAX_EXTENTS && off < vsize; i++) {
		struct qk_extent ext;
		/* Pieces of varying length, so runs are cut at odd places. */
		uint64_t piece = (i & 1) ? UINT64_MAX : (uint64_t)(i + 1) * 4096 + 512;
		if (qk_block_status(img, off, piece, &ext) < 0)
			break;
		FUZZ_ASSERT(ext.start == off && ext.length > 0 && ext.length <= piece &&
			    ext.length <= vsize - off,
			    "extent [%llu, +%llu) for a query at %llu of %llu",
			    (unsigned long long)ext.start, (unsigned long long)ext.length,
			    (unsigned long long)off, (unsigned long long)piece);
		if (ext.flags & QK_EXTENT_ZERO) {
			/* What map calls zero must read as zeros. */
			uint64_t l = qk_min_u64(qk_min_u64(ext.length, READ_CHUNK), budget);
			budget -= l;
			if (l && qk_pread(img, buf, (size_t)l, off) == 0)
				FUZZ_ASSERT(qk_is_zero(buf, (size_t)l), "zero extent at %llu reads non-zero",
					    (unsigned long long)off);
		} else {
			read_some(img, off, READ_CHUNK, &budget);
		}
		off += ext.length;
	}
	/* Unaligned reads across cluster and L2 boundaries. */
	uint64_t cs = info.cluster_size ? info.cluster_size : 65536;
	for (uint64_t o = cs - 7; o < vsize && budget; o = o * 3 + cs - 7)
		read_some(img, o, cs + 11, &budget);
	read_some(img, vsize > 1000 ? vsize - 1000 : 0, 1000, &budget);
	qk_close(img);
	return 0;
}
