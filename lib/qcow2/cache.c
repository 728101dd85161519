/*
 * Metadata table cache (see the design note in qcow2.h). Slots are found by
 * an open-addressing hash of the host offset with linear probing; removal
 * uses backward-shift deletion, so there are no tombstones and a probe
 * sequence always ends at a free bucket (the table is at most half full).
 */
#include "qcow2/qcow2.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

static uint32_t hash_of(const struct qk__cache *c, uint64_t offset)
{
	uint64_t h = offset * 0x9E3779B97F4A7C15ull;
	return (uint32_t)(h >> 32) & c->hash_mask;
}

int qk__cache_init(struct qk__cache *c, struct qk__file *file, size_t entry_size,
		   uint32_t nslots, int (*load)(void *, void *, uint64_t), void *opaque)
{
	memset(c, 0, sizeof *c);
	if (nslots < 2)
		nslots = 2;
	uint32_t buckets = 4;
	while (buckets < 2 * nslots)
		buckets <<= 1;
	c->file = file;
	c->entry_size = entry_size;
	c->nslots = nslots;
	c->load = load;
	c->opaque = opaque;
	c->hash_mask = buckets - 1;
	c->slots = calloc(nslots, sizeof *c->slots);
	c->hash = calloc(buckets, sizeof *c->hash);
	if (!c->slots || !c->hash) {
		qk__cache_destroy(c);
		return qk__err(ENOMEM, "out of memory for the metadata cache");
	}
	return 0;
}

void qk__cache_destroy(struct qk__cache *c)
{
	if (c->slots)
		for (uint32_t i = 0; i < c->nslots; i++)
			free(c->slots[i].data);
	free(c->slots);
	free(c->hash);
	c->slots = NULL;
	c->hash = NULL;
}

/* Bucket holding `offset`, or the free bucket where it would go. */
static uint32_t find_bucket(const struct qk__cache *c, uint64_t offset, bool *found)
{
	uint32_t b = hash_of(c, offset);
	for (;;) {
		uint32_t s = c->hash[b];
		if (s == 0) {
			*found = false;
			return b;
		}
		if (c->slots[s - 1].offset == offset) {
			*found = true;
			return b;
		}
		b = (b + 1) & c->hash_mask;
	}
}

static void hash_remove(struct qk__cache *c, uint64_t offset)
{
	bool found;
	uint32_t hole = find_bucket(c, offset, &found);
	if (!found)
		return;
	c->hash[hole] = 0;
	/* Backward-shift: move later members of the run into the hole when
	 * their home bucket does not lie strictly after the hole. */
	uint32_t b = (hole + 1) & c->hash_mask;
	while (c->hash[b]) {
		uint32_t home = hash_of(c, c->slots[c->hash[b] - 1].offset);
		bool movable = ((b - home) & c->hash_mask) >= ((b - hole) & c->hash_mask);
		if (movable) {
			c->hash[hole] = c->hash[b];
			c->hash[b] = 0;
			hole = b;
		}
		b = (b + 1) & c->hash_mask;
	}
}

int qk__cache_get(struct qk__cache *c, uint64_t offset, void **table)
{
	bool found;
	uint32_t b = find_bucket(c, offset, &found);
	if (found) {
		struct qk__cache_slot *s = &c->slots[c->hash[b] - 1];
		s->recent = true;
		s->refs++;
		c->hits++;
		*table = s->data;
		return 0;
	}
	/* Victim by the CLOCK algorithm: the hand skips slots in use and gives
	 * recently used ones a second chance; two turns always find one. */
	struct qk__cache_slot *victim = NULL;
	for (uint32_t n = 0; n < 2 * c->nslots; n++) {
		struct qk__cache_slot *s = &c->slots[c->hand];
		c->hand = (c->hand + 1) % c->nslots;
		if (s->refs)
			continue;
		if (s->offset && s->recent) {
			s->recent = false;
			continue;
		}
		victim = s;
		break;
	}
	if (!victim)
		return qk__err(EBUSY, "metadata cache: every slot is in use");
	if (!victim->data) {
		victim->data = malloc(c->entry_size);
		if (!victim->data)
			return qk__err(ENOMEM, "out of memory for the metadata cache");
	}
	if (victim->offset) {
		hash_remove(c, victim->offset);
		victim->offset = 0;
	}
	c->misses++;
	int ret = qk__file_pread(c->file, victim->data, c->entry_size, offset);
	if (ret == 0 && c->load)
		ret = c->load(c->opaque, victim->data, offset);
	if (ret < 0)
		return ret;
	victim->offset = offset;
	victim->recent = true;
	victim->refs = 1;
	b = find_bucket(c, offset, &found);
	c->hash[b] = (uint32_t)(victim - c->slots) + 1;
	*table = victim->data;
	return 0;
}

void qk__cache_put(struct qk__cache *c, uint64_t offset)
{
	bool found;
	uint32_t b = find_bucket(c, offset, &found);
	if (found && c->slots[c->hash[b] - 1].refs)
		c->slots[c->hash[b] - 1].refs--;
}
