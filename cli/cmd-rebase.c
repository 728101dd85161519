/*
 * rebase: change the backing file of an image, as qemu-img rebase (7.2).
 *   qcowkit rebase [-f FMT] [-u] -b BACKING [-F FMT] [-p] [-q] [-c]
 *                  [-t CACHE] [-T CACHE] [-U] FILE     (-b "": none)
 *
 * This file opens the image and the new backing file; qk_rebase()
 * (lib/commit.c) does the rest. Safe mode (no -u): wherever the image
 * allocates nothing, the guest view through the old backing chain is
 * compared, 512-byte sector by sector as qemu-img does, with the view
 * through the new backing file (zeros past its end, or everywhere with
 * -b ""), and the sectors that differ are written into the image. Only
 * then is the header changed (one durable write). With -c, a cluster
 * holding a difference is written whole and compressed (qemu-img 8.2's
 * -c). A power cut leaves the guest view unchanged (qcowkit.h says why).
 */
#include "cli.h"

#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct rebase_args {
	const char *file, *backing, *bfmt;
	qk_format fmt;
	bool unsafe, quiet, progress, compress, direct;
};

/* The library's message without its "qk_xxx: " prefix. */
static const char *lib_msg(void)
{
	const char *m = qk_last_error(), *c = strstr(m, ": ");
	return c && strncmp(m, "qk_", 3) == 0 ? c + 2 : m;
}

/* Open the new backing file as the image will, read-only. Returns 0 or 1
 * after qemu-img's message. */
static int open_new_backing(const struct rebase_args *a, qk_image **nb)
{
	qk_format f = QK_FORMAT_AUTO;
	*nb = NULL;
	if (!*a->backing)
		return 0;
	if (a->bfmt && cli_parse_format(a->bfmt, &f) < 0)
		return 1;
	char *path = cli_sibling_path(a->file, a->backing);
	struct qk_open_options o;
	qk_open_options_init(&o);
	o.format = f;
	o.flags = a->direct ? QK_OPEN_DIRECT : 0;
	int ret = qk_open(path, &o, nb);
	free(path);
	if (ret < 0) {
		cli_error("Could not open new backing file '%s': %s", a->backing, lib_msg());
		return 1;
	}
	return 0;
}

/* Rebase with the options parsed. Returns the exit status. */
static int rebase(struct rebase_args *a)
{
	qk_image *img, *nb = NULL;
	struct qk_rebase_options ro;
	struct cli_progress pr;
	if (cli_open(a->file, a->fmt, QK_OPEN_RDWR | (a->direct ? QK_OPEN_DIRECT : 0), &img) < 0)
		return 1;
	if (!a->unsafe && open_new_backing(a, &nb) != 0) {
		qk_close(img);
		return 1;
	}
	/* the data first (and qemu-img's order: copied, then a name without
	 * its format refused), then the header */
	qk_rebase_options_init(&ro);
	ro.flags = (a->unsafe ? QK_REBASE_UNSAFE : 0) | (a->compress ? QK_REBASE_COMPRESS : 0) |
		   QK_REBASE_COPY_ONLY;
	ro.progress = progress_cb;
	ro.progress_opaque = &pr;
	progress_init(&pr, a->progress && !a->unsafe, 1.0f);
	if (!a->unsafe)
		progress_print(&pr, 0, 0);
	int ret = qk_rebase(img, nb, a->backing, a->bfmt, &ro);
	progress_end(&pr);
	qk_close(nb);
	if (ret < 0) {
		cli_lib_error(ret);
	} else if (*a->backing && !a->bfmt) {
		cli_error("Could not change the backing file to '%s': backing format must be "
			  "specified", a->backing);
		ret = -1;
	} else if ((ret = qk_set_backing(img, a->backing, a->bfmt)) < 0) {
		cli_error("Could not change the backing file to '%s': %s", a->backing, lib_msg());
	}
	int r = qk_close(img);
	if (ret == 0 && r < 0) {
		cli_lib_error(r);
		ret = r;
	}
	return ret < 0 ? 1 : 0;
}

int cmd_rebase(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "help", no_argument, NULL, 'h' },
		{ "force-share", no_argument, NULL, 'U' },
		{ NULL, 0, NULL, 0 },
	};
	struct cli_opts o = { .cmd = "rebase", .usage_code = CLI_EXIT_FAILURE };
	struct rebase_args a = { 0 };
	bool unused;
	int c;

	while ((c = cli_getopt(&o, argc, argv, ":f:b:F:ut:T:pqcUh", longopts)) > 0) {
		switch (c) {
		case 'b': a.backing = optarg; break;
		case 'F': a.bfmt = optarg; break;
		case 'u': a.unsafe = true; break;
		case 'p': a.progress = true; break;
		case 'q': a.quiet = true; break;
		case 'c': a.compress = true; break;
		case 't':
		case 'T':
			if (cli_parse_cache(optarg, c == 't' ? &a.direct : &unused) < 0) {
				cli_error("Invalid %scache option: %s", c == 'T' ? "source " : "", optarg);
				return 1;
			}
			break;
		}
	}
	if ((a.file = cli_one_image(&o, c, argc, argv)) == NULL)
		return o.status;
	if (cli_parse_format(o.fmtname, &a.fmt) < 0)
		return 1;
	if (!a.backing && !a.unsafe)
		return cli_usage_error("rebase", 1, "Must specify backing file (-b) or use unsafe mode (-u)");
	if (!a.backing)
		a.backing = "";
	if (a.quiet)
		a.progress = false;
	return rebase(&a);
}
