// Probes once whether this host can run the GPU suite, and says why not.
import { cudaDeviceCount, cudaLoad, ncclLoad } from "../../src/native/ce";

export interface GpuProbe {
  ok: boolean;
  count: number;
  nccl: boolean;
  reason: string;
}

function probe(): GpuProbe {
  try {
    cudaLoad();
  } catch {
    return { ok: false, count: 0, nccl: false, reason: "no CUDA driver here" };
  }
  const count = cudaDeviceCount();
  if (count === 0) return { ok: false, count, nccl: false, reason: "the CUDA driver sees no GPU" };
  let nccl = true;
  try {
    ncclLoad();
  } catch {
    nccl = false;
  }
  return { ok: true, count, nccl, reason: `${count} GPU${count === 1 ? "" : "s"}` };
}

export const gpu: GpuProbe = probe();
