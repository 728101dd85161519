/*
 * Compressed clusters. Deflate data is raw deflate (no zlib header); QEMU
 * writes it with a 4 KiB window, and inflating with the largest window
 * reads any writer's output. zstd data is one or more bare frames. In both
 * cases exactly one cluster must come out; input after that is sector
 * slack and ignored.
 */
#include "internal.h"

#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/types.h>
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

/* zstd's smallest window (ZSTD_WINDOWLOG_ABSOLUTEMIN, outside its stable
 * API): 1 KiB. */
#define ZSTD_MIN_WINDOW_LOG 10

static int zstd_cluster(const void *src, size_t src_len, void *dst, size_t dst_len,
			char *why, size_t why_len)
{
	ZSTD_DCtx *d = ZSTD_createDCtx();
	if (!d)
		return qk__err(ENOMEM, "cannot set up zstd");
	/* The window a frame may ask for is capped at what one cluster needs
	 * (writers make single-segment frames of one cluster), so crafted
	 * data cannot make the decoder allocate up to zstd's 2 GiB default
	 * limit per cluster read. */
	unsigned wlog = ZSTD_MIN_WINDOW_LOG;
	while (wlog < 31 && (1ull << wlog) < dst_len)
		wlog++;
	if (ZSTD_isError(ZSTD_DCtx_setParameter(d, ZSTD_d_windowLogMax, (int)wlog))) {
		ZSTD_freeDCtx(d);
		return qk__err(ENOMEM, "cannot set up zstd");
	}
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

/*
 * Compression contexts are kept per thread (a zlib stream and a zstd
 * context cost far more to set up than to reset), freed when the thread
 * ends.
 */
struct codec_ctx {
	z_stream z;
	bool z_ready;
	ZSTD_CCtx *zc;
};

static pthread_key_t codec_key;
static pthread_once_t codec_once = PTHREAD_ONCE_INIT;
static bool codec_key_ok;

static void codec_free(void *p)
{
	struct codec_ctx *c = p;
	if (c->z_ready)
		deflateEnd(&c->z);
	ZSTD_freeCCtx(c->zc);
	free(c);
}

static void codec_key_init(void)
{
	codec_key_ok = pthread_key_create(&codec_key, codec_free) == 0;
}

static struct codec_ctx *codec_get(void)
{
	pthread_once(&codec_once, codec_key_init);
	if (!codec_key_ok)
		return NULL;
	struct codec_ctx *c = pthread_getspecific(codec_key);
	if (!c) {
		c = calloc(1, sizeof(*c));
		if (c && pthread_setspecific(codec_key, c) != 0) {
			free(c);
			c = NULL;
		}
	}
	return c;
}

/* Raw deflate with a 4 KiB window and memLevel 9, as QEMU writes it (its
 * reader inflates with that window). */
static ssize_t deflate_cluster(struct codec_ctx *c, const void *src, size_t len, void *dst,
			       size_t cap)
{
	if (!c->z_ready) {
		if (deflateInit2(&c->z, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9,
				 Z_DEFAULT_STRATEGY) != Z_OK)
			return qk__err(ENOMEM, "cannot set up zlib");
		c->z_ready = true;
	} else if (deflateReset(&c->z) != Z_OK) {
		return qk__err(EIO, "cannot reset zlib");
	}
	c->z.next_in = (Bytef *)src;
	c->z.avail_in = (uInt)len;
	c->z.next_out = dst;
	c->z.avail_out = (uInt)cap;
	int zr = deflate(&c->z, Z_FINISH);
	if (zr != Z_STREAM_END)
		return -ENOSPC;         /* does not fit: store it plain */
	return (ssize_t)(cap - c->z.avail_out);
}

static ssize_t zstd_compress_cluster(struct codec_ctx *c, const void *src, size_t len,
				     void *dst, size_t cap)
{
	if (!c->zc && !(c->zc = ZSTD_createCCtx()))
		return qk__err(ENOMEM, "cannot set up zstd");
	size_t r = ZSTD_compressCCtx(c->zc, dst, cap, src, len, ZSTD_CLEVEL_DEFAULT);
	if (ZSTD_isError(r))
		return -ENOSPC;         /* dstSize_tooSmall: store it plain */
	return (ssize_t)r;
}

ssize_t qk__compress(uint32_t type, const void *src, size_t len, void *dst, size_t cap)
{
	struct codec_ctx *c = codec_get();
	if (!c)
		return qk__err(ENOMEM, "out of memory");
	switch (type) {
	case QK_COMPRESSION_ZLIB:
		return deflate_cluster(c, src, len, dst, cap);
	case QK_COMPRESSION_ZSTD:
		return zstd_compress_cluster(c, src, len, dst, cap);
	default:
		return qk__err(ENOTSUP, "unknown compression type %u", type);
	}
}
