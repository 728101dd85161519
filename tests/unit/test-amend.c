/*
 * test-amend.c - qk_amend under power cuts, on the fault backend. Images
 * are made with the library itself (qk_create, writes, zero writes that
 * keep and that drop their clusters, internal snapshots taken between
 * them, so that L2 tables and zero clusters are shared), then each amend
 * runs once to count its writes and again with the power cut at every
 * write N, four times: losing the writes since the last sync, tearing
 * write N after its first sector, and after its first 2 to 4, and keeping
 * every earlier write (a process crash). What storage holds afterwards must:
 *   - open, and qk_check find no corruption and no check error (leaks
 *     are allowed: the price of a cut, as with QEMU);
 *   - be the old image or the new one: version and refcount width each
 *     the one before or the one asked for;
 *   - show the guest, and every snapshot, the bytes it showed before.
 * The uncut run must end with the new version and width and a clean check.
 */
#include "tap.h"

#include <sys/stat.h>

#define SIZE (1u << 20)
#define MAX_SNAPS 2

static char dir[64];
static const char *const snap_names[MAX_SNAPS] = { "s1", "s2" };

struct image {
	char path[128];
	uint8_t *bytes;            /* the file */
	size_t len;
	uint8_t *want[1 + MAX_SNAPS];   /* guest content: active, then snapshots */
	uint32_t n_snaps;
	uint32_t version, refcount_bits;
};

static void die_on(int ret, const char *what)
{
	if (ret < 0) {
		fprintf(stderr, "%s: %s\n", what, qk_last_error());
		exit(1);
	}
}

/* Read the file at path into *out. */
static void slurp(const char *path, uint8_t **out, size_t *len)
{
	FILE *f = fopen(path, "rb");
	struct stat st;
	if (!f || fstat(fileno(f), &st) < 0)
		qb_die("cannot read the image");
	*len = (size_t)st.st_size;
	*out = malloc(*len ? *len : 1);
	if (!*out || fread(*out, 1, *len, f) != *len)
		qb_die("cannot read the image");
	fclose(f);
}

/* Open `bytes` from memory (read-only unless `ft`, then read-write through
 * it), optionally snapshot `snap`. */
static int open_mem(const struct image *im, const void *bytes, size_t len, struct qk__fault *ft,
		    const char *snap, qk_image **img)
{
	struct qk__file *mem, *f;
	struct qk_open_options o;
	qk_open_options_init(&o);
	o.flags = ft ? QK_OPEN_RDWR : QK_OPEN_CHECK;
	o.snapshot = snap;
	qk__api_enter("qk_open");
	int ret = qk__file_open_mem(bytes, len, im->path, &mem);
	if (ret == 0 && ft)
		ret = qk__file_open_fault(ft, mem, &f);
	else
		f = mem;
	if (ret == 0)
		ret = qk__image_open_file(&qk__mem_host, f, im->path, &o, NULL, img);
	return ret;
}

/* Make the image (`cluster_size` clusters): data, zero clusters of both kinds, and
 * `snaps` snapshots with writes and zeros between them; then remember its
 * bytes and what the guest and each snapshot show. */
static void make_image(struct image *im, const char *name, uint32_t version, uint32_t bits,
		       const char *backing, uint32_t snaps, uint32_t cluster_size)
{
	struct qk_create_options c;
	qk_image *img;
	uint8_t *buf = malloc(SIZE);
	memset(im, 0, sizeof *im);
	snprintf(im->path, sizeof im->path, "%s/%s", dir, name);
	qk_create_options_init(&c);
	c.size = SIZE;
	c.cluster_size = cluster_size;
	c.version = version;
	c.refcount_bits = bits;
	c.backing_file = backing;
	c.backing_format = backing ? "qcow2" : NULL;
	die_on(qk_create(im->path, &c), "create");
	struct qk_open_options o;
	qk_open_options_init(&o);
	o.flags = QK_OPEN_RDWR;
	die_on(qk_open(im->path, &o, &img), "open");
	for (uint32_t i = 0; i < SIZE; i++)
		buf[i] = (uint8_t)(i * 7 + i / 4096 + 1);
	die_on(qk_pwrite(img, buf, 256 * 1024, 0), "write");
	if (version >= 3) {
		die_on(qk_write_zeroes(img, 16 * 1024, 12 * 1024, 0), "zero (kept)");
		die_on(qk_write_zeroes(img, 64 * 1024, 8 * 1024, QK_ZERO_MAY_UNMAP), "zero (unmapped)");
		die_on(qk_write_zeroes(img, 512 * 1024, 64 * 1024, 0), "zero (plain)");
	}
	for (uint32_t s = 0; s < snaps; s++) {
		die_on(qk_snapshot_create(img, snap_names[s]), "snapshot");
		die_on(qk_pwrite(img, buf + 300 * 1024, 8192, 300 * 1024 + s * 65536), "write");
		if (version >= 3)
			die_on(qk_write_zeroes(img, s * 4096, 8192, 0), "zero after snapshot");
	}
	die_on(qk_close(img), "close");
	free(buf);
	im->n_snaps = snaps;
	im->version = version;
	im->refcount_bits = bits;
	slurp(im->path, &im->bytes, &im->len);
	for (uint32_t s = 0; s <= snaps; s++) {
		im->want[s] = malloc(SIZE);
		die_on(open_mem(im, im->bytes, im->len, NULL, s ? snap_names[s - 1] : NULL, &img), "open");
		die_on(qk_pread(img, im->want[s], SIZE, 0), "read");
		qk_close(img);
	}
}

/* Amend a fresh copy of the image through ft; the writes it made. */
static uint64_t run_amend(const struct image *im, struct qk__fault *ft,
			  const struct qk_amend_options *a, int *ret)
{
	qk_image *img;
	*ret = open_mem(im, im->bytes, im->len, ft, NULL, &img);
	if (*ret == 0) {
		*ret = qk_amend(img, a);
		int c = qk_close(img);
		if (*ret == 0)
			*ret = c;
	}
	return qk__fault_count(ft, QK__FAULT_WRITE);
}

/* Judge what storage holds after a cut at `point` (or the uncut run's
 * file, `done`). */
static void judge(const struct image *im, const void *d, size_t len, const struct qk_amend_options *a,
		  const char *point, bool done)
{
	qk_image *img;
	struct qk_info info = { .struct_size = sizeof info };
	struct qk_check_result res = { .struct_size = sizeof res };
	uint8_t *buf = malloc(SIZE);
	int ret = open_mem(im, d, len, NULL, NULL, &img);
	CHECK(ret == 0, "%s: open: %s", point, qk_last_error());
	if (ret < 0) {
		free(buf);
		return;
	}
	qk_get_info(img, &info);
	uint32_t v = a->fields & QK_AMEND_VERSION ? a->version : im->version;
	uint32_t b = a->fields & QK_AMEND_REFCOUNT_BITS ? a->refcount_bits : im->refcount_bits;
	CHECK(done ? info.qcow2_version == v : (info.qcow2_version == v || info.qcow2_version == im->version),
	      "%s: version %u", point, info.qcow2_version);
	CHECK(done ? info.refcount_bits == b : (info.refcount_bits == b || info.refcount_bits == im->refcount_bits),
	      "%s: refcount bits %u", point, info.refcount_bits);
	ret = qk_check(img, 0, &res, NULL, NULL);
	CHECK(ret == 0 && res.corruptions == 0 && res.check_errors == 0 && (!done || res.leaks == 0),
	      "%s: check: %d, %llu corruptions, %llu errors, %llu leaks: %s", point, ret,
	      (unsigned long long)res.corruptions, (unsigned long long)res.check_errors,
	      (unsigned long long)res.leaks, qk_last_error());
	qk_close(img);
	for (uint32_t s = 0; s <= im->n_snaps; s++) {
		ret = open_mem(im, d, len, NULL, s ? snap_names[s - 1] : NULL, &img);
		if (ret == 0)
			ret = qk_pread(img, buf, SIZE, 0);
		CHECK(ret == 0 && memcmp(buf, im->want[s], SIZE) == 0, "%s: content of %s: %s", point,
		      s ? snap_names[s - 1] : "the active image", ret ? qk_last_error() : "differs");
		if (ret == 0 || img)
			qk_close(img);
		img = NULL;
	}
	free(buf);
}

/* The amend uncut, then cut at every write. */
static void walk(const struct image *im, const struct qk_amend_options *a, const char *what)
{
	struct qk__fault *ft = qk__fault_new();
	char point[160];
	int ret;
	uint64_t writes = run_amend(im, ft, a, &ret);
	CHECK(ret == 0, "%s: %s", what, qk_last_error());
	size_t len;
	const void *d = qk__fault_durable(ft, &len);
	snprintf(point, sizeof point, "%s, uncut", what);
	judge(im, d, len, a, point, true);
	qk__fault_free(ft);
	for (uint64_t k = 4; k < 4 * (writes + 1); k++) {
		uint64_t n = k / 4, torn = k % 4 == 1 ? 512 : k % 4 == 2 ? 1024 + 512 * (n % 3) : 0;
		unsigned variant = k % 4 == 3 ? 2 : torn ? 1 : 0;
		ft = qk__fault_new();
		qk__fault_cut(ft, n, torn, variant == 2);
		run_amend(im, ft, a, &ret);
		snprintf(point, sizeof point, "%s, power cut at write %llu/%llu (%s)", what,
			 (unsigned long long)n, (unsigned long long)writes,
			 variant == 2 ? "earlier writes kept" : variant == 1 ? "torn" : "unsynced lost");
		CHECK(qk__fault_was_cut(ft), "%s: never reached", point);
		d = qk__fault_durable(ft, &len);
		judge(im, d, len, a, point, false);
		qk__fault_free(ft);
	}
}

static void free_image(struct image *im)
{
	free(im->bytes);
	for (uint32_t s = 0; s <= im->n_snaps; s++)
		free(im->want[s]);
	unlink(im->path);
}

int main(void)
{
	struct image base, im;
	struct qk_amend_options a;
	tap_watchdog(600);
	snprintf(dir, sizeof dir, "/tmp/qk-amend.XXXXXX");
	if (!mkdtemp(dir))
		qb_die("mkdtemp");

	make_image(&im, "snaps.qcow2", 3, 16, NULL, 2, 4096);
	qk_amend_options_init(&a);
	a.fields = QK_AMEND_REFCOUNT_BITS;
	for (uint32_t bits = 2; bits <= 64; bits *= 8) {
		char what[64];
		a.refcount_bits = bits;
		snprintf(what, sizeof what, "refcount_bits 16->%u, snapshots", bits);
		walk(&im, &a, what);
	}
	a.fields = QK_AMEND_VERSION;
	a.version = 2;
	walk(&im, &a, "compat 1.1->0.10, zero clusters and snapshots");
	free_image(&im);

	make_image(&base, "base.qcow2", 3, 16, NULL, 0, 4096);
	make_image(&im, "over.qcow2", 3, 16, base.path, 1, 4096);
	walk(&im, &a, "compat 1.1->0.10 over a backing file");
	free_image(&im);

	make_image(&im, "wide.qcow2", 3, 64, NULL, 1, 4096);
	a.fields = QK_AMEND_VERSION | QK_AMEND_REFCOUNT_BITS;
	a.refcount_bits = 16;
	walk(&im, &a, "refcount_bits 64->16 and compat 0.10");
	free_image(&im);

	make_image(&im, "v2.qcow2", 2, 16, NULL, 1, 4096);
	a.fields = QK_AMEND_VERSION | QK_AMEND_REFCOUNT_BITS;
	a.version = 3;
	a.refcount_bits = 2;
	walk(&im, &a, "compat 0.10->1.1 and refcount_bits 2");
	free_image(&im);

	make_image(&im, "plain.qcow2", 3, 16, NULL, 0, 4096);
	a.fields = QK_AMEND_REFCOUNT_BITS;
	a.refcount_bits = 1;
	walk(&im, &a, "refcount_bits 16->1");
	free_image(&im);

	/* 64 KiB clusters: the version 3 header (with QEMU's feature table)
	 * passes the first sector, the version 2 one does not. */
	make_image(&im, "v2b.qcow2", 2, 16, base.path, 1, 65536);
	a.fields = QK_AMEND_VERSION;
	a.version = 3;
	walk(&im, &a, "compat 0.10->1.1 over a backing file, 64 KiB clusters");
	free_image(&im);
	make_image(&im, "v3b.qcow2", 3, 16, base.path, 1, 65536);
	a.version = 2;
	walk(&im, &a, "compat 1.1->0.10 over a backing file, 64 KiB clusters");
	free_image(&im);
	free_image(&base);
	rmdir(dir);
	return tap_done();
}
