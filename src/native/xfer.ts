// Transfer endpoints over libce (csrc/ce.h "transfer engine"): the owner of pinned bytes registers
// them and hands out its address and remote keys; a reader connects to the owner and pulls ranges
// into its own regions or CPU buffers. Reads are ops, awaited like every other op.
import type { Pointer } from "bun:ffi";
import { config } from "../base/config";
import { NativeError } from "../base/errors";
import { type Buf, type Ctx, type OpId, type OpResult, check, cstr, libce, ptrOf, readCString, u64 } from "./ce";

export type XferEngine = "ucx" | "mooncake";

const ENGINES: Record<XferEngine, { id: number; lib: () => string }> = {
  ucx: { id: 1, lib: () => config.CE_UCX_LIB },
  mooncake: { id: 2, lib: () => config.CE_MOONCAKE_LIB },
};

/** Time a read op gets, past its native deadline, to report that deadline itself. */
const READ_GRACE_MS = 2_000;
/** Blobs are a few hundred bytes (UCX: the worker's transports); room for many RDMA devices. */
const BLOB_ROOM = 64 * 1024;

export interface XferInfo {
  engine: XferEngine;
  /** absent where the library has no version call (Mooncake) */
  version?: string;
  path: string;
  /** "tcp/lo", "rc_mlx5/mlx5_0:1", ...: what the engine may use here, under the UCX_* environment */
  transports: string[];
  memoryTypes: string[];
}

/** Loads an engine's library (CE_UCX_LIB, CE_MOONCAKE_LIB) and says what it offers; throws with dlopen's words. */
export function xferLoad(engine: XferEngine): XferInfo {
  const json = new Uint8Array(16 * 1024);
  load(engine, json);
  const raw = JSON.parse(readCString(json)) as { version?: string; path: string; transports: string[]; memory_types: string[] };
  return { engine, ...(raw.version ? { version: raw.version } : {}), path: raw.path, transports: raw.transports, memoryTypes: raw.memory_types };
}

/** json null: load only (describing makes a UCX context, tens of ms). */
function load(engine: XferEngine, json: Uint8Array | null): void {
  const path = cstr(ENGINES[engine].lib());
  check(libce().ce_xfer_load(ENGINES[engine].id, path, json, json ? json.length : 0), `loading the ${engine} transfer engine`);
}

export interface XferStats {
  peers: number;
  registrations: number;
  registeredBytes: number;
  readsInFlight: number;
  bytesRead: number;
}

export interface Registration {
  id: number;
  /** what readers pass to read*: the engine's key, base address and size */
  rkey: Uint8Array;
}

export interface ReadOptions {
  /** from submission; a read not done by then closes its peer (one read cannot be cancelled alone) */
  timeoutMs: number;
  signal?: AbortSignal;
}

/** A transfer endpoint on a context: registrations, peers, reads. */
export class Xfer {
  #handle: Pointer | null;

  private constructor(
    readonly ctx: Ctx,
    handle: Pointer,
    readonly engine: XferEngine,
  ) {
    this.#handle = handle;
  }

  static create(ctx: Ctx, engine: XferEngine = "ucx"): Xfer {
    load(engine, null);
    const out = new BigUint64Array(1);
    const what = `creating a ${engine} transfer endpoint`;
    check(libce().ce_xfer_create(ctx.handle, ENGINES[engine].id, out), what);
    return ctx.own(new Xfer(ctx, ptrOf(out, what), engine));
  }

  get handle(): Pointer {
    if (this.#handle === null) throw new NativeError(-12, "CE_E_STATE", "transfer endpoint", "the endpoint is closed");
    return this.#handle;
  }

  /** What a peer passes to connect(). */
  address(): Uint8Array {
    return blob((buf, n) => libce().ce_xfer_address(this.handle, buf, buf.length, n), "reading the endpoint's address");
  }

  registerRegion(region: number): Registration {
    const out = new Uint32Array(1);
    check(libce().ce_xfer_register_region(this.handle, region, out), `registering region ${region} for remote reads`);
    return { id: out[0]!, rkey: this.#rkey(out[0]!) };
  }

  registerBuf(buf: Buf): Registration {
    const out = new Uint32Array(1);
    check(libce().ce_xfer_register_buf(this.handle, buf.handle, out), "registering a CPU buffer for remote reads");
    return { id: out[0]!, rkey: this.#rkey(out[0]!) };
  }

  deregister(reg: number): void {
    check(libce().ce_xfer_deregister(this.handle, reg), `deregistering registration ${reg}`);
  }

  /** Connects to a peer's address (non-blocking); name appears in every error about it. */
  connect(address: Uint8Array, name: string): number {
    const out = new Uint32Array(1);
    const n = cstr(name);
    check(libce().ce_xfer_connect(this.handle, address, address.byteLength, n, out), `connecting to ${name}`);
    return out[0]!;
  }

  /** Closes a peer now: its reads in flight fail. */
  disconnect(peer: number): void {
    check(libce().ce_xfer_disconnect(this.handle, peer), `disconnecting peer ${peer}`);
  }

  /** reads: (remoteOffset, regionOffset, bytes) triples; one op for all. */
  readRegionSubmit(peer: number, rkey: Uint8Array, region: number, reads: BigUint64Array, timeoutMs: number): OpId {
    const op = new BigUint64Array(1);
    check(
      libce().ce_xfer_read_region(this.handle, peer, rkey, rkey.byteLength, region, reads, triples(reads), nativeMs(timeoutMs), op),
      `reading from peer ${peer} into region ${region}`,
    );
    return op[0]!;
  }

  /** reads: (remoteOffset, bufOffset, bytes) triples into a CPU-backend buffer; one op for all. */
  readBufSubmit(peer: number, rkey: Uint8Array, buf: Buf, reads: BigUint64Array, timeoutMs: number): OpId {
    const op = new BigUint64Array(1);
    check(
      libce().ce_xfer_read_buf(this.handle, peer, rkey, rkey.byteLength, buf.handle, reads, triples(reads), nativeMs(timeoutMs), op),
      `reading from peer ${peer} into a CPU buffer`,
    );
    return op[0]!;
  }

  /** Reads into a region and resolves once every byte is there (the op's value: bytes read). */
  readRegion(peer: number, rkey: Uint8Array, region: number, reads: BigUint64Array, opts: ReadOptions): Promise<OpResult> {
    const op = this.readRegionSubmit(peer, rkey, region, reads, opts.timeoutMs);
    return this.#settle(op, peer, `reading ${triples(reads)} ranges from peer ${peer} into region ${region}`, opts);
  }

  /** Reads into a CPU-backend buffer and resolves once every byte is there. */
  readBuf(peer: number, rkey: Uint8Array, buf: Buf, reads: BigUint64Array, opts: ReadOptions): Promise<OpResult> {
    const op = this.readBufSubmit(peer, rkey, buf, reads, opts.timeoutMs);
    return this.#settle(op, peer, `reading ${triples(reads)} ranges from peer ${peer} into a CPU buffer`, opts);
  }

  stats(): XferStats {
    const v = new BigUint64Array(5);
    check(libce().ce_xfer_stats(this.handle, v, 5), "reading transfer endpoint stats");
    const n = (i: number) => u64(v[i]!, "stats");
    return { peers: n(0), registrations: n(1), registeredBytes: n(2), readsInFlight: n(3), bytesRead: n(4) };
  }

  /** Fails the reads in flight, closes every peer, frees every registration. Blocks (bounded). Idempotent. */
  close(): void {
    if (this.#handle === null) return;
    libce().ce_xfer_destroy(this.#handle);
    this.#handle = null;
    this.ctx.forget(this);
  }

  /** The context was destroyed, and this endpoint with it. */
  invalidate(): void {
    this.#handle = null;
  }

  [Symbol.dispose](): void {
    this.close();
  }

  #rkey(reg: number): Uint8Array {
    return blob((buf, n) => libce().ce_xfer_rkey(this.handle, reg, buf, buf.length, n), `reading the remote key of registration ${reg}`);
  }

  /**
   * The op's result. The native deadline ends a late read; should the wait outlast it anyway, or
   * the signal abort it, the peer is closed and the op collected before this rejects, so no read
   * stays behind writing into memory the caller will reuse.
   */
  async #settle(op: OpId, peer: number, what: string, opts: ReadOptions): Promise<OpResult> {
    const timeoutMs = opts.timeoutMs > 0 ? opts.timeoutMs + READ_GRACE_MS : Number.POSITIVE_INFINITY;
    try {
      return await this.ctx.wait(op, { timeoutMs, what, signal: opts.signal });
    } catch (err) {
      if (!(err instanceof NativeError) && this.#handle !== null) {
        this.disconnect(peer);
        await this.ctx.wait(op, { timeoutMs: 30_000, what: `${what}, disconnected` }).catch(() => undefined);
      }
      throw err;
    }
  }
}

function blob(call: (buf: Uint8Array, bytes: BigUint64Array) => number, what: string): Uint8Array {
  const buf = new Uint8Array(BLOB_ROOM);
  const n = new BigUint64Array(1);
  check(call(buf, n), what);
  return buf.slice(0, u64(n[0]!, what));
}

function triples(reads: BigUint64Array): number {
  if (reads.length % 3 !== 0) throw new NativeError(-1, "CE_E_INVAL", "reading ranges", `${reads.length} values are not whole triples`);
  return reads.length / 3;
}

function nativeMs(ms: number): number {
  return Math.min(Math.max(0, Math.ceil(ms)), 2 ** 31 - 1);
}
