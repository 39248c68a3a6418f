"""Delivery policy: what a collector's answer means, and when to try again.

Pure values and functions; the clock (``now``, float seconds since the epoch) and the
random source (``random.Random``) are always passed in, so tests need neither sleep nor
luck. Only ``Pause`` holds state, and it too is told the time.

Classification of one HTTP answer (``status`` None means no answer: timeout, refused or
reset connection, TLS failure)::

    2xx                              DELIVERED   the rows leave the queue (ack)
    in dead_letter_statuses          DEAD        reason "status_<code>"
      (default 400 401 403 410 413 422)
    everything else                  RETRY       released with backoff
      5xx, 408, 429, None            -- the collector is down, busy or unreachable
      3xx                            -- redirects are never followed and never success;
                                        usually a wrong collector URL (http vs https),
                                        which an operator fixes without losing events
      other 4xx (404, 405, 409...)   -- also usually configuration; same reasoning
      1xx, unknown codes             -- not an answer we understand

2xx wins over the dead-letter list, so a misconfigured list cannot dead-letter a
delivered event. A RETRY becomes DEAD when the retry budget is spent: the attempt that
just failed was attempt number ``max_attempts`` (reason ``retry_budget_attempts``), or
the event is ``max_age`` seconds old or older (reason ``retry_budget_age``).

Backoff after the ``n``-th failed attempt (``n >= 1``), in seconds::

    exp   = min(base * 2 ** (n - 1), max_delay)
    delay = exp * (1 - jitter * u)                    u uniform in [0, 1)
    delay = max(delay, min(retry_after, RETRY_AFTER_CAP))   when Retry-After was given

Jitter only shortens the delay, so ``max_delay`` is a true cap and many senders that
failed together spread out instead of returning in step. ``Retry-After`` is a floor
(never retry earlier than the collector asked) and may exceed ``max_delay``, but is
capped at ``RETRY_AFTER_CAP`` (one hour) so a broken header cannot park the queue for
days.
"""

from __future__ import annotations

import enum
import math
import random
import threading
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from datetime import timezone
from typing import (
    TYPE_CHECKING,
    Callable,
    Dict,
    FrozenSet,
    Generic,
    List,
    Optional,
    Protocol,
    Sequence,
    Tuple,
    TypeVar,
)

if TYPE_CHECKING:  # pragma: no cover
    from .config import Settings

RETRY_AFTER_CAP = 3600.0  # seconds; longest wait a Retry-After header can impose
DEFAULT_DEAD_LETTER_STATUSES: FrozenSet[int] = frozenset({400, 401, 403, 410, 413, 422})

# 2 ** 62 times any sane base is far beyond any cap; stops float overflow for huge n.
_MAX_EXPONENT = 62


class Outcome(enum.Enum):
    """What to do with the rows a request carried."""

    DELIVERED = "delivered"
    RETRY = "retry"
    DEAD = "dead"


def classify(
    status: Optional[int],
    dead_letter_statuses: FrozenSet[int] = DEFAULT_DEAD_LETTER_STATUSES,
) -> Outcome:
    """Map an HTTP status (None: no answer) to an Outcome; see the module table."""
    if status is None:
        return Outcome.RETRY
    if 200 <= status <= 299:
        return Outcome.DELIVERED
    if status in dead_letter_statuses:
        return Outcome.DEAD
    return Outcome.RETRY


def parse_retry_after(value: Optional[str], now: float) -> Optional[float]:
    """Seconds to wait from ``now`` according to a ``Retry-After`` header value.

    Accepts delta-seconds (``"120"``) or an HTTP-date (``"Wed, 21 Oct 2015 07:28:00
    GMT"``; a date without a zone is taken as UTC). A date in the past gives 0.0.
    Returns None for a missing, empty or unparseable value. Not capped here: the cap
    belongs to the policy (``RETRY_AFTER_CAP``).
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if text.isascii() and text.isdigit():
        return float(int(text))
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        # RFC 9110 dates are always GMT; parsedate_to_datetime leaves "-0000" naive.
        when = when.replace(tzinfo=timezone.utc)
    return max(when.timestamp() - now, 0.0)


class Attempted(Protocol):
    """A queued row as the policy sees it (``store.base.QueuedEvent`` fits)."""

    @property
    def attempts(self) -> int:
        """Failed deliveries before the current request."""

    @property
    def enqueued_at(self) -> float:
        """When the row entered the queue, seconds since the epoch."""


T = TypeVar("T", bound=Attempted)


@dataclass(frozen=True)
class Decision:
    """The fate of one event after one request.

    ``retry_at`` (absolute, seconds since the epoch) and ``delay`` (seconds from now)
    are set only for RETRY; ``reason`` only for DEAD (``status_<code>``,
    ``retry_budget_attempts`` or ``retry_budget_age``).
    """

    outcome: Outcome
    retry_at: Optional[float] = None
    delay: Optional[float] = None
    reason: Optional[str] = None


@dataclass(frozen=True)
class BatchDecision(Generic[T]):
    """A batch's rows split by fate, ready to become writer messages.

    ``delivered`` -> one ACK; ``retry`` -> one RELEASE at ``retry_at``; each
    ``(reason, rows)`` of ``dead`` -> one DEAD. Every input row is in exactly one group,
    input order kept inside each group. ``retry_at``/``delay`` are None when ``retry``
    is empty.
    """

    delivered: Tuple[T, ...]
    retry: Tuple[T, ...]
    retry_at: Optional[float]
    delay: Optional[float]
    dead: Tuple[Tuple[str, Tuple[T, ...]], ...]


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff and retry budget. Times in seconds; ``jitter`` a fraction in [0, 1]."""

    base: float = 0.5
    max_delay: float = 60.0
    max_attempts: int = 50
    max_age: float = 7 * 86400.0
    dead_letter_statuses: FrozenSet[int] = DEFAULT_DEAD_LETTER_STATUSES
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if not self.base > 0 or not math.isfinite(self.base):
            raise ValueError("base must be a positive, finite number of seconds")
        if not self.max_delay >= self.base or not math.isfinite(self.max_delay):
            raise ValueError("max_delay must be finite and at least base")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if not self.max_age > 0:
            raise ValueError("max_age must be positive")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError("jitter must be a fraction between 0 and 1")
        # Accept any iterable of codes but keep the value hashable and immutable.
        object.__setattr__(self, "dead_letter_statuses", frozenset(self.dead_letter_statuses))

    @classmethod
    def from_settings(cls, settings: "Settings", *, jitter: float = 0.2) -> "RetryPolicy":
        """The policy the options ``retry_*`` and ``dead_letter_statuses`` describe."""
        return cls(
            base=settings.retry_base,
            max_delay=settings.retry_max_delay,
            max_attempts=settings.retry_max_attempts,
            max_age=settings.retry_max_age,
            dead_letter_statuses=frozenset(settings.dead_letter_statuses),
            jitter=jitter,
        )

    def classify(self, status: Optional[int]) -> Outcome:
        """``classify`` with this policy's dead-letter statuses."""
        return classify(status, self.dead_letter_statuses)

    def backoff(self, attempts: int, *, retry_after: Optional[float], rng: random.Random) -> float:
        """Seconds to wait after the ``attempts``-th failed attempt (``attempts >= 1``).

        Draws exactly one number from ``rng``. ``retry_after`` is the collector's
        Retry-After in seconds (``parse_retry_after``), or None.
        """
        return self._delay(attempts, retry_after, rng.random())

    def _delay(self, attempts: int, retry_after: Optional[float], u: float) -> float:
        if attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {attempts}")
        exponent = min(attempts - 1, _MAX_EXPONENT)
        delay = min(self.base * 2.0 ** exponent, self.max_delay) * (1.0 - self.jitter * u)
        if retry_after is not None:
            delay = max(delay, min(max(retry_after, 0.0), RETRY_AFTER_CAP))
        return delay

    def decide(
        self,
        status: Optional[int],
        *,
        attempts: int,
        enqueued_at: float,
        now: float,
        retry_after: Optional[float],
        rng: random.Random,
    ) -> Decision:
        """Fate of one event whose request got ``status`` at ``now``.

        ``attempts`` counts failed deliveries *before* this request (the store's
        ``attempts`` column as leased); this request is attempt ``attempts + 1``.
        Draws one number from ``rng`` only when the answer is RETRY within budget.
        """
        return self._decide(status, attempts, enqueued_at, now, retry_after, rng.random)

    def _decide(
        self,
        status: Optional[int],
        attempts: int,
        enqueued_at: float,
        now: float,
        retry_after: Optional[float],
        draw: Callable[[], float],
    ) -> Decision:
        outcome = self.classify(status)
        if outcome is Outcome.DELIVERED:
            return Decision(Outcome.DELIVERED)
        if outcome is Outcome.DEAD:
            return Decision(Outcome.DEAD, reason=f"status_{status}")
        if attempts + 1 >= self.max_attempts:
            return Decision(Outcome.DEAD, reason="retry_budget_attempts")
        if now - enqueued_at >= self.max_age:
            return Decision(Outcome.DEAD, reason="retry_budget_age")
        delay = self._delay(attempts + 1, retry_after, draw())
        return Decision(Outcome.RETRY, retry_at=now + delay, delay=delay)

    def decide_batch(
        self,
        status: Optional[int],
        rows: Sequence[T],
        *,
        now: float,
        retry_after: Optional[float],
        rng: random.Random,
    ) -> BatchDecision[T]:
        """Split the rows one request carried by their fate (per row budget).

        The rows failed together, so the retried ones share one ``retry_at``: the
        backoff of the most-tried retried row, with one jitter draw for the batch. The
        collector's trouble, not each row's history, sets the pace, and the sender
        sends a single RELEASE. Draws at most one number from ``rng``.
        """
        u = rng.random()
        delivered: List[T] = []
        retry: List[T] = []
        dead: Dict[str, List[T]] = {}
        most_attempts = 0
        for row in rows:
            d = self._decide(status, row.attempts, row.enqueued_at, now, retry_after, lambda: u)
            if d.outcome is Outcome.DELIVERED:
                delivered.append(row)
            elif d.outcome is Outcome.RETRY:
                retry.append(row)
                most_attempts = max(most_attempts, row.attempts + 1)
            else:
                dead.setdefault(d.reason or "", []).append(row)
        delay = self._delay(most_attempts, retry_after, u) if retry else None
        return BatchDecision(
            delivered=tuple(delivered),
            retry=tuple(retry),
            retry_at=None if delay is None else now + delay,
            delay=delay,
            dead=tuple((reason, tuple(group)) for reason, group in dead.items()),
        )


class Pause:
    """Per-sender gate: after a failed request, no new request before the backoff ends.

    While the collector is down every request fails; without this gate a sender would
    lease fresh rows (whose own backoff is short) and hammer it. The gate keeps its own
    count of consecutive failures, so its wait doubles like a row's backoff (capped by
    the policy's ``max_delay``, lengthened by Retry-After). A 2xx opens it at once. A
    DEAD answer leaves it as it is: the collector answered, but about that batch only.

    Thread-safe (the sender's request threads share one). Never reads the clock: every
    method takes ``now``.
    """

    def __init__(self, policy: RetryPolicy, rng: random.Random) -> None:
        self._policy = policy
        self._rng = rng
        self._lock = threading.Lock()
        self._failures = 0
        self._until = 0.0

    @property
    def failures(self) -> int:
        """Consecutive failed requests since the last success."""
        return self._failures

    def observe(self, outcome: Outcome, *, now: float, retry_after: Optional[float] = None) -> None:
        """Record the outcome of a request that finished at ``now``."""
        with self._lock:
            if outcome is Outcome.DELIVERED:
                self._failures = 0
                self._until = 0.0
            elif outcome is Outcome.RETRY:
                self._failures += 1
                delay = self._policy.backoff(self._failures, retry_after=retry_after, rng=self._rng)
                # A slower failure must not shorten a wait an earlier one imposed.
                self._until = max(self._until, now + delay)

    def wait(self, now: float) -> float:
        """Seconds to wait before starting a request (0.0: go ahead)."""
        with self._lock:
            return max(self._until - now, 0.0)

    def until(self) -> float:
        """Absolute time the gate opens (0.0 when open regardless of the clock)."""
        with self._lock:
            return self._until


__all__ = [
    "RETRY_AFTER_CAP",
    "DEFAULT_DEAD_LETTER_STATUSES",
    "Outcome",
    "classify",
    "parse_retry_after",
    "Attempted",
    "Decision",
    "BatchDecision",
    "RetryPolicy",
    "Pause",
]
