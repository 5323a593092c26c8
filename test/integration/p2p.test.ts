// P2P updates (issue 23) between `ce serve` processes on loopback: a host that holds nothing (a new
// instance) updates its CPU-backend workers by reading the version from the hosts that hold it, over
// UCX TCP (and Mooncake's TCP where its library is built), while the sources keep updating their own
// workers and the third host is never touched.
// Workers verify every tensor by digest against the sources' registrations. A source SIGKILLed
// mid-pull fails the pull naming it; restarted, everything works again.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { type Host, call, masterPort, startHost, untilWhole } from "../helpers/cluster";
import { MOONCAKE_ENV, mooncake, ucx } from "../helpers/libraries";
import { type TestCheckpoint, smallCheckpoint, within } from "../helpers/update";

// TCP on loopback: what CI has (see xfer.test.ts); UCX would pick shared memory otherwise.
const UCX_ENV = { UCX_TLS: "tcp", UCX_NET_DEVICES: "lo", UCX_WARN_UNUSED_ENV_VARS: "n" };
const NNODES = 3;

// And over Mooncake's transfer engine (TCP, P2P handshake) where its library loads (CE_MOONCAKE_LIB).
const ENGINES = [
  { name: "UCX TCP", ...ucx, env: UCX_ENV },
  { name: "Mooncake TCP", ...mooncake, env: MOONCAKE_ENV },
];

for (const engine of ENGINES) describe.skipIf(!engine.ok)(`P2P updates between ce serve hosts over ${engine.name} (${engine.reason})`, () => {
  // host 0 and host 1 (one device each) hold checkpoints; host 2 (two devices) is the new instance.
  let hosts: Host[] = [];
  let whole: TestCheckpoint;
  let split: TestCheckpoint;
  let big: TestCheckpoint;
  const start = (rank: number, port: number) => startHost(rank, rank === 2 ? 2 : 1, port, { nnodes: NNODES, env: engine.env });

  beforeAll(async () => {
    [whole, split, big] = await Promise.all([
      smallCheckpoint({ files: 2, tensorsPerFile: 40, seed: 51 }),
      smallCheckpoint({ files: 2, tensorsPerFile: 40, seed: 52, largestBytes: 4 << 20 }),
      smallCheckpoint({ files: 2, tensorsPerFile: 60, seed: 53, largestBytes: 24 << 20 }),
    ]);
    const h0 = await start(0, 0);
    hosts = [h0, ...(await Promise.all([start(1, masterPort(h0)), start(2, masterPort(h0))]))];
    await untilWhole(h0, NNODES);
  }, 90_000);

  afterAll(async () => {
    for (const h of hosts) h.proc.kill("SIGKILL");
    await Promise.all([whole, split, big].map((c) => c?.dir.cleanup()));
  });

  const register = async (h: Host, name: string, path: string, version = 1) => {
    const r = await call(h, "POST", "/v1/checkpoints", { name, path, version });
    expect(r.json).toMatchObject({ ok: true });
  };

  test(
    "a host that holds nothing pulls a version from another host into its two workers, verified by digest, while the source updates its own workers",
    async () => {
      await register(hosts[0]!, "whole", whole.dir.path, 7);
      const [pulled, local] = await Promise.all([
        call(hosts[2]!, "POST", "/v1/update", { checkpoint: "whole", ranks: [2, 3] }),
        call(hosts[0]!, "POST", "/v1/update", { checkpoint: "whole", ranks: [0] }),
      ]);
      expect(pulled.json).toMatchObject({ ok: true, version: 7, hosts: [2], sources: [0], ranks: [2, 3], bytes: whole.bytes, tensors: whole.tensors });
      const p = pulled.json.perHost[0];
      expect(p).toMatchObject({ host: 2, verified: whole.tensors, bytes: whole.bytes, pull: { sources: [0], bytes: whole.bytes } });
      expect(p.devices).toHaveLength(2);
      console.log(`pulled ${whole.bytes} bytes from host 0: reads ${p.pull.seconds.toFixed(3)} s (${p.pull.gbps.toFixed(2)} GB/s), update ${p.seconds.toFixed(3)} s`);
      // The source's own update ran from its regions, beside the reads.
      expect(local.json).toMatchObject({ ok: true, hosts: [0], perHost: [{ host: 0, verified: whole.tensors }] });
      expect(local.json.perHost[0].pull).toBeUndefined();
      // Host 1 was not touched: it never ran an update.
      const st = await call(hosts[1]!, "GET", "/v1/status");
      expect(st.json.cluster.hosts[1]).toMatchObject({ host: 1, up: true, busy: false, last: null });
      // Released, the source's registration goes with its transfer registration.
      expect((await call(hosts[0]!, "DELETE", "/v1/checkpoints/whole")).json).toMatchObject({ ok: true });
      const gone = await call(hosts[2]!, "POST", "/v1/update", { checkpoint: "whole", ranks: [2, 3] });
      expect(gone.json).toMatchObject({ ok: false, error: { code: "E_UNKNOWN_CHECKPOINT" } });
    },
    60_000,
  );

  test(
    "a version split over two hosts is read from both at once; ranks that split a host are refused naming its ranks",
    async () => {
      await register(hosts[0]!, "split", split.ckpt.files[0]!.path, 2);
      await register(hosts[1]!, "split", split.ckpt.files[1]!.path, 2);
      // Asked of host 1, run by host 0.
      const r = await call(hosts[1]!, "POST", "/v1/update", { checkpoint: "split", ranks: [3, 2] });
      expect(r.json).toMatchObject({ ok: true, version: 2, hosts: [2], sources: [0, 1], bytes: split.bytes });
      const pull = r.json.perHost[0].pull;
      expect(r.json.perHost[0].verified).toBe(split.tensors);
      expect(pull.bytesFrom["0"] + pull.bytesFrom["1"]).toBe(split.bytes);
      expect(pull.bytesFrom["0"]).toBe(split.ckpt.files[0]!.tensors.reduce((s, t) => s + t.nbytes, 0));
      // Host 0 holds half: its own pull reads the other half from host 1 (and its half from itself).
      const mixed = await call(hosts[0]!, "POST", "/v1/update", { checkpoint: "split", ranks: [0] });
      expect(mixed.json).toMatchObject({ ok: true, perHost: [{ host: 0, verified: split.tensors, pull: { sources: [0, 1] } }] });
      const bad = await call(hosts[2]!, "POST", "/v1/update", { checkpoint: "split", ranks: [2] });
      expect(bad.json).toMatchObject({ ok: false, error: { code: "E_RANKS" } });
      expect(bad.json.error.message).toContain("host 2 has ranks 2..3");
    },
    60_000,
  );

  test(
    "a source SIGKILLed mid-pull fails the pull naming it within the deadline; the others keep serving, and once it is back the pull works",
    async () => {
      await register(hosts[0]!, "big", big.ckpt.files[0]!.path);
      await register(hosts[1]!, "big", big.ckpt.files[1]!.path);
      const victim = hosts[1]!;
      const pending = call(hosts[2]!, "POST", "/v1/update", { checkpoint: "big", ranks: [2, 3] });
      // Killed once the puller has started its update (the reads run behind the offers).
      const deadline = performance.now() + 20_000;
      for (;;) {
        const st = await call(hosts[2]!, "GET", "/v1/status");
        if (st.json.cluster.hosts[2].busy) break;
        if (performance.now() > deadline) throw new Error(`host 2 never started the pull: ${JSON.stringify(st.json)}`);
        await Bun.sleep(5);
      }
      const t0 = performance.now();
      victim.proc.kill("SIGKILL");
      const r = await pending;
      const ms = performance.now() - t0;
      console.log(`host 1 killed mid-pull: the pull failed after ${ms.toFixed(0)} ms: ${r.json.error?.message}`);
      expect(r.json.ok).toBe(false);
      expect(r.json.error.message).toContain("host 1");
      expect(ms).toBeLessThan(10_000);
      await within(10_000, "the victim to exit", victim.proc.exited);
      for (const h of [hosts[0]!, hosts[2]!]) expect((await call(h, "GET", "/v1/healthz")).json).toEqual({ ok: true });

      hosts[1] = await start(1, masterPort(hosts[0]!));
      await untilWhole(hosts[0]!, NNODES);
      await register(hosts[1]!, "big", big.ckpt.files[1]!.path);
      const again = await call(hosts[2]!, "POST", "/v1/update", { checkpoint: "big", ranks: [2, 3] });
      expect(again.json).toMatchObject({ ok: true, bytes: big.bytes, perHost: [{ verified: big.tensors }] });
      await register(hosts[1]!, "split", split.ckpt.files[1]!.path, 2);
      const served = await call(hosts[0]!, "POST", "/v1/update", { checkpoint: "split", ranks: [0] });
      expect(served.json).toMatchObject({ ok: true, perHost: [{ verified: split.tensors }] });
    },
    90_000,
  );
});
