/* The pipeline's stages: H2D from pinned regions into a device buffer (copy stream), NCCL
 * broadcast from the owner GPU into every GPU's slot (comm stream), and D2D (the reference
 * receiver's reload). Each submit enqueues and returns; the op completes on the GPU. Ordering
 * between stages is by events (`after`), never by waiting on the host. */
#include "cpu.h"

#include <stdlib.h>
#include <string.h>

static int op_events(ce_op_t *op, int d) {
  ce_ctx_t *ctx = op->ctx;
  CUresult r = CUDA_SUCCESS;
  if (!op->start[d]) r = cu.cuEventCreate(&op->start[d], CU_EVENT_DEFAULT);
  if (r == CUDA_SUCCESS && !op->end[d]) r = cu.cuEventCreate(&op->end[d], CU_EVENT_DEFAULT);
  if (r != CUDA_SUCCESS) return ce_cuda_fail(r, "cuEventCreate on GPU %d", ctx->dev[d].ordinal);
  op->devs[op->ndevs++] = d;
  return CE_OK;
}

static int buf_in_ctx(ce_ctx_t *ctx, ce_buf_t *b, const char *what) {
  if (!b) return ce_fail(CE_E_INVAL, "%s: buffer is NULL", what);
  if (b->ctx != ctx) return ce_fail(CE_E_INVAL, "%s: buffer belongs to another context", what);
  return CE_OK;
}

static int range_ok(uint64_t off, uint64_t bytes, uint64_t size) { return off <= size && bytes <= size - off; }

/* Validates (region, src_offset, dst_offset, bytes) quadruples against their regions and dst. */
static int check_h2d(ce_ctx_t *ctx, ce_buf_t *dst, const uint64_t *copies, uint64_t n) {
  for (uint64_t i = 0; i < n; i++) {
    const uint64_t *c = copies + 4 * i;
    if (c[0] > UINT32_MAX) return ce_fail(CE_E_INVAL, "copy %llu: region %llu is not registered", (unsigned long long)i, (unsigned long long)c[0]);
    ce_region_t *r = ce_region_get(ctx, (uint32_t)c[0]);
    if (!r) return CE_E_INVAL;
    if (!range_ok(c[1], c[3], r->bytes))
      return ce_fail(CE_E_INVAL, "copy %llu: %llu bytes at %llu overrun region %llu (%s, %llu bytes)", (unsigned long long)i,
                     (unsigned long long)c[3], (unsigned long long)c[1], (unsigned long long)c[0], r->path[0] ? r->path : "allocated",
                     (unsigned long long)r->bytes);
    if (!range_ok(c[2], c[3], dst->bytes))
      return ce_fail(CE_E_INVAL, "copy %llu: %llu bytes at %llu overrun the destination buffer of %llu bytes",
                     (unsigned long long)i, (unsigned long long)c[3], (unsigned long long)c[2], (unsigned long long)dst->bytes);
  }
  return CE_OK;
}

/* One copy of a submit, as addresses: host pointers on the CPU backend, device pointers (and the
 * host source of an H2D) on CUDA. */
typedef struct {
  uint64_t dst;
  uint64_t src;
  uint64_t bytes;
} span_t;

/* Submits spans as one op on dst's device: memcpy on a thread (CPU), or copies between two events
 * on the copy stream (CUDA; src NULL means the sources are pinned host memory). The op holds dst,
 * src and the given regions until it is collected. Frees nothing of the caller's. */
static int submit_spans(ce_ctx_t *ctx, ce_buf_t *dst, ce_buf_t *src, const span_t *spans, uint64_t n, const uint32_t *regions,
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
    int d = dst->dev;
    if ((rc = ce_dev_enter(ctx, d))) return rc;
    CUstream s = ctx->dev[d].copy;
    if (!(op = ce_op_new(ctx, OP_GPU, &id))) return CE_E_NOMEM;
    if ((rc = op_events(op, d)) || (rc = ce_op_stream_wait(ctx, after, s))) {
      ce_op_discard(op);
      return rc;
    }
    CUresult r = cu.cuEventRecord(op->start[d], s);
    for (uint64_t i = 0; r == CUDA_SUCCESS && i < n; i++)
      r = src ? cu.cuMemcpyDtoDAsync(spans[i].dst, spans[i].src, spans[i].bytes, s)
              : cu.cuMemcpyHtoDAsync(spans[i].dst, (const void *)(uintptr_t)spans[i].src, spans[i].bytes, s);
    if (r == CUDA_SUCCESS) r = cu.cuEventRecord(op->end[d], s);
    if (r != CUDA_SUCCESS) {
      ce_op_discard(op);
      return ce_cuda_fail(r, "%s of %llu ranges on GPU %d", what, (unsigned long long)n, ctx->dev[d].ordinal);
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
  int rc = buf_in_ctx(ctx, dst, "ce_h2d_submit");
  if (rc || (rc = check_h2d(ctx, dst, copies, ncopies))) return rc;
  /* A copy never spans two pinned chunks: the driver treats a range that crosses registrations
   * as pageable and stages it. So a copy becomes one span per chunk it touches. */
  uint64_t nspans = 0;
  for (uint64_t i = 0; i < ncopies; i++) {
    const uint64_t *c = copies + 4 * i;
    const ce_region_t *reg = &ctx->regions[c[0]];
    nspans += reg->nchunks > 1 && c[3] ? (c[1] + c[3] - 1) / reg->chunk_bytes - c[1] / reg->chunk_bytes + 1 : 1;
  }
  span_t *spans = malloc(sizeof *spans * (nspans ? nspans : 1));
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
      spans[k++] = (span_t){dbase + dsto, (uint64_t)(uintptr_t)(reg->base + src), n};
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
  int rc = buf_in_ctx(ctx, dst, "ce_d2d_submit");
  if (rc || (rc = buf_in_ctx(ctx, src, "ce_d2d_submit"))) return rc;
  span_t *spans = malloc(sizeof *spans * (ncopies ? ncopies : 1));
  if (!spans) return ce_fail(CE_E_NOMEM, "out of host memory");
  uint64_t dbase = dst->host ? (uint64_t)(uintptr_t)dst->host : dst->dptr;
  uint64_t sbase = src->host ? (uint64_t)(uintptr_t)src->host : src->dptr;
  for (uint64_t i = 0; i < ncopies; i++) {
    const uint64_t *c = copies + 3 * i;
    if (!range_ok(c[0], c[2], src->bytes) || !range_ok(c[1], c[2], dst->bytes)) {
      free(spans);
      return ce_fail(CE_E_INVAL, "copy %llu: %llu bytes from %llu to %llu overrun the source (%llu) or destination (%llu)",
                     (unsigned long long)i, (unsigned long long)c[2], (unsigned long long)c[0], (unsigned long long)c[1],
                     (unsigned long long)src->bytes, (unsigned long long)dst->bytes);
    }
    spans[i] = (span_t){dbase + c[1], sbase + c[0], c[2]};
  }
  rc = submit_spans(ctx, dst, src, spans, ncopies, NULL, 0, after, "D2D", op_out);
  free(spans);
  return rc;
}

/* ---- NCCL ---- */

int ce_nccl_unique_id(uint8_t *id, uint64_t len) {
  if (!id || len < CE_NCCL_ID_BYTES) return ce_fail(CE_E_INVAL, "ce_nccl_unique_id: needs a 128-byte buffer");
  if (!ce_nccl_loaded()) return ce_fail(CE_E_STATE, "NCCL is not loaded (ce_nccl_load first)");
  ncclUniqueId uid;
  ncclResult_t r = nccl.ncclGetUniqueId(&uid);
  if (r != ncclSuccess) return ce_nccl_fail(r, NULL, "ncclGetUniqueId");
  memcpy(id, uid.internal, CE_NCCL_ID_BYTES);
  return CE_OK;
}

typedef struct {
  ncclUniqueId id;
  int nranks;
  int first_rank;
} nccl_init_job_t;

static int nccl_init_job(ce_op_t *op) {
  nccl_init_job_t *job = op->job_arg;
  ce_ctx_t *ctx = op->ctx;
  ncclComm_t comms[CE_MAX_DEVICES] = {0};
  ncclResult_t r = nccl.ncclGroupStart();
  for (int d = 0; r == ncclSuccess && d < ctx->ndev; d++) {
    /* NCCL takes the device from the calling thread's current context. */
    CUresult cr = cu.cuCtxSetCurrent(ctx->dev[d].cuctx);
    if (cr != CUDA_SUCCESS) {
      char why[512];
      ce_cuda_describe(cr, why, sizeof why);
      nccl.ncclGroupEnd();
      return ce_op_fail(op, CE_E_CUDA, "cuCtxSetCurrent on GPU %d: %s", ctx->dev[d].ordinal, why);
    }
    r = nccl.ncclCommInitRank(&comms[d], job->nranks, job->id, job->first_rank + d);
  }
  ncclResult_t g = nccl.ncclGroupEnd();
  if (r == ncclSuccess) r = g;
  if (r != ncclSuccess) {
    const char *last = nccl.ncclGetLastError(NULL);
    ce_op_fail(op, CE_E_NCCL, "ncclCommInitRank (ranks %d..%d of %d): %s%s%s", job->first_rank,
               job->first_rank + ctx->ndev - 1, job->nranks, nccl.ncclGetErrorString(r), last && *last ? ": " : "",
               last ? last : "");
    for (int d = 0; d < ctx->ndev; d++)
      if (comms[d]) nccl.ncclCommAbort(comms[d]);
    return CE_E_NCCL;
  }
  for (int d = 0; d < ctx->ndev; d++) ctx->dev[d].comm_nccl = comms[d];
  ctx->nccl_nranks = job->nranks;
  ctx->nccl_first_rank = job->first_rank;
  ctx->nccl_ready = 1;
  return CE_OK;
}

int ce_nccl_init(ce_ctx_t *ctx, const uint8_t *id, uint64_t id_len, int nranks, int first_rank, uint64_t *op_out) {
  if (!ctx || !id || !op_out) return ce_fail(CE_E_INVAL, "ce_nccl_init: NULL argument");
  if (id_len < CE_NCCL_ID_BYTES) return ce_fail(CE_E_INVAL, "ce_nccl_init: the unique id has 128 bytes, got %llu", (unsigned long long)id_len);
  if (ctx->backend != CE_BACKEND_CUDA) return ce_fail(CE_E_STATE, "ce_nccl_init: NCCL needs the CUDA backend");
  if (!ce_nccl_loaded()) return ce_fail(CE_E_STATE, "NCCL is not loaded (ce_nccl_load first)");
  if (ctx->nccl_ready) return ce_fail(CE_E_STATE, "ce_nccl_init: communicators exist (abort them first)");
  if (nranks < ctx->ndev || first_rank < 0 || first_rank + ctx->ndev > nranks)
    return ce_fail(CE_E_INVAL, "ce_nccl_init: ranks %d..%d do not fit in %d", first_rank, first_rank + ctx->ndev - 1, nranks);
  nccl_init_job_t *job = malloc(sizeof *job);
  uint64_t opid;
  ce_op_t *op = ce_op_new_thread(ctx, job, &opid);
  if (!op) return CE_E_NOMEM;
  memcpy(job->id.internal, id, CE_NCCL_ID_BYTES);
  job->nranks = nranks;
  job->first_rank = first_rank;
  return ce_op_run(op, nccl_init_job, opid, op_out);
}

int ce_bcast_submit(ce_ctx_t *ctx, int root, ce_buf_t *src, uint64_t src_offset, ce_buf_t *const *dsts,
                    uint64_t ndsts, uint64_t dst_offset, uint64_t bytes, uint64_t after, uint64_t *op_out) {
  if (!ctx || !dsts || !op_out) return ce_fail(CE_E_INVAL, "ce_bcast_submit: NULL argument");
  if (ndsts != (uint64_t)ctx->ndev)
    return ce_fail(CE_E_INVAL, "ce_bcast_submit: %llu destinations for %d devices", (unsigned long long)ndsts, ctx->ndev);
  int rc;
  for (int d = 0; d < ctx->ndev; d++) {
    if ((rc = buf_in_ctx(ctx, dsts[d], "ce_bcast_submit"))) return rc;
    if (dsts[d]->dev != d) return ce_fail(CE_E_INVAL, "ce_bcast_submit: destination %d lives on device %d", d, dsts[d]->dev);
    if (!range_ok(dst_offset, bytes, dsts[d]->bytes))
      return ce_fail(CE_E_INVAL, "broadcast of %llu bytes at %llu overruns the buffer of %llu bytes on device %d",
                     (unsigned long long)bytes, (unsigned long long)dst_offset, (unsigned long long)dsts[d]->bytes, d);
  }
  int local_root = -1;
  if (ctx->backend == CE_BACKEND_CUDA) {
    if (!ctx->nccl_ready) return ce_fail(CE_E_STATE, "ce_bcast_submit: no communicators (ce_nccl_init first, or aborted)");
    if (root < 0 || root >= ctx->nccl_nranks) return ce_fail(CE_E_INVAL, "ce_bcast_submit: root %d outside 0..%d", root, ctx->nccl_nranks - 1);
    if (root >= ctx->nccl_first_rank && root < ctx->nccl_first_rank + ctx->ndev) local_root = root - ctx->nccl_first_rank;
  } else {
    if (root < 0 || root >= ctx->ndev) return ce_fail(CE_E_INVAL, "ce_bcast_submit: root %d outside 0..%d", root, ctx->ndev - 1);
    local_root = root;
  }
  if (local_root >= 0) {
    if ((rc = buf_in_ctx(ctx, src, "ce_bcast_submit"))) return rc;
    if (src->dev != local_root) return ce_fail(CE_E_INVAL, "ce_bcast_submit: source lives on device %d, root is %d", src->dev, local_root);
    if (!range_ok(src_offset, bytes, src->bytes))
      return ce_fail(CE_E_INVAL, "broadcast of %llu bytes at %llu overruns the source of %llu bytes", (unsigned long long)bytes,
                     (unsigned long long)src_offset, (unsigned long long)src->bytes);
  }
  uint64_t id;
  if (ctx->backend == CE_BACKEND_CPU) {
    ce_cpu_copy_t *list;
    ce_op_t *op = ce_cpu_copies_new(ctx, (uint64_t)ctx->ndev, after, &list, &id);
    if (!op) return CE_E_NOMEM;
    for (int d = 0; d < ctx->ndev; d++) {
      int same = dsts[d] == src && dst_offset == src_offset;
      list[d] = (ce_cpu_copy_t){dsts[d]->host + dst_offset, src->host + src_offset, same ? 0 : bytes};
      ce_op_hold_buf(op, dsts[d]);
    }
    ce_op_hold_buf(op, src);
    return ce_cpu_copies_run(op, id, op_out);
  }
  ce_op_t *op = ce_op_new(ctx, OP_GPU, &id);
  if (!op) return CE_E_NOMEM;
  op->is_bcast = 1;
  CUresult r = CUDA_SUCCESS;
  for (int d = 0; d < ctx->ndev; d++) {
    if ((rc = ce_dev_enter(ctx, d)) || (rc = op_events(op, d))) goto fail;
    /* Only the root reads what the H2D wrote; the other ranks' order comes from NCCL itself. */
    if (d == local_root && (rc = ce_op_stream_wait(ctx, after, ctx->dev[d].comm))) goto fail;
    if ((r = cu.cuEventRecord(op->start[d], ctx->dev[d].comm)) != CUDA_SUCCESS) {
      rc = ce_cuda_fail(r, "cuEventRecord on GPU %d", ctx->dev[d].ordinal);
      goto fail;
    }
  }
  ncclResult_t nr = nccl.ncclGroupStart();
  for (int d = 0; nr == ncclSuccess && d < ctx->ndev; d++) {
    void *recv = (void *)(uintptr_t)(dsts[d]->dptr + dst_offset);
    const void *send = d == local_root ? (const void *)(uintptr_t)(src->dptr + src_offset) : recv;
    nr = nccl.ncclBroadcast(send, recv, bytes, ncclUint8, root, ctx->dev[d].comm_nccl, ctx->dev[d].comm);
  }
  ncclResult_t g = nccl.ncclGroupEnd();
  if (nr == ncclSuccess) nr = g;
  if (nr != ncclSuccess) {
    rc = ce_nccl_fail(nr, ctx->dev[0].comm_nccl, "ncclBroadcast of %llu bytes from rank %d", (unsigned long long)bytes, root);
    goto fail;
  }
  for (int d = 0; d < ctx->ndev; d++) {
    ce_dev_enter(ctx, d);
    if ((r = cu.cuEventRecord(op->end[d], ctx->dev[d].comm)) != CUDA_SUCCESS) {
      rc = ce_cuda_fail(r, "cuEventRecord on GPU %d", ctx->dev[d].ordinal);
      goto fail;
    }
    ce_op_hold_buf(op, dsts[d]);
  }
  if (local_root >= 0) ce_op_hold_buf(op, src);
  *op_out = id;
  return CE_OK;
fail:
  ce_op_discard(op);
  return rc;
}

int ce_nccl_abort(ce_ctx_t *ctx) {
  if (!ctx) return ce_fail(CE_E_INVAL, "ce_nccl_abort: ctx is NULL");
  for (int d = 0; d < ctx->ndev; d++)
    if (ctx->dev[d].comm_nccl) {
      ce_dev_enter(ctx, d);
      nccl.ncclCommAbort(ctx->dev[d].comm_nccl);
      ctx->dev[d].comm_nccl = NULL;
    }
  ctx->nccl_ready = 0;
  return CE_OK;
}

void ce_nccl_free(ce_ctx_t *ctx) {
  for (int d = 0; d < ctx->ndev; d++)
    if (ctx->dev[d].comm_nccl) {
      ce_dev_enter(ctx, d);
      nccl.ncclCommDestroy(ctx->dev[d].comm_nccl);
      ctx->dev[d].comm_nccl = NULL;
    }
  ctx->nccl_ready = 0;
}
