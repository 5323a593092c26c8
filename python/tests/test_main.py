"""`python3 -m ce_worker` as a real subprocess, driven the way ce drives it."""

import os
import signal
import subprocess
import sys
import tempfile
import time
import unittest

import support

import torch

SLOT = 1024
DEADLINE_S = 30


class Worker:
    """A standalone worker process and ce's socket to it."""

    def __init__(self, test, *flags, device="cpu"):
        self.ce = support.Ce()
        self.dir = tempfile.mkdtemp(prefix="ce-worker-test-")
        self.log = os.path.join(self.dir, "worker.log")
        self.buf = support.ShmBuffer(2 * SLOT)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ce_worker", "--endpoint", self.ce.endpoint, "--device", device,
             "--log-file", self.log, *flags],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": support.PACKAGE_ROOT})
        test.addCleanup(self.cleanup)

    def checkpoint(self, tensors, files=2):
        """Write `tensors` as safetensors files (round-robin over `files`); returns their paths."""
        names = list(tensors)
        paths = []
        for i in range(files):
            path = os.path.join(self.dir, f"model-{i:05d}-{time.monotonic_ns()}.safetensors")
            support.write_safetensors(path, {n: tensors[n] for n in names[i::files]})
            paths.append(path)
        return paths

    def update(self, tensors, files=(), version=1, **open_fields):
        """One whole session; returns the finish reply (earlier replies must be ok; the open's is kept)."""
        self.opened = self.ce.open_cpu(self.buf, slot_bytes=SLOT, files=files, version=version, **open_fields)
        assert self.opened["ok"], self.opened
        for reply in self.ce.push(self.buf, tensors, slot_bytes=SLOT):
            assert reply == {"ok": True}, reply
        assert self.ce.request({"op": "release"}) == {"ok": True}
        return self.ce.request({"op": "finish"}, timeout_s=DEADLINE_S)

    def wait(self):
        try:
            return self.proc.wait(DEADLINE_S)
        finally:
            if not self.proc.stdin.closed:
                self.proc.stdin.close()
            self.proc.stdout.close()
            self.proc.stderr.close()

    def log_text(self):
        with open(self.log) as f:
            return f.read()

    def cleanup(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.wait()
        self.ce.close()
        self.buf.close()
        for name in os.listdir(self.dir):
            os.unlink(os.path.join(self.dir, name))
        os.rmdir(self.dir)


class StandaloneWorkerTest(unittest.TestCase):
    def test_sessions_run_back_to_back_and_verify_against_the_checkpoint(self):
        w = Worker(self, "--verify")
        for version in (1, 2, 3):
            with self.subTest(version=version):
                tensors = support.sample_tensors(seed=version)
                reply = w.update(tensors, w.checkpoint(tensors), version=version)
                nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
                self.assertEqual(reply, {"ok": True, "tensors": len(tensors), "bytes": nbytes,
                                         "verified": len(tensors)})
                held = {} if version == 1 else {"protocol": 2, "checkpoint": "test", "version": version - 1}
                self.assertEqual(w.opened, {"ok": True, **held}, "the open reply names the last finished update")
        w.proc.stdin.close()
        self.assertEqual(w.wait(), 0)
        self.assertIn("stopping: stdin reached EOF", w.log_text())

    def test_verify_names_the_first_tensor_that_differs_and_the_worker_keeps_serving(self):
        w = Worker(self, "--verify")
        tensors = support.sample_tensors(seed=5)
        files = w.checkpoint(tensors)
        planted = dict(tensors)
        planted["model.layers.0.norm.weight"] = tensors["model.layers.0.norm.weight"].clone()
        planted["model.layers.0.norm.weight"][3] += 1
        reply = w.update(planted, files)
        self.assertFalse(reply["ok"])
        self.assertRegex(reply["error"], r"^VerifyError: tensor model\.layers\.0\.norm\.weight differs from "
                                         r"\S+model-\d+-\d+\.safetensors \(32 bytes received, 32 in the file; "
                                         r"first difference at byte 1[2-5]\)$")
        self.assertEqual(w.ce.request({"op": "abort", "reason": "verify failed"}), {"ok": True})
        self.assertTrue(w.update(tensors, files, version=2)["ok"], "the next session repairs the store")

    def test_verify_reports_a_missing_or_an_extra_tensor(self):
        w = Worker(self, "--verify")
        tensors = support.sample_tensors(seed=6)
        sent = {n: t for n, t in tensors.items() if n != "model.mask"}
        reply = w.update(sent, w.checkpoint(tensors))
        self.assertRegex(reply["error"], r"^VerifyError: tensor model\.mask \(\S+\) is missing")
        w.ce.request({"op": "abort"})
        reply = w.update({**tensors, "lm_head.weight": torch.ones(4)}, w.checkpoint(tensors), version=2)
        self.assertEqual(reply["error"], "VerifyError: tensor lm_head.weight is extra: received but in none of "
                                         "the checkpoint's files")
        w.ce.request({"op": "abort"})

    def test_open_load_abort_then_open_load_release_finish_on_the_same_worker(self):
        w = Worker(self, "--verify")
        tensors = support.sample_tensors(seed=8)
        files = w.checkpoint(tensors)
        self.assertEqual(w.ce.open_cpu(w.buf, slot_bytes=SLOT, files=files, version=1), {"ok": True})
        first = w.ce.push(w.buf, support.sample_tensors(seed=9), slot_bytes=SLOT)
        self.assertTrue(all(r["ok"] for r in first[:1]), first)
        self.assertEqual(w.ce.request({"op": "abort", "reason": "rank 1 failed"}), {"ok": True})
        reply = w.update(tensors, files, version=2)
        self.assertEqual(reply["verified"], len(tensors))
        self.assertIn("update aborted by ce: rank 1 failed", w.log_text())

    def test_an_open_asking_to_verify_gets_the_digests_of_the_stored_tensors_at_finish(self):
        w = Worker(self)
        tensors = support.sample_tensors(seed=10)
        reply = w.update(tensors, verify=True)
        self.assertEqual(w.opened, {"ok": True, "protocol": 2, "verify": True})
        self.assertEqual(reply["digests"], support.digests_of(tensors))
        self.assertNotIn("digests", w.update(tensors, version=2), "without verify, no digests")

    def test_an_update_aborted_after_a_load_leaves_the_held_version_unknown(self):
        w = Worker(self)
        self.assertTrue(w.update({"w": torch.ones(2)}, version=4)["ok"])
        self.assertEqual(w.ce.open_cpu(w.buf, slot_bytes=SLOT, version=5),
                         {"ok": True, "protocol": 2, "checkpoint": "test", "version": 4})
        w.ce.request({"op": "abort", "reason": "before any load"})
        self.assertEqual(w.ce.open_cpu(w.buf, slot_bytes=SLOT, version=5)["version"], 4, "no load: weights intact")
        w.ce.push(w.buf, {"w": torch.zeros(2)}, slot_bytes=SLOT)
        w.ce.request({"op": "abort", "reason": "after a load"})
        self.assertEqual(w.ce.open_cpu(w.buf, slot_bytes=SLOT, version=6), {"ok": True})
        w.ce.request({"op": "abort"})

    def test_verify_without_files_in_open_says_so(self):
        w = Worker(self, "--verify")
        reply = w.update({"w": torch.ones(2)})
        self.assertIn("--verify needs the checkpoint's files in the open frame", reply["error"])
        w.ce.request({"op": "abort"})

    def test_without_verify_finish_reports_what_the_store_holds(self):
        w = Worker(self)
        self.assertEqual(w.update({"w": torch.ones(2, 2), "b": torch.zeros(3, dtype=torch.int64)}),
                         {"ok": True, "tensors": 2, "bytes": 40})

    def test_a_tensor_that_changes_dtype_is_refused_like_an_engine_would(self):
        w = Worker(self)
        self.assertTrue(w.update({"w": torch.ones(2)})["ok"])
        self.assertTrue(w.ce.open_cpu(w.buf, slot_bytes=SLOT, version=2)["ok"])
        reply, = w.ce.push(w.buf, {"w": torch.ones(2, dtype=torch.float64)}, slot_bytes=SLOT)
        self.assertEqual(reply["error"], "TypeError: dtype torch.float64 does not match the stored torch.float32 "
                                         "(tensor w)")
        w.ce.request({"op": "abort"})

    def test_a_silent_ce_drops_the_session_and_the_next_one_is_served(self):
        w = Worker(self, "--op-timeout", "0.5")
        self.assertTrue(w.ce.open_cpu(w.buf, slot_bytes=SLOT)["ok"])
        time.sleep(1.0)  # past --op-timeout: the worker gives the session up
        self.assertTrue(w.update({"w": torch.ones(2)}, version=2)["ok"])
        self.assertIn("no request from ce within 0.5 s (session open", w.log_text())

    def test_each_transport_serves_a_session_and_stops_on_sigterm_even_mid_session(self):
        for backend in support.transports():
            with self.subTest(backend):
                w = Worker(self, "--transport", backend)
                self.assertEqual(w.update({"w": torch.ones(2)}), {"ok": True, "tensors": 1, "bytes": 8})
                self.assertTrue(w.ce.open_cpu(w.buf, slot_bytes=SLOT, version=2)["ok"])
                w.proc.send_signal(signal.SIGTERM)
                self.assertEqual(w.wait(), 0)
                self.assertIn("stopping: SIGTERM", w.log_text())
                self.assertIn(f"{'pyzmq' if backend == 'pyzmq' else 'ctypes libzmq'} ", w.log_text())

    def test_a_device_it_cannot_use_exits_1_with_the_reason(self):
        w = Worker(self, device="tpu:0")
        self.assertEqual(w.wait(), 1)
        self.assertIn("cannot start: ValueError: --device tpu:0: expected cpu or cuda:N", w.log_text())

    @unittest.skipIf(torch.cuda.is_available(), "this machine has a GPU")
    def test_cuda_without_a_gpu_exits_1(self):
        w = Worker(self, device="cuda:0")
        self.assertEqual(w.wait(), 1)
        self.assertIn("torch sees no CUDA GPU", w.log_text())

    def test_missing_flags_exit_2(self):
        out = subprocess.run([sys.executable, "-m", "ce_worker", "--device", "cpu"], capture_output=True, text=True,
                             timeout=DEADLINE_S, env={**os.environ, "PYTHONPATH": support.PACKAGE_ROOT})
        self.assertEqual(out.returncode, 2)
        self.assertIn("--endpoint", out.stderr)


if __name__ == "__main__":
    unittest.main()
