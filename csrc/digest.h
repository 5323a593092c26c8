/* The digest op's job, shared by digest.c (host memory on threads) and digest_gpu.c (spans of a GPU
 * buffer). docs/digest.md defines the digest. */
#ifndef CE_DIGEST_H
#define CE_DIGEST_H

#include "internal.h"

#include <string.h>

static inline int32_t load_le32(const uint8_t *p) {
  uint32_t v;
  memcpy(&v, p, 4); /* unaligned is fine: a bf16 tensor may start 2 bytes into a word */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  v = __builtin_bswap32(v);
#endif
  return (int32_t)v;
}

typedef struct {
  const uint8_t *base; /* host memory; NULL for a span of a GPU buffer */
  uint64_t dev_offset; /* a GPU buffer's span: where it starts in the buffer */
  uint64_t bytes;
  uint64_t tail; /* the zero-padded last word's term, when bytes % 4 != 0 */
  _Atomic uint64_t sum; /* pieces add into it in any order: the sum is mod 2^64 */
} dspan_t;

typedef struct {
  uint32_t span;
  uint64_t w0, nwords;
  const uint8_t *q; /* word w0 in host memory (the span's, or the read-back copy of a GPU span) */
} dpiece_t;

typedef struct {
  uint64_t after;
  int threads;
  uint64_t nspans, npieces;
  _Atomic uint64_t next; /* the next piece to take, up to end */
  uint64_t end;
  dspan_t *spans;
  dpiece_t *pieces;
  uint64_t *digests; /* nspans, read by ce_digest_collect */
  ce_buf_t *gpu;     /* set: the spans are of this GPU buffer, read back in rounds */
} digest_job_t;

/* Digests pieces [begin, end) on up to job->threads threads (this one included). */
void ce_digest_pieces(digest_job_t *job, uint64_t begin, uint64_t end);
/* Sums the spans of job->gpu into their sums and tails (libce's kernel, or read back onto threads). */
int ce_digest_gpu(ce_op_t *op, digest_job_t *job);

#endif
