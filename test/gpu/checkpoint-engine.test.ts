// The reference system's real worker loop (checkpoint_engine.worker.update_weights_from_ipc, from a
// copy of its repository named by CE_REFERENCE_WORKER_DIR) inside a torch process, updated by ce over
// the checkpoint-engine dialect from a real CUDA IPC buffer, byte-exact. On two GPUs the worker sees
// ce's GPU 1 as its device 0 (CUDA_VISIBLE_DEVICES), as an engine's process often does: the reference
// worker puts its own index into the handle, whatever ce's is.
//
// This drives the dialect over one REQ socket itself; once core/channel.ts runs updates with
// --protocol checkpoint-engine, the same check belongs on `ce update` and beside ce's own protocol
// in the benchmark.
import { randomBytes } from "../helpers/ckpt";
import { describe, expect, test } from "bun:test";
import { createHash } from "node:crypto";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { type Buf, Ctx, cudaDeviceInfo } from "../../src/native/ce";
import { defaultContext } from "../../src/transport/zmq";
import { checkpointEngineDialect as dialect } from "../../src/wire/checkpoint-engine";
import type { SlotTensor, Step, StepReply } from "../../src/wire/dialect";
import { HELPERS_DIR, PYTHON_DEADLINE_MS, torchPython } from "../helpers/ce-reference";
import { gpu } from "../helpers/gpu";

const RUNNER = join(HELPERS_DIR, "ce-reference-gpu.py");
const MiB = 1024 ** 2;
const SLOT_BYTES = 64 * MiB;
const SLOTS = 2;
const ALIGN = 256;
const REPLY_TIMEOUT_MS = 120_000;

function skipReason(): string | undefined {
  if (!gpu.ok) return gpu.reason;
  const dir = process.env.CE_REFERENCE_WORKER_DIR;
  if (!dir) return "CE_REFERENCE_WORKER_DIR is not set (a checkout of MoonshotAI/checkpoint-engine, outside this repository)";
  if (!existsSync(join(dir, "checkpoint_engine", "worker.py"))) return `CE_REFERENCE_WORKER_DIR=${dir} has no checkpoint_engine/worker.py`;
  const py = torchPython();
  if (!py.ok) return py.reason;
  const r = Bun.spawnSync([py.python, RUNNER, "--probe"], { stdout: "pipe", stderr: "pipe", timeout: PYTHON_DEADLINE_MS });
  if (r.exitCode !== 0) return `the reference worker does not load in ${py.python}: ${r.stderr.toString().trim().split("\n").at(-1)}`;
  return undefined;
}

const why = skipReason();


interface Layout {
  buckets: SlotTensor[][];
  /** where each tensor's bytes sit in the host region */
  regionOffset: Map<string, number>;
  data: Uint8Array;
}

/** Tensors of a small model's kinds, packed into buckets of one slot each, 256-byte aligned. */
function layout(): Layout {
  const specs: [string, string, number[], number][] = [];
  for (let l = 0; l < 6; l++) {
    specs.push([`model.layers.${l}.self_attn.qkv_proj.weight`, "BF16", [3072, 1024], 2]);
    specs.push([`model.layers.${l}.mlp.down_proj.weight`, "BF16", [1024, 4096], 2]);
    specs.push([`model.layers.${l}.input_layernorm.weight`, "F32", [1024], 4]);
  }
  specs.push(["model.norm.weight", "BF16", [1024], 2], ["lm_head.weight", "BF16", [8192, 1024], 2]);
  const buckets: SlotTensor[][] = [];
  const regionOffset = new Map<string, number>();
  let used = SLOT_BYTES;
  let total = 0;
  for (const [name, dtype, shape, size] of specs) {
    const nbytes = shape.reduce((a, b) => a * b, 1) * size;
    if (used + nbytes > SLOT_BYTES) {
      buckets.push([]);
      used = 0;
    }
    const slot = (buckets.length - 1) % SLOTS;
    buckets.at(-1)!.push({ name, dtype, shape, offset: slot * SLOT_BYTES + used, nbytes });
    used += Math.ceil(nbytes / ALIGN) * ALIGN;
    regionOffset.set(name, total);
    total += nbytes;
  }
  return { buckets, regionOffset, data: randomBytes(total, 0x9e3779b9) };
}

const TORCH_NAMES: Record<string, string> = { BF16: "torch.bfloat16", F32: "torch.float32" };

async function updateThroughReferenceWorker(ordinal: number, workerEnv: Record<string, string>, workerDeviceId: number): Promise<void> {
  const { buckets, regionOffset, data } = layout();
  using ctx = Ctx.create("cuda", [ordinal]);
  const alloc = ctx.regionAlloc(data.length);
  await ctx.wait(alloc.op, { timeoutMs: 60_000, what: "allocating pinned memory" });
  ctx.regionWrite(alloc.region, 0, data);
  const buf: Buf = ctx.bufAlloc(0, SLOTS * SLOT_BYTES, { ipc: true });

  const sock = defaultContext().socket("REQ");
  const endpoint = sock.bind(`ipc://@ce-test-${process.pid}-ckpt-engine-gpu-${ordinal}`);
  const py = torchPython();
  const proc = Bun.spawn([py.python, RUNNER, endpoint, String(workerDeviceId)], {
    env: { ...process.env, ...workerEnv },
    stdin: "ignore",
    stdout: "pipe",
    stderr: "pipe",
  });
  const ask = async (step: Step, frames: Uint8Array[]): Promise<StepReply> => {
    const r = dialect.reply(await sock.request(frames, { timeoutMs: REPLY_TIMEOUT_MS, what: `reply to ${step} from the reference worker` }), step);
    if (!r.ok) throw new Error(`reference worker failed ${step}: ${String(r.extra.traceback ?? r.error)}`);
    return r;
  };
  try {
    await ask(
      "open",
      dialect.open({
        checkpoint: "synthetic",
        version: 1,
        backend: "cuda",
        deviceUuid: cudaDeviceInfo(ordinal).uuid,
        deviceOrdinal: ordinal,
        bufferBytes: buf.bytes,
        slots: SLOTS,
        slotBytes: SLOT_BYTES,
        path: "",
        handle: buf.ipcHandle(),
        files: [],
        buckets: buckets.length,
        tensors: regionOffset.size,
        bytes: data.length,
      }),
    );
    for (const [i, bucket] of buckets.entries()) {
      const copies = bucket.flatMap((t) => [BigInt(alloc.region), BigInt(regionOffset.get(t.name)!), BigInt(t.offset), BigInt(t.nbytes)]);
      await ctx.wait(ctx.h2d(buf, BigUint64Array.from(copies)), { timeoutMs: 60_000, what: `H2D of bucket ${i}` });
      await ask("load", dialect.load({ bucket: i, slot: i % SLOTS, tensors: bucket }));
    }
    await ask("release", dialect.release());
    await ask("finish", dialect.finish());
  } finally {
    sock.close();
  }
  const exited = await Promise.race([proc.exited, Bun.sleep(REPLY_TIMEOUT_MS).then(() => "hung" as const)]);
  if (exited === "hung") proc.kill();
  const [out, err] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text()]);
  expect({ exited, err: exited === 0 ? "" : err }).toEqual({ exited: 0, err: "" });
  const events = out
    .split("\n")
    .filter((l) => l.trim())
    .map((l) => JSON.parse(l) as { event: string; tensors?: unknown });
  expect(events.map((e) => e.event)).toEqual([...buckets.map(() => "load"), "post_hook", "done"]);
  const hash = (name: string, nbytes: number) => {
    const at = regionOffset.get(name)!;
    return createHash("sha256").update(data.subarray(at, at + nbytes)).digest("hex");
  };
  expect(events.filter((e) => e.event === "load").map((e) => e.tensors)).toEqual(
    buckets.map((b) => b.map((t) => ({ name: t.name, dtype: TORCH_NAMES[t.dtype], shape: t.shape, sha256: hash(t.name, t.nbytes) }))),
  );
  await ctx.wait(ctx.regionRelease(alloc.region), { timeoutMs: 60_000, what: "releasing pinned memory" });
}

describe.skipIf(why !== undefined)(`reference worker loop on a GPU (${why === undefined ? "CE_REFERENCE_WORKER_DIR" : `skipped: ${why}`})`, () => {
  test(
    "the reference worker loads every tensor byte-exact from ce's IPC buffer on one GPU",
    () => updateThroughReferenceWorker(0, {}, 0),
    REPLY_TIMEOUT_MS * 3,
  );

  test.skipIf(gpu.count < 2)(
    `on ce's GPU 1, seen by the worker as its device 0, the worker's own index wins${gpu.count < 2 ? ` (skipped: needs 2 GPUs, found ${gpu.count})` : ""}`,
    () => updateThroughReferenceWorker(1, { CUDA_VISIBLE_DEVICES: "1" }, 0),
    REPLY_TIMEOUT_MS * 3,
  );
});
