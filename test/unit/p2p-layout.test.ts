// The pure parts of a P2P pull: where the pulled tensors lie in the staging, which reads each bucket
// needs, which hosts a rank list names, and what offers are refused.
import { describe, expect, test } from "bun:test";
import { hostsOfRanks } from "../../src/cluster/plan";
import { planBuckets } from "../../src/core/planner";
import { type Offer, bucketReads, checkOffers, pullLayout } from "../../src/p2p/layout";
import { rng } from "../helpers/ckpt";

const MiB = 1024 ** 2;

/** A host's offer of one file of tensors laid out back to back from offset 64, sizes from the seed. */
function offer(host: number, count: number, seed: number, maxBytes = 3 * MiB): Offer {
  const next = rng(seed);
  let at = 64;
  const tensors = Array.from({ length: count }, (_, i) => {
    const nbytes = i === 3 ? 0 : 1 + Math.floor(next() * maxBytes);
    const t = { name: `h${host}.t${i}`, dtype: "U8", shape: [nbytes], nbytes, offset: at };
    at += nbytes;
    return t;
  });
  return { host, version: 1, address: "00", files: [{ path: `/h${host}/model.safetensors`, rkey: "00", tensors }] };
}

describe("pullLayout and bucketReads", () => {
  test("chunks alternate between the hosts, hold whole tensors, and never overlap (seed 5)", () => {
    const offers = [offer(0, 60, 5), offer(1, 40, 6), offer(4, 10, 7)];
    const layout = pullLayout(offers, 8 * MiB);
    expect(layout.chunks.slice(0, 3).map((c) => c.source)).toEqual([0, 1, 2]);
    for (let i = 1; i < layout.chunks.length; i++) {
      const [a, b] = [layout.chunks[i - 1]!, layout.chunks[i]!];
      expect(b.stagingOffset).toBeGreaterThanOrEqual(a.stagingOffset + a.bytes);
      expect(b.stagingOffset % 256).toBe(0);
    }
    expect(layout.tensors.map((t) => t.name).sort()).toEqual(offers.flatMap((o) => o.files[0]!.tensors.map((t) => t.name)).sort());
    // Each tensor sits in a chunk of its own host, at its offset in the file relative to the chunk.
    const byName = new Map(offers.flatMap((o, source) => o.files[0]!.tensors.map((t) => [t.name, { source, t }] as const)));
    for (const s of layout.tensors) {
      const { source, t } = byName.get(s.name)!;
      const c = layout.chunks.find((c) => c.source === source && s.stagingOffset >= c.stagingOffset && s.stagingOffset + s.nbytes <= c.stagingOffset + c.bytes)!;
      expect(c).toBeDefined();
      expect(c.remoteOffset + (s.stagingOffset - c.stagingOffset)).toBe(t.offset);
      expect(c.bytes <= 8 * MiB || c.bytes === s.nbytes).toBe(true);
    }
  });

  test("every bucket's reads cover exactly its copies' bytes, from the host and file offset that hold them (seed 9)", () => {
    const offers = [offer(0, 50, 9), offer(1, 50, 10)];
    const layout = pullLayout(offers, 4 * MiB);
    const refs = layout.tensors.map((t) => ({ ...t, region: 0, offset: t.stagingOffset }));
    const plan = planBuckets({ perRank: [refs.slice(0, 45), refs.slice(45)], bucketBytes: 6 * MiB });
    const reads = bucketReads(layout, plan.buckets);
    const home = new Map(offers.flatMap((o, source) => o.files[0]!.tensors.map((t) => [t.name, { source, offset: t.offset }] as const)));
    plan.buckets.forEach((b, i) => {
      expect(reads[i]!.reduce((s, r) => s + r.bytes, 0)).toBe(b.copies.reduce((s, c) => s + c.bytes, 0));
      for (const bt of b.tensors) {
        if (bt.nbytes === 0) continue;
        const staged = layout.tensors.find((t) => t.name === bt.name)!;
        const r = reads[i]!.find((r) => r.stagingOffset <= staged.stagingOffset && staged.stagingOffset < r.stagingOffset + r.bytes)!;
        expect(r.source).toBe(home.get(bt.name)!.source);
        expect(r.remoteOffset + (staged.stagingOffset - r.stagingOffset)).toBe(home.get(bt.name)!.offset);
      }
    });
  });

  test("offers of two versions, or one tensor offered by two hosts, are refused naming the hosts", () => {
    expect(() => checkOffers("m", [offer(0, 3, 1), { ...offer(1, 3, 2), version: 2 }])).toThrow("host 0 has 1, host 1 has 2");
    expect(() => checkOffers("m", [offer(0, 3, 1), { ...offer(0, 3, 1), host: 2 }])).toThrow('tensor "h0.t0" of "m" is held by host 0 and host 2');
    expect(() => checkOffers("m", [])).toThrow('no host holds a checkpoint named "m"');
  });
});

describe("hostsOfRanks", () => {
  const hosts = [
    { rank: 0, ndev: 2 },
    { rank: 1, ndev: 1 },
    { rank: 2, ndev: 4 },
  ];
  test.each([
    [[2], [1]],
    [[6, 3, 4, 5], [2]],
    [[0, 1, 2], [0, 1]],
  ])("ranks %j are the devices of hosts %j", (ranks, want) => {
    expect(hostsOfRanks(hosts, ranks)).toEqual(want);
  });
  test.each([
    [[0], "host 0 has ranks 0..1, 1 of them named"],
    [[7, 9], "ranks 7, 9 are not in this cluster"],
    [[7], "rank 7 is not in this cluster: host 0 has ranks 0..1, host 1 has rank 2, host 2 has ranks 3..6"],
    [[], "name no device"],
  ])("ranks %j are refused: %s", (ranks, message) => {
    expect(() => hostsOfRanks(hosts, ranks)).toThrow(message);
  });
});
