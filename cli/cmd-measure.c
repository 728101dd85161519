/*
 * cmd-measure.c - "qcowkit measure": the size a new image needs, as
 * qemu-img 7.2 measure prints it, for an empty disk of --size bytes or for
 * the content of an image (-l: one of its internal snapshots).
 *
 * The library computes (qk_measure); this file reads the command line as
 * qemu-img does: its flags, the -o options of the target format (every
 * name QEMU accepts there, though measure uses few of them, and the same
 * QemuOpts syntax: "key=value", "key" for on, "nokey" for off, ",," for a
 * comma, the last of a repeated key wins), and its messages. qemu-img
 * checks some option values that the library receives as numbers (compat,
 * preallocation, encryption); those are checked here, at the point of
 * qemu-img's order where it checks them.
 *
 * SPDX-License-Identifier: MIT
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"

/* ---- the target formats and their -o options --------------------------------- */

enum otype { T_SIZE, T_NUM, T_BOOL, T_STR };

struct odesc {
	const char *name;
	enum otype type;
};

/* The options qemu-img accepts for each target: the format's create
 * options and the file protocol's (size, preallocation, nocow,
 * extent_size_hint). */
static const struct odesc qcow2_opts[] = {
	{ "encryption", T_BOOL }, { "encrypt.format", T_STR },
	{ "encrypt.key-secret", T_STR }, { "encrypt.cipher-alg", T_STR },
	{ "encrypt.cipher-mode", T_STR }, { "encrypt.ivgen-alg", T_STR },
	{ "encrypt.ivgen-hash-alg", T_STR }, { "encrypt.hash-alg", T_STR },
	{ "encrypt.iter-time", T_NUM }, { "cluster_size", T_SIZE },
	{ "extended_l2", T_BOOL }, { "preallocation", T_STR },
	{ "compression_type", T_STR }, { "size", T_SIZE }, { "compat", T_STR },
	{ "backing_file", T_STR }, { "backing_fmt", T_STR }, { "data_file", T_STR },
	{ "data_file_raw", T_BOOL }, { "lazy_refcounts", T_BOOL },
	{ "refcount_bits", T_NUM }, { "nocow", T_BOOL }, { "extent_size_hint", T_SIZE },
};

static const struct odesc raw_opts[] = {
	{ "size", T_SIZE }, { "preallocation", T_STR }, { "nocow", T_BOOL },
	{ "extent_size_hint", T_SIZE },
};

static const struct odesc luks_opts[] = {
	{ "size", T_SIZE }, { "key-secret", T_STR }, { "cipher-alg", T_STR },
	{ "cipher-mode", T_STR }, { "ivgen-alg", T_STR }, { "ivgen-hash-alg", T_STR },
	{ "hash-alg", T_STR }, { "iter-time", T_NUM }, { "preallocation", T_STR },
	{ "nocow", T_BOOL }, { "extent_size_hint", T_SIZE },
};

#define MAX_OPTS (sizeof qcow2_opts / sizeof qcow2_opts[0])

struct target {
	const char *name;
	qk_format fmt;            /* QK_FORMAT_AUTO: luks (refused) */
	const struct odesc *opts;
	size_t n;
};

static const struct target targets[] = {
	{ "qcow2", QK_FORMAT_QCOW2, qcow2_opts, sizeof qcow2_opts / sizeof qcow2_opts[0] },
	{ "raw", QK_FORMAT_RAW, raw_opts, sizeof raw_opts / sizeof raw_opts[0] },
	{ "luks", QK_FORMAT_AUTO, luks_opts, sizeof luks_opts / sizeof luks_opts[0] },
};

/* The other block drivers of qemu-img 7.2 (as Debian builds it), by what
 * it says when one is the target. */
static const char *const cannot_create[] = {
	"blkdebug", "blklogwrites", "blkverify", "bochs", "cloop", "compress",
	"copy-before-write", "copy-on-read", "dmg", "null-aio", "null-co",
	"preallocate", "quorum", "replication", "snapshot-access", "throttle", "vvfat",
};
static const char *const cannot_measure[] = {
	"file", "host_cdrom", "host_device", "nbd", "nvme", "parallels", "qcow",
	"qed", "vdi", "vhdx", "vmdk", "vpc",
};

static bool listed(const char *const *list, size_t n, const char *name)
{
	for (size_t i = 0; i < n; i++)
		if (strcmp(list[i], name) == 0)
			return true;
	return false;
}

/* The target format -O names, or NULL after qemu-img's message. */
static const struct target *find_target(const char *name)
{
	for (size_t i = 0; i < sizeof targets / sizeof targets[0]; i++)
		if (strcmp(targets[i].name, name) == 0)
			return &targets[i];
	if (listed(cannot_create, sizeof cannot_create / sizeof cannot_create[0], name))
		cli_error("Format driver '%s' does not support image creation", name);
	else if (listed(cannot_measure, sizeof cannot_measure / sizeof cannot_measure[0], name))
		cli_error("Block driver '%s' does not support size measurement", name);
	else
		cli_error("Unknown file format '%s'", name);
	return NULL;
}

/* ---- QemuOpts parsing ------------------------------------------------------------ */

struct oval {
	bool set;
	char *str;                /* as given */
	uint64_t num;             /* T_SIZE, T_NUM, T_BOOL */
};

/* qemu-img's is_valid_option_list(): not empty, no leading comma, and
 * trailing commas only doubled (a literal comma). */
static bool valid_option_list(const char *s)
{
	size_t len = strlen(s), i = len;

	if (s[0] == '\0' || s[0] == ',')
		return false;
	while (i > 0 && s[i - 1] == ',')
		i--;
	return (len - i) % 2 == 0;
}

/*
 * One item of an -o list at *p, as QEMU's get_opt_name_value(): the name
 * runs to the first '=' or ','; without '=' the item is a flag, "noNAME"
 * meaning NAME=off and NAME NAME=on; a value runs to a single ',' (",,"
 * is a comma). Sets *name and *value (malloc'd) and moves *p past the item
 * and its comma.
 */
static void next_item(const char **p, char **name, char **value)
{
	const char *s = *p;
	size_t len = strcspn(s, "=,"), n = 0;

	*name = cli_xmalloc(len + 1);
	memcpy(*name, s, len);
	(*name)[len] = '\0';
	s += len;
	if (*s != '=') {
		bool no = strncmp(*name, "no", 2) == 0;

		if (no)
			memmove(*name, *name + 2, len - 1);
		*value = cli_xstrdup(no ? "off" : "on");
	} else {
		*value = cli_xmalloc(strlen(++s) + 1);
		for (; *s && !(s[0] == ',' && s[1] != ','); s++) {
			if (s[0] == ',')
				s++;
			(*value)[n++] = *s;
		}
		(*value)[n] = '\0';
	}
	*p = *s ? s + 1 : s;
}

/* QemuOpts booleans. */
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

/* QemuOpts numbers: strtoull's syntax, base 0, a sign allowed (a negative
 * value wraps, as in qemu_strtou64). Returns 0, -EINVAL or -ERANGE. */
static int parse_number(const char *s, uint64_t *out)
{
	char *end;

	errno = 0;
	*out = strtoull(s, &end, 0);
	if (errno == ERANGE)
		return -ERANGE;
	return end == s || *end != '\0' ? -EINVAL : 0;
}

/* Check `value` as option `d` wants it into *v. Returns 0, or -1 after
 * qemu-img's message. */
static int set_value(const struct odesc *d, const char *value, struct oval *v)
{
	int r = 0;

	if (d->type == T_SIZE) {
		r = cli_parse_size_u64(value, &v->num);
		if (r == -ERANGE)
			cli_error("Value '%s' is out of range for parameter '%s'", value, d->name);
		else if (r < 0)
			cli_error("Parameter '%s' expects a non-negative number below 2^64. "
				  "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, "
				  "tera-, peta- and exabytes, respectively.", d->name);
	} else if (d->type == T_NUM) {
		r = parse_number(value, &v->num);
		if (r == -ERANGE)
			cli_error("Value '%s' is too large for parameter '%s'", value, d->name);
		else if (r < 0)
			cli_error("Parameter '%s' expects a number", d->name);
	} else if (d->type == T_BOOL && (r = parse_bool(value, &v->num)) < 0) {
		cli_error("Parameter '%s' expects 'on' or 'off'", d->name);
	}
	if (r < 0)
		return -1;
	free(v->str);
	v->str = cli_xstrdup(value);
	v->set = true;
	return 0;
}

/* Parse -o list `list` against the options of `t` into vals[] (indexed as
 * t->opts). Returns 0, or -1 after qemu-img's message. */
static int parse_olist(const struct target *t, const char *list, struct oval *vals)
{
	const char *p = list;

	while (*p) {
		char *name, *value;
		size_t i;
		int r = -1;

		next_item(&p, &name, &value);
		for (i = 0; i < t->n && strcmp(t->opts[i].name, name) != 0; i++)
			;
		if (i == t->n)
			cli_error("Invalid parameter '%s'", name);
		else
			r = set_value(&t->opts[i], value, &vals[i]);
		free(name);
		free(value);
		if (r < 0)
			return -1;
	}
	return 0;
}

static struct oval *val(const struct target *t, struct oval *vals, const char *name)
{
	for (size_t i = 0; i < t->n; i++)
		if (strcmp(t->opts[i].name, name) == 0)
			return &vals[i];
	return NULL;
}

/* ---- measuring ---------------------------------------------------------------------- */

/* What the option values mean for the library, and what of them the
 * library cannot judge (strings qemu-img checks). */
struct plan {
	struct qk_create_options o;
	const char *bad_compat;     /* compat neither 0.10 nor 1.1 */
	const char *bad_prealloc;   /* not a preallocation mode */
	bool luks;                  /* encrypt.format=luks (or a luks target) */
	const char *secret;         /* its key-secret, or NULL */
};

/* Translate qcow2 option values into p. */
static void plan_qcow2(const struct target *t, struct oval *v, struct plan *p)
{
	static const char *const modes[] = { "off", "metadata", "falloc", "full" };
	struct oval *x;

	if ((x = val(t, v, "cluster_size"))->set)
		p->o.cluster_size = x->num > UINT32_MAX ? 0 : (uint32_t)x->num;
	p->o.extended_l2 = val(t, v, "extended_l2")->num != 0;
	if ((x = val(t, v, "compat"))->set && strcmp(x->str, "0.10") == 0)
		p->o.version = 2;
	else if (x->set && strcmp(x->str, "1.1") != 0)
		p->bad_compat = x->str;
	if ((x = val(t, v, "refcount_bits"))->set)
		p->o.refcount_bits = x->num > 128 ? 128 : (uint32_t)x->num;
	if ((x = val(t, v, "preallocation"))->set) {
		int m = 0;

		while (m < 4 && strcmp(x->str, modes[m]) != 0)
			m++;
		if (m == 4)
			p->bad_prealloc = x->str;
		else
			p->o.preallocation = m;    /* QK_PREALLOC_* in this order */
	}
	if ((x = val(t, v, "backing_file"))->set)
		p->o.backing_file = x->str;
	x = val(t, v, "encrypt.format");
	p->luks = x->set && strcmp(x->str, "luks") == 0;
	x = val(t, v, "encrypt.key-secret");
	p->secret = x->set ? x->str : NULL;
}

/*
 * qemu-img reports the first problem in qcow2_measure()'s order: cluster
 * size, compat, refcount width, preallocation, encryption, size. The
 * library checks the numbers; before reporting a string it could not
 * judge, ask it about the options that come earlier (no input, no size).
 * Returns 0 when nothing is wrong before the size, or -1 after a message.
 */
static int check_in_order(const struct plan *p)
{
	struct qk_create_options early = p->o;
	struct qk_measure m = { .struct_size = sizeof m };
	int r;

	if (!p->bad_compat && !p->bad_prealloc && !p->luks)
		return 0;
	early.size = 0;
	early.backing_file = NULL;
	early.preallocation = QK_PREALLOC_OFF;
	if (p->bad_compat) {
		early.version = 3;
		early.refcount_bits = 16;
	}
	r = qk_measure(NULL, &early, &m);
	if (r < 0)
		cli_lib_error(r);
	else if (p->bad_compat)
		cli_error("Invalid compatibility level: '%s'", p->bad_compat);
	else if (p->bad_prealloc)
		cli_error("invalid parameter value: %s", p->bad_prealloc);
	else if (!p->secret)
		cli_error("Parameter 'encrypt.key-secret' is required for cipher");
	else
		cli_error("No secret with id '%s'", p->secret);
	return -1;
}

static void print_result(const struct qk_measure *m, bool json)
{
	struct qj *d;

	if (!json) {
		printf("required size: %" PRIu64 "\n", m->required);
		printf("fully allocated size: %" PRIu64 "\n", m->fully_allocated);
		if (m->has_bitmaps)
			printf("bitmaps size: %" PRIu64 "\n", m->bitmaps);
		return;
	}
	/* BlockMeasureInfo's members are int64 in QAPI: 2^63 prints as -2^63. */
	d = qj_dict();
	if (m->has_bitmaps)
		qj_add_int(d, "bitmaps", (int64_t)m->bitmaps);
	qj_add_int(d, "required", (int64_t)m->required);
	qj_add_int(d, "fully-allocated", (int64_t)m->fully_allocated);
	qj_print_json(stdout, d);
	putchar('\n');
	qj_free(d);
}

/* measure's command line. */
struct measure_args {
	struct cli_opts o;        /* -f, -U, --output */
	const char *out_fmt;      /* -O, "raw" by default */
	char *olist;              /* every -o, joined */
	const char *snapshot;     /* -l */
	uint64_t size;            /* --size */
	bool have_size;
	const char *file;
};

/* Measure `in` (NULL: --size) for target `t`, from the -o values. Returns
 * the exit status. */
static int run(const struct measure_args *a, const struct target *t, qk_image *in)
{
	struct oval vals[MAX_OPTS] = { { 0 } };
	struct qk_measure m = { .struct_size = sizeof m };
	struct plan p = { .bad_compat = NULL };
	int ret = CLI_EXIT_FAILURE, r;

	if (a->olist != NULL && parse_olist(t, a->olist, vals) < 0)
		goto out;
	qk_create_options_init(&p.o);
	p.o.format = t->fmt;
	p.o.size = val(t, vals, "size")->num;
	if (a->have_size)
		p.o.size = a->size;
	if (t->fmt == QK_FORMAT_AUTO) {         /* luks: needs a secret object */
		struct oval *secret = val(t, vals, "key-secret");

		if (!secret->set)
			cli_error("Parameter 'key-secret' is required for cipher");
		else
			cli_error("No secret with id '%s'", secret->str);
		goto out;
	}
	if (t->fmt == QK_FORMAT_QCOW2) {
		plan_qcow2(t, vals, &p);
		if (check_in_order(&p) < 0)
			goto out;
	}
	r = qk_measure(in, &p.o, &m);
	if (r < 0) {
		cli_lib_error(r);
		goto out;
	}
	print_result(&m, a->o.json);
	ret = CLI_EXIT_OK;
out:
	for (size_t i = 0; i < MAX_OPTS; i++)
		free(vals[i].str);
	return ret;
}

/* Parse measure's options and operand into *a, with qemu-img's checks of
 * their combination. Returns CLI_GO, or the exit status after --help or a
 * message. */
static int parse_args(int argc, char **argv, struct measure_args *a)
{
	enum { OPT_OUTPUT = 256, OPT_SIZE };
	static const struct option longopts[] = {
		{ "help", no_argument, NULL, 'h' },
		{ "output", required_argument, NULL, OPT_OUTPUT },
		{ "size", required_argument, NULL, OPT_SIZE },
		{ "force-share", no_argument, NULL, 'U' },
		{ NULL, 0, NULL, 0 },
	};
	int c;

	while ((c = cli_getopt(&a->o, argc, argv, ":hf:O:o:l:U", longopts)) > 0) {
		switch (c) {
		case 'O':
			a->out_fmt = optarg;
			break;
		case 'o':
			if (!valid_option_list(optarg)) {
				cli_error("Invalid option list: %s", optarg);
				return CLI_EXIT_FAILURE;
			}
			cli_append_opts(&a->olist, optarg);
			break;
		case 'l':
			a->snapshot = optarg;
			break;
		case OPT_SIZE:
			if (cli_cvtnum("image size", optarg, 0, INT64_MAX, &a->size) < 0)
				return CLI_EXIT_FAILURE;
			a->have_size = true;
			break;
		}
	}
	if (c < 0)
		return a->o.status;
	if (argc - optind > 1)
		return cli_usage_error("measure", CLI_EXIT_FAILURE,
				       "At most one filename argument is allowed.");
	a->file = optind < argc ? argv[optind] : NULL;
	if (!a->file && (a->o.fmtname || a->snapshot))
		return cli_usage_error("measure", CLI_EXIT_FAILURE,
				       "--image-opts, -f, and -l require a filename argument.");
	if (a->file && a->have_size)
		return cli_usage_error("measure", CLI_EXIT_FAILURE,
				       "--size N cannot be used together with a filename.");
	if (!a->file && !a->have_size)
		return cli_usage_error("measure", CLI_EXIT_FAILURE,
				       "Either --size N or one filename must be specified.");
	return CLI_GO;
}

int cmd_measure(int argc, char **argv)
{
	struct measure_args a = {
		.o = { .cmd = "measure", .usage_code = CLI_EXIT_FAILURE },
		.out_fmt = "raw",
	};
	const struct target *t;
	qk_image *in = NULL;
	qk_format fmt;
	int ret = parse_args(argc, argv, &a);

	if (ret != CLI_GO)
		goto out;
	ret = CLI_EXIT_FAILURE;
	/* qemu-img opens the input (and loads the snapshot) first. */
	if (a.file && (cli_parse_format(a.o.fmtname, &fmt) < 0 ||
		       cli_open_snapshot(a.file, fmt, a.o.open_flags, a.snapshot, &in) < 0))
		goto out;
	if ((t = find_target(a.out_fmt)) != NULL)
		ret = run(&a, t, in);
	qk_close(in);
out:
	free(a.olist);
	return ret;
}
