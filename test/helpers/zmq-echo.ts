// A ZeroMQ peer in its own process, standing in for an inference worker:
//   bun test/helpers/zmq-echo.ts connect <endpoint>   REP connects to a bound REQ (the worker's side of the protocol)
//   bun test/helpers/zmq-echo.ts bind <endpoint>      REP binds, prints "bound <endpoint>" once listening
// It echoes every request's frames back. A first frame {"op":"sleep","ms":N} delays the echo;
// "stop" answers "bye" and exits. It also exits when its stdin closes (the parent died).
import { ZmqContext } from "../../src/transport/zmq";

const [mode, endpoint] = process.argv.slice(2);
if ((mode !== "connect" && mode !== "bind") || !endpoint) {
  process.stderr.write("usage: zmq-echo.ts connect|bind <endpoint>\n");
  process.exit(2);
}

// Linger lets "bye" leave before the process exits: ctx.close() waits for it (up to a second).
const ctx = new ZmqContext();
const rep = ctx.socket("REP", { lingerMs: 1000 });
if (mode === "bind") process.stdout.write(`bound ${rep.bind(endpoint)}\n`);
else rep.connect(endpoint);

void (async () => {
  for await (const _ of process.stdin) {
    // nothing is sent on stdin; the loop ends when the parent closes it or dies
  }
  process.exit(0);
})();

const text = new TextDecoder();
for (;;) {
  const frames = await rep.recv();
  const first = text.decode(frames[0]);
  if (first === "stop") {
    await rep.send(["bye"]);
    ctx.close();
    process.exit(0);
  }
  if (first.startsWith("{")) {
    const request = JSON.parse(first) as { op?: string; ms?: number };
    if (request.op === "sleep") await Bun.sleep(request.ms ?? 0);
  }
  await rep.send(frames);
}
