/*
 * server.h - qcowkit's NBD server: one image, one export, many clients.
 *
 * nbd_serve_conn() speaks the whole protocol (handshake, then transmission)
 * on one connected socket; nbd_server_run() listens, accepts, and runs a
 * thread with nbd_serve_conn() per client. Both reach the image through the
 * public qcowkit.h only; one qk_image is shared by every connection and
 * every worker thread (the library is thread safe per handle).
 *
 * SPDX-License-Identifier: MIT
 */
#ifndef QK_NBD_SERVER_H
#define QK_NBD_SERVER_H

#include <stdbool.h>
#include <stddef.h>

#include "qcowkit.h"

/* What is exported. The strings must outlive every connection. */
struct nbd_export {
	const char *name;         /* export name; "" is the default */
	const char *description;  /* NBD_INFO_DESCRIPTION text, or NULL */
	bool readonly;            /* refuse writes (EPERM), advertise READ_ONLY */
	bool multi_conn;          /* advertise CAN_MULTI_CONN (several clients
	                           * share one image handle, so a flush on one
	                           * connection covers writes done on all) */
	bool allocation_depth;    /* offer qemu:allocation-depth */
	bool direct;              /* the image bypasses the page cache: every
	                           * read and write may wait for the device, so
	                           * the next request is read by another thread
	                           * (requests in flight overlap) */
	/* Persistent bitmaps offered as qemu:dirty-bitmap:NAME contexts (as
	 * qemu-nbd -B), at most NBD_MAX_EXPORT_BITMAPS: bitmaps[i] is read
	 * from bitmap_images[i] (the image, or the image of its backing chain
	 * that holds it) with qk_bitmap_status(). */
	size_t nr_bitmaps;
	const char *const *bitmaps;
	qk_image *const *bitmap_images;
};

#define NBD_MAX_EXPORT_BITMAPS 8

/*
 * Serve one already-connected stream socket `fd` (TCP, Unix, or one end of
 * a socketpair): the fixed newstyle handshake, then requests until the
 * client sends NBD_CMD_DISC, closes, or breaks the protocol. Requests of
 * one client run concurrently on a small worker pool and may be answered
 * out of order; everything in flight is finished (and a writable image
 * flushed) before returning. `fd` is not closed (and should be blocking).
 * A client that has not finished the handshake 10 seconds after the call,
 * or that takes none of its replies for 30 seconds, is dropped
 * (-ETIMEDOUT). A shutdown(fd, SHUT_RD) from another thread ends the
 * connection the same graceful way.
 * Returns 0 when the client left by the protocol's rules (DISC, ABORT, or
 * closing between requests), -EPROTO when it broke them (the connection is
 * dropped), -ETIMEDOUT as above, or another negative errno for socket
 * errors.
 */
int nbd_serve_conn(int fd, qk_image *img, const struct nbd_export *exp);

struct nbd_server_config {
	const char *socket_path;  /* Unix socket to listen on, or NULL for TCP */
	const char *port;         /* TCP port (default "10809") */
	const char *bind_addr;    /* TCP address (default "127.0.0.1") */
	unsigned max_clients;     /* clients served at once; 0 = no limit */
	bool persistent;          /* keep serving after the last client leaves */
	const char *pid_file;     /* written once listening, or NULL */
};

/*
 * Listen as `cfg` says and serve `img` as `exp` until SIGINT or SIGTERM,
 * or (unless persistent) until the last client has gone. On a signal,
 * clients stop being read, requests in flight are finished and answered,
 * the image is flushed, and the function returns 0. The Unix socket and the
 * pid file are removed on the way out. Returns 0, or a negative errno
 * with a one-line message in err[errlen] when it could not start.
 */
int nbd_server_run(const struct nbd_server_config *cfg, qk_image *img,
		   const struct nbd_export *exp, char *err, size_t errlen);

#endif /* QK_NBD_SERVER_H */
