/*
 * support.h - test backends for the library's I/O seam (lib/internal.h):
 * files in memory (mem.c) and fault injection with power cuts (fault.c),
 * and a host whose named files are memory files. Built into the
 * qk_testsupport library that unit tests, fault walks and fuzzers link;
 * libqcowkit does not ship them.
 */
#ifndef QK_TEST_SUPPORT_H
#define QK_TEST_SUPPORT_H

#include "internal.h"

/* mem.c: a growable buffer, for unit tests and fuzzers. The data is
 * copied; `name` is used in messages. */
int qk__file_open_mem(const void *data, size_t len, const char *name,
		      struct qk__file **out);
/* The current contents of a memory file (valid until the next write). */
const void *qk__file_mem_data(struct qk__file *f, size_t *len);

/* ---- fault.c: fault injection and power cuts (for tests) ---------------
 *
 * A controller wraps one file (see the design note in fault.c). It counts
 * reads, writes (pwrite, set_size, discard, zero_range) and syncs from the
 * open on, can fail the Nth of a kind with an errno (once, or from then on),
 * and can cut the power at the Nth write: the durable image then holds the
 * bytes as of the last completed sync (plus, optionally, a sector-granular
 * torn prefix of write N) and every later operation fails with -EIO.
 */
#define QK__FAULT_SECTOR 512
enum qk__fault_kind { QK__FAULT_READ, QK__FAULT_WRITE, QK__FAULT_SYNC, QK__FAULT_NKINDS };
struct qk__fault;

/* A new controller, or NULL (ENOMEM, recorded). */
struct qk__fault *qk__fault_new(void);
/* Free it (after the file it serves is closed). */
void qk__fault_free(struct qk__fault *ft);
/* Open a file through the controller, taking over `inner` (closed with the
 * new file, or at once on failure). One file per controller. */
int qk__file_open_fault(struct qk__fault *ft, struct qk__file *inner, struct qk__file **out);
/* Fail operation number nth (1-based) of `kind` with -err; `sticky` fails
 * every later one of that kind too. nth 0 turns it off. */
void qk__fault_fail(struct qk__fault *ft, enum qk__fault_kind kind, uint64_t nth, int err,
		    bool sticky);
/* Cut the power as write nth_write is issued: the writes since the last
 * completed sync are lost (all land instead with keep_pending: a process
 * crash), and of write nth_write only the whole sectors of its first
 * torn_bytes bytes land. */
void qk__fault_cut(struct qk__fault *ft, uint64_t nth_write, uint64_t torn_bytes,
		   bool keep_pending);
/* Operations of `kind` issued so far (failed ones included). */
uint64_t qk__fault_count(struct qk__fault *ft, enum qk__fault_kind kind);
/* Errors injected so far (the power cut not included). */
uint64_t qk__fault_injected(struct qk__fault *ft);
/* Whether the power cut has happened. */
bool qk__fault_was_cut(struct qk__fault *ft);
/* The durable image: what storage holds after a power cut now (valid
 * until the next operation). */
const void *qk__fault_durable(struct qk__fault *ft, size_t *len);
/* The volatile view (what a process that lived on reads) as the file was
 * closed; NULL before that. */
const void *qk__fault_volatile(struct qk__fault *ft, size_t *len);


/* A host (see struct qk__host) for images in memory: the external data
 * file is an empty memory file, never a file on disk; backing files are
 * opened from disk as qk__posix_host opens them. */
extern const struct qk__host qk__mem_host;

#endif /* QK_TEST_SUPPORT_H */
