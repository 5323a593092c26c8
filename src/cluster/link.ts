// Requests between hosts over one ZeroMQ socket each: host 0 binds a ROUTER at the master address,
// every other host connects a DEALER named host-<rank>. Either side may ask the other; every message
// is sealed (seal.ts), and one that does not open is dropped without an answer. Each request has a
// deadline; a reply that comes after it is dropped.
import { CeError, TimeoutError, errorMessage } from "../base/errors";
import { logger } from "../base/log";
import { randomBytes } from "node:crypto";
import { type ZmqSocket, defaultContext } from "../transport/zmq";
import type { Sealer } from "./seal";

const log = logger("cluster");

export interface Message {
  body: Record<string, unknown>;
  payload: Uint8Array[];
}

export type Handler = (body: Record<string, unknown>, payload: Uint8Array[], from: number) => Promise<Partial<Message> | void>;

/** A failure a peer reported, in its words. */
export class PeerError extends CeError {}


export class Link {
  readonly #sock: ZmqSocket;
  readonly #router: boolean;
  readonly #handlers = new Map<string, Handler>();
  readonly #waiting = new Map<number, { resolve: (m: Message) => void; reject: (e: unknown) => void }>();
  /**
   * ROUTER: each host's connection, learned from the last message of it whose seal opened. A process
   * without the secret can connect, but never becomes the route to a host.
   */
  readonly #routes = new Map<number, Uint8Array>();
  #next = 1;
  #closed = false;
  /** Called for every message that opened, before it is dispatched (heartbeat bookkeeping). */
  onMessage?: (from: number) => void;

  private constructor(
    sock: ZmqSocket,
    router: boolean,
    readonly rank: number,
    private readonly sealer: Sealer,
  ) {
    this.#sock = sock;
    this.#router = router;
    void this.#loop();
  }

  /** Host 0: binds the master endpoint; returns the endpoint bound (the port when 0 was asked). */
  static listen(endpoint: string, sealer: Sealer): { link: Link; endpoint: string } {
    const sock = defaultContext().socket("ROUTER", { mandatory: true });
    const bound = sock.bind(endpoint);
    return { link: new Link(sock, true, 0, sealer), endpoint: bound };
  }

  /** Host rank > 0: connects to host 0 (the connection completes and recovers in the background). */
  static connect(endpoint: string, rank: number, sealer: Sealer): Link {
    // A new name per process: a restarted host is a new connection, not a takeover of the old one.
    const sock = defaultContext().socket("DEALER", { routingId: `host-${rank}-${randomBytes(6).toString("hex")}` });
    sock.connect(endpoint);
    return new Link(sock, false, rank, sealer);
  }

  on(op: string, handler: Handler): void {
    this.#handlers.set(op, handler);
  }

  /** Asks host `to` (ignored on a DEALER: it only talks to host 0). */
  async request(to: number, op: string, body: Record<string, unknown>, opts: { timeoutMs: number; payload?: Uint8Array[]; signal?: AbortSignal }): Promise<Message> {
    if (opts.signal?.aborted) throw opts.signal.reason;
    const id = this.#next++;
    const frames = this.sealer.seal(this.rank, { op, id, body }, opts.payload);
    const what = `host ${to}: reply to ${op}`;
    const reply = new Promise<Message>((resolve, reject) => this.#waiting.set(id, { resolve, reject }));
    let timer: ReturnType<typeof setTimeout> | undefined;
    const onAbort = () => this.#settle(id, undefined, opts.signal!.reason);
    try {
      await this.#send(to, frames);
      const late = new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new TimeoutError(`${what}: none after ${opts.timeoutMs} ms`)), opts.timeoutMs);
      });
      opts.signal?.addEventListener("abort", onAbort, { once: true });
      return await Promise.race([reply, late]);
    } finally {
      clearTimeout(timer);
      opts.signal?.removeEventListener("abort", onAbort);
      this.#waiting.delete(id);
    }
  }

  #send(to: number, frames: Uint8Array[]): Promise<void> {
    const what = `sending to host ${to}`;
    if (!this.#router) return this.#sock.send(frames, { timeoutMs: 5_000, what });
    const route = this.#routes.get(to);
    if (!route) return Promise.reject(new CeError("E_CLUSTER_HOST_MISSING", `host ${to} has not joined`));
    return this.#sock.send([route, ...frames], { timeoutMs: 5_000, what }).catch((err: unknown) => {
      // ZMQ_ROUTER_MANDATORY: the host's connection is gone (its process ended).
      if (err instanceof CeError && err.code === "ZMQ_EHOSTUNREACH") {
        this.#routes.delete(to);
        throw new CeError("E_CLUSTER_HOST_MISSING", `host ${to} is not connected: its ce serve ended or lost the connection`);
      }
      throw err;
    });
  }

  #settle(id: number, msg: Message | undefined, err?: unknown): void {
    const w = this.#waiting.get(id);
    if (!w) return;
    this.#waiting.delete(id);
    if (msg) w.resolve(msg);
    else w.reject(err);
  }

  async #loop(): Promise<void> {
    while (!this.#closed) {
      let frames: Uint8Array[];
      try {
        frames = await this.#sock.recv({ what: "cluster messages" });
      } catch (err) {
        if (!this.#closed) log.warn(`cluster link: ${errorMessage(err)}`);
        return;
      }
      const opened = this.sealer.open(this.#router ? frames.slice(1) : frames);
      if (!opened) {
        log.warn("dropped a cluster message that is not sealed with this cluster's secret");
        continue;
      }
      const { header, payload } = opened;
      if (this.#router) this.#routes.set(header.from, frames[0]!);
      this.onMessage?.(header.from);
      if (header.reply) {
        const id = header.id as number;
        if (header.ok) this.#settle(id, { body: (header.body ?? {}) as Record<string, unknown>, payload });
        else this.#settle(id, undefined, new PeerError(String(header.code ?? "E_PEER"), String(header.error ?? "the host gave no message")));
        continue;
      }
      void this.#serve(header.op as string, header.id as number, header.from, (header.body ?? {}) as Record<string, unknown>, payload);
    }
  }

  async #serve(op: string, id: number, from: number, body: Record<string, unknown>, payload: Uint8Array[]): Promise<void> {
    const handler = this.#handlers.get(op);
    let reply: Uint8Array[];
    try {
      if (!handler) throw new CeError("E_CLUSTER_OP", `host ${this.rank} does not know op "${op}"`);
      const r = (await handler(body, payload, from)) ?? {};
      reply = this.sealer.seal(this.rank, { reply: true, ok: true, id, body: r.body ?? {} }, r.payload);
    } catch (err) {
      const code = err instanceof CeError ? err.code : "E_INTERNAL";
      reply = this.sealer.seal(this.rank, { reply: true, ok: false, id, code, error: errorMessage(err) });
    }
    if (this.#closed) return;
    await this.#send(from, reply).catch((err) => log.debug(`reply to host ${from}: ${errorMessage(err)}`));
  }

  close(): void {
    this.#closed = true;
    for (const [id] of this.#waiting) this.#settle(id, undefined, new CeError("E_CLUSTER_CLOSED", "the cluster link closed"));
    this.#sock.close();
  }
}
