"""What the engine holds, as far as the worker knows it (protocol 2's additions).

Held is the update this process last finished, which the reply to open reports (for delta updates:
ce sends a delta only onto the exact version the engine holds). Digests are what an update asked to
verify returns at finish: the digest (docs/digest.md) of every tensor it loaded, which ce compares
with its own.
"""

from __future__ import annotations

from typing import Dict, FrozenSet, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

from . import digest


class Held:
    """The checkpoint and version of the last update this process finished (finish replied ok).

    Nothing is known in a fresh process, and nothing from the first load of an update on until that
    update finishes: an abort or a failed update may leave the weights partly new.
    """

    def __init__(self) -> None:
        self.checkpoint: Optional[str] = None
        self.version: Optional[int] = None
        self.names: FrozenSet[str] = frozenset()  # the tensors of that version the engine holds

    def finished(self, checkpoint: str, version: int, names: Iterable[str] = ()) -> None:
        self.checkpoint, self.version, self.names = checkpoint, version, frozenset(names)

    def holds(self, checkpoint: str, version: Optional[int]) -> bool:
        return self.checkpoint is not None and self.checkpoint == checkpoint and self.version == version

    def clear(self) -> None:
        self.checkpoint = self.version = None
        self.names = frozenset()

    def fields(self) -> dict:
        """The open reply's fields: {"checkpoint", "version"}, or none when nothing is known."""
        if self.checkpoint is None:
            return {}
        return {"checkpoint": self.checkpoint, "version": self.version}


class Digests:
    """The digests of one update's loaded tensors, by name; a tensor loaded twice counts as it was last.

    With `params` (the engine's own tensors under the checkpoint's names, as a plain module holds
    them) the digests are those of the params after each load's copies (and patches): they check the
    copy too. Without, they are those of the slot views each load was given. Either way they are
    launched on the device's stream before the load's sync (so the reply to load, which waits for
    that stream, waits for them; the next bucket's H2D runs meanwhile) and collected at finish: one
    host sync per update, however many buckets. A tensor held but not loaded (a delta's unchanged
    ones, see also()) is digested from params at finish.
    """

    def __init__(self, params: Optional[Mapping[str, torch.Tensor]] = None) -> None:
        self.params = params
        self.batches: List[digest.Launched] = []
        self.where: Dict[str, Tuple[int, int]] = {}  # name -> (batch, index in it) of its last load; (-1, -1): at finish

    def launch(self, weights: Sequence[Tuple[str, torch.Tensor]]) -> Optional[digest.Launched]:
        """Before a load: start the digests of its views (none with params: those follow the copies)."""
        if self.params is not None:
            return None
        return digest.launch_digests([t for _, t in weights])

    def loaded(self, names: Sequence[str], launched: Optional[digest.Launched]) -> None:
        """After a load's copies are queued, before its sync: its tensors count. With params their
        digests start now, behind the copies on the same stream; without, launch() started them."""
        if self.params is not None:
            present = [n for n in names if n in self.params]
            for n in names:
                if n not in self.params:
                    self.where[n] = (-1, -1)  # collect names it
            launched = digest.launch_digests([self.params[n] for n in present]) if present else None
            names = present
        if launched is None:
            return
        for i, name in enumerate(names):
            self.where[name] = (len(self.batches), i)
        self.batches.append(launched)

    def also(self, names: Iterable[str]) -> None:
        """Tensors held but not loaded this update (a delta's unchanged ones): digested from params too."""
        assert self.params is not None, "only the engine's own tensors can be digested without a load"
        for name in names:
            self.where.setdefault(name, (-1, -1))

    def collect(self) -> Dict[str, str]:
        """{tensor name: 16 hex digits} for every tensor loaded; syncs with the devices once."""
        names = list(self.where)
        late = [n for n in names if self.where[n][0] < 0]
        if late:
            missing = [n for n in late if self.params is None or n not in self.params]
            if missing:
                raise LookupError(f"verify: the engine holds no tensor {missing[0]}, which it received"
                                  + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        at_finish = dict(zip(late, digest.tensor_digests([self.params[n] for n in late]))) if late else {}
        batches = digest.collect_digests(self.batches) if self.batches else []
        values = [at_finish[n] if self.where[n][0] < 0 else batches[self.where[n][0]][self.where[n][1]] for n in names]
        return {n: digest.format_digest(v) for n, v in zip(names, values)}
