// The checkpoint-engine dialect: the pickles of each step as the reference worker's pickle.loads
// sees them (Python with torch, a stand-in for rebuild_cuda_tensor), and replies read as bytes only.
import { beforeAll, describe, expect, test } from "bun:test";
import { existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { CeError } from "../../src/base/errors";
import { checkpointEngineDialect as ce, TORCH_DTYPES } from "../../src/wire/checkpoint-engine";
import type { LoadInfo, OpenInfo, SlotTensor } from "../../src/wire/dialect";
import { global, pickle, reduce } from "../../src/wire/pickle";
import { type Described, type Loaded, loadInPython, PYTHON_DEADLINE_MS, torchPython } from "../helpers/ce-reference";

const handle = Uint8Array.from({ length: 64 }, (_, i) => (i * 37 + 11) & 0xff);
const hex = (b: Uint8Array) => Buffer.from(b).toString("hex");

const open: OpenInfo = {
  checkpoint: "Qwen3-0.6B",
  version: 3,
  backend: "cuda",
  deviceUuid: "GPU-3f2c0000-0000-0000-0000-000000000000",
  deviceOrdinal: 5,
  bufferBytes: 2 * 1024 ** 3 + 512, // past 2^31: LONG1 on the wire
  slots: 2,
  slotBytes: 1024 ** 3 + 256,
  path: "",
  handle,
  files: [],
  buckets: 4,
  tensors: 3,
  bytes: 1 << 20,
};

const tensors: SlotTensor[] = [
  { name: "model.embed_tokens.weight", dtype: "BF16", shape: [151936, 1024], offset: 1024 ** 3 + 256, nbytes: 151936 * 1024 * 2 },
  { name: "model.norm.weight", dtype: "F32", shape: [1024], offset: 1024 ** 3 + 256 + 311164928, nbytes: 4096 },
  { name: "scale", dtype: "F32", shape: [], offset: 1024 ** 3 + 256 + 311169024, nbytes: 4 },
  { name: "mask", dtype: "BOOL", shape: [3, 1], offset: 1024 ** 3 + 256 + 311169280, nbytes: 3 },
];
const load: LoadInfo = { bucket: 1, slot: 1, tensors };

const one = (frames: Uint8Array[]) => {
  expect(frames.length).toBe(1);
  return frames[0]!;
};

describe("checkpoint-engine frames", () => {
  test("every step is one frame", () => {
    for (const frames of [ce.open(open), ce.load(load), ce.release(), ce.finish(), ce.abort("x")]) expect(frames.length).toBe(1);
  });

  test("release and finish are both None, as the reference worker keys its loop on it", () => {
    expect(hex(one(ce.release()))).toBe("80044e2e");
    expect(hex(one(ce.finish()))).toBe("80044e2e");
  });

  test("open on the cpu backend is refused: the reference worker maps only CUDA IPC handles", () => {
    expect(() => ce.open({ ...open, backend: "cpu", path: "/dev/shm/ce-x", handle: undefined })).toThrow(/needs the cuda backend, not cpu/);
  });

  test("open without a 64-byte handle is refused", () => {
    expect(() => ce.open({ ...open, handle: undefined })).toThrow(/64-byte IPC handle/);
    expect(() => ce.open({ ...open, handle: handle.subarray(1) })).toThrow(/64-byte IPC handle/);
  });

  test("a dtype torch cannot view as whole bytes is refused, naming the tensor and bucket", () => {
    const f4: LoadInfo = { bucket: 7, slot: 0, tensors: [{ name: "w.packed", dtype: "F4", shape: [8], offset: 0, nbytes: 4 }] };
    expect(() => ce.load(f4)).toThrow(/bucket 7: tensor "w.packed" is F4/);
    expect(() => ce.load({ ...f4, tensors: [{ ...f4.tensors[0]!, dtype: "F6_E2M3" }] })).toThrow(CeError);
  });

  test("dtypes newer than some torch builds are named as torch spells them", () => {
    const bytes = Buffer.from(one(ce.load({ bucket: 0, slot: 0, tensors: [{ name: "w", dtype: "F8_E4M3", shape: [2], offset: 0, nbytes: 2 }] })));
    expect(bytes.includes(Buffer.from("float8_e4m3fn"))).toBe(true);
    expect(TORCH_DTYPES.F8_E5M2).toBe("float8_e5m2");
    expect(TORCH_DTYPES.constructor).toBeUndefined();
  });

  test("the worker never answers abort; every other step it does", () => {
    expect(["open", "load", "release", "finish"].every((s) => ce.replies(s as never))).toBe(true);
    expect(ce.replies("abort")).toBe(false);
  });
});

describe("checkpoint-engine replies", () => {
  const enc = new TextEncoder();
  const traceback = 'Traceback (most recent call last):\n  File "worker.py", line 90, in update_weights_from_ipc\n    run(_extract_weights(payload, buffer))\nKeyError: \'lm_head.weight\'\n';

  test("an empty frame is done", () => {
    expect(ce.reply([new Uint8Array(0)], "load")).toEqual({ ok: true, extra: {} });
  });

  test("text is the worker's error: its last line, with the whole traceback kept", () => {
    const r = ce.reply([enc.encode(traceback)], "load");
    expect(r.ok).toBe(false);
    expect(r.error).toBe("KeyError: 'lm_head.weight'");
    expect(r.extra.traceback).toBe(traceback);
  });

  const marker = join(tmpdir(), `ce-pickle-marker-${process.pid}`);
  const malformed: [string, Uint8Array[]][] = [
    ["no frame", []],
    ["two frames", [new Uint8Array(0), new Uint8Array(0)]],
    ["a binary pickle that would run a shell", [pickle(reduce(global("os", "system"), `touch ${marker}`))]],
    ["bytes that are not UTF-8", [Uint8Array.of(0xff, 0xfe, 0x00)]],
    ["text with a NUL", [enc.encode("bad\u0000thing")]],
  ];
  for (const [name, frames] of malformed) {
    test(`${name} is a protocol error, read as bytes only`, () => {
      let caught: unknown;
      try {
        ce.reply(frames, "open");
      } catch (err) {
        caught = err;
      }
      expect(caught).toBeInstanceOf(CeError);
      expect((caught as CeError).code).toBe("E_PROTOCOL");
      expect((caught as Error).message).toContain("reply to open from a checkpoint-engine worker");
      expect(existsSync(marker)).toBe(false);
    });
  }

  test("a binary reply is named by its size and first bytes", () => {
    expect(() => ce.reply([pickle(null)], "load")).toThrow(/4 bytes \(80 04 4e 2e\) that are not UTF-8/);
  });

  test("a protocol-0 pickle is only text: it comes back as the worker's error, never loaded", () => {
    const r = ce.reply([enc.encode(`cos\nsystem\n(S'touch ${marker}'\ntR.`)], "load");
    expect(r.ok).toBe(false);
    expect(r.error).toBe("tR.");
    expect(existsSync(marker)).toBe(false);
  });
});

const py = torchPython();

describe.skipIf(!py.ok)(`checkpoint-engine pickles in ${py.ok ? `${py.python} (${py.reason})` : `skipped: ${py.reason}`}`, () => {
  let loaded: Loaded[] = [];
  beforeAll(() => {
    loaded = loadInPython(py.python, [one(ce.open(open)), one(ce.load(load)), one(ce.release()), one(ce.abort("Some workers failed to update weights"))]);
    for (const l of loaded) expect(l.error).toBeUndefined();
  }, PYTHON_DEADLINE_MS);

  const int = (v: number): Described => ({ t: "int", v: String(v) });

  test("open is (rebuild_cuda_tensor, args) with torch's 15 arguments for the whole buffer as uint8", () => {
    const v = loaded[0]!.value!;
    expect(v.t).toBe("tuple");
    expect((v as { items: Described[] }).items[0]).toEqual({ t: "global", v: "stand-in torch.multiprocessing.reductions.rebuild_cuda_tensor" });
    expect(loaded[0]!.rebuild_args).toEqual({
      tensor_cls: { t: "global", v: "torch.Tensor" },
      tensor_size: { t: "torch.Size", v: [open.bufferBytes] },
      tensor_stride: { t: "tuple", items: [int(1)] },
      tensor_offset: int(0),
      storage_cls: { t: "global", v: "torch.storage.TypedStorage" },
      dtype: { t: "torch.dtype", v: "torch.uint8" },
      storage_device: int(5),
      storage_handle: { t: "bytes", hex: hex(handle) },
      storage_size_bytes: int(open.bufferBytes),
      storage_offset_bytes: int(0),
      requires_grad: { t: "bool", v: false },
      ref_counter_handle: { t: "bytes", hex: "" },
      ref_counter_offset: int(0),
      event_handle: { t: "bytes", hex: "00".repeat(64) },
      event_sync_required: { t: "bool", v: false },
    });
  });

  test("load is a list of {name, dtype, shape, offset} with real torch.dtype and torch.Size, offsets from the buffer's start", () => {
    const dtypes: Record<string, string> = { BF16: "torch.bfloat16", F32: "torch.float32", BOOL: "torch.bool" };
    expect(loaded[1]!.value).toEqual({
      t: "list",
      items: tensors.map((t) => ({
        t: "dict",
        items: [
          ["name", { t: "str", v: t.name }],
          ["dtype", { t: "torch.dtype", v: dtypes[t.dtype]! }],
          ["shape", { t: "torch.Size", v: t.shape }],
          ["offset", int(t.offset)],
        ],
      })),
    });
  });

  test("release loads as None", () => {
    expect(loaded[2]!.value).toEqual({ t: "None" });
  });

  test("abort loads as a RuntimeError carrying the reason", () => {
    expect(loaded[3]!.value).toEqual({ t: "exception", class: "RuntimeError", args: [{ t: "str", v: "Some workers failed to update weights" }] });
  });
});
