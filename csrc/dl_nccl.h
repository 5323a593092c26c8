/* NCCL as libce uses it: types declared here (no nccl.h at build time) and one table entry per
 * symbol under its C declaration. */
#ifndef CE_DL_NCCL_H
#define CE_DL_NCCL_H

#include "dl_cuda.h"

typedef int ncclResult_t; /* ncclSuccess 0, ncclInProgress 7 */
typedef struct ncclComm *ncclComm_t; /* itself a pointer: init takes a pointer to it */
typedef struct { char internal[128]; } ncclUniqueId;

/* ncclConfig_t as of NCCL 2.18 (nccl.h's ncclConfig_v21700 layout plus splitShare). NCCL copies
 * min(size, its own sizeof) bytes of it and takes its defaults for the rest, so this older, smaller
 * layout stays valid in newer NCCLs. */
typedef struct {
  size_t size;
  unsigned int magic;   /* 0xcafebeef */
  unsigned int version; /* NCCL_VERSION of the layout: 21800 */
  int blocking;         /* 0: calls return ncclInProgress; poll ncclCommGetAsyncError */
  int cgaClusterSize;
  int minCTAs;
  int maxCTAs;
  const char *netName;
  int splitShare;
} ce_nccl_config_t;
#define CE_NCCL_CONFIG_UNDEF_INT (-2147483647 - 1) /* NCCL_CONFIG_UNDEF_INT: INT_MIN */

#define ncclSuccess 0
#define ncclInProgress 7
#define ncclUint8 1

#define CE_NCCL_SYMBOLS(CE_NC)                                                                          \
  /* ncclResult_t ncclGetVersion(int *version); */                                                      \
  CE_NC(ncclGetVersion, "ncclGetVersion", ncclResult_t, (int *))                                        \
  /* ncclResult_t ncclGetUniqueId(ncclUniqueId *uniqueId); */                                           \
  CE_NC(ncclGetUniqueId, "ncclGetUniqueId", ncclResult_t, (ncclUniqueId *))                             \
  /* ncclResult_t ncclCommInitRank(ncclComm_t *comm, int nranks, ncclUniqueId commId, int rank);        \
     the 128-byte id is passed by value; uses the calling thread's current CUDA device */              \
  CE_NC(ncclCommInitRank, "ncclCommInitRank", ncclResult_t, (ncclComm_t *, int, ncclUniqueId, int))     \
  /* ncclResult_t ncclCommInitRankConfig(ncclComm_t *comm, int nranks, ncclUniqueId commId, int rank, \
       ncclConfig_t *config);  with config->blocking 0 it returns ncclInProgress at once, *comm set */  \
  CE_NC(ncclCommInitRankConfig, "ncclCommInitRankConfig", ncclResult_t,                                \
        (ncclComm_t *, int, ncclUniqueId, int, ce_nccl_config_t *))                                     \
  /* ncclResult_t ncclCommDestroy(ncclComm_t comm);  waits for the comm's pending work */               \
  CE_NC(ncclCommDestroy, "ncclCommDestroy", ncclResult_t, (ncclComm_t))                                 \
  /* ncclResult_t ncclCommAbort(ncclComm_t comm);  frees the comm, stopping uncompleted operations */   \
  CE_NC(ncclCommAbort, "ncclCommAbort", ncclResult_t, (ncclComm_t))                                     \
  /* ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t *asyncError); */                  \
  CE_NC(ncclCommGetAsyncError, "ncclCommGetAsyncError", ncclResult_t, (ncclComm_t, ncclResult_t *))     \
  /* const char *ncclGetErrorString(ncclResult_t result); */                                            \
  CE_NC(ncclGetErrorString, "ncclGetErrorString", const char *, (ncclResult_t))                         \
  /* const char *ncclGetLastError(ncclComm_t comm);  the human message of the last failure */           \
  CE_NC(ncclGetLastError, "ncclGetLastError", const char *, (ncclComm_t))                               \
  /* ncclResult_t ncclGroupStart(void); */                                                              \
  CE_NC(ncclGroupStart, "ncclGroupStart", ncclResult_t, (void))                                         \
  /* ncclResult_t ncclGroupEnd(void); */                                                                \
  CE_NC(ncclGroupEnd, "ncclGroupEnd", ncclResult_t, (void))                                             \
  /* ncclResult_t ncclBroadcast(const void *sendbuff, void *recvbuff, size_t count,                     \
       ncclDataType_t datatype, int root, ncclComm_t comm, cudaStream_t stream); */                     \
  CE_NC(ncclBroadcast, "ncclBroadcast", ncclResult_t, (const void *, void *, size_t, int, int, ncclComm_t, CUstream))

struct ce_nccl_api {
#define CE_NC_FIELD(field, symbol, ret, params) ret(*field) params;
  CE_NCCL_SYMBOLS(CE_NC_FIELD)
#undef CE_NC_FIELD
};

extern struct ce_nccl_api nccl;

int ce_nccl_fail(ncclResult_t r, ncclComm_t comm, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
int ce_nccl_loaded(void);

#endif
