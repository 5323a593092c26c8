import { describe, expect, test } from "bun:test";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { CeError } from "../../src/base/errors";
import {
  IPC_HANDLE_BYTES,
  OLDEST_PROTOCOL,
  type OpName,
  PROTOCOL_VERSION,
  type Request,
  type WorkerState,
  encodeReply,
  encodeRequest,
  parseReply,
  parseRequest,
  ceDialect,
  transition,
} from "../../src/wire/protocol";

const enc = new TextEncoder();
const frame = (v: unknown) => enc.encode(typeof v === "string" ? v : JSON.stringify(v));
const handle = Uint8Array.from({ length: IPC_HANDLE_BYTES }, (_, i) => (i * 29 + 3) & 0xff);

const openCpu: Request = {
  op: "open",
  protocol: PROTOCOL_VERSION,
  checkpoint: "Qwen3-0.6B",
  version: 7,
  device_uuid: "CPU-host-0",
  backend: "cpu",
  buffer_bytes: 3 * 4096,
  slots: 3,
  slot_bytes: 4096,
  path: "/dev/shm/ce-1-0-dev0",
  files: ["/models/a.safetensors", "/models/b.safetensors"],
  buckets: 12,
  tensors: 310,
  bytes: 40960,
};
const openCuda: Request = { ...openCpu, backend: "cuda", device_uuid: "GPU-3f2c0000-0000-0000-0000-000000000000", path: "" };
const load: Request = {
  op: "load",
  bucket: 4,
  slot: 1,
  tensors: [
    { name: "model.embed_tokens.weight", dtype: "BF16", shape: [151936, 1024], offset: 4096, nbytes: 311164928 },
    { name: "model.norm.weight", dtype: "F8_E4M3", shape: [], offset: 311165184, nbytes: 1 },
    { name: "empty", dtype: "F32", shape: [0, 3], offset: 311165440, nbytes: 0 },
  ],
};

function expectProtocolError(run: () => unknown, code: string, part: string): void {
  let caught: unknown;
  try {
    run();
  } catch (err) {
    caught = err;
  }
  expect(caught).toBeInstanceOf(CeError);
  expect((caught as CeError).code).toBe(code);
  expect((caught as CeError).message).toContain(part);
}

describe("requests", () => {
  const cases: [string, Request, Uint8Array | undefined][] = [
    ["open on the CPU backend", openCpu, undefined],
    ["open on CUDA, with its IPC handle frame", openCuda, handle],
    ["load", load],
    ["release", { op: "release" }],
    ["release that keeps the mapping", { op: "release", keep: true }],
    ["open naming its buffer (protocol 2)", { ...openCpu, protocol: PROTOCOL_VERSION, buffer_id: "4242-9f3c0a1b-3-dev0" }, undefined],
    ["finish", { op: "finish" }],
    ["abort", { op: "abort", reason: "worker on CPU device 1 failed bucket 3/9" }],
  ].map((c) => [c[0] as string, c[1] as Request, c[2] as Uint8Array | undefined]);

  test.each(cases)("%s survives encode and parse unchanged", (_name, req, ipcHandle) => {
    const frames = encodeRequest(req, ipcHandle);
    expect(frames.length).toBe(ipcHandle ? 2 : 1);
    const parsed = parseRequest(frames);
    expect(parsed.req).toEqual(req);
    if (ipcHandle) expect([...parsed.ipcHandle!]).toEqual([...ipcHandle]);
    else expect(parsed.ipcHandle).toBeUndefined();
  });

  test("a request is one UTF-8 JSON object with an op field", () => {
    const [json] = encodeRequest({ op: "finish" });
    expect(JSON.parse(new TextDecoder().decode(json))).toEqual({ op: "finish" });
  });

  test("unknown fields are ignored, and open's optional extras are dropped when malformed", () => {
    const { req } = parseRequest([frame({ ...openCpu, future: { x: 1 }, files: [1, 2], buckets: -1, tensors: "many" })]);
    const { files: _f, buckets: _b, tensors: _t, ...kept } = openCpu;
    expect(req).toEqual({ ...kept, bytes: openCpu.bytes });
    expect("future" in req).toBe(false);
    expect(parseRequest([frame({ op: "release", extra: true })]).req).toEqual({ op: "release" });
    expect(parseRequest([frame({ op: "abort" })]).req).toEqual({ op: "abort", reason: "" });
  });

  test("ce's dialect writes the oldest protocol in open, names the buffer, and says keep only when it keeps", () => {
    const info = {
      checkpoint: "m",
      version: 2,
      backend: "cpu" as const,
      deviceUuid: "CPU-h-0",
      deviceOrdinal: 0,
      bufferBytes: 8192,
      slots: 2,
      slotBytes: 4096,
      path: "/dev/shm/ce-x",
      files: [],
      buckets: 1,
      tensors: 1,
      bytes: 1,
    };
    const open = JSON.parse(new TextDecoder().decode(ceDialect.open({ ...info, bufferId: "1-ab-0-dev0" })[0]));
    // Version 1 workers refuse any other protocol: everything version 2 adds is optional.
    expect(open).toMatchObject({ protocol: OLDEST_PROTOCOL, buffer_id: "1-ab-0-dev0" });
    expect("buffer_id" in JSON.parse(new TextDecoder().decode(ceDialect.open(info)[0]))).toBe(false);
    expect(parseRequest(ceDialect.release(true)).req).toEqual({ op: "release", keep: true });
    expect(parseRequest(ceDialect.release(false)).req).toEqual({ op: "release" });
  });

  test("a CUDA open without a 64-byte handle is refused when encoding", () => {
    expectProtocolError(() => encodeRequest(openCuda), "E_PROTOCOL", "64-byte IPC handle");
    expectProtocolError(() => encodeRequest(openCuda, new Uint8Array(63)), "E_PROTOCOL", "64-byte IPC handle");
  });

  const { path: _path, ...openNoPath } = openCpu;
  const malformed: [string, Uint8Array[], string][] = [
    ["no frame at all", [], "empty message"],
    ["a frame that is not JSON", [frame("{op: open")], "not JSON"],
    ["a frame that is not UTF-8 JSON", [Uint8Array.of(0xff, 0xfe, 0x00)], "not JSON"],
    ["a JSON array", [frame([{ op: "finish" }])], "not a JSON object"],
    ["JSON null", [frame("null")], "not a JSON object"],
    ["a JSON string", [frame('"finish"')], "not a JSON object"],
    ["no op", [frame({ bucket: 1 })], "unknown op undefined"],
    ["an unknown op", [frame({ op: "reload" })], 'unknown op "reload"'],
    ["an op that is not a string", [frame({ op: 3 })], "unknown op 3"],
    ["open with an unknown backend", [frame({ ...openCpu, backend: "rocm" })], 'backend must be "cuda" or "cpu"'],
    ["open of a later protocol version", [frame({ ...openCpu, protocol: PROTOCOL_VERSION + 1 })], `this worker speaks ${OLDEST_PROTOCOL} to ${PROTOCOL_VERSION}`],
    ["open of protocol 0", [frame({ ...openCpu, protocol: 0 })], `this worker speaks ${OLDEST_PROTOCOL} to ${PROTOCOL_VERSION}`],
    ["open with an empty buffer_id", [frame({ ...openCpu, buffer_id: "" })], 'field "buffer_id" must be a non-empty string'],
    ["open with a numeric buffer_id", [frame({ ...openCpu, buffer_id: 7 })], 'field "buffer_id" must be a non-empty string'],
    ["release with keep as a string", [frame({ op: "release", keep: "true" })], 'field "keep" must be a boolean'],
    ["open without protocol", [frame({ ...openCpu, protocol: undefined })], 'field "protocol"'],
    ["open with a negative buffer size", [frame({ ...openCpu, buffer_bytes: -1 })], 'field "buffer_bytes" must be a non-negative integer'],
    ["open with a fractional slot size", [frame({ ...openCpu, slot_bytes: 4096.5 })], 'field "slot_bytes"'],
    ["open with slots as a string", [frame({ ...openCpu, slots: "3" })], 'field "slots"'],
    ["open with a numeric checkpoint name", [frame({ ...openCpu, checkpoint: 5 })], 'field "checkpoint" must be a string'],
    ["open without device_uuid", [frame({ ...openCpu, device_uuid: undefined })], 'field "device_uuid"'],
    ["open with a version past 2^53", [frame(JSON.stringify({ ...openCpu, version: 1 }).replace('"version":1', '"version":9007199254740993'))], 'field "version"'],
    ["a CPU open without path", [frame(openNoPath)], 'the cpu backend needs "path"'],
    ["a CPU open with an empty path", [frame({ ...openCpu, path: "" })], 'the cpu backend needs "path"'],
    ["a CUDA open without the handle frame", [frame(openCuda)], "second frame of 64 bytes"],
    ["a CUDA open with a short handle frame", [frame(openCuda), new Uint8Array(32)], "second frame of 64 bytes"],
    ["load without tensors", [frame({ op: "load", bucket: 0, slot: 0 })], '"tensors" must be a list'],
    ["load with tensors as an object", [frame({ op: "load", bucket: 0, slot: 0, tensors: {} })], '"tensors" must be a list'],
    ["load with a negative bucket", [frame({ ...load, bucket: -1 })], 'field "bucket"'],
    ["load without slot", [frame({ ...load, slot: undefined })], 'field "slot"'],
    ["load with a tensor that is not an object", [frame({ ...load, tensors: ["w"] })], "tensor 0 is not an object"],
    ["load with a null tensor", [frame({ ...load, tensors: [null] })], "tensor 0 is not an object"],
    ["load with a tensor without name", [frame({ ...load, tensors: [{ dtype: "BF16", shape: [1], offset: 0, nbytes: 2 }] })], 'field "name"'],
    ["load with a tensor without dtype", [frame({ ...load, tensors: [{ name: "w", shape: [1], offset: 0, nbytes: 2 }] })], 'field "dtype"'],
    ["load with a negative dimension", [frame({ ...load, tensors: [{ name: "w", dtype: "BF16", shape: [-1], offset: 0, nbytes: 2 }] })], "tensor 0 has a bad shape"],
    ["load with a shape that is not a list", [frame({ ...load, tensors: [{ name: "w", dtype: "BF16", shape: 4, offset: 0, nbytes: 8 }] })], "bad shape"],
    ["load with a fractional dimension", [frame({ ...load, tensors: [{ name: "w", dtype: "BF16", shape: [1.5], offset: 0, nbytes: 3 }] })], "bad shape"],
    ["load with a negative offset", [frame({ ...load, tensors: [{ name: "w", dtype: "BF16", shape: [1], offset: -256, nbytes: 2 }] })], 'field "offset"'],
    ["load with nbytes as a string", [frame({ ...load, tensors: [{ name: "w", dtype: "BF16", shape: [1], offset: 0, nbytes: "2" }] })], 'field "nbytes"'],
    ["load whose second tensor is bad", [frame({ ...load, tensors: [load.tensors[0], { name: "w" }] })], "tensor 1"],
  ];

  test.each(malformed)("%s is refused with a protocol error", (_name, frames, part) => {
    expectProtocolError(() => parseRequest(frames), "E_PROTOCOL", part);
  });
});

describe("replies", () => {
  test("ok and error replies survive encode and parse, extra fields kept", () => {
    for (const reply of [{ ok: true }, { ok: true, tensors: 310, bytes: 1234 }, { ok: false, error: "KeyError: 'w' (tensor w)" }]) {
      expect(parseReply(encodeReply(reply), "finish")).toEqual(reply);
    }
  });

  test("an error reply without a message gets one, so the user never sees 'undefined'", () => {
    expect(parseReply([frame({ ok: false })], "load")).toEqual({ ok: false, error: "worker gave no error message" });
    expect(parseReply([frame({ ok: false, error: 42 })], "load")).toEqual({ ok: false, error: "worker gave no error message" });
  });

  const malformed: [string, Uint8Array[], string][] = [
    ["no frame", [], "reply to open: empty message"],
    ["not JSON", [frame("ok")], "reply to open: not JSON"],
    ["a JSON array", [frame([true])], "reply to open: not a JSON object"],
    ["no ok field", [frame({ error: "x" })], 'reply to open: no boolean "ok"'],
    ["ok as a string", [frame({ ok: "true" })], 'no boolean "ok"'],
    ["ok as a number", [frame({ ok: 1 })], 'no boolean "ok"'],
  ];

  test.each(malformed)("a reply of %s is a protocol error naming the op it answered", (_name, frames, part) => {
    expectProtocolError(() => parseReply(frames, "open"), "E_PROTOCOL", part);
  });
});

// The protocol's one definition: this end and python/tests/test_protocol.py both follow it.
const definition = JSON.parse(readFileSync(join(import.meta.dir, "../../src/wire/worker-protocol.json"), "utf8")) as {
  states: WorkerState[];
  transitions: Record<WorkerState, Partial<Record<OpName, WorkerState>>>;
  protocol: number;
  oldest: number;
  frames: {
    case: string;
    valid: boolean;
    op?: string;
    fields?: Record<string, unknown>;
    frames: ({ json: unknown } | { text: string } | { bytes: number })[];
  }[];
};
const OPS: OpName[] = ["open", "load", "release", "finish", "abort"];

function framesOf(spec: (typeof definition.frames)[number]["frames"]): Uint8Array[] {
  return spec.map((f) => ("json" in f ? frame(f.json) : "text" in f ? enc.encode(f.text) : new Uint8Array(f.bytes).fill(7)));
}

describe("worker state machine, as worker-protocol.json defines it", () => {
  const table = definition.states.flatMap((s) => OPS.map((op) => [s, op, definition.transitions[s][op] ?? "refused"] as [WorkerState, OpName, WorkerState | "refused"]));

  test.each(table)("in state %s, op %s → %s", (state, op, next) => {
    if (next !== "refused") expect(transition(state, op)).toBe(next);
    else expectProtocolError(() => transition(state, op), "E_PROTOCOL_STATE", `op "${op}" does not fit state "${state}"`);
  });

  test("a whole update walks idle → open → loads → released → finished, and the next one opens again", () => {
    let s: WorkerState = "idle";
    for (const op of ["open", "load", "load", "load", "release", "finish", "open", "load", "release", "finish"] as OpName[]) s = transition(s, op);
    expect(s).toBe("finished");
  });

  test("an abort in the middle of an update returns to idle, from where a new update may open", () => {
    let s: WorkerState = transition(transition("idle", "open"), "load");
    s = transition(s, "abort");
    expect(s).toBe("idle");
    expect(transition(s, "open")).toBe("open");
  });

  test("a refusal names the ops the state expects", () => {
    expectProtocolError(() => transition("open", "finish"), "E_PROTOCOL_STATE", "expected load or release or abort");
  });
});

describe("frame cases of worker-protocol.json", () => {
  test("this end speaks the definition's versions", () => {
    expect([OLDEST_PROTOCOL, PROTOCOL_VERSION]).toEqual([definition.oldest, definition.protocol]);
  });

  test.each(definition.frames.map((c) => [c.case, c] as const))("%s", (_name, c) => {
    const frames = framesOf(c.frames);
    if (c.valid) {
      const { req } = parseRequest(frames);
      expect(req.op).toBe(c.op as OpName);
      // An absent keep reads as false, as the definition says.
      for (const [field, value] of Object.entries(c.fields ?? {})) {
        const got: unknown = (req as Record<string, unknown>)[field] ?? (field === "keep" ? false : undefined);
        expect({ field, got }).toEqual({ field, got: value });
      }
    } else expectProtocolError(() => parseRequest(frames), "E_PROTOCOL", "");
  });
});
