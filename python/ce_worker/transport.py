"""ZeroMQ sockets for the worker: pyzmq when it is importable, else libzmq.so.5 through ctypes.

Engines do not always ship pyzmq, but libzmq5 is one system package away, so the ctypes path
keeps the worker free of compiled dependencies of its own. Both paths give the same small
socket: multipart send/receive, a receive deadline (zmq_poll), and linger 0 on close by default,
so a worker never hangs on exit delivering a reply nobody will read (the last reply of a
session is given a bounded linger instead; see receiver.FINAL_LINGER_S).

The worker side is a REP socket that connects to the endpoint ce bound (`connect_rep`);
`open_socket` also makes ce's side (a bound REQ) for tests.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import time
from ctypes import POINTER, Structure, c_char_p, c_int, c_long, c_short, c_size_t, c_uint64, c_void_p
from typing import List, Optional, Sequence

BACKENDS = ("pyzmq", "ctypes")


class TransportError(RuntimeError):
    """libzmq failed, or could not be found."""


def connect_rep(endpoint: str, *, backend: Optional[str] = None) -> "Socket":
    """The worker's socket: REP, connected to ce's endpoint (ce binds)."""
    return open_socket(endpoint, kind="rep", bind=False, backend=backend)


def open_socket(endpoint: str, *, kind: str = "rep", bind: bool = False,
                backend: Optional[str] = None) -> "Socket":
    """A REQ or REP socket on `endpoint`; backend None picks pyzmq when importable."""
    if kind not in _SOCKET_TYPES:
        raise ValueError(f"socket kind {kind!r} is not one of {', '.join(_SOCKET_TYPES)}")
    if backend is None:
        backend = "pyzmq" if _pyzmq() is not None else "ctypes"
    if backend == "pyzmq":
        if _pyzmq() is None:
            raise TransportError("pyzmq is not importable")
        return _PyzmqSocket(endpoint, kind, bind)
    if backend == "ctypes":
        return _CtypesSocket(endpoint, kind, bind)
    raise ValueError(f"transport backend {backend!r} is not one of {', '.join(BACKENDS)}")


def probe(backend: Optional[str] = None) -> str:
    """Which libzmq the worker would use, in words; TransportError if none."""
    if backend in (None, "pyzmq") and _pyzmq() is not None:
        zmq = _pyzmq()
        return f"pyzmq {zmq.__version__} (libzmq {zmq.zmq_version()})"
    if backend == "pyzmq":
        raise TransportError("pyzmq is not importable")
    lib = libzmq()
    return f"ctypes libzmq {lib.version} at {lib.path}"


class Socket:
    """What both backends provide."""

    backend: str
    endpoint: str

    def recv_multipart(self, timeout_s: Optional[float] = None) -> Optional[List[bytes]]:
        """The next message's frames, or None when `timeout_s` passed first (None: wait)."""
        raise NotImplementedError

    def send_multipart(self, frames: Sequence[bytes]) -> None:
        raise NotImplementedError

    def close(self, linger_s: float = 0.0) -> None:
        """Idempotent. Unsent messages get `linger_s` to leave (default 0: dropped at once)."""
        raise NotImplementedError

    def __enter__(self) -> "Socket":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# libzmq's constants (zmq.h; their values never change).
ZMQ_REQ = 3
ZMQ_REP = 4
ZMQ_LINGER = 17
ZMQ_DONTWAIT = 1
ZMQ_SNDMORE = 2
ZMQ_POLLIN = 1
_SOCKET_TYPES = {"req": ZMQ_REQ, "rep": ZMQ_REP}


def _timeout_ms(timeout_s: Optional[float]) -> int:
    return -1 if timeout_s is None else max(0, int(timeout_s * 1000))


# ---------------------------------------------------------------------------------------- pyzmq

_pyzmq_module = False  # False: not looked for yet; None: not importable


def _pyzmq():
    global _pyzmq_module
    if _pyzmq_module is False:
        try:
            import zmq
            _pyzmq_module = zmq
        except ImportError:
            _pyzmq_module = None
    return _pyzmq_module


class _PyzmqSocket(Socket):
    backend = "pyzmq"

    def __init__(self, endpoint: str, kind: str, bind: bool) -> None:
        zmq = _pyzmq()
        self.endpoint = endpoint
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(_SOCKET_TYPES[kind])
        try:
            self._sock.setsockopt(zmq.LINGER, 0)
            (self._sock.bind if bind else self._sock.connect)(endpoint)
        except zmq.ZMQError as e:
            self.close()
            raise TransportError(f"zmq_{'bind' if bind else 'connect'}({endpoint}): {e}") from None

    def recv_multipart(self, timeout_s: Optional[float] = None) -> Optional[List[bytes]]:
        zmq = _pyzmq()
        if not self._sock.poll(_timeout_ms(timeout_s), zmq.POLLIN):
            return None
        return self._sock.recv_multipart()

    def send_multipart(self, frames: Sequence[bytes]) -> None:
        self._sock.send_multipart(list(frames))

    def close(self, linger_s: float = 0.0) -> None:
        if self._ctx is not None:
            self._sock.close(linger=_timeout_ms(linger_s))
            self._ctx.term()
            self._ctx = None


# --------------------------------------------------------------------------------------- ctypes


class zmq_msg_t(Structure):
    # 64 opaque bytes, aligned like the pointers libzmq keeps inside (zmq.h)
    _fields_ = [("_", c_uint64 * 8)]


class zmq_pollitem_t(Structure):
    _fields_ = [("socket", c_void_p), ("fd", c_int), ("events", c_short), ("revents", c_short)]


# One entry per libzmq function the worker calls, each under its C declaration.
_FUNCTIONS = [
    # void zmq_version(int *major, int *minor, int *patch);
    ("zmq_version", None, [POINTER(c_int), POINTER(c_int), POINTER(c_int)]),
    # const char *zmq_strerror(int errnum);
    ("zmq_strerror", c_char_p, [c_int]),
    # void *zmq_ctx_new(void);
    ("zmq_ctx_new", c_void_p, []),
    # int zmq_ctx_term(void *context);  blocks until the context's sockets are closed and lingered
    ("zmq_ctx_term", c_int, [c_void_p]),
    # void *zmq_socket(void *context, int type);
    ("zmq_socket", c_void_p, [c_void_p, c_int]),
    # int zmq_close(void *s);
    ("zmq_close", c_int, [c_void_p]),
    # int zmq_setsockopt(void *s, int option, const void *optval, size_t optvallen);
    ("zmq_setsockopt", c_int, [c_void_p, c_int, c_void_p, c_size_t]),
    # int zmq_bind(void *s, const char *addr);
    ("zmq_bind", c_int, [c_void_p, c_char_p]),
    # int zmq_connect(void *s, const char *addr);
    ("zmq_connect", c_int, [c_void_p, c_char_p]),
    # int zmq_send(void *s, const void *buf, size_t len, int flags);  copies buf before returning
    ("zmq_send", c_int, [c_void_p, c_void_p, c_size_t, c_int]),
    # int zmq_msg_init(zmq_msg_t *msg);
    ("zmq_msg_init", c_int, [POINTER(zmq_msg_t)]),
    # int zmq_msg_recv(zmq_msg_t *msg, void *s, int flags);
    ("zmq_msg_recv", c_int, [POINTER(zmq_msg_t), c_void_p, c_int]),
    # void *zmq_msg_data(zmq_msg_t *msg);
    ("zmq_msg_data", c_void_p, [POINTER(zmq_msg_t)]),
    # size_t zmq_msg_size(const zmq_msg_t *msg);
    ("zmq_msg_size", c_size_t, [POINTER(zmq_msg_t)]),
    # int zmq_msg_more(const zmq_msg_t *msg);
    ("zmq_msg_more", c_int, [POINTER(zmq_msg_t)]),
    # int zmq_msg_close(zmq_msg_t *msg);
    ("zmq_msg_close", c_int, [POINTER(zmq_msg_t)]),
    # int zmq_poll(zmq_pollitem_t *items, int nitems, long timeout);  timeout in ms, -1 waits
    ("zmq_poll", c_int, [POINTER(zmq_pollitem_t), c_int, c_long]),
]


class LibZmq:
    """libzmq, loaded once, its functions bound from _FUNCTIONS."""

    def __init__(self, path: str) -> None:
        self.path = path
        # ctypes drops the GIL during calls (zmq_poll may block). use_errno: ctypes saves errno
        # right after each call; read later, errno may already belong to whatever Python did
        # in between (a signal handler, say), as zmq_errno() would.
        self.lib = ctypes.CDLL(path, use_errno=True)
        for name, restype, argtypes in _FUNCTIONS:
            fn = getattr(self.lib, name)  # AttributeError names the missing symbol
            fn.restype, fn.argtypes = restype, argtypes
            setattr(self, name, fn)
        major, minor, patch = c_int(), c_int(), c_int()
        self.zmq_version(ctypes.byref(major), ctypes.byref(minor), ctypes.byref(patch))
        self.version = f"{major.value}.{minor.value}.{patch.value}"

    def check(self, rc: int, what: str) -> int:
        if rc == -1:
            code = ctypes.get_errno()
            raise TransportError(f"{what}: {self.zmq_strerror(code).decode()} (errno {code})")
        return rc


_libzmq: Optional[LibZmq] = None


def libzmq() -> LibZmq:
    """Load libzmq: $CE_LIBZMQ alone when set, else find_library('zmq'), else libzmq.so.5."""
    global _libzmq
    if _libzmq is None:
        override = os.environ.get("CE_LIBZMQ")
        if override:
            candidates = [override]
        else:
            candidates = [c for c in (ctypes.util.find_library("zmq"), "libzmq.so.5") if c]
        failures = []
        for path in dict.fromkeys(candidates):
            try:
                _libzmq = LibZmq(path)
                break
            except (OSError, AttributeError) as e:
                failures.append(f"{path}: {e}")
        else:
            raise TransportError(
                "no usable libzmq (" + "; ".join(failures) + "); install pyzmq or libzmq5, "
                "or set CE_LIBZMQ to the path of a libzmq.so.5")
    return _libzmq


class _CtypesSocket(Socket):
    backend = "ctypes"

    def __init__(self, endpoint: str, kind: str, bind: bool) -> None:
        self._z = z = libzmq()
        self.endpoint = endpoint
        self._ctx = z.zmq_ctx_new()
        if not self._ctx:
            z.check(-1, "zmq_ctx_new")
        self._sock = z.zmq_socket(self._ctx, _SOCKET_TYPES[kind])
        try:
            if not self._sock:
                z.check(-1, "zmq_socket")
            linger = c_int(0)
            z.check(z.zmq_setsockopt(self._sock, ZMQ_LINGER, ctypes.byref(linger), ctypes.sizeof(linger)),
                    "zmq_setsockopt(ZMQ_LINGER)")
            verb = "zmq_bind" if bind else "zmq_connect"
            z.check(getattr(z, verb)(self._sock, endpoint.encode()), f"{verb}({endpoint})")
        except BaseException:
            self.close()
            raise

    def recv_multipart(self, timeout_s: Optional[float] = None) -> Optional[List[bytes]]:
        z = self._z
        item = zmq_pollitem_t(self._sock, 0, ZMQ_POLLIN, 0)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            rc = z.zmq_poll(ctypes.byref(item), 1, _timeout_ms(left))
            if rc == -1 and ctypes.get_errno() == errno.EINTR:
                rc = 0  # a signal: Python runs its handler between calls; poll again
            z.check(rc, "zmq_poll")
            if rc > 0:
                frames = self._recv_frames()
                if frames is not None:
                    return frames
            if deadline is not None and time.monotonic() >= deadline:
                return None

    def _recv_frames(self) -> Optional[List[bytes]]:
        z = self._z
        frames: List[bytes] = []
        msg = zmq_msg_t()
        z.zmq_msg_init(ctypes.byref(msg))
        try:
            while True:
                # The first part without blocking (poll said ready); the rest of a message
                # always arrives with it, so those reads do not wait either.
                rc = z.zmq_msg_recv(ctypes.byref(msg), self._sock, ZMQ_DONTWAIT)
                if rc == -1 and ctypes.get_errno() in (errno.EAGAIN, errno.EINTR):
                    if not frames:
                        return None
                    continue
                z.check(rc, "zmq_msg_recv")
                size = z.zmq_msg_size(ctypes.byref(msg))
                data = z.zmq_msg_data(ctypes.byref(msg))
                frames.append(ctypes.string_at(data, size) if size else b"")
                if not z.zmq_msg_more(ctypes.byref(msg)):
                    return frames
        finally:
            z.zmq_msg_close(ctypes.byref(msg))

    def send_multipart(self, frames: Sequence[bytes]) -> None:
        z = self._z
        last = len(frames) - 1
        for i, frame in enumerate(frames):
            frame = bytes(frame)
            flags = ZMQ_SNDMORE if i < last else 0
            while True:
                rc = z.zmq_send(self._sock, frame, len(frame), flags)
                if rc == -1 and ctypes.get_errno() == errno.EINTR:
                    continue
                z.check(rc, "zmq_send")
                break

    def close(self, linger_s: float = 0.0) -> None:
        if getattr(self, "_sock", None):
            linger = c_int(_timeout_ms(linger_s))
            self._z.zmq_setsockopt(self._sock, ZMQ_LINGER, ctypes.byref(linger), ctypes.sizeof(linger))
            self._z.zmq_close(self._sock)
            self._sock = None
        if getattr(self, "_ctx", None):
            while self._z.zmq_ctx_term(self._ctx) == -1 and ctypes.get_errno() == errno.EINTR:
                pass
            self._ctx = None
