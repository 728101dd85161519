/*
 * handshake.c - the NBD fixed newstyle handshake: greeting, client flags,
 * then options until the client picks the export (EXPORT_NAME or GO) or
 * leaves (ABORT, EOF).
 *
 * Design note. Every option's data is read whole into a bounded buffer
 * (NBD_MAX_OPTION_DATA) before it is parsed, so a parse error never
 * desynchronises the stream: the option gets an error reply and the next
 * option is read. Data longer than the bound is skipped unread and
 * answered with ERR_TOO_BIG. Only a wrong option magic, unknown client
 * flags, or an unknown export name in EXPORT_NAME (which has no error
 * reply) drop the connection. State set by earlier options (structured
 * replies, meta contexts) stays until GO/EXPORT_NAME; STARTTLS is refused,
 * so nothing is ever discarded.
 * Bounds: the whole handshake runs under one deadline (c->sock.deadline, set
 * by nbd_serve_conn), which every read and send here honours, so neither
 * a slow or silent client nor one that floods options without reading the
 * replies outlasts it. The memory it takes is the one option buffer
 * (NBD_MAX_OPTION_DATA; skipped data is not stored) and replies built on
 * the stack; a meta context option is looked at in place, at most
 * NBD_MAX_QUERIES queries of NBD_MAX_STRING bytes.
 *
 * SPDX-License-Identifier: MIT
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "conn.h"

/* Option data larger than this cannot be meaningful: one export name plus
 * a few queries, each at most NBD_MAX_STRING. */
#define NBD_MAX_OPTION_DATA (64u << 10)

/* Meta context queries accepted in one option. */
#define NBD_MAX_QUERIES 256

uint16_t nbd_tflags(const struct nbd_conn *c)
{
	uint16_t f = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH |
		     NBD_FLAG_SEND_FUA;

	if (c->exp->readonly)
		f |= NBD_FLAG_READ_ONLY;
	else
		f |= NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES |
		     NBD_FLAG_SEND_FAST_ZERO;
	if (c->structured)
		f |= NBD_FLAG_SEND_DF;
	if (c->exp->multi_conn)
		f |= NBD_FLAG_CAN_MULTI_CONN;
	return f;
}

/* Send one option reply: header and `len` bytes of data. */
static int send_rep(struct nbd_conn *c, uint32_t opt, uint32_t type,
		    const void *data, size_t len)
{
	uint8_t h[20];
	struct iovec iov[2];

	nbd_put64(h, NBD_REP_MAGIC);
	nbd_put32(h + 8, opt);
	nbd_put32(h + 12, type);
	nbd_put32(h + 16, (uint32_t)len);
	iov[0].iov_base = h;
	iov[0].iov_len = sizeof(h);
	iov[1].iov_base = (void *)data;
	iov[1].iov_len = len;
	return nbd_send_iov(&c->sock, iov, len ? 2 : 1);
}

static int send_ack(struct nbd_conn *c, uint32_t opt)
{
	return send_rep(c, opt, NBD_REP_ACK, NULL, 0);
}

/* An error reply with a human-readable message. */
static int send_err(struct nbd_conn *c, uint32_t opt, uint32_t type,
		    const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static int send_err(struct nbd_conn *c, uint32_t opt, uint32_t type,
		    const char *fmt, ...)
{
	char msg[256];
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	if (n < 0)
		n = 0;
	if ((size_t)n >= sizeof(msg))
		n = sizeof(msg) - 1;
	return send_rep(c, opt, type, msg, (size_t)n);
}

/* One NBD_REP_INFO item: type, then `len` bytes. */
static int send_info(struct nbd_conn *c, uint32_t opt, uint16_t type,
		     const void *data, size_t len)
{
	uint8_t buf[2 + NBD_MAX_STRING];

	if (len > NBD_MAX_STRING)
		len = NBD_MAX_STRING;
	nbd_put16(buf, type);
	memcpy(buf + 2, data, len);
	return send_rep(c, opt, NBD_REP_INFO, buf, 2 + len);
}

/* Does `name` (len bytes, not NUL-terminated) select our export? The
 * empty name is the default export, which is ours whatever it is called. */
static bool export_matches(const struct nbd_conn *c, const uint8_t *name,
			   size_t len)
{
	return len == 0 || (strlen(c->exp->name) == len &&
			    memcmp(c->exp->name, name, len) == 0);
}

/* A printable copy of a client string for messages (bounded, NULs and
 * control characters replaced). */
static void printable(char *out, size_t outlen, const uint8_t *s, size_t len)
{
	size_t i;

	for (i = 0; i < len && i + 1 < outlen; i++)
		out[i] = (s[i] >= 0x20 && s[i] < 0x7f) ? (char)s[i] : '?';
	out[i] = '\0';
}

/* The error reply to an option naming an export that is not ours. */
static int send_unknown_export(struct nbd_conn *c, uint32_t opt,
			       const uint8_t *name, size_t len)
{
	char shown[80];

	printable(shown, sizeof(shown), name, len);
	return send_err(c, opt, NBD_REP_ERR_UNKNOWN, "export '%s' not present",
			shown);
}

/* EXPORT_NAME: no option reply; the export's size and flags, or a dropped
 * connection for an unknown name. */
static int opt_export_name(struct nbd_conn *c, const uint8_t *data,
			   uint32_t len)
{
	uint8_t buf[10 + NBD_EXPORT_NAME_PAD];

	if (!export_matches(c, data, len))
		return -EPROTO;
	memset(buf, 0, sizeof(buf));
	nbd_put64(buf, c->size);
	nbd_put16(buf + 8, nbd_tflags(c));
	int r = nbd_send_all(&c->sock, buf,
			     c->no_zeroes ? 10 : sizeof(buf));
	return r < 0 ? r : 1;
}

static int opt_list(struct nbd_conn *c, uint32_t len)
{
	uint8_t buf[4 + 2 * NBD_MAX_STRING];
	size_t nlen = strlen(c->exp->name), dlen = 0;
	int r;

	if (len != 0)
		return send_err(c, NBD_OPT_LIST, NBD_REP_ERR_INVALID,
				"OPT_LIST should not have length");
	if (nlen > NBD_MAX_STRING)
		nlen = NBD_MAX_STRING;
	if (c->exp->description) {
		dlen = strlen(c->exp->description);
		if (dlen > NBD_MAX_STRING)
			dlen = NBD_MAX_STRING;
	}
	nbd_put32(buf, (uint32_t)nlen);
	memcpy(buf + 4, c->exp->name, nlen);
	if (dlen)
		memcpy(buf + 4 + nlen, c->exp->description, dlen);
	r = send_rep(c, NBD_OPT_LIST, NBD_REP_SERVER, buf, 4 + nlen + dlen);
	return r < 0 ? r : send_ack(c, NBD_OPT_LIST);
}

/* INFO and GO: u32 name length, name, u16 n, n x u16 info requests.
 * Returns 1 after a successful GO, 0 to go on haggling, or < 0. */
static int opt_info_go(struct nbd_conn *c, uint32_t opt, const uint8_t *data,
		       uint32_t len)
{
	uint32_t nlen;
	uint16_t nreq;
	bool want_name = false, want_desc = false;
	uint8_t buf[14];
	int r;

	if (len < 6 || (nlen = nbd_get32(data)) > len - 6)
		return send_err(c, opt, NBD_REP_ERR_INVALID,
				"request data too short");
	nreq = nbd_get16(data + 4 + nlen);
	if (len != 6 + nlen + 2u * nreq)
		return send_err(c, opt, NBD_REP_ERR_INVALID,
				"request data has the wrong length");
	if (nlen > NBD_MAX_STRING)
		return send_err(c, opt, NBD_REP_ERR_INVALID,
				"export name too long");
	if (!export_matches(c, data + 4, nlen))
		return send_unknown_export(c, opt, data + 4, nlen);
	for (uint16_t i = 0; i < nreq; i++) {
		uint16_t t = nbd_get16(data + 6 + nlen + 2u * i);
		if (t == NBD_INFO_NAME)
			want_name = true;
		else if (t == NBD_INFO_DESCRIPTION)
			want_desc = true;
		/* BLOCK_SIZE is always sent; unknown items are ignored. */
	}
	if (want_name) {
		r = send_info(c, opt, NBD_INFO_NAME, c->exp->name,
			      strlen(c->exp->name));
		if (r < 0)
			return r;
	}
	if (want_desc && c->exp->description) {
		r = send_info(c, opt, NBD_INFO_DESCRIPTION,
			      c->exp->description, strlen(c->exp->description));
		if (r < 0)
			return r;
	}
	/* Any alignment works (the library completes partial clusters);
	 * 4 KiB is what is cheap; payloads up to 32 MiB. */
	nbd_put32(buf, 1);
	nbd_put32(buf + 4, 4096);
	nbd_put32(buf + 8, NBD_MAX_PAYLOAD);
	if ((r = send_info(c, opt, NBD_INFO_BLOCK_SIZE, buf, 12)) < 0)
		return r;
	nbd_put64(buf, c->size);
	nbd_put16(buf + 8, nbd_tflags(c));
	if ((r = send_info(c, opt, NBD_INFO_EXPORT, buf, 10)) < 0)
		return r;
	if ((r = send_ack(c, opt)) < 0)
		return r;
	return opt == NBD_OPT_GO ? 1 : 0;
}

/* The contexts a query selects. */
struct ctx_set {
	bool alloc, depth;
	uint32_t bitmaps;         /* bit i: the export's bitmaps[i] */
};

/* Does query q (qlen bytes) equal, or (prefix) begin with, `s`? */
static bool query_is(const uint8_t *q, uint32_t qlen, const char *s, bool prefix)
{
	size_t n = strlen(s);
	return (qlen == n || (prefix && qlen > n)) && memcmp(q, s, n) == 0;
}

/* Which of our contexts a query names, as qemu-nbd reads it. In LIST a
 * namespace alone ("base:", "qemu:", "qemu:dirty-bitmap:") names all of
 * its contexts. */
static void match_query(const struct nbd_conn *c, const uint8_t *q,
			uint32_t qlen, bool list, struct ctx_set *set)
{
	static const char bm_ns[] = NBD_CONTEXT_QEMU_DIRTY_BITMAP;
	uint32_t all = (uint32_t)((1ull << c->exp->nr_bitmaps) - 1);

	if (query_is(q, qlen, NBD_CONTEXT_BASE_ALLOCATION, false) ||
	    (list && query_is(q, qlen, "base:", false)))
		set->alloc = true;
	if (c->exp->allocation_depth &&
	    (query_is(q, qlen, NBD_CONTEXT_QEMU_ALLOCATION_DEPTH, false) ||
	     (list && query_is(q, qlen, "qemu:", false))))
		set->depth = true;
	if (list && (query_is(q, qlen, "qemu:", false) || query_is(q, qlen, bm_ns, false)))
		set->bitmaps |= all;
	if (!query_is(q, qlen, bm_ns, true))
		return;
	for (size_t i = 0; i < c->exp->nr_bitmaps; i++)
		if (strlen(c->exp->bitmaps[i]) == qlen - (sizeof(bm_ns) - 1) &&
		    memcmp(q + sizeof(bm_ns) - 1, c->exp->bitmaps[i], qlen - (sizeof(bm_ns) - 1)) == 0)
			set->bitmaps |= 1u << i;
}

/* One META_CONTEXT reply: id, then `prefix` and `name`. */
static int send_context(struct nbd_conn *c, uint32_t opt, uint32_t id,
			const char *prefix, const char *name)
{
	uint8_t buf[4 + NBD_MAX_STRING];
	size_t p = strlen(prefix), n = strlen(name);

	if (p + n > NBD_MAX_STRING)
		n = NBD_MAX_STRING - p;   /* -B names are checked: never */
	nbd_put32(buf, id);
	memcpy(buf + 4, prefix, p);
	memcpy(buf + 4 + p, name, n);
	return send_rep(c, opt, NBD_REP_META_CONTEXT, buf, 4 + p + n);
}

/* Answer LIST or SET with the contexts in `set`, qemu-nbd's order (LIST
 * gives id 0, as the specification suggests), then ACK. */
static int send_contexts(struct nbd_conn *c, uint32_t opt, const struct ctx_set *set)
{
	bool list = opt == NBD_OPT_LIST_META_CONTEXT;
	int r = 0;

	if (set->alloc)
		r = send_context(c, opt, list ? 0 : NBD_CTX_ID_ALLOCATION,
				 NBD_CONTEXT_BASE_ALLOCATION, "");
	if (r >= 0 && set->depth)
		r = send_context(c, opt, list ? 0 : NBD_CTX_ID_DEPTH,
				 NBD_CONTEXT_QEMU_ALLOCATION_DEPTH, "");
	for (size_t i = 0; r >= 0 && i < c->exp->nr_bitmaps; i++)
		if (set->bitmaps & (1u << i))
			r = send_context(c, opt, list ? 0 : NBD_CTX_ID_BITMAP + (uint32_t)i,
					 NBD_CONTEXT_QEMU_DIRTY_BITMAP, c->exp->bitmaps[i]);
	return r < 0 ? r : send_ack(c, opt);
}

/* LIST_META_CONTEXT and SET_META_CONTEXT: u32 name length, name, u32 n,
 * n x (u32 length, query). */
static int opt_meta_context(struct nbd_conn *c, uint32_t opt,
			    const uint8_t *data, uint32_t len)
{
	bool list = opt == NBD_OPT_LIST_META_CONTEXT;
	struct ctx_set set = { false, false, 0 };
	uint32_t nlen, nq, pos;

	if (!list && !c->structured)
		return send_err(c, opt, NBD_REP_ERR_INVALID,
				"request option '%s' when structured reply "
				"is not negotiated", "SET_META_CONTEXT");
	if (len < 8 || (nlen = nbd_get32(data)) > len - 8)
		return send_err(c, opt, NBD_REP_ERR_INVALID,
				"request data too short");
	if (nlen > NBD_MAX_STRING)
		return send_err(c, opt, NBD_REP_ERR_INVALID,
				"export name too long");
	nq = nbd_get32(data + 4 + nlen);
	if (nq > NBD_MAX_QUERIES)
		return send_err(c, opt, NBD_REP_ERR_TOO_BIG,
				"too many queries (%u)", nq);
	pos = 8 + nlen;
	/* Validate the whole list before answering anything. */
	for (uint32_t i = 0; i < nq; i++) {
		uint32_t qlen;
		if (len - pos < 4 || (qlen = nbd_get32(data + pos)) > len - pos - 4)
			return send_err(c, opt, NBD_REP_ERR_INVALID,
					"query %u runs past the option data", i);
		if (qlen > NBD_MAX_STRING)
			return send_err(c, opt, NBD_REP_ERR_INVALID,
					"query %u too long", i);
		pos += 4 + qlen;
	}
	if (pos != len)
		return send_err(c, opt, NBD_REP_ERR_INVALID,
				"unexpected data after the queries");
	if (!export_matches(c, data + 4, nlen))
		return send_unknown_export(c, opt, data + 4, nlen);
	if (list && nq == 0) {
		set.alloc = true;
		set.depth = c->exp->allocation_depth;
		set.bitmaps = (uint32_t)((1ull << c->exp->nr_bitmaps) - 1);
	}
	pos = 8 + nlen;
	for (uint32_t i = 0; i < nq; i++) {
		uint32_t qlen = nbd_get32(data + pos);
		match_query(c, data + pos + 4, qlen, list, &set);
		pos += 4 + qlen;
	}
	if (!list) {
		c->ctx_allocation = set.alloc;
		c->ctx_depth = set.depth;
		c->ctx_bitmaps = set.bitmaps;
	}
	return send_contexts(c, opt, &set);
}

static const char *opt_name(uint32_t opt)
{
	switch (opt) {
	case NBD_OPT_PEEK_EXPORT: return "PEEK_EXPORT";
	case NBD_OPT_EXTENDED_HEADERS: return "EXTENDED_HEADERS";
	default: return "<unknown>";
	}
}

static int opt_starttls(struct nbd_conn *c, uint32_t len)
{
	if (len)
		return send_err(c, NBD_OPT_STARTTLS, NBD_REP_ERR_INVALID,
				"OPT_STARTTLS should not have length");
	return send_err(c, NBD_OPT_STARTTLS, NBD_REP_ERR_UNSUP,
			"TLS is not supported");
}

static int opt_structured_reply(struct nbd_conn *c, uint32_t len)
{
	uint32_t opt = NBD_OPT_STRUCTURED_REPLY;

	if (len)
		return send_err(c, opt, NBD_REP_ERR_INVALID,
				"OPT_STRUCTURED_REPLY should not have length");
	if (c->structured)
		return send_err(c, opt, NBD_REP_ERR_INVALID,
				"structured reply already negotiated");
	c->structured = true;
	return send_ack(c, opt);
}

/* What next_option() returns when the client left by the rules (ABORT,
 * or end of stream between options); nbd_negotiate() returns 0 then. */
#define NBD_LEFT 2

/* Answer option `opt` whose `len` bytes of data are in `data`. Returns as
 * next_option(). */
static int run_option(struct nbd_conn *c, uint32_t opt, const uint8_t *data,
		      uint32_t len)
{
	switch (opt) {
	case NBD_OPT_EXPORT_NAME:
		return opt_export_name(c, data, len);
	case NBD_OPT_ABORT:
		/* The client may already have closed: ignore errors. */
		(void)send_ack(c, opt);
		return NBD_LEFT;
	case NBD_OPT_LIST:
		return opt_list(c, len);
	case NBD_OPT_STARTTLS:
		return opt_starttls(c, len);
	case NBD_OPT_INFO:
	case NBD_OPT_GO:
		return opt_info_go(c, opt, data, len);
	case NBD_OPT_STRUCTURED_REPLY:
		return opt_structured_reply(c, len);
	case NBD_OPT_LIST_META_CONTEXT:
	case NBD_OPT_SET_META_CONTEXT:
		return opt_meta_context(c, opt, data, len);
	default:
		return send_err(c, opt, NBD_REP_ERR_UNSUP,
				"Unsupported option %u (%s)", opt,
				opt_name(opt));
	}
}

/*
 * Read the next option, its data into `data` (NBD_MAX_OPTION_DATA bytes),
 * and answer it. Data longer than that is skipped unread and answered with
 * ERR_TOO_BIG. Returns 0 to go on haggling, 1 when the client chose the
 * export (transmission follows), NBD_LEFT when it left by the rules,
 * -EPROTO when it broke them, or another negative errno from the socket.
 */
static int next_option(struct nbd_conn *c, uint8_t *data)
{
	uint8_t hdr[16];
	uint32_t opt, len;
	int r;

	r = nbd_recv_all(&c->sock, hdr, sizeof(hdr));
	if (r < 0)
		/* Leaving between options is allowed (if rude). */
		return r == -EPIPE ? NBD_LEFT : r;
	if (nbd_get64(hdr) != NBD_OPTS_MAGIC)
		return -EPROTO;
	opt = nbd_get32(hdr + 8);
	len = nbd_get32(hdr + 12);
	if (len > NBD_MAX_OPTION_DATA) {
		if ((r = nbd_recv_skip(&c->sock, len)) < 0)
			return r;
		if (opt == NBD_OPT_EXPORT_NAME)
			return -EPROTO;         /* cannot be answered */
		return send_err(c, opt, NBD_REP_ERR_TOO_BIG,
				"option data too long (%u bytes)", len);
	}
	if (len && (r = nbd_recv_all(&c->sock, data, len)) < 0)
		return r;
	return run_option(c, opt, data, len);
}

/* Send the greeting and take the client's flags. Returns 1 to go on to
 * the options, 0 when the client left before sending its flags, -EPROTO
 * for flags we do not know, or another negative errno. */
static int greet(struct nbd_conn *c)
{
	uint8_t buf[18], cf[4];
	uint32_t cflags;
	int r;

	nbd_put64(buf, NBD_MAGIC);
	nbd_put64(buf + 8, NBD_OPTS_MAGIC);
	nbd_put16(buf + 16, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
	if ((r = nbd_send_all(&c->sock, buf, sizeof(buf))) < 0)
		return r;
	if ((r = nbd_recv_all(&c->sock, cf, sizeof(cf))) < 0)
		return r == -EPIPE ? 0 : r;
	cflags = nbd_get32(cf);
	if (cflags & ~(uint32_t)(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES))
		return -EPROTO;
	c->no_zeroes = cflags & NBD_FLAG_C_NO_ZEROES;
	return 1;
}

int nbd_negotiate(struct nbd_conn *c)
{
	uint8_t *data;
	int r;

	if ((r = greet(c)) <= 0)
		return r;
	data = malloc(NBD_MAX_OPTION_DATA);
	if (data == NULL)
		return -ENOMEM;
	while ((r = next_option(c, data)) == 0)
		;
	free(data);
	return r == NBD_LEFT ? 0 : r;
}
