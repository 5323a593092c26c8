"""A stand-in inference engine for ce's model tests: a real torch model in its own process, updated
in place through ce_worker's vLLM extension, behind vLLM's /collective_rpc route.

    model_server.py --device cuda:0|cpu --port 0 --ready-file F [--tiny] [--seed S] [--fail-on-bucket N]
                    [--exit-with-stdin]
    model_server.py --write-checkpoint DIR --seed S [--tiny] [--variant unknown-name|wrong-shape]
    model_server.py --reference-logits DIR --device cuda:0|cpu [--tiny]
    model_server.py --probe [--tiny]

The model is a small Qwen3 (transformers' Qwen3ForCausalLM, bf16, random weights, no download),
or with --tiny a two-layer MLP language model of plain torch for hosts without transformers.
Every weight is drawn from a generator seeded by --seed in name order, so two processes given the
same seed hold the same bytes; a checkpoint is the same model under another seed, in HF names.

The server wraps the model in the attributes vLLM's GPU worker gives a worker extension (device,
model_config, model_runner.model with load_weights) and mixes in CeWorkerExtension as vLLM's
worker_base.py does. Routes (127.0.0.1 only; the bound port goes to --ready-file):
  POST /collective_rpc  {"method","args","kwargs"} -> {"results":[r]}, or 500 {"error":"<Type>: ..."}
  GET  /state_sha       {"tensors": {name: sha256 of the tensor's bytes}} over the state dict
  POST /logits          the logits of a fixed seeded input: {"shape","dtype","sha256","hex"}
  GET  /mem             device and process memory: allocated/reserved/free/total (cuda), fds, ce maps
  GET  /info            device, uuid, model, and counters (rpcs, updates, post_loads)
  POST /shutdown        answers, then stops the server (exit 0)
--reference-logits prints the /logits answer of a fresh model loaded from DIR's checkpoint.
--probe exits 0 when this interpreter can build the model (and says with what), else 1 with why.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import socket
import struct
import sys
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import ModuleType, SimpleNamespace
from typing import Dict, List, Optional, Tuple

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if PACKAGE_ROOT not in sys.path:
    sys.path.insert(0, PACKAGE_ROOT)

# cuBLAS picks its reduction order per workspace; a fixed workspace makes two processes compute
# the same logits bit for bit. Must be set before CUDA starts.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
# Everything is built here; a hub lookup would be a bug, so it fails instead of reaching out.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import ce_worker.vllm  # noqa: E402
from ce_worker import dtypes  # noqa: E402
from ce_worker.cuda_ipc import device_uuid  # noqa: E402
from ce_worker.vllm import CeWorkerExtension  # noqa: E402

log = logging.getLogger("model_server")

CHECKPOINT_FILE = "model.safetensors"

# Small, but every part of a Qwen3 layer is there: GQA (4 query heads over 2 KV heads), q/k norms,
# untied lm_head. About 2.9M parameters, 5.8 MB in bf16.
QWEN3 = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=256,
             rms_norm_eps=1e-6, tie_word_embeddings=False)
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2)

INPUT_SEED = 1234  # the fixed input of /logits: token ids drawn from this seed
INPUT_SHAPE = (2, 16)  # batch, sequence

# Names of the simulated devices of ce's CPU backend (src/devices.ts); this server is device 0.
CPU_DEVICE_INDEX = 0


# ---- models --------------------------------------------------------------------------------------

class RMSNorm(torch.nn.Module):
    def __init__(self, size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class TinyLayer(torch.nn.Module):
    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.post_attention_layernorm = RMSNorm(hidden)
        self.mlp = torch.nn.Module()
        self.mlp.up_proj = torch.nn.Linear(hidden, inter, bias=False)
        self.mlp.down_proj = torch.nn.Linear(inter, hidden, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.post_attention_layernorm(h)
        return h + self.mlp.down_proj(torch.nn.functional.silu(self.mlp.up_proj(x)))


class TinyLM(torch.nn.Module):
    """Embedding, residual MLP layers, final norm, untied head: HF names, no transformers needed."""

    def __init__(self, vocab_size: int, hidden_size: int, intermediate_size: int, num_hidden_layers: int) -> None:
        super().__init__()
        self.model = torch.nn.Module()
        self.model.embed_tokens = torch.nn.Embedding(vocab_size, hidden_size)
        self.model.layers = torch.nn.ModuleList(TinyLayer(hidden_size, intermediate_size)
                                                for _ in range(num_hidden_layers))
        self.model.norm = RMSNorm(hidden_size)
        self.lm_head = torch.nn.Linear(hidden_size, vocab_size, bias=False)
        self.vocab_size = vocab_size

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            h = layer(h)
        return self.lm_head(self.model.norm(h))


def build_model(tiny: bool, seed: int, device: torch.device) -> Tuple[torch.nn.Module, dict]:
    """The model with every weight drawn from `seed`, in bf16 on `device`, and its config."""
    if tiny:
        model, config = TinyLM(**TINY), dict(TINY, model_type="tiny")
    else:
        from transformers import Qwen3Config, Qwen3ForCausalLM

        # Eager attention: the same kernels in every process (SDPA may choose per call).
        cfg = Qwen3Config(**QWEN3, attn_implementation="eager")
        model, config = Qwen3ForCausalLM(cfg), dict(QWEN3, model_type="qwen3")
    model = model.to(torch.bfloat16)
    randomize(model, seed)
    return model.to(device).eval(), config


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Draw every state-dict tensor from one CPU generator, in name order: the same bytes anywhere.

    Not the library's own init: that one leaves norms at 1 (equal across seeds) and may change
    between transformers versions; here every tensor differs between two seeds.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in sorted(model.state_dict().items()):
            values = torch.randn(t.shape, generator=gen)
            values = 1.0 + 0.1 * values if name.endswith("norm.weight") else 0.05 * values
            t.copy_(values)


def fixed_input(vocab_size: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(INPUT_SEED)
    return torch.randint(0, vocab_size, INPUT_SHAPE, generator=gen).to(device)


def logits_of(model: torch.nn.Module, vocab_size: int, device: torch.device) -> dict:
    with torch.no_grad():
        ids = fixed_input(vocab_size, device)
        out = model(ids) if isinstance(model, TinyLM) else model(input_ids=ids, use_cache=False).logits
    raw = tensor_bytes(out)
    return {"shape": list(out.shape), "dtype": str(out.dtype).replace("torch.", ""),
            "sha256": hashlib.sha256(raw).hexdigest(), "hex": raw.hex()}


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The tensor's elements as they sit in memory (little-endian), as safetensors stores them."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes()


def state_sha(model: torch.nn.Module) -> Dict[str, str]:
    return {name: hashlib.sha256(tensor_bytes(t)).hexdigest() for name, t in model.state_dict().items()}


# ---- checkpoints ---------------------------------------------------------------------------------

ST_NAMES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def write_checkpoint(directory: str, tensors: Dict[str, torch.Tensor]) -> str:
    """DIR/model.safetensors: with the safetensors package when importable, else by hand."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, CHECKPOINT_FILE)
    tensors = {n: t.detach().contiguous().cpu() for n, t in tensors.items()}
    try:
        from safetensors.torch import save_file
    except ImportError:
        save_file = None
    if save_file is not None:
        save_file(tensors, path, metadata={"format": "pt"})
        return path
    # The format: 8-byte little-endian header length, the JSON header (padded with spaces to a
    # multiple of 8), then the tensors' bytes back to back at the header's data_offsets.
    header: dict = {"__metadata__": {"format": "pt"}}
    blobs: List[bytes] = []
    offset = 0
    for name in sorted(tensors):
        t = tensors[name]
        raw = tensor_bytes(t)
        header[name] = {"dtype": ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for raw in blobs:
            f.write(raw)
    return path


def read_checkpoint(directory: str) -> Dict[str, torch.Tensor]:
    """Every tensor of DIR/model.safetensors, parsed by hand (the check must not share ce's parser)."""
    with open(os.path.join(directory, CHECKPOINT_FILE), "rb") as f:
        data = f.read()
    (n,) = struct.unpack_from("<Q", data, 0)
    header = json.loads(data[8:8 + n])
    start = 8 + n
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        begin, end = meta["data_offsets"]
        raw = torch.frombuffer(bytearray(data[start + begin:start + end]), dtype=torch.uint8)
        out[name] = raw.view(dtypes.lookup(meta["dtype"]).torch).reshape(meta["shape"])
    return out


def checkpoint_tensors(tiny: bool, seed: int, variant: str) -> Dict[str, torch.Tensor]:
    """The model's state dict under `seed`; a variant breaks it the way a wrong checkpoint would."""
    model, _ = build_model(tiny, seed, torch.device("cpu"))
    tensors = dict(model.state_dict())
    gen = torch.Generator().manual_seed(seed)
    if variant == "unknown-name":
        # A tensor the model does not have, as from another architecture.
        tensors["model.layers.0.mlp.extra_proj.weight"] = torch.randn(8, 16, generator=gen).to(torch.bfloat16)
    elif variant == "wrong-shape":
        name = "model.layers.1.mlp.down_proj.weight"
        rows, cols = tensors[name].shape
        tensors[name] = torch.randn(cols, rows, generator=gen).to(torch.bfloat16)  # transposed
    return tensors


# ---- the stand-in engine -------------------------------------------------------------------------

class LoadAdapter:
    """What vLLM's model offers the extension: load_weights(weights) over (name, tensor) pairs.

    Like vLLM's default loader: a name the model lacks is a KeyError, a shape that does not fit is
    an error, anything else is copied into the parameter of that name. Views into ce's buffer are
    not kept. `fail_on_bucket` makes the first session's load of that bucket raise (once).
    """

    def __init__(self, model: torch.nn.Module, fail_on_bucket: Optional[int]) -> None:
        self.model = model
        self.params: Dict[str, torch.Tensor] = dict(model.state_dict(keep_vars=True))
        self.fail_on_bucket = fail_on_bucket
        self.bucket = 0  # loads in the current session: ce sends one GPU's buckets in order

    def load_weights(self, weights) -> set:
        bucket, self.bucket = self.bucket, self.bucket + 1
        if self.fail_on_bucket is not None and bucket == self.fail_on_bucket:
            self.fail_on_bucket = None
            raise RuntimeError(f"injected failure in bucket {bucket} (--fail-on-bucket)")
        loaded = set()
        with torch.no_grad():
            for name, w in weights:
                param = self.params.get(name)
                if param is None:
                    raise KeyError(f"{name} is not a weight of {type(self.model).__name__}")
                if param.shape != w.shape:
                    raise ValueError(f"{name}: checkpoint shape {list(w.shape)} does not fit the model's {list(param.shape)}")
                param.copy_(w)
                loaded.add(name)
        return loaded


class StandInWorker:
    """The attributes vLLM's GPU worker gives an extension (see ce_worker/vllm.py for the source)."""

    def __init__(self, device: torch.device, model_config: SimpleNamespace, model: LoadAdapter) -> None:
        self.device = device
        self.model_config = model_config
        self.speculative_config = None
        self.model_runner = SimpleNamespace(model=model)

    def ce_delta_params(self) -> Dict[str, torch.Tensor]:
        """This model's parameters carry the checkpoint's names: delta patches apply into them."""
        return self.model_runner.model.params


def extended_worker_class() -> type:
    """vLLM's injection (worker_base.py): no attribute clash, then the extension joins the bases."""
    cls = type("Worker", (StandInWorker,), {})
    for attr in dir(CeWorkerExtension):
        if not attr.startswith("__") and hasattr(cls, attr):
            raise TypeError(f"worker class already has {attr}, the extension cannot be mixed in")
    cls.__bases__ = cls.__bases__ + (CeWorkerExtension,)
    return cls


def install_vllm_stand_ins(on_post_load) -> None:
    """The one vLLM function the extension calls at finish, under its module path (vLLM is absent)."""
    path = "vllm.model_executor.model_loader.utils"
    parts = path.split(".")
    for i in range(1, len(parts) + 1):
        sys.modules[".".join(parts[:i])] = ModuleType(".".join(parts[:i]))
    sys.modules[path].process_weights_after_loading = on_post_load


def worker_device_name(device: torch.device) -> str:
    """The device UUID the extension looks for: CUDA's on a GPU; on ce's CPU backend, its simulated
    device name (CPU-<host>-<n>), since vLLM's workers and so the extension know only CUDA."""
    if device.type == "cpu":
        return f"CPU-{socket.gethostname()}-{CPU_DEVICE_INDEX}"
    return device_uuid(device)


class Engine:
    """The model, its extended worker, and the counters the routes report. One call at a time."""

    def __init__(self, device: torch.device, tiny: bool, seed: int, fail_on_bucket: Optional[int]) -> None:
        self.device = device
        self.model, self.config = build_model(tiny, seed, device)
        self.loader = LoadAdapter(self.model, fail_on_bucket)
        self.lock = threading.Lock()
        self.counters = {"rpcs": 0, "rpc_errors": 0, "updates": 0, "post_loads": 0}
        install_vllm_stand_ins(self._post_load)
        # The extension looks its device up through this module-level name; on a GPU the
        # replacement defers to the real lookup, so the CUDA path runs unchanged.
        ce_worker.vllm.device_uuid = worker_device_name
        self.uuid = worker_device_name(device)
        self.worker = extended_worker_class()(device, SimpleNamespace(**self.config), self.loader)

    def _post_load(self, model, model_config, target_device) -> None:
        if model is not self.loader:
            raise AssertionError("process_weights_after_loading got another model than model_runner.model")
        self.counters["post_loads"] += 1

    def rpc(self, body: dict) -> list:
        method = body.get("method")
        if not isinstance(method, str) or method.startswith("_") or not callable(getattr(self.worker, method, None)):
            raise AttributeError(f"the worker has no method {method!r}")
        args, kwargs = body.get("args") or [], body.get("kwargs") or {}
        with self.lock:
            self.counters["rpcs"] += 1
            self.loader.bucket = 0
            try:
                result = getattr(self.worker, method)(*args, **kwargs)
            except Exception:
                self.counters["rpc_errors"] += 1
                raise
            if isinstance(result, dict) and result.get("state") == "finished":
                self.counters["updates"] += 1
        return [result]

    def state_sha(self) -> dict:
        with self.lock:
            return {"tensors": state_sha(self.model)}

    def logits(self) -> dict:
        with self.lock:
            return logits_of(self.model, self.config["vocab_size"], self.device)

    def mem(self) -> dict:
        out = {"fds": len(os.listdir("/proc/self/fd")), "ce_maps": ce_buffer_maps(), "rss_bytes": rss_bytes()}
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            free, total = torch.cuda.mem_get_info(self.device)
            out.update(allocated=torch.cuda.memory_allocated(self.device),
                       reserved=torch.cuda.memory_reserved(self.device), free=free, total=total)
        return out

    def info(self) -> dict:
        return {"device": str(self.device), "uuid": self.uuid, "model": self.config["model_type"],
                "pid": os.getpid(), "torch": torch.__version__, **self.counters}


_CE_BUFFER = re.compile(r"/ce-\d+-\d+-dev\d+( \(deleted\))?$")


def ce_buffer_maps() -> int:
    """Mappings of ce's CPU-backend slot buffers (CE_SHM_DIR/ce-<pid>-<n>-dev<d>) in this process."""
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if _CE_BUFFER.search(line.rstrip("\n")))


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def make_handler(engine: Engine) -> type:
    routes = {
        ("POST", "/collective_rpc"): lambda body: {"results": engine.rpc(body)},
        ("GET", "/state_sha"): lambda body: engine.state_sha(),
        ("POST", "/logits"): lambda body: engine.logits(),
        ("GET", "/mem"): lambda body: engine.mem(),
        ("GET", "/info"): lambda body: engine.info(),
        ("POST", "/shutdown"): lambda body: {"ok": True},
    }

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self._serve("GET")

        def do_POST(self) -> None:
            self._serve("POST")

        def _serve(self, method: str) -> None:
            route = routes.get((method, self.path.split("?")[0]))
            if route is None:
                return self._reply(404, {"error": f"no route {method} {self.path}"})
            try:
                length = int(self.headers.get("content-length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
            except ValueError as e:
                return self._reply(400, {"error": f"body is not JSON: {e}"})
            try:
                answer = route(body)
            except Exception as e:
                log.error("%s %s failed:\n%s", method, self.path, traceback.format_exc())
                return self._reply(500, {"error": error_text(e)})
            self._reply(200, answer)
            if self.path == "/shutdown":
                # shutdown() waits for serve_forever to return, so not from the serving thread.
                threading.Thread(target=self.server.shutdown, name="shutdown", daemon=True).start()

        def _reply(self, status: int, value: dict) -> None:
            data = json.dumps(value).encode()
            try:
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                log.warning("%s: the client left before the reply", self.path)  # ce gave up meanwhile

        def log_message(self, fmt: str, *args) -> None:
            log.debug("%s %s", self.address_string(), fmt % args)

    return Handler


def serve(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            log.error("--device %s: torch sees no CUDA GPU", args.device)
            return 1
        torch.cuda.set_device(device)
        device = torch.device("cuda", torch.cuda.current_device())
    deterministic()
    engine = Engine(device, args.tiny, args.seed, args.fail_on_bucket)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(engine))
    server.daemon_threads = True
    port = server.server_address[1]
    if args.exit_with_stdin:
        threading.Thread(target=_stop_at_eof, args=(server,), name="stdin", daemon=True).start()
    tmp = f"{args.ready_file}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{port}\n")
    os.replace(tmp, args.ready_file)  # whole or absent: the test never reads half a port
    log.info("serving %s (%s) on %s as %s, pid %d", engine.config["model_type"], device,
             f"http://127.0.0.1:{port}", engine.uuid, os.getpid())
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
    log.info("stopped: %s", json.dumps(engine.counters))
    return 0


def _stop_at_eof(server: ThreadingHTTPServer) -> None:
    try:
        while os.read(0, 65536):
            pass
    except OSError:
        pass
    log.info("stdin reached EOF")
    server.shutdown()


def deterministic() -> None:
    # Warn, not fail, on an op without a deterministic kernel: the logits comparison is the check.
    torch.use_deterministic_algorithms(True, warn_only=True)


def probe(tiny: bool) -> int:
    found = [f"torch {torch.__version__}"]
    if not tiny:
        try:
            import transformers
            from transformers import Qwen3Config, Qwen3ForCausalLM  # noqa: F401
        except Exception as e:
            print(f"cannot build the Qwen3 model: {error_text(e)}", file=sys.stderr)
            return 1
        found.append(f"transformers {transformers.__version__}")
    try:
        import safetensors
        found.append(f"safetensors {safetensors.__version__}")
    except ImportError:
        found.append("checkpoints written by hand (no safetensors)")
    print(", ".join(found))
    return 0


def parse_args(argv: Optional[list]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="model_server.py", description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--write-checkpoint", metavar="DIR", help="write DIR/model.safetensors (weights from --seed), exit")
    mode.add_argument("--reference-logits", metavar="DIR", help="print the logits of a model loaded from DIR, exit")
    mode.add_argument("--probe", action="store_true", help="say whether this interpreter can build the model, exit")
    p.add_argument("--tiny", action="store_true", help="a plain-torch MLP language model instead of Qwen3")
    p.add_argument("--device", default="cpu", help="cpu or cuda:N (default cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of every weight (default 0)")
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default 0: any free one)")
    p.add_argument("--ready-file", help="serve: write the bound port here once the model is up")
    p.add_argument("--exit-with-stdin", action="store_true",
                   help="serve: stop when stdin reaches EOF (a parent holding a pipe died or let go)")
    p.add_argument("--fail-on-bucket", type=int, metavar="N",
                   help="serve: load_weights raises on bucket N (0-based, as ce numbers loads) of the first update")
    p.add_argument("--variant", choices=("unknown-name", "wrong-shape"),
                   help="--write-checkpoint: add a tensor the model lacks, or transpose one")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    args = p.parse_args(argv)
    if not (args.write_checkpoint or args.reference_logits or args.probe) and not args.ready_file:
        p.error("serving needs --ready-file")
    return args


def main(argv: Optional[list] = None) -> int:
    args = parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s"))
    for name in ("model_server", "ce_worker"):
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(args.log_level.upper())
    if args.probe:
        return probe(args.tiny)
    if args.write_checkpoint:
        path = write_checkpoint(args.write_checkpoint, checkpoint_tensors(args.tiny, args.seed, args.variant))
        print(json.dumps({"path": path}))
        return 0
    if args.reference_logits:
        deterministic()
        device = torch.device(args.device)
        model, config = build_model(args.tiny, args.seed, device)
        # Straight from the file into the model, strict: every name present, none extra.
        model.load_state_dict(read_checkpoint(args.reference_logits), strict=True)
        print(json.dumps(logits_of(model, config["vocab_size"], device)))
        return 0
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
