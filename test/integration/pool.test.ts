// The resident pool of `ce serve` (CPU backend, real worker processes): a layout registered once,
// versions written into its shared-memory slots by another process (this test, standing in for a
// trainer; the Python client has its own test), digests taken as the bytes arrive, updates that stream
// behind the push, verify catching a byte flipped in the pool, rollback, and memory that comes back.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { closeSync, existsSync, openSync, readSync, readdirSync, statSync, writeSync } from "node:fs";
import { digestBytes, formatDigest } from "../../src/native/ce";
import { randomBytes } from "../helpers/ckpt";
import { type Served, call, startServe } from "../helpers/serve";
import { type TestCheckpoint, smallCheckpoint } from "../helpers/update";

interface Placed {
  name: string;
  dtype: string;
  shape: number[];
  offset: number;
  nbytes: number;
}

/** Writes a version's tensors into its slot file at the layout's offsets, as a trainer's push does; returns their digests. */
function writeVersion(path: string, layout: Placed[], seed: number, from = 0, to = layout.length): Map<string, string> {
  const fd = openSync(path, "r+");
  const digests = new Map<string, string>();
  try {
    for (const [i, t] of layout.slice(from, to).entries()) {
      const bytes = t.dtype === "BOOL" ? new Uint8Array(t.nbytes).fill(1) : randomBytes(t.nbytes, seed * 1000 + from + i);
      writeSync(fd, bytes, 0, bytes.length, t.offset);
      digests.set(t.name, formatDigest(digestBytes(bytes)));
    }
  } finally {
    closeSync(fd);
  }
  return digests;
}

const fdsOf = (pid: number) => readdirSync(`/proc/${pid}/fd`).length;

describe("a resident pool in ce serve", () => {
  let served: Served;
  let tc: TestCheckpoint;
  let other: TestCheckpoint;

  beforeAll(async () => {
    tc = await smallCheckpoint({ seed: 61, files: 2, tensorsPerFile: 12 });
    other = await smallCheckpoint({ seed: 62, files: 1, tensorsPerFile: 12 });
    served = await startServe();
  }, 60_000);

  afterAll(async () => {
    served?.proc.kill("SIGKILL");
    await tc?.dir.cleanup();
    await other?.dir.cleanup();
  });

  test(
    "versions pushed into slots update the workers, verified; a flipped byte is caught and rolled back; rollback re-pushes the previous version",
    async () => {
      const layout = tc.ckpt.tensors.map((t) => ({ name: t.name, dtype: t.dtype, shape: t.shape }));
      const made = await call(served.url, "POST", "/v1/pools", { name: "policy", layout, slots: 3 });
      expect(made.status).toBe(201);
      const placed = made.json.layout as Placed[];
      const files = made.json.files as string[];
      expect(made.json).toMatchObject({ ok: true, name: "policy", slots: 3, tensors: tc.tensors });
      // Largest first (ties in the order given), offsets ascending: a push ends with small tensors.
      expect(placed.map((t) => t.name)).toEqual(
        layout
          .map((t, i) => ({ name: t.name, i, nbytes: tc.ckpt.tensors[i]!.nbytes }))
          .sort((a, b) => b.nbytes - a.nbytes || a.i - b.i)
          .map((t) => t.name),
      );
      placed.slice(1).forEach((t, i) => expect(t.offset).toBeGreaterThanOrEqual(placed[i]!.offset + placed[i]!.nbytes));
      for (const f of files) expect(statSync(f).mode & 0o777).toBe(0o600);
      const slotBytes = made.json.bytes as number;
      expect(made.json.hostBytes).toBe(3 * slotBytes);

      // Version 1: written in two steps (digests start with the first), published with an update.
      const v1 = await call(served.url, "POST", "/v1/pools/policy/versions", { version: 1 });
      expect(v1.status).toBe(201);
      const half = Math.floor(placed.length / 2);
      const want1 = writeVersion(v1.json.path as string, placed, 1, 0, half);
      expect((await call(served.url, "POST", "/v1/pools/policy/versions/1/written", { bytes: placed[half]!.offset })).json).toMatchObject({ ok: true, written: placed[half]!.offset });
      for (const [k, d] of writeVersion(v1.json.path as string, placed, 1, half)) want1.set(k, d);
      const p1 = await call(served.url, "POST", "/v1/pools/policy/versions/1/publish", { update: true });
      expect(p1.status).toBe(200);
      expect(p1.json.update).toMatchObject({ checkpoint: "policy", version: 1, tensors: tc.tensors, bytes: tc.bytes, verified: tc.tensors });
      const info1 = await call(served.url, "GET", "/v1/pools/policy");
      const listed = (info1.json.versions as { version: number; digests: Record<string, string> }[]).find((v) => v.version === 1)!;
      expect(new Map(Object.entries(listed.digests))).toEqual(want1);
      expect(info1.json.serving).toBe(1);

      // Version 2 streams: the update starts at begin, each bucket waits for its bytes.
      const v2 = await call(served.url, "POST", "/v1/pools/policy/versions", { version: 2, update: true });
      expect(v2.json.slot).not.toBe(v1.json.slot);
      writeVersion(v2.json.path as string, placed, 2, 0, half);
      await call(served.url, "POST", "/v1/pools/policy/versions/2/written", { bytes: placed[half]!.offset });
      const st = await call(served.url, "GET", "/v1/status");
      expect(st.json).toMatchObject({ busy: true, running: { checkpoint: "policy@2" } });
      writeVersion(v2.json.path as string, placed, 2, half);
      const p2 = await call(served.url, "POST", "/v1/pools/policy/versions/2/publish", {});
      expect(p2.json.update).toMatchObject({ version: 2, tensors: tc.tensors, verified: tc.tensors });

      // Version 3, published; then a byte of its slot flips: verify fails and every engine goes back to 2.
      const v3 = await call(served.url, "POST", "/v1/pools/policy/versions", { version: 3 });
      writeVersion(v3.json.path as string, placed, 3);
      await call(served.url, "POST", "/v1/pools/policy/versions/3/publish", {});
      const victim = placed.find((t) => t.nbytes >= 16 && t.dtype !== "BOOL")!;
      const fd = openSync(v3.json.path as string, "r+");
      const byte = new Uint8Array(1);
      readSync(fd, byte, 0, 1, victim.offset + 3);
      writeSync(fd, new Uint8Array([byte[0]! ^ 0x80]), 0, 1, victim.offset + 3);
      closeSync(fd);
      const bad = await call(served.url, "POST", "/v1/update", { pool: "policy", version: 3, rollback: true });
      expect(bad.status).toBe(500);
      const msg = (bad.json.error as { code: string; message: string });
      expect(msg.code).toBe("E_VERIFY");
      expect(msg.message).toContain(`tensor ${victim.name} on worker on CPU device`);
      expect(msg.message).toContain("policy version 3");
      expect(msg.message).toContain("rolled every engine back to policy version 2");
      expect((await call(served.url, "GET", "/v1/pools/policy")).json.serving).toBe(2);

      // Rollback: version 1 is still resident; no registration, just an update from its slot.
      const rb = await call(served.url, "POST", "/v1/pools/policy/rollback");
      expect(rb.status).toBe(200);
      expect(rb.json).toMatchObject({ from: 2, to: 1, update: { version: 1, verified: tc.tensors } });

      // Version 4 takes the slot of the oldest version that is not serving: the serving one stays resident.
      const v4 = await call(served.url, "POST", "/v1/pools/policy/versions", { version: 4 });
      expect(v4.status).toBe(201);
      const held = ((await call(served.url, "GET", "/v1/pools/policy")).json.versions as { version: number }[]).map((v) => v.version);
      expect(held).toContain(1); // serving stays resident
      expect(held).toHaveLength(3);
      expect((await call(served.url, "DELETE", "/v1/pools/policy/versions/4")).status).toBe(200);

      // Clear refusals.
      const dup = await call(served.url, "POST", "/v1/pools/policy/versions", { version: 1 });
      expect(dup).toMatchObject({ status: 409, json: { error: { code: "E_POOL_VERSION_EXISTS" } } });
      const wrong = await call(served.url, "POST", "/v1/pools/policy/versions", { version: 9, path: other.dir.path });
      expect(wrong.status).toBe(400);
      expect((wrong.json.error as { message: string }).message).toMatch(/does not fit pool policy: tensor f\d\.\S+ /);
      expect((await call(served.url, "POST", "/v1/pools/nope/versions", { version: 1 })).status).toBe(404);
      expect((await call(served.url, "POST", "/v1/pools", { name: "x", layout, path: tc.dir.path })).status).toBe(400);

      // A version filled from files of the same layout: ce reads them into the slot, digests, publishes.
      const filled = await call(served.url, "POST", "/v1/pools/policy/versions", { version: 5, path: tc.dir.path });
      expect(filled.status).toBe(201);
      const up5 = await call(served.url, "POST", "/v1/update", { pool: "policy" });
      expect(up5.json).toMatchObject({ version: 5, verified: tc.tensors });

      // A writer that gives up mid-push: the update streaming behind it stops at once, nothing is left waiting.
      const v6 = await call(served.url, "POST", "/v1/pools/policy/versions", { version: 6, update: true });
      writeVersion(v6.json.path as string, placed, 6, 0, half);
      await call(served.url, "POST", "/v1/pools/policy/versions/6/written", { bytes: placed[half]!.offset });
      const t0 = performance.now();
      expect((await call(served.url, "DELETE", "/v1/pools/policy/versions/6")).status).toBe(200);
      expect(performance.now() - t0).toBeLessThan(10_000);
      expect((await call(served.url, "GET", "/v1/status")).json).toMatchObject({ busy: false });
      expect((await call(served.url, "POST", "/v1/update", { pool: "policy" })).json).toMatchObject({ version: 5, verified: tc.tensors });

      // Memory: reported, and freed by delete.
      const before = await call(served.url, "GET", "/v1/status");
      expect((before.json.pools as { name: string; hostBytes: number }[])[0]).toMatchObject({ name: "policy", hostBytes: 3 * slotBytes });
      const metrics = await (await fetch(`${served.url}/metrics`)).text();
      expect(metrics).toContain(`ce_pool_host_bytes{pool="policy"} ${3 * slotBytes}`);
      expect(metrics).toContain('ce_pool_serving_version{pool="policy"} 5');
      const del = await call(served.url, "DELETE", "/v1/pools/policy");
      expect(del.json).toMatchObject({ ok: true, freedBytes: 3 * slotBytes });
      for (const f of files) expect(existsSync(f)).toBe(false);
      const after = await call(served.url, "GET", "/v1/status");
      expect(after.json.pools).toEqual([]);
      expect(after.json.hostBytes).toBe((before.json.hostBytes as number) - 3 * slotBytes);
    },
    180_000,
  );

  test(
    "100 push → publish → update cycles leak no pinned memory, no files and no descriptors",
    async () => {
      const layout = other.ckpt.tensors.slice(0, 6).map((t) => ({ name: t.name, dtype: t.dtype, shape: t.shape }));
      const made = await call(served.url, "POST", "/v1/pools", { name: "cycle", layout });
      const placed = made.json.layout as Placed[];
      const cycle = async (v: number) => {
        const b = await call(served.url, "POST", "/v1/pools/cycle/versions", { version: v, update: v % 2 === 0 });
        writeVersion(b.json.path as string, placed, v);
        const p = await call(served.url, "POST", "/v1/pools/cycle/versions/" + v + "/publish", { update: v % 2 === 1 });
        expect(p.json.update).toMatchObject({ version: v, verified: layout.length });
      };
      for (let v = 1; v <= 5; v++) await cycle(v);
      const start = { status: (await call(served.url, "GET", "/v1/status")).json, fds: fdsOf(served.proc.pid) };
      for (let v = 6; v <= 105; v++) await cycle(v);
      const end = { status: (await call(served.url, "GET", "/v1/status")).json, fds: fdsOf(served.proc.pid) };
      expect(end.status.hostBytes).toBe(start.status.hostBytes);
      expect(end.status.pinnedBytes).toBe(start.status.pinnedBytes);
      expect(end.fds).toBeLessThanOrEqual(start.fds + 2);
      expect(((end.status.pools as { versions: number[] }[])[0]!.versions)).toEqual([104, 105]);
      await call(served.url, "DELETE", "/v1/pools/cycle");
    },
    180_000,
  );
});
