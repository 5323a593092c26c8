// ce's end of the worker protocol: one REQ socket per device on its own endpoint, each step's frames
// from a dialect, and every reply turned into a result or a WorkerError that names the worker, its
// device and the step. update.ts says which step comes when; this file says how it is asked.
import { TimeoutError, WorkerError, errorMessage } from "../base/errors";
import { type ZmqSocket, defaultContext } from "../transport/zmq";
import type { Dialect, LoadInfo, OpenInfo, Step, StepReply } from "../wire/dialect";
import type { Device } from "./devices";

/** An abort is a courtesy to workers that are still listening: it never holds up the recovery for long. */
const ABORT_REPLY_TIMEOUT_MS = 2_000;

let channelCounter = 0;

export interface ChannelOptions {
  devices: Device[];
  dialect: Dialect;
  /** Deadline for one worker reply. */
  opTimeoutMs: number;
  /** How a device is called in messages: "NVIDIA H200 (GPU-3f2c…)". */
  label: (d: number) => string;
}

export class WorkerChannel {
  readonly #opts: ChannelOptions;
  #sockets: ZmqSocket[] = [];
  #endpoints: Record<string, string> = {};

  constructor(opts: ChannelOptions) {
    this.#opts = opts;
    this.rebind();
  }

  get dialect(): Dialect {
    return this.#opts.dialect;
  }

  /** Device UUID → the endpoint its worker connects to. */
  get endpoints(): Record<string, string> {
    return this.#endpoints;
  }

  /**
   * Fresh sockets on fresh endpoints. After a failure a socket may still wait for a reply that a dead
   * worker never sends; new endpoints also keep a late reply to the old request from being read as
   * an answer to the next one.
   */
  rebind(): void {
    for (const s of this.#sockets) s.close();
    const zmq = defaultContext();
    const n = channelCounter++;
    this.#endpoints = {};
    this.#sockets = this.#opts.devices.map((d) => {
      const sock = zmq.socket("REQ");
      // Linux abstract namespace: no file to clean up, gone with the process.
      this.#endpoints[d.uuid] = sock.bind(`ipc://@ce-${d.uuid}-${process.pid}-${n}`);
      return sock;
    });
  }

  /** Sends one step to the worker of device d and waits for its answer; a refusal is a WorkerError. */
  async ask(d: number, step: Step, frames: Uint8Array[], what: string, signal?: AbortSignal): Promise<StepReply> {
    const label = `worker on ${this.#opts.label(d)}`;
    let replyFrames: Uint8Array[];
    try {
      replyFrames = await this.#sockets[d]!.request(frames, { timeoutMs: this.#opts.opTimeoutMs, what: `${label}: reply to ${what}`, signal });
    } catch (err) {
      // No reply to open usually means no worker ever connected: the engine does not run on that GPU.
      if (step === "open" && err instanceof TimeoutError) {
        throw new TimeoutError(err.message, { hint: "no worker answered for that GPU: does the engine run on it? --devices names the engine's GPUs" });
      }
      throw err;
    }
    let reply: StepReply;
    try {
      reply = this.#opts.dialect.reply(replyFrames, step);
    } catch (err) {
      throw new WorkerError("E_PROTOCOL", `${label} answered ${what} with a malformed reply: ${errorMessage(err)}`);
    }
    if (!reply.ok) throw new WorkerError("E_WORKER", `${label} failed ${what}: ${reply.error ?? "no message"}`);
    return reply;
  }

  open(info: (d: number) => OpenInfo, signal?: AbortSignal): Promise<StepReply[]> {
    return this.#all("open", (d) => this.#opts.dialect.open(info(d)), "open", signal);
  }

  load(d: number, info: LoadInfo, what: string, signal?: AbortSignal): Promise<StepReply> {
    return this.ask(d, "load", this.#opts.dialect.load(info), what, signal);
  }

  /**
   * Ends the update's use of the buffers. keep: ce keeps them allocated for the next update, so a
   * worker of protocol 2 keeps its mapping (and the next open naming the same buffer_id costs no
   * handle re-open); without it every worker drops its mapping, as in protocol 1.
   */
  release(signal?: AbortSignal, opts: { keep?: boolean } = {}): Promise<StepReply[]> {
    return this.#all("release", () => this.#opts.dialect.release(opts.keep ?? false), "release", signal);
  }

  finish(signal?: AbortSignal): Promise<StepReply[]> {
    return this.#all("finish", () => this.#opts.dialect.finish(), "finish", signal);
  }

  /** Tells every worker to drop its mapping (a kept one too) and keep serving; never throws, never waits long. */
  async abort(reason: string): Promise<void> {
    const frames = this.#opts.dialect.abort(reason);
    // A worker that never answers abort (the reference system's raises it) is only told.
    const answers = this.#opts.dialect.replies?.("abort") ?? true;
    const opts = { timeoutMs: ABORT_REPLY_TIMEOUT_MS, what: "reply to abort" };
    await Promise.all(this.#sockets.map((sock) => (answers ? sock.request(frames, opts) : sock.send(frames, opts)).catch(() => undefined)));
  }

  #all(step: Step, frames: (d: number) => Uint8Array[], what: string, signal?: AbortSignal): Promise<StepReply[]> {
    return Promise.all(this.#opts.devices.map((_, d) => this.ask(d, step, frames(d), what, signal)));
  }

  close(): void {
    for (const s of this.#sockets) s.close();
    this.#sockets = [];
  }
}
