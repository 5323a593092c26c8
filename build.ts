// Builds dist/libce.so from csrc/ with the system C compiler (no CUDA toolkit: the driver and NCCL
// are dlopen'd at run time), then dist/ce with `bun build --compile`.
//   bun build.ts            both
//   bun build.ts --lib      libce.so only (what the tests need)
import { $ } from "bun";
import { mkdirSync, readdirSync, statSync } from "node:fs";
import { join } from "node:path";

const root = import.meta.dir;
const dist = join(root, "dist");
const libOnly = process.argv.includes("--lib");

function newest(dir: string, ext: string[]): number {
  return Math.max(
    0,
    ...readdirSync(dir)
      .filter((f) => ext.some((e) => f.endsWith(e)))
      .map((f) => statSync(join(dir, f)).mtimeMs),
  );
}

function mtime(path: string): number {
  try {
    return statSync(path).mtimeMs;
  } catch {
    return 0;
  }
}

mkdirSync(dist, { recursive: true });

const csrc = join(root, "csrc");
const lib = join(dist, "libce.so");
if (mtime(lib) < newest(csrc, [".c", ".h"])) {
  const sources = readdirSync(csrc)
    .filter((f) => f.endsWith(".c"))
    .map((f) => join(csrc, f));
  const cc = process.env.CC ?? "cc";
  await $`${cc} -std=c11 -O2 -g -Wall -Wextra -Werror -fPIC -shared -fvisibility=hidden -o ${lib} ${sources} -ldl -lpthread`;
  console.error(`built ${lib}`);
}

if (!libOnly) {
  const exe = join(dist, "ce");
  await $`${process.execPath} build --compile --minify-syntax --sourcemap=inline ${join(root, "src/cli.ts")} --outfile ${exe}`.quiet();
  console.error(`built ${exe}`);
}
