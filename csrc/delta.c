/* Delta updates (DESIGN.md "Delta updates"): what changed between two versions of a tensor that
 * both sit in host memory, found on threads at memory speed, and the sparse patch of it (patch.c
 * applies one).
 *
 * An element is elem_bytes (1, 2, 4 or 8) bytes; it changed when any of its bytes differ. A patch
 * is `count` positions, little-endian int32 element indices into the flattened tensor in ascending
 * order, and `count` values, the new elements, in the same order (src/wire/worker-protocol.json). */
#include "delta.h"

#include <stdlib.h>
#include <string.h>

/* A thread takes a tensor in pieces of this many bytes: enough to amortize, small enough that one
 * large tensor spreads over every thread (as digests do). */
#define PIECE_BYTES (16ull << 20)
/* Positions are int32: a tensor of more elements always goes dense. */
#define MAX_PATCH_ELEMS (1ull << 31)

static inline uint64_t load64(const uint8_t *p) {
  uint64_t v;
  memcpy(&v, p, 8);
  return v;
}

static inline void store_le32(uint8_t *p, uint32_t v) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  v = __builtin_bswap32(v);
#endif
  memcpy(p, &v, 4);
}

/* Lanes of es bytes in d (a XOR of two words) that are not zero: each lane's bits are ORed into its
 * lowest bit (shifts summing to 8*es - 1 never reach the lane below), then those bits are counted. */
static inline uint64_t lanes_changed(uint64_t d, uint32_t es) {
  if (es == 8) return d != 0;
  for (uint32_t s = 4 * es; s; s >>= 1) d |= d >> s;
  uint64_t low = es == 1 ? 0x0101010101010101ull : es == 2 ? 0x0001000100010001ull : 0x0000000100000001ull;
  return (uint64_t)__builtin_popcountll(d & low);
}

/* ---- count and encode: spans of two regions, in pieces over threads ---- */

typedef struct {
  const uint8_t *old, *cur; /* the span in the old and the new version */
  uint64_t bytes;
  uint32_t es;
  uint8_t *pos, *val; /* encode: where its positions and values go */
  uint64_t want;      /* encode: the count the caller sized them for */
  _Atomic uint64_t count;
  /* encode: entries its pieces made room for, and the most that `want` changed elements can need
   * (each piece's room at most doubles what it holds, from 1024): more proves the count wrong */
  _Atomic uint64_t reserved;
  uint64_t limit;
} xspan_t;

typedef struct {
  uint32_t span;
  uint64_t e0, n; /* elements [e0, e0 + n) of the span */
  uint64_t count; /* changed elements in it */
  uint64_t at;    /* encode: its first entry's index in the span's patch */
  /* encode: its entries, written in the one pass over both versions, then copied into place once
   * every piece's count (so where its entries start) is known */
  uint8_t *pos, *val;
  uint64_t cap;
} xpiece_t;

typedef struct {
  int threads;
  int encode;
  int placing; /* the encode's second pass: each piece's entries copied into the patch */
  _Atomic int oom;  /* an encode piece could not grow its entries */
  _Atomic int over; /* an encode span has more changed elements than it was sized for */
  uint64_t nspans, npieces;
  xspan_t *spans;
  xpiece_t *pieces;
  _Atomic uint64_t next;
  uint64_t *counts; /* nspans, read by ce_delta_collect */
} delta_job_t;

static void delta_job_free(void *p) {
  delta_job_t *job = p;
  if (!job) return;
  for (uint64_t i = 0; job->pieces && i < job->npieces; i++) free(job->pieces[i].pos), free(job->pieces[i].val);
  free(job->spans);
  free(job->pieces);
  free(job->counts);
  free(job);
}

/* Changed elements among n elements of es bytes at a and b (n * es bytes; es divides 8, so a word
 * taken from the start never splits an element). */
static uint64_t count_piece(const uint8_t *a, const uint8_t *b, uint64_t n, uint32_t es) {
  uint64_t bytes = n * es, i = 0, c = 0;
  for (; i + 8 <= bytes; i += 8) {
    uint64_t d = load64(a + i) ^ load64(b + i);
    if (d) c += lanes_changed(d, es);
  }
  for (uint64_t e = i / es; e < n; e++) c += memcmp(a + e * es, b + e * es, es) != 0;
  return c;
}

enum { ROOM_OK = 1, ROOM_NOMEM = 0, ROOM_OVER = -1 };

/* Room for k more entries in a piece's own arrays. A version that changed after it was counted
 * stops here (ROOM_OVER) before its span takes more memory than its count allows. */
static int piece_room(xspan_t *s, xpiece_t *pc, uint64_t k) {
  if (pc->count + k <= pc->cap) return ROOM_OK;
  uint64_t cap = pc->cap ? 2 * pc->cap : 1024;
  while (cap < pc->count + k) cap *= 2;
  if (cap > pc->n) cap = pc->n;
  uint64_t add = cap - pc->cap;
  if (atomic_fetch_add(&s->reserved, add) + add > s->limit) return ROOM_OVER;
  uint32_t es = s->es;
  uint8_t *pos = realloc(pc->pos, 4 * cap), *val = pos ? realloc(pc->val, es * cap) : NULL;
  if (pos) pc->pos = pos;
  if (!pos || !val) return ROOM_NOMEM;
  pc->val = val;
  pc->cap = cap;
  return ROOM_OK;
}

/* Appends the changed element e of the piece (position e0 + e, its new bytes at b). */
static inline void piece_put(xpiece_t *pc, uint32_t es, uint64_t e, const uint8_t *b) {
  store_le32(pc->pos + 4 * pc->count, (uint32_t)(pc->e0 + e));
  memcpy(pc->val + es * pc->count, b, es);
  pc->count++;
}

/* One piece's patch entries, found in one pass over both versions, into the piece's own arrays:
 * ROOM_OK, or why it stopped. */
static int encode_piece(xspan_t *s, xpiece_t *pc) {
  uint32_t es = s->es;
  const uint8_t *a = s->old + pc->e0 * es, *b = s->cur + pc->e0 * es;
  uint64_t bytes = pc->n * es, i = 0;
  uint64_t lane = es == 8 ? ~0ull : (1ull << (8 * es)) - 1;
  for (; i + 8 <= bytes; i += 8) {
    uint64_t d = load64(a + i) ^ load64(b + i);
    if (!d) continue;
    int room = piece_room(s, pc, 8 / es);
    if (room != ROOM_OK) return room;
    for (uint32_t j = 0; j < 8; j += es) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
      int changed = memcmp(a + i + j, b + i + j, es) != 0;
#else
      int changed = ((d >> (8 * j)) & lane) != 0; /* byte j of the word is bits 8j .. 8j+7 */
#endif
      if (changed) piece_put(pc, es, (i + j) / es, b + i + j);
    }
  }
  for (uint64_t e = i / es; e < pc->n; e++) {
    if (memcmp(a + e * es, b + e * es, es) == 0) continue;
    int room = piece_room(s, pc, 1);
    if (room != ROOM_OK) return room;
    piece_put(pc, es, e, b + e * es);
  }
  return ROOM_OK;
}

static void *delta_worker(void *arg) {
  delta_job_t *job = arg;
  for (;;) {
    uint64_t i = atomic_fetch_add(&job->next, 1);
    if (i >= job->npieces) break;
    xpiece_t *pc = &job->pieces[i];
    xspan_t *s = &job->spans[pc->span];
    if (job->placing) {
      if (pc->count) memcpy(s->pos + 4 * pc->at, pc->pos, 4 * pc->count), memcpy(s->val + (uint64_t)s->es * pc->at, pc->val, (uint64_t)s->es * pc->count);
      free(pc->pos), free(pc->val);
      pc->pos = pc->val = NULL;
    } else if (job->encode) {
      int done = encode_piece(s, pc);
      if (done == ROOM_NOMEM) atomic_store(&job->oom, 1);
      if (done == ROOM_OVER) atomic_store(&job->over, 1);
      atomic_fetch_add(&s->count, pc->count);
    } else {
      pc->count = count_piece(s->old + pc->e0 * s->es, s->cur + pc->e0 * s->es, pc->n, s->es);
      atomic_fetch_add(&s->count, pc->count);
    }
  }
  return NULL;
}

/* One pass over every piece on up to job->threads threads (this one included). */
static void delta_pass(delta_job_t *job) {
  atomic_store(&job->next, 0);
  ce_fan_out(job->threads, job->npieces, delta_worker, job);
}

static int delta_run(ce_op_t *op) {
  delta_job_t *job = op->job_arg;
  delta_pass(job);
  for (uint64_t s = 0; s < job->nspans; s++) job->counts[s] = atomic_load(&job->spans[s].count);
  if (atomic_load(&job->oom)) return ce_op_fail(op, CE_E_NOMEM, "ce_delta_encode_submit: out of host memory for the patches' entries");
  if (atomic_load(&job->over))
    return ce_op_fail(op, CE_E_STATE, "ce_delta_encode_submit: a span has more changed elements than it was sized for: a version changed after it was compared");
  if (job->encode) {
    /* Each piece's entries start where the pieces before it in its span end. */
    uint64_t span = UINT64_MAX, at = 0;
    for (uint64_t i = 0; i < job->npieces; i++) {
      xpiece_t *pc = &job->pieces[i];
      if (pc->span != span) span = pc->span, at = 0;
      pc->at = at;
      at += pc->count;
    }
    for (uint64_t s = 0; s < job->nspans; s++)
      if (job->counts[s] != job->spans[s].want)
        return ce_op_fail(op, CE_E_STATE, "ce_delta_encode_submit: span %llu has %llu changed elements, sized for %llu: a version changed after it was compared",
                          (unsigned long long)s, (unsigned long long)job->counts[s], (unsigned long long)job->spans[s].want);
    job->placing = 1;
    delta_pass(job);
  }
  op->value = job->nspans;
  return CE_OK;
}

/* A region's span, checked: its base address, or NULL with the last error set. */
static const uint8_t *span_base(ce_ctx_t *ctx, uint64_t region, uint64_t off, uint64_t bytes, const char *what, uint64_t s,
                                int writable) {
  ce_region_t *r = NULL;
  if (region > UINT32_MAX) {
    ce_fail(CE_E_INVAL, "%s: span %llu names region %llu", what, (unsigned long long)s, (unsigned long long)region);
    return NULL;
  }
  if (!(r = ce_region_get(ctx, (uint32_t)region))) return NULL;
  if (!ce_range_ok(off, bytes, r->bytes)) {
    ce_fail(CE_E_INVAL, "%s: span %llu (%llu bytes at %llu) overruns region %llu (%llu bytes)", what, (unsigned long long)s,
            (unsigned long long)bytes, (unsigned long long)off, (unsigned long long)region, (unsigned long long)r->bytes);
    return NULL;
  }
  if (writable && r->kind == REGION_MAP_FILE) {
    ce_fail(CE_E_INVAL, "%s: span %llu writes into region %llu, a file mapped read-only", what, (unsigned long long)s,
            (unsigned long long)region);
    return NULL;
  }
  return r->base + off;
}


/* Count (stride 6) or encode (stride 10) spans: checked, pieces cut, op started. */
static int delta_submit(ce_ctx_t *ctx, const uint64_t *spans, uint64_t nspans, int threads, int encode, uint64_t *op_out) {
  const char *what = encode ? "ce_delta_encode_submit" : "ce_delta_count_submit";
  if (!ctx || (!spans && nspans) || !op_out) return ce_fail(CE_E_INVAL, "%s: NULL argument", what);
  if (nspans > UINT32_MAX) return ce_fail(CE_E_INVAL, "%s: %llu spans, at most 2^32 - 1", what, (unsigned long long)nspans);
  uint64_t stride = encode ? 10 : 6;
  delta_job_t *job = calloc(1, sizeof *job);
  uint32_t *regions = calloc(nspans ? 3 * nspans : 1, sizeof *regions);
  if (job) {
    job->spans = calloc(nspans ? nspans : 1, sizeof *job->spans);
    job->counts = calloc(nspans ? nspans : 1, sizeof *job->counts);
  }
  if (!job || !regions || !job->spans || !job->counts) {
    delta_job_free(job);
    free(regions);
    return ce_fail(CE_E_NOMEM, "%s: out of host memory for %llu spans", what, (unsigned long long)nspans);
  }
  job->threads = threads; /* ce_fan_out bounds it */
  job->encode = encode;
  job->nspans = nspans;
  uint32_t nregions = 0;
  int rc = CE_OK;
  uint64_t npieces = 0;
  for (uint64_t s = 0; s < nspans && rc == CE_OK; s++) {
    const uint64_t *x = spans + stride * s;
    uint64_t bytes = x[4], es = x[5];
    xspan_t *sp = &job->spans[s];
    if (!elem_ok(es, bytes)) {
      rc = ce_fail(CE_E_INVAL, "%s: span %llu: %llu bytes of %llu-byte elements (elements are 1, 2, 4 or 8 bytes)", what,
                   (unsigned long long)s, (unsigned long long)bytes, (unsigned long long)es);
      break;
    }
    sp->bytes = bytes;
    sp->es = (uint32_t)es;
    if (!(sp->old = span_base(ctx, x[0], x[1], bytes, what, s, 0)) || !(sp->cur = span_base(ctx, x[2], x[3], bytes, what, s, 0))) {
      rc = CE_E_INVAL;
      break;
    }
    regions[nregions++] = (uint32_t)x[0];
    regions[nregions++] = (uint32_t)x[2];
    if (encode) {
      uint64_t count = x[9];
      if (bytes / es > MAX_PATCH_ELEMS || count > bytes / es) {
        rc = ce_fail(CE_E_INVAL, "%s: span %llu: %llu elements, count %llu (positions are int32: at most 2^31 elements)", what,
                     (unsigned long long)s, (unsigned long long)(bytes / es), (unsigned long long)count);
        break;
      }
      sp->want = count;
      if (!(sp->pos = (uint8_t *)span_base(ctx, x[6], x[7], 4 * count, what, s, 1)) ||
          !(sp->val = (uint8_t *)span_base(ctx, x[6], x[8], es * count, what, s, 1))) {
        rc = CE_E_INVAL;
        break;
      }
      regions[nregions++] = (uint32_t)x[6];
    }
    npieces += (bytes + PIECE_BYTES - 1) / PIECE_BYTES;
  }
  if (rc == CE_OK && !(job->pieces = calloc(npieces ? npieces : 1, sizeof *job->pieces)))
    rc = ce_fail(CE_E_NOMEM, "%s: out of host memory", what);
  if (rc != CE_OK) {
    delta_job_free(job);
    free(regions);
    return rc;
  }
  for (uint64_t s = 0; s < nspans; s++) {
    uint64_t elems = job->spans[s].bytes / job->spans[s].es, per = PIECE_BYTES / job->spans[s].es;
    job->spans[s].limit = 2 * job->spans[s].want + 1024 * ((elems + per - 1) / per);
    for (uint64_t e = 0; e < elems; e += per) job->pieces[job->npieces++] = (xpiece_t){(uint32_t)s, e, elems - e < per ? elems - e : per, 0, 0, NULL, NULL, 0};
  }
  uint64_t id;
  ce_op_t *op = ce_op_new(ctx, OP_THREAD, &id);
  if (!op) {
    delta_job_free(job);
    free(regions);
    return CE_E_NOMEM;
  }
  op->job_arg = job;
  op->job_free = delta_job_free;
  for (uint32_t i = 0; i < nregions; i++) ce_op_hold_region(op, regions[i]);
  free(regions);
  return ce_op_run(op, delta_run, id, op_out);
}

int ce_delta_count_submit(ce_ctx_t *ctx, const uint64_t *spans, uint64_t nspans, int threads, uint64_t *op_out) {
  return delta_submit(ctx, spans, nspans, threads, 0, op_out);
}

int ce_delta_encode_submit(ce_ctx_t *ctx, const uint64_t *spans, uint64_t nspans, int threads, uint64_t *op_out) {
  return delta_submit(ctx, spans, nspans, threads, 1, op_out);
}

int ce_delta_collect(ce_ctx_t *ctx, uint64_t op, double *times, uint64_t *counts, uint64_t len) {
  if (!ctx) return ce_fail(CE_E_INVAL, "ce_delta_collect: ctx is NULL");
  ce_op_t *o = ce_op_find(ctx, op);
  if (!o) return CE_E_INVAL;
  if (o->kind != OP_THREAD || o->job != delta_run)
    return ce_fail(CE_E_INVAL, "ce_delta_collect: op %llu is not a delta op", (unsigned long long)op);
  if (!atomic_load_explicit(&o->done, memory_order_acquire)) return CE_INPROGRESS;
  delta_job_t *job = o->job_arg;
  if (len < job->nspans || (!counts && job->nspans))
    return ce_fail(CE_E_INVAL, "ce_delta_collect: room for %llu counts, the op has %llu", (unsigned long long)len,
                   (unsigned long long)job->nspans);
  if (o->status == CE_OK && job->nspans) memcpy(counts, job->counts, job->nspans * sizeof *counts);
  return ce_op_poll(ctx, op, times, NULL);
}
