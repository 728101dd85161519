/*
 * Persistent bitmap directory (read side): names, flags and granularity
 * for listing. The bitmaps' data is not read. Bounds: at most MAX_BITMAPS
 * entries in a directory of at most MAX_BITMAP_DIR_BYTES inside the file.
 */
#include "qcow2/qcow2.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

void qk__qcow2_free_bitmaps(struct qcow2 *q)
{
	for (uint32_t i = 0; i < q->n_bitmaps; i++)
		free((char *)q->bitmaps[i].name);
	free(q->bitmaps);
	q->bitmaps = NULL;
	q->n_bitmaps = 0;
}

int qk__qcow2_read_bitmaps(qk_image *img, uint64_t dir_offset, uint64_t dir_size,
			   uint32_t nb_bitmaps)
{
	struct qcow2 *q = qcow2_of(img);
	uint64_t end;
	if (nb_bitmaps == 0 || nb_bitmaps > MAX_BITMAPS)
		return qk__err(EINVAL, "bitmaps extension of '%s' names %u bitmaps (1 to %u allowed)",
			       img->filename, nb_bitmaps, MAX_BITMAPS);
	if (dir_size == 0 || dir_size > MAX_BITMAP_DIR_BYTES)
		return qk__err(EINVAL, "bitmap directory of '%s' has a bad size (%llu bytes)",
			       img->filename, (unsigned long long)dir_size);
	if (dir_offset % q->cluster_size || dir_offset == 0 ||
	    qk_add_overflow(dir_offset, dir_size, &end) || end > q->file_size)
		return qk__err(EINVAL, "bitmap directory of '%s' (offset 0x%llx, %llu bytes) lies outside the file",
			       img->filename, (unsigned long long)dir_offset, (unsigned long long)dir_size);
	uint8_t *dir = malloc(dir_size);
	q->bitmaps = calloc(nb_bitmaps, sizeof *q->bitmaps);
	if (!dir || !q->bitmaps) {
		free(dir);
		return qk__err(ENOMEM, "out of memory");
	}
	q->bitmap_dir_offset = dir_offset;
	q->bitmap_dir_size = dir_size;
	int ret = qk__file_pread(img->file, dir, dir_size, dir_offset);
	uint64_t pos = 0;
	for (uint32_t i = 0; ret == 0 && i < nb_bitmaps; i++) {
		if (dir_size - pos < BM_DIR_FIXED_LEN) {
			ret = qk__err(EINVAL, "bitmap directory of '%s' ends inside entry %u",
				      img->filename, i);
			break;
		}
		const uint8_t *e = dir + pos;
		uint32_t extra = qk_be32(e + 20);
		uint16_t name_len = qk_be16(e + 18);
		uint64_t entry_len = (BM_DIR_FIXED_LEN + (uint64_t)extra + name_len + 7) & ~7ull;
		if (name_len == 0 || entry_len > dir_size - pos) {
			ret = qk__err(EINVAL, "bitmap directory entry %u of '%s' is malformed",
				      i, img->filename);
			break;
		}
		uint8_t gran_bits = e[17];
		if (gran_bits > 63) {
			ret = qk__err(EINVAL, "bitmap %u of '%s' has granularity 2^%u",
				      i, img->filename, gran_bits);
			break;
		}
		struct qk_bitmap *b = &q->bitmaps[i];
		b->table_offset = qk_be64(e);
		b->table_size = qk_be32(e + 8);
		uint32_t flags = qk_be32(e + 12);
		b->flags = (flags & BM_FLAG_IN_USE ? QK_BITMAP_IN_USE : 0) |
			   (flags & BM_FLAG_AUTO ? QK_BITMAP_AUTO : 0);
		b->type = e[16];
		b->granularity = 1ull << gran_bits;
		char *name = malloc(name_len + 1u);
		if (!name) {
			ret = qk__err(ENOMEM, "out of memory");
			break;
		}
		memcpy(name, e + BM_DIR_FIXED_LEN + extra, name_len);
		name[name_len] = '\0';
		b->name = name;
		q->n_bitmaps = i + 1;
		pos += entry_len;
	}
	free(dir);
	return ret;
}
