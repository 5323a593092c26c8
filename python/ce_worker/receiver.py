"""Serve update sessions for any torch engine: open -> load* -> release -> finish, or abort.

The engine gives a `load_fn(weights)` that copies a bucket out of ce's buffer into its own
parameters; `weights` is a list of (name, tensor) whose tensors are zero-copy views into the
buffer with dtype and shape applied. The reply to a load hands the slot back to ce for refilling,
so it is sent only after load_fn returned and the current stream has been synchronized.

A session ends with finish or with abort; either way the worker is idle again (abort drops the
mapping) and the same Receiver on the same socket takes the next open.

Protocol 2, the warm path: the mapping lives in a MappingCache, which keeps it across sessions while
ce keeps the buffer (release with keep), so the next open naming the same buffer_id maps nothing.
src/wire/worker-protocol.json says when it is kept and when dropped. update_weights_from_ipc, which
serves one session per call (vLLM's path), keeps it in a cache of the process, one per device,
closed at exit.

Protocol 2 also has the reply to open say what the engine holds (held.Held: the last update that
finished), and an open with "verify": true get the digests of what it loaded in the reply to finish
(held.Digests). update_weights_from_ipc keeps its Held per device in the process too.

Delta updates: a Receiver with `params` (the engine's tensors under the checkpoint's names) answers
an open with "delta_from" with "delta": true and applies patches into them (loads.apply_patches); after a delta, finish's
digests cover every tensor held, the unchanged ones too. Without params (vLLM, whose loader fuses
and transforms weights) it does not announce delta, and ce sends it every tensor whole.
"""

from __future__ import annotations

import atexit
import logging
import time
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch

from . import protocol
from .cuda_ipc import Mapping as BufferMapping
from .cuda_ipc import map_buffer
from .held import Digests, Held
from .loads import ModuleLoader, Weights, apply_patches, format_error, tensor_views
from .protocol import Abort, Finish, Load, Open, PatchMeta, ProtocolError, Release, TensorMeta
from .transport import Socket, connect_rep

log = logging.getLogger("ce_worker")

LoadFn = Callable[[Weights], None]
PostHook = Callable[[Open], Optional[dict]]  # gets the session's open frame; may add reply fields
StartHook = Callable[[Open], None]  # at open, once the buffer is mapped; raising fails the open
AbortHook = Callable[[], None]  # after an abort of an opened session (the engine's own undo)

POLL_STEP_S = 0.2  # how often a waiting worker checks its stop condition
FINAL_LINGER_S = 2.0  # time the last reply gets to leave before the socket closes


class MappingCache:
    """At most one mapping of ce's buffer, which may outlive a session (protocol 2's kept mapping).

    An open whose buffer_id, backend, buffer_bytes, path and handle all equal those the mapping was
    made from is served from it; any other open replaces it. release(keep=False), drop() (abort,
    timeout, stop) and the process's exit close it.
    """

    def __init__(self) -> None:
        self.mapping: Optional[BufferMapping] = None
        self.key: Optional[tuple] = None  # None: the open named no buffer_id, so the mapping is not kept
        self.buffer_id: Optional[str] = None

    def open(self, req: Open, device: torch.device) -> Tuple[BufferMapping, bool]:
        """The mapping for this open and whether it was kept (True: nothing was mapped now)."""
        key = None if req.buffer_id is None else (req.buffer_id, req.backend, req.buffer_bytes, req.path, req.handle)
        if self.mapping is not None and key is not None and key == self.key:
            return self.mapping, True
        self.drop()
        mapping = map_buffer(req.backend, buffer_bytes=req.buffer_bytes, handle=req.handle,
                             path=req.path, device=device)
        self.mapping, self.key, self.buffer_id = mapping, key, req.buffer_id
        return mapping, False

    def release(self, keep: bool) -> None:
        """End of an update's use: the mapping stays when ce keeps the buffer and it may be kept."""
        if keep and self.key is not None:
            return
        self.close()

    def close(self) -> None:
        """Unmap; raises if that fails (a view is still alive), and the mapping stays for drop()."""
        mapping = self.mapping
        if mapping is not None:
            mapping.close()
        self.mapping = self.key = self.buffer_id = None

    def drop(self) -> None:
        """Unmap if mapped. Never raises."""
        try:
            self.close()
        except Exception:
            log.exception("could not unmap ce's buffer; it stays mapped")
            self.mapping = self.key = self.buffer_id = None


# update_weights_from_ipc serves one session per call, with a new Receiver each time: the mapping
# kept for the next call and what the engine holds live here, one of each per device (its UUID);
# the mappings are closed when the process exits.
_PROCESS_CACHES: Dict[str, MappingCache] = {}
_PROCESS_HELD: Dict[str, Held] = {}


def process_cache(device_key: str) -> MappingCache:
    """This process's MappingCache for one device."""
    return _PROCESS_CACHES.setdefault(device_key, MappingCache())


def process_held(device_key: str) -> Held:
    """What this process's engine holds on one device."""
    return _PROCESS_HELD.setdefault(device_key, Held())


@atexit.register
def _drop_process_caches() -> None:
    for cache in _PROCESS_CACHES.values():
        cache.drop()


class SessionTimeout(TimeoutError):
    """ce sent no request within the deadline; the mapping has been dropped."""


class Stopped(Exception):
    """The stop condition became true while waiting for ce; the mapping has been dropped."""


def update_weights_from_ipc(endpoint: str, load_fn: LoadFn, post_hook: Optional[PostHook] = None, *,
                            device: Optional[torch.device] = None, op_timeout_s: float = 120.0,
                            expect_uuid: Optional[str] = None, transport: Optional[str] = None,
                            start_hook: Optional[StartHook] = None,
                            abort_hook: Optional[AbortHook] = None,
                            cache: Optional[MappingCache] = None,
                            params: Optional[Mapping[str, torch.Tensor]] = None) -> dict:
    """Connect a REP socket to ce's `endpoint`, serve one session, return its summary.

    load_fn(weights) is called once per bucket; post_hook(open_frame) once at finish (its dict,
    if any, joins the finish reply); start_hook(open_frame) at open and abort_hook() after an
    abort, when given. An abort from ce returns a summary with state "aborted"; no request for
    op_timeout_s raises SessionTimeout. Either way the buffer is unmapped and the engine keeps
    serving on whatever weights it has. A finished session's mapping stays in `cache` (by
    default the process's cache for this device) when ce keeps the buffer, for the next call.
    `params`: see Receiver.
    """
    key = expect_uuid or str(device if device is not None else _default_device())
    receiver = Receiver(load_fn, post_hook, device=device, expect_uuid=expect_uuid,
                        start_hook=start_hook, abort_hook=abort_hook,
                        cache=cache if cache is not None else process_cache(key),
                        params=params, held=process_held(key))
    sock = connect_rep(endpoint, backend=transport)
    try:
        return serve_session(sock, receiver, op_timeout_s=op_timeout_s, wait_s=op_timeout_s)
    finally:
        sock.close(linger_s=FINAL_LINGER_S)


def serve_session(sock: Socket, receiver: "Receiver", *, op_timeout_s: float = 120.0,
                  wait_s: Optional[float] = None, stop: Optional[Callable[[], bool]] = None) -> dict:
    """Answer requests on `sock` until a session finishes or is aborted; returns its summary.

    Call it again with the same receiver and socket to serve the next session. wait_s bounds
    the wait for the first request (None: no bound); op_timeout_s every later one. stop() is
    checked while waiting; when it turns true, Stopped is raised. On a timeout or a stop the
    mapping is dropped and the receiver is idle again.
    """
    first = True
    receiver.ended = None
    try:
        while receiver.ended is None:
            frames = _recv(sock, wait_s if first else op_timeout_s, stop)
            if frames is None:
                limit = wait_s if first else op_timeout_s
                raise SessionTimeout(f"no request from ce within {limit:g} s "
                                     f"(session {receiver.session.state.value}, endpoint {sock.endpoint})")
            first = False
            sock.send_multipart([receiver.handle(frames)])
    except BaseException:
        receiver.reset()
        raise
    return receiver.summary()


def _recv(sock: Socket, timeout_s: Optional[float], stop: Optional[Callable[[], bool]]):
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        step = left if stop is None else min(POLL_STEP_S, POLL_STEP_S if left is None else left)
        frames = sock.recv_multipart(step)
        if frames is not None:
            return frames
        if stop is not None and stop():
            raise Stopped("stopped while waiting for ce")
        if deadline is not None and time.monotonic() >= deadline:
            return None


class Receiver:
    """The worker's side of one session: one method per op, replies as bytes.

    `params`, where the engine holds the checkpoint's tensors under their own names (a plain
    module; a ModuleLoader's params are taken when none are given), is what verify digests after
    the copies; otherwise verify digests the slot views each load got. `held` is what the engine
    holds, shared by the Receivers of one engine (by default this Receiver's own).
    """

    def __init__(self, load_fn: LoadFn, post_hook: Optional[PostHook] = None, *,
                 device: Optional[torch.device] = None, expect_uuid: Optional[str] = None,
                 start_hook: Optional[StartHook] = None, abort_hook: Optional[AbortHook] = None,
                 cache: Optional[MappingCache] = None, params: Optional[Mapping[str, torch.Tensor]] = None,
                 held: Optional[Held] = None) -> None:
        self.load_fn = load_fn
        if params is None and isinstance(load_fn, ModuleLoader):
            params = load_fn.params
        self.params = params
        self.held = held if held is not None else Held()
        self.digests: Optional[Digests] = None  # the current session's, when its open asked to verify
        self.post_hook = post_hook
        self.start_hook = start_hook
        self.abort_hook = abort_hook
        self.device = torch.device(device) if device is not None else _default_device()
        self.expect_uuid = expect_uuid
        self.session = protocol.Session()
        self.opened: Optional[Open] = None
        self.cache = cache if cache is not None else MappingCache()  # owns the mapping, kept or not
        self.mapping: Optional[BufferMapping] = None  # the current session's (the cache's) mapping
        self.reason = ""
        self.ended: Optional[str] = None  # how the current session ended: "finished" or "aborted"
        self.undo_error = ""  # abort_hook's failure, if it failed
        self.buckets = self.tensors = self.bytes = 0
        self.started = time.monotonic()
        self.loaded: set = set()  # names loaded this session
        self.base_names: Optional[frozenset] = None  # a delta's base: the tensors held at open, when it matches

    def handle(self, frames: Sequence[bytes]) -> bytes:
        """The reply to one request. Errors become {"ok":false}; a failed op keeps the state."""
        op = "?"
        try:
            request = protocol.parse(frames)
            op = request.op
            self.session.check(request)
            fields = getattr(self, f"_{op}")(request) or {}
            self.session.advance(request)
            return protocol.ok(**fields)
        except ProtocolError as e:
            log.warning("bad request (op %s): %s", op, e)
            return protocol.error(f"ProtocolError: {e}")
        except Exception as e:
            log.exception("op %s failed", op)
            return protocol.error(format_error(e))

    def _open(self, req: Open) -> dict:
        if self.expect_uuid is not None and req.device_uuid != self.expect_uuid:
            raise ValueError(f"open for device {req.device_uuid} reached the worker on {self.expect_uuid}")
        mapping, kept = self.cache.open(req, self.device)
        if self.start_hook is not None:
            try:
                self.start_hook(req)
            except BaseException:
                self.cache.drop()  # a failed open keeps nothing
                raise
        self.mapping = mapping
        self.opened = req
        self.digests = Digests(self.params) if req.verify else None
        # Patches apply only onto the version they were computed from; ce checks the reply, this
        # refuses them at load as well should one come anyway.
        delta_ok = req.delta_from is not None and self.params is not None and self.held.holds(req.checkpoint, req.delta_from)
        self.base_names = self.held.names if delta_ok else None
        self.loaded = set()
        self.reason = self.undo_error = ""
        self.buckets = self.tensors = self.bytes = 0
        self.started = time.monotonic()
        log.info("open %s@%d: %s buffer of %d bytes, %d slots%s%s", req.checkpoint, req.version,
                 req.backend, req.buffer_bytes, req.slots, f", kept mapping of {req.buffer_id}" if kept else "",
                 ", verify" if req.verify else "")
        # Protocol 2's fields only where they say something, and then with "protocol": an open
        # without them is answered as protocol 1 answers it.
        fields = self.held.fields()
        if req.buffer_id is not None:
            fields.update(buffer_id=req.buffer_id, kept=kept)
        if req.verify:
            fields["verify"] = True
        if req.delta_from is not None and self.params is not None:
            fields["delta"] = True
        return {"protocol": protocol.PROTOCOL_VERSION, **fields} if fields else {}

    def _load(self, req: Load) -> None:
        assert self.opened is not None and self.mapping is not None  # guaranteed by the state
        if req.slot >= self.opened.slots:
            raise ValueError(f"slot {req.slot} is out of range (the buffer has {self.opened.slots} slots)")
        dense = [t for t in req.tensors if isinstance(t, TensorMeta)]
        patches = [t for t in req.tensors if isinstance(t, PatchMeta)]
        if patches and self.base_names is None:
            raise ValueError(f"a patch of tensor {patches[0].name}, but this update is no delta onto the version "
                             f"this worker holds ({self.held.checkpoint}@{self.held.version})")
        weights = tensor_views(self.mapping.tensor, dense)
        try:
            launched = self.digests.launch(weights) if self.digests is not None else None
            self.held.clear()  # from here on the weights may be partly new until finish
            if weights:
                self.load_fn(weights)
            if patches:
                apply_patches(self.params, self.mapping.tensor, patches)
            if self.digests is not None:
                self.digests.loaded([n for n, _ in weights] + [p.name for p in patches], launched)
            _synchronize(self.device)  # the copies, and the digests launched, are done: the slot is ce's again
        finally:
            weights.clear()  # the views must not outlive the load: release unmaps the buffer
        self.loaded.update(t.name for t in req.tensors)
        self.buckets += 1
        self.tensors += len(req.tensors)
        self.bytes += sum(t.nbytes for t in dense) + sum(4 * p.count for p in patches)
        log.debug("loaded bucket %d (slot %d): %d tensors", req.bucket, req.slot, len(req.tensors))

    def _release(self, req: Release) -> None:
        self.cache.release(req.keep)  # a failed unmap raises and leaves it to abort's drop
        self.mapping = None

    def _finish(self, req: Finish) -> dict:
        # Digests first: post-load processing may change what the engine holds (a params digest
        # is of the tensors as loaded, which is what ce sent). After a delta they cover every tensor held.
        if self.digests is not None and self.base_names is not None:
            self.digests.also(self.base_names)
        digests = self.digests.collect() if self.digests is not None else None
        names = self.loaded | (self.base_names or frozenset())
        self.held.clear()  # the engine's post-load processing changes weights too
        fields = dict(self.post_hook(self.opened) or {}) if self.post_hook is not None else {}
        if digests is not None:
            fields["digests"] = digests
        log.info("finished %s@%d: %d buckets, %d tensors, %d bytes in %.2f s", self.opened.checkpoint,
                 self.opened.version, self.buckets, self.tensors, self.bytes, time.monotonic() - self.started)
        self.held.finished(self.opened.checkpoint, self.opened.version, names)
        self.digests = None
        self.ended = "finished"
        return fields

    def _abort(self, req: Abort) -> None:
        self.reason = req.reason
        log.warning("update aborted by ce: %s", req.reason or "(no reason given)")
        self._undo()
        self.ended = "aborted"

    def reset(self) -> None:
        """Give the current session up (timeout, stop): unmap and be idle for the next open."""
        self._undo()
        self.session.state = protocol.State.IDLE

    def _undo(self) -> None:
        """Unmap, and run the engine's abort_hook if a session was open. Never raises."""
        was_open = self.session.state in (protocol.State.OPEN, protocol.State.RELEASED)
        self.drop()
        if was_open and self.abort_hook is not None:
            try:
                self.abort_hook()
            except Exception as e:
                log.exception("the engine's undo of the aborted session failed")
                self.undo_error = format_error(e)

    def drop(self) -> None:
        """Unmap the buffer, a kept mapping too; used on abort, timeout, stop and exit. Never raises."""
        self.mapping = None
        self.digests = None
        self.cache.drop()

    def summary(self) -> dict:
        """The session's outcome: state "finished" or "aborted" (with ce's reason), and its counts."""
        out = {"state": self.ended, "buckets": self.buckets, "tensors": self.tensors,
               "bytes": self.bytes, "seconds": round(time.monotonic() - self.started, 3)}
        if self.opened is not None:
            out.update(checkpoint=self.opened.checkpoint, version=self.opened.version)
        if self.ended == "aborted":
            out["reason"] = self.reason
        if self.undo_error:
            out["undo_error"] = self.undo_error
        return out


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
