/*
 * output.c - text and JSON output compatible with qemu-img 7.2 / qemu-io.
 *
 * Design note. qemu-img builds its JSON through QObjects: a QDict is a
 * 512-bucket hash table (tdb hash of the key) whose buckets are lists with
 * the newest entry first, and the JSON writer and the human "format
 * specific" dump both walk it bucket by bucket. The resulting key order
 * ("backing-filename-format" before "virtual-size", ...) is what scripts and
 * test expectations see, so struct qj keeps entries in insertion order and
 * sorts them by (bucket ascending, insertion descending) when printing.
 * Pretty printing follows QEMU's JSONWriter: 4 spaces per nesting level,
 * "key": value, ",\n" between members, and an empty container printed as
 * "[" newline indent "]".
 *
 * SPDX-License-Identifier: MIT
 */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli.h"

enum qj_type { QJ_INT, QJ_UINT, QJ_BOOL, QJ_STR, QJ_DICT, QJ_LIST };

struct qj {
	enum qj_type type;
	char *key;              /* member name inside a dict */
	unsigned seq;           /* insertion number inside the parent */
	union {
		int64_t i;
		uint64_t u;
		bool b;
		char *s;
	} v;
	struct qj *first, *last; /* children of a dict or list */
	struct qj *next;
	unsigned count;
};

static struct qj *qj_new(enum qj_type t)
{
	struct qj *v = cli_xcalloc(1, sizeof(*v));

	v->type = t;
	return v;
}

struct qj *qj_dict(void)
{
	return qj_new(QJ_DICT);
}

struct qj *qj_list(void)
{
	return qj_new(QJ_LIST);
}

struct qj *qj_add(struct qj *parent, const char *key, struct qj *val)
{
	if (key != NULL)
		val->key = cli_xstrdup(key);
	val->seq = parent->count++;
	if (parent->last != NULL)
		parent->last->next = val;
	else
		parent->first = val;
	parent->last = val;
	return val;
}

void qj_add_int(struct qj *parent, const char *key, int64_t v)
{
	qj_add(parent, key, qj_new(QJ_INT))->v.i = v;
}

void qj_add_uint(struct qj *parent, const char *key, uint64_t v)
{
	qj_add(parent, key, qj_new(QJ_UINT))->v.u = v;
}

void qj_add_bool(struct qj *parent, const char *key, bool v)
{
	qj_add(parent, key, qj_new(QJ_BOOL))->v.b = v;
}

void qj_add_str(struct qj *parent, const char *key, const char *v)
{
	qj_add(parent, key, qj_new(QJ_STR))->v.s = cli_xstrdup(v);
}

struct qj *qj_get(const struct qj *dict, const char *key)
{
	for (struct qj *c = dict->first; c != NULL; c = c->next)
		if (c->key != NULL && strcmp(c->key, key) == 0)
			return c;
	return NULL;
}

void qj_free(struct qj *v)
{
	struct qj *c, *n;

	if (v == NULL)
		return;
	for (c = v->first; c != NULL; c = n) {
		n = c->next;
		qj_free(c);
	}
	if (v->type == QJ_STR)
		free(v->v.s);
	free(v->key);
	free(v);
}

/* QEMU's qdict.c tdb_hash(), reduced to its 512 buckets. */
static unsigned qdict_bucket(const char *name)
{
	uint32_t value = 0x238F13AFu * (uint32_t)strlen(name);

	for (unsigned i = 0; name[i] != '\0'; i++)
		value += (uint32_t)(unsigned char)name[i] << (i * 5 % 24);
	return (1103515243u * value + 12345u) % 512u;
}

static int cmp_dict_order(const void *a, const void *b)
{
	const struct qj *x = *(const struct qj *const *)a;
	const struct qj *y = *(const struct qj *const *)b;
	unsigned bx = qdict_bucket(x->key), by = qdict_bucket(y->key);

	if (bx != by)
		return bx < by ? -1 : 1;
	/* Newest first inside a bucket (QLIST_INSERT_HEAD). */
	return x->seq > y->seq ? -1 : x->seq < y->seq ? 1 : 0;
}

/* The children of `v` in print order; caller frees the array. */
static struct qj **ordered_children(const struct qj *v)
{
	struct qj **arr = cli_xcalloc(v->count + 1, sizeof(*arr));
	unsigned n = 0;

	for (struct qj *c = v->first; c != NULL; c = c->next)
		arr[n++] = c;
	if (v->type == QJ_DICT)
		qsort(arr, n, sizeof(*arr), cmp_dict_order);
	return arr;
}

/*
 * Decode one UTF-8 sequence at *p as QEMU's mod_utf8_codepoint() does for
 * JSON output: returns the code point, or -1 for an invalid sequence (then
 * at least one byte is consumed). Advances *p.
 */
static long utf8_next(const unsigned char **p)
{
	const unsigned char *s = *p;
	long cp;
	int len;

	if (s[0] < 0x80) {
		*p = s + 1;
		return s[0];
	}
	if ((s[0] & 0xE0) == 0xC0) {
		cp = s[0] & 0x1F;
		len = 2;
	} else if ((s[0] & 0xF0) == 0xE0) {
		cp = s[0] & 0x0F;
		len = 3;
	} else if ((s[0] & 0xF8) == 0xF0) {
		cp = s[0] & 0x07;
		len = 4;
	} else {
		*p = s + 1;
		return -1;
	}
	for (int i = 1; i < len; i++) {
		if ((s[i] & 0xC0) != 0x80) {
			*p = s + i;
			return -1;
		}
		cp = (cp << 6) | (s[i] & 0x3F);
	}
	*p = s + len;
	/* Overlong forms are invalid, except QEMU's modified-UTF-8 NUL. */
	if ((len == 2 && cp < 0x80 && !(s[0] == 0xC0 && s[1] == 0x80)) ||
	    (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) ||
	    cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
		return -1;
	return cp;
}

/*
 * A JSON string as QEMU's JSON writer quotes it: the control characters as
 * \b \f \n \r \t or \u00XX, everything past ASCII as \uXXXX (surrogate
 * pairs beyond the BMP), and invalid UTF-8 as U+FFFD, since a JSON string
 * holds Unicode text and cannot carry arbitrary bytes.
 */
static void json_quoted(FILE *f, const char *str)
{
	const unsigned char *p = (const unsigned char *)str;

	fputc('"', f);
	while (*p != '\0') {
		long cp = utf8_next(&p);

		switch (cp) {
		case '"': fputs("\\\"", f); break;
		case '\\': fputs("\\\\", f); break;
		case '\b': fputs("\\b", f); break;
		case '\f': fputs("\\f", f); break;
		case '\n': fputs("\\n", f); break;
		case '\r': fputs("\\r", f); break;
		case '\t': fputs("\\t", f); break;
		default:
			if (cp < 0)
				cp = 0xFFFD;
			if (cp > 0xFFFF)
				fprintf(f, "\\u%04lX\\u%04lX",
					0xD800 + ((cp - 0x10000) >> 10),
					0xDC00 + ((cp - 0x10000) & 0x3FF));
			else if (cp < 0x20 || cp >= 0x7F)
				fprintf(f, "\\u%04lX", cp);
			else
				fputc((int)cp, f);
		}
	}
	fputc('"', f);
}

struct json_writer {
	FILE *f;
	int depth;        /* open containers */
	bool need_comma;
	bool started;
};

static void jw_newline(struct json_writer *w)
{
	fprintf(w->f, "\n%*s", 4 * w->depth, "");
}

static void jw_value(struct json_writer *w, const char *name,
		     const struct qj *v)
{
	if (w->need_comma) {
		fputc(',', w->f);
		jw_newline(w);
	} else {
		if (w->started)
			jw_newline(w);
		w->need_comma = true;
	}
	w->started = true;
	if (name != NULL) {
		json_quoted(w->f, name);
		fputs(": ", w->f);
	}
	switch (v->type) {
	case QJ_INT:
		fprintf(w->f, "%lld", (long long)v->v.i);
		break;
	case QJ_UINT:
		fprintf(w->f, "%llu", (unsigned long long)v->v.u);
		break;
	case QJ_BOOL:
		fputs(v->v.b ? "true" : "false", w->f);
		break;
	case QJ_STR:
		json_quoted(w->f, v->v.s);
		break;
	case QJ_DICT:
	case QJ_LIST: {
		struct qj **kids = ordered_children(v);

		fputc(v->type == QJ_DICT ? '{' : '[', w->f);
		w->depth++;
		w->need_comma = false;
		for (unsigned i = 0; i < v->count; i++)
			jw_value(w, v->type == QJ_DICT ? kids[i]->key : NULL,
				 kids[i]);
		w->depth--;
		jw_newline(w);
		fputc(v->type == QJ_DICT ? '}' : ']', w->f);
		w->need_comma = true;
		free(kids);
		break;
	}
	}
}

void qj_print_json(FILE *f, const struct qj *v)
{
	struct json_writer w = { .f = f };

	jw_value(&w, NULL, v);
}

void qj_print_string(FILE *f, const char *s)
{
	json_quoted(f, s);
}

static void human_value(FILE *f, int indent, const struct qj *v);

static bool is_composite(const struct qj *v)
{
	return v->type == QJ_DICT || v->type == QJ_LIST;
}

/* block/qapi.c dump_qdict() and dump_qlist(). */
static void human_container(FILE *f, int indent, const struct qj *v)
{
	struct qj **kids = ordered_children(v);

	for (unsigned i = 0; i < v->count; i++) {
		const struct qj *c = kids[i];
		bool comp = is_composite(c);

		if (v->type == QJ_DICT) {
			/* Dashes in key names read as spaces. */
			fprintf(f, "%*s", indent * 4, "");
			for (const char *k = c->key; *k != '\0'; k++)
				fputc(*k == '-' ? ' ' : *k, f);
			fputs(comp ? ":\n" : ": ", f);
		} else {
			fprintf(f, "%*s[%u]:%c", indent * 4, "", i,
				comp ? '\n' : ' ');
		}
		human_value(f, indent + 1, c);
		if (!comp)
			fputc('\n', f);
	}
	free(kids);
}

static void human_value(FILE *f, int indent, const struct qj *v)
{
	switch (v->type) {
	case QJ_INT:
		fprintf(f, "%lld", (long long)v->v.i);
		break;
	case QJ_UINT:
		fprintf(f, "%llu", (unsigned long long)v->v.u);
		break;
	case QJ_BOOL:
		fputs(v->v.b ? "true" : "false", f);
		break;
	case QJ_STR:
		cli_fputs_escaped(f, v->v.s);
		break;
	case QJ_DICT:
	case QJ_LIST:
		human_container(f, indent, v);
		break;
	}
}

void qj_print_human(FILE *f, int indent, const struct qj *v)
{
	human_value(f, indent, v);
}

/*
 * The length (2 to 4) of the well-formed UTF-8 sequence at s, with its code
 * point in *cp; 0 when s does not start one (Unicode's table 3-7: no
 * overlong forms, no surrogates, nothing past U+10FFFF). Never reads past a
 * NUL: a NUL is not a continuation byte.
 */
static int utf8_seq(const unsigned char *s, uint32_t *cp)
{
	uint32_t c, min;
	int len;

	if (s[0] >= 0xC2 && s[0] <= 0xDF) {
		len = 2;
		c = s[0] & 0x1Fu;
		min = 0x80;
	} else if ((s[0] & 0xF0) == 0xE0) {
		len = 3;
		c = s[0] & 0x0Fu;
		min = 0x800;
	} else if (s[0] >= 0xF0 && s[0] <= 0xF4) {
		len = 4;
		c = s[0] & 0x07u;
		min = 0x10000;
	} else {
		return 0;
	}
	for (int i = 1; i < len; i++) {
		if ((s[i] & 0xC0) != 0x80)
			return 0;
		c = (c << 6) | (s[i] & 0x3Fu);
	}
	if (c < min || c > 0x10FFFF || (c >= 0xD800 && c <= 0xDFFF))
		return 0;
	*cp = c;
	return len;
}

/* Code points past ASCII that are shown escaped although valid: the C1
 * controls (U+009B is a CSI to terminals that take 8-bit controls), the
 * line and paragraph separators, and the bidirectional embeddings,
 * overrides and isolates, which reorder what is displayed around them. */
static bool escaped_codepoint(uint32_t cp)
{
	return (cp >= 0x80 && cp <= 0x9F) || (cp >= 0x2028 && cp <= 0x202E) ||
	       (cp >= 0x2066 && cp <= 0x2069);
}

/* The letter of C's escape for control character c ('n' for a newline),
 * or 0 when C has none. */
static char c_escape_letter(unsigned char c)
{
	switch (c) {
	case '\a': return 'a';
	case '\b': return 'b';
	case '\t': return 't';
	case '\n': return 'n';
	case '\v': return 'v';
	case '\f': return 'f';
	case '\r': return 'r';
	default: return '\0';
	}
}

size_t cli_escape_into(char *out, const char *str)
{
	const unsigned char *s = (const unsigned char *)str;
	char *o = out;

	while (*s != '\0') {
		uint32_t cp;
		int len;

		if (*s >= 0x20 && *s < 0x7F) {
			if (*s == '\\')
				*o++ = '\\';
			*o++ = (char)*s++;
			continue;
		}
		if (*s < 0x80) {
			char c = c_escape_letter(*s);

			if (c != '\0')
				o += sprintf(o, "\\%c", c);
			else
				o += sprintf(o, "\\x%02x", *s);
			s++;
			continue;
		}
		len = utf8_seq(s, &cp);
		if (len == 0) {
			o += sprintf(o, "\\x%02x", *s++);
		} else if (escaped_codepoint(cp)) {
			o += sprintf(o, "\\u%04x", (unsigned)cp);
			s += len;
		} else {
			memcpy(o, s, (size_t)len);
			o += len;
			s += len;
		}
	}
	*o = '\0';
	return (size_t)(o - out);
}

char *cli_escape(const char *s)
{
	/* The longest form is 4 characters per byte ("\xHH"); "\uXXXX"
	 * stands for 2 or 3 bytes. */
	char *out = cli_xmalloc(4 * strlen(s) + 1);

	cli_escape_into(out, s);
	return out;
}

void cli_fputs_escaped(FILE *f, const char *s)
{
	char *e = cli_escape(s);

	fputs(e, f);
	free(e);
}

void fmt_size_human(char *buf, size_t n, uint64_t v)
{
	static const char *const suffixes[] = {
		"", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"
	};
	/* qemu's size_to_str() switches unit once the value reaches 1000 of
	 * the smaller one: the unit index is floor(log2(v * 1024/1000)) / 10,
	 * computed here without libm. */
	double x = (double)v / (1000.0 / 1024.0);
	int i = 0;

	while (i < 6 && x >= (double)(1ull << (10 * (i + 1))))
		i++;
	snprintf(buf, n, "%0.3g %sB", (double)v / (double)(1ull << (10 * i)),
		 suffixes[i]);
}

void fmt_io_size(char *buf, size_t n, double v)
{
	static const struct {
		int shift;
		const char *suffix;
	} units[] = {
		{ 60, " EiB" }, { 50, " PiB" }, { 40, " TiB" },
		{ 30, " GiB" }, { 20, " MiB" }, { 10, " KiB" },
	};
	const char *suffix = " bytes";
	char num[64], *trim;

	snprintf(num, sizeof(num), "%f", v);
	for (size_t i = 0; i < sizeof(units) / sizeof(units[0]); i++) {
		double unit = (double)(1ull << units[i].shift);

		if (v >= unit) {
			snprintf(num, sizeof(num), "%.3f", v / unit);
			suffix = units[i].suffix;
			break;
		}
	}
	/* qemu-io drops a ".000" fraction: "64 KiB", not "64.000 KiB". */
	trim = strstr(num, ".000");
	if (trim != NULL)
		*trim = '\0';
	snprintf(buf, n, "%s%s", num, suffix);
}

void fmt_io_time(char *buf, size_t n, double secs, bool fixed)
{
	unsigned long whole = (unsigned long)secs;
	double frac = secs - (double)whole;

	if (fixed || whole != 0)
		snprintf(buf, n, "%u:%02u:%05.2f", (unsigned)(whole / 3600),
			 (unsigned)(whole % 3600 / 60),
			 (double)(whole % 60) + frac);
	else
		snprintf(buf, n, "%05.2f sec", frac);
}

void print_snapshot_header(FILE *f)
{
	fprintf(f, "%-10s%-17s%8s%20s%13s%11s", "ID", "TAG", "VM SIZE", "DATE",
		"VM CLOCK", "ICOUNT");
}

void print_snapshot_row(FILE *f, const struct qk_snapshot *sn)
{
	char date[64] = "", clock[64], size[32], icount[32] = "";
	char *id, *name;
	time_t t = (time_t)sn->date_sec;
	struct tm tm;
	uint64_t secs = sn->vm_clock_nsec / 1000000000u;

	if (localtime_r(&t, &tm) != NULL)
		strftime(date, sizeof(date), "%Y-%m-%d %H:%M:%S", &tm);
	snprintf(clock, sizeof(clock), "%02d:%02d:%02d.%03d",
		 (int)(secs / 3600), (int)((secs / 60) % 60), (int)(secs % 60),
		 (int)((sn->vm_clock_nsec / 1000000u) % 1000u));
	fmt_size_human(size, sizeof(size), sn->vm_state_size);
	if (sn->icount != UINT64_MAX)
		snprintf(icount, sizeof(icount), "%lld",
			 (long long)sn->icount);
	id = cli_escape(sn->id);
	name = cli_escape(sn->name);
	fprintf(f, "%-9s %-16s %8s%20s%13s%11s", id, name, size, date, clock,
		icount);
	free(id);
	free(name);
}

void progress_init(struct cli_progress *p, bool enabled, float min_skip)
{
	p->enabled = enabled;
	p->current = 0;
	p->last_print = 0;
	p->min_skip = min_skip;
}

void progress_print(struct cli_progress *p, float delta, int max)
{
	float current;

	if (max == 0)
		current = delta;
	else
		current = p->current + delta / 100 * (float)max;
	if (current > 100)
		current = 100;
	p->current = current;
	/* Only redraw after min_skip percent, and always at 0 and 100. */
	if (current > p->last_print + p->min_skip || current == 100 ||
	    current == 0) {
		p->last_print = p->current;
		if (p->enabled) {
			printf("    (%3.2f/100%%)\r", (double)p->current);
			fflush(stdout);
		}
	}
}

void progress_end(struct cli_progress *p)
{
	if (p->enabled)
		printf("\n");
}

int cli_run_progress(unsigned n, void *(*fn)(void *), void *arg,
		     struct cli_progress *p, const bool *failed)
{
	if (cli_run_threads(n, fn, arg) < 0) {
		progress_end(p);
		return -1;
	}
	if (!*failed)
		progress_print(p, 100, 0);
	progress_end(p);
	return 0;
}

double cli_now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

void progress_cb(void *opaque, uint64_t done, uint64_t total)
{
	if (total)
		progress_print(opaque, (float)((double)done * 100.0 / (double)total), 0);
}
