// ce's pickle writer: exact bytes for each opcode it writes, and what Python's pickle.loads makes of
// them (one python3 process loads the whole table).
import { beforeAll, describe, expect, test } from "bun:test";
import { type Described, type Loaded, loadInPython, PYTHON_DEADLINE_MS, torchPython } from "../helpers/ce-reference";
import { Global, type PickleValue, Reduce, Tuple, global, pickle, reduce, tuple } from "../../src/wire/pickle";

const hex = (b: Uint8Array) => Buffer.from(b).toString("hex");
const ascii = (s: string) => Buffer.from(s, "latin1").toString("hex");
/** PROTO 4, the body, STOP. */
const framed = (body: string) => `8004${body}2e`;

describe("pickle bytes", () => {
  const cases: [string, PickleValue, string][] = [
    ["None is N", null, "4e"],
    ["True and False are NEWTRUE, NEWFALSE", [true, false], "5d28888965"],
    ["an int under 256 is BININT1", 5, "4b05"],
    ["an int under 65536 is BININT2, little-endian", 300, "4d2c01"],
    ["a negative int is BININT, 4 bytes two's complement", -1, "4affffffff"],
    ["2^31 needs LONG1 with a sign byte", 2 ** 31, "8a050000008000"],
    ["-(2^31)-1 needs LONG1", -(2 ** 31) - 1, "8a05ffffff7fff"],
    ["2^40 is LONG1 of 6 bytes", 2 ** 40, "8a06000000000001"],
    ["a bigint past 2^53 is LONG1", 2n ** 70n, "8a09000000000000000040"],
    ["a str is SHORT_BINUNICODE of its UTF-8", "é", "8c02c3a9"],
    ["bytes are SHORT_BINBYTES", Uint8Array.of(1, 2), "43020102"],
    ["the empty tuple is EMPTY_TUPLE", tuple(), "29"],
    ["tuples of 1-3 items are TUPLE1-3", tuple(1, 2, 3), "4b014b024b0387"],
    ["a longer tuple is MARK … TUPLE", tuple(1, 2, 3, 4), "284b014b024b034b0474"],
    ["an empty list is EMPTY_LIST", [], "5d"],
    ["a list is EMPTY_LIST MARK … APPENDS", [1], "5d284b0165"],
    ["an empty dict is EMPTY_DICT", {}, "7d"],
    ["a dict is EMPTY_DICT MARK key value … SETITEMS", { a: 1 }, "7d288c01614b0175"],
    ["a global is two strs and STACK_GLOBAL", global("torch", "bfloat16"), `8c05${ascii("torch")}8c08${ascii("bfloat16")}93`],
    ["a call is the callable, the args tuple and REDUCE", reduce(global("torch", "Size"), tuple(2, 3)), `8c05${ascii("torch")}8c04${ascii("Size")}934b024b038685` + "52"],
  ];
  for (const [name, value, body] of cases) {
    test(name, () => expect(hex(pickle(value))).toBe(framed(body)));
  }

  test("a str of 256 bytes or more is BINUNICODE with a 4-byte length", () => {
    expect(hex(pickle("x".repeat(256)).subarray(2, 7))).toBe("5800010000");
  });

  test("bytes of 256 or more are BINBYTES with a 4-byte length", () => {
    expect(hex(pickle(new Uint8Array(300)).subarray(2, 7))).toBe("422c010000");
  });

  test("an int of 256 bytes or more is LONG4", () => {
    expect(hex(pickle(2n ** 2100n).subarray(2, 7))).toBe("8b07010000");
  });

  test("what pickle cannot write exactly is refused", () => {
    expect(() => pickle(1.5)).toThrow(/not a safe integer/);
    expect(() => pickle(Number.NaN)).toThrow(/not a safe integer/);
    expect(() => pickle(2 ** 53)).toThrow(/pass a bigint/);
    expect(() => pickle(new Date() as unknown as PickleValue)).toThrow(/cannot write a Date/);
    const cycle: PickleValue[] = [];
    cycle.push(cycle);
    expect(() => pickle(cycle)).toThrow(/nested deeper/);
  });
});

/** What Python should describe a plain value as (globals and calls are spelled out per case). */
function expected(v: PickleValue): Described {
  if (v === null) return { t: "None" };
  if (typeof v === "boolean") return { t: "bool", v };
  if (typeof v === "number" || typeof v === "bigint") return { t: "int", v: String(v) };
  if (typeof v === "string") return { t: "str", v };
  if (v instanceof Uint8Array) return { t: "bytes", hex: hex(v) };
  if (v instanceof Tuple) return { t: "tuple", items: v.items.map(expected) };
  if (Array.isArray(v)) return { t: "list", items: (v as PickleValue[]).map(expected) };
  if (v instanceof Global || v instanceof Reduce) throw new Error("spell out globals in the case");
  return { t: "dict", items: Object.entries(v).map(([k, x]) => [k, expected(x as PickleValue)]) };
}

const py = torchPython();

describe.skipIf(!py.ok)(`pickle.loads in ${py.ok ? `${py.python} (${py.reason})` : `skipped: ${py.reason}`}`, () => {
  const plain: [string, PickleValue][] = [
    ["None", null],
    ["booleans", [true, false]],
    [
      "ints at every opcode's edges",
      [0, 255, 256, 65535, 65536, -1, -(2 ** 31), 2 ** 31 - 1, 2 ** 31, -(2 ** 31) - 1, 127, 128, -128, -129, Number.MAX_SAFE_INTEGER, -Number.MAX_SAFE_INTEGER],
    ],
    ["big ints", [2n ** 64n, -(2n ** 64n), 2n ** 63n - 1n, -(2n ** 63n), 2n ** 2100n, -(2n ** 2100n) + 7n]],
    ["strs of every length class and script", ["", "a", "x".repeat(255), "y".repeat(256), "héllo ✓ 😀", "model.layers.0.self_attn.q_proj.weight"]],
    ["bytes", [new Uint8Array(0), Uint8Array.from({ length: 64 }, (_, i) => i * 7), new Uint8Array(255).fill(0x80), new Uint8Array(70_000).fill(1)]],
    ["tuples of 0 to 5 items, nested", tuple(tuple(), tuple(1), tuple(1, 2), tuple(1, 2, 3), tuple(1, 2, 3, 4), tuple(tuple(tuple("deep"))))],
    ["a long list", Array.from({ length: 2500 }, (_, i) => i)],
    ["dicts, nested, in insertion order", { z: 1, a: [1, { b: tuple(null, "c") }], "": {} }],
  ];

  let loaded: Loaded[] = [];
  const extra: PickleValue[] = [
    reduce(global("torch", "Size"), tuple(4096, 11008)),
    reduce(global("torch", "Size"), tuple()),
    [global("torch", "bfloat16"), global("torch", "float32"), global("torch", "uint8"), global("torch", "int64"), global("torch", "bool")],
    reduce(global("builtins", "RuntimeError"), "Some workers failed to update weights"),
    [global("torch.multiprocessing.reductions", "rebuild_cuda_tensor"), global("torch", "Tensor"), global("torch.storage", "TypedStorage")],
    global("os", "system"),
  ];

  beforeAll(() => {
    loaded = loadInPython(py.python, [...plain.map(([, v]) => pickle(v)), ...extra.map(pickle)]);
  }, PYTHON_DEADLINE_MS);

  plain.forEach(([name, value], i) => {
    test(`${name} load as the same values`, () => {
      expect(loaded[i]?.error).toBeUndefined();
      expect(loaded[i]!.value).toEqual(expected(value));
    });
  });

  const at = (k: number) => loaded[plain.length + k]!;

  test("torch.Size loads as a real torch.Size", () => {
    expect(at(0).value).toEqual({ t: "torch.Size", v: [4096, 11008] });
    expect(at(1).value).toEqual({ t: "torch.Size", v: [] });
  });

  test("torch dtypes load as real torch.dtype objects", () => {
    expect(at(2).value).toEqual({
      t: "list",
      items: ["torch.bfloat16", "torch.float32", "torch.uint8", "torch.int64", "torch.bool"].map((v) => ({ t: "torch.dtype", v })),
    });
  });

  test("an exception loads as an instance with its message", () => {
    expect(at(3).value).toEqual({ t: "exception", class: "RuntimeError", args: [{ t: "str", v: "Some workers failed to update weights" }] });
  });

  test("module globals resolve by module and name", () => {
    expect(at(4).value).toEqual({
      t: "list",
      items: [
        { t: "global", v: "stand-in torch.multiprocessing.reductions.rebuild_cuda_tensor" },
        { t: "global", v: "torch.Tensor" },
        { t: "global", v: "torch.storage.TypedStorage" },
      ],
    });
  });

  test("the loader itself refuses globals outside the dialect's few", () => {
    expect(at(5).error).toMatch(/os\.system is not one the dialect may name/);
  });

  test("only protocol-4 opcodes of the writer's set appear, and nothing follows STOP", () => {
    const used = new Set(loaded.flatMap((l) => l.opcodes ?? []));
    const allowed = new Set([
      "PROTO", "STOP", "NONE", "NEWTRUE", "NEWFALSE", "BININT1", "BININT2", "BININT", "LONG1", "LONG4",
      "SHORT_BINUNICODE", "BINUNICODE", "SHORT_BINBYTES", "BINBYTES", "EMPTY_TUPLE", "TUPLE1", "TUPLE2", "TUPLE3",
      "TUPLE", "MARK", "EMPTY_LIST", "APPENDS", "EMPTY_DICT", "SETITEMS", "STACK_GLOBAL", "REDUCE",
    ]);
    expect([...used].filter((op) => !allowed.has(op))).toEqual([]);
    expect(used.has("STACK_GLOBAL") && used.has("REDUCE") && used.has("LONG4")).toBe(true);
  });
});
