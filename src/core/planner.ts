// Tensors + limits → buckets, owners and slot sizes. Pure: no I/O, no clocks, no randomness.
//
// A bucket is what one owner GPU copies from pinned host memory (H2D) in one go and then broadcasts
// into every GPU's slot. Invariants planBuckets guarantees (test/unit/planner.test.ts checks them):
//   - every tensor lands in exactly one bucket, whole (a bucket never splits a tensor);
//   - tensors keep their rank's order; a bucket's tensors all come from its owner's list;
//   - each tensor's offset in its bucket is a multiple of `align`, tensors never overlap, and
//     offset + nbytes <= bucket.bytes <= plan.bucketBytes;
//   - bucket.copies reproduce exactly the tensors' bytes: consecutive tensors contiguous in the same
//     region and in the bucket share one copy, so a bucket cut from one file is usually one copy;
//   - owners are interleaved in proportion to their bucket counts (equal counts: strict rotation),
//     so every owner's H2D link stays busy and the tail is not left to one owner.
import { InputError } from "../base/errors";
import type { Checkpoint } from "../checkpoint/checkpoint";
import { formatBytes } from "../base/units";

/** Tensors keep 256-byte alignment inside buckets (DESIGN.md): what cudaMalloc guarantees, so
 *  workers can view a tensor in a slot with any dtype and vectorized loads. */
export const ALIGN_BYTES = 256;

export interface TensorRef {
  name: string;
  dtype: string;
  shape: number[];
  nbytes: number;
  /** Index of the host region (pinned file) that holds it. */
  region: number;
  /** Byte offset of its data inside that region. */
  offset: number;
  /** Set: the bytes are a sparse patch of the tensor (a delta update), nbytes of them. */
  patch?: PatchForm;
}

/** A patch's shape in its bytes: `count` int32 positions at the start, the values at valuesOffset. */
export interface PatchForm {
  count: number;
  valuesOffset: number;
}

export interface BucketTensor {
  name: string;
  dtype: string;
  shape: number[];
  /** Within the bucket; a multiple of the plan's align. */
  offset: number;
  nbytes: number;
  patch?: PatchForm;
}

export interface Copy {
  region: number;
  srcOffset: number;
  /** Within the bucket. */
  dstOffset: number;
  bytes: number;
}

export interface Bucket {
  /** Position in the plan, which is the order buckets are sent. */
  index: number;
  /** Rank whose GPU does this bucket's H2D. */
  owner: number;
  /** Used span: the last tensor's end, aligned up. */
  bytes: number;
  tensors: BucketTensor[];
  copies: Copy[];
}

export interface Plan {
  buckets: Bucket[];
  bucketBytes: number;
  /** The largest bucket.bytes (aligned): the size of one slot. */
  slotBytes: number;
  totalBytes: number;
  tensorCount: number;
  largestTensorBytes: number;
  align: number;
  /** perRank.length. */
  owners: number;
}

export interface PlanInput {
  perRank: TensorRef[][];
  bucketBytes: number;
  align?: number;
  /**
   * A rank's last bucket's worth of tensors is cut into buckets of at most this (or their largest
   * tensor): nothing overlaps the last buckets' reloads, so small ones shorten the update's tail.
   */
  tailBucketBytes?: number;
}

export function alignUp(n: number, align: number): number {
  return Math.ceil(n / align) * align;
}

export function alignDown(n: number, align: number): number {
  return Math.floor(n / align) * align;
}

export function isCount(n: unknown): n is number {
  return Number.isSafeInteger(n) && (n as number) >= 0;
}

export function checkAlign(align: number): void {
  if (!Number.isSafeInteger(align) || align < 1 || (align & (align - 1)) !== 0) {
    throw new RangeError(`align ${align} is not a power of two`);
  }
}

/**
 * Splits one host's tensors over its ranks (any local GPU can do any tensor's H2D): contiguous runs in
 * the order given, cut where the running byte count is closest to k × total / nranks, so each rank gets
 * about the same bytes and each run stays file-contiguous (its copies coalesce).
 */
export function spreadOverRanks(tensors: TensorRef[], nranks: number): TensorRef[][] {
  if (!Number.isSafeInteger(nranks) || nranks < 1) throw new RangeError(`nranks ${nranks} is not a positive integer`);
  const prefix = new Array<number>(tensors.length + 1);
  prefix[0] = 0;
  for (let i = 0; i < tensors.length; i++) prefix[i + 1] = prefix[i]! + tensors[i]!.nbytes;
  const total = prefix[tensors.length]!;

  const cuts = [0];
  for (let k = 1; k < nranks; k++) {
    const target = (total * k) / nranks;
    // First i with prefix[i] >= target, then take i - 1 instead when that is closer.
    let lo = cuts[k - 1]!;
    let hi = tensors.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (prefix[mid]! >= target) hi = mid;
      else lo = mid + 1;
    }
    let cut = lo;
    if (cut > cuts[k - 1]! && target - prefix[cut - 1]! < prefix[cut]! - target) cut -= 1;
    cuts.push(cut);
  }
  cuts.push(tensors.length);
  return Array.from({ length: nranks }, (_, r) => tensors.slice(cuts[r], cuts[r + 1]));
}

/** Cuts each rank's tensors into buckets, then interleaves the owners. */
export function planBuckets({ perRank, bucketBytes, align = ALIGN_BYTES, tailBucketBytes }: PlanInput): Plan {
  checkAlign(align);
  if (!Number.isSafeInteger(bucketBytes) || bucketBytes < 1) {
    throw new InputError("E_PLAN_BUCKET_SIZE", `bucket size ${bucketBytes} is not a positive number of bytes`);
  }
  const capacity = alignUp(bucketBytes, align);
  const seen = new Set<string>();
  let totalBytes = 0;
  let tensorCount = 0;
  let largestTensorBytes = 0;

  const byOwner: Omit<Bucket, "index">[][] = perRank.map((tensors, owner) => {
    for (const t of tensors) {
      if (!isCount(t.nbytes) || !isCount(t.region) || !isCount(t.offset)) {
        throw new InputError(
          "E_PLAN_TENSOR",
          `tensor ${JSON.stringify(t.name)}: nbytes ${t.nbytes}, region ${t.region}, offset ${t.offset} must be non-negative integers`,
        );
      }
      if (seen.has(t.name)) throw new InputError("E_PLAN_DUPLICATE", `tensor ${JSON.stringify(t.name)} is planned twice`);
      seen.add(t.name);
      if (t.nbytes > capacity) {
        throw new InputError(
          "E_PLAN_TENSOR_TOO_LARGE",
          `tensor ${JSON.stringify(t.name)} (${t.dtype} [${t.shape.join(", ")}], ${t.nbytes} bytes = ${formatBytes(t.nbytes)}) does not fit in a ${capacity}-byte (${formatBytes(capacity)}) bucket`,
          { hint: "use a bucket size at least as large as the largest tensor (or leave --bucket-size on auto)" },
        );
      }
      totalBytes += t.nbytes;
      tensorCount += 1;
      if (t.nbytes > largestTensorBytes) largestTensorBytes = t.nbytes;
    }
    if (tailBucketBytes === undefined) return cut(tensors, owner, capacity, align);
    // The tail: the last tensors that together fill at most one bucket.
    let start = tensors.length;
    for (let sum = 0; start > 0 && sum + tensors[start - 1]!.nbytes <= capacity; start--) sum += tensors[start - 1]!.nbytes;
    const tail = tensors.slice(start);
    const largest = tail.reduce((m, t) => Math.max(m, t.nbytes), 0);
    return [...cut(tensors.slice(0, start), owner, capacity, align), ...cut(tail, owner, alignUp(Math.max(tailBucketBytes, largest), align), align)];
  });

  const buckets = interleave(byOwner).map((b, index) => ({ index, ...b }));
  const slotBytes = buckets.reduce((m, b) => Math.max(m, b.bytes), 0);
  return {
    buckets,
    bucketBytes: capacity,
    slotBytes,
    totalBytes,
    tensorCount,
    largestTensorBytes,
    align,
    owners: perRank.length,
  };
}

/** One rank's tensors, in order, into buckets of at most `capacity` bytes (validated by the caller). */
function cut(tensors: TensorRef[], owner: number, capacity: number, align: number): Omit<Bucket, "index">[] {
  const buckets: Omit<Bucket, "index">[] = [];
  let current: Omit<Bucket, "index"> | undefined;
  let cursor = 0;
  for (const t of tensors) {
    let dst = alignUp(cursor, align);
    if (current === undefined || dst + t.nbytes > capacity) {
      current = { owner, bytes: 0, tensors: [], copies: [] };
      buckets.push(current);
      dst = 0;
    }
    current.tensors.push({ name: t.name, dtype: t.dtype, shape: t.shape, offset: dst, nbytes: t.nbytes, ...(t.patch ? { patch: t.patch } : {}) });
    cursor = dst + t.nbytes;
    current.bytes = alignUp(cursor, align);
    if (t.nbytes === 0) continue;
    const last = current.copies[current.copies.length - 1];
    if (
      last !== undefined &&
      last.region === t.region &&
      last.srcOffset + last.bytes === t.offset &&
      last.dstOffset + last.bytes === dst
    ) {
      last.bytes += t.nbytes;
    } else {
      current.copies.push({ region: t.region, srcOffset: t.offset, dstOffset: dst, bytes: t.nbytes });
    }
  }
  return buckets;
}

/**
 * Merges the owners' bucket lists so each owner's buckets are spread evenly over the whole sequence:
 * bucket k of an owner with c buckets sits at (k + ½) / c, ties broken by owner. Equal counts give a
 * strict rotation (0, 1, …, n−1, 0, 1, …); unequal counts still end with a mix of owners.
 */
function interleave<T>(byOwner: T[][]): T[] {
  const keyed: { key: number; owner: number; k: number; item: T }[] = [];
  byOwner.forEach((list, owner) =>
    list.forEach((item, k) => keyed.push({ key: (2 * k + 1) / (2 * list.length), owner, k, item })),
  );
  keyed.sort((a, b) => a.key - b.key || a.owner - b.owner);
  return keyed.map((e) => e.item);
}

/** The tensors as the planner sees them: region = index into ckpt.files, offset = absolute file offset. */
export function tensorRefs(ckpt: Checkpoint): TensorRef[] {
  const region = new Map(ckpt.files.map((f, i) => [f.path, i]));
  return ckpt.tensors.map((t) => ({
    name: t.name,
    dtype: t.dtype,
    shape: t.shape,
    nbytes: t.nbytes,
    region: region.get(t.file)!,
    offset: t.fileOffset,
  }));
}
