/*
 * Internal snapshot table (read side). Entries are variable length: a
 * 40-byte fixed part, extra data, the id and the name, padded to 8 bytes.
 * Bounds: at most MAX_SNAPSHOTS entries, MAX_SNAPSHOT_EXTRA bytes of extra
 * data each, and the whole table inside the file.
 */
#include "qcow2/qcow2.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

void qk__qcow2_free_snapshots(struct qcow2 *q)
{
	for (uint32_t i = 0; i < q->n_snapshots; i++) {
		free((char *)q->snapshots[i].id);
		free((char *)q->snapshots[i].name);
		if (q->snap_extra)
			free(q->snap_extra[i].bytes);
	}
	free(q->snapshots);
	free(q->snap_extra);
	q->snapshots = NULL;
	q->snap_extra = NULL;
	q->n_snapshots = 0;
}

/* An id or name as stored (a NUL ends it, as for QEMU). Its bytes are kept:
 * the CLI escapes them for the terminal, and JSON gives them back exactly. */
static char *dup_str(const uint8_t *p, size_t len)
{
	char *s = malloc(len + 1);
	if (s) {
		memcpy(s, p, len);
		s[len] = '\0';
	}
	return s;
}

int qk__qcow2_read_snapshots(qk_image *img)
{
	struct qcow2 *q = qcow2_of(img);
	/* As QEMU: the offset must be aligned even when there is no table. */
	if (q->nb_snapshots == 0 && q->snapshots_offset % q->cluster_size)
		return qk__err(EINVAL, "snapshot table offset 0x%llx of '%s' is invalid",
			       (unsigned long long)q->snapshots_offset, img->filename);
	if (q->nb_snapshots == 0)
		return 0;
	if (q->nb_snapshots > MAX_SNAPSHOTS)
		return qk__err(EFBIG, "'%s' has too many snapshots (%u, at most %u)",
			       img->filename, q->nb_snapshots, MAX_SNAPSHOTS);
	if (q->snapshots_offset % q->cluster_size || q->snapshots_offset == 0 ||
	    q->snapshots_offset >= q->file_size)
		return qk__err(EINVAL, "snapshot table offset 0x%llx of '%s' is invalid",
			       (unsigned long long)q->snapshots_offset, img->filename);
	q->snapshots = calloc(q->nb_snapshots, sizeof *q->snapshots);
	q->snap_extra = calloc(q->nb_snapshots, sizeof *q->snap_extra);
	if (!q->snapshots || !q->snap_extra)
		return qk__err(ENOMEM, "out of memory");
	uint64_t off = q->snapshots_offset;
	uint8_t fixed[SNAP_FIXED_LEN];
	uint8_t *var = malloc(MAX_SNAPSHOT_EXTRA + 2 * 65535);
	if (!var)
		return qk__err(ENOMEM, "out of memory");
	int ret = 0;
	for (uint32_t i = 0; i < q->nb_snapshots; i++) {
		if (off + SNAP_FIXED_LEN > q->file_size) {
			ret = qk__err(EINVAL, "snapshot table of '%s' runs past the end of the file (entry %u)",
				      img->filename, i);
			break;
		}
		ret = qk__file_pread(img->file, fixed, sizeof fixed, off);
		if (ret < 0)
			break;
		uint32_t extra = qk_be32(fixed + 36);
		uint16_t id_len = qk_be16(fixed + 12), name_len = qk_be16(fixed + 14);
		if (extra > MAX_SNAPSHOT_EXTRA) {
			ret = qk__err(EFBIG, "snapshot %u of '%s' has too much extra data (%u bytes, at most %u)",
				      i, img->filename, extra, MAX_SNAPSHOT_EXTRA);
			break;
		}
		uint64_t var_len = (uint64_t)extra + id_len + name_len;
		uint64_t entry_len = (SNAP_FIXED_LEN + var_len + 7) & ~7ull;
		if (off + SNAP_FIXED_LEN + var_len > q->file_size ||
		    off + entry_len - q->snapshots_offset > MAX_SNAPSHOTS * (uint64_t)MAX_SNAPSHOT_EXTRA) {
			ret = qk__err(EINVAL, "snapshot %u of '%s' runs past the end of the file",
				      i, img->filename);
			break;
		}
		ret = qk__file_pread(img->file, var, var_len, off + SNAP_FIXED_LEN);
		if (ret < 0)
			break;
		struct qk_snapshot *s = &q->snapshots[i];
		s->l1_table_offset = qk_be64(fixed);
		s->l1_size = qk_be32(fixed + 8);
		s->date_sec = qk_be32(fixed + 16);
		s->date_nsec = qk_be32(fixed + 20);
		s->vm_clock_nsec = qk_be64(fixed + 24);
		s->vm_state_size = qk_be32(fixed + 32);
		s->disk_size = img->size;
		s->icount = UINT64_MAX;
		if (extra >= 8)
			s->vm_state_size = qk_be64(var);
		if (extra >= 16)
			s->disk_size = qk_be64(var + 8);
		if (extra >= 24)
			s->icount = qk_be64(var + 16);
		s->id = dup_str(var + extra, id_len);
		s->name = dup_str(var + extra + id_len, name_len);
		q->n_snapshots = i + 1;
		/* Extra data this version does not know is kept, as QEMU keeps
		 * it, for when the table is written again. */
		if (extra > SNAP_EXTRA_LEN) {
			q->snap_extra[i].len = extra - SNAP_EXTRA_LEN;
			q->snap_extra[i].bytes = malloc(q->snap_extra[i].len);
			if (q->snap_extra[i].bytes)
				memcpy(q->snap_extra[i].bytes, var + SNAP_EXTRA_LEN, q->snap_extra[i].len);
		}
		if (!s->id || !s->name || (extra > SNAP_EXTRA_LEN && !q->snap_extra[i].bytes)) {
			ret = qk__err(ENOMEM, "out of memory");
			break;
		}
		off += entry_len;
	}
	q->snapshots_bytes = off - q->snapshots_offset;
	free(var);
	return ret;
}

int qk__qcow2_snapshot_l1(qk_image *img, const struct qk_snapshot *sn, uint64_t **l1)
{
	struct qcow2 *q = qcow2_of(img);
	uint64_t bytes = (uint64_t)sn->l1_size * 8, end;
	*l1 = NULL;
	if (bytes > MAX_L1_BYTES)
		return qk__err(EFBIG, "L1 table of snapshot '%s' of '%s' is too large (%u entries, at most %llu)",
			       sn->name, img->filename, sn->l1_size, MAX_L1_BYTES / 8);
	if (sn->l1_table_offset % q->cluster_size ||
	    qk_add_overflow(sn->l1_table_offset, bytes, &end) || end > q->file_size ||
	    (bytes && sn->l1_table_offset == 0))
		return qk__err(EINVAL, "L1 table of snapshot '%s' of '%s' (offset 0x%llx, %llu bytes) "
			       "is unaligned or lies outside the file", sn->name, img->filename,
			       (unsigned long long)sn->l1_table_offset, (unsigned long long)bytes);
	*l1 = calloc(1, bytes ? bytes : 8);
	if (!*l1)
		return qk__err(ENOMEM, "out of memory for the L1 table of snapshot '%s'", sn->name);
	int ret = bytes ? qk__file_pread(img->file, *l1, bytes, sn->l1_table_offset) : 0;
	if (ret < 0) {
		free(*l1);
		*l1 = NULL;
		return ret;
	}
	qk_be64_table_to_host(*l1, sn->l1_size);
	return 0;
}

void qk__qcow2_put_snapshot_entry(uint8_t *buf, uint64_t *len, const struct qk_snapshot *sn,
				  const uint8_t *extra, uint32_t extra_len)
{
	uint8_t *p = buf + *len;
	size_t id_len = strlen(sn->id), name_len = strlen(sn->name);
	uint64_t n = SNAP_FIXED_LEN + SNAP_EXTRA_LEN + extra_len + id_len + name_len;
	memset(p, 0, (n + 7) & ~7ull);
	qk_put_be64(p, sn->l1_table_offset);
	qk_put_be32(p + 8, sn->l1_size);
	qk_put_be16(p + 12, (uint16_t)id_len);
	qk_put_be16(p + 14, (uint16_t)name_len);
	qk_put_be32(p + 16, sn->date_sec);
	qk_put_be32(p + 20, sn->date_nsec);
	qk_put_be64(p + 24, sn->vm_clock_nsec);
	qk_put_be32(p + 32, (uint32_t)sn->vm_state_size);
	qk_put_be32(p + 36, SNAP_EXTRA_LEN + extra_len);
	qk_put_be64(p + 40, sn->vm_state_size);
	qk_put_be64(p + 48, sn->disk_size);
	qk_put_be64(p + 56, sn->icount);
	p += SNAP_FIXED_LEN + SNAP_EXTRA_LEN;
	if (extra_len)
		memcpy(p, extra, extra_len);
	memcpy(p + extra_len, sn->id, id_len);
	memcpy(p + extra_len + id_len, sn->name, name_len);
	*len += (n + 7) & ~7ull;
}
