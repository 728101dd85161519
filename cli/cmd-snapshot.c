/*
 * snapshot: list, take, apply or delete internal snapshots, as qemu-img
 * snapshot:
 *   qcowkit snapshot [-f FMT] [-q] [-U] [-l | -c NAME | -a NAME | -d NAME] FILE
 * -a looks NAME up as an id first, then as a name; -d by name only, as
 * qemu-img does. Without an action the image is opened and nothing else
 * happens (as qemu-img).
 */
#include "cli.h"

#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum action { NONE, LIST, CREATE, APPLY, DELETE };

static int list(qk_image *img)
{
	const struct qk_snapshot *sn;
	size_t n;
	int ret = qk_list_snapshots(img, &sn, &n);
	if (ret < 0) {
		cli_lib_error(ret);
		return 1;
	}
	if (n == 0)
		return 0;
	printf("Snapshot list:\n");
	print_snapshot_header(stdout);
	printf("\n");
	for (size_t i = 0; i < n; i++) {
		print_snapshot_row(stdout, &sn[i]);
		printf("\n");
	}
	return 0;
}

/* Run `action` on the open image; the message as qemu-img words it. */
static int act(qk_image *img, enum action action, const char *name)
{
	static const char *const verb[] = { [CREATE] = "create", [APPLY] = "apply",
					    [DELETE] = "delete" };
	int ret = 0;
	switch (action) {
	case NONE:
		return 0;
	case LIST:
		return list(img);
	case CREATE:
		ret = qk_snapshot_create(img, name);
		break;
	case APPLY:
		ret = qk_snapshot_apply(img, name);
		break;
	case DELETE:
		ret = qk_snapshot_delete(img, NULL, name);
		break;
	}
	if (ret < 0) {
		/* The library's message, without the name of the call. */
		const char *msg = qk_last_error(), *colon = strstr(msg, ": ");
		if (strncmp(msg, "qk_", 3) == 0 && colon)
			msg = colon + 2;
		char *esc = cli_escape(name);
		cli_error("Could not %s snapshot '%s': %s", verb[action], esc ? esc : "",
			  ret != -ENOENT || action == CREATE ? msg
			  : action == APPLY ? "Failed to load snapshot: No such file or directory"
			  : "snapshot not found");
		free(esc);
		return 1;
	}
	return 0;
}

static int set_action(enum action *a, enum action want, const char **name, const char *arg)
{
	if (*a != NONE) {
		cli_usage_error("snapshot", 1, "Cannot mix '-l', '-a', '-c', '-d'");
		return -1;
	}
	*a = want;
	*name = arg;
	return 0;
}

int cmd_snapshot(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "force-share", no_argument, NULL, 'U' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct cli_opts o = { .cmd = "snapshot", .usage_code = 1 };
	enum action action = NONE;
	const char *name = NULL;
	int c;
	while ((c = cli_getopt(&o, argc, argv, "f:lc:a:d:qU", longopts)) > 0) {
		int r = 0;
		if (c == 'l')
			r = set_action(&action, LIST, &name, NULL);
		else if (c == 'c')
			r = set_action(&action, CREATE, &name, optarg);
		else if (c == 'a')
			r = set_action(&action, APPLY, &name, optarg);
		else if (c == 'd')
			r = set_action(&action, DELETE, &name, optarg);
		if (r < 0)
			return 1;
	}
	const char *file = cli_one_image(&o, c, argc, argv);
	qk_format fmt;
	if (!file)
		return o.status;
	if (cli_parse_format(o.fmtname, &fmt) < 0)
		return 1;
	uint32_t flags = o.open_flags;
	if (action == CREATE || action == APPLY || action == DELETE) {
		if (flags & QK_OPEN_FORCE_SHARE) {
			cli_error("Could not open '%s': force-share=on can only be used with "
				  "read-only images", file);
			return 1;
		}
		flags |= QK_OPEN_RDWR;
	}
	qk_image *img;
	if (cli_open(file, fmt, flags, &img) < 0)
		return 1;
	int status = act(img, action, name);
	int ret = qk_close(img);
	if (ret < 0 && status == 0) {
		cli_lib_error(ret);
		status = 1;
	}
	return status;
}
