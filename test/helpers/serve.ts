// `ce serve` as a real process for tests: started on the CPU backend with its built-in workers, and
// called over HTTP with JSON bodies.
import type { Subprocess } from "bun";
import { tmpdir } from "node:os";
import { CLI, within } from "./update";

export interface Served {
  proc: Subprocess<"ignore", "pipe", "pipe">;
  url: string;
}

/** Starts ce serve (2 CPU devices, roots: the temp dir and /dev/shm) and waits for its `listening` line. */
export async function startServe(extra: string[] = ["--port", "0"]): Promise<Served> {
  const proc = Bun.spawn([process.execPath, CLI, "serve", ...extra, "--device", "cpu", "--devices", "2", "--root", `${tmpdir()},/dev/shm`, "--json"], {
    stdin: "ignore",
    stdout: "pipe",
    stderr: "pipe",
  });
  const reader = proc.stdout.getReader();
  const first = await within(30_000, "ce serve to listen", reader.read());
  reader.releaseLock();
  const line = new TextDecoder().decode(first.value ?? new Uint8Array());
  const { listening } = JSON.parse(line) as { listening: string };
  return { proc, url: listening };
}

export async function call(url: string, method: string, path: string, body?: unknown): Promise<{ status: number; json: Record<string, unknown> }> {
  const res = await within(60_000, `${method} ${path}`, fetch(`${url}${path}`, { method, body: body === undefined ? undefined : typeof body === "string" ? body : JSON.stringify(body) }));
  return { status: res.status, json: (await res.json()) as Record<string, unknown> };
}
