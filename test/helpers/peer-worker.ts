// A scripted worker in its own process, standing in for an inference worker that misbehaves:
//   bun test/helpers/peer-worker.ts --endpoint E --log FILE [--fail OP:N] [--hang OP:N] [--drop TENSOR]
// It connects a REP socket to ce's endpoint and answers every request {"ok":true} after checking it
// with protocol.ts (frame and state), except the N-th request of OP: --fail answers
// {"ok":false,"error":...}, --hang never answers. Every request is appended to FILE as one JSON line
// ({op, bucket}) before it is answered. It exits when its stdin closes (ce, or the test, is gone).
// Asked to verify (CPU backend), it digests each loaded tensor from the slot's shared-memory file and
// reports the digests at finish, except the tensor named by --drop: a worker that lost one.
import { appendFileSync, closeSync, openSync, readSync } from "node:fs";
import { digestBytes, formatDigest } from "../../src/native/ce";
import { parseArgs } from "node:util";
import { type Reply, type WorkerState, encodeReply, isPatch, parseRequest, transition } from "../../src/wire/protocol";
import { ZmqContext } from "../../src/transport/zmq";

const { values } = parseArgs({
  options: { endpoint: { type: "string" }, log: { type: "string" }, fail: { type: "string" }, hang: { type: "string" }, drop: { type: "string" } },
});
if (!values.endpoint || !values.log) {
  process.stderr.write("usage: peer-worker.ts --endpoint E --log FILE [--fail OP:N] [--hang OP:N] [--drop TENSOR]\n");
  process.exit(2);
}

function parseWhen(spec: string | undefined): { op: string; n: number } | undefined {
  if (!spec) return undefined;
  const [op, n] = spec.split(":");
  return { op: op!, n: Number(n ?? 1) };
}
const failAt = parseWhen(values.fail);
const hangAt = parseWhen(values.hang);

void (async () => {
  for await (const _ of process.stdin) {
    // nothing is sent on stdin; the loop ends when the parent closes it or dies
  }
  process.exit(0);
})();

const ctx = new ZmqContext();
const rep = ctx.socket("REP", { lingerMs: 1000 });
rep.connect(values.endpoint);

const seen = new Map<string, number>();
let state: WorkerState = "idle";
let slotFile: string | undefined;
let digests: Map<string, string> | undefined;

function digestOf(path: string, offset: number, nbytes: number): string {
  const bytes = new Uint8Array(nbytes);
  const fd = openSync(path, "r");
  try {
    readSync(fd, bytes, 0, nbytes, offset);
  } finally {
    closeSync(fd);
  }
  return formatDigest(digestBytes(bytes));
}
for (;;) {
  const frames = await rep.recv();
  let reply: Reply = { ok: true };
  try {
    const { req } = parseRequest(frames);
    const n = (seen.get(req.op) ?? 0) + 1;
    seen.set(req.op, n);
    appendFileSync(values.log, `${JSON.stringify({ op: req.op, ...(req.op === "load" ? { bucket: req.bucket } : {}) })}\n`);
    if (hangAt && hangAt.op === req.op && hangAt.n === n) {
      await new Promise(() => {}); // never answers; stdin's end or a signal ends the process
    }
    state = transition(state, req.op);
    if (req.op === "open") {
      slotFile = req.path;
      digests = req.verify ? new Map() : undefined;
    }
    if (req.op === "load" && digests) {
      // It never announces delta, so ce sends it no patches.
      for (const t of req.tensors) if (!isPatch(t) && t.name !== values.drop) digests.set(t.name, digestOf(slotFile!, t.offset, t.nbytes));
    }
    if (req.op === "finish" && digests) reply = { ok: true, digests: Object.fromEntries(digests) };
    if (failAt && failAt.op === req.op && failAt.n === n) {
      reply = { ok: false, error: `PeerError: scripted failure at ${req.op} #${n}` };
    }
  } catch (err) {
    reply = { ok: false, error: `peer: ${(err as Error).message}` };
  }
  await rep.send(encodeReply(reply));
}
