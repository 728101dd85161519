/*
 * buf.h - small buffer helpers.
 * SPDX-License-Identifier: MIT
 */
#ifndef QK_UTIL_BUF_H
#define QK_UTIL_BUF_H

#include <stdbool.h>
#include <stddef.h>
#include <string.h>

/* All `len` bytes zero? memcmp against the buffer shifted by one byte
 * checks "every byte equals the first" at memory speed. */
static inline bool qk_is_zero(const void *buf, size_t len)
{
	const unsigned char *p = buf;
	return len == 0 || (p[0] == 0 && memcmp(p, p + 1, len - 1) == 0);
}

#endif /* QK_UTIL_BUF_H */
