// Every CE_* environment variable ce reads, declared once: name, default, what it does.
// Read once at start-up and passed down; `ce doctor` prints the table.

export interface EnvDecl {
  name: string;
  flag?: string;
  default: string;
  doc: string;
}

export const ENV = [
  { name: "CE_LIB", default: "", doc: "path to libce.so (default: beside the ce executable, then dist/)" },
  { name: "CE_LIBZMQ", default: "", doc: "path to a libzmq.so.5 to use instead of the one embedded in ce" },
  { name: "CE_LIBCUDA", default: "libcuda.so.1", doc: "CUDA driver library to dlopen" },
  { name: "CE_LIBNCCL", default: "libnccl.so.2", doc: "NCCL library to dlopen" },
  { name: "CE_UCX_LIB", default: "libucp.so.0", doc: "UCX library (libucp) the P2P transfer engine dlopens; UCX_* variables configure UCX itself" },
  { name: "CE_MOONCAKE_LIB", default: "libtransfer_engine.so", doc: "Mooncake transfer engine library the P2P engine dlopens" },
  { name: "CE_P2P_ENGINE", default: "ucx", doc: "transfer engine of P2P pulls, the same on every host: ucx or mooncake" },
  { name: "CE_MOONCAKE_HOST", default: "", doc: "with mooncake: the host name or address peers reach this host's engine at (default: the host name)" },
  { name: "CE_MOONCAKE_PROTO", default: "tcp", doc: "with mooncake: the transport it installs (tcp, rdma, ...)" },
  { name: "CE_DEVICE", flag: "--device", default: "auto", doc: "backend: cuda, cpu, or auto (cuda when a GPU is present)" },
  { name: "CE_BUCKET_SIZE", flag: "--bucket-size", default: "auto", doc: "bucket size, e.g. 1GiB; auto sizes from GPU memory and the largest tensor" },
  { name: "CE_SLOTS", flag: "--slots", default: "auto", doc: "IPC slots per GPU (3 overlaps H2D, broadcast and reload)" },
  { name: "CE_TIMEOUT", flag: "--timeout", default: "10m", doc: "deadline for a whole update" },
  { name: "CE_OP_TIMEOUT", default: "60s", doc: "deadline for one worker reply (open, load, release, finish)" },
  { name: "CE_PIN_THREADS", default: "auto", doc: "threads that pin (cuMemHostRegister) or read a checkpoint in parallel (auto: one per core, at most 32)" },
  { name: "CE_DIGEST_THREADS", default: "auto", doc: "threads that digest a version's tensors while its bytes arrive (auto: as CE_PIN_THREADS)" },
  { name: "CE_SHM_DIR", default: "/dev/shm", doc: "where CPU-backend slot buffers and synthetic checkpoints live" },
  { name: "CE_PYTHON", default: "python3", doc: "Python interpreter for --worker python" },
  { name: "CE_LOG_LEVEL", flag: "--log-level", default: "info", doc: "silent, warn, info, debug or trace" },
  { name: "CE_CLUSTER_SECRET", default: "", doc: "shared secret of a cluster (16+ characters, the same on every host); or --secret-file" },
  { name: "CE_JOIN_TIMEOUT", default: "5m", doc: "how long hosts may take to join before an update names the missing ones as down" },
  { name: "CE_HEARTBEAT", default: "1s", doc: "cluster heartbeat; a host silent for 3 beats is down and aborts the update running" },
  // The launchers' variables, read when the flags are not given (torchrun, Slurm, and the usual pair).
  { name: "MASTER_ADDR", flag: "--master-addr", default: "127.0.0.1", doc: "host 0's address (torchrun, Slurm scripts)" },
  { name: "MASTER_PORT", flag: "--master-port", default: "8712", doc: "host 0's cluster port" },
  { name: "NNODES", flag: "--nnodes", default: "", doc: "hosts in the cluster" },
  { name: "NODE_RANK", flag: "--node-rank", default: "", doc: "this host's rank, 0 = the coordinator" },
  { name: "SLURM_NNODES", default: "", doc: "Slurm: hosts in the job (when NNODES is unset)" },
  { name: "SLURM_NODEID", default: "", doc: "Slurm: this host's index (when NODE_RANK is unset)" },
  { name: "WORLD_SIZE", default: "", doc: "torchrun: processes in the job; hosts = WORLD_SIZE / LOCAL_WORLD_SIZE" },
  { name: "RANK", default: "", doc: "torchrun: this process's rank; host = RANK / LOCAL_WORLD_SIZE" },
  { name: "LOCAL_WORLD_SIZE", default: "", doc: "torchrun: processes per host (1 when ce serve runs once per host)" },
] as const satisfies readonly EnvDecl[];

export type EnvName = (typeof ENV)[number]["name"];

/** One string per declared variable: a misspelt name does not type-check. */
export type Config = { readonly [K in EnvName]: string };

/** The environment's value for every declared variable, defaults filled in. */
export function readConfig(env: Record<string, string | undefined> = process.env): Config {
  const out: Partial<Record<EnvName, string>> = {};
  for (const decl of ENV) {
    const value = env[decl.name];
    out[decl.name] = value === undefined || value === "" ? decl.default : value;
  }
  return out as Config;
}

export const config: Config = readConfig();
