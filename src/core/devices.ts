// Which devices an update runs on: the backend (cuda or cpu), the local device list, and what
// each device is called on the wire (its UUID) and has free.
import { freemem, hostname } from "node:os";
import { config } from "../base/config";
import { InputError } from "../base/errors";
import { freeBytesIn } from "../base/fsinfo";
import { cudaDeviceCount, cudaDeviceInfo, cudaLoad } from "../native/ce";
import type { Backend } from "../base/backend";

export interface Device {
  /** index in the context (0..n-1) */
  index: number;
  /** CUDA ordinal, or the simulated CPU device number */
  ordinal: number;
  uuid: string;
  name: string;
  freeBytes: number;
}

export interface DeviceSet {
  backend: Backend;
  devices: Device[];
}

/** Simulated CPU devices when none are named: enough to show the fan-out. */
export const DEFAULT_CPU_DEVICES = 2;

/** Which devices: the first `count`, these ordinals, or (undefined) every GPU / DEFAULT_CPU_DEVICES. */
export type DeviceSelection = { count: number } | { ordinals: number[] } | undefined;

export type BackendChoice = Backend | "auto";

function selectOrdinals(select: DeviceSelection, available: number | undefined): number[] {
  const all = (n: number) => Array.from({ length: n }, (_, i) => i);
  if (select === undefined) return all(available ?? DEFAULT_CPU_DEVICES);
  if ("count" in select) {
    if (available !== undefined && select.count > available) {
      throw new InputError("E_DEVICES", `${select.count} GPUs asked for, but this host has ${available}`);
    }
    return all(select.count);
  }
  const bad = available === undefined ? undefined : select.ordinals.find((o) => o >= available);
  if (bad !== undefined) throw new InputError("E_DEVICES", `GPU ${bad} does not exist (this host has ${available})`);
  return select.ordinals;
}

/** Whether a CUDA driver with at least one GPU is here; never throws. */
export function gpuPresent(): boolean {
  try {
    cudaLoad();
    return cudaDeviceCount() > 0;
  } catch {
    return false;
  }
}

export function resolveBackend(choice: BackendChoice): Backend {
  return choice === "auto" ? (gpuPresent() ? "cuda" : "cpu") : choice;
}


/** Free memory for CPU-backend slot buffers: RAM, and the shared-memory file system they live in. */
function cpuFreeBytes(): number {
  return Math.min(freemem(), freeBytesIn(config.CE_SHM_DIR) ?? Number.MAX_SAFE_INTEGER);
}

export function resolveDevices(choice: BackendChoice, select?: DeviceSelection): DeviceSet {
  const backend = resolveBackend(choice);
  if (backend === "cuda") {
    cudaLoad();
    const count = cudaDeviceCount();
    if (count === 0) throw new InputError("E_DEVICES", "the CUDA driver sees no GPU", { hint: "use the cpu backend (--device cpu)" });
    const ordinals = selectOrdinals(select, count);
    const devices = ordinals.map((ordinal, index) => {
      const info = cudaDeviceInfo(ordinal);
      return { index, ordinal, uuid: info.uuid, name: info.name, freeBytes: info.free_bytes };
    });
    return { backend, devices };
  }
  const ordinals = selectOrdinals(select, undefined);
  const host = hostname();
  const free = cpuFreeBytes();
  // The simulated devices share the host's memory.
  const devices = ordinals.map((ordinal, index) => ({
    index,
    ordinal,
    uuid: `CPU-${host}-${ordinal}`,
    name: "cpu",
    freeBytes: Math.floor(free / ordinals.length),
  }));
  return { backend, devices };
}
