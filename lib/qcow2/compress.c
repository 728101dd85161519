/*
 * Compressed clusters. Deflate data is raw deflate (no zlib header); QEMU
 * writes it with a 4 KiB window, and inflating with the largest window
 * reads any writer's output. It is written with zlib (QEMU reads what it
 * writes) and read with libdeflate, zlib deciding what libdeflate refuses.
 * zstd data is one or more bare frames. In both cases exactly one cluster
 * must come out; input after that is sector slack and ignored.
 */
#include "internal.h"

#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/types.h>
#include <libdeflate.h>
#include <zlib.h>
#include <zstd.h>

/*
 * Codec state is kept per thread (a zlib stream, a zstd context and a
 * libdeflate decompressor cost far more to set up than to reset), with a
 * scratch buffer for callers that stage compressed data; freed when the
 * thread ends.
 */
struct codec_ctx {
	z_stream z;                     /* deflate */
	bool z_ready;
	ZSTD_CCtx *zc;
	z_stream zi;                    /* inflate, when libdeflate refuses */
	bool zi_ready;
	struct libdeflate_decompressor *ld;
	ZSTD_DCtx *zd;
	unsigned zd_wlog;               /* its windowLogMax */
	uint8_t *scratch;               /* QK__SCRATCH_KEEP bytes, once used */
};

static pthread_key_t codec_key;
static pthread_once_t codec_once = PTHREAD_ONCE_INIT;
static bool codec_key_ok;

static void codec_free(void *p)
{
	struct codec_ctx *c = p;
	if (c->z_ready)
		deflateEnd(&c->z);
	if (c->zi_ready)
		inflateEnd(&c->zi);
	ZSTD_freeCCtx(c->zc);
	ZSTD_freeDCtx(c->zd);
	if (c->ld)
		libdeflate_free_decompressor(c->ld);
	free(c->scratch);
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

void *qk__codec_scratch(size_t len)
{
	struct codec_ctx *c = len <= QK__SCRATCH_KEEP ? codec_get() : NULL;
	if (c && !c->scratch)
		c->scratch = malloc(QK__SCRATCH_KEEP);
	void *buf = c && c->scratch ? c->scratch : malloc(len ? len : 1);
	if (!buf)
		qk__err(ENOMEM, "out of memory");
	return buf;
}

void qk__codec_scratch_done(void *buf)
{
	struct codec_ctx *c = codec_get();
	if (!c || buf != c->scratch)
		free(buf);
}

/* zlib's verdict, for data libdeflate did not take: QEMU's reader accepts
 * a stream that fills the cluster without its end (Z_BUF_ERROR), and so
 * must we. */
static int inflate_zlib(struct codec_ctx *c, const void *src, size_t src_len, void *dst,
			size_t dst_len, char *why, size_t why_len)
{
	if (!c->zi_ready) {
		if (inflateInit2(&c->zi, -15) != Z_OK)
			return qk__err(ENOMEM, "cannot set up zlib");
		c->zi_ready = true;
	} else if (inflateReset(&c->zi) != Z_OK) {
		return qk__err(EIO, "cannot reset zlib");
	}
	z_stream *z = &c->zi;
	z->next_in = (Bytef *)src;
	z->avail_in = (uInt)src_len;
	z->next_out = dst;
	z->avail_out = (uInt)dst_len;
	int zr = inflate(z, Z_FINISH);
	size_t produced = dst_len - z->avail_out;
	if ((zr == Z_STREAM_END || zr == Z_BUF_ERROR) && produced == dst_len)
		return 0;
	snprintf(why, why_len, "deflate data does not inflate to %zu bytes (%s, %zu bytes out)",
		 dst_len, zr == Z_DATA_ERROR ? "invalid deflate data" :
		 zr == Z_STREAM_END ? "stream ends early" : "input ends early", produced);
	return -EIO;
}

/* Raw deflate: libdeflate (several times zlib's speed, and safe on any
 * input), then zlib for what it refuses. */
static int inflate_cluster(struct codec_ctx *c, const void *src, size_t src_len, void *dst,
			   size_t dst_len, char *why, size_t why_len)
{
	if (!c->ld)
		c->ld = libdeflate_alloc_decompressor();
	if (c->ld) {
		size_t in_used, out_got;
		enum libdeflate_result r = libdeflate_deflate_decompress_ex(
			c->ld, src, src_len, dst, dst_len, &in_used, &out_got);
		if (r == LIBDEFLATE_SUCCESS && out_got == dst_len)
			return 0;
	}
	return inflate_zlib(c, src, src_len, dst, dst_len, why, why_len);
}

/* zstd's smallest window (ZSTD_WINDOWLOG_ABSOLUTEMIN, outside its stable
 * API): 1 KiB. */
#define ZSTD_MIN_WINDOW_LOG 10

static int zstd_cluster(struct codec_ctx *c, const void *src, size_t src_len, void *dst,
			size_t dst_len, char *why, size_t why_len)
{
	if (!c->zd) {
		if (!(c->zd = ZSTD_createDCtx()))
			return qk__err(ENOMEM, "cannot set up zstd");
		c->zd_wlog = 0;
	} else {
		ZSTD_DCtx_reset(c->zd, ZSTD_reset_session_only);
	}
	ZSTD_DCtx *d = c->zd;
	/* The window a frame may ask for is capped at what one cluster needs
	 * (writers make single-segment frames of one cluster), so crafted
	 * data cannot make the decoder allocate up to zstd's 2 GiB default
	 * limit per cluster read. */
	unsigned wlog = ZSTD_MIN_WINDOW_LOG;
	while (wlog < 31 && (1ull << wlog) < dst_len)
		wlog++;
	if (wlog != c->zd_wlog) {
		if (ZSTD_isError(ZSTD_DCtx_setParameter(d, ZSTD_d_windowLogMax, (int)wlog)))
			return qk__err(ENOMEM, "cannot set up zstd");
		c->zd_wlog = wlog;
	}
	/* One frame of exactly one cluster (what QEMU and qcowkit write):
	 * decompressed in one call; anything else goes through the stream. */
	size_t fsize = ZSTD_findFrameCompressedSize(src, src_len);
	if (!ZSTD_isError(fsize) && ZSTD_getFrameContentSize(src, fsize) == dst_len) {
		size_t r = ZSTD_decompressDCtx(d, dst, dst_len, src, fsize);
		if (!ZSTD_isError(r) && r == dst_len)
			return 0;
		ZSTD_DCtx_reset(d, ZSTD_reset_session_only);
	}
	ZSTD_inBuffer in = { src, src_len, 0 };
	ZSTD_outBuffer out = { dst, dst_len, 0 };
	while (out.pos < out.size) {
		size_t before_in = in.pos, before_out = out.pos;
		size_t r = ZSTD_decompressStream(d, &out, &in);
		if (ZSTD_isError(r)) {
			snprintf(why, why_len, "invalid zstd data (%s)", ZSTD_getErrorName(r));
			return -EIO;
		}
		if (in.pos == before_in && out.pos == before_out) {
			snprintf(why, why_len, "zstd data ends after %zu of %zu bytes", out.pos, dst_len);
			return -EIO;
		}
	}
	return 0;
}

int qk__decompress(uint32_t type, const void *src, size_t src_len, void *dst, size_t dst_len,
		   char *why, size_t why_len)
{
	struct codec_ctx *c = codec_get();
	if (!c)
		return qk__err(ENOMEM, "out of memory");
	switch (type) {
	case QK_COMPRESSION_ZLIB:
		return inflate_cluster(c, src, src_len, dst, dst_len, why, why_len);
	case QK_COMPRESSION_ZSTD:
		return zstd_cluster(c, src, src_len, dst, dst_len, why, why_len);
	default:
		return qk__err(ENOTSUP, "unknown compression type %u", type);
	}
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
