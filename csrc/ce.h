/*
 * ce.h — the whole C ABI of libce, the native core of ce.
 *
 * libce moves checkpoint bytes from pinned host memory into GPU buffers that inference workers
 * map through CUDA IPC (or, on the CPU backend, through shared-memory files), and broadcasts them
 * between GPUs, local or in other processes and hosts, over a communicator: NCCL on CUDA, plain
 * TCP sockets on the CPU backend (libce links no messaging library). It links no GPU library:
 * libcuda.so.1 and libnccl.so.2 are dlopen'd at run time, so it builds with a plain C compiler and
 * reports clearly what is missing.
 *
 * Rules that hold for every function (stated once, as zstd and Mooncake do):
 *  - Every function that can fail returns int: CE_OK (0), CE_INPROGRESS (1) from polls, or a
 *    negative CE_E_*. On failure the calling thread's last error (ce_last_error) says what failed,
 *    on what, in the library's words. Success leaves it untouched. Status values never change
 *    meaning once released.
 *  - Out-params come last and are named *_out.
 *  - Strings and arrays passed in are borrowed for the call only. Handles (ce_ctx_t, ce_buf_t)
 *    belong to the caller until their destroy function; regions and ops are small integer ids
 *    owned by their context.
 *  - Nothing blocks for more than a moment unless its comment says so. Long work (pinning,
 *    file reads, copies, broadcasts) is submitted and returns an op id; ce_op_poll collects it.
 *  - C code never prints, exits or aborts.
 *  - Communicators (one per context at a time) are made, used and aborted through the context's
 *    comm thread: no call of the caller's blocks on a peer. Each init starts a generation; abort
 *    or a failure (a peer that died, a timeout) ends it, and every op of an ended generation that
 *    had not completed fails (CE_E_ABORTED, or the failure's status) instead of reporting success.
 */
#ifndef CE_H
#define CE_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ABI version: major*10000 + minor*100 + patch. A signature change bumps the major. */
#define CE_ABI_VERSION 10700

/* Status codes. */
#define CE_OK 0
#define CE_INPROGRESS 1
#define CE_E_INVAL (-1)    /* bad argument: id, range, size */
#define CE_E_NOLIB (-2)    /* a library could not be dlopen'd */
#define CE_E_NOSYM (-3)    /* a required symbol is missing from a library */
#define CE_E_VERSION (-4)  /* a library is too old */
#define CE_E_CUDA (-5)     /* the CUDA driver reported an error */
#define CE_E_NCCL (-6)     /* NCCL reported an error */
#define CE_E_NOMEM (-7)    /* host or device memory exhausted */
#define CE_E_BUSY (-8)     /* the object is in use (a region with copies in flight, a registered range) */
#define CE_E_TIMEOUT (-9)  /* a deadline passed */
#define CE_E_ABORTED (-10) /* the operation was aborted */
#define CE_E_P2P (-11)     /* a transfer engine reported an error */
#define CE_E_STATE (-12)   /* the call does not fit the object's state */
#define CE_E_IO (-13)      /* a file could not be opened, read, mapped or created */
#define CE_E_PEER (-14)    /* a communicator's peer process failed: connection closed or reset, out of step */

/* Backends. */
#define CE_BACKEND_CUDA 1
#define CE_BACKEND_CPU 2

/* ce_region_map_file flags. */
#define CE_REGION_PIN 1 /* page-lock the mapping for DMA (cuMemHostRegister); CPU backend ignores it */
#define CE_REGION_WRITABLE 2 /* map read-write (ce's own files only: a pool's slots, which ce fills) */

/* ce_lib_path libraries. */
#define CE_LIB_CUDA 1
#define CE_LIB_NCCL 2

/* ce_comm_info states. */
#define CE_COMM_NONE 0    /* never initialized */
#define CE_COMM_PENDING 1 /* init submitted, not complete */
#define CE_COMM_READY 2
#define CE_COMM_DEAD 3    /* aborted or failed: init a new one */

#define CE_IPC_HANDLE_BYTES 64
#define CE_NCCL_ID_BYTES 128
#define CE_MAX_DEVICES 64

/* Only the functions below are exported; libce is built with hidden visibility. */
#define CE_API __attribute__((visibility("default")))

typedef struct ce_ctx ce_ctx_t; /* one per process and backend: devices, streams, regions, ops */
typedef struct ce_buf ce_buf_t; /* a device buffer: allocated here, or opened from another process */

/* ---- version and errors ---- */

/* CE_ABI_VERSION of the built library. Call it before binding anything else. */
CE_API uint32_t ce_abi_version(void);
/* This thread's last failure, with context. Never NULL; valid until this thread's next failure. */
CE_API const char *ce_last_error(void);
/* "CE_E_NCCL" for CE_E_NCCL, "CE_UNKNOWN" for values this build does not know. */
CE_API const char *ce_status_name(int status);

/* ---- libraries ---- */

/* dlopen the CUDA driver (path NULL: "libcuda.so.1"), resolve every symbol, cuInit. Idempotent.
 * Blocks for cuInit (tens of ms). */
CE_API int ce_cuda_load(const char *path, int *driver_version_out);
/* dlopen NCCL (path NULL: "libnccl.so.2") and resolve its symbols; needs NCCL >= 2.18. Idempotent. */
CE_API int ce_nccl_load(const char *path, int *version_out);
/* Whether a library (e.g. "libucp.so.0") can be dlopen'd here, and from which file: for ce doctor.
 * CE_E_NOLIB with dlerror's words when not. Unloads it again. */
CE_API int ce_lib_probe(const char *name, char *path, uint64_t len);
/* The file a loaded library came from (CE_LIB_CUDA, CE_LIB_NCCL), for ce doctor. */
CE_API int ce_lib_path(int lib, char *buf, uint64_t len);

/* ---- CUDA devices (need ce_cuda_load) ---- */

CE_API int ce_cuda_device_count(int *count_out);
/* One device as a JSON object: index, name, uuid ("GPU-…"), total_bytes, free_bytes, pci_bus_id,
 * compute capability. Retains the primary context to read free memory. */
CE_API int ce_cuda_device_info(int ordinal, char *json, uint64_t len);
/* Free and total memory of one device (retains its primary context). */
CE_API int ce_cuda_mem_info(int ordinal, uint64_t *free_out, uint64_t *total_out);

/* ---- contexts ---- */

/* A context over ndev devices: on CUDA the given ordinals (primary contexts retained, a copy and a
 * comm stream each); on CPU, ndev simulated devices (devices may be NULL). */
CE_API int ce_ctx_create(int backend, const int32_t *devices, int ndev, ce_ctx_t **ctx_out);
/* Aborts the communicator (so no broadcast stays stuck on a dead peer), waits for the context's
 * ops, then frees everything still held: buffers, regions. NULL is fine. Blocks (bounded). */
CE_API void ce_ctx_destroy(ce_ctx_t *ctx);
/* Restarts the clock that op times are measured against; returns its host time (CLOCK_MONOTONIC, ms). */
CE_API int ce_ctx_clock_reset(ce_ctx_t *ctx, double *host_ms_out);
/* Counts of what the context holds: [regions, region_bytes, pinned_bytes, bufs, buf_bytes, ops]. */
CE_API int ce_ctx_stats(ce_ctx_t *ctx, uint64_t *stats, uint64_t len);

/* ---- host regions ---- */

/* Allocates a page-locked host region of `bytes` (anonymous memory, huge pages where allowed, pinned
 * with cuMemHostRegister in parallel chunks, portable; CPU: not pinned).
 * Async: the region id is valid at once, usable when the op completes. */
CE_API int ce_region_alloc(ce_ctx_t *ctx, uint64_t bytes, uint32_t *region_out, uint64_t *op_out);
/* Maps a file read-only (read-write with CE_REGION_WRITABLE: then writes and file reads into the
 * region are allowed) and, with CE_REGION_PIN, page-locks the mapping in place in `threads`
 * chunks in parallel (cuMemHostRegister, portable; read-only unless writable); without, the op
 * populates the page tables (never the caller's thread). A read-only file is never modified, and
 * its descriptor is closed before this returns. Async as above; bytes_out is the file size. */
CE_API int ce_region_map_file(ce_ctx_t *ctx, const char *path, uint32_t flags, int threads, uint64_t *bytes_out,
                       uint32_t *region_out, uint64_t *op_out);
/* Reads `bytes` of a file at file_offset into a region at region_offset, `threads` preads in parallel. Async. */
CE_API int ce_region_read_file(ce_ctx_t *ctx, uint32_t region, uint64_t region_offset, const char *path, uint64_t file_offset,
                        uint64_t bytes, int threads, uint64_t *op_out);
/* Writes into an allocated region from the caller's memory (test data, small payloads). Blocks for the memcpy. */
CE_API int ce_region_write(ce_ctx_t *ctx, uint32_t region, uint64_t region_offset, const void *src, uint64_t bytes);
/* Unpins and unmaps/frees a region. CE_E_BUSY while an op on it is in flight. Async (unpinning a
 * large region takes tenths of a second); the id is invalid at once. */
CE_API int ce_region_release(ce_ctx_t *ctx, uint32_t region, uint64_t *op_out);

/* ---- device buffers ---- */

/* Allocates `bytes` on local device `dev` (index into the context's devices). With ipc, another
 * process can open it: CUDA via ce_buf_ipc_handle, CPU via a shared-memory file in shm_dir
 * (ce_buf_path), named ce-<pid>-…, locked (flock) while this process lives; the first such alloc
 * in a directory reclaims the files of dead processes there (ce_shm_reclaim). */
CE_API int ce_buf_alloc(ce_ctx_t *ctx, int dev, uint64_t bytes, int ipc, const char *shm_dir, ce_buf_t **buf_out);
/* The 64-byte CUDA IPC handle of an ipc buffer (cuIpcGetMemHandle). */
CE_API int ce_buf_ipc_handle(ce_buf_t *buf, uint8_t *handle, uint64_t len);
/* The shared-memory file of an ipc buffer on the CPU backend. */
CE_API int ce_buf_path(ce_buf_t *buf, char *path, uint64_t len);
/* Opens another process's buffer from its IPC handle on local device `dev` (cuIpcOpenMemHandle). */
CE_API int ce_buf_open_ipc(ce_ctx_t *ctx, int dev, const uint8_t *handle, uint64_t bytes, ce_buf_t **buf_out);
/* Opens another process's CPU-backend buffer by its shared-memory file (mapped read-write).
 * CE_E_INVAL when the file is shorter than `bytes` (it would fault on access). */
CE_API int ce_buf_open_path(ce_ctx_t *ctx, const char *path, uint64_t bytes, ce_buf_t **buf_out);
/* Frees an allocated buffer (and removes its shm file) or closes an opened one. Waits for the
 * context's ops that use it. NULL is fine. */
CE_API void ce_buf_destroy(ce_buf_t *buf);
/* Copies bytes out of a buffer into caller memory. Blocks until done (tests, small reads). */
CE_API int ce_buf_read(ce_buf_t *buf, uint64_t offset, void *dst, uint64_t bytes);
/* Removes shared-memory files ce-<pid>-… in dir whose process is gone (pid dead and no flock
 * held): what a killed ce left. Blocks for a readdir. removed_out (may be NULL): files removed. */
CE_API int ce_shm_reclaim(const char *dir, uint64_t *removed_out);

/* ---- the pipeline ---- */

/* H2D: copies (region, src_offset, dst_offset, bytes) quadruples from regions into buffer `dst`
 * on its device's copy stream. Starts after op `after` (0: none) has finished. Async. */
CE_API int ce_h2d_submit(ce_ctx_t *ctx, ce_buf_t *dst, const uint64_t *copies, uint64_t ncopies, uint64_t after,
                  uint64_t *op_out);
/* D2D: copies (src_offset, dst_offset, bytes) triples from `src` into `dst` (same device) on the
 * copy stream. Starts after op `after`. Async. */
CE_API int ce_d2d_submit(ce_ctx_t *ctx, ce_buf_t *dst, ce_buf_t *src, const uint64_t *copies, uint64_t ncopies,
                  uint64_t after, uint64_t *op_out);
/* Compares `bytes` of buffer `buf` at buf_offset with region bytes at region_offset. The op's value
 * is 0 when equal, else 1 + the offset of the first differing byte. Async. */
CE_API int ce_compare_submit(ce_ctx_t *ctx, ce_buf_t *buf, uint64_t buf_offset, uint32_t region, uint64_t region_offset,
                      uint64_t bytes, uint64_t *op_out);

/* ---- digests (docs/digest.md) ---- */

/* The digest of `bytes` bytes at data (docs/digest.md: 16 lowercase hex digits of digest_out).
 * Blocks for the computation, one thread (~9 GB/s): for small inputs and tests. */
CE_API int ce_digest_bytes(const void *data, uint64_t bytes, uint64_t *digest_out);
/* Digests spans of regions: spans holds (region, region_offset, bytes) triples, one tensor each;
 * digest i is span i's. Runs on up to `threads` threads (a span is cut into 16 MiB pieces, so one
 * large tensor uses them all; 1 … 64). Starts after op `after` (0: none; a thread op such as a file read,
 * CE_E_STATE for a GPU op). Async: collect with ce_digest_collect; the spans array is copied. */
CE_API int ce_digest_submit(ce_ctx_t *ctx, const uint64_t *spans, uint64_t nspans, int threads, uint64_t after,
                            uint64_t *op_out);
/* As ce_digest_submit over a buffer's spans: (buf_offset, bytes) pairs. A CPU-backend buffer is
 * digested in place; a GPU buffer by libce's kernel on its GPU (only a few sums per span come back),
 * or, where a span is not 4-aligned or the driver cannot build the kernel, read back into pinned
 * scratch in 64 MiB rounds (the next round's copy runs while one is digested). */
CE_API int ce_buf_digest_submit(ce_ctx_t *ctx, ce_buf_t *buf, const uint64_t *spans, uint64_t nspans, int threads,
                                uint64_t after, uint64_t *op_out);
/* ce_op_poll for a digest op that also copies its nspans digests into digests (room for len)
 * once done: CE_INPROGRESS, or CE_OK with digests written and the op collected, or its error.
 * CE_E_INVAL (op not collected) when len is too small. Never blocks. (ce_op_poll collects a
 * digest op too, discarding its digests.) */
CE_API int ce_digest_collect(ce_ctx_t *ctx, uint64_t op, double *times, uint64_t *digests, uint64_t len);

/* ---- deltas (DESIGN.md "Delta updates") ----
 * An element is 1, 2, 4 or 8 bytes; it changed when any of its bytes differ. A patch is `count`
 * positions (little-endian int32 element indices into the flattened tensor, ascending) and `count`
 * values (the new elements, in the same order): the load "patch" form of worker-protocol.json. */

/* Counts, per tensor, the elements that differ between two versions in host memory: spans holds
 * (old_region, old_offset, new_region, new_offset, bytes, elem_bytes) sextuples, one tensor each.
 * Runs on up to `threads` threads (16 MiB pieces). Async: collect with ce_delta_collect. */
CE_API int ce_delta_count_submit(ce_ctx_t *ctx, const uint64_t *spans, uint64_t nspans, int threads, uint64_t *op_out);
/* Writes each tensor's patch into a writable region: spans holds (old_region, old_offset,
 * new_region, new_offset, bytes, elem_bytes, out_region, positions_offset, values_offset, count)
 * tuples of ten, count being what ce_delta_count found. The op fails CE_E_STATE when a tensor's
 * count differs (its bytes changed meanwhile); a tensor of more than 2^31 elements is CE_E_INVAL.
 * Async, as above; collect with ce_delta_collect (the counts found) or ce_op_poll. */
CE_API int ce_delta_encode_submit(ce_ctx_t *ctx, const uint64_t *spans, uint64_t nspans, int threads, uint64_t *op_out);
/* ce_op_poll for a delta op that also copies its nspans counts into counts (room for len) once
 * done. CE_E_INVAL (op not collected) when len is too small. Never blocks. */
CE_API int ce_delta_collect(ce_ctx_t *ctx, uint64_t op, double *times, uint64_t *counts, uint64_t len);
/* Makes libce's GPU kernels (the digest and the patch scatter) ready on the context's device dev:
 * CE_OK at once on the CPU backend; on CUDA the driver compiles them once, and CE_E_CUDA says why it
 * cannot (a GPU buffer's digest then reads back instead; patches cannot be applied there). */
CE_API int ce_ctx_kernels(ce_ctx_t *ctx, int dev);
/* Applies patches held in buffer src into buffer dst, both host memory (CPU backend, on up to
 * `threads` threads) or both on one GPU (libce's scatter kernel; each tensor, its positions and its
 * values aligned to their elements, else CE_E_INVAL): patches holds (dst_offset, dst_bytes,
 * positions_offset, values_offset, count, elem_bytes) sextuples. A position past its tensor fails
 * the op (CE_E_INVAL, naming patch and entry) with that patch partly applied. Async. */
CE_API int ce_buf_patch_submit(ce_ctx_t *ctx, ce_buf_t *dst, ce_buf_t *src, const uint64_t *patches, uint64_t npatches,
                               int threads, uint64_t *op_out);

/* ---- communicators ---- */

/* A new communicator id, made once (on the process that hosts the rendezvous) and handed to every
 * process. CUDA: ncclGetUniqueId (endpoint ignored). CPU: binds a TCP listener at endpoint
 * ("tcp://127.0.0.1:0": a numeric, non-wildcard address others can reach; port 0 picks one) that
 * the context keeps for its next ce_comm_init; the id carries the address and a random token. */
CE_API int ce_comm_unique_id(ce_ctx_t *ctx, const char *endpoint, uint8_t *id, uint64_t len);
/* Creates the communicator of nranks ranks, this context's devices being ranks first_rank … +ndev-1
 * (CUDA: one NCCL communicator per device, one group, non-blocking; CPU: TCP, a ring of processes).
 * Async: the op fails with CE_E_TIMEOUT naming the missing ranks after timeout_ms (0: no limit),
 * CE_E_ABORTED after ce_comm_abort. CE_E_BUSY while an init is pending, CE_E_STATE while one is ready. */
CE_API int ce_comm_init(ce_ctx_t *ctx, const uint8_t *id, uint64_t id_len, int nranks, int first_rank, int timeout_ms,
                        uint64_t *op_out);
/* Ends the current generation at once, pending init included: its ops fail with CE_E_ABORTED,
 * a stuck peer no longer blocks (ncclCommAbort / sockets closed on the comm thread). Never blocks. */
CE_API int ce_comm_abort(ce_ctx_t *ctx);
/* [state (CE_COMM_*), generation, nranks, first_rank, status that ended it (0 while alive)], as
 * many as len. Never blocks. */
CE_API int ce_comm_info(ce_ctx_t *ctx, int64_t *info, uint64_t len);

/* A new NCCL unique id (on the rank that creates the communicators). Needs ce_nccl_load. */
CE_API int ce_nccl_unique_id(uint8_t *id, uint64_t len);
/* ce_comm_init on the CUDA backend without a timeout of its own (kept for ABI 1.1 callers):
 * abortable with ce_nccl_abort / ce_comm_abort. */
CE_API int ce_nccl_init(ce_ctx_t *ctx, const uint8_t *id, uint64_t id_len, int nranks, int first_rank, uint64_t *op_out);
/* Broadcast `bytes` from rank `root`'s buffer src (at src_offset) into dsts[i] (one per local
 * device, at dst_offset), through the communicator; src is NULL (or ignored) where this process
 * holds not the root. CPU without a communicator: root is a local device index. Starts after op
 * `after`. Async (issued by the comm thread); a failure or abort of any rank fails the op, and a
 * root's op completes only once every process has the bytes (CPU). Every process must submit the
 * same broadcasts in the same order. CE_E_ABORTED at once when the generation has ended. */
CE_API int ce_bcast_submit(ce_ctx_t *ctx, int root, ce_buf_t *src, uint64_t src_offset, ce_buf_t *const *dsts,
                    uint64_t ndsts, uint64_t dst_offset, uint64_t bytes, uint64_t after, uint64_t *op_out);
/* ce_comm_abort (kept for ABI 1.1 callers). */
CE_API int ce_nccl_abort(ce_ctx_t *ctx);

/* ---- transfer engine (P2P: a new instance pulls bytes from other hosts' pinned memory) ----
 *
 * A transfer endpoint is one engine instance on a context, with a progress thread of libce's own.
 * The owner of the bytes registers its memory and hands the remote-key blob of each registration
 * to readers out of band, with its address blob; a reader connects to the owner's address (a peer)
 * and reads ranges named by the key into its own host memory. Blobs are bytes with a ce header
 * (magic, engine): a blob of another engine or a damaged one is refused by name. A read op
 * completes through ce_op_poll like every op; its value is the bytes it read.
 *
 * Engines: UCX (libucp.so.0: each read is a request the owner's progress thread answers with the
 * bytes, over what UCX_TLS allows: TCP, shared memory, RDMA; the UCX_* environment applies) and
 * Mooncake (libtransfer_engine.so, its C API: P2P-handshake metadata, no etcd; the transport
 * CE_MOONCAKE_PROTO names, default tcp; peers reach it at CE_MOONCAKE_HOST, default the host name).
 * Mooncake cannot cancel a transfer: a read from a source that stops answering fails its peer at
 * the deadline, but ends only when Mooncake ends it or the endpoint is destroyed.
 *
 * The owner answers only ranges inside a registration of its own; a reader that dies mid-read
 * fails the owner's answers to it, nothing else. Keep UCX on a trusted network all the same: the
 * transports do not authenticate peers. */

#define CE_XFER_UCX 1
#define CE_XFER_MOONCAKE 2

typedef struct ce_xfer ce_xfer_t; /* a transfer endpoint */

/* dlopens an engine's library (path NULL: libucp.so.0, libtransfer_engine.so) and resolves its
 * symbols; CE_E_NOLIB with dlopen's words when it cannot. Idempotent. json (may be NULL): for ce
 * doctor, {"engine","version","path","transports":["tcp/lo",...],"memory_types":["host",...]};
 * for UCX it makes a context to ask (tens of ms), so the UCX_* environment shows. */
CE_API int ce_xfer_load(int engine, const char *path, char *json, uint64_t len);
/* Creates an endpoint of a loaded engine on ctx and starts its progress thread. */
CE_API int ce_xfer_create(ce_ctx_t *ctx, int engine, ce_xfer_t **xfer_out);
/* Closes every peer (the reads in flight fail CE_E_ABORTED), frees every registration, stops the
 * thread. ce_ctx_destroy destroys the context's endpoints too. NULL is fine. Blocks (bounded: the
 * engine gets 3 s to end the closed peers' handshakes and reads). */
CE_API void ce_xfer_destroy(ce_xfer_t *xfer);
/* The endpoint's address blob, what a peer passes to ce_xfer_connect. bytes_out: its size, also
 * set when len is too small (CE_E_INVAL). */
CE_API int ce_xfer_address(ce_xfer_t *xfer, uint8_t *addr, uint64_t len, uint64_t *bytes_out);
/* Registers a ready region for remote reads (ce_region_release says CE_E_BUSY until it is
 * deregistered). Blocks for the registration: a moment over TCP; with RDMA the NIC's
 * registration, which grows with the size. */
CE_API int ce_xfer_register_region(ce_xfer_t *xfer, uint32_t region, uint32_t *reg_out);
/* Registers a CPU-backend buffer for remote reads; ce_buf_destroy deregisters it. */
CE_API int ce_xfer_register_buf(ce_xfer_t *xfer, ce_buf_t *buf, uint32_t *reg_out);
/* The remote-key blob of a registration (engine key, base address, size) for the owner to hand
 * to readers. bytes_out as for ce_xfer_address. */
CE_API int ce_xfer_rkey(ce_xfer_t *xfer, uint32_t reg, uint8_t *rkey, uint64_t len, uint64_t *bytes_out);
/* Withdraws a registration: new reads of it are refused at once, and it goes once the answers
 * being sent from it are done; CE_E_BUSY if some still are after 3 s (the registration stays,
 * withdrawn: call again). */
CE_API int ce_xfer_deregister(ce_xfer_t *xfer, uint32_t reg);
/* Connects to a peer's address blob; name (may be NULL) names it in every message ("host 3").
 * Non-blocking: the connection completes in the progress thread, reads may be submitted at once. */
CE_API int ce_xfer_connect(ce_xfer_t *xfer, const uint8_t *addr, uint64_t len, const char *name, uint32_t *peer_out);
/* Closes a peer now: its reads in flight fail CE_E_ABORTED, later ones at once. Never blocks. */
CE_API int ce_xfer_disconnect(ce_xfer_t *xfer, uint32_t peer);
/* Reads from peer's memory named by rkey into region: reads holds (remote_offset, region_offset,
 * bytes) triples, one op for all. The op fails with the first error: CE_E_PEER naming the peer
 * when it dies or the path to it breaks; CE_E_TIMEOUT when not done timeout_ms after submission
 * (0: no limit; one read cannot be cancelled alone, so the peer is closed and its other reads fail
 * too); CE_E_ABORTED after ce_xfer_disconnect or destroy. A peer that failed before fails the call
 * at once. Many ops may be in flight. Async; the array is copied. */
CE_API int ce_xfer_read_region(ce_xfer_t *xfer, uint32_t peer, const uint8_t *rkey, uint64_t rkey_len, uint32_t region,
                               const uint64_t *reads, uint64_t nreads, int timeout_ms, uint64_t *op_out);
/* As ce_xfer_read_region into a CPU-backend buffer: (remote_offset, buf_offset, bytes) triples.
 * A GPU buffer is refused: read into a host region, then ce_h2d_submit. */
CE_API int ce_xfer_read_buf(ce_xfer_t *xfer, uint32_t peer, const uint8_t *rkey, uint64_t rkey_len, ce_buf_t *buf,
                            const uint64_t *reads, uint64_t nreads, int timeout_ms, uint64_t *op_out);
/* [peers alive, registrations, registered bytes, read ops in flight, bytes read], as many as len. */
CE_API int ce_xfer_stats(ce_xfer_t *xfer, uint64_t *stats, uint64_t len);

/* ---- ops ---- */

/* CE_INPROGRESS while op runs; CE_OK once done (the op is then forgotten), or its error. times
 * (2 doubles, may be NULL): start and end in ms since the context's clock reset; value (may be
 * NULL): the op's result (region id, compare result). Never blocks. */
CE_API int ce_op_poll(ce_ctx_t *ctx, uint64_t op, double *times, uint64_t *value);
/* As ce_op_poll, but waits up to timeout_ms. Blocks: for tools and tests, never the event loop. */
CE_API int ce_op_wait(ce_ctx_t *ctx, uint64_t op, int timeout_ms, double *times, uint64_t *value);

#ifdef __cplusplus
}
#endif
#endif
