// What ce says to a worker, independent of how it is written on the wire. The channel (core/channel.ts)
// drives every worker through open → load… → release → finish (or abort) and asks a dialect for the
// frames of each step and for the meaning of each reply. ce's own JSON protocol is one dialect
// (wire/protocol.ts); the reference system's pickled protocol is another, for engines that already run
// its worker loop.
import type { Backend } from "../base/backend";

export type Step = "open" | "load" | "release" | "finish" | "abort";

export interface SlotTensor {
  name: string;
  dtype: string;
  shape: number[];
  /** bytes from the start of the buffer (not the slot) */
  offset: number;
  nbytes: number;
}

/** A tensor's sparse patch in the buffer (a delta update; worker-protocol.json has the form). */
export interface SlotPatch {
  name: string;
  dtype: string;
  shape: number[];
  /** bytes from the start of the buffer: count int32 positions, and count values */
  positionsOffset: number;
  valuesOffset: number;
  count: number;
}

/** What a worker needs to map this update's buffer on its device. */
export interface OpenInfo {
  checkpoint: string;
  version: number;
  backend: Backend;
  /** the device's UUID (GPU-…, or CPU-<host>-<n>) and its CUDA ordinal (or simulated device number) */
  deviceUuid: string;
  deviceOrdinal: number;
  bufferBytes: number;
  slots: number;
  slotBytes: number;
  /** cpu: the shared-memory file of the buffer */
  path: string;
  /** cuda: the buffer's 64-byte IPC memory handle */
  handle?: Uint8Array;
  /** names this allocation of the device's IPC buffer (never reused): a worker that still maps it may keep its mapping */
  bufferId?: string;
  /** ask the worker for the digest of every tensor it loaded, in its reply to finish */
  verify?: boolean;
  /** a delta against this version of the checkpoint: only for workers that announced "delta" and hold it */
  deltaFrom?: number;
  /** extras for progress */
  files: string[];
  buckets: number;
  tensors: number;
  bytes: number;
}

export interface LoadInfo {
  bucket: number;
  slot: number;
  tensors: SlotTensor[];
  /** patches of a delta update; only a dialect whose workers announce "delta" gets any */
  patches?: SlotPatch[];
}

/** A worker's answer to one step: ok, or the worker's own words for what went wrong. */
export interface StepReply {
  ok: boolean;
  error?: string;
  /** fields the worker added (ce's protocol: "version", "delta", digests…) */
  extra: Record<string, unknown>;
}

export interface Dialect {
  /** "ce" or "checkpoint-engine", for logs and errors */
  readonly name: string;
  /** Whether its workers can be asked to verify (digests in the reply to finish). */
  readonly verifies: boolean;
  open(info: OpenInfo): Uint8Array[];
  load(info: LoadInfo): Uint8Array[];
  /** keep: ce keeps the buffer allocated, so a worker may keep its mapping for the next open naming it. */
  release(keep?: boolean): Uint8Array[];
  finish(): Uint8Array[];
  abort(reason: string): Uint8Array[];
  /** Reads a reply; throws (any error) when the frames are not a reply of this dialect, naming why. */
  reply(frames: Uint8Array[], step: Step): StepReply;
  /** Whether the worker answers this step (default: every step). */
  replies?(step: Step): boolean;
}
