/* What delta.c (compare, encode) and patch.c (apply) share: the element rules of a patch
 * (src/wire/worker-protocol.json: little-endian int32 positions, elements of 1, 2, 4 or 8 bytes). */
#ifndef CE_DELTA_H
#define CE_DELTA_H

#include "internal.h"

#include <string.h>

static inline int elem_ok(uint64_t es, uint64_t bytes) { return (es == 1 || es == 2 || es == 4 || es == 8) && bytes % es == 0; }

static inline uint32_t load_le32u(const uint8_t *p) {
  uint32_t v;
  memcpy(&v, p, 4);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  v = __builtin_bswap32(v);
#endif
  return v;
}

#endif
