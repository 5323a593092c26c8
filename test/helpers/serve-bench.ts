// Times warm updates through a real `ce serve` (optionally as a one-host cluster): writes a synthetic
// checkpoint of a real architecture, starts the daemon with the given flags, registers, runs N
// updates, prints one JSON line. A benchmark helper for GPU hosts, not a test.
// usage: bun test/helpers/serve-bench.ts MODEL N -- <ce serve flags>
import { synthesize } from "../../src/checkpoint/synth";
import { CLI } from "./update";

const [model = "Qwen3-0.6B", n = "5", sep, ...flags] = process.argv.slice(2);
if (sep !== undefined && sep !== "--") throw new Error("usage: serve-bench.ts MODEL N -- FLAGS");
const synth = await synthesize(model, 1);
const proc = Bun.spawn([process.execPath, CLI, "serve", "--port", "0", "--json", "--log-level", "warn", ...flags], {
  stdout: "pipe",
  stderr: "inherit",
  env: { ...process.env, CE_CLUSTER_SECRET: process.env.CE_CLUSTER_SECRET ?? "serve-bench-secret-0123456789" },
});
try {
  const reader = proc.stdout.getReader();
  const first = JSON.parse(new TextDecoder().decode((await reader.read()).value)) as { ok: boolean; listening: string };
  if (!first.ok) throw new Error(`ce serve did not start: ${JSON.stringify(first)}`);
  const { listening } = first;
  const post = async (path: string, body: unknown) => (await fetch(`${listening}${path}`, { method: "POST", body: JSON.stringify(body) })).json() as Promise<any>;
  const reg = await post("/v1/checkpoints", { name: "bench", path: synth.ckpt.root });
  if (!reg.ok) throw new Error(JSON.stringify(reg));
  const runs: number[] = [];
  let last: any;
  for (let i = 0; i <= Number(n); i++) {
    const t = performance.now();
    last = await post("/v1/update", { checkpoint: "bench" });
    if (!last.ok) throw new Error(JSON.stringify(last));
    if (i > 0) runs.push((performance.now() - t) / 1000);
  }
  runs.sort((a, b) => a - b);
  const median = runs[Math.floor((runs.length - 1) / 2)]!;
  console.log(JSON.stringify({ model, flags, bytes: last.bytes, registerSeconds: reg.registerSeconds, httpMedianSeconds: median, httpMin: runs[0], last }));
} finally {
  proc.kill("SIGTERM");
  await proc.exited;
  synth.remove();
}
