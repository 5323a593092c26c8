/* The Mooncake engine of transfer endpoints. Its library loads (dl_mooncake.c checks that it is
 * Mooncake's C API), but endpoints over it are not built yet: creating one says so. */
#include "xfer.h"

static int mooncake_open(ce_xfer_t *x) {
  (void)x;
  if (!ce_mooncake_file()[0]) return ce_fail(CE_E_STATE, "ce_xfer_create: Mooncake is not loaded (ce_xfer_load first)");
  return ce_fail(CE_E_STATE, "ce_xfer_create: Mooncake's transfer engine loads from %s, but this libce has no Mooncake "
                             "endpoints yet; use the UCX engine", ce_mooncake_file());
}

const xfer_engine_t ce_xfer_mooncake = {.name = "Mooncake", .open = mooncake_open};
