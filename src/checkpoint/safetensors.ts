// safetensors headers: bytes in, tensor metas out, or an InputError that names the file and the tensor.
//
// Layout: an 8-byte little-endian u64 N, then N bytes of UTF-8 JSON (an object, possibly padded with
// trailing spaces), then the data region. Each JSON entry is `name: {dtype, shape, data_offsets}` with
// offsets relative to the start of the data region; `__metadata__` maps strings to strings. The rules
// below follow the reference reader (huggingface/safetensors, tensor.rs): header at most 100,000,000
// bytes, tensors tile the data region exactly from 0 with no gap or overlap, and the last tensor ends
// exactly at the end of the file.
import { open } from "node:fs/promises";
import { resolve } from "node:path";
import { InputError } from "../base/errors";

/** The reference reader's cap on N; a larger header is refused before anything is allocated. */
export const HEADER_MAX_BYTES = 100_000_000;

/** Bits per element of every dtype the format defines (sub-byte ones included). */
export const DTYPE_BITS: Readonly<Record<string, number>> = Object.freeze(
  // A null prototype: dtype names come from the file, and "constructor" must not resolve to a function.
  Object.assign(Object.create(null) as Record<string, number>, {
    BOOL: 8,
    F4: 4,
    F6_E2M3: 6,
    F6_E3M2: 6,
    U8: 8,
    I8: 8,
    F8_E5M2: 8,
    F8_E4M3: 8,
    F8_E8M0: 8,
    F8_E4M3FNUZ: 8,
    F8_E5M2FNUZ: 8,
    I16: 16,
    U16: 16,
    F16: 16,
    BF16: 16,
    I32: 32,
    U32: 32,
    F32: 32,
    C64: 64,
    F64: 64,
    I64: 64,
    U64: 64,
  }),
);

/** Bytes per element: DTYPE_BITS / 8, so 0.5 for F4 and 0.75 for the F6 types. Use tensorBytes() for sizes. */
export const DTYPE_BYTES: Readonly<Record<string, number>> = Object.freeze(
  Object.assign(
    Object.create(null) as Record<string, number>,
    Object.fromEntries(Object.entries(DTYPE_BITS).map(([k, bits]) => [k, bits / 8])),
  ),
);

/** Bytes per element where a patch can name single elements (1, 2, 4 or 8); undefined for sub-byte and odd sizes. */
export function elementBytes(dtype: string): number | undefined {
  const bits = DTYPE_BITS[dtype];
  return bits === 8 || bits === 16 || bits === 32 || bits === 64 ? bits / 8 : undefined;
}

export interface TensorMeta {
  name: string;
  dtype: string;
  shape: number[];
  nbytes: number;
  /** Absolute path of the file that holds it. */
  file: string;
  /** Absolute offset of its first byte in that file (dataStart + data_offsets[0]). */
  fileOffset: number;
}

export interface ParsedHeader {
  /** 8 + N: where the data region starts. */
  dataStart: number;
  metadata: Record<string, string>;
  /** In file order (ascending fileOffset). */
  tensors: TensorMeta[];
}

export interface SafetensorsFile extends ParsedHeader {
  /** Absolute path. */
  path: string;
  size: number;
  mtimeMs: number;
}

export function formatShape(shape: readonly number[]): string {
  return `[${shape.join(", ")}]`;
}

/**
 * Bytes a tensor of this dtype and shape occupies, or undefined for an unknown dtype, a byte count that
 * is not a safe integer, or a sub-byte tensor that does not fill whole bytes.
 */
export function tensorBytes(dtype: string, shape: readonly number[]): number | undefined {
  const bits = DTYPE_BITS[dtype];
  if (bits === undefined) return undefined;
  let elements = 1n;
  for (const d of shape) elements *= BigInt(d);
  const nbits = elements * BigInt(bits);
  if (nbits % 8n !== 0n) return undefined;
  const nbytes = nbits / 8n;
  return nbytes <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(nbytes) : undefined;
}

const HINT = "the file is not a valid safetensors file; re-export it (safetensors.torch.save_file) or re-download it";

function fail(code: string, message: string): never {
  throw new InputError(code, message, { hint: HINT });
}

/**
 * N, the JSON header's length, from the first 8 bytes; checks it against the cap and the file size
 * so that a caller can allocate the header buffer safely.
 */
export function headerLength(fileName: string, fileSize: number, first8: Uint8Array): number {
  if (fileSize < 8) {
    fail("E_SAFETENSORS_TRUNCATED", `${fileName}: file is ${fileSize} bytes, too short for the 8-byte header length`);
  }
  if (first8.length < 8) {
    fail("E_SAFETENSORS_TRUNCATED", `${fileName}: only ${first8.length} of the 8 header-length bytes were given`);
  }
  const n = new DataView(first8.buffer, first8.byteOffset, 8).getBigUint64(0, true);
  if (n > BigInt(HEADER_MAX_BYTES)) {
    fail("E_SAFETENSORS_HEADER_LENGTH", `${fileName}: header length ${n} is over the ${HEADER_MAX_BYTES}-byte limit`);
  }
  const len = Number(n);
  if (len < 2) {
    fail("E_SAFETENSORS_HEADER_LENGTH", `${fileName}: header length ${len} is too small to hold a JSON object`);
  }
  if (8 + len > fileSize) {
    fail(
      "E_SAFETENSORS_HEADER_LENGTH",
      `${fileName}: header length ${len} runs past the end of the file (${fileSize} bytes; at most ${fileSize - 8} fit)`,
    );
  }
  return len;
}

function isPlainObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

const utf8 = new TextDecoder("utf-8", { fatal: true });

/**
 * Parses and validates a header. `headerBytes` holds the first 8 + N bytes of the file (more is fine);
 * `fileSize` is the whole file's size, so that the data region can be checked without reading it.
 * `fileName` appears in messages; `filePath` (default: fileName) goes into each TensorMeta.file.
 */
export function parseHeader(
  fileName: string,
  fileSize: number,
  headerBytes: Uint8Array,
  filePath: string = fileName,
): ParsedHeader {
  const n = headerLength(fileName, fileSize, headerBytes);
  if (headerBytes.length < 8 + n) {
    fail("E_SAFETENSORS_TRUNCATED", `${fileName}: only ${headerBytes.length - 8} of the ${n} header bytes were given`);
  }
  const dataStart = 8 + n;

  let text: string;
  try {
    text = utf8.decode(headerBytes.subarray(8, dataStart));
  } catch {
    fail("E_SAFETENSORS_JSON", `${fileName}: header is not valid UTF-8`);
  }
  // The format requires the header to start with "{" (trailing spaces are allowed as padding).
  if (!text.startsWith("{")) {
    fail("E_SAFETENSORS_JSON", `${fileName}: header does not start with "{" (found ${JSON.stringify(text.slice(0, 16))})`);
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (err) {
    fail("E_SAFETENSORS_JSON", `${fileName}: header is not valid JSON: ${(err as Error).message}`);
  }
  if (!isPlainObject(json)) {
    fail("E_SAFETENSORS_JSON", `${fileName}: header is not a JSON object`);
  }

  const metadata: Record<string, string> = {};
  const rawMeta = json.__metadata__;
  if (rawMeta !== undefined) {
    if (!isPlainObject(rawMeta)) fail("E_SAFETENSORS_METADATA", `${fileName}: __metadata__ is not an object`);
    for (const [k, v] of Object.entries(rawMeta)) {
      if (typeof v !== "string") {
        fail("E_SAFETENSORS_METADATA", `${fileName}: __metadata__ "${k}" is ${JSON.stringify(v)}, not a string`);
      }
      metadata[k] = v;
    }
  }

  interface Entry {
    name: string;
    dtype: string;
    shape: number[];
    nbytes: number;
    begin: number;
    end: number;
  }
  const entries: Entry[] = [];
  for (const [name, raw] of Object.entries(json)) {
    if (name === "__metadata__") continue;
    const where = `${fileName}: tensor ${JSON.stringify(name)}`;
    if (!isPlainObject(raw)) fail("E_SAFETENSORS_JSON", `${where}: entry is not an object`);

    const dtype = raw.dtype;
    if (typeof dtype !== "string" || DTYPE_BITS[dtype] === undefined) {
      fail(
        "E_SAFETENSORS_DTYPE",
        `${where}: dtype ${JSON.stringify(dtype ?? null)} is not a safetensors dtype (${Object.keys(DTYPE_BITS).join(" ")})`,
      );
    }

    const shape = raw.shape;
    if (!Array.isArray(shape) || !shape.every((d) => Number.isSafeInteger(d) && (d as number) >= 0)) {
      fail("E_SAFETENSORS_SHAPE", `${where}: shape ${JSON.stringify(shape ?? null)} is not a list of non-negative integers`);
    }

    const offsets = raw.data_offsets;
    if (
      !Array.isArray(offsets) ||
      offsets.length !== 2 ||
      !offsets.every((o) => Number.isSafeInteger(o) && (o as number) >= 0) ||
      (offsets[0] as number) > (offsets[1] as number)
    ) {
      fail(
        "E_SAFETENSORS_OFFSETS",
        `${where}: data_offsets ${JSON.stringify(offsets ?? null)} is not [begin, end] with 0 <= begin <= end`,
      );
    }
    const [begin, end] = offsets as [number, number];

    const nbytes = tensorBytes(dtype, shape as number[]);
    if (nbytes === undefined) {
      fail("E_SAFETENSORS_SHAPE", `${where}: ${dtype} ${formatShape(shape as number[])} is not a whole number of bytes`);
    }
    if (nbytes !== end - begin) {
      fail(
        "E_SAFETENSORS_SHAPE",
        `${where}: ${dtype} ${formatShape(shape as number[])} needs ${nbytes} bytes, data_offsets span ${end - begin}`,
      );
    }
    entries.push({ name, dtype, shape: shape as number[], nbytes, begin, end });
  }

  // Tensors must tile the data region: sorted by offset, each begins where the previous ended.
  entries.sort((a, b) => a.begin - b.begin || a.end - b.end);
  const dataBytes = fileSize - dataStart;
  let cursor = 0;
  let prev: Entry | undefined;
  for (const e of entries) {
    if (e.begin > cursor) {
      const after = prev ? `after tensor ${JSON.stringify(prev.name)}` : "at the start of the data";
      fail(
        "E_SAFETENSORS_OFFSETS",
        `${fileName}: tensor ${JSON.stringify(e.name)}: data_offsets [${e.begin}, ${e.end}] leave a gap: bytes [${cursor}, ${e.begin}) ${after} belong to no tensor`,
      );
    }
    if (e.begin < cursor) {
      fail(
        "E_SAFETENSORS_OFFSETS",
        `${fileName}: tensor ${JSON.stringify(e.name)}: data_offsets [${e.begin}, ${e.end}] overlap tensor ${JSON.stringify(prev!.name)} [${prev!.begin}, ${prev!.end}]`,
      );
    }
    if (e.end > dataBytes) {
      fail(
        "E_SAFETENSORS_TRUNCATED",
        `${fileName}: tensor ${JSON.stringify(e.name)}: data_offsets [${e.begin}, ${e.end}] run past the end of the file: the data region holds ${dataBytes} bytes (file ${fileSize} bytes, header ${n}); the file is truncated`,
      );
    }
    cursor = e.end;
    prev = e;
  }
  if (cursor !== dataBytes) {
    fail(
      "E_SAFETENSORS_OFFSETS",
      `${fileName}: tensors cover ${cursor} bytes of a ${dataBytes}-byte data region: ${dataBytes - cursor} trailing bytes belong to no tensor`,
    );
  }

  const tensors: TensorMeta[] = entries.map((e) => ({
    name: e.name,
    dtype: e.dtype,
    shape: e.shape,
    nbytes: e.nbytes,
    file: filePath,
    fileOffset: dataStart + e.begin,
  }));
  return { dataStart, metadata, tensors };
}

/** Reads and validates one file's header: 8 bytes, then N bytes; never the data. */
export async function readHeader(path: string): Promise<SafetensorsFile> {
  const abs = resolve(path);
  let fh;
  try {
    fh = await open(abs, "r");
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code ?? "error";
    throw new InputError("E_SAFETENSORS_OPEN", `${path}: cannot open (${code})`, { cause: err });
  }
  try {
    // One descriptor for stat and reads, so size and mtime describe the bytes we parse.
    const st = await fh.stat();
    if (!st.isFile()) throw new InputError("E_SAFETENSORS_OPEN", `${path}: not a regular file`);
    const first8 = new Uint8Array(Math.min(8, st.size));
    await readFully(fh, first8, 0, path);
    const n = headerLength(path, st.size, first8);
    const bytes = new Uint8Array(8 + n);
    bytes.set(first8);
    await readFully(fh, bytes.subarray(8), 8, path);
    return { path: abs, size: st.size, mtimeMs: st.mtimeMs, ...parseHeader(path, st.size, bytes, abs) };
  } finally {
    await fh.close();
  }
}

async function readFully(
  fh: Awaited<ReturnType<typeof open>>,
  into: Uint8Array,
  position: number,
  path: string,
): Promise<void> {
  let done = 0;
  while (done < into.length) {
    const { bytesRead } = await fh.read(into, done, into.length - done, position + done);
    if (bytesRead === 0) {
      // headerLength() checked the size from fstat; a short read means the file shrank meanwhile.
      fail("E_SAFETENSORS_TRUNCATED", `${path}: file ended at byte ${position + done} while reading its header`);
    }
    done += bytesRead;
  }
}

export interface HeaderTensor {
  name: string;
  dtype: string;
  shape: readonly number[];
  nbytes: number;
}

export interface EncodedHeader {
  /** The first dataStart bytes of the file: 8-byte length + JSON padded with spaces. */
  header: Uint8Array;
  dataStart: number;
  /** data_offsets of each tensor, in the order given (relative to dataStart). */
  offsets: [number, number][];
  dataBytes: number;
}

/**
 * Builds a header whose tensors are laid out back to back in the order given, with the JSON padded
 * with spaces so that the data starts at a multiple of `align` bytes (the format allows trailing
 * spaces; 8 is what the reference writer uses, 256 keeps every tensor of 256-multiple size aligned).
 */
export function encodeHeader(
  tensors: readonly HeaderTensor[],
  metadata?: Record<string, string>,
  align = 256,
): EncodedHeader {
  if (!Number.isSafeInteger(align) || align < 8 || align % 8 !== 0) {
    throw new RangeError(`encodeHeader: align ${align} is not a positive multiple of 8`);
  }
  const seen = new Set<string>();
  const offsets: [number, number][] = [];
  // Built by hand, not JSON.stringify(object): an object would move integer-like names to the front.
  const parts: string[] = [];
  if (metadata !== undefined) parts.push(`"__metadata__":${JSON.stringify(metadata)}`);
  let cursor = 0;
  for (const t of tensors) {
    if (t.name === "__metadata__" || seen.has(t.name)) {
      throw new InputError("E_SAFETENSORS_NAME", `tensor name ${JSON.stringify(t.name)} is reserved or given twice`);
    }
    seen.add(t.name);
    const nbytes = tensorBytes(t.dtype, t.shape);
    if (nbytes === undefined || nbytes !== t.nbytes) {
      throw new InputError(
        "E_SAFETENSORS_SHAPE",
        `tensor ${JSON.stringify(t.name)}: ${t.dtype} ${formatShape(t.shape)} needs ${nbytes ?? "an invalid number of"} bytes, not ${t.nbytes}`,
      );
    }
    offsets.push([cursor, cursor + nbytes]);
    parts.push(
      `${JSON.stringify(t.name)}:{"dtype":${JSON.stringify(t.dtype)},"shape":${JSON.stringify(t.shape)},"data_offsets":[${cursor},${cursor + nbytes}]}`,
    );
    cursor += nbytes;
  }
  const json = new TextEncoder().encode(`{${parts.join(",")}}`);
  const dataStart = Math.ceil((8 + json.length) / align) * align;
  const n = dataStart - 8;
  if (n > HEADER_MAX_BYTES) {
    throw new InputError("E_SAFETENSORS_HEADER_LENGTH", `header of ${n} bytes is over the ${HEADER_MAX_BYTES}-byte limit`);
  }
  const header = new Uint8Array(dataStart).fill(0x20);
  new DataView(header.buffer).setBigUint64(0, BigInt(n), true);
  header.set(json, 8);
  return { header, dataStart, offsets, dataBytes: cursor };
}
