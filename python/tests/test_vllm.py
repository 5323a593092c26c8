"""The vLLM extension on a stand-in for vLLM's GPU worker (vLLM itself is not installed here).

The stand-in has the attributes vLLM's worker gives an extension (device, model_config,
speculative_config, model_runner.model with load_weights, model_runner.drafter), and the class
is extended the way vLLM does it: the extension is appended to the worker class's bases.
vLLM's process_weights_after_loading is stood in by a recording function under its module path;
the layerwise reload module, the MTP drafter and the multiprocess executor by vllm_stand_ins.py
(which names the vLLM files and commits they follow). Without a GPU the device UUID lookup is
replaced; the CUDA tests use the real one.
"""

import json
import os
import subprocess
import sys
import unittest
from types import SimpleNamespace
from unittest import mock

import support

import torch

from ce_worker import receiver
from ce_worker.vllm import CeWorkerExtension
from vllm_stand_ins import LayerwiseReload, QuantizedModel, StandInExecutor, StandInMTP, install_modules

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


class FusingModel(torch.nn.Module):
    """Loads like vLLM's attention: q, k and v of the checkpoint land in one fused qkv parameter."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Parameter(torch.zeros(12), False)

    def load_weights(self, weights):
        for name, t in weights:
            part = ("attn.q", "attn.k", "attn.v").index(name)
            self.qkv.data[4 * part:4 * part + 4].copy_(t)
        return {n for n, _ in weights}


class StandInWorker:
    def __init__(self, model, drafter=None, method=None, runner_attr="drafter", quantization=None,
                 layers=2, mtp_layers=0, device=None):
        self.device = device or torch.device("cpu")
        self.model_config = SimpleNamespace(name="target", quantization=quantization, hf_config=SimpleNamespace(
            num_hidden_layers=layers, num_nextn_predict_layers=mtp_layers))
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


class Harness:
    """vLLM's modules stood in, the UUID lookup replaced, and ce's side of one update."""

    reload = None  # a LayerwiseReload for tests of a vLLM that has model_loader/reload

    def setUp(self):
        self.post = []
        post = lambda model, config, device: self.post.append((model, config.name, device))  # noqa: E731
        patches = [mock.patch.dict(sys.modules, install_modules(post, self.reload)),
                   mock.patch("ce_worker.vllm.device_uuid", lambda d: UUID)]
        for p in patches:
            p.start()
            self.addCleanup(p.stop)
        receiver.process_held(UUID).clear()  # what earlier tests' updates left this process holding

    def serve(self, worker, tensors, endpoints=None, slots=2, slot_bytes=SLOT, finish_reply=None):
        """ce's side of one update to `worker`; returns the worker's collective_rpc result."""
        ce = support.Ce()
        buf = support.ShmBuffer(2 * SLOT)
        self.addCleanup(buf.close)
        self.addCleanup(ce.close)
        rpc = support.Background(lambda: worker.update_weights_from_ipc(
            endpoints if endpoints is not None else {"GPU-other": "ipc://@nowhere", UUID: ce.endpoint}))
        self.assertEqual(ce.open_cpu(buf, slots=slots, slot_bytes=slot_bytes, device_uuid=UUID), {"ok": True})
        for reply in ce.push(buf, tensors, slots=slots, slot_bytes=slot_bytes):
            self.assertEqual(reply, {"ok": True})
        ce.request({"op": "release"})
        self.assertEqual(ce.request({"op": "finish"}), finish_reply or {"ok": True})
        return rpc.result()


class VllmExtensionTest(Harness, unittest.TestCase):
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

    def test_a_warm_update_keeps_the_mapping_across_rpc_calls_until_an_abort(self):
        names = [f"model.layers.{i}.w" for i in range(3)]
        model = StandInModel(names)
        worker = extended(StandInWorker)(model)
        buf = support.ShmBuffer(2 * SLOT)
        self.addCleanup(buf.close)
        self.addCleanup(receiver.process_cache(UUID).drop)
        for call, (kept, end) in enumerate([(False, "finish"), (True, "finish"), (True, "abort"), (False, "finish")]):
            # A socket per call: the previous call's REP socket closes as it returns, and a REQ that sent
            # at once could pick its dying pipe. What is under test is the mapping, which outlives both.
            ce = support.Ce()
            self.addCleanup(ce.close)
            rpc = support.Background(lambda: worker.update_weights_from_ipc({UUID: ce.endpoint}))
            reply = ce.open_cpu(buf, slot_bytes=SLOT, device_uuid=UUID, buffer_id="ce-1-dev0")
            # From the second call on the process holds version 1 (the abort came before any load).
            holds = {"checkpoint": "test", "version": 1} if call else {}
            self.assertEqual(reply, {"ok": True, "protocol": 2, "buffer_id": "ce-1-dev0", "kept": kept, **holds},
                             f"call {call}")
            if end == "abort":
                ce.request({"op": "abort", "reason": "another rank failed"})
                self.assertEqual(rpc.result()["state"], "aborted")
                self.assertIsNone(receiver.process_cache(UUID).mapping, "abort drops the kept mapping")
                continue
            tensors = {n: torch.full((4,), float(call * 10 + i)) for i, n in enumerate(names)}
            for r in ce.push(buf, tensors, slot_bytes=SLOT):
                self.assertEqual(r, {"ok": True})
            self.assertEqual(ce.request({"op": "release", "keep": True}), {"ok": True})
            self.assertEqual(ce.request({"op": "finish"}), {"ok": True})
            self.assertEqual(rpc.result()["state"], "finished")
            self.assertIsNotNone(receiver.process_cache(UUID).mapping, "the mapping stays for the next call")
            for n, t in tensors.items():
                self.assertTrue(torch.equal(model.weights[n.replace(".", "_")], t))

    def test_verify_digests_the_slot_views_though_load_weights_fuses_them(self):
        model = FusingModel()
        worker = extended(StandInWorker)(model)
        g = torch.Generator().manual_seed(3)
        first = {n: torch.randn(4, generator=g) for n in ("attn.q", "attn.k", "attn.v")}
        again = {"attn.k": torch.randn(4, generator=g)}  # k arrives twice: the digest is of the last
        ce = support.Ce()
        buf = support.ShmBuffer(2 * SLOT)
        self.addCleanup(buf.close)
        self.addCleanup(ce.close)
        rpc = support.Background(lambda: worker.update_weights_from_ipc({UUID: ce.endpoint}))
        self.assertEqual(ce.open_cpu(buf, slot_bytes=SLOT, device_uuid=UUID, verify=True),
                         {"ok": True, "protocol": 2, "verify": True})
        for tensors in (first, again):
            self.assertEqual(ce.push(buf, tensors, slot_bytes=SLOT), [{"ok": True}])
        buf.write(0, torch.full((2 * SLOT // 4,), 7.0))  # ce refills the slots: the digests are already taken
        ce.request({"op": "release"})
        reply = ce.request({"op": "finish"})
        sent = {**first, **again}
        self.assertEqual(reply["digests"], support.digests_of(sent))
        self.assertEqual(rpc.result()["state"], "finished")
        self.assertTrue(torch.equal(model.qkv, torch.cat([sent["attn.q"], sent["attn.k"], sent["attn.v"]])))

    def test_the_open_reply_names_the_version_the_process_finished_last(self):
        worker = extended(StandInWorker)(StandInModel(["w"]))
        for version, (end, holds) in enumerate([("finish", {}), ("finish", {"checkpoint": "test", "version": 0}),
                                                ("abort", {"checkpoint": "test", "version": 1}), ("finish", {})]):
            ce = support.Ce()
            buf = support.ShmBuffer(2 * SLOT)
            self.addCleanup(buf.close)
            self.addCleanup(ce.close)
            rpc = support.Background(lambda: worker.update_weights_from_ipc({UUID: ce.endpoint}))
            reply = ce.open_cpu(buf, slot_bytes=SLOT, device_uuid=UUID, version=version)
            self.assertEqual(reply, {"ok": True, **({"protocol": 2, **holds} if holds else {})}, f"version {version}")
            ce.push(buf, {"w": torch.full((4,), float(version))}, slot_bytes=SLOT)
            if end == "abort":  # after a load: the weights may be partial, so the next open says nothing
                ce.request({"op": "abort", "reason": "another rank failed"})
            else:
                ce.request({"op": "release"})
                ce.request({"op": "finish"})
            self.assertEqual(rpc.result()["state"], end + "ed")

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

    def test_the_method_never_raises_a_worker_whose_gpu_is_not_listed_returns_an_error_summary(self):
        worker = extended(StandInWorker)(StandInModel(["w"]))
        self.assertEqual(worker.update_weights_from_ipc({"GPU-a": "ipc://@a", "GPU-b": "ipc://@b"}),
                         {"state": "error", "device_uuid": UUID,
                          "error": f"KeyError: \"no endpoint for this worker's GPU {UUID} (got GPU-a, GPU-b)\""})
        summary = worker.update_weights_from_ipc(["ipc://@a"])
        self.assertEqual(summary["state"], "error")
        self.assertIn("TypeError: endpoints must map device UUIDs", summary["error"])

    def test_a_silent_ce_ends_the_rpc_with_an_error_summary(self):
        worker = extended(StandInWorker)(StandInModel(["w"]))
        ce = support.Ce()
        self.addCleanup(ce.close)
        summary = worker.update_weights_from_ipc({UUID: ce.endpoint}, op_timeout_s=0.3)
        self.assertEqual(summary["state"], "error")
        self.assertIn("SessionTimeout: no request from ce within 0.3 s", summary["error"])

    def test_an_unquantized_model_takes_the_plain_path(self):
        worker = extended(StandInWorker)(StandInModel(["w"]))
        self.assertEqual(self.serve(worker, {"w": torch.ones(4)})["path"], "plain")

    def test_a_quantized_model_on_a_vllm_without_layerwise_reload_is_refused_at_open(self):
        model = QuantizedModel(layers=1)
        worker = extended(StandInWorker)(model, quantization="fp8")
        ce = support.Ce()
        buf = support.ShmBuffer(2 * SLOT)
        self.addCleanup(buf.close)
        self.addCleanup(ce.close)
        rpc = support.Background(lambda: worker.update_weights_from_ipc({UUID: ce.endpoint}))
        reply = ce.open_cpu(buf, slot_bytes=SLOT, device_uuid=UUID)
        self.assertFalse(reply["ok"])
        self.assertIn("RuntimeError: the model is quantized (fp8) and this vLLM has no layerwise reload", reply["error"])
        self.assertEqual(ce.request({"op": "abort", "reason": "open failed"}), {"ok": True})
        self.assertEqual(rpc.result()["state"], "aborted")
        self.assertEqual((model.calls, self.post), (0, []), "nothing was loaded or post-processed")

    def test_an_mtp_drafter_gets_only_its_own_tensors_in_one_call_at_finish(self):
        for runner_attr in ("drafter", "speculator"):  # V1 and V2 model runners
            with self.subTest(runner_attr):
                self.post.clear()
                receiver.process_held(UUID).clear()  # a fresh process per runner
                target = StandInModel([f"model.layers.{i}.w" for i in range(2)])
                mtp = StandInMTP(first=2, count=2)
                worker = extended(StandInWorker)(target, mtp, method="deepseek_mtp", runner_attr=runner_attr,
                                                 layers=2, mtp_layers=2)
                # MTP layers 2 and 3 spread over several buckets, between the target's tensors.
                tensors = {"model.layers.2.eh_proj.weight": torch.full((4,), 1.0), "model.layers.0.w": torch.full((4,), 2.0),
                           "model.layers.2.mlp.weight": torch.full((4,), 3.0), "model.layers.3.eh_proj.weight": torch.full((4,), 4.0),
                           "model.layers.1.w": torch.full((4,), 5.0), "model.layers.3.mlp.weight": torch.full((4,), 6.0)}
                summary = self.serve(worker, tensors, slot_bytes=256, finish_reply={"ok": True, "mtp_tensors": 4})
                self.assertEqual(summary["state"], "finished", summary)
                self.assertEqual(len(mtp.calls), 1, "one load_weights call with every MTP layer")
                self.assertEqual(sorted(mtp.calls[0]), sorted(n for n in tensors if not n.startswith(("model.layers.0", "model.layers.1"))))
                self.assertTrue(all(not n.startswith(("model.layers.2", "model.layers.3")) for n in sum(target.batches, [])),
                                "the target never sees the drafter's tensors")
                for layer, part, value in ((2, "eh_proj", 1.0), (2, "mlp", 3.0), (3, "eh_proj", 4.0), (3, "mlp", 6.0)):
                    self.assertTrue(torch.equal(mtp.weights[f"l{layer}_{part}"], torch.full((4,), value)), (layer, part))
                self.assertEqual([(m, c) for m, c, _ in self.post], [(target, "target"), (mtp, "draft")])

    def test_the_mtp_stand_in_refuses_layers_spread_over_calls_as_vllm_does(self):
        mtp = StandInMTP(first=2, count=2)
        with self.assertRaisesRegex(ValueError, r"MTP layers \[3\] were not loaded"):
            mtp.load_weights([("model.layers.2.mlp.weight", torch.ones(4)), ("model.layers.2.eh_proj.weight", torch.ones(4))])

    def test_a_drafter_with_its_own_checkpoint_is_left_alone(self):
        target = StandInModel(["w"])
        eagle = StandInModel(["eagle.w"])
        worker = extended(StandInWorker)(target, eagle, method="eagle3")
        self.serve(worker, {"w": torch.ones(4)})
        self.assertEqual(eagle.batches, [])
        self.assertEqual([m for m, _, _ in self.post], [target])

    def test_get_draft_model_is_preferred_when_the_worker_has_it(self):
        target = StandInModel(["w"])
        mtp = StandInMTP(first=1, count=1)

        class NewerWorker(StandInWorker):
            def get_draft_model(self):
                return mtp

        worker = extended(NewerWorker)(target, method="mtp", layers=1, mtp_layers=1)
        self.serve(worker, {"w": torch.ones(4), "model.layers.1.mlp.weight": torch.full((4,), 7.0)},
                   finish_reply={"ok": True, "mtp_tensors": 1})
        self.assertTrue(torch.equal(mtp.weights["l1_mlp"], torch.full((4,), 7.0)))

    def test_importing_the_extension_does_not_import_vllm(self):
        code = "import sys, ce_worker.vllm; print('vllm' in sys.modules)"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "PYTHONPATH": support.PACKAGE_ROOT})
        self.assertEqual((out.returncode, out.stdout.strip()), (0, "False"), out.stderr)


def fp8_checkpoint(layers, seed):
    """Per layer an int8 weight and its float32 scale; the order puts every scale before every weight,
    as safetensors' dtype-first order does, so no layer is complete within one bucket."""
    g = torch.Generator().manual_seed(seed)
    scales = {f"layers.{i}.weight_scale": torch.rand(4, generator=g) + 0.5 for i in range(layers)}
    weights = {f"layers.{i}.weight": torch.randint(-100, 100, (4, 4), generator=g, dtype=torch.int8) for i in range(layers)}
    return {**scales, **weights}


def expected_kernel(tensors, i):
    return tensors[f"layers.{i}.weight"].float() * tensors[f"layers.{i}.weight_scale"][:, None]


class LayerwiseReloadTest(Harness, unittest.TestCase):
    """A quantized model on a vLLM with model_loader/reload (the stand-in follows layerwise.py)."""

    def setUp(self):
        self.reload = LayerwiseReload()
        super().setUp()

    def test_a_quantized_model_reloads_layerwise_though_each_layer_spans_buckets_of_one_reused_slot(self):
        model = QuantizedModel(layers=3)
        worker = extended(StandInWorker)(model, quantization="fp8")
        tensors = fp8_checkpoint(3, seed=1)
        # One slot of 256 bytes: every tensor is a bucket of its own, written over the previous one.
        summary = self.serve(worker, tensors, slots=1, slot_bytes=256)
        self.assertEqual((summary["state"], summary["path"], summary["buckets"]), ("finished", "layerwise", 6))
        for i, layer in enumerate(model.layers):
            self.assertTrue(torch.equal(layer.kernel, expected_kernel(tensors, i)), f"layer {i}")
        self.assertEqual(self.reload.processed, {"load": 3, "finalize": 0}, "each layer processed once it was complete")
        self.assertEqual(self.post, [], "no second process_weights_after_loading on the target")
        self.assertEqual(self.reload.info, {}, "finalize left nothing pending")

    def test_views_kept_by_the_layerwise_loaders_would_read_the_refilled_slot(self):
        # What the copies prevent: the same load with views into one reused buffer.
        model = QuantizedModel(layers=1)
        tensors = fp8_checkpoint(1, seed=2)
        self.reload.initialize_layerwise_reload(model)
        slot = torch.zeros(16, dtype=torch.uint8)
        for name, t in tensors.items():
            view = slot[:t.numel() * t.element_size()].view(t.dtype).view(t.shape)
            view.copy_(t)
            model.load_weights([(name, view)])
        self.assertFalse(torch.equal(model.layers[0].kernel, expected_kernel(tensors, 0)))

    def test_an_abort_mid_reload_finalizes_it_and_the_next_update_lands(self):
        model = QuantizedModel(layers=2)
        worker = extended(StandInWorker)(model, quantization="fp8")
        ce = support.Ce()
        buf = support.ShmBuffer(2 * SLOT)
        self.addCleanup(buf.close)
        self.addCleanup(ce.close)
        rpc = support.Background(lambda: worker.update_weights_from_ipc({UUID: ce.endpoint}))
        self.assertTrue(ce.open_cpu(buf, slots=1, slot_bytes=256, device_uuid=UUID)["ok"])
        first = fp8_checkpoint(2, seed=3)
        ce.push(buf, dict(list(first.items())[:3]), slots=1, slot_bytes=256)
        self.assertEqual(ce.request({"op": "abort", "reason": "rank 1 failed"}), {"ok": True})
        self.assertEqual(rpc.result()["state"], "aborted")
        self.assertEqual(self.reload.info, {}, "the abort finalized the reload")
        tensors = fp8_checkpoint(2, seed=4)
        self.assertEqual(self.serve(worker, tensors, slots=1, slot_bytes=256)["state"], "finished")
        for i, layer in enumerate(model.layers):
            self.assertTrue(torch.equal(layer.kernel, expected_kernel(tensors, i)), f"layer {i}")

    def test_a_quantized_mtp_drafter_reloads_layerwise_in_its_one_call(self):
        target = QuantizedModel(layers=1)
        mtp = StandInMTP(first=1, count=1)
        worker = extended(StandInWorker)(target, mtp, method="mtp", quantization="fp8", layers=1, mtp_layers=1)
        tensors = {**fp8_checkpoint(1, seed=5), "model.layers.1.mlp.weight": torch.full((4,), 9.0)}
        summary = self.serve(worker, tensors, slots=1, slot_bytes=256, finish_reply={"ok": True, "mtp_tensors": 1})
        self.assertEqual(summary["state"], "finished")
        self.assertEqual(len(mtp.calls), 1)
        self.assertTrue(torch.equal(mtp.weights["l1_mlp"], torch.full((4,), 9.0)))
        self.assertTrue(torch.equal(target.layers[0].kernel, expected_kernel(tensors, 0)))


class ExecutorTest(Harness, unittest.TestCase):
    """Under vLLM's multiprocess executor (stand-in): why the method must never raise."""

    def test_a_raising_worker_leaves_the_others_replies_for_the_next_rpc_to_read(self):
        class Worker:
            def __init__(self, rank):
                self.rank = rank

            def call(self, n):
                if self.rank == 0 and n == 1:
                    raise RuntimeError("rank 0 failed")
                return (self.rank, n)

        executor = StandInExecutor([Worker(0), Worker(1)])
        with self.assertRaisesRegex(RuntimeError, "Worker failed with error 'rank 0 failed'"):
            executor.collective_rpc("call", args=(1,))
        self.assertEqual(executor.collective_rpc("call", args=(2,)), [(0, 2), (1, 1)], "rank 1's stale reply")

    def test_the_extension_answers_every_rpc_with_one_summary_per_worker(self):
        devices = {torch.device("cpu", 0): "GPU-rank-0", torch.device("cpu", 1): "GPU-rank-1"}
        with mock.patch("ce_worker.vllm.device_uuid", lambda d: devices[d]):
            workers = [extended(StandInWorker)(StandInModel(["w"]), device=d) for d in devices]
            executor = StandInExecutor(workers)
            ce = support.Ce()
            buf = support.ShmBuffer(2 * SLOT)
            self.addCleanup(buf.close)
            self.addCleanup(ce.close)
            # Rank 0's GPU is not in the map: its summary says so; rank 1 runs a whole update.
            rpc = support.Background(lambda: executor.collective_rpc("update_weights_from_ipc",
                                                                     args=({"GPU-rank-1": ce.endpoint},)))
            self.assertTrue(ce.open_cpu(buf, slot_bytes=SLOT, device_uuid="GPU-rank-1")["ok"])
            ce.push(buf, {"w": torch.ones(4)}, slot_bytes=SLOT)
            ce.request({"op": "release"})
            self.assertTrue(ce.request({"op": "finish"})["ok"])
            first = rpc.result()
            self.assertEqual([(r["device_uuid"], r["state"]) for r in first],
                             [("GPU-rank-0", "error"), ("GPU-rank-1", "finished")])
            self.assertIn("no endpoint for this worker's GPU GPU-rank-0", first[0]["error"])
            # The next RPC reads its own replies, not leftovers of the first.
            second = executor.collective_rpc("update_weights_from_ipc", args=({},))
            self.assertEqual([(r["device_uuid"], r["state"]) for r in second],
                             [("GPU-rank-0", "error"), ("GPU-rank-1", "error")])


if __name__ == "__main__":
    unittest.main()
