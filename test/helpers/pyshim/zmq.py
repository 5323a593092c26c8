"""A stand-in for the few pyzmq calls the reference worker loop makes (Context, a REP socket,
connect, recv_pyobj, recv, send, send_string, close), over ce_worker's ctypes libzmq transport.

Only for the GPU test on hosts without pyzmq: ce_worker.transport finds libzmq through CE_LIBZMQ.
"""

import pickle

from ce_worker import transport

REP = "rep"
__version__ = "stand-in over ce_worker.transport (" + transport.probe("ctypes") + ")"


class _Socket:
    def __init__(self, kind):
        self._kind = kind
        self._sock = None

    def connect(self, endpoint):
        self._sock = transport.open_socket(endpoint, kind=self._kind, backend="ctypes")

    def recv(self):
        frames = self._sock.recv_multipart(timeout_s=None)
        return frames[0]

    def recv_pyobj(self):
        return pickle.loads(self.recv())

    def send(self, data):
        self._sock.send_multipart([bytes(data)])

    def send_string(self, text):
        self.send(text.encode("utf-8"))

    def close(self, linger=None):
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class Context:
    def socket(self, kind):
        return _Socket(kind)

    def term(self):
        pass
