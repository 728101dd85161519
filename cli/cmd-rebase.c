/*
 * rebase: change the backing file of an image, as qemu-img rebase (7.2).
 *   qcowkit rebase [-f FMT] [-u] -b BACKING [-F FMT] [-p] [-q] [-c]
 *                  [-t CACHE] [-T CACHE] [-U] FILE     (-b "": none)
 *
 * Safe mode (no -u): wherever the image allocates nothing, the guest view
 * through the old backing chain is compared, 512-byte sector by sector as
 * qemu-img does, with the view through the new backing file (zeros past
 * its end, or everywhere with -b ""), and the sectors that differ are
 * written into the image (copy-on-write fills their clusters from the old
 * chain, still the image's backing then). Only then is the header changed
 * (qk_set_backing(): one durable write). With -c, a cluster holding a
 * difference is written whole and compressed (qemu-img 8.2's -c).
 *
 * Power cuts: until the header changes, every write puts into the image
 * the data it already read through the old chain, so a cut leaves the
 * guest view unchanged; after it, the new chain with those data gives the
 * same view.
 */
#include "cli.h"

#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define REBASE_CHUNK (2u << 20) /* qemu-img's IO_BUF_SIZE */
#define SECTOR 512u

struct rebase_args {
	const char *file, *backing, *bfmt;
	qk_format fmt;
	bool unsafe, quiet, progress, compress, direct;
	uint32_t cluster;     /* of the image, for -c */
};

/* The library's message without its "qk_xxx: " prefix. */
static const char *lib_msg(void)
{
	const char *m = qk_last_error(), *c = strstr(m, ": ");
	return c && strncmp(m, "qk_", 3) == 0 ? c + 2 : m;
}

/* Write [off, off+len) of old (the old view at `base`) into img: as is,
 * or with -c the whole clusters around it compressed. */
static int put_old(qk_image *img, const struct rebase_args *a, const uint8_t *old, uint64_t base,
		   uint64_t off, uint64_t len, uint8_t *cbuf)
{
	if (!a->compress || !a->cluster)
		return qk_pwrite(img, old + (off - base), len, off);
	uint64_t cs = a->cluster, size = qk_get_size(img);
	for (uint64_t c = off - off % cs; c < off + len; c += cs) {
		size_t n = (size_t)(cs < size - c ? cs : size - c);
		int ret = qk_pread(img, cbuf, n, c);
		if (ret == 0)
			ret = qk_write_compressed(img, cbuf, n, c);
		if (ret < 0)
			return ret;
	}
	return 0;
}

/* Compare old and new over [off, off+n) by sectors, writing into img the
 * runs that differ. */
static int write_diffs(qk_image *img, const struct rebase_args *a, const uint8_t *old,
		       const uint8_t *nu, uint64_t off, uint64_t n, uint8_t *cbuf)
{
	uint64_t i = 0, done_to = 0;
	while (i < n) {
		uint64_t s = SECTOR < n - i ? SECTOR : n - i;
		bool diff = memcmp(old + i, nu + i, s) != 0;
		uint64_t j = i + s;
		while (j < n) {
			uint64_t t = SECTOR < n - j ? SECTOR : n - j;
			if ((memcmp(old + j, nu + j, t) != 0) != diff)
				break;
			j += t;
		}
		/* with -c a cluster is written once, whatever its runs */
		if (diff && off + j > done_to) {
			int ret = put_old(img, a, old, off, off + i, j - i, cbuf);
			if (ret < 0)
				return ret;
			done_to = a->compress && a->cluster ? off + j + a->cluster - 1 -
							   (off + j - 1) % a->cluster : off + j;
		}
		i = j;
	}
	return 0;
}

/* Read [off, off+n) of `img` (NULL: zeros; zeros past its end). */
static int read_view(qk_image *img, uint8_t *buf, uint64_t off, uint64_t n)
{
	uint64_t size = img ? qk_get_size(img) : 0, have = off < size ? size - off : 0;
	if (have > n)
		have = n;
	memset(buf + have, 0, n - have);
	return have ? qk_pread(img, buf, have, off) : 0;
}

/* Copy into img what differs between its old view and `nb`'s. */
static int copy_diffs(qk_image *img, qk_image *nb, const struct rebase_args *a)
{
	uint64_t size = qk_get_size(img), off = 0;
	uint8_t *old = cli_xmalloc(REBASE_CHUNK), *nu = cli_xmalloc(REBASE_CHUNK);
	uint8_t *cbuf = cli_xmalloc(a->cluster ? a->cluster : 1);
	struct cli_progress pr;
	int ret = 0;
	progress_init(&pr, a->progress, 1.0f);
	progress_print(&pr, 0, 0);
	while (ret == 0 && off < size) {
		struct qk_extent e;
		uint64_t n = REBASE_CHUNK < size - off ? REBASE_CHUNK : size - off;
		ret = qk_block_status(img, off, n, &e);
		if (ret == 0 && !(e.depth == 0 && (e.flags & QK_EXTENT_PRESENT))) {
			ret = qk_pread(img, old, e.length, off);
			if (ret == 0)
				ret = read_view(nb, nu, off, e.length);
			if (ret == 0)
				ret = write_diffs(img, a, old, nu, off, e.length, cbuf);
		}
		if (ret == 0)
			off += e.length;
		progress_print(&pr, (float)off * 100 / (float)size, 0);
	}
	progress_end(&pr);
	free(old);
	free(nu);
	free(cbuf);
	return ret;
}

/* Open the new backing file as the image will, read-only. Returns 0 or 1
 * after qemu-img's message. */
static int open_new_backing(const struct rebase_args *a, qk_image **nb)
{
	qk_format f = QK_FORMAT_AUTO;
	*nb = NULL;
	if (!*a->backing)
		return 0;
	if (a->bfmt && cli_parse_format(a->bfmt, &f) < 0)
		return 1;
	char *path = cli_sibling_path(a->file, a->backing);
	struct qk_open_options o;
	qk_open_options_init(&o);
	o.format = f;
	o.flags = a->direct ? QK_OPEN_DIRECT : 0;
	int ret = qk_open(path, &o, nb);
	free(path);
	if (ret < 0) {
		cli_error("Could not open new backing file '%s': %s", a->backing, lib_msg());
		return 1;
	}
	return 0;
}

/* Rebase with the options parsed. Returns the exit status. */
static int rebase(struct rebase_args *a)
{
	qk_image *img, *nb = NULL;
	struct qk_info info = { .struct_size = sizeof info };
	int ret = 0;
	if (cli_open(a->file, a->fmt, QK_OPEN_RDWR | (a->direct ? QK_OPEN_DIRECT : 0), &img) < 0)
		return 1;
	if (qk_get_info(img, &info) == 0)
		a->cluster = info.cluster_size;
	if (!a->unsafe && open_new_backing(a, &nb) != 0) {
		qk_close(img);
		return 1;
	}
	if (!a->unsafe)
		ret = copy_diffs(img, nb, a);
	if (ret == 0)
		ret = qk_flush(img);
	if (ret < 0)
		cli_lib_error(ret);
	qk_close(nb);
	if (ret == 0 && *a->backing && !a->bfmt) {
		cli_error("Could not change the backing file to '%s': backing format must be "
			  "specified", a->backing);
		ret = -1;
	} else if (ret == 0 && (ret = qk_set_backing(img, a->backing, a->bfmt)) < 0) {
		cli_error("Could not change the backing file to '%s': %s", a->backing, lib_msg());
	}
	int r = qk_close(img);
	if (ret == 0 && r < 0) {
		cli_lib_error(r);
		ret = r;
	}
	return ret < 0 ? 1 : 0;
}

int cmd_rebase(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "help", no_argument, NULL, 'h' },
		{ "force-share", no_argument, NULL, 'U' },
		{ NULL, 0, NULL, 0 },
	};
	struct cli_opts o = { .cmd = "rebase", .usage_code = CLI_EXIT_FAILURE };
	struct rebase_args a = { 0 };
	bool unused;
	int c;

	while ((c = cli_getopt(&o, argc, argv, ":f:b:F:ut:T:pqcUh", longopts)) > 0) {
		switch (c) {
		case 'b': a.backing = optarg; break;
		case 'F': a.bfmt = optarg; break;
		case 'u': a.unsafe = true; break;
		case 'p': a.progress = true; break;
		case 'q': a.quiet = true; break;
		case 'c': a.compress = true; break;
		case 't':
		case 'T':
			if (cli_parse_cache(optarg, c == 't' ? &a.direct : &unused) < 0) {
				cli_error("Invalid %scache option: %s", c == 'T' ? "source " : "", optarg);
				return 1;
			}
			break;
		}
	}
	if ((a.file = cli_one_image(&o, c, argc, argv)) == NULL)
		return o.status;
	if (cli_parse_format(o.fmtname, &a.fmt) < 0)
		return 1;
	if (!a.backing && !a.unsafe)
		return cli_usage_error("rebase", 1, "Must specify backing file (-b) or use unsafe mode (-u)");
	if (!a.backing)
		a.backing = "";
	if (a.quiet)
		a.progress = false;
	return rebase(&a);
}
