"""The trainer's side of `ce bench --pool`: a state dict of the pool's layout on one device, pushed
as version after version, each update streaming behind its push. One JSON line per push on stdout:

    {"version": N, "push": s, "tail": s, "total": s, "reply": <publish's reply>}

push: from the first byte copied to the last one written (the copies run on the tensors' devices
straight into the pinned slot); tail: from there until publish answered, i.e. every engine serves N;
total: the RL step's weight transfer, push + tail.

    python -m ce_client.bench --socket PATH --pool NAME --device cuda:0 --repeat 6
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

from ce_worker.dtypes import lookup

from .pool import DEFAULT_PROGRESS_BYTES, Pool


def state_dict_for(layout, device: torch.device) -> dict:
    """Random tensors of the layout's names, dtypes and shapes (bytes, so any dtype works; bools 0/1)."""
    out = {}
    gen = torch.Generator(device=device).manual_seed(1234)
    for e in layout:
        dt = lookup(e["dtype"])
        raw = torch.empty(e["nbytes"], dtype=torch.uint8, device=device)
        if raw.numel():
            raw.random_(0, 2 if e["dtype"] == "BOOL" else 256, generator=gen)
        if dt.torch is None:
            out[e["name"]] = raw.view(dt.raw_shape(e["shape"]))
        else:
            out[e["name"]] = raw.view(dt.torch).view(e["shape"]) if math.prod(e["shape"]) else torch.empty(e["shape"], dtype=dt.torch, device=device)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--socket", help="ce serve's Unix socket")
    p.add_argument("--url", help="ce serve's URL, instead of --socket")
    p.add_argument("--pool", required=True)
    p.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeat", type=int, default=6)
    p.add_argument("--first-version", type=int, default=1)
    p.add_argument("--progress-bytes", type=int, default=DEFAULT_PROGRESS_BYTES)
    args = p.parse_args(argv)

    pool = Pool(args.pool, url=args.url, socket=args.socket)
    device = torch.device(args.device)
    sd = state_dict_for(pool.info()["layout"], device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    try:
        for i in range(args.repeat):
            version = args.first_version + i
            t0 = time.perf_counter()
            pool.push(sd, version=version, publish=False, update=True, progress_bytes=args.progress_bytes)
            t1 = time.perf_counter()
            reply = pool.publish(version, update=True)
            t2 = time.perf_counter()
            print(json.dumps({"version": version, "push": t1 - t0, "tail": t2 - t1, "total": t2 - t0, "reply": reply}), flush=True)
    finally:
        pool.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
