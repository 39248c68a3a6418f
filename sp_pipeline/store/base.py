"""The Store contract: what the writer needs from durable storage.

Only the writer process holds a writable Store (DESIGN invariant 1). Every mutating
method runs inside the transaction opened by ``begin()`` and becomes durable at
``commit()``; nothing is visible to other connections before that. Times are float
seconds since the epoch, passed in (``now``) so tests control the clock.

Ids are never reused, so an ack or release naming an old id cannot touch a newer
event. ``lease_id`` 0 means "not leased" and is never a valid lease. Leases belong to
the store instance (the writer's lifetime): a store opened anew holds none, so rows a
dead writer had leased are eligible at once. An expired lease keeps its rows until they
are leased again (a late release or dead-letter by it still applies).

Tables (SQLite implementation; exact columns, order and indexes in
``store/migrations.py``)::

    queue(id INTEGER PRIMARY KEY,     -- insertion order = age order
          payload BLOB,               -- UTF-8 JSON of one tracker-protocol event
          size INTEGER,               -- len(payload)
          enqueued_at REAL,
          attempts INTEGER,           -- failed deliveries so far
          next_attempt_at REAL,       -- 0: never leased; else not leased before it
          lease_id INTEGER,           -- unused (leases are held in memory)
          lease_expires_at REAL)      -- unused
    dead_letters(id, payload, size, enqueued_at, attempts, reason, last_status, dead_at)
    producers(producer_id BLOB PRIMARY KEY, last_seq INTEGER, updated_at REAL)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Protocol, Sequence, Tuple


class QueuedEvent(NamedTuple):
    """A leased row. A tuple, so that a lease of a few hundred rows is built (and
    packed for the sender) without a Python call per row."""

    id: int
    payload: bytes
    enqueued_at: float
    attempts: int


@dataclass(frozen=True)
class DeadLetter:
    id: int
    payload: bytes
    enqueued_at: float
    attempts: int
    reason: str
    last_status: int
    dead_at: float


@dataclass(frozen=True)
class StoreStats:
    queued: int  # rows in the queue, leased or not
    queued_bytes: int
    leased: int  # rows under an unexpired lease
    dead_letters: int
    oldest_enqueued_at: Optional[float]  # None when the queue is empty


@dataclass(frozen=True)
class EnqueueResult:
    stored: int
    dropped: int  # oldest rows moved to dead letters (reason "store_full") to make room


class Store(Protocol):
    def begin(self) -> None:
        """Open a write transaction (BEGIN IMMEDIATE). Idempotent while one is open."""

    def commit(self) -> None:
        """Make everything since ``begin()`` durable (per the synchronous setting).
        A no-op when no transaction is open."""

    def rollback(self) -> None:
        """Discard everything since ``begin()``."""

    def enqueue(self, payloads: Sequence[bytes], now: float) -> EnqueueResult:
        """Append events at the young end of the queue, in the given order.

        Caps: when the queue would exceed ``max_events`` or ``max_bytes`` and the policy
        is ``drop_oldest``, the oldest unleased rows move to dead letters with reason
        ``store_full`` first; with policy ``block`` the caller is expected to have
        checked ``has_room()`` and the rows are stored regardless.
        """

    def has_room(self, events: int, nbytes: int) -> bool:
        """Whether ``events`` more events totalling ``nbytes`` fit under the caps."""

    def lease(
        self,
        lease_id: int,
        max_events: int,
        max_bytes: int,
        now: float,
        lease_seconds: float,
    ) -> List[QueuedEvent]:
        """Lease the oldest eligible events, oldest first.

        Eligible: ``next_attempt_at <= now`` and not under an unexpired lease (an expired
        lease's rows are eligible again). Stops at ``max_events`` or before the POST
        size (``batching.post_size``) would exceed ``max_bytes``; always returns at least
        one event when any is eligible, even if it alone is over ``max_bytes``.
        The lease expires at ``now + lease_seconds``; ``lease_id`` must not be in use.
        """

    def lease_wire(self, lease_id: int, max_events: int, max_bytes: int, now: float,
                   lease_seconds: float) -> List[Tuple[int, bytes, int, int]]:
        """``lease()``, each row as ``(id, payload, enqueued_at_ms, attempts)`` with
        ``enqueued_at`` in integer milliseconds, as the writer's lease reply carries it."""

    def ack(self, lease_id: int, ids: Sequence[int]) -> int:
        """Delete delivered rows. Deletes a row whatever lease holds it now (it was
        delivered); returns how many rows were deleted."""

    def release(
        self, lease_id: int, ids: Sequence[int], retry_at: float, now: float
    ) -> int:
        """Return rows still held by ``lease_id`` to the queue: ``attempts += 1``,
        ``next_attempt_at = retry_at``, lease cleared. Rows re-leased to another lease
        are left alone. Returns the number of rows released."""

    def dead_letter(
        self,
        lease_id: int,
        ids: Sequence[int],
        reason: str,
        status: int,
        now: float,
    ) -> int:
        """Move rows held by ``lease_id`` (or rows no lease holds, when ``lease_id`` is
        0: never leased, or released) to the dead-letter table with the reason and last HTTP status (0 for none);
        ``attempts`` counts this attempt. Returns the number of rows moved."""

    def clear_leases(self) -> int:
        """Make every leased row eligible now (at writer start, and whenever the
        caller wants every lease forgotten). Returns the number of rows freed that this
        instance knew of (a fresh instance holds no leases)."""

    def stats(self, now: float) -> StoreStats:
        """Counts for status and metrics. Cheap enough to call a few times a second
        with a million-row backlog."""

    def producer_seq(self, producer_id: bytes) -> Optional[int]:
        """The last committed frame seq of a producer, or None if unknown."""

    def set_producer_seq(self, producer_id: bytes, seq: int, now: float) -> None:
        """Record a producer's last committed frame seq (in the open transaction)."""

    def dead_letters(self, limit: int, offset: int = 0) -> List[DeadLetter]:
        """Dead letters, oldest first."""

    def requeue_dead_letters(self, ids: Optional[Sequence[int]], now: float) -> int:
        """Move dead letters (all when ``ids`` is None) back to the young end of the
        queue with ``attempts = 0``. Returns how many."""

    def purge_dead_letters(self, ids: Optional[Sequence[int]]) -> int:
        """Delete dead letters (all when ``ids`` is None). Returns how many."""

    def checkpoint(self, truncate: bool = False) -> Tuple[int, int]:
        """Run a WAL checkpoint (PASSIVE, or TRUNCATE when asked); returns
        (wal frames, frames checkpointed). Call outside a transaction."""

    def wal_bytes(self) -> int:
        """Current size of the WAL file in bytes (0 if absent)."""

    def close(self) -> None:
        """Commit nothing, roll back an open transaction, close the connection."""
