"""Runs the reference system's own worker loop, checkpoint_engine.worker.update_weights_from_ipc,
from a copy of its repository at CE_REFERENCE_WORKER_DIR, on one GPU, for ce's GPU test.

Only worker.py and device_utils.py are loaded (they need torch, pyzmq and loguru): the package's
__init__ also imports the parameter server and its dependencies, which a worker does not use.
The engine's part is played by `run`, which hashes every tensor it is handed, and a post-hook
that says it ran.

argv: --probe                  prints what would run, or fails saying why not
      ENDPOINT DEVICE_ID       connects to ce and runs one update
stdout: one JSON line per event: load (each tensor's dtype, shape, sha256), post_hook, done, or
raised (exit status 1).
"""

import hashlib
import json
import os
import sys
import types


def load_reference_worker():
    root = os.environ.get("CE_REFERENCE_WORKER_DIR", "")
    pkg_dir = os.path.join(root, "checkpoint_engine")
    if not os.path.isfile(os.path.join(pkg_dir, "worker.py")):
        raise SystemExit(f"CE_REFERENCE_WORKER_DIR={root!r} has no checkpoint_engine/worker.py")
    pkg = types.ModuleType("checkpoint_engine")
    pkg.__path__ = [pkg_dir]
    sys.modules["checkpoint_engine"] = pkg
    import checkpoint_engine.worker as worker

    return worker


def emit(**event):
    print(json.dumps(event), flush=True)


def shim_missing_modules():
    """pyzmq and loguru where the host lacks them (GPU hosts without network): the stand-ins in pyshim/."""
    import importlib.util

    missing = [m for m in ("zmq", "loguru") if importlib.util.find_spec(m) is None]
    if missing:
        sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "pyshim"))
    return missing


def main():
    shimmed = shim_missing_modules()
    worker = load_reference_worker()
    import torch
    import zmq

    if sys.argv[1:] == ["--probe"]:
        if not hasattr(torch.uint8, "itemsize"):
            raise SystemExit(f"torch {torch.__version__} has no dtype.itemsize, which the reference worker uses (torch >= 2.1)")
        if not torch.cuda.is_available():
            raise SystemExit(f"torch {torch.__version__} sees no CUDA device")
        shim = f" (stand-ins for {', '.join(shimmed)})" if shimmed else ""
        print(f"torch {torch.__version__}, pyzmq {zmq.__version__}, {worker.__file__}{shim}")
        return
    endpoint, device_id = sys.argv[1], int(sys.argv[2])
    torch.cuda.set_device(device_id)

    def run(weights):
        emit(
            event="load",
            tensors=[
                {
                    "name": name,
                    "dtype": str(t.dtype),
                    "shape": list(t.shape),
                    "sha256": hashlib.sha256(t.reshape(-1).view(torch.uint8).cpu().numpy().tobytes()).hexdigest(),
                }
                for name, t in weights
            ],
        )

    try:
        worker.update_weights_from_ipc(zmq.Context(), endpoint, device_id, run=run, post_hook=lambda: emit(event="post_hook"))
        emit(event="done")
    except Exception as e:  # noqa: BLE001 - reported, then the exit status says it
        emit(event="raised", error=f"{type(e).__name__}: {e}")
        sys.exit(1)


if __name__ == "__main__":
    main()
