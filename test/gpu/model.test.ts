// A real torch model in an engine process of its own (python/tests/model_server.py: a small
// Qwen3 from transformers, or a plain-torch model where transformers is missing) is updated in
// place by `ce update --engine external` from a safetensors checkpoint in /dev/shm, through
// ce_worker's vLLM extension. Afterwards its state dict is the checkpoint's bytes and its logits
// are those of the same model loaded straight from the file. On a GPU this is the CUDA IPC path.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { join } from "node:path";
import { config } from "../../src/base/config";
import { gpu } from "../helpers/gpu";
import {
  type Logits,
  type Mem,
  type ModelKind,
  ModelServer,
  type Variant,
  ceUpdate,
  checkpointSha,
  expectSameLogits,
  probeModel,
  referenceLogits,
  runToEnd,
  writeModelCheckpoint,
} from "../helpers/model";
import { CLI } from "../helpers/update";

const TRAINER = join(import.meta.dir, "../helpers/pool-trainer.py");
const ceCommand = () => (existsSync(join(import.meta.dir, "../../dist/ce")) ? [join(import.meta.dir, "../../dist/ce")] : [process.execPath, CLI]);
import { findPython } from "../helpers/python";

const py = findPython();
const MiB = 1024 ** 2;
// Device memory the driver may show as used after many updates beyond what it showed after the
// first: ce's buffers are freed when each ce exits, so anything near a bucket's size is a leak.
const DRIVER_SLACK_BYTES = 16 * MiB;

interface Case {
  device: "cuda" | "cpu";
  kind: ModelKind;
  /** Consecutive updates into one engine: 50 on a GPU, fewer on the CPU backend to keep CI short. */
  updates: number;
  /** Small enough that the model travels in several buckets (the fault cases need two). */
  bucketSize: string;
}

const CASES: Case[] = [
  { device: "cuda", kind: "qwen3", updates: 50, bucketSize: "1MiB" },
  { device: "cpu", kind: "qwen3", updates: 5, bucketSize: "1MiB" },
  { device: "cpu", kind: "tiny", updates: 5, bucketSize: "48KiB" },
];

const probes = new Map<ModelKind, { ok: boolean; reason: string }>();
function skipReason(c: Case): string | undefined {
  if (!py.ok) return py.reason;
  if (c.device === "cuda" && !gpu.ok) return gpu.reason;
  if (!probes.has(c.kind)) probes.set(c.kind, probeModel(py.python, c.kind));
  const probe = probes.get(c.kind)!;
  return probe.ok ? undefined : probe.reason;
}

const VARIANTS: { variant: Variant; seed: number; says: (RegExp | string)[] }[] = [
  { variant: "unknown-name", seed: 3, says: ["KeyError", "model.layers.0.mlp.extra_proj.weight"] },
  { variant: "wrong-shape", seed: 4, says: ["model.layers.1.mlp.down_proj.weight", /checkpoint shape \[\d+, \d+\] does not fit the model's \[\d+, \d+\]/] },
];

for (const c of CASES) {
  const skip = skipReason(c);
  const title = `${c.kind} model on ${c.device} (${skip ? `skipped: ${skip}` : `${py.python}: ${probes.get(c.kind)!.reason}`})`;
  describe.skipIf(skip !== undefined)(title, () => {
    const device = c.device === "cuda" ? "cuda:0" : "cpu";
    let dir: string;
    let server: ModelServer;
    const ckpt = { a: "", b: "", "unknown-name": "", "wrong-shape": "" };
    const sha: Record<"a" | "b", Record<string, string>> = { a: {}, b: {} };
    const ref: Record<"a" | "b", Logits> = {} as Record<"a" | "b", Logits>;
    let before: { state: Record<string, string>; logits: Logits };

    const update = (checkpoint: string, version: number, endpoint = server.rpcUrl) =>
      ceUpdate({ checkpoint, endpoint, device: c.device, version, bucketSize: c.bucketSize });
    const expectOk = (r: Awaited<ReturnType<typeof update>>, on: ModelServer = server) => {
      if (r.code !== 0 || !r.json.ok) throw new Error(`ce update failed (exit ${r.code}): ${JSON.stringify(r.json.error)}\n${r.stderr}\nengine log:\n${on.logTail()}`);
    };
    const expectFailure = (r: Awaited<ReturnType<typeof update>>, code: string, says: (RegExp | string)[]) => {
      expect({ exit: r.code, ok: r.json.ok, code: r.json.error?.code }).toEqual({ exit: 1, ok: false, code });
      for (const s of says) expect(r.json.error!.message).toMatch(s);
    };

    beforeAll(async () => {
      dir = mkdtempSync(join(config.CE_SHM_DIR, "ce-test-model-"));
      const write = (name: keyof typeof ckpt, seed: number, variant?: Variant) =>
        writeModelCheckpoint(py.python, join(dir, name), c.kind, seed, variant).then((d) => (ckpt[name] = d));
      // The engine starts (torch, CUDA, the model) while the checkpoints are written.
      [server] = await Promise.all([
        ModelServer.start({ python: py.python, kind: c.kind, device, dir, name: "engine" }),
        write("a", 1),
        write("b", 2),
        ...VARIANTS.map((v) => write(v.variant, v.seed, v.variant)),
      ]);
      sha.a = checkpointSha(join(ckpt.a, "model.safetensors"));
      sha.b = checkpointSha(join(ckpt.b, "model.safetensors"));
      [ref.a, ref.b] = await Promise.all([referenceLogits(py.python, ckpt.a, c.kind, device), referenceLogits(py.python, ckpt.b, c.kind, device)]);
      before = { state: await server.stateSha(), logits: await server.logits() };
    }, 400_000);

    afterAll(async () => {
      await server?.stop();
      if (dir) rmSync(dir, { recursive: true, force: true });
    });

    test("before any update every weight of the engine's model differs from the checkpoint's", () => {
      expect(Object.keys(before.state).sort()).toEqual(Object.keys(sha.a).sort());
      const same = Object.keys(sha.a).filter((n) => before.state[n] === sha.a[n]);
      expect(same).toEqual([]);
      expect(before.logits.sha256).not.toBe(ref.a.sha256);
      expect(ref.a.sha256).not.toBe(ref.b.sha256);
    });

    test("an update from /dev/shm makes the state dict equal the checkpoint bit for bit", async () => {
      const r = await update(ckpt.a, 1);
      expectOk(r);
      expect(r.json).toMatchObject({ ok: true, backend: c.device, tensors: Object.keys(sha.a).length, inPlace: true });
      expect(r.json.buckets as number).toBeGreaterThan(2);
      expect(await server.stateSha()).toEqual(sha.a);
      // One RPC, one finished session, vLLM's post-load processing once.
      expect(await server.info()).toMatchObject({ rpcs: 1, rpc_errors: 0, updates: 1, post_loads: 1 });
    }, 120_000);

    test("the updated model's logits equal those of the model loaded straight from the checkpoint", async () => {
      expectSameLogits(await server.logits(), ref.a, "after the update");
    }, 60_000);

    test("a load_weights failure in bucket 2 fails the update naming the worker and the bucket; the same engine takes the next one", async () => {
      const faulty = await ModelServer.start({ python: py.python, kind: c.kind, device, dir, name: "faulty", failOnBucket: 1 });
      try {
        const uuid = (await faulty.info()).uuid;
        const r = await update(ckpt.a, 1, faulty.rpcUrl);
        const who = `worker on [^(]*\\(${uuid}\\) failed bucket 2/\\d+`;
        expectFailure(r, "E_WORKER", [new RegExp(who), "RuntimeError: injected failure in bucket 1"]);
        // The worker dropped ce's buffer and the engine kept serving.
        expect((await faulty.mem()).ce_maps).toBe(0);
        expect(await faulty.info()).toMatchObject({ rpcs: 1, updates: 0, post_loads: 0 });
        const next = await update(ckpt.b, 2, faulty.rpcUrl);
        expectOk(next, faulty);
        expect(await faulty.stateSha()).toEqual(sha.b);
        expectSameLogits(await faulty.logits(), ref.b, "after the failed update and the next one");
      } finally {
        await faulty.stop();
      }
    }, 300_000);

    for (const v of VARIANTS) {
      test(`a checkpoint with ${v.variant === "unknown-name" ? "a tensor the model lacks" : "a tensor of another shape"} fails naming the tensor; the engine keeps serving`, async () => {
        expectFailure(await update(ckpt[v.variant], 10), "E_WORKER", v.says);
        const r = await update(ckpt.a, 11);
        expectOk(r);
        expect(await server.stateSha()).toEqual(sha.a);
      }, 120_000);
    }

    test("an engine that is not listening fails the update naming its URL", async () => {
      const url = "http://127.0.0.1:1/collective_rpc"; // port 1: nothing listens there
      expectFailure(await update(ckpt.a, 20, url), "E_ENGINE_HTTP", [url]);
    }, 120_000);

    test.skipIf(c.device !== "cuda")("ce on the CPU backend against a GPU engine: the engine's answer names the GPU it has no endpoint for", async () => {
      const r = await ceUpdate({ checkpoint: ckpt.a, endpoint: server.rpcUrl, device: "cpu", version: 21, bucketSize: c.bucketSize });
      expectFailure(r, "E_WORKER", [/no endpoint for this worker's GPU GPU-[0-9a-f-]+ \(got CPU-/]);
    }, 120_000);

    test(
      `${c.updates} consecutive updates alternating two checkpoints each land bit for bit, and memory comes back to where the first left it`,
      async () => {
        const start = await server.info();
        let first: Mem | undefined;
        const walls: number[] = [];
        for (let v = 1; v <= c.updates; v++) {
          const which = v % 2 === 1 ? "a" : "b";
          const r = await update(ckpt[which], 100 + v);
          expectOk(r);
          walls.push(r.wallSeconds);
          const state = await server.stateSha();
          if (JSON.stringify(state) !== JSON.stringify(sha[which])) expect({ update: v, state }).toEqual({ update: v, state: sha[which] });
          if (v === 1) first = await server.mem();
        }
        const last = await server.mem();
        expectSameLogits(await server.logits(), ref[c.updates % 2 === 1 ? "a" : "b"], `after ${c.updates} updates`);
        expect(await server.info()).toMatchObject({ updates: start.updates + c.updates, post_loads: start.post_loads + c.updates, rpc_errors: start.rpc_errors });
        walls.sort((x, y) => x - y);
        console.info(
          `${c.kind} on ${c.device}: ${c.updates} updates, ce wall time median ${walls[walls.length >> 1]!.toFixed(3)} s, max ${walls.at(-1)!.toFixed(3)} s; ` +
            `memory after the first ${JSON.stringify(first)}, after the last ${JSON.stringify(last)}`,
        );
        // The warm path keeps the last update's buffer mapped (protocol 2), and never more than it.
        expect(last.ce_maps).toBeLessThanOrEqual(1);
        expect(last.ce_maps).toBe(first!.ce_maps);
        expect(last.fds).toBeLessThanOrEqual(first!.fds);
        if (c.device === "cuda") {
          expect({ allocated: last.allocated, reserved: last.reserved }).toEqual({ allocated: first!.allocated, reserved: first!.reserved });
          const grew = last.total! - last.free! - (first!.total! - first!.free!);
          expect(grew).toBeLessThanOrEqual(DRIVER_SLACK_BYTES);
        }
      },
      600_000,
    );

    test("a trainer's state dict on its device, pushed into a pool of ce serve, updates the engine bit for bit; rollback puts the previous version back", async () => {
      const socket = join(dir, "serve.sock");
      const serve = Bun.spawn(
        [...ceCommand(), "serve", "--socket", socket, "--engine", "external", "--endpoint", server.rpcUrl, "--device", c.device, "--devices", "1", "--bucket-size", c.bucketSize, "--json"],
        { stdin: "ignore", stdout: "pipe", stderr: "pipe", env: { ...process.env, CE_OP_TIMEOUT: "30s" } },
      );
      try {
        const reader = serve.stdout.getReader();
        await reader.read(); // the listening line
        reader.releaseLock();
        const push = async (seed: number, version: number, create: boolean) => {
          const cmd = [py.python, TRAINER, "--socket", socket, "--pool", "policy", "--seed", String(seed), "--version", String(version), "--device", device, ...(c.kind === "tiny" ? ["--tiny"] : []), ...(create ? ["--create"] : [])];
          const r = await runToEnd(cmd, `pushing version ${version}`, 180_000);
          if (r.code !== 0) throw new Error(`the trainer failed (exit ${r.code}): ${r.stderr}\nengine log:\n${server.logTail()}`);
          return JSON.parse(r.stdout.trim().split("\n").at(-1)!) as { update: { version: number; tensors: number; verified: number | null } };
        };
        // checkpoint b is the model under seed 2, a under seed 1
        const first = await push(2, 1, true);
        expect(first.update).toMatchObject({ version: 1, tensors: Object.keys(sha.b).length, verified: Object.keys(sha.b).length });
        expect(await server.stateSha()).toEqual(sha.b);
        expectSameLogits(await server.logits(), ref.b, "after the push of version 1");
        await push(1, 2, false);
        expect(await server.stateSha()).toEqual(sha.a);
        const rb = await fetch("http://ce/v1/pools/policy/rollback", { method: "POST", unix: socket } as RequestInit);
        expect(((await rb.json()) as { to: number }).to).toBe(1);
        expect(await server.stateSha()).toEqual(sha.b);
        expectSameLogits(await server.logits(), ref.b, "after the rollback");
      } finally {
        serve.kill("SIGTERM");
        await serve.exited;
      }
    }, 600_000);

    test("a chain of delta updates (1% of the values of most tensors each) ends bit-equal to the last version; its logits equal a direct load of it", async () => {
      const socket = join(dir, "serve-delta.sock");
      const last = join(dir, "chain-last");
      const chain = c.device === "cuda" ? 20 : 6;
      const serve = Bun.spawn(
        [...ceCommand(), "serve", "--socket", socket, "--engine", "external", "--endpoint", server.rpcUrl, "--device", c.device, "--devices", "1", "--bucket-size", c.bucketSize, "--delta", "--json"],
        { stdin: "ignore", stdout: "pipe", stderr: "pipe", env: { ...process.env, CE_OP_TIMEOUT: "30s" } },
      );
      try {
        const reader = serve.stdout.getReader();
        await reader.read(); // the listening line
        reader.releaseLock();
        const cmd = [py.python, TRAINER, "--socket", socket, "--pool", "chain", "--seed", "5", "--version", "1", "--device", device, "--create", "--chain", String(chain), "--fraction", "0.01", "--write-last", last, ...(c.kind === "tiny" ? ["--tiny"] : [])];
        const r = await runToEnd(cmd, "the delta chain", 300_000);
        if (r.code !== 0) throw new Error(`the trainer failed (exit ${r.code}): ${r.stderr}\nengine log:\n${server.logTail()}`);
        const replies = r.stdout.trim().split("\n").map((l) => JSON.parse(l) as { version?: number; delta?: { bytes: number; fullBytes: number; sparse: number }; verified?: number | null });
        expect(replies).toHaveLength(chain + 1);
        const deltas = replies.slice(1);
        for (const [k, u] of deltas.entries()) {
          expect({ version: u.version, delta: u.delta !== undefined }).toEqual({ version: k + 2, delta: true });
          expect(u.delta!.bytes).toBeLessThan(u.delta!.fullBytes / 5);
          expect(u.delta!.sparse).toBeGreaterThan(0);
        }
        const want = checkpointSha(join(last, "model.safetensors"));
        expect(await server.stateSha()).toEqual(want);
        expectSameLogits(await server.logits(), await referenceLogits(py.python, last, c.kind, device), "after the delta chain");
      } finally {
        serve.kill("SIGTERM");
        await serve.exited;
      }
    }, 600_000);
  });
}
