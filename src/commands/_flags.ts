// A flag the command does not know is an error, not a silent default: `--bucket-sise 1MiB` must not
// run with the default bucket size. citty accepts any flag, so each verb's argv is checked here first.
import type { ArgsDef } from "citty";
import { UsageError } from "../base/errors";

/** The first flag of argv that args does not declare, with the closest declared one; undefined if all are known. */
export function unknownFlag(argv: string[], args: ArgsDef): { flag: string; closest?: string } | undefined {
  const known = Object.entries(args).filter(([, d]) => d.type !== "positional");
  const names = known.map(([n]) => n);
  const type = new Map(known.map(([n, d]) => [n, d.type]));
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    if (a === "--") break;
    if (!a.startsWith("-") || a === "-") continue;
    const name = a.replace(/^--?/, "").split("=")[0]!;
    if (type.has(name)) {
      if (type.get(name) !== "boolean" && !a.includes("=")) i++; // its value
      continue;
    }
    if (name.startsWith("no-") && type.get(name.slice(3)) === "boolean") continue;
    return { flag: a.split("=")[0]!, closest: closest(name, names) };
  }
  return undefined;
}

export function checkFlags(verb: string, argv: string[], args: ArgsDef): void {
  const u = unknownFlag(argv, args);
  if (!u) return;
  throw new UsageError(`ce ${verb}: unknown flag ${u.flag}${u.closest ? ` (did you mean --${u.closest}?)` : ""}`);
}

/** The declared name nearest to `name` by edit distance, if it is near enough to be a typo. */
function closest(name: string, names: string[]): string | undefined {
  let best: string | undefined;
  let bestD = Infinity;
  for (const n of names) {
    const d = distance(name, n);
    if (d < bestD) [best, bestD] = [n, d];
  }
  return bestD <= Math.max(2, Math.floor(name.length / 3)) ? best : undefined;
}

function distance(a: string, b: string): number {
  let prev = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    const cur = [i];
    for (let j = 1; j <= b.length; j++) cur[j] = Math.min(prev[j]! + 1, cur[j - 1]! + 1, prev[j - 1]! + (a[i - 1] === b[j - 1] ? 0 : 1));
    prev = cur;
  }
  return prev[b.length]!;
}
