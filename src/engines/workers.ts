// The `workers` engine: ce starts its own receivers, one process per device — the TypeScript
// reference receiver (`ce worker`) or the Python torch worker (`python3 -m ce_worker`) — each
// connected to its device's endpoint for as long as the engine lives.
import type { Subprocess } from "bun";
import { existsSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { WorkerError } from "../base/errors";
import { logger } from "../base/log";
import type { Backend } from "../base/backend";
import type { Engine } from "./types";

const log = logger("workers");

export type WorkerKind = "ref" | "python";

export interface WorkerSpec {
  uuid: string;
  /** CUDA ordinal, or the simulated CPU device */
  ordinal: number;
}

/** How to run this ce again: the compiled binary itself, or bun on cli.ts. */
export function selfCommand(): string[] {
  const compiled = Bun.main.startsWith("/$bunfs/");
  return compiled ? [process.execPath] : [process.execPath, resolve(import.meta.dir, "../cli.ts")];
}

/** python/ of this checkout (beside src/, or beside dist/ for the compiled ce), so
 *  `python3 -m ce_worker` works without installing the package. */
export function pythonPath(): string | undefined {
  const candidates = [resolve(import.meta.dir, "../../python"), resolve(dirname(process.execPath), "../python")];
  return candidates.find((dir) => existsSync(resolve(dir, "ce_worker")));
}

const STDERR_TAIL_LINES = 20;
const STOP_GRACE_MS = 3_000;

class WorkerProcess {
  readonly proc: Subprocess<"pipe", "ignore", "pipe">;
  readonly tail: string[] = [];
  stopping = false;

  constructor(
    readonly label: string,
    cmd: string[],
    env: Record<string, string | undefined>,
    onExit: (w: WorkerProcess, code: number | null, signal: string | null) => void,
  ) {
    // stdin stays open and unread: a worker exits when it reaches EOF, so it never outlives ce.
    this.proc = Bun.spawn(cmd, {
      stdin: "pipe",
      stdout: "ignore",
      stderr: "pipe",
      env,
      onExit: (_p, code, signal) => onExit(this, code, signal === null ? null : String(signal)),
    });
    void this.pump();
  }

  private async pump(): Promise<void> {
    const decoder = new TextDecoder();
    let partial = "";
    for await (const chunk of this.proc.stderr) {
      const lines = (partial + decoder.decode(chunk, { stream: true })).split("\n");
      partial = lines.pop() ?? "";
      for (const line of lines) {
        if (!line) continue;
        log.debug(`${this.label}: ${line}`);
        this.tail.push(line);
        if (this.tail.length > STDERR_TAIL_LINES) this.tail.shift();
      }
    }
  }

  stop(): Promise<unknown> {
    this.stopping = true;
    try {
      this.proc.stdin.end();
    } catch {
      // already closed
    }
    this.proc.kill("SIGTERM");
    // A worker stuck in native code never gets to its SIGTERM handler: kill it after a grace period.
    const kill = setTimeout(() => this.proc.kill("SIGKILL"), STOP_GRACE_MS);
    return this.proc.exited.finally(() => clearTimeout(kill));
  }
}

/** Starts and supervises one receiver process per device. */
export class WorkersEngine implements Engine {
  readonly description: string;
  #procs: WorkerProcess[] = [];
  #fail!: (err: WorkerError) => void;
  failure: Promise<never>;

  constructor(
    private readonly kind: WorkerKind,
    private readonly backend: Backend,
    private readonly specs: WorkerSpec[],
    private readonly opts: { /** interpreter for python workers (default python3) */ python?: string } = {},
  ) {
    this.description = `${specs.length} ${kind === "ref" ? "reference" : "Python"} worker${specs.length === 1 ? "" : "s"}`;
    this.failure = this.#newFailure();
  }

  #newFailure(): Promise<never> {
    const p = new Promise<never>((_, reject) => {
      this.#fail = reject;
    });
    p.catch(() => {}); // observed by update.ts when it races; never an unhandled rejection
    return p;
  }

  #command(spec: WorkerSpec, endpoint: string): string[] {
    const device = this.backend === "cuda" ? `cuda:${spec.ordinal}` : "cpu";
    if (this.kind === "ref") return [...selfCommand(), "worker", "--endpoint", endpoint, "--device", device];
    return [this.opts.python ?? "python3", "-m", "ce_worker", "--endpoint", endpoint, "--device", device];
  }

  async start(endpoints: Record<string, string>): Promise<void> {
    const env: Record<string, string | undefined> = { ...process.env };
    const py = pythonPath();
    if (this.kind === "python" && py) env.PYTHONPATH = [py, process.env.PYTHONPATH].filter(Boolean).join(":");
    // Added one by one, so a spawn that fails leaves the ones started before it to close().
    this.#procs = [];
    for (const spec of this.specs) {
      const endpoint = endpoints[spec.uuid];
      if (!endpoint) throw new WorkerError("E_WORKER_SPAWN", `no endpoint for device ${spec.uuid}`);
      const label = `worker ${spec.uuid}`;
      const cmd = this.#command(spec, endpoint);
      log.debug(`starting ${label}: ${cmd.join(" ")}`);
      let proc: WorkerProcess;
      try {
        proc = new WorkerProcess(label, cmd, env, (w, code, signal) => {
          if (w.stopping) return;
          const how = signal ? `was killed by ${signal}` : `exited with code ${code}`;
          const tail = w.tail.length ? `; its last words:\n  ${w.tail.slice(-5).join("\n  ")}` : "";
          const hint =
            this.kind === "python" && !signal ? `it ran ${cmd[0]}: set CE_PYTHON to a Python with torch and pyzmq if that is the wrong one` : undefined;
          this.#fail(new WorkerError("E_WORKER_DIED", `${label} ${how}${tail}`, { hint }));
        });
      } catch (err) {
        // posix_spawn failed: the interpreter or executable is missing or not executable.
        throw new WorkerError("E_WORKER_SPAWN", `cannot start ${label} (${cmd[0]}): ${(err as Error).message}`, {
          hint: this.kind === "python" ? "set CE_PYTHON to a Python with torch and pyzmq" : undefined,
          cause: err,
        });
      }
      this.#procs.push(proc);
    }
  }

  trigger(): Promise<void> {
    return Promise.resolve();
  }

  async reset(endpoints: Record<string, string>): Promise<void> {
    await this.close();
    this.failure = this.#newFailure();
    await this.start(endpoints);
  }

  /** The worker process of a device, for tests that kill one. */
  pid(index: number): number | undefined {
    return this.#procs[index]?.proc.pid;
  }

  async close(): Promise<void> {
    const procs = this.#procs;
    this.#procs = [];
    await Promise.all(procs.map((p) => p.stop()));
  }
}
