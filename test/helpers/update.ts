// Shared pieces of the update tests: small checkpoints of many odd-sized tensors, CPU-backend
// updaters, a deadline for every wait, and the leak probes (shared-memory files, fds, RSS).
import type { Subprocess } from "bun";
import { existsSync, readdirSync, readFileSync, readlinkSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { join } from "node:path";
import { type Checkpoint, openCheckpoint } from "../../src/checkpoint/checkpoint";
import { config } from "../../src/base/config";
import type { Engine } from "../../src/engines/types";
import { TimeoutError, WorkerError } from "../../src/base/errors";
import { type Updater, openUpdater } from "../../src/app/updater";
import { type SpecTensor, type TempDir, rng, tempDir, writeSafetensors } from "./ckpt";

export const ROOT = join(import.meta.dir, "..", "..");
export const CLI = join(ROOT, "src", "cli.ts");
export const PEER = join(import.meta.dir, "peer-worker.ts");

/** Rejects with a TimeoutError naming `what` when p has not settled after ms. */
export async function within<T>(ms: number, what: string, p: Promise<T>): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new TimeoutError(`test deadline: ${what} not done after ${ms} ms`)), ms);
  });
  try {
    return await Promise.race([p, late]);
  } finally {
    clearTimeout(timer);
  }
}

// Dtypes every worker handles (the Python worker hands F8 over as raw bytes on old torch).
const DTYPES = ["BF16", "F16", "F32", "I64", "U8", "I32", "F8_E4M3", "BOOL"];

/**
 * Tensor specs of odd sizes: mostly small (a few hundred bytes to tens of KiB), a few of ~100 KiB to
 * `largestBytes`, one scalar and one empty tensor, names like a model's layers.
 */
export function oddTensors(count: number, seed: number, largestBytes = 256 * 1024): SpecTensor[] {
  const next = rng(seed);
  const out: SpecTensor[] = [];
  for (let i = 0; i < count; i++) {
    const dtype = DTYPES[Math.floor(next() * DTYPES.length)]!;
    const width = dtype === "F32" || dtype === "I32" ? 4 : dtype === "I64" ? 8 : dtype === "BF16" || dtype === "F16" ? 2 : 1;
    const big = i % 17 === 5;
    const elems = big ? Math.floor((largestBytes / width) * (0.4 + 0.6 * next())) : 1 + Math.floor(next() * 9000);
    const cols = 1 + Math.floor(next() * 37);
    const shape = elems >= cols * 2 ? [Math.floor(elems / cols), cols] : [elems];
    out.push({ name: `model.layers.${Math.floor(i / 7)}.p${i % 7}.${dtype.toLowerCase()}`, dtype, shape });
  }
  out.push({ name: `model.scalar.s${seed}`, dtype: "F32", shape: [] });
  out.push({ name: `model.empty.e${seed}`, dtype: "BF16", shape: [0, 16] });
  return out;
}

export interface TestCheckpoint {
  dir: TempDir;
  ckpt: Checkpoint;
  /** Sum of tensor bytes, as the update summary counts them. */
  bytes: number;
  tensors: number;
}

/**
 * A directory checkpoint of `files` shards with `tensorsPerFile` tensors each (names distinct across
 * shards), in the OS temp dir, or in /dev/shm (pinned in place) with `shm`.
 */
export async function smallCheckpoint(
  opts: { files?: number; tensorsPerFile?: number; seed?: number; largestBytes?: number; shm?: boolean } = {},
): Promise<TestCheckpoint> {
  const files = opts.files ?? 3;
  const per = opts.tensorsPerFile ?? 40;
  const seed = opts.seed ?? 7;
  const dir = opts.shm ? await shmDir() : await tempDir("ce-test-update-");
  try {
    for (let f = 0; f < files; f++) {
      const tensors = oddTensors(per, seed * 100 + f, opts.largestBytes).map((t) => ({ ...t, name: `f${f}.${t.name}` }));
      await writeSafetensors(join(dir.path, `model-${String(f + 1).padStart(5, "0")}-of-${String(files).padStart(5, "0")}.safetensors`), tensors, {
        seed: seed * 10 + f,
      });
    }
    const ckpt = await openCheckpoint(dir.path);
    await saneBools(ckpt);
    return { dir, ckpt: await openCheckpoint(dir.path), bytes: ckpt.totalBytes, tensors: ckpt.tensors.length };
  } catch (err) {
    await dir.cleanup();
    throw err;
  }
}

/** BOOL tensors hold 0 or 1 in every byte, as real ones do (torch may canonicalize any other byte on copy). */
async function saneBools(ckpt: Checkpoint): Promise<void> {
  for (const f of ckpt.files) {
    const bools = f.tensors.filter((t) => t.dtype === "BOOL" && t.nbytes > 0);
    if (bools.length === 0) continue;
    const bytes = new Uint8Array(await Bun.file(f.path).arrayBuffer());
    for (const t of bools) for (let i = t.fileOffset; i < t.fileOffset + t.nbytes; i++) bytes[i]! &= 1;
    await Bun.write(f.path, bytes);
  }
}

async function shmDir(): Promise<TempDir> {
  const path = await mkdtemp(join(config.CE_SHM_DIR!, "ce-test-update-"));
  const cleanup = () => rm(path, { recursive: true, force: true });
  return { path, cleanup, [Symbol.asyncDispose]: cleanup };
}

/** CPU-backend updater over n simulated devices with verifying workers. */
export function cpuUpdater(n: number, opts: { worker?: "ref" | "python"; python?: string; verify?: boolean; opTimeoutMs?: number; forceBroadcast?: boolean } = {}): Promise<Updater> {
  return within(
    60_000,
    `starting ${n} ${opts.worker ?? "ref"} workers`,
    openUpdater({
      backend: "cpu",
      select: { count: n },
      engine: { kind: "workers", worker: opts.worker ?? "ref", python: opts.python },
      verify: opts.verify ?? true,
      opTimeoutMs: opts.opTimeoutMs ?? 30_000,
      forceBroadcast: opts.forceBroadcast,
    }),
  );
}

/** CPU-backend slot buffers this process left in the shared-memory dir (ce-<pid>-<n>-dev<d>). */
export function shmBuffersOf(pid = process.pid): string[] {
  const dir = config.CE_SHM_DIR!;
  if (!existsSync(dir)) return [];
  return readdirSync(dir).filter((n) => n.startsWith(`ce-${pid}-`));
}

export function openFds(): number {
  return readdirSync("/proc/self/fd").length;
}

export function sockets(): number {
  let n = 0;
  for (const fd of readdirSync("/proc/self/fd")) {
    try {
      if (readlinkSync(`/proc/self/fd/${fd}`).startsWith("socket:")) n++;
    } catch {
      // closed meanwhile
    }
  }
  return n;
}

export function rssBytes(): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync("/proc/self/status", "utf8"));
  return m ? Number(m[1]) * 1024 : 0;
}

/** Whether a process is gone (or a zombie). */
export function processGone(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    return stat.slice(stat.lastIndexOf(")") + 2).startsWith("Z");
  } catch {
    return true;
  }
}

// ---- scripted peers ------------------------------------------------------------------------------

/** What the worker of one device is: a real `ce worker`, or the scripted peer of peer-worker.ts. */
export type PeerScript =
  | { kind: "ref" }
  | { kind: "peer"; fail?: string; hang?: string; drop?: string; log: string };

/**
 * An engine whose workers are chosen per device and per generation (reset starts the next one): so a
 * test can put a failing or silent peer beside real workers, then recover with real workers only.
 */
export class ScriptedEngine implements Engine {
  readonly description = "scripted workers";
  failure: Promise<never>;
  generation = 0;
  #fail!: (err: WorkerError) => void;
  #procs: Subprocess<"pipe", "ignore", "inherit">[] = [];
  readonly #stopping = new WeakSet<Subprocess>();

  constructor(
    private readonly uuids: string[],
    private readonly script: (device: number, generation: number) => PeerScript,
  ) {
    this.failure = this.#newFailure();
  }

  #newFailure(): Promise<never> {
    const p = new Promise<never>((_, reject) => (this.#fail = reject));
    p.catch(() => {});
    return p;
  }

  start(endpoints: Record<string, string>): void {
    this.#procs = this.uuids.map((uuid, d) => {
      const s = this.script(d, this.generation);
      const endpoint = endpoints[uuid]!;
      const cmd =
        s.kind === "ref"
          ? [process.execPath, CLI, "worker", "--endpoint", endpoint, "--device", "cpu"]
          : [process.execPath, PEER, "--endpoint", endpoint, "--log", s.log, ...(s.fail ? ["--fail", s.fail] : []), ...(s.hang ? ["--hang", s.hang] : []), ...(s.drop ? ["--drop", s.drop] : [])];
      return Bun.spawn(cmd, {
        stdin: "pipe",
        stdout: "ignore",
        stderr: "inherit",
        onExit: (p, code, signal) => {
          if (!this.#stopping.has(p)) this.#fail(new WorkerError("E_WORKER_DIED", `worker ${uuid} exited (${signal ?? code})`));
        },
      });
    });
  }

  trigger(): Promise<void> {
    return Promise.resolve();
  }

  /** The process serving a device now. */
  pid(device: number): number | undefined {
    return this.#procs[device]?.pid;
  }

  async reset(endpoints: Record<string, string>): Promise<void> {
    await this.close();
    this.generation++;
    this.failure = this.#newFailure();
    this.start(endpoints);
  }

  async close(): Promise<void> {
    const procs = this.#procs;
    this.#procs = [];
    for (const p of procs) {
      this.#stopping.add(p);
      p.stdin.end();
      p.kill("SIGKILL");
    }
    await Promise.all(procs.map((p) => p.exited));
  }
}

/** The requests a scripted peer logged, one JSON object per line: {op, bucket?}. */
export function peerLog(path: string): { op: string; bucket?: number }[] {
  if (!existsSync(path)) return [];
  return readFileSync(path, "utf8")
    .split("\n")
    .filter(Boolean)
    .map((l) => JSON.parse(l) as { op: string; bucket?: number });
}
