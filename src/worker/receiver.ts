// The reference receiver behind `ce worker`: what an inference engine's worker does, without
// Python. It maps the slots (CUDA IPC handle, or the CPU backend's shared-memory file), copies
// every tensor into its own parameter memory (allocated once and kept across updates, as an
// engine's weights are), and with verify compares its parameters with the checkpoint's bytes.
// Protocol 2: it keeps its mapping across updates while ce keeps the buffer (worker-protocol.json,
// "the kept mapping"): an open naming the buffer it maps costs no re-open.
import { CeError, InputError, errorMessage } from "../base/errors";
import { logger } from "../base/log";
import type { Backend, Buf, Ctx } from "../native/ce";
import {
  type OpenRequest,
  PROTOCOL_VERSION,
  type Reply,
  type Request,
  type WireTensor,
  type WorkerState,
  encodeReply,
  parseRequest,
  transition,
} from "../wire/protocol";
import { readHeader } from "../checkpoint/safetensors";
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
  verify: boolean;
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

  constructor(
    readonly ctx: Ctx,
    readonly verify: boolean,
  ) {}

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
        const kept = this.mapFor(req, ipcHandle);
        try {
          this.ensureParams(req);
        } catch (err) {
          this.dropSlot(); // a failed open keeps nothing
          throw err;
        }
        this.open = req;
        this.received.clear();
        // An open without buffer_id is answered as protocol 1 answers it; one with it learns what happened.
        if (req.buffer_id !== undefined) reply = { ok: true, protocol: PROTOCOL_VERSION, buffer_id: req.buffer_id, kept };
        if (kept) log.debug(`open ${req.checkpoint}@${req.version}: kept the mapping of buffer ${req.buffer_id}`);
        break;
      }
      case "load": {
        const slot = this.slot!;
        const copies = new BigUint64Array(req.tensors.length * 3);
        req.tensors.forEach((t, i) => {
          if (t.offset + t.nbytes > slot.bytes) {
            throw new InputError("E_TENSOR_RANGE", `tensor ${t.name}: ${t.nbytes} bytes at ${t.offset} overrun the buffer of ${slot.bytes}`);
          }
          const p = this.place(t);
          copies[i * 3] = BigInt(t.offset);
          copies[i * 3 + 1] = BigInt(p.offset);
          copies[i * 3 + 2] = BigInt(t.nbytes);
          this.received.add(t.name);
        });
        // The reply hands the slot back to ce: only once the copies are done.
        await this.ctx.wait(this.ctx.d2d(this.params!, slot, copies), { timeoutMs: OP_TIMEOUT_MS, what: `copying bucket ${req.bucket}` });
        break;
      }
      case "release":
        // ce keeps the buffer: so does this worker, for the next open naming it.
        if (!(req.keep && this.slotKey !== undefined)) this.dropSlot();
        break;
      case "finish":
        if (this.verify) await this.verifyAgainst(this.open?.files ?? []);
        reply = { ok: true, tensors: this.received.size, bytes: [...this.received].reduce((s, n) => s + this.layout.get(n)!.nbytes, 0) };
        break;
      case "abort":
        this.dropSlot();
        log.warn(`update aborted by ce: ${req.reason}`);
        break;
    }
    this.state = next;
    return reply;
  }

  /** Every tensor of the checkpoint files arrived this session, and each equals its bytes in the file. */
  async verifyAgainst(files: string[]): Promise<void> {
    if (files.length === 0) throw new InputError("E_VERIFY", "verify: ce named no checkpoint files in open");
    const expected = new Map<string, { file: number; fileOffset: number; nbytes: number }>();
    const headers = await Promise.all(files.map(readHeader));
    headers.forEach((h, file) => {
      for (const t of h.tensors) expected.set(t.name, { file, fileOffset: t.fileOffset, nbytes: t.nbytes });
    });
    for (const name of this.received) {
      if (!expected.has(name)) throw new InputError("E_VERIFY", `verify: received tensor ${name}, which no checkpoint file holds`);
    }
    for (const name of expected.keys()) {
      if (!this.received.has(name)) throw new InputError("E_VERIFY", `verify: tensor ${name} never arrived`);
    }
    const regions: { region: number; op: bigint }[] = [];
    try {
      for (const path of files) regions.push(this.ctx.regionMapFile(path, { pin: false, threads: 1 }));
      await Promise.all(regions.map((r, i) => this.ctx.wait(r.op, { timeoutMs: OP_TIMEOUT_MS, what: `mapping ${files[i]}` })));
      // Tensors contiguous both in the parameters and in one file are compared in one go.
      const runs: { file: number; fileOffset: number; paramOffset: number; bytes: number; names: string[] }[] = [];
      const sorted = [...this.received].map((n) => ({ n, p: this.layout.get(n)!, e: expected.get(n)! })).sort((a, b) => a.p.offset - b.p.offset);
      for (const { n, p, e } of sorted) {
        const last = runs.at(-1);
        if (last && last.file === e.file && last.paramOffset + last.bytes === p.offset && last.fileOffset + last.bytes === e.fileOffset) {
          last.bytes += e.nbytes;
          last.names.push(n);
        } else {
          runs.push({ file: e.file, fileOffset: e.fileOffset, paramOffset: p.offset, bytes: e.nbytes, names: [n] });
        }
      }
      for (const run of runs) {
        if (run.bytes === 0) continue;
        const r = await this.ctx.wait(this.ctx.compare(this.params!, run.paramOffset, regions[run.file]!.region, run.fileOffset, run.bytes), {
          timeoutMs: OP_TIMEOUT_MS,
          what: "comparing parameters with the checkpoint",
        });
        if (r.value !== 0) {
          const at = r.value - 1;
          let acc = 0;
          const name = run.names.find((n) => (acc += expected.get(n)!.nbytes) > at) ?? run.names[0];
          throw new InputError("E_VERIFY", `verify: tensor ${name} differs from ${files[run.file]} (first differing byte ${at} of the run)`);
        }
      }
    } finally {
      // Every mapping goes, even if one release fails; a failure here must not hide the verdict.
      await Promise.allSettled(regions.map((r) => this.ctx.wait(this.ctx.regionRelease(r.region), { timeoutMs: OP_TIMEOUT_MS, what: "unmapping" })));
    }
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
  const rx = new Receiver(opts.ctx, opts.verify);
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
