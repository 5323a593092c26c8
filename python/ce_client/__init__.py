"""ce's client for trainers: push a state dict into a pool of `ce serve` and publish it.

    from ce_client import Pool
    pool = Pool.create("policy", model.state_dict(), slots=2)      # once: registers the layout
    pool.push(model.state_dict(), version=1, update=True)         # every step: write, publish, update

The state dict goes straight from the trainer's tensors into ce's pinned shared-memory slot
(no files); ce digests and streams it to the engines while the copy still runs. Only the standard
library talks to ce serve (http.client, over TCP or a Unix socket).
"""

from .errors import CeError, LayoutError
from .layout import layout_of
from .pool import Pool

__all__ = ["Pool", "CeError", "LayoutError", "layout_of"]
