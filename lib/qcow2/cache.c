/*
 * Metadata table cache (see the design note in qcow2.h). Slots are found by
 * an open-addressing hash of the host offset with linear probing; removal
 * uses backward-shift deletion, so there are no tombstones and a probe
 * sequence always ends at a free bucket (the table is at most half full).
 * Write ordering: see the note in qcow2.h.
 */
#include "qcow2/qcow2.h"

#include <assert.h>
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
	free(c->scratch);
	c->scratch = NULL;
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

/* Write one dirty slot (its dependencies already flushed). */
static int write_slot(struct qk__cache *c, struct qk__cache_slot *s)
{
	int ret = c->pre_write ? c->pre_write(c->opaque, s->offset) : 0;
	if (ret < 0)
		return ret;
	const void *out = s->data;
	if (c->store) {
		if (!c->scratch && !(c->scratch = malloc(c->entry_size)))
			return qk__err(ENOMEM, "out of memory for the metadata cache");
		c->store(c->opaque, s->data, c->scratch);
		out = c->scratch;
	}
	ret = qk__file_pwrite(c->file, out, c->entry_size, s->offset);
	if (ret == 0)
		s->dirty = false;
	return ret;
}

bool qk__cache_is_dirty(const struct qk__cache *c)
{
	for (uint32_t i = 0; i < c->nslots; i++)
		if (c->slots[i].dirty)
			return true;
	return false;
}

int qk__cache_flush(struct qk__cache *c)
{
	if (!c->slots || !qk__cache_is_dirty(c)) {
		c->depends = NULL;
		c->sync_first = NULL;
		return 0;
	}
	int ret = 0;
	if (c->depends) {
		ret = qk__cache_flush(c->depends);
		if (ret < 0)
			return ret;
		c->depends = NULL;
	}
	if (c->sync_first) {
		ret = qk__file_sync(c->sync_first);
		if (ret < 0)
			return ret;
		c->sync_first = NULL;
	}
	for (uint32_t i = 0; i < c->nslots && ret == 0; i++)
		if (c->slots[i].dirty)
			ret = write_slot(c, &c->slots[i]);
	if (ret == 0)
		ret = qk__file_sync(c->file);
	return ret;
}

/* Flush what c waits for and forget the dependency. */
static int flush_dependency(struct qk__cache *c)
{
	int ret = qk__cache_flush(c->depends);
	if (ret == 0)
		c->depends = NULL;
	return ret;
}

int qk__cache_set_dependency(struct qk__cache *c, struct qk__cache *dep)
{
	int ret = 0;
	/* Chains and cycles are cut by flushing, as QEMU does: the
	 * dependency's own dependency is settled first. */
	if (dep->depends)
		ret = flush_dependency(dep);
	if (ret == 0 && c->depends && c->depends != dep)
		ret = flush_dependency(c);
	if (ret == 0)
		c->depends = dep;
	return ret;
}

/*
 * One more slot, for when the only slots free to take are dirty and the
 * disk refuses to write them back (a full or failing disk must not stop
 * reads). Bounded: at most twice the configured slots plus 64.
 */
static int grow_slots(struct qk__cache *c, struct qk__cache_slot **out)
{
	if (!c->max_slots)
		c->max_slots = 2 * c->nslots + 64;
	if (c->nslots >= c->max_slots)
		return -ENOSPC;
	struct qk__cache_slot *slots = realloc(c->slots, (c->nslots + 1) * sizeof *slots);
	if (!slots)
		return -ENOMEM;
	c->slots = slots;
	memset(&slots[c->nslots], 0, sizeof *slots);
	if (2 * (c->nslots + 1) > c->hash_mask + 1) {
		/* Keep the hash at most half full: rebuild it twice as large. */
		uint32_t buckets = 2 * (c->hash_mask + 1);
		uint32_t *hash = calloc(buckets, sizeof *hash);
		if (!hash)
			return -ENOMEM;
		free(c->hash);
		c->hash = hash;
		c->hash_mask = buckets - 1;
		for (uint32_t i = 0; i < c->nslots; i++) {
			bool found;
			if (slots[i].offset)
				c->hash[find_bucket(c, slots[i].offset, &found)] = i + 1;
		}
	}
	*out = &slots[c->nslots++];
	return 0;
}

/*
 * A slot for a table not in the cache: the CLOCK victim, a clean one
 * first. A dirty victim is written back (the whole cache, dependencies
 * first); when that fails the cache grows by a slot (bounded) rather
 * than fail a read, and returns the flush error when it cannot. -EBUSY
 * when every slot is in use.
 */
static int take_slot(struct qk__cache *c, uint64_t offset, struct qk__cache_slot **out)
{
	/* The hand skips slots in use and dirty ones, and gives recently
	 * used ones a second chance; two turns always find a clean one if
	 * there is one. */
	struct qk__cache_slot *victim = NULL, *dirty = NULL;
	for (uint32_t n = 0; n < 2 * c->nslots; n++) {
		struct qk__cache_slot *s = &c->slots[c->hand];
		c->hand = (c->hand + 1) % c->nslots;
		if (s->refs)
			continue;
		if (s->offset && s->recent) {
			s->recent = false;
			continue;
		}
		if (s->dirty) {
			if (!dirty)
				dirty = s;
			continue;
		}
		victim = s;
		break;
	}
	int ret = 0;
	if (!victim && dirty) {
		ret = qk__cache_flush(c);
		if (ret == 0)
			victim = dirty;
	}
	if (!victim && !dirty)
		return qk__err(EBUSY, "metadata cache: every slot is in use");
	if (!victim) {
		int g = grow_slots(c, &victim);
		if (g == -ENOMEM)
			return qk__err(ENOMEM, "out of memory for the metadata cache");
		if (g < 0)
			return ret;
	}
	if (!victim->data) {
		victim->data = malloc(c->entry_size);
		if (!victim->data)
			return qk__err(ENOMEM, "out of memory for the metadata cache");
	}
	if (victim->offset) {
		hash_remove(c, victim->offset);
		victim->offset = 0;
	}
	*out = victim;
	return 0;
}

static void install(struct qk__cache *c, struct qk__cache_slot *s, uint64_t offset)
{
	bool found;
	assert(offset != 0 && s->refs == 0);   /* 0 marks an empty slot */
	s->offset = offset;
	s->recent = true;
	s->refs = 1;
	uint32_t b = find_bucket(c, offset, &found);
	c->hash[b] = (uint32_t)(s - c->slots) + 1;
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
	struct qk__cache_slot *victim;
	int ret = take_slot(c, offset, &victim);
	if (ret < 0)
		return ret;
	c->misses++;
	ret = qk__file_pread(c->file, victim->data, c->entry_size, offset);
	if (ret == 0 && c->load)
		ret = c->load(c->opaque, victim->data, offset);
	if (ret < 0)
		return ret;
	install(c, victim, offset);
	*table = victim->data;
	return 0;
}

int qk__cache_peek(struct qk__cache *c, uint64_t offset, void *buf)
{
	bool found;
	uint32_t b = find_bucket(c, offset, &found);
	if (found) {
		memcpy(buf, c->slots[c->hash[b] - 1].data, c->entry_size);
		return 0;
	}
	int ret = qk__file_pread(c->file, buf, c->entry_size, offset);
	if (ret == 0 && c->load)
		ret = c->load(c->opaque, buf, offset);
	return ret;
}

int qk__cache_get_empty(struct qk__cache *c, uint64_t offset, void **table)
{
	bool found;
	uint32_t b = find_bucket(c, offset, &found);
	struct qk__cache_slot *s;
	if (found) {
		s = &c->slots[c->hash[b] - 1];
		s->refs++;
	} else {
		int ret = take_slot(c, offset, &s);
		if (ret < 0)
			return ret;
		install(c, s, offset);
	}
	memset(s->data, 0, c->entry_size);
	s->dirty = true;
	*table = s->data;
	return 0;
}

void qk__cache_mark_dirty(struct qk__cache *c, uint64_t offset)
{
	bool found;
	uint32_t b = find_bucket(c, offset, &found);
	if (found)
		c->slots[c->hash[b] - 1].dirty = true;
}

void qk__cache_discard(struct qk__cache *c, uint64_t offset)
{
	bool found;
	uint32_t b = find_bucket(c, offset, &found);
	if (!found)
		return;
	struct qk__cache_slot *s = &c->slots[c->hash[b] - 1];
	assert(s->refs <= 1);   /* only its creator may still hold a table it drops */
	hash_remove(c, offset);
	s->offset = 0;
	s->dirty = false;
	s->refs = 0;
}

void qk__cache_put(struct qk__cache *c, uint64_t offset)
{
	bool found;
	uint32_t b = find_bucket(c, offset, &found);
	/* Every put matches a get of a table still in the cache. */
	assert(found && c->slots[c->hash[b] - 1].refs > 0);
	if (found && c->slots[c->hash[b] - 1].refs)
		c->slots[c->hash[b] - 1].refs--;
}
