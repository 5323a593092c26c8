/* Applying delta patches (made by delta.c) into a worker's parameters: host memory on threads (the
 * CPU backend), or on a GPU by libce's scatter kernel (kernels.c). */
#include "delta.h"

#include <stdlib.h>

/* Patch entries a thread applies at a time. */
#define PATCH_PIECE 1048576ull

typedef struct {
  uint8_t *dst;
  uint64_t elems;
  const uint8_t *pos, *val;
  uint32_t es;
  uint64_t count;
  CUdeviceptr gdst, gpos, gval; /* the same, on a GPU */
} ppatch_t;

typedef struct {
  uint32_t patch;
  uint64_t k0, n; /* entries [k0, k0 + n) */
} ppiece_t;

typedef struct {
  int threads;
  ce_buf_t *gpu; /* set: the patches apply on this buffer's GPU, by libce's scatter kernel */
  uint64_t npatches, npieces;
  ppatch_t *patches;
  ppiece_t *pieces;
  _Atomic uint64_t next;
  _Atomic int bad; /* set once by the first entry whose position is out of range */
  uint64_t bad_patch, bad_entry, bad_pos;
} patch_job_t;

static void patch_job_free(void *p) {
  patch_job_t *job = p;
  if (!job) return;
  free(job->patches);
  free(job->pieces);
  free(job);
}

static void *patch_worker(void *arg) {
  patch_job_t *job = arg;
  for (;;) {
    uint64_t i = atomic_fetch_add(&job->next, 1);
    if (i >= job->npieces) break;
    ppiece_t *pc = &job->pieces[i];
    ppatch_t *p = &job->patches[pc->patch];
    uint32_t es = p->es;
    for (uint64_t k = pc->k0; k < pc->k0 + pc->n; k++) {
      uint64_t at = load_le32u(p->pos + 4 * k);
      if (at >= p->elems) {
        int no = 0;
        if (atomic_compare_exchange_strong(&job->bad, &no, 1)) job->bad_patch = pc->patch, job->bad_entry = k, job->bad_pos = at;
        return NULL;
      }
      /* a constant size per branch: each memcpy is one load and one store */
      switch (es) {
        case 1: memcpy(p->dst + at, p->val + k, 1); break;
        case 2: memcpy(p->dst + 2 * at, p->val + 2 * k, 2); break;
        case 4: memcpy(p->dst + 4 * at, p->val + 4 * k, 4); break;
        default: memcpy(p->dst + 8 * at, p->val + 8 * k, 8); break;
      }
    }
  }
  return NULL;
}

/* One scatter launch per patch on a stream of its own; each patch's device word says whether one of its
 * positions was past its tensor (nothing is written there; verify by digest sees the tensor). */
static int patch_gpu(ce_op_t *op, patch_job_t *job) {
  int d = job->gpu->dev, gpu = op->ctx->dev[d].ordinal;
  int rc = ce_kernels_load(op->ctx, d);
  if (rc) return ce_op_fail(op, rc, "%s", ce_last_error());
  const ce_dev_t *dv = &op->ctx->dev[d];
  uint64_t *bad = calloc(job->npatches ? job->npatches : 1, 8);
  if (!bad) return ce_op_fail(op, CE_E_NOMEM, "out of host memory for %llu patches", (unsigned long long)job->npatches);
  CUstream s = NULL;
  CUdeviceptr dbad = 0;
  CUresult r = cu.cuCtxSetCurrent(dv->cuctx);
  if (r == CUDA_SUCCESS) r = cu.cuStreamCreate(&s, CU_STREAM_NON_BLOCKING);
  if (r == CUDA_SUCCESS && job->npatches) r = cu.cuMemAlloc(&dbad, 8 * job->npatches);
  if (r == CUDA_SUCCESS && job->npatches) r = cu.cuMemcpyHtoDAsync(dbad, bad, 8 * job->npatches, s);
  for (uint64_t i = 0; r == CUDA_SUCCESS && i < job->npatches; i++) {
    const ppatch_t *p = &job->patches[i];
    r = ce_kernel_scatter(dv, s, p->gdst, p->gpos, p->gval, p->count, p->elems, p->es, dbad + 8 * i);
  }
  if (r == CUDA_SUCCESS && job->npatches) r = cu.cuMemcpyDtoHAsync(bad, dbad, 8 * job->npatches, s);
  if (s) {
    CUresult sync = cu.cuStreamSynchronize(s);
    if (r == CUDA_SUCCESS) r = sync;
    cu.cuStreamDestroy(s);
  }
  if (dbad) cu.cuMemFree(dbad);
  rc = CE_OK;
  if (r != CUDA_SUCCESS) {
    char why[512];
    ce_cuda_describe(r, why, sizeof why);
    rc = ce_op_fail(op, CE_E_CUDA, "applying %llu patches on GPU %d: %s", (unsigned long long)job->npatches, gpu, why);
  }
  for (uint64_t i = 0; rc == CE_OK && i < job->npatches; i++)
    if (bad[i])
      rc = ce_op_fail(op, CE_E_INVAL, "patch %llu, entry %llu: position past the tensor's %llu elements (on GPU %d)", (unsigned long long)i,
                      (unsigned long long)(bad[i] - 1), (unsigned long long)job->patches[i].elems, gpu);
  free(bad);
  if (rc == CE_OK) op->value = job->npatches;
  return rc;
}

static int patch_run(ce_op_t *op) {
  patch_job_t *job = op->job_arg;
  if (job->gpu) return patch_gpu(op, job);
  ce_fan_out(job->threads, job->npieces, patch_worker, job);
  if (atomic_load(&job->bad))
    return ce_op_fail(op, CE_E_INVAL, "patch %llu, entry %llu: position %llu is past the tensor's %llu elements",
                      (unsigned long long)job->bad_patch, (unsigned long long)job->bad_entry, (unsigned long long)job->bad_pos,
                      (unsigned long long)job->patches[job->bad_patch].elems);
  op->value = job->npatches;
  return CE_OK;
}

int ce_buf_patch_submit(ce_ctx_t *ctx, ce_buf_t *dst, ce_buf_t *src, const uint64_t *patches, uint64_t npatches, int threads,
                        uint64_t *op_out) {
  const char *what = "ce_buf_patch_submit";
  if (!ctx || (!patches && npatches) || !op_out) return ce_fail(CE_E_INVAL, "%s: NULL argument", what);
  int rc = ce_buf_in_ctx(ctx, dst, what);
  if (!rc) rc = ce_buf_in_ctx(ctx, src, what);
  if (rc) return rc;
  if (ce_buf_on_host(dst) != ce_buf_on_host(src) || (!ce_buf_on_host(dst) && dst->dev != src->dev))
    return ce_fail(CE_E_STATE, "%s: the parameters and the patches must both be host memory, or both on one GPU", what);
  if (npatches > UINT32_MAX) return ce_fail(CE_E_INVAL, "%s: %llu patches, at most 2^32 - 1", what, (unsigned long long)npatches);
  patch_job_t *job = calloc(1, sizeof *job);
  if (job) job->patches = calloc(npatches ? npatches : 1, sizeof *job->patches);
  if (!job || !job->patches) {
    patch_job_free(job);
    return ce_fail(CE_E_NOMEM, "%s: out of host memory for %llu patches", what, (unsigned long long)npatches);
  }
  job->threads = threads; /* ce_fan_out bounds it */
  job->gpu = ce_buf_on_host(dst) ? NULL : dst;
  job->npatches = npatches;
  uint64_t npieces = 0;
  for (uint64_t i = 0; i < npatches; i++) {
    const uint64_t *x = patches + 6 * i;
    uint64_t doff = x[0], dbytes = x[1], poff = x[2], voff = x[3], count = x[4], es = x[5];
    if (!elem_ok(es, dbytes) || !ce_range_ok(doff, dbytes, dst->bytes) || count > dbytes / es ||
        !ce_range_ok(poff, 4 * count, src->bytes) || !ce_range_ok(voff, es * count, src->bytes)) {
      patch_job_free(job);
      return ce_fail(CE_E_INVAL, "%s: patch %llu (%llu entries of %llu bytes, positions at %llu, values at %llu in a %llu-byte buffer) does not fit a tensor of %llu bytes at %llu in a %llu-byte buffer",
                     what, (unsigned long long)i, (unsigned long long)count, (unsigned long long)es, (unsigned long long)poff,
                     (unsigned long long)voff, (unsigned long long)src->bytes, (unsigned long long)dbytes, (unsigned long long)doff,
                     (unsigned long long)dst->bytes);
    }
    if (!ce_buf_on_host(dst) && ((dst->dptr + doff) % es || (src->dptr + voff) % es || (src->dptr + poff) % 4)) {
      patch_job_free(job);
      return ce_fail(CE_E_INVAL, "%s: patch %llu: on a GPU the tensor, its positions and its values must be aligned to their elements", what,
                     (unsigned long long)i);
    }
    job->patches[i] = ce_buf_on_host(dst) ? (ppatch_t){dst->host + doff, dbytes / es, src->host + poff, src->host + voff, (uint32_t)es, count, 0, 0, 0}
                                          : (ppatch_t){NULL, dbytes / es, NULL, NULL, (uint32_t)es, count, dst->dptr + doff, src->dptr + poff, src->dptr + voff};
    npieces += (count + PATCH_PIECE - 1) / PATCH_PIECE;
  }
  if (!(job->pieces = calloc(npieces ? npieces : 1, sizeof *job->pieces))) {
    patch_job_free(job);
    return ce_fail(CE_E_NOMEM, "%s: out of host memory", what);
  }
  for (uint64_t i = 0; i < npatches; i++) {
    uint64_t count = patches[6 * i + 4];
    for (uint64_t k = 0; k < count; k += PATCH_PIECE) job->pieces[job->npieces++] = (ppiece_t){(uint32_t)i, k, count - k < PATCH_PIECE ? count - k : PATCH_PIECE};
  }
  uint64_t id;
  ce_op_t *op = ce_op_new(ctx, OP_THREAD, &id);
  if (!op) {
    patch_job_free(job);
    return CE_E_NOMEM;
  }
  op->job_arg = job;
  op->job_free = patch_job_free;
  ce_op_hold_buf(op, dst);
  ce_op_hold_buf(op, src);
  return ce_op_run(op, patch_run, id, op_out);
}
