// Delta updates of a resident pool (CPU backend, real worker processes under an in-process ce serve
// daemon): unchanged tensors stay home, changed ones go as patches or whole, a delta goes only onto
// the version it was computed from, and every update ends verified by digest against the version.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { closeSync, openSync, writeSync } from "node:fs";
import type { Updater } from "../../src/app/updater";
import { CeError } from "../../src/base/errors";
import type { UpdateSummary } from "../../src/core/update";
import type { PlacedTensor } from "../../src/pool/layout";
import { Ctx } from "../../src/native/ce";
import { computeDelta } from "../../src/core/delta";
import { Daemon } from "../../src/serve/daemon";
import { randomBytes, rng } from "../helpers/ckpt";
import { cpuUpdater, oddTensors, within } from "../helpers/update";

type Summary = Omit<UpdateSummary, "trace">;
const PYTHON = process.env.CE_PYTHON ?? "/usr/bin/python3";

/** Bytes per element of the test's dtypes (all whole bytes). */
const WIDTH: Record<string, number> = { BF16: 2, F16: 2, F32: 4, I64: 8, U8: 1, I32: 4, F8_E4M3: 1, BOOL: 1 };

/** A version's tensors, by name. BOOL holds 0 or 1 in each byte, as real ones do. */
type Version = Map<string, Uint8Array>;

function firstVersion(layout: PlacedTensor[], seed: number): Version {
  return new Map(layout.map((t, i) => [t.name, t.dtype === "BOOL" ? randomBytes(t.nbytes, seed + i).map((b) => b & 1) : randomBytes(t.nbytes, seed + i)]));
}

/**
 * The next version as an optimizer step makes it: `fraction` of the elements of most tensors change,
 * spread sparsely; every 7th tensor is rewritten whole, every 5th left alone.
 */
function nextVersion(layout: PlacedTensor[], prev: Version, seed: number, fraction: number): Version {
  const next = rng(seed);
  const out: Version = new Map();
  layout.forEach((t, i) => {
    const bytes = prev.get(t.name)!.slice();
    const w = WIDTH[t.dtype]!;
    const n = t.nbytes / w;
    if (i % 5 === 1 || n === 0) {
      out.set(t.name, bytes);
      return;
    }
    const changes = i % 7 === 3 ? n : Math.max(1, Math.round(n * fraction));
    for (let k = 0; k < changes; k++) {
      const e = changes === n ? k : Math.floor(next() * n);
      // Each byte of the element moves (a BOOL flips), so a changed element always differs.
      for (let b = 0; b < w; b++) bytes[e * w + b] = t.dtype === "BOOL" ? bytes[e * w + b]! ^ 1 : (bytes[e * w + b]! + 1 + Math.floor(next() * 254)) & 0xff;
    }
    out.set(t.name, bytes);
  });
  return out;
}

function writeSlot(path: string, layout: PlacedTensor[], v: Version): void {
  const fd = openSync(path, "r+");
  try {
    for (const t of layout) if (t.nbytes) writeSync(fd, v.get(t.name)!, 0, t.nbytes, t.offset);
  } finally {
    closeSync(fd);
  }
}

/** Pushes version `n` into the pool and updates the workers with it. */
async function push(daemon: Daemon, layout: PlacedTensor[], n: number, v: Version, opts: { delta?: boolean } = {}): Promise<Summary> {
  const begun = (await daemon.pools.begin("policy", { version: n })) as { path: string };
  writeSlot(begun.path, layout, v);
  const out = (await within(120_000, `publishing version ${n}`, daemon.pools.publish("policy", n, { update: true, ...opts }))) as { update: Summary };
  return out.update;
}

for (const worker of ["ref", "python"] as const) {
  describe(`delta updates of a pool into ${worker === "ref" ? "reference" : "Python"} workers`, () => {
    let up: Updater;
    let daemon: Daemon;
    let layout: PlacedTensor[];

    beforeAll(async () => {
      up = await cpuUpdater(2, { worker, python: PYTHON });
      daemon = new Daemon(up, { timeoutMs: 120_000, roots: [], verify: true, delta: true });
      const tensors = oddTensors(worker === "ref" ? 60 : 30, 91, 512 * 1024).map(({ name, dtype, shape }) => ({ name, dtype, shape }));
      const made = (await daemon.pools.create({ name: "policy", layout: tensors, slots: 3 })) as { layout: PlacedTensor[] };
      layout = made.layout;
    }, 90_000);

    afterAll(async () => {
      await daemon?.close();
    });

    test(
      "a delta moves only what changed, sparse where smaller and dense where not; a chain of deltas with a full update and a restarted worker ends verified on the last version",
      async () => {
        let v = firstVersion(layout, 1);
        const first = await push(daemon, layout, 1, v);
        expect(first.delta).toBeUndefined();
        expect(first.verified).toBe(layout.length);

        v = nextVersion(layout, v, 2, 0.01);
        const second = await push(daemon, layout, 2, v);
        const d = second.delta!;
        expect(d).toMatchObject({ base: 1, tensors: layout.length });
        // Every 5th tensor unchanged (and the empty one), every 7th rewritten whole goes dense, 1% changes go sparse where that is smaller.
        expect(d.same).toBeGreaterThanOrEqual(Math.floor(layout.length / 5));
        expect(d.sparse).toBeGreaterThan(0);
        expect(d.dense).toBeGreaterThanOrEqual(Math.floor(layout.length / 7) - 1);
        expect(d.same + d.sparse + d.dense).toBe(layout.length);
        expect(second.bytes).toBe(d.bytes);
        // ce serve --delta counts what changed while the version arrives: the update only encodes.
        expect(d).toMatchObject({ compared: "while arriving", encoded: "while arriving" });
        expect(d.bytes).toBeLessThan(d.fullBytes / 2);
        expect(d.fullBytes).toBe(first.bytes);
        // Every tensor of the version is checked on every worker, the unsent ones too.
        expect(second.verified).toBe(layout.length);

        const restartAt = worker === "ref" ? 15 : 6;
        const fullAt = worker === "ref" ? 10 : 4;
        const last = worker === "ref" ? 22 : 8;
        for (let n = 3; n <= last; n++) {
          v = nextVersion(layout, v, n, 0.02);
          if (n === restartAt) {
            // A worker that restarts holds nothing: the update after it fails on the dead worker, the next one goes whole.
            process.kill((up.engine as unknown as { pid(i: number): number }).pid(1), "SIGKILL");
            await Bun.sleep(200);
            const failed = await push(daemon, layout, n, v).catch((err: unknown) => err);
            if (failed instanceof CeError) {
              expect(failed.code).toBe("E_WORKER_DIED");
              const again = (await daemon.update({ pool: "policy", version: n })) as Summary;
              expect(again.delta).toBeUndefined();
              expect(again.verified).toBe(layout.length);
              continue;
            }
            expect((failed as Summary).delta).toBeUndefined();
            continue;
          }
          // One version pushed without counting as it arrives (a delta asked of a pool that does not count): it compares at update.
          const pool = daemon.pools.get("policy");
          pool.countDeltas = n !== fullAt + 1;
          const s = await push(daemon, layout, n, v, n === fullAt ? { delta: false } : {});
          pool.countDeltas = true;
          expect(s.verified).toBe(layout.length);
          if (n === fullAt) expect(s.delta).toBeUndefined();
          else {
            const where = n === fullAt + 1 ? "at update" : "while arriving";
            expect(s.delta).toMatchObject({ base: n - 1, compared: where, encoded: where });
          }
        }
        const info = daemon.pools.info("policy") as { serving: number; hostBytes: number; slots: number; bytes: number };
        expect(info.serving).toBe(last);
        // Patches encoded as versions arrived are let go once their version is served: the pool holds its slots only.
        for (let i = 0; i < 100 && (daemon.pools.info("policy") as { hostBytes: number }).hostBytes !== info.slots * info.bytes; i++) await Bun.sleep(20);
        expect((daemon.pools.info("policy") as { hostBytes: number }).hostBytes).toBe(info.slots * info.bytes);
      },
      600_000,
    );

    test(
      "a version counted against the serving one lets that base go once another version is served (a rollback): the base can then be deleted",
      async () => {
        const serving = (daemon.pools.info("policy") as { serving: number }).serving;
        const next = serving + 100;
        const begun = (await daemon.pools.begin("policy", { version: next })) as { path: string }; // counting against `serving`
        const half = layout[Math.floor(layout.length / 2)]!;
        const v = firstVersion(layout, 500);
        writeSlot(begun.path, layout, v);
        daemon.pools.written("policy", next, { bytes: half.offset });
        const rb = (await daemon.pools.rollback("policy")) as { to: number };
        expect(rb.to).toBeLessThan(serving);
        expect(await daemon.pools.deleteVersion("policy", serving)).toMatchObject({ version: serving });
        // The rest of the push still lands: its update compares against what the engines hold now, at update.
        daemon.pools.written("policy", next, { bytes: half.offset + half.nbytes });
        const out = (await daemon.pools.publish("policy", next, { update: true })) as { update: Summary };
        expect(out.update.verified).toBe(layout.length);
        expect(out.update.delta).toMatchObject({ base: rb.to, compared: "at update", encoded: "at update" });
      },
      120_000,
    );

    test(
      "engines that hold another version get the update whole: the delta is refused at open, before anything moves, and no worker restarts",
      async () => {
        const pid = (i: number) => (up.engine as unknown as { pid(i: number): number }).pid(i);
        const pids = [pid(0), pid(1)];
        // Another pool of the same layout: the engines then hold other@1, not what policy last served.
        await daemon.pools.create({ name: "other", layout: layout.map(({ name, dtype, shape }) => ({ name, dtype, shape })), slots: 2 });
        const begun = (await daemon.pools.begin("other", { version: 1 })) as { path: string };
        writeSlot(begun.path, layout, firstVersion(layout, 77));
        await daemon.pools.publish("other", 1, { update: true });
        const serving = (daemon.pools.info("policy") as { serving: number }).serving;
        const begunNext = (await daemon.pools.begin("policy", { version: serving + 1 })) as { path: string };
        writeSlot(begunNext.path, layout, firstVersion(layout, 78));
        const s = ((await daemon.pools.publish("policy", serving + 1, { update: true })) as { update: Summary }).update;
        expect(s.delta).toBeUndefined();
        expect(s.bytes).toBe(layout.reduce((n, t) => n + t.nbytes, 0));
        expect(s.verified).toBe(layout.length);
        expect([pid(0), pid(1)]).toEqual(pids);
        await daemon.pools.delete("other");
      },
      120_000,
    );
  });
}


describe("libce's compare, encode and patch", () => {
  test(
    "patches of every element size, across word boundaries and 16 MiB pieces, turn the old version into the new one bit for bit",
    async () => {
      const ctx = Ctx.create("cpu", [0]);
      const wait = (op: bigint, what: string) => ctx.wait(op, { timeoutMs: 60_000, what });
      try {
        // Odd element counts (a partial last word), one tensor past a 16 MiB piece, an unchanged one.
        const specs = [
          { name: "u8", dtype: "U8", shape: [1001] },
          { name: "bf16", dtype: "BF16", shape: [9_000_000] },
          { name: "f32", dtype: "F32", shape: [333] },
          { name: "i64", dtype: "I64", shape: [77] },
          { name: "same", dtype: "F32", shape: [64] },
        ];
        const { placeLayout } = await import("../../src/pool/layout");
        const layout = placeLayout(specs).tensors;
        const bytes = layout.at(-1)!.offset + layout.at(-1)!.nbytes;
        const old = randomBytes(bytes, 5);
        const cur = old.slice();
        const next = rng(9);
        const changedOf = new Map<string, number>();
        for (const t of layout) {
          if (t.name === "same") continue;
          const w = WIDTH[t.dtype]!;
          const n = t.nbytes / w;
          const hit = new Set<number>([0, n - 1, ...Array.from({ length: Math.ceil(n / 50) }, () => Math.floor(next() * n))]);
          // One byte of the element changes: the compare must see it whichever byte it is.
          for (const e of hit) cur[t.offset + e * w + (e % w)] ^= 0x5a;
          changedOf.set(t.name, hit.size);
        }
        const regions = [old, cur].map((data) => {
          const a = ctx.regionAlloc(bytes);
          return { ...a, data };
        });
        for (const r of regions) {
          await wait(r.op, "allocating");
          ctx.regionWrite(r.region, 0, r.data);
        }
        const delta = await computeDelta(ctx, { layout, base: 1, oldRegion: regions[0]!.region, newRegion: regions[1]!.region, threads: 4 });
        try {
          expect(delta.stats.changedElements).toBe([...changedOf.values()].reduce((a, b) => a + b, 0));
          expect(delta.stats).toMatchObject({ same: 1, sparse: 4, dense: 0 });
          // The old version in a buffer, the patches in another, as a CPU worker holds them.
          const dst = ctx.bufAlloc(0, bytes, { ipc: false });
          const patches = delta.tensors.filter((t) => t.patch);
          const scratchBytes = Math.max(...patches.map((t) => t.offset + t.nbytes));
          const src = ctx.bufAlloc(0, scratchBytes, { ipc: false });
          try {
            await wait(ctx.h2d(dst, new BigUint64Array([BigInt(regions[0]!.region), 0n, 0n, BigInt(bytes)])), "copying the old version");
            await wait(ctx.h2d(src, new BigUint64Array([BigInt(patches[0]!.region), 0n, 0n, BigInt(scratchBytes)])), "copying the patches");
            const list = new BigUint64Array(patches.length * 6);
            patches.forEach((t, i) => {
              const placed = layout.find((l) => l.name === t.name)!;
              list.set([BigInt(placed.offset), BigInt(placed.nbytes), BigInt(t.offset), BigInt(t.offset + t.patch!.valuesOffset), BigInt(t.patch!.count), BigInt(WIDTH[t.dtype]!)], 6 * i);
            });
            await wait(ctx.bufPatch(dst, src, list, 4), "applying the patches");
            const cmp = await wait(ctx.compare(dst, 0, regions[1]!.region, 0, bytes), "comparing with the new version");
            expect(cmp.value).toBe(0);
            // A position past its tensor fails the op, naming the patch (u8 was patched at its last element, 1000).
            const u8 = patches.findIndex((t) => t.name === "u8");
            const bad = list.slice(6 * u8, 6 * u8 + 6);
            bad[1] = 1000n;
            await expect(wait(ctx.bufPatch(dst, src, bad, 1), "applying a bad patch")).rejects.toThrow("past the tensor's");
            // An encoding sized for fewer changes than the tensor has (a version rewritten after it was
            // counted) stops on its budget, before it holds more memory than that count allows.
            const bf16 = layout.find((t) => t.name === "bf16")!;
            const scratch = ctx.regionAlloc(4096 * 6);
            await wait(scratch.op, "allocating");
            const enc = new BigUint64Array([BigInt(regions[0]!.region), BigInt(bf16.offset), BigInt(regions[0]!.region), BigInt(bf16.offset + 2), BigInt(bf16.nbytes - 256), 2n, BigInt(scratch.region), 0n, 4096n * 4n, 4096n]);
            await expect(ctx.deltaEncode(enc, { threads: 2, timeoutMs: 60_000 })).rejects.toThrow("more changed elements than it was sized for");
            await wait(ctx.regionRelease(scratch.region), "releasing");
          } finally {
            dst.close();
            src.close();
          }
        } finally {
          await delta.release();
          for (const r of regions) await wait(ctx.regionRelease(r.region), "releasing");
        }
      } finally {
        ctx.close();
      }
    },
    60_000,
  );
});
