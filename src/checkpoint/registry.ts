// Registered checkpoints: name@version → one pinned host region per file. A file on a RAM file
// system (/dev/shm) is pinned in place (mapped read-only, no copy); any other file is read into
// pinned memory. The user's files are never written, moved or deleted.
import { availableParallelism } from "node:os";
import { assertUnchanged, type Checkpoint } from "./checkpoint";
import { config } from "../base/config";
import { CeError, InputError, NativeError, errorMessage } from "../base/errors";
import { onRamFs } from "../base/fsinfo";
import { logger } from "../base/log";
import { type Ctx, formatDigest } from "../native/ce";


export interface RegisteredFile {
  path: string;
  region: number;
  bytes: number;
  inPlace: boolean;
}

export interface Registration {
  name: string;
  version: number;
  ckpt: Checkpoint;
  files: RegisteredFile[];
  /** Wall seconds to pin (or read) every file, digests included. */
  registerSeconds: number;
  inPlace: boolean;
  /** Tensor name → its digest (docs/digest.md, 16 hex digits), once computed: what verify compares workers with. */
  digests?: Map<string, string>;
  /** Wall seconds the digests took. */
  digestSeconds?: number;
  /** ce's own memory (a pool's slot), not a user's files: nothing to check for changes. */
  owned?: boolean;
}

const OP_TIMEOUT_MS = 10 * 60_000;

const log = logger("registry");

/** CE_PIN_THREADS, or one per core (at most 32): pinning is bound by page walks, which scale with threads. */
export function pinThreads(): number {
  const n = Number(config.CE_PIN_THREADS);
  return Number.isSafeInteger(n) && n > 0 ? n : Math.min(32, Math.max(1, availableParallelism()));
}

/** CE_DIGEST_THREADS, or pinThreads(): digests share the memory bus with the copies they run beside. */
export function digestThreads(): number {
  const n = Number(config.CE_DIGEST_THREADS);
  return Number.isSafeInteger(n) && n > 0 ? n : pinThreads();
}

/** Pins every file of ckpt; on failure releases what it pinned. */
export async function register(
  ctx: Ctx,
  ckpt: Checkpoint,
  opts: { name: string; version: number; inPlace?: boolean; threads?: number; /** compute the tensors' digests (for verify) */ digests?: boolean },
): Promise<Registration> {
  await assertUnchanged(ckpt);
  const t0 = performance.now();
  const totalThreads = opts.threads ?? pinThreads();
  // Files pin concurrently; the thread budget is shared between them.
  const perFile = Math.max(1, Math.ceil(totalThreads / Math.min(ckpt.files.length, totalThreads)));
  const files: RegisteredFile[] = [];
  const copyIn = async (path: string, size: number): Promise<void> => {
    const a = ctx.regionAlloc(size);
    files.push({ path, region: a.region, bytes: size, inPlace: false });
    await ctx.wait(a.op, { timeoutMs: OP_TIMEOUT_MS, what: `allocating pinned memory for ${path}` });
    await ctx.wait(ctx.regionReadFile(a.region, 0, path, 0, size, perFile), { timeoutMs: OP_TIMEOUT_MS, what: `reading ${path}` });
  };
  const pinInPlace = async (path: string, size: number): Promise<void> => {
    const m = ctx.regionMapFile(path, { pin: true, threads: perFile });
    const entry = { path, region: m.region, bytes: m.bytes, inPlace: true };
    files.push(entry);
    try {
      await ctx.wait(m.op, { timeoutMs: OP_TIMEOUT_MS, what: `pinning ${path}` });
    } catch (err) {
      // Pinning a read-only mapping needs the GPU's read-only host registration; without it the
      // file is read into pinned memory instead, which costs a copy but works everywhere.
      if (!(err instanceof NativeError) || err.code !== "CE_E_CUDA") throw err;
      log.warn(`pinning ${path} in place failed (${err.message}); reading it into pinned memory instead`);
      files.splice(files.indexOf(entry), 1);
      await ctx.wait(ctx.regionRelease(m.region), { timeoutMs: OP_TIMEOUT_MS, what: `unmapping ${path}` });
      await copyIn(path, size);
    }
  };
  const pending = ckpt.files.map((f) => ((opts.inPlace ?? onRamFs(f.path)) ? pinInPlace(f.path, f.size) : copyIn(f.path, f.size)));
  const reg: Registration = { name: opts.name, version: opts.version, ckpt, files, registerSeconds: 0, inPlace: false };
  try {
    const results = await Promise.allSettled(pending);
    const failed = results.find((r) => r.status === "rejected");
    if (failed) throw (failed as PromiseRejectedResult).reason;
    // A file rewritten while it was being read or pinned must not be used.
    await assertUnchanged(ckpt);
    if (opts.digests) Object.assign(reg, await digestTensors(ctx, reg, digestThreads()));
  } catch (err) {
    await releaseFiles(ctx, files).catch((releaseErr) => log.warn(errorMessage(releaseErr)));
    if (err instanceof CeError) throw err;
    throw new InputError("E_REGISTER", `registering ${ckpt.root}: ${(err as Error).message}`, { cause: err });
  }
  reg.registerSeconds = (performance.now() - t0) / 1000;
  reg.inPlace = files.every((f) => f.inPlace);
  return reg;
}

/** Every tensor's digest over the pinned bytes, on threads (one op for the whole checkpoint). */
async function digestTensors(ctx: Ctx, reg: Registration, threads: number): Promise<{ digests: Map<string, string>; digestSeconds: number }> {
  const t0 = performance.now();
  const regionOf = new Map(reg.files.map((f) => [f.path, f.region]));
  const tensors = reg.ckpt.tensors;
  const spans = new BigUint64Array(tensors.length * 3);
  tensors.forEach((t, i) => {
    spans[3 * i] = BigInt(regionOf.get(t.file)!);
    spans[3 * i + 1] = BigInt(t.fileOffset);
    spans[3 * i + 2] = BigInt(t.nbytes);
  });
  const r = await ctx.digest(spans, { threads, timeoutMs: OP_TIMEOUT_MS });
  const digests = new Map(tensors.map((t, i) => [t.name, formatDigest(r.digests[i]!)]));
  const digestSeconds = (performance.now() - t0) / 1000;
  log.debug(`digests of ${tensors.length} tensors in ${digestSeconds.toFixed(3)} s (${(reg.ckpt.totalBytes / digestSeconds / 1e9).toFixed(1)} GB/s)`);
  return { digests, digestSeconds };
}

/** Computes reg's digests if it has none yet (a registration made without them, then asked to verify). */
export async function ensureDigests(ctx: Ctx, reg: Registration): Promise<Map<string, string>> {
  if (!reg.digests) Object.assign(reg, await digestTensors(ctx, reg, digestThreads()));
  return reg.digests!;
}

/** Unpins every file, all of them even when some fail; then throws the failures, naming the files. */
async function releaseFiles(ctx: Ctx, files: RegisteredFile[]): Promise<void> {
  const results = await Promise.allSettled(
    files.map((f) => ctx.wait(ctx.regionRelease(f.region), { timeoutMs: OP_TIMEOUT_MS, what: `unpinning ${f.path}` })),
  );
  const failures = results.flatMap((r) => (r.status === "rejected" ? [errorMessage(r.reason)] : []));
  if (failures.length) throw new CeError("E_UNREGISTER", `releasing pinned memory failed: ${failures.join("; ")}`);
}

/** Unpins every file; returns the wall seconds it took. */
export async function unregister(ctx: Ctx, reg: Registration): Promise<number> {
  const t0 = performance.now();
  await releaseFiles(ctx, reg.files);
  return (performance.now() - t0) / 1000;
}
