"""The CUDA backend, end to end: this test process is ce (device memory exported with
cuIpcGetMemHandle, a bound REQ socket); the worker is another process, because CUDA refuses to
open an IPC handle in the process that exported it."""

import ctypes
import json
import os
import subprocess
import sys
import tempfile
import unittest

import support

import torch

from ce_worker import cuda_ipc

HAS_GPU = torch.cuda.is_available()
SLOT = 1 << 20
DEADLINE_S = 60
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([support.PACKAGE_ROOT, os.path.dirname(__file__)])}


class DeviceBuffer:
    """ce's IPC buffer: cuMemAlloc'd (its own allocation, so the handle maps from its start)."""

    def __init__(self, nbytes: int, index: int = 0) -> None:
        torch.cuda.synchronize(index)  # torch owns the primary context; it is current on this thread
        self.lib = ctypes.CDLL(cuda_ipc.LIBCUDA)
        self.check = cuda_ipc.libcuda().check
        self.ptr = ctypes.c_uint64()
        # CUresult cuMemAlloc(CUdeviceptr *dptr, size_t bytesize);  cuda.h: cuMemAlloc_v2
        self.check(self.lib.cuMemAlloc_v2(ctypes.byref(self.ptr), ctypes.c_size_t(nbytes)), "cuMemAlloc")
        handle = cuda_ipc.CUipcMemHandle()
        # CUresult cuIpcGetMemHandle(CUipcMemHandle *pHandle, CUdeviceptr dptr);
        self.check(self.lib.cuIpcGetMemHandle(ctypes.byref(handle), self.ptr), "cuIpcGetMemHandle")
        self.handle = bytes(handle)
        self.size = nbytes
        self.tensor = torch.as_tensor(cuda_ipc._DeviceMemory(self.ptr.value, nbytes), device=f"cuda:{index}")

    def write(self, offset: int, t: torch.Tensor) -> None:
        data = t.detach().contiguous().reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
        self.tensor[offset:offset + data.numel()].copy_(data)
        torch.cuda.synchronize()

    def close(self) -> None:
        self.tensor = None
        torch.cuda.synchronize()
        # CUresult cuMemFree(CUdeviceptr dptr);  cuda.h: cuMemFree_v2
        self.lib.cuMemFree_v2(self.ptr)


class CudaCe(support.Ce):
    def open_cuda(self, buf: DeviceBuffer, uuid: str, files=(), version=1, **extra) -> dict:
        return self.request({"op": "open", "protocol": 1, "checkpoint": "test", "version": version,
                             "device_uuid": uuid, "backend": "cuda", "buffer_bytes": buf.size, "slots": 2,
                             "slot_bytes": buf.size // 2, "path": "", "files": list(files), **extra}, buf.handle)


def gpu_tensors(seed):
    tensors = support.sample_tensors(seed)
    g = torch.Generator().manual_seed(seed)
    tensors["model.big.weight"] = torch.randn(512, 300, generator=g).to(torch.bfloat16)
    return tensors


@unittest.skipUnless(HAS_GPU, "needs a CUDA GPU")
class CudaTest(unittest.TestCase):
    def setUp(self):
        self.uuid = cuda_ipc.device_uuid(torch.device("cuda:0"))
        self.buf = DeviceBuffer(2 * SLOT)
        self.addCleanup(self.buf.close)
        self.ce = CudaCe()
        self.addCleanup(self.ce.close)

    def test_the_device_uuid_looks_like_nvidia_smis(self):
        self.assertRegex(self.uuid, r"^GPU-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")

    def test_the_standalone_worker_on_a_gpu_verifies_two_updates_bit_exact_by_file_and_by_digest(self):
        tmp = tempfile.mkdtemp(prefix="ce-cuda-test-")
        log = os.path.join(tmp, "worker.log")
        proc = subprocess.Popen([sys.executable, "-m", "ce_worker", "--endpoint", self.ce.endpoint, "--device",
                                 "cuda:0", "--verify", "--log-file", log], stdin=subprocess.PIPE, env=ENV)
        try:
            for version in (1, 2):
                tensors = gpu_tensors(version)
                path = os.path.join(tmp, f"v{version}.safetensors")
                support.write_safetensors(path, tensors)
                holds = {} if version == 1 else {"protocol": 2, "checkpoint": "test", "version": 1}
                self.assertEqual(self.ce.open_cuda(self.buf, self.uuid, [path], version, verify=True),
                                 {"ok": True, "protocol": 2, "verify": True, **holds})
                buckets, _ = support.layout(tensors, SLOT)
                for i, metas in enumerate(buckets):
                    base = (i % 2) * SLOT
                    for m in metas:
                        self.buf.write(base + m["offset"], tensors[m["name"]])
                    reply = self.ce.request({"op": "load", "bucket": i, "slot": i % 2,
                                             "tensors": [{**m, "offset": base + m["offset"]} for m in metas]},
                                            timeout_s=DEADLINE_S)
                    self.assertEqual(reply, {"ok": True})
                self.assertEqual(self.ce.request({"op": "release"}), {"ok": True})
                reply = self.ce.request({"op": "finish"}, timeout_s=DEADLINE_S)
                self.assertEqual((reply.get("ok"), reply.get("verified")), (True, len(tensors)), reply)
                self.assertEqual(reply["digests"], support.digests_of(tensors))
            proc.stdin.close()
            self.assertEqual(proc.wait(DEADLINE_S), 0)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            with open(log) as f:
                text = f.read()
            for name in os.listdir(tmp):
                os.unlink(os.path.join(tmp, name))
            os.rmdir(tmp)
        self.assertIn(f"on cuda:0 ({self.uuid})", text)

    def run_child(self, code: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", code, self.ce.endpoint], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=ENV)

    def finish_child(self, child: subprocess.Popen) -> dict:
        out, err = child.communicate(timeout=DEADLINE_S)
        self.assertEqual(child.returncode, 0, err)
        return json.loads(out.strip().splitlines()[-1])

    def test_the_vllm_extension_loads_a_stand_in_model_on_the_gpu_and_digests_its_slot_views(self):
        child = self.run_child(VLLM_CHILD)
        names = [f"model.layers.{i}.w" for i in range(4)]
        tensors = {n: torch.full((4,), float(i + 1)) for i, n in enumerate(names)}
        self.assertEqual(self.ce.open_cuda(self.buf, self.uuid, verify=True), {"ok": True, "protocol": 2, "verify": True})
        offset = 0
        metas = []
        for n, t in tensors.items():
            self.buf.write(offset, t)
            metas.append({"name": n, "dtype": "F32", "shape": [4], "offset": offset, "nbytes": 16})
            offset += 256
        self.assertEqual(self.ce.request({"op": "load", "bucket": 0, "slot": 0, "tensors": metas},
                                         timeout_s=DEADLINE_S), {"ok": True})
        self.buf.write(0, torch.full((SLOT // 4,), -1.0, device="cuda:0"))  # the slot is ce's again: refilled
        self.assertEqual(self.ce.request({"op": "release"}), {"ok": True})
        self.assertEqual(self.ce.request({"op": "finish"}, timeout_s=DEADLINE_S),
                         {"ok": True, "digests": support.digests_of(tensors)})
        result = self.finish_child(child)
        self.assertEqual(result["summary"]["device_uuid"], self.uuid)
        self.assertEqual(result["weights"], [[float(i + 1)] * 4 for i in range(4)])
        self.assertEqual(result["post"], ["target"])

    def test_views_are_zero_copy_and_release_refuses_while_one_is_kept(self):
        child = self.run_child(KEEPER_CHILD)
        self.buf.write(SLOT, torch.arange(8, dtype=torch.float32))
        self.assertEqual(self.ce.open_cuda(self.buf, self.uuid), {"ok": True})
        meta = {"name": "w", "dtype": "F32", "shape": [2, 4], "offset": SLOT, "nbytes": 32}
        self.assertEqual(self.ce.request({"op": "load", "bucket": 0, "slot": 1, "tensors": [meta]},
                                         timeout_s=DEADLINE_S), {"ok": True})
        reply = self.ce.request({"op": "release"})
        self.assertIn("still referenced; load_fn must copy", reply.get("error", ""))
        self.assertEqual(self.ce.request({"op": "abort", "reason": "kept a view"}), {"ok": True})
        result = self.finish_child(child)
        self.assertEqual(result["summary"]["state"], "aborted")
        self.assertEqual(result["offset_in_buffer"], SLOT)
        self.assertEqual(result["values"], [[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0]])


# The worker side of the two tests above, run in a child process (argv[1]: ce's endpoint).
VLLM_CHILD = r"""
import json, sys, types, torch
import test_vllm
from ce_worker.vllm import CeWorkerExtension
post = []
utils = types.ModuleType("vllm.model_executor.model_loader.utils")
utils.process_weights_after_loading = lambda model, config, device: post.append(config.name)
for name in ("vllm", "vllm.model_executor", "vllm.model_executor.model_loader"):
    sys.modules[name] = types.ModuleType(name)
sys.modules[utils.__name__] = utils
names = [f"model.layers.{i}.w" for i in range(4)]
worker = test_vllm.extended(test_vllm.StandInWorker)(test_vllm.StandInModel(names).to("cuda:0"))
worker.device = torch.device("cuda:0")
from ce_worker.cuda_ipc import device_uuid
summary = worker.update_weights_from_ipc({device_uuid(worker.device): sys.argv[1]})
weights = [worker.model_runner.model.weights[n.replace(".", "_")].tolist() for n in names]
print(json.dumps({"summary": summary, "weights": weights, "post": post}))
"""

KEEPER_CHILD = r"""
import json, sys, torch
from ce_worker import receiver
kept, seen = [], {}
def load(weights):
    (name, view), = weights
    seen["values"] = view.tolist()
    kept.append(view)
r = receiver.Receiver(load, device=torch.device("cuda:0"))
from ce_worker.transport import connect_rep
sock = connect_rep(sys.argv[1])
orig = r._load
def load_and_measure(req):
    orig(req)
    seen["offset_in_buffer"] = kept[0].data_ptr() - r.mapping.tensor.data_ptr()
r._load = load_and_measure
summary = receiver.serve_session(sock, r, op_timeout_s=60, wait_s=60)
sock.close(linger_s=2)
kept.clear()
print(json.dumps({"summary": summary, **seen}))
"""


if __name__ == "__main__":
    unittest.main()


@unittest.skipUnless(HAS_GPU, "needs a CUDA GPU")
class CopyBucketBitExactTest(unittest.TestCase):
    def test_random_bf16_with_nan_payloads_is_copied_bit_for_bit(self):
        # Random bytes as BF16 hold NaNs of every payload; a float copy would change some of them.
        from ce_worker.loads import copy_bucket

        g = torch.Generator().manual_seed(5)
        raw = torch.randint(0, 256, (2 * 1_000_003,), dtype=torch.uint8, generator=g).cuda()
        src = raw.view(torch.bfloat16)
        small = raw[:4096].view(torch.float16)
        params = {"w": torch.empty_like(src), "h": torch.empty_like(small)}
        copy_bucket(params, [("w", src), ("h", small)])
        torch.cuda.synchronize()
        self.assertTrue(torch.equal(params["w"].view(torch.uint8), raw))
        self.assertTrue(torch.equal(params["h"].view(torch.uint8), raw[:4096]))
