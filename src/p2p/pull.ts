// One P2P pull on the puller: the version's bytes are read from the hosts that hold them into one
// pinned staging region, bucket by bucket in the update's order with a few buckets in flight, while
// the normal update runs from the staging behind them (a StreamingSource: each bucket's H2D waits
// for its bytes). On CUDA the reads land in pinned host memory and the usual H2D follows, so the
// device path is the one every update takes.
import { CeError, NativeError, errorMessage } from "../base/errors";
import { logger } from "../base/log";
import type { Checkpoint } from "../checkpoint/checkpoint";
import type { Registration } from "../checkpoint/registry";
import type { TensorMeta } from "../checkpoint/safetensors";
import type { Plan } from "../core/planner";
import type { StreamingSource } from "../core/update";
import type { Ctx } from "../native/ce";
import type { Xfer } from "../native/xfer";
import { type Offer, type PullLayout, type Read, bucketReads, pullLayout } from "./layout";

const log = logger("p2p");

/** Buckets whose reads are in flight at once: enough to keep every source's link busy while earlier buckets go to the devices. */
const BUCKETS_IN_FLIGHT = 4;

export interface PullStats {
  sources: number[];
  /** bytes read from each source host, by host */
  bytesFrom: Record<string, number>;
  bytes: number;
  seconds: number;
  gbps: number;
}

interface Pending {
  read: Read;
  done: Promise<void>;
}

export class Pull {
  readonly reg: Registration;
  readonly source: StreamingSource;
  readonly #ctx: Ctx;
  readonly #xfer: Xfer;
  readonly #offers: Offer[];
  readonly #layout: PullLayout;
  readonly #region: number;
  readonly #peers: number[];
  readonly #deadline: number;
  readonly #stop = new AbortController();
  /** every read, in staging order once started */
  #pending: Pending[] = [];
  /** opens each bucket's reads, in plan order */
  #gates: (() => void)[] = [];
  #started!: () => void;
  readonly #startedP = new Promise<void>((r) => (this.#started = r));
  #loop: Promise<void> = Promise.resolve();
  readonly #bytesFrom = new Map<number, number>();
  #t0 = 0;
  #t1 = 0;

  private constructor(ctx: Ctx, xfer: Xfer, o: PullOptions, layout: PullLayout, region: number) {
    this.#ctx = ctx;
    this.#xfer = xfer;
    this.#offers = o.offers;
    this.#layout = layout;
    this.#region = region;
    this.#deadline = performance.now() + o.timeoutMs;
    this.#peers = o.offers.map((f) => xfer.connect(Buffer.from(f.address, "hex"), `host ${f.host}`));
    this.reg = view(o, layout, region);
    const digests = o.offers.every((f) => f.digests) ? new Map(o.offers.flatMap((f) => Object.entries(f.digests!))) : undefined;
    this.source = {
      ready: (end, signal, start = 0) => this.#ready(start, end, signal),
      digests: async () => {
        if (!digests) throw new CeError("E_VERIFY", `the sources of "${o.checkpoint}" sent no digests: the pull cannot verify`, { hint: "update with verify off" });
        return digests;
      },
    };
  }

  /** Allocates the staging and connects to every source (offers checked by host 0); reads start with start(). */
  static async open(ctx: Ctx, xfer: Xfer, o: PullOptions): Promise<Pull> {
    const layout = pullLayout(o.offers);
    const a = ctx.regionAlloc(Math.max(1, layout.bytes));
    try {
      await ctx.wait(a.op, { timeoutMs: o.timeoutMs, what: `allocating ${layout.bytes} bytes of pinned staging for the pull of "${o.checkpoint}"` });
      return new Pull(ctx, xfer, o, layout, a.region);
    } catch (err) {
      await ctx.wait(ctx.regionRelease(a.region), { timeoutMs: 30_000, what: "releasing the pull's staging" }).catch(() => undefined);
      throw err;
    }
  }

  /** Reads every bucket's bytes in the plan's order (the plan of the update that follows). */
  start(plan: Plan): void {
    // A bucket's reads start when a lane opens its gate; they are one op per source file.
    const buckets = bucketReads(this.#layout, plan.buckets).map((reads) => {
      let open!: () => void;
      const done = new Promise<void>((r) => (open = r)).then(() => this.#readBucket(reads));
      done.catch(() => undefined); // reported through ready() and the loop
      return { reads, open, done };
    });
    this.#gates = buckets.map((b) => b.open);
    this.#pending = buckets.flatMap((b) => b.reads.map((read) => ({ read, done: b.done }))).sort((x, y) => x.read.stagingOffset - y.read.stagingOffset);
    this.#t0 = performance.now();
    this.#loop = (async () => {
      let next = 0;
      const lane = async () => {
        while (next < buckets.length && !this.#stop.signal.aborted) {
          const b = buckets[next++]!;
          b.open();
          await b.done;
        }
      };
      await Promise.all(Array.from({ length: BUCKETS_IN_FLIGHT }, lane));
      this.#t1 = performance.now();
    })();
    this.#loop.catch((err) => this.#stop.abort(err));
    this.#started();
  }

  /** Ends the reads in flight with this reason (another host failed, or the update did). */
  abort(reason: unknown): void {
    if (!this.#stop.signal.aborted) this.#stop.abort(reason);
  }

  stats(): PullStats {
    const bytes = [...this.#bytesFrom.values()].reduce((a, b) => a + b, 0);
    const seconds = ((this.#t1 || performance.now()) - this.#t0) / 1000;
    return {
      sources: this.#offers.map((o) => o.host),
      bytesFrom: Object.fromEntries([...this.#bytesFrom].map(([h, n]) => [String(h), n])),
      bytes,
      seconds,
      gbps: seconds > 0 ? bytes / seconds / 1e9 : 0,
    };
  }

  /** Stops reading, waits for every read to end, disconnects the sources and frees the staging. */
  async close(): Promise<void> {
    this.abort(new CeError("E_ABORTED", "the pull ended"));
    await this.#loop.catch(() => undefined);
    // Buckets never reached end at once, their reads refused (the pull is stopped).
    for (const open of this.#gates) open();
    await Promise.allSettled(this.#pending.map((p) => p.done));
    for (const peer of this.#peers) {
      try {
        this.#xfer.disconnect(peer);
      } catch (err) {
        log.debug(`disconnecting a source: ${errorMessage(err)}`);
      }
    }
    await this.#ctx.wait(this.#ctx.regionRelease(this.#region), { timeoutMs: 30_000, what: "releasing the pull's staging" });
  }

  async #readBucket(reads: Read[]): Promise<void> {
    const byFile = new Map<string, Read[]>();
    for (const r of reads) {
      const key = `${r.source}/${r.file}`;
      byFile.set(key, [...(byFile.get(key) ?? []), r]);
    }
    await Promise.all(
      [...byFile.values()].map(async (rs) => {
        const { source, file } = rs[0]!;
        const offer = this.#offers[source]!;
        const triples = BigUint64Array.from(rs.flatMap((r) => [BigInt(r.remoteOffset), BigInt(r.stagingOffset), BigInt(r.bytes)]));
        const bytes = rs.reduce((s, r) => s + r.bytes, 0);
        try {
          if (this.#stop.signal.aborted) throw this.#stop.signal.reason;
          const timeoutMs = Math.max(1, this.#deadline - performance.now());
          await this.#xfer.readRegion(this.#peers[source]!, Buffer.from(offer.files[file]!.rkey, "hex"), this.#region, triples, { timeoutMs, signal: this.#stop.signal });
        } catch (err) {
          if (!(err instanceof NativeError)) throw err;
          // The engine's words name the peer ("peer 2 (host 1) failed: …"); say what was being read.
          throw new CeError(err.code, `pulling "${this.reg.name}" version ${this.reg.version}: ${bytes} bytes of ${offer.files[file]!.path} from host ${offer.host}: ${err.message}`, { cause: err });
        }
        this.#bytesFrom.set(offer.host, (this.#bytesFrom.get(offer.host) ?? 0) + bytes);
      }),
    );
  }

  /** Resolves once every read that overlaps [start, end) of the staging is done. */
  async #ready(start: number, end: number, signal: AbortSignal): Promise<void> {
    await this.#startedP;
    const waits = this.#pending.filter((p) => p.read.stagingOffset < end && p.read.stagingOffset + p.read.bytes > start).map((p) => p.done);
    const signals = [signal, this.#stop.signal];
    let onAbort!: () => void;
    const stopped = new Promise<never>((_, reject) => {
      onAbort = () => reject(signals.find((s) => s.aborted)!.reason);
    });
    stopped.catch(() => undefined);
    for (const s of signals) s.addEventListener("abort", onAbort, { once: true });
    try {
      if (signals.some((s) => s.aborted)) onAbort();
      await Promise.race([Promise.all(waits), stopped]);
    } finally {
      for (const s of signals) s.removeEventListener("abort", onAbort);
    }
  }
}

export interface PullOptions {
  checkpoint: string;
  version: number;
  offers: Offer[];
  timeoutMs: number;
}

/** The staging as a registration of one file, in the staging's order (what the update plans from). */
function view(o: PullOptions, layout: PullLayout, region: number): Registration {
  const path = `p2p:${o.checkpoint}@${o.version}`;
  const tensors: TensorMeta[] = layout.tensors.map((t) => ({ name: t.name, dtype: t.dtype, shape: t.shape, nbytes: t.nbytes, file: path, fileOffset: t.stagingOffset }));
  const dtypes: Checkpoint["dtypes"] = {};
  for (const t of tensors) {
    const d = (dtypes[t.dtype] ??= { count: 0, bytes: 0 });
    d.count++;
    d.bytes += t.nbytes;
  }
  return {
    name: o.checkpoint,
    version: o.version,
    ckpt: {
      root: path,
      kind: "file",
      files: [{ path, size: layout.bytes, mtimeMs: 0, dataStart: 0, metadata: {}, tensors }],
      tensors,
      totalBytes: tensors.reduce((s, t) => s + t.nbytes, 0),
      largestTensor: tensors.reduce((a, b) => (b.nbytes > a.nbytes ? b : a)),
      dtypes,
    },
    files: [{ path, region, bytes: layout.bytes, inPlace: false }],
    registerSeconds: 0,
    inPlace: false,
    owned: true,
  };
}
