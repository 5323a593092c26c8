import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { open, readFile, stat } from "node:fs/promises";
import { join } from "node:path";
import {
  DTYPE_BITS,
  DTYPE_BYTES,
  encodeHeader,
  HEADER_MAX_BYTES,
  parseHeader,
  readHeader,
  tensorBytes,
} from "../../src/checkpoint/safetensors";
import { expectCeError, type RawParts, rawBytes, rng, type TempDir, tempDir, writeRaw, writeSafetensors } from "../helpers/ckpt";

let dir: TempDir;
beforeAll(async () => {
  dir = await tempDir();
});
afterAll(() => dir.cleanup());

const W = { dtype: "F32", shape: [2, 2], data_offsets: [0, 16] };

interface BadCase {
  name: string;
  file: RawParts | Uint8Array;
  code: string;
  says: string[];
}

const badCases: BadCase[] = [
  { name: "a file shorter than 8 bytes is truncated", file: new Uint8Array(5), code: "E_SAFETENSORS_TRUNCATED", says: ["5 bytes"] },
  {
    name: "a header length past the end of the file is refused",
    file: { headerLength: 4096, header: { w: W }, data: 16 },
    code: "E_SAFETENSORS_HEADER_LENGTH",
    says: ["4096", "runs past the end"],
  },
  {
    name: "a header length over the 100 MB cap is refused",
    file: { headerLength: HEADER_MAX_BYTES + 1, header: { w: W }, data: 16 },
    code: "E_SAFETENSORS_HEADER_LENGTH",
    says: ["100000001", "limit"],
  },
  {
    name: "a header length near 2^64 is refused",
    file: { headerLength: 2n ** 64n - 1n, header: "{}" },
    code: "E_SAFETENSORS_HEADER_LENGTH",
    says: ["18446744073709551615"],
  },
  {
    name: "a header length below 2 is refused",
    file: { headerLength: 1, header: "{}" },
    code: "E_SAFETENSORS_HEADER_LENGTH",
    says: ["too small"],
  },
  {
    name: "a header that is not JSON is refused",
    file: { header: '{"w": {"dtype": "F32",' },
    code: "E_SAFETENSORS_JSON",
    says: ["not valid JSON"],
  },
  {
    name: "a header that is not UTF-8 is refused",
    file: { header: new Uint8Array([0x7b, 0xff, 0xfe, 0x7d]) },
    code: "E_SAFETENSORS_JSON",
    says: ["UTF-8"],
  },
  {
    name: "a header that is a JSON array is not an object",
    file: { header: "[1, 2, 3]" },
    code: "E_SAFETENSORS_JSON",
    says: ['does not start with "{"'],
  },
  {
    name: "a tensor entry that is not an object is refused",
    file: { header: { w: 5 } },
    code: "E_SAFETENSORS_JSON",
    says: ['tensor "w"', "not an object"],
  },
  {
    name: "overlapping data_offsets are refused",
    file: { header: { a: W, b: { dtype: "F32", shape: [4], data_offsets: [8, 24] } }, data: 24 },
    code: "E_SAFETENSORS_OFFSETS",
    says: ['tensor "b"', "overlap", '"a"'],
  },
  {
    name: "a gap between tensors is refused",
    file: { header: { a: W, b: { dtype: "F32", shape: [4], data_offsets: [32, 48] } }, data: 48 },
    code: "E_SAFETENSORS_OFFSETS",
    says: ['tensor "b"', "gap", "[16, 32)", 'after tensor "a"'],
  },
  {
    name: "a gap at the start of the data is refused",
    file: { header: { a: { dtype: "F32", shape: [4], data_offsets: [16, 32] } }, data: 32 },
    code: "E_SAFETENSORS_OFFSETS",
    says: ['tensor "a"', "gap", "at the start"],
  },
  {
    name: "trailing bytes after the last tensor are refused",
    file: { header: { w: W }, data: 20 },
    code: "E_SAFETENSORS_OFFSETS",
    says: ["4 trailing bytes"],
  },
  {
    name: "an unknown dtype is refused",
    file: { header: { w: { ...W, dtype: "F12" } }, data: 16 },
    code: "E_SAFETENSORS_DTYPE",
    says: ['tensor "w"', '"F12"'],
  },
  {
    name: "a dtype named like an Object.prototype member is refused",
    file: { header: { w: { ...W, dtype: "constructor" } }, data: 16 },
    code: "E_SAFETENSORS_DTYPE",
    says: ['"constructor"'],
  },
  {
    name: "a shape that disagrees with the byte span is refused",
    file: { header: { w: { ...W, shape: [2, 3] } }, data: 16 },
    code: "E_SAFETENSORS_SHAPE",
    says: ['tensor "w"', "F32 [2, 3] needs 24 bytes, data_offsets span 16"],
  },
  {
    name: "a negative dimension is refused",
    file: { header: { w: { ...W, shape: [-2, -2] } }, data: 16 },
    code: "E_SAFETENSORS_SHAPE",
    says: ['tensor "w"', "[-2,-2]"],
  },
  {
    name: "a fractional dimension is refused",
    file: { header: { w: { ...W, shape: [2.5, 2] } }, data: 16 },
    code: "E_SAFETENSORS_SHAPE",
    says: ["[2.5,2]"],
  },
  {
    name: "a shape that is not a list is refused",
    file: { header: { w: { ...W, shape: "2x2" } }, data: 16 },
    code: "E_SAFETENSORS_SHAPE",
    says: ['"2x2"'],
  },
  {
    name: "a shape whose byte count is not a safe integer is refused",
    file: { header: { w: { ...W, shape: [2 ** 40, 2 ** 20] } }, data: 16 },
    code: "E_SAFETENSORS_SHAPE",
    says: ["not a whole number of bytes"],
  },
  {
    name: "an F4 tensor with an odd element count is refused",
    file: { header: { w: { dtype: "F4", shape: [3], data_offsets: [0, 2] } }, data: 2 },
    code: "E_SAFETENSORS_SHAPE",
    says: ["F4 [3]"],
  },
  {
    name: "data_offsets with end before begin are refused",
    file: { header: { w: { ...W, data_offsets: [16, 0] } }, data: 16 },
    code: "E_SAFETENSORS_OFFSETS",
    says: ['tensor "w"', "[16,0]"],
  },
  {
    name: "data_offsets that are not a pair are refused",
    file: { header: { w: { ...W, data_offsets: [0, 8, 16] } }, data: 16 },
    code: "E_SAFETENSORS_OFFSETS",
    says: ["[0,8,16]"],
  },
  {
    name: "missing data_offsets are refused",
    file: { header: { w: { dtype: "F32", shape: [4] } }, data: 16 },
    code: "E_SAFETENSORS_OFFSETS",
    says: ["null"],
  },
  {
    name: "data beyond the end of the file is truncated",
    file: { header: { a: W, b: { dtype: "F32", shape: [4], data_offsets: [16, 32] } }, data: 20 },
    code: "E_SAFETENSORS_TRUNCATED",
    says: ['tensor "b"', "[16, 32]", "truncated"],
  },
  {
    name: "__metadata__ values must be strings",
    file: { header: { __metadata__: { format: "pt", step: 7 }, w: W }, data: 16 },
    code: "E_SAFETENSORS_METADATA",
    says: ['"step"'],
  },
];

describe("a malformed safetensors file is refused with an error naming the file and the tensor", () => {
  test.each(badCases.map((c) => [c.name, c] as const))("%s", async (_name, c) => {
    const path = await writeRaw(join(dir.path, "bad.safetensors"), c.file);
    await expectCeError(() => readHeader(path), c.code, path, ...c.says);
    // The pure parser says the same from the bytes alone.
    const bytes = c.file instanceof Uint8Array ? c.file : rawBytes(c.file);
    await expectCeError(() => parseHeader("bad.safetensors", bytes.length, bytes), c.code, "bad.safetensors", ...c.says);
  });
});

describe("valid files", () => {
  test("an empty header with no data is a valid file with no tensors", () => {
    const bytes = rawBytes({ header: "{}" });
    expect(parseHeader("e.safetensors", bytes.length, bytes)).toEqual({ dataStart: 10, metadata: {}, tensors: [] });
  });

  test("tensors are returned in file order whatever the JSON order, with absolute file offsets", () => {
    const header = {
      __metadata__: { format: "pt" },
      "2": { dtype: "U8", shape: [3], data_offsets: [20, 23] },
      b: { dtype: "F32", shape: [4], data_offsets: [4, 20] },
      a: { dtype: "I16", shape: [2], data_offsets: [0, 4] },
      empty: { dtype: "BF16", shape: [0, 7], data_offsets: [20, 20] },
    };
    const bytes = rawBytes({ header: `${JSON.stringify(header)}   `, data: 23 });
    const n = bytes.length - 23 - 8;
    const parsed = parseHeader("x.safetensors", bytes.length, bytes, "/abs/x.safetensors");
    expect(parsed.metadata).toEqual({ format: "pt" });
    expect(parsed.dataStart).toBe(8 + n);
    expect(parsed.tensors.map((t) => [t.name, t.nbytes, t.fileOffset - parsed.dataStart, t.file])).toEqual([
      ["a", 4, 0, "/abs/x.safetensors"],
      ["b", 16, 4, "/abs/x.safetensors"],
      ["empty", 0, 20, "/abs/x.safetensors"],
      ["2", 3, 20, "/abs/x.safetensors"],
    ]);
  });

  test("sub-byte dtypes are sized in bits", () => {
    expect(tensorBytes("F4", [2, 3])).toBe(3);
    expect(tensorBytes("F6_E2M3", [4])).toBe(3);
    expect(tensorBytes("F6_E3M2", [3])).toBeUndefined();
    expect(DTYPE_BYTES.F4).toBe(0.5);
    expect(DTYPE_BYTES.BF16).toBe(2);
    expect(DTYPE_BITS.F8_E8M0).toBe(8);
    expect(tensorBytes("toString", [1])).toBeUndefined();
  });

  test("readHeader returns the file's size, mtime, absolute path and 256-aligned tensor offsets", async () => {
    const path = join(dir.path, "ok.safetensors");
    const written = await writeSafetensors(path, [
      { name: "embed", shape: [64, 32] },
      { name: "norm", dtype: "F32", shape: [64] },
      { name: "proj", shape: [32, 64] },
    ]);
    const f = await readHeader(path);
    const st = await stat(path);
    expect({ size: f.size, mtimeMs: f.mtimeMs, path: f.path }).toEqual({ size: st.size, mtimeMs: st.mtimeMs, path });
    expect(f.dataStart % 256).toBe(0);
    const bytes = await readFile(path);
    for (const t of f.tensors) {
      expect(t.fileOffset % 256).toBe(0);
      expect(Uint8Array.from(bytes.subarray(t.fileOffset, t.fileOffset + t.nbytes))).toEqual(written.data.get(t.name)!);
    }
  });

  test("a header over the cap is refused from its first 8 bytes, before it is read", async () => {
    // A sparse 120 MB file: reading a 100 MB header from it would be slow and show in memory.
    const path = join(dir.path, "huge.safetensors");
    const fh = await open(path, "w");
    const first8 = new Uint8Array(8);
    new DataView(first8.buffer).setBigUint64(0, BigInt(HEADER_MAX_BYTES + 1), true);
    await fh.write(first8, 0, 8, 0);
    await fh.truncate(120_000_000);
    await fh.close();
    const rssBefore = process.memoryUsage().rss;
    await expectCeError(() => readHeader(path), "E_SAFETENSORS_HEADER_LENGTH", "limit");
    expect(process.memoryUsage().rss - rssBefore).toBeLessThan(50_000_000);
  });

  test("an unreadable path is an input error naming it", async () => {
    await expectCeError(() => readHeader(join(dir.path, "missing.safetensors")), "E_SAFETENSORS_OPEN", "missing.safetensors", "ENOENT");
    await expectCeError(() => readHeader(dir.path), "E_SAFETENSORS_OPEN", "not a regular file");
  });
});

describe("encodeHeader", () => {
  test("round-trips random tensor lists through parseHeader", () => {
    const seed = (Date.now() ^ 0x5eed) >>> 0;
    const next = rng(seed);
    const dtypes = Object.keys(DTYPE_BITS);
    try {
      for (let round = 0; round < 200; round++) {
        const count = Math.floor(next() * 12);
        const tensors = Array.from({ length: count }, (_, i) => {
          const dtype = dtypes[Math.floor(next() * dtypes.length)]!;
          const rank = (DTYPE_BITS[dtype]! < 8 ? 1 : 0) + Math.floor(next() * 4);
          const shape = Array.from({ length: rank }, () => Math.floor(next() * 9) * (DTYPE_BITS[dtype]! < 8 ? 8 : 1));
          return { name: `t.${i}.${Math.floor(next() * 1e6)}`, dtype, shape, nbytes: tensorBytes(dtype, shape)! };
        });
        const align = [8, 64, 256][Math.floor(next() * 3)]!;
        const enc = encodeHeader(tensors, round % 2 ? { format: "pt" } : undefined, align);
        expect(enc.dataStart % align).toBe(0);
        const file = new Uint8Array(enc.dataStart + enc.dataBytes);
        file.set(enc.header);
        const parsed = parseHeader("r.safetensors", file.length, file);
        expect(parsed.dataStart).toBe(enc.dataStart);
        // Zero-byte tensors may sort anywhere among their equals; compare as sets keyed by name.
        const byName = new Map(parsed.tensors.map((t) => [t.name, t]));
        tensors.forEach((t, i) => {
          const p = byName.get(t.name)!;
          expect([p.dtype, p.shape, p.nbytes, p.fileOffset]).toEqual([t.dtype, t.shape, t.nbytes, enc.dataStart + enc.offsets[i]![0]]);
        });
      }
    } catch (err) {
      throw new Error(`encodeHeader round trip failed with seed ${seed}: ${(err as Error).message}`);
    }
  });

  test("refuses a tensor whose nbytes disagrees with its shape, and repeated names", async () => {
    await expectCeError(
      () => encodeHeader([{ name: "w", dtype: "BF16", shape: [4], nbytes: 7 }]),
      "E_SAFETENSORS_SHAPE",
      '"w"',
      "needs 8 bytes, not 7",
    );
    await expectCeError(
      () =>
        encodeHeader([
          { name: "w", dtype: "U8", shape: [1], nbytes: 1 },
          { name: "w", dtype: "U8", shape: [1], nbytes: 1 },
        ]),
      "E_SAFETENSORS_NAME",
      '"w"',
    );
  });
});
