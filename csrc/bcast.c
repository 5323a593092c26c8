/* The copy stages of the pipeline: H2D from pinned regions into a device buffer (copy stream) and
 * D2D (the reference receiver's reload). Each submit enqueues and returns; the op completes on the
 * GPU. Ordering between stages is by events (`after`), never by waiting on the host. The broadcast
 * stage lives in comm.c. */
#include "cpu.h"

#include <stdlib.h>
#include <string.h>

/* Validates (region, src_offset, dst_offset, bytes) quadruples against their regions and dst. */
static int check_h2d(ce_ctx_t *ctx, ce_buf_t *dst, const uint64_t *copies, uint64_t n) {
  for (uint64_t i = 0; i < n; i++) {
    const uint64_t *c = copies + 4 * i;
    if (c[0] > UINT32_MAX) return ce_fail(CE_E_INVAL, "copy %llu: region %llu is not registered", (unsigned long long)i, (unsigned long long)c[0]);
    ce_region_t *r = ce_region_get(ctx, (uint32_t)c[0]);
    if (!r) return CE_E_INVAL;
    if (!ce_range_ok(c[1], c[3], r->bytes))
      return ce_fail(CE_E_INVAL, "copy %llu: %llu bytes at %llu overrun region %llu (%s, %llu bytes)", (unsigned long long)i,
                     (unsigned long long)c[3], (unsigned long long)c[1], (unsigned long long)c[0], r->path[0] ? r->path : "allocated",
                     (unsigned long long)r->bytes);
    if (!ce_range_ok(c[2], c[3], dst->bytes))
      return ce_fail(CE_E_INVAL, "copy %llu: %llu bytes at %llu overrun the destination buffer of %llu bytes",
                     (unsigned long long)i, (unsigned long long)c[3], (unsigned long long)c[2], (unsigned long long)dst->bytes);
  }
  return CE_OK;
}

/* Issues spans on device d's copy stream between op's two events. A failure after a copy was
 * queued cannot discard the op (the queued copies still read and write the buffers it holds): the
 * op is issued with the error, and reports it once what was queued has finished. */
int ce_spans_issue(ce_ctx_t *ctx, ce_op_t *op, ce_op_t *after, int d, int d2d, const ce_span_t *spans, uint64_t n,
                   const char *what) {
  int rc;
  if ((rc = ce_dev_enter(ctx, d))) return rc;
  CUstream s = ctx->dev[d].copy;
  if ((rc = ce_op_events(op, d)) || (rc = ce_op_stream_wait_op(after, s))) return rc;
  CUresult r = cu.cuEventRecord(op->start[d], s);
  if (r != CUDA_SUCCESS) return ce_cuda_fail(r, "cuEventRecord before %s on GPU %d", what, ctx->dev[d].ordinal);
  uint64_t i = 0;
  for (; r == CUDA_SUCCESS && i < n; i++)
    r = d2d ? cu.cuMemcpyDtoDAsync(spans[i].dst, spans[i].src, spans[i].bytes, s)
            : cu.cuMemcpyHtoDAsync(spans[i].dst, (const void *)(uintptr_t)spans[i].src, spans[i].bytes, s);
  int status = CE_OK;
  if (r != CUDA_SUCCESS) {
    char why[512];
    ce_cuda_describe(r, why, sizeof why);
    status = ce_op_fail(op, r == CUDA_ERROR_OUT_OF_MEMORY ? CE_E_NOMEM : CE_E_CUDA, "%s range %llu of %llu on GPU %d: %s", what,
                        (unsigned long long)i, (unsigned long long)n, ctx->dev[d].ordinal, why);
  }
  CUresult e = cu.cuEventRecord(op->end[d], s);
  if (e != CUDA_SUCCESS) {
    op->sync_stream = s; /* the op is done when the stream is idle */
    if (status == CE_OK) {
      char why[512];
      ce_cuda_describe(e, why, sizeof why);
      status = ce_op_fail(op, CE_E_CUDA, "cuEventRecord after %s on GPU %d: %s", what, ctx->dev[d].ordinal, why);
    }
  }
  ce_op_issued(op, ISSUE_DONE, status);
  return CE_OK;
}

/* Submits spans as one op on dst's device: memcpy on a thread (CPU), or copies between two events
 * on the copy stream (CUDA; src NULL means the sources are pinned host memory), issued at once, or
 * by the comm thread when `after` is an op that the comm thread has not issued yet (a broadcast).
 * The op holds dst, src and the given regions until it is collected. Frees nothing of the caller's. */
static int submit_spans(ce_ctx_t *ctx, ce_buf_t *dst, ce_buf_t *src, const ce_span_t *spans, uint64_t n, const uint32_t *regions,
                        uint64_t nregions, uint64_t after, const char *what, uint64_t *op_out) {
  uint64_t id;
  ce_op_t *op;
  int rc;
  if (ctx->backend == CE_BACKEND_CPU) {
    ce_cpu_copy_t *list;
    if (!(op = ce_cpu_copies_new(ctx, n, after, &list, &id))) return CE_E_NOMEM;
    for (uint64_t i = 0; i < n; i++)
      list[i] = (ce_cpu_copy_t){(uint8_t *)(uintptr_t)spans[i].dst, (const uint8_t *)(uintptr_t)spans[i].src, spans[i].bytes};
  } else {
    if (!(op = ce_op_new(ctx, OP_GPU, &id))) return CE_E_NOMEM;
    int pending;
    ce_op_t *prev = ce_op_pin(ctx, after, &pending);
    if (prev && prev->kind != OP_GPU) {
      ce_op_unpin(prev);
      ce_op_discard(op);
      return ce_fail(CE_E_STATE, "after: op %llu is not a GPU op", (unsigned long long)after);
    }
    if (pending) {
      rc = ce_comm_defer_spans(ctx, op, prev, dst->dev, src != NULL, spans, n, what); /* takes the pin */
    } else {
      rc = ce_spans_issue(ctx, op, prev, dst->dev, src != NULL, spans, n, what);
      ce_op_unpin(prev);
    }
    if (rc) {
      ce_op_discard(op);
      return rc;
    }
  }
  for (uint64_t i = 0; i < nregions; i++) ce_op_hold_region(op, regions[i]);
  ce_op_hold_buf(op, dst);
  if (src) ce_op_hold_buf(op, src);
  if (ctx->backend == CE_BACKEND_CPU) return ce_cpu_copies_run(op, id, op_out);
  *op_out = id;
  return CE_OK;
}

int ce_h2d_submit(ce_ctx_t *ctx, ce_buf_t *dst, const uint64_t *copies, uint64_t ncopies, uint64_t after,
                  uint64_t *op_out) {
  if (!ctx || !op_out || (!copies && ncopies)) return ce_fail(CE_E_INVAL, "ce_h2d_submit: NULL argument");
  int rc = ce_buf_in_ctx(ctx, dst, "ce_h2d_submit");
  if (rc || (rc = check_h2d(ctx, dst, copies, ncopies))) return rc;
  /* A copy never spans two pinned chunks: the driver treats a range that crosses registrations
   * as pageable and stages it. So a copy becomes one span per chunk it touches. */
  uint64_t nspans = 0;
  for (uint64_t i = 0; i < ncopies; i++) {
    const uint64_t *c = copies + 4 * i;
    const ce_region_t *reg = &ctx->regions[c[0]];
    nspans += reg->nchunks > 1 && c[3] ? (c[1] + c[3] - 1) / reg->chunk_bytes - c[1] / reg->chunk_bytes + 1 : 1;
  }
  ce_span_t *spans = malloc(sizeof *spans * (nspans ? nspans : 1));
  uint32_t *regions = malloc(sizeof *regions * (ncopies ? ncopies : 1));
  if (!spans || !regions) {
    free(spans);
    free(regions);
    return ce_fail(CE_E_NOMEM, "out of host memory");
  }
  uint64_t k = 0;
  for (uint64_t i = 0; i < ncopies; i++) {
    const uint64_t *c = copies + 4 * i;
    const ce_region_t *reg = &ctx->regions[c[0]];
    uint64_t src = c[1], dsto = c[2], left = c[3];
    uint64_t dbase = dst->host ? (uint64_t)(uintptr_t)dst->host : dst->dptr;
    do {
      uint64_t n = left;
      if (reg->nchunks > 1) {
        uint64_t chunk_end = (src / reg->chunk_bytes + 1) * reg->chunk_bytes;
        if (chunk_end - src < n) n = chunk_end - src;
      }
      spans[k++] = (ce_span_t){dbase + dsto, (uint64_t)(uintptr_t)(reg->base + src), n};
      src += n, dsto += n, left -= n;
    } while (left > 0);
    regions[i] = (uint32_t)c[0];
  }
  rc = submit_spans(ctx, dst, NULL, spans, k, regions, ncopies, after, "H2D", op_out);
  free(spans);
  free(regions);
  return rc;
}

int ce_d2d_submit(ce_ctx_t *ctx, ce_buf_t *dst, ce_buf_t *src, const uint64_t *copies, uint64_t ncopies,
                  uint64_t after, uint64_t *op_out) {
  if (!ctx || !op_out || (!copies && ncopies)) return ce_fail(CE_E_INVAL, "ce_d2d_submit: NULL argument");
  int rc = ce_buf_in_ctx(ctx, dst, "ce_d2d_submit");
  if (rc || (rc = ce_buf_in_ctx(ctx, src, "ce_d2d_submit"))) return rc;
  ce_span_t *spans = malloc(sizeof *spans * (ncopies ? ncopies : 1));
  if (!spans) return ce_fail(CE_E_NOMEM, "out of host memory");
  uint64_t dbase = dst->host ? (uint64_t)(uintptr_t)dst->host : dst->dptr;
  uint64_t sbase = src->host ? (uint64_t)(uintptr_t)src->host : src->dptr;
  for (uint64_t i = 0; i < ncopies; i++) {
    const uint64_t *c = copies + 3 * i;
    if (!ce_range_ok(c[0], c[2], src->bytes) || !ce_range_ok(c[1], c[2], dst->bytes)) {
      free(spans);
      return ce_fail(CE_E_INVAL, "copy %llu: %llu bytes from %llu to %llu overrun the source (%llu) or destination (%llu)",
                     (unsigned long long)i, (unsigned long long)c[2], (unsigned long long)c[0], (unsigned long long)c[1],
                     (unsigned long long)src->bytes, (unsigned long long)dst->bytes);
    }
    spans[i] = (ce_span_t){dbase + c[1], sbase + c[0], c[2]};
  }
  rc = submit_spans(ctx, dst, src, spans, ncopies, NULL, 0, after, "D2D", op_out);
  free(spans);
  return rc;
}
