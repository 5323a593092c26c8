// Argument blocks shared by several commands.
import type { ArgDef } from "citty";

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
  engine: { type: "string", description: "vllm, external, or workers (ce starts its own receivers); default: vllm with --endpoint, else workers", valueHint: "KIND" },
  endpoint: { type: "string", description: "the engine's URL (vllm: the server, e.g. http://127.0.0.1:8000; external: the exact URL)", valueHint: "URL" },
  worker: { type: "string", description: "with --engine workers: ref (built-in, no Python) or python (torch)", valueHint: "ref|python" },
  verify: { type: "boolean", description: "built-in workers compare every received tensor with the checkpoint's bytes", default: true },
  broadcast: { type: "boolean", description: "use the NCCL broadcast path even on one GPU", default: false },
} as const satisfies Record<string, ArgDef>;
