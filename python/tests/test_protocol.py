import json
import unittest

import support

from ce_worker import protocol
from ce_worker.protocol import Abort, Finish, Load, Open, ProtocolError, Release, Session, State

HANDLE = bytes(range(64))
OPEN_CPU = {"op": "open", "protocol": 1, "checkpoint": "qwen", "version": 3, "device_uuid": "CPU-h-0",
            "backend": "cpu", "buffer_bytes": 4096, "slots": 2, "slot_bytes": 2048, "path": "/dev/shm/x"}
OPEN_CUDA = {**OPEN_CPU, "backend": "cuda", "device_uuid": "GPU-1", "path": ""}
LOAD = {"op": "load", "bucket": 0, "slot": 1,
        "tensors": [{"name": "w", "dtype": "BF16", "shape": [2, 3], "offset": 2048, "nbytes": 12}]}


def frames(obj, *extra):
    return [json.dumps(obj).encode(), *extra]


class ParseTest(unittest.TestCase):
    def test_every_op_parses_into_its_request(self):
        cases = [
            (frames(OPEN_CPU), Open),
            (frames(OPEN_CUDA, HANDLE), Open),
            (frames(LOAD), Load),
            (frames({"op": "release"}), Release),
            (frames({"op": "finish"}), Finish),
            (frames({"op": "abort", "reason": "rank 3 failed"}), Abort),
            (frames({"op": "abort"}), Abort),
        ]
        for raw, kind in cases:
            with self.subTest(op=json.loads(raw[0])["op"]):
                self.assertIsInstance(protocol.parse(raw), kind)

    def test_open_carries_the_handle_and_the_optional_extras(self):
        req = protocol.parse(frames({**OPEN_CUDA, "files": ["/a.safetensors"], "buckets": 4, "tensors": 9}, HANDLE))
        self.assertEqual(req.handle, HANDLE)
        self.assertEqual(req.files, ("/a.safetensors",))
        self.assertEqual((req.buckets, req.tensors, req.version, req.slots), (4, 9, 3, 2))
        self.assertIsNone(protocol.parse(frames(OPEN_CPU)).handle)

    def test_open_may_ask_to_verify_and_reads_false_without_it(self):
        for value, want in ((True, True), (False, False)):
            self.assertIs(protocol.parse(frames({**OPEN_CPU, "verify": value})).verify, want)
        self.assertIs(protocol.parse(frames(OPEN_CPU)).verify, False)

    def test_load_keeps_offsets_relative_to_the_buffer(self):
        req = protocol.parse(frames(LOAD))
        self.assertEqual(req.tensors[0], protocol.TensorMeta("w", "BF16", (2, 3), 2048, 12))

    def test_unknown_fields_are_ignored(self):
        req = protocol.parse(frames({**LOAD, "future": {"x": 1},
                                     "tensors": [{**LOAD["tensors"][0], "hash": "abc"}]}))
        self.assertEqual(len(req.tensors), 1)
        self.assertEqual(protocol.parse(frames({"op": "finish", "stats": True})), Finish())

    def test_malformed_frames_are_refused_with_the_reason(self):
        t0 = LOAD["tensors"][0]
        cases = [
            ("empty message", [], "empty message"),
            ("not JSON", [b"{nope"], "not UTF-8 JSON"),
            ("not UTF-8", [b"\xff\xfe"], "not UTF-8 JSON"),
            ("a JSON list", [b"[1]"], "expected an object"),
            ("no op", frames({"bucket": 1}), "unknown op None"),
            ("unknown op", frames({"op": "reload"}), "unknown op 'reload'"),
            ("protocol 3", frames({**OPEN_CPU, "protocol": 3}), "protocol 3 is not supported (this worker speaks 1 to 2)"),
            ("protocol 0", frames({**OPEN_CPU, "protocol": 0}), "protocol 0 is not supported"),
            ("empty buffer_id", frames({**OPEN_CPU, "buffer_id": ""}), "field buffer_id must be a non-empty string"),
            ("keep not a bool", frames({"op": "release", "keep": 1}), "field keep must be a boolean, got 1"),
            ("verify not a bool", frames({**OPEN_CPU, "verify": "yes"}), 'field verify must be a boolean, got "yes"'),
            ("verify null", frames({**OPEN_CPU, "verify": None}), "field verify must be a boolean, got null"),
            ("no protocol", frames({k: v for k, v in OPEN_CPU.items() if k != "protocol"}), "field protocol"),
            ("bad backend", frames({**OPEN_CPU, "backend": "rocm"}), "backend 'rocm'"),
            ("cuda without handle", frames(OPEN_CUDA), "takes 2 frames"),
            ("short handle", frames(OPEN_CUDA, b"x" * 63), "63 bytes, expected 64"),
            ("cpu with a handle", frames(OPEN_CPU, HANDLE), "open on cpu takes 1 frame"),
            ("cpu without path", frames({**OPEN_CPU, "path": ""}), "field path"),
            ("zero buffer", frames({**OPEN_CPU, "buffer_bytes": 0}), "buffer_bytes must be >= 1"),
            ("bool as int", frames({**OPEN_CPU, "slots": True}), "field slots must be an integer"),
            ("files not a list", frames({**OPEN_CPU, "files": "/a"}), "field files"),
            ("load with 2 frames", frames(LOAD, b"x"), "op load takes 1 frame"),
            ("tensors not a list", frames({**LOAD, "tensors": {}}), "field tensors must be a list"),
            ("negative offset", frames({**LOAD, "tensors": [{**t0, "offset": -1}]}), "field offset must be >= 0, got -1 (tensor w)"),
            ("negative dim", frames({**LOAD, "tensors": [{**t0, "shape": [2, -3]}]}), "field shape"),
            ("float dim", frames({**LOAD, "tensors": [{**t0, "shape": [2.0]}]}), "field shape"),
            ("no name", frames({**LOAD, "tensors": [{k: v for k, v in t0.items() if k != "name"}]}),
             "field name must be a string, got null (tensors[0])"),
            ("no bucket", frames({k: v for k, v in LOAD.items() if k != "bucket"}), "field bucket"),
        ]
        for what, raw, message in cases:
            with self.subTest(what):
                with self.assertRaises(ProtocolError) as ctx:
                    protocol.parse(raw)
                self.assertIn(message, str(ctx.exception))

    def test_replies_are_json_objects_with_ok(self):
        self.assertEqual(json.loads(protocol.ok(tensors=3)), {"ok": True, "tensors": 3})
        self.assertEqual(json.loads(protocol.error("KeyError: 'w'")), {"ok": False, "error": "KeyError: 'w'"})


class DefinitionTest(unittest.TestCase):
    """This end against the protocol's one definition, src/wire/worker-protocol.json."""

    OPS = {"open": Open("c", 1, "u", "cpu", 1, 1, 1, "/p", None), "load": Load(0, 0, ()),
           "release": Release(), "finish": Finish(), "abort": Abort("")}

    def test_the_transitions_are_those_of_the_definition(self):
        spec = support.protocol_definition()
        self.assertEqual(spec["protocol"], protocol.PROTOCOL_VERSION)
        self.assertEqual(spec["oldest"], protocol.OLDEST_PROTOCOL)
        self.assertEqual([s.value for s in State], spec["states"])
        self.assertEqual(State(spec["initial"]), Session().state)
        self.assertEqual(protocol.TRANSITIONS, spec["transitions"])

    def test_every_state_and_op_pair_advances_as_the_definition_says_or_is_refused(self):
        table = support.protocol_definition()["transitions"]
        for state in State:
            for op, req in self.OPS.items():
                with self.subTest(state=state.value, op=op):
                    s = Session()
                    s.state = state
                    nxt = table[state.value].get(op)
                    if nxt is None:
                        with self.assertRaises(ProtocolError) as ctx:
                            s.advance(req)
                        self.assertIn(f"op {op} does not fit state {state.value} (expected ", str(ctx.exception))
                        self.assertIs(s.state, state, "a refused op leaves the state as it was")
                    else:
                        s.advance(req)
                        self.assertEqual(s.state.value, nxt)

    def test_every_frame_case_of_the_definition_is_accepted_or_refused_as_it_says(self):
        cases = support.protocol_definition()["frames"]
        self.assertGreater(len(cases), 10)
        for case in cases:
            with self.subTest(case["case"]):
                raw = [support.frame_bytes(f) for f in case["frames"]]
                if case["valid"]:
                    req = protocol.parse(raw)
                    self.assertEqual(req.op, case["op"])
                    for field, value in case.get("fields", {}).items():
                        self.assertEqual(getattr(req, field), value, field)
                else:
                    with self.assertRaises(ProtocolError):
                        protocol.parse(raw)

    def test_the_refusal_says_what_was_expected(self):
        s = Session()
        with self.assertRaises(ProtocolError) as ctx:
            s.check(self.OPS["load"])
        self.assertIn("expected abort or open", str(ctx.exception))
        s.state = State.FINISHED
        with self.assertRaises(ProtocolError) as ctx:
            s.check(self.OPS["finish"])
        self.assertIn("expected abort or open", str(ctx.exception))

    def test_abort_then_open_again_and_open_after_finish(self):
        s = Session()
        for op, state in (("open", State.OPEN), ("load", State.OPEN), ("abort", State.IDLE), ("open", State.OPEN),
                          ("load", State.OPEN), ("release", State.RELEASED), ("finish", State.FINISHED),
                          ("open", State.OPEN)):
            s.advance(self.OPS[op])
            self.assertIs(s.state, state, op)


if __name__ == "__main__":
    unittest.main()
