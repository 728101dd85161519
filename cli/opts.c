/*
 * opts.c - option parsing shared by the commands (cli_getopt() and the
 * operand checks) and option values: sizes with suffixes, formats, cache
 * and AIO modes, "-o a=b,c=d" lists, and opening an image from
 * command-line flags.
 *
 * SPDX-License-Identifier: MIT
 */
#include <ctype.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include <pthread.h>

#include "cli.h"

void *cli_xmalloc(size_t n)
{
	void *p = malloc(n ? n : 1);

	if (p == NULL) {
		cli_error("out of memory");
		exit(CLI_EXIT_FAILURE);
	}
	return p;
}

void *cli_xcalloc(size_t n, size_t size)
{
	void *p = calloc(n ? n : 1, size ? size : 1);

	if (p == NULL) {
		cli_error("out of memory");
		exit(CLI_EXIT_FAILURE);
	}
	return p;
}

void *cli_xrealloc(void *p, size_t n)
{
	void *q = realloc(p, n ? n : 1);

	if (q == NULL) {
		cli_error("out of memory");
		exit(CLI_EXIT_FAILURE);
	}
	return q;
}

char *cli_xstrdup(const char *s)
{
	size_t n = strlen(s) + 1;
	char *p = cli_xmalloc(n);

	memcpy(p, s, n);
	return p;
}

/* Multiplier of a size suffix letter, 0 if `c` is not one. */
static uint64_t suffix_mul(char c)
{
	switch (toupper((unsigned char)c)) {
	case 'B': return 1;
	case 'K': return 1ull << 10;
	case 'M': return 1ull << 20;
	case 'G': return 1ull << 30;
	case 'T': return 1ull << 40;
	case 'P': return 1ull << 50;
	case 'E': return 1ull << 60;
	default:  return 0;
	}
}

/* cli_parse_size with values up to `max`. */
static int parse_size(const char *s, uint64_t max, uint64_t *out)
{
	const char *p = s;
	uint64_t val = 0, mul;
	double frac = 0.0;
	bool hex = false;
	int ndig = 0;

	/* strtoull would accept leading spaces and '-'; qemu rejects '-' and
	 * so do we (a negative size is never meant). */
	while (isspace((unsigned char)*p))
		p++;
	if (*p == '-' || *p == '+')
		return -EINVAL;
	if (p[0] == '0' && (p[1] == 'x' || p[1] == 'X') &&
	    isxdigit((unsigned char)p[2])) {
		hex = true;
		p += 2;
	}
	for (;; p++, ndig++) {
		unsigned d;

		if (isdigit((unsigned char)*p))
			d = (unsigned)(*p - '0');
		else if (hex && isxdigit((unsigned char)*p))
			d = (unsigned)(tolower((unsigned char)*p) - 'a' + 10);
		else
			break;
		if (val > (UINT64_MAX - d) / (hex ? 16 : 10))
			return -ERANGE;
		val = val * (hex ? 16 : 10) + d;
	}
	if (ndig == 0)
		return -EINVAL;
	if (*p == '.') {
		double scale = 0.1;
		int nfrac = 0;

		if (hex)
			return -EINVAL;
		for (p++; isdigit((unsigned char)*p); p++, nfrac++) {
			frac += (*p - '0') * scale;
			scale /= 10;
		}
		if (nfrac == 0)
			return -EINVAL;
	}
	mul = suffix_mul(*p);
	if (mul != 0)
		p++;
	else
		mul = 1;
	if (*p != '\0')
		return -EINVAL;
	/* "1.5" with no unit (or with B) is not a whole number of bytes. */
	if (mul == 1 && frac != 0.0)
		return -EINVAL;
	if (val > (UINT64_MAX - (uint64_t)(frac * (double)mul)) / mul)
		return -ERANGE;
	val = val * mul + (uint64_t)(frac * (double)mul);
	if (val > max)
		return -ERANGE;
	*out = val;
	return 0;
}

int cli_parse_size(const char *s, uint64_t *out)
{
	return parse_size(s, INT64_MAX, out);
}

int cli_parse_size_u64(const char *s, uint64_t *out)
{
	return parse_size(s, UINT64_MAX, out);
}

int cli_cvtnum(const char *name, const char *s, uint64_t min, uint64_t max,
	       uint64_t *out)
{
	uint64_t v;
	int r = cli_parse_size(s, &v);

	if (r == -EINVAL) {
		cli_error("Invalid %s specified. You may use k, M, G, T, P or E "
			  "suffixes for kilobytes, megabytes, gigabytes, "
			  "terabytes, petabytes and exabytes.", name);
		return -1;
	}
	if (r == -ERANGE || v < min || v > max) {
		cli_error("Invalid %s specified. Must be between %llu and %llu.",
			  name, (unsigned long long)min,
			  (unsigned long long)max);
		return -1;
	}
	*out = v;
	return 0;
}

int cli_parse_uint(const char *s, uint64_t *out)
{
	char *end;
	unsigned long long v;

	while (isspace((unsigned char)*s))
		s++;
	if (*s == '-' || *s == '\0')
		return -EINVAL;
	errno = 0;
	v = strtoull(s, &end, 0);
	if (errno == ERANGE)
		return -ERANGE;
	if (end == s || *end != '\0')
		return -EINVAL;
	*out = v;
	return 0;
}

int cli_parse_format(const char *name, qk_format *out)
{
	if (name == NULL)
		*out = QK_FORMAT_AUTO;
	else if (strcmp(name, "qcow2") == 0)
		*out = QK_FORMAT_QCOW2;
	else if (strcmp(name, "raw") == 0)
		*out = QK_FORMAT_RAW;
	else {
		cli_error("Unknown file format '%s'", name);
		return -1;
	}
	return 0;
}

int cli_parse_output(const char *arg, bool *json)
{
	if (strcmp(arg, "json") == 0)
		*json = true;
	else if (strcmp(arg, "human") == 0)
		*json = false;
	else {
		cli_error("--output must be used with human or json as "
			  "argument.");
		return -1;
	}
	return 0;
}

int cli_getopt(struct cli_opts *o, int argc, char **argv,
	       const char *optstring, const struct option *longopts)
{
	int c, i = -1;

	while ((c = getopt_long(argc, argv, optstring, longopts, &i)) != -1) {
		/* i names the long option just taken (getopt_long leaves it
		 * alone for a short one or an error). */
		if (c != '?' && c != ':' && i >= 0 &&
		    strcmp(longopts[i].name, "output") == 0) {
			i = -1;
			if (cli_parse_output(optarg, &o->json) < 0) {
				o->status = CLI_EXIT_FAILURE;
				return -1;
			}
			continue;
		}
		i = -1;
		switch (c) {
		case 'f':
			o->fmtname = optarg;
			break;
		case 'U':
			o->open_flags |= QK_OPEN_FORCE_SHARE;
			break;
		case 'i':
			if (cli_parse_aio(optarg) < 0) {
				cli_error("Invalid aio option: %s", optarg);
				o->status = CLI_EXIT_FAILURE;
				return -1;
			}
			break;
		case 'h':
		case '?':
		case ':':
			o->status = cli_option_end(o->cmd, c, argv,
						   o->usage_code);
			return -1;
		default:
			return c;
		}
	}
	return 0;
}

int cli_option_end(const char *cmd, int opt, char **argv, int code)
{
	if (opt == 'h') {
		cli_print_usage(stdout, cli_find_command(cmd));
		return CLI_EXIT_OK;
	}
	return cli_bad_option(cmd, opt, argv, code);
}

const char *cli_one_image(struct cli_opts *o, int c, int argc, char **argv)
{
	if (c < 0)
		return NULL;
	if (optind != argc - 1) {
		o->status = cli_usage_error(o->cmd, o->usage_code,
					    "Expecting one image file name");
		return NULL;
	}
	return argv[optind];
}

int cli_parse_cache(const char *mode, bool *direct)
{
	/* qemu's bdrv_parse_cache_mode(): none and directsync bypass the
	 * host page cache; the others only differ in flush behaviour, which
	 * does not matter to the read-only users so far. */
	if (strcmp(mode, "none") == 0 || strcmp(mode, "off") == 0 ||
	    strcmp(mode, "directsync") == 0)
		*direct = true;
	else if (strcmp(mode, "writeback") == 0 ||
		 strcmp(mode, "writethrough") == 0 ||
		 strcmp(mode, "unsafe") == 0)
		*direct = false;
	else
		return -1;
	return 0;
}

int cli_parse_aio(const char *mode)
{
	if (strcmp(mode, "threads") == 0 || strcmp(mode, "native") == 0 ||
	    strcmp(mode, "io_uring") == 0)
		return 0;
	return -1;
}

int cli_parse_kv_list(const char *list, struct cli_kv **out)
{
	struct cli_kv *kv = NULL;
	int n = 0;
	const char *p = list;

	while (*p != '\0') {
		/* An item ends at a single comma; ",," is a literal comma. */
		size_t cap = strlen(p) + 1, len = 0;
		char *item = cli_xmalloc(cap), *eq;

		while (*p != '\0') {
			if (*p == ',' && p[1] == ',') {
				item[len++] = ',';
				p += 2;
			} else if (*p == ',') {
				p++;
				break;
			} else {
				item[len++] = *p++;
			}
		}
		item[len] = '\0';
		if (len == 0) {
			free(item);
			continue;
		}
		eq = strchr(item, '=');
		if (eq == item) {
			free(item);
			cli_free_kv(kv, n);
			return -EINVAL;
		}
		kv = cli_xrealloc(kv, sizeof(*kv) * (size_t)(n + 1));
		if (eq != NULL) {
			*eq = '\0';
			kv[n].value = cli_xstrdup(eq + 1);
		} else {
			kv[n].value = cli_xstrdup("");
		}
		kv[n].key = item;
		n++;
	}
	*out = kv;
	return n;
}

void cli_free_kv(struct cli_kv *kv, int n)
{
	for (int i = 0; i < n; i++) {
		free(kv[i].key);
		free(kv[i].value);
	}
	free(kv);
}

int cli_open(const char *path, qk_format fmt, uint32_t flags,
	     qk_image **out)
{
	struct qk_open_options o;
	int ret;

	qk_open_options_init(&o);
	o.format = fmt;
	o.flags = flags | (cli_confine ? QK_OPEN_CONFINE : 0);
	ret = qk_open(path, &o, out);
	if (ret < 0) {
		cli_lib_error(ret);
		*out = NULL;
	}
	return ret;
}

/* Which snapshot `spec` (qemu-img's -l: "snapshot.id=I,snapshot.name=N",
 * either part optional, or an id or name) names in img: its index, or -1
 * after qemu-img's message. */
static int find_snapshot(qk_image *img, const char *spec)
{
	const struct qk_snapshot *list;
	size_t n;
	if (strncmp(spec, "snapshot.", 9) != 0) {
		int i = qk_snapshot_find(img, spec);
		if (i == -ENOENT)
			cli_error("Failed to load snapshot: Can't find snapshot");
		else if (i < 0)
			cli_error("Failed to load snapshot: %s", qk_last_error());
		return i < 0 ? -1 : i;
	}
	struct cli_kv *kv;
	int nkv = cli_parse_kv_list(spec, &kv), found = -1;
	bool invalid = nkv < 0;
	const char *id = NULL, *name = NULL;
	for (int k = 0; k < nkv && !invalid; k++) {
		if (strcmp(kv[k].key, "snapshot.id") == 0) {
			id = kv[k].value;
		} else if (strcmp(kv[k].key, "snapshot.name") == 0) {
			name = kv[k].value;
		} else {
			cli_error("Invalid parameter '%s'", kv[k].key);
			invalid = true;
		}
	}
	if (invalid) {
		cli_error("Failed in parsing snapshot param '%s'", spec);
	} else if (qk_list_snapshots(img, &list, &n) == 0) {
		for (size_t i = 0; found < 0 && i < n; i++)
			if ((id || name) && (!id || strcmp(list[i].id, id) == 0) &&
			    (!name || strcmp(list[i].name, name) == 0))
				found = (int)i;
		if (found < 0)
			cli_error("Failed to load snapshot: Can't find snapshot");
	}
	if (nkv > 0)
		cli_free_kv(kv, nkv);
	return found;
}

int cli_open_snapshot(const char *path, qk_format fmt, uint32_t flags, const char *spec,
		      qk_image **out)
{
	if (!spec)
		return cli_open(path, fmt, flags, out);
	qk_image *img;
	int ret = cli_open(path, fmt, flags, &img);
	if (ret < 0)
		return ret;
	if (qk_get_format(img) != QK_FORMAT_QCOW2) {
		cli_error("Failed to load snapshot: Block format '%s' used by device '' does not "
			  "support temporarily loading internal snapshots",
			  qk_format_name(qk_get_format(img)));
		qk_close(img);
		return -ENOTSUP;
	}
	int i = find_snapshot(img, spec);
	const struct qk_snapshot *list;
	size_t n;
	char *id = NULL;
	if (i >= 0 && qk_list_snapshots(img, &list, &n) == 0)
		id = strdup(list[i].id);
	qk_close(img);
	if (!id)
		return i < 0 ? -ENOENT : -ENOMEM;
	struct qk_open_options o;
	qk_open_options_init(&o);
	o.format = QK_FORMAT_QCOW2;
	o.flags = flags | (cli_confine ? QK_OPEN_CONFINE : 0);
	o.snapshot = id;
	ret = qk_open(path, &o, out);
	free(id);
	if (ret < 0) {
		cli_lib_error(ret);
		*out = NULL;
	}
	return ret;
}

int cli_check_target(qk_image *src, const char *dst)
{
	qk_image *layer, *above;
	int r = qk_uses_file(src, dst, &layer);

	if (r < 0) {
		cli_lib_error(r);
		return -1;
	}
	if (r == 0)
		return 0;
	if (r == QK_USES_DATA_FILE) {
		cli_error("'%s' is the external data file of '%s': refusing to "
			  "overwrite it", dst, qk_get_filename(layer));
	} else if (layer == src && strcmp(dst, qk_get_filename(src)) == 0) {
		cli_error("'%s' is the source image: refusing to overwrite it", dst);
	} else if (layer == src) {
		cli_error("'%s' is the source image '%s': refusing to overwrite it",
			  dst, qk_get_filename(src));
	} else {
		for (above = src; qk_get_backing(above) != layer;)
			above = qk_get_backing(above);
		cli_error("'%s' is the backing file of '%s': refusing to "
			  "overwrite it", dst, qk_get_filename(above));
	}
	return -1;
}

char *cli_sibling_path(const char *image, const char *name)
{
	const char *slash = strrchr(image, '/');
	size_t dir, len;
	char *p;

	if (name[0] == '/' || slash == NULL)
		return cli_xstrdup(name);
	dir = (size_t)(slash - image) + 1;
	len = strlen(name);
	p = cli_xmalloc(dir + len + 1);
	memcpy(p, image, dir);
	memcpy(p + dir, name, len + 1);
	return p;
}

int cli_run_threads(unsigned n, void *(*fn)(void *), void *arg)
{
	pthread_t tids[CLI_MAX_THREADS];
	unsigned started = 0;

	if (n > CLI_MAX_THREADS)
		n = CLI_MAX_THREADS;
	for (; started < n; started++) {
		int r = pthread_create(&tids[started], NULL, fn, arg);

		if (r != 0) {
			if (started > 0)
				break;   /* fewer threads still do the job */
			cli_error("Could not start a thread: %s", strerror(r));
			return -1;
		}
	}
	for (unsigned i = 0; i < started; i++)
		pthread_join(tids[i], NULL);
	return 0;
}

void cli_append_opts(char **list, const char *add)
{
	size_t old = *list ? strlen(*list) : 0, n = strlen(add);

	*list = cli_xrealloc(*list, old + n + 2);
	if (old)
		(*list)[old++] = ',';
	memcpy(*list + old, add, n + 1);
}

bool cli_opts_want_help(const char *list)
{
	struct cli_kv *kv;
	int n = cli_parse_kv_list(list, &kv);
	bool help = false;

	for (int i = 0; i < n; i++)
		if (strcmp(kv[i].key, "help") == 0 || strcmp(kv[i].key, "?") == 0)
			help = true;
	if (n >= 0)
		cli_free_kv(kv, n);
	return help;
}
