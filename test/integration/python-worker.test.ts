// The Python worker's own unittest suite (python/tests), run with the interpreter findPython picks.
import { describe, expect, test } from "bun:test";
import { join } from "node:path";
import { findPython, PYTHON_PACKAGE_DIR } from "../helpers/python";

const py = findPython();
const ROOT = join(import.meta.dir, "..", "..");
const DEADLINE_MS = 300_000;

describe.skipIf(!py.ok)(`python worker (${py.ok ? `${py.python}: ${py.reason}` : `skipped: ${py.reason}`})`, () => {
  test(
    "the worker's unittest suite passes",
    async () => {
      const proc = Bun.spawn([py.python, "-m", "unittest", "discover", "-s", "python/tests", "-v"], {
        cwd: ROOT,
        env: { ...process.env, PYTHONPATH: PYTHON_PACKAGE_DIR },
        stdin: "ignore",
        stdout: "pipe",
        stderr: "pipe",
      });
      let timedOut = false;
      const timer = setTimeout(() => {
        timedOut = true;
        proc.kill();
      }, DEADLINE_MS);
      const [out, err, code] = await Promise.all([
        new Response(proc.stdout).text(),
        new Response(proc.stderr).text(),
        proc.exited,
      ]);
      clearTimeout(timer);
      if (code !== 0) {
        const why = timedOut ? `did not finish within ${DEADLINE_MS / 1000} s` : `exited with status ${code}`;
        throw new Error(`python -m unittest ${why}\n${err}${out}`);
      }
      expect(err).toMatch(/\nOK( \(skipped=\d+\))?\n/);
    },
    DEADLINE_MS + 10_000,
  );
});
