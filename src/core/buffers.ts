// The device memory an update moves through: on every device one IPC buffer of `slots` slots (what
// the worker maps) and, on the broadcast path, `staging` bucket-sized buffers that owners H2D into.
// Kept between updates while the sizes stay the same, so a warm update allocates nothing; each IPC
// buffer carries an id (sent in open as buffer_id) so that a worker keeps its mapping while ce keeps
// the buffer (worker-protocol.json, "the kept mapping").
//
// When the sizes change, workers may still map the old IPC buffers (they keep a mapping until an
// open names another buffer_id, or abort). CUDA leaves cuMemFree of a buffer that another process
// still has open undefined, so the old IPC buffers are retired, not freed: update.ts frees them once
// every worker has answered the open naming the new ones (freeRetired), or after abort (free). The
// other way, telling workers to drop the old buffer before it is freed, would need a request outside
// an update (an engine's workers listen only while ce's call to it runs) and a round trip more; this
// one costs nothing on the warm path and, on a change of sizes, the old IPC buffer's memory for the
// length of one open. Staging buffers are ce's alone and go at once.
import { randomBytes } from "node:crypto";
import { NativeError, errorMessage } from "../base/errors";
import type { Buf, Ctx } from "../native/ce";
import { fewerBuffers } from "./sizing";

export interface Buffers {
  slotBytes: number;
  slots: number;
  staging: number;
  ipc: Buf[];
  stage: Buf[];
  /** CUDA: each IPC buffer's 64-byte handle (empty on the CPU backend). */
  handles: Uint8Array[];
  /** Each IPC buffer's buffer_id: unique to that allocation, never reused, in this process or another. */
  ids: string[];
}

// pid alone repeats across restarts (in a container ce may be pid 1 every time): a worker that kept a
// mapping of an earlier ce's buffer must never take a new buffer for it.
const PROCESS_TAG = `${process.pid}-${randomBytes(4).toString("hex")}`;
let allocations = 0;

export class SlotBuffers {
  #held: Buffers | undefined;
  /** IPC buffers of earlier sizes that workers may still map: freed by freeRetired or free. */
  #retired: Buffers[] = [];

  constructor(
    private readonly ctx: Ctx,
    private readonly ndev: number,
  ) {}

  /** Device memory held now, all devices together (retired IPC buffers included). */
  heldBytes(): number {
    const b = this.#held;
    const retired = this.#retired.reduce((n, r) => n + r.slots * r.slotBytes * this.ndev, 0);
    return (b ? (b.slots + b.staging) * b.slotBytes * this.ndev : 0) + retired;
  }

  /** The same, per device: what a new plan may count as free. */
  heldPerDevice(): number {
    return this.heldBytes() / this.ndev;
  }

  /**
   * Buffers of these sizes: the ones held (or retired) when they match, else new ones. When an
   * allocation runs out of device memory, one buffer fewer (staging first, then slots) until one slot
   * is left; each such step is reported through onFallback.
   */
  acquire(slotBytes: number, slots: number, staging: number, onFallback: (why: string) => void): Buffers {
    for (;;) {
      try {
        return this.#allocate(slotBytes, slots, staging);
      } catch (err) {
        const next = err instanceof NativeError && err.code === "CE_E_NOMEM" ? fewerBuffers({ slots, staging }, errorMessage(err)) : undefined;
        if (!next) throw err;
        ({ slots, staging } = next);
        onFallback(next.fallback);
      }
    }
  }

  #allocate(slotBytes: number, slots: number, staging: number): Buffers {
    const have = this.#held;
    if (have && have.slotBytes === slotBytes && have.slots === slots && have.staging === staging) return have;
    this.#retire();
    // The IPC buffers of these sizes may be retired (only the staging changed, or a fallback to fewer
    // buffers landed on the sizes just left): take them back, with the workers' mappings of them.
    const back = this.#retired.findIndex((r) => r.slotBytes === slotBytes && r.slots === slots);
    const kept = back >= 0 ? this.#retired.splice(back, 1)[0] : undefined;
    const ipc: Buf[] = [];
    const stage: Buf[] = [];
    let handles: Uint8Array[] = [];
    try {
      for (let d = 0; d < this.ndev; d++) {
        if (!kept) ipc.push(this.ctx.bufAlloc(d, slots * slotBytes, { ipc: true }));
        if (staging > 0) stage.push(this.ctx.bufAlloc(d, staging * slotBytes, { ipc: false }));
      }
      if (!kept && this.ctx.backend === "cuda") handles = ipc.map((b) => b.ipcHandle());
    } catch (err) {
      for (const b of [...ipc, ...stage]) b.close();
      if (kept) this.#retired.push(kept);
      throw err;
    }
    if (kept) {
      this.#held = { ...kept, staging, stage };
    } else {
      const n = allocations++;
      this.#held = { slotBytes, slots, staging, ipc, stage, handles, ids: ipc.map((_, d) => `${PROCESS_TAG}-${n}-dev${d}`) };
    }
    return this.#held;
  }

  /** The held buffers leave: staging freed now, the IPC buffers kept until no worker maps them. */
  #retire(): void {
    const b = this.#held;
    if (!b) return;
    this.#held = undefined;
    for (const s of b.stage) s.close();
    this.#retired.push({ ...b, staging: 0, stage: [] });
  }

  /** Frees the retired IPC buffers: call once every worker has answered an open naming the held ones. */
  freeRetired(): void {
    for (const r of this.#retired) for (const b of r.ipc) b.close();
    this.#retired = [];
  }

  /** Frees everything: after abort (workers drop their mappings) or when the session closes. */
  free(): void {
    this.freeRetired();
    for (const b of [...(this.#held?.ipc ?? []), ...(this.#held?.stage ?? [])]) b.close();
    this.#held = undefined;
  }
}
