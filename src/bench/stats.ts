// The summary of repeated timings that every benchmark reports.

export interface Stats {
  median: number;
  min: number;
  max: number;
}

/** Median (the lower one of an even count: a run that happened), min and max. */
export function stats(xs: number[]): Stats {
  const s = [...xs].sort((a, b) => a - b);
  return { median: s[Math.floor((s.length - 1) / 2)]!, min: s[0]!, max: s.at(-1)! };
}
