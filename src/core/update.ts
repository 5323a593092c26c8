// One update, end to end: plan → buffers → open every worker → per bucket H2D (→ broadcast) →
// load → release → finish. This file owns the order of steps and the failure path; planning,
// pinning, sockets and copies live in their own modules.
//
// The pipeline (DESIGN.md): bucket i uses slot i % K on every device. Its H2D (and broadcast) is
// submitted as soon as its slot is free again, i.e. every worker answered the load of bucket
// i − K; loads go out in order, one bucket in each worker's hands at a time. So with K = 3 the
// copy engine fills bucket i+1 while bucket i is broadcast and bucket i−1 is being reloaded.
import { assertUnchanged, tensorRefs } from "../checkpoint/checkpoint";
import type { Device } from "./devices";
import type { Engine } from "../engines/types";
import { CeError, NativeError, TimeoutError, WorkerError, errorMessage } from "../base/errors";
import { gbps, logger } from "../base/log";
import { type Buf, type Ctx, type OpId, type OpResult, cudaMemInfo, ncclLoad, ncclUniqueId } from "../native/ce";
import { autoSize, planBuckets, spreadOverRanks, type Bucket, type Plan } from "./planner";
import { type OpName, PROTOCOL_VERSION, type Reply, type Request, encodeRequest, parseReply } from "../wire/protocol";
import type { Registration } from "../checkpoint/registry";
import { type ZmqSocket, defaultContext } from "../transport/zmq";

const log = logger("update");

export interface SessionOptions {
  ctx: Ctx;
  devices: Device[];
  engine: Engine;
  /** Deadline for one worker reply. */
  opTimeoutMs: number;
  /** Take the broadcast path even on one GPU (NCCL with one rank): proves it on one-GPU hosts. */
  forceBroadcast?: boolean;
}

export interface UpdateRequest {
  reg: Registration;
  bucketBytes?: number;
  slots?: number;
  timeoutMs: number;
  onProgress?: (p: { done: number; total: number; bytesDone: number; bytesTotal: number }) => void;
}

/** Times in ms since the update started. */
export interface BucketTrace {
  index: number;
  owner: number;
  slot: number;
  bytes: number;
  tensors: number;
  h2d: [number, number];
  bcast?: [number, number];
  /** per device: load sent → reply received */
  reload: [number, number][];
}

export interface UpdateSummary {
  checkpoint: string;
  version: number;
  backend: string;
  devices: string[];
  engine: string;
  bytes: number;
  tensors: number;
  buckets: number;
  bucketBytes: number;
  slotBytes: number;
  slots: number;
  staging: number;
  mode: "direct" | "broadcast";
  fallbacks: string[];
  seconds: number;
  gbps: number;
  /** Seconds from the start: plan, buffers; `open` until every worker mapped the buffer (the first
   *  H2Ds run meanwhile); `data` from then to the last load reply; release + finish. */
  phases: { plan: number; buffers: number; open: number; data: number; close: number };
  /** Busy seconds of each stage summed over buckets (stages overlap, so they add up to more than `data`). */
  stages: { h2d: number; bcast: number; reload: number };
  registerSeconds: number;
  inPlace: boolean;
  deviceBytes: number;
  trace: BucketTrace[];
}

interface Buffers {
  slotBytes: number;
  slots: number;
  staging: number;
  ipc: Buf[];
  stage: Buf[];
  handles: Uint8Array[];
}

const DRAIN_TIMEOUT_MS = 10_000;
const ABORT_REPLY_TIMEOUT_MS = 2_000;

let endpointCounter = 0;

/**
 * What stays up between updates: the context, one REQ socket per device, the NCCL communicators
 * and the slot buffers (reused while the plan's sizes do not change).
 */
export class UpdateSession {
  readonly ctx: Ctx;
  readonly devices: Device[];
  readonly engine: Engine;
  #sockets: ZmqSocket[] = [];
  #endpoints: Record<string, string> = {};
  #bufs: Buffers | undefined;
  #ncclReady = false;
  #busy = false;
  #closed = false;
  #engineWatch: EngineWatch | undefined;
  readonly #opts: SessionOptions;

  constructor(opts: SessionOptions) {
    this.#opts = opts;
    this.ctx = opts.ctx;
    this.devices = opts.devices;
    this.engine = opts.engine;
    this.#bind();
  }

  /**
   * Calls onFailure when the engine reports a failure, at once if it already has, until the returned
   * function is called. engine.failure never settles while the engine is healthy, so a handler
   * attached per update would keep every finished update's state alive: one handler per failure
   * promise forwards to the update now running.
   */
  #watchEngine(onFailure: (err: unknown) => void): () => void {
    let w = this.#engineWatch;
    if (w?.failure !== this.engine.failure) {
      w = { failure: this.engine.failure, failed: false };
      listen(w);
      this.#engineWatch = w;
    }
    const watch = w;
    watch.listener = onFailure;
    if (watch.failed) onFailure(watch.error);
    return () => {
      if (watch.listener === onFailure) watch.listener = undefined;
    };
  }

  /** Device UUID → the endpoint its worker connects to. */
  get endpoints(): Record<string, string> {
    return this.#endpoints;
  }

  get broadcast(): boolean {
    return this.devices.length > 1 || Boolean(this.#opts.forceBroadcast);
  }

  #bind(): void {
    for (const s of this.#sockets) s.close();
    const zmq = defaultContext();
    const n = endpointCounter++;
    this.#endpoints = {};
    this.#sockets = this.devices.map((d) => {
      const sock = zmq.socket("REQ");
      // Linux abstract namespace: no file to clean up, gone with the process.
      this.#endpoints[d.uuid] = sock.bind(`ipc://@ce-${d.uuid}-${process.pid}-${n}`);
      return sock;
    });
  }

  deviceLabel(d: number): string {
    return `${this.ctx.deviceName(d)} (${this.devices[d]!.uuid})`;
  }

  /** Extra device memory the session holds now (slot and staging buffers of every device). */
  heldBytes(): number {
    const b = this.#bufs;
    return b ? (b.slots + b.staging) * b.slotBytes * this.devices.length : 0;
  }

  #freeBuffers(): void {
    for (const b of [...(this.#bufs?.ipc ?? []), ...(this.#bufs?.stage ?? [])]) b.close();
    this.#bufs = undefined;
  }

  #buffers(slotBytes: number, slots: number, staging: number): Buffers {
    const have = this.#bufs;
    if (have && have.slotBytes === slotBytes && have.slots === slots && have.staging === staging) return have;
    this.#freeBuffers();
    const ipc: Buf[] = [];
    const stage: Buf[] = [];
    try {
      for (let d = 0; d < this.devices.length; d++) {
        ipc.push(this.ctx.bufAlloc(d, slots * slotBytes, { ipc: true }));
        if (staging > 0) stage.push(this.ctx.bufAlloc(d, staging * slotBytes, { ipc: false }));
      }
      const handles = this.ctx.backend === "cuda" ? ipc.map((b) => b.ipcHandle()) : [];
      this.#bufs = { slotBytes, slots, staging, ipc, stage, handles };
      return this.#bufs;
    } catch (err) {
      for (const b of [...ipc, ...stage]) b.close();
      throw err;
    }
  }

  #freeBytes(): number {
    const held = this.heldBytes() / this.devices.length;
    if (this.ctx.backend === "cuda") {
      return Math.min(...this.devices.map((d) => cudaMemInfo(d.ordinal).freeBytes)) + held;
    }
    return Math.min(...this.devices.map((d) => d.freeBytes)) + held;
  }

  /** Sizes and plans an update of reg on this session's devices. Pure apart from reading free memory. */
  plan(reg: Registration, req: { bucketBytes?: number; slots?: number }): { plan: Plan; slots: number; staging: number; fallbacks: string[] } {
    const ckpt = reg.ckpt;
    const ndev = this.devices.length;
    const size = autoSize({
      freeBytes: this.#freeBytes(),
      totalBytes: ckpt.totalBytes,
      largestTensorBytes: ckpt.largestTensor.nbytes,
      ndev,
      broadcast: this.broadcast,
      bucketBytes: req.bucketBytes,
      slots: req.slots,
    });
    const refs = tensorRefs(ckpt).map((t) => ({ ...t, region: reg.files[t.region]!.region }));
    const perRank = this.broadcast ? spreadOverRanks(refs, ndev) : [refs];
    const plan = planBuckets({ perRank, bucketBytes: size.bucketBytes });
    const slots = Math.min(size.slots, plan.buckets.length);
    const staging = Math.min(size.staging, plan.buckets.length);
    return { plan, slots, staging, fallbacks: size.fallbacks };
  }

  async update(req: UpdateRequest): Promise<UpdateSummary> {
    // After close() the sockets are gone; a failure path would otherwise bind new ones and restart workers.
    if (this.#closed) throw new CeError("E_SESSION_CLOSED", "the update session is closed");
    if (this.#busy) throw new CeError("E_BUSY", "an update is already running in this session");
    this.#busy = true;
    try {
      return await this.#update(req);
    } finally {
      this.#busy = false;
    }
  }

  async #update(req: UpdateRequest): Promise<UpdateSummary> {
    const { ctx, devices } = this;
    const { reg } = req;
    const ckpt = reg.ckpt;
    const t0 = performance.now();
    const since = (ms: number) => ms - t0;
    const gpuMs = (r: OpResult): [number, number] => [ctx.clockOriginMs + r.startMs - t0, ctx.clockOriginMs + r.endMs - t0];

    // Refuse a checkpoint whose files changed since registration before anything moves.
    await assertUnchanged(ckpt);
    const planned = this.plan(reg, req);
    const { plan, fallbacks } = planned;
    let { slots, staging } = planned;
    for (const f of fallbacks) log.warn(f);
    const tPlan = performance.now();
    let bufs: Buffers;
    for (;;) {
      try {
        bufs = this.#buffers(plan.slotBytes, slots, staging);
        break;
      } catch (err) {
        // Free memory can shrink between reading it and allocating (another process, fragmentation):
        // a smaller plan that fits beats failing. Fewer staging buffers first, then fewer slots.
        if (!(err instanceof NativeError && err.code === "CE_E_NOMEM") || (slots === 1 && staging <= 1)) throw err;
        if (staging > 1) staging--;
        else slots--;
        const f = `device memory ran short allocating the slot buffers (${errorMessage(err)}): retrying with ${slots} slot${slots === 1 ? "" : "s"} and ${staging} staging`;
        log.warn(f);
        fallbacks.push(f);
      }
    }
    const tBufs = performance.now();
    if (this.broadcast && ctx.backend === "cuda" && !this.#ncclReady) {
      ncclLoad();
      await ctx.wait(ctx.ncclInit(ncclUniqueId(), devices.length, 0), { timeoutMs: req.timeoutMs, what: "creating NCCL communicators" });
      this.#ncclReady = true;
    }
    log.debug(
      `${plan.buckets.length} buckets of up to ${plan.slotBytes} bytes, ${slots} slots, ${staging} staging, ${this.broadcast ? "broadcast" : "direct"}`,
    );

    // Any failure anywhere stops every wait at once; the first cause is what the user sees.
    const stop = new AbortController();
    let cause: unknown;
    const fail = (err: unknown) => {
      if (cause === undefined) cause = err;
      if (!stop.signal.aborted) stop.abort(err);
    };
    const deadline = setTimeout(() => fail(new TimeoutError(`update of ${ckpt.root} not done after ${req.timeoutMs} ms`)), req.timeoutMs);
    const unwatch = this.#watchEngine(fail);
    const engineCall = this.engine.trigger(this.#endpoints, req.timeoutMs);
    engineCall.catch(fail);

    const pending = new Set<OpId>();
    const waitOp = async (op: OpId, what: string): Promise<OpResult> => {
      try {
        const r = await ctx.wait(op, { timeoutMs: req.timeoutMs, what, signal: stop.signal });
        pending.delete(op);
        return r;
      } catch (err) {
        // A failed op is collected with its error; a wait that timed out or was aborted leaves
        // the op running, for the drain in #recover.
        if (err instanceof NativeError) pending.delete(op);
        throw err;
      }
    };
    const request = async (d: number, frames: Uint8Array[], op: OpName, what: string): Promise<Reply> => {
      const sock = this.#sockets[d]!;
      const label = `worker on ${this.deviceLabel(d)}`;
      let replyFrames: Uint8Array[];
      try {
        replyFrames = await sock.request(frames, { timeoutMs: this.#opts.opTimeoutMs, what: `${label}: reply to ${what}`, signal: stop.signal });
      } catch (err) {
        // No reply to open usually means no worker ever connected: the engine does not run on that GPU.
        if (op === "open" && err instanceof TimeoutError) {
          throw new TimeoutError(err.message, { hint: "no worker answered for that GPU: does the engine run on it? --devices names the engine's GPUs" });
        }
        throw err;
      }
      let reply: Reply;
      try {
        reply = parseReply(replyFrames, op);
      } catch (err) {
        throw new WorkerError("E_PROTOCOL", `${label} answered ${what} with a malformed reply: ${errorMessage(err)}`);
      }
      if (!reply.ok) throw new WorkerError("E_WORKER", `${label} failed ${what}: ${reply.error}`);
      return reply;
    };
    const toAll = (make: (d: number) => { req: Request; handle?: Uint8Array }, what: string) =>
      Promise.all(
        devices.map((_, d) => {
          const m = make(d);
          return request(d, encodeRequest(m.req, m.handle), m.req.op, what);
        }),
      );

    const trace: BucketTrace[] = [];
    let tOpen = 0;
    let tData = 0;
    let bytesDone = 0;
    try {
      // The first buckets' H2D runs while the workers map the buffer: opening a CUDA IPC handle
      // takes milliseconds that would otherwise sit before the data path. Loads wait for it.
      const opened = toAll(
        (d) => ({
          req: {
            op: "open",
            protocol: PROTOCOL_VERSION,
            checkpoint: reg.name,
            version: reg.version,
            device_uuid: devices[d]!.uuid,
            backend: ctx.backend,
            buffer_bytes: slots * plan.slotBytes,
            slots,
            slot_bytes: plan.slotBytes,
            path: ctx.backend === "cpu" ? bufs.ipc[d]!.path() : "",
            files: ckpt.files.map((f) => f.path),
            buckets: plan.buckets.length,
            tensors: plan.tensorCount,
            bytes: plan.totalBytes,
          },
          handle: bufs.handles[d],
        }),
        "open",
      ).then(() => {
        tOpen = performance.now();
      });
      opened.catch(fail);

      const lastStage: OpId[][] = devices.map(() => Array.from({ length: staging }, () => 0n));
      const stageNext = devices.map(() => 0);
      const slotFree: Promise<void>[] = Array.from({ length: slots }, () => Promise.resolve());
      const tasks: Promise<void>[] = [];
      let prevLoads: Promise<void> = opened;
      for (const b of plan.buckets) {
        const slot = b.index % slots;
        await slotFree[slot];
        if (stop.signal.aborted) break;
        const slotOffset = slot * plan.slotBytes;
        // One device: H2D straight into the slot. Several: into the owner's staging area (refilled
        // only after the broadcast that last read it, in GPU order), then broadcast into every slot.
        const s = this.broadcast ? stageNext[b.owner]!++ % staging : 0;
        const h2dOp = this.broadcast
          ? ctx.h2d(bufs.stage[b.owner]!, copyList(b, s * plan.slotBytes), lastStage[b.owner]![s])
          : ctx.h2d(bufs.ipc[0]!, copyList(b, slotOffset));
        pending.add(h2dOp);
        let bcastOp: OpId | undefined;
        if (this.broadcast) {
          bcastOp = ctx.bcast(b.owner, bufs.stage[b.owner]!, s * plan.slotBytes, bufs.ipc, slotOffset, b.bytes, h2dOp);
          pending.add(bcastOp);
          lastStage[b.owner]![s] = bcastOp;
        }
        const label = `bucket ${b.index + 1}/${plan.buckets.length}`;
        const prev = prevLoads;
        const task = (async () => {
          const h = await waitOp(h2dOp, `H2D of ${label}`);
          const bc = bcastOp === undefined ? undefined : await waitOp(bcastOp, `broadcast of ${label}`);
          await prev;
          const tensors = b.tensors.map((t) => ({ name: t.name, dtype: t.dtype, shape: t.shape, offset: slotOffset + t.offset, nbytes: t.nbytes }));
          const reload: [number, number][] = await Promise.all(
            devices.map(async (_, d) => {
              const sent = performance.now();
              await request(d, encodeRequest({ op: "load", bucket: b.index, slot, tensors }), "load", label);
              return [since(sent), since(performance.now())] as [number, number];
            }),
          );
          trace.push({ index: b.index, owner: b.owner, slot, bytes: b.bytes, tensors: b.tensors.length, h2d: gpuMs(h), bcast: bc && gpuMs(bc), reload });
          bytesDone += b.tensors.reduce((s, t) => s + t.nbytes, 0);
          req.onProgress?.({ done: trace.length, total: plan.buckets.length, bytesDone, bytesTotal: plan.totalBytes });
          log.debug(`${label}: ${b.bytes} bytes, ${b.tensors.length} tensors, owner ${b.owner}, slot ${slot}`);
        })();
        task.catch(fail);
        tasks.push(task);
        slotFree[slot] = task;
        prevLoads = task;
      }
      await Promise.all([opened, ...tasks]);
      if (stop.signal.aborted) throw cause;
      tData = performance.now();
      await toAll(() => ({ req: { op: "release" } }), "release");
      await toAll(() => ({ req: { op: "finish" } }), "finish");
      // The engine's call returns when its workers are done; a failure meanwhile (a worker died) aborts stop.
      await Promise.race([engineCall, aborted(stop.signal)]);
    } catch (err) {
      fail(err);
      try {
        await this.#recover(pending, String(errorMessage(cause)));
      } catch (recoverErr) {
        // The user needs the first cause; the recovery's own failure goes to the log.
        log.warn(`recovering from the failed update: ${errorMessage(recoverErr)}`);
      }
      throw cause;
    } finally {
      clearTimeout(deadline);
      unwatch();
    }
    const tEnd = performance.now();
    trace.sort((a, b) => a.index - b.index);
    const seconds = (tEnd - t0) / 1000;
    const busy = (spans: ([number, number] | undefined)[]) => spans.reduce((s, x) => s + (x ? x[1] - x[0] : 0), 0) / 1000;
    return {
      checkpoint: reg.name,
      version: reg.version,
      backend: ctx.backend,
      devices: devices.map((d) => d.uuid),
      engine: this.engine.description,
      bytes: plan.totalBytes,
      tensors: plan.tensorCount,
      buckets: plan.buckets.length,
      bucketBytes: plan.bucketBytes,
      slotBytes: plan.slotBytes,
      slots,
      staging,
      mode: this.broadcast ? "broadcast" : "direct",
      fallbacks,
      seconds,
      gbps: gbps(plan.totalBytes, seconds),
      phases: {
        plan: (tPlan - t0) / 1000,
        buffers: (tBufs - tPlan) / 1000,
        open: (tOpen - tBufs) / 1000,
        data: (tData - tOpen) / 1000,
        close: (tEnd - tData) / 1000,
      },
      stages: {
        h2d: busy(trace.map((t) => t.h2d)),
        bcast: busy(trace.map((t) => t.bcast)),
        reload: busy(trace.map((t) => [Math.min(...t.reload.map((r) => r[0])), Math.max(...t.reload.map((r) => r[1]))] as [number, number])),
      },
      registerSeconds: reg.registerSeconds,
      inPlace: reg.inPlace,
      deviceBytes: this.heldBytes(),
      trace,
    };
  }

  /**
   * After a failure: tell every worker to drop its mapping, let the submitted copies finish (or
   * abort NCCL when a broadcast is stuck), free the buffers, and restart workers that lost state.
   * The session is then ready for the next update.
   */
  async #recover(pending: Set<OpId>, reason: string): Promise<void> {
    const aborts = this.#sockets.map((sock) =>
      sock
        .request(encodeRequest({ op: "abort", reason }), { timeoutMs: ABORT_REPLY_TIMEOUT_MS, what: "reply to abort" })
        .catch(() => undefined),
    );
    const drained = await this.#drain(pending);
    // Communicators that saw a failed or unfinished broadcast must not be reused, and a failure
    // elsewhere may have left a peer mid-collective: abort them; the next update makes new ones.
    if (this.#ncclReady) {
      if (!drained) log.warn("a broadcast did not finish after the failure: aborting the NCCL communicators");
      this.ctx.ncclAbort();
      this.#ncclReady = false;
      if (!drained) await this.#drain(pending);
    }
    await Promise.all(aborts);
    this.#freeBuffers();
    // Sockets may hold a request the dead peer never answered: start clean, on new endpoints.
    this.#bind();
    await this.engine.reset(this.#endpoints);
  }

  /** Collects every op still pending; false if some are still running at the deadline. */
  async #drain(pending: Set<OpId>): Promise<boolean> {
    const deadline = performance.now() + DRAIN_TIMEOUT_MS;
    while (pending.size > 0 && performance.now() < deadline) {
      for (const op of [...pending]) {
        try {
          if (this.ctx.poll(op, "draining") !== undefined) pending.delete(op);
        } catch {
          pending.delete(op); // failed or already collected: either way no longer running
        }
      }
      if (pending.size > 0) await Bun.sleep(1);
    }
    return pending.size === 0;
  }

  async close(): Promise<void> {
    this.#closed = true;
    this.#freeBuffers();
    for (const s of this.#sockets) s.close();
    this.#sockets = [];
    await this.engine.close();
  }
}

interface EngineWatch {
  failure: Promise<never>;
  failed: boolean;
  error?: unknown;
  listener?: (err: unknown) => void;
}

/** Rejects with the signal's reason once it aborts. */
function aborted(signal: AbortSignal): Promise<never> {
  return new Promise<never>((_, reject) => {
    if (signal.aborted) reject(signal.reason);
    else signal.addEventListener("abort", () => reject(signal.reason), { once: true });
  });
}

/** The one handler on a failure promise; a module-level function so it holds the watch and nothing else. */
function listen(watch: EngineWatch): void {
  watch.failure.catch((err: unknown) => {
    watch.failed = true;
    watch.error = err;
    watch.listener?.(err);
  });
}

/** The bucket's copies as (region, srcOffset, dstOffset, bytes) quadruples into a slot at `base`. */
function copyList(b: Bucket, base: number): BigUint64Array {
  const out = new BigUint64Array(b.copies.length * 4);
  b.copies.forEach((c, i) => {
    out[i * 4] = BigInt(c.region);
    out[i * 4 + 1] = BigInt(c.srcOffset);
    out[i * 4 + 2] = BigInt(base + c.dstOffset);
    out[i * 4 + 3] = BigInt(c.bytes);
  });
  return out;
}
