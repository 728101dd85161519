/*
 * server.c - one connection (nbd_serve_conn), and the listening server
 * (nbd_server_run).
 *
 * Design note. The listening thread owns everything but the connections:
 * it polls the listening sockets, a signalfd for SIGINT/SIGTERM, and an
 * eventfd that connection threads write when they end. Each accepted
 * client gets a thread running nbd_serve_conn(). Invariants:
 * - At most max_clients connection threads exist; while the limit is
 *   reached the listening sockets are not polled, so further clients wait
 *   in the backlog (as with qemu-nbd -e).
 * - No client can hold a connection thread (and so an -e place) by
 *   misbehaving: the whole handshake must end within
 *   NBD_HANDSHAKE_LIMIT_MS, and in transmission a send waits at most
 *   NBD_SEND_STALL_MS for the client to take a byte (nbd_serve_conn sets
 *   them in the connection's struct nbd_sock; socket.c keeps them). Only a
 *   client that reads its replies and sends whole requests stays, idle or
 *   not.
 *   Connections do not wait on each other, so one stuck client never
 *   delays another's service.
 * - The listening thread never blocks but in poll(), and never spins:
 *   when accept() fails for want of descriptors or memory, the listening
 *   sockets rest for NBD_ACCEPT_PAUSE_MS (or until a client leaves).
 * - Only the listening thread joins connection threads and closes their
 *   sockets, after they have said they are done.
 * - Without -t the server ends when the last client that reached
 *   transmission has gone; clients dropped in the handshake do not count.
 * - Stopping (a signal) shuts down the read side of every socket: readers
 *   see end of stream, requests in flight finish and are answered, the
 *   image is flushed. Clients that will not take their replies within
 *   NBD_STOP_GRACE_MS have the whole socket shut down.
 *
 * SPDX-License-Identifier: MIT
 */
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "conn.h"

#define NBD_DEFAULT_PORT "10809"
#define NBD_DEFAULT_ADDR "127.0.0.1"
#define NBD_MAX_LISTEN   8     /* listening sockets (addresses of -b) */
#define NBD_STOP_GRACE_MS 10000

/*
 * The whole handshake, from the connection being handed over after
 * accept() to the end of option haggling (GO or EXPORT_NAME answered),
 * must be over within this, whatever the client's byte rate: a client
 * that stays silent, trickles its bytes, or floods options without
 * reading the replies cannot hold one of the -e places for longer.
 * qemu-nbd's limit (10 s) too; a real client needs a few round trips.
 */
#define NBD_HANDSHAKE_LIMIT_MS 10000
/*
 * In transmission, a send that finds the socket full waits for the client
 * to take bytes for at most this long; then the connection is dropped,
 * freeing the threads that wait to send to it and its -e place. The clock
 * restarts with every byte taken, so a slow client that keeps reading a
 * 32 MiB reply is never cut, however long the reply takes. Three times
 * the handshake limit: a live client stopped for a while by a loaded
 * machine is not dropped. (qemu-nbd has no such limit and waits for ever.)
 */
#define NBD_SEND_STALL_MS 30000
/*
 * After accept() fails for want of descriptors or memory (EMFILE, ENFILE,
 * ENOBUFS, ENOMEM), or an accepted client cannot get its thread, the
 * listening sockets are not polled for this long: the client left in the
 * backlog would fail the same way at once, and poll() would report it
 * again at once, spinning a core. Four tries a second cost nothing; a
 * client leaving (a descriptor came free) ends the pause at once.
 */
#define NBD_ACCEPT_PAUSE_MS 250

/*
 * Tests only: QCOWKIT_NBD_TEST_LIMITS="HANDSHAKE_MS,SEND_STALL_MS" shortens
 * the two limits above, so that the tests need not wait 10 or 30 seconds
 * a case. It cannot lengthen them (larger values, zero, or anything
 * malformed leave the defaults), so it cannot switch the protection off.
 */
static int handshake_limit_ms = NBD_HANDSHAKE_LIMIT_MS;
static int send_stall_ms = NBD_SEND_STALL_MS;
static pthread_once_t limits_once = PTHREAD_ONCE_INIT;

static void read_test_limits(void)
{
	const char *v = getenv("QCOWKIT_NBD_TEST_LIMITS");
	char *end;
	long h, st;

	if (v == NULL)
		return;
	errno = 0;
	h = strtol(v, &end, 10);
	if (*end != ',')
		return;
	st = strtol(end + 1, &end, 10);
	if (*end != '\0' || errno)
		return;
	if (h > 0 && h < handshake_limit_ms)
		handshake_limit_ms = (int)h;
	if (st > 0 && st < send_stall_ms)
		send_stall_ms = (int)st;
}

/* ---- one connection ------------------------------------------------------------- */

/* nbd_serve_conn, and whether the client got as far as transmission. */
static int serve_conn(int fd, qk_image *img, const struct nbd_export *exp,
		      bool *negotiated)
{
	struct nbd_conn c;
	int r;

	pthread_once(&limits_once, read_test_limits);
	memset(&c, 0, sizeof(c));
	c.sock.fd = fd;
	c.img = img;
	c.exp = exp;
	c.size = qk_get_size(img);
	c.sock.send_stall_ms = send_stall_ms;
	c.sock.deadline = nbd_now_ms() + handshake_limit_ms;
	r = nbd_negotiate(&c);
	c.sock.deadline = 0;
	*negotiated = r == 1;
	if (r == 1)
		r = nbd_transmission(&c);
	return r;
}

int nbd_serve_conn(int fd, qk_image *img, const struct nbd_export *exp)
{
	bool negotiated;

	return serve_conn(fd, img, exp, &negotiated);
}

/* ---- the listening server --------------------------------------------------------- */

struct server;

struct client {
	struct client *next;
	struct server *s;
	pthread_t tid;
	int fd;
	bool done;              /* under s->lock */
	bool negotiated;        /* reached transmission; set before done */
};

struct server {
	const struct nbd_server_config *cfg;
	qk_image *img;
	const struct nbd_export *exp;
	pthread_mutex_t lock;
	struct client *clients;
	unsigned nclients;      /* changed by the listening thread only */
	int wake_fd;            /* eventfd: a client thread has ended */
	int sig_fd;             /* signalfd: SIGINT, SIGTERM */
	int lfds[NBD_MAX_LISTEN];
	int nl;                 /* listening sockets in lfds */
	bool pid_written;
	bool served;            /* a client that reached transmission left */
	bool stopping;          /* a signal came */
	bool hard;              /* stopping, and the grace time has passed */
	int64_t stop_hard;      /* stopping: shut sockets down then */
	int64_t pause_until;    /* accept() paused until then, or 0 */
};

static void *client_main(void *arg)
{
	struct client *cl = arg;
	struct server *s = cl->s;
	uint64_t one = 1;
	bool negotiated;

	(void)serve_conn(cl->fd, s->img, s->exp, &negotiated);
	pthread_mutex_lock(&s->lock);
	cl->negotiated = negotiated;
	cl->done = true;
	pthread_mutex_unlock(&s->lock);
	if (write(s->wake_fd, &one, sizeof(one)) < 0) {
		/* An eventfd write fails only on counter overflow. */
	}
	return NULL;
}

/* Join and free the clients that have ended. Returns how many did, and
 * sets s->served when one of them had reached transmission. */
static unsigned reap(struct server *s)
{
	struct client **pp = &s->clients;
	unsigned n = 0;

	pthread_mutex_lock(&s->lock);
	while (*pp) {
		struct client *cl = *pp;
		if (!cl->done) {
			pp = &cl->next;
			continue;
		}
		*pp = cl->next;
		if (cl->negotiated)
			s->served = true;
		pthread_mutex_unlock(&s->lock);
		pthread_join(cl->tid, NULL);
		close(cl->fd);
		free(cl);
		s->nclients--;
		n++;
		pthread_mutex_lock(&s->lock);
	}
	pthread_mutex_unlock(&s->lock);
	return n;
}

static void shutdown_all(struct server *s, int how)
{
	pthread_mutex_lock(&s->lock);
	for (struct client *cl = s->clients; cl; cl = cl->next)
		if (!cl->done)
			shutdown(cl->fd, how);
	pthread_mutex_unlock(&s->lock);
}

static int listen_unix(const char *path, int *fds, char *err, size_t errlen)
{
	struct sockaddr_un sa;
	struct stat st;
	int fd;

	memset(&sa, 0, sizeof(sa));
	sa.sun_family = AF_UNIX;
	if (strlen(path) >= sizeof(sa.sun_path)) {
		snprintf(err, errlen, "Socket path '%s' is too long", path);
		return -ENAMETOOLONG;
	}
	strcpy(sa.sun_path, path);
	/* A stale socket from an earlier run is replaced, as qemu-nbd does;
	 * anything else at the path is not touched. */
	if (lstat(path, &st) == 0 && S_ISSOCK(st.st_mode))
		unlink(path);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 ||
	    listen(fd, 128) < 0) {
		int e = errno;
		snprintf(err, errlen, "Failed to listen on socket '%s': %s",
			 path, strerror(e));
		if (fd >= 0)
			close(fd);
		return -e;
	}
	fds[0] = fd;
	return 1;
}

static int listen_tcp(const char *addr, const char *port, int *fds,
		      char *err, size_t errlen)
{
	struct addrinfo hints, *res, *ai;
	int n = 0, e = 0, one = 1, r;

	memset(&hints, 0, sizeof(hints));
	hints.ai_family = AF_UNSPEC;
	hints.ai_socktype = SOCK_STREAM;
	hints.ai_flags = AI_PASSIVE;
	r = getaddrinfo(addr, port, &hints, &res);
	if (r != 0) {
		snprintf(err, errlen, "address resolution failed for %s:%s: %s",
			 addr, port, gai_strerror(r));
		return -EINVAL;
	}
	for (ai = res; ai && n < NBD_MAX_LISTEN; ai = ai->ai_next) {
		int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC,
				ai->ai_protocol);
		if (fd < 0) {
			e = errno;
			continue;
		}
		setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
		if (ai->ai_family == AF_INET6)
			setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
		if (bind(fd, ai->ai_addr, ai->ai_addrlen) < 0 ||
		    listen(fd, 128) < 0) {
			e = errno;
			close(fd);
			continue;
		}
		fds[n++] = fd;
	}
	freeaddrinfo(res);
	if (n == 0) {
		snprintf(err, errlen, "Failed to listen on %s:%s: %s", addr,
			 port, strerror(e ? e : EADDRNOTAVAIL));
		return -(e ? e : EADDRNOTAVAIL);
	}
	return n;
}

static int write_pid_file(const char *path, char *err, size_t errlen)
{
	char buf[32];
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	int n = snprintf(buf, sizeof(buf), "%d\n", (int)getpid());

	if (fd < 0 || write(fd, buf, (size_t)n) != n) {
		int e = errno;
		snprintf(err, errlen, "Failed to write pid file '%s': %s", path,
			 strerror(e));
		if (fd >= 0)
			close(fd);
		return -e;
	}
	close(fd);
	return 0;
}

/* accept() failed with `e`: may the next pending client be taken at once?
 * Yes when the failure used up the client it was about (aborted, or a
 * network error Linux passes on from the new socket, to be treated as
 * EAGAIN); no for a shortage (EMFILE, ENFILE, ENOBUFS, ENOMEM) and for
 * anything unforeseen, which might come back as fast as it is retried. */
static bool accept_retry_now(int e)
{
	switch (e) {
	case EINTR: case EAGAIN: case ECONNABORTED: case EPROTO: case EPERM:
	case ENETDOWN: case ENOPROTOOPT: case EHOSTDOWN: case ENONET:
	case EHOSTUNREACH: case EOPNOTSUPP: case ENETUNREACH:
#if EWOULDBLOCK != EAGAIN
	case EWOULDBLOCK:
#endif
		return true;
	default:
		return false;
	}
}

/* Add a client thread serving `fd`. Returns 0, or -1 when out of memory
 * or threads (then `fd` is closed). */
static int start_client(struct server *s, int fd)
{
	struct client *cl = calloc(1, sizeof(*cl));

	if (cl == NULL) {
		close(fd);
		return -1;
	}
	cl->s = s;
	cl->fd = fd;
	pthread_mutex_lock(&s->lock);
	if (pthread_create(&cl->tid, NULL, client_main, cl) != 0) {
		pthread_mutex_unlock(&s->lock);
		close(fd);
		free(cl);
		return -1;
	}
	cl->next = s->clients;
	s->clients = cl;
	s->nclients++;
	pthread_mutex_unlock(&s->lock);
	return 0;
}

/* Accept the clients waiting on the n listening sockets of pfd that poll()
 * found ready, while there is room (max_clients). A shortage pauses
 * accepting for NBD_ACCEPT_PAUSE_MS. */
static void accept_clients(struct server *s, const struct pollfd *pfd, int n)
{
	for (int i = 0; i < n; i++) {
		int fd, one = 1;

		if (!(pfd[i].revents & POLLIN))
			continue;
		if (s->cfg->max_clients && s->nclients >= s->cfg->max_clients)
			break;
		fd = accept4(pfd[i].fd, NULL, NULL, SOCK_CLOEXEC);
		if (fd < 0) {
			if (accept_retry_now(errno))
				continue;
		} else {
			if (!s->cfg->socket_path)
				setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one,
					   sizeof(one));
			if (start_client(s, fd) == 0)
				continue;
		}
		s->pause_until = nbd_now_ms() + NBD_ACCEPT_PAUSE_MS;
		break;
	}
}

/* Fill pfd with what the listening thread waits for: the signalfd, the
 * eventfd, then the listening sockets unless stopping, full or paused.
 * Returns the count; *timeout is when poll() must return to end the
 * pause or the stop's grace time (-1: never). */
static int poll_set(struct server *s, struct pollfd *pfd, int *timeout)
{
	bool room = s->cfg->max_clients == 0 ||
		    s->nclients < s->cfg->max_clients;
	int64_t now = nbd_now_ms(), wake = INT64_MAX;
	int np = 0;

	if (s->pause_until && now >= s->pause_until)
		s->pause_until = 0;
	pfd[np].fd = s->sig_fd;
	pfd[np++].events = POLLIN;
	pfd[np].fd = s->wake_fd;
	pfd[np++].events = POLLIN;
	if (!s->stopping && room && !s->pause_until)
		for (int i = 0; i < s->nl; i++) {
			pfd[np].fd = s->lfds[i];
			pfd[np++].events = POLLIN;
		}
	if (s->stopping && !s->hard)
		wake = s->stop_hard;
	else if (!s->stopping && room && s->pause_until)
		wake = s->pause_until;
	*timeout = -1;
	if (wake != INT64_MAX)
		*timeout = wake - now < 1 ? 1 : (int)(wake - now);
	return np;
}

/* The signalfd is readable: the first signal starts the stop. */
static void on_signal(struct server *s)
{
	struct signalfd_siginfo si;

	if (read(s->sig_fd, &si, sizeof(si)) > 0 && !s->stopping) {
		s->stopping = true;
		s->stop_hard = nbd_now_ms() + NBD_STOP_GRACE_MS;
		shutdown_all(s, SHUT_RD);
	}
}

/* The eventfd is readable: clients have ended. */
static void on_client_gone(struct server *s)
{
	uint64_t v;

	if (read(s->wake_fd, &v, sizeof(v)) < 0) {
		/* Nothing to do: reap looks at the flags. */
	}
	/* A client gone is a descriptor free: try accept() again at once. */
	if (reap(s) > 0)
		s->pause_until = 0;
}

/*
 * Serve until stopped (a signal and all clients gone) or, without -t,
 * until the last client that reached transmission has gone. Returns 0, or
 * a negative errno with a message in err[errlen] when poll() failed.
 */
static int serve_loop(struct server *s, char *err, size_t errlen)
{
	for (;;) {
		struct pollfd pfd[2 + NBD_MAX_LISTEN];
		int timeout, np = poll_set(s, pfd, &timeout), r;

		if (poll(pfd, (nfds_t)np, timeout) < 0) {
			if (errno == EINTR)
				continue;
			if (errno == ENOMEM) {
				/* Short of memory for a moment, perhaps:
				 * better wait than drop every client. */
				struct timespec ts = { 0, NBD_ACCEPT_PAUSE_MS * 1000000L };
				nanosleep(&ts, NULL);
				continue;
			}
			r = -errno;
			snprintf(err, errlen, "poll: %s", strerror(-r));
			return r;
		}
		if (pfd[0].revents & POLLIN)
			on_signal(s);
		if (pfd[1].revents & POLLIN)
			on_client_gone(s);
		/* Only clients that got as far as transmission count: one
		 * dropped in the handshake (a port scan, a silent or slow
		 * client) must not end the service, as with qemu-nbd. */
		if (s->nclients == 0 &&
		    (s->stopping || (s->served && !s->cfg->persistent)))
			return 0;
		if (s->stopping && !s->hard && nbd_now_ms() >= s->stop_hard) {
			s->hard = true;
			shutdown_all(s, SHUT_RDWR);
		}
		accept_clients(s, pfd + 2, np - 2);
	}
}

/* After serve_loop: end the clients that remain (only after a poll
 * failure can there be any), then flush a writable image. Returns r, or
 * the flush's error when r is 0 (with its message in err[errlen]). */
static int serve_end(struct server *s, int r, char *err, size_t errlen)
{
	if (s->nclients) {
		shutdown_all(s, SHUT_RDWR);
		while (s->nclients) {
			uint64_t v;
			if (read(s->wake_fd, &v, sizeof(v)) < 0 && errno != EINTR)
				break;
			reap(s);
		}
	}
	if (!s->exp->readonly) {
		int fr = qk_flush(s->img);
		if (fr < 0 && r == 0) {
			snprintf(err, errlen, "%s", qk_last_error());
			r = fr;
		}
	}
	return r;
}

/* Listen as s->cfg says. Returns 0, or a negative errno with a message in
 * err[errlen] (nothing is left open). */
static int open_listeners(struct server *s, char *err, size_t errlen)
{
	const struct nbd_server_config *cfg = s->cfg;
	const char *addr = cfg->bind_addr ? cfg->bind_addr : NBD_DEFAULT_ADDR;
	const char *port = cfg->port ? cfg->port : NBD_DEFAULT_PORT;

	if (cfg->socket_path)
		s->nl = listen_unix(cfg->socket_path, s->lfds, err, errlen);
	else
		s->nl = listen_tcp(addr, port, s->lfds, err, errlen);
	return s->nl < 0 ? s->nl : 0;
}

/* Once listening: the signalfd (for the signals in `mask`), the eventfd,
 * the pid file. Returns 0, or a negative errno with a message in
 * err[errlen] (what was made is undone by close_server). */
static int open_events(struct server *s, const sigset_t *mask,
		       char *err, size_t errlen)
{
	int r;

	s->sig_fd = signalfd(-1, mask, SFD_CLOEXEC);
	s->wake_fd = eventfd(0, EFD_CLOEXEC);
	if (s->sig_fd < 0 || s->wake_fd < 0) {
		r = -errno;
		snprintf(err, errlen, "Could not set up the server: %s",
			 strerror(-r));
		return r;
	}
	if (s->cfg->pid_file) {
		if ((r = write_pid_file(s->cfg->pid_file, err, errlen)) < 0)
			return r;
		s->pid_written = true;
	}
	return 0;
}

/* Undo open_listeners and open_events: the Unix socket and the pid file
 * are removed. */
static void close_server(struct server *s)
{
	for (int i = 0; i < s->nl; i++)
		close(s->lfds[i]);
	if (s->cfg->socket_path)
		unlink(s->cfg->socket_path);
	if (s->pid_written)
		unlink(s->cfg->pid_file);
	if (s->sig_fd >= 0)
		close(s->sig_fd);
	if (s->wake_fd >= 0)
		close(s->wake_fd);
}

int nbd_server_run(const struct nbd_server_config *cfg, qk_image *img,
		   const struct nbd_export *exp, char *err, size_t errlen)
{
	struct server s;
	sigset_t mask;
	int r;

	memset(&s, 0, sizeof(s));
	s.cfg = cfg;
	s.img = img;
	s.exp = exp;
	s.wake_fd = -1;
	s.sig_fd = -1;
	pthread_mutex_init(&s.lock, NULL);

	/* Signals arrive through the signalfd only: every thread started
	 * from here on inherits the blocked mask. */
	sigemptyset(&mask);
	sigaddset(&mask, SIGINT);
	sigaddset(&mask, SIGTERM);
	pthread_sigmask(SIG_BLOCK, &mask, NULL);
	signal(SIGPIPE, SIG_IGN);

	if ((r = open_listeners(&s, err, errlen)) < 0) {
		pthread_mutex_destroy(&s.lock);
		return r;
	}
	if ((r = open_events(&s, &mask, err, errlen)) == 0)
		r = serve_end(&s, serve_loop(&s, err, errlen), err, errlen);
	close_server(&s);
	pthread_mutex_destroy(&s.lock);
	return r;
}
