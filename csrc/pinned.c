/* Host regions: page-locked memory that H2D copies read from. A region is either allocated here
 * or a file mapped read-only and pinned in place (no copy: a checkpoint in /dev/shm is already in
 * memory). Pinning runs in parallel chunks: cuMemHostRegister of one large range is bound by one
 * thread's page walk. */
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define PIN_ALIGN (2ull << 20) /* chunk boundaries on 2 MiB: never two chunks in one page */
#define MADV_POPULATE_READ_ 22  /* linux/mman.h, 5.14+; named here so older headers build */

static int region_new(ce_ctx_t *ctx, uint32_t *id_out) {
  pthread_mutex_lock(&ctx->mu);
  if (!ctx->regions) ctx->regions = calloc(CE_MAX_REGIONS, sizeof *ctx->regions);
  if (!ctx->regions) {
    pthread_mutex_unlock(&ctx->mu);
    return ce_fail(CE_E_NOMEM, "out of host memory for the region table");
  }
  uint32_t id = 0;
  while (id < CE_MAX_REGIONS && ctx->regions[id].state != REGION_FREE) id++;
  if (id == CE_MAX_REGIONS) {
    pthread_mutex_unlock(&ctx->mu);
    return ce_fail(CE_E_NOMEM, "more than %d regions registered", CE_MAX_REGIONS);
  }
  memset(&ctx->regions[id], 0, sizeof ctx->regions[id]);
  ctx->regions[id].state = REGION_PENDING;
  if (id >= ctx->nregions) ctx->nregions = id + 1;
  pthread_mutex_unlock(&ctx->mu);
  *id_out = id;
  return CE_OK;
}

ce_region_t *ce_region_get(ce_ctx_t *ctx, uint32_t id) {
  if (id >= ctx->nregions || ctx->regions[id].state == REGION_FREE) {
    ce_fail(CE_E_INVAL, "region %u is not registered", id);
    return NULL;
  }
  ce_region_t *r = &ctx->regions[id];
  if (r->state == REGION_PENDING) {
    ce_fail(CE_E_STATE, "region %u (%s) is still being pinned", id, r->path[0] ? r->path : "allocated");
    return NULL;
  }
  if (r->state == REGION_FAILED) {
    ce_fail(CE_E_STATE, "region %u (%s) failed to pin", id, r->path[0] ? r->path : "allocated");
    return NULL;
  }
  return r;
}

/* ---- parallel pin / unpin ---- */

typedef struct {
  ce_ctx_t *ctx;
  uint8_t *base;
  uint64_t bytes;
  unsigned flags;
  int unpin;
  CUresult result;
} pin_part_t;

static void *pin_part_main(void *arg) {
  pin_part_t *p = arg;
  p->result = cu.cuCtxSetCurrent(p->ctx->dev[0].cuctx);
  if (p->result != CUDA_SUCCESS) return NULL;
  /* Fault the chunk's page tables in on this thread first: cuMemHostRegister serializes inside
   * the driver, page faults do not. Measured on an H100 host, 15 GiB in 4 files over 16 threads:
   * 1.14 s without, 0.83 s with. Kernels before 5.14 lack it; the register then faults them. */
  if (!p->unpin) madvise(p->base, p->bytes, MADV_POPULATE_READ_);
  p->result = p->unpin ? cu.cuMemHostUnregister(p->base) : cu.cuMemHostRegister(p->base, p->bytes, p->flags);
  return NULL;
}

static uint64_t chunk_size(uint64_t bytes, int threads) {
  if (threads < 1) threads = 1;
  uint64_t c = (bytes + (uint64_t)threads - 1) / (uint64_t)threads;
  c = (c + PIN_ALIGN - 1) / PIN_ALIGN * PIN_ALIGN;
  return c ? c : PIN_ALIGN;
}

/* Pins (or unpins) [base, base+bytes) as chunks of chunk_bytes, one thread each. On a failed pin
 * the pinned chunks are unpinned again and op gets the error. */
static int pin_chunks(ce_op_t *op, ce_ctx_t *ctx, uint8_t *base, uint64_t bytes, uint64_t chunk_bytes, unsigned flags,
                      int unpin) {
  uint32_t n = (uint32_t)((bytes + chunk_bytes - 1) / chunk_bytes);
  if (n == 0) return CE_OK;
  pin_part_t *parts = calloc(n, sizeof *parts);
  pthread_t *threads = calloc(n, sizeof *threads);
  if (!parts || !threads) {
    free(parts);
    free(threads);
    return op ? ce_op_fail(op, CE_E_NOMEM, "out of host memory") : CE_E_NOMEM;
  }
  for (uint32_t i = 0; i < n; i++) {
    uint64_t off = (uint64_t)i * chunk_bytes;
    parts[i] = (pin_part_t){ctx, base + off, bytes - off < chunk_bytes ? bytes - off : chunk_bytes, flags, unpin, 0};
    if (pthread_create(&threads[i], NULL, pin_part_main, &parts[i]) != 0) {
      threads[i] = 0;
      pin_part_main(&parts[i]);
    }
  }
  for (uint32_t i = 0; i < n; i++)
    if (threads[i]) pthread_join(threads[i], NULL);
  int rc = CE_OK;
  for (uint32_t i = 0; i < n; i++) {
    if (parts[i].result == CUDA_SUCCESS) continue;
    if (rc == CE_OK && op) {
      char why[512];
      ce_cuda_describe(parts[i].result, why, sizeof why);
      rc = ce_op_fail(op, parts[i].result == CUDA_ERROR_OUT_OF_MEMORY ? CE_E_NOMEM : CE_E_CUDA,
                      "%s(%p, %llu): %s", unpin ? "cuMemHostUnregister" : "cuMemHostRegister", (void *)parts[i].base,
                      (unsigned long long)parts[i].bytes, why);
    } else if (rc == CE_OK) {
      rc = CE_E_CUDA;
    }
  }
  if (rc != CE_OK && !unpin)
    for (uint32_t i = 0; i < n; i++)
      if (parts[i].result == CUDA_SUCCESS) {
        cu.cuCtxSetCurrent(ctx->dev[0].cuctx);
        cu.cuMemHostUnregister(parts[i].base);
      }
  free(parts);
  free(threads);
  return rc;
}

/* ---- register ---- */

typedef struct {
  uint32_t id;
  unsigned flags;
  int threads;
  int pin;
} pin_job_t;

static int pin_job(ce_op_t *op) {
  pin_job_t *job = op->job_arg;
  ce_ctx_t *ctx = op->ctx;
  ce_region_t *r = &ctx->regions[job->id];
  op->value = job->id;
  if (!job->pin && r->bytes > 0 && r->kind != REGION_ALLOC_ANON) {
    /* Without pinning, fault the page tables in here, off the caller's thread: the copies would
     * otherwise take a fault per 4 KiB page (a full read for a file on disk). */
    if (madvise(r->base, r->bytes, MADV_POPULATE_READ_) != 0) {
      /* kernels before 5.14: touch a byte per page */
      volatile const uint8_t *p = r->base;
      long page = sysconf(_SC_PAGESIZE);
      uint8_t sink = 0;
      for (uint64_t o = 0; o < r->bytes; o += (uint64_t)page) sink ^= p[o];
      (void)sink;
    }
  }
  if (job->pin && r->bytes > 0) {
    uint64_t chunk = chunk_size(r->bytes, job->threads);
    int rc = pin_chunks(op, ctx, r->base, r->bytes, chunk, job->flags, 0);
    if (rc != CE_OK) {
      r->state = REGION_FAILED;
      return rc;
    }
    r->chunk_bytes = chunk;
    r->nchunks = (uint32_t)((r->bytes + chunk - 1) / chunk);
    r->pinned_bytes = r->bytes;
  }
  r->state = REGION_READY;
  return CE_OK;
}

static int submit_pin(ce_ctx_t *ctx, uint32_t id, int pin, unsigned flags, int threads, uint64_t *op_out) {
  pin_job_t *job = malloc(sizeof *job);
  uint64_t opid;
  ce_op_t *op = ce_op_new_thread(ctx, job, &opid);
  if (!op) return CE_E_NOMEM;
  *job = (pin_job_t){id, flags, threads, pin};
  return ce_op_run(op, pin_job, opid, op_out);
}

static void region_abandon(ce_ctx_t *ctx, uint32_t id) {
  pthread_mutex_lock(&ctx->mu);
  ctx->regions[id].state = REGION_FREE;
  pthread_mutex_unlock(&ctx->mu);
}

int ce_region_alloc(ce_ctx_t *ctx, uint64_t bytes, uint32_t *region_out, uint64_t *op_out) {
  if (!ctx || !region_out || !op_out) return ce_fail(CE_E_INVAL, "ce_region_alloc: NULL argument");
  if (bytes == 0) return ce_fail(CE_E_INVAL, "ce_region_alloc: 0 bytes");
  uint32_t id;
  int rc = region_new(ctx, &id);
  if (rc) return rc;
  ce_region_t *r = &ctx->regions[id];
  void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) {
    region_abandon(ctx, id);
    return ce_fail(CE_E_NOMEM, "mmap of %llu bytes of host memory: %s", (unsigned long long)bytes, strerror(errno));
  }
  madvise(p, bytes, MADV_HUGEPAGE);
  r->base = p;
  r->bytes = bytes;
  r->kind = REGION_ALLOC_ANON;
  rc = submit_pin(ctx, id, ctx->backend == CE_BACKEND_CUDA, CU_MEMHOSTREGISTER_PORTABLE, 8, op_out);
  if (rc) {
    munmap(p, bytes);
    region_abandon(ctx, id);
    return rc;
  }
  *region_out = id;
  return CE_OK;
}

int ce_region_map_file(ce_ctx_t *ctx, const char *path, uint32_t flags, int threads, uint64_t *bytes_out,
                       uint32_t *region_out, uint64_t *op_out) {
  if (!ctx || !path || !region_out || !op_out) return ce_fail(CE_E_INVAL, "ce_region_map_file: NULL argument");
  int writable = (flags & CE_REGION_WRITABLE) != 0;
  int fd = open(path, (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC);
  if (fd < 0) return ce_fail(CE_E_IO, "open(%s): %s", path, strerror(errno));
  struct stat st;
  if (fstat(fd, &st) != 0) {
    int e = errno;
    close(fd);
    return ce_fail(CE_E_IO, "fstat(%s): %s", path, strerror(e));
  }
  uint64_t bytes = (uint64_t)st.st_size;
  void *p = NULL;
  if (bytes > 0) {
    /* Shared, and read-only unless asked (ce's own files, such as a pool's slots): a user's file
     * can never be written through this mapping, and pinning it copies nothing (a private
     * writable mapping would copy every page on pin). The pages are faulted in by the op
     * (pin_job), never here on the caller's thread. */
    p = mmap(NULL, bytes, writable ? PROT_READ | PROT_WRITE : PROT_READ, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
      int e = errno;
      close(fd);
      return ce_fail(CE_E_IO, "mmap(%s, %llu bytes): %s", path, (unsigned long long)bytes, strerror(e));
    }
  }
  close(fd);
  uint32_t id;
  int rc = region_new(ctx, &id);
  if (rc) {
    if (p) munmap(p, bytes);
    return rc;
  }
  ce_region_t *r = &ctx->regions[id];
  r->base = p;
  r->bytes = bytes;
  r->kind = writable ? REGION_MAP_FILE_RW : REGION_MAP_FILE;
  snprintf(r->path, sizeof r->path, "%s", path);
  int pin = (flags & CE_REGION_PIN) && ctx->backend == CE_BACKEND_CUDA;
  rc = submit_pin(ctx, id, pin, CU_MEMHOSTREGISTER_PORTABLE | (writable ? 0 : CU_MEMHOSTREGISTER_READ_ONLY), threads, op_out);
  if (rc) {
    if (p) munmap(p, bytes);
    region_abandon(ctx, id);
    return rc;
  }
  if (bytes_out) *bytes_out = bytes;
  *region_out = id;
  return CE_OK;
}

/* ---- read a file into a region ---- */

typedef struct {
  uint32_t id;
  uint64_t region_offset;
  char path[512];
  uint64_t file_offset;
  uint64_t bytes;
  int threads;
} read_job_t;

typedef struct {
  int fd;
  uint8_t *dst;
  uint64_t file_offset;
  uint64_t bytes;
  int err;
} read_part_t;

static void *read_part_main(void *arg) {
  read_part_t *p = arg;
  uint64_t done = 0;
  while (done < p->bytes) {
    ssize_t n = pread(p->fd, p->dst + done, p->bytes - done, (off_t)(p->file_offset + done));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      p->err = n < 0 ? errno : EIO;
      return NULL;
    }
    done += (uint64_t)n;
  }
  return NULL;
}

static int read_job(ce_op_t *op) {
  read_job_t *job = op->job_arg;
  ce_region_t *r = &op->ctx->regions[job->id];
  int fd = open(job->path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return ce_op_fail(op, CE_E_IO, "open(%s): %s", job->path, strerror(errno));
  int n = job->threads < 1 ? 1 : job->threads > 64 ? 64 : job->threads;
  uint64_t part = (job->bytes + (uint64_t)n - 1) / (uint64_t)n;
  read_part_t parts[64];
  pthread_t threads[64];
  int started = 0;
  for (int i = 0; i < n; i++) {
    uint64_t off = (uint64_t)i * part;
    if (off >= job->bytes) break;
    parts[i] = (read_part_t){fd, r->base + job->region_offset + off, job->file_offset + off,
                             job->bytes - off < part ? job->bytes - off : part, 0};
    if (pthread_create(&threads[i], NULL, read_part_main, &parts[i]) != 0) read_part_main(&parts[i]), threads[i] = 0;
    started++;
  }
  int rc = CE_OK;
  for (int i = 0; i < started; i++) {
    if (threads[i]) pthread_join(threads[i], NULL);
    if (parts[i].err && rc == CE_OK)
      rc = ce_op_fail(op, CE_E_IO, "pread(%s, %llu bytes at %llu): %s", job->path, (unsigned long long)parts[i].bytes,
                      (unsigned long long)parts[i].file_offset, parts[i].err == EIO ? "file shorter than expected" : strerror(parts[i].err));
  }
  close(fd);
  return rc;
}

int ce_region_read_file(ce_ctx_t *ctx, uint32_t region, uint64_t region_offset, const char *path, uint64_t file_offset,
                        uint64_t bytes, int threads, uint64_t *op_out) {
  if (!ctx || !path || !op_out) return ce_fail(CE_E_INVAL, "ce_region_read_file: NULL argument");
  ce_region_t *r = ce_region_get(ctx, region);
  if (!r) return CE_E_INVAL;
  if (r->kind == REGION_MAP_FILE) return ce_fail(CE_E_INVAL, "region %u maps %s read-only", region, r->path);
  if (region_offset > r->bytes || bytes > r->bytes - region_offset)
    return ce_fail(CE_E_INVAL, "reading %llu bytes at %llu overruns region %u of %llu bytes", (unsigned long long)bytes,
                   (unsigned long long)region_offset, region, (unsigned long long)r->bytes);
  read_job_t *job = calloc(1, sizeof *job);
  uint64_t opid;
  ce_op_t *op = ce_op_new_thread(ctx, job, &opid);
  if (!op) return CE_E_NOMEM;
  job->id = region;
  job->region_offset = region_offset;
  snprintf(job->path, sizeof job->path, "%s", path);
  job->file_offset = file_offset;
  job->bytes = bytes;
  job->threads = threads;
  ce_op_hold_region(op, region);
  return ce_op_run(op, read_job, opid, op_out);
}

int ce_region_write(ce_ctx_t *ctx, uint32_t region, uint64_t region_offset, const void *src, uint64_t bytes) {
  if (!ctx || (!src && bytes)) return ce_fail(CE_E_INVAL, "ce_region_write: NULL argument");
  ce_region_t *r = ce_region_get(ctx, region);
  if (!r) return CE_E_INVAL;
  if (r->kind == REGION_MAP_FILE) return ce_fail(CE_E_INVAL, "region %u maps %s read-only", region, r->path);
  if (region_offset > r->bytes || bytes > r->bytes - region_offset)
    return ce_fail(CE_E_INVAL, "writing %llu bytes at %llu overruns region %u of %llu bytes", (unsigned long long)bytes,
                   (unsigned long long)region_offset, region, (unsigned long long)r->bytes);
  memcpy(r->base + region_offset, src, bytes);
  return CE_OK;
}

/* ---- release ---- */

typedef struct {
  ce_region_t copy;
} release_job_t;

static void region_unmap(ce_ctx_t *ctx, ce_region_t *r, ce_op_t *op) {
  if (r->pinned_bytes) pin_chunks(op, ctx, r->base, r->bytes, r->chunk_bytes, 0, 1);
  if (r->base) munmap(r->base, r->bytes);
}

static int release_job(ce_op_t *op) {
  release_job_t *job = op->job_arg;
  region_unmap(op->ctx, &job->copy, op);
  return op->err[0] ? CE_E_CUDA : CE_OK;
}

int ce_region_release(ce_ctx_t *ctx, uint32_t region, uint64_t *op_out) {
  if (!ctx || !op_out) return ce_fail(CE_E_INVAL, "ce_region_release: NULL argument");
  pthread_mutex_lock(&ctx->mu);
  ce_region_t *r = region < ctx->nregions ? &ctx->regions[region] : NULL;
  int rc = CE_OK;
  if (!r || r->state == REGION_FREE)
    rc = ce_fail(CE_E_INVAL, "region %u is not registered", region);
  else if (r->state == REGION_PENDING)
    rc = ce_fail(CE_E_BUSY, "region %u (%s) is still being pinned", region, r->path);
  else if (atomic_load(&r->inflight) > 0)
    rc = ce_fail(CE_E_BUSY, "region %u (%s) has %d ops in flight", region, r->path, atomic_load(&r->inflight));
  else if (atomic_load(&r->registered) > 0)
    rc = ce_fail(CE_E_BUSY, "region %u (%s) is registered with a transfer endpoint: peers may read it (ce_xfer_deregister first)",
                 region, r->path);
  pthread_mutex_unlock(&ctx->mu);
  if (rc) return rc;
  release_job_t *job = malloc(sizeof *job);
  uint64_t opid;
  ce_op_t *op = ce_op_new_thread(ctx, job, &opid);
  if (!op) return CE_E_NOMEM;
  /* The slot is free at once (its id is invalid from here); the thread works on a copy. */
  ce_region_t copy = *r;
  job->copy = copy;
  region_abandon(ctx, region);
  rc = ce_op_run(op, release_job, opid, op_out);
  if (rc) region_unmap(ctx, &copy, NULL); /* no thread: unpin here (the job went with the op) */
  return rc;
}

void ce_regions_free(ce_ctx_t *ctx) {
  for (uint32_t i = 0; i < ctx->nregions; i++) {
    ce_region_t *r = &ctx->regions[i];
    if (r->state == REGION_FREE) continue;
    if (ctx->backend == CE_BACKEND_CUDA) cu.cuCtxSetCurrent(ctx->dev[0].cuctx);
    region_unmap(ctx, r, NULL);
    r->state = REGION_FREE;
  }
  free(ctx->regions);
  ctx->regions = NULL;
  ctx->nregions = 0;
}
