/*
 * replay.c - runs a fuzz target without a fuzzer: every file named on the
 * command line, or found under a directory named there, goes once through
 * LLVMFuzzerTestOneInput (as zstd's tests/fuzz/regression_driver.c does).
 * An invariant broken or a sanitizer report ends the program abnormally;
 * otherwise it prints how many inputs ran and exits 0. Missing paths are
 * skipped (a corpus directory may not exist yet).
 */
#include <dirent.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static unsigned long runs;

static int run_file(const char *path, off_t size)
{
	FILE *f = fopen(path, "rb");
	uint8_t *data = malloc(size ? (size_t)size : 1);
	if (!f || !data || fread(data, 1, (size_t)size, f) != (size_t)size) {
		fprintf(stderr, "replay: %s: %s\n", path, strerror(errno ? errno : EIO));
		if (f)
			fclose(f);
		free(data);
		return -1;
	}
	fclose(f);
	LLVMFuzzerTestOneInput(data, (size_t)size);
	free(data);
	runs++;
	return 0;
}

static int run_path(const char *path)
{
	struct stat st;
	if (stat(path, &st) < 0)
		return 0;
	if (S_ISREG(st.st_mode))
		return run_file(path, st.st_size);
	if (!S_ISDIR(st.st_mode))
		return 0;
	struct dirent **names;
	int n = scandir(path, &names, NULL, alphasort);
	if (n < 0) {
		fprintf(stderr, "replay: %s: %s\n", path, strerror(errno));
		return -1;
	}
	int ret = 0;
	for (int i = 0; i < n; i++) {
		const char *e = names[i]->d_name;
		if (ret == 0 && e[0] != '.') {
			size_t len = strlen(path) + strlen(e) + 2;
			char *sub = malloc(len);
			if (!sub)
				ret = -1;
			else {
				snprintf(sub, len, "%s/%s", path, e);
				ret = run_path(sub);
				free(sub);
			}
		}
		free(names[i]);
	}
	free(names);
	return ret;
}

int main(int argc, char **argv)
{
	for (int i = 1; i < argc; i++)
		if (run_path(argv[i]) < 0)
			return 1;
	printf("replayed %lu inputs\n", runs);
	return 0;
}
