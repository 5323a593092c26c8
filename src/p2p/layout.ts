// Where a pulled version lies on the puller (DESIGN.md "P2P update"): one staging region, into which
// every source host's tensors are read. The staging interleaves the hosts in chunks, so that reading
// it front to back (the order of the update's buckets, one owner) draws on every source at once.
// Pure: offers in, offsets out.
import { CeError, InputError } from "../base/errors";
import { ALIGN_BYTES, alignUp } from "../core/planner";

/** A tensor as a source host holds it: offset is into the file's pinned region. */
export interface OfferedTensor {
  name: string;
  dtype: string;
  shape: number[];
  nbytes: number;
  offset: number;
}

/** What one host offers of a checkpoint: its endpoint's address and, per file, the remote key and tensors. */
export interface Offer {
  host: number;
  version: number;
  /** hex of the transfer endpoint's address blob */
  address: string;
  files: { path: string; /** hex of the registration's remote key */ rkey: string; tensors: OfferedTensor[] }[];
  /** tensor → digest (docs/digest.md), when the pull verifies */
  digests?: Record<string, string>;
}

/** Bytes of one source file read in one go: large enough for a link's speed, small enough to interleave hosts. */
export const CHUNK_BYTES = 32 * 1024 ** 2;

/** A contiguous span of one source file, placed at stagingOffset. */
export interface Chunk {
  /** index into the offers */
  source: number;
  file: number;
  remoteOffset: number;
  stagingOffset: number;
  bytes: number;
}

export interface StagedTensor extends Omit<OfferedTensor, "offset"> {
  stagingOffset: number;
}

export interface PullLayout {
  bytes: number;
  /** in staging order */
  tensors: StagedTensor[];
  /** in staging order */
  chunks: Chunk[];
}

/** One read: remoteOffset of the source's file → stagingOffset, for a bucket. */
export type Read = Chunk;

/** The offers must be of one version and name each tensor once; else an error naming the hosts. */
export function checkOffers(checkpoint: string, offers: Offer[]): void {
  if (offers.length === 0) {
    throw new CeError("E_UNKNOWN_CHECKPOINT", `no host holds a checkpoint named "${checkpoint}"`, { hint: "POST /v1/checkpoints {name, path} on the hosts that hold it" });
  }
  checkHolders(checkpoint, offers);
}

/**
 * What hosts say they hold of a checkpoint, for a cluster update or a pull alike: one version, each
 * tensor on one host; else an error naming the hosts.
 */
export function checkHolders(checkpoint: string, holders: { host: number; version: number; files: { tensors: { name: string }[] }[] }[]): void {
  if (new Set(holders.map((h) => h.version)).size > 1) {
    throw new InputError("E_CLUSTER_VERSION", `hosts hold different versions of "${checkpoint}": ${holders.map((h) => `host ${h.host} has ${h.version}`).join(", ")}`, {
      hint: "register the same name and version on every host",
    });
  }
  const holder = new Map<string, number>();
  for (const h of holders) {
    for (const f of h.files) {
      for (const t of f.tensors) {
        const other = holder.get(t.name);
        if (other !== undefined) {
          throw new InputError("E_CLUSTER_DUPLICATE", `tensor "${t.name}" of "${checkpoint}" is held by host ${other} and host ${h.host}`, {
            hint: "each tensor must be registered on exactly one host",
          });
        }
        holder.set(t.name, h.host);
      }
    }
  }
}

/**
 * Cuts every offered file into chunks of whole tensors (a tensor larger than chunkBytes is a chunk of
 * its own), then lays the chunks out host by host in turn: host A's first chunk, host B's first, …
 */
export function pullLayout(offers: Offer[], chunkBytes = CHUNK_BYTES): PullLayout {
  const queues = offers.map((o, source) => {
    const runs: { chunk: Omit<Chunk, "stagingOffset">; tensors: OfferedTensor[] }[] = [];
    o.files.forEach((f, file) => {
      const sorted = [...f.tensors].sort((a, b) => a.offset - b.offset);
      let run: { chunk: Omit<Chunk, "stagingOffset">; tensors: OfferedTensor[] } | undefined;
      for (const t of sorted) {
        const end = t.offset + t.nbytes;
        if (run && end - run.chunk.remoteOffset <= chunkBytes) {
          run.chunk.bytes = Math.max(run.chunk.bytes, end - run.chunk.remoteOffset);
          run.tensors.push(t);
        } else {
          run = { chunk: { source, file, remoteOffset: t.offset, bytes: t.nbytes }, tensors: [t] };
          runs.push(run);
        }
      }
    });
    return runs;
  });
  const chunks: Chunk[] = [];
  const tensors: StagedTensor[] = [];
  let at = 0;
  for (let k = 0; queues.some((q) => k < q.length); k++) {
    for (const q of queues) {
      const run = q[k];
      if (!run) continue;
      at = alignUp(at, ALIGN_BYTES);
      chunks.push({ ...run.chunk, stagingOffset: at });
      for (const t of run.tensors) tensors.push({ name: t.name, dtype: t.dtype, shape: t.shape, nbytes: t.nbytes, stagingOffset: at + t.offset - run.chunk.remoteOffset });
      at += run.chunk.bytes;
    }
  }
  return { bytes: at, tensors, chunks };
}

/**
 * The reads each bucket needs: its copies' staging spans cut where chunks end, in the buckets'
 * order. Together they cover every byte the buckets copy, each once.
 */
export function bucketReads(layout: PullLayout, buckets: { copies: { srcOffset: number; bytes: number }[] }[]): Read[][] {
  const starts = layout.chunks.map((c) => c.stagingOffset);
  const chunkAt = (off: number): number => {
    let lo = 0;
    let hi = starts.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (starts[mid]! <= off) lo = mid;
      else hi = mid - 1;
    }
    return lo;
  };
  return buckets.map((b) => {
    const reads: Read[] = [];
    for (const c of b.copies) {
      let off = c.srcOffset;
      const end = c.srcOffset + c.bytes;
      while (off < end) {
        const ch = layout.chunks[chunkAt(off)]!;
        const upto = Math.min(end, ch.stagingOffset + ch.bytes);
        if (upto <= off) throw new RangeError(`staging offset ${off} is in no chunk of the pull`);
        reads.push({ source: ch.source, file: ch.file, remoteOffset: ch.remoteOffset + (off - ch.stagingOffset), stagingOffset: off, bytes: upto - off });
        off = upto;
      }
    }
    return reads;
  });
}
