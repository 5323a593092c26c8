// Finds a Python that can run ce's worker: torch, plus pyzmq or a loadable libzmq.so.5.
// Probed once; the reason says why each candidate was refused, for the skipped test's title.
import { join } from "node:path";

export interface PythonProbe {
  ok: boolean;
  /** The interpreter that passed, or the last one tried. */
  python: string;
  /** What it offers ("torch 2.11.0, ctypes libzmq 4.3.5 at ...") or why none would do. */
  reason: string;
}

export const PYTHON_PACKAGE_DIR = join(import.meta.dir, "..", "..", "python");

// Runs inside the candidate: imports what the worker needs and names the libzmq it would use.
const PROBE = [
  "import sys",
  "sys.path.insert(0, sys.argv[1])",
  "import torch",
  "from ce_worker import transport",
  "print(f'torch {torch.__version__}, {transport.probe()}')",
].join("\n");

const PROBE_TIMEOUT_MS = 60_000; // importing torch cold can take a while

let cached: PythonProbe | undefined;

export function findPython(): PythonProbe {
  if (cached) return cached;
  const candidates = [...new Set([process.env.CE_PYTHON, "/usr/bin/python3", "python3"].filter((p): p is string => !!p))];
  const refused: string[] = [];
  for (const python of candidates) {
    const why = probe(python);
    if (why.ok) return (cached = { ok: true, python, reason: why.text });
    refused.push(`${python}: ${why.text}`);
  }
  return (cached = { ok: false, python: candidates.at(-1) ?? "python3", reason: refused.join("; ") });
}

function probe(python: string): { ok: boolean; text: string } {
  try {
    const r = Bun.spawnSync([python, "-c", PROBE, PYTHON_PACKAGE_DIR], {
      stdout: "pipe",
      stderr: "pipe",
      timeout: PROBE_TIMEOUT_MS,
    });
    if (r.exitCode === 0) return { ok: true, text: r.stdout.toString().trim() };
    const lines = r.stderr.toString().trim().split("\n");
    return { ok: false, text: lines.at(-1) || `exit status ${r.exitCode ?? r.signalCode}` };
  } catch (e) {
    return { ok: false, text: (e as Error).message }; // not installed
  }
}
