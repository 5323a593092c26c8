// Which of the transfer engines' libraries load here: the tests that need one skip, naming why.
import { config } from "../../src/base/config";
import { probeLibrary } from "../../src/native/libce";

export interface Probe {
  ok: boolean;
  /** the file that loaded, or why none did */
  reason: string;
}

function probe(file: string): Probe {
  try {
    return { ok: true, reason: probeLibrary(file) };
  } catch (err) {
    return { ok: false, reason: `skipped: ${err instanceof Error ? err.message : String(err)}` };
  }
}

/** UCX's libucp (Debian's libucx0; .ci/run installs it). */
export const ucx = probe("libucp.so.0");
/** Mooncake's transfer engine, where CE_MOONCAKE_LIB names a build of it. */
export const mooncake = probe(config.CE_MOONCAKE_LIB);
/** The environment of a process whose P2P goes over Mooncake's TCP on loopback. */
export const MOONCAKE_ENV = { CE_P2P_ENGINE: "mooncake", CE_MOONCAKE_HOST: "127.0.0.1", MC_LOG_LEVEL: "ERROR" };
