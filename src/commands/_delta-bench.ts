// ce bench --delta FRACTION: delta updates of a resident pool against full ones, inside ce (no
// trainer process). Version 1 is random bytes of the model's layout; version 2 is version 1 with
// FRACTION of the elements of most tensors changed, spread sparsely, as an optimizer step changes
// them. Reported: the compare's rate, bytes moved and time of the delta, and the dense update of the
// same version (its bytes and time, and the host's floor for those bytes) beside it.
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

export interface DeltaBenchResult {
  model: string;
  fraction: number;
  devices: string[];
  /** seconds: the update's; totalSeconds: with the compare and the encoding before it */
  delta: DeltaSummary & { seconds: number; totalSeconds: number };
  dense: { bytes: number; seconds: number; floorSeconds: number; binding: string };
  /** the dense update's time over the delta's, compare and encoding included */
  speedup: number;
}

/** Every 10th tensor is left alone: an optimizer step changes most tensors, not every one. */
const UNTOUCHED_EVERY = 10;

export async function deltaBench(up: Updater, o: { model: string; fraction: number; timeoutMs: number; bucketBytes?: number; slots?: number }): Promise<DeltaBenchResult> {
  if (!(o.fraction > 0 && o.fraction <= 1)) throw new UsageError(`--delta ${o.fraction}: a fraction of the values, above 0 and at most 1`);
  const shapes = await loadShapes(o.model);
  const tensors = shapes.tensors.map((t) => ({ name: t.name, dtype: t.dtype ?? shapes.dtype, shape: t.shape }));
  const daemon = new Daemon(up, { bucketBytes: o.bucketBytes, slots: o.slots, timeoutMs: o.timeoutMs, roots: [], verify: true, delta: true });
  try {
    const made = (await daemon.pools.create({ name: "bench", layout: tensors, slots: 3 })) as { layout: PlacedTensor[]; bytes: number };
    const layout = made.layout;
    const v1 = (await daemon.pools.begin("bench", { version: 1 })) as { path: string };
    fillRandom(v1.path, made.bytes);
    const v2 = (await daemon.pools.begin("bench", { version: 2 })) as { path: string };
    log.info(`writing version 2: ${(o.fraction * 100).toPrecision(3)}% of the values of ${layout.length - Math.ceil(layout.length / UNTOUCHED_EVERY)} of ${layout.length} tensors changed`);
    stepFrom(v1.path, v2.path, layout, o.fraction);
    await daemon.pools.publish("bench", 1, { update: true, delta: false });
    await daemon.pools.publish("bench", 2, {});
    const delta = (await daemon.update({ pool: "bench", version: 2 })) as Summary;
    if (!delta.delta) throw new UsageError("the update of version 2 did not go as a delta (see the log for why)");
    log.info(`delta: ${formatBytes(delta.bytes)} of ${formatBytes(delta.delta.fullBytes)} in ${formatSeconds(delta.seconds)}; compared at ${delta.delta.compareGbps.toFixed(1)} GB/s`);
    // The dense update of the same version from the same state: back on 1, then 2 whole.
    await daemon.update({ pool: "bench", version: 1, delta: false });
    const dense = (await daemon.update({ pool: "bench", version: 2, delta: false })) as Summary;
    const ceilings = await measureCeilings(up.ctx, { bytes: Math.min(1024 ** 3, Math.max(64 << 20, dense.slotBytes)), repeat: 3, bcastBytes: dense.slotBytes, broadcast: up.session.broadcast });
    const floor = floorSeconds(dense.bytes, ceilings);
    return {
      model: o.model,
      fraction: o.fraction,
      devices: dense.devices,
      delta: { ...delta.delta, seconds: delta.seconds, totalSeconds: delta.seconds + delta.delta.compareSeconds + delta.delta.encodeSeconds },
      dense: { bytes: dense.bytes, seconds: dense.seconds, floorSeconds: floor.seconds, binding: floor.binding },
      speedup: dense.seconds / (delta.seconds + delta.delta.compareSeconds + delta.delta.encodeSeconds),
    };
  } finally {
    await daemon.close();
  }
}

const CHUNK = 16 << 20;

function fillRandom(path: string, bytes: number): void {
  const fd = openSync(path, "r+");
  try {
    const buf = Buffer.alloc(CHUNK);
    for (let at = 0; at < bytes; at += CHUNK) {
      const n = Math.min(CHUNK, bytes - at);
      randomFillSync(buf, 0, n);
      writeSync(fd, buf, 0, n, at);
    }
  } finally {
    closeSync(fd);
  }
}

/** Version 2 from version 1, tensor by tensor: `fraction` of each touched tensor's elements get a new first byte. */
function stepFrom(from: string, to: string, layout: PlacedTensor[], fraction: number): void {
  const src = openSync(from, "r");
  const dst = openSync(to, "r+");
  const pick = new Uint32Array(1 << 16);
  try {
    layout.forEach((t, i) => {
      if (t.nbytes === 0) return;
      const buf = Buffer.alloc(t.nbytes);
      readSync(src, buf, 0, t.nbytes, t.offset);
      const es = elementBytes(t.dtype) ?? 1;
      const n = Math.floor(t.nbytes / es);
      if (i % UNTOUCHED_EVERY !== 0) {
        for (let left = Math.max(1, Math.round(n * fraction)); left > 0; left -= pick.length) {
          randomFillSync(pick);
          for (let k = 0; k < Math.min(left, pick.length); k++) buf[(pick[k]! % n) * es] ^= 0x01 | (pick[k]! >>> 24);
        }
      }
      writeSync(dst, buf, 0, t.nbytes, t.offset);
    });
  } finally {
    closeSync(src);
    closeSync(dst);
  }
}

export function deltaTable(r: DeltaBenchResult): string {
  const d = r.delta;
  const rows: [string, string][] = [
    ["model", `${r.model}: ${formatBytes(d.fullBytes)}, ${d.tensors} tensors`],
    ["version 2", `${(r.fraction * 100).toPrecision(3)}% of the values of most tensors changed (${d.changedElements} elements)`],
    ["compare", `${formatSeconds(d.compareSeconds)}: ${d.compareGbps.toFixed(1)} GB/s of a version (both read), patches encoded in ${formatSeconds(d.encodeSeconds)}`],
    ["forms", `${d.same} unchanged, ${d.sparse} sparse, ${d.dense} dense`],
    ["delta update", `${formatBytes(d.bytes)} moved in ${formatSeconds(d.seconds)}, ${formatSeconds(d.totalSeconds)} with compare and encoding (verified: every tensor's digest on every worker)`],
    ["dense update", `${formatBytes(r.dense.bytes)} in ${formatSeconds(r.dense.seconds)} (verified); floor ${formatSeconds(r.dense.floorSeconds)} (${r.dense.binding})`],
    ["delta / dense", `${((d.bytes / r.dense.bytes) * 100).toFixed(1)}% of the bytes, ${r.speedup.toFixed(2)}x faster`],
  ];
  const w = Math.max(...rows.map(([k]) => k.length));
  return `${rows.map(([k, v]) => `${k.padEnd(w)}  ${v}`).join("\n")}\n`;
}
