// ce bench --delta FRACTION[,FRACTION...]: delta updates of a resident pool against full ones, inside
// ce (no trainer process). Version 1 is random bytes of the model's layout; each fraction's version is
// version 1 with that fraction of the elements of most tensors changed, spread sparsely, as an
// optimizer step changes them. Per fraction: the engines, on version 1, get the new version as a
// delta, then (back on 1) the same version dense. Reported: the compare's rate, bytes
// moved and time of the delta, and the dense update with the host's floor for its bytes beside it.
import { randomFillSync } from "node:crypto";
import { closeSync, openSync, readSync, writeSync } from "node:fs";
import type { Updater } from "../app/updater";
import { floorSeconds, measureCeilings } from "../bench/ceilings";
import { UsageError } from "../base/errors";
import { log } from "../base/log";
import { formatBytes, formatSeconds } from "../base/units";
import { elementBytes } from "../checkpoint/safetensors";
import { loadShapes } from "../checkpoint/synth-writer";
import type { DeltaSummary, UpdateSummary } from "../core/report";
import type { PlacedTensor } from "../pool/layout";
import { Daemon } from "../serve/daemon";

type Summary = Omit<UpdateSummary, "trace">;

export interface DeltaRow {
  fraction: number;
  /** seconds: the update's; totalSeconds: with the compare and the encoding (wherever they ran) */
  delta: DeltaSummary & { seconds: number; totalSeconds: number };
  dense: { bytes: number; seconds: number };
  /** the dense update's time over the delta's update */
  speedup: number;
}

export interface DeltaBenchResult {
  model: string;
  devices: string[];
  /** the host's floor for a dense update: its bytes over the binding ceiling */
  floor: { seconds: number; binding: string };
  rows: DeltaRow[];
}

/** Every 10th tensor is left alone: an optimizer step changes most tensors, not every one. */
const UNTOUCHED_EVERY = 10;

/** "0.01,0.1" → [0.01, 0.1]; each above 0 and at most 1. */
export function parseFractions(arg: string): number[] {
  const out = arg.split(",").map((f) => Number(f.trim()));
  for (const [i, f] of out.entries()) {
    if (!(f > 0 && f <= 1)) throw new UsageError(`--delta "${arg.split(",")[i]}": a fraction of the values, above 0 and at most 1 (0.01 is 1%)`);
  }
  return out;
}

export async function deltaBench(up: Updater, o: { model: string; fractions: number[]; timeoutMs: number; bucketBytes?: number; slots?: number }): Promise<DeltaBenchResult> {
  const shapes = await loadShapes(o.model);
  const tensors = shapes.tensors.map((t) => ({ name: t.name, dtype: t.dtype ?? shapes.dtype, shape: t.shape }));
  const daemon = new Daemon(up, { bucketBytes: o.bucketBytes, slots: o.slots, timeoutMs: o.timeoutMs, roots: [], verify: true, delta: true });
  try {
    // Three slots: version 1, the fraction's version, and the next fraction's (the one before is evicted).
    const made = (await daemon.pools.create({ name: "bench", layout: tensors, slots: 3 })) as { layout: PlacedTensor[]; bytes: number };
    const layout = made.layout;
    const v1 = (await daemon.pools.begin("bench", { version: 1 })) as { path: string };
    fillRandom(v1.path, made.bytes);
    await daemon.pools.publish("bench", 1, {});
    const rows: DeltaRow[] = [];
    let dense: Summary | undefined;
    for (const [k, fraction] of o.fractions.entries()) {
      const version = k + 2;
      // Served, version 1 stays resident: the new version's slot is a free one or the last fraction's.
      await daemon.update({ pool: "bench", version: 1, delta: false });
      const v = (await daemon.pools.begin("bench", { version })) as { path: string };
      log.info(`writing version ${version}: ${percent(fraction)} of the values of ${layout.length - Math.ceil(layout.length / UNTOUCHED_EVERY)} of ${layout.length} tensors changed`);
      stepFrom(v1.path, v.path, layout, fraction, version);
      await daemon.pools.publish("bench", version, {});
      const delta = (await daemon.update({ pool: "bench", version })) as Summary;
      if (!delta.delta) throw new UsageError(`the update of version ${version} did not go as a delta (see the log for why)`);
      log.info(`delta: ${formatBytes(delta.bytes)} of ${formatBytes(delta.delta.fullBytes)} in ${formatSeconds(delta.seconds)}; compared at ${delta.delta.compareGbps.toFixed(1)} GB/s`);
      // The dense update of the same version from the same state: back on 1, then the version whole.
      await daemon.update({ pool: "bench", version: 1, delta: false });
      dense = (await daemon.update({ pool: "bench", version, delta: false })) as Summary;
      const d = delta.delta;
      rows.push({
        fraction,
        delta: { ...d, seconds: delta.seconds, totalSeconds: delta.seconds + d.compareSeconds + d.encodeSeconds },
        dense: { bytes: dense.bytes, seconds: dense.seconds },
        speedup: dense.seconds / delta.seconds,
      });
    }
    const ceilings = await measureCeilings(up.ctx, { bytes: Math.min(1024 ** 3, Math.max(64 << 20, dense!.slotBytes)), repeat: 3, bcastBytes: dense!.slotBytes, broadcast: up.session.broadcast });
    const floor = floorSeconds(dense!.bytes, ceilings);
    return { model: o.model, devices: dense!.devices, floor: { seconds: floor.seconds, binding: floor.binding }, rows };
  } finally {
    await daemon.close();
  }
}

const CHUNK = 64 << 20;

/** Random bytes: one random chunk written over and over (the compare cares that bytes differ, not how random they are). */
function fillRandom(path: string, bytes: number): void {
  const fd = openSync(path, "r+");
  try {
    const buf = randomFillSync(Buffer.alloc(CHUNK));
    for (let at = 0; at < bytes; at += CHUNK) writeSync(fd, buf, 0, Math.min(CHUNK, bytes - at), at);
  } finally {
    closeSync(fd);
  }
}

/** A version from version 1, tensor by tensor: `fraction` of each touched tensor's elements get a new first byte. */
function stepFrom(from: string, to: string, layout: PlacedTensor[], fraction: number, seed: number): void {
  const src = openSync(from, "r");
  const dst = openSync(to, "r+");
  // xorshift32: a few ns per pick, where crypto's random bytes would cost more than the compare being measured
  let x = (0x9e3779b9 ^ seed) >>> 0 || 1;
  try {
    layout.forEach((t, i) => {
      if (t.nbytes === 0) return;
      const buf = Buffer.alloc(t.nbytes);
      readSync(src, buf, 0, t.nbytes, t.offset);
      const es = elementBytes(t.dtype) ?? 1;
      const n = Math.floor(t.nbytes / es);
      if (i % UNTOUCHED_EVERY !== 0) {
        for (let left = Math.max(1, Math.round(n * fraction)); left > 0; left--) {
          x ^= x << 13;
          x ^= x >>> 17;
          x ^= x << 5;
          const r = x >>> 0;
          buf[Math.floor((r / 2 ** 32) * n) * es] ^= 0x01 | (r & 0xfe);
        }
      }
      writeSync(dst, buf, 0, t.nbytes, t.offset);
    });
  } finally {
    closeSync(src);
    closeSync(dst);
  }
}

function percent(f: number): string {
  return `${Number((f * 100).toPrecision(3))}%`;
}

export function deltaTable(r: DeltaBenchResult): string {
  const d0 = r.rows[0]!.delta;
  const head = [
    `${r.model}: ${formatBytes(d0.fullBytes)}, ${d0.tensors} tensors, on ${r.devices.join(", ")}; every update verified (each tensor's digest on every worker)`,
    `dense floor ${formatSeconds(r.floor.seconds)} (${r.floor.binding}); the compare and the encoding run in host memory as a version arrives ("arriving": here at publish, the bench writes the slot whole), else when the update is asked for, before it starts`,
  ];
  const cols = ["changed", "elements", "unchanged/sparse/dense", "moved", "delta update", "compare", "encode", "dense update", "delta/dense"];
  const rows = r.rows.map((x) => {
    const d = x.delta;
    return [
      percent(x.fraction),
      String(d.changedElements),
      `${d.same}/${d.sparse}/${d.dense}`,
      `${formatBytes(d.bytes)} (${((d.bytes / x.dense.bytes) * 100).toFixed(1)}%)`,
      formatSeconds(d.seconds),
      `${formatSeconds(d.compareSeconds)} (${d.compareGbps.toFixed(1)} GB/s${d.compared === "while arriving" ? ", arriving" : ""})`,
      `${formatSeconds(d.encodeSeconds)}${d.encoded === "while arriving" ? " (arriving)" : ""}`,
      formatSeconds(x.dense.seconds),
      `${x.speedup.toFixed(2)}x`,
    ];
  });
  const w = cols.map((c, i) => Math.max(c.length, ...rows.map((row) => row[i]!.length)));
  const line = (cells: string[]) => cells.map((c, i) => c.padEnd(w[i]!)).join("  ").trimEnd();
  return `${head.join("\n")}\n${[line(cols), ...rows.map(line)].join("\n")}\n`;
}
