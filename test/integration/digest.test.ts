// Tensor digests (docs/digest.md): libce's threads, a BigInt reference written from the spec, and
// the worker's torch code (python/ce_worker/digest.py, run by a real Python) agree bit for bit;
// the changes the digest must catch change it; the rate over 1 GiB is logged, never asserted.
import { afterAll, describe, expect, test } from "bun:test";
import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { availableParallelism, tmpdir } from "node:os";
import { join } from "node:path";
import { NativeError } from "../../src/base/errors";
import { Ctx, digestBytes, formatDigest, parseDigest } from "../../src/native/ce";

const MiB = 1024 ** 2;
const MASK = (1n << 64n) - 1n;
const dirs: string[] = [];

afterAll(() => {
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

/** The definition, word by word, as docs/digest.md states it. */
function referenceDigest(data: Uint8Array): bigint {
  let s = 0n;
  const n = Math.ceil(data.length / 4);
  for (let i = 0; i < n; i++) {
    let w = 0;
    for (let k = 0; k < 4; k++) w |= (data[4 * i + k] ?? 0) << (8 * k); // JS: int32, as the spec reads it
    s += BigInt(w) * BigInt(2 * i + 1);
  }
  let x = (s + 0x9e3779b97f4a7c15n * BigInt(data.length + 1)) & MASK;
  x ^= x >> 33n;
  x = (x * 0xff51afd7ed558ccdn) & MASK;
  x ^= x >> 33n;
  x = (x * 0xc4ceb9fe1a85ec53n) & MASK;
  x ^= x >> 33n;
  return x;
}

/** Deterministic bytes (xorshift32), so a failure reproduces. */
function randomBytes(n: number, seed: number): Uint8Array {
  const out = new Uint8Array(n);
  const words = new Uint32Array(out.buffer, 0, Math.floor(n / 4));
  let x = seed >>> 0 || 1;
  const next = () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>>= 0);
  };
  for (let i = 0; i < words.length; i++) words[i] = next();
  for (let i = words.length * 4; i < n; i++) out[i] = next() & 0xff;
  return out;
}

function filled(n: number, word: number[]): Uint8Array {
  const out = new Uint8Array(n);
  for (let i = 0; i < n; i++) out[i] = word[i % 4]!;
  return out;
}

describe("the definition", () => {
  test("the worked examples of docs/digest.md", () => {
    const examples: [number[], string][] = [
      [[], "9ca066f1a4ab2eea"],
      [[1, 2, 3, 4, 5], "81bc13d290a33acf"],
      [[0xff, 0xff, 0xff, 0xff], "62d186e3287b69ff"],
    ];
    for (const [bytes, hex] of examples) {
      const data = Uint8Array.from(bytes);
      expect(formatDigest(referenceDigest(data))).toBe(hex);
      expect(formatDigest(digestBytes(data))).toBe(hex);
    }
  });

  test("libce agrees with the reference on every length to 64, odd lengths and edge words", () => {
    const cases: Uint8Array[] = [];
    for (let n = 0; n <= 64; n++) cases.push(randomBytes(n, 100 + n));
    for (const n of [1023, 1024, 1025, 4 * 65536 + 3, 4 * 65536 * 2 + 37]) cases.push(randomBytes(n, n));
    for (const word of [[0xff, 0xff, 0xff, 0xff], [0, 0, 0, 0x80], [0xff, 0xff, 0xff, 0x7f], [0, 0, 0, 0]])
      for (const n of [4, 7, 4096, 4 * 65536 + 2]) cases.push(filled(n, word));
    for (const data of cases) expect(`${data.length}: ${formatDigest(digestBytes(data))}`).toBe(`${data.length}: ${formatDigest(referenceDigest(data))}`);
  });

  test("formatDigest and parseDigest are inverse; a malformed digest is refused", () => {
    for (const d of [0n, 1n, MASK, 0x0123456789abcdefn]) expect(parseDigest(formatDigest(d))).toBe(d);
    expect(formatDigest(1n)).toBe("0000000000000001");
    expect(() => parseDigest("0123456789ABCDEF")).toThrow(/16 lowercase hex digits/);
    expect(() => parseDigest("123")).toThrow(/16 lowercase hex digits/);
  });
});

describe("what it catches", () => {
  test("every single flipped byte, in every bit, of a 1 KiB tensor", () => {
    const data = randomBytes(1027, 7);
    const d = digestBytes(data);
    const seen = new Set<bigint>([d]);
    for (let i = 0; i < data.length; i++)
      for (let bit = 0; bit < 8; bit++) {
        data[i]! ^= 1 << bit;
        seen.add(digestBytes(data));
        data[i]! ^= 1 << bit;
      }
    expect(seen.size).toBe(1 + 8 * data.length); // every one differs from the original and from each other
    expect(digestBytes(data)).toBe(d);
  });

  test("a swap of two different words at any two positions", () => {
    const data = randomBytes(4 * 200, 8);
    const v = new DataView(data.buffer);
    const d = digestBytes(data);
    for (let i = 0; i < 200; i++)
      for (let j = i + 1; j < 200; j += 7) {
        const a = v.getUint32(4 * i, true);
        const b = v.getUint32(4 * j, true);
        if (a === b) continue;
        v.setUint32(4 * i, b, true);
        v.setUint32(4 * j, a, true);
        expect(digestBytes(data)).not.toBe(d);
        v.setUint32(4 * i, a, true);
        v.setUint32(4 * j, b, true);
      }
    // the hardest words for a weighted sum: they differ by 2^31, the most factors of 2 two words can
    const w = new Uint8Array(4 * 64);
    const wv = new DataView(w.buffer);
    wv.setUint32(0, 0x80000000, true);
    const base = digestBytes(w);
    for (let j = 1; j < 64; j++) {
      wv.setUint32(0, 0, true);
      wv.setUint32(4 * j, 0x80000000, true);
      expect(digestBytes(w)).not.toBe(base);
      wv.setUint32(4 * j, 0, true);
      wv.setUint32(0, 0x80000000, true);
    }
  });

  test("truncation (of zeros too), zero-filling, and the length alone", () => {
    const data = randomBytes(4099, 9);
    const d = digestBytes(data);
    for (const n of [0, 1, 3, 4, 4095, 4096, 4098]) expect(digestBytes(data.subarray(0, n))).not.toBe(d);
    expect(digestBytes(new Uint8Array(data.length))).not.toBe(d);
    // zeros of different lengths: the words alone sum to 0, only the length tells them apart
    const zeros = new Set<bigint>();
    for (let n = 0; n <= 4096; n++) zeros.add(digestBytes(new Uint8Array(n)));
    expect(zeros.size).toBe(4097);
    const padded = new Uint8Array(4104);
    padded.set(data);
    expect(digestBytes(padded)).not.toBe(d); // trailing zeros appended
  });
});

describe("libce ops", () => {
  test("spans of regions on threads equal ce_digest_bytes, whatever the thread count or alignment", { timeout: 60_000 }, async () => {
    using ctx = Ctx.create("cpu", [0]);
    const data = randomBytes(80 * MiB + 11, 11);
    const { region, op } = ctx.regionAlloc(data.length);
    ctx.waitBlocking(op, 30_000, "allocating");
    ctx.regionWrite(region, 0, data);
    // spans cross the 16 MiB pieces a thread takes, start unaligned, end mid-word, are empty
    const spans: [number, number][] = [
      [0, data.length],
      [1, 40 * MiB + 3],
      [2, 16 * MiB],
      [6, 16 * MiB + 1],
      [3, 5],
      [data.length, 0],
      [1000, 0],
      [17 * MiB + 1, 33 * MiB + 2],
    ];
    const want = spans.map(([off, n]) => digestBytes(data.subarray(off, off + n)));
    const flat = BigUint64Array.from(spans.flatMap(([off, n]) => [BigInt(region), BigInt(off), BigInt(n)]));
    for (const threads of [1, 2, 3, 8]) {
      const r = await ctx.digest(flat, { threads, timeoutMs: 60_000 });
      expect(r.digests).toEqual(want);
      expect(r.endMs).toBeGreaterThanOrEqual(r.startMs);
    }
    expect((await ctx.digest(new BigUint64Array(0), { timeoutMs: 10_000 })).digests).toEqual([]);
    ctx.waitBlocking(ctx.regionRelease(region), 30_000, "releasing");
  });

  test("a digest after a file read sees the file's bytes; a CPU buffer digests too", async () => {
    const dir = mkdtempSync(join(tmpdir(), "ce-digest-"));
    dirs.push(dir);
    const data = randomBytes(3 * MiB + 1, 12);
    const path = join(dir, "t.bin");
    writeFileSync(path, data);
    using ctx = Ctx.create("cpu", [0]);
    const { region, op } = ctx.regionAlloc(data.length);
    ctx.waitBlocking(op, 30_000, "allocating");
    const read = ctx.regionReadFile(region, 0, path, 0, data.length, 2);
    const dig = ctx.digestSubmit(BigUint64Array.from([BigInt(region), 0n, BigInt(data.length)]), { after: read, threads: 2 });
    let got;
    while (!(got = ctx.digestCollect(dig, 1, "digest after read"))) await Bun.sleep(1);
    ctx.waitBlocking(read, 30_000, "reading");
    expect(got.digests).toEqual([digestBytes(data)]);

    const buf = ctx.bufAlloc(0, data.length + 64, { ipc: false });
    ctx.waitBlocking(ctx.h2d(buf, BigUint64Array.from([BigInt(region), 0n, 64n, BigInt(data.length)])), 30_000, "copying");
    const r = await ctx.bufDigest(buf, BigUint64Array.from([64n, BigInt(data.length), 65n, 10n]), { threads: 2, timeoutMs: 30_000 });
    expect(r.digests).toEqual([digestBytes(data), digestBytes(data.subarray(1, 11))]);
    buf.close();
  });

  test("a span past its region, an unknown region, and collecting another op's result are clear errors", () => {
    using ctx = Ctx.create("cpu", [0]);
    const { region, op } = ctx.regionAlloc(4096);
    ctx.waitBlocking(op, 30_000, "allocating");
    const bad = (spans: number[]) => () => ctx.digestSubmit(BigUint64Array.from(spans.map(BigInt)));
    expect(bad([region, 0, 4096, region, 4000, 97])).toThrow(/span 1 \(97 bytes at 4000\) overruns region \d+ \(4096 bytes\)/);
    expect(bad([region + 7, 0, 1])).toThrow(/region \d+ is not registered/);
    expect(bad([region, 0])).toThrow(/not whole 3-tuples/);
    const release = ctx.regionRelease(region);
    try {
      ctx.digestCollect(release, 0, "collecting a release");
      throw new Error("collected");
    } catch (e) {
      expect(e).toBeInstanceOf(NativeError);
      expect((e as Error).message).toMatch(/is not a digest op/);
    }
    ctx.waitBlocking(release, 30_000, "releasing");
    // room for fewer digests than the op has: refused, the op stays collectable
    const { region: r2, op: op2 } = ctx.regionAlloc(64);
    ctx.waitBlocking(op2, 30_000, "allocating");
    const dig = ctx.digestSubmit(BigUint64Array.from([BigInt(r2), 0n, 8n, BigInt(r2), 8n, 8n]));
    ctx.waitBlocking(ctx.digestSubmit(new BigUint64Array(0)), 10_000, "an empty digest"); // ce_op_poll collects one too
    let refused = "";
    for (let i = 0; i < 10_000 && !refused; i++) {
      try {
        expect(ctx.digestCollect(dig, 1, "collecting")).toBeUndefined(); // still running
        Bun.sleepSync(1);
      } catch (e) {
        refused = (e as Error).message;
      }
    }
    expect(refused).toMatch(/room for 1 digests, the op has 2/);
    const r = ctx.digestCollect(dig, 2, "collecting");
    expect(r?.digests).toEqual([digestBytes(new Uint8Array(8)), digestBytes(new Uint8Array(8))]);
  });

  test("the rate over a 1 GiB region (logged, not asserted)", { timeout: 120_000 }, async () => {
    using ctx = Ctx.create("cpu", [0]);
    const bytes = 1024 * MiB;
    const { region, op } = ctx.regionAlloc(bytes);
    ctx.waitBlocking(op, 60_000, "allocating");
    const block = randomBytes(64 * MiB, 13);
    for (let off = 0; off < bytes; off += block.length) ctx.regionWrite(region, off, block);
    const spans = BigUint64Array.from([BigInt(region), 0n, BigInt(bytes)]);
    const rates: string[] = [];
    const digests = new Set<bigint>();
    for (const threads of new Set([1, 2, availableParallelism()])) {
      const r = await ctx.digest(spans, { threads, timeoutMs: 120_000 });
      digests.add(r.digests[0]!);
      rates.push(`${threads} thread${threads > 1 ? "s" : ""}: ${(bytes / ((r.endMs - r.startMs) * 1e6)).toFixed(1)} GB/s`);
    }
    expect(digests.size).toBe(1);
    console.error(`digest of 1 GiB on the CPU backend: ${rates.join(", ")}`);
    ctx.waitBlocking(ctx.regionRelease(region), 30_000, "releasing");
  });
});

// The worker's side: a real Python with torch digests a file's tensors; ce digests the same spans.
const PYTHON = process.env.CE_PYTHON ?? "/usr/bin/python3";
const PYTHON_DIR = join(import.meta.dir, "..", "..", "python");
const SCRIPT = `
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
from ce_worker.digest import tensor_digests, format_digest
spec = json.loads(sys.argv[3])
data = torch.frombuffer(bytearray(open(sys.argv[2], "rb").read()), dtype=torch.uint8)
tensors = []
for off, n, dtype in spec:
    t = data[off:off + n]                     # storage offset as in the file: unaligned ones too
    if dtype != "uint8":
        t = t.clone().view(getattr(torch, dtype))
        t = t.reshape(2, -1) if t.numel() % 2 == 0 and t.numel() else t
    tensors.append(t)
print(json.dumps([format_digest(d) for d in tensor_digests(tensors)]))
`;

function pythonHasTorch(): string | undefined {
  if (!existsSync(PYTHON)) return `${PYTHON} not found`;
  const r = Bun.spawnSync([PYTHON, "-c", "import torch"], { stdout: "pipe", stderr: "pipe", timeout: 60_000 });
  return r.exitCode === 0 ? undefined : r.stderr.toString().trim().split("\n").at(-1);
}
const noTorch = pythonHasTorch();

describe("the worker's torch digest", () => {
  test.skipIf(!!noTorch)(
    `python/ce_worker/digest.py agrees with libce on a file's tensors${noTorch ? ` (skipped: ${noTorch})` : ""}`,
    async () => {
      const dir = mkdtempSync(join(tmpdir(), "ce-digest-py-"));
      dirs.push(dir);
      // random bytes, then a chunk of the extreme words (INT32_MIN, -1, INT32_MAX) that push the
      // worker's exact int64 sums to their bounds
      const rnd = randomBytes(70 * MiB + 7, 21);
      const ext: Uint8Array[] = [filled(16 * MiB + 4, [0, 0, 0, 0x80]), filled(16 * MiB + 8, [0xff, 0xff, 0xff, 0xff]), filled(8 * MiB, [0xff, 0xff, 0xff, 0x7f])];
      const total = rnd.length + ext.reduce((a, e) => a + e.length, 0);
      const data = new Uint8Array(total);
      data.set(rnd);
      let at = rnd.length;
      const spec: [number, number, string][] = [
        [0, 0, "uint8"],
        [0, 1, "uint8"],
        [5, 3, "uint8"],
        [8, 4, "float32"],
        [13, 5, "uint8"],
        [16, 1023, "uint8"],
        [1, 64 * MiB, "uint8"], // unaligned in memory: the worker copies piece by piece
        [0, 64 * MiB + 5, "uint8"], // four whole 16 MiB chunks and a tail
        [4096, 20 * MiB, "bfloat16"],
        [12, 33 * MiB + 8, "int64"],
      ];
      for (const e of ext) {
        data.set(e, at);
        spec.push([at, e.length, "uint8"]);
        at += e.length;
      }
      spec.push([rnd.length, total - rnd.length, "int32"]);
      const path = join(dir, "tensors.bin");
      writeFileSync(path, data);

      using ctx = Ctx.create("cpu", [0]);
      const m = ctx.regionMapFile(path, { pin: false, threads: 2 });
      ctx.waitBlocking(m.op, 60_000, "mapping");
      const flat = BigUint64Array.from(spec.flatMap(([off, n]) => [BigInt(m.region), BigInt(off), BigInt(n)]));
      const ours = (await ctx.digest(flat, { threads: 2, timeoutMs: 120_000 })).digests.map(formatDigest);
      ctx.waitBlocking(ctx.regionRelease(m.region), 30_000, "releasing");

      const py = Bun.spawn([PYTHON, "-c", SCRIPT, PYTHON_DIR, path, JSON.stringify(spec)], { stdout: "pipe", stderr: "pipe" });
      const timer = setTimeout(() => py.kill(), 240_000);
      const [out, err, code] = await Promise.all([new Response(py.stdout).text(), new Response(py.stderr).text(), py.exited]);
      clearTimeout(timer);
      if (code !== 0) throw new Error(`python exited ${code}: ${err}`);
      const theirs = JSON.parse(out) as string[];
      expect(theirs.map((d, i) => `${spec[i]!.join(" ")}: ${d}`)).toEqual(ours.map((d, i) => `${spec[i]!.join(" ")}: ${d}`));
    },
    300_000,
  );
});
