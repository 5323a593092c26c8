// The reference receiver behind `ce worker`: what an inference engine's worker does, without
// Python. It maps the slots (CUDA IPC handle, or the CPU backend's shared-memory file), copies
// every tensor into its own parameter memory (allocated once and kept across updates, as an
// engine's weights are), and when ce asks it to verify, digests its parameters (docs/digest.md).
// Protocol 2: it keeps its mapping across updates while ce keeps the buffer (worker-protocol.json,
// "the kept mapping"): an open naming the buffer it maps costs no re-open. Delta updates: it answers
// an open with delta_from with "delta" and applies patches into its parameters with libce (threads on
// the CPU backend, libce's scatter kernel on a GPU).
import { availableParallelism } from "node:os";
import { CeError, InputError, errorMessage } from "../base/errors";
import { logger } from "../base/log";
import { elementBytes } from "../checkpoint/safetensors";
import { type Backend, type Buf, type Ctx, formatDigest } from "../native/ce";
import {
  type OpenRequest,
  type WirePatch,
  isPatch,
  PROTOCOL_VERSION,
  type Reply,
  type Request,
  type WireTensor,
  type WorkerState,
  encodeReply,
  parseRequest,
  transition,
} from "../wire/protocol";
import { defaultContext } from "../transport/zmq";

const log = logger("worker");

const ALIGN = 256;
const OP_TIMEOUT_MS = 10 * 60_000;

interface Param {
  offset: number;
  nbytes: number;
  dtype: string;
}

export interface ReceiverOptions {
  ctx: Ctx;
  endpoint: string;
  signal?: AbortSignal;
}

/** What a mapping was made from: an open matching all of it may be served from that mapping. */
function mappingKey(req: OpenRequest, ipcHandle: Uint8Array | undefined): string {
  const handle = ipcHandle ? Buffer.from(ipcHandle).toString("hex") : "";
  return JSON.stringify([req.buffer_id, req.backend, req.buffer_bytes, req.path, handle]);
}

class Receiver {
  state: WorkerState = "idle";
  slot: Buf | undefined;
  /** The open the mapping was made for, when it named a buffer_id (so it may be kept); else undefined. */
  slotKey: string | undefined;
  /** The buffer_id of the mapping kept or in use now, for tests and logs. */
  mappedId: string | undefined;
  open: OpenRequest | undefined;
  params: Buf | undefined;
  paramBytes = 0;
  readonly layout = new Map<string, Param>();
  nextOffset = 0;
  /** The update shape the layout was made for: a checkpoint of another shape starts a new layout. */
  layoutKey = "";
  /** tensors received in the current session */
  received = new Set<string>();
  /** The last update finished here, told to ce at open; undefined once a failed update may have left partial weights. */
  holds: { checkpoint: string; version: number } | undefined;
  /** This session is a delta from the version held at open: patches may apply. */
  deltaApplies = false;
  /** A verified session's digests of each bucket's tensors, taken as soon as the bucket is in place. */
  bucketDigests: Promise<Record<string, string>>[] = [];

  constructor(readonly ctx: Ctx) {}

  /** Room for every tensor of the update, each 256-aligned; grown (and the layout reset) only when too small. */
  ensureParams(req: OpenRequest): void {
    const need = (req.bytes ?? req.buffer_bytes) + (req.tensors ?? 0) * ALIGN;
    const key = `${req.bytes}/${req.tensors}`;
    if (key !== this.layoutKey) {
      this.layout.clear();
      this.nextOffset = 0;
      this.layoutKey = key;
    }
    if (this.params && this.paramBytes >= need) return;
    this.params?.close();
    this.layout.clear();
    this.nextOffset = 0;
    this.params = this.ctx.bufAlloc(0, Math.max(need, ALIGN), { ipc: false });
    this.paramBytes = Math.max(need, ALIGN);
  }

  place(t: WireTensor): Param {
    const known = this.layout.get(t.name);
    if (known) {
      if (known.nbytes !== t.nbytes) throw new InputError("E_TENSOR_SIZE", `tensor ${t.name} has ${t.nbytes} bytes, was ${known.nbytes}`);
      return known;
    }
    const p = { offset: this.nextOffset, nbytes: t.nbytes, dtype: t.dtype };
    if (p.offset + p.nbytes > this.paramBytes) {
      throw new InputError("E_PARAM_SPACE", `tensor ${t.name} does not fit in the ${this.paramBytes} bytes of parameters`);
    }
    this.nextOffset = Math.ceil((p.offset + p.nbytes) / ALIGN) * ALIGN;
    this.layout.set(t.name, p);
    return p;
  }

  dropSlot(): void {
    this.slot?.close();
    this.slot = undefined;
    this.slotKey = undefined;
    this.mappedId = undefined;
  }

  /** Maps the open's buffer, or keeps the mapping of it this worker already has; says which. */
  mapFor(req: OpenRequest, ipcHandle: Uint8Array | undefined): boolean {
    const key = req.buffer_id !== undefined ? mappingKey(req, ipcHandle) : undefined;
    if (this.slot && key !== undefined && key === this.slotKey) return true;
    this.dropSlot();
    this.slot = ipcHandle ? this.ctx.bufOpenIpc(0, ipcHandle, req.buffer_bytes) : this.ctx.bufOpenPath(req.path, req.buffer_bytes);
    this.slotKey = key;
    this.mappedId = req.buffer_id;
    return false;
  }

  async handle(req: Request, ipcHandle: Uint8Array | undefined): Promise<Reply> {
    const next = transition(this.state, req.op);
    let reply: Reply = { ok: true };
    switch (req.op) {
      case "open": {
        const backend: Backend = req.backend;
        if (backend !== this.ctx.backend) throw new InputError("E_BACKEND", `ce sent a ${backend} buffer to a ${this.ctx.backend} worker`);
        // ce checks the open reply before it sends a patch; refusing patches at load too keeps a wrong delta from ever applying.
        this.deltaApplies = req.delta_from !== undefined && this.holds?.checkpoint === req.checkpoint && this.holds.version === req.delta_from;
        const kept = this.mapFor(req, ipcHandle);
        try {
          this.ensureParams(req);
        } catch (err) {
          this.dropSlot(); // a failed open keeps nothing
          throw err;
        }
        this.open = req;
        this.received.clear();
        this.bucketDigests = [];
        // An open without buffer_id is answered as protocol 1 answers it; one with it learns what happened.
        if (req.buffer_id !== undefined) reply = { ok: true, protocol: PROTOCOL_VERSION, buffer_id: req.buffer_id, kept };
        if (this.holds) reply = { ...reply, ...this.holds };
        if (req.delta_from !== undefined && this.kernelsReady()) reply = { ...reply, protocol: PROTOCOL_VERSION, delta: true };
        if (kept) log.debug(`open ${req.checkpoint}@${req.version}: kept the mapping of buffer ${req.buffer_id}`);
        break;
      }
      case "load": {
        const slot = this.slot!;
        const dense = req.tensors.filter((t): t is WireTensor => !isPatch(t));
        const patches = req.tensors.filter(isPatch);
        if (patches.length && !this.deltaApplies) {
          throw new InputError("E_DELTA_BASE", `tensor ${patches[0]!.name}: a patch, but this update is no delta onto the version this worker held at open`);
        }
        const copies = new BigUint64Array(dense.length * 3);
        dense.forEach((t, i) => {
          if (t.offset + t.nbytes > slot.bytes) {
            throw new InputError("E_TENSOR_RANGE", `tensor ${t.name}: ${t.nbytes} bytes at ${t.offset} overrun the buffer of ${slot.bytes}`);
          }
          const p = this.place(t);
          copies[i * 3] = BigInt(t.offset);
          copies[i * 3 + 1] = BigInt(p.offset);
          copies[i * 3 + 2] = BigInt(t.nbytes);
          this.received.add(t.name);
        });
        this.holds = undefined; // from here until finish, the parameters are neither the old version nor the new
        // The reply hands the slot back to ce: only once the copies are done.
        const patchList = this.patchList(patches, slot);
        // The copies and the patches write different tensors: they run together, and both end before the reply.
        const ended = await Promise.allSettled([
          this.ctx.wait(this.ctx.d2d(this.params!, slot, copies), { timeoutMs: OP_TIMEOUT_MS, what: `copying bucket ${req.bucket}` }),
          patches.length
            ? this.ctx.wait(this.ctx.bufPatch(this.params!, slot, patchList, Math.min(16, availableParallelism())), {
                timeoutMs: OP_TIMEOUT_MS,
                what: `applying ${patches.length} patches of bucket ${req.bucket}`,
              })
            : undefined,
        ]);
        for (const e of ended) if (e.status === "rejected") throw e.reason;
        // Digested now, beside the next bucket's H2D, rather than all at finish.
        if (this.open?.verify) {
          const d = this.digestsOf([...dense.map((t) => t.name), ...patches.map((p) => p.name)]);
          d.catch(() => undefined); // finish reports it
          this.bucketDigests.push(d);
        }
        break;
      }
      case "release":
        // ce keeps the buffer: so does this worker, for the next open naming it.
        if (!(req.keep && this.slotKey !== undefined)) this.dropSlot();
        break;
      case "finish":
        reply = { ok: true, tensors: this.received.size, bytes: [...this.received].reduce((s, n) => s + this.layout.get(n)!.nbytes, 0) };
        if (this.open?.verify) reply.digests = await this.digests();
        this.holds = { checkpoint: this.open!.checkpoint, version: this.open!.version };
        break;
      case "abort":
        if (this.received.size) this.holds = undefined;
        this.dropSlot();
        log.warn(`update aborted by ce: ${req.reason}`);
        break;
    }
    this.state = next;
    return reply;
  }

  #kernels: boolean | undefined;

  /** Whether patches can be applied here: always on the CPU backend; on a GPU once libce's kernels compile (asked once). */
  kernelsReady(): boolean {
    if (this.#kernels === undefined) {
      try {
        this.ctx.kernels(0);
        this.#kernels = true;
      } catch (err) {
        log.warn(`deltas declined: ${errorMessage(err)}`);
        this.#kernels = false;
      }
    }
    return this.#kernels;
  }

  /** Where each patch lands in the parameters: (dstOffset, dstBytes, positionsOffset, valuesOffset, count, elemBytes). */
  patchList(patches: WirePatch[], slot: Buf): BigUint64Array {
    const out = new BigUint64Array(patches.length * 6);
    patches.forEach((p, i) => {
      const param = this.layout.get(p.name);
      const es = elementBytes(p.dtype);
      if (!param) throw new InputError("E_DELTA_BASE", `tensor ${p.name}: a patch for a tensor this worker does not hold`);
      if (es === undefined || param.dtype !== p.dtype) throw new InputError("E_TENSOR_DTYPE", `tensor ${p.name}: a patch of ${p.dtype}, the parameter is ${param.dtype}`);
      if (p.positions_offset + 4 * p.count > slot.bytes || p.values_offset + es * p.count > slot.bytes) {
        throw new InputError("E_TENSOR_RANGE", `tensor ${p.name}: a patch of ${p.count} entries at ${p.positions_offset} overruns the buffer of ${slot.bytes}`);
      }
      out.set([BigInt(param.offset), BigInt(param.nbytes), BigInt(p.positions_offset), BigInt(p.values_offset), BigInt(p.count), BigInt(es)], 6 * i);
      this.received.add(p.name);
    });
    return out;
  }

  /** The digest of every tensor received this session (after a delta: every tensor held), as its parameter holds it. */
  async digests(): Promise<Record<string, string>> {
    const names = this.open?.delta_from !== undefined ? [...this.layout.keys()] : [...this.received];
    const taken: Record<string, string> = Object.assign({}, ...(await Promise.all(this.bucketDigests)));
    // After a delta the tensors it left alone are digested here; everything received already was.
    const rest = await this.digestsOf(names.filter((n) => taken[n] === undefined));
    return Object.fromEntries(names.map((n) => [n, taken[n] ?? rest[n]!]));
  }

  async digestsOf(names: string[]): Promise<Record<string, string>> {
    if (names.length === 0) return {};
    const spans = new BigUint64Array(names.length * 2);
    names.forEach((n, i) => {
      const p = this.layout.get(n)!;
      spans[2 * i] = BigInt(p.offset);
      spans[2 * i + 1] = BigInt(p.nbytes);
    });
    const r = await this.ctx.bufDigest(this.params!, spans, { threads: Math.min(16, availableParallelism()), timeoutMs: OP_TIMEOUT_MS });
    return Object.fromEntries(names.map((n, i) => [n, formatDigest(r.digests[i]!)]));
  }

  close(): void {
    this.dropSlot();
    this.params?.close();
    this.params = undefined;
  }
}

/** Serves update sessions on endpoint until the signal aborts. */
export async function runReceiver(opts: ReceiverOptions): Promise<void> {
  const sock = defaultContext().socket("REP");
  sock.connect(opts.endpoint);
  const rx = new Receiver(opts.ctx);
  log.debug(`connected to ${opts.endpoint}`);
  try {
    for (;;) {
      let frames: Uint8Array[];
      try {
        frames = await sock.recv({ signal: opts.signal, what: `request on ${opts.endpoint}` });
      } catch (err) {
        if (opts.signal?.aborted) return;
        throw err;
      }
      let reply: Reply;
      try {
        const { req, ipcHandle } = parseRequest(frames);
        reply = await rx.handle(req, ipcHandle);
      } catch (err) {
        // The session stays as it was; ce answers a failed op with abort, which drops the mapping.
        const code = err instanceof CeError ? `${err.code}: ` : "";
        log.debug(`op failed: ${errorMessage(err)}`);
        reply = { ok: false, error: `${code}${errorMessage(err)}` };
      }
      await sock.send(encodeReply(reply));
    }
  } finally {
    rx.close();
    sock.close();
  }
}
