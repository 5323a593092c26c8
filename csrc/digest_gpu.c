/* Digests of spans of a GPU buffer (docs/digest.md): libce's kernel sums each span where it lies,
 * or, where the kernel cannot run, the bytes are read back in rounds and summed on threads. */
#include "digest.h"

#include <stdlib.h>

/* Bytes read back from a GPU per round: two rounds alternate, one copying while the other is digested. */
#define ROUND_BYTES (64ull << 20)

/* Issues the read-back of the pieces from `begin` that fit in one round into scratch and points
 * them there; returns the end of the round (in *r, the first failure). */
static uint64_t digest_round(digest_job_t *job, uint64_t begin, uint8_t *scratch, CUstream s, CUresult *r) {
  uint64_t used = 0, i = begin;
  for (; *r == CUDA_SUCCESS && i < job->npieces && used + 4 * job->pieces[i].nwords <= ROUND_BYTES; i++) {
    dpiece_t *pc = &job->pieces[i];
    *r = cu.cuMemcpyDtoHAsync(scratch + used, job->gpu->dptr + job->spans[pc->span].dev_offset + 4 * pc->w0, 4 * pc->nwords, s);
    pc->q = scratch + used;
    used += 4 * pc->nwords;
  }
  return i;
}

/* The rounds of read-back (when the kernels cannot run): pieces go into pinned scratch round by
 * round, the copy of round k+1 running while round k is digested. Pieces are at most 16 MiB, so
 * every round takes at least one. */
static int digest_read_back(ce_op_t *op, digest_job_t *job, CUstream s, CUresult *r) {
  uint8_t *scratch[2] = {NULL, NULL};
  int registered[2] = {0, 0}, rc = CE_OK;
  CUevent ev[2] = {NULL, NULL};
  for (int i = 0; i < 2 && *r == CUDA_SUCCESS; i++) {
    *r = cu.cuEventCreate(&ev[i], CU_EVENT_DEFAULT);
    scratch[i] = aligned_alloc(4096, ROUND_BYTES);
    if (!scratch[i]) rc = ce_op_fail(op, CE_E_NOMEM, "out of host memory reading back GPU %d for a digest", op->ctx->dev[job->gpu->dev].ordinal);
    if (rc != CE_OK) break;
    if (*r == CUDA_SUCCESS) *r = cu.cuMemHostRegister(scratch[i], ROUND_BYTES, 0);
    registered[i] = *r == CUDA_SUCCESS;
  }
  if (rc == CE_OK && *r == CUDA_SUCCESS) {
    uint64_t begin = 0, end = digest_round(job, 0, scratch[0], s, r);
    if (*r == CUDA_SUCCESS) *r = cu.cuEventRecord(ev[0], s);
    for (uint64_t k = 0; *r == CUDA_SUCCESS && begin < end; k++) {
      *r = cu.cuEventSynchronize(ev[k % 2]);
      uint64_t next = end;
      if (*r == CUDA_SUCCESS && end < job->npieces) {
        next = digest_round(job, end, scratch[(k + 1) % 2], s, r);
        if (*r == CUDA_SUCCESS) *r = cu.cuEventRecord(ev[(k + 1) % 2], s);
      }
      if (*r != CUDA_SUCCESS) break;
      ce_digest_pieces(job, begin, end);
      begin = end;
      end = next;
    }
  }
  CUresult sync = cu.cuStreamSynchronize(s); /* nothing left in flight over the scratch */
  if (*r == CUDA_SUCCESS) *r = sync;
  for (int i = 0; i < 2; i++) {
    if (registered[i]) cu.cuMemHostUnregister(scratch[i]);
    free(scratch[i]);
    if (ev[i]) cu.cuEventDestroy(ev[i]);
  }
  return rc;
}

/* The digest kernel over every span where it lies: a few partial sums per span come back, not the
 * bytes. Only for spans whose words are 4-aligned on the device (tensors at ce's 256-byte offsets). */
static int digest_on_gpu(ce_op_t *op, digest_job_t *job, CUstream s, CUresult *r) {
  const ce_dev_t *dv = &op->ctx->dev[job->gpu->dev];
  uint64_t total = 0;
  for (uint64_t sp = 0; sp < job->nspans; sp++) total += ce_kernel_digest_blocks(job->spans[sp].bytes / 4);
  uint64_t *parts = malloc(8 * (total ? total : 1));
  if (!parts) return ce_op_fail(op, CE_E_NOMEM, "out of host memory for a digest's partial sums");
  CUdeviceptr dparts = 0;
  if (total) *r = cu.cuMemAlloc(&dparts, 8 * total);
  uint64_t at = 0;
  for (uint64_t sp = 0; *r == CUDA_SUCCESS && sp < job->nspans; sp++) {
    uint64_t words = job->spans[sp].bytes / 4;
    *r = ce_kernel_digest(dv, s, job->gpu->dptr + job->spans[sp].dev_offset, words, dparts + 8 * at);
    at += ce_kernel_digest_blocks(words);
  }
  if (*r == CUDA_SUCCESS && total) *r = cu.cuMemcpyDtoHAsync(parts, dparts, 8 * total, s);
  CUresult sync = cu.cuStreamSynchronize(s);
  if (*r == CUDA_SUCCESS) *r = sync;
  if (dparts) cu.cuMemFree(dparts);
  at = 0;
  for (uint64_t sp = 0; *r == CUDA_SUCCESS && sp < job->nspans; sp++) {
    uint64_t sum = 0;
    for (uint32_t b = ce_kernel_digest_blocks(job->spans[sp].bytes / 4); b; b--) sum += parts[at++];
    atomic_store(&job->spans[sp].sum, sum);
  }
  free(parts);
  return CE_OK;
}

/* Spans of a GPU buffer: summed by libce's kernel on the GPU where it can run, else read back and
 * summed on threads; the tails (a last partial word) come back first either way. */
int ce_digest_gpu(ce_op_t *op, digest_job_t *job) {
  ce_buf_t *b = job->gpu;
  uint8_t *tails = calloc(job->nspans ? job->nspans : 1, 4);
  if (!tails) return ce_op_fail(op, CE_E_NOMEM, "out of host memory for a digest");
  int rc = CE_OK, aligned = 1;
  CUstream s = NULL;
  int gpu = op->ctx->dev[b->dev].ordinal;
  for (uint64_t sp = 0; sp < job->nspans; sp++) aligned &= (b->dptr + job->spans[sp].dev_offset) % 4 == 0;
  /* A driver whose JIT cannot build the kernels still gets its digest, the slow way. */
  int kernel = aligned && ce_kernels_load(op->ctx, b->dev) == CE_OK;
  CUresult r = cu.cuCtxSetCurrent(op->ctx->dev[b->dev].cuctx);
  if (r == CUDA_SUCCESS) r = cu.cuStreamCreate(&s, CU_STREAM_NON_BLOCKING);
  for (uint64_t sp = 0; r == CUDA_SUCCESS && sp < job->nspans; sp++) {
    uint64_t rest = job->spans[sp].bytes % 4;
    if (rest) r = cu.cuMemcpyDtoHAsync(tails + 4 * sp, b->dptr + job->spans[sp].dev_offset + job->spans[sp].bytes - rest, rest, s);
  }
  if (r == CUDA_SUCCESS) rc = kernel ? digest_on_gpu(op, job, s, &r) : digest_read_back(op, job, s, &r);
  if (s) {
    CUresult sync = cu.cuStreamSynchronize(s); /* the tails */
    if (r == CUDA_SUCCESS) r = sync;
  }
  if (rc == CE_OK && r != CUDA_SUCCESS) {
    char why[512];
    ce_cuda_describe(r, why, sizeof why);
    rc = ce_op_fail(op, CE_E_CUDA, "digesting %llu spans on GPU %d: %s", (unsigned long long)job->nspans, gpu, why);
  }
  for (uint64_t sp = 0; rc == CE_OK && sp < job->nspans; sp++) {
    dspan_t *d = &job->spans[sp];
    uint64_t rest = d->bytes % 4, i = d->bytes / 4;
    if (rest) d->tail = (uint64_t)(int64_t)load_le32(tails + 4 * sp) * (2 * i + 1); /* calloc'd: zero-padded */
  }
  if (s) cu.cuStreamDestroy(s);
  free(tails);
  return rc;
}
