/*
 * cmd-compare.c - "qcowkit compare": compare the guest-visible content of
 * two images as qemu-img 7.2 compare does.
 *
 * Exit codes: 0 identical, 1 different, 2 could not open (and usage
 * errors, so that a typo is never mistaken for "different"), 3 block status
 * failed, 4 read failed. Ranges that read as zero in both images are
 * skipped using block status; a range allocated in only one image must read
 * as zero there. Mismatch offsets are reported as qemu-img does: the start
 * of the first differing 512-byte sector of the compared chunk.
 *
 * SPDX-License-Identifier: MIT
 */
#include <getopt.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"

#define IO_BUF_SIZE (2u << 20)    /* qemu-img's compare buffer */
#define SECTOR 512u

struct side {
	const char *name;
	qk_image *img;
	uint64_t size;
};

struct compare {
	struct side s[2];
	char *buf[2];
	bool quiet;
	struct cli_progress prog;
};

/* Flags compared by -s: what qemu's block status reports. */
#define STATUS_MASK (QK_EXTENT_PRESENT | QK_EXTENT_ZERO | QK_EXTENT_DATA | \
		     QK_EXTENT_OFFSET)

static void say(const struct compare *c, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

/* qemu-img's qprintf(): results go to stdout unless -q. */
static void say(const struct compare *c, const char *fmt, ...)
{
	va_list ap;

	if (c->quiet)
		return;
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
}

/* Index of the first 512-byte sector of buf (len bytes) that is not all
 * zero, as a byte offset; -1 if all zero. */
static int64_t find_nonzero(const char *buf, uint64_t len)
{
	for (uint64_t i = 0; i < len; i += SECTOR) {
		uint64_t n = len - i < SECTOR ? len - i : SECTOR;

		for (uint64_t k = 0; k < n; k++)
			if (buf[i + k] != 0)
				return (int64_t)i;
	}
	return -1;
}

/* Byte offset of the first differing 512-byte sector; -1 if equal. */
static int64_t find_difference(const char *a, const char *b, uint64_t len)
{
	if (memcmp(a, b, len) == 0)
		return -1;
	for (uint64_t i = 0; i < len; i += SECTOR) {
		uint64_t n = len - i < SECTOR ? len - i : SECTOR;

		if (memcmp(a + i, b + i, n) != 0)
			return (int64_t)i;
	}
	return -1;
}

/* Read `len` bytes at `off` of side `k` into c->buf[k]. Returns 0 or the
 * exit code 4 after printing the error. */
static int read_side(struct compare *c, int k, uint64_t off, uint64_t len)
{
	int r = qk_pread(c->s[k].img, c->buf[k], (size_t)len, off);

	if (r < 0) {
		cli_lib_error(r);
		return CLI_EXIT_CMP_READ_ERROR;
	}
	return 0;
}

/* The range of side `k` must read as zero (qemu-img check_empty_sectors).
 * Returns 0, 1 (mismatch printed) or 4. */
static int check_empty(struct compare *c, int k, uint64_t off, uint64_t len)
{
	int64_t idx;
	int r = read_side(c, k, off, len);

	if (r != 0)
		return r;
	idx = find_nonzero(c->buf[k], len);
	if (idx >= 0) {
		say(c, "Content mismatch at offset %llu!\n",
		    (unsigned long long)(off + (uint64_t)idx));
		return CLI_EXIT_CMP_DIFFERENT;
	}
	return 0;
}

static int status(struct compare *c, int k, uint64_t off, uint64_t end,
		  struct qk_extent *ext)
{
	int r = qk_block_status(c->s[k].img, off, end - off, ext);

	if (r == 0 && ext->length == 0) {
		/* A zero-length answer would loop forever. */
		cli_error("qk_block_status: empty extent at offset %llu of %s",
			  (unsigned long long)off, c->s[k].name);
		return CLI_EXIT_CMP_STATUS_ERROR;
	}
	if (r < 0) {
		cli_lib_error(r);
		return CLI_EXIT_CMP_STATUS_ERROR;
	}
	return 0;
}

static int run_compare(struct compare *c, bool strict)
{
	uint64_t size1 = c->s[0].size, size2 = c->s[1].size;
	uint64_t total = size1 < size2 ? size1 : size2;
	uint64_t base = size1 > size2 ? size1 : size2;
	uint64_t off = 0;
	int r;

	if (strict && size1 != size2) {
		say(c, "Strict mode: Image size mismatch!\n");
		return CLI_EXIT_CMP_DIFFERENT;
	}
	while (off < total) {
		struct qk_extent e1, e2;
		uint64_t chunk;
		bool alloc1, alloc2;

		if ((r = status(c, 0, off, size1, &e1)) != 0 ||
		    (r = status(c, 1, off, size2, &e2)) != 0)
			return r;
		alloc1 = (e1.flags & QK_EXTENT_PRESENT) != 0;
		alloc2 = (e2.flags & QK_EXTENT_PRESENT) != 0;
		chunk = e1.length < e2.length ? e1.length : e2.length;
		if (strict && (e1.flags & STATUS_MASK) !=
			      (e2.flags & STATUS_MASK)) {
			say(c, "Strict mode: Offset %llu block status "
			    "mismatch!\n", (unsigned long long)off);
			return CLI_EXIT_CMP_DIFFERENT;
		}
		if ((e1.flags & QK_EXTENT_ZERO) && (e2.flags & QK_EXTENT_ZERO)) {
			/* both read as zero */
		} else if (alloc1 == alloc2) {
			if (alloc1) {
				int64_t d;

				if (chunk > IO_BUF_SIZE)
					chunk = IO_BUF_SIZE;
				if ((r = read_side(c, 0, off, chunk)) != 0 ||
				    (r = read_side(c, 1, off, chunk)) != 0)
					return r;
				d = find_difference(c->buf[0], c->buf[1], chunk);
				if (d >= 0) {
					say(c, "Content mismatch at offset "
					    "%llu!\n", (unsigned long long)
					    (off + (uint64_t)d));
					return CLI_EXIT_CMP_DIFFERENT;
				}
			}
		} else {
			if (chunk > IO_BUF_SIZE)
				chunk = IO_BUF_SIZE;
			r = check_empty(c, alloc1 ? 0 : 1, off, chunk);
			if (r != 0)
				return r;
		}
		off += chunk;
		progress_print(&c->prog, (float)chunk / (float)base * 100, 100);
	}

	if (size1 != size2) {
		int k = size1 > size2 ? 0 : 1;

		say(c, "Warning: Image size mismatch!\n");
		while (off < base) {
			struct qk_extent e;
			uint64_t chunk;

			if ((r = status(c, k, off, base, &e)) != 0)
				return r;
			chunk = e.length;
			if ((e.flags & QK_EXTENT_PRESENT) &&
			    !(e.flags & QK_EXTENT_ZERO)) {
				if (chunk > IO_BUF_SIZE)
					chunk = IO_BUF_SIZE;
				r = check_empty(c, k, off, chunk);
				if (r != 0)
					return r;
			}
			off += chunk;
			progress_print(&c->prog,
				       (float)chunk / (float)base * 100, 100);
		}
	}
	say(c, "Images are identical.\n");
	return CLI_EXIT_OK;
}

int cmd_compare(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "help", no_argument, NULL, 'h' },
		{ "force-share", no_argument, NULL, 'U' },
		{ NULL, 0, NULL, 0 },
	};
	struct cli_opts o = { .cmd = "compare",
			      .usage_code = CLI_EXIT_CMP_ERROR };
	const char *fmtname2 = NULL;
	bool strict = false, progress = false, direct = false;
	struct compare c;
	qk_format fmt[2];
	int opt, ret = CLI_EXIT_CMP_ERROR;

	memset(&c, 0, sizeof(c));
	while ((opt = cli_getopt(&o, argc, argv, ":hf:F:T:pqsU", longopts)) > 0) {
		switch (opt) {
		case 'F':
			fmtname2 = optarg;
			break;
		case 'T':
			if (cli_parse_cache(optarg, &direct) < 0) {
				cli_error("Invalid source cache option: %s",
					  optarg);
				return CLI_EXIT_CMP_ERROR;
			}
			break;
		case 'p':
			progress = true;
			break;
		case 'q':
			c.quiet = true;
			break;
		case 's':
			strict = true;
			break;
		}
	}
	if (opt < 0)
		return o.status;
	if (c.quiet)
		progress = false;
	if (optind != argc - 2)
		return cli_usage_error("compare", CLI_EXIT_CMP_ERROR,
				       "Expecting two image file names");
	if (cli_parse_format(o.fmtname, &fmt[0]) < 0 ||
	    cli_parse_format(fmtname2, &fmt[1]) < 0)
		return CLI_EXIT_CMP_ERROR;
	if (direct)
		o.open_flags |= QK_OPEN_DIRECT;

	progress_init(&c.prog, progress, 2.0f);
	for (int k = 0; k < 2; k++) {
		c.s[k].name = argv[optind + k];
		if (cli_open(c.s[k].name, fmt[k], o.open_flags, &c.s[k].img) < 0)
			goto out;
		c.s[k].size = qk_get_size(c.s[k].img);
		if (posix_memalign((void **)&c.buf[k], 4096, IO_BUF_SIZE)) {
			cli_error("out of memory");
			goto out;
		}
	}
	progress_print(&c.prog, 0, 100);
	ret = run_compare(&c, strict);
out:
	progress_end(&c.prog);
	for (int k = 0; k < 2; k++) {
		qk_close(c.s[k].img);
		free(c.buf[k]);
	}
	return ret;
}
