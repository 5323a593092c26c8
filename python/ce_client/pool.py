"""Pool: the trainer's handle on one pool of ce serve (DESIGN.md, "Versions, the resident pool").

A pool is a model layout that ce serve registered once, with K version slots in shared memory that
ce keeps pinned. push() writes a state dict into the slot ce hands out for a new version, straight
from the trainer's tensors (GPU or CPU) into the slot file, telling ce as it goes how much is
complete (so ce digests and streams while the copy runs), then publishes it; with update=True ce
also updates every engine to it.
"""

from __future__ import annotations

import collections
import os
import queue
import threading
import urllib.parse
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch

from .api import Api
from .errors import CeError
from .layout import check, layout_of, normalize
from .slots import SlotFile

StateDict = Mapping[str, torch.Tensor]
DEFAULT_PROGRESS_BYTES = 256 << 20


class Pool:
    """One pool of ce serve at `url` (http://HOST:PORT or unix:PATH) or Unix socket `socket`.

    Slot files stay mapped (and registered with CUDA) from one push to the next; close() unmaps
    them. Every failure is a CeError: ce's code, message and hint, or the client's own E_CLIENT_*.
    """

    def __init__(self, name: str, url: Optional[str] = None, socket: Optional[str] = None,
                 timeout_s: Optional[float] = 600.0) -> None:
        self.name = name
        self.api = Api(url, socket, timeout_s)
        self.layout: Optional[List[dict]] = None  # the pool's, as ce last sent it (with offsets)
        self._path = f"/v1/pools/{urllib.parse.quote(name, safe='')}"
        self._slots: Dict[str, SlotFile] = {}

    @classmethod
    def create(cls, name: str, state_dict_or_layout: Union[StateDict, Sequence[Mapping[str, Any]], str, os.PathLike],
               slots: int = 2, url: Optional[str] = None, socket: Optional[str] = None,
               timeout_s: Optional[float] = 600.0) -> "Pool":
        """Register a pool with ce serve: the layout of a state dict, a layout given as
        [{"name", "dtype", "shape"}] (dtype a torch dtype or a safetensors name), or a checkpoint's path.
        ce places the tensors largest first: pool.layout lists them so, with their offsets."""
        pool = cls(name, url=url, socket=socket, timeout_s=timeout_s)
        body: Dict[str, Any] = {"name": name, "slots": slots}
        if isinstance(state_dict_or_layout, (str, os.PathLike)):
            body["path"] = os.fspath(state_dict_or_layout)
        elif isinstance(state_dict_or_layout, Mapping):
            body["layout"] = layout_of(state_dict_or_layout)
        else:
            body["layout"] = normalize(state_dict_or_layout)
        pool.layout = pool.api.call("POST", "/v1/pools", body).get("layout")
        return pool

    def info(self) -> dict:
        """GET the pool: its layout, slot files, versions, and which version serves."""
        reply = self.api.call("GET", self._path)
        self.layout = reply.get("layout")
        return reply

    def push(self, state_dict: StateDict, version: int, publish: bool = True, update: bool = False,
             progress_bytes: int = DEFAULT_PROGRESS_BYTES, verify: Optional[bool] = None) -> dict:
        """Write `state_dict` as `version` and publish it; with update, every engine gets it too,
        each bucket as soon as its bytes are written (ce starts the update with the slot).

        Returns publish's reply, or, with publish=False, the slot ce handed out. A state dict that
        does not fit the layout (names, dtypes, shapes) raises LayoutError before a slot is taken;
        a push that fails while copying gives its version up (DELETE), so no update waits for it.
        CUDA tensors are copied on their devices' current streams: they must be ready there.
        verify (None: ce serve's default) says whether the engines' digests are checked.
        """
        check(state_dict, self.layout if self.layout is not None else self.info()["layout"], self.name)
        begin: Dict[str, Any] = {"version": version, "update": update, **_verify(verify)}
        slot = self.api.call("POST", f"{self._path}/versions", begin)
        try:
            check(state_dict, slot["layout"], self.name)  # the pool may have been made anew since
            self.layout = slot["layout"]
            end = self._write(state_dict, version, slot, progress_bytes)
        except BaseException:
            self._give_up(version)
            raise
        if not publish:
            self._written(version, end)  # all of it: ce can digest it before the publish
            return slot
        return self.publish(version, update=update, verify=verify)

    def publish(self, version: int, update: bool = False, verify: Optional[bool] = None) -> dict:
        """Make a written version ready (ce digests what it has not yet); with update, update every
        engine to it (or wait for the update that push started)."""
        return self.api.call("POST", f"{self._path}/versions/{version}/publish", {"update": update, **_verify(verify)})

    def update(self, version: int, verify: Optional[bool] = None) -> dict:
        """Update every engine to a ready version of this pool."""
        return self.api.call("POST", "/v1/update", {"pool": self.name, "version": version, **_verify(verify)})

    def rollback(self) -> dict:
        """Push the last good version to every engine again."""
        return self.api.call("POST", f"{self._path}/rollback", {})

    def delete(self) -> dict:
        """Unregister the pool in ce serve (its slot files go too); unmaps them here first."""
        self.close()
        return self.api.call("DELETE", self._path)

    def close(self) -> None:
        """Unregister the slot files from CUDA and unmap them. The pool stays in ce serve."""
        slots, self._slots = self._slots, {}
        for f in slots.values():
            f.close()

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _slot_file(self, path: str) -> SlotFile:
        f = self._slots.get(path)
        if f is None:
            f = self._slots[path] = SlotFile(path)
        return f

    def _give_up(self, version: int) -> None:
        try:
            self.api.call("DELETE", f"{self._path}/versions/{version}")
        except CeError:
            pass  # the push's own error is the one to raise; an update waiting for it ends at its deadline

    def _written(self, version: int, nbytes: int) -> None:
        self.api.call("POST", f"{self._path}/versions/{version}/written", {"bytes": nbytes})

    def _write(self, state_dict: StateDict, version: int, slot: dict, progress_bytes: int) -> int:
        """Copy every tensor into the slot file in offset order, telling ce every ~progress_bytes;
        returns where the last tensor ends."""
        f = self._slot_file(slot["path"])
        entries = sorted(slot["layout"], key=lambda e: e["offset"])
        end = max((e["offset"] + e["nbytes"] for e in entries), default=0)
        if end > f.size:
            raise CeError("E_CLIENT_SLOT", f"slot file {f.path} has {f.size} bytes, pool {self.name}'s layout "
                                           f"needs {end}")
        if any(state_dict[e["name"]].is_cuda for e in entries):
            f.register_cuda()
        progress = _Progress(lambda nbytes: self._written(version, nbytes), progress_bytes)
        try:
            self._copy(state_dict, entries, f, progress)
        except BaseException:
            progress.close(abort=True)
            raise
        return end

    def _copy(self, state_dict: StateDict, entries: List[dict], f: SlotFile, progress: "_Progress") -> None:
        with torch.no_grad():
            for e in entries:
                src = state_dict[e["name"]].detach()
                nbytes = src.numel() * src.element_size()
                if nbytes != e["nbytes"]:
                    raise CeError("E_CLIENT_LAYOUT", f"pool {self.name}: tensor {e['name']} has {nbytes} bytes, "
                                                     f"ce's layout says {e['nbytes']}")
                device = src.device if src.is_cuda else None
                at = e["offset"]
                if nbytes:
                    # Bytes, not values: any dtype (bf16, fp8, bool) goes bit for bit.
                    flat = src.contiguous().view(-1).view(torch.uint8)
                    # A large tensor goes in steps, so that ce hears of its first bytes (and its
                    # update starts on them) before all of it has crossed.
                    step = progress.step if progress.step > 0 else nbytes
                    for lo in range(0, nbytes, step):
                        hi = min(lo + step, nbytes)
                        f.tensor[at + lo:at + hi].copy_(flat[lo:hi], non_blocking=src.is_cuda)
                        progress.copied(device, at + hi)
                else:
                    progress.copied(device, at)
        progress.finish()


class _Progress:
    """Says how many leading bytes of the slot are complete, from a thread of its own.

    At every ~step bytes an event is recorded on each GPU that copied since the last step and
    handed to the thread, which waits for the events in order and posts the step's bytes (or those
    of a later step whose copies are complete by then). The trainer enqueues every copy at once, so
    the copies run back to back at the link's speed while ce hears (a trainer that waited for one
    step before enqueuing the next left the link idle whenever a post took longer than a step's
    copies).
    CPU copies are complete when copy_ returns.
    """

    def __init__(self, post, step: int) -> None:
        self.post = post
        self.step = step
        self.next_at = step if step > 0 else None
        self.devices: set = set()  # GPUs with copies since the last step
        self.used: set = set()  # GPUs with copies at all
        self.error: Optional[BaseException] = None  # a post's failure: the push stops at the next step
        self.aborted = False  # the push failed: nothing more is posted
        self.steps: "queue.SimpleQueue[Optional[tuple]]" = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="ce-push-progress", daemon=True)
        self.thread.start()

    def copied(self, device: Optional[torch.device], end: int) -> None:
        if device is not None:
            self.devices.add(device)
            self.used.add(device)
        if self.next_at is None or end < self.next_at:
            return
        if self.error is not None:
            raise self.error
        self.steps.put((end, self._record()))
        self.next_at = end + self.step

    def finish(self) -> None:
        """Waits for every copy and every post; what is complete now is said by the caller (written
        or publish). Raises a post's failure."""
        self.close()
        if self.error is not None:
            raise self.error

    def close(self, abort: bool = False) -> None:
        """Waits for every copy, then for the thread: once the steps handed to it are posted, or at
        once with abort (a push that failed half-way gives its slot back only once nothing writes
        it, and says nothing more of it)."""
        try:
            for d in self.used:
                torch.cuda.current_stream(d).synchronize()
        finally:
            self.aborted = self.aborted or abort
            if self.thread.is_alive():
                self.steps.put(None)
                self.thread.join()

    def _record(self) -> list:
        events = []
        for d in self.devices:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(d))
            events.append(ev)
        self.devices = set()
        return events

    def _run(self) -> None:
        pending: "collections.deque[tuple]" = collections.deque()
        closing = False
        while pending or not closing:
            if not pending:
                item = self.steps.get()
                if item is None:
                    break
                pending.append(item)
            while True:  # what else queued meanwhile: the trainer enqueues faster than copies land
                try:
                    item = self.steps.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    closing = True
                else:
                    pending.append(item)
            if self.error is not None or self.aborted:
                pending.clear()  # drain: the push stops and gives its version up
                continue
            try:
                end, events = pending.popleft()
                for ev in events:
                    ev.synchronize()
                # Steps whose copies are done as well go in the same post, of the furthest. Only
                # done ones: waiting for every queued step first would say nothing until the push
                # is over, and the update would no longer follow it.
                while pending and all(ev.query() for ev in pending[0][1]):
                    end = pending.popleft()[0]
                self.post(end)
            except BaseException as e:  # handed to the trainer's thread, raised there
                self.error = e


def _verify(verify: Optional[bool]) -> dict:
    return {} if verify is None else {"verify": verify}
