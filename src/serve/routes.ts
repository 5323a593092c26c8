// ce serve's HTTP API: routes onto the daemon, every error as {"ok":false,"error":{code,message,hint}}
// with the status it deserves (STYLE.md's mapping), and bodies over a limit refused unread.
import { CeError, InputError, errorMessage } from "../base/errors";
import { logger } from "../base/log";
import type { Daemon } from "./daemon";

const log = logger("serve");

/** Request bodies are a few fields; anything larger is a mistake or an attack. */
export const MAX_BODY_BYTES = 64 * 1024;

/** HTTP status of an error. */
export function httpStatus(err: unknown): number {
  if (!(err instanceof CeError)) return 500;
  if (err.code === "E_UNKNOWN_CHECKPOINT") return 404;
  if (err.code === "E_CLUSTER_HOST_MISSING") return 503;
  if (err.code === "E_BUSY" || err.code === "E_CHECKPOINT_EXISTS") return 409;
  if (err.code === "E_PATH_OUTSIDE_ROOTS") return 403;
  if (err.code === "E_BODY_TOO_LARGE") return 413;
  if (err instanceof InputError) return 400;
  return 500;
}

function json(status: number, body: object): Response {
  return new Response(`${JSON.stringify(body)}\n`, { status, headers: { "content-type": "application/json" } });
}

async function readBody(req: Request): Promise<unknown> {
  const declared = Number(req.headers.get("content-length") ?? 0);
  const tooLarge = () => new InputError("E_BODY_TOO_LARGE", `the request body is over ${MAX_BODY_BYTES} bytes`);
  if (declared > MAX_BODY_BYTES) throw tooLarge();
  const text = await req.text();
  if (text.length > MAX_BODY_BYTES) throw tooLarge();
  try {
    return text ? JSON.parse(text) : {};
  } catch {
    throw new InputError("E_BAD_REQUEST", "the body is not JSON");
  }
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
    return json(404, { ok: false, error: { code: "E_NOT_FOUND", message: `${req.method} ${path}: no such route` } });
  } catch (err) {
    const status = httpStatus(err);
    const e = err instanceof CeError ? err : new CeError("E_INTERNAL", errorMessage(err));
    if (status === 500) log.error(`${req.method} ${path}: ${e.message}`);
    return json(status, { ok: false, error: e.toJSON() });
  }
}
