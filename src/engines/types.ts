// What update.ts needs from an inference engine: a way to make its workers connect to ce's
// endpoints for one update, and word when that fails.

export interface Engine {
  /** "vllm http://host:8000", "2 ref workers" — for logs and errors. */
  readonly description: string;
  /**
   * Starts one update on the engine side: every worker connects to the endpoint of its GPU
   * (device UUID → ZeroMQ endpoint). Resolves when the engine's call returns; rejects when the
   * engine reports a failure. Engines whose workers run on their own return at once.
   */
  trigger(endpoints: Record<string, string>, timeoutMs: number): Promise<void>;
  /** Rejects (never resolves) when a worker dies; update.ts races its waits against it. */
  readonly failure: Promise<never>;
  /** Called after a failed update, with fresh endpoints: workers that lost their state start over. */
  reset(endpoints: Record<string, string>): Promise<void>;
  close(): Promise<void>;
}
