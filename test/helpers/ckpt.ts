// Test checkpoints in a temp dir: valid files from a tensor list with seeded bytes, and raw-byte writers
// for malformed ones.
import { expect } from "bun:test";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { CeError } from "../../src/base/errors";
import { encodeHeader, tensorBytes } from "../../src/checkpoint/safetensors";

export interface TempDir {
  path: string;
  cleanup(): Promise<void>;
  [Symbol.asyncDispose](): Promise<void>;
}

/** A fresh directory under the OS temp dir; `await using dir = await tempDir()` removes it. */
export async function tempDir(prefix = "ce-test-"): Promise<TempDir> {
  const path = await mkdtemp(join(tmpdir(), prefix));
  const cleanup = () => rm(path, { recursive: true, force: true });
  return { path, cleanup, [Symbol.asyncDispose]: cleanup };
}

/** mulberry32: a small seeded generator of floats in [0, 1). */
export function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export function seededBytes(n: number, seed: number): Uint8Array<ArrayBuffer> {
  const next = rng(seed);
  const out = new Uint8Array(n);
  for (let i = 0; i < n; i++) out[i] = (next() * 256) | 0;
  return out;
}

export interface SpecTensor {
  name: string;
  /** Default BF16. */
  dtype?: string;
  shape: number[];
}

export interface WrittenFile {
  path: string;
  /** Each tensor's bytes as written. */
  data: Map<string, Uint8Array<ArrayBuffer>>;
  dataStart: number;
}

/** Writes a valid safetensors file: tensors back to back in the order given, seeded bytes. */
export async function writeSafetensors(
  path: string,
  tensors: SpecTensor[],
  opts: { seed?: number; align?: number; metadata?: Record<string, string> } = {},
): Promise<WrittenFile> {
  const full = tensors.map((t) => {
    const dtype = t.dtype ?? "BF16";
    return { name: t.name, dtype, shape: t.shape, nbytes: tensorBytes(dtype, t.shape)! };
  });
  const { header, dataStart, dataBytes, offsets } = encodeHeader(full, opts.metadata, opts.align ?? 256);
  const bytes = new Uint8Array(dataStart + dataBytes);
  bytes.set(header);
  const data = new Map<string, Uint8Array<ArrayBuffer>>();
  full.forEach((t, i) => {
    const chunk = seededBytes(t.nbytes, (opts.seed ?? 1) * 1000003 + i);
    bytes.set(chunk, dataStart + offsets[i]![0]);
    data.set(t.name, chunk);
  });
  await writeFile(path, bytes);
  return { path, data, dataStart };
}

export interface RawParts {
  /** The 8-byte length; default: the header's UTF-8 length. */
  headerLength?: number | bigint;
  /** JSON text, raw bytes, or an object to stringify. */
  header?: string | Uint8Array | object;
  /** Data region: a byte count (zeros) or bytes. */
  data?: number | Uint8Array;
}

/** The bytes of a possibly malformed file. */
export function rawBytes(parts: RawParts): Uint8Array {
  const h = parts.header ?? "{}";
  const json =
    h instanceof Uint8Array ? h : new TextEncoder().encode(typeof h === "string" ? h : JSON.stringify(h));
  const data = typeof parts.data === "number" ? new Uint8Array(parts.data) : (parts.data ?? new Uint8Array(0));
  const out = new Uint8Array(8 + json.length + data.length);
  new DataView(out.buffer).setBigUint64(0, BigInt(parts.headerLength ?? json.length), true);
  out.set(json, 8);
  out.set(data, 8 + json.length);
  return out;
}

export async function writeRaw(path: string, parts: RawParts | Uint8Array): Promise<string> {
  await writeFile(path, parts instanceof Uint8Array ? parts : rawBytes(parts));
  return path;
}

/** Writes an HF index: {"metadata": {...}, "weight_map": {tensor: shard}}. */
export async function writeIndex(path: string, weightMap: Record<string, string>): Promise<string> {
  await writeFile(path, JSON.stringify({ metadata: { total_size: 0 }, weight_map: weightMap }, null, 2));
  return path;
}

/** Awaits `run` and checks it failed with a CeError of `code` whose message holds every `parts`. */
export async function expectCeError(run: () => unknown, code: string, ...parts: string[]): Promise<CeError> {
  let caught: unknown;
  try {
    await run();
  } catch (err) {
    caught = err;
  }
  expect(caught).toBeInstanceOf(CeError);
  const err = caught as CeError;
  expect({ code: err.code, message: err.message }).toEqual({ code, message: expect.any(String) });
  for (const p of parts) expect(err.message).toContain(p);
  return err;
}

/** Random bytes, fast: a seeded xorshift over 32-bit words. */
export function randomBytes(n: number, seed: number): Uint8Array {
  const words = new Uint32Array(Math.ceil(n / 4));
  let x = seed | 1;
  for (let i = 0; i < words.length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    words[i] = x >>> 0;
  }
  return new Uint8Array(words.buffer, 0, n);
}
