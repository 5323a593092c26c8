// One plan for a checkpoint spread over hosts: each host holds some files, host 0 plans every bucket.
// Owners are ranks of the host that holds the bytes (a bucket never mixes hosts), and the planner
// interleaves every rank of every host, so all hosts' H2D links work at once. Pure.
import { InputError } from "../base/errors";
import type { Backend } from "../base/backend";
import { type TensorRef, spreadOverRanks } from "../core/planner";
import { type UpdatePlan, planUpdate } from "../core/sizing";
import { checkHolders } from "../p2p/layout";

/** What one host says it holds of a checkpoint, and the room it has. */
export interface HostPart {
  host: number;
  /** Global rank of the host's first device; its devices are firstRank … firstRank + ndev − 1. */
  firstRank: number;
  ndev: number;
  /** Smallest free device memory of the host, counting the buffers it holds already. */
  freeBytes: number;
  version: number;
  /** digest: the tensor's (docs/digest.md), when the host registered it with digests */
  files: { path: string; tensors: { name: string; dtype: string; shape: number[]; nbytes: number; offset: number; digest?: string }[] }[];
}

/** Every tensor's digest, gathered from the hosts' parts; undefined when any host has none (nothing to verify against). */
export function clusterDigests(parts: HostPart[]): Record<string, string> | undefined {
  const out: Record<string, string> = {};
  for (const p of parts) {
    for (const f of p.files) {
      for (const t of f.tensors) {
        if (t.digest === undefined) return undefined;
        out[t.name] = t.digest;
      }
    }
  }
  return out;
}

export interface ClusterPlan extends UpdatePlan {
  /** Region r of the plan's copies is files[r]: the file `path` on host `host`. */
  files: { host: number; path: string }[];
  nranks: number;
}

export function planCluster(input: {
  checkpoint: string;
  backend: Backend;
  parts: HostPart[];
  bucketBytes?: number;
  slots?: number;
}): ClusterPlan {
  const parts = [...input.parts].sort((a, b) => a.host - b.host);
  checkHolders(input.checkpoint, parts);
  const files: { host: number; path: string }[] = [];
  const perRank: TensorRef[][] = [];
  for (const p of parts) {
    if (p.firstRank !== perRank.length) throw new RangeError(`host ${p.host}: first rank ${p.firstRank}, expected ${perRank.length}`);
    const refs: TensorRef[] = [];
    for (const f of p.files) {
      const region = files.push({ host: p.host, path: f.path }) - 1;
      for (const t of f.tensors) {
        refs.push({ name: t.name, dtype: t.dtype, shape: t.shape, nbytes: t.nbytes, region, offset: t.offset });
      }
    }
    perRank.push(...spreadOverRanks(refs, p.ndev));
  }
  const nranks = parts.reduce((s, p) => s + p.ndev, 0);
  const planned = planUpdate({
    backend: input.backend,
    tensors: perRank.flat(),
    perRank,
    ndev: nranks,
    broadcast: true,
    freeBytes: Math.min(...parts.map((p) => p.freeBytes)),
    bucketBytes: input.bucketBytes,
    slots: input.slots,
  });
  return { ...planned, files, nranks };
}

/**
 * The hosts whose devices are exactly `ranks` (global ranks: each host's devices follow the previous
 * host's, in host order). A P2P update moves whole hosts (a new instance's GPUs): a rank list that
 * splits a host, or names no host, is an error that says which ranks each host has.
 */
export function hostsOfRanks(hosts: { rank: number; ndev: number }[], ranks: number[]): number[] {
  const wanted = new Set(ranks);
  const sorted = [...hosts].sort((a, b) => a.rank - b.rank);
  const spans = sorted.map((h, i) => {
    const first = sorted.slice(0, i).reduce((s, x) => s + x.ndev, 0);
    return { host: h.rank, ranks: Array.from({ length: h.ndev }, (_, k) => first + k) };
  });
  const known = new Set(spans.flatMap((s) => s.ranks));
  const unknown = ranks.filter((r) => !known.has(r));
  const of = (s: { ranks: number[] }) => (s.ranks.length === 1 ? `rank ${s.ranks[0]}` : `ranks ${s.ranks[0]}..${s.ranks.at(-1)}`);
  const say = spans.map((s) => `host ${s.host} has ${of(s)}`).join(", ");
  if (ranks.length === 0 || unknown.length > 0) {
    const what = ranks.length === 0 ? "ranks [] name no device" : unknown.length === 1 ? `rank ${unknown[0]} is not in this cluster` : `ranks ${unknown.join(", ")} are not in this cluster`;
    throw new InputError("E_RANKS", `${what}: ${say}`);
  }
  const out: number[] = [];
  for (const s of spans) {
    const n = s.ranks.filter((r) => wanted.has(r)).length;
    if (n === 0) continue;
    if (n < s.ranks.length) throw new InputError("E_RANKS", `ranks must name whole hosts: host ${s.host} has ${of(s)}, ${n} of them named (${say})`);
    out.push(s.host);
  }
  return out;
}
