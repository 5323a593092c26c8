// P2P into a GPU (issue 23) on one GPU host: host 0 holds the version in pinned host memory (CPU
// backend, its own workers serving), host 1 (the new instance, one GPU, the reference worker) pulls
// it over UCX with whatever transports UCX picks here, into its GPU worker, verified by digest. The
// figures printed are the pull's read rate beside the update, and the transport's own rate between
// two processes of libce endpoints (host memory to host memory, nothing else running); a synthetic
// checkpoint of CE_TEST_P2P_MODEL (default Qwen3-0.6B; Qwen3-8B for the README's figure) is what moves.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { dirname, join } from "node:path";
import { synthesize } from "../../src/checkpoint/synth";
import { gpu } from "../helpers/gpu";
import { ucx } from "../helpers/libraries";
import { type Host, call, masterPort, startHost, untilWhole } from "../helpers/cluster";
import { startRanks } from "../helpers/native-ranks";

const skip = !gpu.ok ? gpu.reason : !ucx.ok ? ucx.reason : undefined;
const MODEL = process.env.CE_TEST_P2P_MODEL ?? "Qwen3-0.6B";

describe.skipIf(skip !== undefined)(`a P2P pull into a GPU worker over UCX (${skip ?? `${gpu.reason}; ${ucx.reason}`})`, () => {
  let hosts: Host[] = [];
  let synth: Awaited<ReturnType<typeof synthesize>>;

  beforeAll(async () => {
    synth = await synthesize(MODEL, 11);
    const roots = [dirname(synth.ckpt.files[0]!.path)];
    // ce's default heartbeat (the helper's 500 ms suits small checkpoints; this one pins gigabytes).
    const env = { UCX_WARN_UNUSED_ENV_VARS: "n", CE_OP_TIMEOUT: "120s", CE_HEARTBEAT: "1s" };
    const h0 = await startHost(0, 1, 0, { nnodes: 2, roots, env });
    hosts = [h0, await startHost(1, 1, masterPort(h0), { nnodes: 2, device: "cuda", roots, env })];
    await untilWhole(h0, 2);
  }, 600_000);

  afterAll(() => {
    for (const h of hosts) h.proc.kill("SIGKILL");
    synth?.remove();
  });

  test(
    `host 1 pulls ${MODEL} from host 0's pinned memory into its GPU while host 0 serves its own workers, byte-exact by digest`,
    async () => {
      const ckpt = synth.ckpt;
      const bytes = ckpt.tensors.reduce((s, t) => s + t.nbytes, 0);
      const reg = await call(hosts[0]!, "POST", "/v1/checkpoints", { name: "model", path: dirname(ckpt.files[0]!.path), version: 3 }, 600_000);
      expect(reg.json).toMatchObject({ ok: true });
      for (let round = 0; round < 3; round++) {
        const [pulled, local] = await Promise.all([
          call(hosts[1]!, "POST", "/v1/update", { checkpoint: "model", ranks: [1] }, 600_000),
          round === 0 ? call(hosts[0]!, "POST", "/v1/update", { checkpoint: "model", ranks: [0] }, 600_000) : undefined,
        ]);
        if (!pulled.json.ok) console.log(`host 0:\n${hosts[0]!.stderr.join("").slice(-3000)}\nhost 1:\n${hosts[1]!.stderr.join("").slice(-3000)}`);
        expect(pulled.json).toMatchObject({ ok: true, version: 3, hosts: [1], sources: [0], bytes, tensors: ckpt.tensors.length });
        const p = pulled.json.perHost[0];
        expect(p).toMatchObject({ host: 1, verified: ckpt.tensors.length, pull: { sources: [0], bytes } });
        expect(p.devices[0]).toMatch(/H200|GPU|NVIDIA/);
        if (local) expect(local.json).toMatchObject({ ok: true, perHost: [{ host: 0, verified: ckpt.tensors.length }] });
        console.log(
          `P2P ${MODEL} (${(bytes / 1e9).toFixed(2)} GB) into ${p.devices[0]}: reads ${p.pull.seconds.toFixed(3)} s (${p.pull.gbps.toFixed(1)} GB/s), update ${p.seconds.toFixed(3)} s (${(bytes / p.seconds / 1e9).toFixed(1)} GB/s)`,
        );
      }
    },
    900_000,
  );

  test("the transport's own rate: 1 GiB read between two processes' libce endpoints, 16 reads in flight", async () => {
    const [src, reader] = await startRanks(2, { script: join(import.meta.dir, "../helpers/xfer-peer.ts"), env: { UCX_WARN_UNUSED_ENV_VARS: "n" } });
    try {
      const bytes = 1024 ** 3;
      const s = await src!.ask("source", { bytes, seed: 5 }, 120_000);
      const c = await reader!.ask("connect", { address: s.address, name: "source" });
      const piece = bytes / 16;
      const ops = Array.from({ length: 16 }, (_, i) => [[i * piece, i * piece, piece]]);
      const runs: number[] = [];
      for (let k = 0; k < 3; k++) {
        const r = await reader!.ask("pull", { peer: c.peer, rkey: s.rkey, ops, dstBytes: bytes, srcBytes: bytes, seed: 5, timeoutMs: 120_000 }, 180_000);
        expect(r).toMatchObject({ ok: true, mismatch: -1 });
        runs.push(r.gbps as number);
      }
      console.log(`UCX between two processes, host to host: ${runs.map((g) => g.toFixed(1)).join(", ")} GB/s (the first pins the reader's region)`);
    } finally {
      src!.kill();
      reader!.kill();
    }
  }, 600_000);
});
