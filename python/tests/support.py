"""Shared test helpers: ce's side of the protocol (a bound REQ socket), shm buffers, checkpoints.

Importing this module puts the package directory (python/) on sys.path, so the suite runs with
`python3 -m unittest discover -s python/tests` from the repository root without installing.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import struct
import sys
import threading
import uuid
from typing import Dict, List, Optional, Sequence, Tuple

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if PACKAGE_ROOT not in sys.path:
    sys.path.insert(0, PACKAGE_ROOT)

import torch  # noqa: E402

from ce_worker import digest, transport  # noqa: E402

# The worker logs warnings and tracebacks on purpose in many tests; CE_TEST_LOG=1 shows them.
if not os.environ.get("CE_TEST_LOG"):
    logging.getLogger("ce_worker").addHandler(logging.NullHandler())
    logging.getLogger("ce_worker").propagate = False

ALIGN = 256
# The worker protocol's one definition; both ends' tests read it (src/wire/worker-protocol.json).
PROTOCOL_DEFINITION = os.path.join(os.path.dirname(PACKAGE_ROOT), "src", "wire", "worker-protocol.json")
_counter = itertools.count()

ST_NAMES = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32",
    torch.int64: "I64", torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32",
    torch.float64: "F64",
}


def endpoint() -> str:
    """A fresh abstract-namespace endpoint: nothing to clean up, no fixed port."""
    return f"ipc://@ce-test-{os.getpid()}-{next(_counter)}-{uuid.uuid4().hex[:8]}"


def protocol_definition() -> dict:
    with open(PROTOCOL_DEFINITION, encoding="utf-8") as f:
        return json.load(f)


def frame_bytes(frame: dict) -> bytes:
    """One frame of a worker-protocol.json case: {"json": v}, {"text": s} or {"bytes": n}."""
    if "json" in frame:
        return json.dumps(frame["json"]).encode("utf-8")
    if "text" in frame:
        return frame["text"].encode("utf-8")
    return bytes(range(256))[:frame["bytes"]] if frame["bytes"] <= 256 else bytes(frame["bytes"])


def transports() -> List[str]:
    """The transport backends this machine can run."""
    out = []
    for backend in transport.BACKENDS:
        try:
            transport.probe(backend)
            out.append(backend)
        except transport.TransportError:
            pass
    return out


def raw_bytes(t: torch.Tensor) -> bytes:
    flat = t.detach().cpu().contiguous().reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    return bytes(flat.tolist())


def digests_of(tensors: Dict[str, torch.Tensor]) -> Dict[str, str]:
    """What a finish reply's "digests" must say for these tensors, from the pure-Python reference."""
    return {n: digest.format_digest(digest.reference_digest(raw_bytes(t))) for n, t in tensors.items()}


def sample_tensors(seed: int = 0, scale: float = 1.0) -> Dict[str, torch.Tensor]:
    """A small checkpoint touching every dtype torch 1.13 can build, odd shapes and empties."""
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": (torch.randn(17, 8, generator=g) * scale).to(torch.bfloat16),
        "model.layers.0.attn.qkv.weight": (torch.randn(24, 8, generator=g) * scale).to(torch.float16),
        "model.layers.0.norm.weight": torch.randn(8, generator=g) * scale,
        "model.layers.0.mlp.bias": torch.randn(3, 5, 7, generator=g, dtype=torch.float64),
        "model.rope.inv_freq": torch.randint(-2**40, 2**40, (5,), generator=g, dtype=torch.int64),
        "model.mask": torch.rand(9, generator=g) > 0.5,
        "model.q.weight": torch.randint(-128, 127, (4, 6), generator=g, dtype=torch.int8),
        "model.q.scale": torch.randint(0, 255, (13,), generator=g, dtype=torch.uint8),
        "model.i32": torch.randint(-2**30, 2**30, (2, 3), generator=g, dtype=torch.int32),
        "model.i16": torch.randint(-2**14, 2**14, (7,), generator=g, dtype=torch.int16),
        "model.scalar": torch.tensor(3.5),
        "model.empty": torch.empty(0, 4),
    }


def layout(tensors: Dict[str, torch.Tensor], bucket_bytes: int) -> Tuple[List[List[dict]], int]:
    """Buckets of load metas (offsets relative to a bucket's start) and the largest bucket's size."""
    buckets: List[List[dict]] = [[]]
    used = 0
    biggest = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if used and used + nbytes > bucket_bytes:
            buckets.append([])
            used = 0
        buckets[-1].append({"name": name, "dtype": ST_NAMES[t.dtype], "shape": list(t.shape),
                            "offset": used, "nbytes": nbytes})
        used = (used + nbytes + ALIGN - 1) // ALIGN * ALIGN
        biggest = max(biggest, used)
    return buckets, max(biggest, ALIGN)


class ShmBuffer:
    """A CPU-backend slot buffer: a file in /dev/shm that ce would fill."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.path = f"/dev/shm/ce-test-{os.getpid()}-{next(_counter)}"
        with open(self.path, "wb") as f:
            f.truncate(size)

    def write(self, offset: int, t: torch.Tensor) -> None:
        with open(self.path, "r+b") as f:
            f.seek(offset)
            f.write(raw_bytes(t))

    def close(self) -> None:
        if os.path.exists(self.path):
            os.unlink(self.path)


class Ce:
    """ce's side of one worker: a bound REQ socket sending JSON requests."""

    def __init__(self, ep: Optional[str] = None, backend: Optional[str] = None) -> None:
        self.endpoint = ep or endpoint()
        self.sock = transport.open_socket(self.endpoint, kind="req", bind=True, backend=backend)

    def request(self, obj: dict, *extra: bytes, timeout_s: float = 10.0) -> dict:
        self.sock.send_multipart([json.dumps(obj).encode(), *extra])
        frames = self.sock.recv_multipart(timeout_s)
        if frames is None:
            raise TimeoutError(f"no reply to {obj.get('op')} within {timeout_s} s")
        assert len(frames) == 1, frames
        return json.loads(frames[0])

    def open_cpu(self, buf: ShmBuffer, *, slots: int = 2, slot_bytes: Optional[int] = None,
                 files: Sequence[str] = (), version: int = 1, **extra) -> dict:
        frame = {"op": "open", "protocol": 1, "checkpoint": "test", "version": version,
                 "device_uuid": "CPU-test-0", "backend": "cpu", "buffer_bytes": buf.size, "slots": slots,
                 "slot_bytes": slot_bytes or buf.size // slots, "path": buf.path, "files": list(files)}
        frame.update(extra)
        return self.request(frame)

    def push(self, buf: ShmBuffer, tensors: Dict[str, torch.Tensor], *, slots: int = 2,
             slot_bytes: int = 4096) -> List[dict]:
        """Load every tensor bucket by bucket, alternating slots as ce does; returns the replies."""
        buckets, _ = layout(tensors, slot_bytes)
        replies = []
        for i, metas in enumerate(buckets):
            slot = i % slots
            base = slot * slot_bytes
            sent = []
            for m in metas:
                buf.write(base + m["offset"], tensors[m["name"]])
                sent.append({**m, "offset": base + m["offset"]})
            replies.append(self.request({"op": "load", "bucket": i, "slot": slot, "tensors": sent}))
        return replies

    def close(self) -> None:
        self.sock.close()


def write_safetensors(path: str, tensors: Dict[str, torch.Tensor]) -> None:
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, t in tensors.items():
        data = raw_bytes(t)
        header[name] = {"dtype": ST_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


class Background:
    """Runs fn() in a thread; result() re-raises its exception or returns its value."""

    def __init__(self, fn) -> None:
        self._value = self._error = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn) -> None:
        try:
            self._value = fn()
        except BaseException as e:  # handed to the test thread
            self._error = e

    def result(self, timeout_s: float = 20.0):
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise TimeoutError(f"worker thread still running after {timeout_s} s")
        if self._error is not None:
            raise self._error
        return self._value
