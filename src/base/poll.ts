// The one poll loop. Native progress (a ZeroMQ socket turning readable, a GPU op finishing) is
// found by non-blocking checks, and every pending check in the process runs from this one
// scheduler, so waiting never blocks the JS event loop and a thousand waits cost one timer.
//
// Pace: right after any check made progress (and when a wait starts), ticks run back to back
// through setImmediate for FAST_WINDOW_MS, so a reply that lands microseconds after a request is
// seen microseconds later; after that a tick every IDLE_DELAY_MS through setTimeout, so an idle
// wait costs a few percent of one core. With nothing pending, no timer is armed.
import { AbortedError, TimeoutError } from "./errors";

export interface PollOptions {
  /** Deadline, from the call; Infinity waits until the check succeeds or the signal aborts. */
  timeoutMs: number;
  /** What is awaited, for the TimeoutError: "reply to load (bucket 3/48) from ipc://@ce-…". */
  what: string;
  signal?: AbortSignal;
}

/**
 * Back-to-back ticks after progress. A local round trip takes tens of µs, well inside. It must also
 * outlast two idle ticks (~2.2 ms): when both ends of a socket pair run this loop (tests, ce ⇄ ce),
 * a shorter window let each side miss the other's window and settle at ~2 ms per round trip
 * (measured with 1 ms: median 2.1 ms; with 2 ms: 59 µs).
 */
const FAST_WINDOW_MS = 2;
/** Bun 1.4 runs any setTimeout under 1 ms after about 1.1 ms (measured), costing ~3% of a core. */
const IDLE_DELAY_MS = 1;

interface Waiter {
  check: () => unknown;
  resolve: (value: never) => void;
  reject: (err: unknown) => void;
  what: string;
  startedMs: number;
  deadlineMs: number;
  signal?: AbortSignal;
  onAbort?: () => void;
}

// A Set keeps insertion order: checks run first come, first served.
const waiters = new Set<Waiter>();
let fastUntilMs = 0;
let timer: ReturnType<typeof setTimeout> | undefined;
let immediate: ReturnType<typeof setImmediate> | undefined;

/**
 * Resolves with the first value other than undefined that check returns. check runs on the
 * scheduler's ticks (never synchronously inside this call), together with every other pending
 * check. A check that throws rejects with that error; a passed deadline rejects with a
 * TimeoutError naming `what` and the time waited; an aborted signal rejects with an AbortedError.
 */
export function pollUntil<T>(check: () => T | undefined, opts: PollOptions): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    const { signal, what } = opts;
    if (signal?.aborted) {
      reject(abortedError(what, signal));
      return;
    }
    const now = performance.now();
    const waiter: Waiter = {
      check,
      resolve: resolve as (value: never) => void,
      reject,
      what,
      startedMs: now,
      deadlineMs: now + opts.timeoutMs,
    };
    if (signal) {
      waiter.signal = signal;
      waiter.onAbort = () => {
        settle(waiter);
        reject(abortedError(what, signal));
      };
      signal.addEventListener("abort", waiter.onAbort, { once: true });
    }
    waiters.add(waiter);
    fastUntilMs = now + FAST_WINDOW_MS;
    arm();
  });
}

function tick(): void {
  timer = undefined;
  immediate = undefined;
  let progressed = false;
  for (const waiter of waiters) {
    let result: unknown;
    try {
      result = waiter.check();
    } catch (err) {
      settle(waiter);
      waiter.reject(err);
      progressed = true;
      continue;
    }
    if (result !== undefined) {
      settle(waiter);
      waiter.resolve(result as never);
      progressed = true;
      continue;
    }
    const now = performance.now();
    if (now >= waiter.deadlineMs) {
      settle(waiter);
      const waited = Math.round(now - waiter.startedMs);
      waiter.reject(new TimeoutError(`${waiter.what} timed out after ${waited} ms`));
    }
  }
  if (progressed) fastUntilMs = performance.now() + FAST_WINDOW_MS;
  arm();
}

function arm(): void {
  if (waiters.size === 0 || immediate !== undefined) return;
  if (performance.now() < fastUntilMs) {
    // A wait that starts while the loop idles must not sit out the idle timer.
    if (timer !== undefined) clearTimeout(timer);
    timer = undefined;
    immediate = setImmediate(tick);
  } else if (timer === undefined) {
    timer = setTimeout(tick, IDLE_DELAY_MS);
  }
}

/** Removes a finished waiter; the last one out disarms the timer so the process can exit. */
function settle(waiter: Waiter): void {
  waiters.delete(waiter);
  if (waiter.onAbort) waiter.signal!.removeEventListener("abort", waiter.onAbort);
  if (waiters.size > 0) return;
  if (timer !== undefined) clearTimeout(timer);
  if (immediate !== undefined) clearImmediate(immediate);
  timer = undefined;
  immediate = undefined;
}

function abortedError(what: string, signal: AbortSignal): AbortedError {
  const reason: unknown = signal.reason;
  const text = reason instanceof Error ? reason.message : reason === undefined ? "" : String(reason);
  return new AbortedError(text ? `${what} aborted: ${text}` : `${what} aborted`, { cause: reason });
}
