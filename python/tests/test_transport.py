import os
import re
import subprocess
import sys
import time
import unittest

import support

from ce_worker import transport

BACKENDS = support.transports()


class TransportTest(unittest.TestCase):
    def test_this_machine_has_a_transport(self):
        self.assertTrue(BACKENDS, "neither pyzmq nor a loadable libzmq.so.5")

    def test_multipart_frames_round_trip_in_both_directions(self):
        for req_backend in BACKENDS:
            for rep_backend in BACKENDS:
                with self.subTest(req=req_backend, rep=rep_backend):
                    ep = support.endpoint()
                    with transport.open_socket(ep, kind="req", bind=True, backend=req_backend) as req, \
                            transport.connect_rep(ep, backend=rep_backend) as rep:
                        self.assertEqual((req.backend, rep.backend), (req_backend, rep_backend))
                        sent = [b'{"op":"open"}', bytes(range(64)), b"", b"\0" * 100000]
                        req.send_multipart(sent)
                        self.assertEqual(rep.recv_multipart(5.0), sent)
                        rep.send_multipart([b'{"ok":true}'])
                        self.assertEqual(req.recv_multipart(5.0), [b'{"ok":true}'])

    def test_receive_gives_up_at_its_deadline(self):
        for backend in BACKENDS:
            with self.subTest(backend):
                with transport.open_socket(support.endpoint(), kind="rep", bind=True, backend=backend) as rep:
                    start = time.monotonic()
                    self.assertIsNone(rep.recv_multipart(0.2))
                    self.assertIsNone(rep.recv_multipart(0))
                    self.assertLess(time.monotonic() - start, 2.0)
                    self.assertGreaterEqual(time.monotonic() - start, 0.19)

    def test_close_drops_unsent_messages_instead_of_hanging(self):
        for backend in BACKENDS:
            with self.subTest(backend):
                # Nobody binds this endpoint: the request can never leave.
                req = transport.open_socket(support.endpoint(), kind="req", backend=backend)
                req.send_multipart([b"lost"])
                start = time.monotonic()
                req.close()
                req.close()
                self.assertLess(time.monotonic() - start, 1.0)

    def test_a_bad_endpoint_names_itself_in_the_error(self):
        for backend in BACKENDS:
            with self.subTest(backend):
                with self.assertRaisesRegex(transport.TransportError, r"zmq_connect\(nope://x\)"):
                    transport.connect_rep("nope://x", backend=backend)

    def test_an_unknown_backend_or_kind_is_refused(self):
        with self.assertRaisesRegex(ValueError, "'nanomsg'"):
            transport.connect_rep(support.endpoint(), backend="nanomsg")
        with self.assertRaisesRegex(ValueError, "'pub'"):
            transport.open_socket(support.endpoint(), kind="pub")


class LibzmqLookupTest(unittest.TestCase):
    def run_probe(self, **env):
        code = "from ce_worker import transport\nprint(transport.probe('ctypes'))"
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHONPATH": support.PACKAGE_ROOT, **env})

    @unittest.skipUnless("ctypes" in BACKENDS, "no loadable libzmq.so.5")
    def test_libzmq_is_found_without_help(self):
        out = self.run_probe(CE_LIBZMQ="")
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertRegex(out.stdout, r"ctypes libzmq \d+\.\d+\.\d+ at ")

    def test_ce_libzmq_overrides_the_lookup_and_a_bad_one_is_named(self):
        out = self.run_probe(CE_LIBZMQ="/nonexistent/libzmq.so.5")
        self.assertNotEqual(out.returncode, 0)
        self.assertIn("/nonexistent/libzmq.so.5", out.stderr)
        self.assertIn("CE_LIBZMQ", out.stderr)

    def test_every_ctypes_prototype_sits_under_its_c_declaration(self):
        with open(transport.__file__) as f:
            source = f.read()
        for name, _, _ in transport._FUNCTIONS:
            with self.subTest(name):
                self.assertRegex(source, rf"# [^\n]*\b{name}\([^\n]*\);[^\n]*\n\s*\(\"{name}\"")


if __name__ == "__main__":
    unittest.main()
