// ce serve's state over a warm update session: checkpoints stay registered (pinned) between updates,
// and the context, sockets, slot buffers and workers stay up, so an update costs what the data path
// costs. One update at a time. routes.ts maps HTTP onto it.
import { openCheckpoint } from "../checkpoint/checkpoint";
import { CeError, InputError, errorMessage } from "../base/errors";
import type { Cluster, ClusterSummary, HostSummary, LocalHost, PullShare, PullSummary, Share } from "../cluster/cluster";
import type { HostPart } from "../cluster/plan";
import { logger } from "../base/log";
import { type Registration, ensureDigests, register, unregister } from "../checkpoint/registry";
import type { Offer } from "../p2p/layout";
import { Pull } from "../p2p/pull";
import { Lender } from "../p2p/source";
import type { Updater } from "../app/updater";
import { RegisterBody, UpdateBody, parseBody } from "./bodies";
import { Metrics } from "./metrics";
import { Pools } from "./pools";
import { checkUnderRoots } from "./roots";
import type { UpdateSummary } from "../core/update";

const log = logger("serve");

export interface ServeOptions {
  bucketBytes?: number;
  slots?: number;
  timeoutMs: number;
  /** Directories whose files may be registered. */
  roots: string[];
  /** Updates verify by default: registrations compute their digests. */
  verify: boolean;
  /**
   * Pool updates go as deltas against the serving version unless a request says otherwise. Off by
   * default: the compare reads both versions before the update starts, which costs more than it saves
   * where host memory, not the link, binds (measured on the CI machine); a request's "delta" decides.
   */
  delta?: boolean;
}

interface Progress {
  done: number;
  total: number;
  bytesDone: number;
  bytesTotal: number;
}

type Summary = Omit<UpdateSummary, "trace">;

/** The daemon's state: registered checkpoints by name, and the one update that may be running. */
export class Daemon {
  readonly #regs = new Map<string, Registration>();
  /** Names whose registration is under way: a second request for one is refused before it pins anything. */
  readonly #registering = new Set<string>();
  #running: { checkpoint: string; startedMs: number; progress?: Progress } | undefined;
  #last: Summary | undefined;
  #lastTrace: UpdateSummary["trace"] | undefined;

  #cluster: Cluster | undefined;
  /** this host's transfer endpoint and the checkpoints it lends to pulls: made at the first pull */
  #lender: Lender | undefined;

  /** This host's resident pools. */
  readonly pools: Pools;

  constructor(
    private readonly up: Updater,
    private readonly opts: ServeOptions,
  ) {
    this.pools = new Pools({
      up,
      opts,
      track: (label, run) => this.#track(label, run),
      running: () => this.#running?.checkpoint,
      hostOnly: (what) => this.#hostOnly(what),
    });
  }

  readonly metrics = new Metrics();

  /** This host as a cluster sees it: what it holds, and how it runs its share. */
  get host(): LocalHost {
    return {
      backend: this.up.ctx.backend,
      ctx: this.up.ctx,
      devices: this.up.set.devices.map((d) => d.uuid),
      describe: (checkpoint) => this.#describePart(checkpoint),
      runShare: (share, signal) => this.#runShare(share, signal),
      status: () => this.#localStatus(),
      offer: (checkpoint, lease, verify) => this.#offer(checkpoint, lease, verify),
      endOffer: (updateId) => this.#lender?.endLease(updateId),
      runPull: (pull, signal) => this.#runPull(pull, signal),
    };
  }

  /** From now on updates and status go through the cluster. */
  attach(cluster: Cluster): void {
    this.#cluster = cluster;
  }

  async register(body: unknown): Promise<object> {
    const { name, path, version } = parseBody(RegisterBody, body);
    if (this.#regs.has(name)) {
      throw new CeError("E_CHECKPOINT_EXISTS", `checkpoint "${name}" is registered already`, { hint: `DELETE /v1/checkpoints/${name} first` });
    }
    if (this.#registering.has(name)) {
      throw new CeError("E_CHECKPOINT_EXISTS", `checkpoint "${name}" is being registered by an earlier request`, { hint: "wait for it: GET /v1/checkpoints" });
    }
    checkUnderRoots(path, this.opts.roots);
    const v = version;
    // Reserved before the first await: two requests racing for one name would otherwise both pin,
    // and the loser's region would stay pinned with no entry to release it.
    this.#registering.add(name);
    let reg: Registration;
    try {
      reg = await register(this.up.ctx, await openCheckpoint(path), { name, version: v, digests: this.opts.verify });
    } finally {
      this.#registering.delete(name);
    }
    this.#regs.set(name, reg);
    log.info(`registered ${name}@${v} from ${path} in ${reg.registerSeconds.toFixed(2)} s`);
    return describe(reg);
  }

  list(): object {
    return { checkpoints: [...this.#regs.values()].map(describe) };
  }

  async unregister(name: string): Promise<object> {
    const reg = this.#get(name);
    if (this.#running?.checkpoint === name) throw busy(this.#running.checkpoint);
    // Deregistered from the transfer endpoint first (refused while a host pulls it).
    this.#lender?.withdraw(reg);
    this.#regs.delete(name);
    return { name, releaseSeconds: await unregister(this.up.ctx, reg) };
  }

  /** One update: of this host, or (in a cluster) of every host, from whichever host was asked. */
  async update(body: unknown): Promise<Summary | ClusterSummary | PullSummary> {
    const { checkpoint: named, pool: poolName, version, verify, rollback, delta, ranks } = parseBody(UpdateBody, body);
    if (poolName !== undefined) {
      const pool = this.pools.get(poolName);
      return this.pools.update(pool, version ?? pool.latest().version, { verify, rollback, delta });
    }
    const checkpoint = named!;
    if (ranks) {
      if (!this.#cluster) throw new InputError("E_RANKS", "ranks name devices of a cluster's hosts, and this ce serve is not in a cluster", { hint: "update without ranks" });
      const s = await this.#cluster.pull(checkpoint, ranks, this.opts.timeoutMs, verify);
      log.info(`updated ${checkpoint}@${s.version} on host ${s.hosts.join(", ")} from host ${s.sources.join(", ")}: ${s.seconds.toFixed(3)} s`);
      return s;
    }
    if (this.#cluster) {
      const s = await this.#cluster.update(checkpoint, this.opts.timeoutMs);
      log.info(`updated ${checkpoint}@${s.version} on ${s.hosts} hosts (${s.ranks} ranks): ${s.seconds.toFixed(3)} s, ${s.gbps.toFixed(1)} GB/s`);
      return s;
    }
    const reg = this.#get(checkpoint);
    const summary = await this.#track(checkpoint, (onProgress) =>
      this.up.session.update({ reg, bucketBytes: this.opts.bucketBytes, slots: this.opts.slots, verify, timeoutMs: this.opts.timeoutMs, onProgress }),
    );
    log.info(`updated ${checkpoint}@${reg.version}: ${summary.seconds.toFixed(3)} s, ${summary.gbps.toFixed(1)} GB/s`);
    return summary;
  }

  /** Pools are per host: refused on a host of a cluster of several. */
  #hostOnly(what: string): void {
    if (this.#cluster && this.#cluster.nnodes > 1) {
      throw new CeError("E_POOL_CLUSTER", `${what} are per host for now: this ce serve is host ${this.#cluster.rank} of a ${this.#cluster.nnodes}-host cluster`, {
        hint: "use registered checkpoints (POST /v1/checkpoints on every host) for cluster-wide updates",
      });
    }
  }

  /** The last update that succeeded, with its per-bucket timeline (ce bench --pool --trace). */
  get lastUpdate(): UpdateSummary | undefined {
    return this.#last && this.#lastTrace && { ...this.#last, trace: this.#lastTrace };
  }

  /** Runs one update of this host's devices with the running/last/metrics bookkeeping. */
  async #track(checkpoint: string, run: (onProgress: (p: Progress) => void) => Promise<UpdateSummary>): Promise<Summary> {
    if (this.#running) throw busy(this.#running.checkpoint);
    const running: { checkpoint: string; startedMs: number; progress?: Progress } = { checkpoint, startedMs: performance.now() };
    this.#running = running;
    try {
      const { trace, ...summary } = await run((p) => {
        running.progress = p;
      });
      this.#last = summary;
      this.#lastTrace = trace;
      this.metrics.updated(summary);
      return summary;
    } catch (err) {
      this.metrics.failed(err instanceof CeError ? err.code : "E_INTERNAL");
      throw err;
    } finally {
      this.#running = undefined;
    }
  }

  #describePart(checkpoint: string): Omit<HostPart, "host" | "firstRank"> {
    const reg = this.#registered(checkpoint, "E_CLUSTER_PART_MISSING");
    return {
      version: reg.version,
      ndev: this.up.set.devices.length,
      freeBytes: this.up.session.freeBytes(),
      files: reg.ckpt.files.map((f) => ({
        path: f.path,
        tensors: reg.ckpt.tensors
          .filter((t) => t.file === f.path)
          .map((t) => ({ name: t.name, dtype: t.dtype, shape: t.shape, nbytes: t.nbytes, offset: t.fileOffset, ...(reg.digests ? { digest: reg.digests.get(t.name)! } : {}) })),
      })),
    };
  }

  /** This host's share of a cluster update: host 0's plan with its own files' regions filled in. */
  #runShare(share: Share, signal: AbortSignal): Promise<Summary> {
    const reg = this.#registered(share.checkpoint, "E_CLUSTER_PART_MISSING");
    if (reg.version !== share.version) {
      throw new InputError("E_CLUSTER_VERSION", `host 0 planned "${share.checkpoint}" version ${share.version}, this host holds ${reg.version}`);
    }
    const me = this.#cluster?.rank ?? 0;
    const regionOf = new Map<number, number>();
    share.files.forEach((f, i) => {
      if (f.host !== me) return;
      const k = reg.ckpt.files.findIndex((mine) => mine.path === f.path);
      if (k < 0) throw new InputError("E_CLUSTER", `host 0 planned ${f.path} on this host, which does not hold it in "${share.checkpoint}"`);
      regionOf.set(i, reg.files[k]!.region);
    });
    const ndev = this.up.set.devices.length;
    const buckets = share.plan.buckets.map((b) => {
      const mine = b.owner >= share.firstRank && b.owner < share.firstRank + ndev;
      return mine ? { ...b, copies: b.copies.map((c) => ({ ...c, region: regionOf.get(c.region)! })) } : b;
    });
    return this.#track(share.checkpoint, (onProgress) =>
      this.up.session.updateShare({
        reg,
        plan: { ...share.plan, buckets },
        slots: share.slots,
        staging: share.staging,
        fallbacks: [...share.fallbacks],
        firstRank: share.firstRank,
        comm: share.comm,
        files: share.files.map((f) => f.path),
        ...(share.digests ? { digests: new Map(Object.entries(share.digests)) } : {}),
        timeoutMs: share.timeoutMs,
        signal,
        onProgress,
      }),
    );
  }

  /** What this host lends of checkpoint to a pull: its regions registered for remote reads (once per registration). */
  async #offer(checkpoint: string, lease: { updateId: string; leaseMs: number }, verify: boolean | undefined): Promise<Offer | undefined> {
    const reg = this.#regs.get(checkpoint);
    if (!reg) return undefined;
    const digests = (verify ?? this.opts.verify) ? await ensureDigests(this.up.ctx, reg) : undefined;
    this.#lender ??= new Lender(this.up.ctx);
    return this.#lender.offer(this.#cluster?.rank ?? 0, reg, lease, digests);
  }

  /**
   * A P2P update of this host's devices: a host that holds the whole version updates from its own
   * regions; any other reads it from the offers' hosts into staging, the update following the reads.
   */
  #runPull(p: PullShare, signal: AbortSignal): Promise<HostSummary> {
    const me = this.#cluster?.rank ?? 0;
    const own = this.#regs.get(p.checkpoint);
    const plan = { bucketBytes: this.opts.bucketBytes, slots: this.opts.slots, verify: p.verify, timeoutMs: p.timeoutMs };
    const abort = () => this.up.session.abortRunning(signal.reason);
    signal.addEventListener("abort", abort, { once: true });
    const done = () => signal.removeEventListener("abort", abort);
    if (p.offers.length === 1 && p.offers[0]!.host === me && own?.version === p.version) {
      return this.#track(p.checkpoint, (onProgress) => this.up.session.update({ ...plan, reg: own, onProgress })).finally(done);
    }
    return this.#track(p.checkpoint, async (onProgress) => {
      const pull = await Pull.open(this.up.ctx, (this.#lender ??= new Lender(this.up.ctx)).endpoint(), p);
      const stop = () => pull.abort(signal.reason);
      signal.addEventListener("abort", stop, { once: true });
      try {
        if (signal.aborted) throw signal.reason;
        pull.start(this.up.session.plan(pull.reg, { ...plan, source: pull.source }).plan);
        const summary = await this.up.session.update({ ...plan, reg: pull.reg, source: pull.source, onProgress });
        return Object.assign(summary, { pull: pull.stats() });
      } finally {
        signal.removeEventListener("abort", stop);
        await pull.close();
      }
    }).finally(done);
  }

  /** Prometheus text: the counters, and the state as it is now. */
  async metricsText(): Promise<string> {
    const stats = this.up.ctx.stats();
    this.metrics.state({
      registeredBytes: stats.regionBytes,
      pinnedBytes: stats.pinnedBytes,
      deviceBytes: this.up.session.heldBytes(),
      versions: new Map([...this.#regs.values()].map((r) => [r.name, r.version])),
      hostsUp: this.#cluster ? this.#cluster.hostsUp() : 1,
      pools: this.pools.all().map((p) => ({ name: p.name, hostBytes: p.hostBytes, serving: p.serving })),
    });
    return this.metrics.text();
  }

  /** This host's state, or in a cluster every host's (asked of host 0). */
  async status(): Promise<object> {
    if (this.#cluster) return { cluster: await this.#cluster.status() };
    return this.#localStatus();
  }

  #localStatus(): object {
    const r = this.#running;
    const stats = this.up.ctx.stats();
    return {
      busy: r !== undefined,
      running: r && { checkpoint: r.checkpoint, seconds: (performance.now() - r.startedMs) / 1000, ...r.progress },
      last: this.#last ?? null,
      checkpoints: this.#regs.size,
      pools: this.pools.all().map((p) => ({ name: p.name, hostBytes: p.hostBytes, slots: p.slots.length, serving: p.serving ?? null, versions: [...p.versions.keys()].sort((a, b) => a - b) })),
      devices: this.up.set.devices.map((d) => d.uuid),
      engine: this.up.engine.description,
      deviceBytes: this.up.session.heldBytes(),
      pinnedBytes: stats.pinnedBytes,
      hostBytes: stats.regionBytes,
    };
  }

  /** Releases every registration, then the session and the context. */
  async close(): Promise<void> {
    this.#cluster?.close();
    // The endpoint first: its registrations hold the regions released below.
    this.#lender?.close();
    for (const reg of this.#regs.values()) await unregister(this.up.ctx, reg).catch((err) => log.warn(errorMessage(err)));
    this.#regs.clear();
    await this.pools.close();
    await this.up.close();
  }

  #get(name: string): Registration {
    return this.#registered(name, "E_UNKNOWN_CHECKPOINT");
  }

  #registered(name: string, code: string): Registration {
    const reg = this.#regs.get(name);
    if (!reg) {
      const where = this.#cluster ? `on host ${this.#cluster.rank}` : "";
      throw new CeError(code, `no checkpoint named "${name}" is registered${where ? ` ${where}` : ""}`, { hint: "POST /v1/checkpoints {name, path} first (on every host of a cluster)" });
    }
    return reg;
  }
}

function describe(reg: Registration): object {
  return {
    name: reg.name,
    version: reg.version,
    root: reg.ckpt.root,
    files: reg.files.length,
    tensors: reg.ckpt.tensors.length,
    bytes: reg.ckpt.totalBytes,
    registerSeconds: reg.registerSeconds,
    inPlace: reg.inPlace,
  };
}

function busy(checkpoint: string): CeError {
  return new CeError("E_BUSY", `an update of "${checkpoint}" is running`, { hint: "one update at a time: retry when GET /v1/status says busy: false" });
}
