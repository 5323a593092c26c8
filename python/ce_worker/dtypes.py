"""safetensors dtype names -> torch dtypes, and what to hand over when this torch lacks one.

Older torch builds miss some dtypes (Debian's torch 1.13 has no float8 and no uint16/32/64).
Their tensors still arrive: as raw uint8 bytes of the right length, shaped [..., itemsize],
with one warning per dtype, so an engine that knows the bytes can still use them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

log = logging.getLogger("ce_worker")


@dataclass(frozen=True)
class Dtype:
    name: str  # the safetensors name
    bits: int  # per element; sub-byte types (F4, F6) are packed
    torch_name: str  # attribute of the torch module, when this torch has it
    torch: Optional[torch.dtype]

    def nbytes(self, shape: Sequence[int]) -> int:
        return (math.prod(shape) * self.bits + 7) // 8

    def raw_shape(self, shape: Sequence[int]) -> Tuple[int, ...]:
        """The uint8 shape a tensor of this dtype is handed over as when torch lacks it."""
        if self.bits % 8:
            return (self.nbytes(shape),)  # packed sub-byte elements: a flat run of bytes
        return (*shape, self.bits // 8)


# Every dtype name the safetensors format defines (its Dtype enum), with its width.
_TABLE = (
    ("BOOL", 8, "bool"),
    ("U8", 8, "uint8"),
    ("I8", 8, "int8"),
    ("I16", 16, "int16"),
    ("U16", 16, "uint16"),
    ("I32", 32, "int32"),
    ("U32", 32, "uint32"),
    ("I64", 64, "int64"),
    ("U64", 64, "uint64"),
    ("F16", 16, "float16"),
    ("BF16", 16, "bfloat16"),
    ("F32", 32, "float32"),
    ("F64", 64, "float64"),
    ("C64", 64, "complex64"),
    ("F8_E4M3", 8, "float8_e4m3fn"),
    ("F8_E5M2", 8, "float8_e5m2"),
    ("F8_E8M0", 8, "float8_e8m0fnu"),
    # torch's float4_e2m1fn_x2 packs two values per element, a shape safetensors does not
    # describe, so F4 and F6 always travel as raw bytes.
    ("F4", 4, ""),
    ("F6_E2M3", 6, ""),
    ("F6_E3M2", 6, ""),
)

DTYPES = {
    name: Dtype(name, bits, tname, getattr(torch, tname, None) if tname else None)
    for name, bits, tname in _TABLE
}

_warned: set = set()


def lookup(name: str) -> Dtype:
    dt = DTYPES.get(name)
    if dt is None:
        raise ValueError(f"unknown dtype {name!r} (safetensors names: {', '.join(DTYPES)})")
    if dt.torch is None and name not in _warned:
        _warned.add(name)
        if dt.torch_name:
            log.warning("torch %s has no torch.%s: %s tensors are handed over as raw uint8 bytes",
                        torch.__version__, dt.torch_name, name)
        else:
            log.warning("%s has no torch dtype of the same shape: its tensors are handed over as raw "
                        "uint8 bytes", name)
    return dt
