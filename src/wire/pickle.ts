// A small pickle writer (protocol 4), for the one dialect that needs pickles on the wire: the
// reference system's worker reads every request with pickle.loads. It writes only what that
// protocol carries: None, bools, ints of any size, str, bytes, tuples, lists, dicts with string
// keys, references to module globals, and calls of them (REDUCE). There is no reader: ce never
// unpickles anything, since loading a pickle runs whatever code it names.
//
// Opcodes and encodings follow CPython's Lib/pickle.py and pickletools.py. FRAME and MEMOIZE
// are optional in protocol 4 and are left out: every object is written once, in full.

/** A tuple; a JS array is written as a list. */
export class Tuple {
  readonly items: readonly PickleValue[];
  constructor(items: readonly PickleValue[]) {
    this.items = items;
  }
}

/** A module attribute, looked up by the reader: `torch.bfloat16` is `new Global("torch", "bfloat16")`. */
export class Global {
  readonly module: string;
  readonly name: string;
  constructor(module: string, name: string) {
    this.module = module;
    this.name = name;
  }
}

/** `callable(*args)`, evaluated by the reader: how torch.Size and exceptions are pickled. */
export class Reduce {
  readonly callable: PickleValue;
  readonly args: Tuple;
  constructor(callable: PickleValue, args: Tuple) {
    this.callable = callable;
    this.args = args;
  }
}

export type PickleValue =
  | null
  | boolean
  | number
  | bigint
  | string
  | Uint8Array
  | readonly PickleValue[]
  | Tuple
  | Global
  | Reduce
  | { readonly [key: string]: PickleValue };

export const tuple = (...items: PickleValue[]): Tuple => new Tuple(items);
export const global = (module: string, name: string): Global => new Global(module, name);
export const reduce = (callable: PickleValue, ...args: PickleValue[]): Reduce => new Reduce(callable, new Tuple(args));

// Lib/pickle.py's names, for the opcodes written here.
const OP = {
  MARK: 0x28, // (  push a mark
  STOP: 0x2e, // .  end of pickle
  NONE: 0x4e, // N
  NEWTRUE: 0x88,
  NEWFALSE: 0x89,
  BININT1: 0x4b, // K  1-byte unsigned
  BININT2: 0x4d, // M  2-byte unsigned, little-endian
  BININT: 0x4a, // J  4-byte signed, little-endian
  LONG1: 0x8a, // 1-byte length + two's complement, little-endian
  LONG4: 0x8b, // 4-byte length + the same
  SHORT_BINUNICODE: 0x8c, // 1-byte length + UTF-8
  BINUNICODE: 0x58, // X  4-byte length + UTF-8
  SHORT_BINBYTES: 0x43, // C  1-byte length + bytes
  BINBYTES: 0x42, // B  4-byte length + bytes
  EMPTY_TUPLE: 0x29, // )
  TUPLE1: 0x85,
  TUPLE2: 0x86,
  TUPLE3: 0x87,
  TUPLE: 0x74, // t  items since the mark
  EMPTY_LIST: 0x5d, // ]
  APPENDS: 0x65, // e  items since the mark onto the list below it
  EMPTY_DICT: 0x7d, // }
  SETITEMS: 0x75, // u  key/value pairs since the mark into the dict below it
  STACK_GLOBAL: 0x93, // module and name strings on the stack → the attribute
  REDUCE: 0x52, // R  callable, args tuple → callable(*args)
  PROTO: 0x80,
} as const;

const PICKLE_PROTOCOL = 4;
const UINT32_MAX = 0xffff_ffff;
const utf8 = new TextEncoder();

class Writer {
  #buf = new Uint8Array(256);
  #len = 0;

  #room(n: number): void {
    if (this.#len + n <= this.#buf.length) return;
    let size = this.#buf.length * 2;
    while (size < this.#len + n) size *= 2;
    const next = new Uint8Array(size);
    next.set(this.#buf.subarray(0, this.#len));
    this.#buf = next;
  }

  byte(b: number): void {
    this.#room(1);
    this.#buf[this.#len++] = b;
  }

  uint(value: number, bytes: 1 | 2 | 4): void {
    this.#room(bytes);
    for (let i = 0; i < bytes; i++) this.#buf[this.#len++] = (value >>> (8 * i)) & 0xff;
  }

  bytes(b: Uint8Array): void {
    this.#room(b.length);
    this.#buf.set(b, this.#len);
    this.#len += b.length;
  }

  done(): Uint8Array {
    return this.#buf.slice(0, this.#len);
  }
}

/** An int's minimal two's-complement bytes, little-endian, as pickle's encode_long writes them. */
function longBytes(x: bigint): Uint8Array {
  if (x === 0n) return new Uint8Array(0);
  const out: number[] = [];
  let v = x;
  for (;;) {
    const b = Number(v & 0xffn);
    out.push(b);
    v >>= 8n; // arithmetic: a negative value tends to -1
    if ((v === 0n && (b & 0x80) === 0) || (v === -1n && (b & 0x80) !== 0)) return Uint8Array.from(out);
  }
}

function writeInt(w: Writer, x: bigint): void {
  if (x >= 0n && x <= 0xffn) {
    w.byte(OP.BININT1);
    w.uint(Number(x), 1);
  } else if (x >= 0n && x <= 0xffffn) {
    w.byte(OP.BININT2);
    w.uint(Number(x), 2);
  } else if (x >= -(2n ** 31n) && x < 2n ** 31n) {
    w.byte(OP.BININT);
    w.uint(Number(BigInt.asUintN(32, x)), 4);
  } else {
    const b = longBytes(x);
    if (b.length < 256) {
      w.byte(OP.LONG1);
      w.uint(b.length, 1);
    } else {
      w.byte(OP.LONG4);
      w.uint(b.length, 4);
    }
    w.bytes(b);
  }
}

function writeSized(w: Writer, b: Uint8Array, short: number, long: number, what: string): void {
  if (b.length < 256) {
    w.byte(short);
    w.uint(b.length, 1);
  } else if (b.length <= UINT32_MAX) {
    w.byte(long);
    w.uint(b.length, 4);
  } else {
    throw new RangeError(`pickle: ${what} of ${b.length} bytes is over protocol 4's 4-byte length`);
  }
  w.bytes(b);
}

function writeTuple(w: Writer, items: readonly PickleValue[], depth: number): void {
  const short = [OP.EMPTY_TUPLE, OP.TUPLE1, OP.TUPLE2, OP.TUPLE3][items.length];
  if (short === undefined) w.byte(OP.MARK);
  for (const item of items) write(w, item, depth);
  w.byte(short ?? OP.TUPLE);
}

// Deeper than anything this dialect sends; a cycle ends here instead of in a stack overflow.
const MAX_DEPTH = 64;

function write(w: Writer, v: PickleValue, depth: number): void {
  if (depth > MAX_DEPTH) throw new RangeError(`pickle: nested deeper than ${MAX_DEPTH} (a cycle?)`);
  const d = depth + 1;
  if (v === null) return w.byte(OP.NONE);
  switch (typeof v) {
    case "boolean":
      return w.byte(v ? OP.NEWTRUE : OP.NEWFALSE);
    case "number":
      if (!Number.isSafeInteger(v)) throw new TypeError(`pickle: ${v} is not a safe integer (floats are not written; pass a bigint for large ints)`);
      return writeInt(w, BigInt(v));
    case "bigint":
      return writeInt(w, v);
    case "string":
      return writeSized(w, utf8.encode(v), OP.SHORT_BINUNICODE, OP.BINUNICODE, "a str");
  }
  if (v instanceof Uint8Array) return writeSized(w, v, OP.SHORT_BINBYTES, OP.BINBYTES, "a bytes object");
  if (v instanceof Tuple) return writeTuple(w, v.items, d);
  if (v instanceof Global) {
    writeSized(w, utf8.encode(v.module), OP.SHORT_BINUNICODE, OP.BINUNICODE, "a module name");
    writeSized(w, utf8.encode(v.name), OP.SHORT_BINUNICODE, OP.BINUNICODE, "a global's name");
    return w.byte(OP.STACK_GLOBAL);
  }
  if (v instanceof Reduce) {
    write(w, v.callable, d);
    writeTuple(w, v.args.items, d);
    return w.byte(OP.REDUCE);
  }
  if (Array.isArray(v)) {
    w.byte(OP.EMPTY_LIST);
    if (v.length === 0) return;
    w.byte(OP.MARK);
    for (const item of v as readonly PickleValue[]) write(w, item, d);
    return w.byte(OP.APPENDS);
  }
  if (Object.getPrototypeOf(v) !== Object.prototype && Object.getPrototypeOf(v) !== null) {
    throw new TypeError(`pickle: cannot write a ${(v as object).constructor?.name ?? "object"}`);
  }
  const entries = Object.entries(v as Record<string, PickleValue>);
  w.byte(OP.EMPTY_DICT);
  if (entries.length === 0) return;
  w.byte(OP.MARK);
  for (const [key, value] of entries) {
    writeSized(w, utf8.encode(key), OP.SHORT_BINUNICODE, OP.BINUNICODE, "a dict key");
    write(w, value, d);
  }
  w.byte(OP.SETITEMS);
}

/** The pickle (protocol 4) of one value: what Python's pickle.loads turns back into that object. */
export function pickle(value: PickleValue): Uint8Array {
  const w = new Writer();
  w.byte(OP.PROTO);
  w.uint(PICKLE_PROTOCOL, 1);
  write(w, value, 0);
  w.byte(OP.STOP);
  return w.done();
}
