/*
 * cmd-bitmap.c - "qcowkit bitmap": change the persistent bitmaps of a
 * qcow2 image, as qemu-img bitmap:
 *
 *   bitmap (--add | --remove | --clear | --enable | --disable |
 *           --merge SOURCE [-b FILE [-F FMT]]) ... [-g GRANULARITY]
 *          [--disable] [-f FMT] FILE BITMAP
 *
 * Several actions run in the order given, each durable once done, so an
 * action that fails leaves the ones before it done (as with qemu-img,
 * whose bitmaps are stored on close either way). --disable is both an
 * action and, with --add, "add it disabled". The image is opened without
 * its backing chain; -b names the image whose bitmap SOURCE --merge reads
 * (opened read-only), by default FILE itself. Messages and exit codes are
 * qemu-img's: "Operation add on bitmap NAME failed: <why>", exit 1.
 *
 * SPDX-License-Identifier: MIT
 */
#include <errno.h>
#include <getopt.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"

enum action { ADD, REMOVE, CLEAR, ENABLE, DISABLE, MERGE };

static const char *const action_name[] = {
	[ADD] = "add", [REMOVE] = "remove", [CLEAR] = "clear",
	[ENABLE] = "enable", [DISABLE] = "disable", [MERGE] = "merge",
};

struct step {
	enum action act;
	const char *src;          /* MERGE: the source bitmap */
};

/* bitmap's command line. */
struct bitmap_args {
	struct cli_opts o;
	struct step *steps;       /* in the order given */
	int nsteps;
	bool add, add_disabled, merge;
	uint64_t granularity;     /* -g as given (0: the default) */
	const char *src_file;     /* -b */
	const char *src_fmt;      /* -F */
	const char *file, *bitmap;
};

/* Parse bitmap's command line into *a. Returns CLI_GO, or the exit status
 * after --help or a message. */
static int parse_args(int argc, char **argv, struct bitmap_args *a)
{
	enum { OPT_ADD = 256, OPT_REMOVE, OPT_CLEAR, OPT_ENABLE, OPT_DISABLE, OPT_MERGE };
	static const struct option longopts[] = {
		{ "help", no_argument, NULL, 'h' },
		{ "add", no_argument, NULL, OPT_ADD },
		{ "remove", no_argument, NULL, OPT_REMOVE },
		{ "clear", no_argument, NULL, OPT_CLEAR },
		{ "enable", no_argument, NULL, OPT_ENABLE },
		{ "disable", no_argument, NULL, OPT_DISABLE },
		{ "merge", required_argument, NULL, OPT_MERGE },
		{ "granularity", required_argument, NULL, 'g' },
		{ "source-file", required_argument, NULL, 'b' },
		{ "source-format", required_argument, NULL, 'F' },
		{ NULL, 0, NULL, 0 },
	};
	int c;

	a->steps = cli_xcalloc((size_t)argc + 1, sizeof *a->steps);
	while ((c = cli_getopt(&a->o, argc, argv, ":b:f:F:g:h", longopts)) > 0) {
		switch (c) {
		case 'b':
			a->src_file = optarg;
			break;
		case 'F':
			a->src_fmt = optarg;
			break;
		case 'g':
			if (cli_cvtnum("granularity", optarg, 0, INT64_MAX, &a->granularity) < 0)
				return CLI_EXIT_FAILURE;
			break;
		default:
			a->steps[a->nsteps].act = (enum action)(c - OPT_ADD);
			a->steps[a->nsteps++].src = c == OPT_MERGE ? optarg : NULL;
			a->add |= c == OPT_ADD;
			a->add_disabled |= c == OPT_DISABLE;
			a->merge |= c == OPT_MERGE;
			break;
		}
	}
	if (c < 0)
		return a->o.status;
	/* qemu-img's checks, in its order. */
	if (a->nsteps == 0)
		cli_error("Need at least one of --add, --remove, --clear, --enable, --disable, or --merge");
	else if (a->granularity && !a->add)
		cli_error("granularity only supported with --add");
	else if (a->src_fmt && !a->src_file)
		cli_error("-F only supported with -b");
	else if (a->src_file && !a->merge)
		cli_error("Merge bitmap source file only supported with --merge");
	else if (optind != argc - 2)
		cli_error("Expecting filename and bitmap name");
	else
		return CLI_GO;
	return CLI_EXIT_FAILURE;
}

/* Run step s on bitmap a->bitmap of img (src: the images --merge reads).
 * Returns 0, or 1 after qemu-img's message. */
static int run_step(const struct bitmap_args *a, const struct step *s, qk_image *img, qk_image *src)
{
	int ret = 0;

	switch (s->act) {
	case ADD:
		/* qemu-img passes the granularity as 32 bits; one that
		 * wraps to 0 was still given, and is refused (as 1 is). */
		ret = qk_bitmap_add(img, a->bitmap,
				    a->granularity && !(uint32_t)a->granularity ? 1 :
				    (uint32_t)a->granularity,
				    a->add_disabled ? QK_BITMAP_ADD_DISABLED : 0);
		break;
	case REMOVE:
		ret = qk_bitmap_remove(img, a->bitmap);
		break;
	case CLEAR:
		ret = qk_bitmap_clear(img, a->bitmap);
		break;
	case ENABLE:
		ret = qk_bitmap_enable(img, a->bitmap);
		break;
	case DISABLE:
		ret = qk_bitmap_disable(img, a->bitmap);
		break;
	case MERGE:
		ret = qk_bitmap_merge(img, a->bitmap, src, s->src);
		break;
	}
	if (ret == 0)
		return 0;
	cli_error("Operation %s on bitmap %s failed: %s%s", action_name[s->act], a->bitmap,
		  cli_lib_message(),
		  ret == -EUCLEAN ? " (try --remove to delete this bitmap from disk)" : "");
	return 1;
}

int cmd_bitmap(int argc, char **argv)
{
	struct bitmap_args a = { .o = { .cmd = "bitmap", .usage_code = CLI_EXIT_FAILURE } };
	qk_image *img = NULL, *src = NULL;
	qk_format fmt, sfmt;
	int ret = parse_args(argc, argv, &a);

	if (ret != CLI_GO)
		goto out;
	ret = CLI_EXIT_FAILURE;
	a.file = argv[optind];
	a.bitmap = argv[optind + 1];
	if (cli_parse_format(a.o.fmtname, &fmt) < 0 || cli_parse_format(a.src_fmt, &sfmt) < 0)
		goto out;
	/* The bitmaps are this image's own: its backing chain is not read. */
	if (cli_open(a.file, fmt, QK_OPEN_RDWR | QK_OPEN_NO_BACKING, &img) < 0)
		goto out;
	if (a.src_file && cli_open(a.src_file, sfmt, QK_OPEN_NO_BACKING, &src) < 0)
		goto out;
	ret = CLI_EXIT_OK;
	for (int i = 0; i < a.nsteps && ret == CLI_EXIT_OK; i++)
		ret = run_step(&a, &a.steps[i], img, src ? src : img);
out:
	qk_close(src);
	if (img && qk_close(img) < 0 && ret == CLI_EXIT_OK) {
		cli_lib_error(-EIO);
		ret = CLI_EXIT_FAILURE;
	}
	free(a.steps);
	return ret;
}
