// ce serve's state over a warm update session: checkpoints stay registered (pinned) between updates,
// and the context, sockets, slot buffers and workers stay up, so an update costs what the data path
// costs. One update at a time. routes.ts maps HTTP onto it.
import { openCheckpoint } from "../checkpoint/checkpoint";
import { CeError, errorMessage } from "../base/errors";
import { logger } from "../base/log";
import { type Registration, register, unregister } from "../checkpoint/registry";
import type { Updater } from "../app/updater";
import { RegisterBody, UpdateBody, parseBody } from "./bodies";
import { Metrics } from "./metrics";
import { checkUnderRoots } from "./roots";
import type { UpdateSummary } from "../core/update";

const log = logger("serve");

export interface ServeOptions {
  bucketBytes?: number;
  slots?: number;
  timeoutMs: number;
  /** Directories whose files may be registered. */
  roots: string[];
}

interface Progress {
  done: number;
  total: number;
  bytesDone: number;
  bytesTotal: number;
}

type Summary = Omit<UpdateSummary, "trace">;

/** The daemon's state: registered checkpoints by name, and the one update that may be running. */
export class Daemon {
  readonly #regs = new Map<string, Registration>();
  /** Names whose registration is under way: a second request for one is refused before it pins anything. */
  readonly #registering = new Set<string>();
  #running: { checkpoint: string; startedMs: number; progress?: Progress } | undefined;
  #last: Summary | undefined;

  constructor(
    private readonly up: Updater,
    private readonly opts: ServeOptions,
  ) {}

  readonly metrics = new Metrics();

  async register(body: unknown): Promise<object> {
    const { name, path, version } = parseBody(RegisterBody, body);
    if (this.#regs.has(name)) {
      throw new CeError("E_CHECKPOINT_EXISTS", `checkpoint "${name}" is registered already`, { hint: `DELETE /v1/checkpoints/${name} first` });
    }
    if (this.#registering.has(name)) {
      throw new CeError("E_CHECKPOINT_EXISTS", `checkpoint "${name}" is being registered by an earlier request`, { hint: "wait for it: GET /v1/checkpoints" });
    }
    checkUnderRoots(path, this.opts.roots);
    const v = version;
    // Reserved before the first await: two requests racing for one name would otherwise both pin,
    // and the loser's region would stay pinned with no entry to release it.
    this.#registering.add(name);
    let reg: Registration;
    try {
      reg = await register(this.up.ctx, await openCheckpoint(path), { name, version: v });
    } finally {
      this.#registering.delete(name);
    }
    this.#regs.set(name, reg);
    log.info(`registered ${name}@${v} from ${path} in ${reg.registerSeconds.toFixed(2)} s`);
    return describe(reg);
  }

  list(): object {
    return { checkpoints: [...this.#regs.values()].map(describe) };
  }

  async unregister(name: string): Promise<object> {
    const reg = this.#get(name);
    if (this.#running?.checkpoint === name) throw busy(this.#running.checkpoint);
    this.#regs.delete(name);
    return { name, releaseSeconds: await unregister(this.up.ctx, reg) };
  }

  async update(body: unknown): Promise<Summary> {
    const { checkpoint } = parseBody(UpdateBody, body);
    const reg = this.#get(checkpoint);
    if (this.#running) throw busy(this.#running.checkpoint);
    const running: { checkpoint: string; startedMs: number; progress?: Progress } = { checkpoint, startedMs: performance.now() };
    this.#running = running;
    try {
      const { trace: _, ...summary } = await this.up.session.update({
        reg,
        bucketBytes: this.opts.bucketBytes,
        slots: this.opts.slots,
        timeoutMs: this.opts.timeoutMs,
        onProgress: (p) => {
          running.progress = p;
        },
      });
      this.#last = summary;
      this.metrics.updated(summary);
      log.info(`updated ${checkpoint}@${reg.version}: ${summary.seconds.toFixed(3)} s, ${summary.gbps.toFixed(1)} GB/s`);
      return summary;
    } catch (err) {
      this.metrics.failed(err instanceof CeError ? err.code : "E_INTERNAL");
      throw err;
    } finally {
      this.#running = undefined;
    }
  }

  /** Prometheus text: the counters, and the state as it is now. */
  async metricsText(): Promise<string> {
    const stats = this.up.ctx.stats();
    this.metrics.state({
      registeredBytes: stats.regionBytes,
      pinnedBytes: stats.pinnedBytes,
      deviceBytes: this.up.session.heldBytes(),
      versions: new Map([...this.#regs.values()].map((r) => [r.name, r.version])),
      hostsUp: 1,
    });
    return this.metrics.text();
  }

  status(): object {
    const r = this.#running;
    return {
      busy: r !== undefined,
      running: r && { checkpoint: r.checkpoint, seconds: (performance.now() - r.startedMs) / 1000, ...r.progress },
      last: this.#last ?? null,
      checkpoints: this.#regs.size,
      devices: this.up.set.devices.map((d) => d.uuid),
      engine: this.up.engine.description,
      deviceBytes: this.up.session.heldBytes(),
      pinnedBytes: this.up.ctx.stats().pinnedBytes,
      hostBytes: this.up.ctx.stats().regionBytes,
    };
  }

  /** Releases every registration, then the session and the context. */
  async close(): Promise<void> {
    for (const reg of this.#regs.values()) await unregister(this.up.ctx, reg).catch((err) => log.warn(errorMessage(err)));
    this.#regs.clear();
    await this.up.close();
  }

  #get(name: string): Registration {
    const reg = this.#regs.get(name);
    if (!reg) throw new CeError("E_UNKNOWN_CHECKPOINT", `no checkpoint named "${name}" is registered`, { hint: "POST /v1/checkpoints {name, path} first" });
    return reg;
  }
}

function describe(reg: Registration): object {
  return {
    name: reg.name,
    version: reg.version,
    root: reg.ckpt.root,
    files: reg.files.length,
    tensors: reg.ckpt.tensors.length,
    bytes: reg.ckpt.totalBytes,
    registerSeconds: reg.registerSeconds,
    inPlace: reg.inPlace,
  };
}

function busy(checkpoint: string): CeError {
  return new CeError("E_BUSY", `an update of "${checkpoint}" is running`, { hint: "one update at a time: retry when GET /v1/status says busy: false" });
}
