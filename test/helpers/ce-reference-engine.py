"""A stand-in engine that runs the reference system's own worker loop behind vLLM's /collective_rpc,
for timing ce's `--protocol checkpoint-engine` on a GPU host (a benchmark helper, not a test).

    ce-reference-engine.py PORT_FILE [DEVICE_ID]

POST /collective_rpc {"method": "update_weights_from_ipc", "args": [{uuid: endpoint}]} runs
checkpoint_engine.worker.update_weights_from_ipc (from CE_REFERENCE_WORKER_DIR, as ce-reference-gpu.py
loads it) on this process's GPU; `run` copies each tensor into a parameter of its name (allocated the
first time, kept after), as an engine's load_weights does. The bound port goes to PORT_FILE.
"""

import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from importlib import import_module  # noqa: E402

gpu_runner = import_module("ce-reference-gpu")


def main():
    port_file = sys.argv[1]
    device_id = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    gpu_runner.shim_missing_modules()
    worker = gpu_runner.load_reference_worker()
    import torch
    import zmq

    torch.cuda.set_device(device_id)
    uuid = "GPU-" + str(torch.cuda.get_device_properties(device_id).uuid)
    ctx = zmq.Context()
    params = {}
    lock = threading.Lock()

    def run(weights):
        for name, t in weights:
            p = params.get(name)
            if p is None or p.shape != t.shape or p.dtype != t.dtype:
                p = params[name] = torch.empty_like(t)
            p.copy_(t, non_blocking=True)
        torch.cuda.current_stream().synchronize()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
            status, reply = 200, {"results": [None]}
            try:
                if self.path.endswith("/reset_prefix_cache"):
                    reply = {}
                elif body.get("method") != "update_weights_from_ipc":
                    raise ValueError(f"unknown method {body.get('method')!r}")
                else:
                    with lock:
                        worker.update_weights_from_ipc(ctx, body["args"][0][uuid], device_id, run=run, post_hook=lambda: None)
            except Exception as e:  # noqa: BLE001 - the engine's answer says it
                status, reply = 500, {"error": f"{type(e).__name__}: {e}"}
            data = json.dumps(reply).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    with open(port_file, "w") as f:
        f.write(str(server.server_address[1]))
    server.serve_forever()


if __name__ == "__main__":
    main()
