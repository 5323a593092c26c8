// The `sglang` engine: SGLang's built-in POST /update_weights_from_ipc, which makes every scheduler
// (one per tensor-parallel rank) run the reference system's worker loop against the endpoint of its
// GPU, so it pairs with the checkpoint-engine dialect. The body is SGLang's
// UpdateWeightsFromIPCReqInput: {"zmq_handles": {device UUID: endpoint}, "flush_cache",
// "weight_version"}; the call returns once every rank has finished, with {"success", "message"}
// (HTTP 200, or 400 when a rank failed).
import { InputError, WorkerError } from "../base/errors";
import type { Engine } from "./types";

export const SGLANG_ROUTE = "update_weights_from_ipc";
/** Slack past ce's deadline before the call is given up, so that ce's own deadlines, which name the worker, fire first. */
const CALL_SLACK_MS = 60_000;

export interface SglangOptions {
  /** Flush SGLang's prefix (radix) cache after the update, as SGLang does by default: cached KV came from the old weights. */
  flushCache?: boolean;
  /** The version string SGLang reports for the new weights; left out, SGLang keeps its own. */
  weightVersion?: string;
}

/** The request body SGLang's route takes. */
export function sglangBody(endpoints: Record<string, string>, opts: SglangOptions = {}): string {
  return JSON.stringify({
    zmq_handles: endpoints,
    flush_cache: opts.flushCache ?? true,
    ...(opts.weightVersion === undefined ? {} : { weight_version: opts.weightVersion }),
  });
}

/** SGLang's answer: ok, or its message. A body that is not SGLang's shape is read from the status alone. */
export function readSglangReply(status: number, text: string): { ok: boolean; message: string } {
  let body: unknown;
  try {
    body = JSON.parse(text);
  } catch {
    body = undefined;
  }
  const o = typeof body === "object" && body !== null ? (body as Record<string, unknown>) : {};
  const message = typeof o.message === "string" ? o.message : text.slice(0, 2000);
  const ok = status >= 200 && status < 300 && o.success !== false;
  return { ok, message };
}

export class SglangEngine implements Engine {
  readonly description: string;
  readonly failure: Promise<never> = new Promise<never>(() => {});
  readonly #url: string;
  readonly #opts: SglangOptions;

  constructor(endpoint: string, opts: SglangOptions = {}) {
    let url: URL;
    try {
      url = new URL(endpoint);
    } catch {
      throw new InputError("E_ENDPOINT", `--endpoint "${endpoint}" is not a URL`, { hint: "e.g. --endpoint http://127.0.0.1:30000" });
    }
    this.#url = new URL(SGLANG_ROUTE, url.href.endsWith("/") ? url.href : `${url.href}/`).href;
    this.#opts = opts;
    this.description = `sglang ${this.#url}`;
  }

  async trigger(endpoints: Record<string, string>, timeoutMs: number): Promise<void> {
    let res: Response;
    try {
      res = await fetch(this.#url, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: sglangBody(endpoints, this.#opts),
        // SGLang answers only once every rank is done; Bun's fetch would otherwise give up on a
        // connection idle for 5 minutes, whatever the signal says (Bun issue #16682).
        timeout: false,
        signal: AbortSignal.timeout(timeoutMs + CALL_SLACK_MS),
      });
    } catch (err) {
      throw new WorkerError("E_ENGINE_HTTP", `POST ${this.#url}: ${(err as Error).message}`, {
        hint: "is the SGLang server running at --endpoint?",
        cause: err,
      });
    }
    const { ok, message } = readSglangReply(res.status, await res.text());
    if (!ok) {
      throw new WorkerError("E_ENGINE_HTTP", `POST ${this.#url}: HTTP ${res.status}: ${message}`, {
        hint:
          res.status === 404
            ? "this SGLang has no /update_weights_from_ipc (it came with SGLang's checkpoint-engine integration)"
            : "see SGLang's log; its ranks need the checkpoint-engine package (pip install checkpoint-engine) for this route",
      });
    }
  }

  async reset(): Promise<void> {}

  async close(): Promise<void> {}
}
