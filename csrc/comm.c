/* Communicators: one per context at a time, over NCCL (CUDA) or TCP (CPU backend), created,
 * used and aborted through one comm thread per context.
 *
 * Why a thread: NCCL's init waits for every rank, and its first broadcast on a communicator sets
 * up connections inside ncclGroupEnd (28 ms on 2 GPUs; over 150 s with an absent peer); the TCP
 * transport blocks on peers by nature. The comm thread makes those calls in submission order
 * (collectives must be issued in the same order on every rank), with NCCL in non-blocking mode so
 * that no call of it blocks, and every socket wait polls with a deadline and the abort eventfd.
 *
 * Why generations: an abort must reach an init still pending, and a broadcast stuck on a dead
 * peer must fail, not report success once ncclCommAbort lets its kernel exit. Every init starts a
 * generation; abort or a failure ends it (dead_gen); ops carry their generation, and a broadcast
 * that finishes on the GPU after its generation died fails with the reason. */
#include "comm.h"
#include "cpu.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

int ce_comm_fail_op(ce_op_t *op, int status) {
  snprintf(op->err, sizeof op->err, "%s", ce_last_error());
  return status;
}

void ce_comm_setup(ce_ctx_t *ctx) {
  ce_comm_t *c = &ctx->comm;
  pthread_mutex_init(&c->mu, NULL);
  pthread_cond_init(&c->cv, NULL);
  c->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  c->listen_fd = -1;
}

static void wake(ce_comm_t *c) {
  uint64_t one = 1;
  if (c->wake_fd >= 0 && write(c->wake_fd, &one, sizeof one) < 0) {
    /* a full eventfd counter is already a pending wake */
  }
  pthread_cond_broadcast(&c->cv);
}

/* Ends generation g (under mu): later waits on it stop, its ops fail with status and msg. */
static void kill_locked(ce_comm_t *c, uint64_t g, int status, const char *msg) {
  if (g == 0 || atomic_load(&c->dead_gen) >= g) return;
  c->fail_status = status;
  snprintf(c->fail_msg, sizeof c->fail_msg, "%s", msg);
  atomic_store(&c->dead_gen, g);
  if (atomic_load(&c->gen) == g) atomic_store(&c->state, COMM_DEAD);
  wake(c);
}

static void comm_kill(ce_ctx_t *ctx, uint64_t g, int status, const char *msg) {
  pthread_mutex_lock(&ctx->comm.mu);
  kill_locked(&ctx->comm, g, status, msg);
  pthread_mutex_unlock(&ctx->comm.mu);
}

/* Frees what the comm thread holds for a dead generation. */
static void teardown(ce_ctx_t *ctx) {
  ce_comm_t *c = &ctx->comm;
  if (!c->live_gen) return;
  if (ctx->backend == CE_BACKEND_CUDA) ce_nccl_comm_teardown(ctx, c->live_gen);
  else ce_tcp_comm_teardown(ctx);
  c->live_gen = 0;
}

/* Drains the eventfd so that a past abort does not wake the next generation's waits. */
static void drain_wake(ce_comm_t *c) {
  uint64_t v;
  while (c->wake_fd >= 0 && read(c->wake_fd, &v, sizeof v) > 0) {
  }
}

static void dead_message(ce_ctx_t *ctx, uint64_t g, char *buf, size_t len) {
  ce_comm_t *c = &ctx->comm;
  pthread_mutex_lock(&c->mu);
  if (atomic_load(&c->dead_gen) == g) snprintf(buf, len, "%s", c->fail_msg);
  else snprintf(buf, len, "a newer communicator replaced it");
  pthread_mutex_unlock(&c->mu);
}

static int fail_dead(ce_ctx_t *ctx, uint64_t g, const char *what) {
  char why[1024];
  dead_message(ctx, g, why, sizeof why);
  return ce_fail(CE_E_ABORTED, "%s: communicator generation %llu ended before it ran: %s", what, (unsigned long long)g, why);
}

/* GPU ops of a failed broadcast issue: record the end events anyway, so the op reports the
 * failure only once whatever reached the streams has left them (teardown aborts the kernels). */
static void gpu_issue_failed(ce_ctx_t *ctx, ce_op_t *op, int status) {
  int recorded = op->ndevs > 0;
  for (int i = 0; i < op->ndevs && recorded; i++) {
    int d = op->devs[i];
    if (ce_dev_enter(ctx, d) || cu.cuEventRecord(op->end[d], ctx->dev[d].comm) != CUDA_SUCCESS) recorded = 0;
  }
  ce_op_issued(op, recorded ? ISSUE_DONE : ISSUE_FAILED, status);
}

static void run_job(ce_ctx_t *ctx, ce_comm_job_t *job) {
  ce_comm_t *c = &ctx->comm;
  ce_op_t *op = job->op;
  int rc;
  switch (job->type) {
  case JOB_INIT:
    op->t0_ms = ce_now_ms();
    teardown(ctx); /* a previous generation is dead by now: ce_comm_init allows no other case */
    drain_wake(c);
    if (ce_comm_dead(ctx, job->gen)) {
      rc = ce_comm_fail_op(op, fail_dead(ctx, job->gen, "communicator init"));
      if (job->listen_fd >= 0) close(job->listen_fd);
    } else {
      c->live_gen = job->gen;
      c->seq = 0;
      rc = ctx->backend == CE_BACKEND_CUDA ? ce_nccl_comm_init(ctx, job) : ce_tcp_comm_init(ctx, job);
      if (rc != CE_OK) {
        ce_comm_fail_op(op, rc);
        comm_kill(ctx, job->gen, rc, op->err);
      } else {
        pthread_mutex_lock(&c->mu);
        if (atomic_load(&c->dead_gen) < job->gen) atomic_store(&c->state, COMM_READY);
        pthread_mutex_unlock(&c->mu);
        if (ce_comm_dead(ctx, job->gen)) rc = ce_comm_fail_op(op, fail_dead(ctx, job->gen, "communicator init"));
      }
    }
    ce_op_complete(op, rc);
    break;
  case JOB_BCAST: {
    uint64_t seq = ++c->seq; /* the same on every rank: collectives are issued in one order */
    char what[96];
    snprintf(what, sizeof what, "broadcast #%llu from rank %d", (unsigned long long)seq, job->root);
    if (ctx->backend == CE_BACKEND_CUDA) {
      if (ce_comm_dead(ctx, job->gen) || c->live_gen != job->gen) {
        ce_comm_fail_op(op, fail_dead(ctx, job->gen, what));
        ce_op_issued(op, ISSUE_FAILED, CE_E_ABORTED);
      } else if ((rc = ce_nccl_comm_bcast(ctx, job, seq)) != CE_OK) {
        ce_comm_fail_op(op, rc);
        comm_kill(ctx, job->gen, rc, op->err);
        gpu_issue_failed(ctx, op, rc);
      }
      ce_op_unpin(job->after);
    } else {
      op->t0_ms = ce_now_ms();
      if (ce_comm_dead(ctx, job->gen) || c->live_gen != job->gen) {
        rc = ce_comm_fail_op(op, fail_dead(ctx, job->gen, what));
      } else if ((rc = ce_tcp_comm_bcast(ctx, job, seq)) != CE_OK) {
        ce_comm_fail_op(op, rc);
        comm_kill(ctx, job->gen, rc, op->err);
      }
      ce_op_complete(op, rc);
    }
    break;
  }
  case JOB_SPANS:
    if ((rc = ce_spans_issue(ctx, op, job->after, job->dev, job->d2d, job->spans, job->nspans, job->what)) != CE_OK) {
      ce_comm_fail_op(op, rc);
      ce_op_issued(op, ISSUE_FAILED, rc);
    }
    ce_op_unpin(job->after);
    free(job->spans);
    break;
  }
}

static void *comm_main(void *arg) {
  ce_ctx_t *ctx = arg;
  ce_comm_t *c = &ctx->comm;
  pthread_mutex_lock(&c->mu);
  for (;;) {
    if (!c->head) {
      if (c->live_gen && atomic_load(&c->dead_gen) >= c->live_gen) {
        pthread_mutex_unlock(&c->mu);
        teardown(ctx);
        pthread_mutex_lock(&c->mu);
        continue;
      }
      if (c->stop) break;
      if (ctx->backend == CE_BACKEND_CUDA && c->live_gen && atomic_load(&c->state) == COMM_READY) {
        /* NCCL reports a dead peer or a failed kernel only when asked: ask every 10 ms. */
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += 10 * 1000000L;
        if (ts.tv_nsec >= 1000000000L) ts.tv_sec++, ts.tv_nsec -= 1000000000L;
        pthread_cond_timedwait(&c->cv, &c->mu, &ts);
        uint64_t g = c->live_gen;
        pthread_mutex_unlock(&c->mu);
        if (g && !ce_comm_dead(ctx, g) && ce_nccl_comm_watch(ctx) != CE_OK) comm_kill(ctx, g, CE_E_NCCL, ce_last_error());
        pthread_mutex_lock(&c->mu);
      } else {
        pthread_cond_wait(&c->cv, &c->mu);
      }
      continue;
    }
    ce_comm_job_t *job = c->head;
    c->head = job->next;
    if (!c->head) c->tail = NULL;
    pthread_mutex_unlock(&c->mu);
    run_job(ctx, job);
    free(job);
    pthread_mutex_lock(&c->mu);
  }
  pthread_mutex_unlock(&c->mu);
  teardown(ctx);
  return NULL;
}

/* Queues job (taking it), starting the comm thread on first use. */
static int enqueue(ce_ctx_t *ctx, ce_comm_job_t *job) {
  ce_comm_t *c = &ctx->comm;
  pthread_mutex_lock(&c->mu);
  if (!c->thread_started) {
    int e = pthread_create(&c->thread, NULL, comm_main, ctx);
    if (e != 0) {
      pthread_mutex_unlock(&c->mu);
      free(job);
      return ce_fail(CE_E_NOMEM, "starting the comm thread: %s", strerror(e));
    }
    c->thread_started = 1;
  }
  job->next = NULL;
  if (c->tail) c->tail->next = job;
  else c->head = job;
  c->tail = job;
  pthread_cond_broadcast(&c->cv);
  pthread_mutex_unlock(&c->mu);
  return CE_OK;
}

void ce_comm_shutdown(ce_ctx_t *ctx) {
  ce_comm_t *c = &ctx->comm;
  pthread_mutex_lock(&c->mu);
  kill_locked(c, atomic_load(&c->gen), CE_E_ABORTED, "the context was destroyed");
  c->stop = 1;
  wake(c);
  int started = c->thread_started;
  pthread_mutex_unlock(&c->mu);
  if (started) pthread_join(c->thread, NULL);
  c->thread_started = 0;
  if (c->listen_fd >= 0) close(c->listen_fd);
  c->listen_fd = -1;
  if (c->wake_fd >= 0) close(c->wake_fd);
  c->wake_fd = -1;
  pthread_cond_destroy(&c->cv);
  pthread_mutex_destroy(&c->mu);
}

int ce_comm_verdict(ce_ctx_t *ctx, ce_op_t *op) {
  if (atomic_load(&op->settled) || !ce_comm_dead(ctx, op->comm_gen)) return CE_OK;
  ce_comm_t *c = &ctx->comm;
  pthread_mutex_lock(&c->mu);
  int same = atomic_load(&c->dead_gen) == op->comm_gen;
  int status = same ? c->fail_status : CE_E_ABORTED;
  char why[1024];
  snprintf(why, sizeof why, "%s", same ? c->fail_msg : "a newer communicator replaced it");
  pthread_mutex_unlock(&c->mu);
  return ce_fail(status ? status : CE_E_ABORTED,
                 "broadcast of communicator generation %llu did not complete before the generation ended: %s",
                 (unsigned long long)op->comm_gen, why);
}

int ce_comm_defer_spans(ce_ctx_t *ctx, ce_op_t *op, ce_op_t *after, int dev, int d2d, const ce_span_t *spans, uint64_t n,
                        const char *what) {
  ce_comm_job_t *job = calloc(1, sizeof *job);
  ce_span_t *copy = malloc(sizeof *copy * (n ? n : 1));
  if (!job || !copy) {
    free(job);
    free(copy);
    ce_op_unpin(after);
    return ce_fail(CE_E_NOMEM, "out of host memory");
  }
  memcpy(copy, spans, sizeof *copy * n);
  *job = (ce_comm_job_t){.type = JOB_SPANS, .op = op, .after = after, .dev = dev, .d2d = d2d, .spans = copy, .nspans = n};
  snprintf(job->what, sizeof job->what, "%s", what);
  atomic_store(&op->issued, ISSUE_PENDING);
  int rc = enqueue(ctx, job);
  if (rc) {
    atomic_store(&op->issued, ISSUE_DONE);
    free(copy);
    ce_op_unpin(after);
  }
  return rc;
}

/* ---- the ABI ---- */

int ce_comm_unique_id(ce_ctx_t *ctx, const char *endpoint, uint8_t *id, uint64_t len) {
  if (!ctx || !id) return ce_fail(CE_E_INVAL, "ce_comm_unique_id: NULL argument");
  if (len < CE_NCCL_ID_BYTES) return ce_fail(CE_E_INVAL, "ce_comm_unique_id: needs a 128-byte buffer, got %llu", (unsigned long long)len);
  if (ctx->backend == CE_BACKEND_CUDA) return ce_nccl_unique_id(id, len);
  return ce_tcp_unique_id(ctx, endpoint, id);
}

int ce_comm_init(ce_ctx_t *ctx, const uint8_t *id, uint64_t id_len, int nranks, int first_rank, int timeout_ms, uint64_t *op_out) {
  if (!ctx || !id || !op_out) return ce_fail(CE_E_INVAL, "ce_comm_init: NULL argument");
  if (id_len < CE_NCCL_ID_BYTES) return ce_fail(CE_E_INVAL, "ce_comm_init: the unique id has 128 bytes, got %llu", (unsigned long long)id_len);
  if (timeout_ms < 0) return ce_fail(CE_E_INVAL, "ce_comm_init: timeout %d ms", timeout_ms);
  if (nranks < ctx->ndev || first_rank < 0 || first_rank > nranks - ctx->ndev)
    return ce_fail(CE_E_INVAL, "ce_comm_init: ranks %d..%d do not fit in %d", first_rank, first_rank + ctx->ndev - 1, nranks);
  uint8_t token[16];
  if (ctx->backend == CE_BACKEND_CUDA) {
    if (!ce_nccl_loaded()) return ce_fail(CE_E_STATE, "NCCL is not loaded (ce_nccl_load first)");
  } else if (!ce_tcp_id_check(id, token)) {
    return ce_fail(CE_E_INVAL, "ce_comm_init: not a CPU-backend communicator id (ce_comm_unique_id on a CPU context makes one)");
  }
  ce_comm_job_t *job = calloc(1, sizeof *job);
  uint64_t opid;
  ce_op_t *op = job ? ce_op_new(ctx, OP_THREAD, &opid) : NULL;
  if (!op) {
    free(job);
    return ce_fail(CE_E_NOMEM, "out of host memory for an op");
  }
  ce_comm_t *c = &ctx->comm;
  pthread_mutex_lock(&c->mu);
  uint64_t g = atomic_load(&c->gen);
  int live = g && atomic_load(&c->dead_gen) < g;
  int state = atomic_load(&c->state);
  if (live && state == COMM_PENDING) {
    pthread_mutex_unlock(&c->mu);
    free(job);
    ce_op_discard(op);
    return ce_fail(CE_E_BUSY, "ce_comm_init: the init of communicator generation %llu is still pending (wait for its op, or ce_comm_abort it)",
                   (unsigned long long)g);
  }
  if (live) {
    pthread_mutex_unlock(&c->mu);
    free(job);
    ce_op_discard(op);
    return ce_fail(CE_E_STATE, "ce_comm_init: communicator generation %llu exists (ce_comm_abort it first)", (unsigned long long)g);
  }
  *job = (ce_comm_job_t){.type = JOB_INIT, .op = op, .gen = g + 1, .nranks = nranks, .first_rank = first_rank,
                         .timeout_ms = timeout_ms, .listen_fd = -1};
  memcpy(job->id, id, CE_NCCL_ID_BYTES);
  if (ctx->backend == CE_BACKEND_CPU && c->listen_fd >= 0 && memcmp(token, c->listen_token, sizeof token) == 0) {
    job->listen_fd = c->listen_fd; /* this context made the id: it runs the rendezvous */
    c->listen_fd = -1;
  }
  atomic_store(&c->gen, g + 1);
  atomic_store(&c->state, COMM_PENDING);
  c->nranks = nranks;
  c->first_rank = first_rank;
  c->timeout_ms = timeout_ms;
  op->comm_gen = g + 1;
  pthread_mutex_unlock(&c->mu);
  int listen_fd = job->listen_fd;
  int rc = enqueue(ctx, job);
  if (rc) {
    if (listen_fd >= 0) close(listen_fd);
    comm_kill(ctx, g + 1, rc, ce_last_error());
    ce_op_discard(op);
    return rc;
  }
  *op_out = opid;
  return CE_OK;
}

int ce_comm_abort(ce_ctx_t *ctx) {
  if (!ctx) return ce_fail(CE_E_INVAL, "ce_comm_abort: ctx is NULL");
  pthread_mutex_lock(&ctx->comm.mu);
  kill_locked(&ctx->comm, atomic_load(&ctx->comm.gen), CE_E_ABORTED, "aborted (ce_comm_abort)");
  pthread_mutex_unlock(&ctx->comm.mu);
  return CE_OK;
}

int ce_comm_info(ce_ctx_t *ctx, int64_t *info, uint64_t len) {
  if (!ctx || (!info && len)) return ce_fail(CE_E_INVAL, "ce_comm_info: NULL argument");
  ce_comm_t *c = &ctx->comm;
  pthread_mutex_lock(&c->mu);
  uint64_t g = atomic_load(&c->gen);
  int64_t v[5] = {g == 0 ? CE_COMM_NONE : atomic_load(&c->dead_gen) >= g ? CE_COMM_DEAD : atomic_load(&c->state) == COMM_READY ? CE_COMM_READY : CE_COMM_PENDING,
                  (int64_t)g, c->nranks, c->first_rank, g && atomic_load(&c->dead_gen) >= g ? c->fail_status : 0};
  pthread_mutex_unlock(&c->mu);
  for (uint64_t i = 0; i < len && i < 5; i++) info[i] = v[i];
  return CE_OK;
}

int ce_nccl_init(ce_ctx_t *ctx, const uint8_t *id, uint64_t id_len, int nranks, int first_rank, uint64_t *op_out) {
  if (ctx && ctx->backend != CE_BACKEND_CUDA) return ce_fail(CE_E_STATE, "ce_nccl_init: NCCL needs the CUDA backend (ce_comm_init serves both)");
  return ce_comm_init(ctx, id, id_len, nranks, first_rank, 0, op_out);
}

int ce_nccl_abort(ce_ctx_t *ctx) { return ce_comm_abort(ctx); }

/* The CPU backend without a communicator: every device is local, fan out with memcpy. */
static int bcast_local(ce_ctx_t *ctx, int root, ce_buf_t *src, uint64_t src_offset, ce_buf_t *const *dsts, uint64_t dst_offset,
                       uint64_t bytes, uint64_t after, uint64_t *op_out) {
  if (root < 0 || root >= ctx->ndev) return ce_fail(CE_E_INVAL, "ce_bcast_submit: root %d outside 0..%d", root, ctx->ndev - 1);
  int rc = ce_buf_in_ctx(ctx, src, "ce_bcast_submit");
  if (rc) return rc;
  if (src->dev != root) return ce_fail(CE_E_INVAL, "ce_bcast_submit: source lives on device %d, root is %d", src->dev, root);
  if (!ce_range_ok(src_offset, bytes, src->bytes))
    return ce_fail(CE_E_INVAL, "broadcast of %llu bytes at %llu overruns the source of %llu bytes", (unsigned long long)bytes,
                   (unsigned long long)src_offset, (unsigned long long)src->bytes);
  uint64_t id;
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

int ce_bcast_submit(ce_ctx_t *ctx, int root, ce_buf_t *src, uint64_t src_offset, ce_buf_t *const *dsts, uint64_t ndsts,
                    uint64_t dst_offset, uint64_t bytes, uint64_t after, uint64_t *op_out) {
  if (!ctx || !dsts || !op_out) return ce_fail(CE_E_INVAL, "ce_bcast_submit: NULL argument");
  if (ndsts != (uint64_t)ctx->ndev)
    return ce_fail(CE_E_INVAL, "ce_bcast_submit: %llu destinations for %d devices", (unsigned long long)ndsts, ctx->ndev);
  int rc;
  for (int d = 0; d < ctx->ndev; d++) {
    if ((rc = ce_buf_in_ctx(ctx, dsts[d], "ce_bcast_submit"))) return rc;
    if (dsts[d]->dev != d) return ce_fail(CE_E_INVAL, "ce_bcast_submit: destination %d lives on device %d", d, dsts[d]->dev);
    if (!ce_range_ok(dst_offset, bytes, dsts[d]->bytes))
      return ce_fail(CE_E_INVAL, "broadcast of %llu bytes at %llu overruns the buffer of %llu bytes on device %d",
                     (unsigned long long)bytes, (unsigned long long)dst_offset, (unsigned long long)dsts[d]->bytes, d);
  }
  ce_comm_t *c = &ctx->comm;
  pthread_mutex_lock(&c->mu);
  uint64_t g = atomic_load(&c->gen);
  int nranks = c->nranks, first = c->first_rank;
  int dead = g && atomic_load(&c->dead_gen) >= g;
  char why[1024];
  snprintf(why, sizeof why, "%s", dead ? c->fail_msg : "");
  pthread_mutex_unlock(&c->mu);
  if (g == 0 && ctx->backend == CE_BACKEND_CPU) return bcast_local(ctx, root, src, src_offset, dsts, dst_offset, bytes, after, op_out);
  if (g == 0) return ce_fail(CE_E_STATE, "ce_bcast_submit: no communicator (ce_comm_init first)");
  if (dead)
    return ce_fail(CE_E_ABORTED, "ce_bcast_submit: communicator generation %llu has ended (%s): init a new one", (unsigned long long)g, why);
  if (root < 0 || root >= nranks) return ce_fail(CE_E_INVAL, "ce_bcast_submit: root %d outside 0..%d", root, nranks - 1);
  int local_root = root >= first && root < first + ctx->ndev ? root - first : -1;
  if (local_root >= 0) {
    if ((rc = ce_buf_in_ctx(ctx, src, "ce_bcast_submit"))) return rc;
    if (src->dev != local_root) return ce_fail(CE_E_INVAL, "ce_bcast_submit: source lives on device %d, root %d is device %d", src->dev, root, local_root);
    if (!ce_range_ok(src_offset, bytes, src->bytes))
      return ce_fail(CE_E_INVAL, "broadcast of %llu bytes at %llu overruns the source of %llu bytes", (unsigned long long)bytes,
                     (unsigned long long)src_offset, (unsigned long long)src->bytes);
  }
  ce_comm_job_t *job = calloc(1, sizeof *job);
  if (!job) return ce_fail(CE_E_NOMEM, "out of host memory");
  uint64_t id;
  int cuda = ctx->backend == CE_BACKEND_CUDA;
  ce_op_t *op = ce_op_new(ctx, cuda ? OP_GPU : OP_THREAD, &id);
  if (!op) {
    free(job);
    return CE_E_NOMEM;
  }
  op->comm_gen = g;
  *job = (ce_comm_job_t){.type = JOB_BCAST, .op = op, .gen = g, .root = root, .local_root = local_root, .bytes = bytes, .after_id = after};
  for (int d = 0; d < ctx->ndev; d++) job->dst[d] = (cuda ? dsts[d]->dptr : (uint64_t)(uintptr_t)dsts[d]->host) + dst_offset;
  if (local_root >= 0) job->src = (cuda ? src->dptr : (uint64_t)(uintptr_t)src->host) + src_offset;
  if (cuda) {
    for (int d = 0; d < ctx->ndev; d++)
      if ((rc = ce_dev_enter(ctx, d)) || (rc = ce_op_events(op, d))) {
        free(job);
        ce_op_discard(op);
        return rc;
      }
    int pending;
    job->after = ce_op_pin(ctx, after, &pending);
    if (job->after && job->after->kind != OP_GPU) {
      ce_op_unpin(job->after);
      free(job);
      ce_op_discard(op);
      return ce_fail(CE_E_STATE, "after: op %llu is not a GPU op", (unsigned long long)after);
    }
    atomic_store(&op->issued, ISSUE_PENDING);
  }
  for (int d = 0; d < ctx->ndev; d++) ce_op_hold_buf(op, dsts[d]);
  if (local_root >= 0) ce_op_hold_buf(op, src);
  ce_op_t *pinned = job->after;
  if ((rc = enqueue(ctx, job))) {
    ce_op_unpin(pinned);
    atomic_store(&op->issued, ISSUE_DONE);
    ce_op_discard(op);
    return rc;
  }
  *op_out = id;
  return CE_OK;
}
