/*
 * socket.h - private to nbd/: the one socket layer both NBD phases use
 * (handshake.c and request.c): receive, skip and send on a connected
 * stream socket, each bounded in time by the rules of struct nbd_sock.
 *
 * SPDX-License-Identifier: MIT
 */
#ifndef QK_NBD_SOCKET_H
#define QK_NBD_SOCKET_H

#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

/*
 * A connected socket and how long its calls may wait. While `deadline` is
 * set (the handshake) every receive and send must end by then; without it
 * (0, transmission) a receive waits as long as the client likes (a
 * shutdown() of the socket ends the wait), and a send gives up once the
 * client has taken nothing for `send_stall_ms`.
 */
struct nbd_sock {
	int fd;                   /* blocking; never closed here */
	int64_t deadline;         /* nbd_now_ms() time, or 0 */
	int send_stall_ms;
};

/* CLOCK_MONOTONIC in milliseconds, the clock of nbd_sock.deadline. */
int64_t nbd_now_ms(void);

/*
 * Receive at least `min` and at most `max` bytes (min <= max, 0 < max)
 * into buf: what the socket has, waiting only while fewer than `min` have
 * come. min == 0 never waits: it takes what has already arrived, maybe
 * nothing. *got is set to the bytes received, on failure too.
 * Returns 0 (then min <= *got <= max), -EPIPE at end of stream or a reset,
 * -ETIMEDOUT when the deadline passes first, or another negative errno.
 */
int nbd_recv_some(struct nbd_sock *s, void *buf, size_t min, size_t max,
		  size_t *got);

/* Receive exactly len bytes. Returns 0, or < 0 as nbd_recv_some(). */
int nbd_recv_all(struct nbd_sock *s, void *buf, size_t len);

/* Receive and drop len bytes. Returns 0, or < 0 as nbd_recv_some(). */
int nbd_recv_skip(struct nbd_sock *s, uint64_t len);

/*
 * Send all of iov[0..n) (n may exceed IOV_MAX; iov is modified). Never
 * raises SIGPIPE. Returns 0, -ETIMEDOUT when the deadline passes first or
 * the client takes no byte for send_stall_ms, or another negative errno.
 * Callers serialise sends themselves.
 */
int nbd_send_iov(struct nbd_sock *s, struct iovec *iov, int n);

/* Send len bytes from buf, as nbd_send_iov(). */
int nbd_send_all(struct nbd_sock *s, const void *buf, size_t len);

#endif /* QK_NBD_SOCKET_H */
