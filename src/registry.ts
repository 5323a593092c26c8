// Registered checkpoints: name@version → one pinned host region per file. A file on a RAM file
// system (/dev/shm) is pinned in place (mapped read-only, no copy); any other file is read into
// pinned memory. The user's files are never written, moved or deleted.
import { statfsSync } from "node:fs";
import { availableParallelism } from "node:os";
import { assertUnchanged, type Checkpoint } from "./checkpoint";
import { config } from "./config";
import { CeError, InputError } from "./errors";
import type { Ctx } from "./native/ce";

/** statfs f_type of tmpfs and ramfs: files there are already in RAM, so pinning them in place copies nothing. */
const RAM_FS_TYPES = new Set([0x01021994, 0x858458f6]);

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
  /** Wall seconds to pin (or read) every file. */
  registerSeconds: number;
  inPlace: boolean;
}

export function onRamFs(path: string): boolean {
  try {
    return RAM_FS_TYPES.has(Number(statfsSync(path).type));
  } catch {
    return false;
  }
}

const OP_TIMEOUT_MS = 10 * 60_000;

/** CE_PIN_THREADS, or one per core (at most 32): pinning is bound by page walks, which scale with threads. */
export function pinThreads(): number {
  const n = Number(config.CE_PIN_THREADS);
  return Number.isSafeInteger(n) && n > 0 ? n : Math.min(32, Math.max(1, availableParallelism()));
}

/** Pins every file of ckpt; on failure releases what it pinned. */
export async function register(
  ctx: Ctx,
  ckpt: Checkpoint,
  opts: { name: string; version: number; inPlace?: boolean; threads?: number },
): Promise<Registration> {
  await assertUnchanged(ckpt);
  const t0 = performance.now();
  const totalThreads = opts.threads ?? pinThreads();
  // Files pin concurrently; the thread budget is shared between them.
  const perFile = Math.max(1, Math.ceil(totalThreads / Math.min(ckpt.files.length, totalThreads)));
  const files: RegisteredFile[] = [];
  const pending: Promise<unknown>[] = [];
  try {
    for (const f of ckpt.files) {
      const inPlace = opts.inPlace ?? onRamFs(f.path);
      if (inPlace) {
        const m = ctx.regionMapFile(f.path, { pin: true, threads: perFile });
        files.push({ path: f.path, region: m.region, bytes: m.bytes, inPlace });
        pending.push(ctx.wait(m.op, { timeoutMs: OP_TIMEOUT_MS, what: `pinning ${f.path}` }));
      } else {
        const a = ctx.regionAlloc(f.size);
        files.push({ path: f.path, region: a.region, bytes: f.size, inPlace });
        pending.push(
          ctx.wait(a.op, { timeoutMs: OP_TIMEOUT_MS, what: `allocating pinned memory for ${f.path}` }).then(() =>
            ctx.wait(ctx.regionReadFile(a.region, 0, f.path, 0, f.size, perFile), {
              timeoutMs: OP_TIMEOUT_MS,
              what: `reading ${f.path}`,
            }),
          ),
        );
      }
    }
    const results = await Promise.allSettled(pending);
    const failed = results.find((r) => r.status === "rejected");
    if (failed) throw (failed as PromiseRejectedResult).reason;
    // A file rewritten while it was being read or pinned must not be used.
    await assertUnchanged(ckpt);
  } catch (err) {
    await Promise.allSettled(pending);
    await releaseFiles(ctx, files);
    if (err instanceof CeError) throw err;
    throw new InputError("E_REGISTER", `registering ${ckpt.root}: ${(err as Error).message}`, { cause: err });
  }
  return {
    name: opts.name,
    version: opts.version,
    ckpt,
    files,
    registerSeconds: (performance.now() - t0) / 1000,
    inPlace: files.every((f) => f.inPlace),
  };
}

async function releaseFiles(ctx: Ctx, files: RegisteredFile[]): Promise<void> {
  const ops = [];
  for (const f of files) {
    try {
      ops.push(ctx.wait(ctx.regionRelease(f.region), { timeoutMs: OP_TIMEOUT_MS, what: `unpinning ${f.path}` }));
    } catch {
      // a region whose pinning failed is already gone
    }
  }
  await Promise.all(ops);
}

/** Unpins every file; returns the wall seconds it took. */
export async function unregister(ctx: Ctx, reg: Registration): Promise<number> {
  const t0 = performance.now();
  await releaseFiles(ctx, reg.files);
  return (performance.now() - t0) / 1000;
}
