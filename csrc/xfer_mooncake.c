/* The Mooncake engine of transfer endpoints: one Mooncake transfer engine per endpoint, with
 * P2P-handshake metadata (no etcd) and the transport CE_MOONCAKE_PROTO names (default tcp). The
 * address is the engine's segment name ("host:port" of its handshake listener; the host from
 * CE_MOONCAKE_HOST, default this host's name); a read is one READ request in a batch of its own,
 * which a thread of libce's polls until Mooncake says it ended. Mooncake checks on the owner's side
 * that every request falls inside memory registered there.
 *
 * Mooncake cannot cancel a transfer, and over TCP a source that stops answering keeps one waiting:
 * a read past its deadline fails its peer (no new reads go to it), but its pieces end only when
 * Mooncake ends them, or when the endpoint is destroyed, since until then Mooncake may still write
 * into their destination. */
#include "xfer.h"

#include "dl_mooncake.h"

#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

/* How often the thread asks Mooncake about the transfers in flight; idle, it sleeps until woken. */
#define POLL_US 50
#define IDLE_WAIT_MS 100

typedef struct mc_piece {
  xfer_read_t *rd;
  uint64_t batch;
  struct mc_piece *next;
} mc_piece_t;

typedef struct {
  void *engine;
  int wake_fd;
  pthread_t thread;
  int thread_started;
  _Atomic int stop;
  mc_piece_t *pieces; /* in flight */
} mc_t;

typedef struct {
  int32_t segment;
} mc_peer_t;

static void mc_wake(ce_xfer_t *x) {
  mc_t *m = x->impl;
  xfer_signal(m->wake_fd);
}

/* Under x->mu: asks Mooncake about every piece in flight and ends those it ended. */
static void mc_collect(ce_xfer_t *x) {
  mc_t *m = x->impl;
  for (mc_piece_t **link = &m->pieces; *link;) {
    mc_piece_t *pc = *link;
    ce_mc_status_t st = {0};
    int rc = mooncake.getTransferStatus(m->engine, pc->batch, 0, &st);
    if (rc == 0 && st.status == CE_MC_STATUS_TIMEOUT)
      xfer_peer_fail(x, pc->rd->peer, CE_E_TIMEOUT, "peer %u (%s): Mooncake reports a transfer late", pc->rd->peer->id, pc->rd->peer->name);
    if (rc == 0 && (st.status == CE_MC_STATUS_WAITING || st.status == CE_MC_STATUS_PENDING || st.status == CE_MC_STATUS_TIMEOUT)) {
      link = &pc->next; /* still running: Mooncake may still write into its destination */
      continue;
    }
    *link = pc->next;
    mooncake.freeBatchID(m->engine, pc->batch);
    xfer_read_t *rd = pc->rd;
    free(pc);
    if (rc == 0 && st.status == CE_MC_STATUS_COMPLETED) {
      xfer_piece_done(rd, CE_OK, NULL);
      continue;
    }
    char why[128];
    if (rc != 0)
      snprintf(why, sizeof why, "Mooncake's getTransferStatus returned %d", rc);
    else
      snprintf(why, sizeof why, "Mooncake's transfer ended with status %d (%s)", st.status,
               st.status == CE_MC_STATUS_FAILED ? "failed: the peer refused or is gone" : "invalid or canceled");
    /* Over TCP a failed read means the peer or the path to it is gone: no more reads go there. */
    xfer_peer_fail(x, rd->peer, CE_E_PEER, "peer %u (%s) failed: %s", rd->peer->id, rd->peer->name, why);
    xfer_piece_done(rd, CE_E_PEER, why);
  }
}

static void *mc_main(void *arg) {
  ce_xfer_t *x = arg;
  mc_t *m = x->impl;
  struct pollfd fd = {.fd = m->wake_fd, .events = POLLIN};
  while (!atomic_load(&m->stop)) {
    pthread_mutex_lock(&x->mu);
    mc_collect(x);
    double now = ce_now_ms(), next = xfer_deadlines(x, now);
    int busy = m->pieces != NULL;
    pthread_mutex_unlock(&x->mu);
    if (busy) {
      usleep(POLL_US);
      continue;
    }
    xfer_sleep(&fd, 1, next, now, IDLE_WAIT_MS);
  }
  return NULL;
}

static void mc_free(mc_t *m) {
  if (m->engine) mooncake.destroyTransferEngine(m->engine);
  if (m->wake_fd >= 0) close(m->wake_fd);
  free(m);
}

static int mooncake_open(ce_xfer_t *x) {
  if (!ce_mooncake_file()[0]) return ce_fail(CE_E_STATE, "ce_xfer_create: Mooncake is not loaded (ce_xfer_load first)");
  mc_t *m = calloc(1, sizeof *m);
  if (!m) return ce_fail(CE_E_NOMEM, "ce_xfer_create: out of host memory");
  m->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (m->wake_fd < 0) {
    int e = errno;
    mc_free(m);
    return ce_fail(CE_E_NOMEM, "eventfd: %s", strerror(e));
  }
  char host[256];
  const char *env = getenv("CE_MOONCAKE_HOST");
  if (env && *env)
    snprintf(host, sizeof host, "%s", env);
  else if (gethostname(host, sizeof host) != 0)
    snprintf(host, sizeof host, "127.0.0.1");
  host[sizeof host - 1] = 0;
  const char *proto = getenv("CE_MOONCAKE_PROTO");
  if (!proto || !*proto) proto = "tcp";
  /* P2P handshake: each engine listens for its peers itself, no metadata server. */
  m->engine = mooncake.createTransferEngine("P2PHANDSHAKE", host, host, 0, 0);
  if (!m->engine) {
    mc_free(m);
    return ce_fail(CE_E_P2P, "createTransferEngine(P2PHANDSHAKE, %s) failed (Mooncake logs why on stderr; the host comes from CE_MOONCAKE_HOST)",
                   host);
  }
  if (!mooncake.installTransport(m->engine, proto, NULL)) {
    mc_free(m);
    return ce_fail(CE_E_P2P, "Mooncake's installTransport(%s) failed (CE_MOONCAKE_PROTO: tcp, rdma, ...)", proto);
  }
  char name[256] = "";
  mooncake.getLocalIpAndPort(m->engine, name, sizeof name);
  x->addr = (uint8_t *)strdup(name);
  x->addr_len = strlen(name);
  if (!x->addr || !x->addr_len) {
    free(x->addr);
    x->addr = NULL;
    mc_free(m);
    return ce_fail(CE_E_P2P, "Mooncake's engine has no segment name");
  }
  x->impl = m;
  int e = pthread_create(&m->thread, NULL, mc_main, x);
  if (e != 0) {
    x->impl = NULL;
    mc_free(m);
    return ce_fail(CE_E_NOMEM, "pthread_create: %s", strerror(e));
  }
  m->thread_started = 1;
  return CE_OK;
}

static void mooncake_close(ce_xfer_t *x, int status, const char *msg) {
  mc_t *m = x->impl;
  atomic_store(&m->stop, 1);
  mc_wake(x);
  if (m->thread_started) pthread_join(m->thread, NULL);
  pthread_mutex_lock(&x->mu);
  for (xfer_peer_t *p = x->peers; p; p = p->next) {
    xfer_peer_fail(x, p, status, "%s", msg);
    free(p->impl);
    p->impl = NULL;
  }
  /* The engine goes first: once it is destroyed nothing writes into the pieces' destinations. */
  mooncake.destroyTransferEngine(m->engine);
  m->engine = NULL;
  while (m->pieces) {
    mc_piece_t *pc = m->pieces;
    m->pieces = pc->next;
    xfer_piece_done(pc->rd, status, msg);
    free(pc);
  }
  pthread_mutex_unlock(&x->mu);
  x->impl = NULL;
  mc_free(m);
}

static int mooncake_reg(ce_xfer_t *x, xfer_reg_t *r, uint8_t **key_out, uint64_t *key_len_out) {
  mc_t *m = x->impl;
  /* remote_accessible: peers may read it; the key is xfer.c's header alone (base and size). */
  int rc = mooncake.registerLocalMemory(m->engine, r->base, r->bytes, "cpu:0", 1);
  if (rc != 0)
    return ce_fail(CE_E_P2P, "Mooncake's registerLocalMemory(%p, %llu bytes) returned %d", (void *)r->base,
                   (unsigned long long)r->bytes, rc);
  *key_out = malloc(1);
  *key_len_out = 0;
  if (!*key_out) {
    mooncake.unregisterLocalMemory(m->engine, r->base);
    return ce_fail(CE_E_NOMEM, "out of host memory for a registration");
  }
  return CE_OK;
}

static int mooncake_dereg(ce_xfer_t *x, xfer_reg_t *r, int force) {
  (void)force; /* Mooncake serves its peers' reads itself: nothing of ours to wait for */
  mc_t *m = x->impl;
  mooncake.unregisterLocalMemory(m->engine, r->base);
  return CE_OK;
}

static int mooncake_connect(ce_xfer_t *x, xfer_peer_t *p, const uint8_t *addr, uint64_t len) {
  mc_t *m = x->impl;
  char name[256];
  if (len == 0 || len >= sizeof name) return ce_fail(CE_E_INVAL, "connecting to %s: a Mooncake segment name of %llu bytes", p->name, (unsigned long long)len);
  memcpy(name, addr, len);
  name[len] = 0;
  mc_peer_t *mp = calloc(1, sizeof *mp);
  if (!mp) return ce_fail(CE_E_NOMEM, "connecting to %s: out of host memory", p->name);
  mp->segment = mooncake.openSegment(m->engine, name);
  if (mp->segment < 0) {
    free(mp);
    return ce_fail(CE_E_PEER, "connecting to %s: Mooncake's openSegment(%s) failed (unreachable, or no engine listens there)", p->name, name);
  }
  p->impl = mp;
  p->ep = mp;
  return CE_OK;
}

static void mooncake_disconnect(ce_xfer_t *x, xfer_peer_t *p) {
  (void)x;
  /* The segment stays open in Mooncake's cache (it is the engine's, per name); reads in flight end
   * when Mooncake ends them. */
  p->ep = NULL;
}

static int mooncake_get(ce_xfer_t *x, xfer_read_t *rd, const uint8_t *key, uint64_t key_len, void *dst, uint64_t remote_addr,
                        uint64_t bytes) {
  (void)key;
  (void)key_len;
  mc_t *m = x->impl;
  xfer_peer_t *p = rd->peer;
  mc_piece_t *pc = calloc(1, sizeof *pc);
  if (!pc) return ce_fail(CE_E_NOMEM, "reading from peer %u (%s): out of host memory", p->id, p->name);
  pc->rd = rd;
  pc->batch = mooncake.allocateBatchID(m->engine, 1);
  if (pc->batch == UINT64_MAX) {
    free(pc);
    return ce_fail(CE_E_P2P, "reading from peer %u (%s): Mooncake's allocateBatchID failed", p->id, p->name);
  }
  ce_mc_request_t req = {
      .opcode = CE_MC_OPCODE_READ,
      .source = dst,
      .target_id = ((mc_peer_t *)p->impl)->segment,
      .target_offset = remote_addr, /* the owner's address: Mooncake checks it against its registrations */
      .length = bytes,
  };
  int rc = mooncake.submitTransfer(m->engine, pc->batch, &req, 1);
  if (rc != 0) {
    mooncake.freeBatchID(m->engine, pc->batch);
    free(pc);
    return ce_fail(CE_E_P2P, "reading %llu bytes from peer %u (%s): Mooncake's submitTransfer returned %d", (unsigned long long)bytes,
                   p->id, p->name, rc);
  }
  pc->next = m->pieces;
  m->pieces = pc;
  return CE_INPROGRESS;
}

const xfer_engine_t ce_xfer_mooncake = {
    .name = "Mooncake",
    .open = mooncake_open,
    .close = mooncake_close,
    .reg = mooncake_reg,
    .dereg = mooncake_dereg,
    .connect = mooncake_connect,
    .disconnect = mooncake_disconnect,
    .get = mooncake_get,
    .wake = mc_wake,
};
