/* Device buffers: the IPC buffer each inference worker maps (its slots), staging areas, and
 * buffers opened from another process. On the CPU backend a "device" buffer is a shared-memory
 * file that the worker maps by path. */
#include "internal.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

static _Atomic uint32_t shm_counter;

/* Shared-memory files outlive a killed process, so each one is named for its process (ce-<pid>-…)
 * and flock'ed by it for as long as it lives; a file whose process is gone and whose lock nobody
 * holds is a leftover, and the next ce removes it. Unlinking right after the worker opens it was
 * the other choice, but a worker maps the file again at every update's `open` (and after its own
 * restart), so the name must stay. The lock covers what the pid alone cannot: a pid reused by
 * another process, and a ce in another pid namespace sharing the directory. */
static int shm_leftover(const char *dir, const char *name) {
  int pid = 0, n = 0;
  unsigned k;
  int dev;
  if (sscanf(name, "ce-%d-%u-dev%d%n", &pid, &k, &dev, &n) != 3 || name[n] != 0 || pid <= 0) return 0;
  if (pid == (int)getpid() || kill(pid, 0) == 0 || errno != ESRCH) return 0;
  char path[1024];
  snprintf(path, sizeof path, "%s/%s", dir, name);
  int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0) return 0;
  int free_ = flock(fd, LOCK_EX | LOCK_NB) == 0;
  if (free_) free_ = unlink(path) == 0;
  close(fd);
  return free_;
}

int ce_shm_reclaim(const char *dir, uint64_t *removed_out) {
  if (!dir || !*dir) return ce_fail(CE_E_INVAL, "ce_shm_reclaim: no directory");
  DIR *d = opendir(dir);
  if (!d) return ce_fail(CE_E_IO, "opendir(%s): %s", dir, strerror(errno));
  uint64_t removed = 0;
  struct dirent *e;
  while ((e = readdir(d)))
    if (strncmp(e->d_name, "ce-", 3) == 0) removed += (uint64_t)shm_leftover(dir, e->d_name);
  closedir(d);
  if (removed_out) *removed_out = removed;
  return CE_OK;
}

/* Once per directory per process, before its first buffer there. */
static void shm_reclaim_once(const char *dir) {
  static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
  static char done[8][512];
  static int ndone;
  pthread_mutex_lock(&mu);
  int seen = 0;
  for (int i = 0; i < ndone && !seen; i++) seen = strcmp(done[i], dir) == 0;
  if (!seen && ndone < 8) snprintf(done[ndone++], sizeof done[0], "%s", dir);
  pthread_mutex_unlock(&mu);
  if (!seen) ce_shm_reclaim(dir, NULL);
}

static void buf_link(ce_ctx_t *ctx, ce_buf_t *b) {
  pthread_mutex_lock(&ctx->mu);
  b->next = ctx->bufs;
  ctx->bufs = b;
  pthread_mutex_unlock(&ctx->mu);
}

static void buf_unlink(ce_ctx_t *ctx, ce_buf_t *b) {
  pthread_mutex_lock(&ctx->mu);
  for (ce_buf_t **p = &ctx->bufs; *p; p = &(*p)->next)
    if (*p == b) {
      *p = b->next;
      break;
    }
  pthread_mutex_unlock(&ctx->mu);
}

static int check_dev(ce_ctx_t *ctx, int dev) {
  if (dev < 0 || dev >= ctx->ndev) return ce_fail(CE_E_INVAL, "device index %d outside 0..%d", dev, ctx->ndev - 1);
  return CE_OK;
}

int ce_buf_alloc(ce_ctx_t *ctx, int dev, uint64_t bytes, int ipc, const char *shm_dir, ce_buf_t **buf_out) {
  if (!ctx || !buf_out) return ce_fail(CE_E_INVAL, "ce_buf_alloc: NULL argument");
  int rc = check_dev(ctx, dev);
  if (rc) return rc;
  if (bytes == 0) return ce_fail(CE_E_INVAL, "ce_buf_alloc: 0 bytes");
  ce_buf_t *b = calloc(1, sizeof *b);
  if (!b) return ce_fail(CE_E_NOMEM, "out of host memory");
  b->ctx = ctx;
  b->dev = dev;
  b->bytes = bytes;
  if (ctx->backend == CE_BACKEND_CUDA) {
    if ((rc = ce_dev_enter(ctx, dev))) goto fail;
    CUresult r = cu.cuMemAlloc(&b->dptr, bytes);
    if (r != CUDA_SUCCESS) {
      rc = ce_cuda_fail(r, "cuMemAlloc(%llu bytes) on GPU %d", (unsigned long long)bytes, ctx->dev[dev].ordinal);
      goto fail;
    }
    b->kind = BUF_DEVICE;
  } else if (ipc) {
    const char *dir = shm_dir && *shm_dir ? shm_dir : "/dev/shm";
    shm_reclaim_once(dir);
    snprintf(b->path, sizeof b->path, "%s/ce-%d-%u-dev%d", dir, (int)getpid(), atomic_fetch_add(&shm_counter, 1), dev);
    int fd = open(b->path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) {
      rc = ce_fail(CE_E_IO, "creating %s: %s", b->path, strerror(errno));
      goto fail;
    }
    flock(fd, LOCK_SH); /* held by the open descriptor until the buffer is freed (or the process dies) */
    /* Allocated now, not sparse: a shared-memory file system that runs out later would kill
     * the process with SIGBUS in the middle of a copy instead of failing here. */
    int e = posix_fallocate(fd, 0, (off_t)bytes);
    if (e != 0) {
      rc = ce_fail(CE_E_NOMEM, "allocating %llu bytes for %s: %s", (unsigned long long)bytes, b->path, strerror(e));
      close(fd);
      unlink(b->path);
      goto fail;
    }
    /* Populated up front: faulting a fresh tmpfs page per 4 KiB inside the first copy costs more
     * than the copy itself. */
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
    if (p == MAP_FAILED) {
      rc = ce_fail(CE_E_NOMEM, "mmap(%s): %s", b->path, strerror(errno));
      close(fd);
      unlink(b->path);
      goto fail;
    }
    b->host = p;
    b->lock_fd = fd;
    b->kind = BUF_HOST_SHM;
  } else {
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
      rc = ce_fail(CE_E_NOMEM, "mmap of %llu bytes: %s", (unsigned long long)bytes, strerror(errno));
      goto fail;
    }
    /* Huge pages where the kernel allows them: 512x fewer faults on first touch. */
    madvise(p, bytes, MADV_HUGEPAGE);
    b->host = p;
    b->kind = BUF_HOST_ANON;
  }
  buf_link(ctx, b);
  *buf_out = b;
  return CE_OK;
fail:
  free(b);
  return rc;
}

int ce_buf_ipc_handle(ce_buf_t *b, uint8_t *handle, uint64_t len) {
  if (!b || !handle) return ce_fail(CE_E_INVAL, "ce_buf_ipc_handle: NULL argument");
  if (len < CE_IPC_HANDLE_BYTES) return ce_fail(CE_E_INVAL, "ce_buf_ipc_handle: buffer of %llu bytes, needs 64", (unsigned long long)len);
  if (b->kind != BUF_DEVICE) return ce_fail(CE_E_STATE, "ce_buf_ipc_handle: not a CUDA buffer allocated here");
  int rc = ce_dev_enter(b->ctx, b->dev);
  if (rc) return rc;
  CUipcMemHandle h;
  CUresult r = cu.cuIpcGetMemHandle(&h, b->dptr);
  if (r != CUDA_SUCCESS) return ce_cuda_fail(r, "cuIpcGetMemHandle on GPU %d", b->ctx->dev[b->dev].ordinal);
  memcpy(handle, h.reserved, CE_IPC_HANDLE_BYTES);
  return CE_OK;
}

int ce_buf_path(ce_buf_t *b, char *path, uint64_t len) {
  if (!b || !path || len == 0) return ce_fail(CE_E_INVAL, "ce_buf_path: NULL argument");
  if (!b->path[0]) return ce_fail(CE_E_STATE, "ce_buf_path: not a shared-memory buffer");
  if (strlen(b->path) >= len) return ce_fail(CE_E_INVAL, "ce_buf_path: buffer too small");
  snprintf(path, len, "%s", b->path);
  return CE_OK;
}

int ce_buf_open_ipc(ce_ctx_t *ctx, int dev, const uint8_t *handle, uint64_t bytes, ce_buf_t **buf_out) {
  if (!ctx || !handle || !buf_out) return ce_fail(CE_E_INVAL, "ce_buf_open_ipc: NULL argument");
  if (ctx->backend != CE_BACKEND_CUDA) return ce_fail(CE_E_STATE, "ce_buf_open_ipc: not a CUDA context");
  int rc = check_dev(ctx, dev);
  if (rc || (rc = ce_dev_enter(ctx, dev))) return rc;
  ce_buf_t *b = calloc(1, sizeof *b);
  if (!b) return ce_fail(CE_E_NOMEM, "out of host memory");
  CUipcMemHandle h;
  memcpy(h.reserved, handle, CE_IPC_HANDLE_BYTES);
  CUresult r = cu.cuIpcOpenMemHandle(&b->dptr, h, CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS);
  if (r != CUDA_SUCCESS) {
    free(b);
    return ce_cuda_fail(r, "cuIpcOpenMemHandle on GPU %d", ctx->dev[dev].ordinal);
  }
  b->ctx = ctx;
  b->dev = dev;
  b->bytes = bytes;
  b->kind = BUF_OPENED_IPC;
  buf_link(ctx, b);
  *buf_out = b;
  return CE_OK;
}

int ce_buf_open_path(ce_ctx_t *ctx, const char *path, uint64_t bytes, ce_buf_t **buf_out) {
  if (!ctx || !path || !buf_out) return ce_fail(CE_E_INVAL, "ce_buf_open_path: NULL argument");
  if (bytes == 0) return ce_fail(CE_E_INVAL, "ce_buf_open_path(%s): 0 bytes", path);
  int fd = open(path, O_RDWR | O_CLOEXEC);
  if (fd < 0) return ce_fail(CE_E_IO, "open(%s): %s", path, strerror(errno));
  /* A mapping past the end of the file maps nothing there: the first access would be a SIGBUS. */
  struct stat st;
  if (fstat(fd, &st) != 0) {
    int e = errno;
    close(fd);
    return ce_fail(CE_E_IO, "fstat(%s): %s", path, strerror(e));
  }
  if ((uint64_t)st.st_size < bytes) {
    close(fd);
    return ce_fail(CE_E_INVAL, "%s has %llu bytes, %llu expected (a buffer of another size, or a truncated file)", path,
                   (unsigned long long)st.st_size, (unsigned long long)bytes);
  }
  void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
  close(fd);
  if (p == MAP_FAILED) return ce_fail(CE_E_IO, "mmap(%s, %llu bytes): %s", path, (unsigned long long)bytes, strerror(errno));
  ce_buf_t *b = calloc(1, sizeof *b);
  if (!b) {
    munmap(p, bytes);
    return ce_fail(CE_E_NOMEM, "out of host memory");
  }
  b->ctx = ctx;
  b->bytes = bytes;
  b->host = p;
  b->kind = BUF_OPENED_PATH;
  buf_link(ctx, b);
  *buf_out = b;
  return CE_OK;
}

static void buf_free(ce_buf_t *b) {
  ce_ctx_t *ctx = b->ctx;
  switch (b->kind) {
  case BUF_DEVICE:
    ce_dev_enter(ctx, b->dev);
    cu.cuMemFree(b->dptr);
    break;
  case BUF_OPENED_IPC:
    ce_dev_enter(ctx, b->dev);
    cu.cuIpcCloseMemHandle(b->dptr);
    break;
  case BUF_HOST_SHM:
    munmap(b->host, b->bytes);
    unlink(b->path);
    close(b->lock_fd);
    break;
  default:
    munmap(b->host, b->bytes);
  }
  free(b);
}

void ce_buf_destroy(ce_buf_t *b) {
  if (!b) return;
  /* Ops still copying into or out of the buffer finish first (freeing under a DMA corrupts
   * whatever the allocator hands out next), and forget it, collected or not. */
  ce_ops_forget_buf(b->ctx, b);
  ce_xfers_forget_buf(b->ctx, b);
  buf_unlink(b->ctx, b);
  buf_free(b);
}

void ce_bufs_free(ce_ctx_t *ctx) {
  while (ctx->bufs) {
    ce_buf_t *b = ctx->bufs;
    ctx->bufs = b->next;
    buf_free(b);
  }
}

int ce_buf_read(ce_buf_t *b, uint64_t offset, void *dst, uint64_t bytes) {
  if (!b || (!dst && bytes)) return ce_fail(CE_E_INVAL, "ce_buf_read: NULL argument");
  if (offset > b->bytes || bytes > b->bytes - offset)
    return ce_fail(CE_E_INVAL, "reading %llu bytes at %llu overruns a buffer of %llu bytes", (unsigned long long)bytes,
                   (unsigned long long)offset, (unsigned long long)b->bytes);
  if (b->host) {
    memcpy(dst, b->host + offset, bytes);
    return CE_OK;
  }
  ce_ctx_t *ctx = b->ctx;
  int rc = ce_dev_enter(ctx, b->dev);
  if (rc) return rc;
  CUstream s = ctx->dev[b->dev].copy;
  CUresult r = cu.cuMemcpyDtoHAsync(dst, b->dptr + offset, bytes, s);
  if (r == CUDA_SUCCESS) r = cu.cuStreamSynchronize(s);
  if (r != CUDA_SUCCESS) return ce_cuda_fail(r, "reading %llu bytes from GPU %d", (unsigned long long)bytes, ctx->dev[b->dev].ordinal);
  return CE_OK;
}
