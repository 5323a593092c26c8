/* Transfer endpoints (P2P): the engine-neutral half. A reader connects to a peer by its address
 * blob and reads ranges of the peer's registered memory, named by the remote-key blob the owner
 * handed out, into a local region or CPU buffer; each call is one op of many pieces. The engines
 * (xfer_ucx.c, xfer_mooncake.c) move the bytes; this file checks arguments, keeps the tables and
 * turns pieces into ops. */
#include "xfer.h"

#include "dl_ucx.h"

#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Blobs start with a magic and the engine, so a blob of another engine, of another version of
 * this format, or a truncated one is refused by name instead of being fed to the library. */
#define ADDR_MAGIC 0x41586563u /* "ceXA" */
#define KEY_MAGIC 0x4b586563u  /* "ceXK" */
#define ADDR_HEADER 16         /* magic, engine, engine bytes (u64) */
#define KEY_HEADER 32          /* magic, engine, base, bytes, key bytes (u64 each after the two u32) */

static const char *engine_name(int engine) {
  return engine == CE_XFER_UCX ? "UCX" : engine == CE_XFER_MOONCAKE ? "Mooncake" : "unknown";
}

static const xfer_engine_t *engine_of(int engine) {
  return engine == CE_XFER_UCX ? &ce_xfer_ucx : engine == CE_XFER_MOONCAKE ? &ce_xfer_mooncake : NULL;
}

int ce_xfer_load(int engine, const char *path, char *json, uint64_t len) {
  if (json && len == 0) return ce_fail(CE_E_INVAL, "ce_xfer_load: empty buffer");
  if (engine == CE_XFER_UCX) {
    int rc = ce_ucx_load(path);
    return rc == CE_OK && json ? ce_ucx_describe(json, len) : rc;
  }
  if (engine == CE_XFER_MOONCAKE) return ce_mooncake_load(path, json, len);
  return ce_fail(CE_E_INVAL, "ce_xfer_load: unknown engine %d", engine);
}

int ce_xfer_create(ce_ctx_t *ctx, int engine, ce_xfer_t **xfer_out) {
  if (!ctx || !xfer_out) return ce_fail(CE_E_INVAL, "ce_xfer_create: NULL argument");
  *xfer_out = NULL;
  const xfer_engine_t *eng = engine_of(engine);
  if (!eng) return ce_fail(CE_E_INVAL, "ce_xfer_create: unknown engine %d", engine);
  ce_xfer_t *x = calloc(1, sizeof *x);
  if (!x) return ce_fail(CE_E_NOMEM, "ce_xfer_create: out of host memory");
  x->ctx = ctx;
  x->engine = engine;
  x->eng = eng;
  x->next_reg = 1;
  x->next_peer = 1;
  pthread_mutex_init(&x->mu, NULL);
  int rc = eng->open(x);
  if (rc != CE_OK) {
    pthread_mutex_destroy(&x->mu);
    free(x->addr); /* an engine that failed after its address */
    free(x);
    return rc;
  }
  pthread_mutex_lock(&ctx->mu);
  x->next = ctx->xfers;
  ctx->xfers = x;
  pthread_mutex_unlock(&ctx->mu);
  *xfer_out = x;
  return CE_OK;
}

static void reg_free(ce_xfer_t *x, xfer_reg_t *r) {
  if (r->buf == NULL) atomic_fetch_sub(&x->ctx->regions[r->region].registered, 1);
  free(r->key);
  free(r);
}

static void xfer_free(ce_xfer_t *x) {
  x->eng->close(x, CE_E_ABORTED, "the transfer endpoint was destroyed");
  /* Reads the engine could not end (a library that never completed them) still fail. */
  pthread_mutex_lock(&x->mu);
  while (x->reads) {
    xfer_read_t *rd = x->reads;
    rd->pending = 1;
    xfer_piece_done(rd, CE_E_ABORTED, "the transfer endpoint was destroyed with this read in flight");
  }
  pthread_mutex_unlock(&x->mu);
  while (x->regs) {
    xfer_reg_t *r = x->regs;
    x->regs = r->next;
    reg_free(x, r);
  }
  while (x->peers) {
    xfer_peer_t *p = x->peers;
    x->peers = p->next;
    free(p);
  }
  free(x->addr);
  pthread_mutex_destroy(&x->mu);
  free(x);
}

void ce_xfer_destroy(ce_xfer_t *x) {
  if (!x) return;
  ce_ctx_t *ctx = x->ctx;
  pthread_mutex_lock(&ctx->mu);
  for (ce_xfer_t **p = &ctx->xfers; *p; p = &(*p)->next)
    if (*p == x) {
      *p = x->next;
      break;
    }
  pthread_mutex_unlock(&ctx->mu);
  xfer_free(x);
}

void ce_xfers_free(ce_ctx_t *ctx) {
  pthread_mutex_lock(&ctx->mu);
  ce_xfer_t *list = ctx->xfers;
  ctx->xfers = NULL;
  pthread_mutex_unlock(&ctx->mu);
  while (list) {
    ce_xfer_t *x = list;
    list = x->next;
    xfer_free(x);
  }
}

/* ---- the engines' progress threads ---- */

void xfer_signal(int fd) {
  uint64_t one = 1;
  ssize_t n = write(fd, &one, sizeof one); /* EAGAIN: already signalled */
  (void)n;
}

void xfer_sleep(struct pollfd *fds, int nfds, double next_ms, double now_ms, int idle_ms) {
  int wait_ms = idle_ms;
  if (next_ms > 0 && next_ms - now_ms < wait_ms) wait_ms = next_ms > now_ms ? (int)(next_ms - now_ms) + 1 : 0;
  if (poll(fds, (nfds_t)nfds, wait_ms) <= 0 || !(fds[nfds - 1].revents & POLLIN)) return;
  uint64_t v;
  ssize_t r = read(fds[nfds - 1].fd, &v, sizeof v);
  (void)r;
}

/* ---- address ---- */

static void put32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static void put64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }
static uint32_t get32(const uint8_t *p) {
  uint32_t v;
  memcpy(&v, p, 4);
  return v;
}
static uint64_t get64(const uint8_t *p) {
  uint64_t v;
  memcpy(&v, p, 8);
  return v;
}

int ce_xfer_address(ce_xfer_t *x, uint8_t *addr, uint64_t len, uint64_t *bytes_out) {
  if (!x || !bytes_out) return ce_fail(CE_E_INVAL, "ce_xfer_address: NULL argument");
  uint64_t need = ADDR_HEADER + x->addr_len;
  *bytes_out = need;
  if (!addr || len < need)
    return ce_fail(CE_E_INVAL, "ce_xfer_address: the address has %llu bytes, the buffer %llu", (unsigned long long)need,
                   (unsigned long long)len);
  put32(addr, ADDR_MAGIC);
  put32(addr + 4, (uint32_t)x->engine);
  put64(addr + 8, x->addr_len);
  memcpy(addr + ADDR_HEADER, x->addr, x->addr_len);
  return CE_OK;
}

/* ---- registrations ---- */

static int reg_add(ce_xfer_t *x, uint8_t *base, uint64_t bytes, uint32_t region, struct ce_buf *buf, const char *what,
                   uint32_t *reg_out) {
  if (bytes == 0) return ce_fail(CE_E_INVAL, "registering %s: it has 0 bytes", what);
  xfer_reg_t *r = calloc(1, sizeof *r);
  if (!r) return ce_fail(CE_E_NOMEM, "registering %s: out of host memory", what);
  r->region = region;
  r->buf = buf;
  r->base = base;
  r->bytes = bytes;
  uint8_t *key = NULL;
  uint64_t key_len = 0;
  pthread_mutex_lock(&x->mu);
  r->id = x->next_reg++; /* before the engine's part: its key may name the registration */
  int rc = x->eng->reg(x, r, &key, &key_len);
  if (rc == CE_OK) {
    r->key = malloc(KEY_HEADER + key_len);
    if (!r->key) {
      x->eng->dereg(x, r, 1);
      rc = ce_fail(CE_E_NOMEM, "registering %s: out of host memory", what);
    }
  }
  if (rc != CE_OK) {
    pthread_mutex_unlock(&x->mu);
    free(key);
    free(r);
    return rc;
  }
  put32(r->key, KEY_MAGIC);
  put32(r->key + 4, (uint32_t)x->engine);
  put64(r->key + 8, (uint64_t)(uintptr_t)base);
  put64(r->key + 16, bytes);
  put64(r->key + 24, key_len);
  memcpy(r->key + KEY_HEADER, key, key_len);
  free(key);
  r->key_len = KEY_HEADER + key_len;
  r->next = x->regs;
  x->regs = r;
  if (!buf) atomic_fetch_add(&x->ctx->regions[region].registered, 1);
  pthread_mutex_unlock(&x->mu);
  *reg_out = r->id;
  return CE_OK;
}

int ce_xfer_register_region(ce_xfer_t *x, uint32_t region, uint32_t *reg_out) {
  if (!x || !reg_out) return ce_fail(CE_E_INVAL, "ce_xfer_register_region: NULL argument");
  ce_region_t *r = ce_region_get(x->ctx, region);
  if (!r) return CE_E_INVAL;
  char what[600];
  snprintf(what, sizeof what, "region %u (%s) with %s", region, r->path[0] ? r->path : "allocated", engine_name(x->engine));
  return reg_add(x, r->base, r->bytes, region, NULL, what, reg_out);
}

int ce_xfer_register_buf(ce_xfer_t *x, ce_buf_t *buf, uint32_t *reg_out) {
  if (!x || !reg_out) return ce_fail(CE_E_INVAL, "ce_xfer_register_buf: NULL argument");
  int rc = ce_buf_in_ctx(x->ctx, buf, "ce_xfer_register_buf");
  if (rc) return rc;
  if (!ce_buf_on_host(buf))
    return ce_fail(CE_E_INVAL, "ce_xfer_register_buf: a GPU buffer; register the host region its bytes come from");
  return reg_add(x, buf->host, buf->bytes, UINT32_MAX, buf, "a CPU buffer", reg_out);
}

static xfer_reg_t *reg_find(ce_xfer_t *x, uint32_t id) {
  for (xfer_reg_t *r = x->regs; r; r = r->next)
    if (r->id == id) return r;
  return NULL;
}

int ce_xfer_rkey(ce_xfer_t *x, uint32_t reg, uint8_t *rkey, uint64_t len, uint64_t *bytes_out) {
  if (!x || !bytes_out) return ce_fail(CE_E_INVAL, "ce_xfer_rkey: NULL argument");
  pthread_mutex_lock(&x->mu);
  xfer_reg_t *r = reg_find(x, reg);
  int rc = CE_OK;
  if (!r) {
    rc = ce_fail(CE_E_INVAL, "registration %u is unknown", reg);
  } else {
    *bytes_out = r->key_len;
    if (!rkey || len < r->key_len)
      rc = ce_fail(CE_E_INVAL, "ce_xfer_rkey: the key has %llu bytes, the buffer %llu", (unsigned long long)r->key_len,
                   (unsigned long long)len);
    else
      memcpy(rkey, r->key, r->key_len);
  }
  pthread_mutex_unlock(&x->mu);
  return rc;
}

/* force: the memory goes anyway (its buffer is being freed), answers in flight or not. */
static int reg_drop(ce_xfer_t *x, xfer_reg_t **link, int force) {
  xfer_reg_t *r = *link;
  int rc = x->eng->dereg(x, r, force);
  if (rc != CE_OK) return rc;
  *link = r->next;
  reg_free(x, r);
  return CE_OK;
}

int ce_xfer_deregister(ce_xfer_t *x, uint32_t reg) {
  if (!x) return ce_fail(CE_E_INVAL, "ce_xfer_deregister: NULL argument");
  pthread_mutex_lock(&x->mu);
  xfer_reg_t **link = &x->regs;
  while (*link && (*link)->id != reg) link = &(*link)->next;
  int rc = *link ? reg_drop(x, link, 0) : ce_fail(CE_E_INVAL, "registration %u is unknown", reg);
  pthread_mutex_unlock(&x->mu);
  return rc;
}

void ce_xfers_forget_buf(ce_ctx_t *ctx, struct ce_buf *buf) {
  pthread_mutex_lock(&ctx->mu);
  for (ce_xfer_t *x = ctx->xfers; x; x = x->next) {
    pthread_mutex_lock(&x->mu);
    xfer_reg_t **link = &x->regs;
    while (*link) {
      if ((*link)->buf == buf)
        reg_drop(x, link, 1);
      else
        link = &(*link)->next;
    }
    pthread_mutex_unlock(&x->mu);
  }
  pthread_mutex_unlock(&ctx->mu);
}

/* ---- peers ---- */

static xfer_peer_t *peer_find(ce_xfer_t *x, uint32_t id) {
  for (xfer_peer_t *p = x->peers; p; p = p->next)
    if (p->id == id) return p;
  ce_fail(CE_E_INVAL, "peer %u is unknown", id);
  return NULL;
}

int ce_xfer_connect(ce_xfer_t *x, const uint8_t *addr, uint64_t len, const char *name, uint32_t *peer_out) {
  if (!x || !addr || !peer_out) return ce_fail(CE_E_INVAL, "ce_xfer_connect: NULL argument");
  const char *who = name && *name ? name : "unnamed";
  if (len < ADDR_HEADER || get32(addr) != ADDR_MAGIC)
    return ce_fail(CE_E_INVAL, "connecting to %s: not a ce transfer address (%llu bytes)", who, (unsigned long long)len);
  if (get32(addr + 4) != (uint32_t)x->engine)
    return ce_fail(CE_E_INVAL, "connecting to %s: its address is for engine %s, this endpoint is %s", who,
                   engine_name((int)get32(addr + 4)), engine_name(x->engine));
  if (get64(addr + 8) != len - ADDR_HEADER)
    return ce_fail(CE_E_INVAL, "connecting to %s: the address says %llu bytes, %llu came", who,
                   (unsigned long long)get64(addr + 8), (unsigned long long)(len - ADDR_HEADER));
  xfer_peer_t *p = calloc(1, sizeof *p);
  if (!p) return ce_fail(CE_E_NOMEM, "connecting to %s: out of host memory", who);
  snprintf(p->name, sizeof p->name, "%s", who);
  pthread_mutex_lock(&x->mu);
  p->id = x->next_peer++;
  int rc = x->eng->connect(x, p, addr + ADDR_HEADER, len - ADDR_HEADER);
  if (rc == CE_OK) {
    p->next = x->peers;
    x->peers = p;
  }
  pthread_mutex_unlock(&x->mu);
  if (rc != CE_OK) {
    free(p);
    return rc;
  }
  x->eng->wake(x);
  *peer_out = p->id;
  return CE_OK;
}

void xfer_peer_fail(ce_xfer_t *x, xfer_peer_t *p, int status, const char *fmt, ...) {
  if (p->status != CE_OK) return;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(p->msg, sizeof p->msg, fmt, ap);
  va_end(ap);
  p->status = status;
  if (p->ep) x->eng->disconnect(x, p);
}

int ce_xfer_disconnect(ce_xfer_t *x, uint32_t peer) {
  if (!x) return ce_fail(CE_E_INVAL, "ce_xfer_disconnect: NULL argument");
  pthread_mutex_lock(&x->mu);
  xfer_peer_t *p = peer_find(x, peer);
  if (p) xfer_peer_fail(x, p, CE_E_ABORTED, "peer %u (%s) was disconnected", p->id, p->name);
  pthread_mutex_unlock(&x->mu);
  if (!p) return CE_E_INVAL;
  x->eng->wake(x);
  return CE_OK;
}

/* ---- reads ---- */

static void read_finish(xfer_read_t *rd) {
  ce_xfer_t *x = rd->x;
  if (rd->prev)
    rd->prev->next = rd->next;
  else
    x->reads = rd->next;
  if (rd->next) rd->next->prev = rd->prev;
  rd->peer->inflight--;
  if (rd->status == CE_OK) x->bytes_read += rd->bytes;
  if (rd->op) {
    if (rd->status != CE_OK) ce_op_fail(rd->op, rd->status, "%s", rd->msg);
    ce_op_complete(rd->op, rd->status);
  }
  free(rd);
}

void xfer_piece_done(xfer_read_t *rd, int status, const char *msg) {
  if (status != CE_OK && rd->status == CE_OK) {
    xfer_peer_t *p = rd->peer;
    /* Once the peer failed (died, deadline, disconnect), its reason is the read's: the library's
     * own words for the piece are then only "canceled". */
    if (p->status != CE_OK) {
      rd->status = p->status;
      snprintf(rd->msg, sizeof rd->msg, "%s", p->msg);
    } else {
      rd->status = status;
      snprintf(rd->msg, sizeof rd->msg, "reading %llu bytes (%u pieces) from peer %u (%s): %s", (unsigned long long)rd->bytes,
               rd->npieces, p->id, p->name, msg);
    }
  }
  if (--rd->pending == 0) read_finish(rd);
}

double xfer_deadlines(ce_xfer_t *x, double now_ms) {
  double next = 0;
  for (xfer_read_t *rd = x->reads; rd;) {
    xfer_read_t *after = rd->next; /* a failed peer may complete rd (and free it) at once */
    if (rd->deadline_ms > 0 && rd->status == CE_OK && rd->peer->status == CE_OK) {
      if (now_ms >= rd->deadline_ms)
        xfer_peer_fail(x, rd->peer, CE_E_TIMEOUT,
                       "peer %u (%s): reading %llu bytes (%u pieces) not done after %d ms; the peer is closed, since one "
                       "read cannot be cancelled alone",
                       rd->peer->id, rd->peer->name, (unsigned long long)rd->bytes, rd->npieces, rd->timeout_ms);
      else if (next == 0 || rd->deadline_ms < next)
        next = rd->deadline_ms;
    }
    rd = after;
  }
  return next;
}

typedef struct {
  uint8_t *base;
  uint64_t size;
  const char *what;
} read_dst_t;

/* Checks the key blob and the (remote_offset, local_offset, bytes) triples against both sides. */
static int read_check(ce_xfer_t *x, const uint8_t *rkey, uint64_t rkey_len, const read_dst_t *dst, const uint64_t *reads,
                      uint64_t nreads, uint64_t *total_out) {
  if (!rkey || rkey_len < KEY_HEADER || get32(rkey) != KEY_MAGIC)
    return ce_fail(CE_E_INVAL, "reading into %s: not a ce remote key (%llu bytes)", dst->what, (unsigned long long)rkey_len);
  if (get32(rkey + 4) != (uint32_t)x->engine)
    return ce_fail(CE_E_INVAL, "reading into %s: the remote key is for engine %s, this endpoint is %s", dst->what,
                   engine_name((int)get32(rkey + 4)), engine_name(x->engine));
  if (get64(rkey + 24) != rkey_len - KEY_HEADER)
    return ce_fail(CE_E_INVAL, "reading into %s: the remote key says %llu key bytes, %llu came", dst->what,
                   (unsigned long long)get64(rkey + 24), (unsigned long long)(rkey_len - KEY_HEADER));
  if (!reads || nreads == 0) return ce_fail(CE_E_INVAL, "reading into %s: no reads", dst->what);
  if (nreads > UINT32_MAX) return ce_fail(CE_E_INVAL, "reading into %s: %llu reads in one op", dst->what, (unsigned long long)nreads);
  uint64_t remote_bytes = get64(rkey + 16), total = 0;
  for (uint64_t i = 0; i < nreads; i++) {
    uint64_t roff = reads[3 * i], loff = reads[3 * i + 1], n = reads[3 * i + 2];
    if (!ce_range_ok(roff, n, remote_bytes))
      return ce_fail(CE_E_INVAL, "read %llu: %llu bytes at remote offset %llu overrun the remote memory of %llu bytes",
                     (unsigned long long)i, (unsigned long long)n, (unsigned long long)roff, (unsigned long long)remote_bytes);
    if (!ce_range_ok(loff, n, dst->size))
      return ce_fail(CE_E_INVAL, "read %llu: %llu bytes at offset %llu overrun %s of %llu bytes", (unsigned long long)i,
                     (unsigned long long)n, (unsigned long long)loff, dst->what, (unsigned long long)dst->size);
    total += n;
  }
  *total_out = total;
  return CE_OK;
}

static int read_submit(ce_xfer_t *x, uint32_t peer, const uint8_t *rkey, uint64_t rkey_len, const read_dst_t *dst,
                       const uint64_t *reads, uint64_t nreads, int timeout_ms, uint32_t region, struct ce_buf *buf,
                       uint64_t *op_out) {
  uint64_t total = 0;
  int rc = read_check(x, rkey, rkey_len, dst, reads, nreads, &total);
  if (rc) return rc;
  xfer_read_t *rd = calloc(1, sizeof *rd);
  uint64_t id;
  /* The op comes first, outside x->mu: ce_op_new takes the context's lock, and the context's lock
   * is taken before x->mu elsewhere (ce_xfers_forget_buf). */
  ce_op_t *op = rd ? ce_op_new(x->ctx, OP_THREAD, &id) : NULL;
  if (!op) {
    free(rd);
    return ce_fail(CE_E_NOMEM, "reading into %s: out of host memory", dst->what);
  }
  if (buf)
    ce_op_hold_buf(op, buf);
  else
    ce_op_hold_region(op, region);
  op->t0_ms = ce_now_ms();
  op->value = total;
  rd->x = x;
  rd->op = op;
  rd->bytes = total;
  rd->npieces = (uint32_t)nreads;
  rd->timeout_ms = timeout_ms;
  rd->deadline_ms = timeout_ms > 0 ? op->t0_ms + timeout_ms : 0;
  const uint8_t *key = rkey + KEY_HEADER;
  uint64_t key_len = rkey_len - KEY_HEADER, remote_base = get64(rkey + 8);

  pthread_mutex_lock(&x->mu);
  xfer_peer_t *p = peer_find(x, peer);
  if (!p) rc = CE_E_INVAL;
  else if (p->status != CE_OK) rc = ce_fail_msg(p->status, p->msg);
  if (rc) {
    pthread_mutex_unlock(&x->mu);
    free(rd);
    ce_op_discard(op);
    return rc;
  }
  rd->peer = p;
  rd->next = x->reads;
  if (x->reads) x->reads->prev = rd;
  x->reads = rd;
  p->inflight++;
  rd->pending = 1; /* the submission's own hold: no piece completes the op before all are posted */
  uint64_t posted = 0;
  for (uint64_t i = 0; i < nreads && rd->status == CE_OK; i++) {
    uint64_t n = reads[3 * i + 2];
    if (n == 0) continue;
    rd->pending++;
    int r = x->eng->get(x, rd, key, key_len, dst->base + reads[3 * i + 1], remote_base + reads[3 * i], n);
    if (r == CE_INPROGRESS) {
      posted++;
      continue;
    }
    xfer_piece_done(rd, r, ce_last_error()); /* never the last piece: the submission holds one */
  }
  rc = posted == 0 && rd->status != CE_OK ? rd->status : CE_OK;
  if (rc != CE_OK) {
    /* Nothing in flight: the call fails instead of its op. */
    rd->op = NULL;
    ce_fail_msg(rc, rd->msg);
  }
  xfer_piece_done(rd, CE_OK, NULL);
  pthread_mutex_unlock(&x->mu);
  if (rc != CE_OK) {
    ce_op_discard(op);
    return rc;
  }
  x->eng->wake(x);
  *op_out = id;
  return CE_OK;
}

int ce_xfer_read_region(ce_xfer_t *x, uint32_t peer, const uint8_t *rkey, uint64_t rkey_len, uint32_t region,
                        const uint64_t *reads, uint64_t nreads, int timeout_ms, uint64_t *op_out) {
  if (!x || !op_out) return ce_fail(CE_E_INVAL, "ce_xfer_read_region: NULL argument");
  ce_region_t *r = ce_region_get(x->ctx, region);
  if (!r) return CE_E_INVAL;
  if (r->kind == REGION_MAP_FILE) return ce_fail(CE_E_INVAL, "region %u maps %s read-only", region, r->path);
  char what[64];
  snprintf(what, sizeof what, "region %u", region);
  read_dst_t dst = {r->base, r->bytes, what};
  return read_submit(x, peer, rkey, rkey_len, &dst, reads, nreads, timeout_ms, region, NULL, op_out);
}

int ce_xfer_read_buf(ce_xfer_t *x, uint32_t peer, const uint8_t *rkey, uint64_t rkey_len, ce_buf_t *buf,
                     const uint64_t *reads, uint64_t nreads, int timeout_ms, uint64_t *op_out) {
  if (!x || !op_out) return ce_fail(CE_E_INVAL, "ce_xfer_read_buf: NULL argument");
  int rc = ce_buf_in_ctx(x->ctx, buf, "ce_xfer_read_buf");
  if (rc) return rc;
  if (!ce_buf_on_host(buf))
    return ce_fail(CE_E_INVAL, "ce_xfer_read_buf: a GPU buffer; read into a host region, then ce_h2d_submit");
  read_dst_t dst = {buf->host, buf->bytes, "a CPU buffer"};
  return read_submit(x, peer, rkey, rkey_len, &dst, reads, nreads, timeout_ms, 0, buf, op_out);
}

int ce_xfer_stats(ce_xfer_t *x, uint64_t *stats, uint64_t len) {
  if (!x || !stats) return ce_fail(CE_E_INVAL, "ce_xfer_stats: NULL argument");
  uint64_t v[5] = {0};
  pthread_mutex_lock(&x->mu);
  for (xfer_peer_t *p = x->peers; p; p = p->next) v[0] += p->status == CE_OK;
  for (xfer_reg_t *r = x->regs; r; r = r->next) {
    v[1]++;
    v[2] += r->bytes;
  }
  for (xfer_read_t *rd = x->reads; rd; rd = rd->next) v[3]++;
  v[4] = x->bytes_read;
  pthread_mutex_unlock(&x->mu);
  for (uint64_t i = 0; i < len && i < 5; i++) stats[i] = v[i];
  return CE_OK;
}
