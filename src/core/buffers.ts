// The device memory an update moves through: on every device one IPC buffer of `slots` slots (what
// the worker maps) and, on the broadcast path, `staging` bucket-sized buffers that owners H2D into.
// Kept between updates while the sizes stay the same, so a warm update allocates nothing.
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
}

export class SlotBuffers {
  #held: Buffers | undefined;

  constructor(
    private readonly ctx: Ctx,
    private readonly ndev: number,
  ) {}

  /** Device memory held now, all devices together. */
  heldBytes(): number {
    const b = this.#held;
    return b ? (b.slots + b.staging) * b.slotBytes * this.ndev : 0;
  }

  /** The same, per device: what a new plan may count as free. */
  heldPerDevice(): number {
    return this.heldBytes() / this.ndev;
  }

  /**
   * Buffers of these sizes: the ones held when they match, else new ones. When an allocation runs out
   * of device memory, one buffer fewer (staging first, then slots) until one slot is left; each such
   * step is reported through onFallback.
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
    this.free();
    const ipc: Buf[] = [];
    const stage: Buf[] = [];
    try {
      for (let d = 0; d < this.ndev; d++) {
        ipc.push(this.ctx.bufAlloc(d, slots * slotBytes, { ipc: true }));
        if (staging > 0) stage.push(this.ctx.bufAlloc(d, staging * slotBytes, { ipc: false }));
      }
      const handles = this.ctx.backend === "cuda" ? ipc.map((b) => b.ipcHandle()) : [];
      this.#held = { slotBytes, slots, staging, ipc, stage, handles };
      return this.#held;
    } catch (err) {
      for (const b of [...ipc, ...stage]) b.close();
      throw err;
    }
  }

  free(): void {
    for (const b of [...(this.#held?.ipc ?? []), ...(this.#held?.stage ?? [])]) b.close();
    this.#held = undefined;
  }
}
