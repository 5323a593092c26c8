/* Reads over UCX as active messages. A reader sends a request (registration, address, length)
 * and the owner answers with the bytes, UCX choosing eager or rendezvous. Not RMA gets: over TCP
 * UCX emulates a get with its own internal reply, whose failure when the reader dies aborts the
 * owner's process (1.13: an assertion in uct_tcp_ep_pending_purge; 1.16: "unexpected error:
 * Endpoint timeout" in ucp_get_req_handler); an answer is a request of ours, and its failure
 * comes back to our callback. */
#include "xfer_ucx.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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

/* The piece's end with UCX's status for its receive. */
static void piece_end_ucs(ucx_piece_t *pc, ucs_status_t s) {
  piece_end(pc, s == UCS_OK ? CE_OK : ucx_status_ce(s), s == UCS_OK ? NULL : ucx.ucs_status_string(s));
}

static void piece_sent(void *request, ucs_status_t s, void *user_data) {
  ucx_piece_t *pc = user_data;
  ucx.ucp_request_free(request);
  pc->sending = 0;
  if (s != UCS_OK) piece_end_ucs(pc, s);
  else piece_idle_check(pc->x->impl, pc);
}

static void piece_received(void *request, ucs_status_t s, size_t length, void *user_data) {
  (void)length;
  ucx_piece_t *pc = user_data;
  ucx.ucp_request_free(request);
  pc->receiving = 0;
  piece_end_ucs(pc, s);
}

/* Fails p's pieces still waiting for an answer (a receive under way ends through UCX). */
void ucx_pieces_fail_peer(ucx_t *u, xfer_peer_t *p) {
  for (uint32_t i = 0; i < u->npieces; i++) {
    ucx_piece_t *pc = u->pieces[i];
    if (pc->rd && pc->peer == p->id && !pc->receiving) piece_end(pc, p->status, p->msg);
  }
}

/* AM_DATA: an answer. Runs inside ucp_worker_progress, under x->mu. */
ucs_status_t ucx_on_data(void *arg, const void *header, size_t header_length, void *data, size_t length,
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
    pc->receiving = 0;
    piece_end_ucs(pc, sp ? CE_UCS_PTR_STATUS(sp) : UCS_OK);
  }
  return UCS_OK;
}

/* ---- answers (the owner's side) ---- */

/* An answer in flight: its header and reason live until UCX has sent them. */
typedef struct {
  read_ans_t ans;
  ucx_mem_t *mem; /* NULL for a refusal */
  char reason[256];
} ucx_answer_t;

static void answer_free(ucx_answer_t *a) {
  if (a->mem && --a->mem->serving == 0 && a->mem->orphan) ucx_mem_release(a->mem);
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
ucs_status_t ucx_on_read(void *arg, const void *header, size_t header_length, void *data, size_t length,
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

/* ---- reads ---- */

int ucx_get(ce_xfer_t *x, xfer_read_t *rd, const uint8_t *key, uint64_t key_len, void *dst, uint64_t remote_addr,
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

void ucx_pieces_free(ucx_t *u) {
  for (uint32_t i = 0; i < u->npieces; i++) free(u->pieces[i]);
  free(u->pieces);
  free(u->free_slots);
  u->pieces = NULL;
  u->free_slots = NULL;
  u->npieces = u->cap = u->nfree = 0;
}
