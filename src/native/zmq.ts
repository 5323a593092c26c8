// libzmq through bun:ffi: where the library comes from, the symbol table (in zmq.h's words), and
// thin typed calls. zmq.ts builds async sockets on top; nothing outside src/native/ sees a Pointer.
//
// Every function here returns at once: sends and receives are made with ZMQ_DONTWAIT and
// zmq_poll with timeout 0, so the JS thread never sleeps inside libzmq (zmq_ctx_term excepted,
// which waits only for sockets that are still open or lingering; zmq.ts closes them first with
// linger 0).
import { dlopen, FFIType, toArrayBuffer, type Pointer } from "bun:ffi";
import { closeSync, fsyncSync, lstatSync, mkdirSync, openSync, readFileSync, renameSync, statSync, unlinkSync, writeSync } from "node:fs";
import { constants as osConstants, homedir } from "node:os";
import { join } from "node:path";
import { config } from "../base/config";
import { errorMessage, NativeError } from "../base/errors";

// ---------------------------------------------------------------------------------------------
// Constants from zmq.h. Their values never change between libzmq releases (zmq.h says so).

/** Socket types. */
export const ZMQ_PAIR = 0;
export const ZMQ_PUB = 1;
export const ZMQ_SUB = 2;
export const ZMQ_REQ = 3;
export const ZMQ_REP = 4;
export const ZMQ_DEALER = 5;
export const ZMQ_ROUTER = 6;
export const ZMQ_PULL = 7;
export const ZMQ_PUSH = 8;

/** Context options (zmq_ctx_set). */
export const ZMQ_IO_THREADS = 1;
/** 0: zmq_ctx_term does not wait for sockets whose linger is infinite (libzmq ≥ 4.2). */
export const ZMQ_BLOCKY = 70;

/** Socket options (zmq_setsockopt / zmq_getsockopt). */
export const ZMQ_ROUTING_ID = 5;
export const ZMQ_SUBSCRIBE = 6;
export const ZMQ_LINGER = 17;
export const ZMQ_MAXMSGSIZE = 22; // int64_t, unlike the others
export const ZMQ_SNDHWM = 23;
export const ZMQ_RCVHWM = 24;
export const ZMQ_LAST_ENDPOINT = 32;
export const ZMQ_IMMEDIATE = 39;
export const ZMQ_REQ_CORRELATE = 52;
export const ZMQ_REQ_RELAXED = 53;
export const ZMQ_ROUTER_MANDATORY = 33;

/** Send/recv flags. */
export const ZMQ_DONTWAIT = 1;
export const ZMQ_SNDMORE = 2;

/** zmq_pollitem_t events. */
export const ZMQ_POLLIN = 1;
export const ZMQ_POLLOUT = 2;
export const ZMQ_POLLERR = 4;

/** libzmq's own error numbers sit above ZMQ_HAUSNUMERO so they never collide with the OS's. */
const ZMQ_HAUSNUMERO = 156384712;
const ZMQ_ERRNO_NAMES: Record<number, string> = {
  [ZMQ_HAUSNUMERO + 51]: "EFSM",
  [ZMQ_HAUSNUMERO + 52]: "ENOCOMPATPROTO",
  [ZMQ_HAUSNUMERO + 53]: "ETERM",
  [ZMQ_HAUSNUMERO + 54]: "EMTHREAD",
};
const EAGAIN = osConstants.errno.EAGAIN;
const EINTR = osConstants.errno.EINTR;

// ---------------------------------------------------------------------------------------------
// The symbol table, in zmq.h's order of sections: version and errors, context, socket, message, poll.

const symbols = {
  // void zmq_version(int *major, int *minor, int *patch);
  zmq_version: { args: [FFIType.ptr, FFIType.ptr, FFIType.ptr], returns: FFIType.void },
  // int zmq_errno(void);    the calling thread's errno, which is how libzmq reports every failure
  zmq_errno: { args: [], returns: FFIType.i32 },
  // const char *zmq_strerror(int errnum);    static text, never freed
  zmq_strerror: { args: [FFIType.i32], returns: FFIType.cstring },

  // void *zmq_ctx_new(void);    starts the I/O thread(s)
  zmq_ctx_new: { args: [], returns: FFIType.ptr },
  // int zmq_ctx_term(void *context);    BLOCKS until every socket of the context is closed and has lingered
  zmq_ctx_term: { args: [FFIType.ptr], returns: FFIType.i32 },
  // int zmq_ctx_set(void *context, int option, int optval);
  zmq_ctx_set: { args: [FFIType.ptr, FFIType.i32, FFIType.i32], returns: FFIType.i32 },

  // void *zmq_socket(void *context, int type);
  zmq_socket: { args: [FFIType.ptr, FFIType.i32], returns: FFIType.ptr },
  // int zmq_close(void *s);    returns at once; the socket is torn down by the context's reaper thread
  zmq_close: { args: [FFIType.ptr], returns: FFIType.i32 },
  // int zmq_setsockopt(void *s, int option, const void *optval, size_t optvallen);
  zmq_setsockopt: { args: [FFIType.ptr, FFIType.i32, FFIType.ptr, FFIType.u64], returns: FFIType.i32 },
  // int zmq_getsockopt(void *s, int option, void *optval, size_t *optvallen);    optvallen is in/out
  zmq_getsockopt: { args: [FFIType.ptr, FFIType.i32, FFIType.ptr, FFIType.ptr], returns: FFIType.i32 },
  // int zmq_bind(void *s, const char *addr);    binds before returning (EADDRINUSE comes back here)
  zmq_bind: { args: [FFIType.ptr, FFIType.ptr], returns: FFIType.i32 },
  // int zmq_connect(void *s, const char *addr);    asynchronous: succeeds with no peer listening yet
  zmq_connect: { args: [FFIType.ptr, FFIType.ptr], returns: FFIType.i32 },
  // int zmq_unbind(void *s, const char *addr);
  zmq_unbind: { args: [FFIType.ptr, FFIType.ptr], returns: FFIType.i32 },
  // int zmq_disconnect(void *s, const char *addr);
  zmq_disconnect: { args: [FFIType.ptr, FFIType.ptr], returns: FFIType.i32 },
  // int zmq_send(void *s, const void *buf, size_t len, int flags);
  //   copies buf into a new message before returning, so buf is borrowed for the call only;
  //   returns len (clamped to INT_MAX), or -1
  zmq_send: { args: [FFIType.ptr, FFIType.ptr, FFIType.u64, FFIType.i32], returns: FFIType.i32 },

  // int zmq_msg_init(zmq_msg_t *msg);    zmq_msg_t is a caller-allocated 64-byte, pointer-aligned struct
  zmq_msg_init: { args: [FFIType.ptr], returns: FFIType.i32 },
  // int zmq_msg_recv(zmq_msg_t *msg, void *s, int flags);    one frame; returns its size (clamped), or -1
  zmq_msg_recv: { args: [FFIType.ptr, FFIType.ptr, FFIType.i32], returns: FFIType.i32 },
  // void *zmq_msg_data(zmq_msg_t *msg);    valid until zmq_msg_close
  zmq_msg_data: { args: [FFIType.ptr], returns: FFIType.ptr },
  // size_t zmq_msg_size(const zmq_msg_t *msg);
  zmq_msg_size: { args: [FFIType.ptr], returns: FFIType.u64 },
  // int zmq_msg_more(const zmq_msg_t *msg);    1 when another frame of the same message follows
  zmq_msg_more: { args: [FFIType.ptr], returns: FFIType.i32 },
  // int zmq_msg_close(zmq_msg_t *msg);
  zmq_msg_close: { args: [FFIType.ptr], returns: FFIType.i32 },

  // int zmq_poll(zmq_pollitem_t *items, int nitems, long timeout);
  //   zmq_pollitem_t on Linux x64: { void *socket; int fd; short events; short revents; } = 16 bytes;
  //   timeout 0 returns at once
  zmq_poll: { args: [FFIType.ptr, FFIType.i32, FFIType.i64], returns: FFIType.i32 },
} as const;

type ZmqSymbols = ReturnType<typeof dlopen<typeof symbols>>["symbols"];

/** zmq_socket's result, opaque outside this file. */
export type SocketHandle = number & { readonly __zmqSocket: unique symbol };
/** zmq_ctx_new's result, opaque outside this file. */
export type ContextHandle = number & { readonly __zmqContext: unique symbol };

/** Needs ZMQ_BLOCKY (4.2) and ZMQ_REQ_RELAXED / ZMQ_REQ_CORRELATE (4.0). */
const MIN_VERSION: readonly [number, number] = [4, 2];

// ---------------------------------------------------------------------------------------------
// Library lookup: CE_LIBZMQ, else the libzmq that the zeromq package's prebuilt addon.node
// carries statically (embedded in dist/ce by `bun build --compile`), else the system's.

/**
 * The addon's path. Bun's bundler embeds the file behind this import in a compiled binary and
 * yields its path inside the binary's virtual file system (/$bunfs/root/addon-<hash>.node). Run
 * from source, Bun refuses to import a .node file that way ("To load Node-API modules, use
 * require()"), so the import throws and the copy in node_modules is used. The specifier must stay
 * a literal for the bundler to see it. The build is for x64 glibc ≥ 2.27.
 */
async function findEmbeddedAddon(): Promise<string | undefined> {
  if (process.platform !== "linux" || process.arch !== "x64") return undefined;
  try {
    // @ts-ignore TypeScript has no declaration for a .node file; imported as { type: "file" } it is a path
    const mod = await import("../../node_modules/zeromq/build/linux/x64/node/glibc-127-Release/addon.node", {
      with: { type: "file" },
    });
    return (mod as { default: string }).default;
  } catch {
    return join(import.meta.dir, "../../node_modules/zeromq/build/linux/x64/node/glibc-127-Release/addon.node");
  }
}

const embeddedAddon = await findEmbeddedAddon();

const SYSTEM_LIBZMQ = "libzmq.so.5";

export interface ZmqLibraryInfo {
  /** The file dlopen'ed. */
  path: string;
  /** Where it came from: the CE_LIBZMQ variable, the embedded addon, or the system's libzmq.so.5. */
  source: "CE_LIBZMQ" | "embedded" | "system";
  /** "4.3.5" */
  version: string;
  /** Libraries tried before this one, each with why it did not load (the embedded one on musl, say). */
  skipped: string[];
}

interface Loaded {
  sym: ZmqSymbols;
  info: ZmqLibraryInfo;
}

let loaded: Loaded | undefined;

/** Loads libzmq once; throws a NativeError naming every path tried when none loads. */
function lib(): Loaded {
  loaded ??= loadLibzmq();
  return loaded;
}

/** Which libzmq ce uses, for `ce doctor` and error reports. Loads it if needed. */
export function zmqLibrary(): ZmqLibraryInfo {
  return lib().info;
}

function loadLibzmq(): Loaded {
  const tried: string[] = [];
  const attempt = (source: ZmqLibraryInfo["source"], path: () => string, label: string): Loaded | undefined => {
    let file = label;
    try {
      file = path();
      const opened = dlopen(file, symbols);
      const v = new Int32Array(3);
      opened.symbols.zmq_version(v.subarray(0, 1), v.subarray(1, 2), v.subarray(2, 3));
      const version = `${v[0]}.${v[1]}.${v[2]}`;
      if (v[0]! < MIN_VERSION[0] || (v[0] === MIN_VERSION[0] && v[1]! < MIN_VERSION[1])) {
        opened.close();
        throw new Error(`libzmq ${version} is too old, ce needs ${MIN_VERSION.join(".")} or newer`);
      }
      return { sym: opened.symbols, info: { path: file, source, version, skipped: [...tried] } };
    } catch (err) {
      tried.push(`${file} (${source}): ${errorMessage(err)}`);
      return undefined;
    }
  };

  // A path the user named is used or refused, never silently replaced by another libzmq.
  const override = config.CE_LIBZMQ;
  const found = override
    ? attempt("CE_LIBZMQ", () => override, override)
    : ((embeddedAddon !== undefined ? attempt("embedded", () => realFile(embeddedAddon), embeddedAddon) : undefined) ??
      attempt("system", () => SYSTEM_LIBZMQ, SYSTEM_LIBZMQ));
  if (found) return found;
  throw new NativeError(-1, "E_NO_LIBZMQ", "load libzmq", `no usable libzmq; tried:\n  ${tried.join("\n  ")}`, {
    hint: override
      ? "CE_LIBZMQ names a file that does not load; point it at a libzmq.so.5 (4.2 or newer) or unset it"
      : "set CE_LIBZMQ to the path of a libzmq.so.5 (4.2 or newer), or install one (apt install libzmq5)",
  });
}

/**
 * A path dlopen can open. Files inside a compiled binary's virtual file system are copied once to a
 * cache directory, named by content hash so two ce versions never share a stale copy, written to a
 * temporary name and renamed so a reader never sees half a file.
 */
function realFile(path: string): string {
  if (!path.startsWith("/$bunfs/")) return path;
  const bytes = readFileSync(path);
  const hash = new Bun.CryptoHasher("sha256").update(bytes).digest("hex").slice(0, 16);
  const name = `libzmq-${hash}.so`;
  const problems: string[] = [];
  for (const dir of cacheDirs()) {
    const file = join(dir, name);
    try {
      mkdirSync(dir, { recursive: true, mode: 0o700 });
      assertPrivate(dir);
      if (sizeOf(file) === bytes.length) return file;
      const tmp = `${file}.${process.pid}.${Date.now()}.tmp`;
      const fd = openSync(tmp, "wx", 0o700);
      try {
        for (let off = 0; off < bytes.length; ) off += writeSync(fd, bytes, off);
        fsyncSync(fd);
      } finally {
        closeSync(fd);
      }
      try {
        renameSync(tmp, file);
      } catch (err) {
        unlinkSync(tmp);
        throw err;
      }
      return file;
    } catch (err) {
      problems.push(`${dir}: ${errorMessage(err)}`);
    }
  }
  throw new Error(`cannot copy the embedded libzmq out of the ce binary (${problems.join("; ")})`);
}

function cacheDirs(): string[] {
  const dirs: string[] = [];
  const xdg = process.env.XDG_CACHE_HOME;
  if (xdg) dirs.push(join(xdg, "ce"));
  else {
    try {
      dirs.push(join(homedir(), ".cache", "ce"));
    } catch {
      // no home directory: /tmp below
    }
  }
  dirs.push(`/tmp/ce-${process.getuid?.() ?? "user"}`);
  return dirs;
}

/** Code loaded from a shared directory such as /tmp must come from one only we can write to. */
function assertPrivate(dir: string): void {
  const st = lstatSync(dir);
  const uid = process.getuid?.();
  if (!st.isDirectory()) throw new Error("not a directory");
  if (uid !== undefined && st.uid !== uid) throw new Error(`owned by uid ${st.uid}, not ${uid}`);
  if ((st.mode & 0o022) !== 0) throw new Error(`writable by others (mode ${(st.mode & 0o777).toString(8)})`);
}

function sizeOf(file: string): number | undefined {
  try {
    return statSync(file).size;
  } catch {
    return undefined;
  }
}

// ---------------------------------------------------------------------------------------------
// Errors

const OS_ERRNO_NAMES: Record<number, string> = Object.fromEntries(
  Object.entries(osConstants.errno).map(([name, value]) => [value, name]),
);

/** The NativeError for the call that just failed: zmq's errno, its name, strerror's text. */
function failure(sym: ZmqSymbols, errno: number, what: string): NativeError {
  const name = ZMQ_ERRNO_NAMES[errno] ?? OS_ERRNO_NAMES[errno] ?? `errno ${errno}`;
  return new NativeError(errno, `ZMQ_${name}`, what, String(sym.zmq_strerror(errno)));
}

function check(sym: ZmqSymbols, rc: number, what: string): void {
  if (rc === -1) throw failure(sym, sym.zmq_errno(), what);
}

/** A string as a NUL-terminated buffer; the caller holds it in a local for the call. */
function cstr(text: string): Buffer {
  return Buffer.from(`${text}\0`, "utf8");
}

// ---------------------------------------------------------------------------------------------
// Typed calls

export function ctxNew(ioThreads: number): ContextHandle {
  const { sym } = lib();
  const ctx = sym.zmq_ctx_new();
  if (ctx === null) throw failure(sym, sym.zmq_errno(), "zmq_ctx_new()");
  check(sym, sym.zmq_ctx_set(ctx, ZMQ_IO_THREADS, ioThreads), `zmq_ctx_set(ZMQ_IO_THREADS, ${ioThreads})`);
  check(sym, sym.zmq_ctx_set(ctx, ZMQ_BLOCKY, 0), "zmq_ctx_set(ZMQ_BLOCKY, 0)");
  return ctx as number as ContextHandle;
}

/** Blocks only while sockets of ctx are open or lingering: close them (linger 0) first. */
export function ctxTerm(ctx: ContextHandle): void {
  const { sym } = lib();
  for (;;) {
    if (sym.zmq_ctx_term(ctx as number as Pointer) === 0) return;
    const errno = sym.zmq_errno();
    if (errno !== EINTR) throw failure(sym, errno, "zmq_ctx_term()");
  }
}

export function socketNew(ctx: ContextHandle, type: number, what: string): SocketHandle {
  const { sym } = lib();
  const s = sym.zmq_socket(ctx as number as Pointer, type);
  if (s === null) throw failure(sym, sym.zmq_errno(), what);
  return s as number as SocketHandle;
}

export function socketClose(s: SocketHandle): void {
  const { sym } = lib();
  check(sym, sym.zmq_close(s as number as Pointer), "zmq_close()");
}

export function setIntOption(s: SocketHandle, option: number, value: number, what: string): void {
  const { sym } = lib();
  const v = new Int32Array([value]);
  check(sym, sym.zmq_setsockopt(s as number as Pointer, option, v, 4), what);
}

export function setInt64Option(s: SocketHandle, option: number, value: number, what: string): void {
  const { sym } = lib();
  const v = new BigInt64Array([BigInt(value)]);
  check(sym, sym.zmq_setsockopt(s as number as Pointer, option, v, 8), what);
}

export function setBytesOption(s: SocketHandle, option: number, value: Uint8Array, what: string): void {
  const { sym } = lib();
  // A zero-length typed array may cross as a null pointer; libzmq accepts (NULL, 0) for byte options.
  check(sym, sym.zmq_setsockopt(s as number as Pointer, option, value, value.byteLength), what);
}

/** A string option such as ZMQ_LAST_ENDPOINT (libzmq writes it NUL-terminated). */
export function getStringOption(s: SocketHandle, option: number, what: string): string {
  const { sym } = lib();
  const buf = new Uint8Array(1024);
  const len = new BigUint64Array([BigInt(buf.byteLength)]);
  check(sym, sym.zmq_getsockopt(s as number as Pointer, option, buf, len), what);
  const n = Number(len[0]);
  return new TextDecoder().decode(buf.subarray(0, n > 0 && buf[n - 1] === 0 ? n - 1 : n));
}

export function bind(s: SocketHandle, endpoint: string, what: string): void {
  const { sym } = lib();
  const addr = cstr(endpoint);
  check(sym, sym.zmq_bind(s as number as Pointer, addr), what);
}

export function connect(s: SocketHandle, endpoint: string, what: string): void {
  const { sym } = lib();
  const addr = cstr(endpoint);
  check(sym, sym.zmq_connect(s as number as Pointer, addr), what);
}

export function unbind(s: SocketHandle, endpoint: string, what: string): void {
  const { sym } = lib();
  const addr = cstr(endpoint);
  check(sym, sym.zmq_unbind(s as number as Pointer, addr), what);
}

export function disconnect(s: SocketHandle, endpoint: string, what: string): void {
  const { sym } = lib();
  const addr = cstr(endpoint);
  check(sym, sym.zmq_disconnect(s as number as Pointer, addr), what);
}

/**
 * Sends one frame without waiting (ZMQ_DONTWAIT is added); more = ZMQ_SNDMORE. Returns false when
 * the socket cannot take it now (EAGAIN, EINTR): not an error, try again when it polls writable.
 * The bytes are copied by libzmq before this returns.
 */
export function sendFrame(s: SocketHandle, bytes: Uint8Array, more: boolean, what: string): boolean {
  const { sym } = lib();
  const flags = ZMQ_DONTWAIT | (more ? ZMQ_SNDMORE : 0);
  if (sym.zmq_send(s as number as Pointer, bytes, bytes.byteLength, flags) !== -1) return true;
  const errno = sym.zmq_errno();
  if (errno === EAGAIN || errno === EINTR) return false;
  throw failure(sym, errno, what);
}

export interface Frame {
  bytes: Uint8Array;
  /** Another frame of the same message follows. */
  more: boolean;
}

// One zmq_msg_t serves every receive: the JS thread is the only caller, and each use closes it.
// BigUint64Array keeps it pointer-aligned.
const msg = new BigUint64Array(8);

/**
 * Receives one frame without waiting, copied into JS memory. Returns undefined when none is
 * there (EAGAIN, EINTR): not an error.
 */
export function recvFrame(s: SocketHandle, what: string): Frame | undefined {
  const { sym } = lib();
  check(sym, sym.zmq_msg_init(msg), `${what}: zmq_msg_init`);
  if (sym.zmq_msg_recv(msg, s as number as Pointer, ZMQ_DONTWAIT) === -1) {
    const errno = sym.zmq_errno();
    sym.zmq_msg_close(msg);
    if (errno === EAGAIN || errno === EINTR) return undefined;
    throw failure(sym, errno, what);
  }
  const size = safeNumber(sym.zmq_msg_size(msg), "zmq_msg_size");
  const data = sym.zmq_msg_data(msg);
  const bytes = size === 0 || data === null ? new Uint8Array(0) : new Uint8Array(toArrayBuffer(data, 0, size).slice(0));
  const more = sym.zmq_msg_more(msg) === 1;
  sym.zmq_msg_close(msg);
  return { bytes, more };
}

const POLLITEM_BYTES = 16;
let pollItems = new Uint8Array(POLLITEM_BYTES * 8);

/**
 * zmq_poll with timeout 0 over sockets[i] for events[i] (ZMQ_POLLIN | ZMQ_POLLOUT); writes each
 * socket's ready events to revents[i]. One call however many sockets wait.
 */
export function pollSockets(sockets: readonly SocketHandle[], events: readonly number[], revents: number[]): void {
  const { sym } = lib();
  const n = sockets.length;
  if (pollItems.byteLength < n * POLLITEM_BYTES) pollItems = new Uint8Array(n * 2 * POLLITEM_BYTES);
  const items = new DataView(pollItems.buffer);
  for (let i = 0; i < n; i++) {
    const at = i * POLLITEM_BYTES;
    items.setBigUint64(at, BigInt(sockets[i]!), true); // void *socket
    items.setInt32(at + 8, 0, true); // int fd (unused for a zmq socket)
    items.setInt16(at + 12, events[i]!, true); // short events
    items.setInt16(at + 14, 0, true); // short revents
  }
  for (;;) {
    if (sym.zmq_poll(pollItems, n, 0) !== -1) break;
    const errno = sym.zmq_errno();
    if (errno !== EINTR) throw failure(sym, errno, `zmq_poll(${n} sockets)`);
  }
  for (let i = 0; i < n; i++) revents[i] = items.getInt16(i * POLLITEM_BYTES + 14, true);
}

function safeNumber(value: bigint | number, what: string): number {
  const n = Number(value);
  if (!Number.isSafeInteger(n)) throw new RangeError(`${what} returned ${value}, beyond 2^53`);
  return n;
}
