/*
 * cmd-map.c - "qcowkit map": how guest ranges map to host files, printed
 * as qemu-img 7.2 map does (human table or one JSON object per run).
 *
 * SPDX-License-Identifier: MIT
 */
#include <getopt.h>
#include <inttypes.h>
#include <string.h>

#include "cli.h"

/* One output run, qemu-img's MapEntry. */
struct map_entry {
	uint64_t start, length, offset;
	uint32_t depth;
	bool data, zero, present, has_offset;
	const char *file;        /* NULL unless has_offset */
};

static void to_entry(const struct qk_extent *e, struct map_entry *m)
{
	m->start = e->start;
	m->length = e->length;
	m->depth = e->depth;
	m->present = (e->flags & QK_EXTENT_PRESENT) != 0;
	m->zero = (e->flags & QK_EXTENT_ZERO) != 0;
	m->data = (e->flags & QK_EXTENT_DATA) != 0;
	m->has_offset = (e->flags & QK_EXTENT_OFFSET) != 0;
	m->offset = m->has_offset ? e->offset : 0;
	m->file = m->has_offset ? e->file : NULL;
}

/* qemu-img's entry_mergeable(): same fields, same file, and host offsets
 * that continue where `cur` ends. */
static bool mergeable(const struct map_entry *cur, const struct map_entry *n)
{
	if (cur->length == 0)
		return false;
	if (cur->zero != n->zero || cur->data != n->data ||
	    cur->depth != n->depth || cur->present != n->present ||
	    !cur->file != !n->file || cur->has_offset != n->has_offset)
		return false;
	if (cur->file != NULL && strcmp(cur->file, n->file) != 0)
		return false;
	if (cur->has_offset && cur->offset + cur->length != n->offset)
		return false;
	return true;
}

/*
 * Print entry `e` (qemu-img dump_map_entry). `next` is the entry that will
 * follow, NULL for the last one. The human table ignores the difference
 * between zero and unallocated runs, so it rewrites `next` to merge more.
 * Returns 0, or -1 after printing an error.
 */
static int dump_entry(bool json, const struct map_entry *e,
		      struct map_entry *next)
{
	if (!json) {
		if (e->data && !e->has_offset) {
			cli_error("File contains external, encrypted or "
				  "compressed clusters.");
			return -1;
		}
		if (e->data && !e->zero) {
			char a[32], b[32], c[32];

			/* %#x prints 0 as "0", others as "0x..." */
			snprintf(a, sizeof(a), "%#" PRIx64, e->start);
			snprintf(b, sizeof(b), "%#" PRIx64, e->length);
			snprintf(c, sizeof(c), "%#" PRIx64,
				 e->has_offset ? e->offset : 0);
			printf("%-16s%-16s%-16s", a, b, c);
			/* The data file's name comes from the image. */
			if (e->file != NULL)
				cli_fputs_escaped(stdout, e->file);
			putchar('\n');
		}
		if (next != NULL && (!next->data || next->zero)) {
			next->data = false;
			next->zero = true;
		}
		return 0;
	}
	printf("{ \"start\": %" PRIu64 ", \"length\": %" PRIu64 ", "
	       "\"depth\": %" PRIu32 ", \"present\": %s, \"zero\": %s, "
	       "\"data\": %s", e->start, e->length, e->depth,
	       e->present ? "true" : "false", e->zero ? "true" : "false",
	       e->data ? "true" : "false");
	if (e->has_offset)
		printf(", \"offset\": %" PRIu64, e->offset);
	putchar('}');
	if (next != NULL)
		puts(",");
	return 0;
}

/* A failure part-way: end the JSON line so the message stands alone, then
 * print it after what stdout already holds. */
static void map_failed(bool json)
{
	if (json)
		printf("\n");
	fflush(stdout);
}

/*
 * Print the map of [start, end) of `img`: runs of block status that
 * qemu-img would merge become one entry. Returns the exit status (1 after
 * printing an error).
 */
static int print_map(qk_image *img, uint64_t start, uint64_t end, bool json)
{
	struct map_entry cur, next;

	if (json)
		putchar('[');
	else
		printf("%-16s%-16s%-16s%s\n", "Offset", "Length", "Mapped to",
		       "File");

	/* An empty range still prints one (empty) entry, as qemu-img does. */
	memset(&cur, 0, sizeof(cur));
	cur.start = start;
	while (cur.start + cur.length < end) {
		uint64_t off = cur.start + cur.length;
		struct qk_extent ext;
		int r = qk_block_status(img, off, end - off, &ext);

		if (r < 0) {
			map_failed(json);
			cli_lib_error(r);
			return CLI_EXIT_FAILURE;
		}
		if (ext.length == 0 || ext.length > end - off) {
			map_failed(json);
			cli_error("qk_block_status: bad extent length %llu at "
				  "offset %llu", (unsigned long long)ext.length,
				  (unsigned long long)off);
			return CLI_EXIT_FAILURE;
		}
		to_entry(&ext, &next);
		if (mergeable(&cur, &next)) {
			cur.length += next.length;
			continue;
		}
		if (cur.length > 0 && dump_entry(json, &cur, &next) < 0)
			return CLI_EXIT_FAILURE;
		cur = next;
	}
	if (dump_entry(json, &cur, NULL) < 0)
		return CLI_EXIT_FAILURE;
	if (json)
		puts("]");
	return CLI_EXIT_OK;
}

int cmd_map(int argc, char **argv)
{
	enum { OPT_OUTPUT = 256, OPT_START_OFFSET, OPT_MAX_LENGTH };
	static const struct option longopts[] = {
		{ "help", no_argument, NULL, 'h' },
		{ "format", required_argument, NULL, 'f' },
		{ "output", required_argument, NULL, OPT_OUTPUT },
		{ "start-offset", required_argument, NULL, OPT_START_OFFSET },
		{ "max-length", required_argument, NULL, OPT_MAX_LENGTH },
		{ "force-share", no_argument, NULL, 'U' },
		{ NULL, 0, NULL, 0 },
	};
	struct cli_opts o = { .cmd = "map", .usage_code = CLI_EXIT_FAILURE };
	const char *file;
	bool have_max = false;
	uint64_t start = 0, max_len = 0, end;
	qk_format fmt;
	qk_image *img;
	int c, ret;

	while ((c = cli_getopt(&o, argc, argv, ":f:hU", longopts)) > 0) {
		switch (c) {
		case OPT_START_OFFSET:
			if (cli_cvtnum("start offset", optarg, 0, INT64_MAX,
				       &start) < 0)
				return CLI_EXIT_FAILURE;
			break;
		case OPT_MAX_LENGTH:
			if (cli_cvtnum("max length", optarg, 0, INT64_MAX,
				       &max_len) < 0)
				return CLI_EXIT_FAILURE;
			have_max = true;
			break;
		}
	}
	if ((file = cli_one_image(&o, c, argc, argv)) == NULL)
		return o.status;
	if (cli_parse_format(o.fmtname, &fmt) < 0)
		return CLI_EXIT_FAILURE;
	if (cli_open(file, fmt, o.open_flags, &img) < 0)
		return CLI_EXIT_FAILURE;

	end = qk_get_size(img);
	if (have_max && max_len < end && start <= end - max_len)
		end = start + max_len;
	ret = print_map(img, start, end, o.json);
	qk_close(img);
	return ret;
}
