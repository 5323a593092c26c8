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
#include "digest.h"

#include <stdlib.h>

#define DIGEST_K 0x9E3779B97F4A7C15ull
/* Words per inner block: the block's sums stay exact in int64 (|c| < (M^2/2) * 2^31, M = 8192). */
#define BLOCK_WORDS 65536u
#define LANES 8
/* A thread takes the spans in pieces of this many words (16 MiB): enough to amortize, small
 * enough that one large tensor spreads over every thread. */
#define PIECE_WORDS (4ull << 20)


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

void ce_digest_pieces(digest_job_t *job, uint64_t begin, uint64_t end) {
  atomic_store(&job->next, begin);
  job->end = end;
  ce_fan_out(job->threads, end - begin, digest_worker, job);
}

static int digest_job(ce_op_t *op) {
  digest_job_t *job = op->job_arg;
  ce_op_thread_wait(op->ctx, job->after, NULL, 0);
  op->t0_ms = ce_now_ms(); /* the op's time is its digesting, not its wait for `after` */
  if (job->gpu) {
    int rc = ce_digest_gpu(op, job);
    if (rc != CE_OK) return rc;
  } else {
    ce_digest_pieces(job, 0, job->npieces);
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
