"""The pieces of a load: views into ce's buffer, copying them into an engine's tensors, and the
error text of a reply that names the tensor concerned.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Sequence, Tuple

import torch

from . import dtypes, protocol

Weights = List[Tuple[str, torch.Tensor]]


def tensor_views(buffer: torch.Tensor, metas: Sequence[protocol.TensorMeta]) -> List[Tuple[str, torch.Tensor]]:
    """Zero-copy views into `buffer` (uint8), one per tensor, with dtype and shape applied."""
    out = []
    size = buffer.numel()
    for m in metas:
        try:
            dt = dtypes.lookup(m.dtype)
            want = dt.nbytes(m.shape)
            if m.nbytes != want:
                raise ValueError(f"{m.dtype} {list(m.shape)} needs {want} bytes, nbytes says {m.nbytes}")
            if m.offset + m.nbytes > size:
                raise ValueError(f"bytes [{m.offset}, {m.offset + m.nbytes}) lie outside the {size}-byte buffer")
            raw = buffer[m.offset:m.offset + m.nbytes]
            if dt.torch is None:
                view = raw.view(dt.raw_shape(m.shape))
            else:
                view = raw.view(dt.torch).view(m.shape)
        except Exception as e:
            raise tag(e, m.name)
        out.append((m.name, view))
    return out


ALONE_BYTES = 1 << 20  # from this size a tensor is copied by itself (a memcpy), not in the batched call


def copy_bucket(params: Mapping[str, torch.Tensor], weights: Sequence[Tuple[str, torch.Tensor]]) -> None:
    """Copy a bucket into named tensors: small ones with one batched call (torch._foreach_copy_ where
    torch has it), large ones each by itself.

    One kernel launch for the small tensors instead of one Python call and launch each: with
    thousands of them (norms, biases) the per-call overhead would dominate.
    """
    dsts, srcs = [], []
    for name, src in weights:
        dst = params.get(name)
        if dst is None:
            raise tag(KeyError(name), name)
        if dst.shape != src.shape:
            raise tag(ValueError(f"shape {list(src.shape)} does not match the parameter's {list(dst.shape)}"), name)
        dsts.append(dst)
        srcs.append(src)
    # Copied as bytes: a weight update must be bit for bit, and CUDA's foreach copy of a float dtype
    # does not keep a NaN's payload (measured on an H200 with torch 2.11: random BF16 data came out
    # changed from the first NaN on). Same dtype, same size: the byte views match one to one.
    # A large tensor is copied alone: a contiguous same-dtype copy_ is a memcpy at the memory's speed,
    # while foreach's elementwise kernel over bytes ran at ~90 GB/s on an H200 (a 378 MiB bucket of
    # Qwen3-0.6B took 4.4 ms, the update's whole tail). The many small ones still go in one launch.
    byte_dsts, byte_srcs = [], []
    with torch.no_grad():
        for dst, src in zip(dsts, srcs):
            if dst.dtype == src.dtype and dst.is_contiguous() and src.is_contiguous() and dst.numel() > 0:
                d, s = dst.reshape(-1).view(torch.uint8), src.reshape(-1).view(torch.uint8)
                if d.numel() >= ALONE_BYTES:
                    d.copy_(s)
                else:
                    byte_dsts.append(d)
                    byte_srcs.append(s)
            else:
                dst.copy_(src)
        # torch 2's foreach refuses an empty list (a bucket of empty or converted tensors only)
        if byte_dsts and hasattr(torch, "_foreach_copy_"):
            torch._foreach_copy_(byte_dsts, byte_srcs)
        else:
            for dst, src in zip(byte_dsts, byte_srcs):
                dst.copy_(src)


_INTS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def apply_patches(params: Mapping[str, torch.Tensor], buffer: torch.Tensor,
                  patches: Sequence[protocol.PatchMeta]) -> None:
    """Apply a delta update's sparse patches from ce's buffer (uint8) into named tensors.

    Elements are written through integer views of their size, as bits: a float's NaN payload
    survives (the reason copy_bucket copies bytes). Positions are checked against the tensor first:
    an index out of range on a GPU is a device-side assert that takes the process down. The checks
    of every patch of the bucket read their bounds back in one host sync, not two per patch.
    """
    size = buffer.numel()
    ready = []  # (patch, flat integer view of the parameter, int64 positions, values)
    with torch.no_grad():
        for p in patches:
            try:
                dt = dtypes.lookup(p.dtype)
                if dt.bits not in (8, 16, 32, 64):
                    raise ValueError(f"{p.dtype} has no patch form (its elements are not 1, 2, 4 or 8 bytes)")
                es = dt.bits // 8
                dst = params.get(p.name)
                if dst is None:
                    raise KeyError(p.name)
                want = dt.nbytes(p.shape)
                if dst.numel() * dst.element_size() != want or not dst.is_contiguous():
                    raise ValueError(f"a patch of {p.dtype} {list(p.shape)} ({want} bytes) does not fit the parameter "
                                     f"({dst.dtype} {list(dst.shape)})")
                for what, at, n in (("positions", p.positions_offset, 4 * p.count), ("values", p.values_offset, es * p.count)):
                    if at + n > size:
                        raise ValueError(f"{what} [{at}, {at + n}) lie outside the {size}-byte buffer")
                if p.count == 0:
                    continue
                pos = buffer[p.positions_offset:p.positions_offset + 4 * p.count].view(torch.int32).long()
                vals = buffer[p.values_offset:p.values_offset + es * p.count].view(_INTS[es])
                ready.append((p, dst.reshape(-1).view(torch.uint8).view(_INTS[es]), pos, vals))
            except Exception as e:
                raise tag(e, p.name)
        if not ready:
            return
        bounds = torch.stack([torch.stack([pos.min(), pos.max()]) for _, _, pos, _ in ready]).tolist()
        for (p, flat, _, _), (lo, hi) in zip(ready, bounds):
            if lo < 0 or hi >= flat.numel():
                raise tag(IndexError(f"positions reach {lo if lo < 0 else hi}, the tensor has {flat.numel()} elements"), p.name)
        for p, flat, pos, vals in ready:
            try:
                flat.index_copy_(0, pos, vals)
            except Exception as e:
                raise tag(e, p.name)


class ModuleLoader:
    """A load_fn for a plain module whose parameter and buffer names match the checkpoint's; verify
    digests its params, the module's own tensors."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.params: Dict[str, torch.Tensor] = {**dict(module.named_parameters()), **dict(module.named_buffers())}

    def __call__(self, weights: Weights) -> None:
        copy_bucket(self.params, weights)


def module_loader(module: torch.nn.Module) -> ModuleLoader:
    """A load_fn for a plain module whose parameter and buffer names match the checkpoint's."""
    return ModuleLoader(module)


def tag(exc: BaseException, tensor: str) -> BaseException:
    """Mark `exc` with the tensor it concerns; format_error appends it."""
    if getattr(exc, "ce_tensor", None) is None:
        try:
            exc.ce_tensor = tensor
        except AttributeError:
            pass
    return exc


def format_error(exc: BaseException) -> str:
    """The error text of a reply: "<Type>: <message> (tensor <name>)"."""
    text = f"{type(exc).__name__}: {exc}"
    tensor = getattr(exc, "ce_tensor", None)
    return f"{text} (tensor {tensor})" if tensor else text
