/*
 * Compressed clusters. Deflate data is raw deflate (no zlib header); QEMU
 * writes it with a 4 KiB window, and inflating with the largest window
 * reads any writer's output. zstd data is one or more bare frames. In both
 * cases exactly one cluster must come out; input after that is sector
 * slack and ignored.
 */
#include "internal.h"

#include <errno.h>
#include <stdio.h>
#include <zlib.h>
#include <zstd.h>

static int inflate_cluster(const void *src, size_t src_len, void *dst, size_t dst_len,
			   char *why, size_t why_len)
{
	z_stream z = { 0 };
	if (inflateInit2(&z, -15) != Z_OK)
		return qk__err(ENOMEM, "cannot set up zlib");
	z.next_in = (Bytef *)src;
	z.avail_in = (uInt)src_len;
	z.next_out = dst;
	z.avail_out = (uInt)dst_len;
	int zr = inflate(&z, Z_FINISH);
	size_t produced = dst_len - z.avail_out;
	inflateEnd(&z);
	if ((zr == Z_STREAM_END || zr == Z_BUF_ERROR) && produced == dst_len)
		return 0;
	snprintf(why, why_len, "deflate data does not inflate to %zu bytes (%s, %zu bytes out)",
		 dst_len, zr == Z_DATA_ERROR ? "invalid deflate data" :
		 zr == Z_STREAM_END ? "stream ends early" : "input ends early", produced);
	return -EIO;
}

static int zstd_cluster(const void *src, size_t src_len, void *dst, size_t dst_len,
			char *why, size_t why_len)
{
	ZSTD_DCtx *d = ZSTD_createDCtx();
	if (!d)
		return qk__err(ENOMEM, "cannot set up zstd");
	ZSTD_inBuffer in = { src, src_len, 0 };
	ZSTD_outBuffer out = { dst, dst_len, 0 };
	int ret = 0;
	while (out.pos < out.size) {
		size_t before_in = in.pos, before_out = out.pos;
		size_t r = ZSTD_decompressStream(d, &out, &in);
		if (ZSTD_isError(r)) {
			snprintf(why, why_len, "invalid zstd data (%s)", ZSTD_getErrorName(r));
			ret = -EIO;
			break;
		}
		if (in.pos == before_in && out.pos == before_out) {
			snprintf(why, why_len, "zstd data ends after %zu of %zu bytes", out.pos, dst_len);
			ret = -EIO;
			break;
		}
	}
	ZSTD_freeDCtx(d);
	return ret;
}

int qk__decompress(uint32_t type, const void *src, size_t src_len, void *dst, size_t dst_len,
		   char *why, size_t why_len)
{
	switch (type) {
	case QK_COMPRESSION_ZLIB:
		return inflate_cluster(src, src_len, dst, dst_len, why, why_len);
	case QK_COMPRESSION_ZSTD:
		return zstd_cluster(src, src_len, dst, dst_len, why, why_len);
	default:
		return qk__err(ENOTSUP, "unknown compression type %u", type);
	}
}
