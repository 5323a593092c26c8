/* The communicator's comm thread and its two transports (NCCL, TCP), shared by comm*.c only. */
#ifndef CE_COMM_H
#define CE_COMM_H

#include "internal.h"

enum { JOB_INIT = 1, JOB_BCAST, JOB_SPANS };

struct ce_comm_job {
  int type;
  ce_op_t *op;
  uint64_t gen; /* JOB_INIT, JOB_BCAST */
  ce_comm_job_t *next;
  /* JOB_INIT */
  uint8_t id[CE_NCCL_ID_BYTES];
  int nranks, first_rank, timeout_ms;
  int listen_fd; /* CPU: the rendezvous listener when this context made the id, else -1 */
  /* JOB_BCAST */
  int root, local_root;
  uint64_t bytes;
  uint64_t src;                  /* device pointer or host address at the offset; 0 without a local root */
  uint64_t dst[CE_MAX_DEVICES];  /* one per local device, at the offset */
  ce_op_t *after;                /* CUDA: pinned op the root's stream waits for */
  uint64_t after_id;             /* CPU: thread op to wait for */
  /* JOB_SPANS */
  int dev, d2d;
  ce_span_t *spans;
  uint64_t nspans;
  char what[32];
};

/* Whether generation gen was aborted or failed. */
static inline int ce_comm_dead(ce_ctx_t *ctx, uint64_t gen) { return atomic_load(&ctx->comm.dead_gen) >= gen; }
/* The last error of this thread as an op's message, returning status. */
int ce_comm_fail_op(ce_op_t *op, int status);

/* ---- NCCL (comm_nccl.c): called on the comm thread only ---- */
int ce_nccl_comm_init(ce_ctx_t *ctx, ce_comm_job_t *job);
int ce_nccl_comm_bcast(ce_ctx_t *ctx, ce_comm_job_t *job, uint64_t seq);
/* An async error of a ready communicator, as the last error; CE_OK when none. */
int ce_nccl_comm_watch(ce_ctx_t *ctx);
void ce_nccl_comm_teardown(ce_ctx_t *ctx, uint64_t gen);

/* ---- TCP (comm_tcp.c): the CPU backend's communicator ---- */
/* Binds the rendezvous listener for ce_comm_unique_id (caller's thread: socket, bind, listen). */
int ce_tcp_unique_id(ce_ctx_t *ctx, const char *endpoint, uint8_t *id);
/* Whether id names a CPU-backend communicator; its token for matching the context's listener. */
int ce_tcp_id_check(const uint8_t *id, uint8_t token_out[16]);
int ce_tcp_comm_init(ce_ctx_t *ctx, ce_comm_job_t *job);
int ce_tcp_comm_bcast(ce_ctx_t *ctx, ce_comm_job_t *job, uint64_t seq);
void ce_tcp_comm_teardown(ce_ctx_t *ctx);

#endif
