/* Delta updates (DESIGN.md "Delta updates"): what changed between two versions of a tensor that
 * both sit in host memory, found on threads at memory speed, and the sparse patch of it; and, for
 * a worker whose parameters are host memory (the CPU backend), applying such a patch.
 *
 * An element is elem_bytes (1, 2, 4 or 8) bytes; it changed when any of its bytes differ. A patch
 * is `count` positions, little-endian int32 element indices into the flattened tensor in ascending
 * order, and `count` values, the new elements, in the same order (src/wire/worker-protocol.json). */
#include "internal.h"

#include <stdlib.h>
#include <string.h>

/* A thread takes a tensor in pieces of this many bytes: enough to amortize, small enough that one
 * large tensor spreads over every thread (as digests do). */
#define PIECE_BYTES (16ull << 20)
/* Patch entries a thread applies at a time. */
#define PATCH_PIECE 1048576ull
#define MAX_THREADS 64
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

static inline uint32_t load_le32u(const uint8_t *p) {
  uint32_t v;
  memcpy(&v, p, 4);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  v = __builtin_bswap32(v);
#endif
  return v;
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
} xspan_t;

typedef struct {
  uint32_t span;
  uint64_t e0, n; /* elements [e0, e0 + n) of the span */
  uint64_t count; /* changed elements in it (first pass) */
  uint64_t at;    /* encode: its first entry's index in the span's patch */
} xpiece_t;

typedef struct {
  int threads;
  int encode;
  int writing; /* the encode's second pass */
  uint64_t nspans, npieces;
  xspan_t *spans;
  xpiece_t *pieces;
  _Atomic uint64_t next;
  uint64_t *counts; /* nspans, read by ce_delta_collect */
} delta_job_t;

static void delta_job_free(void *p) {
  delta_job_t *job = p;
  if (!job) return;
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

/* Writes the patch entries of one piece: positions e0 + k of changed elements, and their new bytes. */
static void encode_piece(const xspan_t *s, const xpiece_t *pc) {
  uint32_t es = s->es;
  const uint8_t *a = s->old + pc->e0 * es, *b = s->cur + pc->e0 * es;
  uint8_t *pos = s->pos + 4 * pc->at, *val = s->val + (uint64_t)es * pc->at;
  uint64_t bytes = pc->n * es, i = 0;
  for (; i + 8 <= bytes; i += 8) {
    if (load64(a + i) == load64(b + i)) continue;
    for (uint32_t j = 0; j < 8; j += es) {
      if (memcmp(a + i + j, b + i + j, es) == 0) continue;
      store_le32(pos, (uint32_t)(pc->e0 + (i + j) / es));
      memcpy(val, b + i + j, es);
      pos += 4;
      val += es;
    }
  }
  for (uint64_t e = i / es; e < pc->n; e++) {
    if (memcmp(a + e * es, b + e * es, es) == 0) continue;
    store_le32(pos, (uint32_t)(pc->e0 + e));
    memcpy(val, b + e * es, es);
    pos += 4;
    val += es;
  }
}

static void *delta_worker(void *arg) {
  delta_job_t *job = arg;
  for (;;) {
    uint64_t i = atomic_fetch_add(&job->next, 1);
    if (i >= job->npieces) break;
    xpiece_t *pc = &job->pieces[i];
    xspan_t *s = &job->spans[pc->span];
    if (job->writing) {
      encode_piece(s, pc);
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
  uint64_t extra = job->npieces > 1 ? job->npieces - 1 : 0;
  if (extra > (uint64_t)job->threads - 1) extra = (uint64_t)job->threads - 1;
  pthread_t th[MAX_THREADS];
  int started = 0;
  for (; (uint64_t)started < extra; started++)
    if (pthread_create(&th[started], NULL, delta_worker, job) != 0) break; /* fewer threads: slower, same result */
  delta_worker(job);
  for (int i = 0; i < started; i++) pthread_join(th[i], NULL);
}

static int delta_run(ce_op_t *op) {
  delta_job_t *job = op->job_arg;
  delta_pass(job);
  for (uint64_t s = 0; s < job->nspans; s++) job->counts[s] = atomic_load(&job->spans[s].count);
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
    job->writing = 1;
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

static int elem_ok(uint64_t es, uint64_t bytes) { return (es == 1 || es == 2 || es == 4 || es == 8) && bytes % es == 0; }

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
  job->threads = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
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
    for (uint64_t e = 0; e < elems; e += per) job->pieces[job->npieces++] = (xpiece_t){(uint32_t)s, e, elems - e < per ? elems - e : per, 0, 0};
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

/* ---- applying patches into a host buffer ---- */

typedef struct {
  uint8_t *dst;
  uint64_t elems;
  const uint8_t *pos, *val;
  uint32_t es;
  uint64_t count;
  CUdeviceptr gdst, gpos, gval; /* the same, on a GPU */
} ppatch_t;

typedef struct {
  uint32_t patch;
  uint64_t k0, n; /* entries [k0, k0 + n) */
} ppiece_t;

typedef struct {
  int threads;
  ce_buf_t *gpu; /* set: the patches apply on this buffer's GPU, by libce's scatter kernel */
  uint64_t npatches, npieces;
  ppatch_t *patches;
  ppiece_t *pieces;
  _Atomic uint64_t next;
  _Atomic int bad; /* set once by the first entry whose position is out of range */
  uint64_t bad_patch, bad_entry, bad_pos;
} patch_job_t;

static void patch_job_free(void *p) {
  patch_job_t *job = p;
  if (!job) return;
  free(job->patches);
  free(job->pieces);
  free(job);
}

static void *patch_worker(void *arg) {
  patch_job_t *job = arg;
  for (;;) {
    uint64_t i = atomic_fetch_add(&job->next, 1);
    if (i >= job->npieces) break;
    ppiece_t *pc = &job->pieces[i];
    ppatch_t *p = &job->patches[pc->patch];
    uint32_t es = p->es;
    for (uint64_t k = pc->k0; k < pc->k0 + pc->n; k++) {
      uint64_t at = load_le32u(p->pos + 4 * k);
      if (at >= p->elems) {
        int no = 0;
        if (atomic_compare_exchange_strong(&job->bad, &no, 1)) job->bad_patch = pc->patch, job->bad_entry = k, job->bad_pos = at;
        return NULL;
      }
      /* a constant size per branch: each memcpy is one load and one store */
      switch (es) {
        case 1: memcpy(p->dst + at, p->val + k, 1); break;
        case 2: memcpy(p->dst + 2 * at, p->val + 2 * k, 2); break;
        case 4: memcpy(p->dst + 4 * at, p->val + 4 * k, 4); break;
        default: memcpy(p->dst + 8 * at, p->val + 8 * k, 8); break;
      }
    }
  }
  return NULL;
}

/* One scatter launch per patch on a stream of its own; each patch's device word says whether one of its
 * positions was past its tensor (nothing is written there; verify by digest sees the tensor). */
static int patch_gpu(ce_op_t *op, patch_job_t *job) {
  int d = job->gpu->dev, gpu = op->ctx->dev[d].ordinal;
  int rc = ce_kernels_load(op->ctx, d);
  if (rc) return ce_op_fail(op, rc, "%s", ce_last_error());
  const ce_dev_t *dv = &op->ctx->dev[d];
  uint64_t *bad = calloc(job->npatches ? job->npatches : 1, 8);
  if (!bad) return ce_op_fail(op, CE_E_NOMEM, "out of host memory for %llu patches", (unsigned long long)job->npatches);
  CUstream s = NULL;
  CUdeviceptr dbad = 0;
  CUresult r = cu.cuCtxSetCurrent(dv->cuctx);
  if (r == CUDA_SUCCESS) r = cu.cuStreamCreate(&s, CU_STREAM_NON_BLOCKING);
  if (r == CUDA_SUCCESS && job->npatches) r = cu.cuMemAlloc(&dbad, 8 * job->npatches);
  if (r == CUDA_SUCCESS && job->npatches) r = cu.cuMemcpyHtoDAsync(dbad, bad, 8 * job->npatches, s);
  for (uint64_t i = 0; r == CUDA_SUCCESS && i < job->npatches; i++) {
    const ppatch_t *p = &job->patches[i];
    r = ce_kernel_scatter(dv, s, p->gdst, p->gpos, p->gval, p->count, p->elems, p->es, dbad + 8 * i);
  }
  if (r == CUDA_SUCCESS && job->npatches) r = cu.cuMemcpyDtoHAsync(bad, dbad, 8 * job->npatches, s);
  if (s) {
    CUresult sync = cu.cuStreamSynchronize(s);
    if (r == CUDA_SUCCESS) r = sync;
    cu.cuStreamDestroy(s);
  }
  if (dbad) cu.cuMemFree(dbad);
  rc = CE_OK;
  if (r != CUDA_SUCCESS) {
    char why[512];
    ce_cuda_describe(r, why, sizeof why);
    rc = ce_op_fail(op, CE_E_CUDA, "applying %llu patches on GPU %d: %s", (unsigned long long)job->npatches, gpu, why);
  }
  for (uint64_t i = 0; rc == CE_OK && i < job->npatches; i++)
    if (bad[i])
      rc = ce_op_fail(op, CE_E_INVAL, "patch %llu, entry %llu: position past the tensor's %llu elements (on GPU %d)", (unsigned long long)i,
                      (unsigned long long)(bad[i] - 1), (unsigned long long)job->patches[i].elems, gpu);
  free(bad);
  if (rc == CE_OK) op->value = job->npatches;
  return rc;
}

static int patch_run(ce_op_t *op) {
  patch_job_t *job = op->job_arg;
  if (job->gpu) return patch_gpu(op, job);
  uint64_t extra = job->npieces > 1 ? job->npieces - 1 : 0;
  if (extra > (uint64_t)job->threads - 1) extra = (uint64_t)job->threads - 1;
  pthread_t th[MAX_THREADS];
  int started = 0;
  for (; (uint64_t)started < extra; started++)
    if (pthread_create(&th[started], NULL, patch_worker, job) != 0) break;
  patch_worker(job);
  for (int i = 0; i < started; i++) pthread_join(th[i], NULL);
  if (atomic_load(&job->bad))
    return ce_op_fail(op, CE_E_INVAL, "patch %llu, entry %llu: position %llu is past the tensor's %llu elements",
                      (unsigned long long)job->bad_patch, (unsigned long long)job->bad_entry, (unsigned long long)job->bad_pos,
                      (unsigned long long)job->patches[job->bad_patch].elems);
  op->value = job->npatches;
  return CE_OK;
}

int ce_buf_patch_submit(ce_ctx_t *ctx, ce_buf_t *dst, ce_buf_t *src, const uint64_t *patches, uint64_t npatches, int threads,
                        uint64_t *op_out) {
  const char *what = "ce_buf_patch_submit";
  if (!ctx || (!patches && npatches) || !op_out) return ce_fail(CE_E_INVAL, "%s: NULL argument", what);
  int rc = ce_buf_in_ctx(ctx, dst, what);
  if (!rc) rc = ce_buf_in_ctx(ctx, src, what);
  if (rc) return rc;
  if (ce_buf_on_host(dst) != ce_buf_on_host(src) || (!ce_buf_on_host(dst) && dst->dev != src->dev))
    return ce_fail(CE_E_STATE, "%s: the parameters and the patches must both be host memory, or both on one GPU", what);
  if (npatches > UINT32_MAX) return ce_fail(CE_E_INVAL, "%s: %llu patches, at most 2^32 - 1", what, (unsigned long long)npatches);
  patch_job_t *job = calloc(1, sizeof *job);
  if (job) job->patches = calloc(npatches ? npatches : 1, sizeof *job->patches);
  if (!job || !job->patches) {
    patch_job_free(job);
    return ce_fail(CE_E_NOMEM, "%s: out of host memory for %llu patches", what, (unsigned long long)npatches);
  }
  job->threads = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
  job->gpu = ce_buf_on_host(dst) ? NULL : dst;
  job->npatches = npatches;
  uint64_t npieces = 0;
  for (uint64_t i = 0; i < npatches; i++) {
    const uint64_t *x = patches + 6 * i;
    uint64_t doff = x[0], dbytes = x[1], poff = x[2], voff = x[3], count = x[4], es = x[5];
    if (!elem_ok(es, dbytes) || !ce_range_ok(doff, dbytes, dst->bytes) || count > dbytes / es ||
        !ce_range_ok(poff, 4 * count, src->bytes) || !ce_range_ok(voff, es * count, src->bytes)) {
      patch_job_free(job);
      return ce_fail(CE_E_INVAL, "%s: patch %llu (%llu entries of %llu bytes, positions at %llu, values at %llu in a %llu-byte buffer) does not fit a tensor of %llu bytes at %llu in a %llu-byte buffer",
                     what, (unsigned long long)i, (unsigned long long)count, (unsigned long long)es, (unsigned long long)poff,
                     (unsigned long long)voff, (unsigned long long)src->bytes, (unsigned long long)dbytes, (unsigned long long)doff,
                     (unsigned long long)dst->bytes);
    }
    if (!ce_buf_on_host(dst) && ((dst->dptr + doff) % es || (src->dptr + voff) % es || (src->dptr + poff) % 4)) {
      patch_job_free(job);
      return ce_fail(CE_E_INVAL, "%s: patch %llu: on a GPU the tensor, its positions and its values must be aligned to their elements", what,
                     (unsigned long long)i);
    }
    job->patches[i] = ce_buf_on_host(dst) ? (ppatch_t){dst->host + doff, dbytes / es, src->host + poff, src->host + voff, (uint32_t)es, count, 0, 0, 0}
                                          : (ppatch_t){NULL, dbytes / es, NULL, NULL, (uint32_t)es, count, dst->dptr + doff, src->dptr + poff, src->dptr + voff};
    npieces += (count + PATCH_PIECE - 1) / PATCH_PIECE;
  }
  if (!(job->pieces = calloc(npieces ? npieces : 1, sizeof *job->pieces))) {
    patch_job_free(job);
    return ce_fail(CE_E_NOMEM, "%s: out of host memory", what);
  }
  for (uint64_t i = 0; i < npatches; i++) {
    uint64_t count = patches[6 * i + 4];
    for (uint64_t k = 0; k < count; k += PATCH_PIECE) job->pieces[job->npieces++] = (ppiece_t){(uint32_t)i, k, count - k < PATCH_PIECE ? count - k : PATCH_PIECE};
  }
  uint64_t id;
  ce_op_t *op = ce_op_new(ctx, OP_THREAD, &id);
  if (!op) {
    patch_job_free(job);
    return CE_E_NOMEM;
  }
  op->job_arg = job;
  op->job_free = patch_job_free;
  ce_op_hold_buf(op, dst);
  ce_op_hold_buf(op, src);
  return ce_op_run(op, patch_run, id, op_out);
}
