// A delta between two versions in host memory, a pool's resident ones (DESIGN.md "Delta updates"): libce compares them
// in host memory on threads; an unchanged tensor is not sent, a changed one goes as a sparse patch
// (int32 positions + new values, written into a pinned scratch region) when that is smaller, dense
// (straight from the new version's slot) otherwise. What comes out is TensorRefs: the planner cuts
// patches into buckets like any tensor, and the pipeline moves them through the same slots.
import { CeError } from "../base/errors";
import { logger } from "../base/log";
import { digestThreads } from "../checkpoint/registry";
import { elementBytes } from "../checkpoint/safetensors";
import { ALIGN_BYTES, type TensorRef, alignUp } from "./planner";
import type { DeltaSummary } from "./report";
import type { Ctx } from "../native/ce";

const log = logger("delta");

const OP_TIMEOUT_MS = 10 * 60_000;

/** Positions are int32 (worker-protocol.json): a tensor of more elements always goes dense. */
export const MAX_PATCH_ELEMENTS = 2 ** 31;

export type Form = "same" | "sparse" | "dense";

/** A patch's bytes in a slot: its positions, then (256-aligned, like every tensor) its values. */
export function patchBytes(count: number, elemBytes: number): number {
  return alignUp(4 * count, ALIGN_BYTES) + count * elemBytes;
}

/** How one tensor travels, given how many of its elements changed. */
export function chooseForm(t: { dtype: string; nbytes: number }, changed: number): Form {
  if (changed === 0) return "same";
  const es = elementBytes(t.dtype);
  if (es === undefined || t.nbytes / es > MAX_PATCH_ELEMENTS) return "dense";
  return patchBytes(changed, es) < t.nbytes ? "sparse" : "dense";
}

export interface PatchPlace {
  name: string;
  count: number;
  /** in the scratch region */
  offset: number;
  /** from offset: where the values start */
  valuesOffset: number;
  nbytes: number;
}

export interface DeltaPlan {
  forms: Form[];
  patches: PatchPlace[];
  /** the scratch region's size: every patch, each 256-aligned */
  scratchBytes: number;
}

/**
 * Forms of every tensor and the scratch layout of the patches. Pure. An update of nothing would map
 * a buffer of nothing: when no tensor changed, the first non-empty one goes dense, so the update is
 * an ordinary one and the workers record the new version.
 */
export function planDelta(tensors: { name: string; dtype: string; nbytes: number }[], changed: number[]): DeltaPlan {
  const forms = tensors.map((t, i) => chooseForm(t, changed[i]!));
  if (!forms.some((f) => f !== "same")) {
    const first = tensors.findIndex((t) => t.nbytes > 0);
    forms[first < 0 ? 0 : first] = "dense";
  }
  const patches: PatchPlace[] = [];
  let at = 0;
  forms.forEach((f, i) => {
    if (f !== "sparse") return;
    const t = tensors[i]!;
    const count = changed[i]!;
    const nbytes = patchBytes(count, elementBytes(t.dtype)!);
    patches.push({ name: t.name, count, offset: at, valuesOffset: alignUp(4 * count, ALIGN_BYTES), nbytes });
    at = alignUp(at + nbytes, ALIGN_BYTES);
  });
  return { forms, patches, scratchBytes: at };
}

/** A delta ready to plan: what it sends, and the scratch region its patches live in until released. */
export interface Delta {
  /** the version it was computed against: it applies onto exactly that one */
  base: number;
  tensors: TensorRef[];
  /** every tensor of the version: what the workers' digests must cover after it */
  names: string[];
  stats: DeltaSummary;
  release(): Promise<void>;
}

/** A tensor of both versions: at the same offset of each one's region (a pool's layout). */
export interface PlacedTensor {
  name: string;
  dtype: string;
  shape: number[];
  offset: number;
  nbytes: number;
}

/** The sparse tensors' patches of some tensors, in a pinned scratch region of their own until released. */
export interface Encoded {
  region: number;
  patches: Map<string, PatchPlace>;
  bytes: number;
  seconds: number;
  release(): Promise<void>;
}

/** Sub-byte and odd dtypes are compared as bytes: enough to know whether they changed (they go dense). */
function compareWidth(t: { dtype: string }): number {
  return elementBytes(t.dtype) ?? 1;
}

/**
 * Encodes the patches of those of `tensors` whose counts make them sparse (chooseForm) into a
 * scratch region pinned for them: undefined when none is. Both regions stay as they are meanwhile.
 */
export async function encodePatches(
  ctx: Ctx,
  o: { tensors: PlacedTensor[]; counts: number[]; oldRegion: number; newRegion: number; threads?: number },
): Promise<Encoded | undefined> {
  // planDelta's scratch layout of these tensors: its forced dense tensor (nothing changed) needs no patch.
  const { patches, scratchBytes: at } = planDelta(o.tensors, o.counts);
  const index = new Map(o.tensors.map((t, i) => [t.name, i]));
  if (!patches.length) return undefined;
  const t0 = performance.now();
  const a = ctx.regionAlloc(at);
  let held = true;
  const release = async () => {
    if (!held) return;
    held = false;
    await ctx.wait(ctx.regionRelease(a.region), { timeoutMs: OP_TIMEOUT_MS, what: "releasing a delta's scratch region" });
  };
  try {
    await ctx.wait(a.op, { timeoutMs: OP_TIMEOUT_MS, what: `pinning ${at} bytes of scratch for patches` });
    const enc = new BigUint64Array(patches.length * 10);
    patches.forEach((p, k) => {
      const t = o.tensors[index.get(p.name)!]!;
      enc.set(
        [BigInt(o.oldRegion), BigInt(t.offset), BigInt(o.newRegion), BigInt(t.offset), BigInt(t.nbytes), BigInt(compareWidth(t)), BigInt(a.region), BigInt(p.offset), BigInt(p.offset + p.valuesOffset), BigInt(p.count)],
        10 * k,
      );
    });
    await ctx.deltaEncode(enc, { threads: o.threads ?? digestThreads(), timeoutMs: OP_TIMEOUT_MS });
  } catch (err) {
    await release().catch(() => undefined);
    throw err;
  }
  return { region: a.region, patches: new Map(patches.map((p) => [p.name, p])), bytes: at, seconds: (performance.now() - t0) / 1000, release };
}

/**
 * The delta from version `base` (region oldRegion) to the new one (newRegion), both laid out as
 * `layout`. The caller keeps both regions from being rewritten meanwhile. `prepared`: what a pool
 * found as the version arrived: every tensor's count (the compare is not repeated) and, when all
 * came through, the sparse tensors' patches (not encoded again, and not released with the delta).
 */
export async function computeDelta(
  ctx: Ctx,
  o: {
    layout: PlacedTensor[];
    base: number;
    oldRegion: number;
    newRegion: number;
    threads?: number;
    prepared?: { counts: number[]; compareSeconds: number; encoded?: Encoded[] };
  },
): Promise<Delta> {
  const threads = o.threads ?? digestThreads();
  const { layout } = o;
  let counts: number[];
  let compareSeconds: number;
  if (o.prepared) {
    ({ counts, compareSeconds } = o.prepared);
  } else {
    const spans = new BigUint64Array(layout.length * 6);
    layout.forEach((t, i) => spans.set([BigInt(o.oldRegion), BigInt(t.offset), BigInt(o.newRegion), BigInt(t.offset), BigInt(t.nbytes), BigInt(compareWidth(t))], 6 * i));
    const t0 = performance.now();
    ({ counts } = await ctx.deltaCount(spans, { threads, timeoutMs: OP_TIMEOUT_MS }));
    compareSeconds = (performance.now() - t0) / 1000;
  }
  const plan = planDelta(layout, counts);

  const ready = o.prepared?.encoded;
  let own: Encoded | undefined;
  try {
    if (!ready) own = await encodePatches(ctx, { tensors: layout, counts, oldRegion: o.oldRegion, newRegion: o.newRegion, threads });
  } catch (err) {
    throw new CeError("E_DELTA", `computing the delta from version ${o.base}: ${(err as Error).message}`, { cause: err });
  }
  const sources = ready ?? (own ? [own] : []);
  const patchOf = new Map(sources.flatMap((e) => [...e.patches.values()].map((p) => [p.name, { p, region: e.region }] as const)));

  const tensors: TensorRef[] = [];
  for (const [i, t] of layout.entries()) {
    const form = plan.forms[i]!;
    if (form === "dense") tensors.push({ name: t.name, dtype: t.dtype, shape: t.shape, nbytes: t.nbytes, region: o.newRegion, offset: t.offset });
    if (form !== "sparse") continue;
    const found = patchOf.get(t.name);
    if (!found) {
      await own?.release().catch(() => undefined);
      throw new CeError("E_DELTA", `tensor ${t.name}: sparse in the delta from version ${o.base}, but no patch was encoded for it`);
    }
    tensors.push({ name: t.name, dtype: t.dtype, shape: t.shape, nbytes: found.p.nbytes, region: found.region, offset: found.p.offset, patch: { count: found.p.count, valuesOffset: found.p.valuesOffset } });
  }
  const fullBytes = layout.reduce((s, t) => s + t.nbytes, 0);
  const stats: DeltaSummary = {
    base: o.base,
    tensors: layout.length,
    same: plan.forms.filter((f) => f === "same").length,
    sparse: plan.patches.length,
    dense: plan.forms.filter((f) => f === "dense").length,
    changedElements: counts.reduce((s, c) => s + c, 0),
    bytes: tensors.reduce((s, t) => s + t.nbytes, 0),
    fullBytes,
    compareSeconds,
    compareGbps: compareSeconds > 0 ? fullBytes / compareSeconds / 1e9 : 0,
    compared: o.prepared ? "while arriving" : "at update",
    encodeSeconds: own?.seconds ?? (ready ?? []).reduce((n, e) => n + e.seconds, 0),
    encoded: ready ? "while arriving" : "at update",
  };
  log.debug(
    `delta from version ${o.base}: ${stats.same} unchanged, ${stats.sparse} sparse, ${stats.dense} dense; ${stats.bytes} of ${fullBytes} bytes; compared ${stats.compared} at ${stats.compareGbps.toFixed(1)} GB/s`,
  );
  return { base: o.base, tensors, names: layout.map((t) => t.name), stats, release: async () => own?.release() };
}
