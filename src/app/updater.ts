// What `ce update`, `ce bench` and `ce serve` all start from: devices, a context, an engine and
// an update session over them; and a synthetic checkpoint when asked for one.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Checkpoint } from "../checkpoint/checkpoint";
import { config } from "../base/config";
import { type DeviceSet, freeBytesIn, parseDeviceList, resolveBackend, resolveDevices } from "../core/devices";
import { HttpEngine } from "../engines/http";
import type { Engine } from "../engines/types";
import { type WorkerKind, WorkersEngine } from "../engines/workers";
import { UsageError } from "../base/errors";
import { formatBytes, logger } from "../base/log";
import { Ctx } from "../native/ce";
import { onRamFs } from "../checkpoint/registry";
import { tensorBytes } from "../checkpoint/safetensors";
import { loadShapes, writeSyntheticCheckpoint } from "../checkpoint/synth-writer";
import { parseDuration } from "../base/units";
import { UpdateSession } from "../core/update";

const log = logger("setup");

export type EngineKind = "vllm" | "external" | "workers";

export interface SetupOptions {
  device?: string;
  devices?: string;
  engine?: string;
  endpoint?: string;
  worker?: string;
  verify: boolean;
  opTimeoutMs: number;
  forceBroadcast?: boolean;
}

export interface Updater {
  set: DeviceSet;
  ctx: Ctx;
  engine: Engine;
  session: UpdateSession;
  close(): Promise<void>;
}

export function engineKind(engine: string | undefined, endpoint: string | undefined): EngineKind {
  const kind = engine ?? (endpoint ? "vllm" : "workers");
  if (kind !== "vllm" && kind !== "external" && kind !== "workers") {
    throw new UsageError(`--engine "${kind}": use vllm, external or workers`);
  }
  if (kind !== "workers" && !endpoint) throw new UsageError(`--engine ${kind} needs --endpoint URL`);
  return kind;
}

export function workerKind(worker: string | undefined): WorkerKind {
  const kind = worker ?? "ref";
  if (kind !== "ref" && kind !== "python") throw new UsageError(`--worker "${kind}": use ref or python`);
  return kind;
}

/**
 * Checks the flags openUpdater reads, without starting anything: a typo must fail before the slow
 * steps that come first (opening a checkpoint, writing a synthetic one of many GiB).
 */
export function checkSetupOptions(opts: Pick<SetupOptions, "device" | "devices" | "engine" | "endpoint" | "worker">): void {
  engineKind(opts.engine, opts.endpoint);
  workerKind(opts.worker);
  resolveBackend(opts.device);
  parseDeviceList(opts.devices, undefined);
}

/** SetupOptions from the engine and device flags that update, serve and bench share. */
export function setupOptions(
  args: Pick<SetupOptions, "device" | "devices" | "engine" | "endpoint" | "worker" | "verify"> & { broadcast: boolean },
): SetupOptions {
  return {
    device: args.device,
    devices: args.devices,
    engine: args.engine,
    endpoint: args.endpoint,
    worker: args.worker,
    verify: args.verify,
    opTimeoutMs: parseDuration(config.CE_OP_TIMEOUT, "CE_OP_TIMEOUT"),
    forceBroadcast: args.broadcast,
  };
}

export async function openUpdater(opts: SetupOptions): Promise<Updater> {
  const kind = engineKind(opts.engine, opts.endpoint);
  const worker = workerKind(opts.worker);
  const set = resolveDevices(opts.device, opts.devices);
  log.info(`${set.backend === "cuda" ? "GPUs" : "CPU devices"}: ${set.devices.map((d) => `${d.ordinal} (${d.uuid})`).join(", ")}`);
  const ctx = Ctx.create(
    set.backend,
    set.devices.map((d) => d.ordinal),
  );
  let engine: Engine;
  let workers: WorkersEngine | undefined;
  if (kind === "workers") {
    workers = new WorkersEngine(worker, set.backend, set.devices, { verify: opts.verify });
    engine = workers;
  } else {
    engine = new HttpEngine(kind, opts.endpoint!);
  }
  const session = new UpdateSession({ ctx, devices: set.devices, engine, opTimeoutMs: opts.opTimeoutMs, forceBroadcast: opts.forceBroadcast });
  try {
    await workers?.start(session.endpoints);
  } catch (err) {
    await session.close();
    ctx.close();
    throw err;
  }
  return {
    set,
    ctx,
    engine,
    session,
    async close() {
      await session.close();
      ctx.close();
    },
  };
}

/** A scratch directory for synthetic checkpoints: /dev/shm when it has room (in-place pinning), else the temp dir. */
export function scratchDir(bytesNeeded: number): string {
  const shm = config.CE_SHM_DIR;
  const base = onRamFs(shm) && (freeBytesIn(shm) ?? 0) > bytesNeeded * 1.1 ? shm : tmpdir();
  return mkdtempSync(join(base, "ce-synth-"));
}

/** Synthetic checkpoints on disk now, written or being written: removeSynthetic() deletes them. */
const synthDirs = new Set<string>();

function removeDir(dir: string): void {
  rmSync(dir, { recursive: true, force: true });
  synthDirs.delete(dir);
}

/** Deletes every synthetic checkpoint this process wrote (they are ours); synchronous, for a signal handler. */
export function removeSynthetic(): void {
  for (const dir of [...synthDirs]) removeDir(dir);
}

/**
 * Until the returned function is called, Ctrl-C or SIGTERM frees what would otherwise outlive the
 * process — the slot buffers (on the CPU backend, /dev/shm files of GiBs) and synthetic checkpoints —
 * synchronously, then exits as the signal would. Once only: a second signal kills at once, should
 * the native teardown hang.
 */
export function cleanupOnSignal(current: () => Updater | undefined): () => void {
  const onSignal = (sig: NodeJS.Signals) => {
    log.warn(`${sig}: stopping, freeing buffers and scratch files`);
    current()?.ctx.close();
    removeSynthetic();
    process.exit(sig === "SIGINT" ? 130 : 143);
  };
  process.once("SIGINT", onSignal);
  process.once("SIGTERM", onSignal);
  return () => {
    process.off("SIGINT", onSignal);
    process.off("SIGTERM", onSignal);
  };
}

/** --slots: a whole number ≥ 1, or auto (undefined). */
export function parseSlots(spec: string): number | undefined {
  if (spec === "auto") return undefined;
  const n = Number(spec);
  if (!Number.isSafeInteger(n) || n < 1) throw new UsageError(`--slots "${spec}": use a whole number of at least 1, or auto`);
  return n;
}

/** Writes a synthetic checkpoint of a real architecture's shapes; remove() deletes it (it is ours). */
export async function synthesize(model: string, seed: number, onProgress?: (done: number, total: number) => void): Promise<{ ckpt: Checkpoint; remove(): void }> {
  const shapes = await loadShapes(model);
  const bytes = shapes.tensors.reduce((s, t) => s + (tensorBytes(t.dtype ?? shapes.dtype, t.shape) ?? 0), 0);
  const dir = scratchDir(bytes);
  synthDirs.add(dir);
  log.info(`writing a synthetic ${shapes.name} checkpoint (${formatBytes(bytes)}) to ${dir}`);
  try {
    const ckpt = await writeSyntheticCheckpoint({ shapes, dir, seed, onProgress: onProgress && ((p) => onProgress(p.bytesDone, p.bytesTotal)) });
    return { ckpt, remove: () => removeDir(dir) };
  } catch (err) {
    removeDir(dir);
    throw err;
  }
}
