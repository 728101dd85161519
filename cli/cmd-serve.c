/*
 * cmd-serve.c - "qcowkit serve": export an image over NBD, as qemu-nbd.
 *
 *   serve [-f FMT] [-r] [-k SOCKET | -p PORT [-b ADDR]] [-x NAME] [-D DESC]
 *         [-e N] [-t] [-A] [--cache=MODE] [--pid-file F] FILE
 *
 * Listens on the Unix socket SOCKET, or on TCP ADDR:PORT (127.0.0.1:10809
 * by default: unlike qemu-nbd, nothing is exposed to the network unless
 * asked). -e N serves N clients at once (default 1, 0 = any number); with
 * more than one, CAN_MULTI_CONN is advertised (all connections share one
 * image handle). Without -t the server exits when the last client leaves
 * (clients dropped in the handshake do not count, as with qemu-nbd).
 * SIGINT and SIGTERM finish the requests in flight, flush and exit 0.
 * qemu:allocation-depth is always offered; -A is accepted for qemu-nbd's
 * command lines. A client must finish the handshake within 10 seconds of
 * connecting (as with qemu-nbd) and is dropped if it takes none of its
 * replies for 30 seconds, so no client holds one of the -e places by
 * stalling; one connection holds at most about 128 MiB of buffers. The
 * protocol lives in nbd/ (see nbd/server.h).
 *
 * SPDX-License-Identifier: MIT
 */
#include <errno.h>
#include <getopt.h>
#include <limits.h>
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

int cmd_serve(int argc, char **argv)
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
		{ NULL, 0, NULL, 0 },
	};
	struct nbd_server_config cfg;
	struct nbd_export exp;
	const char *fmtname = NULL;
	bool direct = false;
	uint64_t v;
	qk_image *img = NULL;
	qk_format fmt;
	sigset_t mask;
	char err[512];
	int c, r;

	memset(&cfg, 0, sizeof(cfg));
	memset(&exp, 0, sizeof(exp));
	cfg.max_clients = 1;
	exp.name = "";
	exp.allocation_depth = true;
	while ((c = getopt_long(argc, argv, ":hf:rk:p:b:x:D:e:tAn", longopts,
				NULL)) != -1) {
		switch (c) {
		case 'f':
			fmtname = optarg;
			break;
		case 'r':
			exp.readonly = true;
			break;
		case 'k':
			cfg.socket_path = optarg;
			break;
		case 'p':
			if (cli_parse_uint(optarg, &v) < 0 || v == 0 ||
			    v > 65535) {
				cli_error("Invalid port number '%s'", optarg);
				return CLI_EXIT_FAILURE;
			}
			cfg.port = optarg;
			break;
		case 'b':
			cfg.bind_addr = optarg;
			break;
		case 'x':
			if (strlen(optarg) > 4096) {
				cli_error("export name too long");
				return CLI_EXIT_FAILURE;
			}
			exp.name = optarg;
			break;
		case 'D':
			if (strlen(optarg) > 4096) {
				cli_error("export description too long");
				return CLI_EXIT_FAILURE;
			}
			exp.description = optarg;
			break;
		case 'e':
			if (cli_parse_uint(optarg, &v) < 0 || v > 1024) {
				cli_error("Invalid shared device number '%s'",
					  optarg);
				return CLI_EXIT_FAILURE;
			}
			cfg.max_clients = (unsigned)v;
			break;
		case 't':
			cfg.persistent = true;
			break;
		case 'A':
			break;
		case 'n':
			direct = true;
			break;
		case OPT_CACHE:
			if (cli_parse_cache(optarg, &direct) < 0) {
				cli_error("Invalid cache mode '%s'", optarg);
				return CLI_EXIT_FAILURE;
			}
			break;
		case OPT_AIO:
			if (strcmp(optarg, "threads") != 0 &&
			    strcmp(optarg, "native") != 0 &&
			    strcmp(optarg, "io_uring") != 0) {
				cli_error("Invalid aio mode '%s'", optarg);
				return CLI_EXIT_FAILURE;
			}
			break;
		case OPT_PID_FILE:
			cfg.pid_file = optarg;
			break;
		case 'h':
			cli_print_usage(stdout, cli_find_command("serve"));
			return CLI_EXIT_OK;
		default:
			return cli_bad_option("serve", c, argv, CLI_EXIT_FAILURE);
		}
	}
	if (optind != argc - 1)
		return cli_usage_error("serve", CLI_EXIT_FAILURE,
				       "Expecting one image file name");
	if (cfg.socket_path && (cfg.port || cfg.bind_addr)) {
		cli_error("-p and -b are not allowed with -k");
		return CLI_EXIT_FAILURE;
	}
	/* Every connection shares the one image handle, so a flush on any
	 * covers writes done on all; a read-only export is safe anyway. */
	exp.multi_conn = cfg.max_clients != 1 || exp.readonly;
	if (cli_parse_format(fmtname, &fmt) < 0)
		return CLI_EXIT_FAILURE;

	/* Block the stop signals before any thread exists, so that only the
	 * server's signalfd ever sees them. */
	sigemptyset(&mask);
	sigaddset(&mask, SIGINT);
	sigaddset(&mask, SIGTERM);
	pthread_sigmask(SIG_BLOCK, &mask, NULL);

	if (cli_open(argv[optind], fmt,
		     (exp.readonly ? 0 : QK_OPEN_RDWR) |
		     (direct ? QK_OPEN_DIRECT : 0), &img) < 0)
		return CLI_EXIT_FAILURE;
	err[0] = '\0';
	r = nbd_server_run(&cfg, img, &exp, err, sizeof(err));
	if (r < 0)
		cli_error("%s", err[0] ? err : strerror(-r));
	if (qk_close(img) < 0 && r == 0) {
		cli_lib_error(-EIO);
		r = -EIO;
	}
	return r < 0 ? CLI_EXIT_FAILURE : CLI_EXIT_OK;
}
