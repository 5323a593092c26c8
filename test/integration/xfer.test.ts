// Transfer endpoints (issue 23, P2P): real processes, real UCX over TCP on loopback. A source
// registers a region of seeded random bytes and hands out its address and remote key; a reader
// pulls ranges and checks every byte. A source that dies or stalls fails the reader within its
// deadline, naming the peer; destroying an endpoint with reads in flight frees everything.
import { afterEach, describe, expect, test } from "bun:test";
import { join } from "node:path";
import { NativeError } from "../../src/base/errors";
import { Ctx } from "../../src/native/ce";
import { Xfer } from "../../src/native/xfer";
import { MOONCAKE_ENV, mooncake, ucx } from "../helpers/libraries";
import { type RankProc, startRanks } from "../helpers/native-ranks";

const MiB = 1024 ** 2;
const SCRIPT = join(import.meta.dir, "../helpers/xfer-peer.ts");
// TCP on loopback: what every host has, the path CI can take; UCX would pick shared memory otherwise.
const UCX_ENV = { UCX_TLS: "tcp", UCX_NET_DEVICES: "lo", UCX_WARN_UNUSED_ENV_VARS: "n" };

const running: RankProc[] = [];
afterEach(() => {
  for (const r of running.splice(0)) r.kill();
});

async function peers(count: number, env: Record<string, string> = UCX_ENV): Promise<RankProc[]> {
  const r = await startRanks(count, { script: SCRIPT, env });
  running.push(...r);
  return r;
}

/** A source of `bytes` seeded bytes and a reader connected to it. */
async function pair(bytes: number, seed: number, env?: Record<string, string>): Promise<{ src: RankProc; reader: RankProc; address: string; rkey: string; peer: number }> {
  const [src, reader] = await peers(2, env);
  const s = await src!.ask("source", { bytes, seed });
  expect(s).toMatchObject({ ok: true });
  const c = await reader!.ask("connect", { address: s.address, name: "source" });
  expect(c).toMatchObject({ ok: true });
  return { src: src!, reader: reader!, address: s.address as string, rkey: s.rkey as string, peer: c.peer as number };
}

/** A seeded xorshift, so a failing layout can be rebuilt from the seed in the test's name. */
function rng(seed: number): (n: number) => number {
  let x = seed | 1;
  return (n) => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) % n;
  };
}

describe.skipIf(!ucx.ok)(`UCX transfer endpoints across processes (${ucx.reason})`, () => {
  test("a reader pulls odd-sized ranges at odd offsets of a source's region, many ops at once, byte-exact (seed 23)", { timeout: 60_000 }, async () => {
    const srcBytes = 160 * MiB + 13;
    const { reader, rkey, peer } = await pair(srcBytes, 23);
    const rand = rng(23);
    // 8 ops of 3 ranges each, laid one after another in the reader's region at odd offsets.
    const ops: [number, number, number][][] = [];
    let at = 7;
    for (let o = 0; o < 8; o++) {
      const ranges: [number, number, number][] = [];
      for (let k = 0; k < 3; k++) {
        const n = o === 0 && k === 0 ? 1 : 1 + rand(24 * MiB);
        const roff = k === 2 && o === 7 ? srcBytes - n : rand(srcBytes - n);
        ranges.push([roff, at, n]);
        at += n + rand(4096);
      }
      ops.push(ranges);
    }
    const r = await reader.ask("pull", { peer, rkey, ops, dstBytes: at, srcBytes, seed: 23, timeoutMs: 30_000 }, 60_000);
    expect(r).toMatchObject({ ok: true, mismatch: -1 });
    expect(r.bytes as number).toBeGreaterThan(200 * MiB);
    // And into a CPU buffer, several ranges of the same op overlapping on the source side.
    const b = await reader.ask("pull", {
      peer,
      rkey,
      ops: [[[0, 0, 3 * MiB + 1], [MiB, 3 * MiB + 5, 2 * MiB]], [[srcBytes - 4097, 6 * MiB, 4097]]],
      into: "buf",
      dstBytes: 8 * MiB,
      srcBytes,
      seed: 23,
      timeoutMs: 30_000,
    });
    expect(b).toMatchObject({ ok: true, mismatch: -1 });
    expect(await reader.ask("stats")).toMatchObject({ xfer: { peers: 1, readsInFlight: 0 }, stats: { ops: 0 } });
  });

  test("a reader whose source is SIGKILLed mid-pull fails within the deadline, naming the peer; later reads fail at once", { timeout: 60_000 }, async () => {
    const srcBytes = 64 * MiB;
    const { src, reader, rkey, peer } = await pair(srcBytes, 5);
    const pulling = reader.request("pullLoop", { peer, rkey, chunk: 8 * MiB, depth: 4, srcBytes, timeoutMs: 20_000 }, 40_000);
    await pulling.submitted; // the first read is done: the others are mid-flight
    const t0 = performance.now();
    src.kill();
    const r = await pulling.reply;
    const ms = performance.now() - t0;
    expect(r).toMatchObject({ ok: false, status: "CE_E_PEER", ops: 0 });
    expect(r.message).toMatch(/peer 1 \(source\)/);
    expect(ms).toBeLessThan(10_000); // well inside the 20 s deadline: the death is seen, not timed out
    const again = await reader.ask("pull", { peer, rkey, ops: [[[0, 0, 4096]]], dstBytes: 4096, srcBytes, seed: 5, timeoutMs: 5_000 });
    expect(again).toMatchObject({ ok: false, status: "CE_E_PEER" });
    expect(again.message).toMatch(/peer 1 \(source\) failed/);
  });

  // Over TCP, UCX's emulated RMA gets aborted the owner's process when a reader died mid-get (an
  // assertion in uct_tcp_ep_pending_purge in 1.13, "unexpected error: Endpoint timeout" in 1.16);
  // reads are active messages now, whose failures come back to libce.
  test("a reader SIGKILLed mid-pull leaves its source serving the next reader", { timeout: 60_000 }, async () => {
    const srcBytes = 64 * MiB;
    const { src, reader, address, rkey, peer } = await pair(srcBytes, 8);
    const pulling = reader.request("pullLoop", { peer, rkey, chunk: 8 * MiB, depth: 4, srcBytes, timeoutMs: 20_000 }, 40_000);
    await pulling.submitted;
    reader.kill();
    await pulling.reply.catch(() => undefined);
    const [next] = await peers(1);
    const c = await next!.ask("connect", { address, name: "source" });
    const r = await next!.ask("pull", { peer: c.peer, rkey, ops: [[[0, 0, srcBytes]], [[5, srcBytes, 3 * MiB]]], dstBytes: srcBytes + 3 * MiB, srcBytes, seed: 8, timeoutMs: 20_000 });
    // The source's own words, should it have died.
    expect({ c, r, source: src.stderr }).toMatchObject({ c: { ok: true }, r: { ok: true, mismatch: -1 } });
    expect(await src.ask("stats")).toMatchObject({ ok: true, xfer: { registrations: 1 } });
  });

  test("the owner answers only ranges inside its registrations: a forged key that claims more is refused by the owner, naming the registration", { timeout: 60_000 }, async () => {
    const srcBytes = 4 * MiB;
    const { src, reader, rkey, peer } = await pair(srcBytes, 11);
    // The key's header (base, bytes) is the reader's to check; the owner checks again against its own table.
    const forged = Buffer.from(rkey, "hex");
    forged.writeBigUInt64LE(BigInt(64 * MiB), 16);
    const r = await reader.ask("pull", { peer, rkey: forged.toString("hex"), ops: [[[srcBytes, 0, 4096]]], dstBytes: srcBytes, srcBytes: 64 * MiB, seed: 11, timeoutMs: 10_000 });
    expect(r).toMatchObject({ ok: false, status: "CE_E_INVAL" });
    expect(r.message).toMatch(/from peer 1 \(source\): 4096 bytes at 0x[0-9a-f]+ are outside registration 1 of 4194304 bytes/);
    // The peer stays usable: a refusal is an answer, not a failure of the connection.
    expect(await reader.ask("pull", { peer, rkey, ops: [[[0, 0, srcBytes]]], dstBytes: srcBytes, srcBytes, seed: 11, timeoutMs: 10_000 })).toMatchObject({ ok: true, mismatch: -1 });
    expect(await src.ask("stats")).toMatchObject({ ok: true, xfer: { registrations: 1 } });
  });

  test("a source that stops answering (SIGSTOP) fails the reads with CE_E_TIMEOUT at their deadline", { timeout: 60_000 }, async () => {
    const srcBytes = 64 * MiB;
    const { src, reader, rkey, peer } = await pair(srcBytes, 6);
    expect(await reader.ask("pull", { peer, rkey, ops: [[[0, 0, MiB]]], dstBytes: 64 * MiB, srcBytes, seed: 6, timeoutMs: 10_000 })).toMatchObject({ ok: true });
    src.kill("SIGSTOP");
    try {
      const t0 = performance.now();
      const ops = [0, 1, 2, 3].map((k) => [[k * 16 * MiB, k * 16 * MiB, 16 * MiB]]);
      const r = await reader.ask("pull", { peer, rkey, ops, dstBytes: 64 * MiB, srcBytes, seed: 6, timeoutMs: 1_500 }, 30_000);
      const ms = performance.now() - t0;
      expect(r).toMatchObject({ ok: false, status: "CE_E_TIMEOUT" });
      expect(r.message).toMatch(/peer 1 \(source\): reading \d+ bytes \(1 pieces\) not done after 1500 ms/);
      expect(ms).toBeGreaterThan(1_400);
      expect(ms).toBeLessThan(6_000);
    } finally {
      src.kill("SIGCONT");
    }
  });

  test("destroying an endpoint with reads in flight fails them (CE_E_ABORTED) and gives back every op, registration and region", { timeout: 60_000 }, async () => {
    const srcBytes = 128 * MiB;
    const { reader, rkey, peer } = await pair(srcBytes, 7);
    const before = await reader.ask("stats");
    expect(await reader.ask("registerLocal", { bytes: 8 * MiB })).toMatchObject({ ok: true, stats: { registrations: 1 } });
    const r = await reader.ask("destroyInFlight", { peer, rkey, chunk: 16 * MiB, count: 8 }, 30_000);
    expect(r).toMatchObject({ ok: true });
    expect(r.inFlight as number).toBeGreaterThan(0);
    expect(r.closeMs as number).toBeLessThan(3_000);
    // The reads still in flight at the destroy failed; any that had finished before it are fine.
    const ended = r.ended as string[];
    expect(ended.every((e) => e === "CE_E_ABORTED" || e === "ok")).toBe(true);
    expect(ended).toContain("CE_E_ABORTED");
    // The local registration went with the endpoint, so its region can be released.
    expect(await reader.ask("releaseRegions")).toMatchObject({ ok: true });
    const after = await reader.ask("stats");
    expect(after.stats).toEqual(before.stats as Record<string, number>);
    expect(after.stats).toMatchObject({ regions: 0, regionBytes: 0, pinnedBytes: 0, ops: 0 });
    expect(after.fds as number).toBeLessThanOrEqual(before.fds as number);
  });
});

// The same endpoints over Mooncake's engine. Not here: a source that stops answering (Mooncake's TCP
// transport has no deadline of its own and cannot cancel a transfer, so such a read ends only with
// the endpoint), and ranges outside the owner's registrations (Mooncake refuses them too, as a
// failed transfer).
describe.skipIf(!mooncake.ok)(`Mooncake transfer endpoints across processes (${mooncake.reason})`, () => {
  test("a reader pulls ranges at odd offsets of a source's region, several ops at once, byte-exact (seed 31)", { timeout: 60_000 }, async () => {
    const srcBytes = 64 * MiB + 5;
    const { reader, rkey, peer } = await pair(srcBytes, 31, MOONCAKE_ENV);
    const rand = rng(31);
    const ops: [number, number, number][][] = [];
    let at = 3;
    for (let o = 0; o < 6; o++) {
      const ranges: [number, number, number][] = [];
      for (let k = 0; k < 3; k++) {
        const n = 1 + rand(8 * MiB);
        ranges.push([o === 5 && k === 2 ? srcBytes - n : rand(srcBytes - n), at, n]);
        at += n + rand(4096);
      }
      ops.push(ranges);
    }
    const r = await reader.ask("pull", { peer, rkey, ops, dstBytes: at, srcBytes, seed: 31, timeoutMs: 30_000 }, 60_000);
    expect(r).toMatchObject({ ok: true, mismatch: -1 });
  });

  test("a reader whose source is SIGKILLed mid-pull fails, naming the peer; later reads fail at once", { timeout: 60_000 }, async () => {
    const srcBytes = 256 * MiB;
    const { src, reader, rkey, peer } = await pair(srcBytes, 32, MOONCAKE_ENV);
    const pulling = reader.request("pullLoop", { peer, rkey, chunk: 32 * MiB, depth: 4, srcBytes, timeoutMs: 20_000 }, 40_000);
    await pulling.submitted;
    const t0 = performance.now();
    src.kill();
    const r = await pulling.reply;
    expect(r).toMatchObject({ ok: false, status: "CE_E_PEER", ops: 0 });
    expect(r.message).toMatch(/peer 1 \(source\) failed: Mooncake's transfer ended with status 6/);
    expect(performance.now() - t0).toBeLessThan(10_000);
    const again = await reader.ask("pull", { peer, rkey, ops: [[[0, 0, 4096]]], dstBytes: 4096, srcBytes, seed: 32, timeoutMs: 5_000 });
    expect(again).toMatchObject({ ok: false, status: "CE_E_PEER" });
  });

  test("a reader SIGKILLed mid-pull leaves its source serving the next reader", { timeout: 60_000 }, async () => {
    const srcBytes = 64 * MiB;
    const { src, reader, address, rkey, peer } = await pair(srcBytes, 33, MOONCAKE_ENV);
    const pulling = reader.request("pullLoop", { peer, rkey, chunk: 8 * MiB, depth: 4, srcBytes, timeoutMs: 20_000 }, 40_000);
    await pulling.submitted;
    reader.kill();
    await pulling.reply.catch(() => undefined);
    const [next] = await peers(1, MOONCAKE_ENV);
    const c = await next!.ask("connect", { address, name: "source" });
    const r = await next!.ask("pull", { peer: c.peer, rkey, ops: [[[0, 0, srcBytes]]], dstBytes: srcBytes, srcBytes, seed: 33, timeoutMs: 20_000 });
    expect({ c, r, source: src.stderr }).toMatchObject({ c: { ok: true }, r: { ok: true, mismatch: -1 } });
  });

  test("destroying an endpoint with reads in flight fails them (CE_E_ABORTED) and gives back every op and region", { timeout: 60_000 }, async () => {
    const srcBytes = 128 * MiB;
    const { reader, rkey, peer } = await pair(srcBytes, 34, MOONCAKE_ENV);
    const r = await reader.ask("destroyInFlight", { peer, rkey, chunk: 16 * MiB, count: 8 }, 30_000);
    expect(r).toMatchObject({ ok: true });
    const ended = r.ended as string[];
    expect(ended.every((e) => e === "CE_E_ABORTED" || e === "ok")).toBe(true);
    expect(await reader.ask("releaseRegions")).toMatchObject({ ok: true });
    expect((await reader.ask("stats")).stats).toMatchObject({ regions: 0, regionBytes: 0, pinnedBytes: 0, ops: 0 });
  });
});

describe.skipIf(!ucx.ok)(`UCX transfer endpoints in one process (${ucx.reason})`, () => {
  test("blobs of the wrong kind, ranges past either end and unknown peers are refused by name", async () => {
    using ctx = Ctx.create("cpu", [0]);
    using x = Xfer.create(ctx);
    const r = ctx.regionAlloc(MiB);
    await ctx.wait(r.op, { timeoutMs: 10_000, what: "alloc" });
    const reg = x.registerRegion(r.region);
    const peer = x.connect(x.address(), "myself");
    const one = (roff: number, loff: number, n: number) => BigUint64Array.from([roff, loff, n].map(BigInt));
    const refused = (fn: () => unknown) => {
      try {
        fn();
      } catch (err) {
        expect(err).toBeInstanceOf(NativeError);
        return (err as NativeError).message;
      }
      throw new Error("not refused");
    };
    expect(refused(() => x.readRegionSubmit(peer, reg.rkey, r.region, one(MiB - 10, 0, 11), 1_000))).toMatch(/11 bytes at remote offset 1048566 overrun the remote memory of 1048576 bytes/);
    expect(refused(() => x.readRegionSubmit(peer, reg.rkey, r.region, one(0, MiB, 1), 1_000))).toMatch(/overrun region \d+ of 1048576 bytes/);
    expect(refused(() => x.readRegionSubmit(peer, x.address(), r.region, one(0, 0, 1), 1_000))).toMatch(/not a ce remote key/);
    expect(refused(() => x.readRegionSubmit(peer, reg.rkey.subarray(0, reg.rkey.length - 2), r.region, one(0, 0, 1), 1_000))).toMatch(/the remote key says \d+ key bytes, \d+ came/);
    expect(refused(() => x.readRegionSubmit(99, reg.rkey, r.region, one(0, 0, 1), 1_000))).toMatch(/peer 99 is unknown/);
    expect(refused(() => x.connect(reg.rkey, "nobody"))).toMatch(/connecting to nobody: not a ce transfer address/);
    // A registered region stays until deregistered: peers may be reading it.
    expect(refused(() => ctx.regionRelease(r.region))).toMatch(/registered with a transfer endpoint/);
    x.deregister(reg.id);
    await ctx.wait(ctx.regionRelease(r.region), { timeoutMs: 10_000, what: "release" });
    x.disconnect(peer);
    expect(x.stats()).toMatchObject({ peers: 0, registrations: 0, readsInFlight: 0 });
  });

  test("closing the context destroys its endpoints with it", async () => {
    const ctx = Ctx.create("cpu", [0]);
    const x = Xfer.create(ctx);
    ctx.close();
    expect(() => x.stats()).toThrow(/the endpoint is closed/);
    x.close();
  });
});
