/* Mooncake's transfer engine as libce loads it: its C API (transfer_engine_c.h), declared here so
 * that no Mooncake header is needed at build time, one table entry per symbol under its C
 * declaration. The header #defines its types: segment_id_t is int32_t, batch_id_t uint64_t, and
 * both handles are void*. Every "char *" argument is borrowed for the call only. */
#ifndef CE_DL_MOONCAKE_H
#define CE_DL_MOONCAKE_H

#include <stddef.h>
#include <stdint.h>

/* struct transfer_request: opcode OPCODE_READ 0 / OPCODE_WRITE 1; target_offset is the remote
 * buffer's address, the segment naming the peer's engine. */
typedef struct {
  int opcode;
  void *source;
  int32_t target_id;
  uint64_t target_offset;
  uint64_t length;
} ce_mc_request_t;

/* struct transfer_status, filled only when getTransferStatus returns 0. TIMEOUT is a late slice
 * (MC_SLICE_TIMEOUT): the task still runs. */
#define CE_MC_STATUS_WAITING 0
#define CE_MC_STATUS_PENDING 1
#define CE_MC_STATUS_COMPLETED 4
#define CE_MC_STATUS_TIMEOUT 5
#define CE_MC_STATUS_FAILED 6
#define CE_MC_OPCODE_READ 0
typedef struct {
  int status;
  uint64_t transferred_bytes;
} ce_mc_status_t;

#define CE_MOONCAKE_SYMBOLS(CE_MC)                                                                       \
  /* transfer_engine_t createTransferEngine(const char *metadata_conn_string,                           \
       const char *local_server_name, const char *ip_or_host_name, uint64_t rpc_port, int auto_discover); \
     NULL on failure, without a reason; "P2PHANDSHAKE" as metadata needs no etcd */                    \
  CE_MC(createTransferEngine, "createTransferEngine", void *, (const char *, const char *, const char *, uint64_t, int)) \
  /* int getLocalIpAndPort(transfer_engine_t engine, char *buf_out, size_t buf_len);  the segment name  \
     peers open, "host:port" of its handshake listener; always 0 */                                   \
  CE_MC(getLocalIpAndPort, "getLocalIpAndPort", int, (void *, char *, size_t))                         \
  /* transport_t installTransport(transfer_engine_t engine, const char *proto, void **args);  NULL:    \
     failed; before any openSegment, whose handshake sends the transports */                           \
  CE_MC(installTransport, "installTransport", void *, (void *, const char *, void **))                 \
  /* void destroyTransferEngine(transfer_engine_t engine); */                                          \
  CE_MC(destroyTransferEngine, "destroyTransferEngine", void, (void *))                                \
  /* int registerLocalMemory(transfer_engine_t engine, void *addr, size_t length, const char *location, \
       int remote_accessible); */                                                                      \
  CE_MC(registerLocalMemory, "registerLocalMemory", int, (void *, void *, size_t, const char *, int))  \
  /* int unregisterLocalMemory(transfer_engine_t engine, void *addr); */                               \
  CE_MC(unregisterLocalMemory, "unregisterLocalMemory", int, (void *, void *))                         \
  /* segment_id_t openSegment(transfer_engine_t engine, const char *segment_name);  >= 1, or -1; the   \
     first call for a name handshakes with the peer (TCP, blocking), later ones return the cached id */ \
  CE_MC(openSegment, "openSegment", int32_t, (void *, const char *))                                   \
  /* int closeSegment(transfer_engine_t engine, segment_id_t segment_id); */                           \
  CE_MC(closeSegment, "closeSegment", int, (void *, int32_t))                                          \
  /* batch_id_t allocateBatchID(transfer_engine_t engine, size_t batch_size);  UINT64_MAX: failed */   \
  CE_MC(allocateBatchID, "allocateBatchID", uint64_t, (void *, size_t))                                \
  /* int submitTransfer(transfer_engine_t engine, batch_id_t batch_id,                                  \
       struct transfer_request *entries, size_t count); */                                             \
  CE_MC(submitTransfer, "submitTransfer", int, (void *, uint64_t, ce_mc_request_t *, size_t))          \
  /* int getTransferStatus(transfer_engine_t engine, batch_id_t batch_id, size_t task_id,               \
       struct transfer_status *status); */                                                             \
  CE_MC(getTransferStatus, "getTransferStatus", int, (void *, uint64_t, size_t, ce_mc_status_t *))     \
  /* int freeBatchID(transfer_engine_t engine, batch_id_t batch_id); */                                \
  CE_MC(freeBatchID, "freeBatchID", int, (void *, uint64_t))

struct ce_mooncake_api {
#define CE_MC_FIELD(field, symbol, ret, params) ret(*field) params;
  CE_MOONCAKE_SYMBOLS(CE_MC_FIELD)
#undef CE_MC_FIELD
};

extern struct ce_mooncake_api mooncake;

#endif
