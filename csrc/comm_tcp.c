/* The CPU backend's communicator: NCCL's semantics (a unique id, nranks ranks of which this
 * process holds first_rank.., a broadcast from a root rank in any process) over plain TCP
 * sockets, run by the comm thread. libce links no messaging library; a few hundred lines of
 * sockets keep it that way.
 *
 * Rendezvous: the unique id carries the address of a listener bound by ce_comm_unique_id and a
 * random 16-byte token. Every other process connects there and says which ranks it holds and
 * where its own listener is; once the ranks cover 0..nranks-1 the rendezvous process sends
 * everyone the table of processes (ordered by first rank). Each process then connects to its
 * successor in that order and accepts its predecessor: a ring of one TCP link per process.
 *
 * Broadcast #k from a root in process r streams, in 4 MiB chunks, along the ring r → r+1 → …
 * → r-1, each process writing the bytes into its devices' buffers while forwarding them; the last
 * one sends an acknowledgement on its own link, which leads back to r, so the root's op ends only
 * once every process has the bytes. Every link thus carries one message per broadcast, and all
 * processes issue broadcasts in the same order, as NCCL requires.
 *
 * Every wait polls with a deadline (the init's timeout; for a broadcast, the same time without
 * any progress) and the context's abort eventfd. A peer that exits shows as EOF or ECONNRESET. */
#include "comm.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define ID_MAGIC 0x31434543u   /* "CEC1" in the unique id */
#define HELLO_MAGIC 0x48434543u /* "CECH" rendezvous hello */
#define TABLE_MAGIC 0x54434543u /* "CECT" rank table */
#define LINK_MAGIC 0x4c434543u  /* "CECL" ring link */
#define MSG_MAGIC 0x42434543u   /* "CECB" broadcast message */
#define CHUNK (4u << 20)
#define POLL_SLICE_MS 100 /* the longest a wait sleeps without looking at the abort flag */

enum { MSG_DATA = 1, MSG_ACK = 2 };

/* A socket address in the id, the hello and the table: family, port (host order), 16 bytes. */
typedef struct {
  uint16_t family;
  uint16_t port;
  uint8_t addr[16];
} wire_addr_t;

typedef struct {
  uint32_t magic;
  uint8_t token[16];
  int32_t nranks, first_rank, ndev;
  wire_addr_t listen;
} hello_t;

typedef struct {
  int32_t first_rank, ndev;
  wire_addr_t listen;
} proc_t;

typedef struct {
  uint32_t magic;
  uint8_t token[16];
  int32_t from; /* process index */
} link_t;

typedef struct {
  uint32_t magic, type;
  uint64_t seq, bytes;
  int32_t root, pad;
} msg_t;

struct ce_tcp_comm {
  int nprocs, me;
  proc_t *procs;
  int in_fd, out_fd; /* from the predecessor, to the successor */
};

/* ---- addresses ---- */

static int to_sockaddr(const wire_addr_t *w, struct sockaddr_storage *ss, socklen_t *len) {
  memset(ss, 0, sizeof *ss);
  if (w->family == AF_INET) {
    struct sockaddr_in *a = (struct sockaddr_in *)ss;
    a->sin_family = AF_INET;
    a->sin_port = htons(w->port);
    memcpy(&a->sin_addr, w->addr, 4);
    *len = sizeof *a;
    return 1;
  }
  if (w->family == AF_INET6) {
    struct sockaddr_in6 a6 = {0};
    a6.sin6_family = AF_INET6;
    a6.sin6_port = htons(w->port);
    memcpy(&a6.sin6_addr, w->addr, 16);
    memcpy(ss, &a6, sizeof a6);
    *len = sizeof a6;
    return 1;
  }
  return 0;
}

static void from_sockaddr(const struct sockaddr_storage *ss, wire_addr_t *w) {
  memset(w, 0, sizeof *w);
  if (ss->ss_family == AF_INET) {
    const struct sockaddr_in *a = (const struct sockaddr_in *)ss;
    w->family = AF_INET;
    w->port = ntohs(a->sin_port);
    memcpy(w->addr, &a->sin_addr, 4);
  } else if (ss->ss_family == AF_INET6) {
    struct sockaddr_in6 a6;
    memcpy(&a6, ss, sizeof a6);
    w->family = AF_INET6;
    w->port = ntohs(a6.sin6_port);
    memcpy(w->addr, &a6.sin6_addr, 16);
  }
}

static const char *addr_str(const wire_addr_t *w, char *buf, size_t len) {
  char host[INET6_ADDRSTRLEN] = "?";
  inet_ntop(w->family == AF_INET6 ? AF_INET6 : AF_INET, w->addr, host, sizeof host);
  snprintf(buf, len, w->family == AF_INET6 ? "[%s]:%u" : "%s:%u", host, (unsigned)w->port);
  return buf;
}

/* "tcp://127.0.0.1:0", "127.0.0.1", "[::1]:5000": numeric addresses only (no name lookup may
 * block the caller's thread). Port 0 or none: an ephemeral port. */
static int parse_endpoint(const char *ep, wire_addr_t *w) {
  memset(w, 0, sizeof *w);
  const char *s = ep && *ep ? ep : "127.0.0.1";
  if (strncmp(s, "tcp://", 6) == 0) s += 6;
  char host[128];
  const char *port = NULL;
  if (*s == '[') {
    const char *end = strchr(s, ']');
    if (!end || (size_t)(end - s - 1) >= sizeof host) return 0;
    memcpy(host, s + 1, (size_t)(end - s - 1));
    host[end - s - 1] = 0;
    if (end[1] == ':') port = end + 2;
    else if (end[1]) return 0;
  } else {
    const char *colon = strrchr(s, ':');
    size_t n = colon ? (size_t)(colon - s) : strlen(s);
    if (n >= sizeof host) return 0;
    memcpy(host, s, n);
    host[n] = 0;
    if (colon) port = colon + 1;
  }
  long p = 0;
  if (port && *port && strcmp(port, "*") != 0) {
    char *end;
    p = strtol(port, &end, 10);
    if (*end || p < 0 || p > 65535) return 0;
  }
  w->port = (uint16_t)p;
  if (inet_pton(AF_INET, host, w->addr) == 1) w->family = AF_INET;
  else if (inet_pton(AF_INET6, host, w->addr) == 1) w->family = AF_INET6;
  else return 0;
  return 1;
}

static int is_wildcard(const wire_addr_t *w) {
  static const uint8_t zero[16] = {0};
  return memcmp(w->addr, zero, w->family == AF_INET ? 4 : 16) == 0;
}

static int make_listener(const wire_addr_t *at, wire_addr_t *bound, const char *what) {
  struct sockaddr_storage ss;
  socklen_t len;
  char a[80];
  if (!to_sockaddr(at, &ss, &len)) return ce_fail(CE_E_INVAL, "%s: address family %u", what, at->family);
  int fd = socket(ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return ce_fail(CE_E_IO, "%s: socket: %s", what, strerror(errno));
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (bind(fd, (struct sockaddr *)&ss, len) != 0 || listen(fd, 128) != 0) {
    int e = errno;
    close(fd);
    return ce_fail(CE_E_IO, "%s: binding %s: %s", what, addr_str(at, a, sizeof a), strerror(e));
  }
  len = sizeof ss;
  getsockname(fd, (struct sockaddr *)&ss, &len);
  from_sockaddr(&ss, bound);
  return fd;
}

/* ---- the id ---- */

int ce_tcp_unique_id(ce_ctx_t *ctx, const char *endpoint, uint8_t *id) {
  wire_addr_t at, bound;
  if (!parse_endpoint(endpoint, &at))
    return ce_fail(CE_E_INVAL, "ce_comm_unique_id: \"%s\" is not tcp://<numeric address>[:port]", endpoint ? endpoint : "");
  if (is_wildcard(&at))
    return ce_fail(CE_E_INVAL, "ce_comm_unique_id: %s is a wildcard; bind the address the other processes reach this one on", endpoint);
  int fd = make_listener(&at, &bound, "ce_comm_unique_id");
  if (fd < 0) return fd;
  uint8_t token[16];
  if (getrandom(token, sizeof token, 0) != (ssize_t)sizeof token) {
    close(fd);
    return ce_fail(CE_E_IO, "ce_comm_unique_id: getrandom: %s", strerror(errno));
  }
  memset(id, 0, CE_NCCL_ID_BYTES);
  uint32_t magic = ID_MAGIC;
  memcpy(id, &magic, 4);
  memcpy(id + 4, &bound, sizeof bound);
  memcpy(id + 4 + sizeof bound, token, sizeof token);
  ce_comm_t *c = &ctx->comm;
  pthread_mutex_lock(&c->mu);
  if (c->listen_fd >= 0) close(c->listen_fd); /* the previous id's rendezvous can no longer happen here */
  c->listen_fd = fd;
  memcpy(c->listen_token, token, sizeof token);
  pthread_mutex_unlock(&c->mu);
  return CE_OK;
}

int ce_tcp_id_check(const uint8_t *id, uint8_t token_out[16]) {
  uint32_t magic;
  memcpy(&magic, id, 4);
  if (magic != ID_MAGIC) return 0;
  memcpy(token_out, id + 4 + sizeof(wire_addr_t), 16);
  return 1;
}

static void id_root(const uint8_t *id, wire_addr_t *w) { memcpy(w, id + 4, sizeof *w); }

/* ---- waits ---- */

typedef struct {
  ce_ctx_t *ctx;
  uint64_t gen;
  double deadline; /* ms; 0: none */
  int stall_ms;    /* > 0: every bit of progress moves the deadline this far out */
} waiter_t;

/* Waits for fd to be ready for ev: CE_OK, CE_E_ABORTED, or CE_E_TIMEOUT (the caller says what). */
static int wait_fd(waiter_t *w, int fd, short ev) {
  for (;;) {
    if (ce_comm_dead(w->ctx, w->gen)) return CE_E_ABORTED;
    int slice = POLL_SLICE_MS;
    if (w->deadline > 0) {
      double left = w->deadline - ce_now_ms();
      if (left <= 0) return CE_E_TIMEOUT;
      if (left < slice) slice = (int)left + 1;
    }
    struct pollfd p[2] = {{fd, ev, 0}, {w->ctx->comm.wake_fd, POLLIN, 0}};
    int n = poll(p, 2, slice);
    if (n < 0 && errno != EINTR) return ce_fail(CE_E_IO, "poll: %s", strerror(errno));
    if (n > 0 && p[0].revents) return CE_OK;
  }
}

static void progressed(waiter_t *w) {
  if (w->stall_ms > 0) w->deadline = ce_now_ms() + w->stall_ms;
}

/* Moves n bytes (send or recv). CE_OK, or a status with the last error naming `peer` and `what`. */
static int xfer(waiter_t *w, int fd, int sending, void *buf, uint64_t n, const char *peer, const char *what, uint64_t at,
                uint64_t total) {
  uint8_t *p = buf;
  uint64_t done = 0;
  while (done < n) {
    ssize_t k = sending ? send(fd, p + done, n - done, MSG_NOSIGNAL | MSG_DONTWAIT) : recv(fd, p + done, n - done, MSG_DONTWAIT);
    if (k > 0) {
      done += (uint64_t)k;
      progressed(w);
      continue;
    }
    if (k == 0 && !sending)
      return ce_fail(CE_E_PEER, "%s: %s closed the connection (EOF) at byte %llu of %llu: that process exited or aborted", what, peer,
                     (unsigned long long)(at + done), (unsigned long long)total);
    if (k < 0 && errno == EINTR) continue;
    if (k < 0 && errno != EAGAIN && errno != EWOULDBLOCK)
      return ce_fail(CE_E_PEER, "%s: %s to %s at byte %llu of %llu: %s", what, sending ? "sending" : "receiving", peer,
                     (unsigned long long)(at + done), (unsigned long long)total, strerror(errno));
    int rc = wait_fd(w, fd, sending ? POLLOUT : POLLIN);
    if (rc == CE_E_ABORTED) return ce_fail(rc, "%s: aborted at byte %llu of %llu", what, (unsigned long long)(at + done), (unsigned long long)total);
    if (rc == CE_E_TIMEOUT)
      return ce_fail(rc, "%s: %s %s for %d ms at byte %llu of %llu", what, peer, sending ? "took no bytes" : "sent nothing",
                     w->stall_ms > 0 ? w->stall_ms : 0, (unsigned long long)(at + done), (unsigned long long)total);
    if (rc) return rc;
  }
  return CE_OK;
}

/* Connects to a listener, retrying a refused connection (the peer may not listen yet) until the
 * deadline. Returns the connected fd or a negative status. */
static int connect_to(waiter_t *w, const wire_addr_t *to, const char *what) {
  struct sockaddr_storage ss;
  socklen_t len;
  char a[80];
  if (!to_sockaddr(to, &ss, &len)) return ce_fail(CE_E_INVAL, "%s: address family %u", what, to->family);
  int last = 0;
  for (;;) {
    int fd = socket(ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) return ce_fail(CE_E_IO, "%s: socket: %s", what, strerror(errno));
    int rc = CE_OK;
    if (connect(fd, (struct sockaddr *)&ss, len) != 0) {
      if (errno != EINPROGRESS) {
        last = errno;
        rc = -1;
      } else if ((rc = wait_fd(w, fd, POLLOUT)) == CE_OK) {
        int err = 0;
        socklen_t el = sizeof err;
        getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &el);
        if (err) last = err, rc = -1;
      }
    }
    if (rc == CE_OK) {
      int one = 1;
      setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
      return fd;
    }
    close(fd);
    if (rc == CE_E_ABORTED) return ce_fail(rc, "%s: aborted while connecting to %s", what, addr_str(to, a, sizeof a));
    if (rc == CE_E_TIMEOUT || (w->deadline > 0 && ce_now_ms() > w->deadline))
      return ce_fail(CE_E_TIMEOUT, "%s: could not connect to %s in time%s%s", what, addr_str(to, a, sizeof a), last ? ": " : "",
                     last ? strerror(last) : "");
    if (rc != -1) return rc;
    /* refused or unreachable: wait a little (abortably) and try again */
    struct pollfd p = {w->ctx->comm.wake_fd, POLLIN, 0};
    poll(&p, 1, 50);
    if (ce_comm_dead(w->ctx, w->gen)) return ce_fail(CE_E_ABORTED, "%s: aborted while connecting to %s", what, addr_str(to, a, sizeof a));
  }
}

static int accept_one(waiter_t *w, int lfd) {
  for (;;) {
    int rc = wait_fd(w, lfd, POLLIN);
    if (rc) return rc;
    int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd >= 0) {
      int one = 1;
      setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
      return fd;
    }
    if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR && errno != ECONNABORTED)
      return ce_fail(CE_E_IO, "accept: %s", strerror(errno));
  }
}

/* ---- init ---- */

static void tcp_free(ce_tcp_comm_t *t) {
  if (!t) return;
  if (t->in_fd >= 0) close(t->in_fd);
  if (t->out_fd >= 0) close(t->out_fd);
  free(t->procs);
  free(t);
}

void ce_tcp_comm_teardown(ce_ctx_t *ctx) {
  tcp_free(ctx->comm.tcp);
  ctx->comm.tcp = NULL;
}

/* "1..3, 7" of the ranks not yet covered, for the timeout message. */
static void missing_ranks(const uint8_t *have, int nranks, char *buf, size_t len) {
  size_t at = 0;
  buf[0] = 0;
  for (int r = 0; r < nranks && at + 24 < len; r++) {
    if (have[r]) continue;
    int e = r;
    while (e + 1 < nranks && !have[e + 1]) e++;
    at += (size_t)snprintf(buf + at, len - at, at ? ", %d" : "%d", r);
    if (e > r) at += (size_t)snprintf(buf + at, len - at, "..%d", e);
    r = e;
  }
}

/* The rendezvous process: collects every other process's hello until the ranks are covered. */
static int rendezvous_root(waiter_t *w, ce_comm_job_t *job, int lfd, const wire_addr_t *self, proc_t **procs_out, int *nprocs_out,
                           const uint8_t *token, const char *what) {
  ce_ctx_t *ctx = w->ctx;
  int cap = 8, n = 1, covered = ctx->ndev, rc = CE_OK;
  proc_t *procs = calloc((size_t)cap, sizeof *procs);
  int *fds = calloc((size_t)cap, sizeof *fds);
  uint8_t *have = calloc((size_t)job->nranks, 1);
  if (!procs || !fds || !have) {
    rc = ce_fail(CE_E_NOMEM, "%s: out of host memory", what);
    goto out;
  }
  procs[0] = (proc_t){job->first_rank, ctx->ndev, *self};
  fds[0] = -1;
  memset(have + job->first_rank, 1, (size_t)ctx->ndev);
  while (covered < job->nranks) {
    int fd = accept_one(w, lfd);
    if (fd == CE_E_TIMEOUT || fd == CE_E_ABORTED) {
      char miss[256];
      missing_ranks(have, job->nranks, miss, sizeof miss);
      rc = fd == CE_E_TIMEOUT ? ce_fail(fd, "%s: ranks %s of %d did not arrive within %d ms", what, miss, job->nranks, job->timeout_ms)
                              : ce_fail(fd, "%s: aborted while waiting for ranks %s of %d", what, miss, job->nranks);
      goto out;
    }
    if (fd < 0) {
      rc = fd;
      goto out;
    }
    hello_t h;
    if (xfer(w, fd, 0, &h, sizeof h, "a connecting process", what, 0, sizeof h) != CE_OK || h.magic != HELLO_MAGIC ||
        memcmp(h.token, token, 16) != 0) {
      close(fd); /* not one of ours (another communicator's id, a port scan): keep waiting */
      continue;
    }
    if (h.nranks != job->nranks || h.ndev < 1 || h.first_rank < 0 || h.first_rank > h.nranks - h.ndev) {
      close(fd);
      rc = ce_fail(CE_E_INVAL, "%s: a process claims ranks %d..%d of %d, this one expects %d ranks", what, h.first_rank,
                   h.first_rank + h.ndev - 1, h.nranks, job->nranks);
      goto out;
    }
    for (int r = h.first_rank; r < h.first_rank + h.ndev; r++)
      if (have[r]) {
        close(fd);
        rc = ce_fail(CE_E_INVAL, "%s: rank %d claimed twice (by ranks %d..%d)", what, r, h.first_rank, h.first_rank + h.ndev - 1);
        goto out;
      }
    if (n == cap) {
      cap *= 2;
      proc_t *p2 = realloc(procs, sizeof *procs * (size_t)cap);
      if (p2) procs = p2;
      int *f2 = p2 ? realloc(fds, sizeof *fds * (size_t)cap) : NULL;
      if (f2) fds = f2;
      if (!p2 || !f2) {
        close(fd);
        rc = ce_fail(CE_E_NOMEM, "%s: out of host memory", what);
        goto out;
      }
    }
    procs[n] = (proc_t){h.first_rank, h.ndev, h.listen};
    fds[n++] = fd;
    memset(have + h.first_rank, 1, (size_t)h.ndev);
    covered += h.ndev;
  }
  /* The table goes out in first-rank order; the fds follow their processes. */
  for (int i = 1; i < n; i++)
    for (int j = i; j > 0 && procs[j].first_rank < procs[j - 1].first_rank; j--) {
      proc_t tp = procs[j];
      procs[j] = procs[j - 1], procs[j - 1] = tp;
      int tf = fds[j];
      fds[j] = fds[j - 1], fds[j - 1] = tf;
    }
  uint32_t head[2] = {TABLE_MAGIC, (uint32_t)n};
  for (int i = 0; i < n && rc == CE_OK; i++) {
    if (fds[i] < 0) continue;
    char peer[96], a[80];
    snprintf(peer, sizeof peer, "ranks %d..%d (%s)", procs[i].first_rank, procs[i].first_rank + procs[i].ndev - 1,
             addr_str(&procs[i].listen, a, sizeof a));
    if ((rc = xfer(w, fds[i], 1, head, sizeof head, peer, what, 0, 0)) == CE_OK)
      rc = xfer(w, fds[i], 1, procs, sizeof *procs * (size_t)n, peer, what, 0, 0);
  }
out:
  for (int i = 1; fds && i < n; i++)
    if (fds[i] >= 0) close(fds[i]);
  free(fds);
  free(have);
  if (rc == CE_OK) {
    *procs_out = procs;
    *nprocs_out = n;
  } else {
    free(procs);
  }
  return rc;
}

static int rendezvous_peer(waiter_t *w, ce_comm_job_t *job, const wire_addr_t *root, int *lfd_out, wire_addr_t *self,
                           proc_t **procs_out, int *nprocs_out, const uint8_t *token, const char *what) {
  ce_ctx_t *ctx = w->ctx;
  char peer[96], a[80];
  snprintf(peer, sizeof peer, "the rendezvous at %s", addr_str(root, a, sizeof a));
  int fd = connect_to(w, root, what);
  if (fd < 0) return fd;
  /* This process listens on the address its connection to the rendezvous left from: one that
   * the other processes can reach too. */
  struct sockaddr_storage ss;
  socklen_t len = sizeof ss;
  getsockname(fd, (struct sockaddr *)&ss, &len);
  wire_addr_t local;
  from_sockaddr(&ss, &local);
  local.port = 0;
  int lfd = make_listener(&local, self, what);
  if (lfd < 0) {
    close(fd);
    return lfd;
  }
  hello_t h = {HELLO_MAGIC, {0}, job->nranks, job->first_rank, ctx->ndev, *self};
  memcpy(h.token, token, 16);
  uint32_t head[2] = {0, 0};
  proc_t *procs = NULL;
  int rc = xfer(w, fd, 1, &h, sizeof h, peer, what, 0, 0);
  if (rc == CE_OK) rc = xfer(w, fd, 0, head, sizeof head, peer, what, 0, 0);
  if (rc == CE_E_TIMEOUT) rc = ce_fail(rc, "%s: %s sent no rank table within %d ms (the other ranks did not all arrive)", what, peer, job->timeout_ms);
  if (rc == CE_OK && (head[0] != TABLE_MAGIC || head[1] < 1 || head[1] > (uint32_t)job->nranks))
    rc = ce_fail(CE_E_PEER, "%s: %s sent a malformed rank table", what, peer);
  if (rc == CE_OK && !(procs = calloc(head[1], sizeof *procs))) rc = ce_fail(CE_E_NOMEM, "%s: out of host memory", what);
  if (rc == CE_OK) rc = xfer(w, fd, 0, procs, sizeof *procs * head[1], peer, what, 0, 0);
  close(fd);
  if (rc != CE_OK) {
    free(procs);
    close(lfd);
    return rc;
  }
  *lfd_out = lfd;
  *procs_out = procs;
  *nprocs_out = (int)head[1];
  return CE_OK;
}

/* Connects to the successor and accepts the predecessor, both at once. */
static int ring(waiter_t *w, ce_tcp_comm_t *t, int lfd, const uint8_t *token, const char *what) {
  int next = (t->me + 1) % t->nprocs, prev = (t->me + t->nprocs - 1) % t->nprocs;
  char a[80];
  link_t hi = {LINK_MAGIC, {0}, t->me};
  memcpy(hi.token, token, 16);
  int fd = connect_to(w, &t->procs[next].listen, what);
  if (fd < 0) return fd;
  t->out_fd = fd;
  int rc = xfer(w, fd, 1, &hi, sizeof hi, addr_str(&t->procs[next].listen, a, sizeof a), what, 0, 0);
  while (rc == CE_OK && t->in_fd < 0) {
    int in = accept_one(w, lfd);
    if (in == CE_E_TIMEOUT) return ce_fail(in, "%s: ranks %d..%d did not connect within %d ms", what, t->procs[prev].first_rank,
                                           t->procs[prev].first_rank + t->procs[prev].ndev - 1, w->ctx->comm.timeout_ms);
    if (in == CE_E_ABORTED) return ce_fail(in, "%s: aborted while waiting for the ring to close", what);
    if (in < 0) return in;
    link_t l;
    if (xfer(w, in, 0, &l, sizeof l, "a connecting process", what, 0, 0) == CE_OK && l.magic == LINK_MAGIC &&
        memcmp(l.token, token, 16) == 0 && l.from == prev)
      t->in_fd = in;
    else
      close(in);
  }
  return rc;
}

int ce_tcp_comm_init(ce_ctx_t *ctx, ce_comm_job_t *job) {
  char what[128], a[80];
  wire_addr_t root, self;
  id_root(job->id, &root);
  uint8_t token[16];
  ce_tcp_id_check(job->id, token);
  snprintf(what, sizeof what, "communicator init of ranks %d..%d of %d (rendezvous %s)", job->first_rank,
           job->first_rank + ctx->ndev - 1, job->nranks, addr_str(&root, a, sizeof a));
  waiter_t w = {ctx, job->gen, job->timeout_ms > 0 ? ce_now_ms() + job->timeout_ms : 0, 0};
  ce_tcp_comm_t *t = calloc(1, sizeof *t);
  if (!t) {
    if (job->listen_fd >= 0) close(job->listen_fd);
    return ce_fail(CE_E_NOMEM, "%s: out of host memory", what);
  }
  t->in_fd = t->out_fd = -1;
  ctx->comm.tcp = t; /* teardown frees it whatever happens below */
  int lfd = job->listen_fd, rc;
  if (lfd >= 0) {
    self = root;
    rc = rendezvous_root(&w, job, lfd, &self, &t->procs, &t->nprocs, token, what);
  } else {
    rc = rendezvous_peer(&w, job, &root, &lfd, &self, &t->procs, &t->nprocs, token, what);
  }
  if (rc == CE_OK) {
    t->me = -1;
    for (int i = 0; i < t->nprocs; i++)
      if (t->procs[i].first_rank == job->first_rank) t->me = i;
    if (t->me < 0) rc = ce_fail(CE_E_PEER, "%s: the rank table does not list this process", what);
  }
  if (rc == CE_OK && t->nprocs > 1) rc = ring(&w, t, lfd, token, what);
  if (lfd >= 0) close(lfd);
  return rc;
}

/* ---- broadcast ---- */

static int proc_of(const ce_tcp_comm_t *t, int rank) {
  for (int i = 0; i < t->nprocs; i++)
    if (rank >= t->procs[i].first_rank && rank < t->procs[i].first_rank + t->procs[i].ndev) return i;
  return -1;
}

static void peer_name(const ce_tcp_comm_t *t, int i, char *buf, size_t len) {
  char a[80];
  snprintf(buf, len, "ranks %d..%d (%s)", t->procs[i].first_rank, t->procs[i].first_rank + t->procs[i].ndev - 1,
           addr_str(&t->procs[i].listen, a, sizeof a));
}

int ce_tcp_comm_bcast(ce_ctx_t *ctx, ce_comm_job_t *job, uint64_t seq) {
  ce_tcp_comm_t *t = ctx->comm.tcp;
  char what[128];
  snprintf(what, sizeof what, "broadcast #%llu of %llu bytes from rank %d", (unsigned long long)seq, (unsigned long long)job->bytes,
           job->root);
  int stall = ctx->comm.timeout_ms;
  waiter_t w = {ctx, job->gen, stall > 0 ? ce_now_ms() + stall : 0, stall};
  ce_op_thread_wait(ctx, job->after_id, &ctx->comm.dead_gen, job->gen);
  if (ce_comm_dead(ctx, job->gen)) return ce_fail(CE_E_ABORTED, "%s: aborted before it started", what);
  job->op->t0_ms = ce_now_ms(); /* the op's time is its transfer, not its wait for `after` */
  uint8_t *src = (uint8_t *)(uintptr_t)job->src;
  uint8_t *dst0 = (uint8_t *)(uintptr_t)job->dst[0];
  int r = proc_of(t, job->root);
  if (r < 0) return ce_fail(CE_E_INVAL, "%s: no process holds rank %d", what, job->root);
  int pos = (t->me - r + t->nprocs) % t->nprocs, last = pos == t->nprocs - 1;
  int prev = (t->me + t->nprocs - 1) % t->nprocs, next = (t->me + 1) % t->nprocs;
  char from[128], to[128];
  peer_name(t, prev, from, sizeof from);
  peer_name(t, next, to, sizeof to);
  msg_t m = {MSG_MAGIC, MSG_DATA, seq, job->bytes, job->root, 0};
  int rc;
  if (pos == 0) {
    for (int d = 0; d < ctx->ndev; d++)
      if ((uint8_t *)(uintptr_t)job->dst[d] != src) ce_memcpy_parallel((void *)(uintptr_t)job->dst[d], src, job->bytes, 4);
    if (t->nprocs == 1) return CE_OK;
    if ((rc = xfer(&w, t->out_fd, 1, &m, sizeof m, to, what, 0, job->bytes))) return rc;
    for (uint64_t off = 0; off < job->bytes; off += CHUNK) {
      uint64_t n = job->bytes - off < CHUNK ? job->bytes - off : CHUNK;
      if ((rc = xfer(&w, t->out_fd, 1, src + off, n, to, what, off, job->bytes))) return rc;
    }
    msg_t ack;
    if ((rc = xfer(&w, t->in_fd, 0, &ack, sizeof ack, from, what, job->bytes, job->bytes))) return rc;
    if (ack.magic != MSG_MAGIC || ack.type != MSG_ACK || ack.seq != seq)
      return ce_fail(CE_E_PEER, "%s: %s acknowledged message type %u #%llu instead (the processes' broadcasts are out of step)", what,
                     from, ack.type, (unsigned long long)ack.seq);
    return CE_OK;
  }
  msg_t got;
  if ((rc = xfer(&w, t->in_fd, 0, &got, sizeof got, from, what, 0, job->bytes))) return rc;
  if (got.magic != MSG_MAGIC || got.type != MSG_DATA || got.seq != seq || got.bytes != job->bytes || got.root != job->root)
    return ce_fail(CE_E_PEER,
                   "%s: %s sent broadcast #%llu of %llu bytes from rank %d instead (every process must submit the same broadcasts in the same order)",
                   what, from, (unsigned long long)got.seq, (unsigned long long)got.bytes, got.root);
  if (!last && (rc = xfer(&w, t->out_fd, 1, &m, sizeof m, to, what, 0, job->bytes))) return rc;
  for (uint64_t off = 0; off < job->bytes; off += CHUNK) {
    uint64_t n = job->bytes - off < CHUNK ? job->bytes - off : CHUNK;
    if ((rc = xfer(&w, t->in_fd, 0, dst0 + off, n, from, what, off, job->bytes))) return rc;
    if (!last && (rc = xfer(&w, t->out_fd, 1, dst0 + off, n, to, what, off, job->bytes))) return rc;
  }
  for (int d = 1; d < ctx->ndev; d++) ce_memcpy_parallel((void *)(uintptr_t)job->dst[d], dst0, job->bytes, 4);
  if (last) {
    msg_t ack = {MSG_MAGIC, MSG_ACK, seq, job->bytes, job->root, 0};
    if ((rc = xfer(&w, t->out_fd, 1, &ack, sizeof ack, to, what, job->bytes, job->bytes))) return rc;
  }
  return CE_OK;
}
