#!/usr/bin/env bun
// The root command: global flags, lazily loaded verbs, and the one place errors are shown.
import { type ArgsDef, type CommandDef, defineCommand, renderUsage, runCommand } from "citty";
import pkg from "../package.json" with { type: "json" };
import { config } from "./base/config";
import { CeError, UsageError } from "./base/errors";
import { log, setLogLevel, writeJson } from "./base/log";
import { checkFlags } from "./commands/_flags";

const subCommands: Record<string, () => Promise<CommandDef<any>>> = {
  update: () => import("./commands/update").then((m) => m.default),
  serve: () => import("./commands/serve").then((m) => m.default),
  status: () => import("./commands/status").then((m) => m.default),
  inspect: () => import("./commands/inspect").then((m) => m.default),
  doctor: () => import("./commands/doctor").then((m) => m.default),
  bench: () => import("./commands/bench").then((m) => m.default),
  worker: () => import("./commands/worker").then((m) => m.default),
};

export const main = defineCommand({
  meta: {
    name: "ce",
    version: pkg.version,
    description: "Moves checkpoints from pinned host memory into running inference engines, in place",
  },
  subCommands,
});

function flagValue(argv: string[], name: string): string | undefined {
  const i = argv.findIndex((a) => a === name || a.startsWith(`${name}=`));
  if (i < 0) return undefined;
  const a = argv[i]!;
  return a.includes("=") ? a.slice(a.indexOf("=") + 1) : argv[i + 1];
}

/** citty lets args be a value, a function or a promise of either. */
async function resolveValue(v: unknown): Promise<ArgsDef | undefined> {
  const x = typeof v === "function" ? await (v as () => unknown)() : await v;
  return x as ArgsDef | undefined;
}

async function usageOf(argv: string[]): Promise<string> {
  const verb = argv.find((a) => !a.startsWith("-"));
  const load = verb ? subCommands[verb] : undefined;
  return load ? renderUsage(await load(), main) : renderUsage(main);
}

export async function run(argv: string[]): Promise<number> {
  const json = argv.includes("--json");
  try {
    setLogLevel(flagValue(argv, "--log-level") ?? config.CE_LOG_LEVEL);
  } catch (err) {
    process.stderr.write(`${(err as Error).message}\n`);
    return 2;
  }
  if (argv.length === 0 || argv[0] === "--help" || argv[0] === "-h") {
    process.stdout.write(`${await renderUsage(main)}\n`);
    return argv.length === 0 ? 2 : 0;
  }
  if (argv[0] === "--version" || argv[0] === "-v") {
    process.stdout.write(`${pkg.version}\n`);
    return 0;
  }
  const verb = argv[0]!;
  if (!subCommands[verb]) {
    process.stderr.write(`${await renderUsage(main)}\n\n`);
    log.error(`unknown command "${verb}"`);
    return 2;
  }
  if (argv.includes("--help") || argv.includes("-h")) {
    process.stdout.write(`${await usageOf(argv)}\n`);
    return 0;
  }
  try {
    const cmd = await subCommands[verb]!();
    checkFlags(verb, argv.slice(1), { ...((await resolveValue(cmd.args)) ?? {}) });
    await runCommand(main, { rawArgs: argv });
    return Number(process.exitCode ?? 0);
  } catch (err) {
    return report(err, json, argv);
  }
}

async function report(err: unknown, json: boolean, argv: string[]): Promise<number> {
  // citty's own argument errors (missing required, unknown command) are usage errors.
  const citty = err instanceof Error && (err as { code?: string }).code?.startsWith("E_") && !(err instanceof CeError);
  const usage = err instanceof UsageError || citty;
  const e =
    err instanceof CeError
      ? err
      : citty
        ? new UsageError((err as Error).message)
        : new CeError("E_BUG", `unexpected error (a bug in ce, please report it): ${err instanceof Error ? (err.stack ?? err.message) : String(err)}`);
  if (json) {
    writeJson({ ok: false, error: e.toJSON() });
  } else {
    if (usage) process.stderr.write(`${await usageOf(argv)}\n\n`);
    log.error(e.message);
    if (e.hint) log.info(`hint: ${e.hint}`);
  }
  return usage ? 2 : 1;
}

if (import.meta.main) {
  const code = await run(process.argv.slice(2));
  // Native handles (libzmq's I/O thread, CUDA) must not keep a finished command alive.
  process.exit(code);
}
