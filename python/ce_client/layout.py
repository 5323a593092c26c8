"""A pool's layout ({"name", "dtype", "shape"} per tensor, dtype as safetensors names it) and the
check of a state dict against it, which runs before anything is written."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Sequence

import torch

from ce_worker.dtypes import DTYPES

from .errors import LayoutError

# torch dtype -> safetensors name, for the dtypes this torch has.
DTYPE_NAMES: Dict[torch.dtype, str] = {dt.torch: name for name, dt in DTYPES.items() if dt.torch is not None}


def dtype_name(dtype: Any) -> str:
    """The safetensors name of a torch dtype, or a safetensors name checked as one."""
    if isinstance(dtype, torch.dtype):
        name = DTYPE_NAMES.get(dtype)
        if name is None:
            raise LayoutError(f"{dtype} has no safetensors dtype name (known: {', '.join(DTYPES)})")
        return name
    if isinstance(dtype, str) and dtype in DTYPES:
        return dtype
    raise LayoutError(f"dtype {dtype!r} is neither a torch dtype nor a safetensors name ({', '.join(DTYPES)})")


def layout_of(state_dict: Mapping[str, torch.Tensor]) -> List[dict]:
    """The layout of a state dict, in its order: what Pool.create registers."""
    out = []
    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise LayoutError(f"tensor {name}: a {type(t).__name__}, not a torch.Tensor")
        try:
            out.append({"name": name, "dtype": dtype_name(t.dtype), "shape": list(t.shape)})
        except LayoutError as e:
            raise LayoutError(f"tensor {name}: {e.message}") from None
    return out


def normalize(layout: Sequence[Mapping[str, Any]]) -> List[dict]:
    """A layout given by hand: each entry's name, dtype (torch or safetensors) and shape, checked."""
    out = []
    for i, entry in enumerate(layout):
        name = entry.get("name") if isinstance(entry, Mapping) else None
        if not isinstance(name, str) or not name:
            raise LayoutError(f"layout[{i}] has no name: each entry is {{\"name\", \"dtype\", \"shape\"}}")
        shape = entry.get("shape")
        if not isinstance(shape, (list, tuple, torch.Size)) or not all(type(d) is int and d >= 0 for d in shape):
            raise LayoutError(f"tensor {name}: shape {shape!r} is not a list of non-negative integers")
        try:
            dtype = dtype_name(entry.get("dtype"))
        except LayoutError as e:
            raise LayoutError(f"tensor {name}: {e.message}") from None
        out.append({"name": name, "dtype": dtype, "shape": list(shape)})
    return out


def check(state_dict: Mapping[str, torch.Tensor], layout: Sequence[Mapping[str, Any]], pool: str) -> None:
    """LayoutError naming the first tensor, in layout order (ce's: largest first), whose name, dtype or shape differs;
    then the first extra tensor of the state dict."""
    hint = f"a version must keep pool {pool}'s layout; a new layout needs a new pool"
    for entry in layout:
        name = entry["name"]
        t = state_dict.get(name)
        if t is None:
            missing = [e["name"] for e in layout if e["name"] not in state_dict]
            raise LayoutError(f"pool {pool}: tensor {name} is missing from the state dict"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""), hint)
        if not isinstance(t, torch.Tensor):
            raise LayoutError(f"pool {pool}: tensor {name} is a {type(t).__name__}, not a torch.Tensor")
        got = DTYPE_NAMES.get(t.dtype, str(t.dtype))
        if got != entry["dtype"] or list(t.shape) != list(entry["shape"]):
            raise LayoutError(f"pool {pool}: tensor {name} is {got} {list(t.shape)}, "
                              f"the layout says {entry['dtype']} {list(entry['shape'])}", hint)
    names = {e["name"] for e in layout}
    extra = [n for n in state_dict if n not in names]
    if extra:
        raise LayoutError(f"pool {pool}: tensor {extra[0]} is not in the layout"
                          + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""), hint)
