/* CPU-backend copy jobs, shared by the submit functions in bcast.c. */
#ifndef CE_CPU_H
#define CE_CPU_H

#include "internal.h"

typedef struct {
  uint8_t *dst;
  const uint8_t *src;
  uint64_t bytes;
} ce_cpu_copy_t;

/* A job of n copies that starts after op `after`; fill the returned array, then submit. */
ce_cpu_copy_t *ce_cpu_copies_new(uint64_t n, uint64_t after, void **job_out);
/* Runs the job on the op's thread; the op owns the job from here. */
int ce_cpu_copies_submit(ce_op_t *op, void *job);

#endif
