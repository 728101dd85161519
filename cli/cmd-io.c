/*
 * cmd-io.c - "qcowkit io": run qemu-io style commands on an image.
 *
 * Commands come from -c options (in order) or, without any, one per line
 * from standard input. Supported: read, write (-P, -z [-u] [-n], -s, -f),
 * writev, discard, flush, aio_flush, map, length, quit; write -c and -b
 * report "not supported yet". Output is byte-for-byte qemu-io 7.2's
 * (except the timing figures); a failed library call prints its one-line
 * message on stderr. Every command runs even after one fails; the exit
 * status is 1 if any failed (qemu-io does the same), including a read -P
 * pattern mismatch and a failing final flush.
 *
 * The image is opened read-write when a -c command writes (or, reading
 * commands from standard input, unless -r is given, as qemu-io always
 * does); with -r a writing command fails with qemu-io's "Block node is
 * read-only". discard really discards (qemu-io needs -d unmap for that).
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
	bool readonly;      /* opened without QK_OPEN_RDWR */
};

/* Commands qemu-io has that are not here yet. */
static const char *const later_cmds[] = {
	"aio_write", "aio_read", "readv", "truncate", "alloc", "info", "open",
	"close", "reopen", "sleep", "abort", "break", "remove_break", "resume",
	"wait_break", "sigraise", "help", NULL,
};

/* ---- arguments ------------------------------------------------------- */

/* Parse a size argument as qemu-io's cvtnum() (suffixes, at most
 * INT64_MAX), saying on stdout what is wrong with it; 0 or -1. */
static int num_arg(const char *arg, int64_t *out)
{
	uint64_t v;
	int r = cli_parse_size(arg, &v);

	if (r == 0) {
		*out = (int64_t)v;
		return 0;
	}
	if (r == -EINVAL)
		printf("Parsing error: non-numeric argument, or "
		       "extraneous/unrecognized suffix -- %s\n", arg);
	else if (r == -ERANGE)
		printf("Parsing error: argument too large -- %s\n", arg);
	else
		printf("Parsing error: %s\n", arg);
	return -1;
}

/*
 * The "off len" operands of read, write and discard: args[0] and args[1],
 * each a size (num_arg). The length may not pass REQUEST_MAX_BYTES
 * ("length cannot exceed N<note>, given LEN") unless `note` is NULL.
 * Returns 0, or -1 after qemu-io's message.
 */
static int off_len(char **args, int64_t *offset, int64_t *len,
		   const char *note)
{
	if (num_arg(args[0], offset) < 0 || num_arg(args[1], len) < 0)
		return -1;
	if (note != NULL && (uint64_t)*len > REQUEST_MAX_BYTES) {
		printf("length cannot exceed %llu%s, given %s\n",
		       REQUEST_MAX_BYTES, note, args[1]);
		return -1;
	}
	return 0;
}

/* qemu-io's parse_pattern(): a byte, decimal, 0x hex or 0 octal. */
static int parse_pattern(const char *arg)
{
	char *end;
	long v = strtol(arg, &end, 0);

	if (v < 0 || v > 255 || *end != '\0' || end == arg) {
		printf("%s is not a valid pattern byte\n", arg);
		return -1;
	}
	return (int)v;
}

/* getopt's own message for a bad option of command `cmd` (opterr is off,
 * so the text is ours: the same as glibc's). */
static void getopt_error(const char *cmd, int c)
{
	if (c == ':')
		fprintf(stderr, "%s: option requires an argument -- '%c'\n",
			cmd, optopt);
	else
		fprintf(stderr, "%s: invalid option -- '%c'\n", cmd, optopt);
}

/* The options io's commands share; each takes those its optstring
 * lists. */
struct io_flags {
	bool Cflag;               /* -C: the report as one line of numbers */
	bool qflag;               /* -q: no report */
	bool fua;                 /* -f: FUA, durable before it completes */
	bool Pflag;               /* -P BYTE */
	int pattern;
};

/*
 * getopt() for an io command (set optind = 0 before the first call),
 * taking the shared -C, -q, -f and -P into *f. Returns the next option for
 * the command, -1 after the last, or 0 when the command fails: an option
 * getopt refused (its message on stderr, `usage` on stdout) or a bad -P
 * byte (parse_pattern()'s message).
 */
static int io_getopt(int argc, char **argv, const char *optstring,
		     const char *usage, struct io_flags *f)
{
	int c;

	while ((c = getopt(argc, argv, optstring)) != -1) {
		switch (c) {
		case 'C':
			f->Cflag = true;
			break;
		case 'q':
			f->qflag = true;
			break;
		case 'f':
			f->fua = true;
			break;
		case 'P':
			if ((f->pattern = parse_pattern(optarg)) < 0)
				return 0;
			f->Pflag = true;
			break;
		case '?':
		case ':':
			getopt_error(argv[0], c);
			printf("%s\n", usage);
			return 0;
		default:
			return c;
		}
	}
	return -1;
}

/*
 * After an io command's option loop ended with `c` (io_getopt()): true
 * when no option was refused and `min` to `max` operands follow (max -1:
 * any number); false otherwise, after `usage` for a wrong count.
 */
static bool io_operands(int c, int argc, int min, int max, const char *usage)
{
	int n = argc - optind;

	if (c == 0)
		return false;
	if (n < min || (max >= 0 && n > max)) {
		printf("%s\n", usage);
		return false;
	}
	return true;
}

/* The usage lines qemu-io prints for a command's wrong arguments. */
static const char read_usage[] =
	"read [-abCqv] [-P pattern [-s off] [-l len]] off len -- "
	"reads a number of bytes at a specified offset";
static const char write_usage[] =
	"write [-bcCfnquz] [-P pattern | -s source_file] off len -- "
	"writes a number of bytes at a specified offset";
static const char writev_usage[] =
	"writev [-Cfq] [-P pattern] off len [len..] -- writes a number "
	"of bytes at a specified offset";
static const char discard_usage[] =
	"discard [-Cq] off len -- discards a number of bytes at a "
	"specified offset";

/* ---- buffers and reports ------------------------------------------------- */

/* A 4 KiB aligned buffer (so -n / -t none work) of `len` bytes, each
 * `fill`; NULL after "out of memory". */
static unsigned char *io_buffer(uint64_t len, int fill)
{
	unsigned char *buf = NULL;

	if (posix_memalign((void **)&buf, 4096, len ? (size_t)len : 1)) {
		cli_error("out of memory");
		return NULL;
	}
	memset(buf, fill, (size_t)len);
	return buf;
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

/* A library call failed: its one-line message on stderr, after what
 * stdout already holds. Returns -1. */
static int lib_failed(int r)
{
	fflush(stdout);
	cli_lib_error(r);
	return -1;
}

/*
 * The end of a timed request of `count` bytes at `offset` that returned
 * `r`: the library's message if it failed, else qemu-io's report of
 * operation `op` as -q and -C in `f` say. Returns 0 or -1.
 */
static int report_done(int r, const char *op, double secs, int64_t offset,
		       int64_t count, const struct io_flags *f)
{
	if (r < 0)
		return lib_failed(r);
	if (!f->qflag)
		print_report(op, secs, offset, count, count, 1, f->Cflag);
	return 0;
}

/* ---- read ------------------------------------------------------------------- */

/* read's options. */
struct read_opts {
	struct io_flags f;             /* -C, -q, -P */
	bool vflag, sflag, lflag;      /* -v, -s, -l */
	int64_t pat_off, pat_count;    /* -s, -l */
};

/* Parse read's options into *o and check the operand count. Returns 0, or
 * -1 after qemu-io's message. */
static int read_options(int argc, char **argv, struct read_opts *o)
{
	int c;

	optind = 0;
	while ((c = io_getopt(argc, argv, ":bCl:pP:qs:vE", read_usage,
			      &o->f)) > 0) {
		switch (c) {
		case 'b':
			printf("read -b (VM state) is not supported yet\n");
			return -1;
		case 'E':
		case 'p':
			/* registered buffers / pread: no meaning here */
			break;
		case 'l':
			o->lflag = true;
			if (num_arg(optarg, &o->pat_count) < 0)
				return -1;
			break;
		case 's':
			o->sflag = true;
			if (num_arg(optarg, &o->pat_off) < 0)
				return -1;
			break;
		case 'v':
			o->vflag = true;
			break;
		}
	}
	if (!io_operands(c, argc, 2, 2, read_usage))
		return -1;
	return 0;
}

/* read -P: the bytes read at `offset` hold the pattern over the checked
 * range. Returns 0, or -1 after naming the range (stdout, as qemu-io) and
 * the first wrong byte (stderr). */
static int verify_pattern(const unsigned char *buf, int64_t offset,
			  const struct read_opts *o)
{
	for (int64_t i = 0; i < o->pat_count; i++) {
		if (buf[o->pat_off + i] != o->f.pattern) {
			printf("Pattern verification failed at offset "
			       "%" PRId64 ", %" PRId64 " bytes\n",
			       offset + o->pat_off, o->pat_count);
			/* qemu-io names only the range; say which byte, on
			 * stderr so stdout stays qemu's. */
			fflush(stdout);
			cli_error("read -P: first mismatch at offset "
				  "%" PRId64 ": 0x%02x, expected 0x%02x",
				  offset + o->pat_off + i,
				  buf[o->pat_off + i], o->f.pattern);
			return -1;
		}
	}
	return 0;
}

/*
 * read [-Cqv] [-P pattern [-s off] [-l len]] off len, as qemu-io.
 * Returns 0, or -1 when the command failed (message already printed).
 */
static int io_read(struct io_state *st, int argc, char **argv)
{
	struct read_opts o = { .f = { .pattern = 0 } };
	int64_t offset, count;
	int r, ret = 0;
	unsigned char *buf;
	double t0, secs;

	if (read_options(argc, argv, &o) < 0 ||
	    off_len(argv + optind, &offset, &count, "") < 0)
		return -1;
	if (!o.f.Pflag && (o.lflag || o.sflag)) {
		printf("%s\n", read_usage);
		return -1;
	}
	if (!o.lflag)
		o.pat_count = count - o.pat_off;
	if (o.pat_count < 0 || o.pat_count + o.pat_off > count) {
		printf("pattern verification range exceeds end of read data\n");
		return -1;
	}

	if ((buf = io_buffer((uint64_t)count, 0xab)) == NULL)
		return -1;
	t0 = cli_now();
	r = qk_pread(st->img, buf, (size_t)count, (uint64_t)offset);
	secs = cli_now() - t0;
	if (r < 0) {
		free(buf);
		return lib_failed(r);
	}
	if (o.f.Pflag)
		ret = verify_pattern(buf, offset, &o);
	if (!o.f.qflag) {
		if (o.vflag)
			dump_buffer(buf, (uint64_t)offset, (uint64_t)count);
		print_report("read", secs, offset, count, count, 1, o.f.Cflag);
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

/* ---- write, writev, discard ------------------------------------------------- */

/* Complete a write with -f (FUA): the data must be durable now. */
static int fua_flush(struct io_state *st, bool fua)
{
	int r;

	if (!fua)
		return 0;
	r = qk_flush(st->img);
	return r < 0 ? r : 0;
}

/*
 * qemu-io's qemu_io_alloc_from_file(): `len` bytes of `name`, repeated
 * when the file is shorter. NULL (message printed) on failure.
 */
static unsigned char *alloc_from_file(const char *name, size_t len)
{
	unsigned char *buf = NULL;
	size_t have;
	FILE *f = fopen(name, "r");

	if (f == NULL) {
		cli_error("%s: %s", name, strerror(errno));
		return NULL;
	}
	if (posix_memalign((void **)&buf, 4096, len ? len : 1)) {
		fclose(f);
		cli_error("out of memory");
		return NULL;
	}
	have = fread(buf, 1, len, f);
	if (ferror(f)) {
		cli_error("%s: %s", name, strerror(errno ? errno : EIO));
		goto fail;
	}
	if (have == 0 && len != 0) {
		cli_error("%s: file is empty", name);
		goto fail;
	}
	fclose(f);
	for (size_t at = have; at < len; at += have)
		memcpy(buf + at, buf, len - at < have ? len - at : have);
	return buf;
fail:
	fclose(f);
	free(buf);
	return NULL;
}

/* Compressed writes go one cluster at a time; the range must start on a
 * cluster and end on one or at the end of the image. */
static int write_compressed(qk_image *img, const unsigned char *buf,
			    uint64_t count, uint64_t offset)
{
	struct qk_info info = { .struct_size = sizeof info };
	uint64_t cs, done;
	int r = qk_get_info(img, &info);

	if (r < 0)
		return r;
	cs = info.cluster_size;
	/* A bad range fails before anything is written (the library names
	 * the problem). */
	if (cs == 0 || offset % cs != 0 ||
	    (count % cs != 0 && offset + count != qk_get_size(img)))
		return qk_write_compressed(img, buf, (size_t)count, offset);
	for (done = 0; done < count; done += cs) {
		uint64_t n = count - done < cs ? count - done : cs;

		r = qk_write_compressed(img, buf + done, (size_t)n,
					offset + done);
		if (r < 0)
			return r;
	}
	return 0;
}

/* write's options. */
struct write_opts {
	struct io_flags f;                 /* -C, -q, -f, -P */
	bool bflag, cflag, zflag, sflag;   /* -b, -c, -z, -s */
	bool no_fallback, unmap;           /* -n, -u */
	const char *source;                /* -s */
};

/* Parse write's options into *o and check the operand count and the
 * option combinations, in qemu-io's order. Returns 0, or -1 after
 * qemu-io's message. */
static int write_options(int argc, char **argv, struct write_opts *o)
{
	int c;

	optind = 0;
	while ((c = io_getopt(argc, argv, ":bcCfnpP:qs:uz", write_usage,
			      &o->f)) > 0) {
		switch (c) {
		case 'b':
			o->bflag = true;
			break;
		case 'c':
			o->cflag = true;
			break;
		case 'n':
			o->no_fallback = true;
			break;
		case 'p':
			break;  /* ignored, as by qemu-io */
		case 's':
			o->sflag = true;
			o->source = optarg;
			break;
		case 'u':
			o->unmap = true;
			break;
		case 'z':
			o->zflag = true;
			break;
		}
	}
	if (!io_operands(c, argc, 2, 2, write_usage))
		return -1;
	if (o->bflag && o->zflag) {
		printf("-b and -z cannot be specified at the same time\n");
		return -1;
	}
	if (o->f.fua && (o->bflag || o->cflag)) {
		printf("-f and -b or -c cannot be specified at the same time\n");
		return -1;
	}
	if (o->no_fallback && !o->zflag) {
		printf("-n requires -z to be specified\n");
		return -1;
	}
	if (o->unmap && !o->zflag) {
		printf("-u requires -z to be specified\n");
		return -1;
	}
	if ((int)o->zflag + (int)o->f.Pflag + (int)o->sflag > 1) {
		printf("Only one of -z, -P, and -s can be specified at the "
		       "same time\n");
		return -1;
	}
	return 0;
}

/*
 * write [-bcCfnquz] [-P pattern | -s source_file] off len, as qemu-io:
 * -z makes the range read as zeros (qk_write_zeroes; -u may unmap, -n
 * refuses to write zero bytes), -f is FUA (flushed before it completes),
 * -c compresses cluster by cluster (offset and length cluster aligned, or
 * reaching the end of the image), -b (VM state) is not supported yet.
 */
static int io_write(struct io_state *st, int argc, char **argv)
{
	struct write_opts o = { .f = { .pattern = 0xcd } };
	int64_t offset, count;
	unsigned char *buf = NULL;
	double t0, secs;
	int r;

	if (write_options(argc, argv, &o) < 0 ||
	    off_len(argv + optind, &offset, &count,
		    o.no_fallback ? NULL : " without -n") < 0)
		return -1;
	if (o.bflag || o.cflag) {
		if (offset % 512) {
			printf("%" PRId64 " is not a sector-aligned value for "
			       "'offset'\n", offset);
			return -1;
		}
		if (count % 512) {
			printf("%" PRId64 " is not a sector-aligned value for "
			       "'count'\n", count);
			return -1;
		}
	}
	if (o.bflag) {
		cli_error("io: write -b (VM state) is not supported yet");
		return -1;
	}

	if (o.sflag)
		buf = alloc_from_file(o.source, (size_t)count);
	else if (!o.zflag)
		buf = io_buffer((uint64_t)count, o.f.pattern);
	if (buf == NULL && !o.zflag)
		return -1;
	t0 = cli_now();
	if (o.zflag)
		r = qk_write_zeroes(st->img, (uint64_t)offset, (uint64_t)count,
				    (o.unmap ? QK_ZERO_MAY_UNMAP : 0) |
				    (o.no_fallback ? QK_ZERO_NO_FALLBACK : 0));
	else if (o.cflag)
		r = write_compressed(st->img, buf, (uint64_t)count,
				     (uint64_t)offset);
	else
		r = qk_pwrite(st->img, buf, (size_t)count, (uint64_t)offset);
	if (r == 0)
		r = fua_flush(st, o.f.fua);
	secs = cli_now() - t0;
	free(buf);
	return report_done(r, "wrote", secs, offset, count, &o.f);
}

/*
 * writev's lengths, args[0..nr): each a size of at most REQUEST_MAX_BYTES,
 * all of them together too. Returns the vector (lengths set, bases not;
 * free it) and their sum in *total, or NULL after qemu-io's message.
 */
static struct iovec *writev_lengths(char **args, int nr, uint64_t *total)
{
	struct iovec *iov = cli_xcalloc((size_t)nr, sizeof(*iov));

	*total = 0;
	for (int i = 0; i < nr; i++) {
		int64_t len;

		if (num_arg(args[i], &len) < 0)
			goto fail;
		if ((uint64_t)len > REQUEST_MAX_BYTES) {
			printf("Argument '%s' exceeds maximum size %llu\n",
			       args[i], REQUEST_MAX_BYTES);
			goto fail;
		}
		if (*total > REQUEST_MAX_BYTES - (uint64_t)len) {
			printf("The total number of bytes exceed the maximum "
			       "size %llu\n", REQUEST_MAX_BYTES);
			goto fail;
		}
		iov[i].iov_len = (size_t)len;
		*total += (uint64_t)len;
	}
	return iov;
fail:
	free(iov);
	return NULL;
}

/* writev [-Cfq] [-P pattern] off len [len..], as qemu-io: one write
 * gathered from buffers of the given lengths, all filled with the
 * pattern. */
static int io_writev(struct io_state *st, int argc, char **argv)
{
	struct io_flags f = { .pattern = 0xcd };
	int c, r, nr;
	int64_t offset;
	uint64_t total;
	struct iovec *iov;
	unsigned char *buf;
	double t0, secs;

	optind = 0;
	while ((c = io_getopt(argc, argv, ":CfqP:", writev_usage, &f)) > 0)
		;	/* only the shared options */
	if (!io_operands(c, argc, 2, -1, writev_usage))
		return -1;
	if (num_arg(argv[optind], &offset) < 0)
		return -1;
	optind++;
	nr = argc - optind;
	if ((iov = writev_lengths(argv + optind, nr, &total)) == NULL)
		return -1;
	/* One buffer, cut into the requested pieces. */
	if ((buf = io_buffer(total, f.pattern)) == NULL) {
		free(iov);
		return -1;
	}
	for (size_t i = 0, at = 0; i < (size_t)nr; i++) {
		iov[i].iov_base = buf + at;
		at += iov[i].iov_len;
	}
	t0 = cli_now();
	r = qk_pwritev(st->img, iov, nr, (uint64_t)offset);
	if (r == 0)
		r = fua_flush(st, f.fua);
	secs = cli_now() - t0;
	free(buf);
	free(iov);
	return report_done(r, "wrote", secs, offset, (int64_t)total, &f);
}

/* discard [-Cq] off len, as qemu-io with -d unmap: whole clusters in the
 * range are deallocated (qk_discard). */
static int io_discard(struct io_state *st, int argc, char **argv)
{
	struct io_flags f = { .pattern = 0 };
	int64_t offset, bytes;
	int c, r;
	double t0, secs;

	optind = 0;
	while ((c = io_getopt(argc, argv, ":Cq", discard_usage, &f)) > 0)
		;	/* only the shared options */
	if (!io_operands(c, argc, 2, 2, discard_usage))
		return -1;
	if (off_len(argv + optind, &offset, &bytes, "") < 0)
		return -1;
	t0 = cli_now();
	r = qk_discard(st->img, (uint64_t)offset, (uint64_t)bytes);
	secs = cli_now() - t0;
	return report_done(r, "discard", secs, offset, bytes, &f);
}

/* ---- the command table ------------------------------------------------------ */

/* flush and aio_flush: every completed write made durable. */
static int io_flush(struct io_state *st, int argc, char **argv)
{
	int r;

	(void)argc;
	(void)argv;
	r = qk_flush(st->img);
	return r < 0 ? lib_failed(r) : 0;
}

static int io_quit(struct io_state *st, int argc, char **argv)
{
	(void)argc;
	(void)argv;
	st->quit = true;
	return 0;
}

/* The commands, as qemu-io's command table: argument counts (argmax -1:
 * no limit) are checked first, then whether the image must be writable. */
struct io_cmd {
	const char *name;
	const char *altname;
	int argmin, argmax;
	bool writes;
	int (*fn)(struct io_state *st, int argc, char **argv);
};

static const struct io_cmd io_cmds[] = {
	{ "read", "r", 2, -1, false, io_read },
	{ "write", "w", 2, -1, true, io_write },
	{ "writev", NULL, 2, -1, true, io_writev },
	{ "discard", "d", 2, -1, true, io_discard },
	{ "flush", "f", 0, 0, false, io_flush },
	{ "aio_flush", NULL, 0, 0, false, io_flush },
	{ "map", NULL, 0, 0, false, io_map },
	{ "length", "len", 0, 0, false, io_length },
	{ "quit", "q", 0, -1, false, io_quit },
	{ NULL, NULL, 0, 0, false, NULL },
};

static const struct io_cmd *find_cmd(const char *name)
{
	for (const struct io_cmd *c = io_cmds; c->name != NULL; c++)
		if (strcmp(c->name, name) == 0 ||
		    (c->altname && strcmp(c->altname, name) == 0))
			return c;
	return NULL;
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
	const struct io_cmd *ct;

	if (argc == 0)
		goto out;
	ct = find_cmd(argv[0]);
	if (ct == NULL) {
		bool known = false;

		for (int i = 0; later_cmds[i] != NULL; i++)
			if (strcmp(later_cmds[i], argv[0]) == 0)
				known = true;
		if (known)
			cli_error("io: %s is not supported yet", argv[0]);
		else
			fprintf(stderr, "command \"%s\" not found\n", argv[0]);
		ret = -1;
		goto out;
	}
	if (argc - 1 < ct->argmin ||
	    (ct->argmax != -1 && argc - 1 > ct->argmax)) {
		if (ct->argmax == -1)
			fprintf(stderr, "bad argument count %d to %s, expected "
				"at least %d arguments\n", argc - 1, argv[0],
				ct->argmin);
		else if (ct->argmin == ct->argmax)
			fprintf(stderr, "bad argument count %d to %s, expected "
				"%d arguments\n", argc - 1, argv[0],
				ct->argmin);
		else
			fprintf(stderr, "bad argument count %d to %s, expected "
				"between %d and %d arguments\n", argc - 1,
				argv[0], ct->argmin, ct->argmax);
		ret = -1;
		goto out;
	}
	if (ct->writes && st->readonly) {
		/* qemu-io's words when it cannot get write permission */
		cli_error("Block node is read-only");
		ret = -1;
		goto out;
	}
	ret = ct->fn(st, argc, argv);
out:
	fflush(stdout);
	free(argv);
	free(line);
	return ret;
}

/* io's command line. */
struct io_args {
	struct cli_opts o;
	const char **cmds;        /* -c, in order */
	int ncmds;
	bool readonly;            /* -r */
	bool direct;              /* -n, -t none */
	const char *file;
};

/* Parse io's command line into *a. Returns CLI_GO, or the exit status
 * after --help or a message. */
static int parse_args(int argc, char **argv, struct io_args *a)
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
	int c;

	while ((c = cli_getopt(&a->o, argc, argv, ":hc:f:rsnCmki:t:d:T:U",
			       longopts)) > 0) {
		switch (c) {
		case 'c':
			a->cmds[a->ncmds++] = optarg;
			break;
		case 'r':
			a->readonly = true;
			break;
		case 'n':
			a->direct = true;
			break;
		case 't':
			if (cli_parse_cache(optarg, &a->direct) < 0) {
				cli_error("Invalid cache option: %s", optarg);
				return CLI_EXIT_FAILURE;
			}
			break;
		case 'm':
		case 'k':
		case 'T':
			/* buffers are always aligned; AIO and tracing are
			 * QEMU internals */
			break;
		case 'd':
			if (strcmp(optarg, "ignore") != 0 &&
			    strcmp(optarg, "off") != 0 &&
			    strcmp(optarg, "unmap") != 0 &&
			    strcmp(optarg, "on") != 0) {
				cli_error("Invalid discard option: %s", optarg);
				return CLI_EXIT_FAILURE;
			}
			break;
		case 's':
			cli_error("io: -s (snapshot mode) is not supported yet");
			return CLI_EXIT_FAILURE;
		case 'C':
			cli_error("io: -C (copy-on-read) is not supported yet");
			return CLI_EXIT_FAILURE;
		}
	}
	a->file = cli_one_image(&a->o, c, argc, argv);
	return a->file != NULL ? CLI_GO : a->o.status;
}

/* Whether one of the -c commands writes. */
static bool any_writes(const struct io_args *a)
{
	for (int i = 0; i < a->ncmds; i++) {
		char first[32] = "";
		const struct io_cmd *ct;

		if (sscanf(a->cmds[i], " %31s", first) == 1 &&
		    (ct = find_cmd(first)) != NULL && ct->writes)
			return true;
	}
	return false;
}

/* No -c: run the commands of standard input, one per line (with a prompt
 * on a terminal), until its end or quit. Returns true if any failed. */
static bool run_stdin(struct io_state *st)
{
	char *line = NULL;
	size_t cap = 0;
	ssize_t n;
	bool tty = isatty(STDIN_FILENO), failed = false;

	while (!st->quit) {
		if (tty) {
			printf("qcowkit io> ");
			fflush(stdout);
		}
		if ((n = getline(&line, &cap, stdin)) < 0)
			break;
		while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r'))
			line[--n] = '\0';
		if (run_command(st, line) < 0)
			failed = true;
	}
	free(line);
	return failed;
}

/* Open the image as the commands need and run them all. Returns the exit
 * status: 1 if any command failed. */
static int run_io(const struct io_args *a, qk_format fmt)
{
	struct io_state st = { 0 };
	uint32_t flags = a->o.open_flags;
	bool failed = false;
	int r;

	/* With -c, writable only when a command needs it, so reads never
	 * lock out other readers; commands from standard input are not
	 * known in advance, so the image is writable unless -r (as qemu-io
	 * opens it). */
	if ((a->ncmds == 0 || any_writes(a)) && !a->readonly)
		flags |= QK_OPEN_RDWR;
	if (a->direct)
		flags |= QK_OPEN_DIRECT;
	if (cli_open(a->file, fmt, flags, &st.img) < 0)
		return CLI_EXIT_FAILURE;
	st.readonly = !(flags & QK_OPEN_RDWR);

	if (a->ncmds == 0)
		failed = run_stdin(&st);
	for (int i = 0; i < a->ncmds && !st.quit; i++)
		if (run_command(&st, a->cmds[i]) < 0)
			failed = true;
	/* Closing a writable image flushes it: a failure there fails the
	 * command too. */
	r = qk_close(st.img);
	if (r < 0) {
		fflush(stdout);
		cli_lib_error(r);
		failed = true;
	}
	return failed ? CLI_EXIT_FAILURE : CLI_EXIT_OK;
}

int cmd_io(int argc, char **argv)
{
	struct io_args a = {
		.o = { .cmd = "io", .usage_code = CLI_EXIT_FAILURE },
		.cmds = cli_xcalloc((size_t)argc + 1, sizeof(*a.cmds)),
	};
	qk_format fmt;
	int ret = parse_args(argc, argv, &a);

	if (ret == CLI_GO)
		ret = cli_parse_format(a.o.fmtname, &fmt) < 0 ?
		      CLI_EXIT_FAILURE : run_io(&a, fmt);
	free(a.cmds);
	return ret;
}
