// The communicator of the broadcast path: one per context, spanning this host's devices (one host)
// or every device of every host (a cluster, id from host 0). Kept while updates succeed; a failed
// update may leave a peer mid-collective, so its communicator is aborted and the next update makes
// a new one. On the CPU backend one host needs none: libce fans out inside the process.
import type { Ctx } from "../native/ce";
import { ncclLoad } from "../native/ce";

/** A communicator across hosts: the id host 0 made, the ranks, and a key that names this one. */
export interface CommSpec {
  id: Uint8Array;
  nranks: number;
  firstRank: number;
  /** Host 0 changes it whenever a new communicator is needed (a host rejoined, a failure). */
  key: string;
}

export class Communicators {
  #key: string | undefined;

  constructor(
    private readonly ctx: Ctx,
    private readonly ndev: number,
  ) {}

  /** Whether a communicator is up (this context's, not yet aborted). */
  get ready(): boolean {
    return this.#key !== undefined && this.ctx.commInfo().state === "ready";
  }

  /** This host alone: on CUDA the local GPUs' communicator, made once. */
  async ensureLocal(timeoutMs: number, signal?: AbortSignal): Promise<void> {
    if (this.ctx.backend !== "cuda") return;
    if (this.ready && this.#key === "local") return;
    ncclLoad();
    await this.#create({ id: this.ctx.commUniqueId(), nranks: this.ndev, firstRank: 0, key: "local" }, timeoutMs, signal);
  }

  /** A cluster's communicator: joined unless the one up has the same key. */
  async join(spec: CommSpec, timeoutMs: number, signal?: AbortSignal): Promise<void> {
    if (this.ready && this.#key === spec.key) return;
    if (this.ctx.backend === "cuda") ncclLoad();
    await this.#create(spec, timeoutMs, signal);
  }

  async #create(spec: CommSpec, timeoutMs: number, signal?: AbortSignal): Promise<void> {
    this.abort();
    // commCreate never leaves an init behind: on its deadline it aborts and collects it.
    await this.ctx.commCreate(spec.id, spec.nranks, spec.firstRank, { timeoutMs, signal });
    this.#key = spec.key;
  }

  /** Aborts the communicator (a stuck broadcast then ends); the next update makes a new one. */
  abort(): void {
    const state = this.ctx.commInfo().state;
    if (state === "ready" || state === "pending") this.ctx.commAbort();
    this.#key = undefined;
  }
}
