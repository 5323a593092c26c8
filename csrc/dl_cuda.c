/* Loads the CUDA driver with dlopen and resolves the table in dl_cuda.h. */
#include "internal.h"

#include <dlfcn.h>
#include <link.h>
#include <stdio.h>
#include <string.h>

struct ce_cuda_api cu;
static void *cuda_lib;
static int cuda_version;
static pthread_mutex_t load_mu = PTHREAD_MUTEX_INITIALIZER;

int ce_cuda_loaded(void) { return cuda_lib != NULL; }

void ce_cuda_describe(CUresult r, char *buf, size_t len) {
  const char *name = NULL, *text = NULL;
  if (cu.cuGetErrorName) cu.cuGetErrorName(r, &name);
  if (cu.cuGetErrorString) cu.cuGetErrorString(r, &text);
  if (name)
    snprintf(buf, len, "%s: %s", name, text ? text : "");
  else
    snprintf(buf, len, "CUresult %d", r);
}

int ce_cuda_fail(CUresult r, const char *fmt, ...) {
  char what[2048], why[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(what, sizeof what, fmt, ap);
  va_end(ap);
  ce_cuda_describe(r, why, sizeof why);
  return ce_fail(r == CUDA_ERROR_OUT_OF_MEMORY ? CE_E_NOMEM : CE_E_CUDA, "%s: %s", what, why);
}

int ce_cuda_load(const char *path, int *driver_version_out) {
  pthread_mutex_lock(&load_mu);
  int rc = CE_OK;
  if (!cuda_lib) {
    const char *file = path && *path ? path : "libcuda.so.1";
    void *lib = dlopen(file, RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
      rc = ce_fail(CE_E_NOLIB, "dlopen(%s): %s (no NVIDIA driver on this host? CE_LIBCUDA names another file)", file,
                   dlerror());
      goto out;
    }
    struct ce_cuda_api api;
#define CE_CU_RESOLVE(field, symbol, ret, params)                                                            \
  *(void **)&api.field = dlsym(lib, symbol);                                                                 \
  if (!api.field) {                                                                                          \
    rc = ce_fail(CE_E_NOSYM, "%s has no symbol %s: the driver is too old (libce needs CUDA 12 or newer)", file, \
                 symbol);                                                                                    \
    dlclose(lib);                                                                                            \
    goto out;                                                                                                \
  }
    CE_CUDA_SYMBOLS(CE_CU_RESOLVE)
#undef CE_CU_RESOLVE
    cu = api;
    CUresult r = cu.cuInit(0);
    if (r != CUDA_SUCCESS) {
      rc = ce_cuda_fail(r, "cuInit (%s)", file);
      memset(&cu, 0, sizeof cu);
      dlclose(lib);
      goto out;
    }
    cu.cuDriverGetVersion(&cuda_version);
    if (cuda_version < 12000) {
      rc = ce_fail(CE_E_VERSION, "%s is CUDA %d.%d; libce needs a CUDA 12 or newer driver", file, cuda_version / 1000,
                   cuda_version % 1000 / 10);
      memset(&cu, 0, sizeof cu);
      dlclose(lib);
      goto out;
    }
    cuda_lib = lib;
  }
  if (driver_version_out) *driver_version_out = cuda_version;
out:
  pthread_mutex_unlock(&load_mu);
  return rc;
}

int ce_lib_path(int which, char *buf, uint64_t len) {
  void *lib = which == CE_LIB_CUDA ? cuda_lib : NULL;
  extern void *ce_nccl_handle(void);
  if (which == CE_LIB_NCCL) lib = ce_nccl_handle();
  if (!buf || len == 0) return ce_fail(CE_E_INVAL, "ce_lib_path: no buffer");
  if (!lib) return ce_fail(CE_E_STATE, "ce_lib_path: library %d is not loaded", which);
  struct link_map *map = NULL;
  if (dlinfo(lib, RTLD_DI_LINKMAP, &map) != 0 || !map) return ce_fail(CE_E_NOLIB, "dlinfo: %s", dlerror());
  snprintf(buf, len, "%s", map->l_name);
  return CE_OK;
}

int ce_lib_probe(const char *name, char *path, uint64_t len) {
  if (!name || !path || len == 0) return ce_fail(CE_E_INVAL, "ce_lib_probe: NULL argument");
  void *lib = dlopen(name, RTLD_LAZY | RTLD_LOCAL);
  if (!lib) return ce_fail(CE_E_NOLIB, "dlopen(%s): %s", name, dlerror());
  struct link_map *map = NULL;
  if (dlinfo(lib, RTLD_DI_LINKMAP, &map) == 0 && map)
    snprintf(path, len, "%s", map->l_name);
  else
    snprintf(path, len, "%s", name);
  dlclose(lib);
  return CE_OK;
}

int ce_cuda_device_count(int *count_out) {
  if (!cuda_lib) return ce_fail(CE_E_STATE, "the CUDA driver is not loaded");
  CUresult r = cu.cuDeviceGetCount(count_out);
  return r == CUDA_SUCCESS ? CE_OK : ce_cuda_fail(r, "cuDeviceGetCount");
}

int ce_cuda_mem_info(int ordinal, uint64_t *free_out, uint64_t *total_out) {
  if (!cuda_lib) return ce_fail(CE_E_STATE, "the CUDA driver is not loaded");
  CUdevice dev;
  CUcontext ctx;
  CUresult r = cu.cuDeviceGet(&dev, ordinal);
  if (r != CUDA_SUCCESS) return ce_cuda_fail(r, "cuDeviceGet(%d)", ordinal);
  if ((r = cu.cuDevicePrimaryCtxRetain(&ctx, dev)) != CUDA_SUCCESS)
    return ce_cuda_fail(r, "cuDevicePrimaryCtxRetain on GPU %d", ordinal);
  size_t fr = 0, tot = 0;
  r = cu.cuCtxSetCurrent(ctx);
  if (r == CUDA_SUCCESS) r = cu.cuMemGetInfo(&fr, &tot);
  cu.cuDevicePrimaryCtxRelease(dev);
  if (r != CUDA_SUCCESS) return ce_cuda_fail(r, "cuMemGetInfo on GPU %d", ordinal);
  if (free_out) *free_out = fr;
  if (total_out) *total_out = tot;
  return CE_OK;
}

int ce_cuda_device_info(int ordinal, char *json, uint64_t len) {
  if (!cuda_lib) return ce_fail(CE_E_STATE, "the CUDA driver is not loaded");
  if (!json || len == 0) return ce_fail(CE_E_INVAL, "ce_cuda_device_info: no buffer");
  CUdevice dev;
  CUresult r = cu.cuDeviceGet(&dev, ordinal);
  if (r != CUDA_SUCCESS) return ce_cuda_fail(r, "cuDeviceGet(%d)", ordinal);
  char name[256] = "", bus[64] = "";
  CUuuid uuid;
  size_t total = 0;
  int major = 0, minor = 0;
  if ((r = cu.cuDeviceGetName(name, sizeof name, dev)) != CUDA_SUCCESS) return ce_cuda_fail(r, "cuDeviceGetName(%d)", ordinal);
  if ((r = cu.cuDeviceGetUuid(&uuid, dev)) != CUDA_SUCCESS) return ce_cuda_fail(r, "cuDeviceGetUuid(%d)", ordinal);
  if ((r = cu.cuDeviceTotalMem(&total, dev)) != CUDA_SUCCESS) return ce_cuda_fail(r, "cuDeviceTotalMem(%d)", ordinal);
  if ((r = cu.cuDeviceGetPCIBusId(bus, sizeof bus, dev)) != CUDA_SUCCESS)
    return ce_cuda_fail(r, "cuDeviceGetPCIBusId(%d)", ordinal);
  cu.cuDeviceGetAttribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev);
  cu.cuDeviceGetAttribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev);
  uint64_t fr = 0;
  int rc = ce_cuda_mem_info(ordinal, &fr, NULL);
  if (rc) return rc;
  const unsigned char *u = (const unsigned char *)uuid.bytes;
  /* The UUID as nvidia-smi and torch print it: GPU-8-4-4-4-12 hex digits. */
  int n = snprintf(json, len,
                   "{\"index\":%d,\"name\":\"%s\",\"uuid\":\"GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x\","
                   "\"total_bytes\":%llu,\"free_bytes\":%llu,\"pci_bus_id\":\"%s\",\"compute_capability\":\"%d.%d\"}",
                   ordinal, name, u[0], u[1], u[2], u[3], u[4], u[5], u[6], u[7], u[8], u[9], u[10], u[11], u[12], u[13],
                   u[14], u[15], (unsigned long long)total, (unsigned long long)fr, bus, major, minor);
  if (n < 0 || (uint64_t)n >= len) return ce_fail(CE_E_INVAL, "ce_cuda_device_info: buffer of %llu bytes too small", (unsigned long long)len);
  return CE_OK;
}
