"""The frames of ce's worker protocol, parsed and checked (the README's "The worker protocol";
src/wire/protocol.ts is the other end).

Pure: bytes in, typed requests out, or a ProtocolError that says what is wrong. No sockets,
no torch. The session's states are explicit (idle -> open -> released -> finished) so that a
frame arriving in the wrong state gets a clear error instead of being guessed at.

The protocol's one definition is src/wire/worker-protocol.json; TRANSITIONS below is its table,
kept here because the package is installed without the repository, and tests/test_protocol.py
checks that the two are equal and runs every frame case of the file through parse().

Protocol 2 adds the kept mapping (the file's comment has the rules): open may name its buffer with
"buffer_id", release may say "keep", and a worker of protocol 2 accepts opens of protocol 1 and 2.
It also adds verify by digest (open's "verify": true; finish replies with "digests"), the reply
to open saying what the engine holds ("checkpoint" and "version" of the last finished update), and
delta updates: open's "delta_from", load's patch form (PatchMeta), the open reply's "delta": true.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple, Union

PROTOCOL_VERSION = 2  # what this worker speaks, and says in its reply to open
OLDEST_PROTOCOL = 1  # the oldest open it accepts: ce writes 1, since everything protocol 2 adds is optional
IPC_HANDLE_BYTES = 64  # sizeof(CUipcMemHandle)
BACKENDS = ("cuda", "cpu")


class ProtocolError(ValueError):
    """A frame that does not parse, lacks a field, or does not fit the session's state."""


@dataclass(frozen=True)
class TensorMeta:
    name: str
    dtype: str  # safetensors dtype name: BF16, F8_E4M3, ...
    shape: Tuple[int, ...]
    offset: int  # bytes from the start of the buffer, not of the slot
    nbytes: int


@dataclass(frozen=True)
class PatchMeta:
    """A delta update's sparse patch of a tensor: `count` little-endian int32 element indices into
    the flattened tensor at positions_offset, and `count` elements of its dtype (the new values) at
    values_offset; offsets from the start of the buffer."""
    name: str
    dtype: str
    shape: Tuple[int, ...]
    positions_offset: int
    values_offset: int
    count: int


@dataclass(frozen=True)
class Open:
    checkpoint: str
    version: int
    device_uuid: str
    backend: str
    buffer_bytes: int
    slots: int
    slot_bytes: int
    path: str
    handle: Optional[bytes]  # the 64-byte CUDA IPC handle (backend "cuda" only)
    files: Tuple[str, ...] = ()  # optional extras: the checkpoint's files, bucket and tensor counts
    buckets: Optional[int] = None
    tensors: Optional[int] = None
    protocol: int = OLDEST_PROTOCOL
    buffer_id: Optional[str] = None  # names this allocation of the buffer: a worker may keep its mapping
    verify: bool = False  # finish must reply with the digest of every tensor loaded since this open
    delta_from: Optional[int] = None  # a delta against this version: patches may come, digests cover every tensor held
    op = "open"


@dataclass(frozen=True)
class Load:
    bucket: int
    slot: int
    tensors: Tuple[Union[TensorMeta, PatchMeta], ...]
    op = "load"


@dataclass(frozen=True)
class Release:
    keep: bool = False  # ce keeps the buffer: a mapping of an open with buffer_id stays for the next open
    op = "release"


@dataclass(frozen=True)
class Finish:
    op = "finish"


@dataclass(frozen=True)
class Abort:
    reason: str
    op = "abort"


Request = Union[Open, Load, Release, Finish, Abort]


class State(enum.Enum):
    IDLE = "idle"
    OPEN = "open"
    RELEASED = "released"
    FINISHED = "finished"


# state -> {op: the state it leads to once it succeeded}; worker-protocol.json's "transitions".
# abort fits every state: it drops the mapping and the worker is ready for the next open.
TRANSITIONS = {
    "idle": {"open": "open", "abort": "idle"},
    "open": {"load": "open", "release": "released", "abort": "idle"},
    "released": {"finish": "finished", "abort": "idle"},
    "finished": {"open": "open", "abort": "idle"},
}


class Session:
    """The worker's protocol state across sessions. A failed op leaves the state as it was."""

    def __init__(self) -> None:
        self.state = State.IDLE

    def check(self, request: Request) -> State:
        """The state `request` leads to; ProtocolError if it does not fit the current one."""
        allowed = TRANSITIONS[self.state.value]
        nxt = allowed.get(request.op)
        if nxt is None:
            raise ProtocolError(f"op {request.op} does not fit state {self.state.value} "
                                f"(expected {' or '.join(sorted(allowed))})")
        return State(nxt)

    def advance(self, request: Request) -> None:
        self.state = self.check(request)


def parse(frames: Sequence[bytes]) -> Request:
    """One request from its frames: a JSON object with "op", plus the IPC handle for a CUDA open."""
    if not frames:
        raise ProtocolError("empty message")
    try:
        obj = json.loads(bytes(frames[0]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ProtocolError(f"first frame is not UTF-8 JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"first frame is JSON {type(obj).__name__}, expected an object")
    op = obj.get("op")
    parser = _PARSERS.get(op) if isinstance(op, str) else None
    if parser is None:
        raise ProtocolError(f"unknown op {op!r} (expected one of {', '.join(_PARSERS)})")
    extra = list(frames[1:])
    if op != "open" and extra:
        raise ProtocolError(f"op {op} takes 1 frame, got {len(frames)}")
    return parser(obj, extra)


def _parse_open(obj: dict, extra: list) -> Open:
    protocol = _int(obj, "protocol")
    if not OLDEST_PROTOCOL <= protocol <= PROTOCOL_VERSION:
        raise ProtocolError(f"protocol {protocol} is not supported "
                            f"(this worker speaks {OLDEST_PROTOCOL} to {PROTOCOL_VERSION})")
    backend = _str(obj, "backend")
    if backend not in BACKENDS:
        raise ProtocolError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    handle = None
    if backend == "cuda":
        if len(extra) != 1:
            raise ProtocolError(f"open on cuda takes 2 frames (JSON + IPC handle), got {1 + len(extra)}")
        handle = bytes(extra[0])
        if len(handle) != IPC_HANDLE_BYTES:
            raise ProtocolError(f"IPC handle frame has {len(handle)} bytes, expected {IPC_HANDLE_BYTES}")
    elif extra:
        raise ProtocolError(f"open on cpu takes 1 frame, got {1 + len(extra)}")
    files = obj.get("files")
    if files is None:
        files = []
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise ProtocolError("field files must be a list of paths")
    buffer_id = obj.get("buffer_id")
    if buffer_id is not None and (not isinstance(buffer_id, str) or not buffer_id):
        raise ProtocolError(f"field buffer_id must be a non-empty string, got {json.dumps(buffer_id)}")
    path = obj.get("path", "")
    if not isinstance(path, str) or (backend == "cpu" and not path):
        raise ProtocolError("field path must name the shared-memory file on the cpu backend")
    return Open(
        checkpoint=_str(obj, "checkpoint"),
        version=_int(obj, "version"),
        device_uuid=_str(obj, "device_uuid"),
        backend=backend,
        buffer_bytes=_int(obj, "buffer_bytes", minimum=1),
        slots=_int(obj, "slots", minimum=1),
        slot_bytes=_int(obj, "slot_bytes", minimum=1),
        path=path,
        handle=handle,
        files=tuple(files),
        buckets=_opt_int(obj, "buckets"),
        tensors=_opt_int(obj, "tensors"),
        protocol=protocol,
        buffer_id=buffer_id,
        verify=_bool(obj, "verify"),
        delta_from=_opt_int(obj, "delta_from"),
    )


def _parse_load(obj: dict, extra: list) -> Load:
    raw = obj.get("tensors")
    if not isinstance(raw, list):
        raise ProtocolError("field tensors must be a list")
    metas = []
    for i, t in enumerate(raw):
        if not isinstance(t, dict):
            raise ProtocolError(f"tensors[{i}] must be an object")
        name = t.get("name")
        where = f"tensor {name}" if isinstance(name, str) else f"tensors[{i}]"
        try:
            shape = t.get("shape")
            if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
                raise ProtocolError("field shape must be a list of non-negative integers")
            if "count" in t:
                patch = PatchMeta(
                    name=_str(t, "name"), dtype=_str(t, "dtype"), shape=tuple(shape),
                    positions_offset=_int(t, "positions_offset"), values_offset=_int(t, "values_offset"),
                    count=_int(t, "count"),
                )
                elements = 1
                for d in shape:
                    elements *= d
                if patch.count > elements:
                    raise ProtocolError(f"count {patch.count} exceeds the tensor's {elements} elements")
                metas.append(patch)
                continue
            metas.append(TensorMeta(
                name=_str(t, "name"), dtype=_str(t, "dtype"), shape=tuple(shape),
                offset=_int(t, "offset"), nbytes=_int(t, "nbytes"),
            ))
        except ProtocolError as e:
            raise ProtocolError(f"{e} ({where})") from None
    return Load(bucket=_int(obj, "bucket"), slot=_int(obj, "slot"), tensors=tuple(metas))


def _parse_release(obj: dict) -> Release:
    return Release(keep=_bool(obj, "keep"))


def _parse_abort(obj: dict, extra: list) -> Abort:
    reason = obj.get("reason", "")
    return Abort(reason=reason if isinstance(reason, str) else json.dumps(reason))


_PARSERS = {
    "open": _parse_open,
    "load": _parse_load,
    "release": lambda obj, extra: _parse_release(obj),
    "finish": lambda obj, extra: Finish(),
    "abort": _parse_abort,
}


def ok(**fields: Any) -> bytes:
    return json.dumps({"ok": True, **fields}).encode("utf-8")


def error(message: str) -> bytes:
    return json.dumps({"ok": False, "error": message}).encode("utf-8")


def _is_int(v: Any) -> bool:
    return type(v) is int  # JSON true/false are bools, which Python counts as ints


def _int(obj: dict, key: str, minimum: int = 0) -> int:
    v = obj.get(key)
    if not _is_int(v):
        raise ProtocolError(f"field {key} must be an integer, got {json.dumps(v)}")
    if v < minimum:
        raise ProtocolError(f"field {key} must be >= {minimum}, got {v}")
    return v


def _opt_int(obj: dict, key: str) -> Optional[int]:
    return None if obj.get(key) is None else _int(obj, key)


def _bool(obj: dict, key: str) -> bool:
    """An optional flag: absent reads as false."""
    v = obj.get(key, False)
    if not isinstance(v, bool):
        raise ProtocolError(f"field {key} must be a boolean, got {json.dumps(v)}")
    return v


def _str(obj: dict, key: str) -> str:
    v = obj.get(key)
    if not isinstance(v, str):
        raise ProtocolError(f"field {key} must be a string, got {json.dumps(v)}")
    return v
