// Which devices an update runs on: the backend (cuda or cpu), the local device list, and what
// each device is called on the wire (its UUID) and has free.
import { statfsSync } from "node:fs";
import { freemem, hostname } from "node:os";
import { config } from "../base/config";
import { UsageError } from "../base/errors";
import { type Backend, cudaDeviceCount, cudaDeviceInfo, cudaLoad } from "../native/ce";

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

/** Simulated CPU devices when --devices is not given: enough to show the fan-out. */
export const DEFAULT_CPU_DEVICES = 2;

/** "3" → the first 3; "0,2" → those; undefined → all (cuda) or DEFAULT_CPU_DEVICES (cpu). */
export function parseDeviceList(spec: string | undefined, available: number | undefined): number[] {
  if (spec === undefined || spec === "") {
    const n = available ?? DEFAULT_CPU_DEVICES;
    return Array.from({ length: n }, (_, i) => i);
  }
  if (/^\d+$/.test(spec)) {
    const n = Number(spec);
    if (n < 1) throw new UsageError(`--devices ${spec}: at least one device`);
    if (available !== undefined && n > available) throw new UsageError(`--devices ${spec}: this host has ${available} GPUs`);
    return Array.from({ length: n }, (_, i) => i);
  }
  const list = spec.split(",").map((s) => s.trim());
  if (!list.every((s) => /^\d+$/.test(s))) throw new UsageError(`--devices "${spec}" is neither a count nor a list like 0,2,3`);
  const ordinals = list.map(Number);
  if (new Set(ordinals).size !== ordinals.length) throw new UsageError(`--devices "${spec}" names a device twice`);
  if (available !== undefined) {
    const bad = ordinals.find((o) => o >= available);
    if (bad !== undefined) throw new UsageError(`--devices: GPU ${bad} does not exist (this host has ${available})`);
  }
  return ordinals;
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

export function resolveBackend(spec: string | undefined): Backend {
  const s = spec ?? config.CE_DEVICE;
  if (s === "cuda" || s === "cpu") return s;
  if (s === "auto") return gpuPresent() ? "cuda" : "cpu";
  throw new UsageError(`--device "${s}": use cuda, cpu or auto`);
}

/** Bytes free for us in the file system holding dir; undefined when it cannot be read. */
export function freeBytesIn(dir: string): number | undefined {
  try {
    const st = statfsSync(dir);
    return Number(st.bavail) * Number(st.bsize);
  } catch {
    return undefined;
  }
}

/** Free memory for CPU-backend slot buffers: RAM, and the shared-memory file system they live in. */
function cpuFreeBytes(): number {
  return Math.min(freemem(), freeBytesIn(config.CE_SHM_DIR) ?? Number.MAX_SAFE_INTEGER);
}

export function resolveDevices(backendSpec: string | undefined, devicesSpec: string | undefined): DeviceSet {
  const backend = resolveBackend(backendSpec);
  if (backend === "cuda") {
    cudaLoad();
    const count = cudaDeviceCount();
    if (count === 0) throw new UsageError("--device cuda: the CUDA driver sees no GPU", { hint: "use --device cpu" });
    const ordinals = parseDeviceList(devicesSpec, count);
    const devices = ordinals.map((ordinal, index) => {
      const info = cudaDeviceInfo(ordinal);
      return { index, ordinal, uuid: info.uuid, name: info.name, freeBytes: info.free_bytes };
    });
    return { backend, devices };
  }
  const ordinals = parseDeviceList(devicesSpec, undefined);
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
