/*
 * check-forensic.c - "qcowkit check --forensic [--extract DIR]": a
 * read-only report of where an image's tables and refcounts disagree
 * (clusters mapped with refcount 0, leaked clusters and whether they hold
 * data, data clusters only snapshots reference), and a copy of the data
 * the leaked clusters still hold.
 *
 * Design note.
 * - Memory stays bounded whatever the image declares: findings are printed
 *   as qk_forensic reports them, never collected. Human output is one line
 *   per finding, in the library's order, then the counts. The JSON report
 *   keeps its keys and QEMU's pretty printing, but one JSON object cannot
 *   interleave three arrays while the library interleaves the kinds, so
 *   "leaked" (the array a crafted image makes huge: a leak per cluster) is
 *   printed live and the other two kinds are spooled, 8 or 16 bytes each,
 *   to an unlinked file in $TMPDIR (created at their first finding only)
 *   and printed after it; the counts come last.
 * - The image chooses the bytes and how many files --extract writes, so
 *   they only land in a directory this run created or found empty, held
 *   by a descriptor opened without following a symbolic link, each file
 *   new (openat O_CREAT|O_EXCL|O_NOFOLLOW, mode 0600): nothing planted
 *   there is followed or overwritten, and nobody else reads the copies.
 *   All-zero clusters are not copied, and the copy stops at a limit of
 *   files and bytes (CHECK_EXTRACT_MAX_*, or --extract-max-files/-bytes).
 * - Reaching the limit is not an error: the report is complete and goes
 *   on, only the copy is partial. One line on stderr says so, the JSON has
 *   "extract-limit-reached": true, leaked entries past it have no "file",
 *   and the exit status stays 3 (leaks were found). A failure to write (a
 *   full disk, a file name that appeared in DIR meanwhile) stops the
 *   report with one error line and exit status 1; the output printed so
 *   far is then incomplete.
 *
 * SPDX-License-Identifier: MIT
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cli.h"

#define EXIT_FOUND 3

/* Returned by the callback to stop the walk after printing an error
 * (f->failed set). */
#define STOPPED (-ECANCELED)

struct forensic {
	const struct check_forensic *a;
	int dirfd;              /* DIR, or -1 without --extract */
	char *dir;              /* DIR as given, without trailing slashes */
	char *path;             /* DIR/cluster-...bin of the last file */
	size_t dir_len;
	uint64_t n_files, n_bytes;      /* copied so far */
	bool capped;            /* the limit was reached */
	bool failed;            /* an error was printed */
	bool first_leak;        /* JSON: no "leaked" element printed yet */
	FILE *spool_unref;      /* JSON: (host, guest) pairs */
	FILE *spool_snap;       /* JSON: host offsets */
	uint64_t n_unref, n_leaked, n_leaked_data, n_snap;
};

/* Write all of buf to fd. Returns 0 or a negative errno. */
static int write_all(int fd, const void *buf, size_t len)
{
	const char *p = buf;

	while (len > 0) {
		ssize_t n = write(fd, p, len);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -errno;
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

/*
 * Make DIR ready for --extract: create it with mode 0700 unless it
 * exists, hold it by a descriptor opened with O_NOFOLLOW (so a DIR that is
 * a symbolic link is refused, not followed), and refuse it unless it is
 * empty. Sets f->dirfd, f->dir and f->path. Returns 0, or -1 after
 * printing the error.
 */
static int open_extract_dir(struct forensic *f, const char *dir)
{
	size_t len = strlen(dir);
	struct dirent *de;
	DIR *d;
	int fd;

	/* "link/" would follow the link whatever O_NOFOLLOW says. */
	while (len > 1 && dir[len - 1] == '/')
		len--;
	f->dir = cli_xmalloc(len + 1);
	memcpy(f->dir, dir, len);
	f->dir[len] = '\0';
	f->dir_len = len;
	f->path = cli_xmalloc(len + 64);
	if (mkdir(f->dir, 0700) < 0 && errno != EEXIST) {
		cli_error("Could not create '%s': %s", f->dir, strerror(errno));
		return -1;
	}
	f->dirfd = open(f->dir, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (f->dirfd < 0) {
		int err = errno;
		struct stat st;

		if (lstat(f->dir, &st) == 0 && S_ISLNK(st.st_mode))
			cli_error("'%s' is a symbolic link: --extract needs a "
				  "new or empty directory", f->dir);
		else
			cli_error("Could not open '%s': %s", f->dir, strerror(err));
		return -1;
	}
	fd = dup(f->dirfd);
	d = fd < 0 ? NULL : fdopendir(fd);
	if (d == NULL) {
		cli_error("Could not read '%s': %s", f->dir, strerror(errno));
		if (fd >= 0)
			close(fd);
		return -1;
	}
	errno = 0;
	while ((de = readdir(d)) != NULL)
		if (strcmp(de->d_name, ".") != 0 && strcmp(de->d_name, "..") != 0)
			break;
	if (de != NULL || errno != 0) {
		if (de != NULL)
			cli_error("'%s' is not empty: --extract needs a new or "
				  "empty directory", f->dir);
		else
			cli_error("Could not read '%s': %s", f->dir,
				  strerror(errno));
		closedir(d);
		return -1;
	}
	closedir(d);
	return 0;
}

/*
 * Copy leaked cluster `it` to DIR/cluster-<host offset>.bin, unless the
 * limit is reached (then say so, once). Returns 1 with f->path naming the
 * file, 0 when nothing was copied, or -1 after printing an error.
 */
static int extract(struct forensic *f, const struct qk_forensic_item *it)
{
	const char *name = f->path + f->dir_len + 1;
	int fd, ret;

	if (f->capped)
		return 0;
	/* n_bytes never passes max_bytes, so the subtraction holds. */
	if (f->n_files >= f->a->max_files ||
	    it->length > f->a->max_bytes - f->n_bytes) {
		f->capped = true;
		fflush(stdout);
		cli_error("--extract stopped after %" PRIu64 " files, %" PRIu64
			  " bytes in '%s' (limits: --extract-max-files=%" PRIu64
			  " --extract-max-bytes=%" PRIu64 "); the report goes on",
			  f->n_files, f->n_bytes, f->dir, f->a->max_files,
			  f->a->max_bytes);
		return 0;
	}
	snprintf(f->path, f->dir_len + 64, "%s/cluster-%016" PRIx64 ".bin",
		 f->dir, it->host);
	fd = openat(f->dirfd, name,
		    O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
	if (fd < 0) {
		cli_error("Could not create '%s': %s", f->path, strerror(errno));
		f->failed = true;
		return -1;
	}
	ret = write_all(fd, it->data, it->length);
	if (close(fd) < 0 && ret == 0)
		ret = -errno;
	if (ret < 0) {
		unlinkat(f->dirfd, name, 0);
		cli_error("Could not write '%s': %s", f->path, strerror(-ret));
		f->failed = true;
		return -1;
	}
	f->n_files++;
	f->n_bytes += it->length;
	return 1;
}

/* An unlinked temporary file in $TMPDIR (else /tmp), or NULL after
 * printing the error. */
static FILE *spool_open(void)
{
	const char *dir = getenv("TMPDIR");
	char *path;
	FILE *sp = NULL;
	int fd;

	if (dir == NULL || dir[0] == '\0')
		dir = "/tmp";
	path = cli_xmalloc(strlen(dir) + 32);
	sprintf(path, "%s/qcowkit-forensic.XXXXXX", dir);
	fd = mkstemp(path);
	if (fd >= 0) {
		unlink(path);
		sp = fdopen(fd, "w+b");
		if (sp == NULL)
			close(fd);
	}
	if (sp == NULL)
		cli_error("Could not create a temporary file in '%s': %s", dir,
			  strerror(errno));
	free(path);
	return sp;
}

/* JSON: keep `n` values of a finding for later. Returns 0 or STOPPED. */
static int spool(struct forensic *f, FILE **sp, const uint64_t *v, size_t n)
{
	if (*sp == NULL && (*sp = spool_open()) == NULL) {
		f->failed = true;
		return STOPPED;
	}
	if (fwrite(v, sizeof(*v), n, *sp) != n) {
		cli_error("Could not write a temporary file: %s", strerror(errno));
		f->failed = true;
		return STOPPED;
	}
	return 0;
}

static void print_leaked(struct forensic *f, const struct qk_forensic_item *it,
			 bool saved)
{
	if (!f->a->json) {
		printf("Leaked cluster at host offset 0x%" PRIx64 ": refcount %"
		       PRIu64 ", %s", it->host, it->refcount,
		       it->nonzero ? "holds data" : "all zeros");
		if (saved) {
			printf(", saved as '");
			cli_fputs_escaped(stdout, f->path);
			putchar('\'');
		}
		putchar('\n');
		return;
	}
	/* The members in the order the qj printer gives them. */
	printf("%s        {\n"
	       "            \"refcount\": %" PRIu64 ",\n"
	       "            \"host-offset\": %" PRIu64 ",\n",
	       f->first_leak ? "\n" : ",\n", it->refcount, it->host);
	if (saved) {
		printf("            \"file\": ");
		qj_print_string(stdout, f->path);
		printf(",\n");
	}
	printf("            \"data\": %s\n        }",
	       it->nonzero ? "true" : "false");
	f->first_leak = false;
}

static int on_found(void *opaque, const struct qk_forensic_item *it)
{
	struct forensic *f = opaque;
	int saved = 0;

	switch (it->kind) {
	case QK_FORENSIC_UNREFERENCED:
		f->n_unref++;
		if (f->a->json)
			return spool(f, &f->spool_unref,
				     (const uint64_t[]){ it->host, it->guest }, 2);
		printf("Unreferenced cluster at host offset 0x%" PRIx64
		       ": mapped at guest offset 0x%" PRIx64 ", refcount 0\n",
		       it->host, it->guest);
		return 0;
	case QK_FORENSIC_LEAKED:
		f->n_leaked++;
		if (it->nonzero) {
			f->n_leaked_data++;
			if (f->dirfd >= 0)
				saved = extract(f, it);
			if (saved < 0)
				return STOPPED;
		}
		print_leaked(f, it, saved > 0);
		return 0;
	case QK_FORENSIC_SNAPSHOT_ONLY:
		f->n_snap++;
		if (f->a->json)
			return spool(f, &f->spool_snap, &it->host, 1);
		printf("Snapshot-only data cluster at host offset 0x%" PRIx64
		       "\n", it->host);
		return 0;
	default:
		return 0;       /* a kind this program does not know */
	}
}

/* JSON: the member `key` holding the spooled findings, `per` values each
 * (host offset, then guest offset). Returns 0 or -1 after an error. */
static int print_spooled(const char *key, FILE *sp, size_t per)
{
	bool first = true;
	uint64_t v[2];

	printf(",\n    \"%s\": [", key);
	if (sp != NULL && (fflush(sp) != 0 || fseek(sp, 0, SEEK_SET) != 0))
		goto fail;
	while (sp != NULL && fread(v, sizeof(v[0]), per, sp) == per) {
		printf("%s        {\n            \"host-offset\": %" PRIu64,
		       first ? "\n" : ",\n", v[0]);
		if (per == 2)
			printf(",\n            \"guest-offset\": %" PRIu64, v[1]);
		printf("\n        }");
		first = false;
	}
	if (sp != NULL && ferror(sp))
		goto fail;
	printf("\n    ]");
	return 0;
fail:
	fflush(stdout);
	cli_error("Could not read back a temporary file: %s", strerror(errno));
	return -1;
}

int check_forensic(qk_image *img, const struct check_forensic *a)
{
	struct forensic f;
	int r;

	memset(&f, 0, sizeof(f));
	f.a = a;
	f.dirfd = -1;
	f.first_leak = true;
	if (a->extract != NULL && open_extract_dir(&f, a->extract) < 0) {
		r = CLI_EXIT_FAILURE;
		goto out;
	}
	if (a->json) {
		printf("{\n    \"filename\": ");
		qj_print_string(stdout, a->file);
		printf(",\n    \"leaked\": [");
	} else {
		printf("Forensic report of '");
		cli_fputs_escaped(stdout, a->file);
		printf("' (the image was not changed)\n");
	}
	r = qk_forensic(img, on_found, &f);
	if (r < 0) {
		fflush(stdout);
		/* After a failure of ours the error is printed already. */
		if (!f.failed && r == -ENOTSUP)
			cli_error("This image format does not support checks");
		else if (!f.failed)
			cli_lib_error(r);
		r = CLI_EXIT_FAILURE;
		goto out;
	}
	if (a->json) {
		printf("\n    ]");
		if (print_spooled("unreferenced", f.spool_unref, 2) < 0 ||
		    print_spooled("snapshot-only", f.spool_snap, 1) < 0) {
			r = CLI_EXIT_FAILURE;
			goto out;
		}
		printf(",\n    \"unreferenced-clusters\": %" PRIu64
		       ",\n    \"leaked-clusters\": %" PRIu64
		       ",\n    \"leaked-clusters-with-data\": %" PRIu64
		       ",\n    \"snapshot-only-clusters\": %" PRIu64,
		       f.n_unref, f.n_leaked, f.n_leaked_data, f.n_snap);
		if (a->extract != NULL)
			printf(",\n    \"extracted-files\": %" PRIu64
			       ",\n    \"extracted-bytes\": %" PRIu64
			       ",\n    \"extract-limit-reached\": %s",
			       f.n_files, f.n_bytes, f.capped ? "true" : "false");
		printf("\n}\n");
	} else {
		printf("Mapped but unreferenced clusters (refcount 0): %" PRIu64 "\n"
		       "Leaked clusters: %" PRIu64 " (%" PRIu64 " hold non-zero data)\n"
		       "Data clusters only snapshots reference: %" PRIu64 "\n",
		       f.n_unref, f.n_leaked, f.n_leaked_data, f.n_snap);
		if (a->extract != NULL) {
			printf("Saved %" PRIu64 " clusters (%" PRIu64 " bytes) in '",
			       f.n_files, f.n_bytes);
			cli_fputs_escaped(stdout, f.dir);
			printf("'%s\n", f.capped ? ", stopped at the limit" : "");
		}
	}
	r = f.n_unref || f.n_leaked ? EXIT_FOUND : CLI_EXIT_OK;
out:
	if (f.spool_unref != NULL)
		fclose(f.spool_unref);
	if (f.spool_snap != NULL)
		fclose(f.spool_snap);
	if (f.dirfd >= 0)
		close(f.dirfd);
	free(f.dir);
	free(f.path);
	return r;
}
