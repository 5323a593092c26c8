"""A trainer for ce's pool tests: the model's state dict under --seed (model_server.py's, in HF
names) on --device, pushed into a pool of ce serve with ce_client, updating every engine.

    pool-trainer.py --socket PATH --pool NAME --seed S --version V --device cuda:0|cpu [--tiny] [--create]
                    [--chain N --fraction F --write-last DIR]

Prints publish's reply as one JSON line. With --chain, versions V+1 .. V+N follow, each the one
before with F of the elements of 9 in 10 tensors changed in their lowest bit (as an optimizer step
changes a few values of most tensors), each pushed, then updated into every engine on its own (so
ce may send it as a delta); one JSON line per update, and the last state dict written to DIR.
"""
import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", "..", "python"), os.path.join(HERE, "..", "..", "python", "tests")]

import torch  # noqa: E402

from ce_client import Pool  # noqa: E402
from model_server import checkpoint_tensors, write_checkpoint  # noqa: E402

BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def step(sd: dict, fraction: float, gen: torch.Generator) -> None:
    """Flip the lowest bit of `fraction` of the elements of 9 in 10 tensors, in place."""
    for i, t in enumerate(sd.values()):
        if i % 10 == 0 or t.numel() == 0:
            continue
        bits = t.view(-1).view(BITS[t.element_size()])
        idx = torch.randint(t.numel(), (max(1, int(t.numel() * fraction)),), generator=gen).to(t.device)
        bits[idx] ^= 1


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--socket", required=True)
    p.add_argument("--pool", required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--version", type=int, required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--create", action="store_true")
    p.add_argument("--chain", type=int, default=0)
    p.add_argument("--fraction", type=float, default=0.01)
    p.add_argument("--write-last")
    a = p.parse_args()
    # The trainer's weights live on its device, as after an optimizer step.
    sd = {n: t.to(a.device) for n, t in checkpoint_tensors(a.tiny, a.seed, "").items()}
    pool = Pool.create(a.pool, sd, socket=a.socket) if a.create else Pool(a.pool, socket=a.socket)
    try:
        reply = pool.push(sd, version=a.version, update=True)
        print(json.dumps(reply), flush=True)
        gen = torch.Generator().manual_seed(a.seed)
        for k in range(1, a.chain + 1):
            step(sd, a.fraction, gen)
            pool.push(sd, version=a.version + k)
            print(json.dumps(pool.update(a.version + k)), flush=True)
    finally:
        pool.close()
    if a.write_last:
        write_checkpoint(a.write_last, sd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
