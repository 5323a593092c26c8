import { describe, expect, test } from "bun:test";
import { CeError } from "../../src/base/errors";
import { cutCopies } from "../../src/core/pipeline";
import { unionMs } from "../../src/core/report";
import { ALIGN_BYTES, type Plan, planBuckets, spreadOverRanks, type TensorRef } from "../../src/core/planner";
import { type AutoSizeInput, autoSize, fewerBuffers, planUpdate } from "../../src/core/sizing";
import { encodeHeader, tensorBytes } from "../../src/checkpoint/safetensors";
import { loadShapes } from "../../src/checkpoint/synth-writer";
import { expectCeError, rng } from "../helpers/ckpt";

const KiB = 1024;
const MiB = 1024 ** 2;
const GiB = 1024 ** 3;

/** Tensors laid back to back in one region from `start`, like a safetensors file's data. */
function fileOf(region: number, sizes: number[], start = 0, prefix = `r${region}`): TensorRef[] {
  let offset = start;
  return sizes.map((nbytes, i) => {
    const t = { name: `${prefix}.t${i}`, dtype: "U8", shape: [nbytes], nbytes, region, offset };
    offset += nbytes;
    return t;
  });
}

/** Runs `body` over `rounds` seeds; a failure names the seed so the case can be replayed. */
function forSeeds(rounds: number, body: (seed: number) => void): void {
  const base = Number(process.env.CE_TEST_SEED ?? (Date.now() >>> 0));
  for (let i = 0; i < rounds; i++) {
    const seed = (base + i * 7919) >>> 0;
    try {
      body(seed);
    } catch (err) {
      throw new Error(`failed with seed ${seed} (replay: CE_TEST_SEED=${seed}): ${(err as Error).message}`, { cause: err });
    }
  }
}

interface Scenario {
  regions: Uint8Array[];
  perRank: TensorRef[][];
  bucketBytes: number;
  align: number;
}

/** Random regions and tensors: 1-byte to large, odd sizes, 256-multiples, gaps, zero-byte tensors. */
function scenario(seed: number): Scenario {
  const next = rng(seed);
  const pick = <T>(xs: T[]) => xs[Math.floor(next() * xs.length)]!;
  const int = (lo: number, hi: number) => lo + Math.floor(next() * (hi - lo + 1));
  const size = (): number =>
    pick([
      () => 0,
      () => int(1, 7),
      () => int(1, 1000),
      () => int(1, 64) * 256,
      () => int(1, 1000),
      () => int(1, 4) * 16 * KiB,
      () => int(64 * KiB, 160 * KiB),
    ])();
  const nregions = int(1, 4);
  const regions: Uint8Array[] = [];
  const all: TensorRef[] = [];
  for (let r = 0; r < nregions; r++) {
    let offset = pick([0, 8, 256, int(0, 999)]);
    const count = int(0, 40);
    for (let i = 0; i < count; i++) {
      if (next() < 0.1) offset += int(1, 300); // a hole in the region (another file's padding, say)
      const nbytes = size();
      all.push({ name: `r${r}.t${i}`, dtype: "U8", shape: [nbytes], nbytes, region: r, offset });
      offset += nbytes;
    }
    const words = new Uint32Array(Math.ceil((offset + int(0, 64)) / 4));
    let x = (seed ^ (r * 0x9e3779b9)) | 1;
    for (let i = 0; i < words.length; i++) {
      x ^= x << 13;
      x ^= x >>> 17;
      x ^= x << 5;
      words[i] = x;
    }
    regions.push(new Uint8Array(words.buffer));
  }
  const largest = all.reduce((m, t) => Math.max(m, t.nbytes), 1);
  const bucketBytes = pick([largest, largest + int(0, 5000), int(1, 4) * largest, int(largest, 2 * MiB)]);
  const nranks = int(1, 5);
  let perRank: TensorRef[][];
  if (next() < 0.5) {
    perRank = spreadOverRanks(all, nranks);
  } else {
    perRank = Array.from({ length: nranks }, () => [] as TensorRef[]);
    for (const t of all) perRank[int(0, nranks - 1)]!.push(t);
  }
  return { regions, perRank, bucketBytes, align: pick([256, 256, 256, 64, 1]) };
}

/** Every invariant planner.ts promises, checked on one plan. */
function checkPlan(s: Scenario, plan: Plan): void {
  const inputs = new Map(s.perRank.flatMap((ts, owner) => ts.map((t) => [t.name, { t, owner }] as const)));

  // every tensor lands exactly once, in its owner's bucket, in its rank's order
  const landed = plan.buckets.flatMap((b) => b.tensors.map((t) => t.name));
  expect(landed.length).toBe(inputs.size);
  expect(new Set(landed).size).toBe(inputs.size);
  s.perRank.forEach((ts, owner) => {
    const order = plan.buckets.filter((b) => b.owner === owner).flatMap((b) => b.tensors.map((t) => t.name));
    expect(order).toEqual(ts.map((t) => t.name));
  });
  expect(plan.tensorCount).toBe(inputs.size);
  expect(plan.totalBytes).toBe([...inputs.values()].reduce((sum, { t }) => sum + t.nbytes, 0));

  plan.buckets.forEach((b, i) => {
    expect(b.index).toBe(i);
    expect(b.tensors.length).toBeGreaterThan(0);
    // no bucket exceeds bucketBytes; the used span is aligned
    expect(b.bytes).toBeLessThanOrEqual(plan.bucketBytes);
    expect(b.bytes % s.align).toBe(0);
    expect(b.bytes).toBeLessThanOrEqual(plan.slotBytes);
    let end = 0;
    for (const t of b.tensors) {
      // offsets are aligned, and no two tensors overlap
      expect(t.offset % s.align).toBe(0);
      expect(t.offset).toBeGreaterThanOrEqual(end);
      end = t.offset + t.nbytes;
      expect(end).toBeLessThanOrEqual(b.bytes);
      expect(inputs.get(t.name)!.owner).toBe(b.owner);
    }

    // copies reproduce exactly the tensors' bytes: apply them to a poisoned buffer and compare
    const buf = new Uint8Array(b.bytes).fill(0xa5);
    const written = new Uint8Array(b.bytes);
    let copied = 0;
    for (const c of b.copies) {
      expect(c.bytes).toBeGreaterThan(0);
      expect(c.dstOffset + c.bytes).toBeLessThanOrEqual(b.bytes);
      expect(c.srcOffset + c.bytes).toBeLessThanOrEqual(s.regions[c.region]!.length);
      buf.set(s.regions[c.region]!.subarray(c.srcOffset, c.srcOffset + c.bytes), c.dstOffset);
      for (let k = c.dstOffset; k < c.dstOffset + c.bytes; k++) {
        if (written[k]) throw new Error(`bucket ${i}: two copies write byte ${k}`);
        written[k] = 1;
      }
      copied += c.bytes;
    }
    expect(copied).toBe(b.tensors.reduce((sum, t) => sum + t.nbytes, 0));
    for (const t of b.tensors) {
      const src = inputs.get(t.name)!.t;
      const want = s.regions[src.region]!.subarray(src.offset, src.offset + src.nbytes);
      const got = buf.subarray(t.offset, t.offset + t.nbytes);
      if (Buffer.compare(got, want) !== 0) throw new Error(`bucket ${i}: tensor ${t.name} bytes differ after the copies`);
    }
    // coalesced: two consecutive copies are never contiguous in both the region and the bucket
    for (let k = 1; k < b.copies.length; k++) {
      const p = b.copies[k - 1]!;
      const c = b.copies[k]!;
      const mergeable = p.region === c.region && p.srcOffset + p.bytes === c.srcOffset && p.dstOffset + p.bytes === c.dstOffset;
      expect(mergeable).toBe(false);
    }
  });
  expect(plan.slotBytes).toBe(plan.buckets.reduce((m, b) => Math.max(m, b.bytes), 0));

  // owners alternate: each owner's buckets are spread over the sequence in proportion to its count
  const counts = s.perRank.map((_, r) => plan.buckets.filter((b) => b.owner === r).length);
  const active = counts.filter((c) => c > 0).length;
  if (active > 1) {
    if (counts.every((c) => c === 0 || c === counts.find((x) => x > 0))) {
      plan.buckets.forEach((b, i) => {
        if (i > 0) expect(b.owner).not.toBe(plan.buckets[i - 1]!.owner);
      });
    }
    let run = 1;
    for (let i = 1; i < plan.buckets.length; i++) {
      const r = plan.buckets[i]!.owner;
      run = r === plan.buckets[i - 1]!.owner ? run + 1 : 1;
      const others = Math.max(...counts.filter((_, q) => q !== r));
      expect(run).toBeLessThanOrEqual(Math.ceil(counts[r]! / others) + 1);
    }
  }
}

describe("planBuckets invariants hold for random tensors, regions and ranks", () => {
  test("every tensor lands exactly once, aligned, without overlap, within bucketBytes, copies exact, owners alternating", () => {
    forSeeds(200, (seed) => {
      const s = scenario(seed);
      checkPlan(s, planBuckets({ perRank: s.perRank, bucketBytes: s.bucketBytes, align: s.align }));
    });
  });

  test("and with the last bucket of each rank cut finer", () => {
    forSeeds(200, (seed) => {
      const s = scenario(seed);
      checkPlan(s, planBuckets({ perRank: s.perRank, bucketBytes: s.bucketBytes, align: s.align, tailBucketBytes: Math.ceil(s.bucketBytes / 4) }));
    });
  });
});

describe("planBuckets cases", () => {
  const region = (n: number) => {
    const bytes = new Uint8Array(n);
    for (let i = 0; i < n; i++) bytes[i] = (i * 31 + 7) & 0xff;
    return bytes;
  };

  test("a bucket cut from one file of 256-multiple tensors is one copy", () => {
    const tensors = fileOf(0, [256, 4096, 512, 768, 256], 1024);
    const plan = planBuckets({ perRank: [tensors], bucketBytes: 1 * MiB });
    expect(plan.buckets).toHaveLength(1);
    expect(plan.buckets[0]!.copies).toEqual([{ region: 0, srcOffset: 1024, dstOffset: 0, bytes: 5888 }]);
    checkPlan({ regions: [region(8192)], perRank: [tensors], bucketBytes: MiB, align: 256 }, plan);
  });

  test("a misaligned file start still coalesces, since only relative positions matter", () => {
    const tensors = fileOf(0, [512, 256, 1024], 8 + 77);
    const plan = planBuckets({ perRank: [tensors], bucketBytes: MiB });
    expect(plan.buckets[0]!.copies).toEqual([{ region: 0, srcOffset: 85, dstOffset: 0, bytes: 1792 }]);
  });

  test("odd-sized tensors are padded to 256 and copied one by one", () => {
    const tensors = fileOf(0, [100, 3, 256]);
    const plan = planBuckets({ perRank: [tensors], bucketBytes: MiB });
    expect(plan.buckets[0]!.tensors.map((t) => t.offset)).toEqual([0, 256, 512]);
    expect(plan.buckets[0]!.bytes).toBe(768);
    expect(plan.buckets[0]!.copies).toEqual([
      { region: 0, srcOffset: 0, dstOffset: 0, bytes: 100 },
      { region: 0, srcOffset: 100, dstOffset: 256, bytes: 3 },
      { region: 0, srcOffset: 103, dstOffset: 512, bytes: 256 },
    ]);
  });

  test("a region boundary or a hole in the source starts a new copy", () => {
    const a = fileOf(0, [256, 256]);
    const b = fileOf(1, [256], 512);
    const hole = { ...fileOf(1, [256], 2048)[0]!, name: "after-hole" };
    const plan = planBuckets({ perRank: [[...a, ...b, hole]], bucketBytes: MiB });
    expect(plan.buckets[0]!.copies).toEqual([
      { region: 0, srcOffset: 0, dstOffset: 0, bytes: 512 },
      { region: 1, srcOffset: 512, dstOffset: 512, bytes: 256 },
      { region: 1, srcOffset: 2048, dstOffset: 768, bytes: 256 },
    ]);
  });

  test("a bucket never splits a tensor: the next tensor that does not fit opens a new bucket", () => {
    // 600 pads to 768, so 768 + 512 overflows; 512 + 256 fits; 768 + 1024 overflows again.
    const plan = planBuckets({ perRank: [fileOf(0, [600, 512, 256, 1024])], bucketBytes: 1024 });
    expect(plan.buckets.map((b) => b.tensors.map((t) => t.name))).toEqual([["r0.t0"], ["r0.t1", "r0.t2"], ["r0.t3"]]);
    expect(plan.buckets.map((b) => b.bytes)).toEqual([768, 768, 1024]);
    expect(plan.slotBytes).toBe(1024);
  });

  test("a bucket size that is not a multiple of the alignment is rounded up to one", () => {
    const plan = planBuckets({ perRank: [fileOf(0, [1000])], bucketBytes: 1000 });
    expect(plan.bucketBytes).toBe(1024);
    expect(plan.buckets[0]!.bytes).toBe(1024);
  });

  test("a tensor larger than the bucket is an input error naming it and both sizes", async () => {
    const tensors = [{ name: "model.embed_tokens.weight", dtype: "BF16", shape: [1024, 1024], nbytes: 2 * MiB, region: 0, offset: 0 }];
    await expectCeError(
      () => planBuckets({ perRank: [tensors], bucketBytes: MiB }),
      "E_PLAN_TENSOR_TOO_LARGE",
      '"model.embed_tokens.weight"',
      "BF16 [1024, 1024]",
      "2097152 bytes",
      "1048576-byte",
    );
  });

  test("the same tensor planned twice is refused", async () => {
    const t = fileOf(0, [256]);
    await expectCeError(() => planBuckets({ perRank: [t, t], bucketBytes: MiB }), "E_PLAN_DUPLICATE", '"r0.t0"');
  });

  test("zero-byte tensors get a place but no copy", () => {
    const plan = planBuckets({ perRank: [fileOf(0, [256, 0, 256])], bucketBytes: MiB });
    expect(plan.buckets[0]!.tensors.map((t) => [t.offset, t.nbytes])).toEqual([
      [0, 256],
      [256, 0],
      [256, 256],
    ]);
    expect(plan.buckets[0]!.copies).toEqual([{ region: 0, srcOffset: 0, dstOffset: 0, bytes: 512 }]);
  });

  test("owners with equal bucket counts take strict turns, and the tail is shared", () => {
    const perRank = [0, 1, 2].map((r) => fileOf(r, [1024, 1024, 1024, 1024]));
    const plan = planBuckets({ perRank, bucketBytes: 1024 });
    expect(plan.buckets.map((b) => b.owner)).toEqual([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2]);
  });

  test("an owner with twice the buckets appears twice as often, spread over the whole sequence", () => {
    const plan = planBuckets({ perRank: [fileOf(0, Array(8).fill(1024)), fileOf(1, Array(4).fill(1024))], bucketBytes: 1024 });
    expect(plan.buckets.map((b) => b.owner)).toEqual([0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 1, 0]);
  });

  test("the last bucket's worth of tensors is cut into tail buckets, each at least its largest tensor; the others keep their size", () => {
    const tensors = fileOf(0, Array.from({ length: 16 }, () => 64 * 1024), 0);
    const full = planBuckets({ perRank: [tensors], bucketBytes: 256 * 1024 });
    expect(full.buckets.map((b) => b.tensors.length)).toEqual([4, 4, 4, 4]);
    const tail = planBuckets({ perRank: [tensors], bucketBytes: 256 * 1024, tailBucketBytes: 64 * 1024 });
    expect(tail.buckets.map((b) => b.tensors.length)).toEqual([4, 4, 4, 1, 1, 1, 1]);
    // A tail size below the largest tensor of the last bucket still fits that tensor.
    const big = fileOf(0, [200 * 1024, 100 * 1024, 50 * 1024, 10 * 1024], 0);
    expect(planBuckets({ perRank: [big], bucketBytes: 512 * 1024, tailBucketBytes: 1024 }).buckets.map((b) => b.tensors.length)).toEqual([1, 3]);
    // A small last bucket does not hide a full one before it: the tail is a bucket's worth of bytes.
    const ragged = fileOf(0, [...Array.from({ length: 8 }, () => 64 * 1024), 8 * 1024], 0);
    expect(planBuckets({ perRank: [ragged], bucketBytes: 256 * 1024 }).buckets.map((b) => b.tensors.length)).toEqual([4, 4, 1]);
    expect(planBuckets({ perRank: [ragged], bucketBytes: 256 * 1024, tailBucketBytes: 64 * 1024 }).buckets.map((b) => b.tensors.length)).toEqual([4, 1, 1, 1, 1, 1]);
  });

  test("an empty rank owns no bucket", () => {
    const plan = planBuckets({ perRank: [[], fileOf(1, [256])], bucketBytes: 1024 });
    expect(plan.buckets.map((b) => b.owner)).toEqual([1]);
    expect(plan.owners).toBe(2);
  });

  test("a 30B MoE checkpoint (18,867 tensors) makes about one copy per bucket", async () => {
    // Lay the shapes out as synth writes them: 4 GiB shards, data 256-aligned.
    const shapes = await loadShapes("Qwen3-30B-A3B");
    const refs: TensorRef[] = [];
    let shard: { name: string; dtype: string; shape: number[]; nbytes: number }[] = [];
    let shardBytes = 0;
    const flush = () => {
      const enc = encodeHeader(shard, undefined, 256);
      const region = refs.length === 0 ? 0 : refs[refs.length - 1]!.region + 1;
      shard.forEach((t, i) => refs.push({ ...t, region, offset: enc.dataStart + enc.offsets[i]![0] }));
      shard = [];
      shardBytes = 0;
    };
    for (const t of shapes.tensors) {
      const nbytes = tensorBytes(shapes.dtype, t.shape)!;
      if (shardBytes + nbytes > 4 * GiB && shard.length > 0) flush();
      shard.push({ name: t.name, dtype: shapes.dtype, shape: t.shape, nbytes });
      shardBytes += nbytes;
    }
    flush();
    expect(refs).toHaveLength(18867);
    const nregions = refs[refs.length - 1]!.region + 1;
    const perRank = spreadOverRanks(refs, 8);
    const plan = planBuckets({ perRank, bucketBytes: GiB });
    const copies = plan.buckets.reduce((n, b) => n + b.copies.length, 0);
    expect(plan.tensorCount).toBe(18867);
    expect(copies).toBeLessThanOrEqual(plan.buckets.length + nregions + perRank.length);
    expect(plan.buckets.length).toBeLessThan(Math.ceil(plan.totalBytes / GiB) + 2 * perRank.length);
  });
});

describe("spreadOverRanks", () => {
  test("cuts contiguous runs of about equal bytes", () => {
    forSeeds(200, (seed) => {
      const next = rng(seed);
      const sizes = Array.from({ length: Math.floor(next() * 200) }, () => Math.floor(next() * next() * 10 * MiB));
      const tensors = fileOf(0, sizes);
      const nranks = 1 + Math.floor(next() * 8);
      const runs = spreadOverRanks(tensors, nranks);
      expect(runs).toHaveLength(nranks);
      expect(runs.flat()).toEqual(tensors);
      const total = sizes.reduce((a, b) => a + b, 0);
      const largest = Math.max(0, ...sizes);
      // Each cut lands within one tensor of its ideal point, so a run is off by at most two tensors.
      for (const run of runs) {
        const bytes = run.reduce((a, t) => a + t.nbytes, 0);
        expect(Math.abs(bytes - total / nranks)).toBeLessThanOrEqual(2 * largest);
      }
    });
  });

  test("one rank takes everything; more ranks than tensors leaves some empty", () => {
    const t = fileOf(0, [256, 512, 256]);
    expect(spreadOverRanks(t, 1)).toEqual([t]);
    const runs = spreadOverRanks(t, 5);
    expect(runs.flat()).toEqual(t);
    expect(runs.filter((r) => r.length > 0).length).toBe(3);
  });

  test("equal tensors split evenly", () => {
    const runs = spreadOverRanks(fileOf(0, Array(12).fill(1024)), 4);
    expect(runs.map((r) => r.length)).toEqual([3, 3, 3, 3]);
  });
});

describe("autoSize", () => {
  const base: AutoSizeInput = { freeBytes: 70 * GiB, totalBytes: 57 * GiB, largestTensorBytes: 594 * MiB, ndev: 1 };

  const cases: {
    name: string;
    input: Partial<AutoSizeInput>;
    want: Partial<ReturnType<typeof autoSize>>;
    fallbacks: number;
  }[] = [
    {
      name: "a large checkpoint on one GPU with room gets 1 GiB buckets and 3 slots",
      input: {},
      want: { bucketBytes: GiB, slots: 3, staging: 0, mode: "pipelined", deviceBytes: 3 * GiB, reserveBytes: 3.5 * GiB },
      fallbacks: 0,
    },
    {
      name: "several GPUs add two staging buffers",
      input: { ndev: 8 },
      want: { bucketBytes: GiB, slots: 3, staging: 2, deviceBytes: 5 * GiB },
      fallbacks: 0,
    },
    {
      name: "several GPUs on the direct path (no broadcast) need no staging",
      input: { ndev: 8, broadcast: false },
      want: { bucketBytes: GiB, slots: 3, staging: 0, deviceBytes: 3 * GiB },
      fallbacks: 0,
    },
    {
      name: "the broadcast path forced on one GPU has staging",
      input: { ndev: 1, broadcast: true },
      want: { bucketBytes: GiB, slots: 3, staging: 2, deviceBytes: 5 * GiB },
      fallbacks: 0,
    },
    {
      name: "a 1 GiB checkpoint is cut into 8 buckets, its 3 slots in 384 MiB of GPU memory, not 3 GiB",
      input: { totalBytes: GiB, largestTensorBytes: 10 * MiB },
      want: { bucketBytes: GiB / 8, slots: 3, mode: "pipelined", deviceBytes: 3 * (GiB / 8) },
      fallbacks: 0,
    },
    {
      name: "a checkpoint no bigger than its largest tensor gets one slot and no staging beyond one",
      input: { totalBytes: 100 * MiB, largestTensorBytes: 100 * MiB, ndev: 4 },
      want: { bucketBytes: 100 * MiB, slots: 1, staging: 1, mode: "serial", deviceBytes: 200 * MiB },
      fallbacks: 0,
    },
    {
      name: "a tensor larger than 1 GiB sets the bucket size",
      input: { totalBytes: 15 * GiB, largestTensorBytes: 1187 * MiB + 3 },
      want: { bucketBytes: 1187 * MiB + 256, slots: 3 },
      fallbacks: 0,
    },
    {
      name: "exactly enough memory needs no fallback",
      input: { freeBytes: 4 * GiB },
      want: { bucketBytes: GiB, slots: 3, deviceBytes: 3 * GiB, reserveBytes: GiB },
      fallbacks: 0,
    },
    {
      name: "short memory drops a slot first",
      input: { freeBytes: 3.5 * GiB },
      want: { bucketBytes: GiB, slots: 2, mode: "pipelined" },
      fallbacks: 1,
    },
    {
      name: "shorter memory goes serial, then shrinks the bucket toward the largest tensor",
      input: { freeBytes: 1.75 * GiB },
      want: { bucketBytes: 768 * MiB, slots: 1, mode: "serial" },
      fallbacks: 2,
    },
    {
      name: "with slots requested, the bucket shrinks first",
      input: { freeBytes: 3 * GiB, slots: 3 },
      want: { slots: 3, bucketBytes: Math.floor((2 * GiB) / 3 / 256) * 256 },
      fallbacks: 1,
    },
    {
      name: "with slots requested and too little room even for the largest tensor, slots drop too",
      input: { freeBytes: 2 * GiB, slots: 3 },
      want: { slots: 1, bucketBytes: GiB, mode: "serial" },
      fallbacks: 1,
    },
    {
      name: "more slots requested than buckets are cut to the bucket count",
      input: { totalBytes: 2 * GiB, slots: 5, bucketBytes: GiB },
      want: { slots: 2, bucketBytes: GiB },
      fallbacks: 1,
    },
    {
      name: "a requested bucket size is rounded up to 256 bytes",
      input: { bucketBytes: 700 * MiB + 1 },
      want: { bucketBytes: 700 * MiB + 256, slots: 3 },
      fallbacks: 0,
    },
    {
      name: "an explicit reserve replaces the default",
      input: { freeBytes: 3 * GiB, reserveBytes: 0 },
      want: { slots: 3, bucketBytes: GiB, reserveBytes: 0 },
      fallbacks: 0,
    },
  ];

  test.each(cases.map((c) => [c.name, c] as const))("%s", (_name, c) => {
    const got = autoSize({ ...base, ...c.input });
    expect(got).toMatchObject(c.want);
    expect(got.fallbacks).toHaveLength(c.fallbacks);
    expect(got.deviceBytes).toBe((got.slots + got.staging) * got.bucketBytes);
  });

  test("fallback sentences say what was reduced and why", () => {
    const got = autoSize({ ...base, freeBytes: 1.75 * GiB });
    expect(got.fallbacks[0]).toContain("3 slots of 1.00 GiB need 3.00 GiB per GPU");
    expect(got.fallbacks[0]).toContain("using 1 slot (serial");
    expect(got.fallbacks[1]).toContain("bucket size 1.00 GiB → 768.0 MiB");
  });

  test("when one slot of the largest tensor does not fit, it is an input error saying free vs needed", async () => {
    const err = await expectCeError(
      () => autoSize({ ...base, freeBytes: 1.5 * GiB, ndev: 2 }),
      "E_GPU_MEMORY",
      "needs 1.74 GiB per GPU",
      "1 slot + 2 staging",
      "1.50 GiB free",
    );
    expect(err.hint).toContain("--gpu-memory-utilization");
  });

  test("a requested bucket smaller than the largest tensor is refused", async () => {
    await expectCeError(() => autoSize({ ...base, bucketBytes: 256 * MiB }), "E_BUCKET_SIZE", "256.0 MiB", "594.0 MiB");
  });

  test("random inputs always fit in free memory minus the reserve, or fail with E_GPU_MEMORY", () => {
    forSeeds(2000, (seed) => {
      const next = rng(seed);
      const largest = Math.floor(next() ** 3 * 3 * GiB);
      const total = largest + Math.floor(next() ** 2 * 80 * GiB);
      const input: AutoSizeInput = {
        freeBytes: Math.floor(next() * 20 * GiB),
        totalBytes: total,
        largestTensorBytes: largest,
        ndev: 1 + Math.floor(next() * 8),
        ...(next() < 0.3 ? { slots: 1 + Math.floor(next() * 5) } : {}),
        ...(next() < 0.3 ? { bucketBytes: largest + Math.floor(next() * 2 * GiB) } : {}),
      };
      let got;
      try {
        got = autoSize(input);
      } catch (err) {
        expect(err).toBeInstanceOf(CeError);
        expect((err as CeError).code).toBe("E_GPU_MEMORY");
        return;
      }
      const largestAligned = Math.ceil(Math.max(largest, 1) / ALIGN_BYTES) * ALIGN_BYTES;
      expect(got.deviceBytes).toBeLessThanOrEqual(input.freeBytes - got.reserveBytes);
      expect(got.bucketBytes).toBeGreaterThanOrEqual(largestAligned);
      expect(got.bucketBytes % ALIGN_BYTES).toBe(0);
      expect(got.slots).toBeGreaterThanOrEqual(1);
      expect(got.slots).toBeLessThanOrEqual(input.slots ?? 3);
      expect(got.slots).toBeLessThanOrEqual(Math.ceil(Math.max(total, 1) / got.bucketBytes));
      expect(got.staging).toBeLessThanOrEqual(2);
      expect(got.staging > 0).toBe(input.ndev > 1);
      if (got.fallbacks.length === 0) {
        expect(got.staging).toBe(input.ndev > 1 ? Math.min(2, Math.ceil(Math.max(total, 1) / got.bucketBytes)) : 0);
      }
      expect(got.mode).toBe(got.slots > 1 ? "pipelined" : "serial");
      if (input.bucketBytes === undefined && input.slots === undefined && got.fallbacks.length === 0) {
        // Unreduced defaults never take more GPU memory than the checkpoint (beyond the largest tensor's share).
        expect(got.slots * got.bucketBytes).toBeLessThanOrEqual(Math.max(total + 3 * ALIGN_BYTES, 3 * largestAligned));
      }
    });
  });
});

describe("planUpdate and fewerBuffers: the one place sizes are decided", () => {
  const tensors = (sizes: number[]): TensorRef[] => fileOf(0, sizes);

  test("the CPU backend sizes its buffers for what it moves: 64 MiB buckets, two slots, no staging when direct", () => {
    const u = planUpdate({ backend: "cpu", tensors: tensors(Array(80).fill(8 * MiB)), ndev: 2, broadcast: false, freeBytes: 20 * GiB });
    expect(u.plan.bucketBytes).toBe(64 * MiB);
    expect(u.slots).toBe(2);
    expect(u.staging).toBe(0);
    expect(u.plan.owners).toBe(1);
  });

  test("a bucket never goes below the largest tensor, on any backend", () => {
    const u = planUpdate({ backend: "cpu", tensors: tensors([300 * MiB, MiB]), ndev: 2, broadcast: false, freeBytes: 20 * GiB });
    expect(u.plan.bucketBytes).toBe(300 * MiB);
  });

  test("CUDA keeps 1 GiB buckets, three slots, and two staging buffers per GPU on the broadcast path", () => {
    const u = planUpdate({ backend: "cuda", tensors: tensors(Array(64).fill(128 * MiB)), ndev: 2, broadcast: true, freeBytes: 60 * GiB });
    expect(u.plan.bucketBytes).toBe(GiB);
    expect(u.slots).toBe(3);
    expect(u.staging).toBe(2);
    expect(u.plan.owners).toBe(2);
  });

  test("a source still arriving, broadcast: buckets in source order, owners in turn (a contiguous share would wait for half the push)", () => {
    const ts = tensors(Array(64).fill(128 * MiB));
    const u = planUpdate({ backend: "cuda", tensors: ts, ndev: 2, broadcast: true, freeBytes: 60 * GiB, streaming: true });
    const starts = u.plan.buckets.map((b) => Math.min(...b.copies.map((c) => c.srcOffset)));
    expect(starts).toEqual([...starts].sort((a, b) => a - b));
    expect(u.plan.buckets.map((b) => b.owner)).toEqual(u.plan.buckets.map((b) => b.index % 2));
    expect(u.plan.owners).toBe(2);
    expect(u.plan.totalBytes).toBe(64 * 128 * MiB);
    // Not arriving: each GPU owns a contiguous half, as before.
    const whole = planUpdate({ backend: "cuda", tensors: ts, ndev: 2, broadcast: true, freeBytes: 60 * GiB });
    expect(Math.min(...whole.plan.buckets[1]!.copies.map((c) => c.srcOffset))).toBeGreaterThanOrEqual(32 * 128 * MiB);
  });

  test("slots and staging never outnumber the buckets", () => {
    const u = planUpdate({ backend: "cuda", tensors: tensors([MiB]), ndev: 2, broadcast: true, freeBytes: 60 * GiB });
    expect(u.plan.buckets).toHaveLength(1);
    expect(u.slots).toBe(1);
    expect(u.staging).toBe(1);
  });

  test("a delta (few small tensors) moves through the buffers of its whole version: same slot size, slots and staging", () => {
    const whole = tensors(Array(64).fill(128 * MiB));
    for (const broadcast of [false, true]) {
      const full = planUpdate({ backend: "cuda", tensors: whole, ndev: 2, broadcast, freeBytes: 60 * GiB });
      const delta = planUpdate({ backend: "cuda", tensors: tensors([3 * MiB, MiB]), sizeFor: whole, ndev: 2, broadcast, freeBytes: 60 * GiB });
      expect(delta.plan.buckets.length).toBeLessThanOrEqual(2);
      expect({ slotBytes: delta.plan.slotBytes, slots: delta.slots, staging: delta.staging }).toEqual({ slotBytes: full.plan.slotBytes, slots: full.slots, staging: full.staging });
    }
  });

  test("fewerBuffers gives up staging first, then slots, and stops at one slot and one staging buffer", () => {
    const steps: [number, number][] = [];
    let b: { slots: number; staging: number } | undefined = { slots: 3, staging: 2 };
    while (b) {
      steps.push([b.slots, b.staging]);
      b = fewerBuffers(b, "CUDA_ERROR_OUT_OF_MEMORY");
    }
    expect(steps).toEqual([[3, 2], [3, 1], [2, 1], [1, 1]]);
    expect(fewerBuffers({ slots: 2, staging: 0 }, "x")?.fallback).toContain("retrying with 1 slot and 0 staging");
  });
});

describe("cutCopies: a streaming bucket's H2D in pieces", () => {
  test("runs of at most the piece size, in order, a long copy split, bytes and offsets kept", () => {
    const copies = [
      { region: 1, srcOffset: 0, dstOffset: 0, bytes: 100 },
      { region: 1, srcOffset: 256, dstOffset: 256, bytes: 10 },
      { region: 2, srcOffset: 1000, dstOffset: 512, bytes: 30 },
    ];
    expect(cutCopies(copies, 40)).toEqual([
      [{ region: 1, srcOffset: 0, dstOffset: 0, bytes: 40 }],
      [{ region: 1, srcOffset: 40, dstOffset: 40, bytes: 40 }],
      [
        { region: 1, srcOffset: 80, dstOffset: 80, bytes: 20 },
        { region: 1, srcOffset: 256, dstOffset: 256, bytes: 10 },
        { region: 2, srcOffset: 1000, dstOffset: 512, bytes: 10 },
      ],
      [{ region: 2, srcOffset: 1010, dstOffset: 522, bytes: 20 }],
    ]);
    expect(cutCopies(copies, 1 << 20)).toEqual([copies]);
    expect(cutCopies([], 40)).toEqual([]);
  });
});

describe("unionMs: a bucket copied in pieces is busy while a piece copies", () => {
  test("overlaps count once, gaps not at all", () => {
    expect(unionMs([[0, 2], [5, 6], [1, 3], [5.5, 5.75]])).toBe(4);
    expect(unionMs([])).toBe(0);
  });
});
