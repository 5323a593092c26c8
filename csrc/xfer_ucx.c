/* The UCX engine of transfer endpoints: one UCP context and worker per endpoint, reads as active
 * messages (xfer_ucx_read.c), and a progress thread of libce's own. The thread sleeps on the
 * worker's event fd (UCP_FEATURE_WAKEUP) and an eventfd of ours, so an idle endpoint costs
 * nothing, yet it answers the peers that read from us. */
#include "xfer_ucx.h"

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
 * comes, and on how late a closed peer's endpoint is closed. */
#define IDLE_WAIT_MS 100
/* How long a deregistration waits for the answers being sent from it before it is refused. */
#define DEREG_DRAIN_MS 3000

typedef struct {
  ce_xfer_t *x;
  xfer_peer_t *peer;
  int close_pending; /* closed by the progress thread: never from inside UCX's error callback */
  void *close_req;
  int connected;      /* the handshake flush is over (done or failed) */
  double connect_deadline_ms;
} ucx_peer_t;

/* UCX statuses that mean the peer or the path to it is gone. */
int ucx_status_ce(ucs_status_t s) {
  int gone = s == -25 /* CONNECTION_RESET */ || s == -6 /* UNREACHABLE */ || s == -24 /* NOT_CONNECTED */ ||
             s == -16 /* CANCELED */ || (s <= -40 && s >= -89) /* link and endpoint failures */;
  return gone ? CE_E_PEER : CE_E_P2P;
}

static void ucx_wake(ce_xfer_t *x) {
  ucx_t *u = x->impl;
  xfer_signal(u->wake_fd);
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
      ucx_pieces_fail_peer(x->impl, p);
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
    xfer_sleep(fds, 2, next, now, IDLE_WAIT_MS);
  }
  return NULL;
}

/* ---- open and close ---- */

static void ucx_free(ucx_t *u) {
  if (u->worker) ucx.ucp_worker_destroy(u->worker);
  if (u->context) ucx.ucp_cleanup(u->context);
  if (u->wake_fd >= 0) close(u->wake_fd);
  ucx_pieces_free(u);
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
  /* The handlers run only inside a progress, once x->impl is set below. */
  if ((rc = ucx_handler(u, x, AM_READ, ucx_on_read)) || (rc = ucx_handler(u, x, AM_DATA, ucx_on_data))) {
    ucx_free(u);
    return rc;
  }
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

void ucx_mem_release(ucx_mem_t *m) {
  if (m->memh) ucx.ucp_mem_unmap(m->context, m->memh);
  free(m);
}

/* Under x->mu. An answer still being sent keeps the UCX side alive until it ends (or the worker
 * goes); the bytes themselves are the caller's: a forced deregistration frees them regardless. */
static void ucx_mem_free(xfer_reg_t *r) {
  ucx_mem_t *m = r->mem;
  r->mem = NULL;
  if (!m) return;
  if (m->serving)
    m->orphan = 1;
  else
    ucx_mem_release(m);
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
  ucx_mem_free(r);
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
  for (xfer_reg_t *r = x->regs; r; r = r->next) ucx_mem_free(r);
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
  m->context = u->context;
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
