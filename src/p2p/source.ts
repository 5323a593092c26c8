// A host's side of P2P updates as a source: one transfer endpoint, and each registered checkpoint's
// regions registered with it for remote reads once, at the first pull that asks (not per update).
// A pull leases the checkpoint until it ends (or its lease runs out): unregistering it meanwhile is
// refused, since a reader would be reading memory that is gone. Releasing a checkpoint withdraws its
// registrations first.
import { CeError } from "../base/errors";
import type { Ctx } from "../native/ce";
import { Xfer, type XferEngine } from "../native/xfer";
import { config } from "../base/config";
import type { Registration } from "../checkpoint/registry";
import type { Offer } from "./layout";

/** CE_P2P_ENGINE: every host must use the same (addresses name their engine, and another is refused). */
function p2pEngine(): XferEngine {
  const e = config.CE_P2P_ENGINE;
  if (e !== "ucx" && e !== "mooncake") throw new CeError("E_CONFIG", `CE_P2P_ENGINE "${e}" is not a transfer engine`, { hint: "use ucx or mooncake" });
  return e;
}

interface Lent {
  ids: number[];
  rkeys: string[];
}

export class Lender {
  #xfer: Xfer | undefined;
  readonly #lent = new Map<Registration, Lent>();
  /** update id → the registration it reads and when its lease ends */
  readonly #leases = new Map<string, { reg: Registration; timer: ReturnType<typeof setTimeout> }>();

  constructor(private readonly ctx: Ctx) {}

  /** The host's transfer endpoint, made at first use (a host that never pulls or lends loads no engine). */
  endpoint(): Xfer {
    this.#xfer ??= Xfer.create(this.ctx, p2pEngine());
    return this.#xfer;
  }

  /** What host `host` offers of reg to the pull `updateId`, lent to it for leaseMs. */
  offer(host: number, reg: Registration, lease: { updateId: string; leaseMs: number }, digests?: Map<string, string>): Offer {
    const x = this.endpoint();
    let lent = this.#lent.get(reg);
    if (!lent) {
      const regs = reg.files.map((f) => x.registerRegion(f.region));
      lent = { ids: regs.map((r) => r.id), rkeys: regs.map((r) => Buffer.from(r.rkey).toString("hex")) };
      this.#lent.set(reg, lent);
    }
    const timer = setTimeout(() => this.endLease(lease.updateId), lease.leaseMs);
    timer.unref();
    this.endLease(lease.updateId);
    this.#leases.set(lease.updateId, { reg, timer });
    const regionOf = new Map(reg.files.map((f, i) => [f.path, i]));
    return {
      host,
      version: reg.version,
      address: Buffer.from(x.address()).toString("hex"),
      files: reg.files.map((f, i) => ({
        path: f.path,
        rkey: lent.rkeys[i]!,
        tensors: reg.ckpt.tensors
          .filter((t) => regionOf.get(t.file) === i)
          .map((t) => ({ name: t.name, dtype: t.dtype, shape: t.shape, nbytes: t.nbytes, offset: t.fileOffset })),
      })),
      ...(digests ? { digests: Object.fromEntries(digests) } : {}),
    };
  }

  endLease(updateId: string): void {
    const l = this.#leases.get(updateId);
    if (!l) return;
    clearTimeout(l.timer);
    this.#leases.delete(updateId);
  }

  /** Deregisters reg's regions (before they are released); refused while a pull holds a lease on it. */
  withdraw(reg: Registration): void {
    if ([...this.#leases.values()].some((l) => l.reg === reg)) {
      throw new CeError("E_BUSY", `checkpoint "${reg.name}" is being pulled by another host`, { hint: "retry when its pull has ended" });
    }
    const lent = this.#lent.get(reg);
    if (!lent) return;
    for (const id of lent.ids) this.#xfer!.deregister(id);
    this.#lent.delete(reg);
  }

  /** Closes the endpoint: its peers, reads and registrations go with it. */
  close(): void {
    for (const l of this.#leases.values()) clearTimeout(l.timer);
    this.#leases.clear();
    this.#lent.clear();
    this.#xfer?.close();
    this.#xfer = undefined;
  }
}
