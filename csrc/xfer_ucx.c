/* The UCX engine of transfer endpoints: one UCP context and worker per endpoint, reads as active
 * messages, and a progress thread of libce's own. A reader sends a request (registration, address,
 * length) and the owner answers with the bytes, UCX choosing eager or rendezvous (zero-copy where
 * the transport has it). Not RMA gets: over TCP UCX emulates a get with its own internal reply,
 * whose failure when the reader dies aborts the owner's process (1.13: an assertion in
 * uct_tcp_ep_pending_purge; 1.16: "unexpected error: Endpoint timeout" in ucp_get_req_handler);
 * an active message is a request of ours, and its failure comes back to our callback. The thread
 * sleeps on the worker's event fd (UCP_FEATURE_WAKEUP) and an eventfd of ours, so an idle
 * endpoint costs nothing, yet it answers the peers that read from us. */
#include "xfer.h"

#include "dl_ucx.h"

#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

/* The API version libce is written against (ucp_version.h of UCX 1.13); newer UCX accepts it. */
#define CE_UCP_API_MAJOR 1
#define CE_UCP_API_MINOR 13
/* How long destroy progresses the worker for the closed endpoints' requests to end (after
 * CONNECT_WAIT_MS at most for a handshake). */
#define CLOSE_DRAIN_MS 3000
/* How long a close waits for the peer's connection handshake to end first. UCX 1.13 aborts the
 * process of an owner whose reader vanished while the owner's wireup reply was still queued
 * (ucp_request_send_state_ff: "got REP message"; openucx/ucx#8175 dropped that assertion in 1.14),
 * so a reader closes no endpoint mid-handshake unless the handshake takes longer than this. */
#define CONNECT_WAIT_MS 2000
/* The progress thread's longest sleep: a bound on how late a deadline is noticed when no event
 * comes, and on how late a closed peer's keys are freed. */
#define IDLE_WAIT_MS 100
/* How long a deregistration waits for the answers being sent from it before it is refused. */
#define DEREG_DRAIN_MS 3000

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
  ucp_mem_h memh;
  uint32_t serving;
  int withdrawn; /* being deregistered: new requests are refused */
} ucx_mem_t;

/* An answer in flight: its header and reason live until UCX has sent them. */
typedef struct {
  read_ans_t ans;
  ucx_mem_t *mem; /* NULL for a refusal */
  char reason[256];
} ucx_answer_t;

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

typedef struct {
  ce_xfer_t *x;
  xfer_peer_t *peer;
  int close_pending; /* closed by the progress thread: never from inside UCX's error callback */
  void *close_req;
  int connected;      /* the handshake flush is over (done or failed) */
  double connect_deadline_ms;
} ucx_peer_t;

/* UCX statuses that mean the peer or the path to it is gone. */
static int ucx_status_ce(ucs_status_t s) {
  int gone = s == -25 /* CONNECTION_RESET */ || s == -6 /* UNREACHABLE */ || s == -24 /* NOT_CONNECTED */ ||
             s == -16 /* CANCELED */ || (s <= -40 && s >= -89) /* link and endpoint failures */;
  return gone ? CE_E_PEER : CE_E_P2P;
}

static void ucx_wake(ce_xfer_t *x) {
  ucx_t *u = x->impl;
  uint64_t one = 1;
  ssize_t n = write(u->wake_fd, &one, sizeof one); /* EAGAIN: already signalled */
  (void)n;
}

/* ---- pieces (the reader's side) ---- */

static ucx_piece_t *piece_new(ucx_t *u) {
  if (u->nfree == 0) {
    if (u->npieces == u->cap) {
      uint32_t cap = u->cap ? 2 * u->cap : 256;
      ucx_piece_t **pieces = realloc(u->pieces, cap * sizeof *pieces);
      if (!pieces) return NULL;
      u->pieces = pieces;
      uint32_t *free_slots = realloc(u->free_slots, cap * sizeof *free_slots);
      if (!free_slots) return NULL;
      u->free_slots = free_slots;
      u->cap = cap;
    }
    ucx_piece_t *pc = calloc(1, sizeof *pc);
    if (!pc) return NULL;
    pc->index = u->npieces;
    u->pieces[u->npieces++] = pc;
    pc->idle = 1;
    u->free_slots[u->nfree++] = pc->index;
  }
  ucx_piece_t *pc = u->pieces[u->free_slots[--u->nfree]];
  pc->gen++;
  pc->idle = 0;
  return pc;
}

static void piece_idle_check(ucx_t *u, ucx_piece_t *pc) {
  if (pc->rd || pc->sending || pc->receiving || pc->idle) return;
  pc->idle = 1;
  u->free_slots[u->nfree++] = pc->index;
}

/* Tells the piece's outcome once; the slot goes back when UCX is done with it too. */
static void piece_end(ucx_piece_t *pc, int status, const char *msg) {
  xfer_read_t *rd = pc->rd;
  if (rd) {
    pc->rd = NULL;
    xfer_piece_done(rd, status, msg);
  }
  piece_idle_check(pc->x->impl, pc);
}

static void piece_sent(void *request, ucs_status_t s, void *user_data) {
  ucx_piece_t *pc = user_data;
  ucx.ucp_request_free(request);
  pc->sending = 0;
  if (s != UCS_OK) piece_end(pc, ucx_status_ce(s), ucx.ucs_status_string(s));
  else piece_idle_check(pc->x->impl, pc);
}

static void piece_received(void *request, ucs_status_t s, size_t length, void *user_data) {
  (void)length;
  ucx_piece_t *pc = user_data;
  ucx.ucp_request_free(request);
  pc->receiving = 0;
  piece_end(pc, s == UCS_OK ? CE_OK : ucx_status_ce(s), s == UCS_OK ? NULL : ucx.ucs_status_string(s));
}

/* Fails p's pieces still waiting for an answer (a receive under way ends through UCX). */
static void pieces_fail_peer(ucx_t *u, xfer_peer_t *p) {
  for (uint32_t i = 0; i < u->npieces; i++) {
    ucx_piece_t *pc = u->pieces[i];
    if (pc->rd && pc->peer == p->id && !pc->receiving) piece_end(pc, p->status, p->msg);
  }
}

/* AM_DATA: an answer. Runs inside ucp_worker_progress, under x->mu. */
static ucs_status_t ucx_on_data(void *arg, const void *header, size_t header_length, void *data, size_t length,
                                const ce_ucp_am_recv_param_t *param) {
  ce_xfer_t *x = arg;
  ucx_t *u = x->impl;
  read_ans_t ans;
  if (header_length != sizeof ans) return UCS_OK;
  memcpy(&ans, header, sizeof ans);
  uint32_t index = (uint32_t)ans.cookie, gen = (uint32_t)(ans.cookie >> 32);
  ucx_piece_t *pc = index < u->npieces ? u->pieces[index] : NULL;
  if (!pc || pc->gen != gen || !pc->rd || pc->receiving) return UCS_OK; /* a piece that ended (deadline, close) */
  int rndv = (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) != 0;
  if (ans.status != CE_OK) {
    char why[257] = "";
    if (!rndv) memcpy(why, data, length < 256 ? length : 256);
    piece_end(pc, ans.status, why);
    return UCS_OK;
  }
  if (length != pc->bytes) {
    char why[128];
    snprintf(why, sizeof why, "the peer answered %zu bytes for a read of %llu", length, (unsigned long long)pc->bytes);
    piece_end(pc, CE_E_P2P, why);
    return UCS_OK;
  }
  if (!rndv) {
    memcpy(pc->dst, data, length);
    piece_end(pc, CE_OK, NULL);
    return UCS_OK;
  }
  ce_ucp_request_param_t prm = {
      .op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_MEMORY_TYPE,
      .cb.recv_am = piece_received,
      .user_data = pc,
      .memory_type = UCS_MEMORY_TYPE_HOST,
  };
  pc->receiving = 1;
  ucs_status_ptr_t sp = ucx.ucp_am_recv_data_nbx(u->worker, data, pc->dst, length, &prm);
  if (!CE_UCS_PTR_IS_PTR(sp)) {
    ucs_status_t s = sp ? CE_UCS_PTR_STATUS(sp) : UCS_OK;
    pc->receiving = 0;
    piece_end(pc, s == UCS_OK ? CE_OK : ucx_status_ce(s), s == UCS_OK ? NULL : ucx.ucs_status_string(s));
  }
  return UCS_OK;
}

/* ---- answers (the owner's side) ---- */

static void answer_free(ucx_answer_t *a) {
  if (a->mem) a->mem->serving--;
  free(a);
}

static void answer_sent(void *request, ucs_status_t s, void *user_data) {
  (void)s; /* a reader that died: nothing to do here, it fails its own read */
  ucx.ucp_request_free(request);
  answer_free(user_data);
}

/* The registration a request may read: known, and the whole range inside it. */
static xfer_reg_t *answer_reg(ce_xfer_t *x, const read_req_t *q, char *why, size_t why_len) {
  for (xfer_reg_t *r = x->regs; r; r = r->next) {
    if (r->id != q->reg || ((ucx_mem_t *)r->mem)->withdrawn) continue;
    uint64_t base = (uint64_t)(uintptr_t)r->base;
    if (q->addr >= base && ce_range_ok(q->addr - base, q->bytes, r->bytes)) return r;
    snprintf(why, why_len, "%llu bytes at %#llx are outside registration %u of %llu bytes", (unsigned long long)q->bytes,
             (unsigned long long)q->addr, q->reg, (unsigned long long)r->bytes);
    return NULL;
  }
  snprintf(why, why_len, "registration %u is not (or no longer) registered there", q->reg);
  return NULL;
}

/* AM_READ: a reader's request. Runs inside ucp_worker_progress, under x->mu. */
static ucs_status_t ucx_on_read(void *arg, const void *header, size_t header_length, void *data, size_t length,
                                const ce_ucp_am_recv_param_t *param) {
  (void)data;
  (void)length;
  ce_xfer_t *x = arg;
  read_req_t q;
  if (header_length != sizeof q || !(param->recv_attr & UCP_AM_RECV_ATTR_FIELD_REPLY_EP)) return UCS_OK;
  memcpy(&q, header, sizeof q);
  ucx_answer_t *a = calloc(1, sizeof *a);
  if (!a) return UCS_OK; /* the reader's deadline ends its read */
  a->ans.cookie = q.cookie;
  xfer_reg_t *r = answer_reg(x, &q, a->reason, sizeof a->reason);
  const void *payload = a->reason;
  size_t bytes = strlen(a->reason);
  if (r) {
    a->mem = r->mem;
    a->mem->serving++;
    payload = (const void *)(uintptr_t)q.addr;
    bytes = q.bytes;
  } else {
    a->ans.status = CE_E_INVAL;
  }
  ce_ucp_request_param_t prm = {
      .op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_MEMORY_TYPE,
      .cb.send = answer_sent,
      .user_data = a,
      .memory_type = UCS_MEMORY_TYPE_HOST,
  };
  ucs_status_ptr_t sp = ucx.ucp_am_send_nbx(param->reply_ep, AM_DATA, &a->ans, sizeof a->ans, payload, bytes, &prm);
  if (!CE_UCS_PTR_IS_PTR(sp)) answer_free(a);
  return UCS_OK;
}

/* ---- peers ---- */

static void ucx_ep_failed(void *arg, ucp_ep_h ep, ucs_status_t s) {
  (void)ep;
  ucx_peer_t *up = arg;
  xfer_peer_t *p = up->peer;
  xfer_peer_fail(up->x, p, ucx_status_ce(s), "peer %u (%s) failed: %s", p->id, p->name, ucx.ucs_status_string(s));
}

static void ucx_connected(void *request, ucs_status_t s, void *user_data) {
  ucx_peer_t *up = user_data;
  xfer_peer_t *p = up->peer;
  ucx.ucp_request_free(request);
  up->connected = 1;
  if (s != UCS_OK)
    xfer_peer_fail(up->x, p, ucx_status_ce(s), "peer %u (%s): connecting failed: %s", p->id, p->name, ucx.ucs_status_string(s));
}

static int ucx_connect(ce_xfer_t *x, xfer_peer_t *p, const uint8_t *addr, uint64_t len) {
  ucx_t *u = x->impl;
  (void)len; /* UCX addresses carry their own length */
  ucx_peer_t *up = calloc(1, sizeof *up);
  if (!up) return ce_fail(CE_E_NOMEM, "connecting to %s: out of host memory", p->name);
  up->x = x;
  up->peer = p;
  ce_ucp_ep_params_t params = {
      .field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                    UCP_EP_PARAM_FIELD_ERR_HANDLER | UCP_EP_PARAM_FIELD_NAME,
      .address = (const ucp_address_t *)addr,
      /* PEER: a dead peer fails the requests on it (and calls the handler) instead of hanging them. */
      .err_mode = UCP_ERR_HANDLING_MODE_PEER,
      .err_handler = {ucx_ep_failed, up},
      .name = p->name,
  };
  ucp_ep_h ep;
  ucs_status_t s = ucx.ucp_ep_create(u->worker, &params, &ep);
  if (s != UCS_OK) {
    free(up);
    return ce_ucx_fail(ucx_status_ce(s), s, "ucp_ep_create to peer %u (%s)", p->id, p->name);
  }
  p->ep = ep;
  p->impl = up;
  /* A flush of the idle endpoint ends with its handshake: what ucx_reap waits for before a close. */
  up->connect_deadline_ms = ce_now_ms() + CONNECT_WAIT_MS;
  ce_ucp_request_param_t prm = {.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA,
                                .cb.send = ucx_connected, .user_data = up};
  ucs_status_ptr_t sp = ucx.ucp_ep_flush_nbx(ep, &prm);
  up->connected = !CE_UCS_PTR_IS_PTR(sp);
  return CE_OK;
}

static void ucx_disconnect(ce_xfer_t *x, xfer_peer_t *p) {
  ucx_peer_t *up = p->impl;
  up->close_pending = 1;
  ucx_wake(x);
}

/* Under x->mu: closes the endpoints asked for (their pieces waiting for answers fail) and collects
 * finished closes. */
static void ucx_reap(ce_xfer_t *x) {
  double now = ce_now_ms();
  for (xfer_peer_t *p = x->peers; p; p = p->next) {
    ucx_peer_t *up = p->impl;
    if (!up) continue;
    if (up->close_pending && p->ep && (up->connected || now >= up->connect_deadline_ms)) {
      /* FORCE: the peer may be dead, so no flush handshake; outstanding gets complete with an error. */
      ce_ucp_request_param_t prm = {.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS, .flags = UCP_EP_CLOSE_FLAG_FORCE};
      ucs_status_ptr_t sp = ucx.ucp_ep_close_nbx(p->ep, &prm);
      p->ep = NULL;
      if (CE_UCS_PTR_IS_PTR(sp)) up->close_req = sp;
      pieces_fail_peer(x->impl, p);
    }
    if (up->close_req && ucx.ucp_request_check_status(up->close_req) != UCS_INPROGRESS) {
      ucx.ucp_request_free(up->close_req);
      up->close_req = NULL;
    }
  }
}

/* ---- the progress thread ---- */

static void *ucx_main(void *arg) {
  ce_xfer_t *x = arg;
  ucx_t *u = x->impl;
  struct pollfd fds[2] = {{.fd = u->efd, .events = POLLIN}, {.fd = u->wake_fd, .events = POLLIN}};
  double checked_ms = 0;
  while (!atomic_load(&u->stop)) {
    pthread_mutex_lock(&x->mu);
    unsigned n = ucx.ucp_worker_progress(u->worker);
    double now = ce_now_ms(), next = 0;
    /* Deadlines and closes once a millisecond while busy: both walk lists. */
    if (n == 0 || now - checked_ms >= 1) {
      ucx_reap(x);
      next = xfer_deadlines(x, now);
      checked_ms = now;
    }
    ucs_status_t s = n ? UCS_ERR_BUSY : ucx.ucp_worker_arm(u->worker);
    pthread_mutex_unlock(&x->mu);
    if (s == UCS_ERR_BUSY) continue; /* events arrived since the progress: progress again */
    int wait_ms = IDLE_WAIT_MS;
    if (next > 0 && next - now < wait_ms) wait_ms = next > now ? (int)(next - now) + 1 : 0;
    if (poll(fds, 2, wait_ms) > 0 && (fds[1].revents & POLLIN)) {
      uint64_t v;
      ssize_t r = read(u->wake_fd, &v, sizeof v);
      (void)r;
    }
  }
  return NULL;
}

/* ---- open and close ---- */

static void ucx_free(ucx_t *u) {
  if (u->worker) ucx.ucp_worker_destroy(u->worker);
  if (u->context) ucx.ucp_cleanup(u->context);
  if (u->wake_fd >= 0) close(u->wake_fd);
  for (uint32_t i = 0; i < u->npieces; i++) free(u->pieces[i]);
  free(u->pieces);
  free(u->free_slots);
  free(u);
}

static int ucx_handler(ucx_t *u, ce_xfer_t *x, unsigned id, ucp_am_recv_callback_t cb) {
  ce_ucp_am_handler_param_t hp = {
      .field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_FLAGS | UCP_AM_HANDLER_PARAM_FIELD_CB |
                    UCP_AM_HANDLER_PARAM_FIELD_ARG,
      .id = id,
      .flags = UCP_AM_FLAG_WHOLE_MSG,
      .cb = cb,
      .arg = x,
  };
  ucs_status_t s = ucx.ucp_worker_set_am_recv_handler(u->worker, &hp);
  return s == UCS_OK ? CE_OK : ce_ucx_fail(CE_E_P2P, s, "ucp_worker_set_am_recv_handler");
}

/* A context for features, from the UCX_* environment (UCX_TLS, UCX_NET_DEVICES, ...). */
static int ucx_context(uint64_t features, ucp_context_h *out) {
  ucp_config_t *cfg;
  ucs_status_t s = ucx.ucp_config_read(NULL, NULL, &cfg);
  if (s != UCS_OK) return ce_ucx_fail(CE_E_P2P, s, "ucp_config_read (the UCX_* environment)");
  ce_ucp_params_t params = {.field_mask = UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_NAME, .features = features, .name = "ce"};
  s = ucx.ucp_init_version(CE_UCP_API_MAJOR, CE_UCP_API_MINOR, &params, cfg, out);
  ucx.ucp_config_release(cfg);
  return s == UCS_OK ? CE_OK : ce_ucx_fail(CE_E_P2P, s, "ucp_init (active messages over the transports UCX_TLS allows)");
}

static int ucx_open(ce_xfer_t *x) {
  if (!ce_ucx_file()[0]) return ce_fail(CE_E_STATE, "ce_xfer_create: UCX is not loaded (ce_xfer_load first)");
  ucx_t *u = calloc(1, sizeof *u);
  if (!u) return ce_fail(CE_E_NOMEM, "ce_xfer_create: out of host memory");
  u->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (u->wake_fd < 0) {
    int e = errno;
    ucx_free(u);
    return ce_fail(CE_E_NOMEM, "eventfd: %s", strerror(e));
  }
  int rc = ucx_context(UCP_FEATURE_AM | UCP_FEATURE_WAKEUP, &u->context);
  if (rc) {
    ucx_free(u);
    return rc;
  }
  ce_ucp_worker_params_t wp = {.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE, .thread_mode = UCS_THREAD_MODE_SERIALIZED};
  ucs_status_t s = ucx.ucp_worker_create(u->context, &wp, &u->worker);
  if (s != UCS_OK) {
    ucx_free(u);
    return ce_ucx_fail(CE_E_P2P, s, "ucp_worker_create");
  }
  x->impl = u; /* the handlers' arg; set for good below */
  if ((rc = ucx_handler(u, x, AM_READ, ucx_on_read)) || (rc = ucx_handler(u, x, AM_DATA, ucx_on_data))) {
    x->impl = NULL;
    ucx_free(u);
    return rc;
  }
  x->impl = NULL;
  ucp_address_t *addr;
  size_t len;
  if ((s = ucx.ucp_worker_get_address(u->worker, &addr, &len)) != UCS_OK) {
    ucx_free(u);
    return ce_ucx_fail(CE_E_P2P, s, "ucp_worker_get_address");
  }
  x->addr = malloc(len);
  if (x->addr) memcpy(x->addr, addr, len);
  x->addr_len = len;
  ucx.ucp_worker_release_address(u->worker, addr);
  if (!x->addr) {
    ucx_free(u);
    return ce_fail(CE_E_NOMEM, "ce_xfer_create: out of host memory");
  }
  if ((s = ucx.ucp_worker_get_efd(u->worker, &u->efd)) != UCS_OK) {
    ucx_free(u);
    return ce_ucx_fail(CE_E_P2P, s, "ucp_worker_get_efd");
  }
  x->impl = u;
  int e = pthread_create(&u->thread, NULL, ucx_main, x);
  if (e != 0) {
    x->impl = NULL;
    ucx_free(u);
    return ce_fail(CE_E_NOMEM, "pthread_create: %s", strerror(e));
  }
  u->thread_started = 1;
  return CE_OK;
}

static void ucx_mem_free(ucx_t *u, xfer_reg_t *r) {
  ucx_mem_t *m = r->mem;
  if (!m) return;
  if (m->memh) ucx.ucp_mem_unmap(u->context, m->memh);
  free(m);
  r->mem = NULL;
}

/* Under x->mu: answers still being sent from r are waited for (the progress thread is held off by
 * the lock, so this thread progresses the worker), up to DEREG_DRAIN_MS unless forced. */
static int ucx_dereg(ce_xfer_t *x, xfer_reg_t *r, int force) {
  ucx_t *u = x->impl;
  ucx_mem_t *m = r->mem;
  double until = ce_now_ms() + DEREG_DRAIN_MS;
  if (m) m->withdrawn = 1;
  while (m && m->serving && ce_now_ms() < until) ucx.ucp_worker_progress(u->worker);
  if (m && m->serving && !force)
    return ce_fail(CE_E_BUSY, "registration %u: %u answers to readers are still being sent from it after %d ms", r->id,
                   m->serving, DEREG_DRAIN_MS);
  ucx_mem_free(u, r);
  return CE_OK;
}

static void ucx_close(ce_xfer_t *x, int status, const char *msg) {
  ucx_t *u = x->impl;
  atomic_store(&u->stop, 1);
  ucx_wake(x);
  if (u->thread_started) pthread_join(u->thread, NULL);
  pthread_mutex_lock(&x->mu);
  for (xfer_peer_t *p = x->peers; p; p = p->next) xfer_peer_fail(x, p, status, "%s", msg);
  /* The force-closed endpoints end their requests in progress; a bounded wait for them. */
  double until = ce_now_ms() + CLOSE_DRAIN_MS;
  for (;;) {
    ucx_reap(x);
    int closing = 0;
    for (xfer_peer_t *p = x->peers; p; p = p->next) closing |= p->ep || (p->impl && ((ucx_peer_t *)p->impl)->close_req);
    if ((!x->reads && !closing) || ce_now_ms() > until) break;
    ucx.ucp_worker_progress(u->worker);
  }
  /* The peers' state and the registrations' go after the worker: UCX may still call the error
   * handlers and the answers' callbacks while it destroys. */
  ucx.ucp_worker_destroy(u->worker);
  u->worker = NULL;
  for (xfer_reg_t *r = x->regs; r; r = r->next) ucx_mem_free(u, r);
  for (xfer_peer_t *p = x->peers; p; p = p->next) {
    free(p->impl);
    p->impl = NULL;
  }
  pthread_mutex_unlock(&x->mu);
  x->impl = NULL;
  ucx_free(u);
}

/* ---- memory ---- */

/* A reader names the registration by its id (the engine's key bytes); the owner checks every range
 * against it. The mapping registers the memory once, for transports that read it zero-copy. */
static int ucx_reg(ce_xfer_t *x, xfer_reg_t *r, uint8_t **key_out, uint64_t *key_len_out) {
  ucx_t *u = x->impl;
  ucx_mem_t *m = calloc(1, sizeof *m);
  *key_out = malloc(sizeof r->id);
  if (!m || !*key_out) {
    free(m);
    free(*key_out);
    return ce_fail(CE_E_NOMEM, "out of host memory for a registration");
  }
  ce_ucp_mem_map_params_t mp = {
      .field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH | UCP_MEM_MAP_PARAM_FIELD_MEMORY_TYPE,
      .address = r->base,
      .length = r->bytes,
      .memory_type = UCS_MEMORY_TYPE_HOST,
  };
  ucs_status_t s = ucx.ucp_mem_map(u->context, &mp, &m->memh);
  if (s != UCS_OK) {
    free(m);
    free(*key_out);
    return ce_ucx_fail(s == -4 ? CE_E_NOMEM : CE_E_P2P, s, "ucp_mem_map(%p, %llu bytes)", (void *)r->base,
                       (unsigned long long)r->bytes);
  }
  r->mem = m;
  memcpy(*key_out, &r->id, sizeof r->id);
  *key_len_out = sizeof r->id;
  return CE_OK;
}

/* ---- reads ---- */

static int ucx_get(ce_xfer_t *x, xfer_read_t *rd, const uint8_t *key, uint64_t key_len, void *dst, uint64_t remote_addr,
                   uint64_t bytes) {
  xfer_peer_t *p = rd->peer;
  if (key_len != sizeof(uint32_t))
    return ce_fail(CE_E_INVAL, "reading from peer %u (%s): a UCX remote key has 4 bytes, this one %llu", p->id, p->name,
                   (unsigned long long)key_len);
  ucx_piece_t *pc = piece_new(x->impl);
  if (!pc) return ce_fail(CE_E_NOMEM, "reading from peer %u (%s): out of host memory", p->id, p->name);
  pc->x = x;
  pc->rd = rd;
  pc->peer = p->id;
  pc->dst = dst;
  pc->bytes = bytes;
  pc->req = (read_req_t){.cookie = (uint64_t)pc->gen << 32 | pc->index, .addr = remote_addr, .bytes = bytes};
  memcpy(&pc->req.reg, key, sizeof pc->req.reg);
  ce_ucp_request_param_t prm = {
      .op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_FLAGS,
      .flags = UCP_AM_SEND_FLAG_REPLY,
      .cb.send = piece_sent,
      .user_data = pc,
  };
  pc->sending = 1;
  ucs_status_ptr_t sp = ucx.ucp_am_send_nbx(p->ep, AM_READ, &pc->req, sizeof pc->req, NULL, 0, &prm);
  if (CE_UCS_PTR_IS_PTR(sp)) return CE_INPROGRESS; /* the answer completes it */
  pc->sending = 0;
  if (!sp) {
    piece_idle_check(x->impl, pc);
    return CE_INPROGRESS;
  }
  ucs_status_t s = CE_UCS_PTR_STATUS(sp);
  pc->rd = NULL; /* the caller tells this piece's failure */
  piece_idle_check(x->impl, pc);
  return ce_ucx_fail(ucx_status_ce(s), s, "asking peer %u (%s) for %llu bytes", p->id, p->name, (unsigned long long)bytes);
}

/* ---- ce doctor ---- */

/* {"engine":"ucx","version","path","transports":["tcp/lo",...],"memory_types":["host",...]} from a
 * context made for the purpose: UCX reports its transports only through ucp_context_print_info. */
int ce_ucx_describe(char *json, uint64_t len) {
  ucp_context_h context;
  int rc = ucx_context(UCP_FEATURE_AM, &context);
  if (rc) return rc;
  char *text = NULL;
  size_t text_len = 0;
  FILE *f = open_memstream(&text, &text_len);
  if (!f) {
    ucx.ucp_cleanup(context);
    return ce_fail(CE_E_NOMEM, "open_memstream: %s", strerror(errno));
  }
  ucx.ucp_context_print_info(context, f);
  fclose(f);
  ce_ucp_context_attr_t attr = {.field_mask = UCP_ATTR_FIELD_MEMORY_TYPES};
  if (ucx.ucp_context_query(context, &attr) != UCS_OK) attr.memory_types = 1;
  ucx.ucp_cleanup(context);
  uint64_t n = (uint64_t)snprintf(json, len, "{\"engine\":\"ucx\",\"version\":\"%s\",\"path\":\"%s\",\"transports\":[",
                                  ucx.ucp_get_version_string(), ce_ucx_file());
  int first = 1;
  /* "#      resource 2  :  md 1  dev 2  flags -- tcp/lo": the last word of each resource line */
  char *save = NULL;
  for (char *line = strtok_r(text, "\n", &save); line && n < len; line = strtok_r(NULL, "\n", &save)) {
    if (!strstr(line, " resource ")) continue;
    char *end = line + strlen(line);
    while (end > line && end[-1] == ' ') *--end = 0;
    char *word = strrchr(line, ' ');
    if (!word || !strchr(word, '/')) continue;
    n += (uint64_t)snprintf(json + n, len - n, "%s\"%s\"", first ? "" : ",", word + 1);
    first = 0;
  }
  free(text);
  static const char *const types[] = {"host", "cuda", "cuda-managed", "rocm", "rocm-managed"};
  if (n < len) n += (uint64_t)snprintf(json + n, len - n, "],\"memory_types\":[");
  first = 1;
  for (int t = 0; t < 5 && n < len; t++) {
    if (!(attr.memory_types & (1ull << t))) continue;
    n += (uint64_t)snprintf(json + n, len - n, "%s\"%s\"", first ? "" : ",", types[t]);
    first = 0;
  }
  if (n < len) n += (uint64_t)snprintf(json + n, len - n, "]}");
  if (n >= len) return ce_fail(CE_E_INVAL, "ce_xfer_load: a buffer of %llu bytes is too small", (unsigned long long)len);
  return CE_OK;
}

const xfer_engine_t ce_xfer_ucx = {
    .name = "UCX",
    .open = ucx_open,
    .close = ucx_close,
    .reg = ucx_reg,
    .dereg = ucx_dereg,
    .connect = ucx_connect,
    .disconnect = ucx_disconnect,
    .get = ucx_get,
    .wake = ucx_wake,
};
