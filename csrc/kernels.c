/* libce's two GPU kernels: applying delta patches into a worker's parameters, and the sums of a
 * tensor digest (docs/digest.md) where the tensor lives. libce is built with a plain C compiler and
 * no CUDA toolkit, so they are PTX, written by hand, that the driver compiles for the device on first
 * use (cuModuleLoadData JIT; PTX 6.0 for sm_60 runs on every GPU since Pascal). Each launch is on the
 * caller's stream; the caller synchronizes. */
#include "internal.h"

static const char PTX[] =
    ".version 6.0\n"
    ".target sm_60\n"
    ".address_size 64\n"
    "\n"
    "// Patch apply: entry k of a patch writes its es-byte value at element pos[k] of dst; a position past\n"
    "// the tensor is not written, and bad records (entry + 1) of one such entry.\n"
    ".visible .entry ce_scatter(.param .u64 p_dst, .param .u64 p_pos, .param .u64 p_val, .param .u64 p_count,\n"
    "                           .param .u64 p_elems, .param .u32 p_es, .param .u64 p_bad)\n"
    "{\n"
    "  .reg .pred %p<4>;\n"
    "  .reg .b16 %h<2>;\n"
    "  .reg .b32 %r<8>;\n"
    "  .reg .b64 %rd<20>;\n"
    "  ld.param.u64 %rd1, [p_dst];\n"
    "  ld.param.u64 %rd2, [p_pos];\n"
    "  ld.param.u64 %rd3, [p_val];\n"
    "  ld.param.u64 %rd4, [p_count];\n"
    "  ld.param.u64 %rd5, [p_elems];\n"
    "  ld.param.u32 %r1, [p_es];\n"
    "  ld.param.u64 %rd16, [p_bad];\n"
    "  mov.u32 %r2, %ctaid.x;\n"
    "  mov.u32 %r3, %ntid.x;\n"
    "  mov.u32 %r4, %tid.x;\n"
    "  mov.u32 %r5, %nctaid.x;\n"
    "  mul.wide.u32 %rd6, %r2, %r3;\n"
    "  cvt.u64.u32 %rd7, %r4;\n"
    "  add.u64 %rd6, %rd6, %rd7;\n"
    "  mul.wide.u32 %rd8, %r5, %r3;\n"
    "  cvt.u64.u32 %rd15, %r1;\n"
    "LOOP:\n"
    "  setp.ge.u64 %p1, %rd6, %rd4;\n"
    "  @%p1 bra DONE;\n"
    "  shl.b64 %rd9, %rd6, 2;\n"
    "  add.u64 %rd9, %rd2, %rd9;\n"
    "  ld.global.u32 %r6, [%rd9];\n"
    "  cvt.u64.u32 %rd10, %r6;\n"
    "  setp.lt.u64 %p2, %rd10, %rd5;\n"
    "  @%p2 bra INRANGE;\n"
    "  add.u64 %rd17, %rd6, 1;\n"
    "  atom.global.max.u64 %rd18, [%rd16], %rd17;\n"
    "  bra NEXT;\n"
    "INRANGE:\n"
    "  mul.lo.u64 %rd11, %rd10, %rd15;\n"
    "  add.u64 %rd11, %rd1, %rd11;\n"
    "  mul.lo.u64 %rd12, %rd6, %rd15;\n"
    "  add.u64 %rd12, %rd3, %rd12;\n"
    "  setp.eq.u32 %p3, %r1, 2;\n"
    "  @%p3 bra E2;\n"
    "  setp.eq.u32 %p3, %r1, 4;\n"
    "  @%p3 bra E4;\n"
    "  setp.eq.u32 %p3, %r1, 8;\n"
    "  @%p3 bra E8;\n"
    "  ld.global.u8 %h1, [%rd12];\n"
    "  st.global.u8 [%rd11], %h1;\n"
    "  bra NEXT;\n"
    "E2:\n"
    "  ld.global.u16 %h1, [%rd12];\n"
    "  st.global.u16 [%rd11], %h1;\n"
    "  bra NEXT;\n"
    "E4:\n"
    "  ld.global.u32 %r7, [%rd12];\n"
    "  st.global.u32 [%rd11], %r7;\n"
    "  bra NEXT;\n"
    "E8:\n"
    "  ld.global.u64 %rd13, [%rd12];\n"
    "  st.global.u64 [%rd11], %rd13;\n"
    "NEXT:\n"
    "  add.u64 %rd6, %rd6, %rd8;\n"
    "  bra LOOP;\n"
    "DONE:\n"
    "  ret;\n"
    "}\n"
    "\n"
    "// Digest partial sums (docs/digest.md): over the whole int32 words w_i of one tensor (4-aligned),\n"
    "// block b writes sum of w_i * (2i + 1) mod 2^64 over its threads' words to out[b]. 256 threads a\n"
    "// block. The words from the first 16-aligned one are read four at a time; the at most 3 before it\n"
    "// and 3 after the last whole four are summed by the grid's first threads.\n"
    ".visible .entry ce_digest(.param .u64 p_base, .param .u64 p_words, .param .u64 p_out)\n"
    "{\n"
    "  .shared .align 8 .b64 sh[256];\n"
    "  .reg .pred %p<6>;\n"
    "  .reg .b32 %r<16>;\n"
    "  .reg .b64 %rd<40>;\n"
    "  ld.param.u64 %rd1, [p_base];\n"
    "  ld.param.u64 %rd2, [p_words];\n"
    "  ld.param.u64 %rd3, [p_out];\n"
    "  mov.u32 %r1, %ctaid.x;\n"
    "  mov.u32 %r2, %ntid.x;\n"
    "  mov.u32 %r3, %tid.x;\n"
    "  mov.u32 %r4, %nctaid.x;\n"
    "  mul.wide.u32 %rd4, %r1, %r2;\n"
    "  cvt.u64.u32 %rd5, %r3;\n"
    "  add.u64 %rd4, %rd4, %rd5;\n"
    "  mul.wide.u32 %rd6, %r4, %r2;\n"
    "  mov.u64 %rd7, 0;\n"
    "  // h: words before the first 16-aligned one (at most words); nv: whole fours after it; vend: the word after them\n"
    "  and.b64 %rd20, %rd1, 15;\n"
    "  sub.u64 %rd20, 16, %rd20;\n"
    "  and.b64 %rd20, %rd20, 15;\n"
    "  shr.u64 %rd20, %rd20, 2;\n"
    "  min.u64 %rd20, %rd20, %rd2;\n"
    "  sub.u64 %rd21, %rd2, %rd20;\n"
    "  shr.u64 %rd21, %rd21, 2;\n"
    "  shl.b64 %rd22, %rd21, 2;\n"
    "  add.u64 %rd22, %rd22, %rd20;\n"
    "  // the odd words: thread g < h takes word g; h <= g < h + (words - vend) takes word vend + g - h\n"
    "  sub.u64 %rd23, %rd2, %rd22;\n"
    "  add.u64 %rd23, %rd23, %rd20;\n"
    "  setp.ge.u64 %p4, %rd4, %rd23;\n"
    "  @%p4 bra VECTORS;\n"
    "  mov.u64 %rd24, %rd4;\n"
    "  setp.lt.u64 %p5, %rd4, %rd20;\n"
    "  @%p5 bra ODD;\n"
    "  sub.u64 %rd24, %rd4, %rd20;\n"
    "  add.u64 %rd24, %rd24, %rd22;\n"
    "ODD:\n"
    "  shl.b64 %rd25, %rd24, 2;\n"
    "  add.u64 %rd25, %rd1, %rd25;\n"
    "  ld.global.s32 %rd26, [%rd25];\n"
    "  shl.b64 %rd27, %rd24, 1;\n"
    "  add.u64 %rd27, %rd27, 1;\n"
    "  mad.lo.u64 %rd7, %rd26, %rd27, %rd7;\n"
    "VECTORS:\n"
    "  // v = g, g + stride, ...: words h + 4v .. h + 4v + 3\n"
    "  shl.b64 %rd28, %rd20, 2;\n"
    "  add.u64 %rd28, %rd1, %rd28;\n"
    "WLOOP:\n"
    "  setp.ge.u64 %p1, %rd4, %rd21;\n"
    "  @%p1 bra WDONE;\n"
    "  shl.b64 %rd8, %rd4, 4;\n"
    "  add.u64 %rd8, %rd28, %rd8;\n"
    "  ld.global.v4.s32 {%r6, %r7, %r8, %r9}, [%rd8];\n"
    "  shl.b64 %rd10, %rd4, 2;\n"
    "  add.u64 %rd10, %rd10, %rd20;\n"
    "  shl.b64 %rd10, %rd10, 1;\n"
    "  add.u64 %rd10, %rd10, 1;\n"
    "  cvt.s64.s32 %rd9, %r6;\n"
    "  mad.lo.u64 %rd7, %rd9, %rd10, %rd7;\n"
    "  add.u64 %rd10, %rd10, 2;\n"
    "  cvt.s64.s32 %rd9, %r7;\n"
    "  mad.lo.u64 %rd7, %rd9, %rd10, %rd7;\n"
    "  add.u64 %rd10, %rd10, 2;\n"
    "  cvt.s64.s32 %rd9, %r8;\n"
    "  mad.lo.u64 %rd7, %rd9, %rd10, %rd7;\n"
    "  add.u64 %rd10, %rd10, 2;\n"
    "  cvt.s64.s32 %rd9, %r9;\n"
    "  mad.lo.u64 %rd7, %rd9, %rd10, %rd7;\n"
    "  add.u64 %rd4, %rd4, %rd6;\n"
    "  bra WLOOP;\n"
    "WDONE:\n"
    "  mov.u64 %rd11, sh;\n"
    "  mul.wide.u32 %rd12, %r3, 8;\n"
    "  add.u64 %rd12, %rd11, %rd12;\n"
    "  st.shared.u64 [%rd12], %rd7;\n"
    "  bar.sync 0;\n"
    "  mov.u32 %r5, 128;\n"
    "RLOOP:\n"
    "  setp.ge.u32 %p2, %r3, %r5;\n"
    "  @%p2 bra RSKIP;\n"
    "  mul.wide.u32 %rd13, %r5, 8;\n"
    "  add.u64 %rd13, %rd12, %rd13;\n"
    "  ld.shared.u64 %rd14, [%rd13];\n"
    "  ld.shared.u64 %rd15, [%rd12];\n"
    "  add.u64 %rd15, %rd15, %rd14;\n"
    "  st.shared.u64 [%rd12], %rd15;\n"
    "RSKIP:\n"
    "  bar.sync 0;\n"
    "  shr.u32 %r5, %r5, 1;\n"
    "  setp.ne.u32 %p3, %r5, 0;\n"
    "  @%p3 bra RLOOP;\n"
    "  setp.ne.u32 %p2, %r3, 0;\n"
    "  @%p2 bra END;\n"
    "  ld.shared.u64 %rd16, [%rd11];\n"
    "  mul.wide.u32 %rd17, %r1, 8;\n"
    "  add.u64 %rd17, %rd3, %rd17;\n"
    "  st.global.u64 [%rd17], %rd16;\n"
    "END:\n"
    "  ret;\n"
    "}\n";

int ce_kernels_load(ce_ctx_t *ctx, int d) {
  ce_dev_t *dv = &ctx->dev[d];
  pthread_mutex_lock(&ctx->mu);
  int status = dv->kernels_status;
  CUresult why = dv->kernels_error;
  pthread_mutex_unlock(&ctx->mu);
  if (status == 1) return CE_OK;
  if (status == -1) return ce_cuda_fail(why, "compiling libce's PTX kernels for GPU %d", dv->ordinal);
  /* Compiled outside the lock (the JIT takes a while); a refusal is kept, so it is asked once. */
  CUresult r = cu.cuCtxSetCurrent(dv->cuctx);
  if (r != CUDA_SUCCESS) return ce_cuda_fail(r, "cuCtxSetCurrent on GPU %d", dv->ordinal);
  CUmodule mod = NULL;
  CUfunction scatter = NULL, digest = NULL;
  r = cu.cuModuleLoadData(&mod, PTX);
  if (r == CUDA_SUCCESS) r = cu.cuModuleGetFunction(&scatter, mod, "ce_scatter");
  if (r == CUDA_SUCCESS) r = cu.cuModuleGetFunction(&digest, mod, "ce_digest");
  pthread_mutex_lock(&ctx->mu);
  int won = dv->kernels_status == 0;
  if (won && r == CUDA_SUCCESS) dv->kernels = mod, dv->scatter = scatter, dv->digest = digest, dv->kernels_status = 1;
  /* Out of memory may pass; anything else from the JIT says this driver cannot build them. */
  if (won && r != CUDA_SUCCESS && r != CUDA_ERROR_OUT_OF_MEMORY) dv->kernels_status = -1, dv->kernels_error = r;
  status = dv->kernels_status;
  why = dv->kernels_error;
  pthread_mutex_unlock(&ctx->mu);
  if (mod && !(won && r == CUDA_SUCCESS)) cu.cuModuleUnload(mod); /* failed, or another thread's was kept */
  if (status == 1) return CE_OK; /* ours, or another thread's */
  return ce_cuda_fail(status == -1 ? why : r, "compiling libce's PTX kernels for GPU %d", dv->ordinal);
}

/* A grid of at most `most` blocks covering n items, a few per thread (the kernels loop by grid stride). */
static unsigned grid_for(uint64_t n, uint64_t per_thread, unsigned most) {
  uint64_t blocks = (n + CE_KERNEL_THREADS * per_thread - 1) / (CE_KERNEL_THREADS * per_thread);
  return blocks < 1 ? 1 : blocks > most ? most : (unsigned)blocks;
}

CUresult ce_kernel_scatter(const ce_dev_t *dv, CUstream s, CUdeviceptr dst, CUdeviceptr pos, CUdeviceptr val, uint64_t count,
                           uint64_t elems, uint32_t es, CUdeviceptr bad) {
  if (!count) return CUDA_SUCCESS;
  void *args[] = {&dst, &pos, &val, &count, &elems, &es, &bad};
  return cu.cuLaunchKernel(dv->scatter, grid_for(count, 4, 4096), 1, 1, CE_KERNEL_THREADS, 1, 1, 0, s, args, NULL);
}

/* Enough blocks to fill an H200 several times over for a large tensor; few partial sums to read back. */
#define DIGEST_MAX_BLOCKS 1024u

uint32_t ce_kernel_digest_blocks(uint64_t words) { return words ? grid_for(words, 16, DIGEST_MAX_BLOCKS) : 0; }

CUresult ce_kernel_digest(const ce_dev_t *dv, CUstream s, CUdeviceptr base, uint64_t words, CUdeviceptr out) {
  unsigned blocks = ce_kernel_digest_blocks(words);
  if (!blocks) return CUDA_SUCCESS;
  void *args[] = {&base, &words, &out};
  return cu.cuLaunchKernel(dv->digest, blocks, 1, 1, CE_KERNEL_THREADS, 1, 1, 0, s, args, NULL);
}

int ce_ctx_kernels(ce_ctx_t *ctx, int dev) {
  if (!ctx) return ce_fail(CE_E_INVAL, "ce_ctx_kernels: ctx is NULL");
  if (dev < 0 || dev >= ctx->ndev) return ce_fail(CE_E_INVAL, "ce_ctx_kernels: device %d of %d", dev, ctx->ndev);
  if (ctx->backend != CE_BACKEND_CUDA) return CE_OK;
  return ce_kernels_load(ctx, dev);
}
