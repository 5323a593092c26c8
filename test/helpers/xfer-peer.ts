// One process of a transfer-endpoint test: a libce context on the CPU backend with one transfer
// endpoint (UCX, or Mooncake with CE_P2P_ENGINE=mooncake), driven by JSON lines on stdin like
// native-rank.ts (native-ranks.ts's RankProc drives it).
//   bun test/helpers/xfer-peer.ts cpu 0
// A source registers seeded random bytes; a reader connects to it and pulls ranges, checking every
// byte against the same seed. Blobs travel as hex.
import { readdirSync } from "node:fs";
import { createInterface } from "node:readline";
import { config } from "../../src/base/config";
import { NativeError } from "../../src/base/errors";
import { type Buf, Ctx, digestBytes, type OpId } from "../../src/native/ce";
import { Xfer } from "../../src/native/xfer";
import { randomBytes } from "./ckpt";

type Req = { n: number; cmd: string; [k: string]: unknown };
/** [remoteOffset, localOffset, bytes] */
type Range = [number, number, number];

const ctx = Ctx.create("cpu", [0]);
let xfer: Xfer | undefined;
const regions = new Map<string, number>();

function say(msg: Record<string, unknown>): void {
  process.stdout.write(`${JSON.stringify(msg)}\n`);
}

function fdCount(): number {
  return readdirSync("/proc/self/fd").length;
}

function endpoint(): Xfer {
  xfer ??= Xfer.create(ctx, config.CE_P2P_ENGINE === "mooncake" ? "mooncake" : "ucx");
  return xfer;
}

async function region(name: string, bytes: number): Promise<number> {
  const known = regions.get(name);
  if (known !== undefined) return known;
  const r = ctx.regionAlloc(bytes);
  await ctx.wait(r.op, { timeoutMs: 30_000, what: `allocating region ${name}` });
  regions.set(name, r.region);
  return r.region;
}

function triples(ranges: Range[]): BigUint64Array {
  return BigUint64Array.from(ranges.flat().map(BigInt));
}

/** Offset of the first range whose bytes differ from the source's (-1: none). */
async function verify(ranges: Range[], seed: number, srcBytes: number, into: { region?: number; buf?: Buf }): Promise<number> {
  const want = randomBytes(srcBytes, seed);
  if (into.buf) {
    for (const [roff, loff, n] of ranges) if (Buffer.compare(into.buf.read(loff, n), want.subarray(roff, roff + n)) !== 0) return roff;
    return -1;
  }
  const spans = BigUint64Array.from(ranges.flatMap(([, loff, n]) => [BigInt(into.region!), BigInt(loff), BigInt(n)]));
  const { digests } = await ctx.digest(spans, { threads: 2, timeoutMs: 60_000 });
  for (let i = 0; i < ranges.length; i++) {
    const [roff, , n] = ranges[i]!;
    if (digests[i] !== digestBytes(want.subarray(roff, roff + n))) return roff;
  }
  return -1;
}

function errorFields(err: unknown): Record<string, unknown> {
  if (err instanceof NativeError) return { ok: false, status: err.code, message: err.message };
  return { ok: false, status: "E_JS", message: err instanceof Error ? err.message : String(err) };
}

async function handle(req: Req): Promise<Record<string, unknown>> {
  switch (req.cmd) {
    case "source": {
      const bytes = req.bytes as number;
      const r = await region("source", bytes);
      ctx.regionWrite(r, 0, randomBytes(bytes, req.seed as number));
      const reg = endpoint().registerRegion(r);
      return { ok: true, address: Buffer.from(endpoint().address()).toString("hex"), rkey: Buffer.from(reg.rkey).toString("hex") };
    }
    case "connect": {
      const peer = endpoint().connect(Buffer.from(req.address as string, "hex"), req.name as string);
      return { ok: true, peer };
    }
    case "pull": {
      // ops: each a list of ranges, all in flight at once; into the region "dst" or a CPU buffer.
      const ops = req.ops as Range[][];
      const rkey = Buffer.from(req.rkey as string, "hex");
      const peer = req.peer as number;
      const dstBytes = req.dstBytes as number;
      const x = endpoint();
      const t0 = performance.now();
      let into: { region?: number; buf?: Buf };
      let pending: Promise<unknown>[];
      if (req.into === "buf") {
        const buf = ctx.bufAlloc(0, dstBytes, { ipc: false });
        into = { buf };
        pending = ops.map((ranges) => x.readBuf(peer, rkey, buf, triples(ranges), { timeoutMs: req.timeoutMs as number }));
      } else {
        const dst = await region("dst", dstBytes);
        into = { region: dst };
        pending = ops.map((ranges) => x.readRegion(peer, rkey, dst, triples(ranges), { timeoutMs: req.timeoutMs as number }));
      }
      try {
        await Promise.all(pending);
        const ms = performance.now() - t0;
        const bytes = ops.flat().reduce((a, r) => a + r[2], 0);
        const all = ops.flat();
        const mismatch = await verify(all, req.seed as number, req.srcBytes as number, into);
        return { ok: true, ms, bytes, gbps: bytes / ms / 1e6, mismatch };
      } finally {
        await Promise.allSettled(pending);
        into.buf?.close();
      }
    }
    case "pullLoop": {
      // Keeps `depth` reads of `chunk` bytes in flight until one fails; says "submitted" once the
      // first is done, so the test knows the others are mid-flight.
      const rkey = Buffer.from(req.rkey as string, "hex");
      const { peer, chunk, depth, srcBytes, timeoutMs } = req as unknown as Record<string, number>;
      const dst = await region("dst", chunk! * depth!);
      const x = endpoint();
      let started = false;
      let i = 0;
      const lane = async (k: number): Promise<void> => {
        for (;;) {
          const roff = ((i++ * chunk!) % (srcBytes! - chunk!)) & ~4095;
          await x.readRegion(peer!, rkey, dst, triples([[roff, k * chunk!, chunk!]]), { timeoutMs: timeoutMs! });
          if (!started) say({ n: req.n, event: "submitted" });
          started = true;
        }
      };
      const lanes = Array.from({ length: depth! }, (_, k) => lane(k));
      const first = await Promise.race(lanes.map((l) => l.then(() => undefined, (err: unknown) => err)));
      await Promise.allSettled(lanes);
      return { ...errorFields(first), ops: ctx.stats().ops };
    }
    case "destroyInFlight": {
      // Submits reads, destroys the endpoint at once, and reports how each op ended.
      const rkey = Buffer.from(req.rkey as string, "hex");
      const { peer, chunk, count } = req as unknown as Record<string, number>;
      const dst = await region("dst", chunk! * count!);
      const x = endpoint();
      const ops: OpId[] = [];
      for (let k = 0; k < count!; k++) ops.push(x.readRegionSubmit(peer!, rkey, dst, triples([[k * chunk!, k * chunk!, chunk!]]), 0));
      const inFlight = x.stats().readsInFlight;
      const t0 = performance.now();
      x.close();
      xfer = undefined;
      const closeMs = performance.now() - t0;
      const ended: string[] = [];
      for (const op of ops) {
        try {
          await ctx.wait(op, { timeoutMs: 10_000, what: "a read of a destroyed endpoint" });
          ended.push("ok");
        } catch (err) {
          ended.push(err instanceof NativeError ? err.code : String(err));
        }
      }
      return { ok: true, inFlight, closeMs, ended };
    }
    case "registerLocal": {
      // A registration of this process's own memory: destroy must free it too.
      const r = await region("local", req.bytes as number);
      endpoint().registerRegion(r);
      return { ok: true, stats: endpoint().stats() };
    }
    case "releaseRegions": {
      for (const [name, r] of regions) {
        await ctx.wait(ctx.regionRelease(r), { timeoutMs: 30_000, what: `releasing region ${name}` });
        regions.delete(name);
      }
      return { ok: true };
    }
    case "stats":
      return { ok: true, stats: ctx.stats(), xfer: xfer?.stats(), fds: fdCount() };
    default:
      throw new Error(`unknown command ${req.cmd}`);
  }
}

say({ ready: true, pid: process.pid });
const rl = createInterface({ input: process.stdin });
rl.on("line", (line) => {
  const req = JSON.parse(line) as Req;
  handle(req).then(
    (out) => say({ n: req.n, ...out }),
    (err) => say({ n: req.n, ...errorFields(err) }),
  );
});
rl.on("close", () => process.exit(0));
