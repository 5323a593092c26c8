// ce doctor: what this host has for ce, and what is missing, in one look.
import { defineCommand } from "citty";
import { statfsSync } from "node:fs";
import { ENV, config } from "../base/config";
import { errorMessage } from "../base/errors";
import { writeJson } from "../base/log";
import { formatBytes } from "../base/units";
import { type GpuInfo, cudaDeviceCount, cudaDeviceInfo, cudaLoad, libPath, libcePath, ncclLoad } from "../native/ce";
import { type XferInfo, xferLoad } from "../native/xfer";
import { zmqLibrary } from "../native/zmq";
import { outputArgs } from "./_args";

interface Check {
  name: string;
  ok: boolean;
  /** required for the GPU path; optional parts (P2P engines) never fail doctor */
  required: boolean;
  detail: string;
}

interface Report {
  ok: boolean;
  checks: Check[];
  gpus: GpuInfo[];
  env: { name: string; value: string; default: string; doc: string }[];
}

function describeEngine(e: XferInfo): string {
  const transports = e.transports.length ? e.transports.join(" ") : "none reported";
  const memory = e.memoryTypes.length ? `; memory: ${e.memoryTypes.join(", ")}` : "";
  return `${e.version ? `${e.version} ` : ""}(${e.path}): ${transports}${memory}`;
}

function probe(name: string, required: boolean, fn: () => string): Check {
  try {
    return { name, ok: true, required, detail: fn() };
  } catch (err) {
    return { name, ok: false, required, detail: errorMessage(err) };
  }
}

export function diagnose(): Report {
  const gpus: GpuInfo[] = [];
  const checks: Check[] = [
    probe("libce", true, () => libcePath()),
    probe("libzmq", true, () => {
      const z = zmqLibrary();
      return `${z.version} (${z.source}: ${z.path})`;
    }),
    probe("CUDA driver", true, () => {
      const { driverVersion } = cudaLoad();
      return `CUDA ${Math.floor(driverVersion / 1000)}.${(driverVersion % 1000) / 10} (${libPath("cuda")})`;
    }),
    probe("GPUs", true, () => {
      const n = cudaDeviceCount();
      if (n === 0) throw new Error("the driver sees no GPU");
      for (let i = 0; i < n; i++) gpus.push(cudaDeviceInfo(i));
      return `${n}`;
    }),
    // NCCL carries the broadcast between a host's GPUs: one GPU does without it.
    probe("NCCL", gpus.length !== 1, () => {
      const { version } = ncclLoad();
      return `${Math.floor(version / 10000)}.${Math.floor(version / 100) % 100}.${version % 100} (${libPath("nccl")})`;
    }),
    // P2P transfer engines: what each can move bytes over here (UCX: under the UCX_* environment).
    probe("UCX (P2P)", false, () => describeEngine(xferLoad("ucx"))),
    probe("Mooncake (P2P)", false, () => describeEngine(xferLoad("mooncake"))),
    probe("shared memory", true, () => {
      const st = statfsSync(config.CE_SHM_DIR);
      return `${config.CE_SHM_DIR}: ${formatBytes(Number(st.bavail) * Number(st.bsize))} free of ${formatBytes(Number(st.blocks) * Number(st.bsize))}`;
    }),
  ];
  return {
    ok: checks.every((c) => c.ok || !c.required),
    checks,
    gpus,
    env: ENV.map((e) => ({ name: e.name, value: config[e.name]!, default: e.default, doc: e.doc })),
  };
}

export default defineCommand({
  meta: { name: "doctor", description: "check this host: CUDA driver, GPUs, NCCL, libzmq, P2P engines, shared memory" },
  args: { ...outputArgs },
  async run({ args }) {
    const r = diagnose();
    if (args.json) {
      writeJson(r);
    } else {
      const out: string[] = [];
      for (const c of r.checks) out.push(`${c.ok ? "ok  " : c.required ? "FAIL" : "--  "} ${c.name.padEnd(15)} ${c.detail}`);
      for (const g of r.gpus) {
        out.push(`     GPU ${g.index}: ${g.name}  ${g.uuid}  ${formatBytes(g.total_bytes)} (${formatBytes(g.free_bytes)} free)  PCI ${g.pci_bus_id}  sm_${g.compute_capability.replace(".", "")}`);
      }
      out.push("", "settings (CE_* environment):");
      for (const e of r.env) out.push(`  ${e.name.padEnd(15)} ${(e.value || "(unset)").padEnd(14)} ${e.doc}`);
      process.stdout.write(`${out.join("\n")}\n`);
    }
    if (!r.ok) {
      const missing = r.checks.filter((c) => !c.ok && c.required).map((c) => c.name);
      process.stderr.write(`ce doctor: missing for the GPU path: ${missing.join(", ")} (the CPU backend works without them)\n`);
      process.exitCode = 1;
    }
  },
});
