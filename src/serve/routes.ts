// ce serve's HTTP API: routes onto the daemon, every error as {"ok":false,"error":{code,message,hint}}
// with the status it deserves (STYLE.md's mapping), and bodies over a limit refused unread.
import { CeError, InputError, errorMessage } from "../base/errors";
import { logger } from "../base/log";
import type { Daemon } from "./daemon";

const log = logger("serve");

/** Request bodies are a few fields; anything larger is a mistake or an attack. */
export const MAX_BODY_BYTES = 64 * 1024;
/** A pool's layout lists every tensor (Qwen3-30B-A3B: 18 867 of them, ~1.5 MB of JSON). */
export const MAX_LAYOUT_BODY_BYTES = 64 * 1024 * 1024;

/** HTTP status of an error. */
export function httpStatus(err: unknown): number {
  if (!(err instanceof CeError)) return 500;
  if (err.code === "E_UNKNOWN_CHECKPOINT" || err.code === "E_UNKNOWN_POOL" || err.code === "E_UNKNOWN_VERSION") return 404;
  if (err.code === "E_CLUSTER_HOST_MISSING") return 503;
  if (["E_BUSY", "E_CHECKPOINT_EXISTS", "E_POOL_EXISTS", "E_POOL_VERSION_EXISTS", "E_POOL_FULL", "E_POOL_PUBLISHED", "E_NO_ROLLBACK"].includes(err.code)) return 409;
  if (err.code === "E_PATH_OUTSIDE_ROOTS") return 403;
  if (err.code === "E_BODY_TOO_LARGE") return 413;
  if (err instanceof InputError) return 400;
  return 500;
}

function json(status: number, body: object): Response {
  return new Response(`${JSON.stringify(body)}\n`, { status, headers: { "content-type": "application/json" } });
}

async function readBody(req: Request, limit = MAX_BODY_BYTES): Promise<unknown> {
  const declared = Number(req.headers.get("content-length") ?? 0);
  const tooLarge = () => new InputError("E_BODY_TOO_LARGE", `the request body is over ${limit} bytes`);
  if (declared > limit) throw tooLarge();
  const text = await req.text();
  if (text.length > limit) throw tooLarge();
  try {
    return text ? JSON.parse(text) : {};
  } catch {
    throw new InputError("E_BAD_REQUEST", "the body is not JSON");
  }
}

/** The pool routes: /v1/pools[/NAME[/rollback | /versions/N[/written | /publish]]]. */
function poolRoute(daemon: Daemon, req: Request, path: string): { status: number; run: () => Promise<object> } | undefined {
  const m = /^\/v1\/pools(?:\/([^/]+)(?:\/(rollback)|\/versions(?:\/(\d+)(?:\/(written|publish))?)?)?)?$/.exec(path);
  if (!m) return undefined;
  const [, rawName, rollback, rawVersion, action] = m;
  const name = rawName === undefined ? undefined : decodeURIComponent(rawName);
  const version = rawVersion === undefined ? undefined : Number(rawVersion);
  const { method } = req;
  const body = () => readBody(req);
  if (name === undefined) {
    if (method === "GET") return { status: 200, run: async () => daemon.pools.list() };
    if (method === "POST") return { status: 201, run: async () => daemon.pools.create(await readBody(req, MAX_LAYOUT_BODY_BYTES)) };
    return undefined;
  }
  if (rollback) return method === "POST" ? { status: 200, run: () => daemon.pools.rollback(name) } : undefined;
  if (version === undefined && path.endsWith("/versions")) return method === "POST" ? { status: 201, run: async () => daemon.pools.begin(name, await body()) } : undefined;
  if (version === undefined) {
    if (method === "GET") return { status: 200, run: async () => daemon.pools.info(name) };
    if (method === "DELETE") return { status: 200, run: () => daemon.pools.delete(name) };
    return undefined;
  }
  if (action === "written") return method === "POST" ? { status: 200, run: async () => daemon.pools.written(name, version, await body()) } : undefined;
  if (action === "publish") return method === "POST" ? { status: 200, run: async () => daemon.pools.publish(name, version, await body()) } : undefined;
  return method === "DELETE" ? { status: 200, run: () => daemon.pools.deleteVersion(name, version) } : undefined;
}

/** Routes one request. */
export async function route(daemon: Daemon, req: Request): Promise<Response> {
  const url = new URL(req.url);
  const path = url.pathname.replace(/\/+$/, "");
  try {
    if (req.method === "GET" && path === "/v1/healthz") return json(200, { ok: true });
    if (req.method === "GET" && path === "/metrics") {
      return new Response(await daemon.metricsText(), { headers: { "content-type": daemon.metrics.contentType } });
    }
    if (req.method === "GET" && path === "/v1/status") return json(200, { ok: true, ...(await daemon.status()) });
    if (req.method === "GET" && path === "/v1/checkpoints") return json(200, { ok: true, ...daemon.list() });
    if (req.method === "POST" && path === "/v1/checkpoints") return json(201, { ok: true, ...(await daemon.register(await readBody(req))) });
    const m = /^\/v1\/checkpoints\/([^/]+)$/.exec(path);
    if (req.method === "DELETE" && m) return json(200, { ok: true, ...(await daemon.unregister(decodeURIComponent(m[1]!))) });
    if (req.method === "POST" && path === "/v1/update") return json(200, { ok: true, ...(await daemon.update(await readBody(req))) });
    const pools = poolRoute(daemon, req, path);
    if (pools) return json(pools.status, { ok: true, ...(await pools.run()) });
    return json(404, { ok: false, error: { code: "E_NOT_FOUND", message: `${req.method} ${path}: no such route` } });
  } catch (err) {
    const status = httpStatus(err);
    const e = err instanceof CeError ? err : new CeError("E_INTERNAL", errorMessage(err));
    if (status === 500) log.error(`${req.method} ${path}: ${e.message}`);
    return json(status, { ok: false, error: e.toJSON() });
  }
}
