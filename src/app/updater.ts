// What `ce update`, `ce bench` and `ce serve` all start from: the devices, a context, an engine and
// an update session over them, assembled from typed options (commands/_args.ts turns flags into them).
import { logger } from "../base/log";
import { type BackendChoice, type DeviceSelection, type DeviceSet, resolveDevices } from "../core/devices";
import { UpdateSession } from "../core/update";
import { HttpEngine } from "../engines/http";
import { SglangEngine } from "../engines/sglang";
import type { Engine } from "../engines/types";
import { type WorkerKind, WorkersEngine } from "../engines/workers";
import { Ctx } from "../native/ce";
import type { Dialect } from "../wire/dialect";

const log = logger("setup");

/** The engine to trigger: ce's own receivers, or a running engine's HTTP route. */
export type EngineSpec =
  | { kind: "workers"; worker: WorkerKind; /** interpreter for python workers */ python?: string }
  | { kind: "vllm" | "external"; endpoint: string; /** vllm: drop the prefix cache after an update */ resetPrefixCache?: boolean; summaries?: boolean }
  | { kind: "sglang"; endpoint: string; flushCache?: boolean; weightVersion?: string };

export interface UpdaterOptions {
  backend: BackendChoice;
  select?: DeviceSelection;
  engine: EngineSpec;
  /** Deadline for one worker reply. */
  opTimeoutMs: number;
  forceBroadcast?: boolean;
  dialect?: Dialect;
  /** Verify every update by digests unless a request says otherwise. */
  verify?: boolean;
}

export interface Updater {
  set: DeviceSet;
  ctx: Ctx;
  engine: Engine;
  session: UpdateSession;
  close(): Promise<void>;
}

export async function openUpdater(opts: UpdaterOptions): Promise<Updater> {
  const set = resolveDevices(opts.backend, opts.select);
  log.info(`${set.backend === "cuda" ? "GPUs" : "CPU devices"}: ${set.devices.map((d) => `${d.ordinal} (${d.uuid})`).join(", ")}`);
  const ctx = Ctx.create(
    set.backend,
    set.devices.map((d) => d.ordinal),
  );
  const spec = opts.engine;
  let workers: WorkersEngine | undefined;
  let engine: Engine;
  if (spec.kind === "workers") {
    workers = new WorkersEngine(spec.worker, set.backend, set.devices, { python: spec.python });
    engine = workers;
  } else if (spec.kind === "sglang") {
    engine = new SglangEngine(spec.endpoint, { flushCache: spec.flushCache, weightVersion: spec.weightVersion });
  } else {
    engine = new HttpEngine(spec.kind, spec.endpoint, { resetPrefixCache: spec.resetPrefixCache, summaries: spec.summaries });
  }
  const session = new UpdateSession({
    ctx,
    devices: set.devices,
    engine,
    opTimeoutMs: opts.opTimeoutMs,
    forceBroadcast: opts.forceBroadcast,
    dialect: opts.dialect,
    verify: opts.verify,
  });
  try {
    await workers?.start(session.endpoints);
  } catch (err) {
    await session.close();
    ctx.close();
    throw err;
  }
  return {
    set,
    ctx,
    engine,
    session,
    async close() {
      await session.close();
      ctx.close();
    },
  };
}
