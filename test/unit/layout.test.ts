// The tree draws the architecture (README "How it is built"): each folder of src/ is a part, and a part
// imports only the parts below it. This test reads every import in src/ and holds the tree to that.
import { describe, expect, test } from "bun:test";
import { readFileSync, readdirSync } from "node:fs";
import { dirname, join, relative, resolve } from "node:path";

const SRC = resolve(import.meta.dir, "../../src");

/** Which parts each part may import (its own files always). */
const MAY_IMPORT: Record<string, string[]> = {
  base: [],
  native: ["base"],
  transport: ["base", "native"],
  wire: ["base"],
  checkpoint: ["base", "native"],
  engines: ["base", "core", "wire"],
  core: ["base", "native", "transport", "wire", "checkpoint", "engines"],
  worker: ["base", "native", "transport", "wire", "checkpoint"],
  bench: ["base", "native", "core"],
  app: ["base", "native", "core", "engines", "wire", "checkpoint"],
  p2p: ["base", "native", "checkpoint", "core"],
  cluster: ["base", "native", "transport", "wire", "checkpoint", "core", "p2p"],
  pool: ["base", "native", "checkpoint", "core"],
  serve: ["base", "core", "checkpoint", "app", "cluster", "pool", "p2p"],
  commands: ["base", "native", "transport", "wire", "checkpoint", "core", "engines", "worker", "bench", "app", "cluster", "serve", "pool"],
  ".": ["base", "commands"],
};

/** Pure parts: no I/O of their own, so no node: or bun: modules (the tests drive them with plain data). */
const PURE = [
  "src/core/planner.ts",
  "src/core/sizing.ts",
  "src/cluster/plan.ts",
  "src/pool/layout.ts",
  "src/p2p/layout.ts",
  "src/wire/protocol.ts",
  "src/wire/dialect.ts",
  "src/wire/pickle.ts",
  "src/wire/checkpoint-engine.ts",
];

function files(dir: string): string[] {
  return readdirSync(dir, { withFileTypes: true }).flatMap((e) =>
    e.isDirectory() ? files(join(dir, e.name)) : e.name.endsWith(".ts") ? [join(dir, e.name)] : [],
  );
}

function importsOf(file: string): string[] {
  const text = readFileSync(file, "utf8");
  return [...text.matchAll(/(?:^|\n)\s*(?:import|export)[^"';]*?from\s*"([^"]+)"|import\(\s*"([^"]+)"\s*\)/g)].map((m) => (m[1] ?? m[2])!);
}

const partOf = (file: string) => {
  const rel = relative(SRC, file);
  return rel.includes("/") ? rel.split("/")[0]! : ".";
};

const all = files(SRC);

describe("the layout of src/", () => {
  test("every file sits in a known part", () => {
    expect(all.map(partOf).filter((p) => !(p in MAY_IMPORT))).toEqual([]);
  });

  test("each part imports only the parts it may", () => {
    const bad: string[] = [];
    for (const f of all) {
      const from = partOf(f);
      for (const spec of importsOf(f)) {
        if (!spec.startsWith(".")) continue;
        const target = resolve(dirname(f), spec);
        if (!target.startsWith(SRC)) continue; // package.json
        const to = partOf(target.endsWith(".ts") || target.endsWith(".json") ? target : `${target}.ts`);
        if (to !== from && !MAY_IMPORT[from]!.includes(to)) bad.push(`${relative(SRC, f)} imports ${spec} (${from} → ${to})`);
      }
    }
    expect(bad).toEqual([]);
  });

  test("only src/native/ imports bun:ffi", () => {
    expect(all.filter((f) => partOf(f) !== "native" && importsOf(f).includes("bun:ffi")).map((f) => relative(SRC, f))).toEqual([]);
  });

  test("the pure modules import no node: or bun: module", () => {
    const bad = PURE.flatMap((p) => importsOf(resolve(SRC, "..", p)).filter((s) => s.startsWith("node:") || s.startsWith("bun:")).map((s) => `${p}: ${s}`));
    expect(bad).toEqual([]);
  });
});
