/* UCX's UCP API as libce uses it: the few types, declared here from ucp/api/ucp.h and ucp_def.h
 * so that no UCX header is needed at build time, and one table entry per symbol under its C
 * declaration. Every params struct starts with a field mask and UCX reads only the fields whose bit
 * is set, so each is declared up to the last field libce sets; the layouts and bit values below
 * are the same in UCX 1.13 (Debian 12) and 1.16 through 1.22 (checked against their headers). */
#ifndef CE_DL_UCX_H
#define CE_DL_UCX_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

/* An enum declared packed (UCS_S_PACKED): one signed byte, as argument and return value alike, so
 * reading it as int would take undefined upper bits. UCS_OK 0, UCS_INPROGRESS 1, UCS_ERR_* to -100. */
typedef int8_t ucs_status_t;
typedef void *ucs_status_ptr_t; /* a request pointer, NULL (done), or a status cast to a pointer */
typedef struct ucp_config ucp_config_t;
typedef struct ucp_context *ucp_context_h;
typedef struct ucp_worker *ucp_worker_h;
typedef struct ucp_ep *ucp_ep_h;
typedef struct ucp_mem *ucp_mem_h;
typedef struct ucp_address ucp_address_t;

#define UCS_OK 0
#define UCS_INPROGRESS 1
#define UCS_ERR_BUSY (-15)
#define UCS_ERR_LAST (-100)
/* ucs/type/status.h: UCS_PTR_IS_ERR, UCS_PTR_IS_PTR, UCS_PTR_RAW_STATUS */
#define CE_UCS_PTR_IS_ERR(p) ((uintptr_t)(p) >= (uintptr_t)UCS_ERR_LAST)
#define CE_UCS_PTR_IS_PTR(p) ((uintptr_t)(p) - 1 < (uintptr_t)UCS_ERR_LAST - 1)
#define CE_UCS_PTR_STATUS(p) ((ucs_status_t)(intptr_t)(p))

#define UCS_THREAD_MODE_SERIALIZED 1 /* ucs_thread_mode_t: one thread at a time, any thread */
#define UCS_MEMORY_TYPE_HOST 0       /* ucs_memory_type_t */
#define UCS_MEMORY_TYPE_CUDA 1
#define UCS_MEMORY_TYPE_CUDA_MANAGED 2

/* ucp_params_t */
#define UCP_PARAM_FIELD_FEATURES (1ull << 0)
#define UCP_PARAM_FIELD_NAME (1ull << 8)
#define UCP_FEATURE_WAKEUP (1ull << 4)
#define UCP_FEATURE_AM (1ull << 6)
typedef struct {
  uint64_t field_mask;
  uint64_t features;
  size_t request_size;
  void (*request_init)(void *request);
  void (*request_cleanup)(void *request);
  uint64_t tag_sender_mask;
  int mt_workers_shared;
  size_t estimated_num_eps;
  size_t estimated_num_ppn;
  const char *name;
} ce_ucp_params_t;

/* ucp_context_attr_t */
#define UCP_ATTR_FIELD_MEMORY_TYPES (1ull << 2)
typedef struct {
  uint64_t field_mask;
  size_t request_size;
  int thread_mode;
  uint64_t memory_types; /* bit per ucs_memory_type_t */
  char name[32];         /* UCP_ENTITY_NAME_MAX */
} ce_ucp_context_attr_t;

/* ucp_worker_params_t (then cpu_mask, events, ...: not set) */
#define UCP_WORKER_PARAM_FIELD_THREAD_MODE (1ull << 0)
typedef struct {
  uint64_t field_mask;
  int thread_mode;
} ce_ucp_worker_params_t;

/* ucp_ep_params_t */
#define UCP_EP_PARAM_FIELD_REMOTE_ADDRESS (1ull << 0)
#define UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE (1ull << 1)
#define UCP_EP_PARAM_FIELD_ERR_HANDLER (1ull << 2)
#define UCP_EP_PARAM_FIELD_NAME (1ull << 7)
#define UCP_ERR_HANDLING_MODE_PEER 1 /* requests fail, and the error handler runs, when the peer does */
typedef void (*ucp_err_handler_cb_t)(void *arg, ucp_ep_h ep, ucs_status_t status);
typedef struct {
  uint64_t field_mask;
  const ucp_address_t *address;
  int err_mode;
  struct {
    ucp_err_handler_cb_t cb;
    void *arg;
  } err_handler;
  void *user_data;
  unsigned flags;
  struct {
    const void *addr;
    unsigned addrlen; /* socklen_t */
  } sockaddr;
  void *conn_request;
  const char *name;
} ce_ucp_ep_params_t;

/* ucp_mem_map_params_t */
#define UCP_MEM_MAP_PARAM_FIELD_ADDRESS (1ull << 0)
#define UCP_MEM_MAP_PARAM_FIELD_LENGTH (1ull << 1)
#define UCP_MEM_MAP_PARAM_FIELD_MEMORY_TYPE (1ull << 4)
typedef struct {
  uint64_t field_mask;
  void *address;
  size_t length;
  unsigned flags;
  unsigned prot;
  int memory_type;
} ce_ucp_mem_map_params_t;

/* ucp_request_param_t */
#define UCP_OP_ATTR_FIELD_CALLBACK (1u << 1)
#define UCP_OP_ATTR_FIELD_FLAGS (1u << 4) /* without it UCX ignores flags */
#define UCP_OP_ATTR_FIELD_USER_DATA (1u << 2)
#define UCP_OP_ATTR_FIELD_MEMORY_TYPE (1u << 6)
#define UCP_EP_CLOSE_FLAG_FORCE (1u << 0)
#define UCP_AM_SEND_FLAG_REPLY (1u << 0) /* the receiver's handler gets an endpoint back to the sender */
typedef void (*ucp_send_nbx_callback_t)(void *request, ucs_status_t status, void *user_data);
typedef void (*ucp_am_recv_data_nbx_callback_t)(void *request, ucs_status_t status, size_t length, void *user_data);
typedef struct {
  uint32_t op_attr_mask;
  uint32_t flags;
  void *request;
  union {
    ucp_send_nbx_callback_t send;
    ucp_am_recv_data_nbx_callback_t recv_am;
  } cb;
  uint64_t datatype;
  void *user_data;
  void *reply_buffer;
  int memory_type;
} ce_ucp_request_param_t;

/* Active messages: ucp_am_recv_param_t and ucp_am_handler_param_t */
#define UCP_AM_RECV_ATTR_FIELD_REPLY_EP (1ull << 0)
#define UCP_AM_RECV_ATTR_FLAG_DATA (1ull << 16) /* data is the payload, valid during the callback */
#define UCP_AM_RECV_ATTR_FLAG_RNDV (1ull << 17) /* data is a descriptor for ucp_am_recv_data_nbx */
typedef struct {
  uint64_t recv_attr;
  ucp_ep_h reply_ep;
} ce_ucp_am_recv_param_t;
/* UCS_OK: done with data; for a rendezvous not received, the sender's send completes with UCS_OK */
typedef ucs_status_t (*ucp_am_recv_callback_t)(void *arg, const void *header, size_t header_length, void *data,
                                               size_t length, const ce_ucp_am_recv_param_t *param);
#define UCP_AM_HANDLER_PARAM_FIELD_ID (1ull << 0)
#define UCP_AM_HANDLER_PARAM_FIELD_FLAGS (1ull << 1)
#define UCP_AM_HANDLER_PARAM_FIELD_CB (1ull << 2)
#define UCP_AM_HANDLER_PARAM_FIELD_ARG (1ull << 3)
#define UCP_AM_FLAG_WHOLE_MSG (1u << 0)
typedef struct {
  uint64_t field_mask;
  unsigned id;
  uint32_t flags;
  ucp_am_recv_callback_t cb;
  void *arg;
} ce_ucp_am_handler_param_t;

/* CE_UC(field, symbol, return type, parameter types) */
#define CE_UCX_SYMBOLS(CE_UC)                                                                            \
  /* const char *ucp_get_version_string(void); */                                                      \
  CE_UC(ucp_get_version_string, "ucp_get_version_string", const char *, (void))                        \
  /* const char *ucs_status_string(ucs_status_t status);  libucs, found through libucp's dependencies */ \
  CE_UC(ucs_status_string, "ucs_status_string", const char *, (ucs_status_t))                          \
  /* ucs_status_t ucp_config_read(const char *env_prefix, const char *filename, ucp_config_t **config_p); \
     reads the UCX_* environment */                                                                    \
  CE_UC(ucp_config_read, "ucp_config_read", ucs_status_t, (const char *, const char *, ucp_config_t **)) \
  /* void ucp_config_release(ucp_config_t *config); */                                                 \
  CE_UC(ucp_config_release, "ucp_config_release", void, (ucp_config_t *))                              \
  /* ucs_status_t ucp_init_version(unsigned api_major_version, unsigned api_minor_version,             \
       const ucp_params_t *params, const ucp_config_t *config, ucp_context_h *context_p);              \
     ucp.h's ucp_init is an inline wrapper passing UCP_API_MAJOR/MINOR */                              \
  CE_UC(ucp_init_version, "ucp_init_version", ucs_status_t,                                            \
        (unsigned, unsigned, const ce_ucp_params_t *, const ucp_config_t *, ucp_context_h *))          \
  /* void ucp_cleanup(ucp_context_h context_p); */                                                     \
  CE_UC(ucp_cleanup, "ucp_cleanup", void, (ucp_context_h))                                             \
  /* ucs_status_t ucp_context_query(ucp_context_h context_p, ucp_context_attr_t *attr); */             \
  CE_UC(ucp_context_query, "ucp_context_query", ucs_status_t, (ucp_context_h, ce_ucp_context_attr_t *)) \
  /* void ucp_context_print_info(const ucp_context_h context, FILE *stream);  one "resource" line per  \
     transport and device, "tcp/lo", the same format since 1.13 */                                    \
  CE_UC(ucp_context_print_info, "ucp_context_print_info", void, (ucp_context_h, FILE *))              \
  /* ucs_status_t ucp_worker_create(ucp_context_h context, const ucp_worker_params_t *params,          \
       ucp_worker_h *worker_p); */                                                                     \
  CE_UC(ucp_worker_create, "ucp_worker_create", ucs_status_t, (ucp_context_h, const ce_ucp_worker_params_t *, ucp_worker_h *)) \
  /* void ucp_worker_destroy(ucp_worker_h worker); */                                                  \
  CE_UC(ucp_worker_destroy, "ucp_worker_destroy", void, (ucp_worker_h))                                \
  /* ucs_status_t ucp_worker_get_address(ucp_worker_h worker, ucp_address_t **address_p,               \
       size_t *address_length_p);  ucp_compat.h since 1.14, still exported */                           \
  CE_UC(ucp_worker_get_address, "ucp_worker_get_address", ucs_status_t, (ucp_worker_h, ucp_address_t **, size_t *)) \
  /* void ucp_worker_release_address(ucp_worker_h worker, ucp_address_t *address); */                   \
  CE_UC(ucp_worker_release_address, "ucp_worker_release_address", void, (ucp_worker_h, ucp_address_t *)) \
  /* unsigned ucp_worker_progress(ucp_worker_h worker);  nonzero: something progressed */              \
  CE_UC(ucp_worker_progress, "ucp_worker_progress", unsigned, (ucp_worker_h))                          \
  /* ucs_status_t ucp_worker_get_efd(ucp_worker_h worker, int *fd);  needs UCP_FEATURE_WAKEUP */        \
  CE_UC(ucp_worker_get_efd, "ucp_worker_get_efd", ucs_status_t, (ucp_worker_h, int *))                 \
  /* ucs_status_t ucp_worker_arm(ucp_worker_h worker);  UCS_ERR_BUSY: events pending, progress again */ \
  CE_UC(ucp_worker_arm, "ucp_worker_arm", ucs_status_t, (ucp_worker_h))                                \
  /* ucs_status_t ucp_ep_create(ucp_worker_h worker, const ucp_ep_params_t *params, ucp_ep_h *ep_p);   \
     non-blocking: the wireup completes in progress */                                                 \
  CE_UC(ucp_ep_create, "ucp_ep_create", ucs_status_t, (ucp_worker_h, const ce_ucp_ep_params_t *, ucp_ep_h *)) \
  /* ucs_status_ptr_t ucp_ep_close_nbx(ucp_ep_h ep, const ucp_request_param_t *param);  with           \
     UCP_EP_CLOSE_FLAG_FORCE, the endpoint's outstanding requests complete with an error */           \
  CE_UC(ucp_ep_close_nbx, "ucp_ep_close_nbx", ucs_status_ptr_t, (ucp_ep_h, const ce_ucp_request_param_t *)) \
  /* ucs_status_ptr_t ucp_ep_flush_nbx(ucp_ep_h ep, const ucp_request_param_t *param);  completes once  \
     the endpoint's operations (and its wireup) are done remotely */                                  \
  CE_UC(ucp_ep_flush_nbx, "ucp_ep_flush_nbx", ucs_status_ptr_t, (ucp_ep_h, const ce_ucp_request_param_t *)) \
  /* ucs_status_t ucp_mem_map(ucp_context_h context, const ucp_mem_map_params_t *params,               \
       ucp_mem_h *memh_p); */                                                                          \
  CE_UC(ucp_mem_map, "ucp_mem_map", ucs_status_t, (ucp_context_h, const ce_ucp_mem_map_params_t *, ucp_mem_h *)) \
  /* ucs_status_t ucp_mem_unmap(ucp_context_h context, ucp_mem_h memh); */                             \
  CE_UC(ucp_mem_unmap, "ucp_mem_unmap", ucs_status_t, (ucp_context_h, ucp_mem_h))                      \
  /* ucs_status_t ucp_worker_set_am_recv_handler(ucp_worker_h worker, const ucp_am_handler_param_t *param); \
     the handler runs inside ucp_worker_progress */                                                  \
  CE_UC(ucp_worker_set_am_recv_handler, "ucp_worker_set_am_recv_handler", ucs_status_t,               \
        (ucp_worker_h, const ce_ucp_am_handler_param_t *))                                             \
  /* ucs_status_ptr_t ucp_am_send_nbx(ucp_ep_h ep, unsigned id, const void *header, size_t header_length, \
       const void *buffer, size_t count, const ucp_request_param_t *param);  header and buffer must live \
     until it completes (UCX 1.13 has no UCP_AM_SEND_FLAG_COPY_HEADER) */                              \
  CE_UC(ucp_am_send_nbx, "ucp_am_send_nbx", ucs_status_ptr_t,                                           \
        (ucp_ep_h, unsigned, const void *, size_t, const void *, size_t, const ce_ucp_request_param_t *)) \
  /* ucs_status_ptr_t ucp_am_recv_data_nbx(ucp_worker_h worker, void *data_desc, void *buffer, size_t count, \
       const ucp_request_param_t *param);  receives a rendezvous message's data into buffer */          \
  CE_UC(ucp_am_recv_data_nbx, "ucp_am_recv_data_nbx", ucs_status_ptr_t,                                 \
        (ucp_worker_h, void *, void *, size_t, const ce_ucp_request_param_t *))                        \
  /* ucs_status_t ucp_request_check_status(void *request); */                                          \
  CE_UC(ucp_request_check_status, "ucp_request_check_status", ucs_status_t, (void *))                  \
  /* void ucp_request_free(void *request); */                                                          \
  CE_UC(ucp_request_free, "ucp_request_free", void, (void *))

struct ce_ucx_api {
#define CE_UC_FIELD(field, symbol, ret, params) ret(*field) params;
  CE_UCX_SYMBOLS(CE_UC_FIELD)
#undef CE_UC_FIELD
};

extern struct ce_ucx_api ucx;

/* dlopens UCX once (path NULL or "": libucp.so.0) and resolves the table. Idempotent. */
int ce_ucx_load(const char *path);
/* The file UCX was loaded from ("" before ce_ucx_load). */
const char *ce_ucx_file(void);
/* Sets the thread's last error to "<what>: <UCX's words>" and returns status. */
int ce_ucx_fail(int status, ucs_status_t s, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

#endif
