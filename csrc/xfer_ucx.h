/* The UCX engine's parts, shared by xfer_ucx.c (context, worker, progress thread, peers, memory)
 * and xfer_ucx_read.c (reads as active messages: the reader's pieces, the owner's answers). */
#ifndef CE_XFER_UCX_H
#define CE_XFER_UCX_H

#include "xfer.h"

#include "dl_ucx.h"

/* Active message ids: a read's request (reader to owner) and its answer (owner to reader). */
#define AM_READ 0xce1
#define AM_DATA 0xce2

/* The request's header. cookie names the reader's piece: a slot index and its generation, so a
 * late or forged answer finds no piece instead of a freed one. */
typedef struct {
  uint64_t cookie;
  uint64_t addr; /* in the owner's address space, inside registration reg */
  uint64_t bytes;
  uint32_t reg;
  uint32_t pad;
} read_req_t;

/* The answer's header; the payload is the bytes, or the owner's reason when status is not CE_OK. */
typedef struct {
  uint64_t cookie;
  int32_t status;
  uint32_t pad;
} read_ans_t;

/* One piece of a read, from its request until its answer is in place. Its slot is reused only once
 * UCX holds neither its request's send nor its answer's receive. */
typedef struct {
  ce_xfer_t *x;
  xfer_read_t *rd; /* NULL once its outcome is told */
  uint32_t peer;   /* the peer's id */
  uint32_t gen;
  uint32_t index;
  /* Set before the call that hands UCX the request: UCX may run the callback inside that call. */
  int sending;   /* the request's send */
  int receiving; /* the answer's rendezvous receive */
  int idle;      /* on the free stack */
  uint8_t *dst;
  uint64_t bytes;
  read_req_t req; /* lives until sent */
} ucx_piece_t;

/* A registration's side in UCX: its mapping and the answers being sent from it. */
typedef struct {
  ucp_context_h context;
  ucp_mem_h memh;
  uint32_t serving;
  int withdrawn; /* being deregistered: new requests are refused */
  int orphan;    /* its registration is gone (forced): the last answer frees it */
} ucx_mem_t;

/* Unmaps and frees a registration's UCX side. */
void ucx_mem_release(ucx_mem_t *m);

typedef struct {
  ucp_context_h context;
  ucp_worker_h worker;
  int efd;     /* the worker's */
  int wake_fd; /* eventfd: new work, a stop */
  pthread_t thread;
  int thread_started;
  _Atomic int stop;
  ucx_piece_t **pieces; /* slots, each allocated once */
  uint32_t npieces, cap;
  uint32_t *free_slots; /* a stack of idle slot indexes */
  uint32_t nfree;
} ucx_t;

/* UCX's status as ce's: CE_E_PEER when the peer or the path to it is gone, else CE_E_P2P. */
int ucx_status_ce(ucs_status_t s);

/* The active-message handlers (AM_READ: a reader's request; AM_DATA: an answer). They run inside
 * ucp_worker_progress, under x->mu. */
ucs_status_t ucx_on_read(void *arg, const void *header, size_t header_length, void *data, size_t length,
                         const ce_ucp_am_recv_param_t *param);
ucs_status_t ucx_on_data(void *arg, const void *header, size_t header_length, void *data, size_t length,
                         const ce_ucp_am_recv_param_t *param);
/* Under x->mu: the engine's get (xfer.h). */
int ucx_get(ce_xfer_t *x, xfer_read_t *rd, const uint8_t *key, uint64_t key_len, void *dst, uint64_t remote_addr,
            uint64_t bytes);
/* Under x->mu, as p's endpoint closes: its pieces waiting for an answer fail with p's reason. */
void ucx_pieces_fail_peer(ucx_t *u, xfer_peer_t *p);
/* After the worker is gone: the piece slots. */
void ucx_pieces_free(ucx_t *u);

#endif
