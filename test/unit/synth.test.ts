import { afterEach, beforeEach, describe, expect, test } from "bun:test";
import { readdir, readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { INDEX_FILE, openCheckpoint } from "../../src/checkpoint/checkpoint";
import { tensorBytes } from "../../src/checkpoint/safetensors";
import { BUILTIN_SHAPES, fillChunk, loadShapes, type Shapes, type SynthProgress, writeSyntheticCheckpoint } from "../../src/checkpoint/synth-writer";
import { expectCeError, type TempDir, tempDir, writeSafetensors } from "../helpers/ckpt";

let dir: TempDir;
beforeEach(async () => {
  dir = await tempDir();
});
afterEach(() => dir.cleanup());

const TINY: Shapes = {
  name: "tiny",
  dtype: "BF16",
  tensors: [
    { name: "model.embed_tokens.weight", shape: [512, 64] },
    { name: "model.layers.0.self_attn.q_proj.weight", shape: [64, 64] },
    { name: "model.layers.0.input_layernorm.weight", shape: [64] },
    { name: "model.layers.0.mlp.router.bias", shape: [8], dtype: "F32" },
    { name: "model.layers.0.mlp.down_proj.weight", shape: [64, 256] },
    { name: "model.norm.weight", shape: [64] },
  ],
};
const TINY_BYTES = TINY.tensors.reduce((s, t) => s + tensorBytes(t.dtype ?? "BF16", t.shape)!, 0);

describe("loadShapes", () => {
  test.each([
    ["Qwen3-0.6B", 310, 1192099840],
    ["Qwen3-8B", 399, 16381470720],
    ["Qwen3-30B-A3B", 18867, 61064245248],
  ])("knows %s: %i tensors, %i bytes", async (name, count, bytes) => {
    const shapes = await loadShapes(name);
    expect(shapes.tensors).toHaveLength(count);
    expect(shapes.tensors.reduce((s, t) => s + tensorBytes(shapes.dtype, t.shape)!, 0)).toBe(bytes);
    expect(BUILTIN_SHAPES).toContain(name);
  });

  test("accepts a path to any shapes file", async () => {
    const path = join(dir.path, "mine.json");
    await writeFile(path, JSON.stringify(TINY));
    expect((await loadShapes(path)).tensors).toHaveLength(TINY.tensors.length);
  });

  test("an unknown name or a malformed file is an input error", async () => {
    await expectCeError(() => loadShapes("Llama-9000B"), "E_SHAPES_NOT_FOUND", "Llama-9000B", "Qwen3-8B");
    const path = join(dir.path, "bad.json");
    await writeFile(path, JSON.stringify({ ...TINY, tensors: [{ name: "w", shape: [-1] }] }));
    await expectCeError(() => loadShapes(path), "E_SHAPES", '"w"', "[-1]");
  });
});

describe("writeSyntheticCheckpoint", () => {
  test("writes one model.safetensors whose tensors are 256-byte aligned in the file", async () => {
    const ckpt = await writeSyntheticCheckpoint({ shapes: TINY, dir: dir.path, seed: 1 });
    expect(await readdir(dir.path)).toEqual(["model.safetensors"]);
    expect(ckpt.tensors.map((t) => t.name)).toEqual(TINY.tensors.map((t) => t.name));
    expect(ckpt.totalBytes).toBe(TINY_BYTES);
    expect(ckpt.files[0]!.dataStart % 256).toBe(0);
    // Aligned until the 32-byte F32 bias; the format allows no padding between tensors.
    expect(ckpt.tensors.map((t) => t.fileOffset % 256)).toEqual([0, 0, 0, 128, 160, 160]);
    expect(ckpt.files[0]!.metadata).toMatchObject({ ce_synthetic: "tiny", ce_seed: "1" });
  });

  test("splits into HF-style shards with an index when over the shard size", async () => {
    const ckpt = await writeSyntheticCheckpoint({ shapes: TINY, dir: dir.path, seed: 1, shardBytes: 40_000 });
    const names = (await readdir(dir.path)).sort();
    expect(names).toContain(INDEX_FILE);
    expect(names.filter((n) => n.endsWith(".safetensors"))).toEqual(
      Array.from({ length: ckpt.files.length }, (_, i) => `model-0000${i + 1}-of-0000${ckpt.files.length}.safetensors`),
    );
    expect(ckpt.files.length).toBeGreaterThan(1);
    expect(ckpt.kind).toBe("index");
    expect(ckpt.tensors.map((t) => t.name)).toEqual(TINY.tensors.map((t) => t.name));
    const index = JSON.parse(await readFile(join(dir.path, INDEX_FILE), "utf8"));
    expect(index.metadata.total_size).toBe(TINY_BYTES);
  });

  test("shards written one at a time or several at once hold the same bytes", async () => {
    const one = await writeSyntheticCheckpoint({ shapes: TINY, dir: join(dir.path, "one"), seed: 3, shardBytes: 20_000, concurrency: 1 });
    const many = await writeSyntheticCheckpoint({ shapes: TINY, dir: join(dir.path, "many"), seed: 3, shardBytes: 20_000, concurrency: 3 });
    expect(one.files.length).toBeGreaterThan(2);
    for (let i = 0; i < one.files.length; i++) {
      expect(Buffer.compare(await readFile(one.files[i]!.path), await readFile(many.files[i]!.path))).toBe(0);
    }
  });

  test("the data is the seeded generator's output, so a reader can recompute it", async () => {
    const ckpt = await writeSyntheticCheckpoint({ shapes: TINY, dir: dir.path, seed: 42 });
    const file = await readFile(ckpt.files[0]!.path);
    const data = new Uint8Array(file.buffer, file.byteOffset + ckpt.files[0]!.dataStart);
    const want = new Uint32Array(Math.ceil(data.length / 4));
    fillChunk(want, 42, 0, 0);
    expect(data).toEqual(new Uint8Array(want.buffer, 0, data.length));
  });

  test("different seeds give different bytes, the same seed the same bytes", async () => {
    const read = async (seed: number, sub: string) => {
      const ckpt = await writeSyntheticCheckpoint({ shapes: TINY, dir: join(dir.path, sub), seed });
      const f = ckpt.files[0]!;
      return new Uint8Array(await readFile(f.path)).subarray(f.dataStart);
    };
    const a = await read(1, "a");
    const b = await read(2, "b");
    const a2 = await read(1, "c");
    expect(a).toEqual(a2);
    for (const t of (await openCheckpoint(join(dir.path, "a"))).tensors) {
      // Every tensor changes, so an update that skips one is visible.
      const off = t.fileOffset - (await openCheckpoint(join(dir.path, "a"))).files[0]!.dataStart;
      expect(Buffer.compare(a.subarray(off, off + t.nbytes), b.subarray(off, off + t.nbytes))).not.toBe(0);
    }
  });

  test("streams data larger than one 64 MiB chunk and reports progress to the end", async () => {
    const shapes: Shapes = { name: "big", dtype: "U8", tensors: [{ name: "a", shape: [40 << 20] }, { name: "b", shape: [40 << 20] }] };
    const seen: SynthProgress[] = [];
    const ckpt = await writeSyntheticCheckpoint({ shapes, dir: dir.path, seed: 7, onProgress: (p) => seen.push(p) });
    expect(seen.at(-1)).toMatchObject({ bytesDone: 80 << 20, bytesTotal: 80 << 20, files: 1 });
    const f = ckpt.files[0]!;
    const file = await readFile(f.path);
    const second = new Uint32Array(4);
    fillChunk(second, 7, 0, 1);
    const at = f.dataStart + (64 << 20);
    expect(new Uint8Array(file.subarray(at, at + 16))).toEqual(new Uint8Array(second.buffer));
  });

  test("refuses a directory holding other safetensors files, and overwrites its own", async () => {
    await writeSafetensors(join(dir.path, "user.safetensors"), [{ name: "w", shape: [4] }]);
    await expectCeError(() => writeSyntheticCheckpoint({ shapes: TINY, dir: dir.path, seed: 1 }), "E_SYNTH_DIR", "user.safetensors");

    const own = join(dir.path, "own");
    await writeSyntheticCheckpoint({ shapes: TINY, dir: own, seed: 1 });
    const again = await writeSyntheticCheckpoint({ shapes: TINY, dir: own, seed: 2 });
    expect(again.files[0]!.metadata.ce_seed).toBe("2");
    expect(await readdir(own)).toEqual(["model.safetensors"]);
  });
});
