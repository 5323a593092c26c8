/* Tensor digests (docs/digest.md): a Fletcher-style checksum of a tensor's bytes, computed on
 * threads over pinned host memory at memory speed, over a GPU buffer by libce's kernel
 * (kernels.c), and by a worker on its GPU with plain torch integer ops (python/ce_worker/digest.py).
 * They must agree bit for bit, so this file and the spec are the definition:
 *
 *   w_i = int32 read little-endian from bytes 4i..4i+3 (zero-padded past the end), i < ceil(L/4)
 *   S   = sum_i w_i * (2i + 1)                          mod 2^64 (w_i sign-extended)
 *   x   = S + 0x9E3779B97F4A7C15 * (L + 1)             mod 2^64
 *   digest = fmix64(x)                                  (MurmurHash3's finalizer, a bijection)
 *
 * Words are signed because torch before 2.3 has no uint32: a worker reads them as int32 and sums
 * in int64 with no masking pass. */
#include "internal.h"

#include <stdlib.h>
#include <string.h>

#define DIGEST_K 0x9E3779B97F4A7C15ull
/* Words per inner block: the block's sums stay exact in int64 (|c| < (M^2/2) * 2^31, M = 8192). */
#define BLOCK_WORDS 65536u
#define LANES 8
/* A thread takes the spans in pieces of this many words (16 MiB): enough to amortize, small
 * enough that one large tensor spreads over every thread. */
#define PIECE_WORDS (4ull << 20)

static inline int32_t load_le32(const uint8_t *p) {
  uint32_t v;
  memcpy(&v, p, 4); /* unaligned is fine: a bf16 tensor may start 2 bytes into a word */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  v = __builtin_bswap32(v);
#endif
  return (int32_t)v;
}

/* sum of w_i * (2i+1) mod 2^64 over the n whole words w0 .. w0+n-1 of a tensor; q points at word w0
 * (in the tensor, or in a copy of that part of it read back from a GPU).
 * Within a block of m words at word b: sum w_{b+j} (2(b+j)+1) = (2b+1) * sum w + 2 * sum j w.
 * sum j w is found with adds only, in LANES interleaved lanes (j = t*LANES + l): a running sum a_l
 * and a sum of running sums c_l = sum_t (M - t) w give sum_t t w = M a_l - c_l. Adds vectorize (a
 * 64-bit multiply would not). Baseline x86-64 has no int32 -> int64 widening load, so that build
 * digests 6-8 GB/s from cache on a Xeon core at -O2; AVX2's vpmovsxdq makes it 20-25 GB/s, enough
 * for a thread to keep up with DRAM and leave the host's other cores to the copies a digest runs
 * beside. The loader picks the clone for the CPU it runs on. */
/* GCC 11 is the first to know the x86-64-v4 level; other compilers build the baseline loop. */
#if defined(__x86_64__) && defined(__ELF__) && !defined(__clang__) && __GNUC__ >= 11
__attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#endif
static uint64_t digest_words(const uint8_t *q, uint64_t w0, uint64_t n) {
  uint64_t d = 0;
  while (n >= LANES) {
    uint64_t m = n < BLOCK_WORDS ? n - n % LANES : BLOCK_WORDS;
    uint64_t M = m / LANES;
    int64_t a[LANES] = {0}, c[LANES] = {0};
    for (uint64_t t = 0; t < M; t++, q += 4 * LANES) /* q ends one block on */
      for (int l = 0; l < LANES; l++) {
        a[l] += load_le32(q + 4 * l);
        c[l] += a[l];
      }
    int64_t sum = 0, jsum = 0;
    for (int l = 0; l < LANES; l++) {
      sum += a[l];
      jsum += LANES * ((int64_t)M * a[l] - c[l]) + l * a[l];
    }
    d += (2 * w0 + 1) * (uint64_t)sum + 2 * (uint64_t)jsum;
    w0 += m;
    n -= m;
  }
  for (; n; n--, w0++, q += 4) d += (uint64_t)(int64_t)load_le32(q) * (2 * w0 + 1);
  return d;
}

/* The last word of a tensor whose length is not a multiple of 4, zero-padded. */
static uint64_t digest_tail(const uint8_t *p, uint64_t bytes) {
  uint64_t i = bytes / 4, rest = bytes % 4;
  if (!rest) return 0;
  uint8_t word[4] = {0, 0, 0, 0};
  memcpy(word, p + 4 * i, rest);
  return (uint64_t)(int64_t)load_le32(word) * (2 * i + 1);
}

static uint64_t fmix64(uint64_t k) {
  k ^= k >> 33;
  k *= 0xff51afd7ed558ccdull;
  k ^= k >> 33;
  k *= 0xc4ceb9fe1a85ec53ull;
  k ^= k >> 33;
  return k;
}

static uint64_t digest_finish(uint64_t sum, uint64_t bytes) { return fmix64(sum + DIGEST_K * (bytes + 1)); }

int ce_digest_bytes(const void *data, uint64_t bytes, uint64_t *digest_out) {
  if (!digest_out || (!data && bytes)) return ce_fail(CE_E_INVAL, "ce_digest_bytes: NULL argument");
  const uint8_t *p = data;
  uint64_t s = bytes ? digest_words(p, 0, bytes / 4) + digest_tail(p, bytes) : 0;
  *digest_out = digest_finish(s, bytes);
  return CE_OK;
}

/* ---- the op: spans in pieces over threads ---- */

typedef struct {
  const uint8_t *base; /* host memory; NULL for a span of a GPU buffer */
  uint64_t dev_offset; /* a GPU buffer's span: where it starts in the buffer */
  uint64_t bytes;
  uint64_t tail; /* the zero-padded last word's term, when bytes % 4 != 0 */
  _Atomic uint64_t sum; /* pieces add into it in any order: the sum is mod 2^64 */
} dspan_t;

typedef struct {
  uint32_t span;
  uint64_t w0, nwords;
  const uint8_t *q; /* word w0 in host memory (the span's, or the read-back copy of a GPU span) */
} dpiece_t;

typedef struct {
  uint64_t after;
  int threads;
  uint64_t nspans, npieces;
  _Atomic uint64_t next; /* the next piece to take, up to end */
  uint64_t end;
  dspan_t *spans;
  dpiece_t *pieces;
  uint64_t *digests; /* nspans, read by ce_digest_collect */
  ce_buf_t *gpu;     /* set: the spans are of this GPU buffer, read back in rounds */
} digest_job_t;

static void digest_job_free(void *p) {
  digest_job_t *job = p;
  if (!job) return;
  free(job->spans);
  free(job->pieces);
  free(job->digests);
  free(job);
}

static void *digest_worker(void *arg) {
  digest_job_t *job = arg;
  for (;;) {
    uint64_t i = atomic_fetch_add(&job->next, 1);
    if (i >= job->end) break;
    dpiece_t *pc = &job->pieces[i];
    atomic_fetch_add(&job->spans[pc->span].sum, digest_words(pc->q, pc->w0, pc->nwords));
  }
  return NULL;
}

/* Digests pieces [begin, end) on up to job->threads threads (this one included). */
static void digest_pieces(digest_job_t *job, uint64_t begin, uint64_t end) {
  atomic_store(&job->next, begin);
  job->end = end;
  ce_fan_out(job->threads, end - begin, digest_worker, job);
}

/* Bytes read back from a GPU per round: two rounds alternate, one copying while the other is digested. */
#define ROUND_BYTES (64ull << 20)

/* Issues the read-back of the pieces from `begin` that fit in one round into scratch and points
 * them there; returns the end of the round (in *r, the first failure). */
static uint64_t digest_round(digest_job_t *job, uint64_t begin, uint8_t *scratch, CUstream s, CUresult *r) {
  uint64_t used = 0, i = begin;
  for (; *r == CUDA_SUCCESS && i < job->npieces && used + 4 * job->pieces[i].nwords <= ROUND_BYTES; i++) {
    dpiece_t *pc = &job->pieces[i];
    *r = cu.cuMemcpyDtoHAsync(scratch + used, job->gpu->dptr + job->spans[pc->span].dev_offset + 4 * pc->w0, 4 * pc->nwords, s);
    pc->q = scratch + used;
    used += 4 * pc->nwords;
  }
  return i;
}

/* The rounds of read-back (when the kernels cannot run): pieces go into pinned scratch round by
 * round, the copy of round k+1 running while round k is digested. Pieces are at most 16 MiB, so
 * every round takes at least one. */
static int digest_read_back(ce_op_t *op, digest_job_t *job, CUstream s, CUresult *r) {
  uint8_t *scratch[2] = {NULL, NULL};
  int registered[2] = {0, 0}, rc = CE_OK;
  CUevent ev[2] = {NULL, NULL};
  for (int i = 0; i < 2 && *r == CUDA_SUCCESS; i++) {
    *r = cu.cuEventCreate(&ev[i], CU_EVENT_DEFAULT);
    scratch[i] = aligned_alloc(4096, ROUND_BYTES);
    if (!scratch[i]) rc = ce_op_fail(op, CE_E_NOMEM, "out of host memory reading back GPU %d for a digest", op->ctx->dev[job->gpu->dev].ordinal);
    if (rc != CE_OK) break;
    if (*r == CUDA_SUCCESS) *r = cu.cuMemHostRegister(scratch[i], ROUND_BYTES, 0);
    registered[i] = *r == CUDA_SUCCESS;
  }
  if (rc == CE_OK && *r == CUDA_SUCCESS) {
    uint64_t begin = 0, end = digest_round(job, 0, scratch[0], s, r);
    if (*r == CUDA_SUCCESS) *r = cu.cuEventRecord(ev[0], s);
    for (uint64_t k = 0; *r == CUDA_SUCCESS && begin < end; k++) {
      *r = cu.cuEventSynchronize(ev[k % 2]);
      uint64_t next = end;
      if (*r == CUDA_SUCCESS && end < job->npieces) {
        next = digest_round(job, end, scratch[(k + 1) % 2], s, r);
        if (*r == CUDA_SUCCESS) *r = cu.cuEventRecord(ev[(k + 1) % 2], s);
      }
      if (*r != CUDA_SUCCESS) break;
      digest_pieces(job, begin, end);
      begin = end;
      end = next;
    }
  }
  CUresult sync = cu.cuStreamSynchronize(s); /* nothing left in flight over the scratch */
  if (*r == CUDA_SUCCESS) *r = sync;
  for (int i = 0; i < 2; i++) {
    if (registered[i]) cu.cuMemHostUnregister(scratch[i]);
    free(scratch[i]);
    if (ev[i]) cu.cuEventDestroy(ev[i]);
  }
  return rc;
}

/* The digest kernel over every span where it lies: a few partial sums per span come back, not the
 * bytes. Only for spans whose words are 4-aligned on the device (tensors at ce's 256-byte offsets). */
static int digest_on_gpu(ce_op_t *op, digest_job_t *job, CUstream s, CUresult *r) {
  const ce_dev_t *dv = &op->ctx->dev[job->gpu->dev];
  uint64_t total = 0;
  for (uint64_t sp = 0; sp < job->nspans; sp++) total += ce_kernel_digest_blocks(job->spans[sp].bytes / 4);
  uint64_t *parts = malloc(8 * (total ? total : 1));
  if (!parts) return ce_op_fail(op, CE_E_NOMEM, "out of host memory for a digest's partial sums");
  CUdeviceptr dparts = 0;
  if (total) *r = cu.cuMemAlloc(&dparts, 8 * total);
  uint64_t at = 0;
  for (uint64_t sp = 0; *r == CUDA_SUCCESS && sp < job->nspans; sp++) {
    uint64_t words = job->spans[sp].bytes / 4;
    *r = ce_kernel_digest(dv, s, job->gpu->dptr + job->spans[sp].dev_offset, words, dparts + 8 * at);
    at += ce_kernel_digest_blocks(words);
  }
  if (*r == CUDA_SUCCESS && total) *r = cu.cuMemcpyDtoHAsync(parts, dparts, 8 * total, s);
  CUresult sync = cu.cuStreamSynchronize(s);
  if (*r == CUDA_SUCCESS) *r = sync;
  if (dparts) cu.cuMemFree(dparts);
  at = 0;
  for (uint64_t sp = 0; *r == CUDA_SUCCESS && sp < job->nspans; sp++) {
    uint64_t sum = 0;
    for (uint32_t b = ce_kernel_digest_blocks(job->spans[sp].bytes / 4); b; b--) sum += parts[at++];
    atomic_store(&job->spans[sp].sum, sum);
  }
  free(parts);
  return CE_OK;
}

/* Spans of a GPU buffer: summed by libce's kernel on the GPU where it can run, else read back and
 * summed on threads; the tails (a last partial word) come back first either way. */
static int digest_gpu(ce_op_t *op, digest_job_t *job) {
  ce_buf_t *b = job->gpu;
  uint8_t *tails = calloc(job->nspans ? job->nspans : 1, 4);
  if (!tails) return ce_op_fail(op, CE_E_NOMEM, "out of host memory for a digest");
  int rc = CE_OK, aligned = 1;
  CUstream s = NULL;
  int gpu = op->ctx->dev[b->dev].ordinal;
  for (uint64_t sp = 0; sp < job->nspans; sp++) aligned &= (b->dptr + job->spans[sp].dev_offset) % 4 == 0;
  /* A driver whose JIT cannot build the kernels still gets its digest, the slow way. */
  int kernel = aligned && ce_kernels_load(op->ctx, b->dev) == CE_OK;
  CUresult r = cu.cuCtxSetCurrent(op->ctx->dev[b->dev].cuctx);
  if (r == CUDA_SUCCESS) r = cu.cuStreamCreate(&s, CU_STREAM_NON_BLOCKING);
  for (uint64_t sp = 0; r == CUDA_SUCCESS && sp < job->nspans; sp++) {
    uint64_t rest = job->spans[sp].bytes % 4;
    if (rest) r = cu.cuMemcpyDtoHAsync(tails + 4 * sp, b->dptr + job->spans[sp].dev_offset + job->spans[sp].bytes - rest, rest, s);
  }
  if (r == CUDA_SUCCESS) rc = kernel ? digest_on_gpu(op, job, s, &r) : digest_read_back(op, job, s, &r);
  if (s) {
    CUresult sync = cu.cuStreamSynchronize(s); /* the tails */
    if (r == CUDA_SUCCESS) r = sync;
  }
  if (rc == CE_OK && r != CUDA_SUCCESS) {
    char why[512];
    ce_cuda_describe(r, why, sizeof why);
    rc = ce_op_fail(op, CE_E_CUDA, "digesting %llu spans on GPU %d: %s", (unsigned long long)job->nspans, gpu, why);
  }
  for (uint64_t sp = 0; rc == CE_OK && sp < job->nspans; sp++) {
    dspan_t *d = &job->spans[sp];
    uint64_t rest = d->bytes % 4, i = d->bytes / 4;
    if (rest) d->tail = (uint64_t)(int64_t)load_le32(tails + 4 * sp) * (2 * i + 1); /* calloc'd: zero-padded */
  }
  if (s) cu.cuStreamDestroy(s);
  free(tails);
  return rc;
}

static int digest_job(ce_op_t *op) {
  digest_job_t *job = op->job_arg;
  ce_op_thread_wait(op->ctx, job->after, NULL, 0);
  op->t0_ms = ce_now_ms(); /* the op's time is its digesting, not its wait for `after` */
  if (job->gpu) {
    int rc = digest_gpu(op, job);
    if (rc != CE_OK) return rc;
  } else {
    digest_pieces(job, 0, job->npieces);
    for (uint64_t s = 0; s < job->nspans; s++) job->spans[s].tail = digest_tail(job->spans[s].base, job->spans[s].bytes);
  }
  for (uint64_t s = 0; s < job->nspans; s++) {
    dspan_t *sp = &job->spans[s];
    job->digests[s] = digest_finish(atomic_load(&sp->sum) + sp->tail, sp->bytes);
  }
  op->value = job->nspans;
  return CE_OK;
}

/* A job over nspans spans whose bases the caller fills in; pieces are cut once they are. */
static digest_job_t *digest_job_new(uint64_t nspans, int threads, uint64_t after) {
  digest_job_t *job = calloc(1, sizeof *job);
  if (!job) return NULL;
  job->after = after;
  job->threads = threads; /* ce_fan_out bounds it */
  job->nspans = nspans;
  job->spans = calloc(nspans ? nspans : 1, sizeof *job->spans);
  job->digests = calloc(nspans ? nspans : 1, sizeof *job->digests);
  if (!job->spans || !job->digests) {
    digest_job_free(job);
    return NULL;
  }
  return job;
}

static int digest_job_cut(digest_job_t *job) {
  uint64_t n = 0;
  for (uint64_t s = 0; s < job->nspans; s++) n += (job->spans[s].bytes / 4 + PIECE_WORDS - 1) / PIECE_WORDS;
  job->pieces = calloc(n ? n : 1, sizeof *job->pieces);
  if (!job->pieces) return CE_E_NOMEM;
  for (uint64_t s = 0; s < job->nspans; s++) {
    uint64_t words = job->spans[s].bytes / 4;
    const uint8_t *base = job->spans[s].base; /* NULL on a GPU: q is set when the piece is read back */
    for (uint64_t w = 0; w < words; w += PIECE_WORDS)
      job->pieces[job->npieces++] = (dpiece_t){(uint32_t)s, w, words - w < PIECE_WORDS ? words - w : PIECE_WORDS, base ? base + 4 * w : NULL};
  }
  return CE_OK;
}

/* Refuses a GPU op as `after`: a thread cannot wait for its events, only for its collection. */
static int digest_after_ok(ce_ctx_t *ctx, uint64_t after, const char *what) {
  int pending = 0;
  ce_op_t *a = ce_op_pin(ctx, after, &pending);
  int gpu = a && a->kind == OP_GPU;
  ce_op_unpin(a);
  if (gpu) return ce_fail(CE_E_STATE, "%s: after op %llu is a GPU op; a digest waits for thread ops (file reads) only", what,
                          (unsigned long long)after);
  return CE_OK;
}

/* Starts the op over a filled job (which it then owns), holding the spans' regions or buffer. */
static int digest_submit(ce_ctx_t *ctx, digest_job_t *job, const uint32_t *regions, ce_buf_t *buf, const char *what,
                         uint64_t *op_out) {
  if (digest_job_cut(job) != CE_OK) {
    digest_job_free(job);
    return ce_fail(CE_E_NOMEM, "%s: out of host memory", what);
  }
  uint64_t id;
  ce_op_t *op = ce_op_new(ctx, OP_THREAD, &id);
  if (!op) {
    digest_job_free(job);
    return CE_E_NOMEM;
  }
  op->job_arg = job;
  op->job_free = digest_job_free;
  if (regions)
    for (uint64_t s = 0; s < job->nspans; s++) ce_op_hold_region(op, regions[s]);
  if (buf) ce_op_hold_buf(op, buf);
  return ce_op_run(op, digest_job, id, op_out);
}

int ce_digest_submit(ce_ctx_t *ctx, const uint64_t *spans, uint64_t nspans, int threads, uint64_t after, uint64_t *op_out) {
  if (!ctx || (!spans && nspans) || !op_out) return ce_fail(CE_E_INVAL, "ce_digest_submit: NULL argument");
  if (nspans > UINT32_MAX) return ce_fail(CE_E_INVAL, "ce_digest_submit: %llu spans, at most 2^32 - 1", (unsigned long long)nspans);
  int rc = digest_after_ok(ctx, after, "ce_digest_submit");
  if (rc) return rc;
  digest_job_t *job = digest_job_new(nspans, threads, after);
  uint32_t *regions = calloc(nspans ? nspans : 1, sizeof *regions);
  if (!job || !regions) {
    digest_job_free(job);
    free(regions);
    return ce_fail(CE_E_NOMEM, "ce_digest_submit: out of host memory for %llu spans", (unsigned long long)nspans);
  }
  for (uint64_t s = 0; s < nspans; s++) {
    uint64_t region = spans[3 * s], off = spans[3 * s + 1], bytes = spans[3 * s + 2];
    ce_region_t *r = NULL;
    if (region > UINT32_MAX) rc = ce_fail(CE_E_INVAL, "ce_digest_submit: span %llu names region %llu", (unsigned long long)s, (unsigned long long)region);
    else if (!(r = ce_region_get(ctx, (uint32_t)region))) rc = CE_E_INVAL;
    else if (!ce_range_ok(off, bytes, r->bytes))
      rc = ce_fail(CE_E_INVAL, "ce_digest_submit: span %llu (%llu bytes at %llu) overruns region %llu (%llu bytes)",
                   (unsigned long long)s, (unsigned long long)bytes, (unsigned long long)off, (unsigned long long)region,
                   (unsigned long long)r->bytes);
    if (rc) {
      digest_job_free(job);
      free(regions);
      return rc;
    }
    regions[s] = (uint32_t)region;
    job->spans[s].base = r->base + off;
    job->spans[s].bytes = bytes;
  }
  rc = digest_submit(ctx, job, regions, NULL, "ce_digest_submit", op_out);
  free(regions);
  return rc;
}

int ce_buf_digest_submit(ce_ctx_t *ctx, ce_buf_t *buf, const uint64_t *spans, uint64_t nspans, int threads, uint64_t after,
                         uint64_t *op_out) {
  if (!ctx || (!spans && nspans) || !op_out) return ce_fail(CE_E_INVAL, "ce_buf_digest_submit: NULL argument");
  int rc = ce_buf_in_ctx(ctx, buf, "ce_buf_digest_submit");
  if (rc) return rc;
  if (nspans > UINT32_MAX) return ce_fail(CE_E_INVAL, "ce_buf_digest_submit: %llu spans, at most 2^32 - 1", (unsigned long long)nspans);
  rc = digest_after_ok(ctx, after, "ce_buf_digest_submit");
  if (rc) return rc;
  digest_job_t *job = digest_job_new(nspans, threads, after);
  if (!job) return ce_fail(CE_E_NOMEM, "ce_buf_digest_submit: out of host memory for %llu spans", (unsigned long long)nspans);
  for (uint64_t s = 0; s < nspans; s++) {
    uint64_t off = spans[2 * s], bytes = spans[2 * s + 1];
    if (!ce_range_ok(off, bytes, buf->bytes)) {
      digest_job_free(job);
      return ce_fail(CE_E_INVAL, "ce_buf_digest_submit: span %llu (%llu bytes at %llu) overruns the buffer (%llu bytes)",
                     (unsigned long long)s, (unsigned long long)bytes, (unsigned long long)off, (unsigned long long)buf->bytes);
    }
    if (ce_buf_on_host(buf)) job->spans[s].base = buf->host + off;
    else job->spans[s].dev_offset = off;
    job->spans[s].bytes = bytes;
  }
  if (!ce_buf_on_host(buf)) job->gpu = buf;
  return digest_submit(ctx, job, NULL, buf, "ce_buf_digest_submit", op_out);
}

int ce_digest_collect(ce_ctx_t *ctx, uint64_t op, double *times, uint64_t *digests, uint64_t len) {
  if (!ctx) return ce_fail(CE_E_INVAL, "ce_digest_collect: ctx is NULL");
  ce_op_t *o = ce_op_find(ctx, op);
  if (!o) return CE_E_INVAL;
  if (o->kind != OP_THREAD || o->job != digest_job)
    return ce_fail(CE_E_INVAL, "ce_digest_collect: op %llu is not a digest op", (unsigned long long)op);
  if (!atomic_load_explicit(&o->done, memory_order_acquire)) return CE_INPROGRESS;
  digest_job_t *job = o->job_arg;
  if (len < job->nspans || (!digests && job->nspans))
    return ce_fail(CE_E_INVAL, "ce_digest_collect: room for %llu digests, the op has %llu", (unsigned long long)len,
                   (unsigned long long)job->nspans);
  if (o->status == CE_OK && job->nspans) memcpy(digests, job->digests, job->nspans * sizeof *digests);
  return ce_op_poll(ctx, op, times, NULL);
}
