// Typed async ZeroMQ sockets over native/zmq.ts. Everything runs on the JS thread (libzmq sockets
// are not thread-safe): sends and receives are tried with ZMQ_DONTWAIT, and when a socket is not
// ready the wait goes to poll.ts, where one zmq_poll per tick covers every socket that waits.
import { AbortedError, CeError } from "../base/errors";
import * as native from "../native/zmq";
import type { SocketHandle, ContextHandle } from "../native/zmq";
import { pollUntil } from "../base/poll";

export type SocketType = "PAIR" | "PUB" | "SUB" | "REQ" | "REP" | "DEALER" | "ROUTER" | "PULL" | "PUSH";

const SOCKET_TYPES: Record<SocketType, number> = {
  PAIR: native.ZMQ_PAIR,
  PUB: native.ZMQ_PUB,
  SUB: native.ZMQ_SUB,
  REQ: native.ZMQ_REQ,
  REP: native.ZMQ_REP,
  DEALER: native.ZMQ_DEALER,
  ROUTER: native.ZMQ_ROUTER,
  PULL: native.ZMQ_PULL,
  PUSH: native.ZMQ_PUSH,
};

export interface SocketOptions {
  /** How long close() may keep unsent messages: 0 (the default) drops them, so a dead peer never holds up close. */
  lingerMs?: number;
  /** High-water marks in messages (libzmq's default: 1000). */
  sndhwm?: number;
  rcvhwm?: number;
  /** Queue messages only to completed connections (ZMQ_IMMEDIATE): with no peer, send waits instead. */
  immediate?: boolean;
  /**
   * REQ only, both true by default: a REQ may send a new request before the previous reply came
   * (ZMQ_REQ_RELAXED), and a late reply to an earlier request is dropped (ZMQ_REQ_CORRELATE). The
   * update sends `abort` after a worker timed out this way, instead of finding the socket stuck.
   */
  relaxed?: boolean;
  correlate?: boolean;
  /** ZMQ_ROUTING_ID, how a ROUTER peer addresses this socket. */
  routingId?: string | Uint8Array;
  /** Largest message accepted (ZMQ_MAXMSGSIZE); -1, the default, takes any. */
  maxMessageBytes?: number;
  /** ROUTER only: a send to an unknown routing id fails (EHOSTUNREACH) instead of vanishing (ZMQ_ROUTER_MANDATORY). */
  mandatory?: boolean;
}

export interface WaitOptions {
  /** Deadline in ms from the call; without one the wait ends only on success, signal, or close(). */
  timeoutMs?: number;
  /** Names the wait in a TimeoutError: "reply to load from GPU 2". Default: "recv on REQ ipc://@…". */
  what?: string;
  signal?: AbortSignal;
}

export type Frame = string | Uint8Array;

// ---------------------------------------------------------------------------------------------

/** A libzmq context: its I/O thread and the sockets made from it. */
export class ZmqContext {
  #handle: ContextHandle | undefined;
  readonly #sockets = new Set<ZmqSocket>();

  constructor(opts: { ioThreads?: number } = {}) {
    this.#handle = native.ctxNew(opts.ioThreads ?? 1);
  }

  socket(type: SocketType, options: SocketOptions = {}): ZmqSocket {
    if (this.#handle === undefined) throw new CeError("E_ZMQ_CLOSED", `cannot open a ${type} socket: the ZeroMQ context is closed`);
    const socket = new ZmqSocket(this.#handle, type, options, () => this.#sockets.delete(socket));
    this.#sockets.add(socket);
    return socket;
  }

  /** Closes every socket made from this context (dropping unsent messages), then the context. */
  close(): void {
    if (this.#handle === undefined) return;
    for (const socket of [...this.#sockets]) socket.close();
    const handle = this.#handle;
    this.#handle = undefined;
    native.ctxTerm(handle);
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

let shared: ZmqContext | undefined;

/** The process's context, made on first use and never closed (the process exit ends it). */
export function defaultContext(): ZmqContext {
  shared ??= new ZmqContext();
  return shared;
}

// ---------------------------------------------------------------------------------------------

/**
 * Which waiting sockets are ready. The first check of a tick polls every socket with a pending
 * send or recv in one zmq_poll; the other checks of that tick read its result. The result is
 * dropped in a microtask, that is as soon as the tick's synchronous run of checks ends.
 */
class Readiness {
  readonly #wanted = new Map<SocketHandle, { in: number; out: number }>();
  #ready: Map<SocketHandle, number> | undefined;
  readonly #sockets: SocketHandle[] = [];
  readonly #events: number[] = [];
  readonly #revents: number[] = [];

  want(socket: SocketHandle, event: number): void {
    let w = this.#wanted.get(socket);
    if (!w) this.#wanted.set(socket, (w = { in: 0, out: 0 }));
    if (event === native.ZMQ_POLLIN) w.in++;
    else w.out++;
  }

  unwant(socket: SocketHandle, event: number): void {
    const w = this.#wanted.get(socket);
    if (!w) return;
    if (event === native.ZMQ_POLLIN) w.in--;
    else w.out--;
    if (w.in <= 0 && w.out <= 0) this.#wanted.delete(socket);
  }

  /** Before zmq_close: a closed handle must never reach zmq_poll. */
  forget(socket: SocketHandle): void {
    this.#wanted.delete(socket);
    this.#ready?.delete(socket);
  }

  isReady(socket: SocketHandle, event: number): boolean {
    let revents = this.#ready?.get(socket);
    if (revents === undefined) {
      this.#pollAll();
      revents = this.#ready!.get(socket) ?? 0;
    }
    return (revents & (event | native.ZMQ_POLLERR)) !== 0;
  }

  #pollAll(): void {
    const sockets = this.#sockets;
    const events = this.#events;
    sockets.length = 0;
    events.length = 0;
    for (const [socket, w] of this.#wanted) {
      sockets.push(socket);
      events.push((w.in > 0 ? native.ZMQ_POLLIN : 0) | (w.out > 0 ? native.ZMQ_POLLOUT : 0));
    }
    native.pollSockets(sockets, events, this.#revents);
    const ready = new Map<SocketHandle, number>();
    for (let i = 0; i < sockets.length; i++) ready.set(sockets[i]!, this.#revents[i]!);
    if (this.#ready === undefined) queueMicrotask(() => (this.#ready = undefined));
    this.#ready = ready;
  }
}

const readiness = new Readiness();

const utf8 = new TextEncoder();

function frameBytes(frame: Frame): Uint8Array {
  return typeof frame === "string" ? utf8.encode(frame) : frame;
}

/**
 * One socket. send and recv return promises and never block the event loop; sends on one socket
 * go out in call order, whole messages at a time; concurrent recvs are served in call order.
 */
export class ZmqSocket {
  readonly type: SocketType;
  #handle: SocketHandle | undefined;
  #endpoint = "(unbound)";
  #sendTail: Promise<void> | undefined;
  #recvWaiting = 0;
  readonly #onClose: () => void;

  /** Use ZmqContext.socket(). */
  constructor(ctx: ContextHandle, type: SocketType, options: SocketOptions, onClose: () => void) {
    this.type = type;
    this.#onClose = onClose;
    const handle = native.socketNew(ctx, SOCKET_TYPES[type], `zmq_socket(${type})`);
    this.#handle = handle;
    try {
      this.#setInt(native.ZMQ_LINGER, "ZMQ_LINGER", options.lingerMs ?? 0);
      if (options.sndhwm !== undefined) this.#setInt(native.ZMQ_SNDHWM, "ZMQ_SNDHWM", options.sndhwm);
      if (options.rcvhwm !== undefined) this.#setInt(native.ZMQ_RCVHWM, "ZMQ_RCVHWM", options.rcvhwm);
      if (options.immediate !== undefined) this.#setInt(native.ZMQ_IMMEDIATE, "ZMQ_IMMEDIATE", options.immediate ? 1 : 0);
      if (type === "REQ") {
        this.#setInt(native.ZMQ_REQ_RELAXED, "ZMQ_REQ_RELAXED", options.relaxed === false ? 0 : 1);
        this.#setInt(native.ZMQ_REQ_CORRELATE, "ZMQ_REQ_CORRELATE", options.correlate === false ? 0 : 1);
      }
      if (type === "ROUTER" && options.mandatory) this.#setInt(native.ZMQ_ROUTER_MANDATORY, "ZMQ_ROUTER_MANDATORY", 1);
      if (options.routingId !== undefined) {
        native.setBytesOption(handle, native.ZMQ_ROUTING_ID, frameBytes(options.routingId), `zmq_setsockopt(${type}, ZMQ_ROUTING_ID)`);
      }
      if (options.maxMessageBytes !== undefined) {
        native.setInt64Option(handle, native.ZMQ_MAXMSGSIZE, options.maxMessageBytes, `zmq_setsockopt(${type}, ZMQ_MAXMSGSIZE, ${options.maxMessageBytes})`);
      }
    } catch (err) {
      this.close();
      throw err;
    }
  }

  /** The endpoint last bound or connected, as messages name this socket. */
  get endpoint(): string {
    return this.#endpoint;
  }

  get closed(): boolean {
    return this.#handle === undefined;
  }

  /** Binds and returns the endpoint actually bound (ZMQ_LAST_ENDPOINT): `tcp://127.0.0.1:*` → `tcp://127.0.0.1:41235`. */
  bind(endpoint: string): string {
    const handle = this.#open(`bind ${endpoint}`);
    native.bind(handle, endpoint, `zmq_bind(${endpoint})`);
    this.#endpoint = native.getStringOption(handle, native.ZMQ_LAST_ENDPOINT, `zmq_getsockopt(ZMQ_LAST_ENDPOINT) after binding ${endpoint}`);
    return this.#endpoint;
  }

  /** Connects; returns at once, the connection completes (and re-connects) in the background. */
  connect(endpoint: string): void {
    const handle = this.#open(`connect ${endpoint}`);
    native.connect(handle, endpoint, `zmq_connect(${endpoint})`);
    this.#endpoint = endpoint;
  }

  unbind(endpoint: string): void {
    native.unbind(this.#open(`unbind ${endpoint}`), endpoint, `zmq_unbind(${endpoint})`);
  }

  disconnect(endpoint: string): void {
    native.disconnect(this.#open(`disconnect ${endpoint}`), endpoint, `zmq_disconnect(${endpoint})`);
  }

  /** SUB only: receive messages whose first frame starts with prefix ("" for all). */
  subscribe(prefix: Frame = ""): void {
    native.setBytesOption(this.#open("subscribe"), native.ZMQ_SUBSCRIBE, frameBytes(prefix), `zmq_setsockopt(${this.type}, ZMQ_SUBSCRIBE)`);
  }

  /**
   * Sends one message of frames.length frames (strings as UTF-8). Resolves once libzmq has queued
   * it (the bytes are copied; the caller may reuse its buffers at once), not when the peer has it.
   */
  send(frames: readonly Frame[], opts: WaitOptions = {}): Promise<void> {
    const what = opts.what ?? `send on ${this.type} ${this.#endpoint}`;
    if (frames.length === 0) return Promise.reject(new CeError("E_ZMQ_EMPTY", `${what}: a message needs at least one frame`));
    const bytes = frames.map(frameBytes);
    const startedMs = performance.now();
    const run = () => this.#sendMessage(bytes, what, startedMs, opts);
    const prev = this.#sendTail;
    const sent = prev ? prev.then(run) : run();
    const tail = sent.then(noop, noop);
    this.#sendTail = tail;
    void tail.then(() => {
      if (this.#sendTail === tail) this.#sendTail = undefined;
    });
    return sent;
  }

  /** Receives all frames of the next message, each copied into its own Uint8Array. */
  recv(opts: WaitOptions = {}): Promise<Uint8Array[]> {
    const what = opts.what ?? `recv on ${this.type} ${this.#endpoint}`;
    const frames: Uint8Array[] = [];
    const step = (): Uint8Array[] | undefined => {
      const handle = this.#handle;
      if (handle === undefined) throw closedError(what);
      // libzmq delivers a message's frames together: once the first is here, so are the rest.
      for (;;) {
        const frame = native.recvFrame(handle, `zmq_msg_recv(${this.type} ${this.#endpoint})`);
        if (frame === undefined) return undefined;
        frames.push(frame.bytes);
        if (!frame.more) return frames;
      }
    };
    try {
      // A recv that finds its message at once returns without a tick, unless earlier recvs wait.
      if (this.#recvWaiting === 0 && !opts.signal?.aborted) {
        const now = step();
        if (now) return Promise.resolve(now);
      }
    } catch (err) {
      return Promise.reject(err);
    }
    return this.#wait(native.ZMQ_POLLIN, step, what, performance.now(), opts);
  }

  /** REQ: sends a request and receives its reply under one deadline. */
  async request(frames: readonly Frame[], opts: WaitOptions = {}): Promise<Uint8Array[]> {
    const startedMs = performance.now();
    await this.send(frames, opts);
    const timeoutMs = opts.timeoutMs === undefined ? undefined : Math.max(0, opts.timeoutMs - (performance.now() - startedMs));
    return this.recv({ ...opts, timeoutMs });
  }

  /**
   * Closes at once, idempotent. With linger 0 (the default) unsent messages are dropped, even one
   * whose send() already resolved: a last reply that must leave needs lingerMs and then
   * ZmqContext.close(), which waits for it. Pending sends and recvs reject with AbortedError on
   * the next tick.
   */
  close(): void {
    const handle = this.#handle;
    if (handle === undefined) return;
    this.#handle = undefined;
    readiness.forget(handle);
    this.#onClose();
    native.socketClose(handle);
  }

  [Symbol.dispose](): void {
    this.close();
  }

  #sendMessage(bytes: Uint8Array[], what: string, startedMs: number, opts: WaitOptions): Promise<void> {
    let next = 0;
    const step = (): true | undefined => {
      const handle = this.#handle;
      if (handle === undefined) throw closedError(what);
      // Only the first frame can meet a full queue: libzmq counts the high-water mark in whole
      // messages, so once a message has begun, its other frames are taken.
      while (next < bytes.length) {
        const more = next < bytes.length - 1;
        if (!native.sendFrame(handle, bytes[next]!, more, `zmq_send(${this.type} ${this.#endpoint})`)) return undefined;
        next++;
      }
      return true;
    };
    try {
      if (!opts.signal?.aborted && step()) return Promise.resolve();
    } catch (err) {
      return Promise.reject(err);
    }
    return this.#wait(native.ZMQ_POLLOUT, step, what, startedMs, opts).then(noop);
  }

  async #wait<T>(event: number, step: () => T | undefined, what: string, startedMs: number, opts: WaitOptions): Promise<T> {
    const handle = this.#open(what);
    const timeoutMs = opts.timeoutMs === undefined ? Infinity : opts.timeoutMs - (performance.now() - startedMs);
    const isRecv = event === native.ZMQ_POLLIN;
    readiness.want(handle, event);
    if (isRecv) this.#recvWaiting++;
    try {
      return await pollUntil(
        () => {
          if (this.#handle === undefined) throw closedError(what);
          return readiness.isReady(handle, event) ? step() : undefined;
        },
        { timeoutMs, what, signal: opts.signal },
      );
    } finally {
      readiness.unwant(handle, event);
      if (isRecv) this.#recvWaiting--;
    }
  }

  #open(what: string): SocketHandle {
    if (this.#handle === undefined) throw closedError(what);
    return this.#handle;
  }

  #setInt(option: number, name: string, value: number): void {
    native.setIntOption(this.#open(name), option, value, `zmq_setsockopt(${this.type}, ${name}, ${value})`);
  }
}

function noop(): void {}

function closedError(what: string): AbortedError {
  return new AbortedError(`${what}: socket closed`);
}
