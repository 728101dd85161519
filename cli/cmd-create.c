/*
 * cmd-create.c - "qcowkit create": make a new qcow2 or raw image, as
 * qemu-img 7.2 create does: the same flags and -o options, the same
 * "Formatting ..." line (option order, defaults, values as given), and the
 * same messages, each on one line.
 *
 * qemu-img checks in two rounds and so do we: option syntax, sizes and the
 * backing file before the "Formatting" line; option values and their
 * combinations after it (the library checks the combinations).
 *
 * SPDX-License-Identifier: MIT
 */
#include <getopt.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"

enum opt_type { T_SIZE, T_NUM, T_BOOL, T_STR };

struct opt_desc {
	const char *name;
	enum opt_type type;
	const char *def;        /* printed when not given (QEMU's default) */
	const char *help;
};

/* In the order qemu-img prints them on its "Formatting" line. */
static const struct opt_desc qcow2_descs[] = {
	{ "cluster_size", T_SIZE, "65536", "qcow2 cluster size" },
	{ "extended_l2", T_BOOL, "off", "Extended L2 tables" },
	{ "preallocation", T_STR, NULL,
	  "Preallocation mode (allowed values: off, metadata, falloc, full)" },
	{ "compression_type", T_STR, "zlib",
	  "Compression method used for image cluster compression" },
	{ "size", T_SIZE, NULL, "Virtual disk size" },
	{ "compat", T_STR, NULL, "Compatibility level (v2 [0.10] or v3 [1.1])" },
	{ "backing_file", T_STR, NULL, "File name of a base image" },
	{ "backing_fmt", T_STR, NULL, "Image format of the base image" },
	{ "data_file", T_STR, NULL, "File name of an external data file" },
	{ "data_file_raw", T_BOOL, NULL,
	  "The external data file must stay valid as a raw image" },
	{ "lazy_refcounts", T_BOOL, "off", "Postpone refcount updates" },
	{ "refcount_bits", T_NUM, "16", "Width of a reference count entry in bits" },
};

static const struct opt_desc raw_descs[] = {
	{ "size", T_SIZE, NULL, "Virtual disk size" },
	{ "preallocation", T_STR, NULL,
	  "Preallocation mode (allowed values: off, falloc, full)" },
};

#define MAX_DESCS (sizeof qcow2_descs / sizeof qcow2_descs[0])

struct opt_val {
	bool set;
	const char *str;        /* as given (T_BOOL, T_STR) */
	uint64_t num;           /* T_SIZE, T_NUM, T_BOOL */
};

struct create_opts {
	const struct opt_desc *descs;
	size_t n;
	struct opt_val val[MAX_DESCS];
};

static int find_desc(const struct create_opts *c, const char *name)
{
	for (size_t i = 0; i < c->n; i++)
		if (strcmp(c->descs[i].name, name) == 0)
			return (int)i;
	return -1;
}

static struct opt_val *get(struct create_opts *c, const char *name)
{
	int i = find_desc(c, name);

	return i < 0 ? NULL : &c->val[i];
}

/* qemu-img's -o help: the options sorted by name, "name=<type> - help". */
static void print_help(const struct create_opts *c, const char *fmt)
{
	static const char *const type_names[] = { "size", "num", "bool (on/off)", "str" };
	bool done[MAX_DESCS] = { false };

	printf("Supported %s options:\n", fmt);
	for (size_t k = 0; k < c->n; k++) {
		size_t best = c->n;
		char left[64];

		for (size_t i = 0; i < c->n; i++)
			if (!done[i] && (best == c->n ||
					 strcmp(c->descs[i].name, c->descs[best].name) < 0))
				best = i;
		done[best] = true;
		snprintf(left, sizeof left, "%s=<%s>", c->descs[best].name,
			 type_names[c->descs[best].type]);
		printf("  %-22s - %s\n", left, c->descs[best].help);
	}
}

/* QemuOpts booleans: on/yes/true/y and off/no/false/n. */
static int parse_bool(const char *s, bool *out)
{
	static const char *const yes[] = { "on", "yes", "true", "y" };
	static const char *const no[] = { "off", "no", "false", "n" };

	for (size_t i = 0; i < 4; i++) {
		if (strcmp(s, yes[i]) == 0) {
			*out = true;
			return 0;
		}
		if (strcmp(s, no[i]) == 0) {
			*out = false;
			return 0;
		}
	}
	return -1;
}

/*
 * Parse an -o list into c->val (the last of repeated keys wins). "key"
 * alone means key=on, "nokey" key=off, as QemuOpts flags do. Returns 0,
 * or -1 after printing qemu-img's message.
 */
static int parse_options(struct create_opts *c, const char *list)
{
	struct cli_kv *kv;
	int n = cli_parse_kv_list(list, &kv), ret = -1;

	if (n < 0) {
		cli_error("Invalid option list '%s': an option has no name", list);
		return -1;
	}
	for (int i = 0; i < n; i++) {
		const char *key = kv[i].key, *value = kv[i].value;
		int d = find_desc(c, key);
		struct opt_val *v;
		bool b;

		if (d < 0 && value[0] == '\0' && strncmp(key, "no", 2) == 0 &&
		    (d = find_desc(c, key + 2)) >= 0 && c->descs[d].type == T_BOOL) {
			value = "off";
		} else if (d < 0) {
			cli_error("Invalid parameter '%s'", key);
			goto out;
		}
		v = &c->val[d];
		switch (c->descs[d].type) {
		case T_SIZE:
			if (cli_parse_size(value, &v->num) < 0) {
				cli_error("Parameter '%s' expects a non-negative number "
					  "below 2^64. Optional suffix k, M, G, T, P or E "
					  "means kilo-, mega-, giga-, tera-, peta- and "
					  "exabytes, respectively.", key);
				goto out;
			}
			break;
		case T_NUM:
			if (cli_parse_uint(value, &v->num) < 0) {
				cli_error("Parameter '%s' expects a number", key);
				goto out;
			}
			break;
		case T_BOOL:
			if (value[0] == '\0')
				value = "on";
			if (parse_bool(value, &b) < 0) {
				cli_error("Parameter '%s' expects 'on' or 'off'", key);
				goto out;
			}
			v->num = b;
			break;
		case T_STR:
			break;
		}
		free((char *)v->str);
		v->str = cli_xstrdup(value);
		v->set = true;
	}
	ret = 0;
out:
	cli_free_kv(kv, n);
	return ret;
}

static void use_descs(struct create_opts *c, qk_format fmt)
{
	if (fmt == QK_FORMAT_RAW) {
		c->descs = raw_descs;
		c->n = sizeof raw_descs / sizeof raw_descs[0];
	} else {
		c->descs = qcow2_descs;
		c->n = sizeof qcow2_descs / sizeof qcow2_descs[0];
	}
}

static void free_options(struct create_opts *c)
{
	for (size_t i = 0; i < c->n; i++)
		free((char *)c->val[i].str);
}

static void set_str(struct create_opts *c, const char *name, const char *s)
{
	struct opt_val *v = get(c, name);

	free((char *)v->str);
	v->str = cli_xstrdup(s);
	v->set = true;
}

/* Open the backing file (not its own chain) to check it, to learn its
 * size, and to make sure the new image is not that file under another
 * name. Returns 0, or -1 after printing the reason. */
static int probe_backing(const char *image, const char *name, const char *fmt,
			 uint64_t *size, bool need_fmt)
{
	struct qk_open_options o;
	qk_image *img;
	char *path;
	int ret;

	qk_open_options_init(&o);
	o.flags = QK_OPEN_NO_BACKING | QK_OPEN_FORCE_SHARE;
	if (fmt != NULL && strcmp(fmt, "qcow2") == 0) {
		o.format = QK_FORMAT_QCOW2;
	} else if (fmt != NULL && strcmp(fmt, "raw") == 0) {
		o.format = QK_FORMAT_RAW;
	} else if (fmt != NULL) {
		cli_error("Could not open backing image: backing format '%s' is "
			  "not supported (qcow2 or raw)", fmt);
		return -1;
	}
	path = cli_sibling_path(image, name);
	ret = qk_open(path, &o, &img);
	if (ret < 0) {
		cli_error("Could not open backing image: %s", qk_last_error());
		free(path);
		return -1;
	}
	/* The same file by another name: creating the image would destroy
	 * its own backing file. */
	ret = qk_uses_file(img, image, NULL);
	if (ret != 0) {
		if (ret < 0)
			cli_lib_error(ret);
		else if (ret == QK_USES_DATA_FILE)
			cli_error("'%s' is the external data file of the backing file "
				  "'%s': refusing to overwrite it", image, path);
		else
			cli_error("'%s' is the backing file '%s' itself: refusing to "
				  "overwrite it", image, path);
		free(path);
		qk_close(img);
		return -1;
	}
	free(path);
	if (need_fmt) {
		cli_error("Backing file specified without backing format. Detected "
			  "format of %s.", qk_format_name(qk_get_format(img)));
		qk_close(img);
		return -1;
	}
	*size = qk_get_size(img);
	qk_close(img);
	return 0;
}

/* Print a string option as QemuOpts does: commas doubled. */
static void print_escaped(const char *s)
{
	for (; *s; s++) {
		if (*s == ',')
			putchar(',');
		putchar(*s);
	}
}

/* qemu-img's "Formatting 'F', fmt=X key=value ..." line. */
static void print_formatting(const struct create_opts *c, const char *file,
			     const char *fmt)
{
	printf("Formatting '%s', fmt=%s", file, fmt);
	for (size_t i = 0; i < c->n; i++) {
		const struct opt_desc *d = &c->descs[i];
		const struct opt_val *v = &c->val[i];

		if (!v->set && d->def == NULL)
			continue;
		printf(" %s=", d->name);
		if (!v->set)
			fputs(d->def, stdout);
		else if (d->type == T_SIZE || d->type == T_NUM)
			printf("%" PRId64, (int64_t)v->num);
		else if (d->type == T_STR)
			print_escaped(v->str);
		else
			fputs(v->str, stdout);
	}
	putchar('\n');
	fflush(stdout);
}

/*
 * Translate the parsed values into library options: the enumerations are
 * checked here, in the order qemu-img's QAPI visitor meets them
 * (version, preallocation, compression-type). Returns 0, or -1 after
 * printing qemu-img's message.
 */
static int to_create_options(struct create_opts *c, qk_format fmt,
			     struct qk_create_options *o)
{
	struct opt_val *v;

	qk_create_options_init(o);
	o->format = fmt;
	o->size = get(c, "size")->num;
	v = get(c, "preallocation");
	if (fmt == QK_FORMAT_RAW) {
		if (v->set) {
			if (strcmp(v->str, "off") == 0)
				o->preallocation = QK_PREALLOC_OFF;
			else if (strcmp(v->str, "metadata") == 0)
				o->preallocation = QK_PREALLOC_METADATA; /* refused below */
			else if (strcmp(v->str, "falloc") == 0)
				o->preallocation = QK_PREALLOC_FALLOC;
			else if (strcmp(v->str, "full") == 0)
				o->preallocation = QK_PREALLOC_FULL;
			else {
				cli_error("invalid parameter value: %s", v->str);
				return -1;
			}
		}
		return 0;
	}

	if ((v = get(c, "compat"))->set) {
		if (strcmp(v->str, "0.10") == 0 || strcmp(v->str, "v2") == 0)
			o->version = 2;
		else if (strcmp(v->str, "1.1") == 0 || strcmp(v->str, "v3") == 0)
			o->version = 3;
		else {
			cli_error("Parameter 'version' does not accept value '%s'", v->str);
			return -1;
		}
	}
	if ((v = get(c, "preallocation"))->set) {
		static const char *const modes[] = { "off", "metadata", "falloc", "full" };
		int m;

		for (m = 0; m < 4 && strcmp(v->str, modes[m]) != 0; m++)
			;
		if (m == 4) {
			cli_error("Parameter 'preallocation' does not accept value '%s'",
				  v->str);
			return -1;
		}
		o->preallocation = m;   /* QK_PREALLOC_* in this order */
	}
	if ((v = get(c, "compression_type"))->set) {
		if (strcmp(v->str, "zlib") == 0)
			o->compression_type = QK_COMPRESSION_ZLIB;
		else if (strcmp(v->str, "zstd") == 0)
			o->compression_type = QK_COMPRESSION_ZSTD;
		else {
			cli_error("Parameter 'compression-type' does not accept value '%s'",
				  v->str);
			return -1;
		}
	}
	/* Out-of-range numbers become values the library refuses with
	 * qemu-img's message. */
	if ((v = get(c, "cluster_size"))->set)
		o->cluster_size = v->num > UINT32_MAX ? 0 : (uint32_t)v->num;
	if ((v = get(c, "refcount_bits"))->set)
		o->refcount_bits = v->num > 128 ? 128 : (uint32_t)v->num;
	o->lazy_refcounts = get(c, "lazy_refcounts")->set && get(c, "lazy_refcounts")->num;
	o->extended_l2 = get(c, "extended_l2")->set && get(c, "extended_l2")->num;
	o->data_file_raw = get(c, "data_file_raw")->set && get(c, "data_file_raw")->num;
	if ((v = get(c, "data_file"))->set)
		o->data_file = v->str;
	if ((v = get(c, "backing_file"))->set)
		o->backing_file = v->str;
	if ((v = get(c, "backing_fmt"))->set)
		o->backing_format = v->str;
	return 0;
}

/* create's command line. */
struct create_args {
	struct cli_opts o;        /* o.fmtname: -f, "raw" by default */
	const char *base;         /* -b */
	const char *base_fmt;     /* -F */
	char *olist;              /* every -o, joined (malloc'd) */
	bool unsafe;              /* -u */
	bool quiet;               /* -q */
	const char *file;         /* the operands */
	uint64_t size;
	bool have_size;
};

/* Parse create's options into *a. Returns CLI_GO, or the exit status after
 * --help or a message. */
static int parse_args(int argc, char **argv, struct create_args *a)
{
	static const struct option longopts[] = {
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	int opt;

	while ((opt = cli_getopt(&a->o, argc, argv, ":F:b:f:ho:qu", longopts)) > 0) {
		switch (opt) {
		case 'b':
			a->base = optarg;
			break;
		case 'F':
			a->base_fmt = optarg;
			break;
		case 'u':
			a->unsafe = true;
			break;
		case 'q':
			a->quiet = true;
			break;
		case 'o':
			cli_append_opts(&a->olist, optarg);
			break;
		}
	}
	return opt < 0 ? a->o.status : CLI_GO;
}

/* The operands FILE [SIZE] into *a. Returns CLI_GO, or the exit status
 * after a message. */
static int parse_operands(int argc, char **argv, struct create_args *a)
{
	if (optind >= argc)
		return cli_usage_error("create", CLI_EXIT_FAILURE, "Expecting image file name");
	a->file = argv[optind++];
	if (optind < argc) {
		if (cli_cvtnum("image size", argv[optind], 0, INT64_MAX, &a->size) < 0)
			return CLI_EXIT_FAILURE;
		a->have_size = true;
		optind++;
	}
	if (optind < argc)
		return cli_usage_error("create", CLI_EXIT_FAILURE, "Unexpected argument: %s",
				       argv[optind]);
	return CLI_GO;
}

/* -o help: the options of format `fmt_name`. Returns the exit status. */
static int options_help(struct create_opts *c, const char *fmt_name)
{
	qk_format fmt;

	if (cli_parse_format(fmt_name, &fmt) < 0)
		return CLI_EXIT_FAILURE;
	use_descs(c, fmt);
	print_help(c, qk_format_name(fmt));
	return CLI_EXIT_OK;
}

/*
 * Put the SIZE operand and -b/-F into the option values, and check the
 * backing file as qemu-img does: named once, not the image itself, not
 * empty, and (without -u) present, with a format, and giving the size when
 * none was given. Returns 0, or -1 after a message.
 */
static int set_size_and_backing(struct create_opts *c, const struct create_args *a)
{
	struct opt_val *bf = get(c, "backing_file"), *bfmt = get(c, "backing_fmt");
	struct opt_val *size = get(c, "size");
	uint64_t bsize;

	if (size->set && a->have_size) {
		cli_error("The image size must be specified only once");
		return -1;
	}
	if (a->have_size) {
		size->set = true;
		size->num = a->size;
	}
	if (a->base != NULL) {
		if (bf == NULL) {
			cli_error("Backing file not supported for file format '%s'", a->o.fmtname);
			return -1;
		}
		set_str(c, "backing_file", a->base);
	}
	if (a->base_fmt != NULL) {
		if (bfmt == NULL) {
			cli_error("Backing file format not supported for file format '%s'",
				  a->o.fmtname);
			return -1;
		}
		set_str(c, "backing_fmt", a->base_fmt);
	}
	if (bf == NULL || !bf->set)
		return 0;
	if (strcmp(bf->str, a->file) == 0) {
		cli_error("Error: Trying to create an image with the same filename "
			  "as the backing file");
		return -1;
	}
	if (bf->str[0] == '\0') {
		cli_error("Expected backing file name, got empty string");
		return -1;
	}
	if (a->unsafe) {
		if (!bfmt->set) {
			cli_error("Backing file specified without backing format");
			return -1;
		}
		return 0;
	}
	if (probe_backing(a->file, bf->str, bfmt->set ? bfmt->str : NULL,
			  &bsize, !bfmt->set) < 0)
		return -1;
	if (!size->set) {
		size->set = true;
		size->num = bsize;
	}
	return 0;
}

/* Create the image `a` describes, into option values `c` (empty). Returns
 * the exit status. */
static int create(struct create_args *a, struct create_opts *c, int argc, char **argv)
{
	struct qk_create_options o;
	qk_format fmt;
	int r;

	/* qemu-img's order: help, the file name, the size, then the format
	 * and the option list. */
	if (a->olist != NULL && cli_opts_want_help(a->olist))
		return options_help(c, a->o.fmtname);
	if ((r = parse_operands(argc, argv, a)) != CLI_GO)
		return r;
	if (cli_parse_format(a->o.fmtname, &fmt) < 0)
		return CLI_EXIT_FAILURE;
	use_descs(c, fmt);
	if (a->olist != NULL && parse_options(c, a->olist) < 0)
		return CLI_EXIT_FAILURE;
	if (set_size_and_backing(c, a) < 0)
		return CLI_EXIT_FAILURE;
	if (!get(c, "size")->set) {
		cli_error("Image creation needs a size parameter");
		return CLI_EXIT_FAILURE;
	}

	if (!a->quiet)
		print_formatting(c, a->file, qk_format_name(fmt));
	if (to_create_options(c, fmt, &o) < 0)
		return CLI_EXIT_FAILURE;
	r = qk_create(a->file, &o);
	if (r < 0) {
		cli_lib_error(r);
		return CLI_EXIT_FAILURE;
	}
	return CLI_EXIT_OK;
}

int cmd_create(int argc, char **argv)
{
	struct create_args a = {
		.o = { .cmd = "create", .usage_code = CLI_EXIT_FAILURE,
		       .fmtname = "raw" },
	};
	struct create_opts c;
	int ret;

	memset(&c, 0, sizeof c);
	ret = parse_args(argc, argv, &a);
	if (ret == CLI_GO)
		ret = create(&a, &c, argc, argv);
	free_options(&c);
	free(a.olist);
	return ret;
}

struct cli_create_opts {
	struct create_opts c;
};

/*
 * For convert: parse an -o list (may be NULL) for a new image of format
 * fmt into *o, size left to the caller. Returns the parsed values, which
 * own the strings *o points at (free with cli_create_opts_free()), or
 * NULL after printing qemu-img's message.
 */
struct cli_create_opts *cli_create_opts_parse(qk_format fmt, const char *olist,
					      struct qk_create_options *o)
{
	struct cli_create_opts *h = cli_xcalloc(1, sizeof *h);

	use_descs(&h->c, fmt);
	if ((olist != NULL && parse_options(&h->c, olist) < 0) ||
	    to_create_options(&h->c, fmt, o) < 0) {
		cli_create_opts_free(h);
		return NULL;
	}
	return h;
}

void cli_create_opts_free(struct cli_create_opts *h)
{
	if (h != NULL) {
		free_options(&h->c);
		free(h);
	}
}
