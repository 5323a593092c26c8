/* CPU-backend copy jobs, shared by the submit functions in bcast.c. */
#ifndef CE_CPU_H
#define CE_CPU_H

#include "internal.h"

typedef struct {
  uint8_t *dst;
  const uint8_t *src;
  uint64_t bytes;
} ce_cpu_copy_t;

/* A thread op of n copies that starts after op `after`: fill *list_out (and add holds), then
 * ce_cpu_copies_run. NULL with the last error set when out of memory. */
ce_op_t *ce_cpu_copies_new(ce_ctx_t *ctx, uint64_t n, uint64_t after, ce_cpu_copy_t **list_out, uint64_t *id_out);
int ce_cpu_copies_run(ce_op_t *op, uint64_t id, uint64_t *op_out);

#endif
