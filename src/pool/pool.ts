// A resident pool (DESIGN.md "Versions, the resident pool and digests"): one layout, registered once,
// and K slots of pinned host memory, each a shared-memory file that a trainer maps and writes its
// state dict into (or that ce fills from files). A slot holds one version at a time; a version is
// written, then published (its digests complete), then updated into the engines. Digests are taken
// while the bytes arrive: each tensor as soon as the writer says the bytes up to its end are in. With
// countDeltas, so are the counts of what changed against the version serving when the push began, so
// that a delta update from it need not compare the two versions first.
import { closeSync, ftruncateSync, openSync, rmSync } from "node:fs";
import { join } from "node:path";
import { CeError, InputError, errorMessage } from "../base/errors";
import { logger } from "../base/log";
import type { Checkpoint } from "../checkpoint/checkpoint";
import { digestThreads, pinThreads, type Registration } from "../checkpoint/registry";
import type { TensorMeta } from "../checkpoint/safetensors";
import { elementBytes } from "../checkpoint/safetensors";
import type { Encoded } from "../core/delta";
import { type Ctx, formatDigest } from "../native/ce";
import { type Layout, type LayoutTensor, type PlacedTensor, layoutDifference, placeLayout } from "./layout";

const log = logger("pool");

const OP_TIMEOUT_MS = 10 * 60_000;

export interface Slot {
  path: string;
  region: number;
}

export interface PoolVersion {
  version: number;
  slot: number;
  state: "writing" | "ready";
  /** bytes of the slot complete, in layout order (the writer says so) */
  written: number;
  createdAt: string;
  publishedAt?: string;
  digests: Map<string, string>;
  /** summed wall seconds of the digest ops */
  digestSeconds: number;
  /** countDeltas: the version these counts compare against (the one serving when the push began) */
  countBase?: number;
  /** changed elements of each tensor against countBase, as its bytes arrived */
  counts?: Map<string, number>;
  /** summed wall seconds of the count ops */
  countSeconds: number;
  /** the patches of its sparse tensors against countBase, encoded as their counts came in (pool.encoder) */
  encoded: Encoded[];
}

/** Encodes the sparse tensors' patches of a counted batch (core/delta.ts encodePatches, handed in by ce serve). */
export type Encoder = (o: { tensors: PlacedTensor[]; counts: number[]; oldRegion: number; newRegion: number }) => Promise<Encoded | undefined>;

/** Resolves once the writer's bytes reach an offset (or the version is dropped). */
interface Waiter {
  upto: number;
  resolve: () => void;
  reject: (err: unknown) => void;
}

export class Pool {
  readonly versions = new Map<number, PoolVersion>();
  /** the version the engines hold: the last update from this pool that succeeded */
  serving: number | undefined;
  /** the version served before `serving`: what rollback goes back to */
  previous: number | undefined;
  /** slots an update reads now: never handed to a writer */
  readonly #reading = new Map<number, number>();
  readonly #pending = new Map<number, Promise<void>[]>();
  readonly #digested = new Map<number, number>(); // version → tensors submitted for digesting
  readonly #waiters = new Map<number, Waiter[]>();
  readonly #abandoned = new Set<number>();
  /** releases of encoded patches under way: close waits for them */
  readonly #releasing = new Set<Promise<void>>();
  /** every version's ops, dropped ones too: close waits for them */
  readonly #inFlight = new Set<Promise<void>>();
  /** version → the hold on its countBase's slot while counts are taken */
  readonly #countHolds = new Map<number, () => void>();
  /** Count what changed against the serving version while a version's bytes arrive (ce serve --delta). */
  countDeltas = false;
  /** With countDeltas: encode each counted batch's patches too. */
  encoder: Encoder | undefined;

  private constructor(
    private readonly ctx: Ctx,
    readonly name: string,
    readonly layout: Layout,
    readonly slots: Slot[],
  ) {}

  /** Creates the slot files (0600, in dir) and maps and pins each; on failure removes what it made. */
  static async create(ctx: Ctx, o: { name: string; tensors: LayoutTensor[]; slots: number; dir: string }): Promise<Pool> {
    if (!Number.isSafeInteger(o.slots) || o.slots < 1 || o.slots > 16) throw new InputError("E_POOL_SLOTS", `slots ${o.slots}: a pool has 1 to 16 slots`);
    const layout = placeLayout(o.tensors);
    const slots: Slot[] = [];
    const made: string[] = [];
    try {
      for (let k = 0; k < o.slots; k++) {
        const path = join(o.dir, `ce-pool-${process.pid}-${o.name}-${k}`);
        const fd = openSync(path, "wx", 0o600);
        made.push(path);
        try {
          ftruncateSync(fd, layout.bytes);
        } finally {
          closeSync(fd);
        }
        const m = ctx.regionMapFile(path, { pin: true, threads: pinThreads(), writable: true });
        slots.push({ path, region: m.region });
        await ctx.wait(m.op, { timeoutMs: OP_TIMEOUT_MS, what: `pinning slot ${k} of pool ${o.name}` });
      }
    } catch (err) {
      await releaseSlots(ctx, slots);
      for (const p of made) rmSync(p, { force: true });
      throw err;
    }
    log.info(`pool ${o.name}: ${layout.tensors.length} tensors, ${o.slots} slots of ${layout.bytes} bytes`);
    return new Pool(ctx, o.name, layout, slots);
  }

  /**
   * Hands a slot to a writer for `version`: an empty one, else the oldest version that is neither
   * serving nor read now. count false: no counting of changes as it arrives (its update streams whole).
   */
  begin(version: number, o: { count?: boolean } = {}): PoolVersion {
    if (this.versions.has(version)) {
      throw new CeError("E_POOL_VERSION_EXISTS", `pool ${this.name} holds version ${version} already`, { hint: `DELETE /v1/pools/${this.name}/versions/${version} first, or push a new version number` });
    }
    const held = new Map([...this.versions.values()].map((v) => [v.slot, v]));
    const free = this.slots.findIndex((_, k) => !held.has(k));
    let slot = free;
    if (slot < 0) {
      // One slot: whoever made the pool chose memory over rollback; the serving version goes too.
      const keepServing = this.slots.length > 1;
      const evictable = [...this.versions.values()]
        .filter((v) => (v.version !== this.serving || !keepServing) && v.state === "ready" && !this.#reading.has(v.slot))
        .sort((a, b) => a.createdAt.localeCompare(b.createdAt) || a.version - b.version);
      if (evictable.length === 0) {
        throw new CeError("E_POOL_FULL", `pool ${this.name}: every one of its ${this.slots.length} slots holds the serving version, a version being written, or one an update reads`, {
          hint: "publish or delete the version being written, or create the pool with more slots (the serving version stays resident for rollback)",
        });
      }
      const evicted = evictable[0]!;
      this.drop(evicted.version);
      if (this.serving === evicted.version) this.serving = undefined;
      log.info(`pool ${this.name}: version ${evicted.version} leaves slot ${evicted.slot} for version ${version}`);
      slot = evicted.slot;
    }
    const v: PoolVersion = { version, slot, state: "writing", written: 0, createdAt: new Date().toISOString(), digests: new Map(), digestSeconds: 0, countSeconds: 0, encoded: [] };
    const base = this.serving !== undefined ? this.versions.get(this.serving) : undefined;
    if (this.countDeltas && (o.count ?? true) && base?.state === "ready" && base.slot !== slot) {
      v.countBase = base.version;
      v.counts = new Map();
      this.#countHolds.set(version, this.reading(base.version)); // no writer takes the base's slot while it is read
    }
    this.versions.set(version, v);
    this.#pending.set(version, []);
    this.#digested.set(version, 0);
    this.#waiters.set(version, []);
    return v;
  }

  get(version: number): PoolVersion {
    const v = this.versions.get(version);
    if (!v) {
      const have = [...this.versions.keys()].sort((a, b) => a - b);
      throw new CeError("E_UNKNOWN_VERSION", `pool ${this.name} holds no version ${version} (it holds ${have.length ? have.join(", ") : "none"})`);
    }
    return v;
  }

  /** The newest published version. */
  latest(): PoolVersion {
    const ready = [...this.versions.values()].filter((v) => v.state === "ready").sort((a, b) => b.version - a.version);
    if (!ready[0]) throw new CeError("E_UNKNOWN_VERSION", `pool ${this.name} has no published version`, { hint: "push a version and publish it first" });
    return ready[0];
  }

  /** The writer's word that the slot's first `bytes` are in place: digests of the tensors that ends start now. */
  written(version: number, bytes: number): PoolVersion {
    const v = this.#writing(version);
    if (!Number.isSafeInteger(bytes) || bytes < v.written || bytes > this.layout.bytes) {
      throw new InputError("E_POOL_WRITTEN", `pool ${this.name} version ${version}: written ${bytes} bytes, after ${v.written}, of a ${this.layout.bytes}-byte slot`, {
        hint: "written counts bytes from the slot's start, in layout order, and only grows",
      });
    }
    v.written = bytes;
    this.#digestUpTo(v);
    const waiters = this.#waiters.get(version) ?? [];
    this.#waiters.set(version, waiters.filter((w) => (w.upto <= bytes ? (w.resolve(), false) : true)));
    return v;
  }

  /** Everything is written: digests complete, the version is ready. */
  async publish(version: number): Promise<PoolVersion> {
    const v = this.#writing(version);
    this.written(version, this.layout.bytes);
    try {
      await this.digestsOf(version);
    } finally {
      this.#endCounts(version);
    }
    v.state = "ready";
    v.publishedAt = new Date().toISOString();
    return v;
  }

  /** Fills a version being written from a checkpoint of the same layout, reading its files in parallel into the slot. */
  async fill(version: number, ckpt: Checkpoint): Promise<void> {
    const v = this.#writing(version);
    const diff = layoutDifference(this.layout.tensors, ckpt.tensors);
    if (diff) throw new InputError("E_POOL_LAYOUT", `${ckpt.root} does not fit pool ${this.name}: ${diff}`);
    const at = new Map(this.layout.tensors.map((t) => [t.name, t.offset]));
    const region = this.slots[v.slot]!.region;
    const threads = Math.max(1, Math.floor(pinThreads() / Math.max(1, ckpt.files.length)));
    await Promise.all(
      ckpt.tensors.map(async (t) => {
        if (t.nbytes === 0) return;
        await this.ctx.wait(this.ctx.regionReadFile(region, at.get(t.name)!, t.file, t.fileOffset, t.nbytes, t.nbytes > 64 << 20 ? threads : 1), {
          timeoutMs: OP_TIMEOUT_MS,
          what: `reading ${t.name} from ${t.file}`,
        });
      }),
    );
  }

  /** Waits until the writer's bytes reach `upto` (an update streaming behind the push). */
  waitWritten(version: number, upto: number, signal: AbortSignal): Promise<void> {
    const v = this.get(version);
    if (this.#abandoned.has(version)) return Promise.reject(this.#gone(version));
    if (v.state === "ready" || v.written >= upto) return Promise.resolve();
    if (signal.aborted) return Promise.reject(signal.reason);
    return new Promise((resolve, reject) => {
      // An update waits once per piece: each wait takes its abort listener with it when it ends.
      const onAbort = () => reject(signal.reason);
      const off = () => signal.removeEventListener("abort", onAbort);
      this.#waiters.get(version)!.push({ upto, resolve: () => (off(), resolve()), reject: (err) => (off(), reject(err)) });
      signal.addEventListener("abort", onAbort, { once: true });
    });
  }

  /** Every tensor's digest, once each is digested (after publish, at once). */
  async digestsOf(version: number): Promise<Map<string, string>> {
    const v = this.get(version);
    // Digests submitted later (more bytes written) join the list: wait until it stops growing.
    // Every op ends before a failure is reported: the counts' hold on the base is let go only then.
    for (let seen = -1; seen !== this.#pending.get(version)!.length; ) {
      seen = this.#pending.get(version)!.length;
      const ended = await Promise.allSettled(this.#pending.get(version)!);
      for (const e of ended) if (e.status === "rejected") throw e.reason;
    }
    if (v.digests.size !== this.layout.tensors.length) {
      const missing = this.layout.tensors.find((t) => !v.digests.has(t.name))!;
      throw new CeError("E_POOL_DIGEST", `pool ${this.name} version ${version}: tensor ${missing.name} has no digest (its bytes were never written)`);
    }
    return v.digests;
  }

  /**
   * What was found of `version` against `base` as it arrived: each tensor's changed elements (layout
   * order) and, when every batch was encoded, the sparse tensors' patches (the pool keeps them).
   */
  preparedFor(version: number, base: number): { counts: number[]; compareSeconds: number; encoded?: Encoded[] } | undefined {
    const v = this.versions.get(version);
    if (!v?.counts || v.countBase !== base || v.state !== "ready" || v.counts.size !== this.layout.tensors.length) return undefined;
    const counts = this.layout.tensors.map((t) => v.counts!.get(t.name)!);
    return { counts, compareSeconds: v.countSeconds, ...(this.encoder ? { encoded: v.encoded } : {}) };
  }

  /** What an update of `version` reads: the slot's region as one pinned file, and the digests known so far. */
  registration(version: number): Registration {
    const v = this.get(version);
    const slot = this.slots[v.slot]!;
    const tensors: TensorMeta[] = this.layout.tensors.map((t) => ({ name: t.name, dtype: t.dtype, shape: t.shape, nbytes: t.nbytes, file: slot.path, fileOffset: t.offset }));
    const largest = tensors.reduce((a, b) => (b.nbytes > a.nbytes ? b : a));
    const dtypes: Checkpoint["dtypes"] = {};
    for (const t of tensors) {
      const d = (dtypes[t.dtype] ??= { count: 0, bytes: 0 });
      d.count++;
      d.bytes += t.nbytes;
    }
    const size = this.layout.bytes;
    return {
      name: this.name,
      version,
      ckpt: {
        root: `pool:${this.name}`,
        kind: "file",
        files: [{ path: slot.path, size, mtimeMs: 0, dataStart: 0, metadata: {}, tensors }],
        tensors,
        totalBytes: tensors.reduce((s, t) => s + t.nbytes, 0),
        largestTensor: largest,
        dtypes,
      },
      files: [{ path: slot.path, region: slot.region, bytes: size, inPlace: true }],
      registerSeconds: 0,
      inPlace: true,
      owned: true,
      ...(v.state === "ready" ? { digests: v.digests, digestSeconds: v.digestSeconds } : {}),
    };
  }

  /** Marks a slot as read by an update until the returned function is called: no writer gets it meanwhile. */
  reading(version: number): () => void {
    const slot = this.get(version).slot;
    this.#reading.set(slot, (this.#reading.get(slot) ?? 0) + 1);
    return () => {
      const n = (this.#reading.get(slot) ?? 1) - 1;
      if (n > 0) this.#reading.set(slot, n);
      else this.#reading.delete(slot);
    };
  }

  /** After an update of `version` succeeded: its patches against an older version are done with. */
  served(version: number): void {
    const v = this.versions.get(version);
    if (v) this.#releaseEncoded(v);
    // Versions still being written against another base: what they found no longer applies.
    for (const w of this.versions.values()) {
      if (w.countBase === undefined || w.countBase === version) continue;
      this.#endCounts(w.version);
      w.countBase = undefined; // its later batches count nothing: the base may go now
      w.counts = undefined;
      this.#releaseEncoded(w);
    }
    if (this.serving !== version) {
      this.previous = this.serving !== undefined && this.versions.has(this.serving) ? this.serving : this.previous;
      this.serving = version;
    }
  }

  /** A writer gave a version up: whatever waits for its bytes (an update streaming behind it) fails now. */
  abandon(version: number): void {
    this.get(version);
    this.#abandoned.add(version); // a wait that starts later fails too
    for (const w of this.#waiters.get(version) ?? []) w.reject(this.#gone(version));
    this.#waiters.set(version, []);
  }

  #gone(version: number): CeError {
    return new CeError("E_POOL_VERSION_GONE", `pool ${this.name} version ${version} was given up by its writer before all its bytes arrived`);
  }

  /** Forgets a version; its slot is free. Refused while an update reads it. */
  drop(version: number): void {
    const v = this.get(version);
    if (this.#reading.has(v.slot)) throw new CeError("E_BUSY", `pool ${this.name} version ${version} is being updated into the engines`);
    for (const w of this.#waiters.get(version) ?? []) w.reject(new CeError("E_POOL_VERSION_GONE", `pool ${this.name} version ${version} was deleted`));
    this.#endCounts(version);
    this.#releaseEncoded(v);
    this.versions.delete(version);
    this.#waiters.delete(version);
    this.#pending.delete(version);
    this.#digested.delete(version);
    this.#abandoned.delete(version);
    if (this.previous === version) this.previous = undefined;
  }

  /** Bytes of pinned host memory the pool holds: K × slot size, and the patches encoded as versions arrived. */
  get hostBytes(): number {
    let patches = 0;
    for (const v of this.versions.values()) patches += v.encoded.reduce((n, e) => n + e.bytes, 0);
    return this.slots.length * this.layout.bytes + patches;
  }

  describe(): object {
    return {
      name: this.name,
      slots: this.slots.length,
      bytes: this.layout.bytes,
      hostBytes: this.hostBytes,
      tensors: this.layout.tensors.length,
      files: this.slots.map((s) => s.path),
      serving: this.serving ?? null,
      previous: this.previous ?? null,
      versions: [...this.versions.values()]
        .sort((a, b) => a.version - b.version)
        .map((v) => ({
          version: v.version,
          slot: v.slot,
          state: v.state,
          written: v.written,
          createdAt: v.createdAt,
          publishedAt: v.publishedAt ?? null,
          digestSeconds: v.digestSeconds,
          ...(v.state === "ready" ? { digests: Object.fromEntries(v.digests) } : {}),
        })),
    };
  }

  /** Unpins and removes every slot file; waits for digests in flight first. */
  async close(): Promise<void> {
    // Every op ends first, of dropped versions too (an encode's release follows it).
    await Promise.allSettled([...this.#inFlight]);
    for (const [n, v] of this.versions) {
      this.#endCounts(n);
      this.#releaseEncoded(v);
      for (const w of this.#waiters.get(n) ?? []) w.reject(new CeError("E_POOL_VERSION_GONE", `pool ${this.name} was deleted`));
    }
    this.versions.clear();
    await Promise.allSettled([...this.#releasing]);
    await releaseSlots(this.ctx, this.slots);
    for (const s of this.slots) rmSync(s.path, { force: true });
  }

  #writing(version: number): PoolVersion {
    const v = this.get(version);
    if (v.state !== "writing") throw new CeError("E_POOL_PUBLISHED", `pool ${this.name} version ${version} is published already: it cannot change`);
    return v;
  }

  /** An op of version v's: publish waits for it, and so does close (the version may be dropped by then). */
  #track(v: PoolVersion, op: Promise<void>): void {
    this.#pending.get(v.version)!.push(op);
    const settled = op.catch(() => undefined);
    this.#inFlight.add(settled);
    void settled.finally(() => this.#inFlight.delete(settled));
  }

  #releaseEncoded(v: PoolVersion): void {
    for (const e of v.encoded.splice(0)) {
      const r = e.release().catch((err) => log.warn(`pool ${this.name} version ${v.version}: ${errorMessage(err)}`));
      this.#releasing.add(r);
      void r.finally(() => this.#releasing.delete(r));
    }
  }

  #endCounts(version: number): void {
    this.#countHolds.get(version)?.();
    this.#countHolds.delete(version);
  }

  /** Submits one digest op (and with countDeltas one count op) for the tensors that the written bytes now cover and no op has taken yet. */
  #digestUpTo(v: PoolVersion): void {
    const from = this.#digested.get(v.version)!;
    let to = from;
    const tensors = this.layout.tensors;
    while (to < tensors.length && tensors[to]!.offset + tensors[to]!.nbytes <= v.written) to++;
    if (to === from) return;
    this.#digested.set(v.version, to);
    const batch = tensors.slice(from, to);
    const region = this.slots[v.slot]!.region;
    const spans = new BigUint64Array(batch.length * 3);
    batch.forEach((t, i) => {
      spans[3 * i] = BigInt(region);
      spans[3 * i + 1] = BigInt(t.offset);
      spans[3 * i + 2] = BigInt(t.nbytes);
    });
    const t0 = performance.now();
    const done = this.ctx.digest(spans, { threads: digestThreads(), timeoutMs: OP_TIMEOUT_MS }).then((r) => {
      batch.forEach((t, i) => v.digests.set(t.name, formatDigest(r.digests[i]!)));
      v.digestSeconds += (performance.now() - t0) / 1000;
    });
    done.catch((err) => log.warn(`pool ${this.name} version ${v.version}: digests failed: ${errorMessage(err)}`));
    this.#track(v, done);
    if (v.countBase !== undefined && v.counts) this.#countBatch(v, batch);
  }

  /** Counts the batch's changed elements against the base version; a failure only means the delta compares at update. */
  #countBatch(v: PoolVersion, batch: PlacedTensor[]): void {
    const old = this.slots[this.get(v.countBase!).slot]!.region;
    const cur = this.slots[v.slot]!.region;
    const spans = new BigUint64Array(batch.length * 6);
    batch.forEach((t, i) => spans.set([BigInt(old), BigInt(t.offset), BigInt(cur), BigInt(t.offset), BigInt(t.nbytes), BigInt(elementBytes(t.dtype) ?? 1)], 6 * i));
    const t0 = performance.now();
    const done = this.ctx
      .deltaCount(spans, { threads: digestThreads(), timeoutMs: OP_TIMEOUT_MS })
      .then(async (r) => {
        batch.forEach((t, i) => v.counts?.set(t.name, r.counts[i]!));
        v.countSeconds += (performance.now() - t0) / 1000;
        const e = v.counts && (await this.encoder?.({ tensors: batch, counts: r.counts, oldRegion: old, newRegion: cur }));
        if (!e) return;
        if (this.versions.get(v.version) === v && v.counts) v.encoded.push(e);
        else await e.release(); // dropped, or its finds let go, meanwhile
      })
      .catch((err) => {
        log.warn(`pool ${this.name} version ${v.version}: finding changes against version ${v.countBase} failed (a delta will compare at update): ${errorMessage(err)}`);
        v.counts = undefined;
        this.#releaseEncoded(v);
      });
    this.#track(v, done);
  }
}

async function releaseSlots(ctx: Ctx, slots: Slot[]): Promise<void> {
  await Promise.allSettled(slots.map((s) => ctx.wait(ctx.regionRelease(s.region), { timeoutMs: OP_TIMEOUT_MS, what: `unpinning ${s.path}` })));
}
