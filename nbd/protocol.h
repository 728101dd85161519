/*
 * protocol.h - NBD wire constants (NetworkBlockDevice doc/proto.md).
 *
 * Everything on the wire is big-endian. Only the fixed newstyle handshake
 * is spoken; the oldstyle and non-fixed newstyle constants are absent on
 * purpose. Names follow the specification's, minus the NBD_ prefix where
 * it would repeat.
 *
 * SPDX-License-Identifier: MIT
 */
#ifndef QK_NBD_PROTOCOL_H
#define QK_NBD_PROTOCOL_H

#include <stdint.h>

/* ---- handshake ------------------------------------------------------------ */

#define NBD_MAGIC          UINT64_C(0x4e42444d41474943) /* "NBDMAGIC" */
#define NBD_OPTS_MAGIC     UINT64_C(0x49484156454f5054) /* "IHAVEOPT" */
#define NBD_REP_MAGIC      UINT64_C(0x0003e889045565a9)

/* Handshake flags (server) and client flags. */
#define NBD_FLAG_FIXED_NEWSTYLE   (1u << 0)
#define NBD_FLAG_NO_ZEROES        (1u << 1)
#define NBD_FLAG_C_FIXED_NEWSTYLE (1u << 0)
#define NBD_FLAG_C_NO_ZEROES      (1u << 1)

/* Options. */
#define NBD_OPT_EXPORT_NAME       1
#define NBD_OPT_ABORT             2
#define NBD_OPT_LIST              3
#define NBD_OPT_PEEK_EXPORT       4 /* withdrawn */
#define NBD_OPT_STARTTLS          5
#define NBD_OPT_INFO              6
#define NBD_OPT_GO                7
#define NBD_OPT_STRUCTURED_REPLY  8
#define NBD_OPT_LIST_META_CONTEXT 9
#define NBD_OPT_SET_META_CONTEXT  10
#define NBD_OPT_EXTENDED_HEADERS  11

/* Option reply types; errors have bit 31 set. */
#define NBD_REP_ACK               1
#define NBD_REP_SERVER            2
#define NBD_REP_INFO              3
#define NBD_REP_META_CONTEXT      4
#define NBD_REP_ERR_UNSUP         0x80000001u
#define NBD_REP_ERR_POLICY        0x80000002u
#define NBD_REP_ERR_INVALID       0x80000003u
#define NBD_REP_ERR_PLATFORM      0x80000004u
#define NBD_REP_ERR_TLS_REQD      0x80000005u
#define NBD_REP_ERR_UNKNOWN       0x80000006u
#define NBD_REP_ERR_SHUTDOWN      0x80000007u
#define NBD_REP_ERR_BLOCK_SIZE_REQD 0x80000008u
#define NBD_REP_ERR_TOO_BIG       0x80000009u

/* NBD_REP_INFO item types. */
#define NBD_INFO_EXPORT           0
#define NBD_INFO_NAME             1
#define NBD_INFO_DESCRIPTION      2
#define NBD_INFO_BLOCK_SIZE       3

/* Bytes of zeros after the export-name reply, unless NO_ZEROES. */
#define NBD_EXPORT_NAME_PAD       124

/* Strings (names, descriptions, queries) MUST NOT exceed this. */
#define NBD_MAX_STRING            4096

/* ---- transmission flags (u16) -------------------------------------------- */

#define NBD_FLAG_HAS_FLAGS        (1u << 0)
#define NBD_FLAG_READ_ONLY        (1u << 1)
#define NBD_FLAG_SEND_FLUSH       (1u << 2)
#define NBD_FLAG_SEND_FUA         (1u << 3)
#define NBD_FLAG_ROTATIONAL       (1u << 4)
#define NBD_FLAG_SEND_TRIM        (1u << 5)
#define NBD_FLAG_SEND_WRITE_ZEROES (1u << 6)
#define NBD_FLAG_SEND_DF          (1u << 7)
#define NBD_FLAG_CAN_MULTI_CONN   (1u << 8)
#define NBD_FLAG_SEND_RESIZE      (1u << 9)
#define NBD_FLAG_SEND_CACHE       (1u << 10)
#define NBD_FLAG_SEND_FAST_ZERO   (1u << 11)

/* ---- requests and replies ---------------------------------------------------- */

#define NBD_REQUEST_MAGIC         0x25609513u
#define NBD_SIMPLE_REPLY_MAGIC    0x67446698u
#define NBD_STRUCTURED_REPLY_MAGIC 0x668e33efu

#define NBD_REQUEST_SIZE          28 /* magic, flags, type, cookie, offset, length */
#define NBD_SIMPLE_REPLY_SIZE     16 /* magic, error, cookie */
#define NBD_CHUNK_HEADER_SIZE     20 /* magic, flags, type, cookie, length */

/* Commands. */
#define NBD_CMD_READ              0
#define NBD_CMD_WRITE             1
#define NBD_CMD_DISC              2
#define NBD_CMD_FLUSH             3
#define NBD_CMD_TRIM              4
#define NBD_CMD_CACHE             5
#define NBD_CMD_WRITE_ZEROES      6
#define NBD_CMD_BLOCK_STATUS      7

/* Command flags (u16). */
#define NBD_CMD_FLAG_FUA          (1u << 0)
#define NBD_CMD_FLAG_NO_HOLE      (1u << 1)
#define NBD_CMD_FLAG_DF           (1u << 2)
#define NBD_CMD_FLAG_REQ_ONE      (1u << 3)
#define NBD_CMD_FLAG_FAST_ZERO    (1u << 4)

/* Structured reply chunks. */
#define NBD_REPLY_FLAG_DONE       (1u << 0)
#define NBD_REPLY_TYPE_NONE       0
#define NBD_REPLY_TYPE_OFFSET_DATA 1
#define NBD_REPLY_TYPE_OFFSET_HOLE 2
#define NBD_REPLY_TYPE_BLOCK_STATUS 5
#define NBD_REPLY_TYPE_ERROR      0x8001u
#define NBD_REPLY_TYPE_ERROR_OFFSET 0x8002u

/* Meta contexts. */
#define NBD_STATE_HOLE            (1u << 0) /* base:allocation */
#define NBD_STATE_ZERO            (1u << 1)
#define NBD_CONTEXT_BASE_ALLOCATION "base:allocation"
#define NBD_CONTEXT_QEMU_ALLOCATION_DEPTH "qemu:allocation-depth"
#define NBD_CONTEXT_QEMU_DIRTY_BITMAP "qemu:dirty-bitmap:" /* + the bitmap's name */
#define NBD_STATE_DIRTY           (1u << 0) /* qemu:dirty-bitmap */

/* Error values (not the host's errno numbers, though they agree on Linux). */
#define NBD_EPERM                 1
#define NBD_EIO                   5
#define NBD_ENOMEM                12
#define NBD_EINVAL                22
#define NBD_ENOSPC                28
#define NBD_EOVERFLOW             75
#define NBD_ENOTSUP               95
#define NBD_ESHUTDOWN             108

#endif /* QK_NBD_PROTOCOL_H */
