// The NCCL communicators of the broadcast path: one per local GPU, created in one group on first use
// and kept while updates succeed. A failed update may leave a peer mid-collective, so its
// communicators are aborted and the next update makes new ones.
import type { Ctx } from "../native/ce";
import { ncclLoad, ncclUniqueId } from "../native/ce";

export class Communicators {
  #ready = false;

  constructor(
    private readonly ctx: Ctx,
    private readonly ndev: number,
  ) {}

  get ready(): boolean {
    return this.#ready;
  }

  /** Creates the communicators unless they exist; an init that fails or passes the deadline is aborted. */
  async ensure(timeoutMs: number, signal?: AbortSignal): Promise<void> {
    // The CPU backend fans out inside the process: nothing to create.
    if (this.#ready || this.ctx.backend !== "cuda") return;
    ncclLoad();
    const op = this.ctx.ncclInit(ncclUniqueId(), this.ndev, 0);
    try {
      await this.ctx.wait(op, { timeoutMs, what: "creating NCCL communicators", signal });
    } catch (err) {
      this.ctx.ncclAbort();
      throw err;
    }
    this.#ready = true;
  }

  /** Aborts the communicators (a stuck broadcast then ends); the next ensure() makes new ones. */
  abort(): void {
    if (!this.#ready) return;
    this.ctx.ncclAbort();
    this.#ready = false;
  }
}
