/*
 * Memory backend: the file is a growable buffer guarded by a lock. Used by
 * unit tests and fuzz targets so they need no file system.
 */
#include "support.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

struct mem_file {
	pthread_mutex_t lock;
	uint8_t *data;
	size_t len;
	size_t cap;             /* bytes allocated at data, >= len */
};

static int mem_pread(struct qk__file *f, void *buf, size_t len, uint64_t off)
{
	struct mem_file *m = f->priv;
	pthread_mutex_lock(&m->lock);
	size_t have = 0;
	if (off < m->len)
		have = qk_min_u64(len, m->len - off);
	if (have)
		memcpy(buf, m->data + off, have);
	memset((uint8_t *)buf + have, 0, len - have);
	pthread_mutex_unlock(&m->lock);
	return 0;
}

static int grow(struct mem_file *m, uint64_t size)
{
	if (size <= m->len)
		return 0;
	if (size > SIZE_MAX / 2)
		return qk__err(EFBIG, "memory file too large");
	if (size > m->cap) {
		/* Double at least: a file written cluster by cluster past its
		 * end is not copied once per cluster. */
		size_t cap = qk_max_u64(size, (uint64_t)m->cap * 2);
		uint8_t *p = realloc(m->data, cap);
		if (!p)
			return qk__err(ENOMEM, "out of memory");
		m->data = p;
		m->cap = cap;
	}
	memset(m->data + m->len, 0, size - m->len);
	m->len = size;
	return 0;
}

static int mem_pwrite(struct qk__file *f, const void *buf, size_t len, uint64_t off)
{
	struct mem_file *m = f->priv;
	uint64_t end;
	if (qk_add_overflow(off, len, &end))
		return qk__err(EINVAL, "write out of range");
	pthread_mutex_lock(&m->lock);
	int ret = grow(m, end);
	if (ret == 0 && len)
		memcpy(m->data + off, buf, len);
	pthread_mutex_unlock(&m->lock);
	return ret;
}

static int mem_sync(struct qk__file *f)
{
	return 0;
}

static int mem_get_size(struct qk__file *f, uint64_t *size)
{
	struct mem_file *m = f->priv;
	pthread_mutex_lock(&m->lock);
	*size = m->len;
	pthread_mutex_unlock(&m->lock);
	return 0;
}

static int mem_set_size(struct qk__file *f, uint64_t size)
{
	struct mem_file *m = f->priv;
	pthread_mutex_lock(&m->lock);
	int ret = 0;
	if (size > m->len)
		ret = grow(m, size);
	else
		m->len = size;
	pthread_mutex_unlock(&m->lock);
	return ret;
}

static int mem_allocated_size(struct qk__file *f, uint64_t *bytes)
{
	return mem_get_size(f, bytes);
}

static int mem_discard(struct qk__file *f, uint64_t off, uint64_t len)
{
	struct mem_file *m = f->priv;
	pthread_mutex_lock(&m->lock);
	if (off < m->len)
		memset(m->data + off, 0, qk_min_u64(len, m->len - off));
	pthread_mutex_unlock(&m->lock);
	return 0;
}

static void mem_close(struct qk__file *f)
{
	struct mem_file *m = f->priv;
	pthread_mutex_destroy(&m->lock);
	free(m->data);
	free(m);
}

static const struct qk__io_ops mem_ops = {
	.pread = mem_pread,
	.pwrite = mem_pwrite,
	.sync = mem_sync,
	.get_size = mem_get_size,
	.set_size = mem_set_size,
	.allocated_size = mem_allocated_size,
	.discard = mem_discard,
	.zero_range = mem_discard,
	.close = mem_close,
};

int qk__file_open_mem(const void *data, size_t len, const char *name,
		      struct qk__file **out)
{
	struct qk__file *f = calloc(1, sizeof *f);
	struct mem_file *m = calloc(1, sizeof *m);
	char *p = strdup(name ? name : "memory");
	uint8_t *copy = len ? malloc(len) : NULL;
	if (!f || !m || !p || (len && !copy)) {
		free(f);
		free(m);
		free(p);
		free(copy);
		return qk__err(ENOMEM, "out of memory");
	}
	if (len)
		memcpy(copy, data, len);
	pthread_mutex_init(&m->lock, NULL);
	m->data = copy;
	m->len = m->cap = len;
	f->ops = &mem_ops;
	f->priv = m;
	f->path = p;
	*out = f;
	return 0;
}

const void *qk__file_mem_data(struct qk__file *f, size_t *len)
{
	struct mem_file *m = f->priv;
	*len = m->len;
	return m->data;
}

/* An image in memory has no directory: its external data file is an empty
 * memory file, never the file the name points at. Backing files are read
 * from disk (unit tests make them there; fuzzers never open them). */
static int mem_open_data_file(const struct qk__host *host, const char *image, const char *name,
			      const char *path, bool writable, uint32_t open_flags,
			      struct qk__file **out)
{
	(void)host; (void)image; (void)path; (void)writable; (void)open_flags;
	return qk__file_open_mem(NULL, 0, name, out);
}

static int mem_open_backing(const struct qk__host *host, const char *image, const char *name,
			    const char *path, uint32_t open_flags, struct qk__file **out)
{
	(void)host;
	return qk__posix_host.open_backing(&qk__posix_host, image, name, path, open_flags, out);
}

const struct qk__host qk__mem_host = {
	.open_backing = mem_open_backing,
	.open_data_file = mem_open_data_file,
};
