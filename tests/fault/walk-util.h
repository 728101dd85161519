/*
 * walk-util.h - what the power-cut walkers (fault-walk.c, chain-walk.c)
 * share: running a program for its output, a number from qemu-img's JSON,
 * and whole files read and written.
 */
#ifndef QK_WALK_UTIL_H
#define QK_WALK_UTIL_H

#include <errno.h>
#include <fcntl.h>
#include <spawn.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;

/* Run argv, its stdout into out (NUL-terminated, truncated to cap); the
 * exit status, or -1. */
static inline int run_prog(char *const argv[], char *out, size_t cap)
{
	int fds[2];
	if (pipe(fds) < 0)
		return -1;
	posix_spawn_file_actions_t fa;
	posix_spawn_file_actions_init(&fa);
	posix_spawn_file_actions_adddup2(&fa, fds[1], 1);
	posix_spawn_file_actions_addclose(&fa, fds[0]);
	posix_spawn_file_actions_addopen(&fa, 2, "/dev/null", O_WRONLY, 0);
	pid_t pid;
	int e = posix_spawnp(&pid, argv[0], &fa, NULL, argv, environ);
	posix_spawn_file_actions_destroy(&fa);
	close(fds[1]);
	size_t n = 0;
	if (e == 0) {
		ssize_t k;
		while ((k = read(fds[0], out + n, cap - 1 - n)) > 0 && n + (size_t)k < cap - 1)
			n += (size_t)k;
		if (k > 0)
			n += (size_t)k;
	}
	close(fds[0]);
	out[n] = '\0';
	if (e != 0)
		return -1;
	int status;
	while (waitpid(pid, &status, 0) < 0)
		if (errno != EINTR)
			return -1;
	return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

/* The number after "key": in qemu-img's JSON, 0 when absent. */
static inline uint64_t json_num(const char *json, const char *key)
{
	char pat[64];
	snprintf(pat, sizeof pat, "\"%s\": ", key);
	const char *p = strstr(json, pat);
	return p ? strtoull(p + strlen(pat), NULL, 10) : 0;
}

static inline bool write_file(const char *path, const void *data, size_t len)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	if (fd < 0)
		return false;
	const uint8_t *p = data;
	while (len) {
		ssize_t w = write(fd, p, len);
		if (w <= 0) {
			close(fd);
			return false;
		}
		p += w;
		len -= (size_t)w;
	}
	return close(fd) == 0;
}

static inline bool read_whole(const char *path, uint8_t **buf, size_t *len)
{
	int fd = open(path, O_RDONLY);
	struct stat sb;
	if (fd < 0 || fstat(fd, &sb) < 0)
		return false;
	*len = (size_t)sb.st_size;
	*buf = malloc(*len ? *len : 1);
	size_t n = 0;
	while (*buf && n < *len) {
		ssize_t k = read(fd, *buf + n, *len - n);
		if (k <= 0)
			break;
		n += (size_t)k;
	}
	close(fd);
	return *buf && n == *len;
}

#endif /* QK_WALK_UTIL_H */
