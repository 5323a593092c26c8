// Ctrl-C and SIGTERM during a one-shot command: free what would otherwise outlive the process.
import { logger } from "../base/log";
import { removeSynthetic } from "../checkpoint/synth";
import type { Updater } from "./updater";

const log = logger("setup");

/**
 * Until the returned function is called, Ctrl-C or SIGTERM frees the slot buffers (on the CPU
 * backend, /dev/shm files of GiBs) and synthetic checkpoints synchronously, then exits as the signal
 * would. Once only: a second signal kills at once, should the native teardown hang.
 */
export function cleanupOnSignal(current: () => Updater | undefined): () => void {
  const onSignal = (sig: NodeJS.Signals) => {
    log.warn(`${sig}: stopping, freeing buffers and scratch files`);
    current()?.ctx.close();
    removeSynthetic();
    process.exit(sig === "SIGINT" ? 130 : 143);
  };
  process.once("SIGINT", onSignal);
  process.once("SIGTERM", onSignal);
  return () => {
    process.off("SIGINT", onSignal);
    process.off("SIGTERM", onSignal);
  };
}
