import { describe, expect, test } from "bun:test";
import { WorkerError } from "../../src/base/errors";
import { checkDigests } from "../../src/core/verify";
import type { StepReply } from "../../src/wire/dialect";

const expected = new Map([
  ["a", "0000000000000001"],
  ["b", "0000000000000002"],
]);
const reply = (digests: unknown): StepReply => ({ ok: true, extra: digests === undefined ? {} : { digests } });
const run = (...replies: StepReply[]) =>
  checkDigests({ replies, expected, sent: ["a", "b"], checkpoint: "m", version: 7, worker: (d) => `worker on GPU ${d}` });

function refusal(f: () => unknown): string {
  try {
    f();
  } catch (err) {
    expect(err).toBeInstanceOf(WorkerError);
    expect((err as WorkerError).code).toBe("E_VERIFY");
    return (err as Error).message;
  }
  throw new Error("expected E_VERIFY");
}

describe("checkDigests", () => {
  test("equal digests on every worker verify every tensor sent", () => {
    expect(run(reply(Object.fromEntries(expected)), reply(Object.fromEntries(expected)))).toBe(2);
  });

  test("a differing digest names the tensor, the worker, the version and both digests", () => {
    const msg = refusal(() => run(reply(Object.fromEntries(expected)), reply({ a: "0000000000000001", b: "00000000000000ff" })));
    expect(msg).toBe("verify failed: tensor b on worker on GPU 1 differs from m version 7: digest 00000000000000ff, expected 0000000000000002");
  });

  test("a tensor without a digest is missing on that worker", () => {
    expect(refusal(() => run(reply({ a: "0000000000000001" })))).toContain("tensor b is missing on worker on GPU 0");
  });

  test("a worker that reports no digests at all does not verify", () => {
    expect(refusal(() => run(reply(undefined)))).toContain("worker on GPU 0 returned no digests");
    expect(refusal(() => run(reply(["a"])))).toContain("returned no digests");
  });

  test("a digest of a tensor that was not sent is refused", () => {
    expect(refusal(() => run(reply({ ...Object.fromEntries(expected), c: "0000000000000003" })))).toContain("tensor c, which this update did not send");
  });

  test("several wrong workers: the first is named, the rest counted", () => {
    expect(refusal(() => run(reply({}), reply({}), reply(Object.fromEntries(expected))))).toMatch(/on worker on GPU 0: .*\(and 1 more worker\)$/);
  });
});
