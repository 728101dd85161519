/*
 * commit: write an image's changes into a file below it in its backing
 * chain, as qemu-img commit (7.2).
 *   qcowkit commit [-f FMT] [-b BASE] [-d] [-p] [-q] [-t CACHE] [-r RATE] FILE
 *
 * This file finds the base and opens it; qk_commit() (lib/commit.c) does
 * the rest: every range that a layer above the base allocates is read
 * through the top image and written into the base (zero ranges as zeros);
 * the base grows first when it is smaller than the top. Then, without -d
 * and without -b (which implies -d, as in qemu-img), the top is emptied so
 * that it reads as its backing file again. A power cut at any point leaves
 * the guest view of the top unchanged (qcowkit.h says why).
 *
 * Locks: the top is locked as usual (for writing when it is emptied, so
 * no other writer may hold it), its chain sharing writes
 * (QK_OPEN_SHARE_CHAIN), so that its read of the base does not conflict
 * with our own write lock on the base, opened read-write second.
 */
#include "cli.h"

#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct commit_args {
	const char *file, *base;
	qk_format fmt;
	bool drop, quiet, progress, direct;
};

/* Whether `name` names the backing file `b` of layer `l`, as QEMU's
 * bdrv_find_backing_image: the name l stores, or the same file as `name`
 * taken relative to l's directory. */
static bool names_backing(qk_image *l, qk_image *b, const char *name)
{
	struct qk_info info = { .struct_size = sizeof info };
	qk_image *layer = NULL;
	if (qk_get_info(l, &info) == 0 && info.backing_file && strcmp(info.backing_file, name) == 0)
		return true;
	char *path = cli_sibling_path(qk_get_filename(l), name);
	bool same = qk_uses_file(b, path, &layer) == QK_USES_IMAGE && layer == b;
	free(path);
	return same;
}

/* The layer of top's chain that `a->base` names (or top's backing file),
 * Returns 0, or 1 after qemu-img's message. */
static int find_base(qk_image *top, const struct commit_args *a, qk_image **base)
{
	qk_image *l = top, *b = qk_get_backing(top);
	if (!b) {
		cli_error("Image does not have a backing file");
		return 1;
	}
	while (a->base && b && !names_backing(l, b, a->base)) {
		l = b;
		b = qk_get_backing(b);
	}
	if (!b) {
		cli_error("Did not find '%s' in the backing chain of '%s'", a->base, a->file);
		return 1;
	}
	*base = b;
	return 0;
}

/* Commit with the images open. Returns the exit status. */
static int commit(const struct commit_args *a)
{
	uint32_t dflag = a->direct ? QK_OPEN_DIRECT : 0;
	bool empty = !a->drop && !a->base;
	qk_image *top = NULL, *layer = NULL, *base = NULL;
	struct cli_progress pr;
	int ret;

	if (cli_open(a->file, a->fmt, QK_OPEN_SHARE_CHAIN | dflag | (empty ? QK_OPEN_RDWR : 0),
		     &top) < 0)
		return 1;
	if (find_base(top, a, &layer) != 0) {
		qk_close(top);
		return 1;
	}
	if (cli_open(qk_get_filename(layer), qk_get_format(layer), QK_OPEN_RDWR | dflag,
		     &base) < 0) {
		qk_close(top);
		return 1;
	}
	struct qk_commit_options co;
	qk_commit_options_init(&co);
	co.flags = empty ? QK_COMMIT_EMPTY : 0;
	co.progress = progress_cb;
	co.progress_opaque = &pr;
	progress_init(&pr, a->progress, 1.0f);
	progress_print(&pr, 0, 0);
	ret = qk_commit(top, layer, base, &co);
	progress_end(&pr);
	if (ret < 0)
		cli_lib_error(ret);
	int r1 = qk_close(base), r2 = qk_close(top);
	if (ret == 0 && (r1 < 0 || r2 < 0)) {
		cli_lib_error(r1 < 0 ? r1 : r2);
		ret = -1;
	}
	return ret < 0 ? 1 : 0;
}

int cmd_commit(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct cli_opts o = { .cmd = "commit", .usage_code = CLI_EXIT_FAILURE };
	struct commit_args a = { 0 };
	uint64_t rate;
	int c;

	while ((c = cli_getopt(&o, argc, argv, ":f:b:dpqt:r:h", longopts)) > 0) {
		switch (c) {
		case 'b':
			a.base = optarg;
			break;
		case 'd':
			a.drop = true;
			break;
		case 'p':
			a.progress = true;
			break;
		case 'q':
			a.quiet = true;
			break;
		case 't':
			if (cli_parse_cache(optarg, &a.direct) < 0) {
				cli_error("Invalid cache option: %s", optarg);
				return 1;
			}
			break;
		case 'r': /* accepted as qemu-img does; one local copy needs no limit */
			if (cli_cvtnum("rate limit", optarg, 0, INT64_MAX, &rate) < 0)
				return 1;
			break;
		}
	}
	if ((a.file = cli_one_image(&o, c, argc, argv)) == NULL)
		return o.status;
	if (cli_parse_format(o.fmtname, &a.fmt) < 0)
		return 1;
	if (a.quiet)
		a.progress = false;
	int ret = commit(&a);
	if (ret == 0 && !a.quiet)
		printf("Image committed.\n");
	return ret;
}
