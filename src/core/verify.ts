// verify: every worker reports, in its reply to finish, the digest of each tensor it loaded
// (docs/digest.md); ce compares them with the version's own. Pure: the replies and the expected
// digests in, a WorkerError naming tensor, worker and version out.
import { WorkerError } from "../base/errors";
import type { StepReply } from "../wire/dialect";

export interface VerifyInput {
  /** each worker's reply to finish, by device */
  replies: StepReply[];
  /** tensor name → the version's digest */
  expected: Map<string, string>;
  /** the tensors this update sent to every worker */
  sent: string[];
  checkpoint: string;
  version: number;
  /** "worker on NVIDIA H200 (GPU-…)" */
  worker: (d: number) => string;
}

/** Tensors every worker's digests checked, or a WorkerError E_VERIFY for the first worker that is wrong. */
export function checkDigests(v: VerifyInput): number {
  const what = `${v.checkpoint} version ${v.version}`;
  const problems: string[] = [];
  const sent = new Set(v.sent);
  v.replies.forEach((reply, d) => {
    const got = reply.extra.digests;
    if (typeof got !== "object" || got === null || Array.isArray(got)) {
      problems.push(`${v.worker(d)} returned no digests: it does not verify (protocol 2 with "verify"); update with verify off for it`);
      return;
    }
    const digests = got as Record<string, unknown>;
    for (const name of v.sent) {
      const have = digests[name];
      const want = v.expected.get(name);
      if (have === undefined) problems.push(`tensor ${name} is missing on ${v.worker(d)}: the worker reported no digest for it`);
      else if (have !== want) problems.push(`tensor ${name} on ${v.worker(d)} differs from ${what}: digest ${String(have)}, expected ${want}`);
      else continue;
      return;
    }
    const extra = Object.keys(digests).find((n) => !sent.has(n));
    if (extra !== undefined) problems.push(`${v.worker(d)} reported a digest for tensor ${extra}, which this update did not send`);
  });
  if (problems.length) {
    const more = problems.length > 1 ? ` (and ${problems.length - 1} more worker${problems.length > 2 ? "s" : ""})` : "";
    throw new WorkerError("E_VERIFY", `verify failed: ${problems[0]}${more}`, {
      hint: "the engine does not hold the version ce sent; its weights are not to be trusted until an update verifies",
    });
  }
  return v.sent.length;
}
