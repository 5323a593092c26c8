/* Loads UCX's libucp with dlopen and resolves the table in dl_ucx.h. */
#include "internal.h"

#include "dl_ucx.h"

#include <dlfcn.h>
#include <link.h>
#include <stdlib.h>
#include <string.h>

struct ce_ucx_api ucx;
static void *ucx_lib;
static char ucx_path[512];
static pthread_mutex_t load_mu = PTHREAD_MUTEX_INITIALIZER;

const char *ce_ucx_file(void) { return ucx_path; }

int ce_ucx_fail(int status, ucs_status_t s, const char *fmt, ...) {
  char what[2048];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(what, sizeof what, fmt, ap);
  va_end(ap);
  const char *text = ucx.ucs_status_string ? ucx.ucs_status_string(s) : "";
  return ce_fail(status, "%s: %s (ucs_status_t %d)", what, text, s);
}

int ce_ucx_load(const char *path) {
  pthread_mutex_lock(&load_mu);
  int rc = CE_OK;
  if (!ucx_lib) {
    const char *file = path && *path ? path : "libucp.so.0";
    /* UCX logs to stdout unless told otherwise, and ce's stdout carries results (--json). libucs
     * reads UCX_LOG_FILE once, when it loads; a user's own choice stands. */
    setenv("UCX_LOG_FILE", "stderr", 0);
    void *lib = dlopen(file, RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
      rc = ce_fail(CE_E_NOLIB, "dlopen(%s): %s (install UCX: apt-get install libucx0; or name its libucp with CE_UCX_LIB)",
                   file, dlerror());
      goto out;
    }
    struct ce_ucx_api api;
#define CE_UC_RESOLVE(field, symbol, ret, params)                                                        \
  *(void **)&api.field = dlsym(lib, symbol);                                                             \
  if (!api.field) {                                                                                      \
    rc = ce_fail(CE_E_NOSYM, "%s has no symbol %s: libce needs UCX 1.13 or newer", file, symbol);        \
    dlclose(lib);                                                                                        \
    goto out;                                                                                            \
  }
    CE_UCX_SYMBOLS(CE_UC_RESOLVE)
#undef CE_UC_RESOLVE
    ucx = api;
    struct link_map *map = NULL;
    snprintf(ucx_path, sizeof ucx_path, "%s", dlinfo(lib, RTLD_DI_LINKMAP, &map) == 0 && map ? map->l_name : file);
    ucx_lib = lib;
  }
out:
  pthread_mutex_unlock(&load_mu);
  return rc;
}
