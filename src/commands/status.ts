// ce status: what a running `ce serve` (and, in a cluster, every host) holds and did last.
import { defineCommand } from "citty";
import { CeError } from "../base/errors";
import { writeJson } from "../base/log";
import { formatBytes, formatSeconds } from "../base/units";
import { outputArgs } from "./_args";

interface HostView {
  host?: number;
  up?: boolean;
  joined?: boolean;
  devices?: string[];
  busy?: boolean;
  checkpoints?: number;
  hostBytes?: number;
  deviceBytes?: number;
  last?: { checkpoint: string; version: number; seconds: number; gbps: number } | null;
}

function line(h: HostView): string {
  const who = h.host === undefined ? "this host" : `host ${h.host}`;
  if (h.up === false) return `${who}: ${h.joined ? "down (stopped answering)" : "not joined"}`;
  const last = h.last ? `last ${h.last.checkpoint}@${h.last.version} in ${formatSeconds(h.last.seconds)} (${h.last.gbps.toFixed(1)} GB/s)` : "no update yet";
  return `${who}: ${h.busy ? "updating" : "idle"}, ${h.devices?.length ?? 0} devices, ${h.checkpoints ?? 0} checkpoints (${formatBytes(h.hostBytes ?? 0)} pinned), ${formatBytes(h.deviceBytes ?? 0)} of device buffers, ${last}`;
}

export default defineCommand({
  meta: { name: "status", description: "show a running ce serve: its GPUs, checkpoints and last update; in a cluster, every host" },
  args: {
    url: { type: "string", description: "the daemon's API", default: "http://127.0.0.1:8711", valueHint: "URL" },
    socket: { type: "string", description: "the daemon's Unix socket instead of --url", valueHint: "PATH" },
    ...outputArgs,
  },
  async run({ args }) {
    let res: Response;
    try {
      res = await fetch(args.socket ? "http://localhost/v1/status" : new URL("/v1/status", args.url), { unix: args.socket, signal: AbortSignal.timeout(15_000) });
    } catch (err) {
      throw new CeError("E_SERVE_UNREACHABLE", `no ce serve answers at ${args.socket ?? args.url}: ${(err as Error).message}`, { hint: "start one with ce serve, or name it with --url / --socket" });
    }
    const body = (await res.json()) as { ok: boolean; cluster?: { nnodes: number; hostsUp: number; hosts: HostView[] } } & HostView;
    if (args.json) return writeJson(body);
    const out = body.cluster
      ? [`cluster of ${body.cluster.nnodes} hosts, ${body.cluster.hostsUp} up`, ...body.cluster.hosts.map((h) => `  ${line(h)}`)]
      : [line(body)];
    process.stdout.write(`${out.join("\n")}\n`);
  },
});
