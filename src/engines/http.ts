// The `vllm` and `external` engines: one HTTP request makes every worker of a running engine
// connect to ce. vLLM serves it at POST /collective_rpc when started with VLLM_SERVER_DEV_MODE=1
// and `--worker-extension-cls ce_worker.vllm.CeWorkerExtension`; the call returns when every
// worker's method has returned. `external` sends the same request to any URL, for engines that
// implement the protocol themselves.
import { InputError, WorkerError } from "../base/errors";
import type { Engine } from "./types";

export const RPC_METHOD = "update_weights_from_ipc";

/** The request body: every worker picks the endpoint of its own GPU from the map. */
export function rpcBody(endpoints: Record<string, string>, timeoutMs: number): string {
  return JSON.stringify({ method: RPC_METHOD, args: [endpoints], timeout: timeoutMs / 1000 });
}

export class HttpEngine implements Engine {
  readonly description: string;
  readonly failure: Promise<never> = new Promise<never>(() => {});
  readonly #url: string;

  constructor(kind: "vllm" | "external", endpoint: string) {
    let url: URL;
    try {
      url = new URL(endpoint);
    } catch {
      throw new InputError("E_ENDPOINT", `--endpoint "${endpoint}" is not a URL`, { hint: "e.g. --endpoint http://127.0.0.1:8000" });
    }
    // vllm: the server's base URL; external: the exact URL to call.
    this.#url = kind === "vllm" ? new URL("collective_rpc", url.href.endsWith("/") ? url.href : `${url.href}/`).href : url.href;
    this.description = `${kind} ${this.#url}`;
  }

  async trigger(endpoints: Record<string, string>, timeoutMs: number): Promise<void> {
    let res: Response;
    try {
      res = await fetch(this.#url, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: rpcBody(endpoints, timeoutMs),
        signal: AbortSignal.timeout(timeoutMs),
      });
    } catch (err) {
      throw new WorkerError("E_ENGINE_HTTP", `POST ${this.#url}: ${(err as Error).message}`, {
        hint: "is the engine running, and (vLLM) started with VLLM_SERVER_DEV_MODE=1?",
        cause: err,
      });
    }
    const text = await res.text();
    if (!res.ok) {
      throw new WorkerError("E_ENGINE_HTTP", `POST ${this.#url}: HTTP ${res.status}: ${text.slice(0, 2000)}`, {
        hint:
          res.status === 404
            ? "vLLM serves /collective_rpc only with VLLM_SERVER_DEV_MODE=1"
            : "see the engine's log; its workers need --worker-extension-cls ce_worker.vllm.CeWorkerExtension",
      });
    }
  }

  async reset(): Promise<void> {}

  async close(): Promise<void> {}
}
