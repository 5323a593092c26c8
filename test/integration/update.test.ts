// `ce update`'s pipeline on the CPU backend, in-process through openUpdater / UpdateSession: real
// worker processes (`ce worker`, `python3 -m ce_worker`, or the scripted peer), real ZeroMQ sockets,
// real files. Verifying workers compare every tensor with the checkpoint's bytes at finish, so a
// successful update is a byte-exact one.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { heapStats } from "bun:jsc";
import { appendFileSync, readFileSync, truncateSync, utimesSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { openCheckpoint } from "../../src/checkpoint/checkpoint";
import { resolveDevices } from "../../src/core/devices";
import { rpcTimeoutS } from "../../src/engines/http";
import type { WorkersEngine } from "../../src/engines/workers";
import { TimeoutError, WorkerError } from "../../src/base/errors";
import { Ctx } from "../../src/native/ce";
import { type Registration, register, unregister } from "../../src/checkpoint/registry";
import { type Updater, openUpdater } from "../../src/app/updater";
import { type UpdateSummary, UpdateSession } from "../../src/core/update";
import { expectCeError, writeSafetensors } from "../helpers/ckpt";
import { findPython } from "../helpers/python";
import {
  type PeerScript,
  ScriptedEngine,
  type TestCheckpoint,
  CLI,
  cpuUpdater,
  openFds,
  peerLog,
  processGone,
  rssBytes,
  shmBuffersOf,
  smallCheckpoint,
  sockets,
  within,
} from "../helpers/update";

const UPDATE_MS = 60_000;
/** Per-test deadline (bun's own), above every inner deadline. */
const TEST_MS = 120_000;

let ck: TestCheckpoint;
beforeAll(async () => {
  ck = await smallCheckpoint({ files: 3, tensorsPerFile: 40, seed: 7 });
});
afterAll(async () => {
  await ck?.dir.cleanup();
});

/** Runs body on an updater, closes it, and checks it left nothing: no buffer in its context, no /dev/shm file. */
async function withUpdater(up: Updater, body: (up: Updater) => Promise<void>): Promise<void> {
  let left;
  try {
    await body(up);
  } finally {
    await up.session.close();
    left = up.ctx.stats();
    await up.close();
  }
  expect(left).toMatchObject({ bufs: 0, bufBytes: 0 });
  expect(shmBuffersOf()).toEqual([]);
}

/** Registers t (one pinned region per file), runs body, unregisters, and checks every region went back. */
async function registered<T>(up: { ctx: Ctx }, t: TestCheckpoint, body: (reg: Registration) => Promise<T>): Promise<T> {
  const reg = await register(up.ctx, t.ckpt, { name: "test-model", version: 1 });
  expect(up.ctx.stats().regions).toBe(t.ckpt.files.length);
  let result: T;
  try {
    result = await body(reg);
  } finally {
    await unregister(up.ctx, reg);
  }
  expect(up.ctx.stats()).toMatchObject({ regions: 0, regionBytes: 0 });
  return result;
}

function update(session: UpdateSession, reg: Registration, opts: { bucketBytes?: number; slots?: number } = {}): Promise<UpdateSummary> {
  return within(UPDATE_MS, "update", session.update({ reg, timeoutMs: UPDATE_MS, ...opts }));
}

/** The summary counts what the checkpoint holds, and its trace covers every bucket on every device. */
function expectSummary(s: UpdateSummary, t: TestCheckpoint, ndev: number, mode: "direct" | "broadcast"): void {
  // Byte-exact: every worker's digest of every tensor equals the registration's.
  expect(s).toMatchObject({ checkpoint: "test-model", version: 1, backend: "cpu", bytes: t.bytes, tensors: t.tensors, mode, verified: t.tensors });
  expect(s.devices).toHaveLength(ndev);
  expect(s.buckets).toBeGreaterThanOrEqual(1);
  expect(s.trace.map((b) => b.index)).toEqual([...Array(s.buckets).keys()]);
  expect(s.trace.reduce((n, b) => n + b.tensors, 0)).toBe(t.tensors);
  for (const b of s.trace) {
    expect(b.reload).toHaveLength(ndev);
    expect(b.bytes).toBeLessThanOrEqual(s.slotBytes);
    expect(b.slot).toBe(b.index % s.slots);
    expect(b.owner).toBeLessThan(ndev);
    expect(b.bcast === undefined).toBe(mode === "direct");
  }
  expect(s.slotBytes % 256).toBe(0);
  expect(s.deviceBytes).toBe((s.slots + s.staging) * s.slotBytes * ndev);
  if (mode === "direct") expect(s.staging).toBe(0);
  else expect(s.staging).toBeOneOf([1, 2].filter((k) => k <= s.buckets));
}

/** Gives `to` the timestamps of `from`, to the nanosecond (coreutils touch -r; Bun's shell touch has no -r). */
/** Waits for every process to be gone, up to a deadline. */
async function allGone(pids: number[]): Promise<boolean> {
  const deadline = performance.now() + 10_000;
  while (performance.now() < deadline) {
    if (pids.every(processGone)) return true;
    await Bun.sleep(20);
  }
  return false;
}

describe("an update into reference workers", () => {
  // CPU devices share one memory: each gets its own copy (direct); the broadcast path is forced to prove it.
  test.each([
    [1, "direct"],
    [2, "direct"],
    [4, "direct"],
    [2, "broadcast"],
    [3, "broadcast"],
  ] as const)(
    "into %d worker(s) (%s path) is byte-exact, and the summary counts every byte, tensor and bucket",
    async (n, mode) => {
      await withUpdater(await cpuUpdater(n, { forceBroadcast: mode === "broadcast" }), async (up) => {
        await registered(up, ck, async (reg) => {
          const s = await update(up.session, reg);
          expectSummary(s, ck, n, mode);
          // The buffers stay for the next update of the same plan.
          expect(up.ctx.stats()).toMatchObject({ bufs: n * (mode === "broadcast" ? 2 : 1), ops: 0 });
          expect(shmBuffersOf()).toHaveLength(n);
        });
      });
    },
    TEST_MS,
  );

  test(
    "the broadcast path forced on one device is byte-exact too",
    async () => {
      await withUpdater(await cpuUpdater(1, { forceBroadcast: true }), async (up) => {
        await registered(up, ck, async (reg) => expectSummary(await update(up.session, reg), ck, 1, "broadcast"));
      });
    },
    TEST_MS,
  );

  test(
    "a checkpoint in /dev/shm is pinned in place and arrives byte-exact",
    async () => {
      const shm = await smallCheckpoint({ files: 2, tensorsPerFile: 30, seed: 11, shm: true });
      try {
        await withUpdater(await cpuUpdater(2), async (up) => {
          await registered(up, shm, async (reg) => {
            expect(reg.inPlace).toBe(true);
            const s = await update(up.session, reg);
            expectSummary(s, shm, 2, "direct");
            expect(s.inPlace).toBe(true);
          });
        });
      } finally {
        await shm.dir.cleanup();
      }
    },
    TEST_MS,
  );

  test.each([
    [1, 1],
    [1, 2],
    [1, 3],
    [3, 1],
    [3, 2],
    [3, 3],
  ] as const)(
    "small buckets into %d worker(s) with %d slot(s): many buckets, still byte-exact",
    async (n, slots) => {
      const largest = ck.ckpt.largestTensor.nbytes;
      await withUpdater(await cpuUpdater(n), async (up) => {
        await registered(up, ck, async (reg) => {
          const s = await update(up.session, reg, { bucketBytes: largest, slots });
          expectSummary(s, ck, n, "direct");
          expect(s.slots).toBe(slots);
          expect(s.buckets).toBeGreaterThan(8);
          expect(s.bucketBytes).toBe(Math.ceil(largest / 256) * 256);
        });
      });
    },
    TEST_MS,
  );

  test(
    "consecutive updates in one session, plan changes included, each arrive byte-exact",
    async () => {
      const v2 = await smallCheckpoint({ files: 3, tensorsPerFile: 40, seed: 7 });
      try {
        // Same tensors, new bytes: what a trainer writes step after step.
        await rewriteWithNewBytes(v2, 99);
        await withUpdater(await cpuUpdater(2), async (up) => {
          await registered(up, ck, async (reg) => {
            expectSummary(await update(up.session, reg), ck, 2, "direct");
            expectSummary(await update(up.session, reg, { bucketBytes: ck.ckpt.largestTensor.nbytes, slots: 2 }), ck, 2, "direct");
          });
          await registered(up, v2, async (reg) => {
            expectSummary(await update(up.session, reg), v2, 2, "direct");
          });
        });
      } finally {
        await v2.dir.cleanup();
      }
    },
    TEST_MS,
  );

  test(
    "a bucket smaller than the largest tensor is refused with the sizes, and the next update succeeds",
    async () => {
      await withUpdater(await cpuUpdater(2), async (up) => {
        await registered(up, ck, async (reg) => {
          const err = await expectCeError(() => update(up.session, reg, { bucketBytes: 4096 }), "E_BUCKET_SIZE", "smaller than the largest tensor");
          expect(err.hint).toContain("--bucket-size");
          expect(shmBuffersOf()).toEqual([]);
          expect(up.ctx.stats()).toMatchObject({ bufs: 0, ops: 0 });
          expectSummary(await update(up.session, reg), ck, 2, "direct");
        });
      });
    },
    TEST_MS,
  );
});

/** Rewrites every shard of t with the same tensors and other bytes (same sizes, new mtimes), and reopens it. */
async function rewriteWithNewBytes(t: TestCheckpoint, seed: number): Promise<void> {
  for (const [f, file] of t.ckpt.files.entries()) {
    const specs = file.tensors.map((x) => ({ name: x.name, dtype: x.dtype, shape: x.shape }));
    await writeSafetensors(file.path, specs, { seed: seed * 10 + f });
  }
  t.ckpt = await openCheckpoint(t.ckpt.root);
}

describe("a failed update leaves the session ready for the next one", () => {
  test(
    "a byte flipped in pinned memory after the digests were taken fails verify naming tensor, worker and version; the next update succeeds",
    async () => {
      const t = await smallCheckpoint({ files: 2, tensorsPerFile: 20, seed: 21 });
      try {
        await withUpdater(await cpuUpdater(2), async (up) => {
          const reg = await register(up.ctx, t.ckpt, { name: "test-model", version: 1, inPlace: false, digests: true });
          try {
            expect(reg.digests?.size).toBe(t.tensors);
            const victim = t.ckpt.tensors.find((x) => x.nbytes >= 64)!;
            const region = reg.files.find((f) => f.path === victim.file)!.region;
            // ce's own copy changes under it (a bad DIMM, a stray write): only the digests can tell.
            const original = readFileSync(victim.file).subarray(victim.fileOffset + 5, victim.fileOffset + 6);
            up.ctx.regionWrite(region, victim.fileOffset + 5, new Uint8Array([original[0]! ^ 0x01]));
            const err = await expectCeError(() => update(up.session, reg), "E_VERIFY", `tensor ${victim.name} on worker on CPU device`, "test-model version 1", "expected");
            expect(err).toBeInstanceOf(WorkerError);
            expect(shmBuffersOf()).toEqual([]);
            expect(up.ctx.stats()).toMatchObject({ bufs: 0, ops: 0, regions: 2 });
          } finally {
            await unregister(up.ctx, reg);
          }
          // Registered again, the pinned copy holds the file's bytes and verifies.
          await registered(up, t, async (reg2) => {
            const s = await update(up.session, reg2);
            expectSummary(s, t, 2, "direct");
            expect(s.verified).toBe(t.tensors);
          });
        });
      } finally {
        await t.dir.cleanup();
      }
    },
    TEST_MS,
  );

  test(
    "a tensor whose size changed is refused by the worker that holds it, and the next update succeeds",
    async () => {
      const t = await smallCheckpoint({ files: 1, tensorsPerFile: 30, seed: 31 });
      try {
        await withUpdater(await cpuUpdater(2), async (up) => {
          await registered(up, t, async (reg) => expectSummary(await update(up.session, reg), t, 2, "direct"));
          // The same model with two tensors' shapes swapped (same bytes and count in all): an engine
          // cannot take either into its parameter.
          const file = t.ckpt.files[0]!;
          const specs = file.tensors.map((x) => ({ name: x.name, dtype: x.dtype, shape: x.shape, nbytes: x.nbytes }));
          const i = specs.findIndex((x) => x.nbytes > 0 && specs.some((y) => y.dtype === x.dtype && y.nbytes !== x.nbytes && y.nbytes > 0));
          const j = specs.findIndex((y) => y.dtype === specs[i]!.dtype && y.nbytes !== specs[i]!.nbytes && y.nbytes > 0);
          [specs[i]!.shape, specs[j]!.shape] = [specs[j]!.shape, specs[i]!.shape];
          await writeSafetensors(file.path, specs, { seed: 5 });
          t.ckpt = await openCheckpoint(t.ckpt.root);
          await registered(up, t, async (reg) => {
            await expectCeError(() => update(up.session, reg), "E_WORKER", "E_TENSOR_SIZE");
            expect(shmBuffersOf()).toEqual([]);
            expect(up.ctx.stats()).toMatchObject({ bufs: 0, ops: 0 });
            // The restarted workers take the new shape.
            expectSummary(await update(up.session, reg), t, 2, "direct");
          });
        });
      } finally {
        await t.dir.cleanup();
      }
    },
    TEST_MS,
  );

  test(
    "a worker killed mid-update fails it with a WorkerError naming the worker, and the next update succeeds",
    async () => {
      await withUpdater(await cpuUpdater(3), async (up) => {
        const workers = up.engine as WorkersEngine;
        const before = [0, 1, 2].map((i) => workers.pid(i)!);
        await registered(up, ck, async (reg) => {
          let killed = false;
          const run = up.session.update({
            reg,
            timeoutMs: UPDATE_MS,
            bucketBytes: ck.ckpt.largestTensor.nbytes,
            slots: 2,
            onProgress: (p) => {
              if (p.done === 2 && !killed) {
                killed = true;
                process.kill(before[1]!, "SIGKILL");
              }
            },
          });
          const err = await expectCeError(() => within(UPDATE_MS, "update", run), "E_WORKER_DIED", up.session.devices[1]!.uuid, "SIGKILL");
          expect(killed).toBe(true);
          expect(err).toBeInstanceOf(WorkerError);
          // Every old worker is gone (the killed one, and the others stopped by the reset) and new ones serve.
          expect(await allGone(before)).toBe(true);
          const after = [0, 1, 2].map((i) => workers.pid(i)!);
          for (const pid of after) expect(before).not.toContain(pid);
          expect(shmBuffersOf()).toEqual([]);
          expect(up.ctx.stats()).toMatchObject({ bufs: 0, ops: 0, regions: 3 });
          expectSummary(await update(up.session, reg), ck, 3, "direct");
        });
      });
    },
    TEST_MS,
  );

  test(
    "a worker that died between updates fails the next update at once, and the one after succeeds",
    async () => {
      await withUpdater(await cpuUpdater(2), async (up) => {
        const workers = up.engine as WorkersEngine;
        await registered(up, ck, async (reg) => {
          await update(up.session, reg);
          const victim = workers.pid(0)!;
          process.kill(victim, "SIGKILL");
          expect(await allGone([victim])).toBe(true);
          await expectCeError(() => update(up.session, reg), "E_WORKER_DIED", up.session.devices[0]!.uuid, "SIGKILL");
          expect(shmBuffersOf()).toEqual([]);
          expectSummary(await update(up.session, reg), ck, 2, "direct");
        });
      });
    },
    TEST_MS,
  );

  test(
    "a checkpoint file whose mtime or size changed since registration is refused before anything moves",
    async () => {
      const t = await smallCheckpoint({ files: 2, tensorsPerFile: 10, seed: 41 });
      const logs = await mkdtemp(join(tmpdir(), "ce-test-peers-"));
      const ndev = 2;
      const set = resolveDevices("cpu", { count: ndev });
      const ctx = Ctx.create("cpu", [0, 1]);
      const engine = new ScriptedEngine(
        set.devices.map((d) => d.uuid),
        (d) => ({ kind: "peer", log: join(logs, `peer-${d}.log`) }),
      );
      const session = new UpdateSession({ ctx, devices: set.devices, engine, opTimeoutMs: 30_000, verify: true });
      engine.start(session.endpoints);
      try {
        const file = t.ckpt.files[1]!;
        await registered({ ctx }, t, async (reg) => {
          const st = await Bun.file(file.path).stat();
          utimesSync(file.path, st.atime, new Date(st.mtimeMs + 5000));
          await expectCeError(() => update(session, reg), "E_CHECKPOINT_CHANGED", file.path, "modified at");
          appendFileSync(file.path, "x");
          await expectCeError(() => update(session, reg), "E_CHECKPOINT_CHANGED", file.path, `size ${file.size} → ${file.size + 1}`);
          // Nothing moved: no buffers, no frame to any worker.
          expect(ctx.stats()).toMatchObject({ bufs: 0, ops: 0 });
          expect(shmBuffersOf()).toEqual([]);
          for (let d = 0; d < ndev; d++) expect(peerLog(join(logs, `peer-${d}.log`))).toEqual([]);
        });
        // Put back and registered anew, the checkpoint updates: every worker sees the protocol in order.
        truncateSync(file.path, file.size);
        t.ckpt = await openCheckpoint(t.ckpt.root);
        await registered({ ctx }, t, async (reg) => {
          const s = await update(session, reg, { bucketBytes: t.ckpt.largestTensor.nbytes });
          for (let d = 0; d < ndev; d++) {
            expect(peerLog(join(logs, `peer-${d}.log`))).toEqual([
              { op: "open" },
              ...[...Array(s.buckets).keys()].map((bucket) => ({ op: "load", bucket })),
              { op: "release" },
              { op: "finish" },
            ]);
          }
        });
      } finally {
        await session.close();
        ctx.close();
        await t.dir.cleanup();
        await rm(logs, { recursive: true, force: true });
      }
      expect(shmBuffersOf()).toEqual([]);
    },
    TEST_MS,
  );

  /** A session over scripted workers: generation 0 from `first`, every later one real verifying `ce worker`s. */
  async function scripted(ndev: number, first: (d: number, log: string) => PeerScript, opTimeoutMs: number) {
    const logs = await mkdtemp(join(tmpdir(), "ce-test-peers-"));
    const set = resolveDevices("cpu", { count: ndev });
    const ctx = Ctx.create(
      "cpu",
      set.devices.map((d) => d.ordinal),
    );
    const logOf = (d: number) => join(logs, `peer-${d}.log`);
    const engine = new ScriptedEngine(
      set.devices.map((d) => d.uuid),
      (d, generation) => (generation === 0 ? first(d, logOf(d)) : { kind: "ref" }),
    );
    const session = new UpdateSession({ ctx, devices: set.devices, engine, opTimeoutMs, verify: true });
    engine.start(session.endpoints);
    return {
      ctx,
      session,
      engine,
      logOf,
      async close() {
        await session.close();
        expect(ctx.stats()).toMatchObject({ bufs: 0 });
        ctx.close();
        await rm(logs, { recursive: true, force: true });
        expect(shmBuffersOf()).toEqual([]);
      },
    };
  }

  test(
    "a worker that replies an error aborts every worker, and the next update succeeds",
    async () => {
      const s = await scripted(3, (d, log) => (d === 1 ? { kind: "peer", log, fail: "load:3" } : { kind: "peer", log }), 30_000);
      try {
        await registered(s, ck, async (reg) => {
          const err = await expectCeError(
            () => update(s.session, reg, { bucketBytes: ck.ckpt.largestTensor.nbytes, slots: 2 }),
            "E_WORKER",
            `worker on CPU device 1 (${s.session.devices[1]!.uuid}) failed bucket 3/`,
            "PeerError: scripted failure at load #3",
          );
          expect(err).toBeInstanceOf(WorkerError);
          for (let d = 0; d < 3; d++) {
            const ops = peerLog(s.logOf(d)).map((r) => r.op);
            expect(ops[0]).toBe("open");
            expect(ops.at(-1)).toBe("abort");
            expect(ops).not.toContain("release");
            expect(ops).not.toContain("finish");
          }
          // The failed bucket never went to anyone after it: loads stop at bucket 3 (index 2).
          for (let d = 0; d < 3; d++) expect(Math.max(...peerLog(s.logOf(d)).map((r) => r.bucket ?? -1))).toBeLessThanOrEqual(2);
          expect(shmBuffersOf()).toEqual([]);
          expect(s.ctx.stats()).toMatchObject({ bufs: 0, ops: 0, regions: 3 });
          expect(s.engine.generation).toBe(1);
          expectSummary(await update(s.session, reg), ck, 3, "direct");
        });
      } finally {
        await s.close();
      }
    },
    TEST_MS,
  );

  test(
    "a worker that never answers fails the update with a TimeoutError after the op timeout, and the next update succeeds",
    async () => {
      const opTimeoutMs = 1500;
      const s = await scripted(2, (d, log) => (d === 1 ? { kind: "peer", log, hang: "load:2" } : { kind: "peer", log }), opTimeoutMs);
      try {
        await registered(s, ck, async (reg) => {
          const err = await expectCeError(
            () => update(s.session, reg, { bucketBytes: ck.ckpt.largestTensor.nbytes }),
            "E_TIMEOUT",
            `worker on CPU device 1 (${s.session.devices[1]!.uuid}): reply to bucket 2/`,
            `timed out after`,
          );
          expect(err).toBeInstanceOf(TimeoutError);
          const waited = Number(/timed out after (\d+) ms/.exec(err.message)![1]);
          expect(waited).toBeGreaterThanOrEqual(opTimeoutMs);
          // The silent worker never took the abort; the other one did.
          expect(peerLog(s.logOf(0)).at(-1)).toEqual({ op: "abort" });
          expect(peerLog(s.logOf(1)).at(-1)).toEqual({ op: "load", bucket: 1 });
          expect(shmBuffersOf()).toEqual([]);
          expect(s.ctx.stats()).toMatchObject({ bufs: 0, ops: 0 });
          expectSummary(await update(s.session, reg), ck, 2, "direct");
        });
      } finally {
        await s.close();
      }
    },
    TEST_MS,
  );

  test(
    "a worker killed mid-update makes ce abort the update on every other worker",
    async () => {
      const s = await scripted(3, (d, log) => (d === 1 ? { kind: "ref" } : { kind: "peer", log }), 30_000);
      try {
        await registered(s, ck, async (reg) => {
          const victim = s.engine.pid(1)!;
          const run = s.session.update({
            reg,
            timeoutMs: UPDATE_MS,
            bucketBytes: ck.ckpt.largestTensor.nbytes,
            onProgress: (p) => {
              if (p.done === 2) process.kill(victim, "SIGKILL");
            },
          });
          await expectCeError(() => within(UPDATE_MS, "update", run), "E_WORKER_DIED", s.session.devices[1]!.uuid);
          for (const d of [0, 2]) {
            const ops = peerLog(s.logOf(d)).map((r) => r.op);
            expect(ops.at(-1)).toBe("abort");
            expect(ops).not.toContain("finish");
          }
          expect(shmBuffersOf()).toEqual([]);
          expectSummary(await update(s.session, reg), ck, 3, "direct");
        });
      } finally {
        await s.close();
      }
    },
    TEST_MS,
  );

  test(
    "a worker that never answers fails the update at the update's deadline when that comes before the op timeout",
    async () => {
      const s = await scripted(2, (d, log) => (d === 0 ? { kind: "peer", log, hang: "load:1" } : { kind: "peer", log }), 60_000);
      try {
        await registered(s, ck, async (reg) => {
          const err = await expectCeError(() => within(UPDATE_MS, "update", s.session.update({ reg, timeoutMs: 1500 })), "E_TIMEOUT", "not done after 1500 ms");
          expect(err.message).toContain(ck.ckpt.root);
          expect(peerLog(s.logOf(1)).at(-1)).toEqual({ op: "abort" });
          expect(shmBuffersOf()).toEqual([]);
          expectSummary(await update(s.session, reg), ck, 2, "direct");
        });
      } finally {
        await s.close();
      }
    },
    TEST_MS,
  );

  test(
    "a worker that fails open fails the update before any bucket moves, and the next update succeeds",
    async () => {
      const s = await scripted(2, (d, log) => (d === 0 ? { kind: "peer", log, fail: "open:1" } : { kind: "peer", log }), 30_000);
      try {
        await registered(s, ck, async (reg) => {
          await expectCeError(() => update(s.session, reg), "E_WORKER", "failed open", "scripted failure at open #1");
          expect(peerLog(s.logOf(0)).map((r) => r.op)).toEqual(["open", "abort"]);
          // The other worker may not have had its open yet when the failure stopped the update.
          expect(peerLog(s.logOf(1)).map((r) => r.op)).toBeOneOf([["open", "abort"], ["abort"]]);
          expect(shmBuffersOf()).toEqual([]);
          expectSummary(await update(s.session, reg), ck, 2, "direct");
        });
      } finally {
        await s.close();
      }
    },
    TEST_MS,
  );
  test(
    "a worker that drops a tensor fails verify naming the tensor and the worker, and the next update succeeds",
    async () => {
      const victim = ck.ckpt.tensors[Math.floor(ck.ckpt.tensors.length / 2)]!.name;
      const s = await scripted(2, (d, log) => (d === 1 ? { kind: "peer", log, drop: victim } : { kind: "peer", log }), 30_000);
      try {
        await registered(s, ck, async (reg) => {
          await expectCeError(() => update(s.session, reg), "E_VERIFY", `tensor ${victim} is missing on worker on CPU device 1`);
          // The verdict came after finish: both workers took every bucket, and were told to abort.
          expect(peerLog(s.logOf(1)).map((r) => r.op).slice(-3)).toEqual(["release", "finish", "abort"]);
          expect(shmBuffersOf()).toEqual([]);
          expectSummary(await update(s.session, reg), ck, 2, "direct");
        });
      } finally {
        await s.close();
      }
    },
    TEST_MS,
  );
});

describe("an update through the external engine (the vLLM-style HTTP trigger)", () => {
  test(
    "every worker gets its endpoint from the RPC and the update is byte-exact; an engine's HTTP error fails the update, and the next one succeeds",
    async () => {
      const calls: { method: string; args: Record<string, string>[]; timeout: number }[] = [];
      const workers = new Map<string, ReturnType<typeof Bun.spawn>>();
      let refuse = false;
      // Stands in for an engine: each call makes a verifying `ce worker` connect to every endpoint it has not seen.
      using server = Bun.serve({
        hostname: "127.0.0.1",
        port: 0,
        async fetch(req) {
          const body = (await req.json()) as (typeof calls)[number];
          calls.push(body);
          if (refuse) return new Response("engine says no", { status: 500 });
          for (const endpoint of Object.values(body.args[0]!)) {
            if (workers.has(endpoint)) continue;
            const cmd = [process.execPath, CLI, "worker", "--endpoint", endpoint, "--device", "cpu"];
            workers.set(endpoint, Bun.spawn(cmd, { stdin: "pipe", stdout: "ignore", stderr: "inherit" }));
          }
          // What vLLM's /collective_rpc answers: one summary per worker.
          return Response.json({ results: Object.keys(body.args[0]!).map((uuid) => ({ state: "finished", device_uuid: uuid })) });
        },
      });
      const url = `http://127.0.0.1:${server.port}/rpc`;
      const up = await within(
        60_000,
        "opening the updater",
        openUpdater({ backend: "cpu", select: { count: 2 }, engine: { kind: "external", endpoint: url }, opTimeoutMs: 30_000, verify: true }),
      );
      try {
        await withUpdater(up, async () => {
          expect(up.engine.description).toBe(`external ${url}`);
          await registered(up, ck, async (reg) => {
            expectSummary(await update(up.session, reg), ck, 2, "direct");
            expect(calls).toHaveLength(1);
            expect(calls[0]).toEqual({ method: "update_weights_from_ipc", args: [up.session.endpoints], timeout: rpcTimeoutS(UPDATE_MS) });
            expect(Object.keys(calls[0]!.args[0]!).sort()).toEqual(up.session.devices.map((d) => d.uuid).sort());

            refuse = true;
            const err = await expectCeError(() => update(up.session, reg), "E_ENGINE_HTTP", `POST ${url}: HTTP 500: engine says no`);
            expect(err).toBeInstanceOf(WorkerError);
            expect(shmBuffersOf()).toEqual([]);
            expect(up.ctx.stats()).toMatchObject({ bufs: 0, ops: 0 });

            // After the failure the session listens on new endpoints; the engine's workers connect there.
            refuse = false;
            expectSummary(await update(up.session, reg), ck, 2, "direct");
            expect(calls).toHaveLength(3);
            expect(calls[2]!.args[0]).toEqual(up.session.endpoints);
            expect(calls[2]!.args[0]).not.toEqual(calls[0]!.args[0]);
          });
        });
      } finally {
        for (const w of workers.values()) w.kill("SIGKILL");
        await Promise.all([...workers.values()].map((w) => w.exited));
      }
    },
    TEST_MS,
  );
});

describe("a session", () => {
  test(
    "refuses a second update while one runs, and any update once closed",
    async () => {
      const up = await cpuUpdater(2);
      await registered(up, ck, async (reg) => {
        const first = update(up.session, reg);
        await expectCeError(() => up.session.update({ reg, timeoutMs: UPDATE_MS }), "E_BUSY", "already running");
        expectSummary(await first, ck, 2, "direct");
        await up.session.close();
        await expectCeError(() => up.session.update({ reg, timeoutMs: UPDATE_MS }), "E_SESSION_CLOSED", "closed");
        expect(up.ctx.stats()).toMatchObject({ bufs: 0 });
      });
      await up.close();
      expect(shmBuffersOf()).toEqual([]);
    },
    TEST_MS,
  );

  test(
    "200 consecutive updates grow neither memory, nor file descriptors, nor sockets",
    async () => {
      const tiny = await smallCheckpoint({ files: 1, tensorsPerFile: 12, seed: 51, largestBytes: 4096 });
      try {
        // Verified, as by default: the digests' ops and buffers must not leak either.
        await withUpdater(await cpuUpdater(2), async (up) => {
          await registered(up, tiny, async (reg) => {
            // One bucket: the fewest round trips per update, so 200 of them stay quick.
            const opts = { bucketBytes: tiny.bytes + tiny.tensors * 256 };
            const measure = () => {
              Bun.gc(true);
              return { rss: rssBytes(), fds: openFds(), sockets: sockets(), objects: heapStats().objectCount };
            };
            for (let i = 0; i < 10; i++) await update(up.session, reg, opts);
            const start = measure();
            for (let i = 0; i < 200; i++) {
              const s = await update(up.session, reg, opts);
              if (i === 199) expectSummary(s, tiny, 2, "direct");
            }
            const end = measure();
            expect(end.fds).toBeLessThanOrEqual(start.fds + 2);
            expect(end.sockets).toBeLessThanOrEqual(start.sockets);
            expect(end.rss).toBeLessThan(start.rss + 48 * 1024 ** 2);
            // A leak of one update's state would be hundreds of objects per update.
            expect(end.objects).toBeLessThan(start.objects + 200 * 10);
            expect(up.ctx.stats()).toMatchObject({ bufs: 2, ops: 0, regions: 1 });
          });
        });
      } finally {
        await tiny.dir.cleanup();
      }
    },
    TEST_MS,
  );
});

const py = findPython();

describe.skipIf(!py.ok)(`an update into Python workers (${py.ok ? `${py.python}: ${py.reason}` : `skipped: ${py.reason}`})`, () => {
  test.each([
    [1, "direct"],
    [3, "direct"],
    [3, "broadcast"],
  ] as const)(
    "into %d Python worker(s) (%s path) is byte-exact",
    async (n, mode) => {
      await withUpdater(await cpuUpdater(n, { worker: "python", python: py.python, forceBroadcast: mode === "broadcast" }), async (up) => {
        await registered(up, ck, async (reg) => {
          expectSummary(await update(up.session, reg), ck, n, mode);
          const s = await update(up.session, reg, { bucketBytes: ck.ckpt.largestTensor.nbytes, slots: 2 });
          expectSummary(s, ck, n, mode);
          expect(s.buckets).toBeGreaterThan(8);
        });
      });
    },
    TEST_MS,
  );

  test(
    "a Python worker killed mid-update fails it, and the next update succeeds",
    async () => {
      await withUpdater(await cpuUpdater(2, { worker: "python", python: py.python }), async (up) => {
        const workers = up.engine as WorkersEngine;
        await registered(up, ck, async (reg) => {
          const victim = workers.pid(0)!;
          let killed = false;
          const run = up.session.update({
            reg,
            timeoutMs: UPDATE_MS,
            bucketBytes: ck.ckpt.largestTensor.nbytes,
            onProgress: (p) => {
              if (p.done === 2 && !killed) {
                killed = true;
                process.kill(victim, "SIGKILL");
              }
            },
          });
          await expectCeError(() => within(UPDATE_MS, "update", run), "E_WORKER_DIED", up.session.devices[0]!.uuid);
          expect(shmBuffersOf()).toEqual([]);
          expectSummary(await update(up.session, reg), ck, 2, "direct");
        });
      });
    },
    TEST_MS,
  );
});

/** A small tmpfs for the slot buffers, when this process may mount one (root); else the reason. */
function mountSmallShm(bytes: number): { dir?: string; reason: string } {
  const dir = join(tmpdir(), `ce-small-shm-${process.pid}`);
  Bun.spawnSync(["mkdir", "-p", dir]);
  const r = Bun.spawnSync(["mount", "-t", "tmpfs", "-o", `size=${bytes}`, "tmpfs", dir], { stderr: "pipe" });
  if (r.exitCode !== 0) return { reason: `cannot mount a tmpfs here: ${r.stderr.toString().trim() || `exit ${r.exitCode}`}` };
  return { dir, reason: `a ${bytes >> 20} MiB tmpfs` };
}

const smallShm = mountSmallShm(5 << 20);

describe.skipIf(!smallShm.dir)(`slot buffers that do not fit where they were planned (${smallShm.reason})`, () => {
  afterAll(() => {
    Bun.spawnSync(["umount", smallShm.dir!]);
  });

  test(
    "an update whose planned slots fail to allocate retries with fewer slots instead of failing",
    async () => {
      const tc = await smallCheckpoint({ seed: 41, files: 1, tensorsPerFile: 200, largestBytes: 1 << 20 });
      try {
        // 3 slots of 2 MiB do not fit in 5 MiB; 2 do. The session believes 8 GiB are free.
        const proc = Bun.spawn([process.execPath, join(import.meta.dir, "../helpers/small-shm-update.ts"), tc.dir.path, String(2 << 20)], {
          env: { ...process.env, CE_SHM_DIR: smallShm.dir! },
          stdout: "pipe",
          stderr: "pipe",
        });
        const [out, err, code] = await within(60_000, "the small-shm update", Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text(), proc.exited]));
        expect({ code, err: code === 0 ? "" : err }).toEqual({ code: 0, err: "" });
        const s = JSON.parse(out) as { slots: number; buckets: number; tensors: number; fallbacks: string[] };
        expect(s.buckets).toBeGreaterThan(2);
        expect(s.slots).toBe(2);
        expect(s.tensors).toBe(tc.tensors);
        expect(s.fallbacks.join("\n")).toContain("retrying with 2 slots");
      } finally {
        await tc.dir.cleanup();
      }
    },
    90_000,
  );
});
