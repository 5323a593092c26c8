// Native faults never hang ce (issue 19), on the CPU backend with real processes: a communicator
// whose rank never arrives or is SIGKILLed ends within its deadline with a clear error, the next
// one works, and nothing leaks (pinned bytes, fds, shared-memory files). Every wait has a deadline.
import { afterAll, afterEach, describe, expect, test } from "bun:test";
import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { NativeError } from "../../src/base/errors";
import { Ctx, shmReclaim } from "../../src/native/ce";
import { type RankProc, startRanks } from "../helpers/native-ranks";

const MiB = 1024 ** 2;
const running: RankProc[] = [];
const dirs: string[] = [];

async function ranks(count: number, devices: number[] = [0]): Promise<RankProc[]> {
  const r = await startRanks(count, { devices });
  running.push(...r);
  return r;
}

afterEach(() => {
  for (const r of running.splice(0)) r.kill();
});

afterAll(() => {
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

function tmpShm(): string {
  const d = mkdtempSync(join("/dev/shm", `ce-test-faults-${process.pid}-`));
  dirs.push(d);
  return d;
}

/** Creates a communicator over the given processes (ranks in process order), rendezvous at the first. */
async function connect(procs: RankProc[], devsPer: number[], timeoutMs = 10_000): Promise<string> {
  const { id } = (await procs[0]!.ask("id", { endpoint: "tcp://127.0.0.1:0" })) as { id: string; ok: boolean };
  const nranks = devsPer.reduce((a, b) => a + b, 0);
  let first = 0;
  const replies = procs.map((p, i) => {
    const r = p.ask("init", { id, nranks, firstRank: first, timeoutMs }, timeoutMs + 20_000);
    first += devsPer[i]!;
    return r;
  });
  for (const r of await Promise.all(replies)) expect(r).toMatchObject({ ok: true });
  return id;
}

describe("CPU-backend communicator across processes", () => {
  test("a 2-process broadcast is byte-exact, from a root in either process, into every device", { timeout: 60_000 }, async () => {
    const [a, b] = [...(await ranks(1)), ...(await ranks(1, [0, 1]))];
    await connect([a!, b!], [1, 2]);
    for (const [root, bytes, seed] of [
      [0, 9 * MiB + 13, 7],
      [2, 5 * MiB + 1, 8],
      [1, 1, 9],
      [0, 0, 10],
    ] as const) {
      const ra = a!.ask("bcast", { root, bytes, seed });
      const rb = b!.ask("bcast", { root, bytes, seed });
      const [x, y] = await Promise.all([ra, rb]);
      expect({ root, a: x, b: y }).toMatchObject({ root, a: { ok: true, mismatches: [-1] }, b: { ok: true, mismatches: [-1, -1] } });
    }
    const s = await a!.ask("stats");
    expect(s.stats).toMatchObject({ regions: 0, pinnedBytes: 0, bufs: 0, bufBytes: 0, ops: 0 });
  });

  test("a rank that never arrives fails the init within its deadline naming the missing rank; a fresh id then works", { timeout: 60_000 }, async () => {
    const [a] = await ranks(1);
    const { id } = (await a!.ask("id", { endpoint: "tcp://127.0.0.1:0" })) as { id: string; ok: boolean };
    const t0 = performance.now();
    const r = await a!.ask("init", { id, nranks: 2, firstRank: 0, timeoutMs: 1_500 }, 20_000);
    expect(r).toMatchObject({ ok: false, status: "CE_E_TIMEOUT" });
    expect(r.message).toMatch(/ranks 1 of 2 did not arrive within 1500 ms/);
    expect(performance.now() - t0).toBeLessThan(15_000);
    const info = await a!.ask("info");
    expect(info).toMatchObject({ state: "dead", endedBy: "CE_E_TIMEOUT" });

    // The side whose rendezvous is gone: its init ends too, naming the address.
    const [lonely] = await ranks(1);
    const r2 = await lonely!.ask("init", { id, nranks: 2, firstRank: 1, timeoutMs: 1_500 }, 20_000);
    expect(r2).toMatchObject({ ok: false, status: "CE_E_TIMEOUT" });
    expect(r2.message).toMatch(/could not connect to 127\.0\.0\.1:\d+|sent no rank table/);

    const [b] = await ranks(1);
    await connect([a!, b!], [1, 1]);
    const [x, y] = await Promise.all([a!.ask("bcast", { root: 0, bytes: 3 * MiB, seed: 3 }), b!.ask("bcast", { root: 0, bytes: 3 * MiB, seed: 3 })]);
    expect([x, y]).toMatchObject([{ ok: true, mismatches: [-1] }, { ok: true, mismatches: [-1] }]);
  });

  test("a receiver SIGKILLed mid-broadcast fails the root's op (not success), and the next communicator works", { timeout: 60_000 }, async () => {
    const [a, b] = await ranks(2);
    await connect([a!, b!], [1, 1]);
    // b never submits: a's 64 MiB fill the socket buffers and stall; then b dies.
    const sent = a!.request("bcast", { root: 0, bytes: 64 * MiB, seed: 4 }, 30_000);
    await sent.submitted;
    await Bun.sleep(200);
    const t0 = performance.now();
    b!.kill();
    const r = await sent.reply;
    expect(r).toMatchObject({ ok: false, status: "CE_E_PEER" });
    expect(r.message).toMatch(/ranks 1\.\.1 \(127\.0\.0\.1:\d+\)/);
    expect(performance.now() - t0).toBeLessThan(10_000);
    // The generation is over: a later broadcast is refused at once, not hung.
    const again = await a!.ask("bcast", { root: 0, bytes: 1024, seed: 1 });
    expect(again).toMatchObject({ ok: false, status: "CE_E_ABORTED" });

    const [c] = await ranks(1);
    await connect([a!, c!], [1, 1]);
    const [x, y] = await Promise.all([a!.ask("bcast", { root: 0, bytes: 8 * MiB, seed: 5 }), c!.ask("bcast", { root: 0, bytes: 8 * MiB, seed: 5 })]);
    expect([x, y]).toMatchObject([{ ok: true, mismatches: [-1] }, { ok: true, mismatches: [-1] }]);
  });

  test("a root SIGKILLed mid-broadcast fails the receiver's op within the deadline", { timeout: 60_000 }, async () => {
    const [a, b] = await ranks(2);
    await connect([a!, b!], [1, 1]);
    const waiting = b!.request("bcast", { root: 0, bytes: 16 * MiB, seed: 6 }, 30_000);
    await waiting.submitted;
    a!.kill();
    const r = await waiting.reply;
    expect(r).toMatchObject({ ok: false, status: "CE_E_PEER" });
    expect(r.message).toMatch(/closed the connection \(EOF\)|Connection reset/);
  });

  test("a broadcast whose peer stalls past the communicator's timeout fails with CE_E_TIMEOUT", { timeout: 60_000 }, async () => {
    const [a, b] = await ranks(2);
    await connect([a!, b!], [1, 1], 1_000);
    const r = await a!.ask("bcast", { root: 0, bytes: 64 * MiB, seed: 2 }, 30_000); // b never submits
    expect(r).toMatchObject({ ok: false, status: "CE_E_TIMEOUT" });
    expect(r.message).toMatch(/took no bytes for 1000 ms|sent nothing for 1000 ms/);
  });

  test("an abort during a pending init fails that init (CE_E_BUSY meanwhile), and a new init works", { timeout: 60_000 }, async () => {
    const [a, b] = await ranks(2);
    const { id } = (await a!.ask("id")) as { id: string; ok: boolean };
    const pending = a!.request("init", { id, nranks: 2, firstRank: 0, timeoutMs: 0 }, 30_000); // no limit: only abort ends it
    await pending.submitted;
    const busy = await a!.ask("init", { id, nranks: 2, firstRank: 0, timeoutMs: 0 });
    expect(busy).toMatchObject({ ok: false, status: "CE_E_BUSY" });
    expect(await a!.ask("info")).toMatchObject({ state: "pending", generation: 1 });
    expect(await a!.ask("abort")).toMatchObject({ ok: true });
    const r = await pending.reply;
    expect(r).toMatchObject({ ok: false, status: "CE_E_ABORTED" });
    // Aborted while it waited for rank 1, or before the comm thread started it: either way, aborted.
    expect(r.message).toMatch(/aborted while waiting for ranks 1 of 2|ended before it ran: aborted/);
    await connect([a!, b!], [1, 1]);
    expect(await a!.ask("info")).toMatchObject({ state: "ready", generation: 2 });
    const [x, y] = await Promise.all([a!.ask("bcast", { root: 1, bytes: MiB, seed: 11 }), b!.ask("bcast", { root: 1, bytes: MiB, seed: 11 })]);
    expect([x, y]).toMatchObject([{ ok: true, mismatches: [-1] }, { ok: true, mismatches: [-1] }]);
  });

  test("closing a context with a broadcast stuck on a dead peer returns at once and leaks no fds or memory", { timeout: 60_000 }, async () => {
    const [a, b] = await ranks(2);
    const before = await a!.ask("stats");
    await connect([a!, b!], [1, 1], 0); // no timeout: only the close may end the stuck broadcast
    const stuck = a!.request("bcast", { root: 0, bytes: 64 * MiB, seed: 1 }, 30_000); // b never submits
    await stuck.submitted;
    await Bun.sleep(200);
    const closed = await a!.ask("close", {}, 15_000);
    expect(closed).toMatchObject({ ok: true });
    expect(closed.ms as number).toBeLessThan(5_000);
    const r = await stuck.reply;
    expect(r).toMatchObject({ ok: false });
    expect(closed.fds as number).toBeLessThanOrEqual((before.fds as number) + 1);
  });

  test("communicators made and broken 20 times leave fds, ops and memory where they started", { timeout: 120_000 }, async () => {
    const [a] = await ranks(1);
    const start = await a!.ask("stats");
    for (let i = 0; i < 20; i++) {
      const [b] = await ranks(1);
      await connect([a!, b!], [1, 1]);
      const [x] = await Promise.all([a!.ask("bcast", { root: 0, bytes: 256 * 1024, seed: i }), b!.ask("bcast", { root: 0, bytes: 256 * 1024, seed: i })]);
      expect(x).toMatchObject({ ok: true, mismatches: [-1] });
      b!.kill();
      await b!.exited;
      expect(await a!.ask("abort")).toMatchObject({ ok: true });
    }
    await Bun.sleep(100); // the comm thread closes the dead generation's sockets
    const end = await a!.ask("stats");
    expect(end.stats).toMatchObject({ regions: 0, pinnedBytes: 0, regionBytes: 0, bufs: 0, bufBytes: 0, ops: 0 });
    expect(end.fds as number).toBeLessThanOrEqual((start.fds as number) + 1);
  });
});

describe("shared memory and files of a killed ce", () => {
  test("the shared-memory files of a SIGKILLed ce are removed by the next ce that allocates there", { timeout: 60_000 }, async () => {
    const dir = tmpShm();
    const [victim] = await ranks(1);
    const { path } = (await victim!.ask("shm", { dir, bytes: MiB })) as { path: string; ok: boolean };
    expect(existsSync(path)).toBe(true);
    // A live ce's file is never taken.
    expect(shmReclaim(dir)).toBe(0);
    expect(existsSync(path)).toBe(true);
    victim!.kill();
    await victim!.exited;
    expect(existsSync(path)).toBe(true); // nothing removes it at the kill itself
    const [next] = await ranks(1);
    const mine = (await next!.ask("shm", { dir, bytes: MiB })) as { path: string; ok: boolean };
    expect(mine.ok).toBe(true);
    expect(existsSync(path)).toBe(false);
    expect(existsSync(mine.path)).toBe(true);
    await next!.ask("close");
    expect(existsSync(mine.path)).toBe(false);
  });

  test("opening a buffer file shorter than its size is a clean error, not a SIGBUS", { timeout: 30_000 }, async () => {
    const dir = tmpShm();
    const path = join(dir, "short.bin");
    writeFileSync(path, new Uint8Array(4096));
    const [p] = await ranks(1);
    const r = await p!.ask("openShort", { path, bytes: 4 * MiB });
    expect(r).toMatchObject({ ok: false, status: "CE_E_INVAL" });
    expect(r.message).toContain("has 4096 bytes, 4194304 expected");
    expect(await p!.ask("info")).toMatchObject({ ok: true }); // still alive
  });
});

describe("communicator states in one process", () => {
  test("a second init while one is ready is refused, a broadcast of an ended generation is CE_E_ABORTED at once", { timeout: 30_000 }, async () => {
    using a = Ctx.create("cpu", [0]);
    using b = Ctx.create("cpu", [0]);
    const id = a.commUniqueId();
    await Promise.all([a.commCreate(id, 2, 0, { timeoutMs: 5_000 }), b.commCreate(id, 2, 1, { timeoutMs: 5_000 })]);
    expect(() => a.commInit(a.commUniqueId(), 2, 0, 1_000)).toThrow(/exists \(ce_comm_abort it first\)/);
    const buf = a.bufAlloc(0, 4096, { ipc: false });
    a.commAbort();
    let err: unknown;
    try {
      a.bcast(0, buf, 0, [buf], 0, 4096);
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(NativeError);
    expect((err as NativeError).code).toBe("CE_E_ABORTED");
    // The peer's pending broadcast ends too: its link is gone.
    const rb = b.bufAlloc(0, 4096, { ipc: false });
    await expect(b.wait(b.bcast(0, null, 0, [rb], 0, 4096), { timeoutMs: 10_000, what: "broadcast" })).rejects.toThrow(/CE_E_PEER|EOF|reset/);
    buf.close();
    rb.close();
    expect(a.commInfo()).toMatchObject({ state: "dead", endedBy: "CE_E_ABORTED" });
  });

  test("commCreate aborts and collects an init that outlives its deadline, so a retry is not CE_E_BUSY", { timeout: 30_000 }, async () => {
    using a = Ctx.create("cpu", [0]);
    const id = a.commUniqueId();
    await expect(a.commCreate(id, 2, 0, { timeoutMs: 500 })).rejects.toThrow(/did not arrive within 500 ms/);
    const ac = new AbortController();
    const pending = a.commCreate(a.commUniqueId(), 2, 0, { timeoutMs: 0, signal: ac.signal });
    setTimeout(() => ac.abort(new Error("stop")), 100);
    await expect(pending).rejects.toThrow();
    expect(a.commInfo().state).toBe("dead");
    expect(a.stats().ops).toBe(0);
    using b = Ctx.create("cpu", [0]);
    const id2 = a.commUniqueId();
    await Promise.all([a.commCreate(id2, 2, 0, { timeoutMs: 5_000 }), b.commCreate(id2, 2, 1, { timeoutMs: 5_000 })]);
    expect(a.commInfo()).toMatchObject({ state: "ready", generation: 3 });
  });
});
