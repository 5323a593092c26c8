// One update, in the order of its steps: plan → buffers → communicators → open every worker (while
// the first buckets' H2D runs) → the pipeline of buckets (pipeline.ts) → release → finish → summary.
// On any failure: abort every worker, collect or abort the native ops, free the buffers, start the
// workers over. Sizing, sockets, copies and reporting live in their own modules; this file says
// what happens when.
import { CeError, TimeoutError, errorMessage } from "../base/errors";
import { logger } from "../base/log";
import { assertUnchanged } from "../checkpoint/checkpoint";
import { type Registration, ensureDigests } from "../checkpoint/registry";
import type { Engine } from "../engines/types";
import { type Ctx, cudaMemInfo } from "../native/ce";
import type { Dialect } from "../wire/dialect";
import { ceDialect } from "../wire/protocol";
import { SlotBuffers } from "./buffers";
import { WorkerChannel } from "./channel";
import { type CommSpec, Communicators } from "./comm";
import type { Device } from "./devices";
import { deltaRefusal } from "./delta-base";
import { PendingOps, type Progress, runPipeline } from "./pipeline";
import { type Plan, type TensorRef, tensorRefs } from "./planner";
import { type DeltaSummary, type PhaseMarks, type UpdateSummary, buildSummary } from "./report";
import { type UpdatePlan, planUpdate } from "./sizing";
import { checkDigests } from "./verify";
import { EngineWatch, aborted } from "./watch";

export type { UpdateSummary } from "./report";
export type { BucketTrace } from "./pipeline";

const log = logger("update");

export interface SessionOptions {
  ctx: Ctx;
  devices: Device[];
  engine: Engine;
  /** Deadline for one worker reply. */
  opTimeoutMs: number;
  /** Take the broadcast path where it would not be taken (one GPU, CPU devices): proves it on small hosts. */
  forceBroadcast?: boolean;
  /** How ce talks to workers; ce's own JSON protocol unless said. */
  dialect?: Dialect;
  /** Verify updates unless a request says otherwise: every worker digests what it loaded (docs/digest.md). */
  verify?: boolean;
}

/** A version whose bytes are still arriving (a pool's slot being pushed, a P2P pull): the update streams behind it. */
export interface StreamingSource {
  /** resolves once bytes [start, end) of the source region are in place (a source filled front to back may wait for [0, end)) */
  ready(end: number, signal: AbortSignal, start: number): Promise<void>;
  /** every tensor's digest, once all arrived */
  digests(): Promise<Map<string, string>>;
}

/**
 * A delta against the version the engines hold (pool/delta.ts computes it): its tensors (dense ones
 * and patches, with real region ids) are sent instead of the registration's. Every worker's reply to
 * open must announce "delta" and report `base`; otherwise the update fails before anything is sent
 * (the workers are aborted, nothing else is undone) with E_DELTA_UNSUPPORTED (a worker applies no
 * patches) or E_DELTA_BASE (a worker holds another version), and the caller updates in full.
 */
export interface DeltaRequest {
  base: number;
  tensors: TensorRef[];
  /** every tensor of the version: what the workers' digests must cover */
  names: string[];
  stats: DeltaSummary;
}

export interface UpdateRequest {
  reg: Registration;
  /** set: send this delta; the update always verifies, so the engines' weights are known to equal the version */
  delta?: DeltaRequest;
  /** set: the registration's bytes are still arriving; H2D of each bucket waits for its bytes */
  source?: StreamingSource;
  bucketBytes?: number;
  slots?: number;
  /** Override the session's verify for this update. */
  verify?: boolean;
  timeoutMs: number;
  onProgress?: (p: Progress) => void;
}

/**
 * This host's share of a cluster's update: host 0's plan (bucket owners are global ranks; the copies
 * of this host's buckets name its own regions), its sizes, and the communicator to broadcast over.
 */
export interface ShareRequest {
  reg: Registration;
  plan: Plan;
  slots: number;
  staging: number;
  fallbacks: string[];
  firstRank: number;
  comm: CommSpec;
  /** every host's files, for progress */
  files: string[];
  /** Every tensor's digest (host 0 gathers them): with them, this host's workers verify. */
  digests?: Map<string, string>;
  timeoutMs: number;
  onProgress?: (p: Progress) => void;
  /** Aborts the share (another host failed); checked before anything moves. */
  signal?: AbortSignal;
}

/** What one run needs, however it was planned: a share, with how to reach its communicator. */
interface Run extends Omit<ShareRequest, "comm" | "digests"> {
  /** set: ask every worker for digests and compare them with these (known once the source is complete) */
  expected: (() => Promise<Map<string, string>>) | undefined;
  source?: StreamingSource;
  delta?: DeltaRequest;
  broadcast: boolean;
  comm: (signal: AbortSignal) => Promise<void>;
  t0: number;
}

/**
 * What stays up between updates: the context, the worker channel, the NCCL communicators and the
 * slot buffers (reused while the plan's sizes do not change).
 */
export class UpdateSession {
  readonly ctx: Ctx;
  readonly devices: Device[];
  readonly engine: Engine;
  readonly #opts: SessionOptions;
  readonly #channel: WorkerChannel;
  readonly #buffers: SlotBuffers;
  readonly #comm: Communicators;
  readonly #watch = new EngineWatch();
  #busy = false;
  #closed = false;
  /** Fails the update running now (set while one runs). */
  #stop: ((reason: unknown) => void) | undefined;

  constructor(opts: SessionOptions) {
    this.#opts = opts;
    this.ctx = opts.ctx;
    this.devices = opts.devices;
    this.engine = opts.engine;
    this.#channel = new WorkerChannel({
      devices: opts.devices,
      dialect: opts.dialect ?? ceDialect,
      opTimeoutMs: opts.opTimeoutMs,
      label: (d) => this.deviceLabel(d),
    });
    this.#buffers = new SlotBuffers(opts.ctx, opts.devices.length);
    this.#comm = new Communicators(opts.ctx, opts.devices.length);
  }

  /** Device UUID → the endpoint its worker connects to. */
  get endpoints(): Record<string, string> {
    return this.#channel.endpoints;
  }

  /**
   * Several GPUs share the host's H2D work and NCCL carries each bucket to the others. CPU devices
   * live in one memory: a copy into each slot costs what a broadcast would, without staging buffers.
   */
  get broadcast(): boolean {
    return (this.ctx.backend === "cuda" && this.devices.length > 1) || Boolean(this.#opts.forceBroadcast);
  }

  deviceLabel(d: number): string {
    return `${this.ctx.deviceName(d)} (${this.devices[d]!.uuid})`;
  }

  /** Extra device memory the session holds now (slot and staging buffers of every device). */
  heldBytes(): number {
    return this.#buffers.heldBytes();
  }

  /** The smallest free memory of this session's devices, counting the buffers it holds as free. */
  freeBytes(): number {
    const free =
      this.ctx.backend === "cuda"
        ? Math.min(...this.devices.map((d) => cudaMemInfo(d.ordinal).freeBytes))
        : Math.min(...this.devices.map((d) => d.freeBytes));
    return free + this.#buffers.heldPerDevice();
  }

  /** Sizes and plans an update of reg on this session's devices. Pure apart from reading free memory. */
  plan(reg: Registration, req: { bucketBytes?: number; slots?: number; source?: StreamingSource; delta?: DeltaRequest }): UpdatePlan {
    const full = tensorRefs(reg.ckpt).map((t) => ({ ...t, region: reg.files[t.region]!.region }));
    const tensors = req.delta?.tensors ?? full;
    return planUpdate({
      backend: this.ctx.backend,
      tensors,
      // A delta moves through the buffers a full update of the version keeps: no new ones, no worker re-opening its mapping.
      sizeFor: req.delta ? full : undefined,
      ndev: this.devices.length,
      broadcast: this.broadcast,
      freeBytes: this.freeBytes(),
      bucketBytes: req.bucketBytes,
      slots: req.slots,
      streaming: req.source !== undefined,
    });
  }

  /** One update of this host alone. */
  update(req: UpdateRequest): Promise<UpdateSummary> {
    return this.#exclusive(async () => {
      const t0 = performance.now();
      // Refuse a checkpoint whose files changed since registration before anything moves.
      if (!req.reg.owned) await assertUnchanged(req.reg.ckpt);
      const { plan, slots, staging, fallbacks } = this.plan(req.reg, req);
      let expected: Run["expected"];
      if (req.delta || this.#verifies(req.verify)) {
        const source = req.source;
        if (source) expected = () => source.digests();
        else {
          const digests = await ensureDigests(this.ctx, req.reg);
          expected = async () => digests;
        }
      }
      return this.#run({
        expected,
        ...req,
        plan,
        slots,
        staging,
        fallbacks,
        firstRank: 0,
        broadcast: this.broadcast,
        files: req.reg.ckpt.files.map((f) => f.path),
        comm: (signal) => this.#comm.ensureLocal(req.timeoutMs, signal),
        t0,
      });
    });
  }

  /** This host's share of a cluster update (cluster/ plans it on host 0). */
  updateShare(req: ShareRequest): Promise<UpdateSummary> {
    return this.#exclusive(async () => {
      const t0 = performance.now();
      await assertUnchanged(req.reg.ckpt);
      const { digests, ...share } = req;
      const expected = digests && this.#verifies(undefined) ? async () => digests : undefined;
      return this.#run({ ...share, expected, broadcast: true, comm: (signal) => this.#comm.join(req.comm, req.timeoutMs, signal), t0 });
    });
  }

  /** Stops the update running now, if any (another host failed): it fails with this reason. */
  abortRunning(reason: unknown): void {
    this.#stop?.(reason);
  }

  /** Whether this update verifies: the request's say, else the session's; only dialects with digests can. */
  #verifies(asked: boolean | undefined): boolean {
    const want = asked ?? this.#opts.verify ?? false;
    if (want && !this.#channel.dialect.verifies) {
      if (asked) throw new CeError("E_VERIFY_UNSUPPORTED", `the ${this.#channel.dialect.name} worker protocol has no digests: verify is not possible`, { hint: "update with verify off" });
      return false;
    }
    return want;
  }

  async #exclusive<T>(f: () => Promise<T>): Promise<T> {
    // After close() the sockets are gone; a failure path would otherwise bind new ones and restart workers.
    if (this.#closed) throw new CeError("E_SESSION_CLOSED", "the update session is closed");
    if (this.#busy) throw new CeError("E_BUSY", "an update is already running in this session");
    this.#busy = true;
    try {
      return await f();
    } finally {
      this.#busy = false;
    }
  }

  async #run(run: Run): Promise<UpdateSummary> {
    const { ctx, devices } = this;
    const { reg, plan, fallbacks } = run;
    const t: PhaseMarks = { start: run.t0, planned: performance.now(), buffers: 0, opened: 0, data: 0, end: 0 };
    for (const f of fallbacks) log.warn(f);
    const bufs = this.#buffers.acquire(plan.slotBytes, run.slots, run.staging, (f) => {
      log.warn(f);
      fallbacks.push(f);
    });
    t.buffers = performance.now();
    log.debug(
      `${plan.buckets.length} buckets of up to ${plan.slotBytes} bytes, ${bufs.slots} slots, ${bufs.staging} staging, ${run.broadcast ? "broadcast" : "direct"}`,
    );

    // Any failure anywhere stops every wait at once; the first cause is what the user sees.
    const stop = new AbortController();
    let cause: unknown;
    const fail = (err: unknown) => {
      if (cause === undefined) cause = err;
      if (!stop.signal.aborted) stop.abort(err);
    };
    const deadline = setTimeout(() => fail(new TimeoutError(`update of ${reg.ckpt.root} not done after ${run.timeoutMs} ms`)), run.timeoutMs);
    const unwatch = this.#watch.follow(this.engine.failure, fail);
    this.#stop = fail;
    const onAbort = () => fail(run.signal!.reason);
    if (run.signal?.aborted) fail(run.signal.reason);
    run.signal?.addEventListener("abort", onAbort, { once: true });
    const ops = new PendingOps(ctx);

    let trace;
    let verified: number | null = null;
    /** set: a delta refused at open; nothing was sent, so aborting the workers is all the undoing there is */
    let refused: CeError | undefined;
    try {
      if (stop.signal.aborted) throw cause;
      if (run.broadcast) await run.comm(stop.signal);
      const engineCall = this.engine.trigger(this.endpoints, run.timeoutMs);
      engineCall.catch(fail);
      // The first buckets' H2D runs while the workers map the buffer: opening a CUDA IPC handle takes
      // milliseconds that would otherwise sit before the data path. Loads wait for it.
      const replies = this.#channel
        .open(
          (d) => ({
            checkpoint: reg.name,
            version: reg.version,
            backend: ctx.backend,
            deviceUuid: devices[d]!.uuid,
            deviceOrdinal: devices[d]!.ordinal,
            bufferBytes: bufs.slots * plan.slotBytes,
            slots: bufs.slots,
            slotBytes: plan.slotBytes,
            path: ctx.backend === "cpu" ? bufs.ipc[d]!.path() : "",
            handle: bufs.handles[d],
            bufferId: bufs.ids[d],
            verify: run.expected !== undefined,
            deltaFrom: run.delta?.base,
            files: run.files,
            buckets: plan.buckets.length,
            // A delta's workers end up holding the whole version: they size and lay out for that.
            tensors: run.delta ? reg.ckpt.tensors.length : plan.tensorCount,
            bytes: run.delta ? reg.ckpt.totalBytes : plan.totalBytes,
          }),
          stop.signal,
        );
      const opened = replies.then(() => {
          t.opened = performance.now();
          // Every worker now maps this update's buffers, none an earlier size's: those may go.
          this.#buffers.freeRetired();
        });
      opened.catch(fail);
      // A delta waits for the open replies before anything moves: only workers that hold its base may get it.
      if (run.delta) {
        const no = deltaRefusal({ replies: await replies, checkpoint: reg.name, base: run.delta.base, worker: (d) => `worker on ${this.deviceLabel(d)}` });
        if (no !== undefined) {
          refused = new CeError(no.code, `${reg.name} version ${reg.version} cannot go as a delta from version ${run.delta.base}: ${no.why}`, {
            hint: "update in full (ce does so by itself for pool updates)",
          });
          throw refused;
        }
      }
      trace = await runPipeline({
        ctx,
        plan,
        bufs,
        ndev: devices.length,
        broadcast: run.broadcast,
        firstRank: run.firstRank,
        channel: this.#channel,
        ops,
        opened,
        timeoutMs: run.timeoutMs,
        signal: stop.signal,
        fail,
        t0: t.start,
        onProgress: run.onProgress,
        sourceReady:
          run.source && ((copies, signal) => run.source!.ready(Math.max(...copies.map((c) => c.srcOffset + c.bytes)), signal, Math.min(...copies.map((c) => c.srcOffset)))),
      });
      if (stop.signal.aborted) throw cause;
      t.data = performance.now();
      // The buffers stay for the next update: workers keep their mappings.
      await this.#channel.release(stop.signal, { keep: true });
      const finished = await this.#channel.finish(stop.signal);
      if (run.expected) {
        verified = checkDigests({
          replies: finished,
          expected: await run.expected(),
          sent: run.delta?.names ?? plan.buckets.flatMap((b) => b.tensors.map((x) => x.name)),
          checkpoint: reg.name,
          version: reg.version,
          worker: (d) => `worker on ${this.deviceLabel(d)}`,
        });
      }
      // The engine's call returns when its workers are done; a failure meanwhile (a worker died) aborts stop.
      await Promise.race([engineCall, aborted(stop.signal)]);
    } catch (err) {
      fail(err);
      if (cause === refused) {
        // Every worker answered open and got nothing since: they keep their weights and what they hold.
        await this.#channel.abort(errorMessage(cause));
        throw cause;
      }
      try {
        await this.#recover(ops, errorMessage(cause));
      } catch (recoverErr) {
        // The user needs the first cause; the recovery's own failure goes to the log.
        log.warn(`recovering from the failed update: ${errorMessage(recoverErr)}`);
      }
      throw cause;
    } finally {
      clearTimeout(deadline);
      unwatch();
      this.#stop = undefined;
      run.signal?.removeEventListener("abort", onAbort);
    }
    t.end = performance.now();
    return buildSummary(
      {
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
        slots: bufs.slots,
        staging: bufs.staging,
        mode: run.broadcast ? "broadcast" : "direct",
        fallbacks,
        registerSeconds: reg.registerSeconds,
        inPlace: reg.inPlace,
        verified,
        deviceBytes: this.heldBytes(),
        ...(run.delta ? { delta: run.delta.stats } : {}),
      },
      t,
      trace,
    );
  }

  /**
   * After a failure: tell every worker to drop its mapping, let the submitted copies finish (or abort
   * NCCL when a broadcast is stuck), free the buffers, and restart workers that lost state. The
   * session is then ready for the next update.
   */
  async #recover(ops: PendingOps, reason: string): Promise<void> {
    const aborts = this.#channel.abort(reason);
    const drained = await ops.drain();
    // Communicators that saw a failed or unfinished broadcast must not be reused, and a failure
    // elsewhere may have left a peer mid-collective: abort them; the next update makes new ones.
    if (this.#comm.ready) {
      if (!drained) log.warn("a broadcast did not finish after the failure: aborting the NCCL communicators");
      this.#comm.abort();
      if (!drained) await ops.drain();
    }
    await aborts;
    this.#buffers.free();
    this.#channel.rebind();
    await this.engine.reset(this.endpoints);
  }

  async close(): Promise<void> {
    this.#closed = true;
    this.#buffers.free();
    this.#channel.close();
    await this.engine.close();
  }
}
