/* Ops: the async half of every long call. GPU ops complete when their end events do; thread ops
 * when their job returns. An op id is (generation << 32 | slot), so a collected id stays invalid. */
#include "internal.h"

#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define OP_ID(op, slot) (((uint64_t)atomic_load(&(op)->gen) << 32) | (uint64_t)(slot))

ce_op_t *ce_op_new(ce_ctx_t *ctx, int kind, uint64_t *id_out) {
  pthread_mutex_lock(&ctx->mu);
  uint32_t slot = 0;
  for (; slot < ctx->nops; slot++)
    if (!ctx->ops[slot]->in_use && atomic_load(&ctx->ops[slot]->pins) == 0) break;
  if (slot == ctx->nops) {
    ce_op_t **grown = realloc(ctx->ops, sizeof *grown * (ctx->nops + 1));
    ce_op_t *op = grown ? calloc(1, sizeof *op) : NULL;
    if (!op) {
      if (grown) ctx->ops = grown;
      pthread_mutex_unlock(&ctx->mu);
      ce_fail(CE_E_NOMEM, "out of host memory for an op");
      return NULL;
    }
    atomic_store(&op->gen, 1);
    grown[ctx->nops++] = op;
    ctx->ops = grown;
  }
  ce_op_t *op = ctx->ops[slot];
  /* Events survive reuse: creating them per op would cost more than the small copies they time. */
  op->in_use = 1;
  op->kind = kind;
  op->ctx = ctx;
  atomic_store(&op->issued, ISSUE_DONE);
  op->sync_stream = NULL;
  op->comm_gen = 0;
  atomic_store(&op->settled, 0);
  op->joinable = 0;
  op->ndevs = 0;
  atomic_store(&op->done, 0);
  op->status = CE_OK;
  op->err[0] = 0;
  op->value = 0;
  op->t0_ms = op->t1_ms = 0;
  op->nregions = 0;
  op->nbufs = 0;
  op->job_arg = NULL;
  op->job_free = NULL;
  pthread_mutex_unlock(&ctx->mu);
  *id_out = OP_ID(op, slot);
  return op;
}

static void op_release_holds(ce_op_t *op) {
  ce_ctx_t *ctx = op->ctx;
  pthread_mutex_lock(&ctx->mu);
  for (uint32_t i = 0; i < op->nregions; i++)
    if (op->regions[i] < ctx->nregions) atomic_fetch_sub(&ctx->regions[op->regions[i]].inflight, 1);
  pthread_mutex_unlock(&ctx->mu);
  for (int i = 0; i < op->nbufs; i++) atomic_fetch_sub(&op->bufs[i]->inflight, 1);
  free(op->regions);
  op->regions = NULL;
  op->nregions = 0;
  op->nbufs = 0;
}

static void op_collect(ce_op_t *op) {
  op_release_holds(op);
  if (op->job_free && op->job_arg) op->job_free(op->job_arg);
  op->job_arg = NULL;
  pthread_mutex_lock(&op->ctx->mu);
  atomic_fetch_add(&op->gen, 1);
  op->in_use = 0;
  pthread_mutex_unlock(&op->ctx->mu);
}

void ce_op_discard(ce_op_t *op) { op_collect(op); }

int ce_op_events(ce_op_t *op, int d) {
  ce_ctx_t *ctx = op->ctx;
  CUresult r = CUDA_SUCCESS;
  if (!op->start[d]) r = cu.cuEventCreate(&op->start[d], CU_EVENT_DEFAULT);
  if (r == CUDA_SUCCESS && !op->end[d]) r = cu.cuEventCreate(&op->end[d], CU_EVENT_DEFAULT);
  if (r != CUDA_SUCCESS) return ce_cuda_fail(r, "cuEventCreate on GPU %d", ctx->dev[d].ordinal);
  op->devs[op->ndevs++] = d;
  return CE_OK;
}

void ce_op_hold_region(ce_op_t *op, uint32_t region) {
  for (uint32_t i = 0; i < op->nregions; i++)
    if (op->regions[i] == region) return;
  uint32_t *grown = realloc(op->regions, sizeof *grown * (op->nregions + 1));
  if (!grown) return; /* the hold only guards release; a failed grow just loses that guard */
  op->regions = grown;
  op->regions[op->nregions++] = region;
  atomic_fetch_add(&op->ctx->regions[region].inflight, 1);
}

void ce_op_hold_buf(ce_op_t *op, struct ce_buf *buf) {
  for (int i = 0; i < op->nbufs; i++)
    if (op->bufs[i] == buf) return;
  if (op->nbufs >= CE_MAX_DEVICES + 1) return;
  op->bufs[op->nbufs++] = buf;
  atomic_fetch_add(&buf->inflight, 1);
}

static void *op_thread_main(void *arg) {
  ce_op_t *op = arg;
  op->t0_ms = ce_now_ms();
  int rc = op->job(op);
  op->t1_ms = ce_now_ms();
  op->status = rc;
  atomic_store_explicit(&op->done, 1, memory_order_release);
  return NULL;
}

ce_op_t *ce_op_new_thread(ce_ctx_t *ctx, void *job, uint64_t *id_out) {
  ce_op_t *op = job ? ce_op_new(ctx, OP_THREAD, id_out) : NULL;
  if (!op) {
    free(job);
    ce_fail(CE_E_NOMEM, "out of host memory for an op");
    return NULL;
  }
  op->job_arg = job;
  op->job_free = free;
  return op;
}

int ce_op_run(ce_op_t *op, ce_job_fn fn, uint64_t id, uint64_t *op_out) {
  op->job = fn;
  int e = pthread_create(&op->thread, NULL, op_thread_main, op);
  if (e != 0) {
    ce_op_discard(op);
    return ce_fail(CE_E_NOMEM, "pthread_create: %s", strerror(e));
  }
  op->joinable = 1;
  *op_out = id;
  return CE_OK;
}

void ce_op_complete(ce_op_t *op, int status) {
  op->t1_ms = ce_now_ms();
  op->status = status;
  atomic_store_explicit(&op->done, 1, memory_order_release);
}

void ce_op_issued(ce_op_t *op, int issued, int status) {
  op->status = status;
  atomic_store_explicit(&op->issued, issued, memory_order_release);
}

int ce_op_fail(ce_op_t *op, int status, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(op->err, sizeof op->err, fmt, ap);
  va_end(ap);
  return status;
}

ce_op_t *ce_op_find(ce_ctx_t *ctx, uint64_t id) {
  uint32_t slot = (uint32_t)id, gen = (uint32_t)(id >> 32);
  pthread_mutex_lock(&ctx->mu);
  ce_op_t *op = slot < ctx->nops ? ctx->ops[slot] : NULL;
  if (op && (!op->in_use || atomic_load(&op->gen) != gen)) op = NULL;
  pthread_mutex_unlock(&ctx->mu);
  if (!op) ce_fail(CE_E_INVAL, "op %llu is unknown or already collected", (unsigned long long)id);
  return op;
}

/* The op in slot if it still carries generation gen, else NULL. The table may be reallocated by
 * ce_op_new on another thread, so the pointer is read under the lock; ops themselves never move. */
static ce_op_t *op_at(ce_ctx_t *ctx, uint64_t id) {
  uint32_t slot = (uint32_t)id, gen = (uint32_t)(id >> 32);
  pthread_mutex_lock(&ctx->mu);
  ce_op_t *op = slot < ctx->nops ? ctx->ops[slot] : NULL;
  pthread_mutex_unlock(&ctx->mu);
  return op && op->in_use && atomic_load(&op->gen) == gen ? op : NULL;
}

int ce_op_stream_wait_op(ce_op_t *op, CUstream s) {
  if (!op || atomic_load_explicit(&op->issued, memory_order_acquire) != ISSUE_DONE) return CE_OK;
  for (int i = 0; i < op->ndevs; i++) {
    CUresult r = cu.cuStreamWaitEvent(s, op->end[op->devs[i]], 0);
    if (r != CUDA_SUCCESS) return ce_cuda_fail(r, "cuStreamWaitEvent");
  }
  return CE_OK;
}

int ce_op_stream_wait(ce_ctx_t *ctx, uint64_t after, CUstream s) {
  if (!after) return CE_OK;
  ce_op_t *op = op_at(ctx, after);
  if (!op) return CE_OK; /* already collected: done */
  if (op->kind != OP_GPU) return ce_fail(CE_E_STATE, "after: op %llu is not a GPU op", (unsigned long long)after);
  return ce_op_stream_wait_op(op, s);
}

ce_op_t *ce_op_pin(ce_ctx_t *ctx, uint64_t after, int *pending_out) {
  *pending_out = 0;
  if (!after) return NULL;
  uint32_t slot = (uint32_t)after, gen = (uint32_t)(after >> 32);
  pthread_mutex_lock(&ctx->mu);
  ce_op_t *op = slot < ctx->nops ? ctx->ops[slot] : NULL;
  if (op && (!op->in_use || atomic_load(&op->gen) != gen)) op = NULL;
  if (op) {
    atomic_fetch_add(&op->pins, 1);
    *pending_out = op->kind == OP_GPU && atomic_load_explicit(&op->issued, memory_order_acquire) == ISSUE_PENDING;
  }
  pthread_mutex_unlock(&ctx->mu);
  return op;
}

void ce_op_unpin(ce_op_t *op) {
  if (op) atomic_fetch_sub(&op->pins, 1);
}

void ce_op_thread_wait(ce_ctx_t *ctx, uint64_t after, _Atomic uint64_t *stop, uint64_t stop_at) {
  if (!after) return;
  ce_op_t *op = op_at(ctx, after);
  if (!op) return;
  uint32_t gen = (uint32_t)(after >> 32);
  struct timespec nap = {0, 20000};
  while (op->in_use && atomic_load(&op->gen) == gen && !atomic_load_explicit(&op->done, memory_order_acquire)) {
    if (stop && atomic_load(stop) >= stop_at) return;
    nanosleep(&nap, NULL);
  }
}

/* Waits until op's work is done on the device or its thread: not collected, just finished. */
static void op_finish(ce_ctx_t *ctx, ce_op_t *op) {
  struct timespec nap = {0, 20000};
  if (op->kind == OP_THREAD) {
    while (!atomic_load_explicit(&op->done, memory_order_acquire)) nanosleep(&nap, NULL);
    return;
  }
  /* Issued by the comm thread, which ends every issue within the communicator's timeout or abort. */
  while (atomic_load_explicit(&op->issued, memory_order_acquire) == ISSUE_PENDING) nanosleep(&nap, NULL);
  if (atomic_load(&op->issued) == ISSUE_FAILED) return;
  for (int k = 0; k < op->ndevs; k++) {
    ce_dev_enter(ctx, op->devs[k]);
    if (op->sync_stream) cu.cuStreamSynchronize(op->sync_stream);
    else cu.cuEventSynchronize(op->end[op->devs[k]]);
  }
}

void ce_ops_forget_buf(ce_ctx_t *ctx, struct ce_buf *buf) {
  pthread_mutex_lock(&ctx->mu);
  uint32_t n = ctx->nops;
  pthread_mutex_unlock(&ctx->mu);
  for (uint32_t i = 0; i < n; i++) {
    pthread_mutex_lock(&ctx->mu);
    ce_op_t *op = ctx->ops[i];
    pthread_mutex_unlock(&ctx->mu);
    if (!op->in_use) continue;
    for (int b = 0; b < op->nbufs; b++) {
      if (op->bufs[b] != buf) continue;
      op_finish(ctx, op);
      op->bufs[b] = op->bufs[--op->nbufs];
      atomic_fetch_sub(&buf->inflight, 1);
      break;
    }
  }
}

/* CE_INPROGRESS, CE_OK or the GPU op's error; fills times when done. */
/* NCCL's async errors are watched by the comm thread (the only thread that calls NCCL), which
 * ends the generation on one: a broadcast then fails through ce_comm_verdict. */
static int gpu_op_state(ce_op_t *op, double *times) {
  ce_ctx_t *ctx = op->ctx;
  int issued = atomic_load_explicit(&op->issued, memory_order_acquire);
  if (issued == ISSUE_PENDING) return CE_INPROGRESS;
  if (issued == ISSUE_FAILED) return ce_fail_msg(op->status, op->err);
  for (int i = 0; i < op->ndevs; i++) {
    int d = op->devs[i];
    ce_dev_enter(ctx, d);
    CUresult r = op->sync_stream ? cu.cuStreamQuery(op->sync_stream) : cu.cuEventQuery(op->end[d]);
    if (r == CUDA_ERROR_NOT_READY) return CE_INPROGRESS;
    if (r != CUDA_SUCCESS) return ce_cuda_fail(r, "op on GPU %d", ctx->dev[d].ordinal);
  }
  if (op->status != CE_OK) return ce_fail_msg(op->status, op->err);
  if (op->comm_gen) {
    int rc = ce_comm_verdict(ctx, op);
    if (rc != CE_OK) return rc;
  }
  if (times) {
    double t0 = 1e300, t1 = 0;
    for (int i = 0; i < op->ndevs; i++) {
      int d = op->devs[i];
      float a = 0, b = 0;
      ce_dev_enter(ctx, d);
      cu.cuEventElapsedTime(&a, ctx->dev[d].epoch, op->start[d]);
      cu.cuEventElapsedTime(&b, ctx->dev[d].epoch, op->end[d]);
      if (a < t0) t0 = a;
      if (b > t1) t1 = b;
    }
    times[0] = t0;
    times[1] = t1;
  }
  return CE_OK;
}

int ce_op_poll(ce_ctx_t *ctx, uint64_t id, double *times, uint64_t *value) {
  if (!ctx) return ce_fail(CE_E_INVAL, "ce_op_poll: ctx is NULL");
  ce_op_t *op = ce_op_find(ctx, id);
  if (!op) return CE_E_INVAL;
  int rc;
  if (op->kind == OP_GPU) {
    rc = gpu_op_state(op, times);
    if (rc == CE_INPROGRESS) return rc;
  } else {
    if (!atomic_load_explicit(&op->done, memory_order_acquire)) return CE_INPROGRESS;
    if (op->joinable) pthread_join(op->thread, NULL);
    op->joinable = 0;
    rc = op->status;
    if (rc != CE_OK) ce_fail_msg(rc, op->err);
    if (times) {
      times[0] = op->t0_ms - ctx->epoch_host_ms;
      times[1] = op->t1_ms - ctx->epoch_host_ms;
    }
  }
  if (value) *value = op->value;
  op_collect(op);
  return rc;
}

int ce_op_wait(ce_ctx_t *ctx, uint64_t op, int timeout_ms, double *times, uint64_t *value) {
  double deadline = ce_now_ms() + timeout_ms;
  struct timespec nap = {0, 50000};
  for (;;) {
    int rc = ce_op_poll(ctx, op, times, value);
    if (rc != CE_INPROGRESS) return rc;
    if (ce_now_ms() > deadline) return ce_fail(CE_E_TIMEOUT, "op %llu still running after %d ms", (unsigned long long)op, timeout_ms);
    nanosleep(&nap, NULL);
  }
}

void ce_ops_drain(ce_ctx_t *ctx) {
  for (uint32_t i = 0; i < ctx->nops; i++) {
    ce_op_t *op = ctx->ops[i];
    if (!op->in_use) continue;
    op_finish(ctx, op);
    if (op->joinable) pthread_join(op->thread, NULL);
    op->joinable = 0;
    op_collect(op);
  }
}

void ce_ops_free(ce_ctx_t *ctx) {
  for (uint32_t i = 0; i < ctx->nops; i++) {
    ce_op_t *op = ctx->ops[i];
    if (ctx->backend == CE_BACKEND_CUDA)
      for (int d = 0; d < ctx->ndev; d++) {
        ce_dev_enter(ctx, d);
        if (op->start[d]) cu.cuEventDestroy(op->start[d]);
        if (op->end[d]) cu.cuEventDestroy(op->end[d]);
      }
    free(op);
  }
  free(ctx->ops);
  ctx->ops = NULL;
  ctx->nops = 0;
}

#define FAN_OUT_MAX 64

void ce_fan_out(int threads, uint64_t items, void *(*worker)(void *), void *arg) {
  uint64_t extra = items > 1 ? items - 1 : 0;
  if (threads > FAN_OUT_MAX) threads = FAN_OUT_MAX;
  if (extra > (uint64_t)(threads > 1 ? threads - 1 : 0)) extra = threads > 1 ? (uint64_t)threads - 1 : 0;
  pthread_t th[FAN_OUT_MAX];
  int started = 0;
  for (; (uint64_t)started < extra; started++)
    if (pthread_create(&th[started], NULL, worker, arg) != 0) break;
  worker(arg);
  for (int i = 0; i < started; i++) pthread_join(th[i], NULL);
}
