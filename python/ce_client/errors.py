"""The client's one exception: ce serve's error ({"code", "message", "hint"}) or the client's own."""

from __future__ import annotations

from typing import Optional


class CeError(Exception):
    """An error from ce serve (its stable code, message and hint), or one the client found first.

    Codes from ce are ce's (E_POOL_...); the client's own start with E_CLIENT_. `status` is the
    HTTP status of ce's reply, None when there was none.
    """

    def __init__(self, code: str, message: str, hint: Optional[str] = None, status: Optional[int] = None) -> None:
        super().__init__(f"{message} ({code})" + (f"; {hint}" if hint else ""))
        self.code = code
        self.message = message
        self.hint = hint
        self.status = status


class LayoutError(CeError):
    """A state dict that does not fit the pool's layout; raised before anything is written."""

    def __init__(self, message: str, hint: Optional[str] = None) -> None:
        super().__init__("E_CLIENT_LAYOUT", message, hint)
