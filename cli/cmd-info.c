/*
 * cmd-info.c - "qcowkit info": describe an image as qemu-img 7.2 info does,
 * in its human layout or its JSON (ImageInfo) keys and types.
 *
 * SPDX-License-Identifier: MIT
 */
#include <getopt.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"

/* What one image of the report needs, gathered before printing so that a
 * failure prints nothing half-way. */
struct image_report {
	qk_image *img;
	struct qk_info info;
	const struct qk_snapshot *snaps;
	size_t nsnaps;
	const struct qk_bitmap *bitmaps;
	size_t nbitmaps;
	struct qj *format_specific;   /* the "data" dict lives inside */
};

static const char *compression_name(uint32_t type)
{
	return type == QK_COMPRESSION_ZSTD ? "zstd" : "zlib";
}

/* ImageInfoSpecific for qcow2 (block/qcow2.c qcow2_get_specific_info):
 * v2 images report only compat, compression type and refcount bits. */
static struct qj *qcow2_specific(const struct image_report *r)
{
	const struct qk_info *in = &r->info;
	struct qj *spec = qj_dict(), *data;

	qj_add_str(spec, "type", "qcow2");
	data = qj_add(spec, "data", qj_dict());
	if (in->qcow2_version < 3) {
		qj_add_str(data, "compat", "0.10");
		qj_add_uint(data, "refcount-bits", in->refcount_bits);
		qj_add_str(data, "compression-type",
			   compression_name(in->compression_type));
		return spec;
	}
	qj_add_str(data, "compat", "1.1");
	if (in->data_file != NULL)
		qj_add_str(data, "data-file", in->data_file);
	/* data-file-raw comes with the external-data-file feature bit. */
	if (in->incompatible_features & (1u << 2))
		qj_add_bool(data, "data-file-raw", in->data_file_raw != 0);
	qj_add_bool(data, "extended-l2", in->extended_l2 != 0);
	qj_add_bool(data, "lazy-refcounts", in->lazy_refcounts != 0);
	qj_add_bool(data, "corrupt", in->corrupt != 0);
	qj_add_uint(data, "refcount-bits", in->refcount_bits);
	if (r->nbitmaps > 0) {
		struct qj *list = qj_add(data, "bitmaps", qj_list());

		for (size_t i = 0; i < r->nbitmaps; i++) {
			const struct qk_bitmap *b = &r->bitmaps[i];
			struct qj *bm = qj_add(list, NULL, qj_dict());
			struct qj *flags;

			qj_add_str(bm, "name", b->name);
			qj_add_uint(bm, "granularity", b->granularity);
			flags = qj_add(bm, "flags", qj_list());
			if (b->flags & QK_BITMAP_IN_USE)
				qj_add_str(flags, NULL, "in-use");
			if (b->flags & QK_BITMAP_AUTO)
				qj_add_str(flags, NULL, "auto");
		}
	}
	qj_add_str(data, "compression-type",
		   compression_name(in->compression_type));
	return spec;
}

/* Gather everything about `img`; prints the error and returns -1 on
 * failure. */
static int gather(qk_image *img, struct image_report *r)
{
	int ret;

	memset(r, 0, sizeof(*r));
	r->img = img;
	r->info.struct_size = sizeof r->info;
	ret = qk_get_info(img, &r->info);
	if (ret < 0)
		goto fail;
	ret = qk_list_snapshots(img, &r->snaps, &r->nsnaps);
	if (ret < 0)
		goto fail;
	if (r->info.format == QK_FORMAT_QCOW2) {
		if (r->info.nb_bitmaps > 0) {
			ret = qk_list_bitmaps(img, &r->bitmaps, &r->nbitmaps);
			if (ret < 0)
				goto fail;
		}
		r->format_specific = qcow2_specific(r);
	}
	return 0;
fail:
	cli_lib_error(ret);
	return -1;
}

/* The ImageInfo object of qemu-img info --output=json. Members are added
 * in QAPI schema order; the printer orders them the way QEMU does. */
static struct qj *image_json(struct image_report *r)
{
	const struct qk_info *in = &r->info;
	struct qj *o = qj_dict();

	qj_add_str(o, "filename", qk_get_filename(r->img));
	qj_add_str(o, "format", qk_format_name(in->format));
	qj_add_bool(o, "dirty-flag", in->dirty != 0);
	qj_add_uint(o, "actual-size", in->actual_size);
	qj_add_uint(o, "virtual-size", in->virtual_size);
	if (in->format == QK_FORMAT_QCOW2)
		qj_add_uint(o, "cluster-size", in->cluster_size);
	if (in->encrypted)
		qj_add_bool(o, "encrypted", true);
	if (in->backing_file != NULL && in->backing_file[0] != '\0') {
		qj_add_str(o, "backing-filename", in->backing_file);
		if (in->full_backing_file != NULL)
			qj_add_str(o, "full-backing-filename",
				   in->full_backing_file);
		if (in->backing_format != NULL && in->backing_format[0])
			qj_add_str(o, "backing-filename-format",
				   in->backing_format);
	}
	if (r->nsnaps > 0) {
		struct qj *list = qj_add(o, "snapshots", qj_list());

		for (size_t i = 0; i < r->nsnaps; i++) {
			const struct qk_snapshot *s = &r->snaps[i];
			struct qj *sn = qj_add(list, NULL, qj_dict());

			qj_add_str(sn, "id", s->id);
			qj_add_str(sn, "name", s->name);
			qj_add_uint(sn, "vm-state-size", s->vm_state_size);
			qj_add_uint(sn, "date-sec", s->date_sec);
			qj_add_uint(sn, "date-nsec", s->date_nsec);
			qj_add_uint(sn, "vm-clock-sec",
				    s->vm_clock_nsec / 1000000000u);
			qj_add_uint(sn, "vm-clock-nsec",
				    s->vm_clock_nsec % 1000000000u);
			if (s->icount != UINT64_MAX)
				qj_add_uint(sn, "icount", s->icount);
		}
	}
	if (r->format_specific != NULL) {
		qj_add(o, "format-specific", r->format_specific);
		r->format_specific = NULL;   /* now owned by o */
	}
	return o;
}

/* block/qapi.c bdrv_image_info_dump() of QEMU 7.2, with every name
 * escaped for the terminal (cli_escape), where QEMU prints it raw. */
static void image_human(const struct image_report *r)
{
	const struct qk_info *in = &r->info;
	char vsize[32], dsize[32];

	fmt_size_human(vsize, sizeof(vsize), in->virtual_size);
	fmt_size_human(dsize, sizeof(dsize), in->actual_size);
	printf("image: ");
	cli_fputs_escaped(stdout, qk_get_filename(r->img));
	printf("\n"
	       "file format: %s\n"
	       "virtual size: %s (%llu bytes)\n"
	       "disk size: %s\n",
	       qk_format_name(in->format), vsize,
	       (unsigned long long)in->virtual_size, dsize);
	if (in->encrypted)
		printf("encrypted: yes\n");
	if (in->format == QK_FORMAT_QCOW2)
		printf("cluster_size: %u\n", in->cluster_size);
	if (in->dirty)
		printf("cleanly shut down: no\n");
	if (in->backing_file != NULL && in->backing_file[0] != '\0') {
		printf("backing file: ");
		cli_fputs_escaped(stdout, in->backing_file);
		if (in->full_backing_file == NULL) {
			printf(" (cannot determine actual path)");
		} else if (strcmp(in->backing_file, in->full_backing_file) != 0) {
			printf(" (actual path: ");
			cli_fputs_escaped(stdout, in->full_backing_file);
			printf(")");
		}
		printf("\n");
		if (in->backing_format != NULL && in->backing_format[0]) {
			printf("backing file format: ");
			cli_fputs_escaped(stdout, in->backing_format);
			printf("\n");
		}
	}
	if (r->nsnaps > 0) {
		printf("Snapshot list:\n");
		print_snapshot_header(stdout);
		printf("\n");
		for (size_t i = 0; i < r->nsnaps; i++) {
			print_snapshot_row(stdout, &r->snaps[i]);
			printf("\n");
		}
	}
	if (r->format_specific != NULL) {
		printf("Format specific information:\n");
		qj_print_human(stdout, 1, qj_get(r->format_specific, "data"));
	}
}

/* Print the gathered reports: one JSON ImageInfo (a list of them with
 * --backing-chain) or the human layouts, a blank line between them. */
static void print_reports(struct image_report *reports, size_t n, bool json,
			  bool chain)
{
	if (json) {
		struct qj *out = chain ? qj_list() : NULL;

		for (size_t i = 0; i < n; i++) {
			struct qj *o = image_json(&reports[i]);

			if (out == NULL)
				out = o;
			else
				qj_add(out, NULL, o);
		}
		qj_print_json(stdout, out);
		printf("\n");
		qj_free(out);
		return;
	}
	for (size_t i = 0; i < n; i++) {
		if (i > 0)
			printf("\n");
		image_human(&reports[i]);
	}
}

int cmd_info(int argc, char **argv)
{
	enum { OPT_OUTPUT = 256, OPT_BACKING_CHAIN };
	static const struct option longopts[] = {
		{ "help", no_argument, NULL, 'h' },
		{ "format", required_argument, NULL, 'f' },
		{ "output", required_argument, NULL, OPT_OUTPUT },
		{ "backing-chain", no_argument, NULL, OPT_BACKING_CHAIN },
		{ "force-share", no_argument, NULL, 'U' },
		{ NULL, 0, NULL, 0 },
	};
	struct cli_opts o = { .cmd = "info", .usage_code = CLI_EXIT_FAILURE };
	const char *file;
	bool chain = false;
	qk_format fmt;
	qk_image *img;
	struct image_report *reports = NULL;
	size_t n = 0;
	int c, ret = CLI_EXIT_OK;

	while ((c = cli_getopt(&o, argc, argv, ":f:hU", longopts)) > 0)
		if (c == OPT_BACKING_CHAIN)
			chain = true;
	if ((file = cli_one_image(&o, c, argc, argv)) == NULL)
		return o.status;
	if (cli_parse_format(o.fmtname, &fmt) < 0)
		return CLI_EXIT_FAILURE;
	/* Like qemu-img, a plain info does not need the backing files to
	 * be present; the chain walk opens them. */
	if (!chain)
		o.open_flags |= QK_OPEN_NO_BACKING;
	/* Describing an image never opens the external data file it names
	 * (a name there is untrusted: a FIFO would hang the open). */
	o.open_flags |= QK_OPEN_DEFER_DATA;
	if (cli_open(file, fmt, o.open_flags, &img) < 0)
		return CLI_EXIT_FAILURE;

	/* Gather the whole chain before printing anything, so a failure
	 * part-way leaves only the error message (as with qemu-img). */
	for (qk_image *cur = img; cur != NULL; cur = qk_get_backing(cur)) {
		reports = cli_xrealloc(reports, sizeof(*reports) * (n + 1));
		if (gather(cur, &reports[n]) < 0) {
			ret = CLI_EXIT_FAILURE;
			break;
		}
		n++;
		if (!chain)
			break;
	}
	if (ret == CLI_EXIT_OK)
		print_reports(reports, n, o.json, chain);
	for (size_t i = 0; i < n; i++)
		qj_free(reports[i].format_specific);
	free(reports);
	qk_close(img);
	return ret;
}
