// Protocol 2's kept mapping (the warm path) on the CPU backend: a worker keeps its mapping of ce's
// buffer while ce keeps the buffer, so a warm update re-maps nothing. What a worker maps is read
// from /proc/<pid>/maps of the real worker process; every update is verified byte for byte by the
// workers, so a kept mapping that showed stale bytes would fail it.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { existsSync, readFileSync, writeFileSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { config } from "../../src/base/config";
import { Ctx } from "../../src/native/ce";
import { type Registration, register, unregister } from "../../src/checkpoint/registry";
import { type Updater, openUpdater } from "../../src/app/updater";
import { resolveDevices } from "../../src/core/devices";
import { type UpdateSummary, UpdateSession } from "../../src/core/update";
import type { WorkersEngine } from "../../src/engines/workers";
import { ZmqContext } from "../../src/transport/zmq";
import { PROTOCOL_VERSION } from "../../src/wire/protocol";
import { expectCeError } from "../helpers/ckpt";
import { PYTHON_PACKAGE_DIR, findPython } from "../helpers/python";
import { CLI, ScriptedEngine, type TestCheckpoint, cpuUpdater, peerLog, shmBuffersOf, smallCheckpoint, within } from "../helpers/update";

const UPDATE_MS = 60_000;
const TEST_MS = 180_000;
const py = findPython();

let ck: TestCheckpoint;
beforeAll(async () => {
  ck = await smallCheckpoint({ files: 2, tensorsPerFile: 40, seed: 13 });
});
afterAll(async () => {
  await ck?.dir.cleanup();
});

/** The mappings of this process's ce buffers (ce-<pid>-…) in process pid: file name → address range. */
function ceMappings(pid: number): Map<string, string> {
  const out = new Map<string, string>();
  const prefix = `ce-${process.pid}-`;
  for (const line of readFileSync(`/proc/${pid}/maps`, "utf8").split("\n")) {
    const parts = line.trim().split(/\s+/);
    if (parts.length < 6) continue;
    const name = parts.slice(5).join(" ").replace(/ \(deleted\)$/, "").split("/").at(-1)!;
    if (name.startsWith(prefix)) out.set(name, parts[0]!);
  }
  return out;
}

function update(session: UpdateSession, reg: Registration, opts: { bucketBytes?: number; slots?: number } = {}): Promise<UpdateSummary> {
  return within(UPDATE_MS, "update", session.update({ reg, timeoutMs: UPDATE_MS, ...opts }));
}

/** Each device's worker maps exactly its device's buffer file, and nothing else of ce's. */
function expectEachMapsItsBuffer(pids: number[]): Map<string, string>[] {
  const files = shmBuffersOf();
  expect(files).toHaveLength(pids.length);
  return pids.map((pid, d) => {
    const maps = ceMappings(pid);
    const mine = files.find((f) => f.endsWith(`-dev${d}`))!;
    expect([...maps.keys()]).toEqual([mine]);
    return maps;
  });
}

async function withRegistered<T>(up: Updater, t: TestCheckpoint, body: (reg: Registration) => Promise<T>): Promise<T> {
  const reg = await register(up.ctx, t.ckpt, { name: "warm", version: 1 });
  try {
    return await body(reg);
  } finally {
    await unregister(up.ctx, reg);
  }
}

const kinds = [
  ["reference", "ref", true, ""],
  ["Python", "python", py.ok, py.ok ? py.python : `skipped: ${py.reason}`],
] as const;

for (const [label, worker, runs, note] of kinds) {
  describe.skipIf(!runs)(`the warm path with ${label} workers${note ? ` (${note})` : ""}`, () => {
    test(
      "consecutive updates keep each worker's mapping; new bucket sizes replace it, and every update is byte-exact",
      async () => {
        const up = await cpuUpdater(2, { worker, python: worker === "python" ? py.python : undefined });
        try {
          const workers = up.engine as WorkersEngine;
          const pids = [0, 1].map((i) => workers.pid(i)!);
          await withRegistered(up, ck, async (reg) => {
            await update(up.session, reg);
            // After the update (release with keep, finish) the workers still map the buffer ce keeps.
            const first = expectEachMapsItsBuffer(pids);
            await update(up.session, reg);
            await update(up.session, reg);
            // The same mapping, at the same address: nothing was re-opened.
            expect(expectEachMapsItsBuffer(pids)).toEqual(first);

            // Other sizes: a new buffer, the old one freed once both workers had answered its open.
            const small = await update(up.session, reg, { bucketBytes: ck.ckpt.largestTensor.nbytes, slots: 2 });
            expect(small.slots).toBe(2);
            const second = expectEachMapsItsBuffer(pids);
            for (let d = 0; d < 2; d++) expect([...second[d]!.keys()]).not.toEqual([...first[d]!.keys()]);
            expect(up.ctx.stats()).toMatchObject({ bufs: 2, ops: 0 });
            await update(up.session, reg, { bucketBytes: ck.ckpt.largestTensor.nbytes, slots: 2 });
            expect(expectEachMapsItsBuffer(pids)).toEqual(second);
            // The same workers served every update.
            expect([0, 1].map((i) => workers.pid(i))).toEqual(pids);
          });
        } finally {
          await up.session.close();
          await up.close();
        }
        expect(shmBuffersOf()).toEqual([]);
      },
      TEST_MS,
    );

    test(
      "a failed update aborts the workers, which drop the kept mapping, and the next update is byte-exact",
      async () => {
        // An engine that stays up across updates (as vLLM does): its workers outlive a failed update.
        const spawned = new Map<string, ReturnType<typeof Bun.spawn>>();
        let refuse = false;
        using server = Bun.serve({
          hostname: "127.0.0.1",
          port: 0,
          async fetch(req) {
            const body = (await req.json()) as { args: Record<string, string>[] };
            for (const endpoint of Object.values(body.args[0]!)) {
              if (spawned.has(endpoint)) continue;
              const cmd =
                worker === "ref"
                  ? [process.execPath, CLI, "worker", "--endpoint", endpoint, "--device", "cpu"]
                  : [py.python, "-m", "ce_worker", "--endpoint", endpoint, "--device", "cpu"];
              const env = { ...process.env, PYTHONPATH: PYTHON_PACKAGE_DIR };
              spawned.set(endpoint, Bun.spawn(cmd, { stdin: "pipe", stdout: "ignore", stderr: "inherit", env }));
            }
            if (refuse) return new Response("engine says no", { status: 500 });
            return Response.json({ results: Object.keys(body.args[0]!).map((uuid) => ({ state: "finished", device_uuid: uuid })) });
          },
        });
        const up = await within(
          60_000,
          "opening the updater",
          openUpdater({ backend: "cpu", select: { count: 2 }, engine: { kind: "external", endpoint: `http://127.0.0.1:${server.port}/rpc` }, opTimeoutMs: 30_000, verify: true }),
        );
        try {
          await withRegistered(up, ck, async (reg) => {
            await update(up.session, reg);
            await update(up.session, reg);
            const first = [...spawned.values()].map((p) => p.pid);
            expectEachMapsItsBuffer(first);

            refuse = true;
            await expectCeError(() => update(up.session, reg), "E_ENGINE_HTTP", "HTTP 500");
            // The abort reached the first workers, still running: they map nothing of ce's any more.
            expect(first.map((pid) => ceMappings(pid).size)).toEqual([0, 0]);
            expect(shmBuffersOf()).toEqual([]);

            refuse = false;
            await update(up.session, reg);
            await update(up.session, reg);
            const next = [...spawned.values()].slice(2).map((p) => p.pid);
            expectEachMapsItsBuffer(next);
            expect(first.map((pid) => ceMappings(pid).size)).toEqual([0, 0]);
          });
        } finally {
          await up.session.close();
          await up.close();
          for (const p of spawned.values()) p.kill("SIGKILL");
          await Promise.all([...spawned.values()].map((p) => p.exited));
        }
        expect(shmBuffersOf()).toEqual([]);
      },
      TEST_MS,
    );
  });
}

describe("workers of protocol 1 keep working", () => {
  test(
    "scripted peers that know nothing of buffer_id take updates of changing sizes, each in protocol order",
    async () => {
      const logs = await mkdtemp(join(tmpdir(), "ce-test-v1-"));
      const set = resolveDevices("cpu", { count: 2 });
      const ctx = Ctx.create("cpu", [0, 1]);
      const engine = new ScriptedEngine(
        set.devices.map((d) => d.uuid),
        (d) => ({ kind: "peer", log: join(logs, `peer-${d}.log`) }),
      );
      const session = new UpdateSession({ ctx, devices: set.devices, engine, opTimeoutMs: 30_000 });
      engine.start(session.endpoints);
      try {
        const reg = await register(ctx, ck.ckpt, { name: "warm", version: 1 });
        try {
          const a = await update(session, reg);
          const b = await update(session, reg, { bucketBytes: ck.ckpt.largestTensor.nbytes, slots: 2 });
          const c = await update(session, reg);
          const session1 = (s: UpdateSummary) => [{ op: "open" }, ...[...Array(s.buckets).keys()].map((bucket) => ({ op: "load", bucket })), { op: "release" }, { op: "finish" }];
          for (let d = 0; d < 2; d++) expect(peerLog(join(logs, `peer-${d}.log`))).toEqual([...session1(a), ...session1(b), ...session1(c)]);
          expect(ctx.stats()).toMatchObject({ bufs: 2, ops: 0 });
          expect(shmBuffersOf()).toHaveLength(2);
        } finally {
          await unregister(ctx, reg);
        }
      } finally {
        await session.close();
        ctx.close();
        await rm(logs, { recursive: true, force: true });
      }
      expect(shmBuffersOf()).toEqual([]);
    },
    TEST_MS,
  );
});

// worker-protocol.json's "mappings", against a real `ce worker` process: this test is ce (a bound
// REQ socket, one buffer file per letter); /proc/<pid>/maps says what the worker maps.
describe("the reference worker follows the definition's mapping cases", () => {
  const definition = JSON.parse(readFileSync(join(import.meta.dir, "../../src/wire/worker-protocol.json"), "utf8")) as {
    mappings: { case: string; steps: { op: string; buffer?: string; id?: boolean; kept?: boolean; keep?: boolean; mapped?: string | null }[] }[];
  };
  const BYTES = 8192;

  test.each(definition.mappings.map((c) => [c.case, c] as const))(
    "%s",
    async (_name, c) => {
      const dir = await mkdtemp(join(config.CE_SHM_DIR!, "ce-test-mappings-"));
      const zmq = new ZmqContext();
      const req = zmq.socket("REQ");
      const endpoint = req.bind(`ipc://@ce-test-mappings-${process.pid}-${Math.random().toString(36).slice(2)}`);
      const proc = Bun.spawn([process.execPath, CLI, "worker", "--endpoint", endpoint, "--device", "cpu"], { stdin: "pipe", stdout: "ignore", stderr: "inherit" });
      const enc = new TextEncoder();
      const ask = async (frame: object) => JSON.parse(new TextDecoder().decode((await req.request([enc.encode(JSON.stringify(frame))], { timeoutMs: 30_000, what: "reply" }))[0]!));
      const files = new Map<string, string>();
      const fileOf = (letter: string) => {
        if (!files.has(letter)) {
          const path = join(dir, `buf-${letter}`);
          writeFileSync(path, new Uint8Array(BYTES));
          files.set(letter, path);
        }
        return files.get(letter)!;
      };
      const mapped = () => {
        const maps = readFileSync(`/proc/${proc.pid}/maps`, "utf8");
        return [...files].filter(([, path]) => maps.includes(path)).map(([letter]) => letter);
      };
      try {
        for (const [i, step] of c.steps.entries()) {
          const where = `step ${i} (${step.op})`;
          if (step.op === "open") {
            const path = fileOf(step.buffer!);
            const frame = {
              op: "open",
              protocol: PROTOCOL_VERSION,
              checkpoint: "m",
              version: i,
              device_uuid: "CPU-t-0",
              backend: "cpu",
              buffer_bytes: BYTES,
              slots: 2,
              slot_bytes: BYTES / 2,
              path,
              ...(step.id === false ? {} : { buffer_id: `${process.pid}-${step.buffer}` }),
            };
            const reply = await ask(frame);
            // Beyond these the reply may say what the worker holds (checkpoint, version).
            if (step.id === false) expect({ where, reply }).toMatchObject({ where, reply: { ok: true } });
            else expect({ where, reply }).toMatchObject({ where, reply: { ok: true, protocol: PROTOCOL_VERSION, buffer_id: frame.buffer_id, kept: step.kept } });
          } else if (step.op === "load") {
            const reply = await ask({ op: "load", bucket: 0, slot: 0, tensors: [{ name: "w", dtype: "U8", shape: [16], offset: 0, nbytes: 16 }] });
            expect({ where, reply }).toEqual({ where, reply: { ok: true } });
          } else {
            const reply = await ask({ op: step.op, ...(step.keep !== undefined ? { keep: step.keep } : {}) });
            expect({ where, ok: reply.ok }).toEqual({ where, ok: true });
          }
          if (step.mapped !== undefined) expect({ where, mapped: mapped() }).toEqual({ where, mapped: step.mapped === null ? [] : [step.mapped] });
        }
      } finally {
        proc.stdin.end();
        proc.kill("SIGKILL");
        await proc.exited;
        req.close();
        zmq.close();
        await rm(dir, { recursive: true, force: true });
      }
      expect(existsSync(dir)).toBe(false);
    },
    60_000,
  );
});
