"""Loads pickles that ce wrote and describes the objects they give, as JSON, for ce's tests.

stdin: a JSON list of base64 strings, one pickle each. stdout: a JSON list, for each pickle
{"value": description, "opcodes": [names in order]}, plus, for an IPC handle tuple
`(rebuild_cuda_tensor, args)`, "rebuild_args": args bound by name to this torch's real
rebuild_cuda_tensor signature, or {"error": "..."} for one that did not load
or that pickletools finds malformed (a stack or mark out of place, bytes after STOP). The unpickler resolves only the globals the
checkpoint-engine dialect may name; torch's rebuild_cuda_tensor is replaced by a stand-in that
nobody calls, since this machine may have no GPU. Everything else loads as the real object:
torch.Size, torch.dtype, exceptions.
"""

import base64
import inspect
import io
import json
import pickle
import pickletools
import sys

import torch

REBUILD = ("torch.multiprocessing.reductions", "rebuild_cuda_tensor")


def stand_in_rebuild(*args):
    raise AssertionError("the stand-in rebuild_cuda_tensor is for inspection only")


ALLOWED = {
    ("torch", "Size"),
    ("torch", "Tensor"),
    ("torch.storage", "TypedStorage"),
    ("builtins", "RuntimeError"),
}


class Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) == REBUILD:
            return stand_in_rebuild
        if (module, name) in ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not one the dialect may name")


def describe(v):
    if v is None:
        return {"t": "None"}
    if isinstance(v, bool):
        return {"t": "bool", "v": v}
    if isinstance(v, int):
        return {"t": "int", "v": str(v)}
    if isinstance(v, str):
        return {"t": "str", "v": v}
    if isinstance(v, bytes):
        return {"t": "bytes", "hex": v.hex()}
    if isinstance(v, torch.Size):
        return {"t": "torch.Size", "v": list(v)}
    if isinstance(v, torch.dtype):
        return {"t": "torch.dtype", "v": str(v)}
    if isinstance(v, tuple):
        return {"t": "tuple", "items": [describe(x) for x in v]}
    if isinstance(v, list):
        return {"t": "list", "items": [describe(x) for x in v]}
    if isinstance(v, dict):
        return {"t": "dict", "items": [[k, describe(x)] for k, x in v.items()]}
    if isinstance(v, BaseException):
        return {"t": "exception", "class": type(v).__name__, "args": [describe(a) for a in v.args]}
    if v is stand_in_rebuild:
        return {"t": "global", "v": "stand-in " + ".".join(REBUILD)}
    if isinstance(v, type):
        return {"t": "global", "v": f"{v.__module__}.{v.__qualname__}"}
    return {"t": "other", "v": repr(v)}


def main():
    out = []
    for b64 in json.load(sys.stdin):
        data = base64.b64decode(b64)
        try:
            pickletools.dis(data, out=io.StringIO())  # checks the stack and marks, opcode by opcode
            stream = io.BytesIO(data)
            value = Unpickler(stream).load()
            if stream.read():
                raise ValueError("bytes after STOP")
            opcodes = [op.name for op, _, _ in pickletools.genops(data)]
            entry = {"value": describe(value), "opcodes": opcodes}
            if isinstance(value, tuple) and len(value) == 2 and value[0] is stand_in_rebuild:
                from torch.multiprocessing.reductions import rebuild_cuda_tensor

                bound = inspect.signature(rebuild_cuda_tensor).bind(*value[1])
                entry["rebuild_args"] = {k: describe(v) for k, v in bound.arguments.items()}
            out.append(entry)
        except Exception as e:  # noqa: BLE001 - reported to the test
            out.append({"error": f"{type(e).__name__}: {e}"})
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
