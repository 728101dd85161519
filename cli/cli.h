/*
 * cli.h - private declarations of the qcowkit command-line program.
 *
 * The CLI reaches the library only through the public header qcowkit.h.
 * Layout: main.c (command table, dispatch), cmd-<name>.c (one command
 * each; a long one parses into a struct <name>_args in parse_args() and
 * runs in functions named for their step), opts.c (the option parsing the
 * commands share, option values: sizes, formats, -o lists, opening
 * images), output.c (qemu-compatible text and JSON output, progress).
 *
 * Error convention: every failure prints exactly one line to stderr,
 * "qcowkit: <message>"; for library failures <message> is qk_last_error()
 * unchanged (it already names the API call).
 *
 * SPDX-License-Identifier: MIT
 */
#ifndef QCOWKIT_CLI_H
#define QCOWKIT_CLI_H

#include <getopt.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "qcowkit.h"

/* ---- exit codes -------------------------------------------------------- */

#define CLI_EXIT_OK 0
#define CLI_EXIT_FAILURE 1          /* any error, usage errors included */
/* compare, as qemu-img compare */
#define CLI_EXIT_CMP_DIFFERENT 1
#define CLI_EXIT_CMP_ERROR 2        /* could not open (or usage) */
#define CLI_EXIT_CMP_STATUS_ERROR 3 /* block status failed */
#define CLI_EXIT_CMP_READ_ERROR 4   /* read failed */

/* ---- main.c ------------------------------------------------------------ */

struct cli_command {
	const char *name;
	/* argv[0] is the command name; returns the process exit code. */
	int (*run)(int argc, char **argv);
	const char *synopsis;   /* one line, after "qcowkit " */
	const char *summary;    /* what it does, one line */
};

/* --confine, taken by every command (main.c removes it from argv before
 * the command sees it): every image is opened with QK_OPEN_CONFINE. */
extern bool cli_confine;

/* The command named `name`, or NULL. */
const struct cli_command *cli_find_command(const char *name);
/* Print the usage of `cmd` to `f`. */
void cli_print_usage(FILE *f, const struct cli_command *cmd);

/* Print "qcowkit: <fmt...>" and a newline to stderr. */
void cli_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Print the calling thread's last library error; `ret` (a negative errno)
 * is used only when the library recorded no message. */
void cli_lib_error(int ret);
/* The last library error without the name of the call ("qk_x: "), for
 * messages worded as qemu-img's. */
const char *cli_lib_message(void);
/* Report a getopt failure of command `cmd` on one line; returns the
 * usage-error exit code to use (`code`). `opt` is getopt's return value. */
int cli_bad_option(const char *cmd, int opt, char **argv, int code);
/* Report a usage problem ("Expecting one image file name") on one line. */
int cli_usage_error(const char *cmd, int code, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

/* Commands (cmd-<name>.c). */
int cmd_amend(int argc, char **argv);
int cmd_info(int argc, char **argv);
int cmd_map(int argc, char **argv);
int cmd_convert(int argc, char **argv);
int cmd_compare(int argc, char **argv);
int cmd_io(int argc, char **argv);
int cmd_bench(int argc, char **argv);
int cmd_create(int argc, char **argv);
int cmd_resize(int argc, char **argv);
int cmd_snapshot(int argc, char **argv);
int cmd_check(int argc, char **argv);
int cmd_measure(int argc, char **argv);
int cmd_serve(int argc, char **argv);
int cmd_commit(int argc, char **argv);
int cmd_rebase(int argc, char **argv);
int cmd_bitmap(int argc, char **argv);

/* cmd-create.c: -o lists of create, for convert's target. */
struct cli_create_opts;
struct cli_create_opts *cli_create_opts_parse(qk_format fmt, const char *olist,
					      struct qk_create_options *o);
void cli_create_opts_free(struct cli_create_opts *h);

/* convert-qcow2.c: convert's qcow2 target. */
struct convert_qcow2 {
	qk_image *src;
	const char *dst_path;
	const char *olist;        /* -o, or NULL */
	const char *backing;      /* -B, or NULL */
	const char *backing_fmt;  /* -F, or NULL (detected) */
	bool compress;            /* -c */
	bool skip_create;         /* -n */
	bool target_is_zero;      /* --target-is-zero */
	bool progress;
	bool quiet;
	uint64_t sparse;          /* -S bytes, 0 = allocate everything */
	unsigned workers;         /* -m */
	uint32_t open_flags;      /* -t: QK_OPEN_UNSAFE (default), _DIRECT */
	bool bitmaps;             /* --bitmaps: copy the persistent bitmaps */
	bool skip_broken;         /* --skip-broken-bitmaps */
};
int convert_qcow2(const struct convert_qcow2 *a);

/* check-forensic.c: check --forensic. */
struct check_forensic {
	const char *file;         /* the image's name, for the report */
	bool json;                /* --output=json */
	const char *extract;      /* --extract DIR, or NULL */
	uint64_t max_files;       /* --extract-max-files, >= 1 */
	uint64_t max_bytes;       /* --extract-max-bytes, >= 1 */
};
/* Default limits of --extract. Each leaked cluster holding data becomes a
 * file, and a crafted image can declare a leak in every cluster of a large
 * sparse file: without a limit one small image fills a disk or a
 * directory. 1 GiB is 16384 clusters of the default 64 KiB, so with the
 * default cluster size both limits agree; smaller clusters meet the file
 * limit first. */
#define CHECK_EXTRACT_MAX_FILES 16384u
#define CHECK_EXTRACT_MAX_BYTES (1ull << 30)
/* Report on `img` (opened read-only) and extract as `a` says. Returns the
 * exit code: 0 nothing unreferenced or leaked, 3 something was, 1 after
 * printing an error. */
int check_forensic(qk_image *img, const struct check_forensic *a);

/* ---- opts.c ------------------------------------------------------------ */

/*
 * A command's option parsing, and the options the image commands share.
 * A command sets `cmd` and `usage_code` (and any default), reads its
 * options with cli_getopt(), then takes its operands (a command on one
 * image with cli_one_image()).
 */
struct cli_opts {
	const char *cmd;          /* the command's name, for messages */
	int usage_code;           /* exit status of a usage error */
	const char *fmtname;      /* -f FMT as given; NULL without -f */
	uint32_t open_flags;      /* QK_OPEN_FORCE_SHARE after -U */
	bool json;                /* --output=json */
	int status;               /* exit status once parsing says stop */
};

/*
 * getopt_long() over a command's argv (argv[0] is its name), taking here
 * what every command does alike, so that its own switch lists only its
 * own options:
 *   'f'  -f FMT: o->fmtname = FMT (cli_parse_format() checks it later);
 *   'U'  -U, --force-share: QK_OPEN_FORCE_SHARE added to o->open_flags;
 *   'i'  -i AIO, --aio=AIO (qemu-img bench, qemu-io): a mode
 *        cli_parse_aio() knows, else "Invalid aio option: AIO" and stop
 *        with CLI_EXIT_FAILURE;
 *   the long option named "output" (whatever value `longopts` gives it):
 *        --output=human|json into o->json, else cli_parse_output()'s
 *        message and stop with CLI_EXIT_FAILURE;
 *   'h'  -h, --help: the command's usage on stdout;
 *   an option getopt refused ('?', ':'): one line, as cli_bad_option().
 * Only what `optstring` and `longopts` list can arrive, so a command
 * without -f, -U, -i or --output never has them taken. Returns the next
 * option for the command (> 0); 0 after the last option (argv[optind] is
 * the first operand); or -1 when the command must return o->status now:
 * CLI_EXIT_OK after the usage, o->usage_code (or as said above) after an
 * error.
 */
int cli_getopt(struct cli_opts *o, int argc, char **argv,
	       const char *optstring, const struct option *longopts);

/*
 * The end of an option switch, for a command that runs getopt itself:
 * 'h' prints the usage of `cmd` on stdout and returns CLI_EXIT_OK; any
 * other `opt` is one getopt refused, reported by cli_bad_option(), and
 * `code` is returned.
 */
int cli_option_end(const char *cmd, int opt, char **argv, int code);

/* Returned by a command's own option parsing when the command goes on;
 * any other value is the exit status to return now. */
#define CLI_GO (-1)

/*
 * The end of the option parsing of a command on one image, whose last
 * cli_getopt() returned `c`: the image operand, argv[optind], when c is 0
 * and that is the one argument left. Otherwise NULL with o->status set:
 * by cli_getopt() (c < 0), or to o->usage_code after "Expecting one image
 * file name".
 */
const char *cli_one_image(struct cli_opts *o, int c, int argc, char **argv);

/*
 * Parse a size the way qemu-img does (qemu_strtosz): a decimal or 0x hex
 * integer, an optional decimal fraction (only with a suffix other than B),
 * an optional suffix B, K, M, G, T, P, E (either case; powers of 1024).
 * Returns 0 and sets *out, -EINVAL for malformed text, -ERANGE when the
 * value does not fit in 63 bits.
 */
int cli_parse_size(const char *s, uint64_t *out);
/* As cli_parse_size, up to 2^64 - 1 (QemuOpts sizes, qemu_strtosz). */
int cli_parse_size_u64(const char *s, uint64_t *out);

/*
 * qemu-img's cvtnum: parse `s` as a size in [min, max]; on failure print
 * "Invalid <name> specified..." and return -1.
 */
int cli_cvtnum(const char *name, const char *s, uint64_t min, uint64_t max,
	       uint64_t *out);

/* Parse an unsigned integer (decimal, 0x hex or 0 octal, as strtoul base
 * 0) into *out. Returns 0 or -EINVAL / -ERANGE. */
int cli_parse_uint(const char *s, uint64_t *out);

/* Map "qcow2"/"raw" to a qk_format; anything else prints
 * "Unknown file format 'X'" and returns -1. NULL gives QK_FORMAT_AUTO. */
int cli_parse_format(const char *name, qk_format *out);

/* --output=human|json. Returns 0 (json = false/true) or prints qemu-img's
 * message and returns -1. */
int cli_parse_output(const char *arg, bool *json);

/* Cache modes as qemu-img -t: sets *direct. Returns 0, or -1 if unknown
 * (nothing printed). */
int cli_parse_cache(const char *mode, bool *direct);

/* AIO modes as qemu-img -i and qemu-nbd --aio (threads, native,
 * io_uring; all of them run as threads here). Returns 0, or -1 if
 * unknown (nothing printed). */
int cli_parse_aio(const char *mode);

/* One "key=value" item of an -o list. */
struct cli_kv {
	char *key;
	char *value;     /* "" when no '=' was given */
};
/*
 * Split an -o list "a=b,c=d" into items. A doubled comma ",," stands for a
 * literal comma in a value, as in QEMU. Returns the item count (>= 0) and
 * sets *out (free with cli_free_kv), or -EINVAL for an empty key.
 */
int cli_parse_kv_list(const char *list, struct cli_kv **out);
void cli_free_kv(struct cli_kv *kv, int n);
/* Whether an -o list asks for help ("help" or "?" among its keys). */
bool cli_opts_want_help(const char *list);

/*
 * Open `path` with format `fmt` and QK_OPEN_* `flags`. On failure prints
 * the library's message and returns the negative errno.
 */
int cli_open(const char *path, qk_format fmt, uint32_t flags,
	     qk_image **out);
/*
 * As cli_open, of the internal snapshot `spec` names (qemu-img's -l
 * argument: "snapshot.id=ID,snapshot.name=NAME", either part optional, or
 * an id or else a name), read-only; spec NULL: the active image. Prints
 * qemu-img's messages ("Failed to load snapshot: Can't find snapshot").
 */
int cli_open_snapshot(const char *path, qk_format fmt, uint32_t flags, const char *spec,
		      qk_image **out);

/*
 * Before writing `dst`: refuse it when the open source image `src` reads
 * it (the image itself, a file of its backing chain, or an external data
 * file; compared by device and inode, so links count). Prints one line
 * naming the relation ("'base.raw' is the backing file of 'top.qcow2':
 * refusing to overwrite it") and returns -1; returns 0 when dst is free.
 */
int cli_check_target(qk_image *src, const char *dst);

/* A file name stored in `image` (backing or data file) as it is opened:
 * relative names are relative to the image's directory. Malloc'd. */
char *cli_sibling_path(const char *image, const char *name);

/* Run fn(arg) on n threads (at most CLI_MAX_THREADS) and wait for them
 * all. Fewer threads are fine when some cannot start; returns -1 after a
 * message when none can. */
#define CLI_MAX_THREADS 64
int cli_run_threads(unsigned n, void *(*fn)(void *), void *arg);

/* Several -o options add up, as in qemu-img: append `add` to the
 * malloc'd comma-separated *list (NULL at first). */
void cli_append_opts(char **list, const char *add);

/* Allocation that cannot fail (prints an error and exits instead). */
void *cli_xmalloc(size_t n);
void *cli_xcalloc(size_t n, size_t size);
void *cli_xrealloc(void *p, size_t n);
char *cli_xstrdup(const char *s);

/* ---- output.c ---------------------------------------------------------- */

/*
 * A JSON value tree that prints the way QEMU's QObject JSON writer does.
 * QEMU keeps dictionary entries in a 512-bucket hash table and prints them
 * bucket by bucket (newest first within a bucket), so qemu-img's key order
 * looks random but is fixed; we reproduce it so scripts that diff output
 * see no difference.
 */
struct qj;

struct qj *qj_dict(void);
struct qj *qj_list(void);
/* Add `val` to a dict (under `key`) or a list (`key` NULL); takes
 * ownership of `val`. Returns `val`. */
struct qj *qj_add(struct qj *parent, const char *key, struct qj *val);
void qj_add_int(struct qj *parent, const char *key, int64_t v);
void qj_add_uint(struct qj *parent, const char *key, uint64_t v);
void qj_add_bool(struct qj *parent, const char *key, bool v);
void qj_add_str(struct qj *parent, const char *key, const char *v);
/* The value under `key` of a dict, or NULL. */
struct qj *qj_get(const struct qj *dict, const char *key);
void qj_free(struct qj *v);
/* Pretty-print `v` as qobject_to_json_pretty() does (no final newline). */
void qj_print_json(FILE *f, const struct qj *v);
/* Print `s` as a quoted JSON string, escaped as qj_print_json does (for
 * output streamed by hand). */
void qj_print_string(FILE *f, const char *s);
/* Print a dict or list as QEMU's human "Format specific information"
 * dump (block/qapi.c dump_qobject) at `indent` levels of 4 spaces. */
void qj_print_human(FILE *f, int indent, const struct qj *v);

/*
 * Terminal-safe text. Names an image carries (snapshot ids and names,
 * bitmap names, backing and data file names and formats), file names and
 * library messages that quote them go through cli_escape() before they
 * reach human output or stderr, so that no image can send a terminal
 * control sequence (set a window title, rewrite the screen, hide text) or
 * break a one-line message. The escaping is unambiguous, since a backslash
 * only ever starts an escape, and reads as C does:
 *   - printable ASCII is kept; a backslash is doubled ("\\");
 *   - control characters: \a \b \t \n \v \f \r, the others (ESC included)
 *     and DEL as \xHH ("\x1b");
 *   - valid UTF-8 is kept, except the C1 controls U+0080-U+009F, U+2028 to
 *     U+202E (line and paragraph separators, bidirectional embeddings and
 *     overrides) and U+2066-U+2069 (bidirectional isolates), as \uXXXX;
 *   - every byte that is not part of well-formed UTF-8 (a stray 0x9B, an
 *     overlong form, a surrogate, a cut sequence) as \xHH.
 * JSON output needs none of this: its strings escape control characters
 * as JSON requires (\u001B), and hold Unicode, so invalid UTF-8 becomes
 * U+FFFD there, as in qemu-img.
 * cli_escape() returns a new string (free it); cli_fputs_escaped() prints;
 * cli_escape_into() writes into `out`, which must hold 4 * strlen(s) + 1
 * bytes, and returns the length written (no allocation: for cli_error).
 */
size_t cli_escape_into(char *out, const char *s);
char *cli_escape(const char *s);
void cli_fputs_escaped(FILE *f, const char *s);

/* qemu's size_to_str(): "0 B", "260 KiB", "1.32 MiB" (3 significant
 * digits, binary units). Writes into buf. */
void fmt_size_human(char *buf, size_t n, uint64_t v);
/* qemu-io's cvtstr(): "64 KiB", "1.500 KiB", "100 bytes". */
void fmt_io_size(char *buf, size_t n, double v);
/* qemu-io's timestr() for a duration in seconds: "00.00 sec" below one
 * second, else "H:MM:SS.ss"; `fixed` selects the -C layout. */
void fmt_io_time(char *buf, size_t n, double secs, bool fixed);

/* Print one qemu-img snapshot table row / header (no newline). */
void print_snapshot_header(FILE *f);
void print_snapshot_row(FILE *f, const struct qk_snapshot *sn);

/* qemu-style progress ("    (NN.NN/100%)\r" on stdout). */
struct cli_progress {
	bool enabled;
	float current;
	float last_print;
	float min_skip;
};
void progress_init(struct cli_progress *p, bool enabled, float min_skip);
/* max == 0: `delta` is the absolute percentage; else delta * max / 100
 * is added to the current value (qemu_progress_print). */
void progress_print(struct cli_progress *p, float delta, int max);
void progress_end(struct cli_progress *p);
/* The library's progress callbacks (qk_progress_fn) printed as percent on
 * `opaque`, a struct cli_progress. */
void progress_cb(void *opaque, uint64_t done, uint64_t total);
/*
 * Run fn(arg) on n threads (cli_run_threads()) under progress `p`, which
 * the caller has started: afterwards 100% is printed unless *failed (read
 * once the threads are done), and the progress line is ended either way.
 * Returns 0, or -1 when no thread could start (message printed).
 */
int cli_run_progress(unsigned n, void *(*fn)(void *), void *arg,
		     struct cli_progress *p, const bool *failed);

/* Monotonic time in seconds. */
double cli_now(void);

#endif /* QCOWKIT_CLI_H */
