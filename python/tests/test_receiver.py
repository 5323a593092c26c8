"""The receiver on the CPU backend, end to end: this test is ce (a bound REQ socket and a
shared-memory file it fills); the worker runs in a thread with a real REP socket."""

import unittest
from unittest import mock

import support

import torch

from ce_worker import loads, receiver
from ce_worker.loads import copy_bucket, module_loader
from ce_worker.receiver import Receiver, SessionTimeout, serve_session
from ce_worker.transport import connect_rep

SLOT = 4096


class Store:
    """What an engine does with a bucket: copy it into parameters it owns."""

    def __init__(self):
        self.params = {}
        self.calls = []

    def load(self, weights):
        self.calls.append([name for name, _ in weights])
        for name, t in weights:
            self.params[name] = t.clone()


class Session:
    """One worker session in a background thread, and ce talking to it."""

    def __init__(self, test, load_fn, post_hook=None, op_timeout_s=10.0, wait_s=10.0, sessions=1, **kw):
        self.ce = support.Ce()
        self.buf = support.ShmBuffer(2 * SLOT)
        test.addCleanup(self.buf.close)
        test.addCleanup(self.ce.close)
        self.receiver = Receiver(load_fn, post_hook, device=torch.device("cpu"), **kw)
        sock = connect_rep(self.ce.endpoint)
        test.addCleanup(sock.close)
        if sessions == 1:
            self.worker = support.Background(
                lambda: serve_session(sock, self.receiver, op_timeout_s=op_timeout_s, wait_s=wait_s))
        else:  # one worker serving several sessions on one socket: result() is their summaries
            self.worker = support.Background(
                lambda: [serve_session(sock, self.receiver, op_timeout_s=op_timeout_s, wait_s=wait_s)
                         for _ in range(sessions)])


class ReceiverTest(unittest.TestCase):
    def test_a_whole_update_arrives_bit_exact(self):
        store = Store()
        s = Session(self, store.load, lambda opened: {"engine": opened.checkpoint})
        tensors = support.sample_tensors(seed=2)
        # Small slots, so that the sample spans several buckets and both slots.
        self.assertEqual(s.ce.open_cpu(s.buf, slot_bytes=1024, buckets=3), {"ok": True})
        replies = s.ce.push(s.buf, tensors, slot_bytes=1024)
        self.assertGreater(len(replies), 1, "the sample spans several buckets")
        self.assertTrue(all(r == {"ok": True} for r in replies), replies)
        self.assertEqual(s.ce.request({"op": "release"}), {"ok": True})
        self.assertEqual(s.ce.request({"op": "finish"}), {"ok": True, "engine": "test"})
        summary = s.worker.result()
        self.assertEqual(summary["state"], "finished")
        self.assertEqual((summary["buckets"], summary["tensors"]), (len(replies), len(tensors)))
        self.assertEqual(summary["bytes"], sum(t.numel() * t.element_size() for t in tensors.values()))
        self.assertEqual(set(store.params), set(tensors))
        for name, want in tensors.items():
            with self.subTest(name):
                got = store.params[name]
                self.assertEqual((got.dtype, got.shape), (want.dtype, want.shape))
                self.assertEqual(support.raw_bytes(got), support.raw_bytes(want))
        self.assertIsNone(s.receiver.mapping, "release unmapped the buffer")

    def test_load_fn_gets_zero_copy_views_into_the_buffer(self):
        seen = []

        def load(weights):
            base = s.receiver.mapping.tensor.data_ptr()
            seen.extend(base <= t.data_ptr() < base + 2 * SLOT for _, t in weights if t.numel())

        s = Session(self, load)
        s.ce.open_cpu(s.buf, slot_bytes=SLOT)
        s.ce.push(s.buf, support.sample_tensors(), slot_bytes=SLOT)
        s.ce.request({"op": "abort", "reason": "done looking"})
        s.worker.result()
        self.assertTrue(seen and all(seen))

    def test_frames_that_do_not_fit_the_state_are_refused_and_the_session_goes_on(self):
        store = Store()
        s = Session(self, store.load)
        self.assertEqual(s.ce.request({"op": "load", "bucket": 0, "slot": 0, "tensors": []}),
                         {"ok": False, "error": "ProtocolError: op load does not fit state idle "
                                                "(expected abort or open)"})
        self.assertFalse(s.ce.request({"op": "finish"})["ok"])
        self.assertTrue(s.ce.open_cpu(s.buf, slot_bytes=SLOT)["ok"])
        self.assertIn("op open does not fit state open", s.ce.open_cpu(s.buf, slot_bytes=SLOT)["error"])
        self.assertIn("op finish does not fit state open", s.ce.request({"op": "finish"})["error"])
        s.ce.push(s.buf, {"w": torch.ones(3)}, slot_bytes=SLOT)
        self.assertTrue(s.ce.request({"op": "release"})["ok"])
        self.assertIn("op load does not fit state released",
                      s.ce.request({"op": "load", "bucket": 1, "slot": 0, "tensors": []})["error"])
        self.assertTrue(s.ce.request({"op": "finish"})["ok"])
        self.assertEqual(s.worker.result()["state"], "finished")
        self.assertTrue(torch.equal(store.params["w"], torch.ones(3)))

    def test_a_bad_frame_gets_an_error_reply_naming_the_problem(self):
        s = Session(self, Store().load)
        self.assertEqual(s.ce.request({"op": "open", "protocol": 3}),
                         {"ok": False, "error": "ProtocolError: protocol 3 is not supported (this worker speaks 1 to 2)"})
        self.assertIn("unknown op 'reload'", s.ce.request({"op": "reload"})["error"])
        s.ce.open_cpu(s.buf, slot_bytes=SLOT)
        load = {"op": "load", "bucket": 0, "slot": 0}
        cases = [
            ({"name": "a", "dtype": "F32", "shape": [4], "offset": 2 * SLOT - 8, "nbytes": 16},
             "ValueError: bytes [8184, 8200) lie outside the 8192-byte buffer (tensor a)"),
            ({"name": "b", "dtype": "F32", "shape": [4], "offset": 0, "nbytes": 8},
             "ValueError: F32 [4] needs 16 bytes, nbytes says 8 (tensor b)"),
            ({"name": "c", "dtype": "X9", "shape": [4], "offset": 0, "nbytes": 4}, "unknown dtype 'X9'"),
        ]
        for meta, message in cases:
            with self.subTest(meta["name"]):
                reply = s.ce.request({**load, "tensors": [meta]})
                self.assertFalse(reply["ok"])
                self.assertIn(message, reply["error"])
        self.assertIn("slot 5 is out of range", s.ce.request({**load, "slot": 5, "tensors": []})["error"])
        s.ce.request({"op": "abort", "reason": "bad frames"})
        self.assertEqual(s.worker.result()["state"], "aborted")

    def test_an_engine_error_is_replied_with_type_message_and_tensor_and_logged_with_its_traceback(self):
        params = {"w": torch.zeros(3)}
        s = Session(self, lambda weights: copy_bucket(params, weights))
        s.ce.open_cpu(s.buf, slot_bytes=SLOT)
        with self.assertLogs("ce_worker", "ERROR") as logs:
            missing, = s.ce.push(s.buf, {"model.x": torch.ones(2)}, slot_bytes=SLOT)
            shape, = s.ce.push(s.buf, {"w": torch.ones(4)}, slot_bytes=SLOT)
        self.assertEqual(missing, {"ok": False, "error": "KeyError: 'model.x' (tensor model.x)"})
        self.assertEqual(shape, {"ok": False, "error": "ValueError: shape [4] does not match the "
                                                      "parameter's [3] (tensor w)"})
        self.assertIn("Traceback", "\n".join(logs.output))
        s.ce.request({"op": "abort", "reason": "worker failed"})
        s.worker.result()

    def test_abort_from_any_state_drops_the_mapping_ends_the_session_and_leaves_the_worker_idle(self):
        for before in ([], ["open"], ["open", "load"], ["open", "load", "release"],
                       ["open", "load", "release", "finish", "open"]):
            with self.subTest(before=before):
                s = Session(self, Store().load, sessions=2 if "finish" in before else 1)
                for op in before:
                    if op == "open":
                        self.assertTrue(s.ce.open_cpu(s.buf, slot_bytes=SLOT)["ok"])
                    elif op == "load":
                        s.ce.push(s.buf, {"w": torch.ones(2)}, slot_bytes=SLOT)
                    else:
                        self.assertTrue(s.ce.request({"op": op})["ok"])
                self.assertEqual(s.ce.request({"op": "abort", "reason": "rank 2 failed"}), {"ok": True})
                summary = s.worker.result()
                summary = summary[-1] if isinstance(summary, list) else summary
                self.assertEqual((summary["state"], summary["reason"]), ("aborted", "rank 2 failed"))
                self.assertIsNone(s.receiver.mapping)
                self.assertEqual(s.receiver.session.state.value, "idle")

    def test_after_an_abort_the_same_worker_on_the_same_socket_takes_the_next_open(self):
        store = Store()
        s = Session(self, store.load, sessions=2)
        self.assertEqual(s.ce.open_cpu(s.buf, slot_bytes=SLOT, version=1), {"ok": True})
        self.assertEqual(s.ce.push(s.buf, {"w": torch.zeros(3)}, slot_bytes=SLOT), [{"ok": True}])
        self.assertEqual(s.ce.request({"op": "abort", "reason": "rank 1 failed"}), {"ok": True})
        self.assertIsNone(s.receiver.mapping, "abort unmapped the buffer")
        self.assertEqual(s.ce.open_cpu(s.buf, slot_bytes=SLOT, version=2), {"ok": True})
        self.assertEqual(s.ce.push(s.buf, {"w": torch.full((3,), 2.0)}, slot_bytes=SLOT), [{"ok": True}])
        self.assertEqual(s.ce.request({"op": "release"}), {"ok": True})
        self.assertEqual(s.ce.request({"op": "finish"}), {"ok": True})
        aborted, finished = s.worker.result()
        self.assertEqual((aborted["state"], aborted["version"], aborted["reason"]), ("aborted", 1, "rank 1 failed"))
        self.assertEqual((finished["state"], finished["version"], finished["buckets"]), ("finished", 2, 1))
        self.assertTrue(torch.equal(store.params["w"], torch.full((3,), 2.0)))
        self.assertIsNone(s.receiver.mapping)

    def test_silence_from_ce_times_the_session_out_unmaps_and_leaves_the_worker_idle(self):
        s = Session(self, Store().load, op_timeout_s=0.3)
        s.ce.open_cpu(s.buf, slot_bytes=SLOT)
        with self.assertRaisesRegex(SessionTimeout, r"no request from ce within 0.3 s \(session open"):
            s.worker.result()
        self.assertIsNone(s.receiver.mapping)
        self.assertEqual(s.receiver.session.state.value, "idle")

    def test_release_refuses_to_unmap_under_a_view_the_engine_kept(self):
        kept = []
        s = Session(self, kept.extend)
        s.ce.open_cpu(s.buf, slot_bytes=SLOT)
        s.ce.push(s.buf, {"w": torch.ones(2)}, slot_bytes=SLOT)
        reply = s.ce.request({"op": "release"})
        self.assertFalse(reply["ok"])
        self.assertIn("still referenced; load_fn must copy", reply["error"])
        self.assertIsNotNone(s.receiver.mapping, "still mapped: the kept view stays valid")
        kept.clear()
        self.assertEqual(s.ce.request({"op": "release"}), {"ok": True})
        s.ce.request({"op": "finish"})
        self.assertEqual(s.worker.result()["state"], "finished")

    def test_an_open_for_another_device_is_refused(self):
        s = Session(self, Store().load, expect_uuid="CPU-host-1")
        reply = s.ce.open_cpu(s.buf, slot_bytes=SLOT)
        self.assertEqual(reply["error"], "ValueError: open for device CPU-test-0 reached the worker on CPU-host-1")
        s.ce.request({"op": "abort"})
        s.worker.result()

    def test_a_cuda_buffer_needs_a_cuda_worker(self):
        s = Session(self, Store().load)
        reply = s.ce.request({"op": "open", "protocol": 1, "checkpoint": "c", "version": 1, "device_uuid": "GPU-0",
                              "backend": "cuda", "buffer_bytes": 64, "slots": 1, "slot_bytes": 64},
                             bytes(64))
        self.assertIn("backend cuda needs a CUDA device, this worker runs on cpu", reply["error"])
        s.ce.request({"op": "abort"})
        s.worker.result()


class VerifyTest(unittest.TestCase):
    """Protocol 2's verify by digest and the held version, on the reference receiver."""

    def update(self, s, tensors, version=1, **open_fields):
        """One whole session of `tensors` (dict, or a list of dicts loaded one after the other); the replies."""
        opened = s.ce.open_cpu(s.buf, slot_bytes=SLOT, version=version, **open_fields)
        for part in tensors if isinstance(tensors, list) else [tensors]:
            self.assertTrue(all(r["ok"] for r in s.ce.push(s.buf, part, slot_bytes=SLOT)))
        self.assertEqual(s.ce.request({"op": "release"}), {"ok": True})
        return opened, s.ce.request({"op": "finish"})

    def test_a_store_without_params_gets_the_digests_of_what_each_load_was_given(self):
        s = Session(self, Store().load)
        tensors = support.sample_tensors(seed=11)
        later = {"model.q.scale": torch.arange(13, dtype=torch.uint8)}  # loaded twice: the last one counts
        opened, finished = self.update(s, [tensors, later], verify=True)
        self.assertEqual(opened, {"ok": True, "protocol": 2, "verify": True})
        self.assertEqual(finished, {"ok": True, "digests": support.digests_of({**tensors, **later})})
        self.assertEqual(list(finished["digests"]), list(tensors), "one entry per tensor, in the order first loaded")
        s.worker.result()

    def test_a_module_is_digested_as_it_holds_its_parameters_after_the_copy(self):
        # The module holds float32 where ce sends float16: copy_bucket converts, and the digest is the module's.
        module = torch.nn.Linear(3, 2)
        s = Session(self, module_loader(module))
        sent = {"weight": torch.randn(2, 3).half(), "bias": torch.randn(2).half()}
        _, finished = self.update(s, sent, verify=True)
        self.assertEqual(finished["digests"], support.digests_of(dict(module.state_dict())))
        self.assertNotEqual(finished["digests"], support.digests_of(sent))
        s.worker.result()

    def test_params_missing_a_received_tensor_fail_the_finish_naming_it(self):
        s = Session(self, Store().load, params={"w": torch.zeros(2)})
        _, finished = self.update(s, {"w": torch.ones(2), "b": torch.ones(1)}, verify=True)
        self.assertEqual(finished, {"ok": False, "error": "LookupError: verify: the engine holds no tensor b, "
                                                          "which it received"})
        s.ce.request({"op": "abort"})
        s.worker.result()

    def test_without_verify_nothing_is_digested(self):
        s = Session(self, Store().load)
        with mock.patch("ce_worker.digest.launch_digests") as launch:
            opened, finished = self.update(s, {"w": torch.ones(2)}, verify=False)
        self.assertEqual((opened, finished, launch.called), ({"ok": True}, {"ok": True}, False))
        s.worker.result()

    def test_a_verify_that_is_not_a_boolean_is_refused_naming_the_field(self):
        s = Session(self, Store().load)
        self.assertEqual(s.ce.open_cpu(s.buf, slot_bytes=SLOT, verify="yes"),
                         {"ok": False, "error": 'ProtocolError: field verify must be a boolean, got "yes"'})
        s.ce.request({"op": "abort"})
        s.worker.result()

    def test_the_open_reply_names_the_last_finished_update_until_a_load_changes_the_weights(self):
        s = Session(self, Store().load, sessions=4)
        steps = [  # (version, how the session ends, what its open reply must say the engine holds)
            (1, "finish", None), (2, "abort before load", 1), (3, "abort after load", 1), (4, "finish", None)]
        for version, end, holds in steps:
            opened = s.ce.open_cpu(s.buf, slot_bytes=SLOT, version=version)
            want = {"ok": True} if holds is None else {"ok": True, "protocol": 2, "checkpoint": "test", "version": holds}
            self.assertEqual(opened, want, f"open of version {version}")
            if end != "abort before load":
                s.ce.push(s.buf, {"w": torch.full((2,), float(version))}, slot_bytes=SLOT)
            if end == "finish":
                s.ce.request({"op": "release"})
                s.ce.request({"op": "finish"})
            else:
                s.ce.request({"op": "abort", "reason": end})
        self.assertEqual([r["state"] for r in s.worker.result()], ["finished", "aborted", "aborted", "finished"])
        self.assertEqual((s.receiver.held.checkpoint, s.receiver.held.version), ("test", 4))

    def test_a_failed_post_hook_leaves_the_held_version_unknown(self):
        def post(opened):
            if opened.version == 2:
                raise RuntimeError("post-load processing failed")

        s = Session(self, Store().load, post, sessions=3)
        self.update(s, {"w": torch.ones(2)})
        s.ce.open_cpu(s.buf, slot_bytes=SLOT, version=2)
        s.ce.request({"op": "release"})
        self.assertEqual(s.ce.request({"op": "finish"}), {"ok": False, "error": "RuntimeError: post-load processing failed"})
        s.ce.request({"op": "abort", "reason": "finish failed"})
        self.assertEqual(s.ce.open_cpu(s.buf, slot_bytes=SLOT, version=3), {"ok": True}, "post-processing changed weights")
        s.ce.request({"op": "abort"})
        s.worker.result()


class UpdateWeightsTest(unittest.TestCase):
    def test_update_weights_from_ipc_loads_a_module_in_place(self):
        torch.manual_seed(0)
        module = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.LayerNorm(4))
        before = {n: p.data_ptr() for n, p in module.state_dict().items()}
        new = {n: torch.randn_like(p) for n, p in module.state_dict().items()}
        ce = support.Ce()
        buf = support.ShmBuffer(2 * SLOT)
        self.addCleanup(buf.close)
        self.addCleanup(ce.close)
        hooks = []
        worker = support.Background(lambda: receiver.update_weights_from_ipc(
            ce.endpoint, module_loader(module), lambda opened: hooks.append(opened.version) or {"hooked": True},
            device=torch.device("cpu"), op_timeout_s=10))
        ce.open_cpu(buf, slot_bytes=SLOT, version=7)
        self.assertTrue(all(r["ok"] for r in ce.push(buf, new, slot_bytes=SLOT)))
        ce.request({"op": "release"})
        self.assertEqual(ce.request({"op": "finish"}), {"ok": True, "hooked": True})
        summary = worker.result()
        self.assertEqual((summary["state"], summary["version"], hooks), ("finished", 7, [7]))
        for name, t in module.state_dict().items():
            self.assertTrue(torch.equal(t, new[name]), name)
            self.assertEqual(t.data_ptr(), before[name], "copied in place")

    def test_copy_bucket_copies_every_tensor_in_one_call(self):
        params = {"a": torch.zeros(2, 3), "b": torch.zeros(4, dtype=torch.bfloat16)}
        copy_bucket(params, [("a", torch.ones(2, 3)), ("b", torch.full((4,), 2.0, dtype=torch.bfloat16))])
        self.assertTrue(torch.equal(params["a"], torch.ones(2, 3)))
        self.assertTrue(torch.equal(params["b"], torch.full((4,), 2.0, dtype=torch.bfloat16)))

    def test_copy_bucket_takes_a_bucket_with_nothing_to_copy_as_bytes(self):
        # Only empty tensors and dtype conversions: no byte copies, which torch 2's foreach would refuse.
        params = {"e": torch.zeros(0, 4), "f": torch.zeros(2)}
        copy_bucket(params, [("e", torch.ones(0, 4)), ("f", torch.full((2,), 3.0, dtype=torch.float16))])
        self.assertTrue(torch.equal(params["f"], torch.full((2,), 3.0)))

    def test_errors_format_as_type_message_and_tensor(self):
        self.assertEqual(loads.format_error(loads.tag(ValueError("bad"), "w")), "ValueError: bad (tensor w)")
        self.assertEqual(loads.format_error(RuntimeError("oom")), "RuntimeError: oom")


if __name__ == "__main__":
    unittest.main()
