// ce serve's resident pools (DESIGN.md "Versions, the resident pool and digests"): this host's pools
// by name, a version's push and publish, updates from a pool (streaming behind the push, as a delta,
// with rollback). The daemon owns the session and its one-update-at-a-time bookkeeping; this file
// says what a pool request does. A cluster's hosts each hold their own pools.
import { openCheckpoint } from "../checkpoint/checkpoint";
import { CeError, errorMessage } from "../base/errors";
import { config } from "../base/config";
import { logger } from "../base/log";
import type { Updater } from "../app/updater";
import { type Delta, computeDelta, encodePatches } from "../core/delta";
import type { UpdateSummary } from "../core/update";
import { Pool } from "../pool/pool";
import { PoolBody, PublishBody, VersionBody, WrittenBody, parseBody } from "./bodies";
import type { ServeOptions } from "./daemon";
import { checkUnderRoots } from "./roots";

const log = logger("serve");

type Summary = Omit<UpdateSummary, "trace">;

/** What a pool request needs of the daemon. */
export interface PoolHost {
  up: Updater;
  opts: ServeOptions;
  /** Runs one update with the daemon's running/last/metrics bookkeeping (refused while another runs). */
  track(label: string, run: (onProgress: (p: { done: number; total: number; bytesDone: number; bytesTotal: number }) => void) => Promise<UpdateSummary>): Promise<Summary>;
  /** the label of the update running now */
  running(): string | undefined;
  /** Refuses a pool request on a host of a cluster of several. */
  hostOnly(what: string): void;
}

export class Pools {
  readonly #pools = new Map<string, Pool>();
  readonly #creating = new Set<string>();
  /** Updates started with a version's push (begin with update): publish returns their summary. */
  readonly #streaming = new Map<string, Promise<Summary>>();
  /** Set once the engine's workers said they apply no patches: pool updates then go whole without trying. */
  #deltaUnsupported = false;

  constructor(private readonly host: PoolHost) {}

  async create(body: unknown): Promise<object> {
    const { name, layout, path, slots } = parseBody(PoolBody, body);
    this.host.hostOnly("pools");
    if (this.#pools.has(name) || this.#creating.has(name)) {
      throw new CeError("E_POOL_EXISTS", `pool "${name}" exists already`, { hint: `DELETE /v1/pools/${name} first` });
    }
    let tensors = layout;
    if (path !== undefined) {
      checkUnderRoots(path, this.host.opts.roots);
      tensors = (await openCheckpoint(path)).tensors.map((t) => ({ name: t.name, dtype: t.dtype, shape: t.shape }));
    }
    this.#creating.add(name); // reserved before the first await, as register does
    let pool: Pool;
    try {
      pool = await Pool.create(this.host.up.ctx, { name, tensors: tensors!, slots, dir: config.CE_SHM_DIR });
    } finally {
      this.#creating.delete(name);
    }
    // With deltas on for every pool update, what changed is counted, and its patches encoded, while each version arrives.
    pool.countDeltas = this.host.opts.delta ?? false;
    pool.encoder = (o) => encodePatches(this.host.up.ctx, o);
    this.#pools.set(name, pool);
    return { ...pool.describe(), layout: pool.layout.tensors };
  }

  list(): object {
    return { pools: [...this.#pools.values()].map((p) => p.describe()) };
  }

  info(name: string): object {
    const pool = this.get(name);
    return { ...pool.describe(), layout: pool.layout.tensors };
  }

  async delete(name: string): Promise<object> {
    const pool = this.get(name);
    if ([...this.#streaming.keys()].some((k) => k.startsWith(`${name}@`)) || this.host.running()?.startsWith(`${name}@`)) {
      throw new CeError("E_BUSY", `pool "${name}" is being updated into the engines`, { hint: "wait for the update to end" });
    }
    this.#pools.delete(name);
    const freedBytes = pool.hostBytes;
    await pool.close();
    return { name, freedBytes };
  }

  /** A slot for a new version: the trainer writes it (then written… and publish), or ce fills it from files. */
  async begin(name: string, body: unknown): Promise<object> {
    const { version, path, update, verify } = parseBody(VersionBody, body);
    const pool = this.get(name);
    if (path !== undefined) checkUnderRoots(path, this.host.opts.roots);
    const ckpt = path !== undefined ? await openCheckpoint(path) : undefined;
    const v = pool.begin(version, { count: !update });
    if (update) this.#streamUpdate(pool, version, verify);
    const slot = { version, slot: v.slot, path: pool.slots[v.slot]!.path, bytes: pool.layout.bytes };
    if (!ckpt) return { ...slot, layout: pool.layout.tensors };
    const t0 = performance.now();
    try {
      await pool.fill(version, ckpt);
    } catch (err) {
      await this.#streaming.get(`${name}@${version}`)?.catch(() => undefined);
      pool.drop(version);
      throw err;
    }
    const fillSeconds = (performance.now() - t0) / 1000;
    return { ...slot, fillSeconds, ...(await this.publish(name, version, { update: false })) };
  }

  written(name: string, version: number, body: unknown): object {
    const { bytes } = parseBody(WrittenBody, body);
    const v = this.get(name).written(version, bytes);
    return { version, written: v.written };
  }

  /** Digests complete, the version is ready; with update (or an update streaming since begin), the engines get it. */
  async publish(name: string, version: number, body: unknown): Promise<object> {
    const { update, verify, delta } = parseBody(PublishBody, body);
    const pool = this.get(name);
    const t0 = performance.now();
    const v = await pool.publish(version);
    const out = { version, publishSeconds: (performance.now() - t0) / 1000, digestSeconds: v.digestSeconds, bytes: pool.layout.bytes };
    const key = `${name}@${version}`;
    const streaming = this.#streaming.get(key);
    if (streaming) {
      try {
        return { ...out, update: await streaming };
      } finally {
        this.#streaming.delete(key);
      }
    }
    if (!update) return out;
    return { ...out, update: await this.update(pool, version, { verify, delta }) };
  }

  /** Every engine back on the version served before the current one, from its resident slot: no registration. */
  async rollback(name: string): Promise<object> {
    const pool = this.get(name);
    if (pool.previous === undefined) {
      throw new CeError("E_NO_ROLLBACK", `pool "${name}" holds no earlier served version to roll back to`, {
        hint: pool.serving === undefined ? "nothing was served from this pool yet" : `version ${pool.serving} is the only one served that is still resident`,
      });
    }
    const from = pool.serving;
    const to = pool.previous;
    const summary = await this.update(pool, to, {});
    log.info(`pool ${name}: rolled back from version ${from} to ${to} in ${summary.seconds.toFixed(3)} s`);
    return { from: from ?? null, to, update: summary };
  }

  async deleteVersion(name: string, version: number): Promise<object> {
    const pool = this.get(name);
    if (pool.serving === version) throw new CeError("E_BUSY", `pool "${name}" version ${version} is what the engines serve: it stays resident for rollback`);
    // A push that gave up: the update streaming behind it stops at once instead of at its deadline.
    const key = `${name}@${version}`;
    const streaming = this.#streaming.get(key);
    if (streaming) {
      pool.abandon(version);
      await streaming.catch(() => undefined);
      this.#streaming.delete(key);
    }
    pool.drop(version);
    return { name, version };
  }

  /** An update started with the push: each bucket's H2D waits for its bytes; the verdict comes at publish. */
  #streamUpdate(pool: Pool, version: number, verify: boolean | undefined): void {
    const source = {
      ready: (end: number, signal: AbortSignal) => pool.waitWritten(version, end, signal),
      digests: () => pool.digestsOf(version),
    };
    const run = this.update(pool, version, { verify, source });
    run.catch(() => undefined); // publish reports it
    this.#streaming.set(`${pool.name}@${version}`, run);
  }

  async update(
    pool: Pool,
    version: number,
    o: {
      verify?: boolean;
      rollback?: boolean;
      /** false: every tensor whole */
      delta?: boolean;
      source?: { ready(end: number, signal: AbortSignal): Promise<void>; digests(): Promise<Map<string, string>> };
    },
  ): Promise<Summary> {
    this.host.hostOnly("pool updates");
    const done = pool.reading(version);
    try {
      const summary = await this.host.track(`${pool.name}@${version}`, async (onProgress) => {
        const req = {
          reg: pool.registration(version),
          source: o.source,
          verify: o.verify,
          bucketBytes: this.host.opts.bucketBytes,
          slots: this.host.opts.slots,
          timeoutMs: this.host.opts.timeoutMs,
          onProgress,
        };
        const base = !(o.delta ?? this.host.opts.delta ?? false) || o.source || this.#deltaUnsupported ? undefined : deltaBase(pool, version);
        if (base === undefined) return this.host.up.session.update(req);
        // The base's slot stays as it is until the update is done: the patches were computed from it.
        const doneBase = pool.reading(base);
        let delta: Delta | undefined;
        try {
          const region = (v: number) => pool.slots[pool.get(v).slot]!.region;
          const prepared = pool.preparedFor(version, base);
          delta = await computeDelta(this.host.up.ctx, { layout: pool.layout.tensors, base, oldRegion: region(base), newRegion: region(version), prepared });
          return await this.host.up.session.update({ ...req, delta });
        } catch (err) {
          // A full update is always correct (and verified like the delta would be): the delta only saves bytes.
          if (!(err instanceof CeError && ["E_DELTA_BASE", "E_DELTA_UNSUPPORTED", "E_DELTA"].includes(err.code))) throw err;
          // Engines whose workers apply no patches (vLLM's) get full updates from now on, without a compare each time.
          if (err.code === "E_DELTA_UNSUPPORTED") this.#deltaUnsupported = true;
          (err.code === "E_DELTA" ? log.warn : log.info)(`${errorMessage(err)}: updating ${pool.name}@${version} in full${this.#deltaUnsupported ? ", and every later pool update too" : ""}`);
          return this.host.up.session.update(req);
        } finally {
          await delta?.release().catch((err) => log.warn(errorMessage(err)));
          doneBase();
        }
      });
      pool.served(version);
      const d = summary.delta;
      const how = d ? ` (delta from ${d.base}: ${d.bytes} of ${d.fullBytes} bytes; ${d.same} unchanged, ${d.sparse} sparse, ${d.dense} dense; compared ${d.compared} at ${d.compareGbps.toFixed(1)} GB/s)` : "";
      log.info(`updated ${pool.name}@${version}: ${summary.seconds.toFixed(3)} s, ${summary.gbps.toFixed(1)} GB/s${how}`);
      return summary;
    } catch (err) {
      const back = pool.serving;
      if (!o.rollback || back === undefined || back === version) throw err;
      // The failed update may have left engines between versions: put every one back on what it served.
      try {
        const r = await this.update(pool, back, {});
        throw new CeError(err instanceof CeError ? err.code : "E_UPDATE", `${errorMessage(err)}; rolled every engine back to ${pool.name} version ${back} (${r.seconds.toFixed(3)} s)`, {
          hint: "the engines serve the previous version",
          cause: err,
        });
      } catch (rollbackErr) {
        if (rollbackErr instanceof CeError && rollbackErr.cause === err) throw rollbackErr;
        throw new CeError(err instanceof CeError ? err.code : "E_UPDATE", `${errorMessage(err)}; rolling back to version ${back} failed too: ${errorMessage(rollbackErr)}`, { cause: err });
      }
    } finally {
      done();
    }
  }

  get(name: string): Pool {
    const pool = this.#pools.get(name);
    if (!pool) throw new CeError("E_UNKNOWN_POOL", `no pool named "${name}"`, { hint: "POST /v1/pools {name, layout | path} first" });
    return pool;
  }

  /** Every pool, for status and metrics. */
  all(): Pool[] {
    return [...this.#pools.values()];
  }

  /** Waits for the updates streaming behind pushes, then unpins and removes every pool. */
  async close(): Promise<void> {
    await Promise.allSettled(this.#streaming.values());
    for (const pool of this.#pools.values()) await pool.close().catch((err) => log.warn(errorMessage(err)));
    this.#pools.clear();
  }
}

/** The version a delta of `version` starts from: the one the engines are served, while it is resident and published. */
function deltaBase(pool: Pool, version: number): number | undefined {
  const base = pool.serving;
  if (base === undefined || base === version) return undefined;
  return pool.versions.get(base)?.state === "ready" && pool.versions.get(version)?.state === "ready" ? base : undefined;
}
