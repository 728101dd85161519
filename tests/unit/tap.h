/*
 * tap.h - the unit tests' tiny shared harness, header only.
 *
 * Checks:   CHECK(cond, fmt, ...) counts a pass, or prints "file:line: FAIL:
 *           message" to stderr and counts a failure. CHECK_EQ(got, want,
 *           what) and CHECK_STR(got, want, what) print both values.
 *           CHECK_BUG(cond, id, fmt, ...) is a check that fails because of a
 *           known library bug; it prints "FAIL [KNOWN LIBRARY BUG id]" and
 *           still counts as a failure. tap_done() prints "N passed, N failed"
 *           as the last line and returns the exit code (0 when all passed).
 *           tap_isolate() runs part of a test in a child process, so a crash
 *           is one reported failure instead of the end of the program;
 *           tap_watchdog() turns a hang into a failure.
 *
 * Images:   struct qb builds a QCOW2 image in a byte buffer: header (v2 or
 *           v3, cluster_bits 9..21, extended L2, compression type, feature
 *           bits, header extensions, backing name), refcount table (one empty
 *           cluster), L1, L2 tables, data and compressed clusters, snapshot
 *           table and bitmap directory. Usage:
 *               struct qb b; qb_init(&b, 3, 16, size);
 *               b.extl2 = true;                // tweak parameters
 *               qb_layout(&b);                 // place header, reftable, L1
 *               qb_normal(&b, guest_cluster);  // data clusters, L2 entries
 *               qb_finish(&b);                 // write header and L1
 *               qb_open(&b, &opts, &img);      // memory backend
 *               qb_free(&b);
 *           Guest data is qb_pat(guest_offset), so a read can be checked
 *           against the offset alone. After qb_finish the buffer may be
 *           patched (qb_put32/qb_put64) to make invalid images.
 */
#ifndef QK_TEST_TAP_H
#define QK_TEST_TAP_H

#include <ctype.h>
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>
#include <zlib.h>
#include <zstd.h>

#include "support.h"
#include "qcow2/format.h"

#define TAP_UNUSED __attribute__((unused))

/* ---- checks ----------------------------------------------------------------- */

TAP_UNUSED static int tap_passed, tap_failed;

__attribute__((format(printf, 4, 5))) TAP_UNUSED
static void tap_fail(const char *file, int line, const char *bug, const char *fmt, ...)
{
	va_list ap;
	if (bug)
		fprintf(stderr, "%s:%d: FAIL [KNOWN LIBRARY BUG %s]: ", file, line, bug);
	else
		fprintf(stderr, "%s:%d: FAIL: ", file, line);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	fflush(stderr);
}

#define CHECK(cond, ...)                                                      \
	do {                                                                  \
		if (cond)                                                     \
			tap_passed++;                                         \
		else {                                                        \
			tap_failed++;                                         \
			tap_fail(__FILE__, __LINE__, NULL, __VA_ARGS__);      \
		}                                                             \
	} while (0)

/* A check that fails because of the library bug `id` (see the report). */
#define CHECK_BUG(cond, id, ...)                                              \
	do {                                                                  \
		if (cond)                                                     \
			tap_passed++;                                         \
		else {                                                        \
			tap_failed++;                                         \
			tap_fail(__FILE__, __LINE__, id, __VA_ARGS__);        \
		}                                                             \
	} while (0)

/* Equality of unsigned integers, printing both. */
#define CHECK_EQ(got, want, what)                                             \
	do {                                                                  \
		unsigned long long tap_g_ = (unsigned long long)(got);        \
		unsigned long long tap_w_ = (unsigned long long)(want);       \
		CHECK(tap_g_ == tap_w_, "%s: got %llu (0x%llx), want %llu (0x%llx)", \
		      what, tap_g_, tap_g_, tap_w_, tap_w_);                  \
	} while (0)

/* A string equal to want (both may be NULL). */
#define CHECK_STR(got, want, what)                                            \
	do {                                                                  \
		const char *tap_gs_ = (got), *tap_ws_ = (want);               \
		CHECK((!tap_gs_ && !tap_ws_) ||                               \
		      (tap_gs_ && tap_ws_ && strcmp(tap_gs_, tap_ws_) == 0),  \
		      "%s: got \"%s\", want \"%s\"", what,                    \
		      tap_gs_ ? tap_gs_ : "(null)", tap_ws_ ? tap_ws_ : "(null)"); \
	} while (0)

/* End the program (SIGALRM) if it runs longer than `seconds`: a hang is a
 * failure, not a wait for the test runner's timeout. */
TAP_UNUSED static void tap_watchdog(unsigned seconds)
{
	alarm(seconds);
}

TAP_UNUSED static int tap_done(void)
{
	printf("%d passed, %d failed\n", tap_passed, tap_failed);
	fflush(stdout);
	return tap_failed ? 1 : 0;
}

/* Case-insensitive substring test. */
TAP_UNUSED static bool tap_contains(const char *hay, const char *needle)
{
	if (!hay || !needle)
		return false;
	size_t n = strlen(needle);
	for (; ; hay++) {
		size_t i = 0;
		while (i < n && hay[i] &&
		       tolower((unsigned char)hay[i]) == tolower((unsigned char)needle[i]))
			i++;
		if (i == n)
			return true;
		if (!*hay)
			return false;
	}
}

/* The last error is one non-empty line that names the API. */
TAP_UNUSED static bool tap_one_line(const char *msg)
{
	return msg && msg[0] && !strchr(msg, '\n') && !strchr(msg, '\r');
}

/*
 * Run fn(arg) in a child process; its checks are added to ours. A child
 * that crashes or exits without reporting counts as one failure.
 */
TAP_UNUSED static void tap_isolate(const char *name, void (*fn)(void *), void *arg)
{
	int fds[2];
	fflush(stdout);
	fflush(stderr);
	if (pipe(fds) < 0) {
		fn(arg);
		return;
	}
	pid_t pid = fork();
	if (pid < 0) {
		close(fds[0]);
		close(fds[1]);
		fn(arg);
		return;
	}
	if (pid == 0) {
		close(fds[0]);
		tap_passed = tap_failed = 0;
		fn(arg);
		int counts[2] = { tap_passed, tap_failed };
		ssize_t w = write(fds[1], counts, sizeof counts);
		fflush(stdout);
		fflush(stderr);
		_exit(w == (ssize_t)sizeof counts ? 0 : 1);
	}
	close(fds[1]);
	int counts[2] = { 0, 0 };
	ssize_t r = read(fds[0], counts, sizeof counts);
	close(fds[0]);
	int status = 0;
	while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
		;
	if (r == (ssize_t)sizeof counts) {
		tap_passed += counts[0];
		tap_failed += counts[1];
	}
	if (r != (ssize_t)sizeof counts || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
		tap_failed++;
		if (WIFSIGNALED(status))
			fprintf(stderr, "FAIL: %s: crashed with signal %d\n", name, WTERMSIG(status));
		else
			fprintf(stderr, "FAIL: %s: child exited with status %d\n", name,
				WIFEXITED(status) ? WEXITSTATUS(status) : -1);
	}
}

/* Deterministic pseudo-random numbers (xorshift64*), for reproducible runs. */
TAP_UNUSED static uint64_t tap_rand(uint64_t *state)
{
	uint64_t x = *state;
	x ^= x >> 12;
	x ^= x << 25;
	x ^= x >> 27;
	*state = x;
	return x * 0x2545F4914F6CDD1Dull;
}

/* ---- the image builder ---------------------------------------------------------- */

/* The byte guest offset `off` holds in every data or compressed cluster the
 * builder writes: never zero, 16 symbols (so it compresses well). It
 * repeats every QB_PAT_PERIOD bytes, a prime, so no two guest ranges less
 * than about a million clusters apart hold the same bytes, and filling is
 * a memcpy from a table. */
#define QB_PAT_PERIOD 1048573u

static uint8_t *qb_pat_table;
static pthread_once_t qb_pat_once = PTHREAD_ONCE_INIT;

TAP_UNUSED static void qb_pat_init(void)
{
	qb_pat_table = malloc(2 * (size_t)QB_PAT_PERIOD);
	if (!qb_pat_table)
		abort();
	uint64_t x = 0x0123456789abcdefull;
	for (size_t i = 0; i < QB_PAT_PERIOD; i++) {
		if (i % 16 == 0)
			x = ((i / 16) + 0x51) * 0x9E3779B97F4A7C15ull, x ^= x >> 29;
		qb_pat_table[i] = (uint8_t)(0x41 + ((x >> ((i % 16) * 4)) & 15));
	}
	/* A second copy, so any run of up to one period is contiguous. */
	memcpy(qb_pat_table + QB_PAT_PERIOD, qb_pat_table, QB_PAT_PERIOD);
}

static inline uint8_t qb_pat(uint64_t off)
{
	pthread_once(&qb_pat_once, qb_pat_init);
	return qb_pat_table[off % QB_PAT_PERIOD];
}

/* Fill buf with the pattern of guest bytes [off, off+len). */
static inline void qb_pat_fill(void *buf, size_t len, uint64_t off)
{
	pthread_once(&qb_pat_once, qb_pat_init);
	uint8_t *p = buf;
	while (len) {
		size_t at = (size_t)(off % QB_PAT_PERIOD);
		size_t n = len < QB_PAT_PERIOD ? len : QB_PAT_PERIOD;
		memcpy(p, qb_pat_table + at, n);
		p += n;
		off += n;
		len -= n;
	}
}

struct qb_ext {
	uint32_t type;
	uint32_t len;            /* as written in the extension header */
	uint32_t data_len;       /* bytes of data actually written */
	uint8_t *data;
};

struct qb_snap {
	char id[32];
	char name[64];
	uint32_t extra;          /* extra data bytes (0, 16 or 24; more is zero-filled) */
};

struct qb_bitmap {
	char name[64];
	uint32_t flags;
	uint8_t gran_bits;
};

#define QB_MAX_EXT 16
#define QB_MAX_SNAP 8
#define QB_MAX_BITMAPS 8

struct qb {
	/* Parameters: set by qb_init, may be changed before qb_layout. */
	uint32_t version;
	uint32_t cluster_bits;
	uint64_t size;           /* virtual size */
	bool extl2;              /* sets incompat bit 4 */
	uint32_t compression;    /* QK_COMPRESSION_*; zstd sets incompat bit 3 */
	uint64_t incompat, compat, autoclear;   /* further bits (v3) */
	uint32_t refcount_order;
	uint32_t header_length;  /* 0: 72 for v2, 112 for v3 */
	uint32_t l1_size;        /* 0: what the virtual size needs */
	uint32_t crypt_method;
	const char *backing_file;
	const char *backing_fmt;
	struct qb_ext ext[QB_MAX_EXT];  /* written after the backing format */
	unsigned n_ext;
	bool no_end_marker;
	struct qb_snap snap[QB_MAX_SNAP];
	unsigned n_snap;
	struct qb_bitmap bm[QB_MAX_BITMAPS];
	unsigned n_bm;

	/* Layout: set by qb_layout. */
	uint64_t cs;             /* cluster size */
	uint64_t l2_entries;     /* per table */
	uint32_t l2_entry_size;
	uint64_t rt_off, l1_off, snap_off;
	uint64_t *l1;            /* host order */
	uint8_t *buf;
	size_t len, cap;
	uint64_t cbyte;          /* end of the last compressed data, 0 = none */
	uint64_t cluster_end;    /* end of the last whole-cluster allocation */
};

static inline void qb_put32(struct qb *b, uint64_t off, uint32_t v) { qk_put_be32(b->buf + off, v); }
static inline void qb_put64(struct qb *b, uint64_t off, uint64_t v) { qk_put_be64(b->buf + off, v); }
static inline void qb_put16(struct qb *b, uint64_t off, uint16_t v) { qk_put_be16(b->buf + off, v); }

TAP_UNUSED static void qb_die(const char *msg)
{
	fprintf(stderr, "image builder: %s\n", msg);
	abort();
}

TAP_UNUSED static void qb_init(struct qb *b, uint32_t version, uint32_t cluster_bits, uint64_t size)
{
	memset(b, 0, sizeof *b);
	b->version = version;
	b->cluster_bits = cluster_bits;
	b->size = size;
	b->refcount_order = 4;
}

/* Make the buffer at least `len` bytes long (new bytes are zero). */
TAP_UNUSED static void qb_grow(struct qb *b, size_t len)
{
	if (len <= b->len)
		return;
	if (len > b->cap) {
		size_t cap = b->cap ? b->cap : 4096;
		while (cap < len)
			cap *= 2;
		uint8_t *p = realloc(b->buf, cap);
		if (!p)
			qb_die("out of memory");
		memset(p + b->cap, 0, cap - b->cap);
		b->buf = p;
		b->cap = cap;
	}
	b->len = len;
}

/* n fresh zeroed clusters at the end of the file; their host offset. */
TAP_UNUSED static uint64_t qb_alloc(struct qb *b, uint64_t n)
{
	uint64_t off = (b->len + b->cs - 1) & ~(b->cs - 1);
	qb_grow(b, off + n * b->cs);
	b->cluster_end = off + n * b->cs;
	return off;
}

/* Add a header extension (data copied; len may lie about data_len). */
TAP_UNUSED static void qb_add_ext_raw(struct qb *b, uint32_t type, uint32_t len,
				      const void *data, uint32_t data_len)
{
	if (b->n_ext >= QB_MAX_EXT)
		qb_die("too many extensions");
	struct qb_ext *e = &b->ext[b->n_ext++];
	e->type = type;
	e->len = len;
	e->data_len = data_len;
	e->data = malloc(data_len ? data_len : 1);
	if (!e->data)
		qb_die("out of memory");
	if (data_len)
		memcpy(e->data, data, data_len);
}

TAP_UNUSED static void qb_add_ext(struct qb *b, uint32_t type, const void *data, uint32_t len)
{
	qb_add_ext_raw(b, type, len, data, len);
}

/* A feature name table with one entry. */
TAP_UNUSED static void qb_add_feature_name(struct qb *b, uint8_t type, uint8_t bit, const char *name)
{
	uint8_t e[48] = { 0 };
	e[0] = type;
	e[1] = bit;
	strncpy((char *)e + 2, name, 46);
	qb_add_ext(b, EXT_FEATURES, e, sizeof e);
}

TAP_UNUSED static void qb_add_snapshot(struct qb *b, const char *id, const char *name, uint32_t extra)
{
	if (b->n_snap >= QB_MAX_SNAP)
		qb_die("too many snapshots");
	struct qb_snap *s = &b->snap[b->n_snap++];
	snprintf(s->id, sizeof s->id, "%s", id);
	snprintf(s->name, sizeof s->name, "%s", name);
	s->extra = extra;
}

TAP_UNUSED static void qb_add_bitmap(struct qb *b, const char *name, uint8_t gran_bits, uint32_t flags)
{
	if (b->n_bm >= QB_MAX_BITMAPS)
		qb_die("too many bitmaps");
	struct qb_bitmap *m = &b->bm[b->n_bm++];
	snprintf(m->name, sizeof m->name, "%s", name);
	m->gran_bits = gran_bits;
	m->flags = flags;
}

/* Place cluster 0 (header), the refcount table (cluster 1) and the L1
 * table (from cluster 2). */
TAP_UNUSED static void qb_layout(struct qb *b)
{
	b->cs = 1ull << b->cluster_bits;
	b->l2_entry_size = b->extl2 ? 16 : 8;
	b->l2_entries = b->cs / b->l2_entry_size;
	if (!b->l1_size) {
		uint64_t per_l1 = b->cs * b->l2_entries;
		b->l1_size = (uint32_t)(b->size / per_l1 + (b->size % per_l1 != 0));
	}
	qb_alloc(b, 1);                     /* header */
	b->rt_off = qb_alloc(b, 1);
	uint64_t l1_bytes = (uint64_t)b->l1_size * 8;
	uint64_t l1_clusters = l1_bytes / b->cs + (l1_bytes % b->cs != 0);
	b->l1_off = qb_alloc(b, l1_clusters ? l1_clusters : 1);
	b->l1 = calloc(b->l1_size ? b->l1_size : 1, 8);
	if (!b->l1)
		qb_die("out of memory");
}

/* Host offset of the L2 table of L1 index `l1i`, allocated on first use. */
TAP_UNUSED static uint64_t qb_l2_table(struct qb *b, uint64_t l1i)
{
	if (l1i >= b->l1_size)
		qb_die("L1 index past the L1 table");
	if (!(b->l1[l1i] & L1E_OFFSET_MASK))
		b->l1[l1i] = qb_alloc(b, 1) | QCOW_OFLAG_COPIED;
	return b->l1[l1i] & L1E_OFFSET_MASK;
}

/* Set the L2 entry (and with extended L2 the bitmap) of a guest cluster. */
TAP_UNUSED static void qb_set_l2(struct qb *b, uint64_t gc, uint64_t entry, uint64_t bitmap)
{
	uint64_t t = qb_l2_table(b, gc / b->l2_entries);
	uint64_t at = t + (gc % b->l2_entries) * b->l2_entry_size;
	qb_put64(b, at, entry);
	if (b->extl2)
		qb_put64(b, at + 8, bitmap);
	else if (bitmap)
		qb_die("bitmap without extended L2");
}

/* Fill host bytes with the pattern of the guest range starting at goff. */
TAP_UNUSED static void qb_fill(struct qb *b, uint64_t host, uint64_t len, uint64_t goff)
{
	qb_grow(b, host + len);
	qb_pat_fill(b->buf + host, len, goff);
}

/* A normal cluster: a fresh host cluster holding the guest pattern. With
 * extended L2 all subclusters are allocated. Returns the host offset. */
TAP_UNUSED static uint64_t qb_normal(struct qb *b, uint64_t gc)
{
	uint64_t host = qb_alloc(b, 1);
	qb_fill(b, host, b->cs, gc * b->cs);
	qb_set_l2(b, gc, host | QCOW_OFLAG_COPIED, b->extl2 ? SC_ALLOC_MASK : 0);
	return host;
}

/* A normal cluster at a given (already allocated) host offset. */
TAP_UNUSED static void qb_normal_at(struct qb *b, uint64_t gc, uint64_t host)
{
	qb_fill(b, host, b->cs, gc * b->cs);
	qb_set_l2(b, gc, host | QCOW_OFLAG_COPIED, b->extl2 ? SC_ALLOC_MASK : 0);
}

/* Compress `len` bytes (raw deflate with a 4 KiB window as QEMU does, or
 * one zstd frame). Returns a malloc'd buffer and sets *out_len. */
TAP_UNUSED static uint8_t *qb_compress(uint32_t type, const void *src, size_t len, size_t *out_len)
{
	uint8_t *dst;
	if (type == QK_COMPRESSION_ZSTD) {
		size_t cap = ZSTD_compressBound(len);
		dst = malloc(cap);
		if (!dst)
			qb_die("out of memory");
		size_t n = ZSTD_compress(dst, cap, src, len, 3);
		if (ZSTD_isError(n))
			qb_die("zstd failed");
		*out_len = n;
		return dst;
	}
	z_stream z;
	memset(&z, 0, sizeof z);
	if (deflateInit2(&z, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY) != Z_OK)
		qb_die("deflateInit2 failed");
	size_t cap = deflateBound(&z, (uLong)len);
	dst = malloc(cap);
	if (!dst)
		qb_die("out of memory");
	z.next_in = (Bytef *)src;
	z.avail_in = (uInt)len;
	z.next_out = dst;
	z.avail_out = (uInt)cap;
	if (deflate(&z, Z_FINISH) != Z_STREAM_END)
		qb_die("deflate failed");
	*out_len = cap - z.avail_out;
	deflateEnd(&z);
	return dst;
}

/* Store `len` bytes of compressed data, packed after the previous ones when
 * nothing else was allocated since (as QEMU packs), and return the
 * compressed L2 entry describing them. */
TAP_UNUSED static uint64_t qb_store_compressed(struct qb *b, const void *data, size_t len)
{
	uint64_t coff;
	if (b->cbyte && b->cbyte >= b->cluster_end && b->cbyte == b->len)
		coff = b->cbyte;
	else
		coff = qb_alloc(b, 1);
	qb_grow(b, coff + len);
	memcpy(b->buf + coff, data, len);
	b->cbyte = coff + len;
	/* The buffer may end mid-cluster, as QEMU's files do. */
	b->len = coff + len;
	unsigned shift = 62 - (b->cluster_bits - 8);
	uint64_t field = (coff + len - 1) / 512 - coff / 512;
	if (field > (1ull << (b->cluster_bits - 8)) - 1)
		qb_die("compressed data too large for its descriptor");
	return QCOW_OFLAG_COMPRESSED | (field << shift) | coff;
}

/* A compressed cluster holding the guest pattern (b->compression's type);
 * returns the L2 entry. */
TAP_UNUSED static uint64_t qb_compressed(struct qb *b, uint64_t gc)
{
	uint8_t *plain = malloc(b->cs);
	if (!plain)
		qb_die("out of memory");
	qb_pat_fill(plain, b->cs, gc * b->cs);
	size_t clen;
	uint8_t *c = qb_compress(b->compression, plain, b->cs, &clen);
	uint64_t e = qb_store_compressed(b, c, clen);
	qb_set_l2(b, gc, e, 0);
	free(c);
	free(plain);
	return e;
}

/* Write the header, extensions, backing name, L1, snapshot table and bitmap
 * directory into the buffer. */
TAP_UNUSED static void qb_finish(struct qb *b)
{
	uint8_t *h = b->buf;
	uint64_t incompat = b->incompat, autoclear = b->autoclear;
	if (b->extl2)
		incompat |= INCOMPAT_EXTL2;
	if (b->compression)
		incompat |= INCOMPAT_COMPRESSION;

	/* Snapshot table. */
	if (b->n_snap) {
		uint64_t bytes = 0;
		for (unsigned i = 0; i < b->n_snap; i++)
			bytes += (SNAP_FIXED_LEN + b->snap[i].extra + strlen(b->snap[i].id) +
				  strlen(b->snap[i].name) + 7) & ~7ull;
		b->snap_off = qb_alloc(b, bytes / b->cs + 1);
		uint64_t p = b->snap_off;
		for (unsigned i = 0; i < b->n_snap; i++) {
			struct qb_snap *s = &b->snap[i];
			size_t il = strlen(s->id), nl = strlen(s->name);
			qb_put64(b, p, b->l1_off);
			qb_put32(b, p + 8, b->l1_size);
			qb_put16(b, p + 12, (uint16_t)il);
			qb_put16(b, p + 14, (uint16_t)nl);
			qb_put32(b, p + 16, 1700000000u + i);
			qb_put32(b, p + 20, 1000u * i);
			qb_put64(b, p + 24, 5000000000ull * i);
			qb_put32(b, p + 32, 0);
			qb_put32(b, p + 36, s->extra);
			if (s->extra >= 16)
				qb_put64(b, p + 40 + 8, b->size);
			if (s->extra >= 24)
				qb_put64(b, p + 40 + 16, i);
			memcpy(b->buf + p + 40 + s->extra, s->id, il);
			memcpy(b->buf + p + 40 + s->extra + il, s->name, nl);
			p += (SNAP_FIXED_LEN + s->extra + il + nl + 7) & ~7ull;
		}
		h = b->buf;
	}

	/* Bitmap directory: one table cluster per bitmap, all entries zero. */
	if (b->n_bm) {
		uint64_t dir_bytes = 0;
		for (unsigned i = 0; i < b->n_bm; i++)
			dir_bytes += (BM_DIR_FIXED_LEN + strlen(b->bm[i].name) + 7) & ~7ull;
		uint64_t dir = qb_alloc(b, dir_bytes / b->cs + 1), p = dir;
		for (unsigned i = 0; i < b->n_bm; i++) {
			size_t nl = strlen(b->bm[i].name);
			uint64_t table = qb_alloc(b, 1);
			qb_put64(b, p, table);
			qb_put32(b, p + 8, 1);
			qb_put32(b, p + 12, b->bm[i].flags);
			b->buf[p + 16] = 1;
			b->buf[p + 17] = b->bm[i].gran_bits;
			qb_put16(b, p + 18, (uint16_t)nl);
			qb_put32(b, p + 20, 0);
			memcpy(b->buf + p + 24, b->bm[i].name, nl);
			p += (BM_DIR_FIXED_LEN + nl + 7) & ~7ull;
		}
		uint8_t ext[24] = { 0 };
		qk_put_be32(ext, b->n_bm);
		qk_put_be64(ext + 8, dir_bytes);
		qk_put_be64(ext + 16, dir);
		qb_add_ext(b, EXT_BITMAPS, ext, sizeof ext);
		autoclear |= AUTOCLEAR_BITMAPS;
		h = b->buf;
	}

	memset(h, 0, b->cs);
	qk_put_be32(h + HDR_MAGIC, QCOW2_MAGIC);
	qk_put_be32(h + HDR_VERSION, b->version);
	qk_put_be32(h + HDR_CLUSTER_BITS, b->cluster_bits);
	qk_put_be64(h + HDR_SIZE, b->size);
	qk_put_be32(h + HDR_CRYPT_METHOD, b->crypt_method);
	qk_put_be32(h + HDR_L1_SIZE, b->l1_size);
	qk_put_be64(h + HDR_L1_OFFSET, b->l1_off);
	qk_put_be64(h + HDR_RT_OFFSET, b->rt_off);
	qk_put_be32(h + HDR_RT_CLUSTERS, 1);
	qk_put_be32(h + HDR_NB_SNAPSHOTS, b->n_snap);
	qk_put_be64(h + HDR_SNAPSHOTS_OFFSET, b->snap_off);
	uint32_t hl = b->header_length;
	if (b->version >= 3) {
		if (!hl)
			hl = 112;
		qk_put_be64(h + HDR_INCOMPAT, incompat);
		qk_put_be64(h + HDR_COMPAT, b->compat);
		qk_put_be64(h + HDR_AUTOCLEAR, autoclear);
		qk_put_be32(h + HDR_REFCOUNT_ORDER, b->refcount_order);
		qk_put_be32(h + HDR_HEADER_LENGTH, hl);
		if (hl > HDR_COMPRESSION_TYPE)
			h[HDR_COMPRESSION_TYPE] = (uint8_t)b->compression;
	} else if (!hl) {
		hl = HDR_V2_LENGTH;
	}

	/* Extensions, the end marker, then the backing file name. */
	uint64_t p = hl;
	if (b->backing_fmt) {
		size_t n = strlen(b->backing_fmt);
		qk_put_be32(h + p, EXT_BACKING_FMT);
		qk_put_be32(h + p + 4, (uint32_t)n);
		memcpy(h + p + 8, b->backing_fmt, n);
		p += 8 + ((n + 7) & ~7ull);
	}
	for (unsigned i = 0; i < b->n_ext; i++) {
		struct qb_ext *e = &b->ext[i];
		if (p + 8 + e->data_len > b->cs)
			qb_die("extensions do not fit in cluster 0");
		qk_put_be32(h + p, e->type);
		qk_put_be32(h + p + 4, e->len);
		memcpy(h + p + 8, e->data, e->data_len);
		p += 8 + ((e->data_len + 7) & ~7ull);
	}
	if (!b->no_end_marker)
		p += 8;              /* type 0, length 0 */
	if (b->backing_file) {
		size_t n = strlen(b->backing_file);
		if (p + n > b->cs)
			qb_die("backing name does not fit in cluster 0");
		qk_put_be64(h + HDR_BACKING_OFFSET, p);
		qk_put_be32(h + HDR_BACKING_SIZE, (uint32_t)n);
		memcpy(h + p, b->backing_file, n);
	}
	for (uint32_t i = 0; i < b->l1_size; i++)
		qb_put64(b, b->l1_off + 8ull * i, b->l1[i]);
}

/* Open the built image from memory (AUTO detection when opts is NULL). */
TAP_UNUSED static int qb_open_named(const struct qb *b, const char *name,
				    const struct qk_open_options *opts, qk_image **out)
{
	struct qk_open_options o;
	struct qk__file *f;
	if (!opts) {
		qk_open_options_init(&o);
		opts = &o;
	}
	*out = NULL;
	qk__api_enter("qk_open");
	int ret = qk__file_open_mem(b->buf, b->len, name, &f);
	if (ret < 0)
		return ret;
	return qk__image_open_file(&qk__mem_host, f, name, opts, NULL, out);
}

TAP_UNUSED static int qb_open(const struct qb *b, const struct qk_open_options *opts, qk_image **out)
{
	return qb_open_named(b, "mem.qcow2", opts, out);
}

TAP_UNUSED static void qb_free(struct qb *b)
{
	for (unsigned i = 0; i < b->n_ext; i++)
		free(b->ext[i].data);
	free(b->l1);
	free(b->buf);
	memset(b, 0, sizeof *b);
}

#endif /* QK_TEST_TAP_H */
