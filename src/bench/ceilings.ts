// The host's own limits, measured with the same primitives an update uses: pinned H2D per device
// (and all devices at once), D2D, and NCCL broadcast between devices. An update of S bytes cannot
// beat S / (the binding ceiling): that is the floor `ce bench` reports against.
import type { Buf, Ctx, OpResult } from "../native/ce";

export interface Ceilings {
  /** GB/s per device, pinned host → device (the CPU backend: memcpy into shared memory) */
  h2dGbps: number[];
  /** GB/s of all devices copying at once, summed */
  h2dAllGbps: number;
  d2dGbps: number;
  /** GB/s of a broadcast of `bcastBytes` to every device; undefined with one device */
  bcastGbps?: number;
  bytes: number;
}

const TIMEOUT_MS = 60_000;

function gb(bytes: number, r: OpResult): number {
  return bytes / ((r.endMs - r.startMs) / 1000) / 1e9;
}

/** The best run: a ceiling is what the link can do, and a noisy neighbour only ever slows a run. */
function best(xs: number[]): number {
  return Math.max(...xs);
}

/** Measures with `bytes`-sized copies, `repeat` times each; the best run counts. */
export async function measureCeilings(
  ctx: Ctx,
  opts: { bytes: number; repeat: number; bcastBytes?: number; broadcast: boolean },
): Promise<Ceilings> {
  const { bytes, repeat } = opts;
  const ndev = ctx.ndev;
  const src = ctx.regionAlloc(bytes);
  await ctx.wait(src.op, { timeoutMs: TIMEOUT_MS, what: "allocating pinned memory for the ceilings" });
  // Written once so the copies move real bytes, not a zero page the kernel shares.
  const pattern = new Uint8Array(Math.min(bytes, 64 << 20)).map((_, i) => (i * 131) & 255);
  for (let off = 0; off < bytes; off += pattern.length) ctx.regionWrite(src.region, off, pattern.subarray(0, Math.min(pattern.length, bytes - off)));
  const bufs: Buf[] = [];
  const spare: Buf[] = [];
  try {
    for (let d = 0; d < ndev; d++) bufs.push(ctx.bufAlloc(d, bytes, { ipc: false }));
    spare.push(ctx.bufAlloc(0, bytes, { ipc: false }));
    const copy = BigUint64Array.from([BigInt(src.region), 0n, 0n, BigInt(bytes)]);
    const h2dGbps: number[] = [];
    for (let d = 0; d < ndev; d++) {
      const runs: number[] = [];
      for (let i = 0; i < repeat + 1; i++) {
        const r = await ctx.wait(ctx.h2d(bufs[d]!, copy), { timeoutMs: TIMEOUT_MS, what: `H2D ceiling on ${ctx.deviceName(d)}` });
        if (i > 0) runs.push(gb(bytes, r)); // the first warms the path
      }
      h2dGbps.push(best(runs));
    }
    let h2dAllGbps = h2dGbps[0]!;
    if (ndev > 1) {
      const runs: number[] = [];
      for (let i = 0; i < repeat; i++) {
        const rs = await Promise.all(bufs.map((b, d) => ctx.wait(ctx.h2d(b, copy), { timeoutMs: TIMEOUT_MS, what: `H2D on ${ctx.deviceName(d)}` })));
        const span = (Math.max(...rs.map((r) => r.endMs)) - Math.min(...rs.map((r) => r.startMs))) / 1000;
        runs.push((bytes * ndev) / span / 1e9);
      }
      h2dAllGbps = best(runs);
    }
    const d2dRuns: number[] = [];
    const d2d = BigUint64Array.from([0n, 0n, BigInt(bytes)]);
    for (let i = 0; i < repeat + 1; i++) {
      const r = await ctx.wait(ctx.d2d(spare[0]!, bufs[0]!, d2d), { timeoutMs: TIMEOUT_MS, what: "D2D ceiling" });
      if (i > 0) d2dRuns.push(gb(bytes, r));
    }
    let bcastGbps: number | undefined;
    if (opts.broadcast && ndev > 1) {
      const n = Math.min(opts.bcastBytes ?? bytes, bytes);
      const runs: number[] = [];
      for (let i = 0; i < repeat + 1; i++) {
        const r = await ctx.wait(ctx.bcast(0, spare[0]!, 0, bufs, 0, n), { timeoutMs: TIMEOUT_MS, what: "broadcast ceiling" });
        if (i > 0) runs.push(gb(n, r));
      }
      bcastGbps = best(runs);
    }
    return { h2dGbps, h2dAllGbps, d2dGbps: best(d2dRuns), bcastGbps, bytes };
  } finally {
    for (const b of [...bufs, ...spare]) b.close();
    await ctx.wait(ctx.regionRelease(src.region), { timeoutMs: TIMEOUT_MS, what: "releasing the ceilings' memory" });
  }
}

/** The update's floor: bytes over the slowest link every byte must cross. */
export function floorSeconds(bytes: number, c: Ceilings): { seconds: number; binding: string } {
  const h2d = c.h2dGbps.length > 1 ? c.h2dAllGbps : c.h2dGbps[0]!;
  if (c.bcastGbps !== undefined && c.bcastGbps < h2d) return { seconds: bytes / (c.bcastGbps * 1e9), binding: "NCCL broadcast" };
  return { seconds: bytes / (h2d * 1e9), binding: c.h2dGbps.length > 1 ? "pinned H2D, all GPUs" : "pinned H2D" };
}
