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
 * saves their bytes, one file per cluster), and data clusters only
 * snapshots reference. Exit 0 when nothing was found, 3 otherwise.
 *
 * SPDX-License-Identifier: MIT
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

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
	qj_print_json(stdout, d);
	printf("\n");
	qj_free(d);
}

struct forensic {
	const char *extract;      /* directory, or NULL */
	struct qj *unref, *leaked, *snap;
	uint64_t n_unref, n_leaked, n_leaked_data, n_snap;
	int err;                  /* errno of a failed extraction */
};

static int on_found(void *opaque, const struct qk_forensic_item *it)
{
	struct forensic *f = opaque;
	struct qj *e = qj_dict();

	qj_add_uint(e, "host-offset", it->host);
	switch (it->kind) {
	case QK_FORENSIC_UNREFERENCED:
		qj_add_uint(e, "guest-offset", it->guest);
		qj_add(f->unref, NULL, e);
		f->n_unref++;
		break;
	case QK_FORENSIC_LEAKED:
		qj_add_uint(e, "refcount", it->refcount);
		qj_add_bool(e, "data", it->nonzero);
		f->n_leaked++;
		f->n_leaked_data += it->nonzero ? 1 : 0;
		if (f->extract != NULL) {
			char path[4096];
			int fd;

			snprintf(path, sizeof path, "%s/cluster-%016" PRIx64 ".bin",
				 f->extract, it->host);
			fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
			if (fd < 0 || write(fd, it->data, it->length) != (ssize_t)it->length) {
				f->err = errno ? errno : EIO;
				if (fd >= 0)
					close(fd);
				qj_free(e);
				return -f->err;
			}
			close(fd);
			qj_add_str(e, "file", path);
		}
		qj_add(f->leaked, NULL, e);
		break;
	default:
		qj_add(f->snap, NULL, e);
		f->n_snap++;
		break;
	}
	return 0;
}

/* Human lines of a findings list: "    host 0x..., guest 0x..." */
static void print_entries(const char *title, const struct qj *list, uint64_t n)
{
	if (title != NULL)
		printf("%s: %" PRIu64 "\n", title, n);
	qj_print_human(stdout, 1, list);
}

static int run_forensic(qk_image *img, const char *file, bool json,
			const char *extract)
{
	struct forensic f;
	int r;

	memset(&f, 0, sizeof f);
	f.extract = extract;
	f.unref = qj_list();
	f.leaked = qj_list();
	f.snap = qj_list();
	if (extract != NULL && mkdir(extract, 0755) < 0 && errno != EEXIST) {
		cli_error("Could not create '%s': %s", extract, strerror(errno));
		r = -1;
		goto out;
	}
	r = qk_forensic(img, on_found, &f);
	if (r < 0) {
		if (f.err)
			cli_error("Could not write to '%s': %s", extract, strerror(f.err));
		else if (r == -ENOTSUP)
			cli_error("This image format does not support checks");
		else
			cli_lib_error(r);
		goto out;
	}
	if (json) {
		struct qj *d = qj_dict();

		qj_add_str(d, "filename", file);
		qj_add_uint(d, "unreferenced-clusters", f.n_unref);
		qj_add_uint(d, "leaked-clusters", f.n_leaked);
		qj_add_uint(d, "leaked-clusters-with-data", f.n_leaked_data);
		qj_add_uint(d, "snapshot-only-clusters", f.n_snap);
		qj_add(d, "unreferenced", f.unref);
		qj_add(d, "leaked", f.leaked);
		qj_add(d, "snapshot-only", f.snap);
		f.unref = f.leaked = f.snap = NULL;
		qj_print_json(stdout, d);
		printf("\n");
		qj_free(d);
	} else {
		printf("Forensic report of '%s' (the image was not changed)\n", file);
		print_entries("Mapped but unreferenced clusters (refcount 0)",
			      f.unref, f.n_unref);
		printf("Leaked clusters: %" PRIu64 " (%" PRIu64 " hold non-zero data)\n",
		       f.n_leaked, f.n_leaked_data);
		print_entries(NULL, f.leaked, f.n_leaked);
		print_entries("Data clusters only snapshots reference",
			      f.snap, f.n_snap);
	}
	r = f.n_unref || f.n_leaked ? EXIT_LEAKS : 0;
out:
	qj_free(f.unref);
	qj_free(f.leaked);
	qj_free(f.snap);
	return r;
}

int cmd_check(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "help", no_argument, NULL, 'h' },
		{ "output", required_argument, NULL, 'O' },
		{ "repair", required_argument, NULL, 'r' },
		{ "force-share", no_argument, NULL, 'U' },
		{ "forensic", no_argument, NULL, 'F' },
		{ "extract", required_argument, NULL, 'X' },
		{ NULL, 0, NULL, 0 },
	};
	const char *fmtname = NULL, *file, *extract = NULL;
	bool forensic = false;
	bool json = false, quiet = false;
	uint32_t fix = 0, oflags = QK_OPEN_CHECK;
	struct qk_check_result r;
	struct qk_info info;
	qk_format fmt;
	qk_image *img;
	int c, ret;

	while ((c = getopt_long(argc, argv, ":hf:r:T:qU", longopts,
				NULL)) != -1) {
		switch (c) {
		case 'f':
			fmtname = optarg;
			break;
		case 'r':
			if (strcmp(optarg, "leaks") == 0) {
				fix = QK_CHECK_FIX_LEAKS;
			} else if (strcmp(optarg, "all") == 0) {
				fix = QK_CHECK_FIX_LEAKS | QK_CHECK_FIX_ERRORS;
			} else {
				return cli_usage_error("check", CLI_EXIT_FAILURE,
						       "Unknown option value for -r (expecting 'leaks' or 'all'): %s",
						       optarg);
			}
			break;
		case 'O':
			if (cli_parse_output(optarg, &json) < 0)
				return CLI_EXIT_FAILURE;
			break;
		case 'T':
			break;  /* cache mode of the checked image: page cache */
		case 'q':
			quiet = true;
			break;
		case 'U':
			oflags |= QK_OPEN_FORCE_SHARE;
			break;
		case 'F':
			forensic = true;
			break;
		case 'X':
			extract = optarg;
			break;
		case 'h':
			cli_print_usage(stdout, cli_find_command("check"));
			return CLI_EXIT_OK;
		default:
			return cli_bad_option("check", c, argv, CLI_EXIT_FAILURE);
		}
	}
	if (optind != argc - 1)
		return cli_usage_error("check", CLI_EXIT_FAILURE,
				       "Expecting one image file name");
	file = argv[optind];
	if (cli_parse_format(fmtname, &fmt) < 0)
		return CLI_EXIT_FAILURE;
	if (extract != NULL && !forensic)
		return cli_usage_error("check", CLI_EXIT_FAILURE, "--extract needs --forensic");
	if (forensic && fix)
		return cli_usage_error("check", CLI_EXIT_FAILURE,
				       "--forensic does not repair: leave out -r");
	if (fix)
		oflags |= QK_OPEN_RDWR;
	if (cli_open(file, fmt, oflags, &img) < 0)
		return CLI_EXIT_FAILURE;
	if (forensic) {
		ret = run_forensic(img, file, json, extract);
		qk_close(img);
		return ret < 0 ? CLI_EXIT_FAILURE : ret;
	}
	ret = qk_check(img, fix, &r, report_line, NULL);
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
	if (!quiet) {
		if (json)
			print_json(&r, file, qk_format_name(info.format));
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
