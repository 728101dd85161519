/*
 * QCOW2 open: the header, its extensions, the L1 table, the snapshot table
 * and the bitmap directory. Every size, offset and count read from the file
 * is checked against a named limit (format.h) with overflow-checked
 * arithmetic before it is used. Open costs O(L1 + snapshot table + bitmap
 * directory); L2 tables and refcounts are read only when needed.
 */
#include "qcow2/qcow2.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Copy an on-disk string (no NUL) into a fresh C string, refusing NULs and
 * control characters, which no valid name holds. */
static int dup_name(qk_image *img, const uint8_t *p, size_t len, const char *what,
		    char **out)
{
	for (size_t i = 0; i < len; i++)
		if (p[i] < 0x20 || p[i] == 0x7f)
			return qk__err(EINVAL, "%s of '%s' holds a control character",
				       what, img->filename);
	char *s = malloc(len + 1);
	if (!s)
		return qk__err(ENOMEM, "out of memory");
	memcpy(s, p, len);
	s[len] = '\0';
	*out = s;
	return 0;
}

/* Feature name table: 48-byte entries (type, bit, 46-byte name). Only the
 * names of incompatible bits are kept, for the refusal message. */
static int parse_feature_table(qk_image *img, struct qcow2 *q, const uint8_t *p,
			       uint32_t len)
{
	for (uint32_t i = 0; i + 48 <= len; i += 48) {
		uint8_t type = p[i], bit = p[i + 1];
		if (type != 0 || bit >= 64 || q->feature_names[bit])
			continue;
		char name[47];
		size_t n = 0;
		for (; n < 46 && p[i + 2 + n]; n++)
			name[n] = (p[i + 2 + n] >= 0x20 && p[i + 2 + n] < 0x7f) ? (char)p[i + 2 + n] : '?';
		name[n] = '\0';
		q->feature_names[bit] = strdup(name);
		if (!q->feature_names[bit])
			return qk__err(ENOMEM, "out of memory");
	}
	return 0;
}

/*
 * Walk the header extensions in hdr[start, end). Unknown types are skipped;
 * a known type may appear once. Every extension must fit before `end`.
 */
static int parse_extensions(qk_image *img, struct qcow2 *q, const uint8_t *hdr,
			    uint64_t start, uint64_t end)
{
	bool seen_fmt = false, seen_feat = false, seen_bm = false, seen_crypto = false,
	     seen_df = false;
	uint64_t off = start;
	while (off < end) {
		if (end - off < 8)
			return qk__err(EINVAL, "header extension at offset %llu of '%s' is truncated",
				       (unsigned long long)off, img->filename);
		uint32_t type = qk_be32(hdr + off);
		uint32_t len = qk_be32(hdr + off + 4);
		off += 8;
		if (type == EXT_END)
			return 0;
		if (len > end - off)
			return qk__err(EINVAL, "header extension 0x%08x at offset %llu of '%s' "
				       "(%u bytes) overflows the header cluster",
				       type, (unsigned long long)off - 8, img->filename, len);
		const uint8_t *data = hdr + off;
		bool *seen = NULL;
		int ret = 0;
		switch (type) {
		case EXT_BACKING_FMT:
			seen = &seen_fmt;
			if (len > MAX_BACKING_FMT)
				return qk__err(EINVAL, "backing format name of '%s' is too long (%u bytes, at most %u)",
					       img->filename, len, MAX_BACKING_FMT);
			if (!*seen)
				ret = dup_name(img, data, len, "backing format name", &q->backing_format);
			break;
		case EXT_FEATURES:
			seen = &seen_feat;
			if (!*seen)
				ret = parse_feature_table(img, q, data, len);
			break;
		case EXT_BITMAPS:
			seen = &seen_bm;
			if (len != 24)
				return qk__err(EINVAL, "bitmaps extension of '%s' has a bad length (%u bytes, 24 expected)",
					       img->filename, len);
			if (qk_be32(data + 4) != 0 && (q->autoclear & AUTOCLEAR_BITMAPS))
				return qk__err(EINVAL, "bitmaps extension of '%s' has its reserved field set (0x%08x)",
					       img->filename, qk_be32(data + 4));
			/* Only trusted while the autoclear bit says a bitmap-aware
			 * program wrote last, as the specification requires. */
			if (!*seen && (q->autoclear & AUTOCLEAR_BITMAPS))
				ret = qk__qcow2_read_bitmaps(img, qk_be64(data + 16), qk_be64(data + 8),
							     qk_be32(data));
			break;
		case EXT_CRYPTO:
			seen = &seen_crypto;
			/* The specification ties it to LUKS: anywhere else it is a
			 * header that some reader would take for key material. */
			if (q->crypt_method != CRYPT_LUKS)
				return qk__err(EINVAL, "'%s' has a full disk encryption header extension, which only "
					       "a LUKS-encrypted image may have (crypt_method %u)",
					       img->filename, q->crypt_method);
			if (len != 16)
				return qk__err(EINVAL, "full disk encryption header extension of '%s' has a bad "
					       "length (%u bytes, 16 expected)", img->filename, len);
			break;
		case EXT_DATA_FILE:
			seen = &seen_df;
			if (len == 0 || len > MAX_DATA_FILE_NAME)
				return qk__err(EINVAL, "external data file name of '%s' has a bad length (%u)",
					       img->filename, len);
			if (!*seen)
				ret = dup_name(img, data, len, "external data file name", &q->data_file_name);
			break;
		default:
			break;          /* unknown: skipped (and kept by writers) */
		}
		if (ret < 0)
			return ret;
		if (seen) {
			if (*seen)
				return qk__err(EINVAL, "header of '%s' has two 0x%08x extensions",
					       img->filename, type);
			*seen = true;
		}
		uint64_t padded = ((uint64_t)len + 7) & ~7ull;
		if (padded > end - off)
			padded = end - off;
		off += padded;
	}
	return 0;
}

/* Refuse incompatible features we do not know, naming them. */
static int check_incompat(qk_image *img, struct qcow2 *q)
{
	uint64_t unknown = q->incompat & ~INCOMPAT_KNOWN;
	if (!unknown)
		return 0;
	char names[256] = "";
	size_t used = 0;
	for (unsigned bit = 0; bit < 64; bit++) {
		if (!(unknown & (1ull << bit)))
			continue;
		const char *n = qk__qcow2_feature_name(q, bit);
		char item[64];
		if (n)
			snprintf(item, sizeof item, "%s'%s' (bit %u)", used ? ", " : "", n, bit);
		else
			snprintf(item, sizeof item, "%sbit %u", used ? ", " : "", bit);
		size_t il = strlen(item);
		if (used + il < sizeof names) {
			memcpy(names + used, item, il + 1);
			used += il;
		}
	}
	return qk__err(ENOTSUP, "'%s' uses unsupported incompatible feature(s): %s (mask 0x%llx)",
		       img->filename, names, (unsigned long long)unknown);
}

/* Read and check the active L1 table. */
static int load_l1(qk_image *img, struct qcow2 *q)
{
	uint64_t per_l2_bytes = q->cluster_size << q->l2_bits;
	/* Entries needed to map the virtual size, computed without overflow. */
	uint64_t needed = img->size / per_l2_bytes + (img->size % per_l2_bytes != 0);
	if ((uint64_t)q->l1_size * 8 > MAX_L1_BYTES)
		return qk__err(EFBIG, "active L1 table of '%s' is too large (%u entries, at most %llu)",
			       img->filename, q->l1_size, MAX_L1_BYTES / 8);
	if (q->l1_size < needed)
		return qk__err(EINVAL, "L1 table of '%s' is too small: %u entries for a virtual size "
			       "of %llu bytes, which needs %llu",
			       img->filename, q->l1_size, (unsigned long long)img->size,
			       (unsigned long long)needed);
	if (q->l1_size == 0)
		return 0;
	uint64_t bytes = (uint64_t)q->l1_size * 8, end;
	if (q->l1_offset % q->cluster_size)
		return qk__err(EINVAL, "L1 table offset 0x%llx of '%s' is not cluster aligned",
			       (unsigned long long)q->l1_offset, img->filename);
	if (q->l1_offset == 0 || qk_add_overflow(q->l1_offset, bytes, &end) || end > q->file_size)
		return qk__err(EINVAL, "L1 table of '%s' (offset 0x%llx, %llu bytes) lies outside the file (%llu bytes)",
			       img->filename, (unsigned long long)q->l1_offset,
			       (unsigned long long)bytes, (unsigned long long)q->file_size);
	q->l1 = malloc(bytes);
	if (!q->l1)
		return qk__err(ENOMEM, "out of memory for the L1 table");
	int ret = qk__file_pread(img->file, q->l1, bytes, q->l1_offset);
	if (ret < 0)
		return ret;
	qk_be64_table_to_host(q->l1, q->l1_size);
	return 0;
}

static int check_refcount_table(qk_image *img, struct qcow2 *q)
{
	if (q->refcount_order > 6)
		return qk__err(EINVAL, "refcount order %u of '%s' is invalid (at most 6: 64-bit refcounts)",
			       q->refcount_order, img->filename);
	if (q->rt_clusters == 0)
		return qk__err(EINVAL, "'%s' has no reference count table", img->filename);
	if ((uint64_t)q->rt_clusters * q->cluster_size > MAX_REFTABLE_BYTES)
		return qk__err(EFBIG, "reference count table of '%s' is too large (%u clusters)",
			       img->filename, q->rt_clusters);
	uint64_t end;
	if (q->rt_offset % q->cluster_size)
		return qk__err(EINVAL, "reference count table offset 0x%llx of '%s' is not cluster aligned",
			       (unsigned long long)q->rt_offset, img->filename);
	if (q->rt_offset == 0 ||
	    qk_add_overflow(q->rt_offset, (uint64_t)q->rt_clusters * q->cluster_size, &end) ||
	    end > MAX_HOST_OFFSET)
		return qk__err(EINVAL, "reference count table offset 0x%llx of '%s' is invalid",
			       (unsigned long long)q->rt_offset, img->filename);
	return 0;
}

/* Parse and check the fixed header fields in hdr (at least 104 bytes, the
 * v2 fields only when version 2). */
static int parse_fixed(qk_image *img, struct qcow2 *q, const uint8_t *hdr)
{
	q->version = qk_be32(hdr + HDR_VERSION);
	if (q->version == 1)
		return qk__err(ENOTSUP, "'%s' is a qcow (version 1) image, which is not supported",
			       img->filename);
	if (q->version != 2 && q->version != 3)
		return qk__err(ENOTSUP, "Unsupported qcow2 version %u in '%s'", q->version, img->filename);
	q->cluster_bits = qk_be32(hdr + HDR_CLUSTER_BITS);
	if (q->cluster_bits < MIN_CLUSTER_BITS || q->cluster_bits > MAX_CLUSTER_BITS)
		return qk__err(EINVAL, "cluster size of '%s' is invalid (cluster_bits %u; "
			       "supported: 9 to 21, 512 bytes to 2 MiB)", img->filename, q->cluster_bits);
	q->cluster_size = 1ull << q->cluster_bits;
	img->size = qk_be64(hdr + HDR_SIZE);
	if (img->size > (uint64_t)INT64_MAX)
		return qk__err(EFBIG, "virtual size %llu of '%s' is too large",
			       (unsigned long long)img->size, img->filename);
	q->crypt_method = qk_be32(hdr + HDR_CRYPT_METHOD);
	q->l1_size = qk_be32(hdr + HDR_L1_SIZE);
	q->l1_offset = qk_be64(hdr + HDR_L1_OFFSET);
	q->rt_offset = qk_be64(hdr + HDR_RT_OFFSET);
	q->rt_clusters = qk_be32(hdr + HDR_RT_CLUSTERS);
	q->nb_snapshots = qk_be32(hdr + HDR_NB_SNAPSHOTS);
	q->snapshots_offset = qk_be64(hdr + HDR_SNAPSHOTS_OFFSET);
	if (q->version == 2) {
		q->refcount_order = 4;
		q->header_length = HDR_V2_LENGTH;
		return 0;
	}
	q->incompat = qk_be64(hdr + HDR_INCOMPAT);
	q->compat = qk_be64(hdr + HDR_COMPAT);
	q->autoclear = qk_be64(hdr + HDR_AUTOCLEAR);
	q->refcount_order = qk_be32(hdr + HDR_REFCOUNT_ORDER);
	q->header_length = qk_be32(hdr + HDR_HEADER_LENGTH);
	if (q->header_length < HDR_V3_MIN_LENGTH)
		return qk__err(EINVAL, "qcow2 header of '%s' is too short (header_length %u, at least 104)",
			       img->filename, q->header_length);
	if (q->header_length > q->cluster_size)
		return qk__err(EINVAL, "qcow2 header of '%s' exceeds the cluster size (header_length %u)",
			       img->filename, q->header_length);
	if (q->header_length % 8)
		return qk__err(EINVAL, "qcow2 header length %u of '%s' is not a multiple of 8",
			       q->header_length, img->filename);
	return 0;
}

/* Checks of the compression type field and its incompatible bit. */
static int parse_compression(qk_image *img, struct qcow2 *q, const uint8_t *hdr)
{
	q->compression_type = q->header_length > HDR_COMPRESSION_TYPE ? hdr[HDR_COMPRESSION_TYPE] : 0;
	bool bit = q->incompat & INCOMPAT_COMPRESSION;
	if (q->compression_type > QK_COMPRESSION_ZSTD)
		return qk__err(ENOTSUP, "'%s' uses unknown compression type %u",
			       img->filename, q->compression_type);
	if (bit && q->compression_type == QK_COMPRESSION_ZLIB)
		return qk__err(EINVAL, "'%s': the compression type incompatible bit is set but the type is zlib",
			       img->filename);
	if (!bit && q->compression_type != QK_COMPRESSION_ZLIB)
		return qk__err(EINVAL, "'%s': compression type %u needs the compression type incompatible bit",
			       img->filename, q->compression_type);
	return 0;
}

/*
 * Parse the header of the image on img->file into q (allocated and set up
 * by the driver): the fixed fields, the extensions (backing format, feature
 * names, bitmaps, data file name), the backing file name, the L1 table and
 * the snapshot table, each checked against its limits. Returns 0 or a
 * negative errno (recorded); q keeps what was read, for the driver's close.
 */
int qk__qcow2_parse_header(qk_image *img, struct qcow2 *q, const struct qk_open_options *opts)
{
	uint8_t *hdr = NULL;
	int ret = qk__file_get_size(img->file, &q->file_size);
	if (ret < 0)
		goto out;
	if (q->file_size < HDR_V2_LENGTH) {
		ret = qk__err(EINVAL, "'%s' is too short to be a qcow2 image (%llu bytes)",
			      img->filename, (unsigned long long)q->file_size);
		goto out;
	}
	uint8_t fixed[HDR_V3_MIN_LENGTH];
	ret = qk__file_pread(img->file, fixed, sizeof fixed, 0);
	if (ret < 0)
		goto out;
	if (qk_be32(fixed) != QCOW2_MAGIC) {
		ret = qk__err(EINVAL, "'%s' is not a qcow2 image (bad magic)", img->filename);
		goto out;
	}
	ret = parse_fixed(img, q, fixed);
	if (ret < 0)
		goto out;

	/* Cluster 0 holds the header, extensions and backing name. */
	hdr = malloc(q->cluster_size);
	if (!hdr) {
		ret = qk__err(ENOMEM, "out of memory");
		goto out;
	}
	ret = qk__file_pread(img->file, hdr, q->cluster_size, 0);
	if (ret < 0)
		goto out;
	if (q->file_size < q->header_length) {
		ret = qk__err(EINVAL, "'%s' is truncated inside its header", img->filename);
		goto out;
	}
	ret = parse_compression(img, q, hdr);
	if (ret < 0)
		goto out;

	uint64_t backing_off = qk_be64(hdr + HDR_BACKING_OFFSET);
	uint32_t backing_len = qk_be32(hdr + HDR_BACKING_SIZE);
	if (backing_off) {
		if (backing_len > MAX_BACKING_NAME || backing_len == 0) {
			ret = qk__err(EINVAL, "backing file name of '%s' has a bad length (%u bytes, at most %u)",
				      img->filename, backing_len, MAX_BACKING_NAME);
			goto out;
		}
		if (backing_off < q->header_length || backing_off > q->cluster_size ||
		    backing_len > q->cluster_size - backing_off) {
			ret = qk__err(EINVAL, "backing file name of '%s' (offset %llu, %u bytes) lies outside the header cluster",
				      img->filename, (unsigned long long)backing_off, backing_len);
			goto out;
		}
		ret = dup_name(img, hdr + backing_off, backing_len, "backing file name", &q->backing_file);
		if (ret < 0)
			goto out;
	}
	/* Version 2 images carry extensions too (from byte 72). */
	ret = parse_extensions(img, q, hdr, q->header_length,
			       backing_off ? backing_off : q->cluster_size);
	if (ret < 0)
		goto out;
	ret = check_incompat(img, q);
	if (ret < 0)
		goto out;
	if (q->crypt_method != CRYPT_NONE) {
		ret = qk__err(ENOTSUP, "'%s' is encrypted (%s), which is not supported",
			      img->filename, q->crypt_method == CRYPT_AES ? "AES" :
			      q->crypt_method == CRYPT_LUKS ? "LUKS" : "unknown method");
		goto out;
	}
	if ((q->incompat & INCOMPAT_CORRUPT) && (opts->flags & QK_OPEN_RDWR) &&
	    !(opts->flags & QK_OPEN_CHECK)) {
		ret = qk__err(EACCES, "'%s' is marked corrupt and cannot be opened read-write "
			      "(repair it with check -r all)", img->filename);
		goto out;
	}
	q->extl2 = q->incompat & INCOMPAT_EXTL2;
	if (q->extl2 && q->cluster_bits < MIN_EXTL2_CLUSTER_BITS) {
		ret = qk__err(EINVAL, "'%s' uses extended L2 entries with %llu-byte clusters (at least 16384 needed)",
			      img->filename, (unsigned long long)q->cluster_size);
		goto out;
	}
	q->l2_entry_size = q->extl2 ? 16 : 8;
	q->l2_bits = q->cluster_bits - (q->extl2 ? 4 : 3);
	q->sc_bits = q->extl2 ? q->cluster_bits - 5 : q->cluster_bits;
	if ((q->autoclear & AUTOCLEAR_DATA_RAW) && !(q->incompat & INCOMPAT_DATA_FILE)) {
		ret = qk__err(EINVAL, "'%s' has the raw external data bit without an external data file",
			      img->filename);
		goto out;
	}
	ret = check_refcount_table(img, q);
	if (ret < 0)
		goto out;
	ret = load_l1(img, q);
	if (ret < 0)
		goto out;
	ret = qk__qcow2_read_snapshots(img);
	if (ret < 0)
		goto out;
	q->has_data_file = q->incompat & INCOMPAT_DATA_FILE;
	if (q->has_data_file && q->data_file_name &&
	    !(q->data_file_path = qk__file_resolve(img->filename, q->data_file_name)))
		ret = qk__err(ENOMEM, "out of memory");
	if (ret == 0 && q->backing_file &&
	    !(q->full_backing_file = qk__file_resolve(img->filename, q->backing_file)))
		ret = qk__err(ENOMEM, "out of memory");
out:
	free(hdr);
	return ret;
}
