"""Logging for the role processes: every line carries the role and the pid.

``setup(role, fmt, level)`` is called by a role's entry point, never at import. Plain
text or JSON lines (one object per line: ts, level, role, pid, logger, msg).
``RateLimited`` keeps a flood of bad input from flooding the log: it logs the first
occurrence of each key, then at most one summary per interval.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Callable, Dict, Tuple


class _JsonFormatter(logging.Formatter):
    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        obj = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "role": self.role,
            "pid": record.process,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return json.dumps(obj, ensure_ascii=False)


def setup(role: str, fmt: str = "text", level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter(role))
    else:
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s %(levelname)s {role}[%(process)d] %(name)s: %(message)s"
        ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class RateLimited:
    """Log a repeated condition at most once per ``interval`` seconds per key."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self._state: Dict[str, Tuple[float, int]] = {}

    def warning(self, key: str, msg: str, *args: object) -> None:
        now = self.clock()
        last, suppressed = self._state.get(key, (-1e18, 0))
        if now - last < self.interval:
            self._state[key] = (last, suppressed + 1)
            return
        if suppressed:
            msg = msg + f" ({suppressed} more like this in the last {self.interval:g} s)"
        self.logger.warning(msg, *args)
        self._state[key] = (now, 0)


__all__ = ["setup", "RateLimited"]
