// ce serve: the per-host daemon. Checkpoints stay registered (pinned) and the update session
// stays warm between updates; an HTTP API on loopback drives it.
import { defineCommand } from "citty";
import { config } from "../base/config";
import { UsageError } from "../base/errors";
import { log, writeJson } from "../base/log";
import { chmodSync, rmSync } from "node:fs";
import { resolve } from "node:path";
import { Daemon } from "../serve/daemon";
import { MAX_LAYOUT_BODY_BYTES, route } from "../serve/routes";
import { openUpdater } from "../app/updater";
import { Cluster } from "../cluster/cluster";
import { clusterArgs, clusterOptions, deviceArgs, engineArgs, outputArgs, planArgs, planOptions, updaterOptions } from "./_args";

export default defineCommand({
  meta: {
    name: "serve",
    description:
      "run the per-host daemon: checkpoints stay pinned and the session warm between updates; HTTP API: POST /v1/checkpoints, POST /v1/update ({checkpoint} updates every host of a cluster; {checkpoint, ranks: [...]} updates only those global ranks, whole hosts such as a new instance's, which read the version by P2P (UCX) from the hosts that hold it while every other host serves untouched), GET /v1/status, GET /v1/checkpoints, DELETE /v1/checkpoints/NAME, pools (POST /v1/pools, POST /v1/pools/NAME/versions, …/versions/N/written, …/versions/N/publish, POST /v1/pools/NAME/rollback, GET and DELETE /v1/pools/NAME), GET /v1/healthz, GET /metrics",
  },
  args: {
    port: { type: "string", description: "HTTP port for the control API (0: any free port, printed at start)", default: "8711", valueHint: "PORT" },
    host: { type: "string", description: "address to listen on (loopback by default: the API has no authentication)", default: "127.0.0.1", valueHint: "ADDR" },
    socket: { type: "string", description: "listen on this Unix socket instead (mode 0600: only this user can call it)", valueHint: "PATH" },
    root: { type: "string", description: "directories whose files may be registered, comma-separated", default: "/dev/shm", valueHint: "DIR[,DIR]" },
    timeout: { type: "string", description: `deadline for each update (default ${config.CE_TIMEOUT})`, valueHint: "10m" },
    delta: {
      type: "boolean",
      description: "pool updates go as deltas against the serving version (unchanged tensors skipped, sparse patches) unless a request says \"delta\": false",
      default: false,
    },
    ...engineArgs,
    ...deviceArgs,
    ...planArgs,
    ...clusterArgs,
    ...outputArgs,
  },
  async run({ args }) {
    const port = Number(args.port);
    if (!Number.isSafeInteger(port) || port < 0 || port > 65535) throw new UsageError(`--port "${args.port}" is not a port number`);
    const { bucketBytes, slots, timeoutMs } = planOptions(args);
    const roots = args.root.split(",").map((r) => resolve(r.trim())).filter(Boolean);
    const options = updaterOptions(args);
    const clustered = clusterOptions(args);
    const up = await openUpdater(options);
    const daemon = new Daemon(up, { bucketBytes, slots, timeoutMs, roots, verify: options.verify ?? false, delta: args.delta });
    let cluster: Cluster | undefined;
    if (clustered) {
      try {
        cluster = await Cluster.start(clustered, daemon.host);
      } catch (err) {
        await daemon.close();
        throw err;
      }
      daemon.attach(cluster);
    }
    const fetch = (req: Request) => route(daemon, req);
    let server: ReturnType<typeof Bun.serve>;
    let url: string;
    try {
      if (args.socket) {
        const path = resolve(args.socket);
        // Created 0600 from the start (umask), not chmod-ed after: no moment where others may connect.
        const mask = process.umask(0o177);
        try {
          server = Bun.serve({ unix: path, fetch, maxRequestBodySize: MAX_LAYOUT_BODY_BYTES });
        } finally {
          process.umask(mask);
        }
        chmodSync(path, 0o600);
        url = `unix:${path}`;
      } else {
        server = Bun.serve({ hostname: args.host, port, fetch, maxRequestBodySize: MAX_LAYOUT_BODY_BYTES });
        url = `http://${args.host}:${server.port}`;
      }
    } catch (err) {
      await daemon.close();
      throw new UsageError(`cannot listen on ${args.socket ?? `${args.host}:${port}`}: ${(err as Error).message}`);
    }
    if (args.json) writeJson({ ok: true, listening: url, ...(cluster ? { host: cluster.rank, nnodes: clustered!.nnodes, cluster: cluster.endpoint } : {}) });
    else log.info(`ce serve listening on ${url} (${up.engine.description})`);

    // Runs until SIGINT or SIGTERM; then every registration, buffer and worker is released.
    await new Promise<void>((resolve) => {
      process.once("SIGINT", () => resolve());
      process.once("SIGTERM", () => resolve());
    });
    log.info("stopping: releasing checkpoints, buffers and workers");
    await server.stop(true);
    if (args.socket) rmSync(resolve(args.socket), { force: true });
    await daemon.close();
  },
});
