"""vLLM worker extension: `vllm serve ... --worker-extension-cls ce_worker.vllm.CeWorkerExtension`.

ce triggers an update through vLLM's dev route (served when VLLM_SERVER_DEV_MODE=1):

    POST {server}/collective_rpc
    {"method": "update_weights_from_ipc", "args": [{"<device uuid>": "<endpoint>", ...}], "timeout": T}

vLLM runs the method on every worker and answers {"results": [<one summary dict per worker>]}.
Each worker picks the endpoint of its own GPU and serves the session: the model's load_weights
per bucket, vLLM's process_weights_after_loading at finish.

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
vLLM is imported only inside the method, when it runs inside a vLLM worker.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Optional

import torch

from .cuda_ipc import device_uuid
from .protocol import Open
from .receiver import Weights, update_weights_from_ipc

log = logging.getLogger("ce_worker")


class CeWorkerExtension:
    """Mixed into vLLM's GPU worker; adds one collective_rpc method."""

    def update_weights_from_ipc(self, endpoints: Any, op_timeout_s: float = 120.0) -> dict:
        """Serve one ce update session on this worker's GPU; returns the session summary.

        `endpoints` maps device UUIDs (GPU-xxxxxxxx-...) to ZeroMQ endpoints, as a dict or as
        its JSON text.
        """
        if isinstance(endpoints, str):
            endpoints = json.loads(endpoints)
        if not isinstance(endpoints, dict):
            raise TypeError(f"endpoints must map device UUIDs to endpoints, got {type(endpoints).__name__}")
        device = torch.device(self.device)
        uuid = device_uuid(device)
        endpoint = endpoints.get(uuid)
        if endpoint is None:
            raise KeyError(f"no endpoint for this worker's GPU {uuid} (got {', '.join(endpoints) or 'none'})")
        model = self.model_runner.model
        drafter = _ce_shared_drafter(self)

        def load(weights: Weights) -> None:
            model.load_weights(weights=weights)
            if drafter is not None:
                drafter.load_weights(weights=weights)

        def post(opened: Open) -> dict:
            from vllm.model_executor.model_loader.utils import process_weights_after_loading

            process_weights_after_loading(model, self.model_config, device)
            if drafter is not None:
                draft_config = getattr(self.speculative_config, "draft_model_config", None) or self.model_config
                process_weights_after_loading(drafter, draft_config, device)
            return {}

        summary = update_weights_from_ipc(endpoint, load, post, device=device, op_timeout_s=op_timeout_s,
                                          expect_uuid=uuid)
        summary["device_uuid"] = uuid
        return summary


def _ce_shared_drafter(worker: Any) -> Optional[torch.nn.Module]:
    """The drafter model whose weights live in the target's checkpoint (MTP layers), if any.

    MTP drafters load their layers from the target checkpoint and skip the other names, so
    they take the same buckets. EAGLE and draft-model drafters have checkpoints of their own,
    which ce does not push: they are left alone, said once in the log.
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
