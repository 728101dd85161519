/*
 * cmd-amend.c - "qcowkit amend": change the options of an image in place,
 * as qemu-img 7.2 amend does:
 *   qcowkit amend [-f FMT] [-p] [-q] [-t CACHE] [--force] -o OPTS FILE
 * The -o options are qemu-img's amend options for qcow2: compat, size,
 * refcount_bits, lazy_refcounts, backing_file and backing_fmt (only their
 * current values), data_file, data_file_raw; the encryption ones are
 * refused, as for any image without encryption. The messages are
 * qemu-img's, each on one line (where qemu-img adds a hint line, the hint
 * follows on the same line).
 *
 * SPDX-License-Identifier: MIT
 */
#include <getopt.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"

enum opt_type { T_SIZE, T_NUM, T_BOOL, T_STR };

struct amend_desc {
	const char *name;
	enum opt_type type;
	const char *help;
};

/* qemu-img's amend options for qcow2, sorted as its -o help prints them. */
static const struct amend_desc descs[] = {
	{ "backing_file", T_STR, "File name of a base image" },
	{ "backing_fmt", T_STR, "Image format of the base image" },
	{ "compat", T_STR, "Compatibility level (v2 [0.10] or v3 [1.1])" },
	{ "data_file", T_STR, "File name of an external data file" },
	{ "data_file_raw", T_BOOL, "The external data file must stay valid as a raw image" },
	{ "encrypt.iter-time", T_NUM, "Time to spend in PBKDF in milliseconds" },
	{ "encrypt.keyslot", T_NUM, "Select a single keyslot to modify explicitly" },
	{ "encrypt.new-secret", T_STR,
	  "New secret to set in the matching keyslots. Empty string to erase" },
	{ "encrypt.old-secret", T_STR, "Select all keyslots that match this password" },
	{ "encrypt.state", T_STR, "Select new state of affected keyslots (active/inactive)" },
	{ "lazy_refcounts", T_BOOL, "Postpone refcount updates" },
	{ "refcount_bits", T_NUM, "Width of a reference count entry in bits" },
	{ "size", T_SIZE, "Virtual disk size" },
};
#define N_DESCS (sizeof descs / sizeof descs[0])

/* qcow2 options qemu-img takes at creation only. */
static const char *const create_only[] = {
	"cluster_size", "extended_l2", "preallocation", "compression_type", "encryption",
	"encrypt.format", "encrypt.key-secret", "encrypt.cipher-alg", "encrypt.cipher-mode",
	"encrypt.ivgen-alg", "encrypt.ivgen-hash-alg", "encrypt.hash-alg",
};

/* amend's command line. */
struct amend_args {
	struct cli_opts o;        /* o.fmtname: -f */
	char *olist;              /* every -o, joined (malloc'd) */
	bool progress;            /* -p */
	bool quiet;               /* -q */
	const char *file;
};

/* The values an -o list gives (the last of repeated keys wins). */
struct amend_vals {
	const char *str[N_DESCS]; /* as given; NULL when not given */
	uint64_t num[N_DESCS];    /* T_SIZE, T_NUM, T_BOOL */
};

static int find_desc(const char *name)
{
	for (size_t i = 0; i < N_DESCS; i++)
		if (strcmp(descs[i].name, name) == 0)
			return (int)i;
	return -1;
}

static void print_help(void)
{
	static const char *const type_names[] = { "size", "num", "bool (on/off)", "str" };

	printf("Amend options for 'qcow2':\n");
	for (size_t i = 0; i < N_DESCS; i++) {
		char left[64];

		snprintf(left, sizeof left, "%s=<%s>", descs[i].name, type_names[descs[i].type]);
		printf("  %-22s - %s\n", left, descs[i].help);
	}
}

/* QemuOpts booleans: on/yes/true/y and off/no/false/n. */
static int parse_bool(const char *s, uint64_t *out)
{
	static const char *const yes[] = { "on", "yes", "true", "y" };
	static const char *const no[] = { "off", "no", "false", "n" };

	for (size_t i = 0; i < 4; i++) {
		if (strcmp(s, yes[i]) == 0 || strcmp(s, no[i]) == 0) {
			*out = strcmp(s, yes[i]) == 0;
			return 0;
		}
	}
	return -1;
}

/* An unknown key: qemu-img's message, with its hint when the key is a
 * creation option. */
static void invalid_key(const char *key)
{
	for (size_t i = 0; i < sizeof create_only / sizeof create_only[0]; i++) {
		if (strcmp(key, create_only[i]) == 0) {
			cli_error("Invalid parameter '%s': This option is only supported for image "
				  "creation", key);
			return;
		}
	}
	cli_error("Invalid parameter '%s'", key);
}

/* Parse one value of type `t` into *num. Returns 0, or -1 after the
 * message. A negative refcount width parses (as QEMU's number parser
 * takes it) to a width the library refuses in its words. */
static int parse_value(const char *key, enum opt_type t, const char *value, uint64_t *num)
{
	switch (t) {
	case T_SIZE:
		if (cli_parse_size(value, num) == 0)
			return 0;
		cli_error("Parameter '%s' expects a non-negative number below 2^64. Optional suffix "
			  "k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta- and exabytes, "
			  "respectively.", key);
		return -1;
	case T_NUM:
		if (cli_parse_uint(value, num) == 0)
			return 0;
		if (value[0] == '-' && cli_parse_uint(value + 1, num) == 0) {
			*num = 3;
			return 0;
		}
		cli_error("Parameter '%s' expects a number", key);
		return -1;
	case T_BOOL:
		if (parse_bool(value[0] ? value : "on", num) == 0)
			return 0;
		cli_error("Parameter '%s' expects 'on' or 'off'", key);
		return -1;
	default:
		return 0;
	}
}

/* Parse the -o list into *v. Returns 0, or -1 after qemu-img's message. */
static int parse_options(const char *list, struct amend_vals *v)
{
	struct cli_kv *kv;
	int n = cli_parse_kv_list(list, &kv), ret = 0;

	if (n <= 0) {
		cli_error("Invalid option list: %s", list);
		return -1;
	}
	for (int i = 0; i < n && ret == 0; i++) {
		const char *key = kv[i].key, *value = kv[i].value;
		int d = find_desc(key);

		if (d < 0 && value[0] == '\0' && strncmp(key, "no", 2) == 0 &&
		    (d = find_desc(key + 2)) >= 0 && descs[d].type == T_BOOL) {
			value = "off";
		} else if (d < 0) {
			invalid_key(key);
			ret = -1;
			break;
		}
		ret = parse_value(key, descs[d].type, value, &v->num[d]);
		free((char *)v->str[d]);
		v->str[d] = cli_xstrdup(value);
	}
	cli_free_kv(kv, n);
	return ret;
}

static void free_vals(struct amend_vals *v)
{
	for (size_t i = 0; i < N_DESCS; i++)
		free((char *)v->str[i]);
}

/* The values into the library's options, in QEMU's order of checks for
 * what the library does not check itself (the encryption options, the
 * compat level's spelling). Returns 0, or -1 after the message. */
static int to_options(const struct amend_vals *v, struct qk_amend_options *o)
{
#define VAL(name) (find_desc(name))
	for (size_t i = 0; i < N_DESCS; i++) {
		if (v->str[i] && strncmp(descs[i].name, "encrypt.", 8) == 0) {
			cli_error("Can't amend encryption options - encryption not present");
			return -1;
		}
	}
	const char *compat = v->str[VAL("compat")];
	if (compat) {
		o->fields |= QK_AMEND_VERSION;
		if (strcmp(compat, "0.10") == 0 || strcmp(compat, "v2") == 0) {
			o->version = 2;
		} else if (strcmp(compat, "1.1") == 0 || strcmp(compat, "v3") == 0) {
			o->version = 3;
		} else {
			cli_error("Unknown compatibility level %s", compat);
			return -1;
		}
	}
	if (v->str[VAL("size")]) {
		o->fields |= QK_AMEND_SIZE;
		o->size = v->num[VAL("size")];
	}
	if (v->str[VAL("backing_file")] || v->str[VAL("backing_fmt")]) {
		o->fields |= QK_AMEND_BACKING;
		o->backing_file = v->str[VAL("backing_file")];
		o->backing_format = v->str[VAL("backing_fmt")];
	}
	if (v->str[VAL("data_file")]) {
		o->fields |= QK_AMEND_DATA_FILE;
		o->data_file = v->str[VAL("data_file")];
	}
	if (v->str[VAL("data_file_raw")]) {
		o->fields |= QK_AMEND_DATA_FILE_RAW;
		o->data_file_raw = (int)v->num[VAL("data_file_raw")];
	}
	if (v->str[VAL("lazy_refcounts")]) {
		o->fields |= QK_AMEND_LAZY_REFCOUNTS;
		o->lazy_refcounts = (int)v->num[VAL("lazy_refcounts")];
	}
	if (v->str[VAL("refcount_bits")]) {
		uint64_t bits = v->num[VAL("refcount_bits")];

		o->fields |= QK_AMEND_REFCOUNT_BITS;
		o->refcount_bits = bits > 64 ? 3 : (uint32_t)bits;   /* 3: refused as QEMU does */
	}
	return 0;
#undef VAL
}

/* Parse amend's options into *a. Returns CLI_GO, or the exit status after
 * --help or a message. */
static int parse_args(int argc, char **argv, struct amend_args *a)
{
	static const struct option longopts[] = {
		{ "help", no_argument, NULL, 'h' },
		{ "force", no_argument, NULL, 'F' },
		{ NULL, 0, NULL, 0 },
	};
	bool direct;
	int opt;

	while ((opt = cli_getopt(&a->o, argc, argv, ":ho:f:t:pq", longopts)) > 0) {
		switch (opt) {
		case 'o':
			cli_append_opts(&a->olist, optarg);
			break;
		case 'p':
			a->progress = true;
			break;
		case 'q':
			a->quiet = true;
			break;
		case 't':
			if (cli_parse_cache(optarg, &direct) < 0) {
				cli_error("Invalid cache option: %s", optarg);
				return CLI_EXIT_FAILURE;
			}
			break;
		case 'F':
			break;          /* LUKS options only: nothing to force here */
		}
	}
	if (opt < 0)
		return a->o.status;
	if (a->olist == NULL) {
		cli_error("Must specify options (-o)");
		return CLI_EXIT_FAILURE;
	}
	return CLI_GO;
}

/* Open the image, turn the -o list into options and amend. Returns the
 * exit status. */
static int amend(struct amend_args *a, qk_format fmt)
{
	struct amend_vals v = { { NULL }, { 0 } };
	struct qk_amend_options o;
	struct cli_progress prog;
	qk_image *img;
	int ret;

	if (cli_open(a->file, fmt, QK_OPEN_RDWR, &img) < 0)
		return CLI_EXIT_FAILURE;
	if (qk_get_format(img) != QK_FORMAT_QCOW2) {
		cli_error("Format driver '%s' does not support option amendment",
			  qk_format_name(qk_get_format(img)));
		qk_close(img);
		return CLI_EXIT_FAILURE;
	}
	if (cli_opts_want_help(a->olist)) {
		print_help();
		return qk_close(img) < 0 ? CLI_EXIT_FAILURE : CLI_EXIT_OK;
	}
	qk_amend_options_init(&o);
	ret = parse_options(a->olist, &v) < 0 || to_options(&v, &o) < 0 ? -1 : 0;
	progress_init(&prog, a->progress && !a->quiet, 1.0f);
	if (ret == 0) {
		o.progress = progress_cb;
		o.progress_opaque = &prog;
		progress_print(&prog, 0, 0);
		ret = qk_amend(img, &o);
		if (ret == 0)
			progress_print(&prog, 100, 0);
		progress_end(&prog);
		if (ret < 0)
			cli_lib_error(ret);
	}
	free_vals(&v);
	int cret = qk_close(img);
	if (ret == 0 && cret < 0)
		cli_lib_error(cret);
	return ret < 0 || cret < 0 ? CLI_EXIT_FAILURE : CLI_EXIT_OK;
}

int cmd_amend(int argc, char **argv)
{
	struct amend_args a = { .o = { .cmd = "amend", .usage_code = CLI_EXIT_FAILURE } };
	qk_format fmt = QK_FORMAT_AUTO;
	int r = parse_args(argc, argv, &a);

	if (r == CLI_GO && a.o.fmtname != NULL && cli_parse_format(a.o.fmtname, &fmt) < 0)
		r = CLI_EXIT_FAILURE;
	/* qemu-img's order: the option list's syntax, help for a format
	 * given with -f, the file name, then the image. */
	if (r == CLI_GO && a.olist[0] == '\0') {
		cli_error("Invalid option list: %s", a.olist);
		r = CLI_EXIT_FAILURE;
	}
	if (r == CLI_GO && a.o.fmtname != NULL && cli_opts_want_help(a.olist)) {
		if (fmt == QK_FORMAT_RAW)
			cli_error("Format driver 'raw' does not support option amendment");
		else
			print_help();
		r = fmt == QK_FORMAT_RAW ? CLI_EXIT_FAILURE : CLI_EXIT_OK;
	}
	if (r == CLI_GO && argc - optind != 1)
		r = cli_usage_error("amend", CLI_EXIT_FAILURE, "Expecting one image file name");
	if (r == CLI_GO) {
		a.file = argv[optind];
		r = amend(&a, fmt);
	}
	free(a.olist);
	return r;
}
