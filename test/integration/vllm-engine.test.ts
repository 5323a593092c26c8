// The vLLM HTTP engine against a stand-in of vLLM's API server (real HTTP on 127.0.0.1): the
// routes /collective_rpc (vllm/entrypoints/serve/dev/rpc/api_router.py @ cd20a5785d36: returns
// {"results": [one value per worker]}) and /reset_prefix_cache (vllm/entrypoints/serve/cache/
// api_router.py: POST, an empty 200). The workers' summaries are those ce_worker returns.
import { afterAll, afterEach, describe, expect, test } from "bun:test";
import { WorkerError } from "../../src/base/errors";
import { HttpEngine, RPC_METHOD, WORKER_QUIET_S } from "../../src/engines/http";

const ENDPOINTS = { "GPU-aaaa": "ipc://@ce-test-a", "GPU-bbbb": "ipc://@ce-test-b" };
const DEADLINE_MS = 30_000;

const finished = (uuid: string) => ({ state: "finished", device_uuid: uuid, buckets: 3, tensors: 9 });

interface Call {
  path: string;
  body: string;
}

/** The stand-in server: answers /collective_rpc with `rpc()` after `delayMs`, records every call. */
const stub = {
  calls: [] as Call[],
  rpc: (): Response => Response.json({ results: Object.keys(ENDPOINTS).map(finished) }),
  reset: (): Response => new Response(null, { status: 200 }),
  delayMs: 0,
};
const server = Bun.serve({
  port: 0,
  hostname: "127.0.0.1",
  idleTimeout: 0, // the engine answers when its workers are done: the server side must not cut in either
  async fetch(req) {
    const path = new URL(req.url).pathname;
    stub.calls.push({ path, body: await req.text() });
    if (path === "/collective_rpc") {
      if (stub.delayMs > 0) await Bun.sleep(stub.delayMs);
      return stub.rpc();
    }
    if (path === "/reset_prefix_cache") return stub.reset();
    return new Response("not found", { status: 404 });
  },
});
const base = `http://127.0.0.1:${server.port}`;

afterEach(() => {
  stub.calls = [];
  stub.rpc = () => Response.json({ results: Object.keys(ENDPOINTS).map(finished) });
  stub.reset = () => new Response(null, { status: 200 });
  stub.delayMs = 0;
});
afterAll(() => server.stop(true));

async function failure(p: Promise<unknown>): Promise<WorkerError> {
  try {
    await p;
  } catch (err) {
    expect(err).toBeInstanceOf(WorkerError);
    return err as WorkerError;
  }
  throw new Error("the trigger resolved, a failure was expected");
}

describe("the vLLM HTTP engine", () => {
  test("an update that finished on every worker resolves, then resets vLLM's prefix cache once", async () => {
    await new HttpEngine("vllm", base).trigger(ENDPOINTS, DEADLINE_MS);
    expect(stub.calls.map((c) => c.path)).toEqual(["/collective_rpc", "/reset_prefix_cache"]);
    const body = JSON.parse(stub.calls[0]!.body);
    expect({ method: body.method, args: body.args }).toEqual({ method: RPC_METHOD, args: [ENDPOINTS] });
    // The RPC timeout lies well above ce's deadline plus the workers' own silence limit.
    expect(body.timeout).toBeGreaterThanOrEqual(DEADLINE_MS / 1000 + WORKER_QUIET_S);
  });

  test("with resetPrefixCache off no reset is sent, and an external engine never gets one", async () => {
    await new HttpEngine("vllm", base, { resetPrefixCache: false }).trigger(ENDPOINTS, DEADLINE_MS);
    await new HttpEngine("external", `${base}/collective_rpc`).trigger(ENDPOINTS, DEADLINE_MS);
    expect(stub.calls.map((c) => c.path)).toEqual(["/collective_rpc", "/collective_rpc"]);
  });

  test("a worker's error summary fails the update with its device and message, and no reset is sent", async () => {
    stub.rpc = () =>
      Response.json({
        results: [finished("GPU-aaaa"), { state: "error", device_uuid: "GPU-bbbb", error: "KeyError: \"no endpoint for this worker's GPU GPU-bbbb\"" }],
      });
    const err = await failure(new HttpEngine("vllm", base).trigger(ENDPOINTS, DEADLINE_MS));
    expect(err.code).toBe("E_WORKER");
    expect(err.message).toContain("worker 1 (GPU-bbbb): error: KeyError: \"no endpoint for this worker's GPU GPU-bbbb\"");
    expect(stub.calls.map((c) => c.path)).toEqual(["/collective_rpc"]);
  });

  test("an aborted worker, a missing worker or a body without results fails the update saying which", async () => {
    const cases: [unknown, string][] = [
      [{ results: [finished("GPU-aaaa"), { state: "aborted", device_uuid: "GPU-bbbb", reason: "bucket 2/9 failed" }] }, "worker 1 (GPU-bbbb): aborted: bucket 2/9 failed"],
      [{ results: [finished("GPU-aaaa")] }, "1 worker result for 2 devices"],
      [{ results: [finished("GPU-aaaa"), finished("GPU-aaaa")] }, "no worker answered for GPU-bbbb"],
      [{ results: [finished("GPU-aaaa"), null] }, "worker 1: not a summary: null"],
      [{ ok: true }, 'the answer has no "results" list'],
    ];
    for (const [answer, says] of cases) {
      stub.rpc = () => Response.json(answer);
      const err = await failure(new HttpEngine("vllm", base).trigger(ENDPOINTS, DEADLINE_MS));
      expect({ code: err.code, message: err.message }).toEqual({ code: "E_WORKER", message: expect.stringContaining(says) });
    }
  });

  test("an engine that answers HTTP 500 fails the update with the engine's words", async () => {
    stub.rpc = () => Response.json({ error: "RuntimeError: Worker failed with error 'boom'" }, { status: 500 });
    const err = await failure(new HttpEngine("vllm", base).trigger(ENDPOINTS, DEADLINE_MS));
    expect(err.code).toBe("E_ENGINE_HTTP");
    expect(err.message).toContain(`POST ${base}/collective_rpc: HTTP 500: {"error":"RuntimeError: Worker failed with error 'boom'"}`);
  });

  test("a prefix-cache reset that fails fails the update, saying the weights are already updated", async () => {
    stub.reset = () => new Response("not found", { status: 404 });
    const err = await failure(new HttpEngine("vllm", base).trigger(ENDPOINTS, DEADLINE_MS));
    expect(err.code).toBe("E_ENGINE_HTTP");
    expect(err.message).toContain(`POST ${base}/reset_prefix_cache: the weights are updated but the prefix cache still holds KV of the old ones: HTTP 404`);
    expect(err.hint).toContain("VLLM_SERVER_DEV_MODE=1");
  });

  test(
    "an engine that answers after Bun's idle cap (shortened here to 1 s) still completes the update",
    async () => {
      // Bun lets a request shorten its idle cap; here every request that keeps Bun's default gets
      // 1 s instead of 5 minutes, as if the update had run past the real cap. The timer is coarse
      // (4 s steps), so the engine answers after 10 s.
      const realFetch = globalThis.fetch;
      const shortened = ((input: string | URL | Request, init?: BunFetchRequestInit) =>
        realFetch(input, { ...init, timeout: init?.timeout === false || init?.timeout === 0 ? init.timeout : 1000 })) as typeof fetch;
      globalThis.fetch = shortened;
      stub.delayMs = 10_000;
      try {
        const [plain, engine] = await Promise.allSettled([
          fetch(`${base}/collective_rpc`, { method: "POST", body: "{}" }).then((r) => r.text()),
          new HttpEngine("vllm", base).trigger(ENDPOINTS, DEADLINE_MS),
        ]);
        // The cap is real: a request that keeps it fails...
        expect(plain.status).toBe("rejected");
        expect(String((plain as PromiseRejectedResult).reason)).toMatch(/timed out|timeout/i);
        // ...and the engine's request, which turns it off, waits for the answer.
        expect(engine).toEqual({ status: "fulfilled", value: undefined });
      } finally {
        globalThis.fetch = realFetch;
      }
    },
    40_000,
  );
});
