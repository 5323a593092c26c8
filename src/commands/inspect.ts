// ce inspect PATH: validate a checkpoint's headers and describe it, without reading its data.
import { defineCommand } from "citty";
import { openCheckpoint, summarize, type CheckpointSummary } from "../checkpoint/checkpoint";
import { writeJson } from "../base/log";
import { formatBytes } from "../base/units";
import { formatShape } from "../checkpoint/safetensors";
import { outputArgs } from "./_args";

export default defineCommand({
  meta: {
    name: "inspect",
    description: "validate a checkpoint's safetensors headers and show its tensors, shards, dtypes and sizes",
  },
  args: {
    path: {
      type: "positional",
      description: "a .safetensors file, a directory of them, or a model.safetensors.index.json",
      required: true,
    },
    ...outputArgs,
  },
  async run({ args }) {
    const summary = summarize(await openCheckpoint(args.path));
    if (args.json) writeJson({ ok: true, ...summary });
    else process.stdout.write(formatSummary(summary));
  },
});

const KIND: Record<CheckpointSummary["kind"], string> = {
  file: "one safetensors file",
  directory: "directory of safetensors files",
  index: "HF index",
};

/** The plain-text report: a key/value block, then dtypes and files as aligned tables. */
export function formatSummary(s: CheckpointSummary): string {
  const l = s.largestTensor;
  const lines: string[] = [];
  const row = (key: string, value: string) => lines.push(`${key.padEnd(9)}${value}`);
  row("path", `${s.root} (${KIND[s.kind]})`);
  if (s.index) row("index", s.index);
  row("tensors", String(s.tensorCount));
  row("bytes", `${formatBytes(s.totalBytes)} (${s.totalBytes} bytes of tensor data)`);
  row("largest", `${l.name}  ${l.dtype} ${formatShape(l.shape)}  ${formatBytes(l.nbytes)}`);
  row("headers", `valid (${s.files.length} file${s.files.length === 1 ? "" : "s"} checked)`);
  lines.push("");
  lines.push(...table(["dtype", "tensors", "bytes"], Object.entries(s.dtypes).map(([d, t]) => [d, String(t.count), formatBytes(t.bytes)])));
  lines.push("");
  lines.push(
    ...table(
      ["file", "tensors", "size"],
      s.files.map((f) => [f.path, String(f.tensors), formatBytes(f.bytes)]),
    ),
  );
  return `${lines.join("\n")}\n`;
}

function table(head: string[], rows: string[][]): string[] {
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  // The first column reads left-aligned, numbers right-aligned.
  const fmt = (r: string[]) => r.map((c, i) => (i === 0 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!))).join("  ");
  return [fmt(head), ...rows.map(fmt)];
}
