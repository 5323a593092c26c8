"""JSON calls to ce serve's HTTP API over TCP or a Unix socket, with the standard library only.

ce serve replies {"ok": true, ...} or {"ok": false, "error": {"code", "message", "hint"}}; the
latter, and any failure to reach it or to read its reply, raise CeError.
"""

from __future__ import annotations

import http.client
import json
import socket
import urllib.parse
from typing import Any, Optional

from .errors import CeError

DEFAULT_URL = "http://127.0.0.1:8711"  # ce serve's default --host and --port


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over an AF_UNIX stream socket (ce serve --socket PATH)."""

    def __init__(self, path: str, timeout: Optional[float] = None) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class Api:
    """ce serve at `url` (http://HOST:PORT, or unix:PATH as ce serve --json prints it) or at the
    Unix socket `socket`; by default http://127.0.0.1:8711."""

    def __init__(self, url: Optional[str] = None, socket: Optional[str] = None, timeout_s: Optional[float] = 600.0) -> None:
        if url is not None and socket is not None:
            raise ValueError("give ce serve's url or its socket, not both")
        if url is not None and url.startswith("unix:"):
            url, socket = None, url[len("unix:"):]
        self.timeout_s = timeout_s
        self.socket = socket
        if socket is None:
            parsed = urllib.parse.urlsplit(url or DEFAULT_URL)
            if parsed.scheme != "http" or not parsed.hostname:
                raise ValueError(f"ce serve's url {url!r}: expected http://HOST:PORT or unix:PATH")
            self.host, self.port = parsed.hostname, parsed.port or 80
            self.prefix = parsed.path.rstrip("/")
            self.where = f"http://{parsed.netloc}{self.prefix}"
        else:
            self.prefix = ""
            self.where = f"unix:{socket}"

    def _connection(self) -> http.client.HTTPConnection:
        if self.socket is not None:
            return UnixHTTPConnection(self.socket, timeout=self.timeout_s)
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)

    def call(self, method: str, path: str, body: Any = None) -> dict:
        """One request; the reply's JSON object when ok, else CeError with ce's code, message and hint."""
        what = f"{method} {self.where}{path}"
        data = None if body is None else json.dumps(body).encode("utf-8")
        headers = {"content-type": "application/json"} if data is not None else {}
        conn = self._connection()
        try:
            conn.request(method, self.prefix + path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        except (OSError, http.client.HTTPException) as e:
            raise CeError("E_CLIENT_CONNECT", f"{what}: {type(e).__name__}: {e}",
                          hint="is ce serve running there? (ce serve --port, or --socket PATH)") from e
        finally:
            conn.close()
        try:
            reply = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise CeError("E_CLIENT_REPLY", f"{what}: HTTP {resp.status}, not JSON: {raw[:200]!r}",
                          status=resp.status) from None
        if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
            raise CeError("E_CLIENT_REPLY", f"{what}: HTTP {resp.status}, a reply without a boolean \"ok\": "
                                            f"{raw[:200]!r}", status=resp.status)
        if not reply["ok"]:
            raise error_of(reply.get("error"), what, resp.status)
        return reply


def error_of(error: Any, what: str, status: int) -> CeError:
    """ce's {"code", "message", "hint"} as a CeError; a malformed one still says what came back."""
    if not isinstance(error, dict):
        return CeError("E_CLIENT_REPLY", f"{what}: HTTP {status}, failed without an error object: {error!r}",
                       status=status)
    code = error.get("code") if isinstance(error.get("code"), str) else "E_UNKNOWN"
    message = error.get("message") if isinstance(error.get("message"), str) else json.dumps(error)
    hint = error.get("hint") if isinstance(error.get("hint"), str) else None
    return CeError(code, message, hint, status)
