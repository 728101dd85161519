/*
 * conn.h - private to nbd/: one client connection, shared by the
 * handshake (handshake.c) and transmission (request.c) phases, and the
 * socket and byte-order helpers both use.
 *
 * SPDX-License-Identifier: MIT
 */
#ifndef QK_NBD_CONN_H
#define QK_NBD_CONN_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include "protocol.h"
#include "server.h"

/* Context ids handed out by SET_META_CONTEXT (the same as qemu-nbd's). */
#define NBD_CTX_ID_ALLOCATION 0
#define NBD_CTX_ID_DEPTH      1

/* Largest READ or WRITE payload, and the BLOCK_SIZE maximum we advertise
 * (qemu-nbd's limit too). */
#define NBD_MAX_PAYLOAD       (32u << 20)

struct nbd_conn {
	int fd;
	qk_image *img;
	const struct nbd_export *exp;
	uint64_t size;            /* export size in bytes */

	/* How long the socket helpers below may wait. While `deadline` is
	 * set (the handshake) every receive and send must end by then;
	 * after it (0) a receive waits as long as the client likes, and a
	 * send gives up once the client has taken nothing for send_stall_ms. */
	int64_t deadline;         /* nbd_now_ms() time, or 0 */
	int send_stall_ms;

	/* Set by the handshake. */
	bool no_zeroes;           /* client agreed to NBD_FLAG_C_NO_ZEROES */
	bool structured;          /* NBD_OPT_STRUCTURED_REPLY acknowledged */
	bool ctx_allocation;      /* base:allocation selected */
	bool ctx_depth;           /* qemu:allocation-depth selected */
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

/* CLOCK_MONOTONIC in milliseconds, the clock of nbd_conn.deadline. */
int64_t nbd_now_ms(void);

/* Read exactly len bytes from c->fd. Returns 0, -EPIPE at end of stream
 * (also after part of the bytes), -ETIMEDOUT when c->deadline passes
 * first, or another negative errno. */
int nbd_recv_all(struct nbd_conn *c, void *buf, size_t len);
/* Read and drop len bytes (as nbd_recv_all). */
int nbd_recv_skip(struct nbd_conn *c, uint64_t len);
/* Write all of iov[0..n) to c->fd (n may exceed IOV_MAX; iov is
 * modified). Never raises SIGPIPE. Returns 0, -ETIMEDOUT when c->deadline
 * passes first or the client takes no byte for c->send_stall_ms, or
 * another negative errno. Callers serialise sends themselves. */
int nbd_send_iov(struct nbd_conn *c, struct iovec *iov, int n);
int nbd_send_all(struct nbd_conn *c, const void *buf, size_t len);

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
