"""The vLLM extension on a stand-in for vLLM's GPU worker (vLLM itself is not installed here).

The stand-in has the attributes vLLM's worker gives an extension (device, model_config,
speculative_config, model_runner.model with load_weights, model_runner.drafter), and the class
is extended the way vLLM does it: the extension is appended to the worker class's bases.
vLLM's process_weights_after_loading is stood in by a recording function under its module path.
Without a GPU the device UUID lookup is replaced; the CUDA tests use the real one.
"""

import json
import os
import subprocess
import sys
import types
import unittest
from types import SimpleNamespace
from unittest import mock

import support

import torch

from ce_worker.vllm import CeWorkerExtension

UUID = "GPU-00000000-1111-2222-3333-444444444444"
SLOT = 1024


class StandInModel(torch.nn.Module):
    """Loads like a vLLM model: load_weights takes (name, tensor) pairs, copies into its params."""

    def __init__(self, names, skip_unknown=False):
        super().__init__()
        self.weights = torch.nn.ParameterDict({n.replace(".", "_"): torch.nn.Parameter(torch.zeros(4), False)
                                               for n in names})
        self.skip_unknown = skip_unknown  # MTP models skip the target's other layers
        self.batches = []

    def load_weights(self, weights):
        self.batches.append([n for n, _ in weights])
        for name, t in weights:
            key = name.replace(".", "_")
            if key not in self.weights:
                if self.skip_unknown:
                    continue
                raise KeyError(name)
            self.weights[key].data.copy_(t)
        return {n for n, _ in weights}


class StandInWorker:
    def __init__(self, model, drafter=None, method=None, runner_attr="drafter"):
        self.device = torch.device("cpu")
        self.model_config = SimpleNamespace(name="target")
        self.speculative_config = None
        if method is not None:
            self.speculative_config = SimpleNamespace(method=method, draft_model_config=SimpleNamespace(name="draft"))
        self.model_runner = SimpleNamespace(model=model)
        if drafter is not None:
            setattr(self.model_runner, runner_attr, SimpleNamespace(model=drafter))


def extended(base):
    """vLLM's injection (worker_base.py): check for conflicts, then append to the bases."""
    cls = type("Worker", (base,), {})
    for attr in dir(CeWorkerExtension):
        if not attr.startswith("__"):
            assert not hasattr(cls, attr), attr
    cls.__bases__ = cls.__bases__ + (CeWorkerExtension,)
    return cls


class VllmExtensionTest(unittest.TestCase):
    def setUp(self):
        self.post = []
        utils = types.ModuleType("vllm.model_executor.model_loader.utils")
        utils.process_weights_after_loading = lambda model, config, device: self.post.append((model, config.name, device))
        modules = {"vllm": types.ModuleType("vllm"), "vllm.model_executor": types.ModuleType("vllm.model_executor"),
                   "vllm.model_executor.model_loader": types.ModuleType("vllm.model_executor.model_loader"),
                   "vllm.model_executor.model_loader.utils": utils}
        patches = [mock.patch.dict(sys.modules, modules), mock.patch("ce_worker.vllm.device_uuid", lambda d: UUID)]
        for p in patches:
            p.start()
            self.addCleanup(p.stop)

    def serve(self, worker, tensors, endpoints=None):
        """ce's side of one update to `worker`; returns the worker's collective_rpc result."""
        ce = support.Ce()
        buf = support.ShmBuffer(2 * SLOT)
        self.addCleanup(buf.close)
        self.addCleanup(ce.close)
        rpc = support.Background(lambda: worker.update_weights_from_ipc(
            endpoints if endpoints is not None else {"GPU-other": "ipc://@nowhere", UUID: ce.endpoint}))
        self.assertEqual(ce.open_cpu(buf, slot_bytes=SLOT, device_uuid=UUID), {"ok": True})
        for reply in ce.push(buf, tensors, slot_bytes=SLOT):
            self.assertEqual(reply, {"ok": True})
        ce.request({"op": "release"})
        self.assertEqual(ce.request({"op": "finish"}), {"ok": True})
        return rpc.result()

    def test_the_extension_adds_one_method_to_vllms_worker(self):
        self.assertEqual([a for a in dir(CeWorkerExtension) if not a.startswith("__")], ["update_weights_from_ipc"])

    def test_each_bucket_goes_through_load_weights_and_finish_runs_post_load_processing(self):
        names = [f"model.layers.{i}.w" for i in range(6)]
        model = StandInModel(names)
        worker = extended(StandInWorker)(model)
        tensors = {n: torch.full((4,), float(i)) for i, n in enumerate(names)}
        summary = self.serve(worker, tensors)
        self.assertEqual((summary["state"], summary["device_uuid"], summary["tensors"]), ("finished", UUID, 6))
        self.assertGreater(len(model.batches), 1, "one load_weights call per bucket")
        self.assertEqual(sum(model.batches, []), names)
        for i, n in enumerate(names):
            self.assertTrue(torch.equal(model.weights[n.replace(".", "_")], torch.full((4,), float(i))))
        self.assertEqual(self.post, [(model, "target", torch.device("cpu"))])

    def test_endpoints_may_arrive_as_json_text(self):
        model = StandInModel(["w"])
        ce_endpoints = {}
        worker = extended(StandInWorker)(model)
        ce = support.Ce()
        buf = support.ShmBuffer(2 * SLOT)
        self.addCleanup(buf.close)
        self.addCleanup(ce.close)
        ce_endpoints[UUID] = ce.endpoint
        rpc = support.Background(lambda: worker.update_weights_from_ipc(json.dumps(ce_endpoints)))
        ce.open_cpu(buf, slot_bytes=SLOT, device_uuid=UUID)
        ce.request({"op": "abort", "reason": "just checking"})
        self.assertEqual(rpc.result()["state"], "aborted")

    def test_a_worker_whose_gpu_is_not_listed_says_which_it_is(self):
        worker = extended(StandInWorker)(StandInModel(["w"]))
        with self.assertRaisesRegex(KeyError, f"no endpoint for this worker's GPU {UUID} \\(got GPU-a, GPU-b\\)"):
            worker.update_weights_from_ipc({"GPU-a": "ipc://@a", "GPU-b": "ipc://@b"})
        with self.assertRaisesRegex(TypeError, "endpoints must map device UUIDs"):
            worker.update_weights_from_ipc(["ipc://@a"])

    def test_an_mtp_drafter_takes_the_same_buckets_and_its_own_post_processing(self):
        for runner_attr in ("drafter", "speculator"):  # V1 and V2 model runners
            with self.subTest(runner_attr):
                self.post.clear()
                target = StandInModel(["model.layers.0.w", "model.layers.1.w"], skip_unknown=True)
                mtp = StandInModel(["model.layers.2.w"], skip_unknown=True)
                worker = extended(StandInWorker)(target, mtp, method="deepseek_mtp", runner_attr=runner_attr)
                tensors = {f"model.layers.{i}.w": torch.full((4,), float(i + 1)) for i in range(3)}
                self.serve(worker, tensors)
                self.assertTrue(torch.equal(mtp.weights["model_layers_2_w"], torch.full((4,), 3.0)))
                self.assertEqual([(m, c) for m, c, _ in self.post], [(target, "target"), (mtp, "draft")])

    def test_a_drafter_with_its_own_checkpoint_is_left_alone(self):
        target = StandInModel(["w"])
        eagle = StandInModel(["eagle.w"])
        worker = extended(StandInWorker)(target, eagle, method="eagle3")
        self.serve(worker, {"w": torch.ones(4)})
        self.assertEqual(eagle.batches, [])
        self.assertEqual([m for m, _, _ in self.post], [target])

    def test_get_draft_model_is_preferred_when_the_worker_has_it(self):
        target = StandInModel(["w"], skip_unknown=True)
        mtp = StandInModel(["w"], skip_unknown=True)

        class NewerWorker(StandInWorker):
            def get_draft_model(self):
                return mtp

        worker = extended(NewerWorker)(target, method="mtp")
        self.serve(worker, {"w": torch.ones(4)})
        self.assertTrue(torch.equal(mtp.weights["w"], torch.ones(4)))

    def test_importing_the_extension_does_not_import_vllm(self):
        code = "import sys, ce_worker.vllm; print('vllm' in sys.modules)"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "PYTHONPATH": support.PACKAGE_ROOT})
        self.assertEqual((out.returncode, out.stdout.strip()), (0, "False"), out.stderr)


if __name__ == "__main__":
    unittest.main()
