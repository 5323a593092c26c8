/* The CPU backend's data path: the same ops as the GPU's, as memcpy on a thread. CI and machines
 * without a GPU run the whole pipeline through it. */
#include "cpu.h"

#include <stdlib.h>
#include <string.h>

typedef struct {
  uint8_t *dst;
  const uint8_t *src;
  uint64_t bytes;
} part_t;

static void *memcpy_part(void *arg) {
  part_t *p = arg;
  memcpy(p->dst, p->src, p->bytes);
  return NULL;
}

/* One thread moves ~5–10 GB/s; large copies are split so the CPU backend is not the bottleneck
 * of a multi-GiB update. */
void ce_memcpy_parallel(void *dst, const void *src, uint64_t bytes, int threads) {
  const uint64_t min_part = 64ull << 20;
  if (threads > 16) threads = 16;
  if (threads < 2 || bytes < 2 * min_part) {
    memcpy(dst, src, bytes);
    return;
  }
  uint64_t n = bytes / min_part < (uint64_t)threads ? bytes / min_part : (uint64_t)threads;
  uint64_t part = (bytes + n - 1) / n;
  part_t parts[16];
  pthread_t th[16];
  for (uint64_t i = 0; i < n; i++) {
    uint64_t off = i * part;
    parts[i] = (part_t){(uint8_t *)dst + off, (const uint8_t *)src + off, bytes - off < part ? bytes - off : part};
    if (pthread_create(&th[i], NULL, memcpy_part, &parts[i]) != 0) memcpy_part(&parts[i]), th[i] = 0;
  }
  for (uint64_t i = 0; i < n; i++)
    if (th[i]) pthread_join(th[i], NULL);
}

typedef struct {
  uint64_t after;
  uint64_t n;
  ce_cpu_copy_t copies[];
} copy_job_t;

static int copy_job(ce_op_t *op) {
  copy_job_t *job = op->job_arg;
  ce_op_thread_wait(op->ctx, job->after, NULL, 0);
  op->t0_ms = ce_now_ms(); /* the op's time is its copying, not its wait for `after` */
  for (uint64_t i = 0; i < job->n; i++) ce_memcpy_parallel(job->copies[i].dst, job->copies[i].src, job->copies[i].bytes, 4);
  return CE_OK;
}

ce_op_t *ce_cpu_copies_new(ce_ctx_t *ctx, uint64_t n, uint64_t after, ce_cpu_copy_t **list_out, uint64_t *id_out) {
  copy_job_t *job = malloc(sizeof *job + n * sizeof(ce_cpu_copy_t));
  if (job) {
    job->after = after;
    job->n = n;
    *list_out = job->copies;
  }
  return ce_op_new_thread(ctx, job, id_out);
}

int ce_cpu_copies_run(ce_op_t *op, uint64_t id, uint64_t *op_out) { return ce_op_run(op, copy_job, id, op_out); }

/* ---- compare (both backends: the GPU's bytes are read back first) ---- */

typedef struct {
  ce_buf_t *buf;
  uint64_t buf_offset;
  const uint8_t *host;
  uint64_t bytes;
} compare_job_t;

static uint64_t first_difference(const uint8_t *a, const uint8_t *b, uint64_t n) {
  if (memcmp(a, b, n) == 0) return UINT64_MAX;
  for (uint64_t i = 0; i < n; i++)
    if (a[i] != b[i]) return i;
  return UINT64_MAX;
}

static int compare_job(ce_op_t *op) {
  compare_job_t *job = op->job_arg;
  ce_buf_t *b = job->buf;
  op->value = 0;
  if (b->host) {
    uint64_t at = first_difference(b->host + job->buf_offset, job->host, job->bytes);
    if (at != UINT64_MAX) op->value = at + 1;
    return CE_OK;
  }
  ce_ctx_t *ctx = op->ctx;
  const uint64_t chunk = 64ull << 20;
  uint8_t *scratch = malloc(chunk);
  if (!scratch) return ce_op_fail(op, CE_E_NOMEM, "out of host memory for a compare");
  CUstream s = NULL;
  CUresult r = cu.cuCtxSetCurrent(ctx->dev[b->dev].cuctx);
  if (r == CUDA_SUCCESS) r = cu.cuStreamCreate(&s, CU_STREAM_NON_BLOCKING);
  for (uint64_t off = 0; r == CUDA_SUCCESS && off < job->bytes; off += chunk) {
    uint64_t n = job->bytes - off < chunk ? job->bytes - off : chunk;
    r = cu.cuMemcpyDtoHAsync(scratch, b->dptr + job->buf_offset + off, n, s);
    if (r == CUDA_SUCCESS) r = cu.cuStreamSynchronize(s);
    if (r != CUDA_SUCCESS) break;
    uint64_t at = first_difference(scratch, job->host + off, n);
    if (at != UINT64_MAX) {
      op->value = off + at + 1;
      break;
    }
  }
  int rc = CE_OK;
  if (r != CUDA_SUCCESS) {
    char why[512];
    ce_cuda_describe(r, why, sizeof why);
    rc = ce_op_fail(op, CE_E_CUDA, "reading back %llu bytes from GPU %d: %s", (unsigned long long)job->bytes,
                    ctx->dev[b->dev].ordinal, why);
  }
  if (s) cu.cuStreamDestroy(s);
  free(scratch);
  return rc;
}

int ce_compare_submit(ce_ctx_t *ctx, ce_buf_t *buf, uint64_t buf_offset, uint32_t region, uint64_t region_offset,
                      uint64_t bytes, uint64_t *op_out) {
  if (!ctx || !buf || !op_out) return ce_fail(CE_E_INVAL, "ce_compare_submit: NULL argument");
  if (buf->ctx != ctx) return ce_fail(CE_E_INVAL, "ce_compare_submit: buffer belongs to another context");
  ce_region_t *r = ce_region_get(ctx, region);
  if (!r) return CE_E_INVAL;
  if (buf_offset > buf->bytes || bytes > buf->bytes - buf_offset || region_offset > r->bytes ||
      bytes > r->bytes - region_offset)
    return ce_fail(CE_E_INVAL, "compare of %llu bytes overruns the buffer (%llu at %llu) or region %u (%llu at %llu)",
                   (unsigned long long)bytes, (unsigned long long)buf->bytes, (unsigned long long)buf_offset, region,
                   (unsigned long long)r->bytes, (unsigned long long)region_offset);
  compare_job_t *job = malloc(sizeof *job);
  uint64_t id;
  ce_op_t *op = ce_op_new_thread(ctx, job, &id);
  if (!op) return CE_E_NOMEM;
  *job = (compare_job_t){buf, buf_offset, r->base + region_offset, bytes};
  ce_op_hold_region(op, region);
  ce_op_hold_buf(op, buf);
  return ce_op_run(op, compare_job, id, op_out);
}
