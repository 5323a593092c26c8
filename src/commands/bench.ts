// ce bench: full updates of a synthetic checkpoint of a real architecture into real workers,
// measured against the floor of the same host (bytes / the binding ceiling), in the same run.
import { defineCommand } from "citty";
import { type Ceilings, floorSeconds, measureCeilings } from "../bench/ceilings";
import { config } from "../base/config";
import { UsageError } from "../base/errors";
import { log, writeJson } from "../base/log";
import { register, unregister } from "../checkpoint/registry";
import { writeTrace } from "../core/report";
import { cleanupOnSignal } from "../app/signals";
import { type Updater, openUpdater } from "../app/updater";
import { synthesize } from "../checkpoint/synth";
import { formatBytes, formatSeconds, gbps } from "../base/units";
import type { UpdateSummary } from "../core/update";
import { deviceArgs, outputArgs, planArgs, planOptions, updaterOptions } from "./_args";
import { deltaBench, deltaTable, parseFractions } from "./_delta-bench";
import { poolBench, poolTable } from "./_pool-bench";
import { type Stats, stats } from "../bench/stats";


export interface BenchResult {
  model: string;
  backend: string;
  devices: string[];
  worker: string;
  bytes: number;
  tensors: number;
  buckets: number;
  bucketBytes: number;
  slots: number;
  staging: number;
  repeat: number;
  ceilings: Ceilings;
  floor: { seconds: number; binding: string };
  seconds: Stats;
  gbps: number;
  /** floor / median: 1.0 is the physical limit */
  fractionOfFloor: number;
  stages: { h2d: number; bcast: number; reload: number };
  phases: UpdateSummary["phases"];
  register: { inPlaceSeconds: number; releaseSeconds: number; copySeconds?: number; copyReleaseSeconds?: number };
  deviceBytes: number;
}

export default defineCommand({
  meta: { name: "bench", description: "benchmark full updates of a real architecture's shapes against this host's measured floor" },
  args: {
    model: { type: "string", description: "Qwen3-0.6B, Qwen3-8B, Qwen3-30B-A3B, or a shapes file ({name,dtype,tensors:[{name,shape}]})", default: "Qwen3-0.6B", valueHint: "MODEL" },
    worker: { type: "string", description: "ref (built-in receiver) or python (torch worker that copies into its own parameters)", default: "ref", valueHint: "ref|python" },
    repeat: { type: "string", description: "timed updates after one warm-up (with --pool: pushes after one warm-up per slot)", default: "5", valueHint: "N" },
    verify: { type: "boolean", description: "verify every update by digests (docs/digest.md): the timed runs then include the workers' digests", default: false },
    "copy-register": { type: "boolean", description: "also time registration by copying into pinned memory (what a checkpoint outside /dev/shm costs)", default: true },
    broadcast: { type: "boolean", description: "use the NCCL broadcast path even on one GPU", default: false },
    trace: { type: "string", description: "write the median update's per-bucket timeline as a Chrome trace (with --pool: the last push's update, with when the pipeline had each bucket's bytes)", valueHint: "FILE" },
    pool: {
      type: "boolean",
      description: "the RL step end to end: a trainer process (Python, torch) pushes the model's state dict into a resident pool, each update streaming behind its push",
      default: false,
    },
    delta: {
      type: "string",
      description: "delta updates of a resident pool: each version changes this fraction of the values of most tensors (0.01 = 1%; several: 0.001,0.01,0.1); reports the compare's rate, bytes moved and time against a dense update of the same version",
      valueHint: "FRACTION[,FRACTION...]",
    },
    "pool-slots": { type: "string", description: "with --pool: the pool's version slots (1 fits a model whose two copies do not fit in host memory; no rollback then)", default: "2", valueHint: "K" },
    "trainer-device": { type: "string", description: "with --pool: where the trainer's state dict lives (default: the first GPU, or cpu)", valueHint: "cuda:N|cpu" },
    timeout: { type: "string", description: `deadline for each update (default ${config.CE_TIMEOUT})`, valueHint: "10m" },
    ...deviceArgs,
    ...planArgs,
    ...outputArgs,
  },
  async run({ args }) {
    const repeat = Number(args.repeat);
    if (!Number.isSafeInteger(repeat) || repeat < 1) throw new UsageError(`--repeat "${args.repeat}" is not a positive whole number`);
    const { bucketBytes, slots, timeoutMs } = planOptions(args);
    const options = updaterOptions({ ...args, engine: "workers" });
    let up: Updater | undefined;
    const stopCleanup = cleanupOnSignal(() => up);
    if (args.delta !== undefined) {
      const fractions = parseFractions(args.delta);
      try {
        up = await openUpdater(options);
        const result = await deltaBench(up, { model: args.model, fractions, timeoutMs, bucketBytes, slots });
        if (args.json) writeJson({ ok: true, ...result });
        else process.stdout.write(deltaTable(result));
      } finally {
        await up?.close();
        stopCleanup();
      }
      return;
    }
    if (args.pool) {
      try {
        up = await openUpdater(options);
        const trainerDevice = args["trainer-device"] ?? (up.ctx.backend === "cuda" ? `cuda:${up.set.devices[0]!.ordinal}` : "cpu");
        const poolSlots = Number(args["pool-slots"]);
        if (!Number.isSafeInteger(poolSlots) || poolSlots < 1) throw new UsageError(`--pool-slots "${args["pool-slots"]}" is not a positive whole number`);
        const result = await poolBench(up, { model: args.model, repeat, python: config.CE_PYTHON, trainerDevice, poolSlots, bucketBytes, slots, timeoutMs, verify: args.verify, trace: args.trace });
        if (args.json) writeJson({ ok: true, ...result });
        else process.stdout.write(poolTable(result));
      } finally {
        await up?.close();
        stopCleanup();
      }
      return;
    }

    const t0 = performance.now();
    let lastShown = 0;
    const synth = await synthesize(args.model, 1, (done, total) => {
      if (performance.now() - lastShown > 5000) {
        lastShown = performance.now();
        log.info(`writing the checkpoint: ${formatBytes(done)} of ${formatBytes(total)}`);
      }
    });
    log.info(`checkpoint written in ${formatSeconds((performance.now() - t0) / 1000)}`);
    try {
      up = await openUpdater(options);
      try {
        const result = await bench(up, synth.ckpt, { model: args.model, worker: args.worker, repeat, bucketBytes, slots, timeoutMs, copyRegister: args["copy-register"], trace: args.trace, verify: args.verify });
        if (args.json) writeJson({ ok: true, ...result });
        else process.stdout.write(table(result));
      } finally {
        await up.close();
      }
    } finally {
      synth.remove();
      stopCleanup();
    }
  },
});

async function bench(
  up: Awaited<ReturnType<typeof openUpdater>>,
  ckpt: Awaited<ReturnType<typeof synthesize>>["ckpt"],
  o: { model: string; worker: string; repeat: number; bucketBytes?: number; slots?: number; timeoutMs: number; copyRegister: boolean; trace?: string; verify: boolean },
): Promise<BenchResult> {
  const { ctx, session } = up;
  const reg = await register(ctx, ckpt, { name: o.model, version: 1, digests: o.verify });
  log.info(`registered in place: ${formatSeconds(reg.registerSeconds)} (${reg.inPlace ? "pinned in place" : "read into pinned memory"})`);
  const runs: UpdateSummary[] = [];
  let ceilings: Ceilings;
  try {
    for (let i = 0; i <= o.repeat; i++) {
      const s = await session.update({ reg, bucketBytes: o.bucketBytes, slots: o.slots, timeoutMs: o.timeoutMs, verify: o.verify });
      log.info(`${i === 0 ? "warm-up" : `run ${i}/${o.repeat}`}: ${formatSeconds(s.seconds)}, ${gbps(s.bytes, s.seconds).toFixed(1)} GB/s (H2D busy ${formatSeconds(s.stages.h2d)}, reload ${formatSeconds(s.stages.reload)})`);
      if (i > 0) runs.push(s);
    }
    log.info("measuring the host's ceilings");
    // After the updates: communicators are up, and the slot buffers' memory is known to fit.
    ceilings = await measureCeilings(ctx, {
      bytes: Math.min(1024 ** 3, Math.max(64 << 20, runs[0]!.slotBytes)),
      repeat: 5,
      bcastBytes: runs[0]!.slotBytes,
      broadcast: session.broadcast,
    });
  } catch (err) {
    await unregister(ctx, reg);
    throw err;
  }
  const last = runs.at(-1)!;
  const releaseSeconds = await unregister(ctx, reg);
  let copySeconds: number | undefined;
  let copyReleaseSeconds: number | undefined;
  if (o.copyRegister) {
    const copied = await register(ctx, ckpt, { name: o.model, version: 1, inPlace: false });
    copySeconds = copied.registerSeconds;
    copyReleaseSeconds = await unregister(ctx, copied);
  }
  const seconds = stats(runs.map((r) => r.seconds));
  const medianRun = runs.find((r) => r.seconds === seconds.median) ?? last;
  if (o.trace) writeTrace(o.trace, medianRun);
  const floor = floorSeconds(last.bytes, ceilings);
  const mean = (f: (s: UpdateSummary) => number) => runs.reduce((a, r) => a + f(r), 0) / runs.length;
  return {
    model: o.model,
    backend: ctx.backend,
    devices: last.devices,
    worker: o.worker,
    bytes: last.bytes,
    tensors: last.tensors,
    buckets: last.buckets,
    bucketBytes: last.slotBytes,
    slots: last.slots,
    staging: last.staging,
    repeat: o.repeat,
    ceilings,
    floor,
    seconds,
    gbps: gbps(last.bytes, seconds.median),
    fractionOfFloor: floor.seconds / seconds.median,
    stages: { h2d: mean((r) => r.stages.h2d), bcast: mean((r) => r.stages.bcast), reload: mean((r) => r.stages.reload) },
    phases: medianRun.phases,
    register: { inPlaceSeconds: reg.registerSeconds, releaseSeconds, copySeconds, copyReleaseSeconds },
    deviceBytes: last.deviceBytes,
  };
}

function table(r: BenchResult): string {
  const c = r.ceilings;
  const rows: [string, string][] = [
    ["model", `${r.model}: ${formatBytes(r.bytes)}, ${r.tensors} tensors`],
    ["devices", `${r.backend}: ${r.devices.join(", ")}`],
    ["worker", r.worker],
    ["plan", `${r.buckets} buckets of ${formatBytes(r.bucketBytes)}, ${r.slots} slots${r.staging ? ` + ${r.staging} staging` : ""}`],
    ["pinned H2D", `${c.h2dGbps.map((g) => g.toFixed(1)).join(" / ")} GB/s per device${c.h2dGbps.length > 1 ? `, ${c.h2dAllGbps.toFixed(1)} GB/s all at once` : ""}`],
    ["D2D", `${c.d2dGbps.toFixed(0)} GB/s`],
    ...(c.bcastGbps !== undefined ? ([["broadcast", `${c.bcastGbps.toFixed(1)} GB/s`]] as [string, string][]) : []),
    ["floor", `${formatSeconds(r.floor.seconds)} (${r.floor.binding})`],
    ["update", `median ${formatSeconds(r.seconds.median)} (min ${formatSeconds(r.seconds.min)}, max ${formatSeconds(r.seconds.max)}) over ${r.repeat}, ${r.gbps.toFixed(1)} GB/s`],
    ["of the floor", `${(r.fractionOfFloor * 100).toFixed(1)}%`],
    ["stages (busy)", `H2D ${formatSeconds(r.stages.h2d)}${r.staging ? `, broadcast ${formatSeconds(r.stages.bcast)}` : ""}, reload ${formatSeconds(r.stages.reload)}`],
    ["phases (median)", `open ${formatSeconds(r.phases.open)}, data ${formatSeconds(r.phases.data)}, release+finish ${formatSeconds(r.phases.close)}`],
    ["registration", `in place ${formatSeconds(r.register.inPlaceSeconds)}, release ${formatSeconds(r.register.releaseSeconds)}${r.register.copySeconds !== undefined ? `; by copy ${formatSeconds(r.register.copySeconds)}, release ${formatSeconds(r.register.copyReleaseSeconds!)}` : ""}`],
    ["device memory", `${formatBytes(r.deviceBytes)} of slot and staging buffers`],
  ];
  const w = Math.max(...rows.map(([k]) => k.length));
  return `${rows.map(([k, v]) => `${k.padEnd(w)}  ${v}`).join("\n")}\n`;
}
