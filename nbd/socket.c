/*
 * socket.c - the socket layer of nbd/: every byte the server receives or
 * sends goes through the calls here, in the handshake and in transmission.
 *
 * Design note. One receive loop and one send loop, and the time rules of
 * struct nbd_sock are kept in them only:
 * - Under a deadline (the handshake), a receive waits in poll() and then
 *   takes what has come without blocking, and a send waits for room in
 *   poll(), both never past the deadline: a blocking call could outlast it.
 * - Without one (transmission), a receive blocks in recv() (the client may
 *   think as long as it likes; shutdown() of the socket ends the wait), and
 *   a send gives up once the client has taken no byte for send_stall_ms.
 * - The kernel is never left to block a send: sendmsg() takes what fits,
 *   and a full socket is waited for in poll(). While the client keeps up,
 *   this costs nothing over a blocking send; when the socket fills, one
 *   poll() stands in for the sleep inside the kernel.
 * The same system calls are made whichever phase asks, so the layer adds
 * nothing to the per-request cost of transmission.
 *
 * SPDX-License-Identifier: MIT
 */
#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <stdbool.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include "socket.h"

int64_t nbd_now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/*
 * Wait until `fd` is ready for `events`, or has an error or hang-up (which
 * the next recv or send reports), but not past the time `until`
 * (nbd_now_ms()). Returns 0, -ETIMEDOUT, or a negative errno from poll().
 */
static int wait_ready(int fd, short events, int64_t until)
{
	for (;;) {
		struct pollfd p = { fd, events, 0 };
		int64_t left = until - nbd_now_ms();
		int r;

		if (left <= 0)
			return -ETIMEDOUT;
		r = poll(&p, 1, left < INT_MAX ? (int)left : INT_MAX);
		if (r > 0)
			return 0;
		if (r < 0 && errno != EINTR)
			return -errno;
	}
}

int nbd_recv_some(struct nbd_sock *s, void *buf, size_t min, size_t max,
		  size_t *got)
{
	uint8_t *p = buf;
	bool nowait = s->deadline != 0 || min == 0;

	*got = 0;
	for (;;) {
		ssize_t n;
		int r;

		if (s->deadline && min > 0 &&
		    (r = wait_ready(s->fd, POLLIN, s->deadline)) < 0)
			return r;
		n = recv(s->fd, p + *got, max - *got, nowait ? MSG_DONTWAIT : 0);
		if (n > 0) {
			*got += (size_t)n;
			if (*got >= min)
				return 0;
			continue;
		}
		if (n == 0)
			return -EPIPE;
		if (errno == EINTR)
			continue;
		if (errno == EAGAIN || errno == EWOULDBLOCK) {
			if (min == 0)
				return 0;       /* nothing has come */
			if (nowait)
				continue;       /* poll() again */
		}
		return errno == ECONNRESET ? -EPIPE : -errno;
	}
}

int nbd_recv_all(struct nbd_sock *s, void *buf, size_t len)
{
	size_t got;

	return len ? nbd_recv_some(s, buf, len, len, &got) : 0;
}

int nbd_recv_skip(struct nbd_sock *s, uint64_t len)
{
	uint8_t buf[4096];

	while (len > 0) {
		size_t n = len < sizeof(buf) ? (size_t)len : sizeof(buf);
		int r = nbd_recv_all(s, buf, n);
		if (r < 0)
			return r;
		len -= n;
	}
	return 0;
}

/* Drop the first `done` bytes of iov[0..*n), which were sent. */
static struct iovec *iov_advance(struct iovec *iov, int *n, size_t done)
{
	while (*n > 0 && done >= iov->iov_len) {
		done -= iov->iov_len;
		iov++;
		(*n)--;
	}
	if (*n > 0) {
		iov->iov_base = (uint8_t *)iov->iov_base + done;
		iov->iov_len -= done;
	}
	return iov;
}

int nbd_send_iov(struct nbd_sock *s, struct iovec *iov, int n)
{
	int64_t until = 0;      /* give up then; 0 until the socket is full */

	while (n > 0) {
		struct msghdr m;
		size_t want = 0;
		ssize_t w;
		int r;

		memset(&m, 0, sizeof(m));
		m.msg_iov = iov;
		m.msg_iovlen = n < IOV_MAX ? (size_t)n : IOV_MAX;
		for (size_t i = 0; i < m.msg_iovlen; i++)
			want += iov[i].iov_len;
		w = sendmsg(s->fd, &m, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			if (errno != EAGAIN && errno != EWOULDBLOCK)
				return -errno;
			w = 0;
		}
		if (w > 0)
			until = 0;      /* progress: the stall clock restarts */
		if ((size_t)w < want) {
			if (until == 0)
				until = s->deadline ? s->deadline
						    : nbd_now_ms() + s->send_stall_ms;
			if ((r = wait_ready(s->fd, POLLOUT, until)) < 0)
				return r;
		}
		iov = iov_advance(iov, &n, (size_t)w);
	}
	return 0;
}

int nbd_send_all(struct nbd_sock *s, const void *buf, size_t len)
{
	struct iovec iov = { (void *)buf, len };

	return nbd_send_iov(s, &iov, 1);
}
