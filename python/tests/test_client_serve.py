"""ce_client against the real ce serve (dist/ce): a pool from a state dict's layout, pushes of CPU
tensors published with update into one Python worker (python3 -m ce_worker, this interpreter), which
ce verifies by digest. Skipped without dist/ce."""

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import unittest

import support

import torch

from ce_client import LayoutError, Pool

CE = os.path.join(os.path.dirname(support.PACKAGE_ROOT), "dist", "ce")
DEADLINE_S = 60


class Serve:
    """`ce serve --port 0 --json` with one CPU device served by a Python worker; `url` from its first line."""

    def __init__(self, test):
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [CE, "serve", "--port", "0", "--json", "--engine", "workers", "--worker", "python",
             "--device", "cpu", "--devices", "1", "--bucket-size", "64KiB"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self.log,
            env={**os.environ, "CE_PYTHON": sys.executable})
        test.addCleanup(self.stop)
        ready, _, _ = select.select([self.proc.stdout], [], [], DEADLINE_S)
        line = self.proc.stdout.readline() if ready else b""
        if not line:
            test.fail(f"ce serve printed nothing within {DEADLINE_S} s: {self.stderr()}")
        self.url = json.loads(line)["listening"]

    def stderr(self):
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-4000:]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(DEADLINE_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        self.log.close()


@unittest.skipUnless(os.access(CE, os.X_OK), f"no {CE} (bun build.ts makes it)")
class ServeTest(unittest.TestCase):
    def test_pushes_publish_into_the_worker_verified_and_a_bad_state_dict_is_refused_first(self):
        serve = Serve(self)
        tensors = support.sample_tensors(seed=1)
        pool = Pool.create(f"client-test-{os.getpid()}", tensors, slots=2, url=serve.url, timeout_s=DEADLINE_S)
        self.addCleanup(pool.close)
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        for version in (1, 2, 3):  # more versions than slots: the first slot comes round again
            tensors = support.sample_tensors(seed=version)
            reply = pool.push(tensors, version, update=True, progress_bytes=1024)
            self.assertEqual(reply["version"], version)
            summary = reply["update"]
            self.assertEqual((summary["tensors"], summary["bytes"], summary["verified"]),
                             (len(tensors), nbytes, len(tensors)), f"version {version}: {serve.stderr()}")
        info = pool.info()
        self.assertEqual(info["serving"], 3)
        wrong = dict(tensors)
        wrong["model.scalar"] = torch.tensor([3.5])
        with self.assertRaisesRegex(LayoutError, r"tensor model.scalar is F32 \[1\], the layout says F32 \[\]"):
            pool.push(wrong, 4)
        self.assertEqual(pool.info()["versions"], info["versions"], "nothing taken for the refused push")
        pool.delete()


if __name__ == "__main__":
    unittest.main()
