// How an update's summary reads: the story at info level, and the per-bucket timeline as a Chrome
// trace-event file (open it in Perfetto to see H2D, broadcast and reload overlap).
import { writeFileSync } from "node:fs";
import { formatBytes, formatRate, formatSeconds, gbps } from "../base/units";
import type { BucketTrace } from "./pipeline";

/** What a delta update left out and how it chose (pool/delta.ts); `bytes` of the summary is what it moved. */
export interface DeltaSummary {
  /** the version it was computed against */
  base: number;
  tensors: number;
  same: number;
  sparse: number;
  dense: number;
  changedElements: number;
  /** what the update moves: dense tensors plus patches */
  bytes: number;
  /** what a full update moves: the dense floor a delta is measured against */
  fullBytes: number;
  compareSeconds: number;
  /** one version's bytes compared per second (both versions are read) */
  compareGbps: number;
  /** when: while the version's bytes arrived (off the update's path), or when the update was asked for */
  compared: "while arriving" | "at update";
  /** the same for the patches' encoding (encodeSeconds: its time, wherever it ran) */
  encoded: "while arriving" | "at update";
  encodeSeconds: number;
}

export interface UpdateSummary {
  checkpoint: string;
  version: number;
  backend: string;
  devices: string[];
  engine: string;
  bytes: number;
  tensors: number;
  buckets: number;
  bucketBytes: number;
  slotBytes: number;
  slots: number;
  staging: number;
  mode: "direct" | "broadcast";
  fallbacks: string[];
  seconds: number;
  gbps: number;
  /** Seconds from the start: plan, buffers; `open` until every worker mapped the buffer (the first
   *  H2Ds run meanwhile); `data` from then to the last load reply; release + finish. */
  phases: { plan: number; buffers: number; open: number; data: number; close: number };
  /** Busy seconds of each stage summed over buckets (stages overlap, so they add up to more than `data`). */
  stages: { h2d: number; bcast: number; reload: number };
  registerSeconds: number;
  inPlace: boolean;
  /** Tensors whose digests every worker reported equal to the version's; null: not verified. */
  verified: number | null;
  deviceBytes: number;
  /** set: a delta update against delta.base; absent: every tensor went whole */
  delta?: DeltaSummary;
  trace: BucketTrace[];
}

/** performance.now() at the end of each phase. */
export interface PhaseMarks {
  start: number;
  planned: number;
  buffers: number;
  opened: number;
  data: number;
  end: number;
}

type Facts = Omit<UpdateSummary, "seconds" | "gbps" | "phases" | "stages" | "trace">;

/** The time covered by some span (ms), overlaps counted once. */
export function unionMs(spans: [number, number][]): number {
  let total = 0;
  let end = -Infinity;
  for (const [a, b] of [...spans].sort((x, y) => x[0] - y[0])) {
    if (b <= end) continue;
    total += b - Math.max(a, end);
    end = b;
  }
  return total;
}

/** The summary of a finished update, from what it was and when each phase ended. */
export function buildSummary(facts: Facts, t: PhaseMarks, trace: BucketTrace[]): UpdateSummary {
  const seconds = (t.end - t.start) / 1000;
  const busy = (spans: ([number, number] | undefined)[]) => spans.reduce((s, x) => s + (x ? x[1] - x[0] : 0), 0) / 1000;
  // A bucket copied in pieces was busy while a piece was copying, not while it waited for bytes.
  const h2dBusy = trace.reduce((s, b) => s + unionMs(b.pieces ?? (b.h2d ? [b.h2d] : [])), 0) / 1000;
  return {
    ...facts,
    seconds,
    gbps: gbps(facts.bytes, seconds),
    phases: {
      plan: (t.planned - t.start) / 1000,
      buffers: (t.buffers - t.planned) / 1000,
      open: (t.opened - t.buffers) / 1000,
      data: (t.data - t.opened) / 1000,
      close: (t.end - t.data) / 1000,
    },
    stages: {
      h2d: h2dBusy,
      bcast: busy(trace.map((b) => b.bcast)),
      reload: busy(trace.map((b) => [Math.min(...b.reload.map((r) => r[0])), Math.max(...b.reload.map((r) => r[1]))] as [number, number])),
    },
    trace,
  };
}

export function summaryLines(s: UpdateSummary): string[] {
  const pct = (x: number) => `${((x / s.seconds) * 100).toFixed(0)}%`;
  return [
    `updated ${s.checkpoint}@${s.version}: ${formatBytes(s.bytes)} in ${s.tensors} tensors, ${s.buckets} buckets → ${s.devices.length} ${s.backend === "cuda" ? "GPU" : "CPU device"}${s.devices.length === 1 ? "" : "s"} (${s.engine})`,
    `  ${formatSeconds(s.seconds)}, ${formatRate(s.bytes, s.seconds)}; ${s.mode} path, buckets of ${formatBytes(s.slotBytes)}, ${s.slots} slots${s.staging ? ` + ${s.staging} staging` : ""}, ${formatBytes(s.deviceBytes)} of device buffers`,
    `  phases: plan ${formatSeconds(s.phases.plan)}, buffers ${formatSeconds(s.phases.buffers)}, open ${formatSeconds(s.phases.open)}, data ${formatSeconds(s.phases.data)} (${pct(s.phases.data)}), release+finish ${formatSeconds(s.phases.close)}`,
    `  stage busy time: H2D ${formatSeconds(s.stages.h2d)}${s.mode === "broadcast" ? `, broadcast ${formatSeconds(s.stages.bcast)}` : ""}, reload ${formatSeconds(s.stages.reload)}`,
    `  registration: ${formatSeconds(s.registerSeconds)} (${s.inPlace ? "pinned in place" : "read into pinned memory"})`,
    `  verify: ${s.verified === null ? "off" : `every worker's digests of ${s.verified} tensors equal the version's`}`,
    ...(s.delta
      ? [
          `  delta from version ${s.delta.base}: ${s.delta.same} tensors unchanged, ${s.delta.sparse} sparse, ${s.delta.dense} dense; ${formatBytes(s.delta.bytes)} of ${formatBytes(s.delta.fullBytes)}; compared at ${s.delta.compareGbps.toFixed(1)} GB/s in ${formatSeconds(s.delta.compareSeconds)}, patches encoded in ${formatSeconds(s.delta.encodeSeconds)}`,
        ]
      : []),
    ...s.fallbacks.map((f) => `  fallback: ${f}`),
  ];
}

interface TraceEvent {
  name: string;
  cat: string;
  ph: "X" | "M";
  ts?: number;
  dur?: number;
  pid: number;
  tid: number;
  args?: Record<string, unknown>;
}

/** Chrome trace events: one process per device, one thread per stage; times in µs. A version
 *  still being pushed adds a "source" thread: each bucket's span ends when the pipeline had its last bytes (at their arrival, unless it was behind). */
export function traceEvents(s: UpdateSummary): TraceEvent[] {
  const events: TraceEvent[] = [];
  const stages = ["H2D", "broadcast", "reload", ...(s.trace.some((b) => b.ready !== undefined) ? ["source"] : [])];
  s.devices.forEach((uuid, d) => {
    events.push({ name: "process_name", cat: "__metadata", ph: "M", pid: d, tid: 0, args: { name: `device ${d} ${uuid}` } });
    stages.forEach((st, tid) => events.push({ name: "thread_name", cat: "__metadata", ph: "M", pid: d, tid, args: { name: st } }));
  });
  const span = (name: string, cat: string, pid: number, tid: number, t: [number, number], args: Record<string, unknown>) =>
    events.push({ name, cat, ph: "X", ts: t[0] * 1000, dur: Math.max(0, t[1] - t[0]) * 1000, pid, tid, args });
  for (const b of s.trace) {
    const args = { bucket: b.index, owner: b.owner, slot: b.slot, bytes: b.bytes, tensors: b.tensors };
    if (b.pieces) b.pieces.forEach((p, k) => span(`H2D ${b.index}.${k}`, "h2d", b.owner, 0, p, args));
    else if (b.h2d) span(`H2D ${b.index}`, "h2d", b.owner, 0, b.h2d, args);
    if (b.bcast) s.devices.forEach((_, d) => span(`bcast ${b.index}`, "bcast", d, 1, b.bcast!, args));
    b.reload.forEach((r, d) => span(`reload ${b.index}`, "reload", d, 2, r, args));
  }
  let arrived = 0;
  for (const b of s.trace) {
    if (b.ready === undefined) continue;
    span(`bytes of ${b.index}`, "source", b.owner, 3, [arrived, b.ready], { bucket: b.index, bytes: b.bytes });
    arrived = b.ready;
  }
  return events;
}

export function writeTrace(path: string, s: UpdateSummary | UpdateSummary[]): void {
  const all = Array.isArray(s) ? s : [s];
  writeFileSync(path, JSON.stringify({ traceEvents: all.flatMap(traceEvents), displayTimeUnit: "ms" }));
}
