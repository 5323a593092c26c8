// A delta applies only onto the exact version it was computed from (DESIGN.md "Delta updates"): every
// worker's reply to open must announce "delta" and report that version of the same checkpoint.
// Pure: the replies in, the first reason the delta cannot go out (or none).
import type { StepReply } from "../wire/dialect";

export interface DeltaBaseInput {
  replies: StepReply[];
  checkpoint: string;
  base: number;
  /** "worker on CPU device 0 (CPU-host-0)" */
  worker: (d: number) => string;
}

/** Why the delta cannot be sent to these workers, or undefined when every one holds its base. E_DELTA_UNSUPPORTED: a worker applies no patches at all. */
export function deltaRefusal(v: DeltaBaseInput): { code: "E_DELTA_UNSUPPORTED" | "E_DELTA_BASE"; why: string } | undefined {
  for (const [d, reply] of v.replies.entries()) {
    const { delta, checkpoint, version } = reply.extra;
    if (delta !== true) return { code: "E_DELTA_UNSUPPORTED", why: `${v.worker(d)} does not apply patches (no "delta" in its reply to an open offering one)` };
    if (checkpoint === undefined || version === undefined) {
      return { code: "E_DELTA_BASE", why: `${v.worker(d)} holds no known version (a fresh or restarted worker, or an update that did not finish)` };
    }
    if (checkpoint !== v.checkpoint || version !== v.base) {
      return { code: "E_DELTA_BASE", why: `${v.worker(d)} holds ${String(checkpoint)} version ${String(version)}, the delta was computed from ${v.checkpoint} version ${v.base}` };
    }
  }
  return undefined;
}
