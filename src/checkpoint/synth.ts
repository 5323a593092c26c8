// Synthetic checkpoints from their first byte to their deletion: a scratch directory (/dev/shm when
// it has room, so the checkpoint pins in place), the files (synth-writer.ts), and their removal,
// also from a signal handler. They are ce's own files, the only ones ce ever deletes.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { config } from "../base/config";
import { freeBytesIn, onRamFs } from "../base/fsinfo";
import { logger } from "../base/log";
import { formatBytes } from "../base/units";
import type { Checkpoint } from "./checkpoint";
import { tensorBytes } from "./safetensors";
import { loadShapes, writeSyntheticCheckpoint } from "./synth-writer";

const log = logger("setup");

/** A scratch directory for synthetic checkpoints: /dev/shm when it has room (in-place pinning), else the temp dir. */
export function scratchDir(bytesNeeded: number): string {
  const shm = config.CE_SHM_DIR;
  const base = onRamFs(shm) && (freeBytesIn(shm) ?? 0) > bytesNeeded * 1.1 ? shm : tmpdir();
  return mkdtempSync(join(base, "ce-synth-"));
}

/** Synthetic checkpoints on disk now, written or being written: removeSynthetic() deletes them. */
const synthDirs = new Set<string>();

function removeDir(dir: string): void {
  // Retries: a shard's open still in flight on an I/O thread may add a file while the tree is
  // being removed (ENOTEMPTY).
  rmSync(dir, { recursive: true, force: true, maxRetries: 5, retryDelay: 20 });
  synthDirs.delete(dir);
}

/** Deletes every synthetic checkpoint this process wrote; synchronous, for a signal handler. */
export function removeSynthetic(): void {
  for (const dir of [...synthDirs]) removeDir(dir);
}

/** Writes a synthetic checkpoint of a real architecture's shapes; remove() deletes it. */
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
