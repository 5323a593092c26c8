// Argument blocks shared by several commands.
import type { ArgDef } from "citty";
import type { EngineSpec, UpdaterOptions } from "../app/updater";
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
  verify: { type: "boolean", description: "built-in workers compare every received tensor with the checkpoint's bytes", default: true },
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
    return { kind, worker, verify: args.verify ?? true, python: config.CE_PYTHON };
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
  };
}
