// The reference system's worker protocol (MoonshotAI checkpoint-engine, `checkpoint_engine/worker.py`
// `update_weights_from_ipc`), for engines that already run its worker loop: vLLM started with its
// worker extension, and SGLang's POST /update_weights_from_ipc. The worker's REP socket reads every
// request with pickle.loads and answers with raw bytes. ce writes those pickles (wire/pickle.ts) and
// reads the replies as bytes only: nothing is ever unpickled.
//
// What the worker expects, step by step (one message of one frame each):
//   open     the buffer's CUDA IPC handle as torch's reduce_tensor() makes it:
//            `(rebuild_cuda_tensor, args)`; the worker calls it after putting its own device index
//            at args[6], and asserts the result is a uint8 tensor. That tensor is the whole buffer.
//   load     a list of {"name", "dtype": torch.dtype, "shape": torch.Size, "offset"}; offsets count
//            bytes from the start of that whole buffer (the reference PS writes slot*bucket_size +
//            the tensor's place in the slot), the same as ce's SlotTensor.offset.
//   release  None: the worker drops its tensor and empties torch's caches.
//   finish   None again: the worker runs the engine's post-hook, replies, and leaves its loop.
//   abort    an exception object: the worker raises it and leaves without replying.
// Replies: b"" for done, else the worker's traceback as UTF-8 text. Only open and load answer with
// an error; a failed release or post-hook raises inside the engine without a reply, so it surfaces
// through the engine's HTTP call. After a failed open the worker waits for one more message of any
// content before it raises: the abort message serves, and gets no reply.
import { InputError } from "../base/errors";
import type { Dialect, LoadInfo, OpenInfo, SlotTensor, Step, StepReply } from "./dialect";
import { type Global, global, pickle, type PickleValue, reduce, tuple } from "./pickle";
import { IPC_HANDLE_BYTES } from "./protocol";

/** torch's dtype for each safetensors dtype that has one of whole bytes (torch.<name>). */
export const TORCH_DTYPES: Readonly<Record<string, string>> = Object.freeze(
  Object.assign(Object.create(null) as Record<string, string>, {
    BOOL: "bool",
    U8: "uint8",
    I8: "int8",
    I16: "int16",
    U16: "uint16", // torch >= 2.3
    I32: "int32",
    U32: "uint32", // torch >= 2.3
    I64: "int64",
    U64: "uint64", // torch >= 2.3
    F16: "float16",
    BF16: "bfloat16",
    F32: "float32",
    F64: "float64",
    C64: "complex64",
    F8_E4M3: "float8_e4m3fn", // torch >= 2.1
    F8_E5M2: "float8_e5m2", // torch >= 2.1
    F8_E4M3FNUZ: "float8_e4m3fnuz", // torch >= 2.2
    F8_E5M2FNUZ: "float8_e5m2fnuz", // torch >= 2.2
    F8_E8M0: "float8_e8m0fnu", // torch >= 2.7
  }),
);

const torchGlobal = (name: string): Global => global("torch", name);
const torchSize = (dims: readonly number[]): PickleValue => reduce(torchGlobal("Size"), tuple(...dims));

/**
 * The open message's object: the tuple torch.multiprocessing.reductions.reduce_tensor() gives for a
 * contiguous uint8 CUDA tensor spanning the whole buffer, as its rebuild_cuda_tensor takes it
 * (torch 1.13 through 2.x keep these 15 arguments).
 */
export function ipcHandleObject(o: { handle: Uint8Array; bufferBytes: number; deviceOrdinal: number }): PickleValue {
  return tuple(
    global("torch.multiprocessing.reductions", "rebuild_cuda_tensor"),
    tuple(
      torchGlobal("Tensor"), // tensor_cls
      torchSize([o.bufferBytes]), // tensor_size
      tuple(1), // tensor_stride
      0, // tensor_offset, in elements, within the storage
      global("torch.storage", "TypedStorage"), // storage_cls: what reduce_tensor sends; its _new_shared_cuda maps the handle
      torchGlobal("uint8"), // dtype: the worker asserts uint8
      o.deviceOrdinal, // storage_device: ce's CUDA ordinal; the reference worker puts its own here
      o.handle, // storage_handle: the 64-byte cudaIpcMemHandle of the buffer's own allocation
      o.bufferBytes, // storage_size_bytes
      0, // storage_offset_bytes: the buffer starts its allocation
      false, // requires_grad
      // ref_counter_handle: torch's producer-side count of live consumers, in a shared-memory file.
      // ce knows when workers let go (the release reply), so it keeps none; torch's consumer treats
      // the counter as best effort and ignores a file it cannot open.
      new Uint8Array(0),
      0, // ref_counter_offset
      new Uint8Array(IPC_HANDLE_BYTES), // event_handle: unused without event_sync_required
      false, // event_sync_required: the slot's bytes are complete before ce sends load
    ),
  );
}

function tensorMeta(t: SlotTensor, bucket: number): PickleValue {
  const dtype = TORCH_DTYPES[t.dtype];
  if (dtype === undefined) {
    throw new InputError(
      "E_PROTOCOL_DTYPE",
      `bucket ${bucket}: tensor "${t.name}" is ${t.dtype}, which the checkpoint-engine protocol cannot carry (the reference worker views bytes as a torch dtype of whole bytes)`,
      { hint: `use --protocol ce, or leave ${t.dtype} tensors out of the checkpoint` },
    );
  }
  return { name: t.name, dtype: torchGlobal(dtype), shape: torchSize(t.shape), offset: t.offset };
}

const utf8 = new TextDecoder("utf-8", { fatal: true });
// Text a worker writes has no control characters besides tab and line breaks.
const CONTROL = /[\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f]/;

function describeBytes(b: Uint8Array): string {
  const head = Array.from(b.subarray(0, 16), (x) => x.toString(16).padStart(2, "0")).join(" ");
  return `${b.length} byte${b.length === 1 ? "" : "s"} (${head}${b.length > 16 ? " …" : ""})`;
}

/** The worker's last words: a traceback's final line ("KeyError: 'lm_head.weight'"), or the whole text. */
function lastLine(text: string): string {
  const lines = text.split("\n").map((l) => l.trim()).filter((l) => l.length > 0);
  return lines.at(-1) ?? text;
}

export interface CheckpointEngineDialect extends Dialect {
  /**
   * Whether the worker answers this step. It never answers abort (it raises the exception and
   * closes its socket), so the channel sends abort and does not wait for a reply.
   */
  replies(step: Step): boolean;
}

export const checkpointEngineDialect: CheckpointEngineDialect = {
  name: "checkpoint-engine",
  verifies: false,

  open(info: OpenInfo): Uint8Array[] {
    if (info.backend !== "cuda") {
      throw new InputError(
        "E_PROTOCOL_BACKEND",
        `the checkpoint-engine protocol needs the cuda backend, not ${info.backend}: its worker maps the buffer with torch's CUDA IPC (rebuild_cuda_tensor)`,
        { hint: "use --protocol ce with the cpu backend" },
      );
    }
    if (!info.handle || info.handle.byteLength !== IPC_HANDLE_BYTES) {
      throw new InputError("E_PROTOCOL", `open on ${info.deviceUuid}: the checkpoint-engine protocol needs the buffer's ${IPC_HANDLE_BYTES}-byte IPC handle`);
    }
    return [pickle(ipcHandleObject({ handle: info.handle, bufferBytes: info.bufferBytes, deviceOrdinal: info.deviceOrdinal }))];
  },

  load(info: LoadInfo): Uint8Array[] {
    return [pickle(info.tensors.map((t) => tensorMeta(t, info.bucket)))];
  },

  release: () => [pickle(null)],
  finish: () => [pickle(null)],
  abort: (reason: string) => [pickle(reduce(global("builtins", "RuntimeError"), reason))],

  replies: (step: Step) => step !== "abort",

  reply(frames: Uint8Array[], step: Step): StepReply {
    const what = `reply to ${step} from a checkpoint-engine worker`;
    if (frames.length !== 1) {
      throw new InputError("E_PROTOCOL", `${what}: ${frames.length} frames, expected one (empty, or an error text)`);
    }
    const frame = frames[0]!;
    if (frame.length === 0) return { ok: true, extra: {} };
    let text: string;
    try {
      text = utf8.decode(frame);
    } catch {
      throw new InputError("E_PROTOCOL", `${what}: ${describeBytes(frame)} that are not UTF-8 text; only an empty frame or an error text is a reply`);
    }
    if (CONTROL.test(text)) {
      throw new InputError("E_PROTOCOL", `${what}: ${describeBytes(frame)} with control characters; only an empty frame or an error text is a reply`);
    }
    return { ok: false, error: lastLine(text), extra: { traceback: text } };
  },
};
