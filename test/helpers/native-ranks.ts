// Drives test/helpers/native-rank.ts processes: one ce process per RankProc, JSON lines both
// ways, every request with a deadline so that a hang fails the test instead of stalling CI.
import { join } from "node:path";
import type { Subprocess } from "bun";

export type Reply = { n?: number; ok: boolean; status?: string; message?: string; [k: string]: unknown };

const HELPER = join(import.meta.dir, "native-rank.ts");

export class RankProc {
  readonly proc: Subprocess<"pipe", "pipe", "pipe">;
  #n = 0;
  #waiting = new Map<number, { events: string[]; resolve: (r: Reply) => void; onEvent?: (e: string) => void }>();
  #buffer = "";
  #stderr = "";
  readonly ready: Promise<Reply>;
  readonly exited: Promise<number>;

  /** script: another helper that speaks the same JSON lines (xfer-peer.ts); native-rank.ts by default. */
  constructor(opts: { backend?: "cpu" | "cuda"; devices?: number[]; env?: Record<string, string>; script?: string } = {}) {
    const proc = Bun.spawn([process.execPath, opts.script ?? HELPER, opts.backend ?? "cpu", (opts.devices ?? [0]).join(",")], {
      stdin: "pipe",
      stdout: "pipe",
      stderr: "pipe",
      env: { ...process.env, ...opts.env },
    });
    this.proc = proc;
    let readyResolve!: (r: Reply) => void;
    this.ready = new Promise((r) => (readyResolve = r));
    this.exited = proc.exited;
    void (async () => {
      const dec = new TextDecoder();
      for await (const chunk of proc.stdout) {
        this.#buffer += dec.decode(chunk);
        let nl: number;
        while ((nl = this.#buffer.indexOf("\n")) >= 0) {
          const line = this.#buffer.slice(0, nl);
          this.#buffer = this.#buffer.slice(nl + 1);
          const msg = JSON.parse(line) as Reply & { ready?: boolean; event?: string };
          if (msg.ready) readyResolve(msg);
          const w = msg.n === undefined ? undefined : this.#waiting.get(msg.n);
          if (!w) continue;
          if (msg.event) {
            w.events.push(msg.event);
            w.onEvent?.(msg.event);
          } else {
            this.#waiting.delete(msg.n!);
            w.resolve(msg);
          }
        }
      }
    })();
    void (async () => {
      const dec = new TextDecoder();
      for await (const chunk of proc.stderr) this.#stderr += dec.decode(chunk);
    })();
  }

  get pid(): number {
    return this.proc.pid;
  }

  get stderr(): string {
    return this.#stderr;
  }

  /**
   * Sends a request; resolves with its answer. `submitted` resolves once the helper says the op is
   * submitted. Rejects after timeoutMs, or when the process exits first.
   */
  request(cmd: string, args: Record<string, unknown> = {}, timeoutMs = 30_000): { reply: Promise<Reply>; submitted: Promise<void> } {
    const n = ++this.#n;
    let submittedResolve!: () => void;
    const submitted = new Promise<void>((r) => (submittedResolve = r));
    const reply = new Promise<Reply>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#waiting.delete(n);
        reject(new Error(`rank process ${this.pid}: no answer to ${cmd} within ${timeoutMs} ms\n${this.#stderr}`));
      }, timeoutMs);
      this.#waiting.set(n, {
        events: [],
        onEvent: (e) => e === "submitted" && submittedResolve(),
        resolve: (r) => {
          clearTimeout(timer);
          resolve(r);
        },
      });
      this.exited.then((code) => {
        if (!this.#waiting.has(n)) return;
        clearTimeout(timer);
        this.#waiting.delete(n);
        reject(new Error(`rank process ${this.pid} exited (${code}, signal ${this.proc.signalCode}) before answering ${cmd}\n${this.#stderr}`));
      });
    });
    this.proc.stdin.write(`${JSON.stringify({ n, cmd, ...args })}\n`);
    this.proc.stdin.flush();
    return { reply, submitted };
  }

  /** request(...).reply */
  ask(cmd: string, args: Record<string, unknown> = {}, timeoutMs = 30_000): Promise<Reply> {
    return this.request(cmd, args, timeoutMs).reply;
  }

  kill(signal: NodeJS.Signals = "SIGKILL"): void {
    if (this.proc.exitCode === null && this.proc.signalCode === null) this.proc.kill(signal);
  }
}

/** Starts count rank processes and waits until each is ready. */
export async function startRanks(count: number, opts: ConstructorParameters<typeof RankProc>[0] = {}): Promise<RankProc[]> {
  const ranks = Array.from({ length: count }, () => new RankProc(opts));
  const timeout = new Promise<never>((_, reject) => setTimeout(() => reject(new Error("rank processes not ready within 30 s")), 30_000));
  await Promise.race([Promise.all(ranks.map((r) => r.ready)), timeout]);
  return ranks;
}
