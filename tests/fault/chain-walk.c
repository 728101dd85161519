/*
 * chain-walk: power cuts at every write of qk_commit() and qk_rebase()
 * (what `qcowkit commit` and `qcowkit rebase` run), on the fault backend.
 *
 *   chain-walk commit DIR DEPTH EMPTY [STRIDE]
 *   chain-walk rebase DIR NEW FMT COMPRESS [STRIDE]
 *
 * DIR holds top.qcow2 and its backing chain, made by qemu-img (see
 * tests/fault/chain-cut.sh). Every file of the chain is loaded into memory.
 *
 * commit: the layer DEPTH below the top (1: its backing file) is opened
 * read-write through one fault controller, the top (read-write when EMPTY
 * is 1: the top is emptied afterwards) through another; the top's chain
 * reads that layer through the same controller's file, as two handles of
 * one file would. A first run counts the writes to each. Then the power
 * is cut at every write (every STRIDE-th) of the layer, and of the top: a
 * cut in the layer's writes leaves the top untouched, and the layer is
 * flushed before the top is written, so the two are independent. Three
 * kinds of cut in turn: the writes since the last sync lost; lost, and of
 * the cut write the whole sectors of its first 2 to 5.5 KiB landed; every
 * earlier write kept (a process crash). After each cut the durable bytes
 * are written into DIR/cut/ beside copies of the other files, and:
 *   - `qemu-img check` of the top and of the layer finds no corruption and
 *     no check error (leaks allowed);
 *   - the top reads through its chain exactly what it read before;
 *   - the layer read on its own holds, in every 512-byte sector, what it
 *     held before or what the top shows there (the committed data);
 * and the run that no cut stops must leave the layer reading as the top
 * throughout where the layers above allocate (for depth 1: everywhere),
 * and with EMPTY a top that allocates nothing.
 *
 * rebase: the top is opened read-write through a fault controller (the
 * old chain from memory copies), NEW (format FMT; "" for none) read-only;
 * qk_rebase() runs in safe mode (COMPRESS 1: with QK_REBASE_COMPRESS).
 * After each cut the top, opened from DIR/cut/ through whichever backing
 * file its header names, reads exactly what it read before, and `qemu-img
 * check` is clean but for leaks; the run without a cut must end naming NEW.
 *
 * Prints one summary line per walk; exit 0 when every point passed.
 */
#include "tap.h"
#include "walk-util.h"

#define MAX_FILES 8

struct file {
	char path[4096];        /* as the chain names it: DIR/NAME */
	char cut[4096];         /* DIR/cut/NAME */
	uint8_t *bytes;
	size_t len;
};

static struct file files[MAX_FILES];
static size_t n_files;
static char dir[4000];
static uint8_t *view0;          /* the top's guest view before */
static uint64_t size0;
static const char *qemu_img = "qemu-img";

__attribute__((format(printf, 1, 2), noreturn)) static void die(const char *fmt, ...)
{
	va_list ap;
	fputs("chain-walk: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(2);
}

/* The file in the table of that path, or NULL. */
static struct file *file_at(const char *path)
{
	for (size_t i = 0; i < n_files; i++)
		if (strcmp(files[i].path, path) == 0)
			return &files[i];
	return NULL;
}

/* ---- an alias: a second read-only handle on a file another handle writes -- */

static int alias_pread(struct qk__file *f, void *buf, size_t len, uint64_t off)
{
	struct qk__file *t = f->priv;
	return t->ops->pread(t, buf, len, off);
}

static int alias_get_size(struct qk__file *f, uint64_t *size)
{
	struct qk__file *t = f->priv;
	return t->ops->get_size(t, size);
}

static int alias_refuse(struct qk__file *f, const void *buf, size_t len, uint64_t off)
{
	(void)f, (void)buf, (void)len, (void)off;
	return qk__err(EPERM, "the alias is read-only");
}

static int alias_sync(struct qk__file *f)
{
	(void)f;
	return 0;
}

static int alias_set_size(struct qk__file *f, uint64_t size)
{
	(void)f, (void)size;
	return qk__err(EPERM, "the alias is read-only");
}

static void alias_close(struct qk__file *f)
{
	(void)f;        /* qk__file_close frees the struct; the target stays */
}

static const struct qk__io_ops alias_ops = {
	.pread = alias_pread,
	.pwrite = alias_refuse,
	.sync = alias_sync,
	.get_size = alias_get_size,
	.set_size = alias_set_size,
	.close = alias_close,
};

/* ---- the host: chain files from memory, the written layer through its alias - */

static struct file *written;            /* commit: the layer written */
static struct qk__file *written_file;   /* its fault file */

static int host_open_backing(const struct qk__host *host, const char *image, const char *name,
			     const char *path, uint32_t open_flags, struct qk__file **out)
{
	(void)host, (void)image, (void)name, (void)open_flags;
	struct file *fl = file_at(path);
	if (!fl)
		return qk__err(ENOENT, "chain-walk: no file %s", path);
	if (fl == written && written_file) {
		struct qk__file *a = calloc(1, sizeof *a);
		if (!a || !(a->path = strdup(path))) {
			free(a);
			return qk__err(ENOMEM, "out of memory");
		}
		a->ops = &alias_ops;
		a->priv = written_file;
		*out = a;
		return 0;
	}
	return qk__file_open_mem(fl->bytes, fl->len, fl->path, out);
}

static int host_open_data_file(const struct qk__host *host, const char *image, const char *name,
			       const char *path, bool writable, uint32_t open_flags,
			       struct qk__file **out)
{
	(void)host, (void)image, (void)name, (void)path, (void)writable, (void)open_flags,
		(void)out;
	return qk__err(ENOTSUP, "chain-walk: no external data files");
}

static const struct qk__host host = { host_open_backing, host_open_data_file };

/* Open fl through controller ft (read-write or not) as a chain's top. */
static int open_on(struct qk__fault *ft, struct file *fl, bool rdwr, struct qk__file **ff,
		   qk_image **img)
{
	struct qk__file *mem;
	struct qk_open_options o;
	qk_open_options_init(&o);
	o.flags = rdwr ? QK_OPEN_RDWR : 0;
	qk__api_enter("qk_open");
	int ret = qk__file_open_mem(fl->bytes, fl->len, fl->path, &mem);
	if (ret == 0)
		ret = qk__file_open_fault(ft, mem, ff);
	if (ret == 0)
		ret = qk__image_open_file(&host, *ff, fl->path, &o, NULL, img);
	return ret;
}

/* ---- checks ---------------------------------------------------------------------- */

struct stats {
	uint64_t points, failed, leaky, torn, kept;
};

static bool fail(struct stats *st, const char *point, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
static bool fail(struct stats *st, const char *point, const char *fmt, ...)
{
	va_list ap;
	fprintf(stderr, "FAIL: %s: ", point);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	st->failed++;
	return false;
}

/* qemu-img check of `path`: no corruption, no check error. */
static bool qemu_check(const char *path, const char *fmt, struct stats *st, const char *point,
		       bool *leaks)
{
	char out[8192];
	char *argv[] = { (char *)qemu_img, "check", "--output=json", "-f", (char *)fmt,
			 (char *)path, NULL };
	if (strcmp(fmt, "raw") == 0)
		return true;
	int rc = run_prog(argv, out, sizeof out);
	uint64_t corrupt = json_num(out, "corruptions"), cerr = json_num(out, "check-errors");
	if ((rc != 0 && rc != 3) || corrupt || cerr || !strstr(out, "\"check-errors\""))
		return fail(st, point, "qemu-img check %s: exit %d, %llu corruptions, %llu check "
			    "errors", path, rc, (unsigned long long)corrupt, (unsigned long long)cerr);
	*leaks |= rc == 3;
	return true;
}

/* The guest view of the image at `path` (its chain from the files beside
 * it), malloc'd, with its size; NULL after a message. */
static uint8_t *read_view(const char *path, uint64_t *size, char *why, size_t why_len)
{
	qk_image *img;
	struct qk_open_options o;
	qk_open_options_init(&o);
	o.flags = QK_OPEN_FORCE_SHARE;
	if (qk_open(path, &o, &img) < 0) {
		snprintf(why, why_len, "%s", qk_last_error());
		return NULL;
	}
	*size = qk_get_size(img);
	uint8_t *buf = malloc(*size ? *size : 1);
	if (!buf || qk_pread(img, buf, *size, 0) < 0) {
		snprintf(why, why_len, "%s", buf ? qk_last_error() : "out of memory");
		free(buf);
		buf = NULL;
	}
	qk_close(img);
	return buf;
}

/* Put every file's copy into DIR/cut/, the durable bytes of the written
 * ones (NULL: as they were). */
static void put_cut(const struct file *a, const void *ab, size_t al, const struct file *b,
		    const void *bb, size_t bl)
{
	for (size_t i = 0; i < n_files; i++) {
		const struct file *f = &files[i];
		bool ok = f == a ? write_file(f->cut, ab, al)
			: f == b ? write_file(f->cut, bb, bl) : write_file(f->cut, f->bytes, f->len);
		if (!ok)
			die("cannot write %s", f->cut);
	}
}

/* The top's view from DIR/cut/ must be view0. */
static bool top_unchanged(struct stats *st, const char *point)
{
	char why[600];
	uint64_t size;
	uint8_t *v = read_view(files[0].cut, &size, why, sizeof why);
	if (!v)
		return fail(st, point, "the top does not open or read: %s", why);
	bool same = size == size0 && memcmp(v, view0, size) == 0;
	uint64_t at = 0;
	while (!same && at < size && at < size0 && v[at] == view0[at])
		at++;
	free(v);
	if (!same)
		return fail(st, point, "the top's guest view changed (size %llu, was %llu; first "
			    "difference at %llu)", (unsigned long long)size, (unsigned long long)size0,
			    (unsigned long long)at);
	return true;
}

/* ---- commit ------------------------------------------------------------------------ */

static uint8_t *layer0;          /* the written layer's own view before */
static uint64_t layer0_size;
static const char *layer_fmt;

struct commit_run {
	struct qk__fault *ft_top, *ft_layer;
	int ret;
};

static void run_commit(struct commit_run *r, uint32_t depth, bool empty)
{
	struct qk__file *tf, *lf;
	qk_image *top = NULL, *base = NULL, *layer;
	written = &files[depth];
	r->ret = open_on(r->ft_layer, written, true, &lf, &base);
	if (r->ret < 0)
		return;
	written_file = lf;
	r->ret = open_on(r->ft_top, &files[0], empty, &tf, &top);
	if (r->ret == 0) {
		layer = top;
		for (uint32_t d = 0; d < depth && layer; d++)
			layer = qk_get_backing(layer);
		struct qk_commit_options o;
		qk_commit_options_init(&o);
		o.flags = empty ? QK_COMMIT_EMPTY : 0;
		r->ret = qk_commit(top, layer, base, &o);
		qk_close(top);
	}
	qk_close(base);
	written_file = NULL;
}

/* Check the layer's own view after a cut (complete: no cut). */
static bool layer_ok(struct stats *st, const char *point, bool complete, uint32_t depth)
{
	char why[600];
	uint64_t size;
	uint8_t *v = read_view(files[depth].cut, &size, why, sizeof why);
	if (!v)
		return fail(st, point, "the layer does not open or read: %s", why);
	bool ok = true;
	if (size != layer0_size && size != size0)
		ok = fail(st, point, "the layer has %llu bytes: neither %llu nor %llu",
			  (unsigned long long)size, (unsigned long long)layer0_size,
			  (unsigned long long)size0);
	for (uint64_t s = 0; ok && s < size; s += 512) {
		uint64_t n = size - s < 512 ? size - s : 512;
		static const uint8_t zero[512];
		const uint8_t *old = s < layer0_size ? layer0 + s : zero;
		bool is_old = memcmp(v + s, old, n) == 0;
		bool is_new = s < size0 && memcmp(v + s, view0 + s, n) == 0;
		if (!is_old && !is_new)
			ok = fail(st, point, "layer sector at %llu is neither its old content nor "
				  "the top's", (unsigned long long)s);
		if (complete && depth == 1 && !is_new)
			ok = fail(st, point, "after the commit, the layer at %llu does not read as "
				  "the top", (unsigned long long)s);
	}
	free(v);
	return ok;
}

static bool top_empty(struct stats *st, const char *point)
{
	qk_image *img;
	struct qk_open_options o;
	qk_open_options_init(&o);
	o.flags = QK_OPEN_FORCE_SHARE;
	if (qk_open(files[0].cut, &o, &img) < 0)
		return fail(st, point, "%s", qk_last_error());
	bool ok = true;
	for (uint64_t off = 0; ok && off < qk_get_size(img);) {
		struct qk_extent e;
		if (qk_block_status(img, off, qk_get_size(img) - off, &e) < 0)
			ok = fail(st, point, "%s", qk_last_error());
		else if (e.depth == 0 && (e.flags & QK_EXTENT_PRESENT))
			ok = fail(st, point, "the emptied top still allocates %llu at %llu",
				  (unsigned long long)e.length, (unsigned long long)off);
		else
			off += e.length;
	}
	qk_close(img);
	return ok;
}

static void check_commit(struct commit_run *r, struct stats *st, const char *point,
			 bool complete, uint32_t depth, bool empty)
{
	size_t tl, ll;
	const void *td = qk__fault_durable(r->ft_top, &tl);
	const void *ld = qk__fault_durable(r->ft_layer, &ll);
	bool leaks = false;
	st->points++;
	put_cut(&files[0], td, tl, &files[depth], ld, ll);
	if (!qemu_check(files[0].cut, "qcow2", st, point, &leaks) ||
	    !qemu_check(files[depth].cut, layer_fmt, st, point, &leaks) ||
	    !top_unchanged(st, point) || !layer_ok(st, point, complete, depth))
		return;
	if (complete && empty && !top_empty(st, point))
		return;
	st->leaky += leaks;
}

static int walk_commit(uint32_t depth, bool empty, uint64_t stride)
{
	struct stats st = { 0 };
	struct commit_run r = { qk__fault_new(), qk__fault_new(), 0 };
	char why[600], point[200];
	if (!r.ft_top || !r.ft_layer)
		die("out of memory");
	layer_fmt = strstr(files[depth].path, ".raw") ? "raw" : "qcow2";
	put_cut(NULL, NULL, 0, NULL, NULL, 0);
	if (!(layer0 = read_view(files[depth].cut, &layer0_size, why, sizeof why)))
		die("%s", why);
	run_commit(&r, depth, empty);
	if (r.ret < 0)
		die("the commit without a cut failed: %s", qk_last_error());
	uint64_t wl = qk__fault_count(r.ft_layer, QK__FAULT_WRITE);
	uint64_t wt = qk__fault_count(r.ft_top, QK__FAULT_WRITE);
	check_commit(&r, &st, "the commit without a cut", true, depth, empty);
	qk__fault_free(r.ft_top);
	qk__fault_free(r.ft_layer);
	if (wl == 0 || (empty && wt == 0))
		die("the commit wrote %llu times to the layer and %llu to the top",
		       (unsigned long long)wl, (unsigned long long)wt);
	for (uint64_t n = 1; n <= wl + wt; n += stride) {
		bool in_top = n > wl;
		uint64_t at = in_top ? n - wl : n;
		unsigned variant = (unsigned)((n / stride) % 3);
		uint64_t torn = variant == 1 ? 2048 + 512 * (n % 8) : 0;
		r.ft_top = qk__fault_new();
		r.ft_layer = qk__fault_new();
		if (!r.ft_top || !r.ft_layer)
			die("out of memory");
		qk__fault_cut(in_top ? r.ft_top : r.ft_layer, at, torn, variant == 2);
		run_commit(&r, depth, empty);
		snprintf(point, sizeof point, "commit, power cut at write %llu/%llu of the %s (%s)",
			 (unsigned long long)at, (unsigned long long)(in_top ? wt : wl),
			 in_top ? "top" : "layer", variant == 2 ? "earlier writes kept"
			 : torn ? "torn" : "unsynced writes lost");
		if (!qk__fault_was_cut(in_top ? r.ft_top : r.ft_layer)) {
			st.points++;
			fail(&st, point, "the commit never reached it");
		} else {
			st.torn += torn != 0;
			st.kept += variant == 2;
			check_commit(&r, &st, point, false, depth, empty);
		}
		qk__fault_free(r.ft_top);
		qk__fault_free(r.ft_layer);
	}
	printf("commit into depth %u%s: %llu writes to the layer, %llu to the top; %llu points "
	       "(%llu torn, %llu with earlier writes kept), %llu with leaks, %llu failed\n", depth,
	       empty ? ", top emptied" : "", (unsigned long long)wl, (unsigned long long)wt,
	       (unsigned long long)st.points, (unsigned long long)st.torn,
	       (unsigned long long)st.kept, (unsigned long long)st.leaky,
	       (unsigned long long)st.failed);
	free(layer0);
	return st.failed ? 1 : 0;
}

/* ---- rebase ------------------------------------------------------------------------ */

static const char *new_name, *new_fmt;
static bool compressed;

static int run_rebase(struct qk__fault *ft)
{
	struct qk__file *tf;
	qk_image *top = NULL, *nb = NULL;
	int ret = open_on(ft, &files[0], true, &tf, &top);
	if (ret == 0 && *new_name) {
		char path[8200];
		struct qk_open_options o;
		qk_open_options_init(&o);
		o.flags = QK_OPEN_FORCE_SHARE;
		snprintf(path, sizeof path, "%s/%s", dir, new_name);
		ret = qk_open(path, &o, &nb);
	}
	if (ret == 0) {
		struct qk_rebase_options o;
		qk_rebase_options_init(&o);
		o.flags = compressed ? QK_REBASE_COMPRESS : 0;
		ret = qk_rebase(top, nb, new_name, *new_fmt ? new_fmt : NULL, &o);
	}
	qk_close(nb);
	qk_close(top);
	return ret;
}

static void check_rebase(struct qk__fault *ft, struct stats *st, const char *point,
			 bool complete)
{
	size_t tl;
	const void *td = qk__fault_durable(ft, &tl);
	bool leaks = false;
	st->points++;
	put_cut(&files[0], td, tl, NULL, NULL, 0);
	if (!qemu_check(files[0].cut, "qcow2", st, point, &leaks) || !top_unchanged(st, point))
		return;
	if (complete) {
		qk_image *img;
		struct qk_info info = { .struct_size = sizeof info };
		struct qk_open_options o;
		qk_open_options_init(&o);
		o.flags = QK_OPEN_FORCE_SHARE;
		if (qk_open(files[0].cut, &o, &img) < 0 || qk_get_info(img, &info) < 0) {
			fail(st, point, "%s", qk_last_error());
			return;
		}
		const char *b = info.backing_file ? info.backing_file : "";
		if (strcmp(b, new_name) != 0)
			fail(st, point, "the top names '%s', not '%s'", b, new_name);
		qk_close(img);
	}
	st->leaky += leaks;
}

static int walk_rebase(uint64_t stride)
{
	struct stats st = { 0 };
	char point[200];
	struct qk__fault *ft = qk__fault_new();
	if (!ft)
		die("out of memory");
	if (run_rebase(ft) < 0)
		die("the rebase without a cut failed: %s", qk_last_error());
	uint64_t w = qk__fault_count(ft, QK__FAULT_WRITE);
	check_rebase(ft, &st, "the rebase without a cut", true);
	qk__fault_free(ft);
	for (uint64_t n = 1; n <= w; n += stride) {
		unsigned variant = (unsigned)((n / stride) % 3);
		uint64_t torn = variant == 1 ? 2048 + 512 * (n % 8) : 0;
		if (!(ft = qk__fault_new()))
			die("out of memory");
		qk__fault_cut(ft, n, torn, variant == 2);
		run_rebase(ft);
		snprintf(point, sizeof point, "rebase onto '%s', power cut at write %llu/%llu (%s)",
			 new_name, (unsigned long long)n, (unsigned long long)w,
			 variant == 2 ? "earlier writes kept" : torn ? "torn" : "unsynced writes lost");
		if (!qk__fault_was_cut(ft)) {
			st.points++;
			fail(&st, point, "the rebase never reached it");
		} else {
			st.torn += torn != 0;
			st.kept += variant == 2;
			check_rebase(ft, &st, point, false);
		}
		qk__fault_free(ft);
	}
	printf("rebase onto '%s'%s: %llu writes; %llu points (%llu torn, %llu with earlier "
	       "writes kept), %llu with leaks, %llu failed\n", new_name,
	       compressed ? ", compressed" : "", (unsigned long long)w,
	       (unsigned long long)st.points, (unsigned long long)st.torn,
	       (unsigned long long)st.kept, (unsigned long long)st.leaky,
	       (unsigned long long)st.failed);
	return st.failed ? 1 : 0;
}

/* ---- main ------------------------------------------------------------------------- */

/* Load every file of the chain of the image at `path` not loaded yet; the
 * first one loaded is the top, whose view is kept in view0. */
static void load_chain(const char *path)
{
	qk_image *img;
	struct qk_open_options o;
	qk_open_options_init(&o);
	o.flags = QK_OPEN_FORCE_SHARE;
	if (qk_open(path, &o, &img) < 0)
		die("%s", qk_last_error());
	for (qk_image *l = img; l; l = qk_get_backing(l)) {
		const char *name = qk_get_filename(l), *slash = strrchr(name, '/');
		if (file_at(name))
			continue;
		if (n_files == MAX_FILES)
			die("chains of at most %d files", MAX_FILES);
		struct file *f = &files[n_files++];
		snprintf(f->path, sizeof f->path, "%s", name);
		snprintf(f->cut, sizeof f->cut, "%s/cut/%s", dir, slash ? slash + 1 : name);
		if (!read_whole(f->path, &f->bytes, &f->len))
			die("cannot read %s", f->path);
	}
	if (!view0) {
		size0 = qk_get_size(img);
		view0 = malloc(size0 ? size0 : 1);
		if (!view0 || qk_pread(img, view0, size0, 0) < 0)
			die("cannot read the top's view");
	}
	qk_close(img);
}

int main(int argc, char **argv)
{
	if (argc < 3)
		die("usage: chain-walk commit DIR DEPTH EMPTY [STRIDE] | "
		       "rebase DIR NEW FMT COMPRESS [STRIDE]");
	if (getenv("QEMU_IMG"))
		qemu_img = getenv("QEMU_IMG");
	snprintf(dir, sizeof dir, "%s", argv[2]);
	char path[4100];
	snprintf(path, sizeof path, "%s/cut", dir);
	mkdir(path, 0755);
	snprintf(path, sizeof path, "%s/top.qcow2", dir);
	load_chain(path);
	int rc;
	if (strcmp(argv[1], "commit") == 0 && argc >= 5) {
		uint32_t depth = (uint32_t)atoi(argv[3]);
		if (depth < 1 || depth >= n_files)
			die("depth %u: the chain has %zu files", depth, n_files);
		rc = walk_commit(depth, atoi(argv[4]) != 0,
				 argc > 5 ? strtoull(argv[5], NULL, 0) : 1);
	} else if (strcmp(argv[1], "rebase") == 0 && argc >= 6) {
		new_name = argv[3];
		new_fmt = argv[4];
		compressed = atoi(argv[5]) != 0;
		if (*new_name) {
			/* NEW and its chain, copied into DIR/cut/ with the rest */
			snprintf(path, sizeof path, "%s/%s", dir, new_name);
			load_chain(path);
		}
		rc = walk_rebase(argc > 6 ? strtoull(argv[6], NULL, 0) : 1);
	} else {
		die("unknown mode or missing arguments");
	}
	for (size_t i = 0; i < n_files; i++)
		free(files[i].bytes);
	free(view0);
	return rc;
}
