"""vLLM worker extension: `vllm serve ... --worker-extension-cls ce_worker.vllm.CeWorkerExtension`.

ce triggers an update through vLLM's dev route (served when VLLM_SERVER_DEV_MODE=1):

    POST {server}/collective_rpc
    {"method": "update_weights_from_ipc", "args": [{"<device uuid>": "<endpoint>", ...}], "timeout": T}

vLLM runs the method on every worker and answers {"results": [<one summary dict per worker>]}.
Each worker picks the endpoint of its own GPU and serves the session. The method never raises:
vLLM's multiprocess executor raises at the first failed worker without reading the others'
replies, and the next RPC would read those stale replies; every outcome is therefore a summary
{"state": "finished" | "aborted" | "error", "device_uuid", "error"?, ...} that ce checks.

Two load paths (python/README.md has the table of vLLM versions):
- plain (unquantized models): the model's load_weights per bucket on zero-copy views,
  process_weights_after_loading at finish.
- layerwise (quantized models, where vLLM has model_loader/reload): initialize_layerwise_reload
  at open, load_weights per bucket on copies (vLLM keeps references to a layer's tensors until
  the layer is complete, and ce refills the slot after the reply), finalize_layerwise_reload at
  finish. Where vLLM lacks it, a quantized model is refused at open instead of corrupted.
MTP drafters get only their own tensors, copied out of the slots, in one load_weights call at
finish (since vLLM PR #35548 DeepSeekMTP.load_weights raises unless every MTP layer comes in it).
An update that asks to verify gets the digests of the slot views each bucket was given, computed
on the GPU ahead of load_weights (which transforms weights: fused qkv, quantized kernels, so the
model's parameters are not the checkpoint's tensors), collected at finish with one host sync.

Read from vLLM's main branch (github.com/vllm-project/vllm, 2026 tree: serve/dev routers, V2
model runner; no release number is recorded in those files), the facts this module relies on:
- vllm/entrypoints/serve/dev/rpc/api_router.py @ cd20a5785d36: the /collective_rpc route; body
  fields method, args, kwargs, timeout; dict/list results returned as they are. Its comment
  expects string args, so a JSON-encoded endpoints dict is accepted too.
- vllm/v1/worker/worker_base.py @ 0243225317f5: WorkerWrapperBase.init_worker appends the
  extension class to the worker class's bases and asserts that none of its non-dunder
  attributes already exists on the worker class; hence one method on the class and every helper
  at module level. collective_rpc resolves the method on that worker.
- vllm/v1/worker/gpu_worker.py @ 35d5cda123ec: the worker has `device` (cuda:N), `model_config`,
  `speculative_config` and `model_runner`; the (V1) runner has `model`, and `drafter` (with
  `.model`) when speculative decoding is on. vllm/v1/worker/gpu/model_runner.py @ f03f9783da87:
  the V2 runner keeps it as `speculator` (with `.model`). Later workers add `get_draft_model()`
  (seen in copies of later gpu_worker.py, not at a vllm-project commit); preferred when present.
- vllm/model_executor/model_loader/utils.py @ 3d333269ca22:
  process_weights_after_loading(model, model_config, target_device).
- vllm/model_executor/model_loader/reload/layerwise.py @ 01424e4b5c67 and reload/__init__.py
  @ 030ea52effcb: initialize_layerwise_reload(model) and finalize_layerwise_reload(model,
  model_config); the wrapped weight loaders buffer (param, tensor) until a layer's element count
  is complete, then process it and copy into the original storage. vLLM's own IPC weight
  transfer engine calls them at start and finish of an update, load_weights in between.
- vllm/v1/executor/multiproc_executor.py @ c5c40ab25278: collective_rpc dequeues replies in
  rank order and raises at the first FAILURE or timeout.
- vllm/model_executor/models/deepseek_mtp.py @ 03356f8cb59b: MTP layers are named
  model.layers.{num_hidden_layers + i}. for i < num_nextn_predict_layers.
vLLM is imported only inside the method, when it runs inside a vLLM worker.
"""

from __future__ import annotations

import contextlib
import json
import logging
from typing import Any, Dict, List, Optional, Tuple

import torch

from .cuda_ipc import device_uuid
from .protocol import Open
from .loads import Weights, format_error
from .receiver import update_weights_from_ipc

log = logging.getLogger("ce_worker")

RELOAD_MODULE = "vllm.model_executor.model_loader.reload"


class CeWorkerExtension:
    """Mixed into vLLM's GPU worker; adds one collective_rpc method."""

    def update_weights_from_ipc(self, endpoints: Any, op_timeout_s: float = 120.0) -> dict:
        """Serve one ce update session on this worker's GPU; returns its summary, never raises.

        `endpoints` maps device UUIDs (GPU-xxxxxxxx-...) to ZeroMQ endpoints, as a dict or as
        its JSON text.
        """
        uuid = None
        try:
            device = torch.device(self.device)
            uuid = device_uuid(device)
            endpoint = _ce_endpoint(endpoints, uuid)
            updater = _CeUpdater(self, device)
            # vLLM's loaders fuse and transform weights, so a patch has no tensor to land in. An engine
            # whose parameters carry the checkpoint's names unchanged says so with ce_delta_params()
            # (name -> tensor); ce's delta updates then apply into those.
            delta_params = getattr(self, "ce_delta_params", None)
            summary = update_weights_from_ipc(endpoint, updater.load, updater.finish, device=device,
                                              op_timeout_s=op_timeout_s, expect_uuid=uuid,
                                              start_hook=updater.start, abort_hook=updater.abort,
                                              params=delta_params() if callable(delta_params) else None)
            summary["path"] = updater.path
        except Exception as e:
            log.exception("ce update on %s failed", uuid or "this worker")
            summary = {"state": "error", "error": format_error(e)}
        summary["device_uuid"] = uuid
        return summary


def _ce_endpoint(endpoints: Any, uuid: str) -> str:
    if isinstance(endpoints, str):
        endpoints = json.loads(endpoints)
    if not isinstance(endpoints, dict):
        raise TypeError(f"endpoints must map device UUIDs to endpoints, got {type(endpoints).__name__}")
    endpoint = endpoints.get(uuid)
    if endpoint is None:
        raise KeyError(f"no endpoint for this worker's GPU {uuid} (got {', '.join(endpoints) or 'none'})")
    return endpoint


class _CeUpdater:
    """One update of a vLLM worker's model (and MTP drafter): the receiver's hooks."""

    def __init__(self, worker: Any, device: torch.device) -> None:
        self.worker = worker
        self.device = device
        self.model = worker.model_runner.model
        self.model_config = worker.model_config
        self.quantization = getattr(self.model_config, "quantization", None)
        self.reload = _reload_api() if self.quantization else None
        self.path = "layerwise" if self.reload is not None else "plain"
        self.drafter = _ce_shared_drafter(worker)
        self.mtp_prefixes = _mtp_prefixes(getattr(self.model_config, "hf_config", None)) if self.drafter else ()
        self.mtp: List[Tuple[str, torch.Tensor]] = []
        self.reloading = False

    def start(self, opened: Open) -> None:
        if self.quantization and self.reload is None:
            raise RuntimeError(
                f"the model is quantized ({self.quantization}) and this vLLM has no layerwise reload "
                f"({RELOAD_MODULE}): loading it again and re-running process_weights_after_loading "
                "would corrupt it; update vLLM (see ce_worker's README) or serve an unquantized model")
        self.mtp = []
        if self.reload is not None:
            with _device_scope(self.device):
                self.reload[0](self.model)
            self.reloading = True

    def load(self, weights: Weights) -> None:
        target = weights
        if self.drafter is not None:
            target = []
            for name, t in weights:
                if name.startswith(self.mtp_prefixes):
                    self.mtp.append((name, t.clone()))  # the slot is refilled after this bucket
                else:
                    target.append((name, t))
        if not target:
            return
        if self.reloading:
            # The layerwise loaders keep a layer's tensors until the layer is complete, which may
            # be buckets later: hand them copies, never views into the slot.
            target = [(name, t.clone()) for name, t in target]
            with _device_scope(self.device):
                self.model.load_weights(weights=target)
        else:
            self.model.load_weights(weights=target)

    def finish(self, opened: Open) -> dict:
        from vllm.model_executor.model_loader.utils import process_weights_after_loading

        if self.reloading:
            self.reloading = False
            with _device_scope(self.device):
                self.reload[1](self.model, self.model_config)
        else:
            process_weights_after_loading(self.model, self.model_config, self.device)
        fields: Dict[str, Any] = {}
        if self.drafter is not None:
            fields["mtp_tensors"] = len(self.mtp)
            self._load_drafter(process_weights_after_loading)
        return fields

    def _load_drafter(self, process_weights_after_loading) -> None:
        mtp, self.mtp = self.mtp, []
        if not mtp:
            log.warning("the checkpoint has no MTP tensors (%s...): the drafter keeps its weights",
                        self.mtp_prefixes[0])
            return
        draft_config = getattr(self.worker.speculative_config, "draft_model_config", None) or self.model_config
        if self.reload is not None:
            with _device_scope(self.device):
                self.reload[0](self.drafter)
                self.drafter.load_weights(weights=mtp)
                self.reload[1](self.drafter, draft_config)
        else:
            self.drafter.load_weights(weights=mtp)
            process_weights_after_loading(self.drafter, draft_config, self.device)

    def abort(self) -> None:
        self.mtp = []
        if self.reloading:
            # Put every layer back on its own storage so the engine keeps running; layers
            # completed before the abort hold the new weights (as on the plain path).
            self.reloading = False
            log.warning("update aborted mid-way: finalizing the layerwise reload; the model holds a mix of "
                        "old and new weights until the next update")
            with _device_scope(self.device):
                self.reload[1](self.model, self.model_config)


def _reload_api():
    """(initialize_layerwise_reload, finalize_layerwise_reload), or None where vLLM lacks them."""
    try:
        import importlib

        module = importlib.import_module(RELOAD_MODULE)
        return module.initialize_layerwise_reload, module.finalize_layerwise_reload
    except (ImportError, AttributeError):
        return None


def _mtp_prefixes(hf_config: Any) -> Tuple[str, ...]:
    """Names of the MTP drafter's tensors in the target checkpoint: DeepSeek-style spec layers
    model.layers.{num_hidden_layers + i}., and mtp. (the Qwen3-Next family)."""
    layers = getattr(hf_config, "num_hidden_layers", None)
    count = getattr(hf_config, "num_nextn_predict_layers", None) or 0
    spec = tuple(f"model.layers.{layers + i}." for i in range(count)) if isinstance(layers, int) else ()
    return spec + ("mtp.",)


def _device_scope(device: torch.device):
    """`with torch.device(...)` where torch has it (2.0+): new tensors land on the worker's GPU."""
    return device if hasattr(device, "__enter__") else contextlib.nullcontext()


def _ce_shared_drafter(worker: Any) -> Optional[torch.nn.Module]:
    """The drafter model whose weights live in the target's checkpoint (MTP layers), if any.

    MTP drafters load their layers from the target checkpoint. EAGLE and draft-model drafters
    have checkpoints of their own, which ce does not push: they are left alone, said in the log.
    """
    get = getattr(worker, "get_draft_model", None)
    if callable(get):
        model = get()
    else:
        runner = worker.model_runner
        proposer = getattr(runner, "drafter", None) or getattr(runner, "speculator", None)
        model = getattr(proposer, "model", None)
    if model is None:
        return None
    method = str(getattr(getattr(worker, "speculative_config", None), "method", "") or "")
    if method == "mtp" or method.endswith("_mtp"):
        return model
    log.info("drafter (speculative method %r) has its own checkpoint; ce updates the target model only",
             method)
    return None
