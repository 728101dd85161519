/*
 * Reference counts (read side): the refcount table, loaded on first use,
 * and refcount blocks through their own cache. Entries are 1 to 64 bits
 * wide (refcount_order 0..6): widths of 8 bits and more are big-endian
 * integers; narrower ones pack several per byte, lowest index in the
 * lowest bits.
 */
#include "qcow2/qcow2.h"

#include <errno.h>
#include <stdlib.h>

#define RT_RESERVED_MASK 0x1ffull

static int load_reftable(qk_image *img, struct qcow2 *q)
{
	uint64_t bytes = (uint64_t)q->rt_clusters * q->cluster_size;  /* checked at open */
	uint64_t end = q->rt_offset + bytes;
	if (end > q->file_size)
		return qk__qcow2_corrupt(img, "refcount table at offset 0x%llx (%llu bytes) lies past the end of the file",
					 (unsigned long long)q->rt_offset, (unsigned long long)bytes);
	uint64_t *rt = malloc(bytes);
	if (!rt)
		return qk__err(ENOMEM, "out of memory for the refcount table");
	int ret = qk__file_pread(img->file, rt, bytes, q->rt_offset);
	if (ret < 0) {
		free(rt);
		return ret;
	}
	qk_be64_table_to_host(rt, bytes / 8);
	uint32_t slots = q->l2_cache.nslots / 4;
	ret = qk__cache_init(&q->rb_cache, img->file, q->cluster_size, slots < 4 ? 4 : slots,
			     NULL, NULL);
	if (ret < 0) {
		free(rt);
		return ret;
	}
	q->rt = rt;
	q->rt_entries = bytes / 8;
	return 0;
}

/* Extract entry i of a refcount block. */
static uint64_t rb_entry(const uint8_t *rb, uint64_t i, uint32_t order)
{
	switch (order) {
	case 0: case 1: case 2: {
		uint32_t bits = 1u << order, per_byte = 8 / bits;
		uint8_t b = rb[i / per_byte];
		return (b >> (bits * (i % per_byte))) & ((1u << bits) - 1);
	}
	case 3:
		return rb[i];
	case 4:
		return qk_be16(rb + 2 * i);
	case 5:
		return qk_be32(rb + 4 * i);
	default:
		return qk_be64(rb + 8 * i);
	}
}

int qk__qcow2_get_refcount(qk_image *img, uint64_t cluster, uint64_t *rc)
{
	struct qcow2 *q = qcow2_of(img);
	if (!q->rt) {
		int ret = load_reftable(img, q);
		if (ret < 0)
			return ret;
	}
	uint32_t entries_bits = q->cluster_bits + 3 - q->refcount_order;
	uint64_t rt_index = cluster >> entries_bits;
	if (rt_index >= q->rt_entries) {
		*rc = 0;
		return 0;
	}
	uint64_t rte = q->rt[rt_index];
	uint64_t rb_off = rte & ~RT_RESERVED_MASK;
	if (rb_off == 0) {
		*rc = 0;
		return 0;
	}
	if ((rb_off & (q->cluster_size - 1)) || rb_off > MAX_HOST_OFFSET)
		return qk__qcow2_corrupt(img, "refcount block offset 0x%llx invalid (refcount table index %llu)",
					 (unsigned long long)rb_off, (unsigned long long)rt_index);
	void *rb;
	int ret = qk__cache_get(&q->rb_cache, rb_off, &rb);
	if (ret < 0)
		return ret;
	*rc = rb_entry(rb, cluster & ((1ull << entries_bits) - 1), q->refcount_order);
	qk__cache_put(&q->rb_cache, rb_off);
	return 0;
}

void qk__qcow2_free_refcounts(struct qcow2 *q)
{
	qk__cache_destroy(&q->rb_cache);
	free(q->rt);
	q->rt = NULL;
}
