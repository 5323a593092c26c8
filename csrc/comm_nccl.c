/* The CUDA backend's communicator: NCCL in non-blocking mode, driven by the comm thread only.
 *
 * With config.blocking = 0, ncclCommInitRankConfig and ncclGroupEnd return ncclInProgress at once
 * and the work finishes in NCCL's own threads; ncclCommGetAsyncError says when. The communicators
 * exist (and can be aborted) from the first call on, so an init whose peer never arrives is
 * aborted like any other. A broadcast's kernels reach the stream only once ncclGroupEnd's work is
 * done, so its end events are recorded after that, on this thread. */
#include "comm.h"

#include <stdio.h>
#include <string.h>
#include <time.h>

int ce_nccl_unique_id(uint8_t *id, uint64_t len) {
  if (!id || len < CE_NCCL_ID_BYTES) return ce_fail(CE_E_INVAL, "ce_nccl_unique_id: needs a 128-byte buffer");
  if (!ce_nccl_loaded()) return ce_fail(CE_E_STATE, "NCCL is not loaded (ce_nccl_load first)");
  ncclUniqueId uid;
  ncclResult_t r = nccl.ncclGetUniqueId(&uid);
  if (r != ncclSuccess) return ce_nccl_fail(r, NULL, "ncclGetUniqueId");
  memcpy(id, uid.internal, CE_NCCL_ID_BYTES);
  return CE_OK;
}

/* Polls every communicator until none is in progress: CE_OK, the first NCCL error, CE_E_ABORTED
 * when the generation dies, CE_E_TIMEOUT past deadline_ms (0: none). */
static int nccl_wait(ce_ctx_t *ctx, uint64_t gen, double deadline_ms, const char *what) {
  ce_comm_t *c = &ctx->comm;
  long nap_ns = 20000;
  double t0 = ce_now_ms();
  for (;;) {
    int pending = 0;
    for (int d = 0; d < ctx->ndev; d++) {
      if (!c->nccl[d]) continue;
      ncclResult_t state = ncclSuccess;
      ncclResult_t r = nccl.ncclCommGetAsyncError(c->nccl[d], &state);
      if (r != ncclSuccess) return ce_nccl_fail(r, c->nccl[d], "%s: ncclCommGetAsyncError on GPU %d", what, ctx->dev[d].ordinal);
      if (state == ncclInProgress) pending = 1;
      else if (state != ncclSuccess) return ce_nccl_fail(state, c->nccl[d], "%s on GPU %d", what, ctx->dev[d].ordinal);
    }
    if (!pending) return CE_OK;
    if (ce_comm_dead(ctx, gen)) return ce_fail(CE_E_ABORTED, "%s: aborted after %.0f ms", what, ce_now_ms() - t0);
    if (deadline_ms > 0 && ce_now_ms() > deadline_ms)
      return ce_fail(CE_E_TIMEOUT, "%s: not complete after %.0f ms (a rank that never arrived, or a peer that stopped)", what,
                     ce_now_ms() - t0);
    struct timespec ts = {0, nap_ns};
    nanosleep(&ts, NULL);
    if (nap_ns < 1000000) nap_ns *= 2;
  }
}

int ce_nccl_comm_init(ce_ctx_t *ctx, ce_comm_job_t *job) {
  ce_comm_t *c = &ctx->comm;
  ce_nccl_config_t cfg = {sizeof cfg, 0xcafebeef, 21800, 0, CE_NCCL_CONFIG_UNDEF_INT, CE_NCCL_CONFIG_UNDEF_INT,
                          CE_NCCL_CONFIG_UNDEF_INT, NULL, CE_NCCL_CONFIG_UNDEF_INT};
  ncclUniqueId id;
  memcpy(id.internal, job->id, CE_NCCL_ID_BYTES);
  char what[128];
  snprintf(what, sizeof what, "NCCL init of ranks %d..%d of %d", job->first_rank, job->first_rank + ctx->ndev - 1, job->nranks);
  double deadline = job->timeout_ms > 0 ? ce_now_ms() + job->timeout_ms : 0;
  int rc = CE_OK;
  ncclResult_t r = nccl.ncclGroupStart();
  for (int d = 0; r == ncclSuccess && d < ctx->ndev; d++) {
    /* NCCL takes the device from the calling thread's current context. */
    CUresult cr = cu.cuCtxSetCurrent(ctx->dev[d].cuctx);
    if (cr != CUDA_SUCCESS) {
      rc = ce_cuda_fail(cr, "%s: cuCtxSetCurrent on GPU %d", what, ctx->dev[d].ordinal);
      break;
    }
    /* Stored in the context at once: teardown aborts whatever was created, whatever fails next. */
    r = nccl.ncclCommInitRankConfig(&c->nccl[d], job->nranks, id, job->first_rank + d, &cfg);
    if (r == ncclInProgress) r = ncclSuccess;
  }
  ncclResult_t g = nccl.ncclGroupEnd();
  if (rc != CE_OK) return rc;
  if (r != ncclSuccess) return ce_nccl_fail(r, NULL, "%s: ncclCommInitRankConfig", what);
  if (g != ncclSuccess && g != ncclInProgress) return ce_nccl_fail(g, NULL, "%s: ncclGroupEnd", what);
  return nccl_wait(ctx, job->gen, deadline, what);
}

int ce_nccl_comm_bcast(ce_ctx_t *ctx, ce_comm_job_t *job, uint64_t seq) {
  ce_comm_t *c = &ctx->comm;
  ce_op_t *op = job->op;
  char what[128];
  snprintf(what, sizeof what, "broadcast #%llu of %llu bytes from rank %d", (unsigned long long)seq, (unsigned long long)job->bytes,
           job->root);
  int rc;
  CUresult r;
  for (int d = 0; d < ctx->ndev; d++) {
    if ((rc = ce_dev_enter(ctx, d))) return rc;
    /* Only the root reads what the H2D wrote; the other ranks' order comes from NCCL itself. */
    if (d == job->local_root && (rc = ce_op_stream_wait_op(job->after, ctx->dev[d].comm))) return rc;
    if ((r = cu.cuEventRecord(op->start[d], ctx->dev[d].comm)) != CUDA_SUCCESS)
      return ce_cuda_fail(r, "%s: cuEventRecord on GPU %d", what, ctx->dev[d].ordinal);
  }
  ncclResult_t nr = nccl.ncclGroupStart();
  for (int d = 0; nr == ncclSuccess && d < ctx->ndev; d++) {
    void *recv = (void *)(uintptr_t)job->dst[d];
    const void *send = d == job->local_root ? (const void *)(uintptr_t)job->src : recv;
    nr = nccl.ncclBroadcast(send, recv, job->bytes, ncclUint8, job->root, c->nccl[d], ctx->dev[d].comm);
    if (nr == ncclInProgress) nr = ncclSuccess;
  }
  ncclResult_t g = nccl.ncclGroupEnd();
  if (nr != ncclSuccess) return ce_nccl_fail(nr, c->nccl[0], "%s: ncclBroadcast", what);
  if (g != ncclSuccess && g != ncclInProgress) return ce_nccl_fail(g, c->nccl[0], "%s: ncclGroupEnd", what);
  /* The stall limit of a broadcast is the communicator's timeout: connection setup to a peer that
   * is gone never finishes on its own. */
  double deadline = c->timeout_ms > 0 ? ce_now_ms() + c->timeout_ms : 0;
  if ((rc = nccl_wait(ctx, job->gen, deadline, what))) return rc;
  for (int d = 0; d < ctx->ndev; d++) {
    if ((rc = ce_dev_enter(ctx, d))) return rc;
    if ((r = cu.cuEventRecord(op->end[d], ctx->dev[d].comm)) != CUDA_SUCCESS)
      return ce_cuda_fail(r, "%s: cuEventRecord on GPU %d", what, ctx->dev[d].ordinal);
  }
  ce_op_issued(op, ISSUE_DONE, CE_OK);
  return CE_OK;
}

int ce_nccl_comm_watch(ce_ctx_t *ctx) {
  ce_comm_t *c = &ctx->comm;
  for (int d = 0; d < ctx->ndev; d++) {
    if (!c->nccl[d]) continue;
    ncclResult_t state = ncclSuccess;
    nccl.ncclCommGetAsyncError(c->nccl[d], &state);
    if (state != ncclSuccess && state != ncclInProgress)
      return ce_nccl_fail(state, c->nccl[d], "NCCL communicator of GPU %d (rank %d)", ctx->dev[d].ordinal, c->first_rank + d);
  }
  return CE_OK;
}

/* Broadcasts of gen whose GPU work had finished before the abort keep their success: their end
 * events are complete now, before ncclCommAbort can make a stuck kernel exit. */
static void settle(ce_ctx_t *ctx, uint64_t gen) {
  pthread_mutex_lock(&ctx->mu);
  for (uint32_t i = 0; i < ctx->nops; i++) {
    ce_op_t *op = ctx->ops[i];
    if (!op->in_use || op->comm_gen != gen || op->kind != OP_GPU || atomic_load(&op->issued) != ISSUE_DONE) continue;
    int done = 1;
    for (int k = 0; k < op->ndevs && done; k++) {
      ce_dev_enter(ctx, op->devs[k]);
      done = cu.cuEventQuery(op->end[op->devs[k]]) == CUDA_SUCCESS;
    }
    if (done) atomic_store(&op->settled, 1);
  }
  pthread_mutex_unlock(&ctx->mu);
}

void ce_nccl_comm_teardown(ce_ctx_t *ctx, uint64_t gen) {
  ce_comm_t *c = &ctx->comm;
  settle(ctx, gen);
  for (int d = 0; d < ctx->ndev; d++)
    if (c->nccl[d]) {
      ce_dev_enter(ctx, d);
      nccl.ncclCommAbort(c->nccl[d]);
      c->nccl[d] = NULL;
    }
}
