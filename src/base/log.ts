// Logs go to stderr through one consola instance; stdout carries only results and --json.
import { createConsola, type ConsolaInstance } from "consola";
import { formatBytes, formatRate } from "./units";

export type LogLevelName = "silent" | "warn" | "info" | "debug" | "trace";

const LEVELS: Record<LogLevelName, number> = { silent: -999, warn: 1, info: 3, debug: 4, trace: 5 };

export const log: ConsolaInstance = createConsola({
  level: LEVELS.info,
  stdout: process.stderr,
  stderr: process.stderr,
  formatOptions: { date: false },
});

/** Tagged loggers copy the level when made (consola's withTag): keep them to set it later. */
const tagged = new Map<string, ConsolaInstance>();

export function setLogLevel(name: string): void {
  const level = LEVELS[name as LogLevelName];
  if (level === undefined) throw new Error(`unknown log level "${name}" (silent, warn, info, debug, trace)`);
  log.level = level;
  for (const l of tagged.values()) l.level = level;
}

export function logger(tag: string): ConsolaInstance {
  let l = tagged.get(tag);
  if (!l) {
    l = log.withTag(tag);
    tagged.set(tag, l);
  }
  return l;
}

export function writeJson(value: unknown): void {
  process.stdout.write(`${JSON.stringify(value)}\n`);
}

export interface ProgressState {
  done: number;
  total: number;
  bytesDone: number;
  bytesTotal: number;
  startedMs: number;
}

/**
 * One line redrawn in place on a terminal (at most 10 times a second), a plain line every few
 * seconds elsewhere, nothing when disabled (--json).
 */
export class Progress {
  private lastDrawMs = 0;
  private drawn = false;
  private readonly tty: boolean;

  constructor(
    private readonly label: string,
    private readonly enabled: boolean,
  ) {
    this.tty = Boolean(process.stderr.isTTY);
  }

  update(state: ProgressState): void {
    if (!this.enabled || log.level < LEVELS.info) return;
    const now = performance.now();
    const interval = this.tty ? 100 : 3000;
    if (state.done < state.total && now - this.lastDrawMs < interval) return;
    this.lastDrawMs = now;
    const seconds = (now - state.startedMs) / 1000;
    const line = `${this.label} ${state.done}/${state.total}  ${formatBytes(state.bytesDone)}/${formatBytes(state.bytesTotal)}  ${formatRate(state.bytesDone, seconds)}`;
    if (this.tty) {
      process.stderr.write(`\r\x1b[2K${line}`);
      this.drawn = true;
    } else if (state.done < state.total) {
      process.stderr.write(`${line}\n`);
    }
  }

  end(): void {
    if (this.drawn) process.stderr.write("\r\x1b[2K");
    this.drawn = false;
  }
}
