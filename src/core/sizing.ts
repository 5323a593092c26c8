// How big the buckets are and how many slot and staging buffers each device gets: the one place
// that decides sizes, from free memory, the checkpoint and what the user asked for. Pure.
import { InputError } from "../base/errors";
import { formatBytes } from "../base/units";
import type { Backend } from "../base/backend";
import { ALIGN_BYTES, type Plan, type TensorRef, alignDown, alignUp, checkAlign, isCount, planBuckets, spreadOverRanks } from "./planner";

export const DEFAULT_BUCKET_BYTES = 1024 ** 3;

/** A checkpoint is cut into at least this many buckets (unless its largest tensor forbids): the
 *  pipeline's fill (the first bucket's H2D) and drain (the last one's reload) then cost an eighth of
 *  the update at most. Measured on an H200, Qwen3-0.6B: 378 MiB buckets (a third of it) 26.5 ms,
 *  297 MiB (its largest tensor) 23.5 ms, against a 21.7 ms floor. */
export const MIN_BUCKETS = 8;

/** H2D ∥ broadcast ∥ reload. */
export const DEFAULT_SLOTS = 3;

/** Per GPU with several GPUs: the owner copies bucket i+1 into one while broadcasting from the other. */
export const STAGING_BUFFERS = 2;

/** The CPU backend's buffers are shared-memory files every worker maps: each page costs a fault in
 *  every process that touches it, and the copies gain nothing from large spans. Buckets of at most
 *  64 MiB (never below the largest tensor) and two slots (one being filled, one being reloaded: there
 *  is no copy engine to overlap a third) keep its buffers near the size of what it moves. */
export const CPU_BUCKET_BYTES = 64 * 1024 ** 2;
export const CPU_SLOTS = 2;

export interface AutoSizeInput {
  /** Smallest free memory over the GPUs (CPU backend: available RAM). */
  freeBytes: number;
  totalBytes: number;
  largestTensorBytes: number;
  /** GPUs on this host. */
  ndev: number;
  /** Whether buckets go through the broadcast path (staging buffers); default: ndev > 1. */
  broadcast?: boolean;
  /** User-requested bucket size; raised to `align`, never below the largest tensor. */
  bucketBytes?: number;
  /** User-requested slots per GPU. */
  slots?: number;
  /** Default bucket cap when bucketBytes is not given; DEFAULT_BUCKET_BYTES unless said. */
  defaultBucketBytes?: number;
  /** Default slots when slots is not given; DEFAULT_SLOTS unless said. */
  defaultSlots?: number;
  /** Memory left alone; default max(1 GiB, 5% of freeBytes). */
  reserveBytes?: number;
  align?: number;
}

export interface AutoSize {
  bucketBytes: number;
  slots: number;
  /** Staging buffers per GPU: 0 without broadcast (one GPU, or direct H2D into every slot), else up to 2. */
  staging: number;
  mode: "pipelined" | "serial";
  /** Upper bound per GPU: (slots + staging) × bucketBytes. */
  deviceBytes: number;
  reserveBytes: number;
  /** One sentence per reduction made for lack of memory or buckets; empty when none. */
  fallbacks: string[];
}

const GiB = 1024 ** 3;

function plural(n: number, word: string): string {
  return `${n} ${word}${n === 1 ? "" : "s"}`;
}

/**
 * Picks bucket size, slots and staging from the memory available.
 *
 * Default bucket: max(largest tensor, min(1 GiB, total / MIN_BUCKETS)), so a small checkpoint
 * keeps three slots but never occupies more GPU memory than its own size (plus the largest tensor's
 * rounding). Slots and staging are never more than the buckets the checkpoint fills. When
 * (slots + staging) × bucket does not fit in freeBytes − reserve: first fewer slots (3 → 2 → 1 =
 * serial), then a smaller bucket down to the largest tensor; with slots requested by the user the
 * bucket shrinks first. When one slot of the largest tensor does not fit: InputError E_GPU_MEMORY.
 */
export function autoSize(input: AutoSizeInput): AutoSize {
  const align = input.align ?? ALIGN_BYTES;
  checkAlign(align);
  for (const key of ["freeBytes", "totalBytes", "largestTensorBytes"] as const) {
    if (!isCount(input[key])) throw new RangeError(`autoSize: ${key} ${input[key]} is not a byte count`);
  }
  if (!Number.isSafeInteger(input.ndev) || input.ndev < 1) throw new RangeError(`autoSize: ndev ${input.ndev} < 1`);
  if (input.slots !== undefined && (!Number.isSafeInteger(input.slots) || input.slots < 1)) {
    throw new InputError("E_SLOTS", `slots ${input.slots} is not a positive integer`, { hint: "use --slots 1, 2 or 3" });
  }
  if (input.bucketBytes !== undefined && (!Number.isSafeInteger(input.bucketBytes) || input.bucketBytes < 1)) {
    throw new InputError("E_BUCKET_SIZE", `bucket size ${input.bucketBytes} is not a positive number of bytes`);
  }

  const largest = alignUp(Math.max(input.largestTensorBytes, 1), align);
  const total = alignUp(Math.max(input.totalBytes, 1), align);
  const wantSlots = input.slots ?? input.defaultSlots ?? DEFAULT_SLOTS;
  const wantStaging = (input.broadcast ?? input.ndev > 1) ? STAGING_BUFFERS : 0;
  const fallbacks: string[] = [];

  let bucket: number;
  if (input.bucketBytes !== undefined) {
    bucket = alignUp(input.bucketBytes, align);
    if (bucket < largest) {
      throw new InputError(
        "E_BUCKET_SIZE",
        `bucket size ${formatBytes(input.bucketBytes)} is smaller than the largest tensor (${formatBytes(input.largestTensorBytes)})`,
        { hint: `use --bucket-size ${largest} or more, or leave it on auto` },
      );
    }
  } else {
    bucket = Math.max(largest, Math.min(input.defaultBucketBytes ?? DEFAULT_BUCKET_BYTES, alignUp(Math.ceil(total / Math.max(MIN_BUCKETS, wantSlots + wantStaging)), align)));
  }

  // More buffers than buckets would only hold memory: a 1 GiB checkpoint never takes 3 GiB of slots.
  const nbuckets = Math.ceil(total / bucket);
  let slots = Math.min(wantSlots, nbuckets);
  const staging = Math.min(wantStaging, nbuckets);
  if (input.slots !== undefined && slots < input.slots) {
    fallbacks.push(
      `${plural(input.slots, "slot")} requested, but ${plural(slots, "slot")} of ${formatBytes(bucket)} already hold the whole checkpoint (${formatBytes(input.totalBytes)}): using ${plural(slots, "slot")}.`,
    );
  }

  const reserve = input.reserveBytes ?? Math.max(GiB, Math.floor(0.05 * input.freeBytes));
  if (!isCount(reserve)) throw new RangeError(`autoSize: reserveBytes ${reserve} is not a byte count`);
  const avail = Math.max(0, input.freeBytes - reserve);
  const need = (s: number, b: number) => (s + staging) * b;
  const stagingText = staging > 0 ? ` + ${staging} staging` : "";
  const room = `${formatBytes(avail)} (${formatBytes(input.freeBytes)} free, ${formatBytes(reserve)} reserved)`;

  const before = { slots, bucket };
  const fitBucket = (s: number) => Math.min(before.bucket, alignDown(Math.floor(avail / (s + staging)), align));
  const shrinkSlots = () => {
    while (slots > 1 && need(slots, bucket) > avail) slots -= 1;
  };
  const shrinkBucket = () => {
    bucket = Math.max(largest, fitBucket(slots));
  };
  if (need(slots, bucket) > avail) {
    if (input.slots === undefined) {
      shrinkSlots();
      if (need(slots, bucket) > avail) shrinkBucket();
    } else {
      shrinkBucket();
      if (need(slots, bucket) > avail) {
        shrinkSlots();
        // Fewer slots may leave room for a larger bucket again.
        bucket = Math.max(largest, fitBucket(slots));
      }
    }
  }
  if (need(slots, bucket) > avail) {
    throw new InputError(
      "E_GPU_MEMORY",
      `not enough free GPU memory: ce needs ${formatBytes(need(1, largest))} per GPU (1 slot${stagingText} of ${formatBytes(largest)}, the largest tensor) but has ${room}`,
      {
        hint: "leave GPU memory for ce: lower the engine's share (vLLM --gpu-memory-utilization, SGLang --mem-fraction-static) or stop other processes on the GPU",
      },
    );
  }
  if (slots < before.slots) {
    fallbacks.push(
      `${plural(before.slots, "slot")}${stagingText} of ${formatBytes(before.bucket)} need ${formatBytes(need(before.slots, before.bucket))} per GPU, more than the ${room}: using ${plural(slots, "slot")}${slots === 1 ? " (serial: the next bucket waits for the reload of the previous one)" : ""}.`,
    );
  }
  if (bucket < before.bucket) {
    fallbacks.push(
      `bucket size ${formatBytes(before.bucket)} → ${formatBytes(bucket)} so that ${plural(slots, "slot")}${stagingText} fit in ${room}.`,
    );
  }
  return {
    bucketBytes: bucket,
    slots,
    staging,
    mode: slots >= 2 ? "pipelined" : "serial",
    deviceBytes: need(slots, bucket),
    reserveBytes: reserve,
    fallbacks,
  };
}

export interface UpdateSizingInput {
  backend: Backend;
  tensors: TensorRef[];
  ndev: number;
  /** Owners H2D into their staging buffers and broadcast; otherwise every device's slot is filled by its own H2D. */
  broadcast: boolean;
  /** The tensors each rank owns, when the caller decides (a cluster: owners on the host holding the bytes). */
  perRank?: TensorRef[][];
  /** Smallest free memory over the devices, counting what the session holds already. */
  freeBytes: number;
  bucketBytes?: number;
  slots?: number;
  /** The source is still arriving (a pool's version being pushed): buckets of at most STREAM_BUCKET_BYTES when sized automatically. */
  streaming?: boolean;
  /** Size the buffers for these tensors instead (a delta: the whole version's, so it keeps a full update's buffers). */
  sizeFor?: TensorRef[];
}

/**
 * A streaming update copies each bucket in pieces as its bytes arrive (pipeline.ts), but a bucket
 * is reloaded only once all of it is in: smaller buckets keep the reloads close behind the push,
 * and the last one, the update's tail, small (the writer reports progress every 256 MiB by default).
 */
export const STREAM_BUCKET_BYTES = 256 * 1024 ** 2;

export interface UpdatePlan {
  plan: Plan;
  slots: number;
  staging: number;
  fallbacks: string[];
}

/** The last bucket of each rank is cut into pieces of a bucket's 1/TAIL_SPLIT. */
const TAIL_SPLIT = 4;

/** Sizes and plans one update: buffers never outnumber the buckets they would hold. */
export function planUpdate(input: UpdateSizingInput): UpdatePlan {
  const cpu = input.backend === "cpu";
  const sized = input.sizeFor ?? input.tensors;
  const largest = sized.reduce((m, t) => Math.max(m, t.nbytes), 0);
  const totalBytes = sized.reduce((s, t) => s + t.nbytes, 0);
  const size = autoSize({
    freeBytes: input.freeBytes,
    totalBytes,
    largestTensorBytes: largest,
    ndev: input.ndev,
    broadcast: input.broadcast,
    bucketBytes: input.bucketBytes,
    slots: input.slots,
    defaultBucketBytes: Math.min(cpu ? CPU_BUCKET_BYTES : Infinity, input.streaming ? STREAM_BUCKET_BYTES : Infinity, DEFAULT_BUCKET_BYTES),
    defaultSlots: cpu ? CPU_SLOTS : undefined,
  });
  // A source still arriving, broadcast from this host's GPUs: the buckets in source order and their
  // owners in turn, so that each bucket waits only for the bytes before it (a contiguous share per
  // GPU would make the second GPU's first bucket wait for half the push).
  const dealt = input.streaming === true && input.broadcast && !input.perRank && input.ndev > 1;
  const perRank = input.perRank ?? (input.broadcast && !dealt ? spreadOverRanks(input.tensors, input.ndev) : [input.tensors]);
  // A quarter-size last bucket: its reload is the update's tail, overlapped by nothing.
  const cut = (ranks: TensorRef[][]) => planBuckets({ perRank: ranks, bucketBytes: size.bucketBytes, tailBucketBytes: Math.ceil(size.bucketBytes / TAIL_SPLIT) });
  const inOrder = cut(perRank);
  const plan = dealt ? { ...inOrder, owners: input.ndev, buckets: inOrder.buckets.map((b) => ({ ...b, owner: b.index % input.ndev })) } : inOrder;
  if (input.sizeFor) {
    // Slots as large and as many as the whole version's plan has.
    const whole = cut(input.broadcast ? spreadOverRanks(input.sizeFor, input.ndev) : [input.sizeFor]);
    const n = Math.max(1, whole.buckets.length);
    return { plan: { ...plan, slotBytes: Math.max(plan.slotBytes, whole.slotBytes) }, slots: Math.min(size.slots, n), staging: Math.min(size.staging, n), fallbacks: size.fallbacks };
  }
  const n = Math.max(1, plan.buckets.length);
  return { plan, slots: Math.min(size.slots, n), staging: Math.min(size.staging, n), fallbacks: size.fallbacks };
}

/**
 * After an allocation ran out of device memory (free memory can shrink between reading it and
 * allocating): one buffer fewer — staging first, then slots — or undefined when nothing is left to give.
 */
export function fewerBuffers(b: { slots: number; staging: number }, why: string): { slots: number; staging: number; fallback: string } | undefined {
  if (b.slots === 1 && b.staging <= 1) return undefined;
  const next = b.staging > 1 ? { slots: b.slots, staging: b.staging - 1 } : { slots: b.slots - 1, staging: b.staging };
  return { ...next, fallback: `device memory ran short allocating the slot buffers (${why}): retrying with ${plural(next.slots, "slot")} and ${next.staging} staging` };
}
