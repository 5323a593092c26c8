// The checkpoint-engine dialect end to end without a GPU: ce's REQ socket drives a Python stand-in of
// the reference worker loop (test/helpers/ce-reference-standin.py) over real ZeroMQ, and the worker is
// started the way SGLang starts it, by POST /update_weights_from_ipc to a stand-in SGLang server that
// runs the worker for each device of zmq_handles. The buffer is a shared-memory file that ce fills
// slot by slot, as the IPC buffer is filled on a GPU; the worker's views of it are hashed.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { createHash } from "node:crypto";
import { closeSync, existsSync, mkdtempSync, openSync, rmSync, writeSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Server } from "bun";
import { WorkerError } from "../../src/base/errors";
import { SglangEngine, readSglangReply, sglangBody } from "../../src/engines/sglang";
import { defaultContext, type ZmqSocket } from "../../src/transport/zmq";
import { checkpointEngineDialect as dialect } from "../../src/wire/checkpoint-engine";
import type { OpenInfo, SlotTensor, Step, StepReply } from "../../src/wire/dialect";
import { HELPERS_DIR, PYTHON_DEADLINE_MS, torchPython } from "../helpers/ce-reference";

const STANDIN = join(HELPERS_DIR, "ce-reference-standin.py");
const REPLY_TIMEOUT_MS = 60_000; // the worker imports torch before it answers open
const SLOT_BYTES = 8192;
const SLOTS = 2;
const ALIGN = 256;
const DEVICE_ORDINAL = 3; // ce's index; the worker puts its own (0) in its place

interface Event {
  event: string;
  [k: string]: unknown;
}

const py = torchPython();
const dir = mkdtempSync(join(existsSync("/dev/shm") ? "/dev/shm" : tmpdir(), "ce-ckpt-engine-"));
let n = 0;

// ---- the stand-in SGLang server: runs one worker per zmq_handles entry, answers as SGLang does ----

interface WorkerRun {
  events: Event[];
  stderr: string;
  code: number | null;
}
interface StandinConfig {
  bufferFile: string;
  extraArgs: string[];
}
let standin: StandinConfig = { bufferFile: "", extraArgs: [] };
const bodies: unknown[] = [];
const runs: WorkerRun[] = [];

async function runWorker(endpoint: string): Promise<WorkerRun> {
  const proc = Bun.spawn([py.python, STANDIN, endpoint, standin.bufferFile, "0", ...standin.extraArgs], {
    stdin: "ignore",
    stdout: "pipe",
    stderr: "pipe",
    timeout: PYTHON_DEADLINE_MS * 2,
  });
  const [out, stderr, code] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text(), proc.exited]);
  const events = out
    .split("\n")
    .filter((l) => l.trim())
    .map((l) => JSON.parse(l) as Event);
  const run = { events, stderr, code };
  runs.push(run);
  return run;
}

let server: Server<undefined> | undefined;
beforeAll(() => {
  server = Bun.serve({
    hostname: "127.0.0.1",
    port: 0,
    async fetch(req) {
      if (new URL(req.url).pathname !== "/update_weights_from_ipc") return new Response("Not Found", { status: 404 });
      const body = (await req.json()) as { zmq_handles: Record<string, string> };
      bodies.push(body);
      const done = await Promise.all(Object.values(body.zmq_handles).map(runWorker));
      const failed = done.find((r) => r.code !== 0);
      if (!failed) return Response.json({ success: true, message: "IPC weight update completed successfully" });
      const raised = failed.events.find((e) => e.event === "raised");
      return Response.json({ success: false, message: String(raised?.error ?? failed.stderr.slice(-500)) }, { status: 400 });
    },
  });
});
afterAll(() => {
  server?.stop(true);
  rmSync(dir, { recursive: true, force: true });
});

// ---- ce's side, as core/channel.ts will drive it: one REQ socket, one step at a time ----

function layout(): { tensors: SlotTensor[][]; bytes: Map<string, Uint8Array> } {
  // Every kind of meta the reference worker reads: several dtypes, a scalar, a 3-d shape, and buckets
  // that take turns in the two slots so that offsets count from the start of the whole buffer.
  const specs: [string, string, number[], number][] = [
    ["model.embed_tokens.weight", "BF16", [16, 64], 2],
    ["model.layers.0.input_layernorm.weight", "F32", [64], 4],
    ["model.layers.0.mlp.gate_proj.weight", "F16", [8, 4, 33], 2],
    ["model.layers.0.scale", "F32", [], 4],
    ["model.layers.0.mask", "BOOL", [3, 5], 1],
    ["model.layers.1.mlp.experts.ids", "I64", [100], 8],
    ["model.layers.1.mlp.up_proj.weight", "BF16", [32, 64], 2],
    ["model.norm.weight", "U8", [255], 1],
    ["lm_head.weight", "BF16", [40, 64], 2],
  ];
  let seed = 0x2545f491;
  const rand = () => ((seed = (Math.imul(seed, 1103515245) + 12345) >>> 0) >>> 16) & 0xff;
  const buckets: SlotTensor[][] = [];
  const bytes = new Map<string, Uint8Array>();
  let used = SLOT_BYTES; // forces a new bucket first
  for (const [name, dtype, shape, size] of specs) {
    const nbytes = shape.reduce((a, b) => a * b, 1) * size;
    if (used + nbytes > SLOT_BYTES) {
      buckets.push([]);
      used = 0;
    }
    const slot = (buckets.length - 1) % SLOTS;
    buckets.at(-1)!.push({ name, dtype, shape, offset: slot * SLOT_BYTES + used, nbytes });
    used += Math.ceil(nbytes / ALIGN) * ALIGN;
    const b = new Uint8Array(nbytes).map(rand);
    if (dtype === "BOOL") b.forEach((_, i) => (b[i] = b[i]! & 1));
    bytes.set(name, b);
  }
  return { tensors: buckets, bytes };
}

function openInfo(deviceUuid: string): OpenInfo {
  return {
    checkpoint: "synthetic",
    version: 1,
    backend: "cuda", // the stand-in maps the file in place of the handle
    deviceUuid,
    deviceOrdinal: DEVICE_ORDINAL,
    bufferBytes: SLOTS * SLOT_BYTES,
    slots: SLOTS,
    slotBytes: SLOT_BYTES,
    path: "",
    handle: Uint8Array.from({ length: 64 }, (_, i) => i),
    files: [],
    buckets: 0,
    tensors: 0,
    bytes: 0,
  };
}

class Ce {
  readonly sock: ZmqSocket;
  readonly endpoint: string;
  constructor() {
    this.sock = defaultContext().socket("REQ");
    this.endpoint = this.sock.bind(`ipc://@ce-test-${process.pid}-ckpt-engine-${n++}`);
  }
  async ask(step: Step, frames: Uint8Array[]): Promise<StepReply> {
    return dialect.reply(await this.sock.request(frames, { timeoutMs: REPLY_TIMEOUT_MS, what: `reply to ${step}` }), step);
  }
  /** What the channel does on abort with this dialect: send, and wait for nothing. */
  abort(reason: string): Promise<void> {
    expect(dialect.replies("abort")).toBe(false);
    return this.sock.send(dialect.abort(reason), { timeoutMs: 5_000 });
  }
  close(): void {
    this.sock.close();
  }
}

function writeSlot(file: string, bucket: SlotTensor[], bytes: Map<string, Uint8Array>): void {
  const fd = openSync(file, "r+");
  try {
    for (const t of bucket) writeSync(fd, bytes.get(t.name)!, 0, t.nbytes, t.offset);
  } finally {
    closeSync(fd);
  }
}

function bufferFile(): string {
  const file = join(dir, `buffer-${n++}`);
  const fd = openSync(file, "w");
  writeSync(fd, new Uint8Array(SLOTS * SLOT_BYTES));
  closeSync(fd);
  return file;
}

const uuid = "GPU-5e1f0000-0000-0000-0000-00000000c0de";
const sglang = (opts = {}) => new SglangEngine(`http://127.0.0.1:${server!.port}`, opts);
const TORCH_NAMES: Record<string, string> = { BF16: "torch.bfloat16", F32: "torch.float32", F16: "torch.float16", BOOL: "torch.bool", I64: "torch.int64", U8: "torch.uint8" };

describe("sglang engine", () => {
  test("the body is SGLang's: zmq_handles, flush_cache (default true), weight_version only when given", () => {
    expect(JSON.parse(sglangBody({ [uuid]: "ipc://@x" }))).toEqual({ zmq_handles: { [uuid]: "ipc://@x" }, flush_cache: true });
    expect(JSON.parse(sglangBody({}, { flushCache: false, weightVersion: "step-7" }))).toEqual({ zmq_handles: {}, flush_cache: false, weight_version: "step-7" });
  });

  test("SGLang's answer: success false fails even with HTTP 200; the message is SGLang's", () => {
    expect(readSglangReply(200, '{"success":true,"message":"ok"}')).toEqual({ ok: true, message: "ok" });
    expect(readSglangReply(200, '{"success":false,"message":"no"}')).toEqual({ ok: false, message: "no" });
    expect(readSglangReply(400, '{"success":false,"message":"KeyError: x"}')).toEqual({ ok: false, message: "KeyError: x" });
    expect(readSglangReply(502, "<html>bad gateway</html>")).toEqual({ ok: false, message: "<html>bad gateway</html>" });
  });

  test("a server without the route is a WorkerError that says so", async () => {
    const engine = new SglangEngine(`http://127.0.0.1:${server!.port}/elsewhere`);
    const err = await engine.trigger({}, 5_000).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(WorkerError);
    expect((err as WorkerError).message).toContain("HTTP 404");
    expect((err as WorkerError).hint).toContain("/update_weights_from_ipc");
  });
});

describe.skipIf(!py.ok || !py.zmq)(
  `checkpoint-engine worker stand-in (${py.ok && py.zmq ? `${py.python}: ${py.reason}` : `skipped: ${py.ok ? `${py.reason}, no pyzmq` : py.reason}`})`,
  () => {
    test(
      "a full update reaches the reference worker loop byte-exact, started through SGLang's route",
      async () => {
        const { tensors, bytes } = layout();
        expect(tensors.length).toBeGreaterThanOrEqual(3); // both slots, and one of them reused
        standin = { bufferFile: bufferFile(), extraArgs: [] };
        runs.length = 0;
        bodies.length = 0;
        const ce = new Ce();
        try {
          const triggered = sglang({ flushCache: false, weightVersion: "step-42" }).trigger({ [uuid]: ce.endpoint }, REPLY_TIMEOUT_MS * 2);
          expect(await ce.ask("open", dialect.open(openInfo(uuid)))).toEqual({ ok: true, extra: {} });
          for (const [i, bucket] of tensors.entries()) {
            writeSlot(standin.bufferFile, bucket, bytes);
            expect(await ce.ask("load", dialect.load({ bucket: i, slot: i % SLOTS, tensors: bucket }))).toEqual({ ok: true, extra: {} });
          }
          expect((await ce.ask("release", dialect.release())).ok).toBe(true);
          expect((await ce.ask("finish", dialect.finish())).ok).toBe(true);
          await triggered;
        } finally {
          ce.close();
        }
        expect(bodies).toEqual([{ zmq_handles: { [uuid]: ce.endpoint }, flush_cache: false, weight_version: "step-42" }]);
        const events = runs[0]!.events;
        expect(events.map((e) => e.event)).toEqual(["open", ...tensors.map(() => "load"), "release", "post_hook", "done"]);
        expect(events[0]).toEqual({ event: "open", bytes: SLOTS * SLOT_BYTES, sent_device: DEVICE_ORDINAL, handle_bytes: 64 });
        const loads = events.filter((e) => e.event === "load").map((e) => e.tensors);
        expect(loads).toEqual(
          tensors.map((bucket) =>
            bucket.map((t) => ({
              name: t.name,
              dtype: TORCH_NAMES[t.dtype],
              shape: t.shape,
              sha256: createHash("sha256").update(bytes.get(t.name)!).digest("hex"),
            })),
          ),
        );
      },
      PYTHON_DEADLINE_MS * 3,
    );

    test(
      "a tensor the engine refuses fails its bucket in the engine's words; the abort gets no reply and the engine reports it",
      async () => {
        const { tensors, bytes } = layout();
        const victim = tensors[1]![0]!.name;
        standin = { bufferFile: bufferFile(), extraArgs: ["--fail-tensor", victim] };
        runs.length = 0;
        const ce = new Ce();
        let refused: StepReply | undefined;
        let engineError: unknown;
        try {
          const triggered = sglang().trigger({ [uuid]: ce.endpoint }, REPLY_TIMEOUT_MS * 2).catch((e: unknown) => (engineError = e));
          expect((await ce.ask("open", dialect.open(openInfo(uuid)))).ok).toBe(true);
          for (const [i, bucket] of tensors.entries()) {
            writeSlot(standin.bufferFile, bucket, bytes);
            const r = await ce.ask("load", dialect.load({ bucket: i, slot: i % SLOTS, tensors: bucket }));
            if (!r.ok) {
              refused = r;
              break;
            }
          }
          await ce.abort("Some workers failed to update weights");
          await triggered;
        } finally {
          ce.close();
        }
        expect(refused?.error).toBe(`KeyError: '${victim}'`);
        expect(String(refused?.extra.traceback)).toContain("Traceback (most recent call last)");
        expect(engineError).toBeInstanceOf(WorkerError);
        expect((engineError as Error).message).toContain("HTTP 400: RuntimeError: Some workers failed to update weights");
        expect(runs[0]!.events.map((e) => e.event)).toEqual(["open", "load", "raised"]);
      },
      PYTHON_DEADLINE_MS * 3,
    );

    test(
      "a worker that cannot map the buffer fails open, and the abort serves as the ack it waits for",
      async () => {
        standin = { bufferFile: join(dir, "no-such-dir", "buffer"), extraArgs: [] };
        runs.length = 0;
        const ce = new Ce();
        let engineError: unknown;
        let reply: StepReply | undefined;
        try {
          const triggered = sglang().trigger({ [uuid]: ce.endpoint }, REPLY_TIMEOUT_MS * 2).catch((e: unknown) => (engineError = e));
          reply = await ce.ask("open", dialect.open(openInfo(uuid)));
          await ce.abort("open failed");
          await triggered;
        } finally {
          ce.close();
        }
        expect(reply?.ok).toBe(false);
        expect(String(reply?.extra.traceback)).toContain("no-such-dir");
        // The worker raises its own error once it has the ack, not the abort's.
        expect((engineError as Error).message).toContain("no-such-dir");
        expect(runs[0]!.events.map((e) => e.event)).toEqual(["raised"]);
      },
      PYTHON_DEADLINE_MS * 3,
    );

    test(
      "a failed post-hook sends no reply: finish fails through SGLang's answer",
      async () => {
        const { tensors, bytes } = layout();
        standin = { bufferFile: bufferFile(), extraArgs: ["--fail-post-hook"] };
        runs.length = 0;
        const ce = new Ce();
        let finishError: unknown;
        try {
          const triggered = sglang().trigger({ [uuid]: ce.endpoint }, REPLY_TIMEOUT_MS * 2);
          triggered.catch(() => undefined);
          expect((await ce.ask("open", dialect.open(openInfo(uuid)))).ok).toBe(true);
          for (const [i, bucket] of tensors.entries()) {
            writeSlot(standin.bufferFile, bucket, bytes);
            expect((await ce.ask("load", dialect.load({ bucket: i, slot: i % SLOTS, tensors: bucket }))).ok).toBe(true);
          }
          expect((await ce.ask("release", dialect.release())).ok).toBe(true);
          // The channel must race finish's reply against the engine's call, as here.
          finishError = await Promise.race([ce.ask("finish", dialect.finish()), triggered]).catch((e: unknown) => e);
        } finally {
          ce.close();
        }
        expect(finishError).toBeInstanceOf(WorkerError);
        expect((finishError as Error).message).toContain("HTTP 400: RuntimeError: the post-hook failed");
      },
      PYTHON_DEADLINE_MS * 3,
    );
  },
);
