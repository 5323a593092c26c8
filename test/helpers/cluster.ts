// `ce serve` processes as the hosts of one cluster on loopback (CPU backend unless said, reference workers), and
// the HTTP calls the cluster tests make of them. Every wait has a deadline.
import type { Subprocess } from "bun";
import { tmpdir } from "node:os";
import { CLI, within } from "./update";

export const CLUSTER_SECRET = "cluster-test-secret-0123456789";

export interface Host {
  rank: number;
  proc: Subprocess<"ignore", "pipe", "pipe">;
  url: string;
  cluster: string;
  stderr: string[];
}

/** Starts host `rank` of an nnodes cluster whose host 0 listens on masterPort (0 for host 0 itself: any port). */
export async function startHost(rank: number, devices: number, masterPort: number, o: { nnodes: number; env?: Record<string, string>; device?: "cpu" | "cuda"; roots?: string[] }): Promise<Host> {
  const roots = (o.roots ?? [tmpdir()]).flatMap((r) => ["--root", r]);
  const proc = Bun.spawn(
    [process.execPath, CLI, "serve", "--port", "0", "--device", o.device ?? "cpu", "--devices", String(devices), ...roots, "--json",
      "--nnodes", String(o.nnodes), "--node-rank", String(rank), "--master-addr", "127.0.0.1", "--master-port", String(masterPort)],
    {
      stdin: "ignore",
      stdout: "pipe",
      stderr: "pipe",
      env: { ...process.env, CE_CLUSTER_SECRET: CLUSTER_SECRET, CE_HEARTBEAT: "500ms", CE_OP_TIMEOUT: "20s", ...o.env },
    },
  );
  const stderr: string[] = [];
  void (async () => {
    for await (const chunk of proc.stderr) stderr.push(new TextDecoder().decode(chunk));
  })();
  const reader = proc.stdout.getReader();
  const first = await within(30_000, `host ${rank} to listen`, reader.read());
  reader.releaseLock();
  const line = JSON.parse(new TextDecoder().decode(first.value ?? new Uint8Array())) as { listening: string; cluster: string };
  return { rank, proc, url: line.listening, cluster: line.cluster, stderr };
}

/** The port host 0 listens on for the other hosts. */
export function masterPort(h0: Host): number {
  return Number(new URL(h0.cluster.replace("tcp://", "http://")).port);
}

export async function call(h: Host, method: string, path: string, body?: unknown, ms = 60_000): Promise<{ status: number; json: Record<string, any> }> {
  const res = await within(ms, `${method} ${path} on host ${h.rank}`, fetch(`${h.url}${path}`, { method, body: body === undefined ? undefined : JSON.stringify(body) }));
  return { status: res.status, json: (await res.json()) as Record<string, any> };
}

/** Resolves once host 0 counts n hosts up. */
export async function untilWhole(h0: Host, n: number, ms = 30_000): Promise<void> {
  const deadline = performance.now() + ms;
  for (;;) {
    const st = await call(h0, "GET", "/v1/status");
    if (st.json.cluster?.hostsUp === n) return;
    if (performance.now() > deadline) throw new Error(`the cluster did not come together: ${JSON.stringify(st.json)}`);
    await Bun.sleep(100);
  }
}
