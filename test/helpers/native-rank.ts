// One ce process of a communicator test: a libce context on the CPU backend (or CUDA), driven by
// JSON lines on stdin, answering JSON lines on stdout (test/helpers/native-ranks.ts drives it).
//   bun test/helpers/native-rank.ts <backend cpu|cuda> <devices, comma-separated>
// Requests carry "n"; every answer echoes it. A broadcast answers {"event":"submitted"} once its
// op is submitted, then its result.
import { randomBytes } from "./ckpt";
import { readdirSync } from "node:fs";
import { createInterface } from "node:readline";
import { NativeError } from "../../src/base/errors";
import { type Backend, type Buf, Ctx, ncclLoad, ncclUniqueId } from "../../src/native/ce";

const backend = (process.argv[2] ?? "cpu") as Backend;
const devices = (process.argv[3] ?? "0").split(",").map(Number);

function fdCount(): number {
  return readdirSync("/proc/self/fd").length;
}

/** The bytes every rank of a broadcast expects. */
const pattern = randomBytes;

function firstDifference(a: Uint8Array, b: Uint8Array): number {
  if (Buffer.compare(a, b) === 0) return -1;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return i;
  return a.length;
}

function errorFields(err: unknown): Record<string, unknown> {
  if (err instanceof NativeError) return { ok: false, status: err.code, message: err.message };
  return { ok: false, status: "E_JS", message: err instanceof Error ? err.message : String(err) };
}

type Req = { n: number; cmd: string; [k: string]: unknown };

const fdsAtStart = fdCount();
if (backend === "cuda") ncclLoad();
let ctx: Ctx | undefined = Ctx.create(backend, devices);
const kept: Buf[] = [];

function say(msg: Record<string, unknown>): void {
  process.stdout.write(`${JSON.stringify(msg)}\n`);
}

async function bcast(req: Req): Promise<Record<string, unknown>> {
  const c = ctx!;
  const bytes = req.bytes as number;
  const root = req.root as number;
  const seed = (req.seed as number) ?? 1;
  const info = c.commInfo();
  const localRoot = root >= info.firstRank && root < info.firstRank + c.ndev ? root - info.firstRank : -1;
  const dsts = c.devices.map((_, d) => c.bufAlloc(d, Math.max(bytes, 1), { ipc: false }));
  let src: Buf | null = null;
  let region: number | undefined;
  let h2d = 0n;
  try {
    if (localRoot >= 0) {
      src = c.bufAlloc(localRoot, Math.max(bytes, 1), { ipc: false });
      const r = c.regionAlloc(Math.max(bytes, 1));
      region = r.region;
      await c.wait(r.op, { timeoutMs: 60_000, what: "allocating the source region" });
      c.regionWrite(r.region, 0, pattern(bytes, seed));
      h2d = c.h2d(src, BigUint64Array.from([BigInt(r.region), 0n, 0n, BigInt(bytes)]));
    }
    const t0 = performance.now();
    const op = c.bcast(root, src, 0, dsts, 0, bytes, h2d);
    say({ n: req.n, event: "submitted" });
    try {
      await c.wait(op, { timeoutMs: (req.waitMs as number) ?? 60_000, what: `broadcast from rank ${root}` });
    } catch (err) {
      if (err instanceof NativeError) throw err;
      // Past its deadline (a kernel stuck on a dead peer): what ce does, abort and collect the op.
      c.commAbort();
      await c.wait(op, { timeoutMs: 60_000, what: `broadcast from rank ${root}, aborted` });
      throw err; // not reached: an op of an aborted generation fails
    }
    const ms = performance.now() - t0;
    const want = pattern(bytes, seed);
    const mismatches = dsts.map((b) => firstDifference(b.read(0, bytes), want));
    return { ok: true, ms, mismatches };
  } finally {
    if (h2d) await c.wait(h2d, { timeoutMs: 60_000, what: "H2D" }).catch(() => undefined);
    for (const b of [...dsts, ...(src ? [src] : [])]) b.close();
    if (region !== undefined) await c.wait(c.regionRelease(region), { timeoutMs: 60_000, what: "release" });
  }
}

async function handle(req: Req): Promise<Record<string, unknown>> {
  const c = ctx;
  switch (req.cmd) {
    case "id": {
      const id = backend === "cuda" ? ncclUniqueId() : c!.commUniqueId((req.endpoint as string) ?? "tcp://127.0.0.1:0");
      return { ok: true, id: Buffer.from(id).toString("hex") };
    }
    case "init": {
      const t0 = performance.now();
      const op = c!.commInit(Buffer.from(req.id as string, "hex"), req.nranks as number, req.firstRank as number, req.timeoutMs as number);
      say({ n: req.n, event: "submitted" });
      await c!.wait(op, { timeoutMs: ((req.timeoutMs as number) || 600_000) + 30_000, what: "communicator init" });
      return { ok: true, ms: performance.now() - t0 };
    }
    case "bcast":
      return bcast(req);
    case "abort":
      c!.commAbort();
      return { ok: true };
    case "info":
      return { ok: true, ...c!.commInfo() };
    case "stats":
      return { ok: true, stats: c!.stats(), fds: fdCount(), fdsAtStart };
    case "shm": {
      const b = c!.bufAlloc(0, req.bytes as number, { ipc: true, shmDir: req.dir as string });
      kept.push(b);
      return { ok: true, path: b.path() };
    }
    case "openShort": {
      // A buffer file shorter than the size asked for: a clean error, not a SIGBUS on access.
      const b = c!.bufOpenPath(req.path as string, req.bytes as number);
      const bytes = b.read(0, req.bytes as number);
      b.close();
      return { ok: true, read: bytes.length };
    }
    case "close": {
      const t0 = performance.now();
      for (const b of kept.splice(0)) b.close();
      c?.close();
      ctx = undefined;
      return { ok: true, ms: performance.now() - t0, fds: fdCount(), fdsAtStart };
    }
    case "exit":
      setTimeout(() => process.exit(0), 0);
      return { ok: true };
    default:
      throw new Error(`unknown command ${req.cmd}`);
  }
}

say({ ready: true, pid: process.pid, fdsAtStart });
const rl = createInterface({ input: process.stdin });
rl.on("line", (line) => {
  const req = JSON.parse(line) as Req;
  handle(req).then(
    (out) => say({ n: req.n, ...out }),
    (err) => say({ n: req.n, ...errorFields(err) }),
  );
});
rl.on("close", () => process.exit(0));
