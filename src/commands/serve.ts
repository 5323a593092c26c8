// ce serve: the per-host daemon (registered checkpoints kept pinned, updates on request).
import { defineCommand } from "citty";
import { CeError } from "../errors";
import { deviceArgs, outputArgs } from "./_args";

export default defineCommand({
  meta: {
    name: "serve",
    description: "run the per-host daemon that keeps checkpoints pinned and updates engines on request (not in this release: use ce update)",
  },
  args: {
    port: { type: "string", description: "HTTP port for the control API", default: "8711", valueHint: "PORT" },
    ...deviceArgs,
    ...outputArgs,
  },
  run() {
    throw new CeError("E_NOT_AVAILABLE", "ce serve is not in this release", {
      hint: "ce update does one update from the command line; the daemon comes in a later release",
    });
  },
});
