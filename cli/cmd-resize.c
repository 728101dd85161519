/*
 * resize: change the virtual size of an image, as qemu-img resize.
 *   qcowkit resize [--shrink] [-f FMT] [-q] FILE [+|-]SIZE
 */
#include "cli.h"

#include <getopt.h>
#include <stdio.h>
#include <string.h>

/* SIZE, +SIZE or -SIZE: *sign is 0, 1 or -1. Returns 0, or -1 after
 * qemu-img's message. */
static int parse_size_arg(const char *arg, int *sign, uint64_t *n)
{
	*sign = 0;
	if (arg[0] == '+' || arg[0] == '-')
		*sign = *arg++ == '+' ? 1 : -1;
	if (cli_parse_size(arg, n) < 0) {
		cli_error("Parameter 'size' expects a non-negative number below 2^64");
		return -1;
	}
	return 0;
}

/*
 * The new size of an image of `cur` bytes asked for as (sign, n), checked
 * as qemu-img does: it must fit, be positive and a multiple of 512, and
 * be smaller only with --shrink (`shrink`, then a warning is printed).
 * Returns 0 and sets *size, or -1 after the message.
 */
static int new_size(int sign, uint64_t n, uint64_t cur, bool shrink,
		    uint64_t *size)
{
	*size = n;
	if (sign > 0)
		*size = cur + n;
	else if (sign < 0)
		*size = n > cur ? 0 : cur - n;
	if ((sign > 0 && *size < cur) || *size > (uint64_t)INT64_MAX) {
		cli_error("Image size too large");
		return -1;
	}
	if (*size == 0) {
		cli_error("New image size must be positive");
		return -1;
	}
	if (*size % 512) {
		cli_error("The new size must be a multiple of 512");
		return -1;
	}
	if (*size < cur && !shrink) {
		cli_error("Use the --shrink option to perform a shrink operation.");
		return -1;
	}
	if (*size < cur)
		fprintf(stderr, "qcowkit: warning: Shrinking an image will delete all data beyond the "
			"shrunken image's end. Before performing such an operation, make sure there is "
			"no important data there.\n");
	return 0;
}

/* Resize `file` as (sign, n) says. Returns the exit status. */
static int resize(const char *file, qk_format fmt, int sign, uint64_t n,
		  bool shrink)
{
	qk_image *img;
	uint64_t size;
	int ret;

	if (cli_open(file, fmt, QK_OPEN_RDWR, &img) < 0)
		return 1;
	if (new_size(sign, n, qk_get_size(img), shrink, &size) < 0) {
		qk_close(img);
		return 1;
	}
	ret = qk_resize(img, size, shrink ? QK_RESIZE_SHRINK : 0);
	if (ret < 0) {
		cli_lib_error(ret);
		qk_close(img);
		return 1;
	}
	ret = qk_close(img);
	if (ret < 0) {
		cli_lib_error(ret);
		return 1;
	}
	return 0;
}

int cmd_resize(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "shrink", no_argument, NULL, 'S' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	qk_format fmt = QK_FORMAT_AUTO;
	bool shrink = false, quiet = false;
	uint64_t n;
	int c, sign;

	/* The size is the last argument, taken before option parsing so that
	 * "-512k" is not read as options (as qemu-img does). */
	if (argc < 2 || strcmp(argv[argc - 1], "--help") == 0 || strcmp(argv[argc - 1], "-h") == 0) {
		cli_print_usage(argc < 2 ? stderr : stdout, cli_find_command("resize"));
		return argc < 2 ? 1 : 0;
	}
	const char *arg = argv[--argc];
	optind = 1;
	/* Not cli_getopt(): -f is checked as it comes, and -U is refused. */
	while ((c = getopt_long(argc, argv, "f:qhU", longopts, NULL)) != -1) {
		switch (c) {
		case 'f':
			if (cli_parse_format(optarg, &fmt) < 0)
				return 1;
			break;
		case 'q':
			quiet = true;
			break;
		case 'S':
			shrink = true;
			break;
		default:
			return cli_option_end("resize", c, argv, 1);
		}
	}
	if (argc - optind != 1)
		return cli_usage_error("resize", 1, "Expecting image file name and size");
	if (parse_size_arg(arg, &sign, &n) < 0 ||
	    resize(argv[optind], fmt, sign, n, shrink) != 0)
		return 1;
	if (!quiet)
		printf("Image resized.\n");
	return 0;
}
