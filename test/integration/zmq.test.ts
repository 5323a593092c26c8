import { afterAll, describe, expect, test } from "bun:test";
import { mkdtempSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { AbortedError, CeError, NativeError, TimeoutError } from "../../src/base/errors";
import { zmqLibrary } from "../../src/native/zmq";
import { defaultContext, ZmqContext, type ZmqSocket } from "../../src/transport/zmq";

const jsonFrame = (value: unknown) => new TextEncoder().encode(JSON.stringify(value));
const parseJsonFrame = (bytes: Uint8Array) => JSON.parse(new TextDecoder().decode(bytes)) as unknown;

const ROOT = join(import.meta.dir, "../..");
const ECHO = join(ROOT, "test/helpers/zmq-echo.ts");
const ADDON = join(ROOT, "node_modules/zeromq/build/linux/x64/node/glibc-127-Release/addon.node");

let n = 0;
const ipc = () => `ipc://@ce-test-${process.pid}-${n++}`;
const text = (bytes: Uint8Array | undefined) => new TextDecoder().decode(bytes);
const ctx = defaultContext();

/** A REQ bound and a REP connected to it, as ce and a worker are. */
function pair(endpoint = ipc()): { req: ZmqSocket; rep: ZmqSocket; endpoint: string } {
  const req = ctx.socket("REQ");
  const bound = req.bind(endpoint);
  const rep = ctx.socket("REP");
  rep.connect(bound);
  return { req, rep, endpoint: bound };
}

/** Runs `bun -e script` with a deadline; a child that hangs is killed and reported as "hung". */
async function runBun(script: string, env: Record<string, string> = {}, deadlineMs = 10_000) {
  const child = Bun.spawn([process.execPath, "-e", script], { env: { ...process.env, ...env }, stdout: "pipe", stderr: "pipe" });
  const code = await Promise.race([child.exited, Bun.sleep(deadlineMs).then(() => "hung" as const)]);
  if (code === "hung") child.kill();
  return { code, stdout: await new Response(child.stdout).text(), stderr: await new Response(child.stderr).text() };
}

const children: Array<{ kill(): void }> = [];
afterAll(() => {
  for (const child of children) child.kill();
});

/** Starts the echo helper in its own process. */
function spawnEcho(mode: "connect" | "bind", endpoint: string) {
  const child = Bun.spawn([process.execPath, ECHO, mode, endpoint], { stdin: "pipe", stdout: "pipe", stderr: "inherit" });
  children.push(child);
  return child;
}

describe("ZeroMQ sockets", () => {
  test("the embedded libzmq loads from node_modules when run from source", () => {
    const lib = zmqLibrary();
    expect(lib.source).toBe(process.env.CE_LIBZMQ ? "CE_LIBZMQ" : "embedded");
    expect(lib.version).toMatch(/^4\.\d+\.\d+$/);
  });

  test("a REQ/REP round trip works over an abstract-namespace ipc endpoint", async () => {
    const { req, rep, endpoint } = pair();
    using _req = req;
    using _rep = rep;
    expect(endpoint).toStartWith("ipc://@ce-test-");
    await req.send(["ping"], { timeoutMs: 5000 });
    expect((await rep.recv({ timeoutMs: 5000 })).map(text)).toEqual(["ping"]);
    await rep.send(["pong"], { timeoutMs: 5000 });
    expect((await req.recv({ timeoutMs: 5000 })).map(text)).toEqual(["pong"]);
  });

  test("binding tcp://127.0.0.1:* returns the port actually bound", async () => {
    const { req, rep, endpoint } = pair("tcp://127.0.0.1:*");
    using _req = req;
    using _rep = rep;
    expect(endpoint).toMatch(/^tcp:\/\/127\.0\.0\.1:\d+$/);
    expect(endpoint).not.toEndWith(":0");
    expect(req.endpoint).toBe(endpoint);
    const [reply] = await Promise.all([req.request(["over tcp"], { timeoutMs: 5000 }), rep.recv({ timeoutMs: 5000 }).then((f) => rep.send(f))]);
    expect(reply.map(text)).toEqual(["over tcp"]);
  });

  test("a request of a JSON frame, a 64-byte binary frame and an empty frame arrives whole", async () => {
    const { req, rep } = pair();
    using _req = req;
    using _rep = rep;
    const handle = Uint8Array.from({ length: 64 }, (_, i) => (i * 37 + 11) & 0xff);
    const open = { op: "open", protocol: 1, checkpoint: "llama", version: 3, device_uuid: "GPU-0f3c", slots: 3 };
    const padded = new Uint8Array(200);
    padded.set(handle, 100);
    await req.send([jsonFrame(open), padded.subarray(100, 164), new Uint8Array(0)], { timeoutMs: 5000 });
    const frames = await rep.recv({ timeoutMs: 5000 });
    expect(frames.length).toBe(3);
    expect(parseJsonFrame(frames[0]!)).toEqual(open);
    expect(frames[1]).toEqual(handle);
    expect(frames[2]!.byteLength).toBe(0);
    await rep.send([jsonFrame({ ok: true })], { timeoutMs: 5000 });
    expect(parseJsonFrame((await req.recv({ timeoutMs: 5000 }))[0]!)).toEqual({ ok: true });
  });

  test("a 64 MiB frame arrives intact", async () => {
    const { req, rep } = pair();
    using _req = req;
    using _rep = rep;
    const big = new Uint8Array(64 * 1024 * 1024);
    for (let i = 0; i < big.length; i += 4096) big[i] = (i / 4096) & 0xff;
    big[big.length - 1] = 0x5a;
    await req.send(["bulk", big], { timeoutMs: 20_000 });
    const frames = await rep.recv({ timeoutMs: 20_000 });
    expect(frames[1]!.byteLength).toBe(big.byteLength);
    expect(Buffer.compare(frames[1]!, big)).toBe(0);
    await rep.send(frames, { timeoutMs: 20_000 });
    const back = await req.recv({ timeoutMs: 20_000 });
    expect(Buffer.compare(back[1]!, big)).toBe(0);
  }, 60_000);

  test("a recv past its deadline rejects with a TimeoutError naming the wait; the REQ can then send again and the late reply is dropped", async () => {
    const { req, rep } = pair();
    using _req = req;
    using _rep = rep;
    await req.send(["load 1"], { timeoutMs: 5000 });
    expect((await rep.recv({ timeoutMs: 5000 })).map(text)).toEqual(["load 1"]);
    // The worker is slow: no reply yet.
    const err = await req.recv({ timeoutMs: 50, what: "reply to load (bucket 1/4) from GPU 0" }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(TimeoutError);
    expect((err as Error).message).toMatch(/^reply to load \(bucket 1\/4\) from GPU 0 timed out after \d+ ms$/);
    // ZMQ_REQ_RELAXED: a new request goes out instead of failing with EFSM.
    await req.send(["abort"], { timeoutMs: 5000 });
    await rep.send(["late reply to load 1"], { timeoutMs: 5000 });
    expect((await rep.recv({ timeoutMs: 5000 })).map(text)).toEqual(["abort"]);
    await rep.send(["reply to abort"], { timeoutMs: 5000 });
    // ZMQ_REQ_CORRELATE: the late reply was dropped.
    expect((await req.recv({ timeoutMs: 5000 })).map(text)).toEqual(["reply to abort"]);
  });

  test("an aborted signal ends a recv with an AbortedError", async () => {
    const { req, rep } = pair();
    using _req = req;
    using _rep = rep;
    const controller = new AbortController();
    const waiting = rep.recv({ signal: controller.signal, what: "request from ce" });
    setTimeout(() => controller.abort("update cancelled"), 10);
    const err = await waiting.catch((e: unknown) => e);
    expect(err).toBeInstanceOf(AbortedError);
    expect((err as Error).message).toBe("request from ce aborted: update cancelled");
    // The socket still works afterwards.
    await req.send(["after abort"], { timeoutMs: 5000 });
    expect((await rep.recv({ timeoutMs: 5000 })).map(text)).toEqual(["after abort"]);
  });

  test("DEALER/ROUTER: the ROUTER sees each DEALER's routing id and addresses replies with it", async () => {
    using router = ctx.socket("ROUTER");
    const endpoint = router.bind(ipc());
    using a = ctx.socket("DEALER", { routingId: "host-a" });
    using b = ctx.socket("DEALER", { routingId: "host-b" });
    a.connect(endpoint);
    b.connect(endpoint);
    await a.send(["hello from a"], { timeoutMs: 5000 });
    await b.send(["hello from b"], { timeoutMs: 5000 });
    const got = [await router.recv({ timeoutMs: 5000 }), await router.recv({ timeoutMs: 5000 })].map((f) => f.map(text));
    expect(got.sort()).toEqual([
      ["host-a", "hello from a"],
      ["host-b", "hello from b"],
    ]);
    for (const [id, body] of got) await router.send([id!, `re: ${body}`], { timeoutMs: 5000 });
    expect((await a.recv({ timeoutMs: 5000 })).map(text)).toEqual(["re: hello from a"]);
    expect((await b.recv({ timeoutMs: 5000 })).map(text)).toEqual(["re: hello from b"]);
  });

  test("a REP in another process answers a bound REQ, as a worker does", async () => {
    using req = ctx.socket("REQ");
    const endpoint = req.bind(ipc());
    const echo = spawnEcho("connect", endpoint);
    // The send waits until the worker has connected.
    const reply = await req.request([jsonFrame({ op: "load", bucket: 0 }), new Uint8Array([1, 2, 3])], { timeoutMs: 10_000 });
    expect(parseJsonFrame(reply[0]!)).toEqual({ op: "load", bucket: 0 });
    expect(reply[1]).toEqual(new Uint8Array([1, 2, 3]));
    expect((await req.request(["stop"], { timeoutMs: 5000 })).map(text)).toEqual(["bye"]);
    expect(await echo.exited).toBe(0);
  }, 30_000);

  test("a REQ connects to a REP bound on tcp://127.0.0.1:* in another process", async () => {
    const echo = spawnEcho("bind", "tcp://127.0.0.1:*");
    let out = "";
    for await (const chunk of echo.stdout) {
      out += new TextDecoder().decode(chunk);
      if (out.includes("\n")) break;
    }
    const endpoint = /^bound (tcp:\/\/127\.0\.0\.1:\d+)$/m.exec(out)?.[1];
    expect(endpoint).toBeDefined();
    using req = ctx.socket("REQ");
    req.connect(endpoint!);
    expect((await req.request(["ping"], { timeoutMs: 10_000 })).map(text)).toEqual(["ping"]);
    expect((await req.request(["stop"], { timeoutMs: 5000 })).map(text)).toEqual(["bye"]);
    expect(await echo.exited).toBe(0);
  }, 30_000);

  test("eight sockets waiting at once are all served", async () => {
    const pairs = Array.from({ length: 8 }, () => pair());
    try {
      // Eight workers wait for a request, eight REQs then wait for their replies.
      const workers = pairs.map(async ({ rep }, gpu) => {
        const [request] = await rep.recv({ timeoutMs: 10_000, what: `request on GPU ${gpu}` });
        await Bun.sleep(5 + ((gpu * 7) % 11));
        await rep.send([jsonFrame({ ok: true, gpu, got: text(request) })], { timeoutMs: 5000 });
      });
      const replies = await Promise.all(
        pairs.map(({ req }, gpu) => req.request([`load on GPU ${gpu}`], { timeoutMs: 10_000, what: `reply from GPU ${gpu}` })),
      );
      await Promise.all(workers);
      expect(replies.map((frames) => parseJsonFrame(frames[0]!))).toEqual(
        pairs.map((_, gpu) => ({ ok: true, gpu, got: `load on GPU ${gpu}` })),
      );
    } finally {
      for (const { req, rep } of pairs) {
        req.close();
        rep.close();
      }
    }
  });

  test("closing a socket with a send waiting for a peer rejects the send at once", async () => {
    const dealer = ctx.socket("DEALER", { immediate: true });
    dealer.connect(ipc()); // nobody listens: with ZMQ_IMMEDIATE the send cannot go anywhere
    const sending = dealer.send(["never delivered"], { what: "send to a dead worker" });
    await Bun.sleep(10);
    const started = performance.now();
    dealer.close();
    dealer.close(); // idempotent
    const err = await sending.catch((e: unknown) => e);
    expect(performance.now() - started).toBeLessThan(1000);
    expect(err).toBeInstanceOf(AbortedError);
    expect((err as Error).message).toBe("send to a dead worker: socket closed");
    await expect(dealer.recv()).rejects.toBeInstanceOf(AbortedError);
  });

  test("closing a context with messages queued for a dead peer does not hang", async () => {
    const script = `
      import { ZmqContext } from ${JSON.stringify(join(ROOT, "src/transport/zmq.ts"))};
      const ctx = new ZmqContext();
      const dealer = ctx.socket("DEALER", { sndhwm: 4 });
      dealer.connect("tcp://127.0.0.1:1");
      for (let i = 0; i < 4; i++) await dealer.send([new Uint8Array(1 << 20)], { timeoutMs: 1000 });
      const stuck = dealer.send(["over the high-water mark"]).catch((e) => e.constructor.name);
      ctx.close();
      process.stdout.write("closed " + (await stuck) + "\\n");
    `;
    const { code, stdout, stderr } = await runBun(script);
    expect(stderr).toBe("");
    expect(stdout).toBe("closed AbortedError\n");
    expect(code).toBe(0);
  }, 20_000);

  test("the event loop keeps running while a recv waits", async () => {
    const { req, rep } = pair();
    using _req = req;
    using _rep = rep;
    let ticks = 0;
    const interval = setInterval(() => ticks++, 1);
    try {
      await req.send(["slow"], { timeoutMs: 5000 });
      const worker = rep.recv({ timeoutMs: 5000 }).then(async (frames) => {
        await Bun.sleep(100);
        await rep.send(frames, { timeoutMs: 5000 });
      });
      const before = ticks;
      await req.recv({ timeoutMs: 5000 });
      await worker;
      // A 1 ms interval over 100 ms; only a blocked loop would leave it near zero.
      expect(ticks - before).toBeGreaterThan(10);
    } finally {
      clearInterval(interval);
    }
  });

  test("binding an endpoint that is taken fails with zmq's words and the call", () => {
    using a = ctx.socket("REP");
    const endpoint = a.bind(ipc());
    using b = ctx.socket("REP");
    const err = (() => {
      try {
        b.bind(endpoint);
      } catch (e) {
        return e;
      }
    })();
    expect(err).toBeInstanceOf(NativeError);
    expect((err as NativeError).code).toBe("ZMQ_EADDRINUSE");
    expect((err as Error).message).toBe(`zmq_bind(${endpoint}): Address already in use`);
  });

  test("a closed context refuses new sockets and closes the ones it made", () => {
    const own = new ZmqContext();
    const socket = own.socket("PAIR");
    own.close();
    own.close();
    expect(socket.closed).toBe(true);
    expect(() => own.socket("PAIR")).toThrow(CeError);
  });

  test("a message over maxMessageBytes is not delivered", async () => {
    using rep = ctx.socket("REP", { maxMessageBytes: 1024 });
    using req = ctx.socket("REQ");
    req.connect(rep.bind(ipc()));
    await req.send([new Uint8Array(4096)], { timeoutMs: 5000 });
    await expect(rep.recv({ timeoutMs: 100 })).rejects.toBeInstanceOf(TimeoutError);
  });

  test("an empty message is refused", async () => {
    using req = ctx.socket("REQ");
    await expect(req.send([])).rejects.toThrow("a message needs at least one frame");
  });

});

describe("where libzmq comes from", () => {
  const lookup = `
    import { zmqLibrary } from ${JSON.stringify(join(ROOT, "src/native/zmq.ts"))};
    try { process.stdout.write(JSON.stringify(zmqLibrary())); }
    catch (e) { process.stdout.write(JSON.stringify({ error: e.message, hint: e.hint })); }
  `;

  test("CE_LIBZMQ names the library to load", async () => {
    const { stdout, stderr } = await runBun(lookup, { CE_LIBZMQ: ADDON });
    expect(stderr).toBe("");
    expect(JSON.parse(stdout)).toMatchObject({ source: "CE_LIBZMQ", path: ADDON });
  });

  test("a CE_LIBZMQ that does not load is refused with the path, dlopen's words and the variable's name", async () => {
    const { stdout } = await runBun(lookup, { CE_LIBZMQ: "/nonexistent/libzmq.so.5" });
    const { error, hint } = JSON.parse(stdout) as { error: string; hint: string };
    expect(error).toStartWith("load libzmq: no usable libzmq; tried:\n  /nonexistent/libzmq.so.5 (CE_LIBZMQ): ");
    expect(error).toContain("No such file");
    expect(hint).toContain("CE_LIBZMQ");
  });

  test("a compiled binary loads the libzmq embedded in it, copied once to the cache", async () => {
    const dir = mkdtempSync(join(tmpdir(), "ce-zmq-compile-"));
    try {
      const entry = join(dir, "entry.ts");
      writeFileSync(
        entry,
        `
        import { zmqLibrary } from ${JSON.stringify(join(ROOT, "src/native/zmq.ts"))};
        import { defaultContext } from ${JSON.stringify(join(ROOT, "src/transport/zmq.ts"))};
        const ctx = defaultContext();
        const rep = ctx.socket("REP");
        const req = ctx.socket("REQ");
        req.connect(rep.bind("ipc://@ce-test-compiled-" + process.pid));
        const served = rep.recv({ timeoutMs: 5000 }).then((f) => rep.send(f));
        const reply = await req.request(["from a compiled binary"], { timeoutMs: 5000 });
        await served;
        process.stdout.write(JSON.stringify({ ...zmqLibrary(), reply: new TextDecoder().decode(reply[0]) }));
        `,
      );
      const binary = join(dir, "zmq-check");
      const build = Bun.spawnSync([process.execPath, "build", "--compile", entry, "--outfile", binary], { stderr: "pipe", stdout: "pipe" });
      expect(build.stderr.toString()).not.toContain("error");
      expect(build.exitCode).toBe(0);
      const cache = join(dir, "cache");
      const env = { ...process.env, XDG_CACHE_HOME: cache, CE_LIBZMQ: "" };
      for (const run of ["first", "second"]) {
        const result = Bun.spawnSync([binary], { env, stdout: "pipe", stderr: "pipe", timeout: 20_000 });
        expect(result.stderr.toString()).toBe("");
        const out = JSON.parse(result.stdout.toString()) as { source: string; path: string; reply: string };
        expect(out.source).toBe("embedded");
        expect(out.path).toMatch(new RegExp(`^${cache}/ce/libzmq-[0-9a-f]{16}\\.so$`));
        expect(out.reply).toBe("from a compiled binary");
        expect(readdirSync(join(cache, "ce"))).toEqual([out.path.split("/").pop()!]);
        expect(run).toBeDefined();
      }
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  }, 120_000);
});
