/*
 * cmd-check.c - "qcowkit check": check (and with -r repair) an image, as
 * qemu-img check: the same per-problem lines on stderr, the same summary
 * and JSON keys on stdout, the same exit codes (0 clean, 1 the check could
 * not be completed, 2 corruptions, 3 only leaks, 63 no checks for the
 * format). Extra detail (wrong COPIED flags, refcounts past the end of the
 * file) goes under extra JSON keys.
 *
 * --forensic reports instead, read-only: clusters the image maps whose
 * refcount is 0, leaked clusters (and whether they hold data; --extract DIR
 * saves the non-zero ones, one file per cluster, up to a limit), and data
 * clusters only snapshots reference (check-forensic.c). Exit 0 when
 * nothing was found, 3 otherwise.
 *
 * SPDX-License-Identifier: MIT
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"

#define EXIT_CORRUPT 2
#define EXIT_LEAKS 3
#define EXIT_NO_CHECKS 63

static void report_line(void *opaque, const char *line)
{
	char *safe = cli_escape(line);

	(void)opaque;
	fprintf(stderr, "%s\n", safe);
	free(safe);
}

static void print_human(const struct qk_check_result *r)
{
	if (r->corruptions_fixed || r->leaks_fixed)
		printf("The following inconsistencies were found and repaired:\n\n"
		       "    %" PRIu64 " leaked clusters\n"
		       "    %" PRIu64 " corruptions\n\n"
		       "Double checking the fixed image now...\n",
		       r->leaks_fixed, r->corruptions_fixed);
	if (r->corruptions == 0 && r->leaks == 0 && r->check_errors == 0) {
		printf("No errors were found on the image.\n");
	} else {
		if (r->corruptions)
			printf("\n%" PRIu64 " errors were found on the image.\n"
			       "Data may be corrupted, or further writes to the "
			       "image may corrupt it.\n", r->corruptions);
		if (r->leaks)
			printf("\n%" PRIu64 " leaked clusters were found on the "
			       "image.\nThis means waste of disk space, but no "
			       "harm to data.\n", r->leaks);
		if (r->check_errors)
			printf("\n%" PRIu64 " internal errors have occurred "
			       "during the check.\n", r->check_errors);
	}
	if (r->total_clusters && r->allocated_clusters)
		printf("%" PRIu64 "/%" PRIu64 " = %0.2f%% allocated, %0.2f%% "
		       "fragmented, %0.2f%% compressed clusters\n",
		       r->allocated_clusters, r->total_clusters,
		       (double)r->allocated_clusters * 100.0 /
		       (double)r->total_clusters,
		       (double)r->fragmented_clusters * 100.0 /
		       (double)r->allocated_clusters,
		       (double)r->compressed_clusters * 100.0 /
		       (double)r->allocated_clusters);
	if (r->image_end_offset)
		printf("Image end offset: %" PRIu64 "\n", r->image_end_offset);
}

static void add_nonzero(struct qj *d, const char *key, uint64_t v)
{
	if (v)
		qj_add_uint(d, key, v);
}

static void print_json(const struct qk_check_result *r, const char *file,
		       const char *fmt)
{
	struct qj *d = qj_dict();

	qj_add_str(d, "filename", file);
	qj_add_str(d, "format", fmt);
	qj_add_uint(d, "check-errors", r->check_errors);
	add_nonzero(d, "image-end-offset", r->image_end_offset);
	add_nonzero(d, "corruptions", r->corruptions);
	add_nonzero(d, "leaks", r->leaks);
	add_nonzero(d, "corruptions-fixed", r->corruptions_fixed);
	add_nonzero(d, "leaks-fixed", r->leaks_fixed);
	add_nonzero(d, "total-clusters", r->total_clusters);
	add_nonzero(d, "allocated-clusters", r->allocated_clusters);
	add_nonzero(d, "fragmented-clusters", r->fragmented_clusters);
	add_nonzero(d, "compressed-clusters", r->compressed_clusters);
	add_nonzero(d, "qcowkit-copied-errors", r->copied_errors);
	add_nonzero(d, "qcowkit-refcounts-past-eof", r->refcounts_past_eof);
	add_nonzero(d, "qcowkit-overlaps", r->overlaps);
	add_nonzero(d, "qcowkit-stale-bitmaps", r->stale_bitmaps);
	qj_print_json(stdout, d);
	printf("\n");
	qj_free(d);
}

/* check's command line. */
struct check_args {
	struct cli_opts o;
	struct check_forensic fa;  /* --extract and its limits */
	bool forensic;             /* --forensic */
	bool limits;               /* an --extract-max-* was given */
	bool quiet;                /* -q */
	uint32_t fix;              /* -r: QK_CHECK_FIX_* */
};

/* Parse check's command line into *a. Returns CLI_GO, or the exit status
 * after --help or a message. */
static int parse_args(int argc, char **argv, struct check_args *a)
{
	enum { OPT_MAX_FILES = 256, OPT_MAX_BYTES };
	static const struct option longopts[] = {
		{ "help", no_argument, NULL, 'h' },
		{ "output", required_argument, NULL, 'O' },
		{ "repair", required_argument, NULL, 'r' },
		{ "force-share", no_argument, NULL, 'U' },
		{ "forensic", no_argument, NULL, 'F' },
		{ "extract", required_argument, NULL, 'X' },
		{ "extract-max-files", required_argument, NULL, OPT_MAX_FILES },
		{ "extract-max-bytes", required_argument, NULL, OPT_MAX_BYTES },
		{ NULL, 0, NULL, 0 },
	};
	int c;

	while ((c = cli_getopt(&a->o, argc, argv, ":hf:r:T:qU", longopts)) > 0) {
		switch (c) {
		case 'r':
			if (strcmp(optarg, "leaks") == 0) {
				a->fix = QK_CHECK_FIX_LEAKS;
			} else if (strcmp(optarg, "all") == 0) {
				a->fix = QK_CHECK_FIX_LEAKS | QK_CHECK_FIX_ERRORS;
			} else {
				return cli_usage_error("check", CLI_EXIT_FAILURE,
						       "Unknown option value for -r (expecting 'leaks' or 'all'): %s",
						       optarg);
			}
			break;
		case 'T':
			break;  /* cache mode of the checked image: page cache */
		case 'q':
			a->quiet = true;
			break;
		case 'F':
			a->forensic = true;
			break;
		case 'X':
			a->fa.extract = optarg;
			break;
		case OPT_MAX_FILES:
			if (cli_parse_uint(optarg, &a->fa.max_files) < 0 ||
			    a->fa.max_files == 0)
				return cli_usage_error("check", CLI_EXIT_FAILURE,
						       "--extract-max-files needs a count of at least 1: %s",
						       optarg);
			a->limits = true;
			break;
		case OPT_MAX_BYTES:
			if (cli_cvtnum("--extract-max-bytes", optarg, 1,
				       INT64_MAX, &a->fa.max_bytes) < 0)
				return CLI_EXIT_FAILURE;
			a->limits = true;
			break;
		}
	}
	a->fa.file = cli_one_image(&a->o, c, argc, argv);
	return a->fa.file != NULL ? CLI_GO : a->o.status;
}

/* Check (and with a->fix repair) the open image and report as qemu-img
 * check. Closes `img`. Returns the exit status. */
static int run_check(qk_image *img, const struct check_args *a)
{
	struct qk_check_result r = { .struct_size = sizeof r };
	struct qk_info info = { .struct_size = sizeof info };
	int ret = qk_check(img, a->fix, &r, report_line, NULL);

	if (ret == -ENOTSUP) {
		cli_error("This image format does not support checks");
		qk_close(img);
		return EXIT_NO_CHECKS;
	}
	if (ret < 0) {
		cli_lib_error(ret);
		qk_close(img);
		return CLI_EXIT_FAILURE;
	}
	qk_get_info(img, &info);
	if (!a->quiet) {
		if (a->o.json)
			print_json(&r, a->fa.file, qk_format_name(info.format));
		else
			print_human(&r);
	}
	ret = qk_close(img);
	if (ret < 0) {
		cli_lib_error(ret);
		return CLI_EXIT_FAILURE;
	}
	if (r.check_errors)
		return CLI_EXIT_FAILURE;
	if (r.corruptions)
		return EXIT_CORRUPT;
	if (r.leaks)
		return EXIT_LEAKS;
	return CLI_EXIT_OK;
}

int cmd_check(int argc, char **argv)
{
	struct check_args a = {
		.o = { .cmd = "check", .usage_code = CLI_EXIT_FAILURE,
		       .open_flags = QK_OPEN_CHECK },
		.fa = { .max_files = CHECK_EXTRACT_MAX_FILES,
			.max_bytes = CHECK_EXTRACT_MAX_BYTES },
	};
	qk_format fmt;
	qk_image *img;
	int ret;

	if ((ret = parse_args(argc, argv, &a)) != CLI_GO)
		return ret;
	if (cli_parse_format(a.o.fmtname, &fmt) < 0)
		return CLI_EXIT_FAILURE;
	if (a.fa.extract != NULL && !a.forensic)
		return cli_usage_error("check", CLI_EXIT_FAILURE, "--extract needs --forensic");
	if (a.limits && a.fa.extract == NULL)
		return cli_usage_error("check", CLI_EXIT_FAILURE,
				       "--extract-max-files and --extract-max-bytes need --extract");
	if (a.forensic && a.fix)
		return cli_usage_error("check", CLI_EXIT_FAILURE,
				       "--forensic does not repair: leave out -r");
	if (a.fix)
		a.o.open_flags |= QK_OPEN_RDWR;
	if (cli_open(a.fa.file, fmt, a.o.open_flags, &img) < 0)
		return CLI_EXIT_FAILURE;
	if (!a.forensic)
		return run_check(img, &a);
	a.fa.json = a.o.json;
	ret = check_forensic(img, &a.fa);
	qk_close(img);
	return ret;
}
