// The pure parts of delta updates: how each tensor travels, where patches sit in scratch, and when
// the workers' open replies let a delta go out.
import { describe, expect, test } from "bun:test";
import { deltaRefusal } from "../../src/core/delta-base";
import { chooseForm, patchBytes, planDelta } from "../../src/core/delta";

describe("choosing how a tensor travels", () => {
  test.each([
    ["an unchanged tensor is not sent", { dtype: "BF16", nbytes: 4096 }, 0, "same"],
    ["a few changed elements go as a patch", { dtype: "BF16", nbytes: 4096 }, 10, "sparse"],
    ["a patch larger than the tensor goes dense", { dtype: "BF16", nbytes: 4096 }, 700, "dense"],
    ["a patch just smaller than the tensor goes sparse", { dtype: "BF16", nbytes: 4096 }, 600, "sparse"],
    ["every element changed goes dense", { dtype: "F32", nbytes: 4096 }, 1024, "dense"],
    ["a sub-byte dtype has no patch form", { dtype: "F4", nbytes: 4096 }, 1, "dense"],
    ["a tensor of more than 2^31 elements goes dense", { dtype: "U8", nbytes: 2 ** 31 + 1 }, 1, "dense"],
    ["a tensor of exactly 2^31 elements may go sparse", { dtype: "U8", nbytes: 2 ** 31 }, 1, "sparse"],
  ] as const)("%s", (_, t, changed, form) => {
    expect(chooseForm(t, changed)).toBe(form);
  });

  test("a patch is its int32 positions, aligned to 256, then its values", () => {
    expect(patchBytes(10, 2)).toBe(256 + 20);
    expect(patchBytes(64, 8)).toBe(256 + 512);
    expect(patchBytes(65, 1)).toBe(512 + 65);
  });
});

describe("planning a delta", () => {
  const tensors = [
    { name: "a", dtype: "BF16", nbytes: 8192 },
    { name: "b", dtype: "F32", nbytes: 4096 },
    { name: "c", dtype: "I64", nbytes: 80000 },
    { name: "d", dtype: "U8", nbytes: 100 },
  ];

  test("patches sit 256-aligned one after another in scratch, each with its values after its positions", () => {
    const p = planDelta(tensors, [3, 0, 100, 100]);
    expect(p.forms).toEqual(["sparse", "same", "sparse", "dense"]);
    expect(p.patches).toEqual([
      { name: "a", count: 3, offset: 0, valuesOffset: 256, nbytes: 262 },
      { name: "c", count: 100, offset: 512, valuesOffset: 512, nbytes: 1312 },
    ]);
    expect(p.scratchBytes).toBe(512 + 1536);
  });

  test("when nothing changed, the first non-empty tensor goes dense so the update is an ordinary one", () => {
    const p = planDelta([{ name: "e", dtype: "BF16", nbytes: 0 }, ...tensors], [0, 0, 0, 0, 0]);
    expect(p.forms).toEqual(["same", "dense", "same", "same", "same"]);
    expect(p.patches).toEqual([]);
  });
});

describe("whether the workers' open replies let a delta go out", () => {
  const worker = (d: number) => `worker ${d}`;
  const reply = (extra: Record<string, unknown>) => ({ ok: true, extra });
  const holds = { delta: true, checkpoint: "m", version: 4 };

  test("every worker announcing delta and holding its base lets it go", () => {
    expect(deltaRefusal({ replies: [reply(holds), reply(holds)], checkpoint: "m", base: 4, worker })).toBeUndefined();
  });

  test.each([
    ["a worker that does not announce delta", { checkpoint: "m", version: 4 }, 'worker 1 does not apply patches (no "delta" in its reply to an open offering one)'],
    ["a worker that holds nothing known", { delta: true }, "worker 1 holds no known version"],
    ["a worker on another version", { ...holds, version: 3 }, "worker 1 holds m version 3, the delta was computed from m version 4"],
    ["a worker on another checkpoint", { ...holds, checkpoint: "n" }, "worker 1 holds n version 4"],
  ])("%s refuses it", (_, extra, why) => {
    const code = "delta" in extra ? "E_DELTA_BASE" : "E_DELTA_UNSUPPORTED";
    expect(deltaRefusal({ replies: [reply(holds), reply(extra)], checkpoint: "m", base: 4, worker })?.code).toBe(code);
    expect(deltaRefusal({ replies: [reply(holds), reply(extra)], checkpoint: "m", base: 4, worker })?.why).toContain(why);
  });
});
