// The model tests' pieces: python/tests/model_server.py (a stand-in engine holding a real torch
// model) as a subprocess, its checkpoints and reference logits, and `ce update` runs against it.
import { createHash } from "node:crypto";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { PYTHON_PACKAGE_DIR } from "./python";
import { CLI, ROOT, within } from "./update";

export const MODEL_SERVER = join(ROOT, "python", "tests", "model_server.py");

/** qwen3: transformers' Qwen3ForCausalLM; tiny: a plain-torch MLP language model (no transformers). */
export type ModelKind = "qwen3" | "tiny";
export type Variant = "unknown-name" | "wrong-shape";

export interface Logits {
  shape: number[];
  dtype: string;
  sha256: string;
  /** The raw bytes, for saying how far apart two differing results are. */
  hex: string;
}

export interface Mem {
  fds: number;
  /** ce's CPU-backend slot buffers still mapped in the engine. */
  ce_maps: number;
  rss_bytes: number;
  /** CUDA only: torch's allocator and the driver's view of the whole GPU. */
  allocated?: number;
  reserved?: number;
  free?: number;
  total?: number;
}

export interface Info {
  device: string;
  uuid: string;
  model: string;
  pid: number;
  rpcs: number;
  rpc_errors: number;
  updates: number;
  post_loads: number;
}

export interface Finished {
  code: number;
  stdout: string;
  stderr: string;
}

function pythonEnv(): Record<string, string | undefined> {
  // CE_LIBZMQ and LD_LIBRARY_PATH come along from the environment (hosts without pyzmq).
  return { ...process.env, PYTHONPATH: [PYTHON_PACKAGE_DIR, process.env.PYTHONPATH].filter(Boolean).join(":") };
}

function modelFlags(kind: ModelKind): string[] {
  return kind === "tiny" ? ["--tiny"] : [];
}

/** Runs cmd to its end; a run past `ms` is killed and fails naming `what`. */
export async function runToEnd(cmd: string[], what: string, ms: number, env = pythonEnv()): Promise<Finished> {
  const proc = Bun.spawn(cmd, { cwd: ROOT, env, stdin: "ignore", stdout: "pipe", stderr: "pipe" });
  try {
    const [stdout, stderr, code] = await within(ms, what, Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text(), proc.exited]));
    return { code, stdout, stderr };
  } finally {
    proc.kill("SIGKILL"); // no-op once it has exited
  }
}

async function runPython(python: string, args: string[], what: string, ms: number): Promise<string> {
  const r = await runToEnd([python, MODEL_SERVER, ...args], what, ms);
  if (r.code !== 0) throw new Error(`${what}: exit status ${r.code}\n${r.stderr.slice(-4000)}`);
  return r.stdout;
}

/** Whether `python` can build the model: what it has ("torch 2.11.0, transformers 4.57.1, …") or why not. */
export function probeModel(python: string, kind: ModelKind): { ok: boolean; reason: string } {
  const r = Bun.spawnSync([python, MODEL_SERVER, "--probe", ...modelFlags(kind)], { env: pythonEnv(), stdout: "pipe", stderr: "pipe", timeout: 120_000 });
  if (r.exitCode === 0) return { ok: true, reason: r.stdout.toString().trim() };
  return { ok: false, reason: r.stderr.toString().trim().split("\n").at(-1) || `probe exited ${r.exitCode ?? r.signalCode}` };
}

/** dir/model.safetensors: the model's weights under `seed` (HF names), optionally broken by `variant`. */
export async function writeModelCheckpoint(python: string, dir: string, kind: ModelKind, seed: number, variant?: Variant): Promise<string> {
  const args = ["--write-checkpoint", dir, "--seed", String(seed), ...modelFlags(kind), ...(variant ? ["--variant", variant] : [])];
  await runPython(python, args, `writing checkpoint ${dir}`, 180_000);
  return dir;
}

/** The logits of a fresh model loaded from dir's checkpoint, computed in a process of its own. */
export async function referenceLogits(python: string, dir: string, kind: ModelKind, device: string): Promise<Logits> {
  const out = await runPython(python, ["--reference-logits", dir, "--device", device, ...modelFlags(kind)], `reference logits of ${dir}`, 180_000);
  return JSON.parse(out) as Logits;
}

/** sha256 of every tensor's bytes in a safetensors file, parsed here rather than by ce's parser. */
export function checkpointSha(file: string): Record<string, string> {
  const data = readFileSync(file);
  const n = Number(data.readBigUInt64LE(0));
  const header = JSON.parse(data.subarray(8, 8 + n).toString("utf8")) as Record<string, { data_offsets: [number, number] }>;
  const out: Record<string, string> = {};
  for (const [name, meta] of Object.entries(header)) {
    if (name === "__metadata__") continue;
    const [begin, end] = meta.data_offsets;
    out[name] = createHash("sha256").update(data.subarray(8 + n + begin, 8 + n + end)).digest("hex");
  }
  return out;
}

/** Throws unless two logits are the same bytes; the message says how many elements differ and by how much. */
export function expectSameLogits(got: Logits, want: Logits, what: string): void {
  if (got.sha256 === want.sha256 && got.hex === want.hex) return;
  if (JSON.stringify(got.shape) !== JSON.stringify(want.shape) || got.dtype !== want.dtype) {
    throw new Error(`${what}: logits ${got.dtype} [${got.shape}] vs ${want.dtype} [${want.shape}]`);
  }
  const a = Buffer.from(got.hex, "hex");
  const b = Buffer.from(want.hex, "hex");
  const width = a.length / got.shape.reduce((x, y) => x * y, 1);
  const value = (buf: Buffer, i: number) =>
    width === 2 && got.dtype === "bfloat16" ? new Float32Array(new Uint32Array([buf.readUInt16LE(i * 2) << 16]).buffer)[0]! : width === 4 ? buf.readFloatLE(i * 4) : Number.NaN;
  let differ = 0;
  let maxDiff = 0;
  for (let i = 0; i < a.length / width; i++) {
    if (!a.subarray(i * width, (i + 1) * width).equals(b.subarray(i * width, (i + 1) * width))) {
      differ++;
      maxDiff = Math.max(maxDiff, Math.abs(value(a, i) - value(b, i)));
    }
  }
  throw new Error(`${what}: ${differ} of ${a.length / width} ${got.dtype} logits differ (largest difference ${maxDiff})`);
}

/** model_server.py in its own process, on one device, serving until stop(). */
export class ModelServer {
  readonly url: string;
  readonly rpcUrl: string;
  #stopped = false;

  private constructor(
    private readonly proc: ReturnType<typeof Bun.spawn>,
    port: number,
    readonly logFile: string,
  ) {
    this.url = `http://127.0.0.1:${port}`;
    this.rpcUrl = `${this.url}/collective_rpc`;
  }

  /** Starts it and waits for its ready file; a server that exits first fails with its log. */
  static async start(opts: {
    python: string;
    kind: ModelKind;
    device: string;
    /** Where the ready file and the log go. */
    dir: string;
    name: string;
    seed?: number;
    failOnBucket?: number;
    timeoutMs?: number;
  }): Promise<ModelServer> {
    const ready = join(opts.dir, `${opts.name}.port`);
    const logFile = join(opts.dir, `${opts.name}.log`);
    const cmd = [opts.python, MODEL_SERVER, "--device", opts.device, "--port", "0", "--ready-file", ready, "--exit-with-stdin", "--seed", String(opts.seed ?? 0), ...modelFlags(opts.kind)];
    if (opts.failOnBucket !== undefined) cmd.push("--fail-on-bucket", String(opts.failOnBucket));
    // stdin stays a pipe the server watches: if this test process dies, the server stops.
    const proc = Bun.spawn(cmd, { cwd: ROOT, env: pythonEnv(), stdin: "pipe", stdout: "ignore", stderr: Bun.file(logFile) });
    const deadline = performance.now() + (opts.timeoutMs ?? 180_000);
    while (!existsSync(ready)) {
      if (proc.exitCode !== null || proc.signalCode !== null) {
        throw new Error(`model server exited (${proc.signalCode ?? proc.exitCode}) before it was ready:\n${tail(logFile)}`);
      }
      if (performance.now() > deadline) {
        proc.kill("SIGKILL");
        throw new Error(`model server not ready after ${opts.timeoutMs ?? 180_000} ms:\n${tail(logFile)}`);
      }
      await Bun.sleep(50); // polls for a file whose creation nothing can signal to us
    }
    return new ModelServer(proc, Number(readFileSync(ready, "utf8").trim()), logFile);
  }

  async #call<T>(method: "GET" | "POST", path: string, ms = 60_000): Promise<T> {
    const res = await fetch(`${this.url}${path}`, { method, signal: AbortSignal.timeout(ms), ...(method === "POST" ? { body: "{}" } : {}) });
    const text = await res.text();
    if (!res.ok) throw new Error(`${method} ${path}: HTTP ${res.status}: ${text}\n${this.logTail()}`);
    return JSON.parse(text) as T;
  }

  async stateSha(): Promise<Record<string, string>> {
    return (await this.#call<{ tensors: Record<string, string> }>("GET", "/state_sha")).tensors;
  }

  logits(): Promise<Logits> {
    return this.#call("POST", "/logits");
  }

  mem(): Promise<Mem> {
    return this.#call("GET", "/mem");
  }

  info(): Promise<Info> {
    return this.#call("GET", "/info");
  }

  logTail(lines = 60): string {
    return tail(this.logFile, lines);
  }

  /** Asks it to stop, then kills it if it has not exited within 15 s. Idempotent. */
  async stop(): Promise<void> {
    if (this.#stopped) return;
    this.#stopped = true;
    try {
      await this.#call("POST", "/shutdown", 5_000);
      await within(15_000, "model server exit", this.proc.exited);
    } catch {
      this.proc.kill("SIGKILL");
      await this.proc.exited;
    }
  }
}

function tail(file: string, lines = 60): string {
  if (!existsSync(file)) return "(no log)";
  return readFileSync(file, "utf8").trimEnd().split("\n").slice(-lines).join("\n");
}

export interface UpdateRun extends Finished {
  /** ce's --json result: {ok:true, ...summary} or {ok:false, error:{code, message}}. */
  json: { ok: boolean; error?: { code: string; message: string }; [k: string]: unknown };
  wallSeconds: number;
}

/** `ce update` as a user runs it: dist/ce when built, else the CLI from source. */
export async function ceUpdate(opts: {
  checkpoint: string;
  endpoint: string;
  device: "cuda" | "cpu";
  version: number;
  bucketSize: string;
  timeoutMs?: number;
}): Promise<UpdateRun> {
  const ce = existsSync(join(ROOT, "dist", "ce")) ? [join(ROOT, "dist", "ce")] : [process.execPath, CLI];
  const cmd = [
    ...ce,
    "update",
    "--checkpoint", opts.checkpoint,
    "--engine", "external",
    "--endpoint", opts.endpoint,
    "--device", opts.device,
    "--devices", "1",
    "--version", String(opts.version),
    "--bucket-size", opts.bucketSize,
    "--timeout", "60s",
    "--json",
  ];
  const t0 = performance.now();
  const r = await runToEnd(cmd, `ce update ${opts.checkpoint} v${opts.version}`, opts.timeoutMs ?? 90_000, { ...process.env, CE_OP_TIMEOUT: "30s" });
  const wallSeconds = (performance.now() - t0) / 1000;
  let json: UpdateRun["json"];
  try {
    json = JSON.parse(r.stdout.trim().split("\n").at(-1) ?? "");
  } catch {
    throw new Error(`ce update printed no JSON result (exit ${r.code}):\n${r.stdout}\n${r.stderr}`);
  }
  return { ...r, json, wallSeconds };
}
