/*
 * cmd-io.c - "qcowkit io": run qemu-io style commands on an image.
 *
 * Commands come from -c options (in order) or, without any, one per line
 * from standard input. Supported so far: read, map, length, quit; the
 * writing commands (write, discard, flush...) report "not supported yet".
 * Output of read and map is byte-for-byte qemu-io 7.2's. Every command
 * runs even after one fails; the exit status is 1 if any failed (qemu-io
 * does the same), including a read -P pattern mismatch.
 *
 * SPDX-License-Identifier: MIT
 */
#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli.h"

/* qemu's BDRV_REQUEST_MAX_BYTES: the longest single request. */
#define REQUEST_MAX_BYTES 2147483136ull

struct io_state {
	qk_image *img;
	bool quit;
};

/* Commands qemu-io has that need a writable image or are not here yet. */
static const char *const later_cmds[] = {
	"write", "writev", "aio_write", "aio_read", "aio_flush", "readv",
	"discard", "aio_discard", "flush", "truncate", "zero", "alloc",
	"info", "open", "close", "reopen", "sleep", "abort", "break",
	"remove_break", "resume", "wait_break", "sigraise", "help", NULL,
};

static bool is_write_cmd(const char *name)
{
	static const char *const w[] = {
		"write", "writev", "aio_write", "discard", "aio_discard",
		"truncate", "zero", NULL,
	};
	for (int i = 0; w[i] != NULL; i++)
		if (strcmp(w[i], name) == 0)
			return true;
	return false;
}

/* qemu-io's cvtnum(): a size with suffixes, at most INT64_MAX. */
static int io_cvtnum(const char *s, int64_t *out)
{
	uint64_t v;
	int r = cli_parse_size(s, &v);

	if (r < 0)
		return r;
	*out = (int64_t)v;
	return 0;
}

static void print_cvtnum_err(int rc, const char *arg)
{
	if (rc == -EINVAL)
		printf("Parsing error: non-numeric argument, or "
		       "extraneous/unrecognized suffix -- %s\n", arg);
	else if (rc == -ERANGE)
		printf("Parsing error: argument too large -- %s\n", arg);
	else
		printf("Parsing error: %s\n", arg);
}

static void read_usage(void)
{
	printf("read [-abCqv] [-P pattern [-s off] [-l len]] off len -- "
	       "reads a number of bytes at a specified offset\n");
}

/* qemu-io's dump_buffer() for read -v. */
static void dump_buffer(const unsigned char *buf, uint64_t offset,
			uint64_t len)
{
	for (uint64_t i = 0; i < len; i += 16) {
		uint64_t n = len - i < 16 ? len - i : 16;

		printf("%08" PRIx64 ":  ", offset + i);
		for (uint64_t k = 0; k < n; k++)
			printf("%02x ", buf[i + k]);
		printf(" ");
		for (uint64_t k = 0; k < n; k++)
			putchar(isalnum(buf[i + k]) ? buf[i + k] : '.');
		printf("\n");
	}
}

/* qemu-io's print_report(). */
static void print_report(const char *op, double secs, int64_t offset,
			 int64_t count, int64_t total, int cnt, bool cflag)
{
	char s1[64], s2[64], ts[64];

	fmt_io_time(ts, sizeof(ts), secs, cflag);
	if (!cflag) {
		fmt_io_size(s1, sizeof(s1), (double)total);
		fmt_io_size(s2, sizeof(s2), (double)total / secs);
		printf("%s %" PRId64 "/%" PRId64 " bytes at offset %" PRId64
		       "\n", op, total, count, offset);
		printf("%s, %d ops; %s (%s/sec and %.4f ops/sec)\n", s1, cnt,
		       ts, s2, (double)cnt / secs);
	} else {
		printf("%" PRId64 ",%d,%s,%.3f,%.3f\n", total, cnt, ts,
		       (double)total / secs, (double)cnt / secs);
	}
}

/*
 * read [-Cqv] [-P pattern [-s off] [-l len]] off len, as qemu-io.
 * Returns 0, or -1 when the command failed (message already printed).
 */
static int io_read(struct io_state *st, int argc, char **argv)
{
	bool cflag = false, qflag = false, vflag = false, pflag = false;
	bool sflag = false, lflag = false;
	int64_t offset, count, pat_off = 0, pat_count = 0;
	int pattern = 0, c, r, ret = 0;
	unsigned char *buf = NULL;
	double t0, secs;

	optind = 0;
	while ((c = getopt(argc, argv, ":bCl:pP:qs:vE")) != -1) {
		switch (c) {
		case 'b':
			printf("read -b (VM state) is not supported yet\n");
			return -1;
		case 'C':
			cflag = true;
			break;
		case 'E':
		case 'p':
			/* registered buffers / pread: no meaning here */
			break;
		case 'l':
			lflag = true;
			if ((r = io_cvtnum(optarg, &pat_count)) < 0) {
				print_cvtnum_err(r, optarg);
				return -1;
			}
			break;
		case 'P': {
			char *end;
			long v = strtol(optarg, &end, 0);

			if (v < 0 || v > 255 || *end != '\0' ||
			    end == optarg) {
				printf("%s is not a valid pattern byte\n",
				       optarg);
				return -1;
			}
			pflag = true;
			pattern = (int)v;
			break;
		}
		case 'q':
			qflag = true;
			break;
		case 's':
			sflag = true;
			if ((r = io_cvtnum(optarg, &pat_off)) < 0) {
				print_cvtnum_err(r, optarg);
				return -1;
			}
			break;
		case 'v':
			vflag = true;
			break;
		default:
			if (c == ':')
				fprintf(stderr, "read: option requires an "
					"argument -- '%c'\n", optopt);
			else
				fprintf(stderr, "read: invalid option -- "
					"'%c'\n", optopt);
			read_usage();
			return -1;
		}
	}
	if (optind != argc - 2) {
		read_usage();
		return -1;
	}
	if ((r = io_cvtnum(argv[optind], &offset)) < 0) {
		print_cvtnum_err(r, argv[optind]);
		return -1;
	}
	if ((r = io_cvtnum(argv[optind + 1], &count)) < 0) {
		print_cvtnum_err(r, argv[optind + 1]);
		return -1;
	}
	if ((uint64_t)count > REQUEST_MAX_BYTES) {
		printf("length cannot exceed %llu, given %s\n",
		       REQUEST_MAX_BYTES, argv[optind + 1]);
		return -1;
	}
	if (!pflag && (lflag || sflag)) {
		read_usage();
		return -1;
	}
	if (!lflag)
		pat_count = count - pat_off;
	if (pat_count < 0 || pat_count + pat_off > count) {
		printf("pattern verification range exceeds end of read data\n");
		return -1;
	}

	if (posix_memalign((void **)&buf, 4096, count ? (size_t)count : 1)) {
		cli_error("out of memory");
		return -1;
	}
	memset(buf, 0xab, (size_t)count);
	t0 = cli_now();
	r = qk_pread(st->img, buf, (size_t)count, (uint64_t)offset);
	secs = cli_now() - t0;
	if (r < 0) {
		fflush(stdout);
		cli_lib_error(r);
		free(buf);
		return -1;
	}
	if (pflag) {
		for (int64_t i = 0; i < pat_count; i++) {
			if (buf[pat_off + i] != pattern) {
				printf("Pattern verification failed at offset "
				       "%" PRId64 ", %" PRId64 " bytes\n",
				       offset + pat_off, pat_count);
				/* qemu-io names only the range; say which
				 * byte, on stderr so stdout stays qemu's. */
				fflush(stdout);
				cli_error("read -P: first mismatch at offset "
					  "%" PRId64 ": 0x%02x, expected 0x%02x",
					  offset + pat_off + i,
					  buf[pat_off + i], pattern);
				ret = -1;
				break;
			}
		}
	}
	if (!qflag) {
		if (vflag)
			dump_buffer(buf, (uint64_t)offset, (uint64_t)count);
		print_report("read", secs, offset, count, count, 1, cflag);
	}
	free(buf);
	return ret;
}

/* map, as qemu-io: runs allocated (or not) in the top image itself. */
static int io_map(struct io_state *st, int argc, char **argv)
{
	uint64_t size = qk_get_size(st->img), off = 0;

	(void)argv;
	if (argc != 1) {
		printf("map  -- prints the allocated areas of a file\n");
		return -1;
	}
	while (off < size) {
		uint64_t num = 0;
		bool first_alloc = false;
		char s1[64], s2[64];

		/* Merge consecutive extents with the same allocation state
		 * in this layer (qemu-io map_is_allocated()). */
		while (off + num < size) {
			struct qk_extent e;
			int r = qk_block_status(st->img, off + num,
						size - off - num, &e);
			bool alloc;

			if (r < 0) {
				fflush(stdout);
				cli_lib_error(r);
				return -1;
			}
			if (e.length == 0) {
				cli_error("Unexpected end of image");
				return -1;
			}
			alloc = (e.flags & QK_EXTENT_PRESENT) && e.depth == 0;
			if (num == 0)
				first_alloc = alloc;
			else if (alloc != first_alloc)
				break;
			num += e.length;
		}
		fmt_io_size(s1, sizeof(s1), (double)num);
		fmt_io_size(s2, sizeof(s2), (double)off);
		printf("%s (0x%" PRIx64 ") bytes %s at offset %s (0x%" PRIx64
		       ")\n", s1, num, first_alloc ? "    allocated" :
		       "not allocated", s2, off);
		off += num;
	}
	return 0;
}

static int io_length(struct io_state *st, int argc, char **argv)
{
	char s[64];

	(void)argv;
	if (argc != 1) {
		printf("length  -- gets the length of the current file\n");
		return -1;
	}
	fmt_io_size(s, sizeof(s), (double)qk_get_size(st->img));
	printf("%s\n", s);
	return 0;
}

/* Split a command line on spaces, as qemu-io's breakline(). The returned
 * array points into `line`; free the array only. */
static char **breakline(char *line, int *count)
{
	char **v = cli_xcalloc(strlen(line) / 2 + 2, sizeof(*v));
	int n = 0;
	char *p = line, *tok;

	while ((tok = strsep(&p, " ")) != NULL)
		if (*tok != '\0')
			v[n++] = tok;
	v[n] = NULL;
	*count = n;
	return v;
}

/* Run one command line. Returns 0 or -1 (failed). */
static int run_command(struct io_state *st, const char *text)
{
	char *line = cli_xstrdup(text);
	int argc, ret = 0;
	char **argv = breakline(line, &argc);

	if (argc == 0)
		goto out;
	if (strcmp(argv[0], "read") == 0 || strcmp(argv[0], "r") == 0) {
		if (argc < 3) {
			fprintf(stderr, "bad argument count %d to %s, expected "
				"at least 2 arguments\n", argc - 1, argv[0]);
			ret = -1;
		} else {
			ret = io_read(st, argc, argv);
		}
	} else if (strcmp(argv[0], "map") == 0) {
		ret = io_map(st, argc, argv);
	} else if (strcmp(argv[0], "length") == 0 ||
		   strcmp(argv[0], "len") == 0) {
		ret = io_length(st, argc, argv);
	} else if (strcmp(argv[0], "quit") == 0 || strcmp(argv[0], "q") == 0) {
		st->quit = true;
	} else {
		bool known = false;

		for (int i = 0; later_cmds[i] != NULL; i++)
			if (strcmp(later_cmds[i], argv[0]) == 0)
				known = true;
		if (known)
			cli_error("io: %s is not supported yet", argv[0]);
		else
			fprintf(stderr, "command \"%s\" not found\n", argv[0]);
		ret = -1;
	}
out:
	fflush(stdout);
	free(argv);
	free(line);
	return ret;
}

int cmd_io(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "help", no_argument, NULL, 'h' },
		{ "cmd", required_argument, NULL, 'c' },
		{ "format", required_argument, NULL, 'f' },
		{ "read-only", no_argument, NULL, 'r' },
		{ "snapshot", no_argument, NULL, 's' },
		{ "nocache", no_argument, NULL, 'n' },
		{ "copy-on-read", no_argument, NULL, 'C' },
		{ "misalign", no_argument, NULL, 'm' },
		{ "native-aio", no_argument, NULL, 'k' },
		{ "aio", required_argument, NULL, 'i' },
		{ "cache", required_argument, NULL, 't' },
		{ "discard", required_argument, NULL, 'd' },
		{ "trace", required_argument, NULL, 'T' },
		{ "force-share", no_argument, NULL, 'U' },
		{ NULL, 0, NULL, 0 },
	};
	const char *fmtname = NULL;
	const char **cmds = cli_xcalloc((size_t)argc + 1, sizeof(*cmds));
	int ncmds = 0, c, failed = 0;
	bool readonly = false, direct = false, writes = false;
	uint32_t flags = 0;
	struct io_state st = { 0 };
	qk_format fmt;
	int ret = CLI_EXIT_FAILURE;

	while ((c = getopt_long(argc, argv, ":hc:f:rsnCmki:t:d:T:U", longopts,
				NULL)) != -1) {
		switch (c) {
		case 'c':
			cmds[ncmds++] = optarg;
			break;
		case 'f':
			fmtname = optarg;
			break;
		case 'r':
			readonly = true;
			break;
		case 'n':
			direct = true;
			break;
		case 't':
			if (cli_parse_cache(optarg, &direct) < 0) {
				cli_error("Invalid cache option: %s", optarg);
				goto out;
			}
			break;
		case 'U':
			flags |= QK_OPEN_FORCE_SHARE;
			break;
		case 'm':
		case 'k':
		case 'T':
			/* buffers are always aligned; AIO and tracing are
			 * QEMU internals */
			break;
		case 'i':
			if (strcmp(optarg, "threads") != 0 &&
			    strcmp(optarg, "native") != 0 &&
			    strcmp(optarg, "io_uring") != 0) {
				cli_error("Invalid aio option: %s", optarg);
				goto out;
			}
			break;
		case 'd':
			if (strcmp(optarg, "ignore") != 0 &&
			    strcmp(optarg, "off") != 0 &&
			    strcmp(optarg, "unmap") != 0 &&
			    strcmp(optarg, "on") != 0) {
				cli_error("Invalid discard option: %s", optarg);
				goto out;
			}
			break;
		case 's':
			cli_error("io: -s (snapshot mode) is not supported yet");
			goto out;
		case 'C':
			cli_error("io: -C (copy-on-read) is not supported yet");
			goto out;
		case 'h':
			cli_print_usage(stdout, cli_find_command("io"));
			ret = CLI_EXIT_OK;
			goto out;
		default:
			ret = cli_bad_option("io", c, argv, CLI_EXIT_FAILURE);
			goto out;
		}
	}
	if (optind != argc - 1) {
		ret = cli_usage_error("io", CLI_EXIT_FAILURE,
				      "Expecting one image file name");
		goto out;
	}
	if (cli_parse_format(fmtname, &fmt) < 0)
		goto out;
	for (int i = 0; i < ncmds; i++) {
		char first[32] = "";

		sscanf(cmds[i], " %31s", first);
		if (is_write_cmd(first))
			writes = true;
	}
	/* Writable only when a command needs it; reads never lock out
	 * other readers. */
	if (writes && !readonly)
		flags |= QK_OPEN_RDWR;
	if (direct)
		flags |= QK_OPEN_DIRECT;
	if (cli_open(argv[optind], fmt, flags, &st.img) < 0)
		goto out;

	if (ncmds > 0) {
		for (int i = 0; i < ncmds && !st.quit; i++)
			if (run_command(&st, cmds[i]) < 0)
				failed = 1;
	} else {
		/* No -c: commands from standard input, one per line. */
		char *line = NULL;
		size_t cap = 0;
		ssize_t n;
		bool tty = isatty(STDIN_FILENO);

		while (!st.quit) {
			if (tty) {
				printf("qcowkit io> ");
				fflush(stdout);
			}
			if ((n = getline(&line, &cap, stdin)) < 0)
				break;
			while (n > 0 && (line[n - 1] == '\n' ||
					 line[n - 1] == '\r'))
				line[--n] = '\0';
			if (run_command(&st, line) < 0)
				failed = 1;
		}
		free(line);
	}
	qk_close(st.img);
	ret = failed ? CLI_EXIT_FAILURE : CLI_EXIT_OK;
out:
	free(cmds);
	return ret;
}
