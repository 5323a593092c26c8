// Sizes and durations on the command line and in CE_* variables carry units.
import { UsageError } from "./errors";

const SIZE_UNITS: Record<string, number> = {
  "": 1,
  b: 1,
  k: 1e3,
  kb: 1e3,
  kib: 1024,
  m: 1e6,
  mb: 1e6,
  mib: 1024 ** 2,
  g: 1e9,
  gb: 1e9,
  gib: 1024 ** 3,
  t: 1e12,
  tb: 1e12,
  tib: 1024 ** 4,
};

/** "1GiB", "512MiB", "4096" → bytes. */
export function parseSize(text: string, what = "size"): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$/.exec(text);
  const unit = m ? SIZE_UNITS[m[2]!.toLowerCase()] : undefined;
  if (!m || unit === undefined) {
    throw new UsageError(`${what} "${text}" is not a size`, { hint: "use a number with a unit: 512MiB, 1GiB, 4096" });
  }
  return Math.round(Number(m[1]) * unit);
}

const TIME_UNITS: Record<string, number> = { "": 1000, ms: 1, s: 1000, m: 60_000, min: 60_000, h: 3_600_000 };

/** "10m", "30s", "250ms", "5" (seconds) → milliseconds. */
export function parseDuration(text: string, what = "duration"): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$/.exec(text);
  const unit = m ? TIME_UNITS[m[2]!] : undefined;
  if (!m || unit === undefined) {
    throw new UsageError(`${what} "${text}" is not a duration`, { hint: "use a number with a unit: 30s, 10m, 250ms" });
  }
  return Math.round(Number(m[1]) * unit);
}

const GIB = 1024 ** 3;
const MIB = 1024 ** 2;
const KIB = 1024;

/** Sizes are binary (GiB), as memory is. */
export function formatBytes(bytes: number): string {
  if (bytes >= GIB) return `${(bytes / GIB).toFixed(2)} GiB`;
  if (bytes >= MIB) return `${(bytes / MIB).toFixed(1)} MiB`;
  if (bytes >= KIB) return `${(bytes / KIB).toFixed(1)} KiB`;
  return `${bytes} B`;
}

/** Rates are decimal (GB/s), as link speeds are quoted. */
export function formatRate(bytes: number, seconds: number): string {
  if (seconds <= 0) return "- GB/s";
  return `${(bytes / seconds / 1e9).toFixed(1)} GB/s`;
}

export function gbps(bytes: number, seconds: number): number {
  return seconds > 0 ? bytes / seconds / 1e9 : 0;
}

export function formatSeconds(seconds: number): string {
  if (seconds < 1) return `${(seconds * 1000).toFixed(1)} ms`;
  return `${seconds.toFixed(2)} s`;
}

/** Writes one machine-readable result to stdout. */
