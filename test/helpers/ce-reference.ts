// Python-side checks for the checkpoint-engine dialect: a Python with torch (and pyzmq, for the
// worker stand-ins), probed once, and the loader that turns ce's pickles into descriptions.
import { join } from "node:path";

export interface TorchPython {
  ok: boolean;
  python: string;
  /** "torch 1.13.0a0, pyzmq 24.0.1", or why no candidate would do */
  reason: string;
  zmq: boolean;
}

const PROBE = [
  "import torch",
  "try:",
  "    import zmq; z = f', pyzmq {zmq.__version__}'",
  "except ImportError:",
  "    z = ''",
  "print(f'torch {torch.__version__}{z}')",
].join("\n");

let cached: TorchPython | undefined;

export function torchPython(): TorchPython {
  if (cached) return cached;
  const candidates = [...new Set([process.env.CE_PYTHON, "/usr/bin/python3", "python3"].filter((p): p is string => !!p))];
  const refused: string[] = [];
  for (const python of candidates) {
    try {
      const r = Bun.spawnSync([python, "-c", PROBE], { stdout: "pipe", stderr: "pipe", timeout: 60_000 });
      const text = r.stdout.toString().trim();
      if (r.exitCode === 0) return (cached = { ok: true, python, reason: text, zmq: text.includes("pyzmq") });
      refused.push(`${python}: ${r.stderr.toString().trim().split("\n").at(-1) ?? `exit ${r.exitCode}`}`);
    } catch (e) {
      refused.push(`${python}: ${(e as Error).message}`);
    }
  }
  return (cached = { ok: false, python: candidates.at(-1) ?? "python3", reason: `no Python with torch (${refused.join("; ")})`, zmq: false });
}

export const HELPERS_DIR = import.meta.dir;
/** Importing torch takes seconds on a busy machine. */
export const PYTHON_DEADLINE_MS = 60_000;

/** What ce-reference-load.py says one Python object is. */
export type Described =
  | { t: "None" }
  | { t: "bool"; v: boolean }
  | { t: "int"; v: string }
  | { t: "str"; v: string }
  | { t: "bytes"; hex: string }
  | { t: "torch.Size"; v: number[] }
  | { t: "torch.dtype"; v: string }
  | { t: "tuple" | "list"; items: Described[] }
  | { t: "dict"; items: [string, Described][] }
  | { t: "exception"; class: string; args: Described[] }
  | { t: "global"; v: string }
  | { t: "other"; v: string };

export interface Loaded {
  value?: Described;
  opcodes?: string[];
  /** an IPC handle tuple's arguments by the names of this torch's rebuild_cuda_tensor */
  rebuild_args?: Record<string, Described>;
  error?: string;
}

/** Loads each pickle in Python (restricted globals, a stand-in rebuild_cuda_tensor) and describes it. */
export function loadInPython(python: string, pickles: Uint8Array[]): Loaded[] {
  const input = JSON.stringify(pickles.map((p) => Buffer.from(p).toString("base64")));
  const r = Bun.spawnSync([python, join(HELPERS_DIR, "ce-reference-load.py")], {
    stdin: Buffer.from(input),
    stdout: "pipe",
    stderr: "pipe",
    timeout: PYTHON_DEADLINE_MS,
  });
  if (r.exitCode !== 0) throw new Error(`ce-reference-load.py exited with ${r.exitCode ?? r.signalCode}: ${r.stderr.toString()}`);
  return JSON.parse(r.stdout.toString()) as Loaded[];
}
