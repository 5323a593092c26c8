// `ce serve` as a real process on loopback: its HTTP API over a warm session with real worker
// processes on the CPU backend, its error statuses, and a clean stop.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { mkdtempSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import parsePrometheusTextFormat from "parse-prometheus-text-format";
import { type Served, call, startServe } from "../helpers/serve";
import { type TestCheckpoint, processGone, shmBuffersOf, smallCheckpoint, within } from "../helpers/update";

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
    "healthz answers, and /metrics is Prometheus text that a parser reads, with the updates counted",
    async () => {
      expect((await call(served.url, "GET", "/v1/healthz")).json).toEqual({ ok: true });
      const res = await fetch(`${served.url}/metrics`);
      expect(res.headers.get("content-type")).toContain("text/plain");
      const families = parsePrometheusTextFormat(await res.text());
      const byName = new Map(families.map((f) => [f.name, f]));
      expect(byName.get("ce_updates_total")?.type).toBe("COUNTER");
      expect(Number(byName.get("ce_updates_total")!.metrics[0]!.value)).toBeGreaterThanOrEqual(3);
      expect(Number(byName.get("ce_update_bytes_total")!.metrics[0]!.value)).toBeGreaterThanOrEqual(3 * tc.bytes);
      expect(byName.get("ce_update_seconds")?.type).toBe("HISTOGRAM");
      expect(byName.get("ce_checkpoint_version")!.metrics).toContainEqual(expect.objectContaining({ labels: { checkpoint: "policy" }, value: "7" }));
      expect(Number(byName.get("ce_registered_bytes")!.metrics[0]!.value)).toBeGreaterThanOrEqual(tc.bytes);
      expect(byName.get("ce_update_phase_seconds")!.metrics.map((m) => m.labels?.phase).sort()).toEqual(["buffers", "close", "data", "open", "plan"]);
      expect(Number(byName.get("ce_hosts_up")!.metrics[0]!.value)).toBe(1);
    },
    60_000,
  );

  test(
    "bodies are validated naming the field, paths outside the roots are refused, and a huge body is refused unread",
    async () => {
      const bad = await call(served.url, "POST", "/v1/checkpoints", { name: "x/y", path: tc.dir.path, version: -1 });
      expect(bad.status).toBe(400);
      const msg = String((bad.json.error as { message: string }).message);
      expect(msg).toContain('field "name"');
      expect(msg).toContain('field "version"');
      const outside = await call(served.url, "POST", "/v1/checkpoints", { name: "etc", path: "/etc" });
      expect(outside.status).toBe(403);
      expect(outside.json).toMatchObject({ ok: false, error: { code: "E_PATH_OUTSIDE_ROOTS" } });
      const big = await call(served.url, "POST", "/v1/update", JSON.stringify({ checkpoint: "policy", pad: "x".repeat(200_000) }));
      expect(big.status).toBe(413);
    },
    60_000,
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

test(
  "ce serve --socket listens on a Unix socket only its user may open (mode 0600)",
  async () => {
    const dir = mkdtempSync(join(tmpdir(), "ce-sock-"));
    const socket = join(dir, "ce.sock");
    const served = await startServe(["--socket", socket]);
    try {
      expect(served.url).toBe(`unix:${socket}`);
      expect(statSync(socket).mode & 0o777).toBe(0o600);
      const res = await within(10_000, "healthz over the socket", fetch("http://localhost/v1/healthz", { unix: socket }));
      expect(await res.json()).toEqual({ ok: true });
    } finally {
      served.proc.kill("SIGTERM");
      await within(30_000, "ce serve to stop", served.proc.exited);
      rmSync(dir, { recursive: true, force: true });
    }
  },
  60_000,
);
