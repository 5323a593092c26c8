"""Protocol 2's kept mapping (the warm path), as src/wire/worker-protocol.json's "mappings" define it.

Every case runs against one Receiver serving session after session (python3 -m ce_worker's way) and
against a new Receiver per session sharing one MappingCache and one Held (update_weights_from_ipc's
way, which is vLLM's). What the worker maps is read from /proc/self/maps, and every load checks that
the mapping, kept or new, shows the bytes ce wrote last. Each open's reply is checked whole: the
mapping's fields, and the held version (the last finished update, unknown once a load came after it).
"""

import json
import os
import unittest
import uuid

import support

import torch

from ce_worker import protocol, receiver
from ce_worker.held import Held
from ce_worker.loads import module_loader
from ce_worker.receiver import MappingCache, Receiver, update_weights_from_ipc

BUFFER_BYTES = 8192


def mapped_paths():
    with open("/proc/self/maps", encoding="utf-8") as f:
        return {line.split(None, 5)[5].strip().removesuffix(" (deleted)") for line in f if len(line.split(None, 5)) == 6}


class Ce:
    """ce's side, without a socket: frames in, the Receiver's replies out."""

    def __init__(self, test):
        self.buffers = {}
        self.ids = {}
        self.test = test
        self.loaded = []

    def buffer(self, letter):
        if letter not in self.buffers:
            buf = support.ShmBuffer(BUFFER_BYTES)
            self.test.addCleanup(buf.close)
            self.buffers[letter] = buf
            self.ids[letter] = f"{os.getpid()}-{uuid.uuid4().hex[:8]}-{letter}"
        return self.buffers[letter]

    def mapped(self):
        paths = mapped_paths()
        return {letter for letter, buf in self.buffers.items() if buf.path in paths}


class MappingCasesTest(unittest.TestCase):
    def run_case(self, case, per_session):
        ce = Ce(self)
        cache = MappingCache()
        held = Held()
        loaded = []
        make = lambda: Receiver(lambda w: loaded.extend((n, t.clone()) for n, t in w),  # noqa: E731
                                device=torch.device("cpu"), cache=cache, held=held)
        rx = make()
        current = None
        opened_version = None
        holds = {}  # what the next open's reply must say the engine holds
        for i, step in enumerate(case["steps"]):
            where = f"step {i} ({step['op']})"
            op = step["op"]
            if op == "open":
                current = ce.buffer(step["buffer"])
                frame = {"op": "open", "protocol": 2, "checkpoint": "m", "version": i, "device_uuid": "CPU-t-0",
                         "backend": "cpu", "buffer_bytes": BUFFER_BYTES, "slots": 2, "slot_bytes": BUFFER_BYTES // 2,
                         "path": current.path}
                if step.get("id", True):
                    frame["buffer_id"] = ce.ids[step["buffer"]]
                reply = json.loads(rx.handle([json.dumps(frame).encode()]))
                opened_version = i
                v2 = dict(holds)
                if "buffer_id" in frame:
                    v2.update(buffer_id=frame["buffer_id"], kept=step["kept"])
                else:
                    self.assertFalse(step["kept"])
                want = {"ok": True, "protocol": protocol.PROTOCOL_VERSION, **v2} if v2 else {"ok": True}
                self.assertEqual(reply, want, where)
            elif op == "load":
                fresh = torch.randint(0, 255, (16,), dtype=torch.uint8)
                current.write(0, fresh)
                frame = {"op": "load", "bucket": 0, "slot": 0,
                         "tensors": [{"name": "w", "dtype": "U8", "shape": [16], "offset": 0, "nbytes": 16}]}
                self.assertEqual(json.loads(rx.handle([json.dumps(frame).encode()])), {"ok": True}, where)
                self.assertTrue(torch.equal(loaded[-1][1], fresh), f"{where}: the mapping shows ce's last bytes")
                holds = {}
            else:
                frame = {"op": op}
                if "keep" in step:
                    frame["keep"] = step["keep"]
                self.assertTrue(json.loads(rx.handle([json.dumps(frame).encode()]))["ok"], where)
                if op == "finish":
                    holds = {"checkpoint": "m", "version": opened_version}
                if per_session and op in ("finish", "abort"):
                    rx = make()  # the session is over: the next one gets a new Receiver, as in vLLM
            if "mapped" in step:
                want = set() if step["mapped"] is None else {step["mapped"]}
                self.assertEqual(ce.mapped(), want, f"{where}: what the worker maps")
        rx.drop()
        self.assertEqual(ce.mapped(), set(), "drop() unmaps a kept mapping")

    def test_every_mapping_case_of_the_definition(self):
        cases = support.protocol_definition()["mappings"]
        self.assertGreaterEqual(len(cases), 4)
        for per_session in (False, True):
            for case in cases:
                with self.subTest(case["case"], receiver="per session" if per_session else "one"):
                    self.run_case(case, per_session)


class UpdateWeightsFromIpcTest(unittest.TestCase):
    """The path of vLLM's extension: one call per session, the mapping kept in the process's cache."""

    def session(self, module, ce, buf, buffer_id, tensors, end="finish", keep=True):
        rpc = support.Background(lambda: update_weights_from_ipc(
            ce.endpoint, module_loader(module), device=torch.device("cpu"), expect_uuid="CPU-test-0"))
        reply = ce.open_cpu(buf, slot_bytes=4096, buffer_id=buffer_id, protocol=2)
        if end == "abort":
            ce.request({"op": "abort", "reason": "a test"})
            rpc.result()
            return reply
        for r in ce.push(buf, tensors, slot_bytes=4096):
            self.assertEqual(r, {"ok": True})
        self.assertEqual(ce.request({"op": "release", "keep": keep}), {"ok": True})
        self.assertEqual(ce.request({"op": "finish"}), {"ok": True})
        self.assertEqual(rpc.result()["state"], "finished")
        return reply

    def test_consecutive_calls_keep_the_mapping_and_abort_or_another_buffer_drops_it(self):
        module = torch.nn.Linear(8, 4)
        ce = support.Ce()
        self.addCleanup(ce.close)
        a, b = support.ShmBuffer(8192), support.ShmBuffer(8192)
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        self.addCleanup(receiver.process_cache("CPU-test-0").drop)
        receiver.process_held("CPU-test-0").clear()  # other tests' updates of this device
        for step, (buf, bid, kept, end) in enumerate([(a, "a1", False, "finish"), (a, "a1", True, "finish"),
                                                      (a, "a1", True, "abort"), (a, "a1", False, "finish"),
                                                      (b, "b1", False, "finish"), (b, "b1", True, "finish")]):
            tensors = {"weight": torch.randn(4, 8), "bias": torch.randn(4)}
            reply = self.session(module, ce, buf, bid, tensors, end=end)
            # Every session finishes version 1 but the abort, which came before any load.
            holds = {"checkpoint": "test", "version": 1} if step else {}
            self.assertEqual(reply, {"ok": True, "protocol": 2, "buffer_id": bid, "kept": kept, **holds},
                             f"session {step}")
            held = {p for p in (a.path, b.path) if p in mapped_paths()}
            self.assertEqual(held, set() if end == "abort" else {buf.path}, f"after session {step}")
            if end == "finish":
                self.assertTrue(torch.equal(module.weight.data, tensors["weight"]))
                self.assertTrue(torch.equal(module.bias.data, tensors["bias"]))


if __name__ == "__main__":
    unittest.main()
