// The `ce` command line, run as users run it: the compiled dist/ce and `bun src/cli.ts`, in their
// own processes, with exit codes, stdout (results, --json) and stderr (logs, errors) checked.
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { existsSync, readdirSync, statSync } from "node:fs";
import { join } from "node:path";
import { gpuPresent } from "../../src/core/devices";
import { writeRaw } from "../helpers/ckpt";
import { findPython } from "../helpers/python";
import { CLI, ROOT, type TestCheckpoint, shmBuffersOf, smallCheckpoint } from "../helpers/update";

const EXE = join(ROOT, "dist", "ce");
const RUN_MS = 120_000;
const TEST_MS = 150_000;

interface Result {
  code: number | null;
  stdout: string;
  stderr: string;
  pid: number;
}

/** Runs one command with a deadline; a hang is killed and fails the test with what it printed. */
async function run(cmd: string[], env: Record<string, string> = {}, deadlineMs = RUN_MS): Promise<Result> {
  const proc = Bun.spawn(cmd, {
    cwd: ROOT,
    env: { ...process.env, NO_COLOR: "1", ...env },
    stdin: "ignore",
    stdout: "pipe",
    stderr: "pipe",
  });
  let hung = false;
  const timer = setTimeout(() => {
    hung = true;
    proc.kill("SIGKILL");
  }, deadlineMs);
  const [stdout, stderr, code] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text(), proc.exited]);
  clearTimeout(timer);
  if (hung) throw new Error(`${cmd.join(" ")} did not finish within ${deadlineMs} ms\nstdout: ${stdout}\nstderr: ${stderr}`);
  return { code, stdout, stderr, pid: proc.pid };
}

/** The one JSON object a --json run prints on stdout. */
function json(r: Result): Record<string, any> {
  const lines = r.stdout.trim().split("\n");
  if (lines.length !== 1) throw new Error(`expected one line of JSON on stdout, got ${lines.length}:\n${r.stdout}\nstderr: ${r.stderr}`);
  return JSON.parse(lines[0]!);
}

function newestMtime(dir: string): number {
  let newest = 0;
  for (const entry of readdirSync(dir, { withFileTypes: true, recursive: true })) {
    if (entry.isFile()) newest = Math.max(newest, statSync(join(entry.parentPath, entry.name)).mtimeMs);
  }
  return newest;
}

let ck: TestCheckpoint;
beforeAll(async () => {
  // dist/ce is compiled from src/ and loads dist/libce.so beside it. build.ts would also rebuild a
  // stale libce.so, under the feet of this test process, which has it loaded: so it runs only when
  // the library is current, and then compiles just the executable.
  if (!existsSync(EXE) || statSync(EXE).mtimeMs < newestMtime(join(ROOT, "src"))) {
    const lib = join(ROOT, "dist", "libce.so");
    if (!existsSync(lib) || statSync(lib).mtimeMs < newestMtime(join(ROOT, "csrc"))) {
      throw new Error("dist/libce.so is missing or older than csrc/: run `bun build.ts` before the tests");
    }
    const r = await run([process.execPath, join(ROOT, "build.ts")]);
    if (r.code !== 0) throw new Error(`bun build.ts failed (${r.code}):\n${r.stderr}`);
  }
  ck = await smallCheckpoint({ files: 2, tensorsPerFile: 30, seed: 3 });
}, TEST_MS);
afterAll(async () => {
  await ck?.dir.cleanup();
});

const ways: [string, string[]][] = [
  ["dist/ce", [EXE]],
  ["bun src/cli.ts", [process.execPath, CLI]],
];

describe.each(ways)("%s", (_name, ce) => {
  test("--help prints the usage with every command and exits 0", async () => {
    const r = await run([...ce, "--help"]);
    expect(r.code).toBe(0);
    expect(r.stdout).toContain("USAGE");
    for (const verb of ["update", "serve", "inspect", "doctor", "bench", "worker"]) expect(r.stdout).toContain(verb);
  });

  test("update --help describes the update flags and exits 0", async () => {
    const r = await run([...ce, "update", "--help"]);
    expect(r.code).toBe(0);
    for (const flag of ["--checkpoint", "--synthetic", "--devices", "--bucket-size", "--json"]) expect(r.stdout).toContain(flag);
  });

  test("a usage error exits 2 and shows the usage and what was wrong", async () => {
    const r = await run([...ce, "update", "--device", "cpu"]);
    expect(r.code).toBe(2);
    expect(r.stderr).toContain("USAGE");
    expect(r.stderr).toContain("give exactly one of --checkpoint PATH and --synthetic MODEL");
    expect(r.stdout).toBe("");
  });

  test.each([
    [["frobnicate"], 'unknown command "frobnicate"'],
    [["update", "--checkpoint", "x.safetensors", "--device", "cpu", "--devices", "0"], "--devices 0: at least one device"],
    [["update", "--checkpoint", "x.safetensors", "--device", "cpu", "--bucket-size", "12XB"], '--bucket-size "12XB" is not a size'],
    [["update", "--checkpoint", "x.safetensors", "--device", "cpu", "--worker", "java"], '--worker "java": use ref or python'],
    [["update", "--checkpoint", "x.safetensors", "--device", "tpu"], '--device "tpu": use cuda, cpu or auto'],
    [["update", "--checkpoint", "x.safetensors", "--device", "cpu", "--slots", "0"], '--slots "0": use a whole number'],
    [["update", "--checkpoint", "x.safetensors", "--device", "cpu", "--engine", "vllm"], "--engine vllm needs --endpoint URL"],
    // Flags are checked before the synthetic checkpoint (GiBs) is written.
    [["update", "--synthetic", "Qwen3-0.6B", "--device", "cpu", "--devices", "0,0"], '--devices "0,0" names a device twice'],
    // An unknown flag is refused, never run with a default in its place.
    [["update", "--synthetic", "Qwen3-0.6B", "--device", "cpu", "--bucket-sise", "1MiB"], "unknown flag --bucket-sise (did you mean --bucket-size?)"],
    [["bench", "--model", "Qwen3-0.6B", "--repeats", "3"], "unknown flag --repeats (did you mean --repeat?)"],
    [["serve", "--prot=0"], "unknown flag --prot (did you mean --port?)"],
    [["inspect", "x.safetensors", "--frobnicate"], "ce inspect: unknown flag --frobnicate"],
  ])("%p is a usage error (exit 2), found before the checkpoint is read or written", async (args, message) => {
    const r = await run([...ce, ...args]);
    expect(r.code).toBe(2);
    expect(r.stderr).toContain(message);
    expect(r.stderr).not.toContain("writing a synthetic");
  });

  test("a checkpoint path that does not exist exits 1 with a message naming the file", async () => {
    const missing = join(ck.dir.path, "nope", "model.safetensors");
    const r = await run([...ce, "update", "--checkpoint", missing, "--device", "cpu"]);
    expect(r.code).toBe(1);
    expect(r.stderr).toContain(`${missing}: cannot read (ENOENT)`);
    expect(r.stderr).not.toContain("bug in ce");
  });

  test("a malformed checkpoint exits 1 naming the file, before any worker starts", async () => {
    const bad = await writeRaw(join(ck.dir.path, "..", `ce-test-bad-${process.pid}.safetensors`), { headerLength: 1n << 40n, header: "{}" });
    try {
      const r = await run([...ce, "update", "--checkpoint", bad, "--device", "cpu"]);
      expect(r.code).toBe(1);
      expect(r.stderr).toContain(bad);
      expect(r.stderr).not.toContain("CPU devices");
    } finally {
      await Bun.file(bad).delete();
    }
  });

  test("--json errors are one object {ok:false, error:{code, message}} on stdout", async () => {
    const missing = join(ck.dir.path, "missing.safetensors");
    const r = await run([...ce, "update", "--checkpoint", missing, "--device", "cpu", "--json"]);
    expect(r.code).toBe(1);
    const out = json(r);
    expect(out).toMatchObject({ ok: false, error: { code: "E_CHECKPOINT_NOT_FOUND", message: expect.stringContaining(missing) } });
    const usage = await run([...ce, "update", "--json"]);
    expect(usage.code).toBe(2);
    expect(json(usage)).toEqual({ ok: false, error: { code: "E_USAGE", message: "give exactly one of --checkpoint PATH and --synthetic MODEL" } });
  });

  test("inspect describes a test checkpoint, as text and as JSON", async () => {
    const text = await run([...ce, "inspect", ck.dir.path]);
    expect(text.code).toBe(0);
    expect(text.stdout).toContain(`tensors  ${ck.tensors}`);
    for (const f of ck.ckpt.files) expect(text.stdout).toContain(f.path);
    const r = await run([...ce, "inspect", "--json", ck.dir.path]);
    expect(r.code).toBe(0);
    expect(json(r)).toMatchObject({
      ok: true,
      kind: "directory",
      tensorCount: ck.tensors,
      totalBytes: ck.bytes,
      headersValid: true,
      files: ck.ckpt.files.map((f) => ({ path: f.path, tensors: f.tensors.length })),
    });
  });

  test(
    "update of a test checkpoint into 3 workers with small buckets prints its summary as JSON and leaves no buffers",
    async () => {
      const r = await run([...ce, "update", "--checkpoint", ck.dir.path, "--device", "cpu", "--devices", "3", "--bucket-size", "256KiB", "--slots", "2", "--json"]);
      expect(r.code).toBe(0);
      const out = json(r);
      expect(out).toMatchObject({ ok: true, backend: "cpu", bytes: ck.bytes, tensors: ck.tensors, mode: "direct", slots: 2, bucketBytes: 256 * 1024 });
      expect(out.devices).toHaveLength(3);
      expect(out.buckets).toBeGreaterThan(4);
      expect(out.trace).toBeUndefined();
      expect(shmBuffersOf(r.pid)).toEqual([]);
    },
    TEST_MS,
  );

  test(
    "a worker that cannot start fails the update with exit 1, a clear message, and no buffers left",
    async () => {
      const missing = await run([...ce, "update", "--checkpoint", ck.dir.path, "--device", "cpu", "--worker", "python", "--json"], {
        CE_PYTHON: "/nonexistent/python3",
      });
      expect(missing.code).toBe(1);
      expect(json(missing)).toMatchObject({ ok: false, error: { code: "E_WORKER_SPAWN", message: expect.stringContaining("/nonexistent/python3") } });
      const dies = await run([...ce, "update", "--checkpoint", ck.dir.path, "--device", "cpu", "--worker", "python", "--json"], { CE_PYTHON: "false" });
      expect(dies.code).toBe(1);
      expect(json(dies)).toMatchObject({ ok: false, error: { code: "E_WORKER_DIED", message: expect.stringContaining("exited with code 1") } });
      expect(shmBuffersOf(dies.pid)).toEqual([]);
    },
    TEST_MS,
  );
});

test(
  "dist/ce update --synthetic Qwen3-0.6B --devices 2 --json, the README's main job, prints one JSON object with ok:true",
  async () => {
    const r = await run([EXE, "update", "--synthetic", "Qwen3-0.6B", "--device", "cpu", "--devices", "2", "--json"]);
    if (r.code !== 0) throw new Error(`exit ${r.code}\n${r.stderr}`);
    const out = json(r);
    expect(out).toMatchObject({ ok: true, checkpoint: "Qwen3-0.6B", version: 1, backend: "cpu", mode: "direct", tensors: 310 });
    expect(out.devices).toHaveLength(2);
    expect(out.bytes).toBeGreaterThan(1024 ** 3);
    expect(out.buckets).toBeGreaterThanOrEqual(1);
    // Its synthetic checkpoint and its slot buffers are gone with it.
    const dir = /writing a synthetic \S+ checkpoint \([^)]*\) to (\S+)/.exec(r.stderr)?.[1];
    expect(dir).toBeDefined();
    expect(existsSync(dir!)).toBe(false);
    expect(shmBuffersOf(r.pid)).toEqual([]);
  },
  TEST_MS,
);

test(
  "an engine that is not running fails the update with exit 1, the URL it tried and a hint",
  async () => {
    const r = await run([process.execPath, CLI, "update", "--checkpoint", ck.dir.path, "--device", "cpu", "--endpoint", "http://127.0.0.1:1", "--json"]);
    expect(r.code).toBe(1);
    expect(json(r)).toMatchObject({
      ok: false,
      error: { code: "E_ENGINE_HTTP", message: expect.stringContaining("POST http://127.0.0.1:1/collective_rpc"), hint: expect.stringContaining("VLLM_SERVER_DEV_MODE") },
    });
    expect(shmBuffersOf(r.pid)).toEqual([]);
  },
  TEST_MS,
);

/** Starts a command and sends `signal` once its stderr shows `cue`; returns how it ended. */
async function interrupt(cmd: string[], cue: string, signal: NodeJS.Signals): Promise<Result & { cued: boolean }> {
  const proc = Bun.spawn(cmd, { cwd: ROOT, env: { ...process.env, NO_COLOR: "1" }, stdin: "ignore", stdout: "pipe", stderr: "pipe" });
  const deadline = setTimeout(() => proc.kill("SIGKILL"), RUN_MS);
  let stderr = "";
  let cued = false;
  const decoder = new TextDecoder();
  for await (const chunk of proc.stderr) {
    stderr += decoder.decode(chunk, { stream: true });
    if (!cued && stderr.includes(cue)) {
      cued = true;
      proc.kill(signal);
    }
  }
  const [stdout, code] = await Promise.all([new Response(proc.stdout).text(), proc.exited]);
  clearTimeout(deadline);
  return { code, stdout, stderr, pid: proc.pid, cued };
}

test(
  "Ctrl-C during an update, or SIGTERM while its synthetic checkpoint is written, leaves neither buffers nor the checkpoint behind",
  async () => {
    const cmd = [process.execPath, CLI, "update", "--synthetic", "Qwen3-0.6B", "--device", "cpu", "--devices", "2", "--slots", "1"];
    for (const [cue, signal, code] of [
      ["registered 1 file", "SIGINT", 130],
      ["writing a synthetic", "SIGTERM", 143],
    ] as const) {
      const r = await interrupt(cmd, cue, signal);
      expect({ cued: r.cued, code: r.code }).toEqual({ cued: true, code });
      expect(r.stderr).toContain(`${signal}: stopping, freeing buffers`);
      const dir = /writing a synthetic \S+ checkpoint \([^)]*\) to (\S+)/.exec(r.stderr)?.[1];
      expect(dir).toBeDefined();
      expect(existsSync(dir!)).toBe(false);
      expect(shmBuffersOf(r.pid)).toEqual([]);
    }
  },
  TEST_MS,
);

const gpu = gpuPresent();
describe.skipIf(gpu)("on a host without a GPU", () => {
  test("doctor exits 1 and names what the GPU path misses", async () => {
    const r = await run([EXE, "doctor"]);
    expect(r.code).toBe(1);
    expect(r.stdout).toMatch(/FAIL +CUDA driver +.*libcuda\.so\.1/);
    expect(r.stdout).toMatch(/ok +libce +/);
    expect(r.stderr).toContain("missing for the GPU path: CUDA driver");
    const j = await run([EXE, "doctor", "--json"]);
    expect(j.code).toBe(1);
    const out = json(j);
    expect(out.ok).toBe(false);
    expect(out.checks).toContainEqual(expect.objectContaining({ name: "CUDA driver", ok: false, required: true }));
    expect(out.checks).toContainEqual(expect.objectContaining({ name: "libce", ok: true }));
  });
});

const py = findPython();
describe.skipIf(!py.ok)(`update into Python workers from the command line (${py.ok ? py.python : `skipped: ${py.reason}`})`, () => {
  test(
    "bun src/cli.ts update --worker python into 2 workers is byte-exact (verify) and prints ok:true",
    async () => {
      const r = await run([process.execPath, CLI, "update", "--checkpoint", ck.dir.path, "--device", "cpu", "--devices", "2", "--worker", "python", "--json"], {
        CE_PYTHON: py.python,
      });
      if (r.code !== 0) throw new Error(`exit ${r.code}\n${r.stdout}\n${r.stderr}`);
      expect(json(r)).toMatchObject({ ok: true, bytes: ck.bytes, tensors: ck.tensors, engine: "2 Python workers" });
    },
    TEST_MS,
  );
});
