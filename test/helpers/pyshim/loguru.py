"""A stand-in for loguru's logger (the reference system's device_utils imports it): lines to stderr."""

import sys


class _Logger:
    def _log(self, level, msg, *args, **kwargs):
        print(f"[{level}] {msg.format(*args, **kwargs) if args or kwargs else msg}", file=sys.stderr, flush=True)

    def debug(self, msg, *a, **k):
        self._log("debug", msg, *a, **k)

    def info(self, msg, *a, **k):
        self._log("info", msg, *a, **k)

    def warning(self, msg, *a, **k):
        self._log("warning", msg, *a, **k)

    def error(self, msg, *a, **k):
        self._log("error", msg, *a, **k)

    def exception(self, msg, *a, **k):
        self._log("exception", msg, *a, **k)


logger = _Logger()
