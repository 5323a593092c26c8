// Argument blocks shared by several commands.
import type { ArgDef } from "citty";
import type { EngineSpec, UpdaterOptions } from "../app/updater";
import type { ClusterOptions } from "../cluster/cluster";
import { loadSecret } from "../cluster/seal";
import { config } from "../base/config";
import { UsageError } from "../base/errors";
import { parseDuration, parseSize } from "../base/units";
import type { BackendChoice, DeviceSelection } from "../core/devices";
import { checkpointEngineDialect } from "../wire/checkpoint-engine";

export const outputArgs = {
  json: { type: "boolean", description: "print one JSON result on stdout (logs stay on stderr)", default: false },
  "log-level": {
    type: "string",
    description: "silent, warn, info, debug or trace",
    valueHint: "level",
  },
} as const satisfies Record<string, ArgDef>;

export const deviceArgs = {
  device: { type: "string", description: "backend: cuda, cpu or auto (cuda when a GPU is present)", valueHint: "cuda|cpu|auto" },
  devices: {
    type: "string",
    description: "GPUs to use: a count (first N) or a list (0,2,3); on cpu, how many simulated devices",
    valueHint: "N|LIST",
  },
} as const satisfies Record<string, ArgDef>;

export const planArgs = {
  "bucket-size": { type: "string", description: "bucket size (auto: from GPU memory and the largest tensor)", valueHint: "1GiB" },
  slots: { type: "string", description: "IPC slots per GPU (auto: 3)", valueHint: "N" },
} as const satisfies Record<string, ArgDef>;

export const engineArgs = {
  engine: {
    type: "string",
    description: "vllm, sglang, external, or workers (ce starts its own receivers); default: vllm with --endpoint, else workers",
    valueHint: "KIND",
  },
  protocol: {
    type: "string",
    description: "what the engine's workers speak: ce (JSON frames) or checkpoint-engine (the reference system's worker loop, unchanged)",
    default: "ce",
    valueHint: "ce|checkpoint-engine",
  },
  endpoint: { type: "string", description: "the engine's URL (vllm: the server, e.g. http://127.0.0.1:8000; external: the exact URL)", valueHint: "URL" },
  worker: { type: "string", description: "with --engine workers: ref (built-in, no Python) or python (torch)", valueHint: "ref|python" },
  verify: {
    type: "boolean",
    description: "every worker digests what it loaded and ce compares with the version's digests (docs/digest.md); --no-verify skips it",
    default: true,
  },
  broadcast: { type: "boolean", description: "use the NCCL broadcast path even on one GPU", default: false },
  "reset-prefix-cache": {
    type: "boolean",
    description: "vllm: POST /reset_prefix_cache after an update, so no KV computed with the old weights is reused",
    default: true,
  },
  "flush-cache": { type: "boolean", description: "sglang: flush the prefix cache with the update (SGLang's flush_cache)", default: true },
  "weight-version": { type: "string", description: "sglang: the weight_version SGLang reports for the new weights", valueHint: "VERSION" },
} as const satisfies Record<string, ArgDef>;

// From flags to typed options: every check that names a flag lives here, before anything slow runs
// (opening a checkpoint, writing a synthetic one of many GiB).

/** --bucket-size, --slots and --timeout, with their CE_* defaults. */
export function planOptions(args: { "bucket-size"?: string; slots?: string; timeout?: string }): PlanOptions {
  const bucketSpec = args["bucket-size"] ?? config.CE_BUCKET_SIZE;
  const slotsSpec = args.slots ?? config.CE_SLOTS;
  let slots: number | undefined;
  if (slotsSpec !== "auto") {
    slots = Number(slotsSpec);
    if (!Number.isSafeInteger(slots) || slots < 1) throw new UsageError(`--slots "${slotsSpec}": use a whole number of at least 1, or auto`);
  }
  return {
    bucketBytes: bucketSpec === "auto" ? undefined : parseSize(bucketSpec, "--bucket-size"),
    slots,
    timeoutMs: parseDuration(args.timeout ?? config.CE_TIMEOUT, "--timeout"),
  };
}

export interface PlanOptions {
  bucketBytes?: number;
  slots?: number;
  timeoutMs: number;
}

/** --device and --devices: the backend and which devices. */
export function deviceOptions(args: { device?: string; devices?: string }): { backend: BackendChoice; select: DeviceSelection } {
  const b = args.device ?? config.CE_DEVICE;
  if (b !== "cuda" && b !== "cpu" && b !== "auto") throw new UsageError(`--device "${b}": use cuda, cpu or auto`);
  const spec = args.devices;
  if (spec === undefined || spec === "") return { backend: b, select: undefined };
  if (/^\d+$/.test(spec)) {
    const count = Number(spec);
    if (count < 1) throw new UsageError(`--devices ${spec}: at least one device`);
    return { backend: b, select: { count } };
  }
  const list = spec.split(",").map((s) => s.trim());
  if (!list.every((s) => /^\d+$/.test(s))) throw new UsageError(`--devices "${spec}" is neither a count nor a list like 0,2,3`);
  const ordinals = list.map(Number);
  if (new Set(ordinals).size !== ordinals.length) throw new UsageError(`--devices "${spec}" names a device twice`);
  return { backend: b, select: { ordinals } };
}

interface EngineFlags {
  engine?: string;
  endpoint?: string;
  worker?: string;
  verify?: boolean;
  protocol?: string;
  "reset-prefix-cache"?: boolean;
  "flush-cache"?: boolean;
  "weight-version"?: string;
}

/** --engine, --endpoint, --worker, --verify and the engines' own flags: what to trigger. */
export function engineOptions(args: EngineFlags): EngineSpec {
  const kind = args.engine ?? (args.endpoint ? "vllm" : "workers");
  const reference = protocolOf(args) === "checkpoint-engine";
  if (kind === "workers") {
    if (reference) throw new UsageError("--protocol checkpoint-engine drives a running engine's workers: use --engine vllm or sglang with --endpoint");
    const worker = args.worker ?? "ref";
    if (worker !== "ref" && worker !== "python") throw new UsageError(`--worker "${worker}": use ref or python`);
    return { kind, worker, python: config.CE_PYTHON };
  }
  if (kind !== "vllm" && kind !== "sglang" && kind !== "external") throw new UsageError(`--engine "${kind}": use vllm, sglang, external or workers`);
  if (!args.endpoint) throw new UsageError(`--engine ${kind} needs --endpoint URL`);
  if (kind === "sglang") return { kind, endpoint: args.endpoint, flushCache: args["flush-cache"] ?? true, weightVersion: args["weight-version"] };
  // The reference extension returns None from its RPC: no summaries to check.
  return { kind, endpoint: args.endpoint, resetPrefixCache: args["reset-prefix-cache"] ?? true, summaries: !reference };
}

function protocolOf(args: { protocol?: string }): "ce" | "checkpoint-engine" {
  const p = args.protocol ?? "ce";
  if (p !== "ce" && p !== "checkpoint-engine") throw new UsageError(`--protocol "${p}": use ce or checkpoint-engine`);
  return p;
}

/** Everything openUpdater needs from the shared engine and device flags. */
export function updaterOptions(args: EngineFlags & Parameters<typeof deviceOptions>[0] & { broadcast?: boolean }): UpdaterOptions {
  return {
    ...deviceOptions(args),
    engine: engineOptions(args),
    dialect: protocolOf(args) === "checkpoint-engine" ? checkpointEngineDialect : undefined,
    opTimeoutMs: parseDuration(config.CE_OP_TIMEOUT, "CE_OP_TIMEOUT"),
    forceBroadcast: args.broadcast ?? false,
    // The reference system's protocol carries no digests.
    verify: (args.verify ?? true) && protocolOf(args) !== "checkpoint-engine",
  };
}

export const clusterArgs = {
  nnodes: { type: "string", description: "hosts in the cluster, one ce serve each (default: NNODES, SLURM_NNODES, or torchrun's WORLD_SIZE/LOCAL_WORLD_SIZE; 1)", valueHint: "N" },
  "node-rank": { type: "string", description: "this host's rank, 0 coordinates (default: NODE_RANK, SLURM_NODEID, or torchrun's RANK/LOCAL_WORLD_SIZE)", valueHint: "R" },
  "master-addr": { type: "string", description: `host 0's address (default: MASTER_ADDR, else ${config.MASTER_ADDR})`, valueHint: "ADDR" },
  "master-port": { type: "string", description: `host 0's cluster port (default: MASTER_PORT, else ${config.MASTER_PORT})`, valueHint: "PORT" },
  "secret-file": { type: "string", description: "file holding the cluster's shared secret (mode 0600); default: CE_CLUSTER_SECRET", valueHint: "FILE" },
} as const satisfies Record<string, ArgDef>;

function wholeNumber(text: string, what: string, min: number): number {
  const n = Number(text);
  if (text === "" || !Number.isSafeInteger(n) || n < min) throw new UsageError(`${what} "${text}" is not a whole number of at least ${min}`);
  return n;
}

/** The cluster's shape from flags, then the launchers' variables; undefined for one host alone. */
export function clusterOptions(args: { nnodes?: string; "node-rank"?: string; "master-addr"?: string; "master-port"?: string; "secret-file"?: string }): ClusterOptions | undefined {
  const perHost = config.LOCAL_WORLD_SIZE ? wholeNumber(config.LOCAL_WORLD_SIZE, "LOCAL_WORLD_SIZE", 1) : undefined;
  const fromTorchrun = (v: string, what: string) => (v && perHost ? Math.floor(wholeNumber(v, what, 0) / perHost) : undefined);
  const nnodes =
    args.nnodes !== undefined
      ? wholeNumber(args.nnodes, "--nnodes", 1)
      : config.NNODES
        ? wholeNumber(config.NNODES, "NNODES", 1)
        : config.SLURM_NNODES
          ? wholeNumber(config.SLURM_NNODES, "SLURM_NNODES", 1)
          : (fromTorchrun(config.WORLD_SIZE, "WORLD_SIZE") ?? 1);
  // One host alone needs no cluster, unless --nnodes 1 asks for its code path (a one-host cluster).
  if (nnodes === 1 && args.nnodes === undefined) return undefined;
  const nodeRank =
    args["node-rank"] !== undefined
      ? wholeNumber(args["node-rank"], "--node-rank", 0)
      : config.NODE_RANK
        ? wholeNumber(config.NODE_RANK, "NODE_RANK", 0)
        : config.SLURM_NODEID
          ? wholeNumber(config.SLURM_NODEID, "SLURM_NODEID", 0)
          : (fromTorchrun(config.RANK, "RANK") ?? (nnodes === 1 ? 0 : undefined));
  if (nodeRank === undefined) throw new UsageError(`a cluster of ${nnodes} hosts needs this host's rank: --node-rank (or NODE_RANK)`);
  if (nodeRank >= nnodes) throw new UsageError(`--node-rank ${nodeRank} is not below --nnodes ${nnodes}`);
  // Port 0 lets host 0 pick one (tests); the others must be told it.
  const masterPort = wholeNumber(args["master-port"] ?? config.MASTER_PORT, "--master-port", 0);
  if (masterPort > 65535) throw new UsageError(`--master-port ${masterPort} is not a port`);
  let secret: Buffer;
  try {
    secret = loadSecret({ secret: config.CE_CLUSTER_SECRET, secretFile: args["secret-file"] });
  } catch (err) {
    throw new UsageError((err as Error).message, { hint: (err as { hint?: string }).hint });
  }
  return {
    nnodes,
    nodeRank,
    masterAddr: args["master-addr"] ?? config.MASTER_ADDR,
    masterPort,
    secret,
    joinTimeoutMs: parseDuration(config.CE_JOIN_TIMEOUT, "CE_JOIN_TIMEOUT"),
    heartbeatMs: parseDuration(config.CE_HEARTBEAT, "CE_HEARTBEAT"),
  };
}
