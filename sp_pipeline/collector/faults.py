"""Faults the development collector can inject, so senders can be tested against a
collector that fails, flaps, is slow or hangs up.

``Faults`` is an immutable value (set at start from options, replaced at run time by
``POST /micro/faults``); ``FaultInjector`` holds the current value and a seeded RNG and
decides, per collection request, what happens:

    1. body larger than ``max_body_bytes``   -> 413 (checked first, on the wire size)
    2. wait ``delay_ms`` (every collection answer, failures included)
    3. with probability ``reset_rate``        -> close the socket without an answer
    4. ``status`` set                         -> answer it, events not recorded
    5. with probability ``fail_rate``         -> answer ``fail_status``, not recorded
    6. otherwise                              -> record the events, answer 200

Faulted answers (4, 5) carry ``Retry-After: <retry_after>`` when it is set. The
reporting API under ``/micro/`` is never faulted.
"""

from __future__ import annotations

import dataclasses
import random
import threading
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

from ..errors import ValidationError


def _status(field: str, value: Any, optional: bool) -> Optional[int]:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 100 <= value <= 599:
        raise ValidationError(field, "must be an HTTP status code (100..599)")
    return value


def _rate(field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValidationError(field, "must be a number from 0 to 1")
    return float(value)


def _non_negative(field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValidationError(field, "must be a number >= 0")
    return value


@dataclass(frozen=True)
class Faults:
    """What to do wrong. Defaults do nothing wrong.

    ``status``: answer every collection request with this code (even a 2xx: then the
    collector is a black hole that acknowledges and drops). ``fail_rate``: fraction
    (0..1) of requests answered ``fail_status``. ``delay_ms``: milliseconds added
    before every collection answer. ``retry_after``: ``Retry-After`` header value
    (seconds or an HTTP date) sent with faulted answers. ``reset_rate``: fraction of
    requests whose connection is closed with no answer (TCP RST). ``max_body_bytes``:
    a larger request body (as sent, before gunzip) gets 413. ``seed``: RNG seed for
    ``fail_rate``/``reset_rate`` draws (``None``: unpredictable).
    """

    status: Optional[int] = None
    fail_rate: float = 0.0
    fail_status: int = 503
    delay_ms: float = 0.0
    retry_after: Optional[str] = None
    reset_rate: float = 0.0
    max_body_bytes: Optional[int] = None
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        _status("status", self.status, optional=True)
        _status("fail_status", self.fail_status, optional=False)
        _rate("fail_rate", self.fail_rate)
        _rate("reset_rate", self.reset_rate)
        _non_negative("delay_ms", self.delay_ms)
        if self.retry_after is not None and not isinstance(self.retry_after, str):
            object.__setattr__(self, "retry_after", _retry_after(self.retry_after))
        if self.max_body_bytes is not None:
            if isinstance(self.max_body_bytes, bool) or not isinstance(self.max_body_bytes, int) \
                    or self.max_body_bytes < 1:
                raise ValidationError("max_body_bytes", "must be a positive integer")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValidationError("seed", "must be an integer")

    def updated(self, changes: Mapping[str, Any]) -> "Faults":
        """A copy with ``changes`` applied; a ``None`` value restores that field's default.

        Raises ``ValidationError`` naming an unknown or invalid field.
        """
        names = {f.name: f for f in dataclasses.fields(self)}
        values: Dict[str, Any] = {}
        for key, value in changes.items():
            if key not in names:
                raise ValidationError(key, f"unknown fault; known: {', '.join(sorted(names))}")
            values[key] = names[key].default if value is None else value
        return dataclasses.replace(self, **values)

    def to_json(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def _retry_after(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValidationError("retry_after", "must be a string, or a number of seconds >= 0")
    return str(int(value)) if float(value).is_integer() else str(value)


@dataclass(frozen=True)
class Decision:
    """The fate of one collection request: ``action`` is ``"record"``, ``"status"``
    (answer ``status`` without recording) or ``"reset"``; ``delay_s`` in seconds."""

    action: str
    delay_s: float = 0.0
    status: int = 200
    retry_after: Optional[str] = None
    reason: Optional[str] = None


class FaultInjector:
    """The current ``Faults`` and the RNG behind the rates. Thread-safe.

    With a seed, the sequence of draws is reproducible: each decision draws once for
    ``reset_rate`` then once for ``fail_rate`` (only when that rate is above zero).
    """

    def __init__(self, faults: Optional[Faults] = None) -> None:
        self._lock = threading.Lock()
        self._faults = faults or Faults()
        self._rng = random.Random(self._faults.seed)

    @property
    def faults(self) -> Faults:
        return self._faults

    def set(self, faults: Faults) -> Faults:
        """Replace the faults and restart the RNG from ``faults.seed``."""
        with self._lock:
            self._faults = faults
            self._rng = random.Random(faults.seed)
            return faults

    def update(self, changes: Mapping[str, Any]) -> Faults:
        """Apply ``Faults.updated(changes)`` atomically and return the new value. The RNG
        restarts only when ``changes`` names ``seed`` (so a flap keeps the sequence)."""
        with self._lock:
            self._faults = self._faults.updated(changes)
            if "seed" in changes:
                self._rng = random.Random(self._faults.seed)
            return self._faults

    def decide(self, body_bytes: int) -> Decision:
        """The decision for one collection request whose body has ``body_bytes`` bytes."""
        with self._lock:
            f = self._faults
            reset = f.reset_rate > 0 and self._rng.random() < f.reset_rate
            fail = f.fail_rate > 0 and self._rng.random() < f.fail_rate
        delay = f.delay_ms / 1000.0
        if f.max_body_bytes is not None and body_bytes > f.max_body_bytes:
            return Decision("status", delay, 413, None, "too_large")
        if reset:
            return Decision("reset", delay, 0, None, "reset")
        if f.status is not None:
            return Decision("status", delay, f.status, f.retry_after, "status")
        if fail:
            return Decision("status", delay, f.fail_status, f.retry_after, "fail_rate")
        return Decision("record", delay)
