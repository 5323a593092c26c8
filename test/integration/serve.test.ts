// `ce serve` as a real process on loopback: its HTTP API over a warm session with real worker
// processes on the CPU backend, its error statuses, and a clean stop.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import type { Subprocess } from "bun";
import { CLI, type TestCheckpoint, processGone, shmBuffersOf, smallCheckpoint, within } from "../helpers/update";

interface Served {
  proc: Subprocess<"ignore", "pipe", "pipe">;
  url: string;
}

async function startServe(): Promise<Served> {
  const proc = Bun.spawn([process.execPath, CLI, "serve", "--port", "0", "--device", "cpu", "--devices", "2", "--json"], {
    stdin: "ignore",
    stdout: "pipe",
    stderr: "pipe",
  });
  const reader = proc.stdout.getReader();
  const first = await within(30_000, "ce serve to listen", reader.read());
  reader.releaseLock();
  const line = new TextDecoder().decode(first.value ?? new Uint8Array());
  const { listening } = JSON.parse(line) as { listening: string };
  return { proc, url: listening };
}

async function call(url: string, method: string, path: string, body?: unknown): Promise<{ status: number; json: Record<string, unknown> }> {
  const res = await within(60_000, `${method} ${path}`, fetch(`${url}${path}`, { method, body: body === undefined ? undefined : typeof body === "string" ? body : JSON.stringify(body) }));
  return { status: res.status, json: (await res.json()) as Record<string, unknown> };
}

describe("ce serve", () => {
  let served: Served;
  let tc: TestCheckpoint;

  beforeAll(async () => {
    tc = await smallCheckpoint({ seed: 23, files: 2, tensorsPerFile: 30 });
    served = await startServe();
  }, 60_000);

  afterAll(async () => {
    served?.proc.kill("SIGKILL");
    await tc?.dir.cleanup();
  });

  test(
    "a registered checkpoint updates the workers again and again through the warm session",
    async () => {
      const reg = await call(served.url, "POST", "/v1/checkpoints", { name: "policy", path: tc.dir.path, version: 7 });
      expect(reg.status).toBe(201);
      expect(reg.json).toMatchObject({ ok: true, name: "policy", version: 7, tensors: tc.tensors, bytes: tc.bytes });
      for (let i = 0; i < 3; i++) {
        const up = await call(served.url, "POST", "/v1/update", { checkpoint: "policy" });
        expect(up.status).toBe(200);
        expect(up.json).toMatchObject({ ok: true, checkpoint: "policy", version: 7, tensors: tc.tensors, bytes: tc.bytes, mode: "direct" });
        expect(up.json.trace).toBeUndefined();
      }
      const st = await call(served.url, "GET", "/v1/status");
      expect(st.json).toMatchObject({ ok: true, busy: false, checkpoints: 1, last: { checkpoint: "policy" } });
      const list = await call(served.url, "GET", "/v1/checkpoints");
      expect((list.json.checkpoints as { name: string }[]).map((c) => c.name)).toEqual(["policy"]);
    },
    120_000,
  );

  test(
    "errors come back as JSON with the status they deserve: 400, 404, 409",
    async () => {
      expect((await call(served.url, "POST", "/v1/update", "not json")).status).toBe(400);
      expect((await call(served.url, "POST", "/v1/update", { checkpoint: 3 })).status).toBe(400);
      const unknown = await call(served.url, "POST", "/v1/update", { checkpoint: "nope" });
      expect(unknown.status).toBe(404);
      expect(unknown.json).toMatchObject({ ok: false, error: { code: "E_UNKNOWN_CHECKPOINT" } });
      expect((await call(served.url, "POST", "/v1/checkpoints", { name: "policy", path: tc.dir.path })).status).toBe(409);
      const missing = await call(served.url, "POST", "/v1/checkpoints", { name: "gone", path: "/nonexistent/ckpt" });
      expect(missing.status).toBe(400);
      expect(String((missing.json.error as { message: string }).message)).toContain("/nonexistent/ckpt");
      // Two updates at once: one runs, the other is refused.
      const both = await Promise.all([
        call(served.url, "POST", "/v1/update", { checkpoint: "policy" }),
        call(served.url, "POST", "/v1/update", { checkpoint: "policy" }),
      ]);
      expect(both.map((r) => r.status).sort()).toEqual([200, 409]);
      expect((await call(served.url, "GET", "/v1/nothing")).status).toBe(404);
    },
    120_000,
  );

  test(
    "two registrations racing for one name: one wins, the other is refused before pinning, and nothing stays pinned after delete",
    async () => {
      const before = (await call(served.url, "GET", "/v1/status")).json.hostBytes as number;
      const both = await Promise.all([
        call(served.url, "POST", "/v1/checkpoints", { name: "race", path: tc.dir.path }),
        call(served.url, "POST", "/v1/checkpoints", { name: "race", path: tc.dir.path }),
      ]);
      expect(both.map((r) => r.status).sort()).toEqual([201, 409]);
      expect((await call(served.url, "DELETE", "/v1/checkpoints/race")).status).toBe(200);
      expect((await call(served.url, "GET", "/v1/status")).json.hostBytes).toBe(before);
    },
    120_000,
  );

  test(
    "a deleted checkpoint is gone, and SIGTERM stops the daemon leaving no buffers or workers behind",
    async () => {
      const del = await call(served.url, "DELETE", "/v1/checkpoints/policy");
      expect(del.status).toBe(200);
      expect((await call(served.url, "POST", "/v1/update", { checkpoint: "policy" })).status).toBe(404);
      const pid = served.proc.pid;
      served.proc.kill("SIGTERM");
      expect(await within(30_000, "ce serve to stop", served.proc.exited)).toBe(0);
      expect(shmBuffersOf(pid)).toEqual([]);
      expect(processGone(pid)).toBe(true);
    },
    60_000,
  );
});
