// Synthetic checkpoints of real shape: tensor names and shapes from models/*.json, bytes from a seeded
// generator, written as HF-like safetensors shards. Used by `ce bench`, the tests and the GPU suite.
import { existsSync, mkdirSync, statSync } from "node:fs";
import { type FileHandle, open, readdir, readFile, rename, unlink } from "node:fs/promises";
import { join } from "node:path";
import { type Checkpoint, INDEX_FILE, openCheckpoint } from "./checkpoint";
import { InputError } from "../base/errors";
import { DTYPE_BITS, encodeHeader, tensorBytes } from "./safetensors";

export interface ShapesTensor {
  name: string;
  shape: number[];
  /** Overrides the file's dtype for this tensor. */
  dtype?: string;
}

export interface Shapes {
  name: string;
  dtype: string;
  tensors: ShapesTensor[];
}

// Static specifiers, so `bun build --compile` embeds the files; imported only when asked for.
const BUILTIN: Record<string, () => Promise<{ default: unknown }>> = {
  "Qwen3-0.6B": () => import("../../models/Qwen3-0.6B.json"),
  "Qwen3-8B": () => import("../../models/Qwen3-8B.json"),
  "Qwen3-30B-A3B": () => import("../../models/Qwen3-30B-A3B.json"),
};

export const BUILTIN_SHAPES: readonly string[] = Object.keys(BUILTIN);

/**
 * Shapes by name ("Qwen3-8B": models/Qwen3-8B.json beside the sources, else the copy embedded in the
 * binary) or by path to any file of the same form.
 */
export async function loadShapes(nameOrPath: string): Promise<Shapes> {
  const repoFile = join(import.meta.dir, "..", "..", "models", `${nameOrPath}.json`);
  let json: unknown;
  let source = nameOrPath;
  if (existsSync(nameOrPath) && statSync(nameOrPath).isFile()) {
    json = await readJson(nameOrPath);
  } else if (!nameOrPath.includes("/") && existsSync(repoFile)) {
    json = await readJson(repoFile);
    source = repoFile;
  } else if (Object.hasOwn(BUILTIN, nameOrPath)) {
    json = (await BUILTIN[nameOrPath]!()).default;
  } else {
    throw new InputError(
      "E_SHAPES_NOT_FOUND",
      `no shapes file or known model named "${nameOrPath}" (known: ${BUILTIN_SHAPES.join(", ")})`,
      {
        hint: `give a known model name or a path to a {"name","dtype","tensors":[{"name","shape"}]} file`,
      },
    );
  }
  return validateShapes(json, source);
}

async function readJson(path: string): Promise<unknown> {
  const text = await readFile(path, "utf8");
  try {
    return JSON.parse(text);
  } catch (err) {
    throw new InputError("E_SHAPES", `${path}: not valid JSON: ${(err as Error).message}`);
  }
}

function validateShapes(json: unknown, source: string): Shapes {
  const bad: (what: string) => never = (what) => {
    throw new InputError("E_SHAPES", `${source}: ${what}`, {
      hint: `a shapes file is {"name": "...", "dtype": "BF16", "tensors": [{"name": "...", "shape": [..]}]}`,
    });
  };
  const j = json as Partial<Shapes> | null;
  if (typeof j !== "object" || j === null) return bad("not a JSON object");
  if (typeof j.name !== "string") bad(`"name" is not a string`);
  if (typeof j.dtype !== "string" || DTYPE_BITS[j.dtype] === undefined) bad(`"dtype" ${JSON.stringify(j.dtype)} is not a safetensors dtype`);
  if (!Array.isArray(j.tensors) || j.tensors.length === 0) bad(`"tensors" is not a non-empty list`);
  const names = new Set<string>();
  for (const t of j.tensors!) {
    if (typeof t?.name !== "string" || names.has(t.name)) bad(`tensor name ${JSON.stringify(t?.name)} is missing or repeated`);
    names.add(t.name);
    if (!Array.isArray(t.shape) || !t.shape.every((d) => Number.isSafeInteger(d) && d >= 0)) {
      bad(`tensor ${JSON.stringify(t.name)}: shape ${JSON.stringify(t.shape)} is not a list of non-negative integers`);
    }
    const dtype = t.dtype ?? j.dtype!;
    if (tensorBytes(dtype, t.shape) === undefined) bad(`tensor ${JSON.stringify(t.name)}: ${dtype} ${JSON.stringify(t.shape)} has no valid byte size`);
  }
  return j as Shapes;
}

export interface SynthProgress {
  bytesDone: number;
  bytesTotal: number;
  file: string;
  fileIndex: number;
  files: number;
}

export interface SynthOptions {
  shapes: Shapes | string;
  dir: string;
  /** Shard size limit, as HF writes them (a shard always holds at least one tensor). Default 4 GiB. */
  shardBytes?: number;
  seed: number;
  onProgress?: (p: SynthProgress) => void;
  /** Shards written at once (default 4); memory is 128 MiB per shard in flight. */
  concurrency?: number;
}

const CHUNK_BYTES = 64 * 1024 * 1024;

/** Shards written at once; each holds two chunk buffers (4 × 2 × 64 MiB = 512 MiB). */
const DEFAULT_CONCURRENCY = 4;

async function writeAll(fh: FileHandle, bytes: Uint8Array, position: number): Promise<void> {
  let done = 0;
  while (done < bytes.length) {
    const { bytesWritten } = await fh.write(bytes, done, bytes.length - done, position + done);
    done += bytesWritten;
  }
}

/** 32-bit mix (murmur3's finalizer) to derive independent generator states from (seed, shard, chunk). */
function mix32(h: number): number {
  h = Math.imul(h ^ (h >>> 16), 0x85ebca6b);
  h = Math.imul(h ^ (h >>> 13), 0xc2b2ae35);
  return (h ^ (h >>> 16)) >>> 0;
}

/**
 * Fills `words` with the bytes of chunk `chunk` of shard `shard` for `seed`: four interleaved xorshift32
 * lanes (independent lanes let the JIT overlap them; ~6 GB/s on one core). The bytes are a pure function
 * of (seed, shard, chunk), so a test can recompute them.
 */
export function fillChunk(words: Uint32Array, seed: number, shard: number, chunk: number): void {
  const base = mix32(mix32(mix32((seed >>> 0) ^ Math.floor(seed / 2 ** 32)) ^ shard) ^ chunk);
  // Odd states are never zero, and xorshift32 never reaches zero from a non-zero state.
  let x0 = mix32(base ^ 0x9e3779b9) | 1;
  let x1 = mix32(base ^ 0x7f4a7c15) | 1;
  let x2 = mix32(base ^ 0x94d049bb) | 1;
  let x3 = mix32(base ^ 0x2545f491) | 1;
  const n = words.length;
  let i = 0;
  for (; i + 4 <= n; i += 4) {
    x0 ^= x0 << 13; x0 ^= x0 >>> 17; x0 ^= x0 << 5;
    x1 ^= x1 << 13; x1 ^= x1 >>> 17; x1 ^= x1 << 5;
    x2 ^= x2 << 13; x2 ^= x2 >>> 17; x2 ^= x2 << 5;
    x3 ^= x3 << 13; x3 ^= x3 >>> 17; x3 ^= x3 << 5;
    words[i] = x0;
    words[i + 1] = x1;
    words[i + 2] = x2;
    words[i + 3] = x3;
  }
  for (; i < n; i++) {
    x0 ^= x0 << 13; x0 ^= x0 >>> 17; x0 ^= x0 << 5;
    words[i] = x0;
  }
}

interface ShardPlan {
  fileName: string;
  tensors: { name: string; dtype: string; shape: number[]; nbytes: number }[];
}

function shardFileName(i: number, n: number): string {
  if (n === 1) return "model.safetensors";
  const pad = (k: number) => String(k).padStart(5, "0");
  return `model-${pad(i + 1)}-of-${pad(n)}.safetensors`;
}

/**
 * Writes a synthetic checkpoint into `dir` (created if missing) and returns it opened: one
 * model.safetensors, or HF-style shards plus model.safetensors.index.json. Each shard streams through
 * two 64 MiB buffers (generate one while the other is written), so memory stays flat for any size. Every
 * file goes to a temporary name first and is renamed into place, so a reader that holds the old file
 * keeps the old bytes. Refuses a directory holding other safetensors files (they would join the
 * checkpoint when the directory is opened).
 */
export async function writeSyntheticCheckpoint(opts: SynthOptions): Promise<Checkpoint> {
  const shapes = typeof opts.shapes === "string" ? await loadShapes(opts.shapes) : validateShapes(opts.shapes, opts.shapes.name);
  const shardBytes = opts.shardBytes ?? 4 * 1024 ** 3;
  if (!Number.isSafeInteger(shardBytes) || shardBytes < 1) {
    throw new InputError("E_SYNTH", `shard size ${shardBytes} is not a positive number of bytes`);
  }
  if (!Number.isSafeInteger(opts.seed)) throw new InputError("E_SYNTH", `seed ${opts.seed} is not an integer`);

  const shards: Omit<ShardPlan, "fileName">[] = [];
  let current: Omit<ShardPlan, "fileName"> | undefined;
  let currentBytes = 0;
  for (const t of shapes.tensors) {
    const dtype = t.dtype ?? shapes.dtype;
    const nbytes = tensorBytes(dtype, t.shape)!;
    if (current === undefined || (currentBytes + nbytes > shardBytes && current.tensors.length > 0)) {
      current = { tensors: [] };
      shards.push(current);
      currentBytes = 0;
    }
    current.tensors.push({ name: t.name, dtype, shape: t.shape, nbytes });
    currentBytes += nbytes;
  }
  const plan: ShardPlan[] = shards.map((s, i) => ({ ...s, fileName: shardFileName(i, shards.length) }));

  // Synchronous: a signal handler that deletes the directory runs on this thread, so it can never
  // run before a mkdir still queued on an I/O thread that would make the directory again.
  mkdirSync(opts.dir, { recursive: true });
  const ours = new Set(plan.map((p) => p.fileName));
  if (plan.length > 1) ours.add(INDEX_FILE);
  const foreign = (await readdir(opts.dir)).filter(
    (n) => (n.endsWith(".safetensors") || n === INDEX_FILE) && !ours.has(n),
  );
  if (foreign.length > 0) {
    throw new InputError(
      "E_SYNTH_DIR",
      `${opts.dir} already holds ${foreign.slice(0, 3).join(", ")}${foreign.length > 3 ? ", …" : ""}, which would mix with the new checkpoint`,
      { hint: "write synthetic checkpoints into an empty directory (or one holding a previous synthetic checkpoint of the same shapes)" },
    );
  }

  const metadata = { format: "pt", ce_synthetic: shapes.name, ce_seed: String(opts.seed) };
  const headers = plan.map((p) => encodeHeader(p.tensors, metadata, 256));
  const bytesTotal = headers.reduce((s, h) => s + h.dataBytes, 0);
  let bytesDone = 0;
  const writeShard = async (s: number) => {
    const { fileName } = plan[s]!;
    const { header, dataBytes } = headers[s]!;
    const finalPath = join(opts.dir, fileName);
    const tmpPath = join(opts.dir, `.${fileName}.tmp-${process.pid}`);
    const buffers = [new Uint32Array(CHUNK_BYTES / 4), new Uint32Array(CHUNK_BYTES / 4)];
    const fh = await open(tmpPath, "w");
    let pending: Promise<void> | undefined;
    try {
      await writeAll(fh, header, 0);
      const chunks = Math.ceil(dataBytes / CHUNK_BYTES);
      for (let k = 0; k < chunks; k++) {
        const len = Math.min(CHUNK_BYTES, dataBytes - k * CHUNK_BYTES);
        const words = buffers[k % 2]!;
        // Generate while the previous chunk is being written; its buffer is the other one.
        fillChunk(words.subarray(0, Math.ceil(len / 4)), opts.seed, s, k);
        await pending;
        pending = writeAll(fh, new Uint8Array(words.buffer, 0, len), header.length + k * CHUNK_BYTES).then(() => {
          bytesDone += len;
          opts.onProgress?.({ bytesDone, bytesTotal, file: finalPath, fileIndex: s, files: plan.length });
        });
      }
      await pending;
      await fh.close();
    } catch (err) {
      await pending?.catch(() => {});
      await fh.close().catch(() => {});
      await unlink(tmpPath).catch(() => {});
      throw err;
    }
    await rename(tmpPath, finalPath);
  };

  // Several shards at once: generation runs on this thread while their writes proceed on I/O threads.
  const concurrency = Math.max(1, Math.min(opts.concurrency ?? DEFAULT_CONCURRENCY, plan.length));
  let nextShard = 0;
  let failure: { err: unknown } | undefined;
  // allSettled, not all: on a failure the other shards in flight finish (or clean up) before we return.
  await Promise.allSettled(
    Array.from({ length: concurrency }, async () => {
      while (failure === undefined && nextShard < plan.length) {
        const s = nextShard++;
        try {
          await writeShard(s);
        } catch (err) {
          failure ??= { err };
        }
      }
    }),
  );
  if (failure !== undefined) throw failure.err;

  if (plan.length > 1) {
    const weightMap: Record<string, string> = {};
    const entries = plan.flatMap((p) => p.tensors.map((t) => [t.name, p.fileName] as const));
    entries.sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
    for (const [name, file] of entries) weightMap[name] = file;
    const index = { metadata: { total_size: bytesTotal }, weight_map: weightMap };
    const tmpIndex = join(opts.dir, `.${INDEX_FILE}.tmp-${process.pid}`);
    await Bun.write(tmpIndex, `${JSON.stringify(index, null, 2)}\n`);
    await rename(tmpIndex, join(opts.dir, INDEX_FILE));
  }
  return openCheckpoint(opts.dir);
}
