/*
 * Also the struct_size policy's copies (qcowkit.h, "ABI").
 *
 * Per-thread last error: a negative errno travels up the call stack while
 * the innermost failure records one line of text; an outer frame may put
 * its own context in front (qk__err_prepend, as QEMU's error_prepend), so
 * the message reads from the general to the particular. Public entry
 * points set the API name (qk__api_enter) so the message reads
 * "qk_open: ...".
 */
#include "internal.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static _Thread_local const char *tls_api = "qcowkit";
static _Thread_local char tls_msg[512];
static _Thread_local int tls_errno;
/* Set once a message is recorded inside the current API call, so outer
 * frames that also report do not overwrite the more precise inner text. */
static _Thread_local int tls_recorded;

void qk__api_enter(const char *api)
{
	tls_api = api;
	tls_recorded = 0;
}

int qk__err(int errnum, const char *fmt, ...)
{
	if (errnum < 0)
		errnum = -errnum;
	if (errnum == 0)
		errnum = EIO;
	if (!tls_recorded) {
		va_list ap;
		int n = snprintf(tls_msg, sizeof tls_msg, "%s: ", tls_api);
		if (n < 0 || (size_t)n >= sizeof tls_msg)
			n = 0;
		va_start(ap, fmt);
		vsnprintf(tls_msg + n, sizeof tls_msg - (size_t)n, fmt, ap);
		va_end(ap);
		/* One line, always, and nothing a terminal would act on: a name
		 * from an image may hold a newline or an escape sequence. */
		for (char *p = tls_msg; *p; p++)
			if (*p == '\n' || *p == '\r' || *p == '\t')
				*p = ' ';
			else if ((unsigned char)*p < 0x20 || *p == 0x7f)
				*p = '?';
		tls_errno = errnum;
		tls_recorded = 1;
	}
	return -errnum;
}

int qk__api_resume(int ret, const char *api)
{
	size_t old = strlen(tls_api), len = strlen(tls_msg), nl = strlen(api);
	if (ret < 0 && tls_recorded && len >= old + 2 && strncmp(tls_msg, tls_api, old) == 0 &&
	    len - old + nl < sizeof tls_msg) {
		memmove(tls_msg + nl, tls_msg + old, len - old + 1);
		memcpy(tls_msg, api, nl);
	}
	tls_api = api;
	return ret;
}

int qk__err_prepend(int errnum, const char *fmt, ...)
{
	char ctx[256];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(ctx, sizeof ctx, fmt, ap);
	va_end(ap);
	if (!tls_recorded)
		return qk__err(errnum, "%s", ctx);
	/* "api: inner" becomes "api: ctx: inner" (the inner errno stays). */
	size_t api = strlen(tls_api) + 2, cl = strlen(ctx);
	size_t len = strlen(tls_msg);
	if (len >= api && api + cl + 2 < sizeof tls_msg) {
		size_t keep = qk_min_u64(len - api, sizeof tls_msg - 1 - api - cl - 2);
		memmove(tls_msg + api + cl + 2, tls_msg + api, keep);
		tls_msg[api + cl + 2 + keep] = '\0';
		memcpy(tls_msg + api, ctx, cl);
		memcpy(tls_msg + api + cl, ": ", 2);
		for (char *p = tls_msg + api; p < tls_msg + api + cl; p++)
			if ((unsigned char)*p < 0x20 || *p == 0x7f)
				*p = '?';
	}
	return -tls_errno;
}

int qk__err_sys(int errnum, const char *what)
{
	if (errnum < 0)
		errnum = -errnum;
	return qk__err(errnum, "%s: %s", what, strerror(errnum));
}

QK_EXPORT const char *qk_last_error(void)
{
	return tls_msg;
}

QK_EXPORT int qk_last_errno(void)
{
	return tls_errno;
}

int qk__struct_size_ok(uint32_t size, size_t v1, const char *what)
{
	if (size < v1)
		return qk__err(EINVAL, "struct %s: struct_size %u is smaller than its first version "
			       "(%zu bytes): set it to sizeof (the _init function does)", what, size, v1);
	return 0;
}

void qk__struct_in(void *dst, size_t full, const void *src)
{
	uint32_t size;
	memcpy(&size, src, sizeof size);
	if (size > full)
		size = (uint32_t)full;          /* a newer caller's fields are not ours */
	memcpy((char *)dst + sizeof size, (const char *)src + sizeof size, size - sizeof size);
}

void qk__struct_out(void *dst, const void *src, size_t full)
{
	uint32_t size;
	memcpy(&size, dst, sizeof size);
	if (size > full)
		size = (uint32_t)full;
	memcpy((char *)dst + sizeof size, (const char *)src + sizeof size, size - sizeof size);
}
