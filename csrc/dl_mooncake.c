/* Loads Mooncake's transfer engine with dlopen and resolves the table in dl_mooncake.h. */
#include "xfer.h"

#include "dl_mooncake.h"

#include <dlfcn.h>
#include <link.h>
#include <stdio.h>

struct ce_mooncake_api mooncake;
static void *mooncake_lib;
static char mooncake_path[512];
static pthread_mutex_t load_mu = PTHREAD_MUTEX_INITIALIZER;

const char *ce_mooncake_file(void) { return mooncake_path; }

int ce_mooncake_load(const char *path, char *json, uint64_t len) {
  pthread_mutex_lock(&load_mu);
  int rc = CE_OK;
  if (!mooncake_lib) {
    const char *file = path && *path ? path : "libtransfer_engine.so";
    void *lib = dlopen(file, RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
      rc = ce_fail(CE_E_NOLIB, "dlopen(%s): %s (Mooncake's transfer engine is not installed here; name its library with CE_MOONCAKE_LIB)",
                   file, dlerror());
      goto out;
    }
    struct ce_mooncake_api api;
#define CE_MC_RESOLVE(field, symbol, ret, params)                                                          \
  *(void **)&api.field = dlsym(lib, symbol);                                                               \
  if (!api.field) {                                                                                        \
    rc = ce_fail(CE_E_NOSYM, "%s has no symbol %s: not Mooncake's transfer engine C API", file, symbol);   \
    dlclose(lib);                                                                                          \
    goto out;                                                                                              \
  }
    CE_MOONCAKE_SYMBOLS(CE_MC_RESOLVE)
#undef CE_MC_RESOLVE
    mooncake = api;
    struct link_map *map = NULL;
    snprintf(mooncake_path, sizeof mooncake_path, "%s", dlinfo(lib, RTLD_DI_LINKMAP, &map) == 0 && map ? map->l_name : file);
    mooncake_lib = lib;
  }
  /* Mooncake has no version call and reports its transports only once an engine runs. */
  if (json && snprintf(json, len, "{\"engine\":\"mooncake\",\"path\":\"%s\",\"transports\":[],\"memory_types\":[]}", mooncake_path) >= (int)len)
    rc = ce_fail(CE_E_INVAL, "ce_xfer_load: a buffer of %llu bytes is too small", (unsigned long long)len);
out:
  pthread_mutex_unlock(&load_mu);
  return rc;
}
