/* Big-endian loads and stores for on-disk structures (QCOW2, NBD). */
#ifndef QK_UTIL_ENDIAN_H
#define QK_UTIL_ENDIAN_H
#include <stdint.h>
#include <string.h>

static inline uint16_t qk_be16(const void *p)
{
	const uint8_t *b = p;
	return (uint16_t)(b[0] << 8 | b[1]);
}
static inline uint32_t qk_be32(const void *p)
{
	const uint8_t *b = p;
	return (uint32_t)b[0] << 24 | (uint32_t)b[1] << 16 | (uint32_t)b[2] << 8 | b[3];
}
static inline uint64_t qk_be64(const void *p)
{
	return (uint64_t)qk_be32(p) << 32 | qk_be32((const uint8_t *)p + 4);
}
static inline void qk_put_be16(void *p, uint16_t v)
{
	uint8_t *b = p;
	b[0] = (uint8_t)(v >> 8);
	b[1] = (uint8_t)v;
}
static inline void qk_put_be32(void *p, uint32_t v)
{
	uint8_t *b = p;
	b[0] = (uint8_t)(v >> 24);
	b[1] = (uint8_t)(v >> 16);
	b[2] = (uint8_t)(v >> 8);
	b[3] = (uint8_t)v;
}
static inline void qk_put_be64(void *p, uint64_t v)
{
	qk_put_be32(p, (uint32_t)(v >> 32));
	qk_put_be32((uint8_t *)p + 4, (uint32_t)v);
}
/* Convert a table of n big-endian u64 in place to host order. */
static inline void qk_be64_table_to_host(uint64_t *t, size_t n)
{
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
	for (size_t i = 0; i < n; i++)
		t[i] = __builtin_bswap64(t[i]);
#else
	(void)t;
	(void)n;
#endif
}
#endif
