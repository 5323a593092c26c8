// libce through bun:ffi: the symbol table (mirroring csrc/ce.h, in its order), the library lookup,
// the ABI check, status → NativeError, and the calls that need no context (libraries, devices).
// ce.ts builds the context and buffer classes on it.
import { dlopen, type Pointer } from "bun:ffi";
import { existsSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { config } from "../base/config";
import { NativeError } from "../base/errors";

/** csrc/ce.h CE_ABI_VERSION this build of ce is written against. */
export const ABI_VERSION = 10700;

export const CE_OK = 0;
export const CE_INPROGRESS = 1;

const symbols = {
  // uint32_t ce_abi_version(void);
  ce_abi_version: { args: [], returns: "u32" },
  // const char *ce_last_error(void);
  ce_last_error: { args: [], returns: "cstring" },
  // const char *ce_status_name(int status);
  ce_status_name: { args: ["i32"], returns: "cstring" },
  // int ce_cuda_load(const char *path, int *driver_version_out);
  ce_cuda_load: { args: ["ptr", "ptr"], returns: "i32" },
  // int ce_nccl_load(const char *path, int *version_out);
  ce_nccl_load: { args: ["ptr", "ptr"], returns: "i32" },
  // int ce_lib_probe(const char *name, char *path, uint64_t len);
  ce_lib_probe: { args: ["ptr", "ptr", "u64"], returns: "i32" },
  // int ce_lib_path(int lib, char *buf, uint64_t len);
  ce_lib_path: { args: ["i32", "ptr", "u64"], returns: "i32" },
  // int ce_cuda_device_count(int *count_out);
  ce_cuda_device_count: { args: ["ptr"], returns: "i32" },
  // int ce_cuda_device_info(int ordinal, char *json, uint64_t len);
  ce_cuda_device_info: { args: ["i32", "ptr", "u64"], returns: "i32" },
  // int ce_cuda_mem_info(int ordinal, uint64_t *free_out, uint64_t *total_out);
  ce_cuda_mem_info: { args: ["i32", "ptr", "ptr"], returns: "i32" },
  // int ce_ctx_create(int backend, const int32_t *devices, int ndev, ce_ctx_t **ctx_out);
  ce_ctx_create: { args: ["i32", "ptr", "i32", "ptr"], returns: "i32" },
  // void ce_ctx_destroy(ce_ctx_t *ctx);
  ce_ctx_destroy: { args: ["ptr"], returns: "void" },
  // int ce_ctx_clock_reset(ce_ctx_t *ctx, double *host_ms_out);
  ce_ctx_clock_reset: { args: ["ptr", "ptr"], returns: "i32" },
  // int ce_ctx_stats(ce_ctx_t *ctx, uint64_t *stats, uint64_t len);
  ce_ctx_stats: { args: ["ptr", "ptr", "u64"], returns: "i32" },
  // int ce_region_alloc(ce_ctx_t *ctx, uint64_t bytes, uint32_t *region_out, uint64_t *op_out);
  ce_region_alloc: { args: ["ptr", "u64", "ptr", "ptr"], returns: "i32" },
  // int ce_region_map_file(ce_ctx_t *ctx, const char *path, uint32_t flags, int threads, uint64_t *bytes_out,
  //                        uint32_t *region_out, uint64_t *op_out);
  ce_region_map_file: { args: ["ptr", "ptr", "u32", "i32", "ptr", "ptr", "ptr"], returns: "i32" },
  // int ce_region_read_file(ce_ctx_t *ctx, uint32_t region, uint64_t region_offset, const char *path,
  //                         uint64_t file_offset, uint64_t bytes, int threads, uint64_t *op_out);
  ce_region_read_file: { args: ["ptr", "u32", "u64", "ptr", "u64", "u64", "i32", "ptr"], returns: "i32" },
  // int ce_region_write(ce_ctx_t *ctx, uint32_t region, uint64_t region_offset, const void *src, uint64_t bytes);
  ce_region_write: { args: ["ptr", "u32", "u64", "ptr", "u64"], returns: "i32" },
  // int ce_region_release(ce_ctx_t *ctx, uint32_t region, uint64_t *op_out);
  ce_region_release: { args: ["ptr", "u32", "ptr"], returns: "i32" },
  // int ce_buf_alloc(ce_ctx_t *ctx, int dev, uint64_t bytes, int ipc, const char *shm_dir, ce_buf_t **buf_out);
  ce_buf_alloc: { args: ["ptr", "i32", "u64", "i32", "ptr", "ptr"], returns: "i32" },
  // int ce_buf_ipc_handle(ce_buf_t *buf, uint8_t *handle, uint64_t len);
  ce_buf_ipc_handle: { args: ["ptr", "ptr", "u64"], returns: "i32" },
  // int ce_buf_path(ce_buf_t *buf, char *path, uint64_t len);
  ce_buf_path: { args: ["ptr", "ptr", "u64"], returns: "i32" },
  // int ce_buf_open_ipc(ce_ctx_t *ctx, int dev, const uint8_t *handle, uint64_t bytes, ce_buf_t **buf_out);
  ce_buf_open_ipc: { args: ["ptr", "i32", "ptr", "u64", "ptr"], returns: "i32" },
  // int ce_buf_open_path(ce_ctx_t *ctx, const char *path, uint64_t bytes, ce_buf_t **buf_out);
  ce_buf_open_path: { args: ["ptr", "ptr", "u64", "ptr"], returns: "i32" },
  // void ce_buf_destroy(ce_buf_t *buf);
  ce_buf_destroy: { args: ["ptr"], returns: "void" },
  // int ce_buf_read(ce_buf_t *buf, uint64_t offset, void *dst, uint64_t bytes);
  ce_buf_read: { args: ["ptr", "u64", "ptr", "u64"], returns: "i32" },
  // int ce_shm_reclaim(const char *dir, uint64_t *removed_out);
  ce_shm_reclaim: { args: ["ptr", "ptr"], returns: "i32" },
  // int ce_h2d_submit(ce_ctx_t *ctx, ce_buf_t *dst, const uint64_t *copies, uint64_t ncopies, uint64_t after,
  //                   uint64_t *op_out);
  ce_h2d_submit: { args: ["ptr", "ptr", "ptr", "u64", "u64", "ptr"], returns: "i32" },
  // int ce_d2d_submit(ce_ctx_t *ctx, ce_buf_t *dst, ce_buf_t *src, const uint64_t *copies, uint64_t ncopies,
  //                   uint64_t after, uint64_t *op_out);
  ce_d2d_submit: { args: ["ptr", "ptr", "ptr", "ptr", "u64", "u64", "ptr"], returns: "i32" },
  // int ce_compare_submit(ce_ctx_t *ctx, ce_buf_t *buf, uint64_t buf_offset, uint32_t region,
  //                       uint64_t region_offset, uint64_t bytes, uint64_t *op_out);
  ce_compare_submit: { args: ["ptr", "ptr", "u64", "u32", "u64", "u64", "ptr"], returns: "i32" },
  // int ce_digest_bytes(const void *data, uint64_t bytes, uint64_t *digest_out);
  ce_digest_bytes: { args: ["ptr", "u64", "ptr"], returns: "i32" },
  // int ce_digest_submit(ce_ctx_t *ctx, const uint64_t *spans, uint64_t nspans, int threads, uint64_t after,
  //                      uint64_t *op_out);
  ce_digest_submit: { args: ["ptr", "ptr", "u64", "i32", "u64", "ptr"], returns: "i32" },
  // int ce_buf_digest_submit(ce_ctx_t *ctx, ce_buf_t *buf, const uint64_t *spans, uint64_t nspans, int threads,
  //                          uint64_t after, uint64_t *op_out);
  ce_buf_digest_submit: { args: ["ptr", "ptr", "ptr", "u64", "i32", "u64", "ptr"], returns: "i32" },
  // int ce_digest_collect(ce_ctx_t *ctx, uint64_t op, double *times, uint64_t *digests, uint64_t len);
  ce_digest_collect: { args: ["ptr", "u64", "ptr", "ptr", "u64"], returns: "i32" },
  // int ce_delta_count_submit(ce_ctx_t *ctx, const uint64_t *spans, uint64_t nspans, int threads, uint64_t *op_out);
  ce_delta_count_submit: { args: ["ptr", "ptr", "u64", "i32", "ptr"], returns: "i32" },
  // int ce_delta_encode_submit(ce_ctx_t *ctx, const uint64_t *spans, uint64_t nspans, int threads, uint64_t *op_out);
  ce_delta_encode_submit: { args: ["ptr", "ptr", "u64", "i32", "ptr"], returns: "i32" },
  // int ce_delta_collect(ce_ctx_t *ctx, uint64_t op, double *times, uint64_t *counts, uint64_t len);
  ce_delta_collect: { args: ["ptr", "u64", "ptr", "ptr", "u64"], returns: "i32" },
  // int ce_ctx_kernels(ce_ctx_t *ctx, int dev);
  ce_ctx_kernels: { args: ["ptr", "i32"], returns: "i32" },
  // int ce_buf_patch_submit(ce_ctx_t *ctx, ce_buf_t *dst, ce_buf_t *src, const uint64_t *patches, uint64_t npatches,
  //                         int threads, uint64_t *op_out);
  ce_buf_patch_submit: { args: ["ptr", "ptr", "ptr", "ptr", "u64", "i32", "ptr"], returns: "i32" },
  // int ce_comm_unique_id(ce_ctx_t *ctx, const char *endpoint, uint8_t *id, uint64_t len);
  ce_comm_unique_id: { args: ["ptr", "ptr", "ptr", "u64"], returns: "i32" },
  // int ce_comm_init(ce_ctx_t *ctx, const uint8_t *id, uint64_t id_len, int nranks, int first_rank, int timeout_ms,
  //                  uint64_t *op_out);
  ce_comm_init: { args: ["ptr", "ptr", "u64", "i32", "i32", "i32", "ptr"], returns: "i32" },
  // int ce_comm_abort(ce_ctx_t *ctx);
  ce_comm_abort: { args: ["ptr"], returns: "i32" },
  // int ce_comm_info(ce_ctx_t *ctx, int64_t *info, uint64_t len);
  ce_comm_info: { args: ["ptr", "ptr", "u64"], returns: "i32" },
  // int ce_nccl_unique_id(uint8_t *id, uint64_t len);
  ce_nccl_unique_id: { args: ["ptr", "u64"], returns: "i32" },
  // int ce_nccl_init(ce_ctx_t *ctx, const uint8_t *id, uint64_t id_len, int nranks, int first_rank, uint64_t *op_out);
  ce_nccl_init: { args: ["ptr", "ptr", "u64", "i32", "i32", "ptr"], returns: "i32" },
  // int ce_bcast_submit(ce_ctx_t *ctx, int root, ce_buf_t *src, uint64_t src_offset, ce_buf_t *const *dsts,
  //                     uint64_t ndsts, uint64_t dst_offset, uint64_t bytes, uint64_t after, uint64_t *op_out);
  ce_bcast_submit: { args: ["ptr", "i32", "ptr", "u64", "ptr", "u64", "u64", "u64", "u64", "ptr"], returns: "i32" },
  // int ce_nccl_abort(ce_ctx_t *ctx);
  ce_nccl_abort: { args: ["ptr"], returns: "i32" },
  // int ce_xfer_load(int engine, const char *path, char *json, uint64_t len);
  ce_xfer_load: { args: ["i32", "ptr", "ptr", "u64"], returns: "i32" },
  // int ce_xfer_create(ce_ctx_t *ctx, int engine, ce_xfer_t **xfer_out);
  ce_xfer_create: { args: ["ptr", "i32", "ptr"], returns: "i32" },
  // void ce_xfer_destroy(ce_xfer_t *xfer);  blocks (bounded)
  ce_xfer_destroy: { args: ["ptr"], returns: "void" },
  // int ce_xfer_address(ce_xfer_t *xfer, uint8_t *addr, uint64_t len, uint64_t *bytes_out);
  ce_xfer_address: { args: ["ptr", "ptr", "u64", "ptr"], returns: "i32" },
  // int ce_xfer_register_region(ce_xfer_t *xfer, uint32_t region, uint32_t *reg_out);
  ce_xfer_register_region: { args: ["ptr", "u32", "ptr"], returns: "i32" },
  // int ce_xfer_register_buf(ce_xfer_t *xfer, ce_buf_t *buf, uint32_t *reg_out);
  ce_xfer_register_buf: { args: ["ptr", "ptr", "ptr"], returns: "i32" },
  // int ce_xfer_rkey(ce_xfer_t *xfer, uint32_t reg, uint8_t *rkey, uint64_t len, uint64_t *bytes_out);
  ce_xfer_rkey: { args: ["ptr", "u32", "ptr", "u64", "ptr"], returns: "i32" },
  // int ce_xfer_deregister(ce_xfer_t *xfer, uint32_t reg);
  ce_xfer_deregister: { args: ["ptr", "u32"], returns: "i32" },
  // int ce_xfer_connect(ce_xfer_t *xfer, const uint8_t *addr, uint64_t len, const char *name, uint32_t *peer_out);
  ce_xfer_connect: { args: ["ptr", "ptr", "u64", "ptr", "ptr"], returns: "i32" },
  // int ce_xfer_disconnect(ce_xfer_t *xfer, uint32_t peer);
  ce_xfer_disconnect: { args: ["ptr", "u32"], returns: "i32" },
  // int ce_xfer_read_region(ce_xfer_t *xfer, uint32_t peer, const uint8_t *rkey, uint64_t rkey_len, uint32_t region,
  //                         const uint64_t *reads, uint64_t nreads, int timeout_ms, uint64_t *op_out);
  ce_xfer_read_region: { args: ["ptr", "u32", "ptr", "u64", "u32", "ptr", "u64", "i32", "ptr"], returns: "i32" },
  // int ce_xfer_read_buf(ce_xfer_t *xfer, uint32_t peer, const uint8_t *rkey, uint64_t rkey_len, ce_buf_t *buf,
  //                      const uint64_t *reads, uint64_t nreads, int timeout_ms, uint64_t *op_out);
  ce_xfer_read_buf: { args: ["ptr", "u32", "ptr", "u64", "ptr", "ptr", "u64", "i32", "ptr"], returns: "i32" },
  // int ce_xfer_stats(ce_xfer_t *xfer, uint64_t *stats, uint64_t len);
  ce_xfer_stats: { args: ["ptr", "ptr", "u64"], returns: "i32" },
  // int ce_op_poll(ce_ctx_t *ctx, uint64_t op, double *times, uint64_t *value);
  ce_op_poll: { args: ["ptr", "u64", "ptr", "ptr"], returns: "i32" },
  // int ce_op_wait(ce_ctx_t *ctx, uint64_t op, int timeout_ms, double *times, uint64_t *value);
  ce_op_wait: { args: ["ptr", "u64", "i32", "ptr", "ptr"], returns: "i32" },
} as const;

type LibCe = ReturnType<typeof dlopen<typeof symbols>>["symbols"];

let lib: LibCe | undefined;
let libFile = "";

/** Where libce.so is looked for, in order. */
export function libCandidates(): string[] {
  const out: string[] = [];
  if (config.CE_LIB) out.push(resolve(config.CE_LIB));
  out.push(join(dirname(process.execPath), "libce.so"));
  out.push(resolve(import.meta.dir, "../../dist/libce.so"));
  return [...new Set(out)];
}

/** Loads libce once and checks its ABI. */
export function libce(): LibCe {
  if (lib) return lib;
  const tried: string[] = [];
  for (const file of libCandidates()) {
    if (!existsSync(file)) {
      tried.push(`${file}: no such file`);
      continue;
    }
    let handle: ReturnType<typeof dlopen<typeof symbols>>;
    try {
      handle = dlopen(file, symbols);
    } catch (err) {
      tried.push(`${file}: ${err instanceof Error ? err.message : String(err)}`);
      continue;
    }
    const abi = handle.symbols.ce_abi_version();
    if (Math.floor(abi / 10000) !== Math.floor(ABI_VERSION / 10000) || abi < ABI_VERSION) {
      handle.close();
      throw new NativeError(-4, "CE_E_VERSION", "libce", `${file} is ABI ${formatAbi(abi)}, this ce needs ${formatAbi(ABI_VERSION)}`, {
        hint: "rebuild it with `bun build.ts` (or set CE_LIB to a matching libce.so)",
      });
    }
    lib = handle.symbols;
    libFile = file;
    return lib;
  }
  throw new NativeError(-2, "CE_E_NOLIB", "libce", `libce.so not found; tried:\n  ${tried.join("\n  ")}`, {
    hint: "build it with `bun build.ts`, or point CE_LIB at it",
  });
}

export function libcePath(): string {
  libce();
  return libFile;
}

function formatAbi(v: number): string {
  return `${Math.floor(v / 10000)}.${Math.floor(v / 100) % 100}.${v % 100}`;
}

/** Turns a status into a NativeError carrying libce's last error. */
export function check(status: number, what: string): void {
  if (status === CE_OK) return;
  const l = libce();
  throw new NativeError(status, String(l.ce_status_name(status)), what, String(l.ce_last_error()));
}

export function cstr(s: string): Buffer {
  return Buffer.from(`${s}\0`, "utf8");
}

export function readCString(buf: Uint8Array): string {
  const end = buf.indexOf(0);
  return new TextDecoder().decode(buf.subarray(0, end < 0 ? buf.length : end));
}

/** A u64 from C as a JS number, refusing values past 2^53. */
export function u64(v: bigint | number, what: string): number {
  const n = Number(v);
  if (!Number.isSafeInteger(n)) throw new NativeError(-1, "CE_E_INVAL", what, `value ${v} is beyond 2^53`);
  return n;
}

export function ptrOf(out: BigUint64Array, what: string): Pointer {
  return u64(out[0]!, what) as Pointer;
}

// ---- libraries and devices ----

export function cudaLoad(): { driverVersion: number } {
  const out = new Int32Array(1);
  check(libce().ce_cuda_load(cstr(config.CE_LIBCUDA), out), "loading the CUDA driver");
  return { driverVersion: out[0]! };
}

export function ncclLoad(): { version: number } {
  const out = new Int32Array(1);
  check(libce().ce_nccl_load(cstr(config.CE_LIBNCCL), out), "loading NCCL");
  return { version: out[0]! };
}

/** The file `name` loads from here, or a NativeError with dlopen's words. */
export function probeLibrary(name: string): string {
  const buf = new Uint8Array(4096);
  const n = cstr(name);
  check(libce().ce_lib_probe(n, buf, buf.length), `looking for ${name}`);
  return readCString(buf);
}

export function libPath(which: "cuda" | "nccl"): string {
  const buf = new Uint8Array(4096);
  check(libce().ce_lib_path(which === "cuda" ? 1 : 2, buf, buf.length), `locating ${which}`);
  return readCString(buf);
}

export interface GpuInfo {
  index: number;
  name: string;
  uuid: string;
  total_bytes: number;
  free_bytes: number;
  pci_bus_id: string;
  compute_capability: string;
}

export function cudaDeviceCount(): number {
  const out = new Int32Array(1);
  check(libce().ce_cuda_device_count(out), "counting GPUs");
  return out[0]!;
}

export function cudaDeviceInfo(ordinal: number): GpuInfo {
  const buf = new Uint8Array(2048);
  check(libce().ce_cuda_device_info(ordinal, buf, buf.length), `reading GPU ${ordinal}`);
  return JSON.parse(readCString(buf)) as GpuInfo;
}

export function cudaMemInfo(ordinal: number): { freeBytes: number; totalBytes: number } {
  const free = new BigUint64Array(1);
  const total = new BigUint64Array(1);
  check(libce().ce_cuda_mem_info(ordinal, free, total), `reading memory of GPU ${ordinal}`);
  return { freeBytes: u64(free[0]!, "free"), totalBytes: u64(total[0]!, "total") };
}

/** Removes the shared-memory files that killed ce processes left in dir; returns how many. */
export function shmReclaim(dir: string): number {
  const out = new BigUint64Array(1);
  const d = cstr(dir);
  check(libce().ce_shm_reclaim(d, out), `reclaiming shared memory in ${dir}`);
  return u64(out[0]!, "removed");
}

export function ncclUniqueId(): Uint8Array {
  const id = new Uint8Array(128);
  check(libce().ce_nccl_unique_id(id, id.length), "creating an NCCL unique id");
  return id;
}
