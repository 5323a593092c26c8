/* libce's internal shapes: shared by its .c files, never by callers. */
#ifndef CE_INTERNAL_H
#define CE_INTERNAL_H

#define CE_MAX_REGIONS 4096

#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include "ce.h"
#include "dl_cuda.h"
#include "dl_nccl.h"

/* ---- errors (ce.c) ---- */
int ce_fail(int status, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
int ce_failv(int status, const char *fmt, va_list ap);
/* Sets the last error to msg verbatim. */
int ce_fail_msg(int status, const char *msg);
double ce_now_ms(void); /* CLOCK_MONOTONIC */

/* ---- regions (pinned.c) ---- */
enum { REGION_FREE = 0, REGION_PENDING, REGION_READY, REGION_FAILED };
enum { REGION_ALLOC_ANON = 1, REGION_MAP_FILE, REGION_MAP_FILE_RW /* CE_REGION_WRITABLE: ce's own file */ };

typedef struct {
  _Atomic int state; /* set by the pinning thread, read by the caller's */
  int kind;
  uint8_t *base;
  uint64_t bytes;
  uint64_t pinned_bytes;
  /* Pinned in place as chunks registered in parallel; a copy never spans two chunks. */
  uint64_t chunk_bytes;
  uint32_t nchunks;
  _Atomic int inflight; /* ops reading or writing it */
  _Atomic int registered; /* transfer-endpoint registrations (xfer.c): peers may read it */
  char path[512];
} ce_region_t;

/* ---- devices and the context (ce.c) ---- */
typedef struct {
  int ordinal;
  CUdevice cudev;
  CUcontext cuctx;
  CUstream copy;
  CUstream comm;
  CUevent epoch;
  /* libce's kernels (kernels.c), compiled from PTX on first use; kernels_status: 0 untried, 1 loaded,
   * -1 failed (kernels_error says why) */
  CUmodule kernels;
  CUfunction scatter, digest;
  int kernels_status;
  CUresult kernels_error;
} ce_dev_t;

typedef struct ce_op ce_op_t;

/* ---- communicators (comm.c, comm_nccl.c, comm_tcp.c) ---- */
enum { COMM_NONE = 0, COMM_PENDING, COMM_READY, COMM_DEAD };

typedef struct ce_comm_job ce_comm_job_t;
typedef struct ce_tcp_comm ce_tcp_comm_t;

/* One per context. A generation is one communicator's life: init starts it, abort or a failure
 * ends it. One comm thread issues every call of it (NCCL calls, socket I/O) in submission order,
 * so the JS thread never blocks on a peer, and abort only has to flag and wake. */
typedef struct {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  pthread_t thread;
  int thread_started;
  int stop; /* destroy: fail what is queued, tear down, exit */
  ce_comm_job_t *head, *tail;
  _Atomic uint64_t gen;      /* the newest generation (0: never initialized) */
  _Atomic uint64_t dead_gen; /* every generation <= dead_gen is aborted or failed */
  _Atomic int state;         /* of gen */
  int nranks, first_rank, timeout_ms;
  /* why dead_gen died (under mu) */
  int fail_status;
  char fail_msg[1024];
  int wake_fd; /* eventfd: abort wakes the comm thread's socket polls */
  /* owned by the comm thread */
  uint64_t live_gen; /* the generation whose resources the thread holds */
  uint64_t seq;      /* broadcasts issued in live_gen */
  ncclComm_t nccl[CE_MAX_DEVICES];
  ce_tcp_comm_t *tcp;
  /* CPU backend: the rendezvous listener made by ce_comm_unique_id (under mu) */
  int listen_fd;
  uint8_t listen_token[16];
} ce_comm_t;

struct ce_ctx {
  int backend;
  int ndev;
  ce_dev_t dev[CE_MAX_DEVICES];
  pthread_mutex_t mu; /* regions, ops and bufs tables */
  ce_region_t *regions; /* CE_MAX_REGIONS entries, fixed so op threads may hold pointers */
  uint32_t nregions;   /* high-water mark */
  ce_op_t **ops;
  uint32_t nops;
  struct ce_buf *bufs;
  double epoch_host_ms;
  ce_comm_t comm;
  struct ce_xfer *xfers; /* transfer endpoints (xfer.c), under mu */
};

/* Makes device d's primary context current on this thread. */
int ce_dev_enter(ce_ctx_t *ctx, int d);

/* ---- buffers (ipc.c) ---- */
enum { BUF_DEVICE = 1, BUF_OPENED_IPC, BUF_HOST_SHM, BUF_HOST_ANON, BUF_OPENED_PATH };

struct ce_buf {
  ce_ctx_t *ctx;
  int dev;
  int kind;
  uint64_t bytes;
  CUdeviceptr dptr;
  uint8_t *host;
  char path[512];
  int lock_fd; /* BUF_HOST_SHM: holds the file's flock while this process lives */
  _Atomic int inflight;
  struct ce_buf *next;
};

/* ---- ops (ops.c) ---- */
enum { OP_GPU = 1, OP_THREAD };
/* GPU ops: whether their work is on the streams yet (an op issued by the comm thread is not at once). */
enum { ISSUE_FAILED = -1, ISSUE_PENDING = 0, ISSUE_DONE = 1 };

typedef int (*ce_job_fn)(ce_op_t *op);

struct ce_op {
  _Atomic uint32_t gen; /* bumped when the op is collected: a stale id is detected, not reused */
  int in_use;
  int kind;
  ce_ctx_t *ctx;
  /* GPU ops: ISSUE_*; with ISSUE_DONE and status != CE_OK the op fails once its events complete
   * (work queued before the failure may still run). */
  _Atomic int issued;
  CUstream sync_stream; /* set when the end event could not be recorded: poll queries the stream */
  /* ops of a communicator: its generation; settled when done before the generation died */
  uint64_t comm_gen;
  _Atomic int settled;
  /* other ops whose events will still be read (after = this op, issued later): slot not reused */
  _Atomic int pins;
  /* GPU ops: events on each device the op ran on */
  int ndevs;
  int devs[CE_MAX_DEVICES];
  CUevent start[CE_MAX_DEVICES]; /* indexed by the context's device index */
  CUevent end[CE_MAX_DEVICES];
  /* thread ops (joinable: own thread; else run by the comm thread) */
  pthread_t thread;
  int joinable;
  ce_job_fn job;
  void *job_arg;
  void (*job_free)(void *);
  _Atomic int done;
  int status;
  char err[1024];
  double t0_ms, t1_ms; /* host times of thread ops */
  uint64_t value;
  /* what to release when the op is collected */
  uint32_t *regions;
  uint32_t nregions;
  struct ce_buf *bufs[CE_MAX_DEVICES + 1];
  int nbufs;
};

/* A fresh op (locked table). Records regions/bufs whose inflight count the op holds. */
ce_op_t *ce_op_new(ce_ctx_t *ctx, int kind, uint64_t *id_out);
/* Creates op's events on device d (kept across reuse) and adds d to the devices it runs on. */
int ce_op_events(ce_op_t *op, int d);
/* Gives back an op that failed before submission. */
void ce_op_discard(ce_op_t *op);
/* A thread op that owns `job` (freed when the op is collected). job NULL (a failed malloc) or no
 * op to be had: frees job, sets the last error, returns NULL. */
ce_op_t *ce_op_new_thread(ce_ctx_t *ctx, void *job, uint64_t *id_out);
/* Runs worker(arg) on this thread and on up to threads - 1 more (at most items - 1 more: one per item
 * beyond the first), joined before it returns. The worker takes items until none are left, so a
 * thread that cannot be started only leaves its share to the others: slower, same result. */
void ce_fan_out(int threads, uint64_t items, void *(*worker)(void *), void *arg);
/* Runs fn on the op's own thread and publishes id in *op_out; on failure discards the op. */
int ce_op_run(ce_op_t *op, ce_job_fn fn, uint64_t id, uint64_t *op_out);
/* Marks a region / buffer in use by the op until it is collected. */
void ce_op_hold_region(ce_op_t *op, uint32_t region);
void ce_op_hold_buf(ce_op_t *op, struct ce_buf *buf);
/* Looks an id up; NULL (with last error) when unknown or already collected. */
ce_op_t *ce_op_find(ce_ctx_t *ctx, uint64_t id);
/* Makes stream s wait for op `after` (0: none). */
int ce_op_stream_wait(ce_ctx_t *ctx, uint64_t after, CUstream s);
/* The live op `after` names, pinned (its slot not reused) until ce_op_unpin; NULL for 0 or a
 * collected op. *pending_out: whether its GPU work is not issued yet. */
ce_op_t *ce_op_pin(ce_ctx_t *ctx, uint64_t after, int *pending_out);
void ce_op_unpin(ce_op_t *op);
/* Makes stream s wait for a pinned op's end events (nothing if it never reached the streams). */
int ce_op_stream_wait_op(ce_op_t *after, CUstream s);
/* A comm-run thread op is finished: status and message set, times taken. */
void ce_op_complete(ce_op_t *op, int status);
/* A comm-issued GPU op's issue ended: ISSUE_DONE or ISSUE_FAILED, with status. */
void ce_op_issued(ce_op_t *op, int issued, int status);
/* Thread ops: blocks until op `after` is done (0: none), or until *stop becomes nonzero (stop may be NULL). */
void ce_op_thread_wait(ce_ctx_t *ctx, uint64_t after, _Atomic uint64_t *stop, uint64_t stop_at);
/* Sets a thread op's error message (the thread's own last error is not the caller's). */
int ce_op_fail(ce_op_t *op, int status, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/* Waits for the ops that use buf to finish and drops their hold on it (before it is freed). */
void ce_ops_forget_buf(ce_ctx_t *ctx, struct ce_buf *buf);
/* Waits for every op of the context (destroy). */
void ce_ops_drain(ce_ctx_t *ctx);
void ce_ops_free(ce_ctx_t *ctx);

/* ---- region lookups (pinned.c) ---- */
/* The region if id names a ready one, else NULL with the last error set. */
ce_region_t *ce_region_get(ce_ctx_t *ctx, uint32_t id);
void ce_regions_free(ce_ctx_t *ctx);

/* ---- GPU kernels (kernels.c) ---- */
/* Loads libce's kernels on device d once (under ctx->mu); CE_E_CUDA, with the driver's reason, when
 * its JIT cannot build them. */
int ce_kernels_load(ce_ctx_t *ctx, int d);
/* Threads per block of both kernels (the digest's shared reduction is sized for it). */
#define CE_KERNEL_THREADS 256
/* Writes patch entries (int32 positions at pos, values at val) into dst, a tensor of `elems`
 * elements of es bytes, on stream s; *bad (a device word) becomes nonzero for a position past it. */
CUresult ce_kernel_scatter(const ce_dev_t *dv, CUstream s, CUdeviceptr dst, CUdeviceptr pos, CUdeviceptr val, uint64_t count,
                           uint64_t elems, uint32_t es, CUdeviceptr bad);
/* Blocks the digest kernel uses for `words` words: that many partial sums it writes. */
uint32_t ce_kernel_digest_blocks(uint64_t words);
/* Partial digest sums of the words at base (4-aligned) into out[0 .. ce_kernel_digest_blocks(words)). */
CUresult ce_kernel_digest(const ce_dev_t *dv, CUstream s, CUdeviceptr base, uint64_t words, CUdeviceptr out);

/* ---- buffers (ipc.c) ---- */
void ce_bufs_free(ce_ctx_t *ctx);
static inline int ce_range_ok(uint64_t off, uint64_t bytes, uint64_t size) { return off <= size && bytes <= size - off; }
static inline int ce_buf_in_ctx(ce_ctx_t *ctx, const struct ce_buf *b, const char *what) {
  if (!b) return ce_fail(CE_E_INVAL, "%s: buffer is NULL", what);
  if (b->ctx != ctx) return ce_fail(CE_E_INVAL, "%s: buffer belongs to another context", what);
  return CE_OK;
}
/* Host address of a CPU-backend buffer, device address of a CUDA one. */
static inline int ce_buf_on_host(const struct ce_buf *b) { return b->host != NULL; }

/* ---- communicators (comm.c) ---- */
void ce_comm_setup(ce_ctx_t *ctx);
/* Aborts the communicator, fails what is queued and joins the comm thread (destroy). */
void ce_comm_shutdown(ce_ctx_t *ctx);
/* For ce_op_poll of a done GPU op of a communicator: CE_OK, or why its generation died. */
int ce_comm_verdict(ce_ctx_t *ctx, ce_op_t *op);
/* Queues a deferred GPU copy op (its `after` is not issued yet) on the comm thread. */
typedef struct {
  uint64_t dst;
  uint64_t src;
  uint64_t bytes;
} ce_span_t;
int ce_comm_defer_spans(ce_ctx_t *ctx, ce_op_t *op, ce_op_t *after, int dev, int d2d, const ce_span_t *spans, uint64_t n,
                        const char *what);
/* Issues spans as op's copies on device dev's copy stream, after `after` (may be NULL). Returns
 * CE_OK when the op was issued (it may still fail, see ISSUE_DONE), else an error with nothing queued. */
int ce_spans_issue(ce_ctx_t *ctx, ce_op_t *op, ce_op_t *after, int dev, int d2d, const ce_span_t *spans, uint64_t n,
                   const char *what);

/* ---- transfer endpoints (xfer.c) ---- */
/* Destroys every endpoint of the context: their reads fail, their registrations go (destroy). */
void ce_xfers_free(ce_ctx_t *ctx);
/* Drops every registration of buf, before it is freed. */
void ce_xfers_forget_buf(ce_ctx_t *ctx, struct ce_buf *buf);

/* ---- parallel helpers (cpu.c) ---- */
/* memcpy split over up to `threads` threads for large sizes. */
void ce_memcpy_parallel(void *dst, const void *src, uint64_t bytes, int threads);

#endif
