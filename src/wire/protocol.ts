// The worker protocol of DESIGN.md: JSON frames over ZeroMQ REQ/REP, nothing pickled. Pure:
// builds and validates frames; sockets live elsewhere. Its states and transitions come from
// worker-protocol.json, the one definition python/ce_worker/protocol.py is tested against too.
import { InputError } from "../base/errors";
import type { Dialect, OpenInfo, Step, StepReply } from "./dialect";
import definition from "./worker-protocol.json" with { type: "json" };

/** What a worker of this definition speaks, and says in its reply to open. */
export const PROTOCOL_VERSION = definition.protocol;
/** The oldest open a worker accepts, and what ce writes: every later addition is optional, so version 1 workers keep working. */
export const OLDEST_PROTOCOL = definition.oldest;
export const IPC_HANDLE_BYTES = 64;

export interface WireTensor {
  name: string;
  dtype: string;
  shape: number[];
  /** bytes from the start of the buffer (not the slot) */
  offset: number;
  nbytes: number;
}

/**
 * Version 2, delta updates: a tensor's sparse patch in the buffer. positions_offset: `count`
 * little-endian int32 element indices into the flattened tensor, ascending; values_offset: `count`
 * elements of the tensor's dtype, the new values at those positions (offsets from the buffer's start).
 */
export interface WirePatch {
  name: string;
  dtype: string;
  shape: number[];
  positions_offset: number;
  values_offset: number;
  count: number;
}

export type LoadTensor = WireTensor | WirePatch;

export function isPatch(t: LoadTensor): t is WirePatch {
  return "count" in t;
}

export interface OpenRequest {
  op: "open";
  protocol: number;
  checkpoint: string;
  version: number;
  device_uuid: string;
  backend: "cuda" | "cpu";
  buffer_bytes: number;
  slots: number;
  slot_bytes: number;
  path: string;
  /** Version 2: names this allocation of the device's IPC buffer; a worker that keeps its mapping serves
   *  the update from it (worker-protocol.json says when a mapping is kept and when dropped). */
  buffer_id?: string;
  /** Version 2: the reply to finish must carry "digests", {tensor: 16 hex digits} of every tensor
   *  loaded since this open, computed from what the worker loaded (docs/digest.md). */
  verify?: boolean;
  /** Version 2: this update is a delta against version delta_from of the same checkpoint (sent only
   *  to a worker that announced "delta": true and holds that version): loads may carry patches, and
   *  finish's digests cover every tensor of the checkpoint the worker holds, not only those loaded. */
  delta_from?: number;
  /** Extras (protocol 1 ignores unknown fields): the checkpoint's files, and the update's size, for
   *  progress and preallocation. */
  files?: string[];
  buckets?: number;
  tensors?: number;
  bytes?: number;
}

export interface LoadRequest {
  op: "load";
  bucket: number;
  slot: number;
  tensors: LoadTensor[];
}

export type Request =
  | OpenRequest
  | LoadRequest
  | { op: "release"; keep?: boolean }
  | { op: "finish" }
  | { op: "abort"; reason: string };

export type OpName = Request["op"];

export interface Reply {
  ok: boolean;
  error?: string;
  [extra: string]: unknown;
}

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** The frames of one request: the JSON, plus the IPC handle for a CUDA open. */
export function encodeRequest(req: Request, ipcHandle?: Uint8Array): Uint8Array[] {
  const frames: Uint8Array[] = [encoder.encode(JSON.stringify(req))];
  if (req.op === "open" && req.backend === "cuda") {
    if (!ipcHandle || ipcHandle.byteLength !== IPC_HANDLE_BYTES) {
      throw new InputError("E_PROTOCOL", `open on CUDA needs a ${IPC_HANDLE_BYTES}-byte IPC handle frame`);
    }
    frames.push(ipcHandle);
  }
  return frames;
}

export function encodeReply(reply: Reply): Uint8Array[] {
  return [encoder.encode(JSON.stringify(reply))];
}

function parseObject(frame: Uint8Array | undefined, what: string): Record<string, unknown> {
  if (!frame) throw new InputError("E_PROTOCOL", `${what}: empty message`);
  let value: unknown;
  try {
    value = JSON.parse(decoder.decode(frame));
  } catch (err) {
    throw new InputError("E_PROTOCOL", `${what}: not JSON (${(err as Error).message})`);
  }
  if (typeof value !== "object" || value === null || Array.isArray(value)) {
    throw new InputError("E_PROTOCOL", `${what}: not a JSON object`);
  }
  return value as Record<string, unknown>;
}

/** A worker's reply; a malformed one is a protocol error naming the op it answered. */
export function parseReply(frames: Uint8Array[], op: OpName): Reply {
  const obj = parseObject(frames[0], `reply to ${op}`);
  if (typeof obj.ok !== "boolean") throw new InputError("E_PROTOCOL", `reply to ${op}: no boolean "ok"`);
  if (!obj.ok && typeof obj.error !== "string") return { ...obj, ok: false, error: "worker gave no error message" };
  return obj as Reply;
}

function need<T>(obj: Record<string, unknown>, key: string, kind: "string" | "number" | "integer", op: string): T {
  const v = obj[key];
  const ok =
    kind === "string" ? typeof v === "string" : kind === "number" ? typeof v === "number" : Number.isSafeInteger(v) && (v as number) >= 0;
  if (!ok) throw new InputError("E_PROTOCOL", `${op}: field "${key}" must be ${kind === "integer" ? "a non-negative integer" : `a ${kind}`}`);
  return v as T;
}

function parseTensor(t: unknown, i: number): LoadTensor {
  if (typeof t !== "object" || t === null) throw new InputError("E_PROTOCOL", `load: tensor ${i} is not an object`);
  const o = t as Record<string, unknown>;
  const shape = o.shape;
  if (!Array.isArray(shape) || !shape.every((d) => Number.isSafeInteger(d) && d >= 0)) {
    throw new InputError("E_PROTOCOL", `load: tensor ${i} has a bad shape`);
  }
  if (o.count !== undefined) {
    const what = `load patch ${i}`;
    const p: WirePatch = {
      name: need<string>(o, "name", "string", what),
      dtype: need<string>(o, "dtype", "string", what),
      shape: shape as number[],
      positions_offset: need<number>(o, "positions_offset", "integer", what),
      values_offset: need<number>(o, "values_offset", "integer", what),
      count: need<number>(o, "count", "integer", what),
    };
    const elements = p.shape.reduce((a, b) => a * b, 1);
    if (p.count > elements) throw new InputError("E_PROTOCOL", `${what} (${p.name}): count ${p.count} exceeds the tensor's ${elements} elements`);
    return p;
  }
  return {
    name: need<string>(o, "name", "string", `load tensor ${i}`),
    dtype: need<string>(o, "dtype", "string", `load tensor ${i}`),
    shape: shape as number[],
    offset: need<number>(o, "offset", "integer", `load tensor ${i}`),
    nbytes: need<number>(o, "nbytes", "integer", `load tensor ${i}`),
  };
}

/** A request as a worker receives it: validated, unknown fields dropped. */
export function parseRequest(frames: Uint8Array[]): { req: Request; ipcHandle?: Uint8Array } {
  const obj = parseObject(frames[0], "request");
  const op = obj.op;
  const takes = op === "open" && obj.backend === "cuda" ? 2 : 1;
  if (frames.length > takes) throw new InputError("E_PROTOCOL", `${String(op)}: takes ${takes} frame${takes === 1 ? "" : "s"}, got ${frames.length}`);
  switch (op) {
    case "open": {
      const backend = obj.backend;
      if (backend !== "cuda" && backend !== "cpu") throw new InputError("E_PROTOCOL", `open: backend must be "cuda" or "cpu"`);
      const protocol = need<number>(obj, "protocol", "integer", "open");
      if (protocol < OLDEST_PROTOCOL || protocol > PROTOCOL_VERSION) {
        throw new InputError("E_PROTOCOL", `open: protocol ${protocol}, this worker speaks ${OLDEST_PROTOCOL} to ${PROTOCOL_VERSION}`);
      }
      const req: OpenRequest = {
        op,
        protocol,
        checkpoint: need<string>(obj, "checkpoint", "string", "open"),
        version: need<number>(obj, "version", "integer", "open"),
        device_uuid: need<string>(obj, "device_uuid", "string", "open"),
        backend,
        buffer_bytes: need<number>(obj, "buffer_bytes", "integer", "open"),
        slots: need<number>(obj, "slots", "integer", "open"),
        slot_bytes: need<number>(obj, "slot_bytes", "integer", "open"),
        path: typeof obj.path === "string" ? obj.path : "",
      };
      if (obj.buffer_id !== undefined) {
        // A malformed id is refused, not ignored: ignoring it would still be safe, but it is a sender's bug worth seeing.
        if (typeof obj.buffer_id !== "string" || obj.buffer_id === "") throw new InputError("E_PROTOCOL", `open: field "buffer_id" must be a non-empty string`);
        req.buffer_id = obj.buffer_id;
      }
      if (obj.verify !== undefined) {
        if (typeof obj.verify !== "boolean") throw new InputError("E_PROTOCOL", `open: field "verify" must be a boolean`);
        req.verify = obj.verify;
      }
      if (obj.delta_from !== undefined) req.delta_from = need<number>(obj, "delta_from", "integer", "open");
      if (Array.isArray(obj.files) && obj.files.every((f) => typeof f === "string")) req.files = obj.files as string[];
      for (const k of ["buckets", "tensors", "bytes"] as const) {
        const v = obj[k];
        if (Number.isSafeInteger(v) && (v as number) >= 0) req[k] = v as number;
      }
      if (backend === "cuda") {
        const h = frames[1];
        if (!h || h.byteLength !== IPC_HANDLE_BYTES) {
          throw new InputError("E_PROTOCOL", `open: CUDA needs a second frame of ${IPC_HANDLE_BYTES} bytes (the IPC handle)`);
        }
        return { req, ipcHandle: h };
      }
      if (!req.path) throw new InputError("E_PROTOCOL", `open: the cpu backend needs "path"`);
      return { req };
    }
    case "load": {
      if (!Array.isArray(obj.tensors)) throw new InputError("E_PROTOCOL", `load: "tensors" must be a list`);
      return {
        req: {
          op,
          bucket: need<number>(obj, "bucket", "integer", "load"),
          slot: need<number>(obj, "slot", "integer", "load"),
          tensors: obj.tensors.map(parseTensor),
        },
      };
    }
    case "release": {
      if (obj.keep === undefined) return { req: { op } };
      if (typeof obj.keep !== "boolean") throw new InputError("E_PROTOCOL", `release: field "keep" must be a boolean`);
      return { req: { op, keep: obj.keep } };
    }
    case "finish":
      return { req: { op } };
    case "abort":
      return { req: { op, reason: typeof obj.reason === "string" ? obj.reason : "" } };
    default:
      throw new InputError("E_PROTOCOL", `unknown op ${JSON.stringify(op)}`);
  }
}

/** Where a worker stands in one update session. */
export type WorkerState = "idle" | "open" | "released" | "finished";

const TRANSITIONS: Record<WorkerState, Partial<Record<OpName, WorkerState>>> = definition.transitions as never;

/** The state after op, or an error saying why op does not fit the state. */
export function transition(state: WorkerState, op: OpName): WorkerState {
  const next = TRANSITIONS[state]?.[op];
  if (next === undefined) {
    const allowed = Object.keys(TRANSITIONS[state] ?? {});
    throw new InputError("E_PROTOCOL_STATE", `op "${op}" does not fit state "${state}" (expected ${allowed.join(" or ")})`);
  }
  return next;
}

/** ce's own protocol as the channel speaks it. */
export const ceDialect: Dialect = {
  name: "ce",
  verifies: true,
  open: (o: OpenInfo) =>
    encodeRequest(
      {
        op: "open",
        protocol: OLDEST_PROTOCOL,
        checkpoint: o.checkpoint,
        version: o.version,
        device_uuid: o.deviceUuid,
        backend: o.backend,
        buffer_bytes: o.bufferBytes,
        slots: o.slots,
        slot_bytes: o.slotBytes,
        path: o.path,
        ...(o.bufferId ? { buffer_id: o.bufferId } : {}),
        ...(o.verify ? { verify: true } : {}),
        ...(o.deltaFrom !== undefined ? { delta_from: o.deltaFrom } : {}),
        files: o.files,
        buckets: o.buckets,
        tensors: o.tensors,
        bytes: o.bytes,
      },
      o.handle,
    ),
  load: (l) =>
    encodeRequest({
      op: "load",
      bucket: l.bucket,
      slot: l.slot,
      tensors: [
        ...l.tensors,
        ...(l.patches ?? []).map((p) => ({ name: p.name, dtype: p.dtype, shape: p.shape, positions_offset: p.positionsOffset, values_offset: p.valuesOffset, count: p.count })),
      ],
    }),
  release: (keep) => encodeRequest(keep ? { op: "release", keep } : { op: "release" }),
  finish: () => encodeRequest({ op: "finish" }),
  abort: (reason) => encodeRequest({ op: "abort", reason }),
  reply(frames: Uint8Array[], step: Step): StepReply {
    const { ok, error, ...extra } = parseReply(frames, step);
    return { ok, error, extra };
  },
};
