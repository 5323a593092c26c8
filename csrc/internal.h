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
enum { REGION_ALLOC_ANON = 1, REGION_MAP_FILE };

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
  ncclComm_t comm_nccl;
} ce_dev_t;

typedef struct ce_op ce_op_t;

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
  int nccl_ready;
  int nccl_nranks;
  int nccl_first_rank;
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
  _Atomic int inflight;
  struct ce_buf *next;
};

/* ---- ops (ops.c) ---- */
enum { OP_GPU = 1, OP_THREAD };

typedef int (*ce_job_fn)(ce_op_t *op);

struct ce_op {
  _Atomic uint32_t gen; /* bumped when the op is collected: a stale id is detected, not reused */
  int in_use;
  int kind;
  int is_bcast;
  ce_ctx_t *ctx;
  /* GPU ops: events on each device the op ran on */
  int ndevs;
  int devs[CE_MAX_DEVICES];
  CUevent start[CE_MAX_DEVICES]; /* indexed by the context's device index */
  CUevent end[CE_MAX_DEVICES];
  /* thread ops */
  pthread_t thread;
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
/* Gives back an op that failed before submission. */
void ce_op_discard(ce_op_t *op);
/* A thread op that owns `job` (freed when the op is collected). job NULL (a failed malloc) or no
 * op to be had: frees job, sets the last error, returns NULL. */
ce_op_t *ce_op_new_thread(ce_ctx_t *ctx, void *job, uint64_t *id_out);
/* Runs fn on the op's own thread and publishes id in *op_out; on failure discards the op. */
int ce_op_run(ce_op_t *op, ce_job_fn fn, uint64_t id, uint64_t *op_out);
/* Marks a region / buffer in use by the op until it is collected. */
void ce_op_hold_region(ce_op_t *op, uint32_t region);
void ce_op_hold_buf(ce_op_t *op, struct ce_buf *buf);
/* Looks an id up; NULL (with last error) when unknown or already collected. */
ce_op_t *ce_op_find(ce_ctx_t *ctx, uint64_t id);
/* Makes stream s wait for op `after` (0: none). */
int ce_op_stream_wait(ce_ctx_t *ctx, uint64_t after, CUstream s);
/* Thread ops: blocks until op `after` is done (0: none). */
void ce_op_thread_wait(ce_ctx_t *ctx, uint64_t after);
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

/* ---- buffers (ipc.c) ---- */
void ce_bufs_free(ce_ctx_t *ctx);
/* Host address of a CPU-backend buffer, device address of a CUDA one. */
static inline int ce_buf_on_host(const struct ce_buf *b) { return b->host != NULL; }

/* ---- NCCL (bcast.c) ---- */
void ce_nccl_free(ce_ctx_t *ctx);

/* ---- parallel helpers (cpu.c) ---- */
/* memcpy split over up to `threads` threads for large sizes. */
void ce_memcpy_parallel(void *dst, const void *src, uint64_t bytes, int threads);

#endif
