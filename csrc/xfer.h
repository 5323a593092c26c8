/* Transfer endpoints (P2P), shared by xfer*.c only: the engine-neutral tables of xfer.c (peers,
 * registrations, reads in flight) and the small interface each engine implements. */
#ifndef CE_XFER_H
#define CE_XFER_H

#include "internal.h"

typedef struct xfer_peer xfer_peer_t;
typedef struct xfer_read xfer_read_t;

/* Memory registered for remote reads. */
typedef struct xfer_reg {
  uint32_t id;
  uint32_t region;   /* or UINT32_MAX for a buffer */
  struct ce_buf *buf;
  uint8_t *base;
  uint64_t bytes;
  void *mem;         /* engine's state (UCX: its mapping, the answers being sent from it) */
  uint8_t *key;      /* the whole remote-key blob handed to readers (xfer.c's format) */
  uint64_t key_len;
  struct xfer_reg *next;
} xfer_reg_t;

/* A peer's failure: once status is set the peer takes no more reads and the ones in flight fail
 * with it (a read's own error otherwise). */
struct xfer_peer {
  uint32_t id;
  char name[128];
  void *ep; /* engine's endpoint; NULL once closed */
  int status;
  char msg[768];
  uint32_t inflight; /* reads with a piece in flight */
  void *impl;        /* engine's per-peer state (UCX: unpacked rkeys, the close request) */
  xfer_peer_t *next;
};

/* One read op: nreads pieces from one peer into one destination. */
struct xfer_read {
  ce_xfer_t *x;
  xfer_peer_t *peer;
  ce_op_t *op;          /* NULL once completed, or abandoned at destroy */
  uint64_t bytes;       /* in all pieces */
  uint32_t npieces;
  uint32_t pending;     /* pieces not completed */
  double deadline_ms;   /* 0: none */
  int timeout_ms;
  int status;           /* the first piece's failure */
  char msg[768];
  xfer_read_t *prev, *next;
};

typedef struct {
  const char *name;
  /* Engine state, the progress thread, the local address (x->addr). */
  int (*open)(ce_xfer_t *x);
  /* Called with no lock: ends the progress thread, fails every read in flight (status, msg) and
   * frees everything the engine holds. Reads the engine could not end are left in x->reads. */
  void (*close)(ce_xfer_t *x, int status, const char *msg);
  /* Under x->mu. Maps r->base..+bytes; fills r->mem and the engine's key bytes (malloc'd). */
  int (*reg)(ce_xfer_t *x, xfer_reg_t *r, uint8_t **key_out, uint64_t *key_len_out);
  /* Under x->mu. Unmaps r once no peer is being answered from it; CE_E_BUSY (last error set) if
   * one still is after a bounded wait, unless force. */
  int (*dereg)(ce_xfer_t *x, xfer_reg_t *r, int force);
  /* Under x->mu. addr: the engine's part of the address blob. */
  int (*connect)(ce_xfer_t *x, xfer_peer_t *p, const uint8_t *addr, uint64_t len);
  /* Under x->mu: closes the endpoint, its reads fail with p->status. */
  void (*disconnect)(ce_xfer_t *x, xfer_peer_t *p);
  /* Under x->mu. Posts one piece of rd: CE_OK when done at once, CE_INPROGRESS when the engine
   * will call xfer_piece_done, else an error (last error set). key: the engine's key bytes. */
  int (*get)(ce_xfer_t *x, xfer_read_t *rd, const uint8_t *key, uint64_t key_len, void *dst, uint64_t remote_addr,
             uint64_t bytes);
  /* Wakes the progress thread (new work, deadlines). Any thread, any lock. */
  void (*wake)(ce_xfer_t *x);
} xfer_engine_t;

struct ce_xfer {
  ce_ctx_t *ctx;
  int engine;
  const xfer_engine_t *eng;
  void *impl;
  /* Every table below, and every call into the engine's library: UCX's worker is created
   * serialized, so one lock covers the caller's threads and the progress thread. */
  pthread_mutex_t mu;
  uint8_t *addr; /* the engine's address bytes */
  uint64_t addr_len;
  xfer_reg_t *regs;
  uint32_t next_reg;
  xfer_peer_t *peers;
  uint32_t next_peer;
  xfer_read_t *reads; /* in flight */
  uint64_t bytes_read;
  struct ce_xfer *next; /* the context's endpoints */
};

extern const xfer_engine_t ce_xfer_ucx;
extern const xfer_engine_t ce_xfer_mooncake;

/* Under x->mu, from the engine: one piece of rd ended (status CE_OK or an error with msg). The
 * last one completes the op; rd is freed then. */
void xfer_piece_done(xfer_read_t *rd, int status, const char *msg);
/* Under x->mu: the earliest deadline of the reads in flight (0: none); fails a peer whose read
 * passed its deadline, through disconnect. For the progress thread. */
double xfer_deadlines(ce_xfer_t *x, double now_ms);
/* Under x->mu: marks p failed (first failure wins) and closes it. */
void xfer_peer_fail(ce_xfer_t *x, xfer_peer_t *p, int status, const char *fmt, ...) __attribute__((format(printf, 4, 5)));

/* The engines' progress threads sleep on their fds and an eventfd of libce's (the last of fds):
 * xfer_signal wakes one (any thread, any lock); xfer_sleep waits until an fd is readable, the
 * earliest deadline (next_ms; 0: none) or idle_ms, and drains the eventfd. */
struct pollfd;
void xfer_signal(int fd);
void xfer_sleep(struct pollfd *fds, int nfds, double next_ms, double now_ms, int idle_ms);

/* The engines' ce_xfer_load halves (dl_mooncake.c, xfer_ucx.c). */
int ce_mooncake_load(const char *path, char *json, uint64_t len);
const char *ce_mooncake_file(void);
int ce_ucx_describe(char *json, uint64_t len);

#endif
