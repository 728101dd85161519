/*
 * conn.h - private to nbd/: one client connection, shared by the
 * handshake (handshake.c) and transmission (request.c) phases, and the
 * byte-order helpers both use. Their socket calls are in socket.h.
 *
 * SPDX-License-Identifier: MIT
 */
#ifndef QK_NBD_CONN_H
#define QK_NBD_CONN_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "protocol.h"
#include "server.h"
#include "socket.h"

/* Context ids handed out by SET_META_CONTEXT (the same as qemu-nbd's). */
#define NBD_CTX_ID_ALLOCATION 0
#define NBD_CTX_ID_DEPTH      1
#define NBD_CTX_ID_BITMAP     2 /* + the index of the export's bitmap */

/* Largest READ or WRITE payload, and the BLOCK_SIZE maximum we advertise
 * (qemu-nbd's limit too). */
#define NBD_MAX_PAYLOAD       (32u << 20)

struct nbd_conn {
	struct nbd_sock sock;     /* its deadline is set for the handshake */
	qk_image *img;
	const struct nbd_export *exp;
	uint64_t size;            /* export size in bytes */

	/* Set by the handshake. */
	bool no_zeroes;           /* client agreed to NBD_FLAG_C_NO_ZEROES */
	bool structured;          /* NBD_OPT_STRUCTURED_REPLY acknowledged */
	bool ctx_allocation;      /* base:allocation selected */
	bool ctx_depth;           /* qemu:allocation-depth selected */
	uint32_t ctx_bitmaps;     /* bit i: qemu:dirty-bitmap of bitmaps[i] */
};

/* Transmission flags of this export for this connection. */
uint16_t nbd_tflags(const struct nbd_conn *c);

/* handshake.c: run the option haggling. Returns 1 when the client chose
 * the export (transmission follows), 0 when it left cleanly (ABORT, or
 * EOF before any option), -EPROTO on a protocol violation, or another
 * negative errno from the socket. */
int nbd_negotiate(struct nbd_conn *c);

/* request.c: serve requests until the client leaves; see nbd_serve_conn. */
int nbd_transmission(struct nbd_conn *c);

static inline void nbd_put16(uint8_t *p, uint16_t v)
{
	p[0] = (uint8_t)(v >> 8);
	p[1] = (uint8_t)v;
}
static inline void nbd_put32(uint8_t *p, uint32_t v)
{
	p[0] = (uint8_t)(v >> 24);
	p[1] = (uint8_t)(v >> 16);
	p[2] = (uint8_t)(v >> 8);
	p[3] = (uint8_t)v;
}
static inline void nbd_put64(uint8_t *p, uint64_t v)
{
	nbd_put32(p, (uint32_t)(v >> 32));
	nbd_put32(p + 4, (uint32_t)v);
}
static inline uint16_t nbd_get16(const uint8_t *p)
{
	return (uint16_t)((p[0] << 8) | p[1]);
}
static inline uint32_t nbd_get32(const uint8_t *p)
{
	return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) |
	       ((uint32_t)p[2] << 8) | p[3];
}
static inline uint64_t nbd_get64(const uint8_t *p)
{
	return ((uint64_t)nbd_get32(p) << 32) | nbd_get32(p + 4);
}

#endif /* QK_NBD_CONN_H */
