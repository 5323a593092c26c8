// Builds dist/libce.so from csrc/ with the system C compiler (no CUDA toolkit: the driver and NCCL
// are dlopen'd at run time), then dist/ce with `bun build --compile`.
//   bun build.ts            both
//   bun build.ts --lib      libce.so only (what the tests need)
//   bun build.ts --sanitize dist/asan/libce.so only, with AddressSanitizer and UBSan (-O1, every
//                           UB report fatal). A dlopen'd sanitized library needs the ASan runtime
//                           loaded first, and Bun's own allocations are not ours to leak-check:
//     CE_LIB=dist/asan/libce.so LD_PRELOAD=$(cc -print-file-name=libasan.so) \
//     ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
//     bun test test/gpu/native.test.ts test/integration/native-faults.test.ts
//   (child processes inherit the variables, so the rank and worker processes run sanitized too)
import { $ } from "bun";
import { mkdirSync, readdirSync, statSync } from "node:fs";
import { join } from "node:path";

const root = import.meta.dir;
const dist = join(root, "dist");
const sanitize = process.argv.includes("--sanitize");
const libOnly = sanitize || process.argv.includes("--lib");

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
const libDir = sanitize ? join(dist, "asan") : dist;
mkdirSync(libDir, { recursive: true });
const lib = join(libDir, "libce.so");
if (mtime(lib) < Math.max(newest(csrc, [".c", ".h"]), mtime(join(root, "build.ts")))) {
  const sources = readdirSync(csrc)
    .filter((f) => f.endsWith(".c"))
    .map((f) => join(csrc, f));
  const cc = process.env.CC ?? "cc";
  const flags = sanitize
    ? ["-O1", "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]
    : ["-O2"];
  await $`${cc} -std=c11 ${flags} -g -Wall -Wextra -Werror -fPIC -shared -fvisibility=hidden -o ${lib} ${sources} -ldl -lpthread`;
  console.error(`built ${lib}`);
}

if (!libOnly) {
  const exe = join(dist, "ce");
  await $`${process.execPath} build --compile --minify-syntax --sourcemap=inline ${join(root, "src/cli.ts")} --outfile ${exe}`.quiet();
  console.error(`built ${exe}`);
}
