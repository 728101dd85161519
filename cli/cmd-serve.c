/*
 * cmd-serve.c - "qcowkit serve": export an image over NBD, as qemu-nbd.
 *
 *   serve [-f FMT] [-r] [-k SOCKET | -p PORT [-b ADDR]] [-x NAME] [-D DESC]
 *         [-e N] [-t] [-A] [-B BITMAP] [--cache=MODE] [--pid-file F] FILE
 *
 * Listens on the Unix socket SOCKET, or on TCP ADDR:PORT (127.0.0.1:10809
 * by default: unlike qemu-nbd, nothing is exposed to the network unless
 * asked). -e N serves N clients at once (default 1, 0 = any number); with
 * more than one, CAN_MULTI_CONN is advertised (all connections share one
 * image handle). Without -t the server exits when the last client leaves
 * (clients dropped in the handshake do not count, as with qemu-nbd).
 * SIGINT and SIGTERM finish the requests in flight, flush and exit 0.
 * qemu:allocation-depth is always offered; -A is accepted for qemu-nbd's
 * command lines. -B BITMAP (up to 8 times) adds the
 * qemu:dirty-bitmap:BITMAP context, with the extents qemu-nbd gives: the
 * persistent bitmap of the image, or of the first image of its backing
 * chain that has one of that name; on a writable export an enabled
 * bitmap shows the clients' writes too. A client must finish the handshake within 10 seconds of
 * connecting (as with qemu-nbd) and is dropped if it takes none of its
 * replies for 30 seconds, so no client holds one of the -e places by
 * stalling; one connection holds at most about 128 MiB of buffers. The
 * protocol lives in nbd/ (see nbd/server.h).
 *
 * SPDX-License-Identifier: MIT
 */
#include <errno.h>
#include <getopt.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "../nbd/server.h"

enum {
	OPT_PID_FILE = 256,
	OPT_CACHE,
	OPT_AIO,
};

/* serve's command line. */
struct serve_args {
	struct cli_opts o;
	struct nbd_server_config cfg;
	struct nbd_export exp;
	bool direct;              /* -n, --cache=none: bypass the page cache */
	const char *file;
	const char *snapshot;     /* -l: export this internal snapshot, read-only */
	/* -B, last first (qemu-nbd lists them so), and the images holding them. */
	const char *bitmaps[NBD_MAX_EXPORT_BITMAPS];
	qk_image *bitmap_images[NBD_MAX_EXPORT_BITMAPS];
	size_t nbitmaps;
};

/* -B NAME: one more bitmap to offer. Returns 0, or -1 after a message. */
static int add_bitmap(struct serve_args *a, const char *name)
{
	if (a->nbitmaps == NBD_MAX_EXPORT_BITMAPS) {
		cli_error("at most %d bitmaps (-B) can be exported", NBD_MAX_EXPORT_BITMAPS);
		return -1;
	}
	memmove(&a->bitmaps[1], &a->bitmaps[0], a->nbitmaps * sizeof a->bitmaps[0]);
	a->bitmaps[0] = name;
	a->nbitmaps++;
	return 0;
}

/* Find each -B bitmap in the image or its backing chain, as qemu-nbd
 * does, and refuse one that is missing or inconsistent in qemu-nbd's
 * words. Returns 0, or -1 after a message. */
static int find_bitmaps(struct serve_args *a, qk_image *img)
{
	for (size_t i = 0; i < a->nbitmaps; i++) {
		const struct qk_bitmap *list = NULL;
		size_t n = 0, k = 0;
		qk_image *layer;

		for (layer = img; layer; layer = qk_get_backing(layer)) {
			if (qk_list_bitmaps(layer, &list, &n) < 0)
				n = 0;
			for (k = 0; k < n && strcmp(list[k].name, a->bitmaps[i]) != 0; k++)
				;
			if (k < n)
				break;
		}
		char *esc = cli_escape(a->bitmaps[i]);
		if (!layer)
			cli_error("Bitmap '%s' is not found", esc);
		else if (list[k].flags & QK_BITMAP_IN_USE)
			cli_error("Bitmap '%s' is inconsistent and cannot be used", esc);
		free(esc);
		if (!layer || (list[k].flags & QK_BITMAP_IN_USE))
			return -1;
		a->bitmap_images[i] = layer;
		/* Read it now: a bitmap that cannot be read fails here. */
		uint64_t len;
		int r = qk_get_size(layer) ? qk_bitmap_status(layer, a->bitmaps[i], 0, 1, &len) : 0;
		if (r < 0) {
			cli_lib_error(r);
			return -1;
		}
	}
	a->exp.bitmaps = a->bitmaps;
	a->exp.bitmap_images = a->bitmap_images;
	a->exp.nr_bitmaps = a->nbitmaps;
	return 0;
}

/* An export name or description, at most 4096 bytes as the NBD protocol
 * says. Returns 0, or -1 after "export WHAT too long". */
static int export_string(const char *arg, const char *what, const char **out)
{
	if (strlen(arg) > 4096) {
		cli_error("export %s too long", what);
		return -1;
	}
	*out = arg;
	return 0;
}

/* Parse serve's command line into *a. Returns CLI_GO, or the exit status
 * after --help or a message. */
static int parse_args(int argc, char **argv, struct serve_args *a)
{
	static const struct option longopts[] = {
		{ "help", no_argument, NULL, 'h' },
		{ "format", required_argument, NULL, 'f' },
		{ "read-only", no_argument, NULL, 'r' },
		{ "socket", required_argument, NULL, 'k' },
		{ "port", required_argument, NULL, 'p' },
		{ "bind", required_argument, NULL, 'b' },
		{ "export-name", required_argument, NULL, 'x' },
		{ "description", required_argument, NULL, 'D' },
		{ "shared", required_argument, NULL, 'e' },
		{ "persistent", no_argument, NULL, 't' },
		{ "allocation-depth", no_argument, NULL, 'A' },
		{ "nocache", no_argument, NULL, 'n' },
		{ "cache", required_argument, NULL, OPT_CACHE },
		{ "aio", required_argument, NULL, OPT_AIO },
		{ "pid-file", required_argument, NULL, OPT_PID_FILE },
		{ "load-snapshot", required_argument, NULL, 'l' },
		{ "bitmap", required_argument, NULL, 'B' },
		{ NULL, 0, NULL, 0 },
	};
	uint64_t v;
	int c;

	while ((c = cli_getopt(&a->o, argc, argv, ":hf:rk:p:b:x:D:e:tAnl:B:",
			       longopts)) > 0) {
		switch (c) {
		case 'l':
			/* As qemu-nbd: a snapshot is exported read-only. */
			a->snapshot = optarg;
			a->exp.readonly = true;
			break;
		case 'r':
			a->exp.readonly = true;
			break;
		case 'k':
			a->cfg.socket_path = optarg;
			break;
		case 'p':
			if (cli_parse_uint(optarg, &v) < 0 || v == 0 ||
			    v > 65535) {
				cli_error("Invalid port number '%s'", optarg);
				return CLI_EXIT_FAILURE;
			}
			a->cfg.port = optarg;
			break;
		case 'b':
			a->cfg.bind_addr = optarg;
			break;
		case 'x':
			if (export_string(optarg, "name", &a->exp.name) < 0)
				return CLI_EXIT_FAILURE;
			break;
		case 'D':
			if (export_string(optarg, "description",
					  &a->exp.description) < 0)
				return CLI_EXIT_FAILURE;
			break;
		case 'e':
			if (cli_parse_uint(optarg, &v) < 0 || v > 1024) {
				cli_error("Invalid shared device number '%s'",
					  optarg);
				return CLI_EXIT_FAILURE;
			}
			a->cfg.max_clients = (unsigned)v;
			break;
		case 't':
			a->cfg.persistent = true;
			break;
		case 'A':
			break;
		case 'B':
			if (add_bitmap(a, optarg) < 0)
				return CLI_EXIT_FAILURE;
			break;
		case 'n':
			a->direct = true;
			break;
		case OPT_CACHE:
			if (cli_parse_cache(optarg, &a->direct) < 0) {
				cli_error("Invalid cache mode '%s'", optarg);
				return CLI_EXIT_FAILURE;
			}
			break;
		case OPT_AIO:
			if (cli_parse_aio(optarg) < 0) {
				cli_error("Invalid aio mode '%s'", optarg);
				return CLI_EXIT_FAILURE;
			}
			break;
		case OPT_PID_FILE:
			a->cfg.pid_file = optarg;
			break;
		}
	}
	a->file = cli_one_image(&a->o, c, argc, argv);
	return a->file != NULL ? CLI_GO : a->o.status;
}

/* Open the image and serve it until the server stops. Returns the exit
 * status. */
static int serve(struct serve_args *a, qk_format fmt)
{
	qk_image *img = NULL;
	sigset_t mask;
	char err[512];
	int r;

	/* Block the stop signals before any thread exists, so that only the
	 * server's signalfd ever sees them. */
	sigemptyset(&mask);
	sigaddset(&mask, SIGINT);
	sigaddset(&mask, SIGTERM);
	pthread_sigmask(SIG_BLOCK, &mask, NULL);

	if (cli_open_snapshot(a->file, fmt,
			      (a->exp.readonly ? 0 : QK_OPEN_RDWR) |
			      (a->direct ? QK_OPEN_DIRECT : 0), a->snapshot, &img) < 0)
		return CLI_EXIT_FAILURE;
	if (find_bitmaps(a, img) < 0) {
		qk_close(img);
		return CLI_EXIT_FAILURE;
	}
	err[0] = '\0';
	r = nbd_server_run(&a->cfg, img, &a->exp, err, sizeof(err));
	if (r < 0)
		cli_error("%s", err[0] ? err : strerror(-r));
	if (qk_close(img) < 0 && r == 0) {
		cli_lib_error(-EIO);
		r = -EIO;
	}
	return r < 0 ? CLI_EXIT_FAILURE : CLI_EXIT_OK;
}

int cmd_serve(int argc, char **argv)
{
	struct serve_args a = {
		.o = { .cmd = "serve", .usage_code = CLI_EXIT_FAILURE },
		.cfg = { .max_clients = 1 },
		.exp = { .name = "", .allocation_depth = true },
	};
	qk_format fmt;
	int ret;

	if ((ret = parse_args(argc, argv, &a)) != CLI_GO)
		return ret;
	if (a.cfg.socket_path && (a.cfg.port || a.cfg.bind_addr)) {
		cli_error("-p and -b are not allowed with -k");
		return CLI_EXIT_FAILURE;
	}
	/* Every connection shares the one image handle, so a flush on any
	 * covers writes done on all. Not with -e 1 (the default), read-only
	 * or not: clients take the flag as leave to open several connections
	 * at once (nbdcopy opens 4), and the second would wait for the first
	 * to leave, for ever (qemu-nbd does not offer it there either). */
	a.exp.multi_conn = a.cfg.max_clients != 1;
	a.exp.direct = a.direct;
	if (cli_parse_format(a.o.fmtname, &fmt) < 0)
		return CLI_EXIT_FAILURE;
	return serve(&a, fmt);
}
