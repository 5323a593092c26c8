"""python3 -m ce_worker: the standalone worker behind ce's `--worker python` mode.

It behaves like an engine with nothing but parameters: a store of named tensors on --device,
allocated when a name is first seen and kept across updates. It serves update sessions one
after another on one socket (an aborted one included: abort leaves it ready for the next open), and exits 0 on SIGTERM or when its stdin reaches EOF, so a worker
started by ce with a pipe on stdin never outlives ce. With --verify, finish compares every
stored tensor byte for byte with the checkpoint files named in the open frame; an open with
"verify": true gets the digests of the stored tensors at finish, with or without the flag.

Exit status: 0 when stopped, 1 when it cannot start (device, libzmq, endpoint), 2 on bad flags.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from typing import Dict, Optional

import torch

from .cuda_ipc import device_uuid
from .protocol import Open
from .loads import Weights, copy_bucket, tag
from .receiver import Receiver, SessionTimeout, Stopped, serve_session
from .transport import BACKENDS, connect_rep, probe
from .verify import VerifyError, verify

log = logging.getLogger("ce_worker")


class ParamStore:
    """Named tensors on one device, like an engine's parameters: shapes and dtypes are fixed once seen."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.params: Dict[str, torch.Tensor] = {}

    def load(self, weights: Weights) -> None:
        for name, src in weights:
            dst = self.params.get(name)
            if dst is None:
                self.params[name] = torch.empty(src.shape, dtype=src.dtype, device=self.device)
            elif dst.dtype != src.dtype:
                raise tag(TypeError(f"dtype {src.dtype} does not match the stored {dst.dtype}"), name)
        copy_bucket(self.params, weights)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.params.values())


def main(argv: Optional[list] = None) -> int:
    args = _parse_args(argv)
    _setup_logging(args.log_file, args.log_level)
    stop = _Stop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: stop.set(signal.Signals(signum).name))
    threading.Thread(target=_watch_stdin, args=(stop,), name="ce-worker-stdin", daemon=True).start()
    try:
        device = _device(args.device)
        expect = device_uuid(device) if device.type == "cuda" else None
        sock = connect_rep(args.endpoint, backend=args.transport)
    except Exception as e:
        log.error("cannot start: %s: %s", type(e).__name__, e)
        return 1
    log.info("worker %d on %s%s, %s, connected to %s", os.getpid(), device, f" ({expect})" if expect else "",
             probe(sock.backend), args.endpoint)

    store = ParamStore(device)

    def finish(opened: Open) -> dict:
        fields = {"tensors": len(store.params), "bytes": store.nbytes()}
        if args.verify:
            if not opened.files:
                raise VerifyError("--verify needs the checkpoint's files in the open frame (field files)")
            fields["verified"] = verify(store.params, opened.files)
            log.info("verified %d tensors against %d files", fields["verified"], len(opened.files))
        return fields

    # One receiver for the worker's life: after finish, abort or a timeout it is idle, and the
    # next open on the same socket starts the next session. An open asking to verify gets the
    # digests of the stored tensors, as copied.
    receiver = Receiver(store.load, finish, device=device, expect_uuid=expect, params=store.params)
    try:
        while not stop.is_set():
            try:
                summary = serve_session(sock, receiver, op_timeout_s=args.op_timeout, wait_s=None,
                                        stop=stop.is_set)
            except SessionTimeout as e:
                log.warning("%s; the session is dropped, waiting for the next one", e)
                continue
            except Stopped:
                break
            log.info("session %s", summary)
    finally:
        receiver.drop()  # a mapping kept for the next session (protocol 2) goes with the worker
        sock.close()
    log.info("stopping: %s", stop.reason)
    return 0


class _Stop:
    """Why the worker stops: the first of a signal and stdin's EOF."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""

    def set(self, reason: str) -> None:
        if not self._event.is_set():
            self.reason = reason
            self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()


def _parse_args(argv: Optional[list]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python3 -m ce_worker", description=__doc__.split("\n\n")[0])
    p.add_argument("--endpoint", required=True, help="ZeroMQ endpoint ce bound, e.g. ipc://@ce-GPU-...-0")
    p.add_argument("--device", required=True, help="where the parameters live: cpu, or cuda:N")
    p.add_argument("--verify", action="store_true",
                   help="at finish, compare every stored tensor with the open frame's checkpoint files")
    p.add_argument("--transport", choices=BACKENDS,
                   help="how to reach libzmq (default: pyzmq when importable, else ctypes)")
    p.add_argument("--log-file", help="append logs here instead of stderr")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.add_argument("--op-timeout", type=float, default=120.0, metavar="SECONDS",
                   help="drop a session when ce sends nothing for this long (default 120)")
    return p.parse_args(argv)


def _setup_logging(path: Optional[str], level: str) -> None:
    handler = logging.FileHandler(path) if path else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s ce_worker[%(process)d] %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(level.upper())


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is not None and device.type == "cpu":
        return device
    if device is None or device.type != "cuda":
        raise ValueError(f"--device {text}: expected cpu or cuda:N")
    if not torch.cuda.is_available():
        raise RuntimeError(f"--device {text}: torch sees no CUDA GPU")
    index = 0 if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise ValueError(f"--device {text}: torch sees {torch.cuda.device_count()} GPUs")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def _watch_stdin(stop: _Stop) -> None:
    # ce holds the write end of our stdin; EOF means ce is gone, whatever way it died.
    try:
        while os.read(0, 65536):
            pass
    except OSError:
        pass
    stop.set("stdin reached EOF")


if __name__ == "__main__":
    sys.exit(main())
