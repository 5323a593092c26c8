// ce update: one checkpoint into every worker of an engine, once, then exit.
import { defineCommand } from "citty";
import { type Checkpoint, openCheckpoint } from "../checkpoint/checkpoint";
import { config } from "../base/config";
import { UsageError } from "../base/errors";
import { Progress, log, writeJson } from "../base/log";
import { register, unregister } from "../checkpoint/registry";
import { summaryLines, writeTrace } from "../core/report";
import { cleanupOnSignal } from "../app/signals";
import { type Updater, openUpdater } from "../app/updater";
import { synthesize } from "../checkpoint/synth";
import { deviceArgs, engineArgs, outputArgs, planArgs, planOptions, updaterOptions } from "./_args";

export const updateArgs = {
  checkpoint: {
    type: "string",
    description: "a .safetensors file, a directory of them, or a model.safetensors.index.json",
    valueHint: "PATH",
  },
  synthetic: {
    type: "string",
    description: "instead of --checkpoint: write a random checkpoint of this architecture's shapes (Qwen3-0.6B, Qwen3-8B, Qwen3-30B-A3B, or a shapes file) and update from it",
    valueHint: "MODEL",
  },
  name: { type: "string", description: "checkpoint name sent to workers (default: the path's last part)", valueHint: "NAME" },
  version: { type: "string", description: "checkpoint version number sent to workers", default: "1", valueHint: "N" },
  timeout: { type: "string", description: `deadline for the whole update (default ${config.CE_TIMEOUT})`, valueHint: "10m" },
  trace: { type: "string", description: "write the per-bucket timeline as a Chrome trace (open in Perfetto)", valueHint: "FILE" },
  ...engineArgs,
  ...deviceArgs,
  ...planArgs,
  ...outputArgs,
} as const;

export default defineCommand({
  meta: { name: "update", description: "move a checkpoint into every worker of an inference engine, in place, and exit" },
  args: updateArgs,
  async run({ args }) {
    if (!args.checkpoint === !args.synthetic) throw new UsageError("give exactly one of --checkpoint PATH and --synthetic MODEL");
    const version = Number(args.version);
    if (!Number.isSafeInteger(version) || version < 0) throw new UsageError(`--version "${args.version}" is not a whole number`);
    const { bucketBytes, slots, timeoutMs } = planOptions(args);
    const options = updaterOptions(args);
    let up: Updater | undefined;
    const stopCleanup = cleanupOnSignal(() => up);

    let ckpt: Checkpoint;
    let remove = () => {};
    if (args.synthetic) {
      const synth = await synthesize(args.synthetic, version);
      ckpt = synth.ckpt;
      remove = synth.remove;
    } else {
      ckpt = await openCheckpoint(args.checkpoint!);
    }
    try {
      up = await openUpdater(options);
      try {
        const name = args.name ?? args.synthetic ?? ckpt.root.split("/").filter(Boolean).at(-1)!;
        const reg = await register(up.ctx, ckpt, { name, version, digests: options.verify });
        log.info(`registered ${ckpt.files.length} file${ckpt.files.length === 1 ? "" : "s"} in ${reg.registerSeconds.toFixed(2)} s (${reg.inPlace ? "pinned in place" : "read into pinned memory"}${reg.digestSeconds !== undefined ? `, digests ${reg.digestSeconds.toFixed(2)} s` : ""})`);
        const progress = new Progress("bucket", !args.json);
        const t0 = performance.now();
        try {
          const summary = await up.session.update({
            reg,
            bucketBytes,
            slots,
            timeoutMs,
            onProgress: (p) => progress.update({ ...p, startedMs: t0 }),
          });
          progress.end();
          if (args.trace) writeTrace(args.trace, summary);
          if (args.json) writeJson({ ok: true, ...summary, trace: undefined });
          else for (const line of summaryLines(summary)) log.info(line);
        } finally {
          progress.end();
          await unregister(up.ctx, reg);
        }
      } finally {
        await up.close();
      }
    } finally {
      remove();
      stopCleanup();
    }
  },
});
