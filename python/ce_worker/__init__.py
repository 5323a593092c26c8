"""ce's worker: receives weight updates from ce inside an inference process.

ce pushes a checkpoint bucket by bucket into a buffer it shares with this process (CUDA IPC, or
a shared-memory file on the CPU backend) and drives the worker over ZeroMQ (protocol.py). Any
torch engine can call `update_weights_from_ipc`; vLLM loads `ce_worker.vllm.CeWorkerExtension`;
`python3 -m ce_worker` is a standalone worker for tests and `ce --worker python`.
"""

from .loads import copy_bucket, module_loader, tensor_views
from .receiver import SessionTimeout, serve_session, update_weights_from_ipc

__version__ = "0.1.0"
__all__ = ["update_weights_from_ipc", "serve_session", "copy_bucket", "module_loader", "tensor_views",
           "SessionTimeout", "__version__"]
