// A checkpoint on disk: one .safetensors file, a directory of them, or an HF
// model.safetensors.index.json. Every header is read and validated before anything else happens.
import { readdir, readFile, stat } from "node:fs/promises";
import { basename, dirname, join, resolve } from "node:path";
import { InputError } from "../base/errors";
import { readHeader, type SafetensorsFile, type TensorMeta } from "./safetensors";

export const INDEX_FILE = "model.safetensors.index.json";

export interface DtypeTotal {
  count: number;
  bytes: number;
}

export interface Checkpoint {
  /** Absolute path the checkpoint was opened from (file, directory or index). */
  root: string;
  kind: "file" | "directory" | "index";
  /** Absolute path of the HF index when one was used. */
  index?: string;
  /** Sorted by name; for an index, the shards it names. */
  files: SafetensorsFile[];
  /** File by file, each in file order. */
  tensors: TensorMeta[];
  /** Sum of the tensors' bytes (headers not counted). */
  totalBytes: number;
  largestTensor: TensorMeta;
  dtypes: Record<string, DtypeTotal>;
}

function notFound(path: string, err: unknown): InputError {
  const code = (err as NodeJS.ErrnoException).code ?? "error";
  return new InputError("E_CHECKPOINT_NOT_FOUND", `${path}: cannot read (${code})`, {
    hint: "give a .safetensors file, a directory of them, or a model.safetensors.index.json",
    cause: err,
  });
}

/** Opens and validates a checkpoint; reads headers only. */
export async function openCheckpoint(path: string): Promise<Checkpoint> {
  const root = resolve(path);
  let st;
  try {
    st = await stat(root);
  } catch (err) {
    throw notFound(path, err);
  }
  if (st.isDirectory()) {
    const names = await readdir(root).catch((err: unknown) => {
      throw notFound(path, err);
    });
    if (names.includes(INDEX_FILE)) return openIndex(join(root, INDEX_FILE), root);
    const shards = names.filter((n) => n.endsWith(".safetensors")).sort();
    if (shards.length === 0) {
      throw new InputError("E_CHECKPOINT_EMPTY", `${path}: no .safetensors files and no ${INDEX_FILE}`, {
        hint: "point ce at the directory that holds the model's .safetensors files",
      });
    }
    const files = await readHeaders(shards.map((n) => join(root, n)));
    return assemble(root, "directory", undefined, files);
  }
  if (root.endsWith(".json")) return openIndex(root, root);
  return assemble(root, "file", undefined, await readHeaders([root]));
}

async function openIndex(indexPath: string, root: string): Promise<Checkpoint> {
  let text: string;
  try {
    text = await readFile(indexPath, "utf8");
  } catch (err) {
    throw notFound(indexPath, err);
  }
  const bad = (what: string) =>
    new InputError("E_CHECKPOINT_INDEX", `${indexPath}: ${what}`, {
      hint: `an HF index is {"metadata": {...}, "weight_map": {"<tensor>": "<shard>.safetensors", ...}}`,
    });
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (err) {
    throw bad(`not valid JSON: ${(err as Error).message}`);
  }
  const weightMap = (json as { weight_map?: unknown } | null)?.weight_map;
  if (typeof weightMap !== "object" || weightMap === null || Array.isArray(weightMap)) {
    throw bad(`has no "weight_map" object`);
  }
  const mapped = new Map<string, string>();
  for (const [name, shard] of Object.entries(weightMap)) {
    if (typeof shard !== "string" || shard === "") throw bad(`weight_map entry ${JSON.stringify(name)} is not a file name`);
    mapped.set(name, shard);
  }
  if (mapped.size === 0) throw bad("weight_map is empty");

  const dir = dirname(indexPath);
  const shardNames = [...new Set(mapped.values())].sort();
  for (const shard of shardNames) {
    try {
      await stat(join(dir, shard));
    } catch {
      const example = [...mapped].find(([, s]) => s === shard)![0];
      throw new InputError(
        "E_CHECKPOINT_SHARD_MISSING",
        `${indexPath}: shard ${shard} does not exist (the index puts ${JSON.stringify(example)} there)`,
        { hint: "the checkpoint is incomplete: copy or download every shard the index names" },
      );
    }
  }
  const files = await readHeaders(shardNames.map((s) => join(dir, s)));
  const ckpt = assemble(root, "index", indexPath, files);

  // Every tensor the index names is in its shard, and every tensor of a shard is in the index.
  const byShard = new Map(files.map((f, i) => [shardNames[i]!, f]));
  for (const [shard, file] of byShard) {
    for (const t of file.tensors) {
      const want = mapped.get(t.name);
      if (want === undefined) {
        throw bad(`shard ${shard} holds tensor ${JSON.stringify(t.name)}, which the index does not list`);
      }
      if (want !== shard) {
        throw bad(`maps tensor ${JSON.stringify(t.name)} to ${want}, but it is in ${shard}`);
      }
    }
  }
  const present = new Set(ckpt.tensors.map((t) => t.name));
  for (const [name, shard] of mapped) {
    if (!present.has(name)) throw bad(`maps tensor ${JSON.stringify(name)} to ${shard}, which has no such tensor`);
  }
  return ckpt;
}

/** Reads the headers of many files, a few at a time, in the order given. */
async function readHeaders(paths: string[]): Promise<SafetensorsFile[]> {
  const out: SafetensorsFile[] = new Array(paths.length);
  let next = 0;
  const worker = async () => {
    while (next < paths.length) {
      const i = next++;
      out[i] = await readHeader(paths[i]!);
    }
  };
  await Promise.all(Array.from({ length: Math.min(16, paths.length) }, worker));
  return out;
}

function assemble(
  root: string,
  kind: Checkpoint["kind"],
  index: string | undefined,
  files: SafetensorsFile[],
): Checkpoint {
  const tensors: TensorMeta[] = [];
  const owner = new Map<string, string>();
  const dtypes: Record<string, DtypeTotal> = {};
  let totalBytes = 0;
  let largest: TensorMeta | undefined;
  for (const f of files) {
    for (const t of f.tensors) {
      const other = owner.get(t.name);
      if (other !== undefined) {
        throw new InputError(
          "E_CHECKPOINT_DUPLICATE",
          `tensor ${JSON.stringify(t.name)} is in both ${basename(other)} and ${basename(f.path)}`,
          { hint: "each tensor must be stored once; remove the stale file from the directory" },
        );
      }
      owner.set(t.name, f.path);
      tensors.push(t);
      totalBytes += t.nbytes;
      const d = (dtypes[t.dtype] ??= { count: 0, bytes: 0 });
      d.count += 1;
      d.bytes += t.nbytes;
      if (largest === undefined || t.nbytes > largest.nbytes) largest = t;
    }
  }
  if (largest === undefined) {
    throw new InputError("E_CHECKPOINT_EMPTY", `${root}: the checkpoint holds no tensors`);
  }
  return { root, kind, index, files, tensors, totalBytes, largestTensor: largest, dtypes };
}

/** Refuses a checkpoint whose files changed (size or mtime) or vanished since it was opened. */
export async function assertUnchanged(ckpt: Checkpoint): Promise<void> {
  for (const f of ckpt.files) {
    let st;
    try {
      st = await stat(f.path);
    } catch (err) {
      throw new InputError("E_CHECKPOINT_CHANGED", `${f.path}: no longer readable since it was registered`, {
        hint: "register the checkpoint again",
        cause: err,
      });
    }
    if (st.size !== f.size || st.mtimeMs !== f.mtimeMs) {
      const what =
        st.size !== f.size
          ? `size ${f.size} → ${st.size} bytes`
          : `modified at ${new Date(st.mtimeMs).toISOString()} (was ${new Date(f.mtimeMs).toISOString()})`;
      throw new InputError("E_CHECKPOINT_CHANGED", `${f.path}: changed since it was registered: ${what}`, {
        hint: "ce never reads a file that changed under it; write new weights to new files and register them as a new version",
      });
    }
  }
}


export interface CheckpointSummary {
  root: string;
  kind: Checkpoint["kind"];
  index?: string;
  files: { path: string; bytes: number; tensors: number }[];
  fileBytes: number;
  tensorCount: number;
  totalBytes: number;
  dtypes: Record<string, DtypeTotal>;
  largestTensor: { name: string; dtype: string; shape: number[]; nbytes: number; file: string };
  headersValid: true;
}

/** What `ce inspect` shows. */
export function summarize(ckpt: Checkpoint): CheckpointSummary {
  const l = ckpt.largestTensor;
  return {
    root: ckpt.root,
    kind: ckpt.kind,
    ...(ckpt.index ? { index: ckpt.index } : {}),
    files: ckpt.files.map((f) => ({ path: f.path, bytes: f.size, tensors: f.tensors.length })),
    fileBytes: ckpt.files.reduce((s, f) => s + f.size, 0),
    tensorCount: ckpt.tensors.length,
    totalBytes: ckpt.totalBytes,
    dtypes: ckpt.dtypes,
    largestTensor: { name: l.name, dtype: l.dtype, shape: l.shape, nbytes: l.nbytes, file: l.file },
    headersValid: true,
  };
}
