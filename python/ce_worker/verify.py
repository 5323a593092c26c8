"""--verify for the standalone worker: compare received tensors with the checkpoint's files.

safetensors is parsed here with the standard library (the worker needs no safetensors package):
8 bytes little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, then
the data; data_offsets count from the end of the header.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import struct
from typing import Dict, Iterable, Mapping, Tuple

import torch

HEADER_LIMIT = 100 * 1024 * 1024  # safetensors' own bound on the header; larger means corruption


class VerifyError(ValueError):
    """A stored tensor differs from the checkpoint, or one is missing or extra."""


def read_header(path: str) -> Tuple[int, Dict[str, dict]]:
    """(offset of the data section, {tensor name: header entry}) of one safetensors file."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise VerifyError(f"{path}: {len(head)} bytes, too short for a safetensors file")
        (length,) = struct.unpack("<Q", head)
        if length > HEADER_LIMIT:
            raise VerifyError(f"{path}: header length {length} exceeds {HEADER_LIMIT}")
        raw = f.read(length)
    if len(raw) != length:
        raise VerifyError(f"{path}: header says {length} bytes, the file ends after {len(raw)}")
    header = json.loads(raw.decode("utf-8"))
    if not isinstance(header, dict):
        raise VerifyError(f"{path}: header is not a JSON object")
    header.pop("__metadata__", None)
    return 8 + length, header


def verify(stored: Mapping[str, torch.Tensor], files: Iterable[str]) -> int:
    """Compare every stored tensor byte for byte with `files`; returns how many were compared.

    VerifyError names the first tensor that differs, is missing from `stored`, or is stored
    but in none of the files.
    """
    seen = set()
    for path in files:
        data_start, header = read_header(path)
        size = os.path.getsize(path)
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) if size else _Empty() as mm:
            for name in sorted(header):
                begin, end = header[name]["data_offsets"]
                if name not in stored:
                    raise VerifyError(f"tensor {name} ({path}) is missing: the worker never received it")
                got = _bytes_of(stored[name])
                want = mm[data_start + begin:data_start + end]
                if len(want) != end - begin:
                    raise VerifyError(f"{path}: tensor {name}: data_offsets [{begin}, {end}) run past the end")
                if len(got) != len(want) or got != want:
                    raise VerifyError(f"tensor {name} differs from {path} "
                                      f"({len(got)} bytes received, {len(want)} in the file{_first_diff(got, want)})")
                seen.add(name)
    extra = sorted(set(stored) - seen)
    if extra:
        raise VerifyError(f"tensor {extra[0]} is extra: received but in none of the checkpoint's files"
                          + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    return len(seen)


def _bytes_of(t: torch.Tensor) -> bytes:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    # string_at copies the bytes out; no numpy needed (torch 2 does not require it).
    return ctypes.string_at(flat.data_ptr(), flat.numel()) if flat.numel() else b""


def _first_diff(got: bytes, want: bytes) -> str:
    for i, (a, b) in enumerate(zip(got, want)):
        if a != b:
            return f"; first difference at byte {i}"
    return ""


class _Empty:
    """Stands in for mmap on an empty file (mmap refuses length 0)."""

    def __enter__(self):
        return b""

    def __exit__(self, *exc):
        return None
