/*
 * main.c - the qcowkit program: command table, dispatch, help, version.
 *
 * Usage: qcowkit [--help | --version] COMMAND [OPTIONS...] ARGS...
 * Flags follow qemu-img / qemu-io / qemu-nbd so habits and scripts carry
 * over. Each command lives in cmd-<name>.c and returns the exit code.
 *
 * SPDX-License-Identifier: MIT
 */
#include <errno.h>
#include <getopt.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"

static int cmd_not_implemented(int argc, char **argv);

bool cli_confine;

/* Commands not written yet run cmd_not_implemented until their issue
 * lands; keeping them here lets help list the whole interface. */
static const struct cli_command commands[] = {
	{ "amend", cmd_amend,
	  "amend [-f FMT] [-p] [-q] [-t CACHE] [--force] -o OPTS FILE",
	  "change an image's options in place (compat, refcount_bits, "
	  "lazy_refcounts, size, data_file...)" },
	{ "bench", cmd_bench,
	  "bench [-c COUNT] [-d DEPTH] [-f FMT] [-n] [-o OFFSET] [-s SIZE] "
	  "[-S STEP] [-t CACHE] [-w] [--pattern=N] [--flush-interval=N] "
	  "[--random] [-U] FILE",
	  "measure read throughput of an image" },
	{ "bitmap", cmd_bitmap,
	  "bitmap (--add | --remove | --clear | --enable | --disable | --merge SOURCE "
	  "[-b FILE [-F FMT]]) [-g GRANULARITY] [--disable] [-f FMT] FILE BITMAP",
	  "add, remove, clear, enable, disable or merge persistent bitmaps" },
	{ "check", cmd_check,
	  "check [-f FMT] [-r leaks|all] [--output=human|json] "
	  "[--forensic [--extract DIR [--extract-max-files=N] "
	  "[--extract-max-bytes=SIZE]]] FILE",
	  "check (and repair) the consistency of an image" },
	{ "commit", cmd_commit,
	  "commit [-f FMT] [-b BASE] [-d] [-p] [-q] [-t CACHE] [-r RATE] FILE",
	  "write an image's changes into its backing file" },
	{ "compare", cmd_compare,
	  "compare [-f FMT] [-F FMT] [-s] [-p] [-q] [-U] A B",
	  "compare the guest-visible content of two images" },
	{ "convert", cmd_convert,
	  "convert [-f FMT] [-O raw|qcow2] [-c] [-o OPTS] [-l SNAPSHOT] [--bitmaps] [-B BACKING [-F FMT]] "
	  "[-p] [-q] [-m N] [-S N] [-W] [-n] [-t CACHE] [-U] SRC DST",
	  "copy an image's guest content into a new raw or qcow2 image" },
	{ "create", cmd_create,
	  "create [-f qcow2|raw] [-b BACKING [-F FMT]] [-u] [-o OPTS] FILE "
	  "[SIZE]",
	  "create a new image" },
	{ "info", cmd_info,
	  "info [-f FMT] [--output=human|json] [--backing-chain] [-U] FILE",
	  "describe an image (as qemu-img info)" },
	{ "io", cmd_io,
	  "io [-f FMT] [-r] [-U] [-n] [-t CACHE] FILE -c CMD [-c CMD ...]",
	  "run qemu-io style commands: read [-P BYTE] [-q] [-v] [-C] OFF LEN, "
	  "write [-P BYTE] [-z] [-c] OFF LEN, discard OFF LEN, flush, map" },
	{ "map", cmd_map,
	  "map [-f FMT] [--output=human|json] [--start-offset=N] "
	  "[--max-length=N] [-U] FILE",
	  "show how guest ranges map to host files" },
	{ "measure", cmd_measure,
	  "measure [--output=human|json] [-O FMT] [-o OPTS] "
	  "(--size N | [-f FMT] [-l SNAPSHOT] [-U] FILE)",
	  "compute the size a new image needs (as qemu-img measure)" },
	{ "rebase", cmd_rebase,
	  "rebase [-f FMT] [-u] -b BACKING [-F FMT] [-p] [-q] [-c] [-t CACHE] FILE",
	  "change the backing file of an image" },
	{ "resize", cmd_resize,
	  "resize [--shrink] FILE [+|-]SIZE",
	  "change the virtual size of an image" },
	{ "serve", cmd_serve,
	  "serve [-f FMT] [-r] [-k SOCKET | -p PORT [-b ADDR]] [-x NAME] "
	  "[-D DESC] [-e N] [-t] [-A] [-B BITMAP] [-l SNAPSHOT] [--cache=MODE] [--pid-file F] FILE",
	  "export an image over NBD" },
	{ "snapshot", cmd_snapshot,
	  "snapshot [-f FMT] [-q] [-U] [-l | -c NAME | -a NAME | -d NAME] FILE",
	  "list, create, apply or delete internal snapshots" },
};

#define N_COMMANDS (sizeof(commands) / sizeof(commands[0]))

const struct cli_command *cli_find_command(const char *name)
{
	for (size_t i = 0; i < N_COMMANDS; i++)
		if (strcmp(commands[i].name, name) == 0)
			return &commands[i];
	return NULL;
}

void cli_print_usage(FILE *f, const struct cli_command *cmd)
{
	fprintf(f, "usage: qcowkit %s\n  %s\n", cmd->synopsis, cmd->summary);
}

static void print_main_usage(FILE *f)
{
	fprintf(f,
		"usage: qcowkit [--help | --version] COMMAND [OPTIONS] ARGS\n"
		"QCOW2 and raw disk image tool (qemu-img compatible flags)\n"
		"\n"
		"Commands:\n");
	for (size_t i = 0; i < N_COMMANDS; i++)
		if (commands[i].run != cmd_not_implemented)
			fprintf(f, "  %s\n", commands[i].synopsis);
	for (size_t i = 0, n = 0; i < N_COMMANDS; i++)
		if (commands[i].run == cmd_not_implemented)
			fprintf(f, "%s %s", n++ ? "," : "\nNot built yet:", commands[i].name);
	fprintf(f, "\n");
	fprintf(f,
		"\n"
		"Every command also takes --confine, for images you did not make:\n"
		"backing and external data file names must lie in the image's own\n"
		"directory (no absolute names, no '..', no symlink leading out) and\n"
		"external data files are only read.\n"
		"\n"
		"FMT is qcow2 or raw; without -f the format is detected.\n"
		"Sizes and offsets take k, M, G, T, P, E suffixes (powers of "
		"1024).\n"
		"'qcowkit COMMAND --help' describes one command.\n");
}

void cli_error(const char *fmt, ...)
{
	va_list ap;

	/* One write per line so concurrent threads do not interleave. */
	char line[4096], safe[4 * sizeof(line)];
	va_start(ap, fmt);
	vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
	/* Messages quote file and image names: keep them one line and
	 * harmless to a terminal (without allocating: this also reports
	 * running out of memory). */
	cli_escape_into(safe, line);
	fprintf(stderr, "qcowkit: %s\n", safe);
}

void cli_lib_error(int ret)
{
	const char *msg = qk_last_error();

	if (msg[0] != '\0')
		cli_error("%s", msg);
	else
		cli_error("%s", strerror(ret < 0 ? -ret : ret));
}

const char *cli_lib_message(void)
{
	const char *msg = qk_last_error(), *colon = strstr(msg, ": ");

	return strncmp(msg, "qk_", 3) == 0 && colon ? colon + 2 : msg;
}

int cli_bad_option(const char *cmd, int opt, char **argv, int code)
{
	/* Long-only options use values >= 256, so a short option is one
	 * whose optopt is a character; for long ones (optopt 0 when unknown)
	 * getopt_long has moved optind just past the offending element. */
	bool is_long = optopt == 0 || optopt >= 256;
	const char *arg = optind > 0 ? argv[optind - 1] : "?";
	size_t len = strcspn(arg, "=");

	if (opt == ':' && is_long)
		cli_error("option '%.*s' requires an argument (try 'qcowkit "
			  "%s --help')", (int)len, arg, cmd);
	else if (opt == ':')
		cli_error("option requires an argument -- '%c' (try 'qcowkit "
			  "%s --help')", optopt, cmd);
	else if (is_long)
		cli_error("unrecognized option '%.*s' (try 'qcowkit %s "
			  "--help')", (int)len, arg, cmd);
	else
		cli_error("invalid option -- '%c' (try 'qcowkit %s --help')",
			  optopt, cmd);
	return code;
}

int cli_usage_error(const char *cmd, int code, const char *fmt, ...)
{
	char line[1024];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
	cli_error("%s (try 'qcowkit %s --help')", line, cmd);
	return code;
}

/* Placeholder for commands whose issues have not landed. */
static int cmd_not_implemented(int argc, char **argv)
{
	const struct cli_command *cmd = cli_find_command(argv[0]);

	for (int i = 1; i < argc; i++) {
		if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
			cli_print_usage(stdout, cmd);
			return CLI_EXIT_OK;
		}
	}
	cli_error("%s is not implemented yet", argv[0]);
	return CLI_EXIT_FAILURE;
}

int main(int argc, char **argv)
{
	const struct cli_command *cmd;
	int ret;

	if (argc < 2) {
		print_main_usage(stderr);
		return CLI_EXIT_FAILURE;
	}
	if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 ||
	    strcmp(argv[1], "help") == 0) {
		if (argc > 2 && (cmd = cli_find_command(argv[2])) != NULL) {
			cli_print_usage(stdout, cmd);
			return CLI_EXIT_OK;
		}
		print_main_usage(stdout);
		return CLI_EXIT_OK;
	}
	if (strcmp(argv[1], "--version") == 0 || strcmp(argv[1], "-V") == 0) {
		printf("qcowkit version %s\n", qk_version());
		return CLI_EXIT_OK;
	}
	cmd = cli_find_command(argv[1]);
	if (cmd == NULL) {
		if (argv[1][0] == '-')
			cli_error("unrecognized option '%s' (try 'qcowkit "
				  "--help')", argv[1]);
		else
			cli_error("Command not found: %s (try 'qcowkit --help')",
				  argv[1]);
		return CLI_EXIT_FAILURE;
	}

	/* --confine applies to every command: taken out here, before the
	 * command's own options (a "--" ends the options, as for getopt). */
	for (int i = 2; i < argc; i++) {
		if (strcmp(argv[i], "--") == 0)
			break;
		if (strcmp(argv[i], "--confine") == 0) {
			cli_confine = true;
			memmove(&argv[i], &argv[i + 1], (size_t)(argc - i) * sizeof *argv);
			argc--;
			i--;
		}
	}

	/* Commands parse argv[1..] with getopt_long from a fresh state. */
	optind = 0;
	opterr = 0;
	ret = cmd->run(argc - 1, argv + 1);

	/* Output that never reached its destination is a failure too. */
	if (fflush(stdout) != 0 || ferror(stdout)) {
		cli_error("error writing standard output: %s", strerror(errno));
		if (ret == 0)
			ret = CLI_EXIT_FAILURE;
	}
	return ret;
}
