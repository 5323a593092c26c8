"""A trainer for ce's pool tests: the model's state dict under --seed (model_server.py's, in HF
names) on --device, pushed into a pool of ce serve with ce_client, updating every engine.

    pool-trainer.py --socket PATH --pool NAME --seed S --version V --device cuda:0|cpu [--tiny] [--create]

Prints publish's reply as one JSON line.
"""
import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", "..", "python"), os.path.join(HERE, "..", "..", "python", "tests")]

import torch  # noqa: E402

from ce_client import Pool  # noqa: E402
from model_server import checkpoint_tensors  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--socket", required=True)
    p.add_argument("--pool", required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--version", type=int, required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--create", action="store_true")
    a = p.parse_args()
    # The trainer's weights live on its device, as after an optimizer step.
    sd = {n: t.to(a.device) for n, t in checkpoint_tensors(a.tiny, a.seed, "").items()}
    pool = Pool.create(a.pool, sd, socket=a.socket) if a.create else Pool(a.pool, socket=a.socket)
    try:
        reply = pool.push(sd, version=a.version, update=True)
    finally:
        pool.close()
    print(json.dumps(reply), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
