// A cluster of three `ce serve` processes on loopback, as three hosts: CPU backend, real reference
// workers on every host (verifying every tensor against the files), a checkpoint whose files are
// split over the hosts, the host-to-host broadcast over libce's TCP communicator. Every wait has a
// deadline.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { readFileSync, readdirSync } from "node:fs";
import parsePrometheusTextFormat from "parse-prometheus-text-format";
import { Sealer } from "../../src/cluster/seal";
import { defaultContext } from "../../src/transport/zmq";
import { type Host, call, masterPort, startHost, untilWhole } from "../helpers/cluster";
import { CLI, type TestCheckpoint, processGone, shmBuffersOf, smallCheckpoint, within } from "../helpers/update";

/** Pids whose parent is pid (from /proc: no procps needed). */
function childrenOf(pid: number): number[] {
  return readdirSync("/proc")
    .filter((d) => /^\d+$/.test(d))
    .filter((d) => {
      try {
        // The fields after the command's closing parenthesis: state, then the parent's pid.
        const stat = readFileSync(`/proc/${d}/stat`, "utf8");
        return Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]) === pid;
      } catch {
        return false;
      }
    })
    .map(Number);
}

/** Registers file i of the checkpoint on host i (as a trainer's ranks each write their shard). */
async function registerSplit(hosts: Host[], name: string, ck: TestCheckpoint, version = 1): Promise<void> {
  const rs = await Promise.all(hosts.map((h) => call(h, "POST", "/v1/checkpoints", { name, path: ck.ckpt.files[h.rank]!.path, version })));
  for (const r of rs) expect(r.json).toMatchObject({ ok: true });
}

describe("a cluster of three ce serve processes", () => {
  let hosts: Host[] = [];
  let a: TestCheckpoint;
  let b: TestCheckpoint;

  beforeAll(async () => {
    [a, b] = await Promise.all([smallCheckpoint({ files: 3, tensorsPerFile: 30, seed: 41 }), smallCheckpoint({ files: 3, tensorsPerFile: 30, seed: 42 })]);
    const h0 = await startHost(0, 2, 0, { nnodes: 3 });
    const port = masterPort(h0);
    hosts = [h0, ...(await Promise.all([startHost(1, 1, port, { nnodes: 3 }), startHost(2, 1, port, { nnodes: 3 })]))];
    await untilWhole(h0, 3);
  }, 90_000);

  afterAll(async () => {
    for (const h of hosts) h.proc.kill("SIGKILL");
    await a?.dir.cleanup();
    await b?.dir.cleanup();
  });

  test(
    "one call to any host updates every host's workers byte-exact from files split over the hosts",
    async () => {
      await registerSplit(hosts, "policy", a, 3);
      const r = await call(hosts[1]!, "POST", "/v1/update", { checkpoint: "policy" });
      expect(r.status).toBe(200);
      expect(r.json).toMatchObject({ ok: true, checkpoint: "policy", version: 3, hosts: 3, ranks: 4, bytes: a.bytes, tensors: a.tensors });
      expect(r.json.perHost.map((p: { host: number }) => p.host)).toEqual([0, 1, 2]);
      // Every host's workers verified every tensor against the digests host 0 gathered from all hosts.
      for (const p of r.json.perHost) expect(p).toMatchObject({ mode: "broadcast", bytes: a.bytes, tensors: a.tensors, verified: a.tensors });
      // Owners are on the host that holds the bytes, and every host owned some buckets.
      const st = await call(hosts[2]!, "GET", "/v1/status");
      expect(st.json.cluster.hosts.map((h: { up: boolean }) => h.up)).toEqual([true, true, true]);
    },
    120_000,
  );

  test(
    "a tensor held by two hosts, or a host that never registered its part, is an error naming the hosts",
    async () => {
      await Promise.all([0, 1].map((r) => call(hosts[r]!, "POST", "/v1/checkpoints", { name: "dup", path: a.ckpt.files[0]!.path })));
      await call(hosts[2]!, "POST", "/v1/checkpoints", { name: "dup", path: a.ckpt.files[2]!.path });
      const dup = await call(hosts[0]!, "POST", "/v1/update", { checkpoint: "dup" });
      expect(dup.json).toMatchObject({ ok: false, error: { code: "E_CLUSTER_DUPLICATE" } });
      expect(dup.json.error.message).toContain("host 0 and host 1");
      await Promise.all([0, 1].map((r) => call(hosts[r]!, "POST", "/v1/checkpoints", { name: "part", path: a.ckpt.files[r]!.path })));
      const part = await call(hosts[0]!, "POST", "/v1/update", { checkpoint: "part" });
      expect(part.json.ok).toBe(false);
      expect(part.json.error.message).toContain("host 2");
      expect(part.json.error.message).toContain('"part"');
    },
    120_000,
  );

  test(
    "50 consecutive updates alternating two checkpoints across the 3 hosts each land byte-exact",
    async () => {
      await registerSplit(hosts, "other", b, 3);
      for (let i = 0; i < 50; i++) {
        const name = i % 2 === 0 ? "policy" : "other";
        const r = await call(hosts[i % 3]!, "POST", "/v1/update", { checkpoint: name });
        if (!r.json.ok) throw new Error(`update ${i} of ${name}: ${JSON.stringify(r.json.error)}`);
        expect(r.json.bytes).toBe(name === "policy" ? a.bytes : b.bytes);
      }
    },
    300_000,
  );

  test(
    "a process without the secret gets no answer and is not counted as a host",
    async () => {
      // It even claims to be host 1.
      const sock = defaultContext().socket("DEALER", { routingId: "host-1" });
      try {
        sock.connect(hosts[0]!.cluster);
        const forged = new Sealer(Buffer.from("not-the-secret-at-all-0000")).seal(1, { op: "status", id: 1, body: {} });
        await sock.send(forged, { timeoutMs: 5_000 });
        await expect(sock.recv({ timeoutMs: 1_500, what: "an answer to a forged request" })).rejects.toThrow("an answer to a forged request");
      } finally {
        sock.close();
      }
      const st = await call(hosts[0]!, "GET", "/v1/status");
      expect(st.json.cluster.hostsUp).toBe(3);
      expect(hosts[0]!.stderr.join("")).toContain("not sealed with this cluster's secret");
    },
    30_000,
  );

  test(
    "/metrics on host 0 counts the hosts up, parsed by a Prometheus parser; ce status shows every host",
    async () => {
      const text = await (await fetch(`${hosts[0]!.url}/metrics`)).text();
      const fam = new Map(parsePrometheusTextFormat(text).map((f) => [f.name, f]));
      expect(Number(fam.get("ce_hosts_up")!.metrics[0]!.value)).toBe(3);
      expect(Number(fam.get("ce_updates_total")!.metrics[0]!.value)).toBeGreaterThanOrEqual(26);
      // ce status on any host shows every host.
      const st = Bun.spawnSync([process.execPath, CLI, "status", "--url", hosts[1]!.url], { stdout: "pipe", stderr: "pipe", timeout: 20_000 });
      const out = st.stdout.toString();
      expect(out).toContain("cluster of 3 hosts, 3 up");
      for (const r of [0, 1, 2]) expect(out).toMatch(new RegExp(`host ${r}: idle, ${r === 0 ? 2 : 1} devices, \\d+ checkpoints`));
    },
    30_000,
  );

  test(
    "a worker killed on one host fails the update on every host with that host's and worker's words; the next update works",
    async () => {
      const big = await smallCheckpoint({ files: 3, tensorsPerFile: 40, seed: 44, largestBytes: 8 << 20 });
      try {
        await registerSplit(hosts, "big2", big);
        const kids = childrenOf(hosts[1]!.proc.pid);
        expect(kids.length).toBeGreaterThan(0);
        const pending = call(hosts[0]!, "POST", "/v1/update", { checkpoint: "big2" }, 60_000);
        await Bun.sleep(100);
        process.kill(kids[0]!, "SIGKILL");
        const r = await pending;
        expect(r.json.ok).toBe(false);
        expect(r.json.error.message).toContain("host 1");
        expect(r.json.error.message).toMatch(/worker/);
        const again = await call(hosts[2]!, "POST", "/v1/update", { checkpoint: "big2" });
        if (!again.json.ok) throw new Error(JSON.stringify(again.json.error));
      } finally {
        await big.dir.cleanup();
      }
    },
    120_000,
  );

  test(
    "a host SIGKILLed mid-update makes the others abort within the deadline and keep serving; restarted, it rejoins and the next update works",
    async () => {
      const big = await smallCheckpoint({ files: 3, tensorsPerFile: 40, seed: 43, largestBytes: 8 << 20 });
      try {
        await registerSplit(hosts, "big", big);
        const victim = hosts[2]!;
        const started = performance.now();
        const pending = call(hosts[0]!, "POST", "/v1/update", { checkpoint: "big" }, 60_000);
        await Bun.sleep(150);
        victim.proc.kill("SIGKILL");
        const r = await pending;
        const took = performance.now() - started;
        console.log(`host 2 killed 150 ms into the update: the update failed after ${took.toFixed(0)} ms: ${r.json.error?.message}`);
        expect(r.json.ok).toBe(false);
        expect(took).toBeLessThan(30_000);
        expect(await within(10_000, "the victim to exit", victim.proc.exited)).not.toBe(0);
        // The survivors freed what the update held and still answer.
        for (const h of hosts.slice(0, 2)) {
          const st = await call(h, "GET", "/v1/healthz");
          expect(st.json).toEqual({ ok: true });
        }
        expect(shmBuffersOf(victim.proc.pid).length).toBeGreaterThanOrEqual(0);
        const down = await call(hosts[0]!, "POST", "/v1/update", { checkpoint: "big" });
        expect(down.json).toMatchObject({ ok: false, error: { code: "E_CLUSTER_HOST_MISSING" } });
        expect(down.json.error.message).toContain("host 2");

        const port = masterPort(hosts[0]!);
        hosts[2] = await startHost(2, 1, port, { nnodes: 3 });
        await untilWhole(hosts[0]!, 3);
        await registerSplit([hosts[2]!], "big", big);
        await registerSplit([hosts[2]!], "policy", a, 3);
        const again = await call(hosts[2]!, "POST", "/v1/update", { checkpoint: "big" });
        if (!again.json.ok) throw new Error(JSON.stringify(again.json.error));
        const policy = await call(hosts[0]!, "POST", "/v1/update", { checkpoint: "policy" });
        expect(policy.json).toMatchObject({ ok: true, bytes: a.bytes });
        expect(processGone(victim.proc.pid)).toBe(true);
      } finally {
        await big.dir.cleanup();
      }
    },
    180_000,
  );
});
