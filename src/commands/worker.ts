// ce worker: the built-in reference receiver (no Python), as ce's `--engine workers` starts it.
import { defineCommand } from "citty";
import { UsageError } from "../base/errors";
import { Ctx } from "../native/ce";
import { runReceiver } from "../worker/receiver";

export default defineCommand({
  meta: {
    name: "worker",
    description: "run the reference receiver: connect to ce's endpoint, copy every update into its own memory, and digest it when ce asks to verify",
  },
  args: {
    endpoint: { type: "string", description: "the ZeroMQ endpoint ce bound for this device", valueHint: "ipc://@ce-…", required: true },
    device: { type: "string", description: "cpu, or cuda:N for GPU N", default: "cpu", valueHint: "cpu|cuda:N" },
  },
  async run({ args }) {
    const m = /^cuda:(\d+)$/.exec(args.device);
    if (args.device !== "cpu" && !m) throw new UsageError(`--device "${args.device}": use cpu or cuda:N`);
    const ctx = m ? Ctx.create("cuda", [Number(m[1])]) : Ctx.create("cpu", [0]);
    const stop = new AbortController();
    process.on("SIGTERM", () => stop.abort());
    process.on("SIGINT", () => stop.abort());
    // Started by ce with a pipe on stdin: its end means ce is gone, and so must this worker be.
    if (!process.stdin.isTTY) {
      void (async () => {
        for await (const _ of Bun.stdin.stream()) {
          // nothing is sent on it
        }
        stop.abort();
      })();
    }
    try {
      await runReceiver({ ctx, endpoint: args.endpoint, signal: stop.signal });
    } finally {
      ctx.close();
    }
  },
});
