// Waiting on an engine's failure and on an abort signal without keeping finished updates alive.
/**
 * Forwards an engine's failure to the update running now. engine.failure never settles while the
 * engine is healthy, so a handler attached per update would keep every finished update's state
 * alive: one handler per failure promise forwards to whichever update follows it.
 */
export class EngineWatch {
  #failure: Promise<never> | undefined;
  #failed = false;
  #error: unknown;
  #listener: ((err: unknown) => void) | undefined;

  /** Calls onFailure when failure rejects (at once if it has), until the returned function is called. */
  follow(failure: Promise<never>, onFailure: (err: unknown) => void): () => void {
    if (failure !== this.#failure) {
      this.#failure = failure;
      this.#failed = false;
      listen(this, failure);
    }
    this.#listener = onFailure;
    if (this.#failed) onFailure(this.#error);
    return () => {
      if (this.#listener === onFailure) this.#listener = undefined;
    };
  }

  /** @internal */ settle(failure: Promise<never>, err: unknown): void {
    if (failure !== this.#failure) return;
    this.#failed = true;
    this.#error = err;
    this.#listener?.(err);
  }
}

/** A module-level function, so the handler holds the watch and the promise and nothing else. */
function listen(watch: EngineWatch, failure: Promise<never>): void {
  failure.catch((err: unknown) => watch.settle(failure, err));
}

/** Rejects with the signal's reason once it aborts. */
export function aborted(signal: AbortSignal): Promise<never> {
  return new Promise<never>((_, reject) => {
    if (signal.aborted) reject(signal.reason);
    else signal.addEventListener("abort", () => reject(signal.reason), { once: true });
  });
}
