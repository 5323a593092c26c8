import { afterEach, beforeEach, describe, expect, test } from "bun:test";
import { appendFile, mkdir, readFile, utimes } from "node:fs/promises";
import { join } from "node:path";
import { assertUnchanged, INDEX_FILE, openCheckpoint, summarize } from "../../src/checkpoint/checkpoint";
import { tensorRefs } from "../../src/core/planner";
import { formatSummary } from "../../src/commands/inspect";
import { expectCeError, type TempDir, tempDir, writeIndex, writeRaw, writeSafetensors } from "../helpers/ckpt";

let dir: TempDir;
beforeEach(async () => {
  dir = await tempDir();
});
afterEach(() => dir.cleanup());

const SHARD1 = [
  { name: "model.embed_tokens.weight", shape: [128, 64] },
  { name: "model.layers.0.input_layernorm.weight", dtype: "F32", shape: [64] },
];
const SHARD2 = [
  { name: "model.layers.0.mlp.up_proj.weight", shape: [256, 64] },
  { name: "model.norm.weight", dtype: "F32", shape: [64] },
  { name: "lm_head.weight", dtype: "F8_E4M3", shape: [128, 64] },
];

async function twoShards(root: string) {
  await mkdir(root, { recursive: true });
  const a = await writeSafetensors(join(root, "model-00001-of-00002.safetensors"), SHARD1, { seed: 1 });
  const b = await writeSafetensors(join(root, "model-00002-of-00002.safetensors"), SHARD2, { seed: 2 });
  return { a, b };
}

function weightMap(): Record<string, string> {
  return {
    ...Object.fromEntries(SHARD1.map((t) => [t.name, "model-00001-of-00002.safetensors"])),
    ...Object.fromEntries(SHARD2.map((t) => [t.name, "model-00002-of-00002.safetensors"])),
  };
}

describe("openCheckpoint", () => {
  test("opens one .safetensors file", async () => {
    const path = join(dir.path, "one.safetensors");
    await writeSafetensors(path, SHARD1);
    const ckpt = await openCheckpoint(path);
    expect(ckpt.kind).toBe("file");
    expect(ckpt.root).toBe(path);
    expect(ckpt.tensors.map((t) => t.name)).toEqual(SHARD1.map((t) => t.name));
    expect(ckpt.totalBytes).toBe(128 * 64 * 2 + 64 * 4);
  });

  test("opens a directory of shards in name order, with totals per dtype and the largest tensor", async () => {
    await twoShards(dir.path);
    const ckpt = await openCheckpoint(dir.path);
    expect(ckpt.kind).toBe("directory");
    expect(ckpt.files.map((f) => f.path)).toEqual([
      join(dir.path, "model-00001-of-00002.safetensors"),
      join(dir.path, "model-00002-of-00002.safetensors"),
    ]);
    expect(ckpt.tensors.map((t) => t.name)).toEqual([...SHARD1, ...SHARD2].map((t) => t.name));
    expect(ckpt.dtypes).toEqual({
      BF16: { count: 2, bytes: 128 * 64 * 2 + 256 * 64 * 2 },
      F32: { count: 2, bytes: 512 },
      F8_E4M3: { count: 1, bytes: 128 * 64 },
    });
    expect(ckpt.largestTensor.name).toBe("model.layers.0.mlp.up_proj.weight");
    expect(ckpt.totalBytes).toBe(Object.values(ckpt.dtypes).reduce((s, d) => s + d.bytes, 0));
  });

  test("a directory with an HF index reads exactly the shards the index names", async () => {
    await twoShards(dir.path);
    await writeSafetensors(join(dir.path, "stray.safetensors"), [{ name: "stray", shape: [4] }]);
    await writeIndex(join(dir.path, INDEX_FILE), weightMap());
    const ckpt = await openCheckpoint(dir.path);
    expect(ckpt.kind).toBe("index");
    expect(ckpt.index).toBe(join(dir.path, INDEX_FILE));
    expect(ckpt.files).toHaveLength(2);
    expect(ckpt.tensors).toHaveLength(5);
  });

  test("opens the index file itself", async () => {
    await twoShards(dir.path);
    const index = await writeIndex(join(dir.path, INDEX_FILE), weightMap());
    const ckpt = await openCheckpoint(index);
    expect(ckpt.root).toBe(index);
    expect(ckpt.tensors).toHaveLength(5);
  });

  test("an index naming a missing shard is refused, naming the shard", async () => {
    await twoShards(dir.path);
    const map = { ...weightMap(), extra: "model-00003-of-00003.safetensors" };
    const index = await writeIndex(join(dir.path, INDEX_FILE), map);
    await expectCeError(() => openCheckpoint(index), "E_CHECKPOINT_SHARD_MISSING", "model-00003-of-00003.safetensors", '"extra"');
  });

  test("an index naming a tensor its shard lacks is refused", async () => {
    await twoShards(dir.path);
    const index = await writeIndex(join(dir.path, INDEX_FILE), { ...weightMap(), ghost: "model-00001-of-00002.safetensors" });
    await expectCeError(() => openCheckpoint(index), "E_CHECKPOINT_INDEX", '"ghost"', "no such tensor");
  });

  test("a shard holding a tensor the index does not list is refused", async () => {
    await twoShards(dir.path);
    const map = weightMap();
    delete map["model.norm.weight"];
    const index = await writeIndex(join(dir.path, INDEX_FILE), map);
    await expectCeError(() => openCheckpoint(index), "E_CHECKPOINT_INDEX", '"model.norm.weight"', "does not list");
  });

  test("an index that puts a tensor in the wrong shard is refused", async () => {
    await twoShards(dir.path);
    const index = await writeIndex(join(dir.path, INDEX_FILE), {
      ...weightMap(),
      "model.norm.weight": "model-00001-of-00002.safetensors",
    });
    await expectCeError(() => openCheckpoint(index), "E_CHECKPOINT_INDEX", '"model.norm.weight"', "but it is in model-00002");
  });

  test("an index that is not JSON or has no weight_map is refused", async () => {
    await writeRaw(join(dir.path, "x.json"), new TextEncoder().encode("{nope"));
    await expectCeError(() => openCheckpoint(join(dir.path, "x.json")), "E_CHECKPOINT_INDEX", "not valid JSON");
    await writeIndex(join(dir.path, "y.json"), {});
    await expectCeError(() => openCheckpoint(join(dir.path, "y.json")), "E_CHECKPOINT_INDEX", "empty");
  });

  test("a tensor stored in two shards is refused, naming both", async () => {
    await twoShards(dir.path);
    await writeSafetensors(join(dir.path, "model-00003.safetensors"), [{ name: "model.norm.weight", dtype: "F32", shape: [64] }]);
    await expectCeError(
      () => openCheckpoint(dir.path),
      "E_CHECKPOINT_DUPLICATE",
      '"model.norm.weight"',
      "model-00002-of-00002.safetensors",
      "model-00003.safetensors",
    );
  });

  test("one malformed shard fails the whole checkpoint before anything else", async () => {
    await twoShards(dir.path);
    await writeRaw(join(dir.path, "model-00000-bad.safetensors"), { header: { w: { dtype: "F32", shape: [4], data_offsets: [0, 16] } }, data: 8 });
    await expectCeError(() => openCheckpoint(dir.path), "E_SAFETENSORS_TRUNCATED", "model-00000-bad.safetensors", '"w"');
  });

  test("an empty directory, a missing path and a file with no tensors are refused", async () => {
    await expectCeError(() => openCheckpoint(dir.path), "E_CHECKPOINT_EMPTY", "no .safetensors");
    await expectCeError(() => openCheckpoint(join(dir.path, "nope")), "E_CHECKPOINT_NOT_FOUND", "nope", "ENOENT");
    const empty = await writeRaw(join(dir.path, "empty.safetensors"), { header: "{}" });
    await expectCeError(() => openCheckpoint(empty), "E_CHECKPOINT_EMPTY", "no tensors");
  });
});

describe("assertUnchanged", () => {
  test("passes for untouched files and refuses one whose size or mtime changed", async () => {
    const { b } = await twoShards(dir.path);
    const ckpt = await openCheckpoint(dir.path);
    await assertUnchanged(ckpt);

    await utimes(b.path, new Date(), new Date(Date.now() + 5000));
    await expectCeError(() => assertUnchanged(ckpt), "E_CHECKPOINT_CHANGED", "model-00002-of-00002.safetensors", "modified");

    const again = await openCheckpoint(dir.path);
    await appendFile(b.path, new Uint8Array(4));
    await expectCeError(() => assertUnchanged(again), "E_CHECKPOINT_CHANGED", "model-00002-of-00002.safetensors", "size");
  });
});

describe("tensorRefs", () => {
  test("points each tensor at its file's region and the absolute offset of its bytes", async () => {
    const { a, b } = await twoShards(dir.path);
    const ckpt = await openCheckpoint(dir.path);
    const refs = tensorRefs(ckpt);
    const files = await Promise.all(ckpt.files.map((f) => readFile(f.path)));
    const written = new Map([...a.data, ...b.data]);
    for (const r of refs) {
      const bytes = files[r.region]!.subarray(r.offset, r.offset + r.nbytes);
      expect(Uint8Array.from(bytes)).toEqual(written.get(r.name)!);
    }
    expect(refs.map((r) => r.region)).toEqual([0, 0, 1, 1, 1]);
  });
});

describe("summarize and ce inspect's text", () => {
  test("describe tensors, files, dtypes and the largest tensor", async () => {
    await twoShards(dir.path);
    const s = summarize(await openCheckpoint(dir.path));
    expect(s.tensorCount).toBe(5);
    expect(s.files.map((f) => f.tensors)).toEqual([2, 3]);
    expect(s.largestTensor).toMatchObject({ name: "model.layers.0.mlp.up_proj.weight", dtype: "BF16", shape: [256, 64], nbytes: 32768 });
    const text = formatSummary(s);
    expect(text).toContain("tensors  5");
    expect(text).toContain("model.layers.0.mlp.up_proj.weight  BF16 [256, 64]  32.0 KiB");
    expect(text).toContain("F8_E4M3");
    expect(text).toContain("valid (2 files checked)");
  });
});
