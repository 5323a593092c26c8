"""ce_client, the trainer's push client: its pure parts, and push against a stand-in for ce serve's pool
routes (the real server's end-to-end test is test_client_serve.py).

The stand-in keeps its pools in memory and its slot files in /dev/shm, as ce serve does, and checks
what a client may only claim: every "written" says that many leading bytes of the slot file are
complete, so it compares them there and then with what the push must leave.
"""

import http.server
import json
import os
import socket
import socketserver
import tempfile
import threading
import unittest

import support

import torch

from ce_client import CeError, LayoutError, Pool, layout_of
from ce_client.api import Api, UnixHTTPConnection, error_of
from ce_client.layout import DTYPE_NAMES, check, dtype_name, normalize

ALIGN = 256


def state_dict(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(33, 16, generator=g).to(torch.bfloat16),
        "layers.0.attn.qkv.weight": torch.randn(48, 16, generator=g).half(),
        "layers.0.norm.weight": torch.randn(16, generator=g),
        "layers.0.mask": torch.rand(7, generator=g) > 0.5,
        "layers.0.empty": torch.empty(0, 3),
        "scale": torch.tensor(0.5, dtype=torch.float64),
        "positions": torch.arange(5, dtype=torch.int64),
        "lm_head.weight": torch.randn(16, 33, generator=g).to(torch.bfloat16).t(),  # not contiguous
    }


class StandIn:
    """ce serve's pool routes as the spec (issue 21) has them, in memory, with real slot files."""

    def __init__(self, test):
        self.test = test
        self.pools = {}
        self.requests = []  # (method, path, body)
        self.expected = {}  # (pool, version) -> the bytes its slot must hold
        self.fail_written = False

    def handle(self, method, path, body):
        self.requests.append((method, path, body))
        parts = path.strip("/").split("/")
        if parts[:2] != ["v1", "pools"] and parts != ["v1", "update"]:
            return 404, {"ok": False, "error": {"code": "E_NOT_FOUND", "message": f"no route {path}"}}
        if parts == ["v1", "pools"] and method == "POST":
            return self.create(body)
        if parts == ["v1", "update"]:
            return 200, {"ok": True, "pool": body["pool"], "version": body["version"], "tensors": 8}
        pool = self.pools.get(parts[2])
        if pool is None:
            return 404, {"ok": False, "error": {"code": "E_POOL_UNKNOWN", "message": f"no pool {parts[2]}",
                                                "hint": "POST /v1/pools first"}}
        if len(parts) == 3:
            if method == "DELETE":
                del self.pools[parts[2]]
                return 200, {"ok": True}
            return 200, {"ok": True, **pool["info"], "versions": pool["versions"], "serving": None, "lastGood": None}
        if parts[3] == "rollback":
            return 200, {"ok": True, "version": 1}
        if len(parts) == 5 and method == "DELETE":
            pool["versions"] = [v for v in pool["versions"] if v["version"] != int(parts[4])]
            return 200, {"ok": True}
        if len(parts) == 4:
            version = body["version"]
            slot = version % pool["info"]["slots"]
            pool["versions"].append({"version": version, "slot": slot, "state": "writing"})
            return 200, {"ok": True, "version": version, "slot": slot, "path": pool["info"]["files"][slot],
                         "bytes": pool["info"]["bytes"], "layout": pool["info"]["layout"]}
        version, what = int(parts[4]), parts[5]
        file = pool["info"]["files"][version % pool["info"]["slots"]]
        want = self.expected.get((parts[2], version))
        if what == "written":
            if self.fail_written:
                return 500, {"ok": False, "error": {"code": "E_TEST", "message": "the stand-in refuses written"}}
            if want is None:
                return 200, {"ok": True}
            with open(file, "rb") as f:
                got = f.read(body["bytes"])
            if got != want[:body["bytes"]]:
                return 500, {"ok": False, "error": {"code": "E_TEST_EARLY", "message": f"written {body['bytes']}: "
                                                    f"those bytes of {file} are not complete yet"}}
            return 200, {"ok": True}
        with open(file, "rb") as f:
            got = f.read(len(want)) if want is not None else b""
        if want is not None and got != want:
            return 500, {"ok": False, "error": {"code": "E_POOL_DIGEST", "message": f"version {version} differs"}}
        return 200, {"ok": True, "version": version, **({"update": {"tensors": 8}} if body["update"] else {})}

    def create(self, body):
        if "path" in body:
            return 400, {"ok": False, "error": {"code": "E_INPUT", "message": "the stand-in registers no checkpoints"}}
        layout, offset = [], 0
        for e in body["layout"]:
            nbytes = DTYPE_BITS[e["dtype"]] // 8 * _numel(e["shape"])
            layout.append({**e, "offset": offset, "nbytes": nbytes})
            offset = (offset + nbytes + ALIGN - 1) // ALIGN * ALIGN
        files = []
        for k in range(body["slots"]):
            path = f"/dev/shm/ce-test-client-{os.getpid()}-{id(self)}-{body['name']}-{k}"
            with open(path, "wb") as f:
                f.truncate(max(offset, ALIGN))
            self.test.addCleanup(os.unlink, path)
            files.append(path)
        info = {"name": body["name"], "slots": body["slots"], "bytes": offset, "tensors": len(layout),
                "layout": layout, "files": files}
        self.pools[body["name"]] = {"info": info, "versions": []}
        return 201, {"ok": True, **info}

    def expect(self, pool, version, tensors):
        """The slot image a push of `tensors` must leave."""
        info = self.pools[pool]["info"]
        image = bytearray(info["bytes"])
        for e in info["layout"]:
            image[e["offset"]:e["offset"] + e["nbytes"]] = support.raw_bytes(tensors[e["name"]])
        self.expected[(pool, version)] = bytes(image)

    def paths(self):
        return [(m, p) for m, p, _ in self.requests]


DTYPE_BITS = {"BF16": 16, "F16": 16, "F32": 32, "F64": 64, "BOOL": 8, "I64": 64, "U8": 8}


def _numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def handler_for(stand_in):
    class Handler(http.server.BaseHTTPRequestHandler):
        def _reply(self):
            length = int(self.headers.get("content-length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            status, reply = stand_in.handle(self.command, self.path, body)
            raw = json.dumps(reply).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        do_GET = do_POST = do_DELETE = _reply

        def address_string(self):  # a Unix socket's peer has no address
            return "local"

        def log_message(self, *args):
            pass

    return Handler


class UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def serve(test, stand_in, unix=False):
    """Start the stand-in on a free port or a fresh Unix socket; returns its url (unix:PATH for a socket)."""
    if unix:
        path = os.path.join(tempfile.mkdtemp(prefix="ce-test-client-"), "ce.sock")
        server = UnixHTTPServer(path, handler_for(stand_in))
        test.addCleanup(os.rmdir, os.path.dirname(path))
        test.addCleanup(os.unlink, path)
        url = f"unix:{path}"
    else:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler_for(stand_in))
        url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    test.addCleanup(server.server_close)
    test.addCleanup(server.shutdown)
    return url


class LayoutTest(unittest.TestCase):
    LAYOUT = [{"name": "a", "dtype": "BF16", "shape": [2, 3]}, {"name": "b", "dtype": "F32", "shape": [4]},
              {"name": "c", "dtype": "I64", "shape": []}]

    def tensors(self, **changes):
        out = {"a": torch.zeros(2, 3, dtype=torch.bfloat16), "b": torch.zeros(4), "c": torch.tensor(1)}
        out.update(changes)
        return {k: v for k, v in out.items() if v is not None}

    def test_a_fitting_state_dict_passes_in_any_order_and_on_any_device(self):
        check(dict(reversed(list(self.tensors().items()))), self.LAYOUT, "p")

    def test_the_first_difference_in_layout_order_is_named(self):
        cases = [
            ("missing", self.tensors(b=None), "pool p: tensor b is missing from the state dict"),
            ("two missing", self.tensors(a=None, c=None), "pool p: tensor a is missing from the state dict (and 1 more)"),
            ("dtype", self.tensors(b=torch.zeros(4, dtype=torch.float16)), "pool p: tensor b is F16 [4], the layout says F32 [4]"),
            ("shape", self.tensors(a=torch.zeros(3, 2, dtype=torch.bfloat16)),
             "pool p: tensor a is BF16 [3, 2], the layout says BF16 [2, 3]"),
            ("a scalar for a vector", self.tensors(b=torch.tensor(1.0)), "tensor b is F32 [], the layout says F32 [4]"),
            ("first in layout order", self.tensors(c=torch.tensor(1.0), a=torch.zeros(1, dtype=torch.bfloat16)),
             "tensor a is BF16 [1]"),
            ("extra", self.tensors(z=torch.zeros(1), y=torch.zeros(1)), "pool p: tensor z is not in the layout (and 1 more)"),
            ("not a tensor", self.tensors(b=[0.0] * 4), "tensor b is a list, not a torch.Tensor"),
        ]
        for what, sd, message in cases:
            with self.subTest(what):
                with self.assertRaises(LayoutError) as ctx:
                    check(sd, self.LAYOUT, "p")
                self.assertIn(message, str(ctx.exception))
                self.assertEqual(ctx.exception.code, "E_CLIENT_LAYOUT")

    def test_a_layout_mismatch_hints_at_a_new_pool(self):
        with self.assertRaises(LayoutError) as ctx:
            check(self.tensors(b=None), self.LAYOUT, "policy")
        self.assertEqual(ctx.exception.hint, "a version must keep pool policy's layout; a new layout needs a new pool")

    def test_layout_of_a_state_dict_keeps_its_order_and_names_its_dtypes(self):
        self.assertEqual(layout_of(self.tensors()), self.LAYOUT)
        with self.assertRaisesRegex(LayoutError, r"tensor w: torch.complex128 has no safetensors dtype name"):
            layout_of({"w": torch.zeros(1, dtype=torch.complex128)})

    def test_a_layout_by_hand_takes_torch_dtypes_or_safetensors_names(self):
        self.assertEqual(normalize([{"name": "a", "dtype": torch.bfloat16, "shape": (2, 3)},
                                    {"name": "b", "dtype": "F32", "shape": torch.Size([4])},
                                    {"name": "c", "dtype": "I64", "shape": []}]), self.LAYOUT)
        for entry, message in [({"dtype": "F32", "shape": [1]}, r"layout\[0\] has no name"),
                               ({"name": "x", "dtype": "F33", "shape": [1]}, r"tensor x: dtype 'F33' is neither"),
                               ({"name": "x", "dtype": "F32", "shape": [-1]}, r"tensor x: shape \[-1\] is not"),
                               ({"name": "x", "dtype": "F32", "shape": [True]}, r"tensor x: shape \[True\] is not")]:
            with self.subTest(message):
                with self.assertRaisesRegex(LayoutError, message):
                    normalize([entry])

    def test_every_dtype_of_this_torch_has_its_safetensors_name(self):
        for dtype, name in [(torch.bfloat16, "BF16"), (torch.float16, "F16"), (torch.float32, "F32"),
                            (torch.int64, "I64"), (torch.bool, "BOOL"), (torch.uint8, "U8"), (torch.int8, "I8")]:
            self.assertEqual(dtype_name(dtype), name)
        if hasattr(torch, "float8_e4m3fn"):
            self.assertEqual(dtype_name(torch.float8_e4m3fn), "F8_E4M3")
        self.assertEqual(len(set(DTYPE_NAMES.values())), len(DTYPE_NAMES), "one name per dtype")


class ApiTest(unittest.TestCase):
    def test_ce_errors_become_ce_error_with_code_message_and_hint(self):
        e = error_of({"code": "E_POOL_LAYOUT", "message": "tensor w: shape [3]", "hint": "make a new pool"}, "POST x", 400)
        self.assertEqual((e.code, e.message, e.hint, e.status), ("E_POOL_LAYOUT", "tensor w: shape [3]", "make a new pool", 400))
        self.assertEqual(str(e), "tensor w: shape [3] (E_POOL_LAYOUT); make a new pool")
        e = error_of({"message": "no code"}, "GET y", 500)
        self.assertEqual((e.code, e.hint, str(e)), ("E_UNKNOWN", None, "no code (E_UNKNOWN)"))
        e = error_of("boom", "GET y", 502)
        self.assertEqual(e.code, "E_CLIENT_REPLY")
        self.assertIn("GET y: HTTP 502, failed without an error object: 'boom'", e.message)

    def test_replies_that_are_not_ces_are_named_with_the_request(self):
        replies = {"/text": (502, b"<html>bad gateway</html>"), "/no-ok": (200, b'{"x": 1}'),
                   "/error": (409, json.dumps({"ok": False, "error": {"code": "E_BUSY", "message": "an update runs"}}).encode())}

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                status, raw = replies[self.path]
                self.send_response(status)
                self.send_header("content-length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.addCleanup(server.server_close)
        self.addCleanup(server.shutdown)
        api = Api(f"http://127.0.0.1:{server.server_address[1]}", timeout_s=10)
        for path, (code, message) in {"/text": ("E_CLIENT_REPLY", "HTTP 502, not JSON: b'<html>bad gateway</html>'"),
                                      "/no-ok": ("E_CLIENT_REPLY", 'a reply without a boolean "ok"'),
                                      "/error": ("E_BUSY", "an update runs")}.items():
            with self.subTest(path):
                with self.assertRaises(CeError) as ctx:
                    api.call("GET", path)
                self.assertEqual(ctx.exception.code, code)
                self.assertIn(message, ctx.exception.message)
                self.assertEqual(ctx.exception.status, replies[path][0])

    def test_nobody_listening_is_a_connect_error_naming_where(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]  # closed again: nobody listens there
        for api, where in [(Api(f"http://127.0.0.1:{port}", timeout_s=5), f"GET http://127.0.0.1:{port}/v1/pools/p"),
                           (Api(socket="/nonexistent/ce.sock", timeout_s=5), "GET unix:/nonexistent/ce.sock/v1/pools/p")]:
            with self.subTest(where):
                with self.assertRaises(CeError) as ctx:
                    api.call("GET", "/v1/pools/p")
                self.assertEqual(ctx.exception.code, "E_CLIENT_CONNECT")
                self.assertTrue(ctx.exception.message.startswith(where), ctx.exception.message)
                self.assertIn("is ce serve running there?", ctx.exception.hint)

    def test_urls_and_sockets(self):
        self.assertEqual(Api().where, "http://127.0.0.1:8711")
        self.assertEqual(Api("unix:/run/ce.sock").socket, "/run/ce.sock")
        self.assertEqual(Api("http://[::1]:9000/").where, "http://[::1]:9000")
        for bad in ("https://h:1", "ftp://h", "127.0.0.1:8711"):
            with self.subTest(bad):
                with self.assertRaisesRegex(ValueError, "expected http://HOST:PORT or unix:PATH"):
                    Api(bad)
        with self.assertRaisesRegex(ValueError, "not both"):
            Api("http://h:1", socket="/s")

    def test_the_unix_connection_speaks_http_over_af_unix(self):
        stand_in = StandIn(self)
        path = serve(self, stand_in, unix=True)[len("unix:"):]
        conn = UnixHTTPConnection(path, timeout=10)
        conn.request("GET", "/v1/pools/none")
        resp = conn.getresponse()
        self.assertEqual((resp.status, json.loads(resp.read())["error"]["code"]), (404, "E_POOL_UNKNOWN"))
        conn.close()


class PushTest(unittest.TestCase):
    def setUp(self):
        self.stand_in = StandIn(self)

    def test_create_push_publish_over_tcp_and_a_unix_socket(self):
        for unix in (False, True):
            with self.subTest(unix=unix):
                url = serve(self, self.stand_in, unix=unix)
                name = f"policy-{int(unix)}"
                sd = state_dict(seed=1)
                with Pool.create(name, sd, slots=2, url=url) as pool:
                    self.assertEqual([e["name"] for e in pool.layout], list(sd))
                    for version in (1, 2, 3):
                        sd = state_dict(seed=version)
                        self.stand_in.expect(name, version, sd)
                        reply = pool.push(sd, version, update=version == 3, progress_bytes=1024)
                        self.assertEqual(reply, {"ok": True, "version": version,
                                                 **({"update": {"tensors": 8}} if version == 3 else {})})
                    self.assertEqual(len(pool._slots), 2, "one mapping per slot file, kept across pushes")
                posts = [p for m, p in self.stand_in.paths() if p.startswith(f"/v1/pools/{name}/versions/3/")]
                # Steps that queue up behind a post go as one: how many posts there are depends on timing.
                self.assertGreaterEqual(len(posts), 2, "written while the push runs, then publish")
                self.assertEqual(posts[-1], f"/v1/pools/{name}/versions/3/publish")
                written = [b["bytes"] for m, p, b in self.stand_in.requests if p == f"/v1/pools/{name}/versions/3/written"]
                self.assertEqual(written, sorted(written))
                begin = [b for m, p, b in self.stand_in.requests if p == f"/v1/pools/{name}/versions"]
                self.assertEqual(begin[-1], {"version": 3, "update": True}, "the update starts with the slot")

    def test_a_tensor_larger_than_a_step_is_said_written_in_steps(self):
        url = serve(self, self.stand_in)
        sd = {"big": torch.arange(10000, dtype=torch.float32), "small": torch.ones(3)}
        pool = Pool.create("p", sd, url=url)
        self.addCleanup(pool.close)
        self.stand_in.expect("p", 1, sd)
        pool.push(sd, 1, progress_bytes=16384)
        written = [b["bytes"] for m, p, b in self.stand_in.requests if p == "/v1/pools/p/versions/1/written"]
        # 40,000 bytes in steps of 16 KiB: said mid-tensor (steps that queue up behind a post go as
        # one, of the furthest); the rest comes with publish.
        self.assertTrue(written, "a step is said before the tensor ends")
        self.assertEqual(written, sorted(set(written)))
        self.assertTrue(set(written) <= {16384, 32768}, written)

    def test_a_state_dict_that_does_not_fit_is_refused_before_a_slot_is_taken(self):
        url = serve(self, self.stand_in)
        pool = Pool.create("p", state_dict(), url=url)
        self.addCleanup(pool.close)
        sd = state_dict()
        sd["layers.0.norm.weight"] = torch.zeros(17)
        with self.assertRaisesRegex(LayoutError, r"tensor layers.0.norm.weight is F32 \[17\], the layout says F32 \[16\]"):
            pool.push(sd, 1)
        self.assertNotIn(("POST", "/v1/pools/p/versions"), self.stand_in.paths())

    def test_a_push_that_fails_while_copying_gives_its_version_up(self):
        url = serve(self, self.stand_in)
        pool = Pool.create("p", state_dict(), url=url)
        self.addCleanup(pool.close)
        self.stand_in.fail_written = True
        with self.assertRaisesRegex(CeError, "the stand-in refuses written"):
            pool.push(state_dict(), 1, update=True, progress_bytes=512)
        self.assertEqual(self.stand_in.requests[-1][:2], ("DELETE", "/v1/pools/p/versions/1"))
        self.assertEqual(pool.info()["versions"], [])

    def test_a_pool_by_name_reads_its_layout_first(self):
        url = serve(self, self.stand_in)
        Pool.create("p", state_dict(), url=url)
        pool = Pool("p", url=url)
        self.addCleanup(pool.close)
        self.stand_in.expect("p", 4, state_dict(4))
        pool.push(state_dict(4), 4, publish=False)
        self.assertEqual(self.stand_in.paths()[-3:], [("GET", "/v1/pools/p"), ("POST", "/v1/pools/p/versions"),
                                                      ("POST", "/v1/pools/p/versions/4/written")])
        total = self.stand_in.pools["p"]["info"]["layout"][-1]
        self.assertEqual(self.stand_in.requests[-1][2], {"bytes": total["offset"] + total["nbytes"]},
                         "without publish, the whole push is said written")
        self.assertEqual(self.stand_in.requests[-2][2], {"version": 4, "update": False})
        pool.publish(4, update=True)
        pool.update(4, verify=False)
        pool.rollback()
        self.assertEqual(self.stand_in.requests[-3:], [
            ("POST", "/v1/pools/p/versions/4/publish", {"update": True}),
            ("POST", "/v1/update", {"pool": "p", "version": 4, "verify": False}),
            ("POST", "/v1/pools/p/rollback", {})])
        self.assertEqual(pool.info()["versions"], [{"version": 4, "slot": 0, "state": "writing"}])
        pool.delete()
        with self.assertRaises(CeError) as ctx:
            pool.info()
        self.assertEqual((ctx.exception.code, ctx.exception.hint, ctx.exception.status),
                         ("E_POOL_UNKNOWN", "POST /v1/pools first", 404))

    def test_a_pool_from_a_layout_by_hand_or_a_checkpoint_path(self):
        url = serve(self, self.stand_in)
        Pool.create("by-hand", [{"name": "w", "dtype": torch.bfloat16, "shape": [2, 2]}], slots=3, url=url)
        self.assertEqual(self.stand_in.requests[-1][2], {"name": "by-hand", "slots": 3,
                                                         "layout": [{"name": "w", "dtype": "BF16", "shape": [2, 2]}]})
        with self.assertRaises(CeError):  # the stand-in has no checkpoints; the body is what counts
            Pool.create("from-file", "/dev/shm/model.safetensors", url=url)
        self.assertEqual(self.stand_in.requests[-1][2], {"name": "from-file", "slots": 2, "path": "/dev/shm/model.safetensors"})


@unittest.skipUnless(torch.cuda.is_available(), "needs a CUDA GPU")
class CudaPushTest(unittest.TestCase):
    def test_gpu_tensors_go_bit_for_bit_into_the_slot_registered_with_cuda(self):
        stand_in = StandIn(self)
        url = serve(self, stand_in)
        g = torch.Generator().manual_seed(5)
        raw = torch.randint(0, 256, (2 * 1_000_003,), dtype=torch.uint8, generator=g)
        sd = {"w": raw.view(torch.bfloat16).cuda(),  # random bytes: BF16 NaNs of every payload
              "h": raw[:4096].view(torch.float16).reshape(64, 32).cuda().t(),
              "cpu": torch.arange(7), "empty": torch.empty(0, device="cuda")}
        pool = Pool.create("gpu", sd, url=url)
        for version in (1, 2):
            stand_in.expect("gpu", version, sd)
            pool.push(sd, version, progress_bytes=1 << 20)
        self.assertEqual([f.registered for f in pool._slots.values()], [True, True])
        pool.close()
        self.assertEqual(pool._slots, {})

    def test_a_push_from_the_gpu_is_said_written_while_its_copies_land(self):
        # The trainer enqueues all 64 steps' copies at once (2 GiB, ~40 ms at the link's speed); ce
        # must hear of them as they land, for its update follows the written bytes. No expected
        # image: the stand-in answers each post at once instead of reading the slot back.
        stand_in = StandIn(self)
        url = serve(self, stand_in)
        sd = {"big": torch.ones(1 << 30, dtype=torch.bfloat16, device="cuda")}
        pool = Pool.create("steps", sd, url=url)
        self.addCleanup(pool.close)
        pool.push(sd, 1, progress_bytes=32 << 20)
        written = [b["bytes"] for m, p, b in stand_in.requests if p == "/v1/pools/steps/versions/1/written"]
        self.assertEqual(written, sorted(set(written)))
        self.assertTrue(all(w % (32 << 20) == 0 for w in written), written)
        self.assertGreaterEqual(len(written), 8, f"said at {written}: the copies landed unannounced")


if __name__ == "__main__":
    unittest.main()
