// ce serve's HTTP API over a warm update session: checkpoints stay registered (pinned) between
// updates, and the context, sockets, slot buffers and workers stay up, so an update costs what the
// data path costs. One update at a time.
import { openCheckpoint } from "../checkpoint/checkpoint";
import { CeError, InputError, errorMessage } from "../base/errors";
import { logger } from "../base/log";
import { type Registration, register, unregister } from "../checkpoint/registry";
import type { Updater } from "../app/updater";
import type { UpdateSummary } from "../core/update";

const log = logger("serve");

export interface ServeOptions {
  bucketBytes?: number;
  slots?: number;
  timeoutMs: number;
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

  async register(body: unknown): Promise<object> {
    const { name, path, version } = fields(body, { name: "string", path: "string", version: "number?" });
    if (this.#regs.has(name)) {
      throw new CeError("E_CHECKPOINT_EXISTS", `checkpoint "${name}" is registered already`, { hint: `DELETE /v1/checkpoints/${name} first` });
    }
    if (this.#registering.has(name)) {
      throw new CeError("E_CHECKPOINT_EXISTS", `checkpoint "${name}" is being registered by an earlier request`, { hint: "wait for it: GET /v1/checkpoints" });
    }
    const v = version ?? 1;
    if (!Number.isSafeInteger(v) || v < 0) throw new InputError("E_BAD_REQUEST", `version ${v} is not a whole number`);
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
    const { checkpoint } = fields(body, { checkpoint: "string" });
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
      log.info(`updated ${checkpoint}@${reg.version}: ${summary.seconds.toFixed(3)} s, ${summary.gbps.toFixed(1)} GB/s`);
      return summary;
    } finally {
      this.#running = undefined;
    }
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

type FieldKind = "string" | "number" | "number?";

function fields<T extends Record<string, FieldKind>>(
  body: unknown,
  spec: T,
): { [K in keyof T]: T[K] extends "string" ? string : T[K] extends "number" ? number : number | undefined } {
  if (typeof body !== "object" || body === null || Array.isArray(body)) throw new InputError("E_BAD_REQUEST", "the body must be a JSON object");
  const o = body as Record<string, unknown>;
  for (const [key, kind] of Object.entries(spec)) {
    const v = o[key];
    if (kind === "number?" && v === undefined) continue;
    if (typeof v !== (kind === "string" ? "string" : "number")) {
      throw new InputError("E_BAD_REQUEST", `field "${key}" must be a ${kind.replace("?", "")}`);
    }
  }
  return o as never;
}

/** HTTP status of an error, as STYLE.md maps them. */
export function httpStatus(err: unknown): number {
  if (!(err instanceof CeError)) return 500;
  if (err.code === "E_UNKNOWN_CHECKPOINT") return 404;
  if (err.code === "E_BUSY" || err.code === "E_CHECKPOINT_EXISTS") return 409;
  if (err instanceof InputError) return 400;
  return 500;
}

function json(status: number, body: object): Response {
  return new Response(`${JSON.stringify(body)}\n`, { status, headers: { "content-type": "application/json" } });
}

async function readBody(req: Request): Promise<unknown> {
  const text = await req.text();
  try {
    return text ? JSON.parse(text) : {};
  } catch {
    throw new InputError("E_BAD_REQUEST", "the body is not JSON");
  }
}

/** Routes one request; every error becomes {"ok":false,"error":{code,message,hint}} with its status. */
export async function route(daemon: Daemon, req: Request): Promise<Response> {
  const url = new URL(req.url);
  const path = url.pathname.replace(/\/+$/, "");
  try {
    if (req.method === "GET" && path === "/v1/status") return json(200, { ok: true, ...daemon.status() });
    if (req.method === "GET" && path === "/v1/checkpoints") return json(200, { ok: true, ...daemon.list() });
    if (req.method === "POST" && path === "/v1/checkpoints") return json(201, { ok: true, ...(await daemon.register(await readBody(req))) });
    const m = /^\/v1\/checkpoints\/([^/]+)$/.exec(path);
    if (req.method === "DELETE" && m) return json(200, { ok: true, ...(await daemon.unregister(decodeURIComponent(m[1]!))) });
    if (req.method === "POST" && path === "/v1/update") return json(200, { ok: true, ...(await daemon.update(await readBody(req))) });
    return json(404, { ok: false, error: { code: "E_NOT_FOUND", message: `${req.method} ${path}: no such route` } });
  } catch (err) {
    const status = httpStatus(err);
    const e = err instanceof CeError ? err : new CeError("E_INTERNAL", errorMessage(err));
    if (status === 500) log.error(`${req.method} ${path}: ${e.message}`);
    return json(status, { ok: false, error: e.toJSON() });
  }
}
