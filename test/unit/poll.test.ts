import { describe, expect, test } from "bun:test";
import { join } from "node:path";
import { AbortedError, TimeoutError } from "../../src/base/errors";
import { pollUntil } from "../../src/base/poll";

const POLL_TS = join(import.meta.dir, "../../src/base/poll.ts");

/** A check that returns `value` on its n-th call. */
function afterCalls<T>(n: number, value: T): { check: () => T | undefined; calls: () => number } {
  let calls = 0;
  return { check: () => (++calls >= n ? value : undefined), calls: () => calls };
}

describe("pollUntil", () => {
  test("resolves with the first value the check returns", async () => {
    const { check, calls } = afterCalls(5, { ok: true });
    expect(await pollUntil(check, { timeoutMs: 5000, what: "five calls" })).toEqual({ ok: true });
    expect(calls()).toBe(5);
  });

  test("never runs the check inside the call itself", async () => {
    let calls = 0;
    const done = pollUntil(() => ++calls, { timeoutMs: 5000, what: "one call" });
    expect(calls).toBe(0);
    expect(await done).toBe(1);
  });

  test("a falsy value other than undefined counts as a result", async () => {
    expect(await pollUntil(() => 0, { timeoutMs: 5000, what: "zero" })).toBe(0);
    expect(await pollUntil(() => null, { timeoutMs: 5000, what: "null" })).toBeNull();
  });

  test("a check that throws rejects with its error and is not called again", async () => {
    let calls = 0;
    const boom = new Error("ce_op_poll: CE_E_NCCL: unhandled cuda error");
    const done = pollUntil(
      () => {
        calls++;
        throw boom;
      },
      { timeoutMs: 5000, what: "op" },
    );
    await expect(done).rejects.toBe(boom);
    await Bun.sleep(10);
    expect(calls).toBe(1);
  });

  test("a passed deadline rejects with a TimeoutError naming what was awaited and the time waited", async () => {
    const started = performance.now();
    const err = await pollUntil(() => undefined, { timeoutMs: 30, what: "reply to load from GPU 2" }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(TimeoutError);
    expect((err as TimeoutError).code).toBe("E_TIMEOUT");
    expect((err as TimeoutError).message).toMatch(/^reply to load from GPU 2 timed out after \d+ ms$/);
    const waited = Number(/after (\d+) ms/.exec((err as Error).message)![1]);
    expect(waited).toBeGreaterThanOrEqual(30);
    expect(performance.now() - started).toBeGreaterThanOrEqual(30);
  });

  test("a zero timeout runs the check once before giving up", async () => {
    let calls = 0;
    await expect(pollUntil(() => (calls++, undefined), { timeoutMs: 0, what: "once" })).rejects.toBeInstanceOf(TimeoutError);
    expect(calls).toBe(1);
    expect(await pollUntil(() => "now", { timeoutMs: 0, what: "once" })).toBe("now");
  });

  test("an aborted signal rejects with an AbortedError carrying the reason, and the check stops", async () => {
    const controller = new AbortController();
    let calls = 0;
    const done = pollUntil(() => (calls++, undefined), { timeoutMs: Infinity, what: "reply to open", signal: controller.signal });
    setTimeout(() => controller.abort(new Error("worker on GPU 1 failed")), 10);
    const err = await done.catch((e: unknown) => e);
    expect(err).toBeInstanceOf(AbortedError);
    expect((err as AbortedError).message).toBe("reply to open aborted: worker on GPU 1 failed");
    const after = calls;
    await Bun.sleep(10);
    expect(calls).toBe(after);
  });

  test("a signal aborted before the call rejects without running the check", async () => {
    let calls = 0;
    const err = await pollUntil(() => ++calls, { timeoutMs: 5000, what: "x", signal: AbortSignal.abort() }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(AbortedError);
    expect(calls).toBe(0);
  });

  test("a thousand concurrent checks each resolve with their own value", async () => {
    let seed = 12345;
    const rand = () => ((seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31);
    const waits = Array.from({ length: 1000 }, (_, i) => pollUntil(afterCalls(1 + Math.floor(rand() * 50), i).check, { timeoutMs: 10_000, what: `check ${i}` }));
    const values = await Promise.all(waits);
    expect(values).toEqual(Array.from({ length: 1000 }, (_, i) => i));
  });

  test("every pending check runs on every tick", async () => {
    const counts = new Array<number>(50).fill(0);
    const controller = new AbortController();
    const waits = counts.map((_, i) =>
      pollUntil(() => (counts[i]!++, undefined), { timeoutMs: Infinity, what: `check ${i}`, signal: controller.signal }).catch(() => {}),
    );
    await Bun.sleep(20);
    controller.abort();
    await Promise.all(waits);
    expect(counts[0]!).toBeGreaterThan(1);
    // The last check was added after the first, in the same synchronous run: they share every tick.
    expect(new Set(counts).size).toBe(1);
  });

  test("timeouts, aborts and failures elsewhere leave other waits alone", async () => {
    const slow = afterCalls(20, "slow");
    const waits = [
      pollUntil(slow.check, { timeoutMs: 10_000, what: "slow" }),
      pollUntil(() => undefined, { timeoutMs: 5, what: "short" }).catch((e: unknown) => e),
      pollUntil(() => {
        throw new Error("bad");
      }, { timeoutMs: 10_000, what: "bad" }).catch((e: unknown) => e),
    ];
    const [a, b, c] = await Promise.all(waits);
    expect(a).toBe("slow");
    expect(b).toBeInstanceOf(TimeoutError);
    expect((c as Error).message).toBe("bad");
  });

  test("no timer stays armed once nothing is pending: the process exits by itself", async () => {
    // Resolve, time out, abort and throw, then fall idle; a lingering timer would keep the child alive.
    const script = `
      import { pollUntil } from ${JSON.stringify(POLL_TS)};
      let n = 0;
      await pollUntil(() => (++n > 3 ? n : undefined), { timeoutMs: 1000, what: "resolve" });
      await pollUntil(() => undefined, { timeoutMs: 5, what: "timeout" }).catch(() => {});
      const c = new AbortController();
      const aborted = pollUntil(() => undefined, { timeoutMs: 60000, what: "abort", signal: c.signal }).catch(() => {});
      c.abort();
      await aborted;
      await pollUntil(() => { throw new Error("x"); }, { timeoutMs: 60000, what: "throw" }).catch(() => {});
      process.stdout.write("idle\\n");
    `;
    const child = Bun.spawn([process.execPath, "-e", script], { stdout: "pipe", stderr: "pipe" });
    const exited = await Promise.race([child.exited, Bun.sleep(5_000).then(() => "hung" as const)]);
    if (exited === "hung") child.kill();
    expect(await new Response(child.stderr).text()).toBe("");
    expect(exited).toBe(0);
    expect(await new Response(child.stdout).text()).toBe("idle\n");
  }, 15_000);
});
