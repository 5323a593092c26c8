// ce bench --pool: the RL step end to end. A separate trainer process (python -m ce_client.bench)
// holds a state dict of the model's layout on its device and pushes it into a resident pool of an
// in-process ce serve, version after version; each update streams behind its push. Reported: push
// (the trainer's copies into the pinned slot), tail (from the last byte written until every engine
// serves the version), end to end, and a rollback.
import { rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Updater } from "../app/updater";
import { CeError } from "../base/errors";
import { log } from "../base/log";
import { formatBytes, formatSeconds } from "../base/units";
import { loadShapes } from "../checkpoint/synth-writer";
import { writeTrace } from "../core/report";
import type { UpdateSummary } from "../core/update";
import { pythonPath } from "../engines/workers";
import { Daemon } from "../serve/daemon";
import { MAX_LAYOUT_BODY_BYTES, route } from "../serve/routes";
import { type Stats, stats } from "../bench/stats";


export interface PoolBenchResult {
  model: string;
  bytes: number;
  tensors: number;
  devices: string[];
  trainerDevice: string;
  repeat: number;
  push: Stats;
  tail: Stats;
  total: Stats;
  /** the update's own seconds (begin to every engine finished: it starts with the push) */
  update: Stats;
  publishSeconds: Stats;
  digestSeconds: Stats;
  verified: boolean;
  rollbackSeconds: number | null;
  gbps: number;
}

interface PushLine {
  version: number;
  push: number;
  tail: number;
  total: number;
  reply: { publishSeconds: number; digestSeconds: number; update: Omit<UpdateSummary, "trace"> };
}

export async function poolBench(
  up: Updater,
  o: { model: string; repeat: number; python: string; trainerDevice: string; poolSlots: number; bucketBytes?: number; slots?: number; timeoutMs: number; verify: boolean; trace?: string },
): Promise<PoolBenchResult> {
  const shapes = await loadShapes(o.model);
  const layout = shapes.tensors.map((t) => ({ name: t.name, dtype: t.dtype ?? shapes.dtype, shape: t.shape }));
  const daemon = new Daemon(up, { bucketBytes: o.bucketBytes, slots: o.slots, timeoutMs: o.timeoutMs, roots: [], verify: o.verify });
  const socket = join(tmpdir(), `ce-bench-pool-${process.pid}.sock`);
  rmSync(socket, { force: true });
  const server = Bun.serve({ unix: socket, fetch: (req) => route(daemon, req), maxRequestBodySize: MAX_LAYOUT_BODY_BYTES });
  try {
    const pool = (await daemon.pools.create({ name: "bench", layout, slots: o.poolSlots })) as { bytes: number; tensors: number; hostBytes: number };
    log.info(`pool of ${layout.length} tensors, ${o.poolSlots} slot${o.poolSlots === 1 ? "" : "s"} of ${formatBytes(pool.bytes)} pinned; the trainer builds its state dict on ${o.trainerDevice}`);
    const py = pythonPath();
    // The first push into each slot registers it with the trainer's CUDA context (seconds, once):
    // a warm-up per slot, so that the timed pushes are the RL steps that follow.
    const warmups = o.poolSlots;
    const proc = Bun.spawn([o.python, "-m", "ce_client.bench", "--socket", socket, "--pool", "bench", "--device", o.trainerDevice, "--repeat", String(o.repeat + warmups)], {
      stdin: "ignore",
      stdout: "pipe",
      stderr: "pipe",
      env: { ...process.env, ...(py ? { PYTHONPATH: [py, process.env.PYTHONPATH].filter(Boolean).join(":") } : {}) },
    });
    const [out, err, code] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text(), proc.exited]);
    if (code !== 0) throw new CeError("E_BENCH_TRAINER", `the trainer process exited ${code}: ${err.trim().split("\n").slice(-8).join("\n")}`);
    const lines = out
      .split("\n")
      .filter((l) => l.startsWith("{"))
      .map((l) => JSON.parse(l) as PushLine);
    for (const l of lines) {
      log.info(`${l.version <= warmups ? `warm-up ${l.version}/${warmups}` : `push ${l.version - warmups}/${o.repeat}`}: push ${formatSeconds(l.push)}, then ${formatSeconds(l.tail)} until every engine serves it: ${formatSeconds(l.total)} end to end`);
    }
    const timed = lines.slice(warmups);
    const lastPush = daemon.lastUpdate;
    if (o.trace && lastPush) writeTrace(o.trace, lastPush);
    // One slot keeps no earlier version: nothing to roll back to.
    let rollbackSeconds: number | null = null;
    if (o.poolSlots > 1) {
      const t0 = performance.now();
      await daemon.pools.rollback("bench");
      rollbackSeconds = (performance.now() - t0) / 1000;
    }
    const last = timed.at(-1)!.reply.update;
    const total = stats(timed.map((l) => l.total));
    await daemon.pools.delete("bench");
    return {
      model: o.model,
      bytes: last.bytes,
      tensors: last.tensors,
      devices: last.devices,
      trainerDevice: o.trainerDevice,
      repeat: timed.length,
      push: stats(timed.map((l) => l.push)),
      tail: stats(timed.map((l) => l.tail)),
      total,
      update: stats(timed.map((l) => l.reply.update.seconds)),
      publishSeconds: stats(timed.map((l) => l.reply.publishSeconds)),
      digestSeconds: stats(timed.map((l) => l.reply.digestSeconds)),
      verified: last.verified !== null,
      rollbackSeconds,
      gbps: last.bytes / total.median / 1e9,
    };
  } finally {
    await server.stop(true);
    rmSync(socket, { force: true });
  }
}

export function poolTable(r: PoolBenchResult): string {
  const s = (x: Stats) => `median ${formatSeconds(x.median)} (min ${formatSeconds(x.min)}, max ${formatSeconds(x.max)})`;
  const rows: [string, string][] = [
    ["model", `${r.model}: ${formatBytes(r.bytes)}, ${r.tensors} tensors`],
    ["trainer", `a separate process, state dict on ${r.trainerDevice}`],
    ["engines", r.devices.join(", ")],
    ["push", `${s(r.push)}: trainer's copies into the pinned slot`],
    ["tail", `${s(r.tail)}: last byte written → every engine serves it`],
    ["end to end", `${s(r.total)} over ${r.repeat}, ${r.gbps.toFixed(1)} GB/s`],
    ["update", `${s(r.update)} (starts with the push)`],
    ["digests", `${s(r.digestSeconds)} of digest ops, while the bytes arrive; verify ${r.verified ? "on" : "off"}`],
    ["rollback", r.rollbackSeconds === null ? "none: a pool of one slot keeps no earlier version" : `${formatSeconds(r.rollbackSeconds)} (the previous version from its resident slot)`],
  ];
  const w = Math.max(...rows.map(([k]) => k.length));
  return `${rows.map(([k, v]) => `${k.padEnd(w)}  ${v}`).join("\n")}\n`;
}
