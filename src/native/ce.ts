// The context and buffer classes over libce (libce.ts holds the symbol table and the loader): no other
// module sees a pointer or a raw status; every long call is an op collected without blocking.
import type { Pointer } from "bun:ffi";
import type { Backend } from "../base/backend";
import { config } from "../base/config";
import { NativeError, TimeoutError } from "../base/errors";
import { pollUntil } from "../base/poll";
import { CE_INPROGRESS, check, cstr, cudaLoad, libce, ptrOf, readCString, u64 } from "./libce";

export * from "./libce";
export type { Backend } from "../base/backend";

// ---- ops ----

export type OpId = bigint;

export interface OpResult {
  /** start and end in ms since the context's clock reset */
  startMs: number;
  endMs: number;
  value: number;
}

const REGION_PIN = 1;
const REGION_WRITABLE = 2;

export type CommState = "none" | "pending" | "ready" | "dead";

export interface CommInfo {
  state: CommState;
  /** 0 before the first init; each init starts a new generation */
  generation: number;
  nranks: number;
  firstRank: number;
  /** CE_E_ABORTED, CE_E_PEER, ...: what ended a dead generation */
  endedBy?: string;
}

const COMM_STATES: CommState[] = ["none", "pending", "ready", "dead"];

/** Time an init op gets, past its native timeout, to report that timeout before ce aborts it. */
const INIT_GRACE_MS = 2_000;

export interface ContextStats {
  regions: number;
  regionBytes: number;
  pinnedBytes: number;
  bufs: number;
  bufBytes: number;
  ops: number;
}

// ---- digests (docs/digest.md) ----

/** A tensor digest as it travels in frames and logs: 16 lowercase hex digits. */
export function formatDigest(d: bigint): string {
  return d.toString(16).padStart(16, "0");
}

/** The inverse of formatDigest; throws on anything but 16 hex digits. */
export function parseDigest(hex: string): bigint {
  if (!/^[0-9a-f]{16}$/.test(hex)) throw new NativeError(-1, "CE_E_INVAL", "parsing a digest", `"${hex}" is not 16 lowercase hex digits`);
  return BigInt(`0x${hex}`);
}

/** The digest of bytes in JS memory, on this thread (~9 GB/s): small inputs and tests. */
export function digestBytes(data: Uint8Array): bigint {
  const out = new BigUint64Array(1);
  check(libce().ce_digest_bytes(data.byteLength ? data : null, data.byteLength, out), `digesting ${data.byteLength} bytes`);
  return out[0]!;
}

export interface DigestResult {
  /** one per span, in order */
  digests: bigint[];
  /** the op's digesting (not its wait for `after`), in ms since the context's clock reset */
  startMs: number;
  endMs: number;
}

/** What a delta op found: changed elements per tensor. */
export interface DeltaResult {
  counts: number[];
  /** in ms since the context's clock reset */
  startMs: number;
  endMs: number;
}

export interface DigestOptions {
  /** threads that digest (default 1); a span is cut into 16 MiB pieces shared among them */
  threads?: number;
  /** a thread op (a file read into the region) to start after; 0n: none */
  after?: OpId;
}

/** One libce context: devices, streams, regions, buffers and ops. */
export class Ctx {
  #handle: Pointer | null;
  /** Buffers and transfer endpoints made here: the context's destroy frees them in C, so their handles die with it. */
  readonly #owned = new Set<{ invalidate(): void }>();
  readonly backend: Backend;
  readonly devices: readonly number[];
  /** performance.now() at the last clock reset: op times are relative to it */
  clockOriginMs = 0;

  private constructor(handle: Pointer, backend: Backend, devices: number[]) {
    this.#handle = handle;
    this.backend = backend;
    this.devices = devices;
    this.clockReset();
  }

  static create(backend: Backend, devices: number[]): Ctx {
    if (backend === "cuda") cudaLoad();
    const out = new BigUint64Array(1);
    const list = Int32Array.from(devices);
    const what = backend === "cuda" ? `opening GPU ${devices.join(",")}` : `creating ${devices.length} CPU devices`;
    check(libce().ce_ctx_create(backend === "cuda" ? 1 : 2, list, devices.length, out), what);
    return new Ctx(ptrOf(out, what), backend, devices);
  }

  get handle(): Pointer {
    if (this.#handle === null) throw new NativeError(-12, "CE_E_STATE", "context", "the context is closed");
    return this.#handle;
  }

  get ndev(): number {
    return this.devices.length;
  }

  clockReset(): void {
    check(libce().ce_ctx_clock_reset(this.handle, null), "resetting the op clock");
    this.clockOriginMs = performance.now();
  }

  stats(): ContextStats {
    const v = new BigUint64Array(6);
    check(libce().ce_ctx_stats(this.handle, v, 6), "reading context stats");
    const n = (i: number) => u64(v[i]!, "stats");
    return { regions: n(0), regionBytes: n(1), pinnedBytes: n(2), bufs: n(3), bufBytes: n(4), ops: n(5) };
  }

  regionAlloc(bytes: number): { region: number; op: OpId } {
    const region = new Uint32Array(1);
    const op = new BigUint64Array(1);
    check(libce().ce_region_alloc(this.handle, bytes, region, op), `allocating ${bytes} bytes of pinned memory`);
    return { region: region[0]!, op: op[0]! };
  }

  /** writable: ce's own files only (a pool's slots); a user's file is always mapped read-only. */
  regionMapFile(path: string, opts: { pin: boolean; threads: number; writable?: boolean }): { region: number; bytes: number; op: OpId } {
    const bytes = new BigUint64Array(1);
    const region = new Uint32Array(1);
    const op = new BigUint64Array(1);
    const p = cstr(path);
    check(
      libce().ce_region_map_file(this.handle, p, (opts.pin ? REGION_PIN : 0) | (opts.writable ? REGION_WRITABLE : 0), opts.threads, bytes, region, op),
      `mapping ${path}`,
    );
    return { region: region[0]!, bytes: u64(bytes[0]!, "bytes"), op: op[0]! };
  }

  regionReadFile(region: number, regionOffset: number, path: string, fileOffset: number, bytes: number, threads: number): OpId {
    const op = new BigUint64Array(1);
    const p = cstr(path);
    check(libce().ce_region_read_file(this.handle, region, regionOffset, p, fileOffset, bytes, threads, op), `reading ${path}`);
    return op[0]!;
  }

  regionWrite(region: number, regionOffset: number, data: Uint8Array): void {
    check(libce().ce_region_write(this.handle, region, regionOffset, data, data.byteLength), `writing region ${region}`);
  }

  regionRelease(region: number): OpId {
    const op = new BigUint64Array(1);
    check(libce().ce_region_release(this.handle, region, op), `releasing region ${region}`);
    return op[0]!;
  }

  bufAlloc(dev: number, bytes: number, opts: { ipc: boolean; shmDir?: string }): Buf {
    const out = new BigUint64Array(1);
    const dir = cstr(opts.shmDir ?? config.CE_SHM_DIR);
    const what = `allocating ${bytes} bytes on ${this.deviceName(dev)}`;
    check(libce().ce_buf_alloc(this.handle, dev, bytes, opts.ipc ? 1 : 0, dir, out), what);
    return this.own(new Buf(this, ptrOf(out, what), dev, bytes));
  }

  bufOpenIpc(dev: number, handle: Uint8Array, bytes: number): Buf {
    if (handle.byteLength !== 64) throw new NativeError(-1, "CE_E_INVAL", "opening an IPC handle", `handle has ${handle.byteLength} bytes, not 64`);
    const out = new BigUint64Array(1);
    const what = `opening an IPC buffer on ${this.deviceName(dev)}`;
    check(libce().ce_buf_open_ipc(this.handle, dev, handle, bytes, out), what);
    return this.own(new Buf(this, ptrOf(out, what), dev, bytes));
  }

  bufOpenPath(path: string, bytes: number): Buf {
    const out = new BigUint64Array(1);
    const p = cstr(path);
    check(libce().ce_buf_open_path(this.handle, p, bytes, out), `opening ${path}`);
    return this.own(new Buf(this, ptrOf(out, path), 0, bytes));
  }

  /** copies: (region, srcOffset, dstOffset, bytes) quadruples. */
  h2d(dst: Buf, copies: BigUint64Array, after: OpId = 0n): OpId {
    const op = new BigUint64Array(1);
    check(libce().ce_h2d_submit(this.handle, dst.handle, copies, copies.length / 4, after, op), `H2D into ${this.deviceName(dst.dev)}`);
    return op[0]!;
  }

  /** copies: (srcOffset, dstOffset, bytes) triples. */
  d2d(dst: Buf, src: Buf, copies: BigUint64Array, after: OpId = 0n): OpId {
    const op = new BigUint64Array(1);
    check(libce().ce_d2d_submit(this.handle, dst.handle, src.handle, copies, copies.length / 3, after, op), `D2D on ${this.deviceName(dst.dev)}`);
    return op[0]!;
  }

  compare(buf: Buf, bufOffset: number, region: number, regionOffset: number, bytes: number): OpId {
    const op = new BigUint64Array(1);
    check(libce().ce_compare_submit(this.handle, buf.handle, bufOffset, region, regionOffset, bytes, op), "comparing bytes");
    return op[0]!;
  }

  /** spans: (region, regionOffset, bytes) triples, one tensor each. Collect with digestCollect. */
  digestSubmit(spans: BigUint64Array, opts: DigestOptions = {}): OpId {
    const op = new BigUint64Array(1);
    const n = spanCount(spans, 3);
    check(libce().ce_digest_submit(this.handle, n ? spans : null, n, opts.threads ?? 1, opts.after ?? 0n, op), `digesting ${n} spans of regions`);
    return op[0]!;
  }

  /** spans: (bufOffset, bytes) pairs of a CPU-backend buffer. Collect with digestCollect. */
  bufDigestSubmit(buf: Buf, spans: BigUint64Array, opts: DigestOptions = {}): OpId {
    const op = new BigUint64Array(1);
    const n = spanCount(spans, 2);
    check(
      libce().ce_buf_digest_submit(this.handle, buf.handle, n ? spans : null, n, opts.threads ?? 1, opts.after ?? 0n, op),
      `digesting ${n} spans of a buffer on ${this.deviceName(buf.dev)}`,
    );
    return op[0]!;
  }

  /** undefined while a digest op runs; its nspans digests once done (the op is then collected); throws its error. */
  digestCollect(op: OpId, nspans: number, what: string): DigestResult | undefined {
    const times = new Float64Array(2);
    const out = new BigUint64Array(Math.max(1, nspans));
    const status = libce().ce_digest_collect(this.handle, op, times, out, nspans);
    if (status === CE_INPROGRESS) return undefined;
    check(status, what);
    return { digests: Array.from(out.subarray(0, nspans)), startMs: times[0]!, endMs: times[1]! };
  }

  /** Digests spans of regions ((region, regionOffset, bytes) triples) on threads; the event loop stays free. */
  digest(spans: BigUint64Array, opts: DigestOptions & { timeoutMs: number; signal?: AbortSignal }): Promise<DigestResult> {
    const op = this.digestSubmit(spans, opts);
    const n = spans.length / 3;
    const what = `digesting ${n} spans of regions`;
    return pollUntil(() => this.digestCollect(op, n, what), { timeoutMs: opts.timeoutMs, what, signal: opts.signal });
  }

  /** Digests spans of a CPU-backend buffer ((bufOffset, bytes) pairs) on threads. */
  bufDigest(buf: Buf, spans: BigUint64Array, opts: DigestOptions & { timeoutMs: number; signal?: AbortSignal }): Promise<DigestResult> {
    const op = this.bufDigestSubmit(buf, spans, opts);
    const n = spans.length / 2;
    const what = `digesting ${n} spans of a buffer on ${this.deviceName(buf.dev)}`;
    return pollUntil(() => this.digestCollect(op, n, what), { timeoutMs: opts.timeoutMs, what, signal: opts.signal });
  }

  /**
   * Changed elements per tensor between two versions in host memory: spans holds (oldRegion,
   * oldOffset, newRegion, newOffset, bytes, elemBytes) sextuples. On threads; the event loop stays free.
   */
  deltaCount(spans: BigUint64Array, opts: { threads: number; timeoutMs: number; signal?: AbortSignal }): Promise<DeltaResult> {
    return this.#delta(spans, 6, opts, "ce_delta_count_submit", "comparing");
  }

  /**
   * Writes each tensor's patch (int32 positions, then values) into a writable region: spans holds
   * (oldRegion, oldOffset, newRegion, newOffset, bytes, elemBytes, outRegion, positionsOffset,
   * valuesOffset, count) tuples, count as deltaCount found it.
   */
  deltaEncode(spans: BigUint64Array, opts: { threads: number; timeoutMs: number; signal?: AbortSignal }): Promise<DeltaResult> {
    return this.#delta(spans, 10, opts, "ce_delta_encode_submit", "encoding patches of");
  }

  #delta(
    spans: BigUint64Array,
    stride: number,
    opts: { threads: number; timeoutMs: number; signal?: AbortSignal },
    symbol: "ce_delta_count_submit" | "ce_delta_encode_submit",
    verb: string,
  ): Promise<DeltaResult> {
    const op = new BigUint64Array(1);
    const n = spanCount(spans, stride);
    const what = `${verb} ${n} tensors of two versions`;
    check(libce()[symbol](this.handle, n ? spans : null, n, opts.threads, op), what);
    const collect = (): DeltaResult | undefined => {
      const times = new Float64Array(2);
      const out = new BigUint64Array(Math.max(1, n));
      const status = libce().ce_delta_collect(this.handle, op[0]!, times, out, n);
      if (status === CE_INPROGRESS) return undefined;
      check(status, what);
      return { counts: Array.from(out.subarray(0, n), (c) => u64(c, "count")), startMs: times[0]!, endMs: times[1]! };
    };
    return pollUntil(collect, { timeoutMs: opts.timeoutMs, what, signal: opts.signal });
  }

  /** Makes libce's GPU kernels ready on device dev (compiled once); a NativeError says why the driver cannot. */
  kernels(dev: number): void {
    check(libce().ce_ctx_kernels(this.handle, dev), `preparing libce's kernels on ${this.deviceName(dev)}`);
  }

  /**
   * Applies patches held in src into dst, both host memory or both on one GPU: patches holds
   * (dstOffset, dstBytes, positionsOffset, valuesOffset, count, elemBytes) sextuples. Async.
   */
  bufPatch(dst: Buf, src: Buf, patches: BigUint64Array, threads: number): OpId {
    const op = new BigUint64Array(1);
    const n = spanCount(patches, 6);
    check(libce().ce_buf_patch_submit(this.handle, dst.handle, src.handle, n ? patches : null, n, threads, op), `applying ${n} patches on ${this.deviceName(dst.dev)}`);
    return op[0]!;
  }

  /**
   * A communicator id for commInit: NCCL's on CUDA; on the CPU backend a TCP listener bound at
   * `endpoint` (numeric address, port 0 picks one) that this context keeps for its next commInit.
   */
  commUniqueId(endpoint = "tcp://127.0.0.1:0"): Uint8Array {
    const id = new Uint8Array(128);
    const ep = cstr(endpoint);
    check(libce().ce_comm_unique_id(this.handle, ep, id, id.length), `creating a communicator id at ${endpoint}`);
    return id;
  }

  /**
   * Submits the communicator's init: nranks ranks, this context's devices being firstRank... The op
   * fails with CE_E_TIMEOUT after timeoutMs (0: never), CE_E_ABORTED after commAbort(); a second
   * init while one is pending throws CE_E_BUSY.
   */
  commInit(id: Uint8Array, nranks: number, firstRank: number, timeoutMs: number): OpId {
    const op = new BigUint64Array(1);
    check(
      libce().ce_comm_init(this.handle, id, id.byteLength, nranks, firstRank, Math.min(Math.max(0, Math.ceil(timeoutMs)), 2 ** 31 - 1), op),
      `creating the communicator (ranks ${firstRank}..${firstRank + this.ndev - 1} of ${nranks})`,
    );
    return op[0]!;
  }

  /**
   * Creates the communicator and waits for it, never leaving an init behind: on its deadline, or
   * when signal aborts, the init is aborted and collected before this rejects, so the next call
   * can start afresh.
   */
  async commCreate(id: Uint8Array, nranks: number, firstRank: number, opts: { timeoutMs: number; signal?: AbortSignal }): Promise<void> {
    const what = `creating the communicator (ranks ${firstRank}..${firstRank + this.ndev - 1} of ${nranks})`;
    const op = this.commInit(id, nranks, firstRank, opts.timeoutMs);
    try {
      await this.wait(op, { timeoutMs: opts.timeoutMs > 0 ? opts.timeoutMs + INIT_GRACE_MS : Number.POSITIVE_INFINITY, what, signal: opts.signal });
    } catch (err) {
      if (!(err instanceof NativeError)) {
        this.commAbort();
        await this.wait(op, { timeoutMs: 30_000, what: `${what}, aborted` }).catch(() => undefined);
      }
      throw err;
    }
  }

  /** Ends the communicator now, a pending init included: its unfinished ops fail. Never blocks. */
  commAbort(): void {
    check(libce().ce_comm_abort(this.handle), "aborting the communicator");
  }

  commInfo(): CommInfo {
    const v = new BigInt64Array(5);
    check(libce().ce_comm_info(this.handle, v, 5), "reading the communicator state");
    const status = Number(v[4]!);
    return {
      state: COMM_STATES[Number(v[0]!)] ?? "dead",
      generation: Number(v[1]!),
      nranks: Number(v[2]!),
      firstRank: Number(v[3]!),
      ...(status ? { endedBy: String(libce().ce_status_name(status)) } : {}),
    };
  }

  /** CUDA: commInit without a native timeout (kept for callers of ABI 1.1); abortable. */
  ncclInit(id: Uint8Array, nranks: number, firstRank: number): OpId {
    const op = new BigUint64Array(1);
    check(libce().ce_nccl_init(this.handle, id, id.byteLength, nranks, firstRank, op), `creating NCCL communicators (${nranks} ranks)`);
    return op[0]!;
  }

  /**
   * Broadcast from rank `root` (a device index on the CPU backend without a communicator) into one
   * buffer per local device; src is null where this process holds not the root.
   */
  bcast(root: number, src: Buf | null, srcOffset: number, dsts: Buf[], dstOffset: number, bytes: number, after: OpId = 0n): OpId {
    const op = new BigUint64Array(1);
    const list = BigUint64Array.from(dsts.map((b) => BigInt(b.handle as number)));
    check(
      libce().ce_bcast_submit(this.handle, root, src ? src.handle : null, srcOffset, list, dsts.length, dstOffset, bytes, after, op),
      `broadcast from rank ${root}`,
    );
    return op[0]!;
  }

  /** commAbort (kept for its callers). */
  ncclAbort(): void {
    this.commAbort();
  }

  /** undefined while the op runs; its result once done; throws its error. */
  poll(op: OpId, what: string): OpResult | undefined {
    const times = new Float64Array(2);
    const value = new BigUint64Array(1);
    const status = libce().ce_op_poll(this.handle, op, times, value);
    if (status === CE_INPROGRESS) return undefined;
    check(status, what);
    return { startMs: times[0]!, endMs: times[1]!, value: u64(value[0]!, "op value") };
  }

  /** Resolves when the op completes; the event loop stays free meanwhile. */
  wait(op: OpId, opts: { timeoutMs: number; what: string; signal?: AbortSignal }): Promise<OpResult> {
    return pollUntil(() => this.poll(op, opts.what), opts);
  }

  /** Blocking wait: for tools and tests that have nothing else to do. */
  waitBlocking(op: OpId, timeoutMs: number, what: string): OpResult {
    const times = new Float64Array(2);
    const value = new BigUint64Array(1);
    const status = libce().ce_op_wait(this.handle, op, timeoutMs, times, value);
    if (status === -9) throw new TimeoutError(`${what}: not done after ${timeoutMs} ms`);
    check(status, what);
    return { startMs: times[0]!, endMs: times[1]!, value: u64(value[0]!, "op value") };
  }

  deviceName(dev: number): string {
    return this.backend === "cuda" ? `GPU ${this.devices[dev]}` : `CPU device ${dev}`;
  }

  /** Waits for every op, frees every buffer and region still held. Idempotent. */
  close(): void {
    if (this.#handle === null) return;
    libce().ce_ctx_destroy(this.#handle);
    this.#handle = null;
    for (const b of this.#owned) b.invalidate();
    this.#owned.clear();
  }

  /** Ties a native object made on this context (a transfer endpoint) to its life. */
  own<T extends { invalidate(): void }>(child: T): T {
    this.#owned.add(child);
    return child;
  }

  /** Called by Buf.close() and the other owned objects' close(). */
  forget(child: { invalidate(): void }): void {
    this.#owned.delete(child);
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

/** A device buffer (a GPU allocation or CPU shared memory), allocated or opened. */
export class Buf {
  #handle: Pointer | null;

  constructor(
    readonly ctx: Ctx,
    handle: Pointer,
    readonly dev: number,
    readonly bytes: number,
  ) {
    this.#handle = handle;
  }

  get handle(): Pointer {
    if (this.#handle === null) throw new NativeError(-12, "CE_E_STATE", "buffer", "the buffer is closed");
    return this.#handle;
  }

  ipcHandle(): Uint8Array {
    const out = new Uint8Array(64);
    check(libce().ce_buf_ipc_handle(this.handle, out, 64), "exporting an IPC handle");
    return out;
  }

  path(): string {
    const out = new Uint8Array(4096);
    check(libce().ce_buf_path(this.handle, out, out.length), "reading a buffer's path");
    return readCString(out);
  }

  read(offset: number, bytes: number): Uint8Array {
    const out = new Uint8Array(bytes);
    check(libce().ce_buf_read(this.handle, offset, out, bytes), "reading a buffer");
    return out;
  }

  close(): void {
    if (this.#handle === null) return;
    libce().ce_buf_destroy(this.#handle);
    this.#handle = null;
    this.ctx.forget(this);
  }

  /** The context was destroyed, and this buffer with it. */
  invalidate(): void {
    this.#handle = null;
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

function spanCount(spans: BigUint64Array, per: number): number {
  if (spans.length % per !== 0) throw new NativeError(-1, "CE_E_INVAL", "digesting spans", `${spans.length} values are not whole ${per}-tuples`);
  return spans.length / per;
}
