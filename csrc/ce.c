/* Version, errors, status names, and the context: devices, streams, clock. */
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static _Thread_local char last_error[4096] = "no error";

uint32_t ce_abi_version(void) { return CE_ABI_VERSION; }

const char *ce_last_error(void) { return last_error; }

int ce_failv(int status, const char *fmt, va_list ap) {
  vsnprintf(last_error, sizeof last_error, fmt, ap);
  return status;
}

int ce_fail(int status, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  ce_failv(status, fmt, ap);
  va_end(ap);
  return status;
}

int ce_fail_msg(int status, const char *msg) {
  snprintf(last_error, sizeof last_error, "%s", msg);
  return status;
}

const char *ce_status_name(int status) {
  switch (status) {
  case CE_OK: return "CE_OK";
  case CE_INPROGRESS: return "CE_INPROGRESS";
  case CE_E_INVAL: return "CE_E_INVAL";
  case CE_E_NOLIB: return "CE_E_NOLIB";
  case CE_E_NOSYM: return "CE_E_NOSYM";
  case CE_E_VERSION: return "CE_E_VERSION";
  case CE_E_CUDA: return "CE_E_CUDA";
  case CE_E_NCCL: return "CE_E_NCCL";
  case CE_E_NOMEM: return "CE_E_NOMEM";
  case CE_E_BUSY: return "CE_E_BUSY";
  case CE_E_TIMEOUT: return "CE_E_TIMEOUT";
  case CE_E_ABORTED: return "CE_E_ABORTED";
  case CE_E_P2P: return "CE_E_P2P";
  case CE_E_STATE: return "CE_E_STATE";
  case CE_E_IO: return "CE_E_IO";
  case CE_E_PEER: return "CE_E_PEER";
  default: return "CE_UNKNOWN";
  }
}

double ce_now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

int ce_dev_enter(ce_ctx_t *ctx, int d) {
  if (ctx->backend != CE_BACKEND_CUDA) return CE_OK;
  CUresult r = cu.cuCtxSetCurrent(ctx->dev[d].cuctx);
  if (r != CUDA_SUCCESS) return ce_cuda_fail(r, "cuCtxSetCurrent on GPU %d", ctx->dev[d].ordinal);
  return CE_OK;
}

static void dev_close(ce_dev_t *dv) {
  if (!dv->cuctx) return;
  cu.cuCtxSetCurrent(dv->cuctx);
  if (dv->copy) cu.cuStreamSynchronize(dv->copy), cu.cuStreamDestroy(dv->copy);
  if (dv->comm) cu.cuStreamSynchronize(dv->comm), cu.cuStreamDestroy(dv->comm);
  if (dv->epoch) cu.cuEventDestroy(dv->epoch);
  if (dv->kernels) cu.cuModuleUnload(dv->kernels);
  cu.cuDevicePrimaryCtxRelease(dv->cudev);
  memset(dv, 0, sizeof *dv);
}

static int dev_open(ce_dev_t *dv, int ordinal) {
  CUresult r;
  dv->ordinal = ordinal;
  if ((r = cu.cuDeviceGet(&dv->cudev, ordinal)) != CUDA_SUCCESS) return ce_cuda_fail(r, "cuDeviceGet(%d)", ordinal);
  if ((r = cu.cuDevicePrimaryCtxRetain(&dv->cuctx, dv->cudev)) != CUDA_SUCCESS)
    return ce_cuda_fail(r, "cuDevicePrimaryCtxRetain on GPU %d", ordinal);
  if ((r = cu.cuCtxSetCurrent(dv->cuctx)) != CUDA_SUCCESS) return ce_cuda_fail(r, "cuCtxSetCurrent on GPU %d", ordinal);
  /* Non-blocking streams: the legacy default stream of an engine in this process must never
   * serialize with our copies. */
  if ((r = cu.cuStreamCreate(&dv->copy, CU_STREAM_NON_BLOCKING)) != CUDA_SUCCESS)
    return ce_cuda_fail(r, "cuStreamCreate (copy) on GPU %d", ordinal);
  if ((r = cu.cuStreamCreate(&dv->comm, CU_STREAM_NON_BLOCKING)) != CUDA_SUCCESS)
    return ce_cuda_fail(r, "cuStreamCreate (comm) on GPU %d", ordinal);
  if ((r = cu.cuEventCreate(&dv->epoch, CU_EVENT_DEFAULT)) != CUDA_SUCCESS)
    return ce_cuda_fail(r, "cuEventCreate on GPU %d", ordinal);
  return CE_OK;
}

int ce_ctx_create(int backend, const int32_t *devices, int ndev, ce_ctx_t **ctx_out) {
  if (!ctx_out) return ce_fail(CE_E_INVAL, "ce_ctx_create: ctx_out is NULL");
  *ctx_out = NULL;
  if (backend != CE_BACKEND_CUDA && backend != CE_BACKEND_CPU)
    return ce_fail(CE_E_INVAL, "ce_ctx_create: unknown backend %d", backend);
  if (ndev < 1 || ndev > CE_MAX_DEVICES)
    return ce_fail(CE_E_INVAL, "ce_ctx_create: %d devices (1 to %d)", ndev, CE_MAX_DEVICES);
  if (backend == CE_BACKEND_CUDA && !ce_cuda_loaded())
    return ce_fail(CE_E_STATE, "ce_ctx_create: the CUDA driver is not loaded (ce_cuda_load first)");
  if (backend == CE_BACKEND_CUDA && !devices) return ce_fail(CE_E_INVAL, "ce_ctx_create: no device list");
  ce_ctx_t *ctx = calloc(1, sizeof *ctx);
  if (!ctx) return ce_fail(CE_E_NOMEM, "ce_ctx_create: out of host memory");
  ctx->backend = backend;
  ctx->ndev = ndev;
  pthread_mutex_init(&ctx->mu, NULL);
  ce_comm_setup(ctx);
  for (int d = 0; d < ndev; d++) {
    ctx->dev[d].ordinal = devices ? devices[d] : d;
    if (backend == CE_BACKEND_CUDA) {
      for (int e = 0; e < d; e++)
        if (ctx->dev[e].ordinal == devices[d]) {
          ce_ctx_destroy(ctx);
          return ce_fail(CE_E_INVAL, "ce_ctx_create: GPU %d listed twice", devices[d]);
        }
      int rc = dev_open(&ctx->dev[d], devices[d]);
      if (rc != CE_OK) {
        ce_ctx_destroy(ctx);
        return rc;
      }
    }
  }
  int rc = ce_ctx_clock_reset(ctx, NULL);
  if (rc != CE_OK) {
    ce_ctx_destroy(ctx);
    return rc;
  }
  *ctx_out = ctx;
  return CE_OK;
}

void ce_ctx_destroy(ce_ctx_t *ctx) {
  if (!ctx) return;
  /* Transfer endpoints and communicators first: a read or a broadcast stuck on a dead peer ends
   * only when they are torn down. */
  ce_xfers_free(ctx);
  ce_comm_shutdown(ctx);
  ce_ops_drain(ctx);
  ce_bufs_free(ctx);
  ce_regions_free(ctx);
  ce_ops_free(ctx);
  if (ctx->backend == CE_BACKEND_CUDA)
    for (int d = 0; d < ctx->ndev; d++) dev_close(&ctx->dev[d]);
  pthread_mutex_destroy(&ctx->mu);
  free(ctx);
}

int ce_ctx_clock_reset(ce_ctx_t *ctx, double *host_ms_out) {
  if (!ctx) return ce_fail(CE_E_INVAL, "ce_ctx_clock_reset: ctx is NULL");
  if (ctx->backend == CE_BACKEND_CUDA) {
    for (int d = 0; d < ctx->ndev; d++) {
      int rc = ce_dev_enter(ctx, d);
      if (rc) return rc;
      /* Recorded on the (idle) copy stream and waited for, so the host time below matches it
       * to within the event's latency. */
      CUresult r = cu.cuEventRecord(ctx->dev[d].epoch, ctx->dev[d].copy);
      if (r == CUDA_SUCCESS) r = cu.cuEventSynchronize(ctx->dev[d].epoch);
      if (r != CUDA_SUCCESS) return ce_cuda_fail(r, "clock reset on GPU %d", ctx->dev[d].ordinal);
    }
  }
  ctx->epoch_host_ms = ce_now_ms();
  if (host_ms_out) *host_ms_out = ctx->epoch_host_ms;
  return CE_OK;
}

int ce_ctx_stats(ce_ctx_t *ctx, uint64_t *stats, uint64_t len) {
  if (!ctx || !stats) return ce_fail(CE_E_INVAL, "ce_ctx_stats: NULL argument");
  uint64_t v[6] = {0};
  pthread_mutex_lock(&ctx->mu);
  for (uint32_t i = 0; i < ctx->nregions; i++)
    if (ctx->regions[i].state != REGION_FREE) {
      v[0]++;
      v[1] += ctx->regions[i].bytes;
      v[2] += ctx->regions[i].pinned_bytes;
    }
  for (struct ce_buf *b = ctx->bufs; b; b = b->next) {
    v[3]++;
    v[4] += b->bytes;
  }
  for (uint32_t i = 0; i < ctx->nops; i++)
    if (ctx->ops[i]->in_use) v[5]++;
  pthread_mutex_unlock(&ctx->mu);
  for (uint64_t i = 0; i < len && i < 6; i++) stats[i] = v[i];
  return CE_OK;
}
