/*
 * QCOW2 on-disk layout (QEMU docs/interop/qcow2.txt): magics, field
 * offsets, entry bits, and the limits we enforce, each with its reason.
 * Every integer on disk is big-endian.
 */
#ifndef QK_QCOW2_FORMAT_H
#define QK_QCOW2_FORMAT_H

#include <stdint.h>
#include <string.h>

#define QCOW2_MAGIC 0x514649FBu /* "QFI\xfb" */

/* Header field offsets. */
#define HDR_MAGIC              0
#define HDR_VERSION            4
#define HDR_BACKING_OFFSET     8
#define HDR_BACKING_SIZE       16
#define HDR_CLUSTER_BITS       20
#define HDR_SIZE               24
#define HDR_CRYPT_METHOD       32
#define HDR_L1_SIZE            36
#define HDR_L1_OFFSET          40
#define HDR_RT_OFFSET          48
#define HDR_RT_CLUSTERS        56
#define HDR_NB_SNAPSHOTS       60
#define HDR_SNAPSHOTS_OFFSET   64
#define HDR_INCOMPAT           72
#define HDR_COMPAT             80
#define HDR_AUTOCLEAR          88
#define HDR_REFCOUNT_ORDER     96
#define HDR_HEADER_LENGTH      100
#define HDR_COMPRESSION_TYPE   104
#define HDR_V2_LENGTH          72
#define HDR_V3_MIN_LENGTH      104

/* Feature bits. */
#define INCOMPAT_DIRTY        (1ull << 0)
#define INCOMPAT_CORRUPT      (1ull << 1)
#define INCOMPAT_DATA_FILE    (1ull << 2)
#define INCOMPAT_COMPRESSION  (1ull << 3)
#define INCOMPAT_EXTL2        (1ull << 4)
#define INCOMPAT_KNOWN        0x1full
#define COMPAT_LAZY_REFCOUNTS (1ull << 0)
#define AUTOCLEAR_BITMAPS     (1ull << 0)
#define AUTOCLEAR_DATA_RAW    (1ull << 1)

/* Header extension types. */
#define EXT_END          0x00000000u
#define EXT_BACKING_FMT  0xE2792ACAu
#define EXT_FEATURES     0x6803F857u
#define EXT_BITMAPS      0x23852875u
#define EXT_CRYPTO       0x0537BE77u
#define EXT_DATA_FILE    0x44415441u

/* Cluster sizes: 512 B to 2 MiB, as QEMU accepts (the spec allows larger,
 * but no writer makes them and they make single allocations unbounded). */
#define MIN_CLUSTER_BITS 9
#define MAX_CLUSTER_BITS 21
/* Extended L2 needs 512-byte subclusters: 32 of them per cluster. */
#define MIN_EXTL2_CLUSTER_BITS 14
#define SUBCLUSTERS 32

/* Table limits, QEMU's: larger tables are refused rather than read. */
#define MAX_L1_BYTES        (32ull << 20)   /* QCOW_MAX_L1_SIZE */
#define MAX_REFTABLE_BYTES  (8ull << 20)    /* QCOW_MAX_REFTABLE_SIZE */
#define MAX_SNAPSHOTS       65536u          /* QCOW_MAX_SNAPSHOTS */
#define MAX_SNAPSHOT_EXTRA  1024u           /* QCOW_MAX_SNAPSHOT_EXTRA_DATA */
#define MAX_BITMAPS         65535u
#define MAX_BITMAP_DIR_BYTES (1024ull * 65535)
#define MAX_BACKING_NAME    1023u
#define MAX_BACKING_FMT     15u
#define MAX_DATA_FILE_NAME  4096u
/* Host offsets have 56 bits (QCOW_MAX_CLUSTER_OFFSET). */
#define MAX_HOST_OFFSET     ((1ull << 56) - 1)
/* Crypt methods. */
#define CRYPT_NONE 0
#define CRYPT_AES  1
#define CRYPT_LUKS 2

/* L1 entries. */
#define L1E_OFFSET_MASK   0x00fffffffffffe00ull
#define L1E_RESERVED_MASK 0x7f000000000001ffull
#define RT_RESERVED_MASK  0x1ffull            /* refcount table entry */
#define QCOW_OFLAG_COPIED     (1ull << 63)
#define QCOW_OFLAG_COMPRESSED (1ull << 62)
#define QCOW_OFLAG_ZERO       (1ull << 0)

/* L2 entries (standard descriptor). */
#define L2E_OFFSET_MASK   0x00fffffffffffe00ull
#define L2E_RESERVED_MASK 0x3f000000000001feull

/* Extended L2 bitmap: bit x allocated, bit 32+x reads as zero. */
#define SC_ALLOC_MASK 0x00000000ffffffffull
#define SC_ZERO_MASK  0xffffffff00000000ull

/* Snapshot table entry, fixed part. */
#define SNAP_FIXED_LEN 40
#define SNAP_EXTRA_LEN 24   /* vm_state_size_large, disk_size, icount */
#define SNAP_EXTRA_V3_MIN 16

/* Bitmap directory entry, fixed part; table entry bits. */
#define BM_DIR_FIXED_LEN 24
#define BM_FLAG_IN_USE   (1u << 0)
#define BM_FLAG_AUTO     (1u << 1)
#define BM_FLAG_EXTRA    (1u << 2)
#define BM_TYPE_DIRTY    1u
/* QEMU's limits on the bitmaps it writes (block/qcow2-bitmap.c), kept so
 * that every bitmap we write is one QEMU loads: granularity 512 B to
 * 2 GiB, names of at most 1023 bytes, at most 0x8000000 table entries and
 * 512 MiB of bits (what QEMU holds in memory). */
#define BM_MIN_GRAN_BITS 9
#define BM_MAX_GRAN_BITS 31
#define BM_MAX_NAME      1023u
#define BM_MAX_TABLE_ENTRIES 0x8000000ull
#define BM_MAX_PHYS_BYTES (512ull << 20)

/* The feature name table extension QEMU writes in a version 3 header
 * (left out of clusters of 4 KiB and less), and its length. */
#define V3_HEADER_LENGTH 112          /* up to the compression type, padded */
#define FEATURE_TABLE_MIN_CLUSTER 8192
#define FEATURE_ENTRY_LEN 48
#define FEATURE_TABLE_LEN (8 * FEATURE_ENTRY_LEN)

/* Fill out[FEATURE_TABLE_LEN] with QEMU's feature name table. */
static inline void qk__qcow2_feature_table(uint8_t *out)
{
	static const struct {
		uint8_t type, bit;
		const char *name;
	} t[8] = {
		{ 0, 0, "dirty bit" },
		{ 0, 1, "corrupt bit" },
		{ 0, 2, "external data file" },
		{ 0, 3, "compression type" },
		{ 0, 4, "extended L2 entries" },
		{ 1, 0, "lazy refcounts" },
		{ 2, 0, "bitmaps" },
		{ 2, 1, "raw external data" },
	};
	memset(out, 0, FEATURE_TABLE_LEN);
	for (size_t i = 0; i < 8; i++) {
		out[i * FEATURE_ENTRY_LEN] = t[i].type;
		out[i * FEATURE_ENTRY_LEN + 1] = t[i].bit;
		memcpy(out + i * FEATURE_ENTRY_LEN + 2, t[i].name, strlen(t[i].name));
	}
}

#endif
