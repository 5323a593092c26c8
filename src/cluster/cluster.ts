// A cluster of `ce serve` processes, one per host (DESIGN.md "Cluster"). Host 0 coordinates: hosts
// join it, it gathers each host's part of a checkpoint, plans, makes the communicator's id, and sends
// every host its share; the shares run at once and meet in the communicator's broadcasts. A request to
// any host is forwarded to host 0; the answer is one summary for the cluster. A host that fails, or
// stops answering its heartbeats, aborts the update on every host.
import { lookup } from "node:dns/promises";
import { randomBytes } from "node:crypto";
import { isIP } from "node:net";
import { AbortedError, CeError, InputError, TimeoutError, errorMessage } from "../base/errors";
import { logger } from "../base/log";
import type { Backend } from "../base/backend";
import type { UpdateSummary } from "../core/report";
import type { Plan } from "../core/planner";
import { type Ctx, ncclLoad } from "../native/ce";
import { Link, PeerError } from "./link";
import { type Offer, checkOffers } from "../p2p/layout";
import type { PullStats } from "../p2p/pull";
import { type ClusterPlan, type HostPart, clusterDigests, hostsOfRanks, planCluster } from "./plan";
import { Sealer } from "./seal";

const log = logger("cluster");

export interface ClusterOptions {
  nnodes: number;
  nodeRank: number;
  masterAddr: string;
  masterPort: number;
  secret: Buffer;
  /** How long host 0 waits for a missing host before an update names it as missing. */
  joinTimeoutMs: number;
  /** A host silent for 3 beats is down. */
  heartbeatMs: number;
}

/** What a share carries: host 0's plan and sizes, the communicator, and every host's files. */
export interface Share {
  checkpoint: string;
  version: number;
  plan: Plan;
  slots: number;
  staging: number;
  fallbacks: string[];
  firstRank: number;
  comm: { id: Uint8Array; nranks: number; firstRank: number; key: string };
  files: { host: number; path: string }[];
  /** every tensor's digest, gathered by host 0: with them each host's workers verify */
  digests?: Record<string, string>;
  timeoutMs: number;
  /** names this update on every host, so an abort that overtakes its share still stops it */
  updateId: string;
}

/** A P2P update of one host's devices: what every holder offers, and the deadline. */
export interface PullShare {
  checkpoint: string;
  version: number;
  offers: Offer[];
  verify?: boolean;
  timeoutMs: number;
  updateId: string;
}

export type HostSummary = Omit<UpdateSummary, "trace"> & { pull?: PullStats };

/** This host, as the cluster sees it: implemented by the daemon. */
export interface LocalHost {
  backend: Backend;
  ctx: Ctx;
  devices: string[];
  describe(checkpoint: string): Omit<HostPart, "host" | "firstRank">;
  /** Runs this host's share; the signal aborts it (another host failed). */
  runShare(share: Share, signal: AbortSignal): Promise<Omit<UpdateSummary, "trace">>;
  status(): object;
  /** What this host holds of checkpoint, lent to the pull updateId for leaseMs; undefined: none of it. */
  offer(checkpoint: string, lease: { updateId: string; leaseMs: number }, verify: boolean | undefined): Promise<Offer | undefined>;
  endOffer(updateId: string): void;
  /** Updates this host's devices alone, reading what it does not hold from the offers' hosts. */
  runPull(pull: PullShare, signal: AbortSignal): Promise<HostSummary>;
}

interface HostState {
  rank: number;
  devices: string[];
  ndev: number;
  pid: number;
  inc: string;
  lastSeenMs: number;
  joinedMs: number;
}

export interface ClusterSummary {
  checkpoint: string;
  version: number;
  hosts: number;
  ranks: number;
  bytes: number;
  tensors: number;
  buckets: number;
  seconds: number;
  gbps: number;
  perHost: ({ host: number } & Omit<UpdateSummary, "trace">)[];
}

/** A P2P update of some hosts' ranks; the other hosts' engines were not touched. */
export interface PullSummary {
  checkpoint: string;
  version: number;
  /** the hosts updated, and the hosts read from */
  hosts: number[];
  sources: number[];
  ranks: number[];
  bytes: number;
  tensors: number;
  seconds: number;
  gbps: number;
  perHost: ({ host: number } & HostSummary)[];
}

export class Cluster {
  readonly #link: Link;
  readonly #opts: ClusterOptions;
  readonly #local: LocalHost;
  readonly #hosts = new Map<number, HostState>();
  readonly #inc = randomBytes(8).toString("hex");
  readonly #startedMs = performance.now();
  #beat: ReturnType<typeof setInterval> | undefined;
  #busy = false;
  /** host 0: the communicator the hosts hold now, and the membership it was made for */
  #comm: { key: string; members: string; id: Uint8Array } | undefined;
  /** member: when host 0 last answered */
  #masterSeenMs = 0;
  #joined = false;
  #closed = false;
  /** member: the shares running or aborted before they came, by update id */
  readonly #shares = new Map<string, AbortController>();
  #updates = 0;

  /** host 0: the endpoint it listens on (the port when 0 was asked); the others: host 0's */
  endpoint = "";

  private constructor(link: Link, opts: ClusterOptions, local: LocalHost) {
    this.#link = link;
    this.#opts = opts;
    this.#local = local;
    link.onMessage = (from) => {
      const h = this.#hosts.get(from);
      if (h) h.lastSeenMs = performance.now();
      if (from === 0) this.#masterSeenMs = performance.now();
    };
  }

  get rank(): number {
    return this.#opts.nodeRank;
  }

  get nnodes(): number {
    return this.#opts.nnodes;
  }

  /** Binds (host 0) or connects (the others) and starts the heartbeats; never waits for the others. */
  static async start(opts: ClusterOptions, local: LocalHost): Promise<Cluster> {
    if (!Number.isSafeInteger(opts.nnodes) || opts.nnodes < 1) throw new InputError("E_CLUSTER", `a cluster needs at least one host, not ${opts.nnodes}`);
    if (!Number.isSafeInteger(opts.nodeRank) || opts.nodeRank < 0 || opts.nodeRank >= opts.nnodes) {
      throw new InputError("E_CLUSTER", `node rank ${opts.nodeRank} is not in 0..${opts.nnodes - 1}`);
    }
    const addr = isIP(opts.masterAddr) ? opts.masterAddr : (await lookup(opts.masterAddr, { family: 4 })).address;
    const endpoint = `tcp://${addr}:${opts.masterPort}`;
    const sealer = new Sealer(opts.secret);
    const options = { ...opts, masterAddr: addr };
    if (opts.nodeRank === 0) {
      const { link, endpoint: bound } = Link.listen(endpoint, sealer);
      const c = new Cluster(link, options, local);
      c.endpoint = bound;
      c.#hosts.set(0, { rank: 0, devices: local.devices, ndev: local.devices.length, pid: process.pid, inc: c.#inc, lastSeenMs: Infinity, joinedMs: 0 });
      c.#serveMaster();
      log.info(`host 0 of ${opts.nnodes}: waiting for the other hosts at ${bound}`);
      return c;
    }
    const c = new Cluster(Link.connect(endpoint, opts.nodeRank, sealer), options, local);
    c.endpoint = endpoint;
    c.#serveMember();
    log.info(`host ${opts.nodeRank} of ${opts.nnodes}: joining host 0 at ${endpoint}`);
    return c;
  }

  // ---- host 0 ------------------------------------------------------------------------------

  #serveMaster(): void {
    this.#link.on("hello", async (b, _p, from) => {
      const prev = this.#hosts.get(from);
      const devices = b.devices as string[];
      if (b.nnodes !== this.#opts.nnodes) {
        throw new InputError("E_CLUSTER", `host ${from} was started with ${String(b.nnodes)} hosts, host 0 with ${this.#opts.nnodes}`);
      }
      if (prev?.inc !== b.inc) {
        log.info(`host ${from} ${prev ? "rejoined" : "joined"} (${devices.length} devices, pid ${String(b.pid)})`);
        this.#comm = undefined; // a new process: the communicator must be made again
      }
      this.#hosts.set(from, { rank: from, devices, ndev: devices.length, pid: b.pid as number, inc: b.inc as string, lastSeenMs: performance.now(), joinedMs: performance.now() });
      return { body: { nnodes: this.#opts.nnodes } };
    });
    this.#link.on("ping", async () => ({}));
    this.#link.on("update", async (b) => {
      const ranks = b.ranks as number[] | undefined;
      const verify = b.verify as boolean | undefined;
      const summary = ranks ? await this.pull(String(b.checkpoint), ranks, Number(b.timeoutMs), verify) : await this.update(String(b.checkpoint), Number(b.timeoutMs));
      return { body: { summary } };
    });
    this.#link.on("status", async () => ({ body: (await this.status()) as Record<string, unknown> }));
  }

  /** Ranks of the hosts that answer now, in order; an error naming the others when some do not. */
  #upHosts(): HostState[] {
    const now = performance.now();
    const down: string[] = [];
    const up: HostState[] = [];
    for (let r = 0; r < this.#opts.nnodes; r++) {
      const h = this.#hosts.get(r);
      if (!h) down.push(`host ${r} has not joined`);
      else if (now - h.lastSeenMs > 3 * this.#opts.heartbeatMs) down.push(`host ${r} stopped answering ${((now - h.lastSeenMs) / 1000).toFixed(1)} s ago`);
      else up.push(h);
    }
    if (down.length > 0) {
      const waited = performance.now() - this.#startedMs;
      throw new CeError("E_CLUSTER_HOST_MISSING", `the cluster is not whole: ${down.join("; ")}`, {
        hint: waited < this.#opts.joinTimeoutMs ? "hosts are still joining: retry in a moment" : `start ce serve there with --node-rank and --master-addr ${this.#opts.masterAddr}`,
      });
    }
    return up;
  }

  /** One update of every host (host 0 runs it; other hosts forward here). */
  async update(checkpoint: string, timeoutMs: number): Promise<ClusterSummary> {
    if (this.rank !== 0) {
      const r = await this.#link.request(0, "update", { checkpoint, timeoutMs }, { timeoutMs: timeoutMs + 30_000 });
      return r.body.summary as ClusterSummary;
    }
    if (this.#busy) throw new CeError("E_BUSY", "a cluster update is running", { hint: "one update at a time: retry when GET /v1/status says busy: false" });
    this.#busy = true;
    try {
      return await this.#update(checkpoint, timeoutMs);
    } finally {
      this.#busy = false;
    }
  }

  /**
   * A P2P update of the hosts whose devices are `ranks` (host 0 runs it; other hosts forward here):
   * each reads the version from the hosts that hold it, while every other host serves untouched (no
   * collective, no pause). Not exclusive of other pulls: each host runs one update at a time.
   */
  async pull(checkpoint: string, ranks: number[], timeoutMs: number, verify?: boolean): Promise<PullSummary> {
    if (this.rank !== 0) {
      const r = await this.#link.request(0, "update", { checkpoint, timeoutMs, ranks, verify }, { timeoutMs: timeoutMs + 30_000 });
      return r.body.summary as PullSummary;
    }
    const t0 = performance.now();
    const hosts = this.#upHosts();
    const targets = hostsOfRanks(hosts, ranks);
    const updateId = `${this.#inc}-${++this.#updates}`;
    const lease = { updateId, leaseMs: timeoutMs + 30_000 };
    const offered = await Promise.all(
      hosts.map(async (h) => {
        try {
          if (h.rank === 0) return await this.#local.offer(checkpoint, lease, verify);
          const r = await this.#link.request(h.rank, "offer", { checkpoint, verify, ...lease }, { timeoutMs: 60_000 });
          return (r.body.offer ?? undefined) as Offer | undefined;
        } catch (err) {
          throw hostError(h.rank, err);
        }
      }),
    );
    const offers = offered.filter((o): o is Offer => o !== undefined);
    const sources = offers.map((o) => o.host);
    // Awaited before the reply, so a source's checkpoint can be released as soon as the pull is done.
    const endOffers = () =>
      Promise.allSettled(
        sources.map(async (h) => {
          if (h === 0) this.#local.endOffer(updateId);
          else await this.#link.request(h, "offer-end", { updateId }, { timeoutMs: 5_000 });
        }),
      );
    // A source or puller that goes silent (stopped, not dead: a dead source fails its reads at once)
    // ends the pull within three heartbeats rather than at the read deadline.
    const stop = new AbortController();
    const watched = hosts.filter((h) => sources.includes(h.rank) || targets.includes(h.rank));
    const watch = watchSilence(watched, this.#opts.heartbeatMs, (h, err) => {
      if (!stop.signal.aborted) stop.abort(err);
    });
    stop.signal.addEventListener("abort", () => {
      for (const t of targets) {
        if (t !== 0) void this.#link.request(t, "abort", { updateId, reason: errorMessage(stop.signal.reason) }, { timeoutMs: 5_000 }).catch(() => undefined);
      }
    }, { once: true });
    try {
      checkOffers(checkpoint, offers);
      const share: PullShare = { checkpoint, version: offers[0]!.version, offers, verify, timeoutMs, updateId };
      const results = await Promise.allSettled(
        targets.map(async (host) => {
          try {
            if (host === 0) return { host, ...(await this.#local.runPull(share, stop.signal)) };
            const r = await this.#link.request(host, "pull", share as unknown as Record<string, unknown>, { timeoutMs: timeoutMs + 30_000, signal: stop.signal });
            return { host, ...(r.body.summary as HostSummary) };
          } catch (err) {
            throw hostError(host, err);
          }
        }),
      );
      const failures = results.flatMap((r) => (r.status === "rejected" ? [r.reason as unknown] : []));
      if (failures.length > 0) throw rootCause(failures);
      const perHost = results.map((r) => (r as PromiseFulfilledResult<{ host: number } & HostSummary>).value);
      const seconds = (performance.now() - t0) / 1000;
      const bytes = perHost[0]!.bytes;
      return { checkpoint, version: share.version, hosts: targets, sources, ranks, bytes, tensors: perHost[0]!.tensors, seconds, gbps: (bytes * targets.length) / seconds / 1e9, perHost };
    } finally {
      clearInterval(watch);
      await endOffers();
    }
  }

  async #update(checkpoint: string, timeoutMs: number): Promise<ClusterSummary> {
    const t0 = performance.now();
    const hosts = this.#upHosts();
    const askAll = <T>(f: (h: HostState) => Promise<T>) => Promise.all(hosts.map((h) => f(h).catch((err) => Promise.reject(hostError(h.rank, err)))));
    const parts: HostPart[] = [];
    let firstRank = 0;
    const described = await askAll(async (h) =>
      h.rank === 0 ? this.#local.describe(checkpoint) : ((await this.#link.request(h.rank, "describe", { checkpoint }, { timeoutMs: 30_000 })).body as Omit<HostPart, "host" | "firstRank">),
    );
    described.forEach((d, i) => {
      parts.push({ ...d, host: hosts[i]!.rank, firstRank });
      firstRank += d.ndev;
    });
    const plan: ClusterPlan = planCluster({ checkpoint, backend: this.#local.backend, parts });
    const digests = clusterDigests(parts);
    const members = hosts.map((h) => `${h.rank}:${h.inc}`).join(",");
    // A new communicator only for new members or after a failure: while it stands, every host keeps
    // the one it has (its key unchanged) and the id is not used again.
    if (this.#comm?.members !== members) {
      if (this.#local.backend === "cuda") ncclLoad();
      // The CPU backend's id binds a listener on host 0 that every host's communicator meets at.
      const id = this.#local.ctx.commUniqueId(`tcp://${this.#opts.masterAddr}:0`);
      this.#comm = { key: randomBytes(8).toString("hex"), members, id };
    }
    const comm = { id: this.#comm.id, nranks: plan.nranks, firstRank: 0, key: this.#comm.key };
    const updateId = `${this.#inc}-${++this.#updates}`;

    // Every share runs at once; the first failure (or a host going silent) aborts the others.
    const stop = new AbortController();
    // A host that goes silent ends the wait for its share (and, through stop, every share); a live
    // host is waited for until its share has ended, recovery included, so the next update finds it idle.
    const silent = new Map(hosts.map((h) => [h.rank, new AbortController()]));
    const watch = watchSilence(hosts, this.#opts.heartbeatMs, (h, err) => {
      silent.get(h.rank)!.abort(err);
      stop.abort(err);
    });
    let aborted = false;
    const abortAll = (err: unknown) => {
      if (aborted) return;
      aborted = true;
      stop.abort(err);
      for (const h of hosts) {
        if (h.rank !== 0) void this.#link.request(h.rank, "abort", { updateId, reason: errorMessage(err) }, { timeoutMs: 5_000 }).catch(() => undefined);
      }
    };
    stop.signal.addEventListener("abort", () => abortAll(stop.signal.reason), { once: true });
    try {
      const results = await Promise.allSettled(
        parts.map(async (p) => {
          const share: Share = {
            checkpoint,
            version: p.version,
            plan: plan.plan,
            slots: plan.slots,
            staging: plan.staging,
            fallbacks: plan.fallbacks,
            firstRank: p.firstRank,
            comm: { ...comm, firstRank: p.firstRank },
            files: plan.files,
            ...(digests ? { digests } : {}),
            timeoutMs,
            updateId,
          };
          try {
            if (p.host === 0) return { host: 0, ...(await this.#local.runShare(share, stop.signal)) };
            const r = await this.#link.request(p.host, "share", encodeShare(share), {
              timeoutMs: timeoutMs + 30_000,
              payload: [share.comm.id],
              signal: silent.get(p.host)!.signal,
            });
            return { host: p.host, ...(r.body.summary as Omit<UpdateSummary, "trace">) };
          } catch (err) {
            const e = hostError(p.host, err);
            abortAll(e);
            throw e;
          }
        }),
      );
      const failures = results.flatMap((r) => (r.status === "rejected" ? [r.reason as unknown] : []));
      if (failures.length > 0) {
        // Some host's communicator may have died with the update: the next one makes a new one.
        this.#comm = undefined;
        throw rootCause(failures);
      }
      const perHost = results.map((r) => (r as PromiseFulfilledResult<{ host: number } & Omit<UpdateSummary, "trace">>).value);
      const seconds = (performance.now() - t0) / 1000;
      return {
        checkpoint,
        version: parts[0]!.version,
        hosts: hosts.length,
        ranks: plan.nranks,
        bytes: plan.plan.totalBytes,
        tensors: plan.plan.tensorCount,
        buckets: plan.plan.buckets.length,
        seconds,
        gbps: plan.plan.totalBytes / seconds / 1e9,
        perHost,
      };
    } finally {
      clearInterval(watch);
    }
  }

  /** Every host: up or not, its devices, and what its daemon says. */
  async status(): Promise<object> {
    if (this.rank !== 0) return (await this.#link.request(0, "status", {}, { timeoutMs: 10_000 })).body;
    const now = performance.now();
    const hosts = await Promise.all(
      Array.from({ length: this.#opts.nnodes }, async (_, r) => {
        const h = this.#hosts.get(r);
        if (!h) return { host: r, up: false, joined: false };
        const up = now - h.lastSeenMs <= 3 * this.#opts.heartbeatMs;
        let daemon: object | undefined;
        if (r === 0) daemon = this.#local.status();
        else if (up) daemon = await this.#link.request(r, "status-local", {}, { timeoutMs: 5_000 }).then((m) => m.body, () => undefined);
        return { host: r, up, joined: true, pid: h.pid, devices: h.devices, ...(daemon ?? {}) };
      }),
    );
    return { nnodes: this.#opts.nnodes, hostsUp: hosts.filter((h) => h.up).length, hosts };
  }

  // ---- the other hosts ---------------------------------------------------------------------

  #serveMember(): void {
    this.#link.on("describe", async (b) => ({ body: this.#local.describe(String(b.checkpoint)) as unknown as Record<string, unknown> }));
    this.#link.on("share", async (b, payload) => {
      const share = decodeShare(b, payload);
      const stop = this.#shareControl(share.updateId);
      try {
        return { body: { summary: await this.#local.runShare(share, stop.signal) } };
      } finally {
        this.#shares.delete(share.updateId);
      }
    });
    this.#link.on("abort", async (b) => {
      this.#shareControl(String(b.updateId)).abort(new AbortedError(`host 0 aborted the update: ${String(b.reason)}`));
      return {};
    });
    this.#link.on("status-local", async () => ({ body: this.#local.status() as Record<string, unknown> }));
    this.#link.on("offer", async (b) => {
      const offer = await this.#local.offer(String(b.checkpoint), { updateId: String(b.updateId), leaseMs: Number(b.leaseMs) }, b.verify as boolean | undefined);
      return { body: { offer: offer ?? null } };
    });
    this.#link.on("offer-end", async (b) => {
      this.#local.endOffer(String(b.updateId));
      return {};
    });
    this.#link.on("pull", async (b) => {
      const pull = b as unknown as PullShare;
      const stop = this.#shareControl(pull.updateId);
      try {
        return { body: { summary: await this.#local.runPull(pull, stop.signal) } };
      } finally {
        this.#shares.delete(pull.updateId);
      }
    });
    // Hello until host 0 answers, then a heartbeat; a silent host 0 aborts the share running here.
    const hello = async () => {
      try {
        await this.#link.request(0, "hello", { nnodes: this.#opts.nnodes, devices: this.#local.devices, pid: process.pid, inc: this.#inc }, { timeoutMs: this.#opts.heartbeatMs });
        if (!this.#joined) log.info(`host ${this.rank}: joined host 0`);
        this.#joined = true;
      } catch (err) {
        if (err instanceof PeerError) log.error(`host 0 refused this host: ${err.message}`);
      }
    };
    void hello();
    this.#beat = setInterval(() => {
      if (this.#closed) return;
      if (!this.#joined) return void hello();
      void this.#link.request(0, "ping", {}, { timeoutMs: this.#opts.heartbeatMs }).catch(() => undefined);
      const silent = performance.now() - this.#masterSeenMs;
      if (silent > 3 * this.#opts.heartbeatMs) {
        for (const c of this.#shares.values()) c.abort(new TimeoutError(`host 0 has not answered for ${(silent / 1000).toFixed(1)} s`));
        // Host 0 may have restarted: join it again.
        this.#joined = false;
      }
    }, this.#opts.heartbeatMs);
  }

  /** The controller of one update's share here; made by whichever of share and abort comes first. */
  #shareControl(updateId: string): AbortController {
    const known = this.#shares.get(updateId);
    if (known) return known;
    const c = new AbortController();
    this.#shares.set(updateId, c);
    // An abort that overtook its share is forgotten once the share could no longer come.
    setTimeout(() => {
      if (this.#shares.get(updateId) === c && c.signal.aborted) this.#shares.delete(updateId);
    }, 60_000).unref();
    return c;
  }

  /** Host 0: the hosts that answer now; another host: 1 while it is joined, else 0. */
  hostsUp(): number {
    if (this.rank !== 0) return this.#joined ? 1 : 0;
    const now = performance.now();
    return [...this.#hosts.values()].filter((h) => now - h.lastSeenMs <= 3 * this.#opts.heartbeatMs).length;
  }

  get joined(): boolean {
    return this.rank === 0 || this.#joined;
  }

  close(): void {
    this.#closed = true;
    clearInterval(this.#beat);
    this.#link.close();
  }
}

/**
 * The failure to show when several hosts failed: one host's failure makes the others' broadcasts end
 * (a peer closed, aborted) or their waits time out; the first failure that is none of those is the cause.
 */
function rootCause(errors: unknown[]): unknown {
  const consequence = new Set(["CE_E_PEER", "CE_E_ABORTED", "E_ABORTED", "CE_E_TIMEOUT"]);
  return errors.find((e) => !(e instanceof CeError && consequence.has(e.code))) ?? errors[0];
}

/** An error of host h, in words that name it. */
function hostError(host: number, err: unknown): CeError {
  if (err instanceof CeError && (err.message.startsWith(`host ${host}:`) || err.message.startsWith(`host ${host} `))) return err;
  const code = err instanceof CeError ? err.code : "E_INTERNAL";
  return new CeError(code, `host ${host}: ${errorMessage(err)}`, { cause: err });
}

function encodeShare(s: Share): Record<string, unknown> {
  return { ...s, comm: { ...s.comm, id: undefined } };
}

function decodeShare(b: Record<string, unknown>, payload: Uint8Array[]): Share {
  const s = b as unknown as Share;
  if (!payload[0] || payload[0].byteLength !== 128) throw new InputError("E_CLUSTER", "a share came without its 128-byte communicator id");
  return { ...s, comm: { ...s.comm, id: new Uint8Array(payload[0]) } };
}

/**
 * Calls onSilent for each host quiet for three heartbeats, checked every beat. A tick that comes late
 * means this host's own loop stalled (a long synchronous call, a starved CPU): what the others sent
 * meanwhile is not read yet, so that tick judges nobody.
 */
function watchSilence(hosts: HostState[], heartbeatMs: number, onSilent: (h: HostState, err: CeError) => void): ReturnType<typeof setInterval> {
  let last = performance.now();
  return setInterval(() => {
    const now = performance.now();
    const late = now - last > 1.5 * heartbeatMs;
    last = now;
    if (late) return;
    for (const h of hosts) {
      const quiet = now - h.lastSeenMs;
      if (quiet > 3 * heartbeatMs) onSilent(h, new CeError("E_CLUSTER_HOST_MISSING", `host ${h.rank} stopped answering ${(quiet / 1000).toFixed(1)} s ago`));
    }
  }, heartbeatMs);
}
