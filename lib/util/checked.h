/* Overflow-checked arithmetic on unsigned 64-bit values. Each returns true
 * when the result overflowed (and then *r is unspecified). */
#ifndef QK_UTIL_CHECKED_H
#define QK_UTIL_CHECKED_H
#include <stdbool.h>
#include <stdint.h>

static inline bool qk_add_overflow(uint64_t a, uint64_t b, uint64_t *r)
{
	return __builtin_add_overflow(a, b, r);
}

static inline bool qk_mul_overflow(uint64_t a, uint64_t b, uint64_t *r)
{
	return __builtin_mul_overflow(a, b, r);
}

/* Round up to a power-of-two alignment; true on overflow. */
static inline bool qk_align_up_overflow(uint64_t v, uint64_t align, uint64_t *r)
{
	if (__builtin_add_overflow(v, align - 1, r))
		return true;
	*r &= ~(align - 1);
	return false;
}

static inline uint64_t qk_min_u64(uint64_t a, uint64_t b) { return a < b ? a : b; }
static inline uint64_t qk_max_u64(uint64_t a, uint64_t b) { return a > b ? a : b; }
static inline bool qk_is_pow2(uint64_t v) { return v && !(v & (v - 1)); }
#endif
