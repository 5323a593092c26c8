// A separate process that opens a slot buffer the way a worker does (CUDA IPC handle, or the CPU
// backend's shared-memory file) and compares ranges of it with files. Reads one JSON job on
// stdin, prints one JSON result on stdout.
//   { backend, ordinal, handleHex?, path?, bytes, checks: [{ file, fileOffset, bufOffset, bytes }] }
//   → { mismatches: [{ check, at }] }
import { Ctx } from "../../src/native/ce";

interface Job {
  backend: "cuda" | "cpu";
  ordinal: number;
  handleHex?: string;
  path?: string;
  bytes: number;
  checks: { file: string; fileOffset: number; bufOffset: number; bytes: number }[];
}

const job = JSON.parse(await Bun.stdin.text()) as Job;
const ctx = Ctx.create(job.backend, [job.backend === "cuda" ? job.ordinal : 0]);
const buf = job.handleHex ? ctx.bufOpenIpc(0, Buffer.from(job.handleHex, "hex"), job.bytes) : ctx.bufOpenPath(job.path!, job.bytes);
const regions = new Map<string, number>();
const mismatches: { check: number; at: number }[] = [];
for (const [i, c] of job.checks.entries()) {
  let region = regions.get(c.file);
  if (region === undefined) {
    const m = ctx.regionMapFile(c.file, { pin: false, threads: 1 });
    ctx.waitBlocking(m.op, 60_000, `mapping ${c.file}`);
    region = m.region;
    regions.set(c.file, region);
  }
  const r = ctx.waitBlocking(ctx.compare(buf, c.bufOffset, region, c.fileOffset, c.bytes), 600_000, `check ${i}`);
  if (r.value !== 0) mismatches.push({ check: i, at: r.value - 1 });
}
buf.close();
ctx.close();
process.stdout.write(`${JSON.stringify({ mismatches })}\n`);
