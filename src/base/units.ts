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
