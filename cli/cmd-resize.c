/*
 * resize: change the virtual size of an image, as qemu-img resize.
 *   qcowkit resize [--shrink] [-f FMT] [-q] FILE [+|-]SIZE
 */
#include "cli.h"

#include <getopt.h>
#include <stdio.h>
#include <string.h>

int cmd_resize(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "shrink", no_argument, NULL, 'S' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	qk_format fmt = QK_FORMAT_AUTO;
	bool shrink = false, quiet = false;
	int c;
	/* The size is the last argument, taken before option parsing so that
	 * "-512k" is not read as options (as qemu-img does). */
	if (argc < 2 || strcmp(argv[argc - 1], "--help") == 0 || strcmp(argv[argc - 1], "-h") == 0) {
		cli_print_usage(argc < 2 ? stderr : stdout, cli_find_command("resize"));
		return argc < 2 ? 1 : 0;
	}
	const char *arg = argv[--argc];
	optind = 1;
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
		case 'h':
			cli_print_usage(stdout, cli_find_command("resize"));
			return 0;
		default:
			return cli_bad_option("resize", c, argv, 1);
		}
	}
	if (argc - optind != 1)
		return cli_usage_error("resize", 1, "Expecting image file name and size");
	const char *file = argv[optind];
	int sign = 0;
	if (arg[0] == '+' || arg[0] == '-')
		sign = *arg++ == '+' ? 1 : -1;
	uint64_t n;
	if (cli_parse_size(arg, &n) < 0) {
		cli_error("Parameter 'size' expects a non-negative number below 2^64");
		return 1;
	}
	qk_image *img;
	if (cli_open(file, fmt, QK_OPEN_RDWR, &img) < 0)
		return 1;
	uint64_t cur = qk_get_size(img), size = n;
	if (sign > 0)
		size = cur + n;
	else if (sign < 0)
		size = n > cur ? 0 : cur - n;
	if ((sign > 0 && size < cur) || size > (uint64_t)INT64_MAX) {
		qk_close(img);
		cli_error("Image size too large");
		return 1;
	}
	if (size == 0) {
		qk_close(img);
		cli_error("New image size must be positive");
		return 1;
	}
	if (size % 512) {
		qk_close(img);
		cli_error("The new size must be a multiple of 512");
		return 1;
	}
	if (size < cur && !shrink) {
		qk_close(img);
		cli_error("Use the --shrink option to perform a shrink operation.");
		return 1;
	}
	if (size < cur)
		fprintf(stderr, "qcowkit: warning: Shrinking an image will delete all data beyond the "
			"shrunken image's end. Before performing such an operation, make sure there is "
			"no important data there.\n");
	int ret = qk_resize(img, size, shrink ? QK_RESIZE_SHRINK : 0);
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
	if (!quiet)
		printf("Image resized.\n");
	return 0;
}
