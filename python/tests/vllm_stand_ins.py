"""Stand-ins for the vLLM behaviour ce_worker.vllm must hold against (vLLM cannot be installed here).

Each reproduces what the named vLLM file does at the named commit, as far as the extension can see
it; none copies vLLM's code.

- LayerwiseReload: vllm/model_executor/model_loader/reload/layerwise.py @ 01424e4b5c67.
  initialize_layerwise_reload(model) saves each layer's current (kernel) tensors and wraps its
  parameters' weight_loader; a wrapped loader only buffers (parameter name, the tensor it was given)
  and counts elements; once a layer has received as many elements as its parameters hold it is
  processed: the buffered tensors are loaded into fresh parameters, the layer's quant method runs
  process_weights_after_loading, and the result is copied into the saved kernel storage.
  finalize_layerwise_reload(model, model_config) processes layers that got only part of their
  elements and puts back the kernel tensors of layers that got none. The buffered tensors are the
  caller's own objects: a view into a buffer that is refilled before its layer completes is read
  after the refill.
- StandInMTP: vllm/model_executor/models/deepseek_mtp.py after vLLM PR #35548: load_weights skips
  names outside its spec layers (model.layers.{num_hidden_layers + i}., as at 03356f8cb59b) and
  raises unless every one of its layers arrives in that one call. The post-PR source was not in
  the reference index; the behaviour is the one issue 26 records.
- StandInExecutor: vllm/v1/executor/multiproc_executor.py @ c5c40ab25278, collective_rpc: the
  call goes to every worker, whose reply lands in its own queue (a failure as a FAILURE status,
  never an exception across the process boundary); the executor then reads the queues in rank
  order and raises at the first FAILURE, leaving the later workers' replies unread.
"""

from __future__ import annotations

import queue
import threading
import types
from typing import Any, Callable, Dict, List, Optional

import torch

RELOAD_MODULE = "vllm.model_executor.model_loader.reload"


# ---- layerwise reload ------------------------------------------------------------------------------

class QuantizedLinear(torch.nn.Module):
    """A quantized layer as vLLM keeps it: checkpoint-format parameters with weight loaders, and a
    kernel-format tensor the forward uses, made by its quant method's process_weights_after_loading
    (here: the dequantized weight, standing in for a repacked FP8 kernel)."""

    def __init__(self, rows: int, cols: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(rows, cols, dtype=torch.int8), requires_grad=False)
        self.weight_scale = torch.nn.Parameter(torch.ones(rows), requires_grad=False)
        self.register_buffer("kernel", torch.zeros(rows, cols))
        for p in (self.weight, self.weight_scale):
            p.weight_loader = _copy_loader
        self.quant_method = self

    def process_weights_after_loading(self, layer: "QuantizedLinear") -> None:
        layer.kernel.copy_(layer.weight.float() * layer.weight_scale[:, None])


def _copy_loader(param: torch.Tensor, loaded: torch.Tensor) -> None:
    param.data.copy_(loaded)


class QuantizedModel(torch.nn.Module):
    """load_weights routes checkpoint names to each parameter's weight_loader, as vLLM models do."""

    def __init__(self, layers: int, rows: int = 4, cols: int = 4) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(QuantizedLinear(rows, cols) for _ in range(layers))
        self.calls = 0

    def load_weights(self, weights) -> set:
        self.calls += 1
        params = dict(self.named_parameters())
        loaded = set()
        for name, t in weights:
            param = params[name]
            param.weight_loader(param, t)
            loaded.add(name)
        return loaded


class LayerwiseReload:
    """The reload module's two functions; `processed` counts layers processed per phase."""

    def __init__(self) -> None:
        self.info: Dict[torch.nn.Module, dict] = {}
        self.processed = {"load": 0, "finalize": 0}

    def install(self) -> types.ModuleType:
        module = types.ModuleType(RELOAD_MODULE)
        module.initialize_layerwise_reload = self.initialize_layerwise_reload
        module.finalize_layerwise_reload = self.finalize_layerwise_reload
        return module

    def initialize_layerwise_reload(self, model: torch.nn.Module) -> None:
        for layer in model.modules():
            params = dict(layer.named_parameters(recurse=False))
            if not params:
                continue
            info = {"kernel": {n: p.data for n, p in params.items()},
                    "buffers": {n: b for n, b in layer.named_buffers(recurse=False)},
                    "loaded": [], "numel": 0, "total": sum(p.numel() for p in params.values()),
                    "loaders": {n: getattr(p, "weight_loader", _copy_loader) for n, p in params.items()}}
            self.info[layer] = info
            for name, p in params.items():
                p.weight_loader = self._buffering_loader(layer, name)

    def _buffering_loader(self, layer: torch.nn.Module, name: str) -> Callable:
        def online_process_loader(param: torch.Tensor, loaded: torch.Tensor) -> None:
            info = self.info[layer]
            info["loaded"].append((name, loaded))  # the caller's tensor itself, kept until the layer completes
            info["numel"] += loaded.numel()
            if info["numel"] >= info["total"]:
                self._process(layer, "load")
        return online_process_loader

    def _process(self, layer: torch.nn.Module, phase: str) -> None:
        info = self.info.pop(layer)
        fresh = {n: torch.zeros_like(t) for n, t in info["kernel"].items()}
        for name, loaded in info["loaded"]:
            _copy_loader(fresh[name], loaded)
        for name, t in fresh.items():
            getattr(layer, name).data = t
        quant = getattr(layer, "quant_method", None)
        if quant is not None:
            quant.process_weights_after_loading(layer)
        for name, kernel in info["kernel"].items():  # back into the original storage (CUDA graphs)
            kernel.copy_(getattr(layer, name).data)
            getattr(layer, name).data = kernel
            getattr(layer, name).weight_loader = info["loaders"][name]
        self.processed[phase] += 1

    def finalize_layerwise_reload(self, model: torch.nn.Module, model_config: Any) -> None:
        for layer in list(self.info):
            info = self.info[layer]
            if info["loaded"]:
                self._process(layer, "finalize")
            else:
                self.info.pop(layer)
                for name, loader in info["loaders"].items():
                    getattr(layer, name).weight_loader = loader


# ---- MTP -----------------------------------------------------------------------------------------

class StandInMTP(torch.nn.Module):
    """An MTP drafter holding spec layers model.layers.{first}..{first + count - 1}."""

    def __init__(self, first: int, count: int, numel: int = 4) -> None:
        super().__init__()
        self.first, self.count = first, count
        self.weights = torch.nn.ParameterDict({
            f"l{first + i}_{part}": torch.nn.Parameter(torch.zeros(numel), requires_grad=False)
            for i in range(count) for part in ("eh_proj", "mlp")})
        self.calls: List[List[str]] = []

    def _spec_layer(self, name: str) -> Optional[int]:
        for i in range(self.first, self.first + self.count):
            if name.startswith(f"model.layers.{i}."):
                return i
        return None

    def load_weights(self, weights) -> set:
        weights = list(weights)
        self.calls.append([n for n, _ in weights])
        seen = set()
        loaded = set()
        for name, t in weights:
            layer = self._spec_layer(name)
            if layer is None:
                continue
            self.weights[f"l{layer}_{name.rsplit('.', 2)[-2]}"].data.copy_(t)
            seen.add(layer)
            loaded.add(name)
        missing = sorted(set(range(self.first, self.first + self.count)) - seen)
        if missing:
            raise ValueError(f"MTP layers {missing} were not loaded: all MTP layers must be loaded in one call")
        return loaded


# ---- executor ------------------------------------------------------------------------------------

class StandInExecutor:
    """vLLM's multiprocess executor over worker objects, each served by a thread of its own."""

    def __init__(self, workers: List[Any]) -> None:
        self.requests = [queue.Queue() for _ in workers]
        self.replies = [queue.Queue() for _ in workers]
        for rank, worker in enumerate(workers):
            threading.Thread(target=self._busy_loop, args=(worker, rank), daemon=True).start()

    def _busy_loop(self, worker: Any, rank: int) -> None:
        while True:
            method, args, kwargs = self.requests[rank].get()
            try:
                output = getattr(worker, method)(*args, **kwargs)
            except Exception as e:
                self.replies[rank].put(("FAILURE", str(e)))
                continue
            self.replies[rank].put(("SUCCESS", output))

    def collective_rpc(self, method: str, timeout: Optional[float] = 30.0, args: tuple = (),
                       kwargs: Optional[dict] = None) -> list:
        for q in self.requests:
            q.put((method, args, kwargs or {}))
        results = []
        for q in self.replies:
            try:
                status, result = q.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"RPC call to {method} timed out.") from None
            if status != "SUCCESS":
                raise RuntimeError(f"Worker failed with error '{result}', please check the stack trace above "
                                   "for the root cause")
            results.append(result)
        return results


def install_modules(post_load: Callable, reload: Optional[LayerwiseReload]) -> Dict[str, types.ModuleType]:
    """sys.modules entries for the vLLM modules the extension imports: process_weights_after_loading,
    and the reload module where this 'vLLM' has it."""
    names = ["vllm", "vllm.model_executor", "vllm.model_executor.model_loader"]
    modules = {n: types.ModuleType(n) for n in names}
    utils = types.ModuleType("vllm.model_executor.model_loader.utils")
    utils.process_weights_after_loading = post_load
    modules[utils.__name__] = utils
    if reload is not None:
        modules[RELOAD_MODULE] = reload.install()
    else:
        modules[RELOAD_MODULE] = None  # import of it fails, as on a vLLM without it
    return modules


