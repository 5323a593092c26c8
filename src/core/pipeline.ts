// The data path of one update (DESIGN.md): bucket i uses slot i % K on every device. Its H2D (and
// broadcast) is submitted as soon as its slot is free again, i.e. every worker answered the load of
// bucket i − K; loads go out in order, one bucket in each worker's hands at a time. So with K = 3 the
// copy engine fills bucket i+1 while bucket i is broadcast and bucket i−1 is being reloaded.
import { NativeError } from "../base/errors";
import { logger } from "../base/log";
import type { Ctx, OpId, OpResult } from "../native/ce";
import type { Buffers } from "./buffers";
import type { WorkerChannel } from "./channel";
import type { Copy, Plan } from "./planner";

/** Times in ms since the update started. */
export interface BucketTrace {
  index: number;
  owner: number;
  slot: number;
  bytes: number;
  tensors: number;
  /** absent where another host did the bucket's H2D */
  h2d?: [number, number];
  /** a bucket copied in pieces (a source still arriving): each piece's copy; h2d spans them and the waits between */
  pieces?: [number, number][];
  bcast?: [number, number];
  /** per device: load sent → reply received */
  reload: [number, number][];
  /** a version still being pushed: when the pipeline had the bucket's last source bytes (their arrival, or later where the pipeline was behind them) */
  ready?: number;
}

export interface Progress {
  done: number;
  total: number;
  bytesDone: number;
  bytesTotal: number;
}

const log = logger("update");

const DRAIN_TIMEOUT_MS = 10_000;

/** The native ops an update submitted and has not collected: what a failure must wait for (or abort). */
export class PendingOps {
  readonly #ops = new Set<OpId>();

  constructor(private readonly ctx: Ctx) {}

  add(op: OpId): OpId {
    this.#ops.add(op);
    return op;
  }

  async wait(op: OpId, what: string, timeoutMs: number, signal: AbortSignal): Promise<OpResult> {
    try {
      const r = await this.ctx.wait(op, { timeoutMs, what, signal });
      this.#ops.delete(op);
      return r;
    } catch (err) {
      // A failed op is collected with its error; a wait that timed out or was aborted leaves the op
      // running, for drain().
      if (err instanceof NativeError) this.#ops.delete(op);
      throw err;
    }
  }

  /** Collects every op still pending; false if some are still running at the deadline. */
  async drain(): Promise<boolean> {
    const deadline = performance.now() + DRAIN_TIMEOUT_MS;
    while (this.#ops.size > 0 && performance.now() < deadline) {
      for (const op of [...this.#ops]) {
        try {
          if (this.ctx.poll(op, "draining") !== undefined) this.#ops.delete(op);
        } catch {
          this.#ops.delete(op); // failed or already collected: either way no longer running
        }
      }
      if (this.#ops.size > 0) await Bun.sleep(1);
    }
    return this.#ops.size === 0;
  }
}

export interface PipelineInput {
  ctx: Ctx;
  plan: Plan;
  bufs: Buffers;
  ndev: number;
  /** Owners H2D into staging and broadcast into every slot; otherwise each device's slot gets its own H2D. */
  broadcast: boolean;
  /** Global rank of this host's first device: bucket owners are global ranks (a cluster); 0 alone. */
  firstRank: number;
  channel: WorkerChannel;
  ops: PendingOps;
  /** Loads wait for this: every worker has mapped the buffer. */
  opened: Promise<unknown>;
  timeoutMs: number;
  signal: AbortSignal;
  fail: (err: unknown) => void;
  /** performance.now() when the update started: the trace's zero. */
  t0: number;
  onProgress?: (p: Progress) => void;
  /** Resolves once the copies' source bytes are in host memory (a version still arriving); absent: they are. */
  sourceReady?: (copies: Copy[], signal: AbortSignal) => Promise<void>;
}

/** Moves every bucket into every device's slot and through its worker; resolves with the per-bucket trace. */
export async function runPipeline(p: PipelineInput): Promise<BucketTrace[]> {
  const { ctx, plan, bufs, signal } = p;
  const since = (ms: number) => ms - p.t0;
  const gpuMs = (r: OpResult): [number, number] => [ctx.clockOriginMs + r.startMs - p.t0, ctx.clockOriginMs + r.endMs - p.t0];
  const devices = Array.from({ length: p.ndev }, (_, d) => d);
  const trace: BucketTrace[] = [];
  let bytesDone = 0;

  // The broadcast that last read each staging buffer: its refill waits for it, in device order.
  const lastStage: OpId[][] = devices.map(() => Array.from({ length: bufs.staging }, () => 0n));
  const stageNext = devices.map(() => 0);
  const slotFree: Promise<void>[] = Array.from({ length: bufs.slots }, () => Promise.resolve());
  const tasks: Promise<void>[] = [];
  let prevLoads: Promise<unknown> = p.opened;
  // Submits each piece once its bytes are in; false when the update was aborted meanwhile.
  const eachPart = async (parts: Copy[][], submit: (part: Copy[]) => void) => {
    for (const part of parts) {
      if (p.sourceReady) await p.sourceReady(part, signal);
      if (signal.aborted) return false;
      submit(part);
    }
    return true;
  };
  for (const b of plan.buckets) {
    const slot = b.index % bufs.slots;
    await slotFree[slot];
    if (signal.aborted) break;
    const slotOffset = slot * plan.slotBytes;
    const label = `bucket ${b.index + 1}/${plan.buckets.length}`;
    const local = b.owner - p.firstRank;
    const owned = !p.broadcast || (local >= 0 && local < p.ndev);
    // A source still arriving: the bucket's H2D goes piece by piece, each once its bytes are in.
    const parts = owned && p.sourceReady ? cutCopies(b.copies, STREAM_PIECE_BYTES) : [b.copies];
    const h2dOps: OpId[] = [];
    let bcastOp: OpId | undefined;
    if (p.broadcast && local >= 0 && local < p.ndev) {
      const s = stageNext[local]!++ % bufs.staging;
      const stage = bufs.stage[local]!;
      let after = lastStage[local]![s]!;
      const submitted = await eachPart(parts, (part) => {
        // Chained (CPU copies run on threads): the broadcast, after the last piece, follows them all.
        after = p.ops.add(ctx.h2d(stage, copyList(part, s * plan.slotBytes), after));
        h2dOps.push(after);
      });
      if (!submitted) break;
      bcastOp = p.ops.add(ctx.bcast(b.owner, stage, s * plan.slotBytes, bufs.ipc, slotOffset, b.bytes, after));
      lastStage[local]![s] = bcastOp;
    } else if (p.broadcast) {
      // Another host owns the bucket: its bytes arrive through the communicator.
      bcastOp = p.ops.add(ctx.bcast(b.owner, null, 0, bufs.ipc, slotOffset, b.bytes));
    } else {
      // Straight into every device's slot; on the CPU backend the copies run on threads side by side.
      const submitted = await eachPart(parts, (part) => h2dOps.push(...devices.map((d) => p.ops.add(ctx.h2d(bufs.ipc[d]!, copyList(part, slotOffset))))));
      if (!submitted) break;
    }
    const ready = owned && p.sourceReady ? since(performance.now()) : undefined;
    const prev = prevLoads;
    const task = (async () => {
      const h = await Promise.all(h2dOps.map((op) => p.ops.wait(op, `H2D of ${label}`, p.timeoutMs, signal)));
      const bc = bcastOp === undefined ? undefined : await p.ops.wait(bcastOp, `broadcast of ${label}`, p.timeoutMs, signal);
      await prev;
      const tensors = b.tensors.filter((t) => !t.patch).map((t) => ({ name: t.name, dtype: t.dtype, shape: t.shape, offset: slotOffset + t.offset, nbytes: t.nbytes }));
      const patches = b.tensors.flatMap((t) =>
        t.patch
          ? [{ name: t.name, dtype: t.dtype, shape: t.shape, positionsOffset: slotOffset + t.offset, valuesOffset: slotOffset + t.offset + t.patch.valuesOffset, count: t.patch.count }]
          : [],
      );
      const reload = await Promise.all(
        devices.map(async (d) => {
          const sent = performance.now();
          await p.channel.load(d, { bucket: b.index, slot, tensors, ...(patches.length ? { patches } : {}) }, label, signal);
          return [since(sent), since(performance.now())] as [number, number];
        }),
      );
      const spans = h.map(gpuMs);
      const h2d: [number, number] | undefined = spans.length ? [Math.min(...spans.map((s) => s[0])), Math.max(...spans.map((s) => s[1]))] : undefined;
      trace.push({
        index: b.index,
        owner: b.owner,
        slot,
        bytes: b.bytes,
        tensors: b.tensors.length,
        h2d,
        ...(parts.length > 1 ? { pieces: spans } : {}),
        bcast: bc && gpuMs(bc),
        reload,
        ...(ready === undefined ? {} : { ready }),
      });
      bytesDone += b.tensors.reduce((s, t) => s + t.nbytes, 0);
      p.onProgress?.({ done: trace.length, total: plan.buckets.length, bytesDone, bytesTotal: plan.totalBytes });
      log.debug(`${label}: ${b.bytes} bytes, ${b.tensors.length} tensors, owner ${b.owner}, slot ${slot}`);
    })();
    task.catch(p.fail);
    tasks.push(task);
    slotFree[slot] = task;
    prevLoads = task;
  }
  await Promise.all([p.opened, ...tasks]);
  return trace.sort((a, b) => a.index - b.index);
}

/**
 * A streaming bucket's H2D is cut into pieces of at most this many bytes, each submitted once its
 * bytes are in: the copies follow the push a piece or two behind, not a bucket, however large the bucket
 * or its tensors (Qwen3-8B's embedding alone is a 1.2 GB bucket: 25 ms of push on an H200).
 */
export const STREAM_PIECE_BYTES = 256 * 1024 ** 2;

/** The copies in runs of at most `most` bytes, in order; a longer copy is split. */
export function cutCopies(copies: Copy[], most: number): Copy[][] {
  const out: Copy[][] = [];
  let room = 0;
  for (const c of copies) {
    for (let at = 0; at < c.bytes; ) {
      if (room === 0) {
        out.push([]);
        room = most;
      }
      const take = Math.min(c.bytes - at, room);
      out.at(-1)!.push({ region: c.region, srcOffset: c.srcOffset + at, dstOffset: c.dstOffset + at, bytes: take });
      at += take;
      room -= take;
    }
  }
  return out;
}

/** Copies as (region, srcOffset, dstOffset, bytes) quadruples into a slot at `base`. */
function copyList(copies: Copy[], base: number): BigUint64Array {
  const out = new BigUint64Array(copies.length * 4);
  copies.forEach((c, i) => {
    out[i * 4] = BigInt(c.region);
    out[i * 4 + 1] = BigInt(c.srcOffset);
    out[i * 4 + 2] = BigInt(base + c.dstOffset);
    out[i * 4 + 3] = BigInt(c.bytes);
  });
  return out;
}
