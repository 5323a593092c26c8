"""A stand-in for the reference system's worker loop (checkpoint_engine.worker.update_weights_from_ipc),
written for ce's CI from its documented behaviour, where no GPU can map a CUDA IPC handle.

It keeps the reference worker's wire behaviour: a REP socket reading each request with pickle,
the handle tuple first (called after putting this worker's device index at args[6]; the result
must be a uint8 tensor spanning the buffer), then lists of {name, dtype, shape, offset} viewed out
of that tensor, None to release, None again for the post-hook, an exception to raise; replies b""
or a traceback text, and after a failed open one more message awaited as the ack before raising.
Two things differ, both for the test's sake: rebuild_cuda_tensor is a stand-in that maps the
buffer's shared-memory file (torch.from_file) instead of a CUDA handle, and the unpickler resolves
only the globals the dialect may name.

argv: ENDPOINT BUFFER_FILE DEVICE_ID [--fail-tensor NAME] [--fail-post-hook]
stdout: one JSON line per event: open, load (each tensor's dtype, shape and sha256), release,
post_hook, done, or raised (the exception the loop ended with; exit status 1).
"""

import argparse
import gc
import hashlib
import io
import json
import pickle
import sys
import traceback

import torch
import zmq

REBUILD = ("torch.multiprocessing.reductions", "rebuild_cuda_tensor")
ALLOWED = {("torch", "Size"), ("torch", "Tensor"), ("torch.storage", "TypedStorage"), ("builtins", "RuntimeError")}


def itemsize(dtype):
    # torch.dtype.itemsize arrived in torch 2.1 (the reference worker needs it); 1.13 lacks it
    return getattr(dtype, "itemsize", None) or torch.empty((), dtype=dtype).element_size()


def emit(**event):
    print(json.dumps(event), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("endpoint")
    ap.add_argument("buffer_file")
    ap.add_argument("device_id", type=int)
    ap.add_argument("--fail-tensor")
    ap.add_argument("--fail-post-hook", action="store_true")
    args = ap.parse_args()

    sent = {}

    def stand_in_rebuild(*a):
        # rebuild_cuda_tensor's arguments: [1] tensor_size, [5] dtype, [6] storage_device,
        # [7] storage_handle, [8] storage_size_bytes, [9] storage_offset_bytes
        if len(a) != 15:
            raise TypeError(f"rebuild_cuda_tensor takes 15 arguments, got {len(a)}")
        sent.update(handle_bytes=len(a[7]), size=list(a[1]), storage_bytes=a[8])
        return torch.from_file(args.buffer_file, shared=True, size=a[8], dtype=a[5])

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) == REBUILD:
                return stand_in_rebuild
            if (module, name) in ALLOWED:
                return super().find_class(module, name)
            if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
                return getattr(torch, name)
            raise pickle.UnpicklingError(f"global {module}.{name} is not one the dialect may name")

    def recv_obj(sock):
        return Unpickler(io.BytesIO(sock.recv())).load()

    def send_traceback(sock, e):
        sock.send_string("".join(traceback.format_exception(type(e), e, e.__traceback__)))

    def run(weights):
        for name, t in weights:
            if name == args.fail_tensor:
                raise KeyError(name)
        emit(
            event="load",
            tensors=[
                {
                    "name": name,
                    "dtype": str(t.dtype),
                    "shape": list(t.shape),
                    "sha256": hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest(),
                }
                for name, t in weights
            ],
        )

    ctx = zmq.Context()
    sock = ctx.socket(zmq.REP)
    sock.setsockopt(zmq.LINGER, 5000)
    sock.connect(args.endpoint)
    buffer = None
    try:
        try:
            handle = recv_obj(sock)
            if not isinstance(handle, tuple):
                raise TypeError(f"the first message must be the handle tuple, got {type(handle)}")
            func, fargs = handle
            fargs = list(fargs)
            sent["device"] = fargs[6]
            fargs[6] = args.device_id  # as the reference worker does: its own index, whatever ce's is
            buffer = func(*fargs)
            if buffer.dtype != torch.uint8:
                raise TypeError(f"the buffer must be uint8, got {buffer.dtype}")
            emit(event="open", bytes=buffer.numel(), sent_device=sent["device"], handle_bytes=sent["handle_bytes"])
            sock.send(b"")
        except Exception as e:
            send_traceback(sock, e)
            sock.recv()  # the ack, any message
            raise
        released = False
        while True:
            payload = recv_obj(sock)
            if released:
                if payload is not None:
                    raise TypeError("only None may follow the release")
                if args.fail_post_hook:
                    raise RuntimeError("the post-hook failed")
                emit(event="post_hook")
                sock.send(b"")
                break
            if payload is None:
                released = True
                buffer = None
                gc.collect()
                emit(event="release")
                sock.send(b"")
            elif isinstance(payload, list):
                try:
                    weights = []
                    for item in payload:
                        shape, dtype, offset = item["shape"], item["dtype"], item["offset"]
                        if not isinstance(shape, torch.Size):
                            raise TypeError(f"shape must be a torch.Size, got {type(shape)}")
                        size = itemsize(dtype) * shape.numel()
                        weights.append((item["name"], buffer[offset : offset + size].view(dtype).view(shape)))
                    run(weights)
                    sock.send(b"")
                except Exception as e:  # noqa: BLE001 - replied; the parameter server decides
                    send_traceback(sock, e)
            elif isinstance(payload, Exception):
                raise payload
            else:
                raise TypeError(f"unexpected payload {type(payload)}")
        emit(event="done")
    except Exception as e:  # noqa: BLE001 - reported, then the exit status says it
        emit(event="raised", error=f"{type(e).__name__}: {e}")
        sys.exit(1)
    finally:
        sock.close()
        ctx.term()


if __name__ == "__main__":
    main()
