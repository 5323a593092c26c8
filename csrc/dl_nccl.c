/* Loads NCCL with dlopen and resolves the table in dl_nccl.h. */
#include "internal.h"

#include <dlfcn.h>
#include <stdio.h>
#include <string.h>

struct ce_nccl_api nccl;
static void *nccl_lib;
static int nccl_version;
static pthread_mutex_t load_mu = PTHREAD_MUTEX_INITIALIZER;

int ce_nccl_loaded(void) { return nccl_lib != NULL; }
void *ce_nccl_handle(void) { return nccl_lib; }

int ce_nccl_fail(ncclResult_t r, ncclComm_t comm, const char *fmt, ...) {
  char what[2048];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(what, sizeof what, fmt, ap);
  va_end(ap);
  const char *text = nccl.ncclGetErrorString ? nccl.ncclGetErrorString(r) : "";
  const char *last = nccl.ncclGetLastError ? nccl.ncclGetLastError(comm) : NULL;
  return ce_fail(CE_E_NCCL, "%s: ncclResult %d: %s%s%s", what, r, text, last && *last ? ": " : "", last ? last : "");
}

int ce_nccl_load(const char *path, int *version_out) {
  pthread_mutex_lock(&load_mu);
  int rc = CE_OK;
  if (!nccl_lib) {
    const char *file = path && *path ? path : "libnccl.so.2";
    void *lib = dlopen(file, RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
      rc = ce_fail(CE_E_NOLIB, "dlopen(%s): %s (install NCCL, or name its file with CE_LIBNCCL)", file, dlerror());
      goto out;
    }
    struct ce_nccl_api api;
#define CE_NC_RESOLVE(field, symbol, ret, params)                                                           \
  *(void **)&api.field = dlsym(lib, symbol);                                                                \
  if (!api.field) {                                                                                         \
    rc = ce_fail(CE_E_NOSYM, "%s has no symbol %s: libce needs NCCL 2.18 or newer", file, symbol);          \
    dlclose(lib);                                                                                           \
    goto out;                                                                                               \
  }
    CE_NCCL_SYMBOLS(CE_NC_RESOLVE)
#undef CE_NC_RESOLVE
    int v = 0;
    api.ncclGetVersion(&v);
    /* NCCL_VERSION_CODE is major*10000 + minor*100 + patch since 2.9. */
    if (v < 21800) {
      rc = ce_fail(CE_E_VERSION, "%s is NCCL %d.%d.%d; libce needs 2.18 or newer", file, v / 10000, v / 100 % 100, v % 100);
      dlclose(lib);
      goto out;
    }
    nccl = api;
    nccl_version = v;
    nccl_lib = lib;
  }
  if (version_out) *version_out = nccl_version;
out:
  pthread_mutex_unlock(&load_mu);
  return rc;
}
