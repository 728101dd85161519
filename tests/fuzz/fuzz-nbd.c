/*
 * fuzz-nbd.c - the NBD server's request stream: the input is what a client
 * sends, from the first byte of the handshake (client flags, options) to
 * the last request of the transmission phase. The server (nbd_serve_conn)
 * runs on one end of a socketpair in a thread of its own; this thread
 * writes the input to the other end, drains and drops the replies, and
 * closes its sending side at the end of the input, which the server must
 * take as the client leaving.
 *
 * The export is a small QCOW2 image on the memory backend (4 MiB, 64 KiB
 * clusters, made here byte by byte) holding data, a zeroed range and
 * unallocated clusters, writable, with both meta contexts, so reads split
 * into data and hole chunks and writes allocate.
 *
 * Invariants: no crash, no sanitizer report, no hang (the server returns
 * once the input has ended), and the image checks clean afterwards.
 */
#include <poll.h>
#include <pthread.h>
#include <sys/socket.h>
#include <unistd.h>

#include "fuzz.h"
#include "server.h"

#define IMG_SIZE    (4u << 20)
#define CLUSTER     65536u

/* header (cluster 0), L1 (1), refcount table (2), refcount block (3) */
static uint8_t image[4 * CLUSTER];

static void put32(uint8_t *p, uint32_t v)
{
	p[0] = (uint8_t)(v >> 24);
	p[1] = (uint8_t)(v >> 16);
	p[2] = (uint8_t)(v >> 8);
	p[3] = (uint8_t)v;
}

static void put64(uint8_t *p, uint64_t v)
{
	put32(p, (uint32_t)(v >> 32));
	put32(p + 4, (uint32_t)v);
}

/* An empty QCOW2 v3 image: one L1 entry (unallocated), 16-bit refcounts
 * of 1 for the four clusters of metadata. */
static void make_image(void)
{
	uint8_t *h = image;

	memset(image, 0, sizeof(image));
	memcpy(h, "QFI\xfb", 4);
	put32(h + 4, 3);                    /* version */
	put32(h + 20, 16);                  /* cluster_bits */
	put64(h + 24, IMG_SIZE);
	put32(h + 36, 1);                   /* l1_size */
	put64(h + 40, 1 * CLUSTER);         /* l1_table_offset */
	put64(h + 48, 2 * CLUSTER);         /* refcount_table_offset */
	put32(h + 56, 1);                   /* refcount_table_clusters */
	put32(h + 96, 4);                   /* refcount_order */
	put32(h + 100, 104);                /* header_length */
	put64(image + 2 * CLUSTER, 3 * CLUSTER);
	for (int i = 0; i < 4; i++) {
		image[3 * CLUSTER + 2 * i] = 0;
		image[3 * CLUSTER + 2 * i + 1] = 1;
	}
}

static qk_image *open_export(void)
{
	static uint8_t buf[3 * CLUSTER];
	struct qk__file *f;
	struct qk_open_options o;
	qk_image *img;

	qk__api_enter("fuzz_open");
	if (qk__file_open_mem(image, sizeof(image), FUZZ_NAME, &f) < 0)
		return NULL;
	fuzz_limit(f);
	qk_open_options_init(&o);
	o.format = QK_FORMAT_QCOW2;
	o.flags = QK_OPEN_RDWR | QK_OPEN_UNSAFE | QK_OPEN_NO_BACKING;
	FUZZ_ASSERT(qk__image_open_file(&qk__mem_host, f, FUZZ_NAME, &o, NULL, &img) == 0,
		    "the export image does not open");
	/* data at 0 and 1 MiB + 4 KiB (unaligned), zeros in between */
	memset(buf, 0x5a, sizeof(buf));
	FUZZ_ASSERT(qk_pwrite(img, buf, sizeof(buf), 0) == 0, "set-up write");
	FUZZ_ASSERT(qk_pwrite(img, buf, 8192, (1u << 20) + 4096) == 0, "set-up write");
	FUZZ_ASSERT(qk_write_zeroes(img, 2 * CLUSTER, CLUSTER, 0) == 0, "set-up zero");
	FUZZ_ASSERT(qk_flush(img) == 0, "set-up flush");
	return img;
}

struct server_arg {
	int fd;
	qk_image *img;
	const struct nbd_export *exp;
};

static void *server_main(void *p)
{
	struct server_arg *a = p;

	(void)nbd_serve_conn(a->fd, a->img, a->exp);
	/* The client side sees end of stream once the server is done. */
	shutdown(a->fd, SHUT_RDWR);
	return NULL;
}

/* Write the input to `fd` (nonblocking) while reading and dropping what
 * comes back, then half-close and drain until the server closes. */
static void client(int fd, const uint8_t *data, size_t size)
{
	static uint8_t sink[1 << 16];
	size_t sent = 0;
	bool shut = false;

	for (;;) {
		struct pollfd pfd = { fd, POLLIN, 0 };
		if (!shut && sent < size)
			pfd.events |= POLLOUT;
		if (!shut && sent == size) {
			shutdown(fd, SHUT_WR);
			shut = true;
		}
		if (poll(&pfd, 1, -1) < 0)
			continue;
		if (pfd.revents & POLLOUT) {
			ssize_t n = send(fd, data + sent, size - sent,
					 MSG_NOSIGNAL | MSG_DONTWAIT);
			if (n > 0)
				sent += (size_t)n;
			else if (n < 0 && errno != EAGAIN && errno != EINTR)
				sent = size;    /* the server has gone */
		}
		if (pfd.revents & (POLLIN | POLLHUP | POLLERR)) {
			ssize_t n = recv(fd, sink, sizeof(sink), MSG_DONTWAIT);
			if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR))
				break;
		}
	}
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static const struct nbd_export exp = {
		.name = "",
		.description = "fuzz",
		.readonly = false,
		.multi_conn = false,
		.allocation_depth = true,
	};
	struct server_arg a;
	struct qk_check_result res = { .struct_size = sizeof res };
	pthread_t tid;
	qk_image *img;
	int sv[2];

	if (image[0] == 0)
		make_image();
	img = open_export();
	if (img == NULL)
		return 0;
	FUZZ_ASSERT(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0,
		    "socketpair: %s", strerror(errno));
	a.fd = sv[0];
	a.img = img;
	a.exp = &exp;
	FUZZ_ASSERT(pthread_create(&tid, NULL, server_main, &a) == 0, "thread");
	client(sv[1], data, size);
	pthread_join(tid, NULL);
	close(sv[0]);
	close(sv[1]);

	/* qk_check reads the metadata from the file: what the server left
	 * in the caches (it flushes only after writes) goes there first. */
	FUZZ_ASSERT(qk_flush(img) == 0, "flush after the session: %s", qk_last_error());
	memset(&res, 0, sizeof res);
	res.struct_size = sizeof res;
	FUZZ_ASSERT(qk_check(img, 0, &res, NULL, NULL) == 0 && res.corruptions == 0 &&
		    res.leaks == 0 && res.check_errors == 0,
		    "image not clean after the session: %llu corruptions, %llu leaks",
		    (unsigned long long)res.corruptions, (unsigned long long)res.leaks);
	qk_close(img);
	return 0;
}
