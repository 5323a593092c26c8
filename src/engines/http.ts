// The `vllm` and `external` engines: one HTTP request makes every worker of a running engine
// connect to ce. vLLM serves it at POST /collective_rpc when started with VLLM_SERVER_DEV_MODE=1
// and `--worker-extension-cls ce_worker.vllm.CeWorkerExtension`; the call returns when every
// worker's method has returned, with {"results": [one summary per worker]}. `external` sends the
// same request to any URL, for engines that implement the protocol themselves, and expects the
// same answer.
//
// Every worker's summary is checked (one per endpoint, each "finished"): ce_worker never raises
// out of the RPC, because vLLM's multiprocess executor raises at the first failed worker without
// reading the others' replies (vllm/v1/executor/multiproc_executor.py), and later RPCs would read
// them. After a vLLM update the prefix cache, computed with the old weights, is reset.
import { InputError, WorkerError } from "../base/errors";
import type { Engine } from "./types";

export const RPC_METHOD = "update_weights_from_ipc";

/** How long a ce_worker waits for ce's next request before it gives the session up (its op_timeout_s default). */
export const WORKER_QUIET_S = 120;
/** Slack on top of the longest a worker can take, so that vLLM's RPC timeout never fires first. */
const RPC_SLACK_S = 60;

export interface HttpEngineOptions {
  /** vllm: POST /reset_prefix_cache after each update (default true). `external` has no such route. */
  resetPrefixCache?: boolean;
  /**
   * Whether the workers' RPC returns ce_worker's summaries to check (default true). The reference
   * system's extension returns None per worker: there, a 2xx answer is all there is to read.
   */
  summaries?: boolean;
}

/**
 * The RPC timeout sent to the engine, in seconds: well above ce's own deadline. A worker returns
 * at the latest WORKER_QUIET_S after ce's last request, and ce sends none after its deadline; an
 * RPC timeout that fired first would leave the workers' replies unread in vLLM's executor.
 */
export function rpcTimeoutS(timeoutMs: number): number {
  return Math.ceil(timeoutMs / 1000) + WORKER_QUIET_S + RPC_SLACK_S;
}

/** The request body: every worker picks the endpoint of its own GPU from the map. */
export function rpcBody(endpoints: Record<string, string>, timeoutMs: number): string {
  return JSON.stringify({ method: RPC_METHOD, args: [endpoints], timeout: rpcTimeoutS(timeoutMs) });
}

/** One worker's summary as ce_worker returns it; unknown fields are ignored. */
interface WorkerSummary {
  state?: unknown;
  device_uuid?: unknown;
  error?: unknown;
  reason?: unknown;
}

/** Why the engine's answer does not show a finished update on every endpoint; undefined when it does. */
export function checkResults(body: unknown, endpoints: Record<string, string>): string | undefined {
  const results = (body as { results?: unknown } | null)?.results;
  if (!Array.isArray(results)) return `the answer has no "results" list: ${JSON.stringify(body).slice(0, 500)}`;
  const expected = Object.keys(endpoints);
  const problems: string[] = [];
  if (results.length !== expected.length) {
    problems.push(`${results.length} worker result${results.length === 1 ? "" : "s"} for ${expected.length} device${expected.length === 1 ? "" : "s"}`);
  }
  const seen = new Set<string>();
  results.forEach((r: WorkerSummary | null, i) => {
    const uuid = typeof r?.device_uuid === "string" ? r.device_uuid : undefined;
    const who = `worker ${i}${uuid ? ` (${uuid})` : ""}`;
    if (r === null || typeof r !== "object") return void problems.push(`${who}: not a summary: ${JSON.stringify(r)}`);
    if (uuid) seen.add(uuid);
    if (r.state === "finished") return;
    const why = typeof r.error === "string" ? r.error : typeof r.reason === "string" ? r.reason : "";
    problems.push(`${who}: ${String(r.state)}${why ? `: ${why}` : ""}`);
  });
  // Engines that name their workers' devices (ce_worker does) must cover every endpoint.
  const named = results.every((r: WorkerSummary | null) => typeof r?.device_uuid === "string");
  const missing = expected.filter((u) => !seen.has(u));
  if (named && missing.length > 0) problems.push(`no worker answered for ${missing.join(", ")}`);
  return problems.length > 0 ? problems.join("; ") : undefined;
}

export class HttpEngine implements Engine {
  readonly description: string;
  readonly failure: Promise<never> = new Promise<never>(() => {});
  readonly #url: string;
  readonly #resetUrl: string | undefined;
  readonly #summaries: boolean;

  constructor(kind: "vllm" | "external", endpoint: string, opts: HttpEngineOptions = {}) {
    let url: URL;
    try {
      url = new URL(endpoint);
    } catch {
      throw new InputError("E_ENDPOINT", `--endpoint "${endpoint}" is not a URL`, { hint: "e.g. --endpoint http://127.0.0.1:8000" });
    }
    // vllm: the server's base URL; external: the exact URL to call.
    const base = url.href.endsWith("/") ? url.href : `${url.href}/`;
    this.#url = kind === "vllm" ? new URL("collective_rpc", base).href : url.href;
    this.#resetUrl = kind === "vllm" && (opts.resetPrefixCache ?? true) ? new URL("reset_prefix_cache", base).href : undefined;
    this.#summaries = opts.summaries ?? true;
    this.description = `${kind} ${this.#url}`;
  }

  async trigger(endpoints: Record<string, string>, timeoutMs: number): Promise<void> {
    const text = await this.#post(this.#url, rpcBody(endpoints, timeoutMs), (rpcTimeoutS(timeoutMs) + RPC_SLACK_S) * 1000);
    let body: unknown;
    try {
      body = JSON.parse(text);
    } catch {
      throw new WorkerError("E_ENGINE_HTTP", `POST ${this.#url}: the answer is not JSON: ${text.slice(0, 500)}`);
    }
    const problem = this.#summaries ? checkResults(body, endpoints) : undefined;
    if (problem !== undefined) {
      throw new WorkerError("E_WORKER", `POST ${this.#url}: the update did not finish on every worker: ${problem}`, {
        hint: "see the engine's log for the workers' tracebacks",
      });
    }
    if (this.#resetUrl !== undefined) {
      await this.#post(this.#resetUrl, "", 60_000, "the weights are updated but the prefix cache still holds KV of the old ones");
    }
  }

  /** POSTs and returns the body; any failure is a WorkerError naming the URL. */
  async #post(url: string, body: string, deadlineMs: number, context?: string): Promise<string> {
    const prefix = `POST ${url}: ${context ? `${context}: ` : ""}`;
    let res: Response;
    try {
      res = await fetch(url, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body,
        // Bun's fetch gives up on a connection idle for 5 minutes, whatever the signal says (Bun
        // issue #16682); an engine answers only when its workers are done, which may be later.
        timeout: false,
        signal: AbortSignal.timeout(deadlineMs),
      });
    } catch (err) {
      throw new WorkerError("E_ENGINE_HTTP", `${prefix}${(err as Error).message}`, {
        hint: "is the engine running, and (vLLM) started with VLLM_SERVER_DEV_MODE=1?",
        cause: err,
      });
    }
    const text = await res.text();
    if (!res.ok) {
      throw new WorkerError("E_ENGINE_HTTP", `${prefix}HTTP ${res.status}: ${text.slice(0, 2000)}`, {
        hint:
          res.status === 404
            ? "vLLM serves /collective_rpc and /reset_prefix_cache only with VLLM_SERVER_DEV_MODE=1"
            : "see the engine's log; its workers need --worker-extension-cls ce_worker.vllm.CeWorkerExtension",
      });
    }
    return text;
  }

  async reset(): Promise<void> {}

  async close(): Promise<void> {}
}
