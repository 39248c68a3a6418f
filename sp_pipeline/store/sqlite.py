"""The SQLite store: the writer's queue, dead letters and producer seqs in one file.

One process (the writer) opens it for writing; ``ReadOnlyStore`` serves the ``status``
and ``dead-letters list`` commands through a ``mode=ro`` connection. The table layout
is drawn in ``migrations.py``.

Leases live in memory, not in the file. Only the writer holds a store, and a new
writer owns no leases (a restart makes every leased row eligible again, which is what
``clear_leases()`` promises), so writing lease state to disk would only cost an UPDATE
of every row sent. What the file keeps is ``next_attempt_at``: 0 for a row waiting for
its first lease, the retry time after a release.

How ``lease()`` stays fast with a million-row backlog. Three sources of eligible rows,
merged by id (oldest first): (a) rows never leased in this store's lifetime: those with
``next_attempt_at = 0`` past ``_cursor`` (the newest id handed out so far), read along
the index ``queue_ready(next_attempt_at, id, size)`` in O(batch); (b) released rows
whose retry time has come (a range over ``0 < next_attempt_at <= now`` of the same
index, sorted by id, small except just after a long collector outage); (c) rows of
expired leases (a heap in memory). A row leased from (b) gets ``next_attempt_at = 0``
again; a row leased from (a) or (c) is not written at all.

Counters (queued events and bytes, dead letters) live in memory: read once on open,
updated by every write, and restored from a snapshot taken at ``begin()`` when the
transaction rolls back.

Errors: any ``sqlite3.Error`` inside a write rolls the whole open transaction back and
raises ``StoreFull`` (SQLITE_FULL: disk or ``max_page_count`` reached) or
``StoreError``; the store stays usable.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import operator
import os
import sqlite3
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, TypeVar

from sp_pipeline import batching
from sp_pipeline.errors import StoreError
from sp_pipeline.store import migrations
from sp_pipeline.store.base import DeadLetter, EnqueueResult, QueuedEvent, StoreStats

_T = TypeVar("_T")

_SYNCHRONOUS = {"normal": 1, "full": 2}
_WHEN_FULL = ("block", "drop_oldest")

# Id lists are bound in fixed-size IN (...) groups, the last padded by repeating its
# final id, so each statement text is compiled once and stays in the statement cache.
_CHUNK = 500
_IN = "(" + ",".join("?" * _CHUNK) + ")"

_SQL_INSERT = "INSERT INTO queue(size, enqueued_at, payload) VALUES (?, ?, ?)"
# Rows come out as _eligible()'s (id, size, source) candidates, source 0 = _FRESH.
_SQL_FRESH = (
    "SELECT id, size, 0 FROM queue INDEXED BY queue_ready "
    "WHERE next_attempt_at = 0 AND id > ? ORDER BY id LIMIT ?"
)
_MAX_ID = (1 << 63) - 1
_PROBE_FACTOR = 4
_SQL_DUE_COUNT = (
    "SELECT count(*) FROM (SELECT 1 FROM queue INDEXED BY queue_ready "
    "WHERE next_attempt_at > 0 AND next_attempt_at <= ? AND id < ? LIMIT ?)"
)
_SQL_DUE_BY_INDEX = (
    "SELECT id, size FROM queue INDEXED BY queue_ready "
    "WHERE next_attempt_at > 0 AND next_attempt_at <= ? AND id < ? ORDER BY id LIMIT ?"
)
_SQL_DUE_BY_ID = (
    "SELECT id, size FROM queue NOT INDEXED "
    "WHERE next_attempt_at > 0 AND next_attempt_at <= ? AND id < ? ORDER BY id LIMIT ?"
)
_SQL_UNRELEASE = f"UPDATE queue SET next_attempt_at = 0 WHERE id IN {_IN}"
# Columns in QueuedEvent order; the _WIRE forms give enqueued_at in integer ms, as
# the lease reply to a sender carries it (wire.py), so rows go out as they come.
_SQL_LEASED_ROWS = f"SELECT id, payload, enqueued_at, attempts FROM queue WHERE id IN {_IN}"
_SQL_WIRE_ROWS = ("SELECT id, payload, CAST(round(enqueued_at * 1000) AS INTEGER), attempts "
                  f"FROM queue WHERE id IN {_IN}")
_SQL_WIRE_RANGE = ("SELECT id, payload, CAST(round(enqueued_at * 1000) AS INTEGER), attempts "
                   "FROM queue WHERE id BETWEEN ? AND ?")
# A run of consecutive ids (the usual lease of fresh rows) is one range, not 500 binds.
_SQL_LEASED_RANGE = "SELECT id, payload, enqueued_at, attempts FROM queue WHERE id BETWEEN ? AND ?"
_SQL_SIZES = f"SELECT count(*), CAST(total(size) AS INTEGER) FROM queue WHERE id IN {_IN}"
_SQL_ACK = f"DELETE FROM queue WHERE id IN {_IN}"
_SQL_ACK_RANGE = "DELETE FROM queue WHERE id BETWEEN ? AND ?"
_SQL_RELEASE = (
    f"UPDATE queue SET attempts = attempts + 1, next_attempt_at = ? WHERE id IN {_IN}"
)
_SQL_COPY_DEAD = (
    "INSERT INTO dead_letters(size, enqueued_at, attempts, reason, last_status, dead_at, "
    "payload) SELECT size, enqueued_at, attempts + ?, ?, ?, ?, payload FROM queue "
    f"WHERE id IN {_IN} ORDER BY id"
)
_SQL_DROP_CANDIDATES = "SELECT id, size FROM queue ORDER BY id"
_SQL_EVICT_DEAD = (
    "DELETE FROM dead_letters WHERE id IN (SELECT id FROM dead_letters ORDER BY id LIMIT ?)"
)
_SQL_REQUEUE = (
    "INSERT INTO queue(size, enqueued_at, payload) SELECT size, ?, payload "
    f"FROM dead_letters WHERE id IN {_IN} ORDER BY id"
)
_SQL_DEAD_SIZES = (
    f"SELECT count(*), CAST(total(size) AS INTEGER) FROM dead_letters WHERE id IN {_IN}"
)
_SQL_DEAD_DELETE = f"DELETE FROM dead_letters WHERE id IN {_IN}"
_SQL_DEAD_PAGE = (
    "SELECT id, payload, enqueued_at, attempts, reason, last_status, dead_at "
    "FROM dead_letters ORDER BY id LIMIT ? OFFSET ?"
)


_first, _second = operator.itemgetter(0), operator.itemgetter(1)
_FRESH = 0  # candidate sources in _eligible(); a positive source is an expired lease id
_DUE = -1
_EARLIEST_RETRY = 1.0  # next_attempt_at of a released row is never 0 ("never leased")


class _Lease:
    """One lease in memory: its expiry and the rows it still holds (id -> size)."""

    __slots__ = ("expires", "sizes", "returned")

    def __init__(self, expires: float) -> None:
        self.expires = expires
        self.sizes: Dict[int, int] = {}
        self.returned = False  # expired and its rows put back in the _returned heap


def _chunks(ids: Sequence[int]) -> Iterator[List[int]]:
    for start in range(0, len(ids), _CHUNK):
        part = [int(i) for i in ids[start : start + _CHUNK]]
        yield part + [part[-1]] * (_CHUNK - len(part))


class SQLiteStore:
    """The ``Store`` protocol on one SQLite file in WAL mode (see ``base.Store``).

    ``synchronous``: "normal" (a commit survives a process crash; the last commits may
    be lost on power loss) or "full" (survives power loss, slower commits).
    ``max_events`` / ``max_bytes``: caps on queued events and payload bytes, applied
    per ``when_full`` ("block": ``has_room()`` turns False; "drop_oldest": ``enqueue``
    dead-letters the oldest unleased rows with reason ``store_full``).
    ``max_dead_letters``: the dead-letter table keeps at most this many rows; moving
    more in deletes the oldest dead letters. ``dead_letters_evicted`` counts those
    deletions (committed ones, since open) so the writer can export a metric.

    Mutating methods open a transaction when none is open (as ``begin()``); nothing is
    durable before ``commit()``. Not thread-safe: one thread of one process owns it.
    """

    def __init__(
        self,
        path: str,
        *,
        synchronous: str = "normal",
        max_events: int = 10_000_000,
        max_bytes: int = 4 << 30,
        when_full: str = "block",
        max_dead_letters: int = 1_000_000,
    ) -> None:
        if synchronous not in _SYNCHRONOUS:
            raise ValueError(f"synchronous: must be one of {sorted(_SYNCHRONOUS)}, not {synchronous!r}")
        if when_full not in _WHEN_FULL:
            raise ValueError(f"when_full: must be one of {list(_WHEN_FULL)}, not {when_full!r}")
        if min(max_events, max_bytes, max_dead_letters) < 1:
            raise ValueError("max_events, max_bytes and max_dead_letters must be >= 1")
        self.path = os.path.abspath(path)
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.when_full = when_full
        self.max_dead_letters = max_dead_letters
        self.dead_letters_evicted = 0
        #: Rows leased again after their lease expired (a sender died or hung), since
        #: open; counted as they are re-leased (not rolled back with a transaction).
        self.expired_leased = 0
        self._conn = migrations.open_writable(self.path, _SYNCHRONOUS[synchronous])
        try:  # reads the whole ready index: a damaged file is refused here, at start
            self._queued, self._queued_bytes = self._conn.execute(
                "SELECT count(*), CAST(total(size) AS INTEGER) FROM queue INDEXED BY queue_ready"
            ).fetchone()
            (self._dead,) = self._conn.execute("SELECT count(*) FROM dead_letters").fetchone()
        except sqlite3.Error as exc:
            self._conn.close()
            raise migrations.store_error(self.path, "open", exc) from exc
        self._evicting = 0
        self._saved: Tuple[int, int, int] = (self._queued, self._queued_bytes, self._dead)
        self._forget_leases()

    def _forget_leases(self) -> int:
        """Drop every lease held in memory; their rows are eligible again. Returns how
        many rows were held."""
        held = len(getattr(self, "_holder", ()))
        self._cursor = 0  # rows with next_attempt_at = 0 and a larger id: never leased
        self._leases: Dict[int, _Lease] = {}
        self._holder: Dict[int, int] = {}  # row id -> lease id, while held
        self._returned: List[Tuple[int, int, int]] = []  # heap of expired (id, size, lease)
        return held

    # ------------------------------------------------------------ transactions
    def begin(self) -> None:
        if self._conn.in_transaction:
            return
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise migrations.store_error(self.path, "begin", exc) from exc
        self._saved = (self._queued, self._queued_bytes, self._dead)
        self._evicting = 0

    def commit(self) -> None:
        if not self._conn.in_transaction:
            return
        try:
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._abort()
            raise migrations.store_error(self.path, "commit", exc) from exc
        self.dead_letters_evicted += self._evicting
        self._evicting = 0

    def rollback(self) -> None:
        self._abort()

    def _abort(self) -> None:
        """Roll back whatever is open (SQLite may already have) and restore counters."""
        if self._conn.in_transaction:
            try:
                self._conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # the transaction is gone either way; counters are restored below
        self._queued, self._queued_bytes, self._dead = self._saved
        self._evicting = 0
        # Leases handed out in the lost transaction never reached a sender (the writer
        # drops its replies); forgetting every lease is the simple safe answer: rows of
        # earlier, still running leases may be sent twice, never lost.
        self._forget_leases()

    @contextmanager
    def _write(self, what: str) -> Iterator[None]:
        self.begin()
        try:
            yield
        except sqlite3.Error as exc:
            self._abort()
            raise migrations.store_error(self.path, what, exc) from exc

    # ------------------------------------------------------------ queue
    def enqueue(self, payloads: Sequence[bytes], now: float) -> EnqueueResult:
        if not payloads:
            return EnqueueResult(stored=0, dropped=0)
        nbytes = sum(len(p) for p in payloads)
        with self._write("enqueue"):
            dropped = 0
            if self.when_full == "drop_oldest":
                dropped = self._make_room(len(payloads), nbytes, now)
            self._conn.executemany(_SQL_INSERT, ((len(p), now, p) for p in payloads))
            self._queued += len(payloads)
            self._queued_bytes += nbytes
        return EnqueueResult(stored=len(payloads), dropped=dropped)

    def has_room(self, events: int, nbytes: int) -> bool:
        return (
            self._queued + events <= self.max_events
            and self._queued_bytes + nbytes <= self.max_bytes
        )

    def _make_room(self, events: int, nbytes: int, now: float) -> int:
        """Dead-letter the oldest rows not under an unexpired lease until ``events`` /
        ``nbytes`` more fit (or no such row is left). Returns rows moved."""
        excess_events = self._queued + events - self.max_events
        excess_bytes = self._queued_bytes + nbytes - self.max_bytes
        if excess_events <= 0 and excess_bytes <= 0:
            return 0
        victims: List[int] = []
        cursor = self._conn.execute(_SQL_DROP_CANDIDATES)
        for row_id, size in cursor:
            if excess_events <= 0 and excess_bytes <= 0:
                break
            lease_id = self._holder.get(row_id)
            if lease_id is not None and self._leases[lease_id].expires > now:
                continue  # in flight: its sender may still deliver it
            victims.append(row_id)
            excess_events -= 1
            excess_bytes -= size
        cursor.close()
        return self._move_dead(victims, "store_full", 0, now, add_attempts=0)

    def lease(
        self,
        lease_id: int,
        max_events: int,
        max_bytes: int,
        now: float,
        lease_seconds: float,
    ) -> List[QueuedEvent]:
        rows = self._lease(lease_id, max_events, max_bytes, now, lease_seconds,
                           _SQL_LEASED_ROWS, _SQL_LEASED_RANGE)
        return list(map(QueuedEvent._make, rows))

    def lease_wire(self, lease_id: int, max_events: int, max_bytes: int, now: float,
                   lease_seconds: float) -> List[Tuple[int, bytes, int, int]]:
        """``lease()``, with each row as the ``(id, payload, enqueued_at_ms, attempts)``
        tuple a lease reply carries: no Python object is built per row."""
        return self._lease(lease_id, max_events, max_bytes, now, lease_seconds,
                           _SQL_WIRE_ROWS, _SQL_WIRE_RANGE)

    def _lease(self, lease_id: int, max_events: int, max_bytes: int, now: float,
               lease_seconds: float, sql_in: str, sql_range: str) -> List[Any]:
        if lease_id == 0:
            raise ValueError("lease_id: 0 means 'not leased'; use a non-zero id")
        if lease_id in self._leases:
            raise ValueError(f"lease_id: {lease_id} is in use")
        if max_events < 1:
            return []
        with self._write("lease"):
            self._expire(now)
            # Look at about as many rows as the byte limit holds, not at max_events
            # (500 rows for the ~80 a 40 kB request takes); look again at all
            # max_events only when the first look fitted with bytes to spare.
            limit = self._lease_probe(max_events, max_bytes)
            while True:
                candidates = self._eligible(limit, now)
                count = batching.take(map(_second, candidates), max_bytes, limit)
                if count < limit or limit == max_events:
                    break
                self._give_back(candidates)
                limit = max_events
            if not candidates:
                return []
            chosen = candidates[:count]
            self._give_back(candidates[count:])
            unreleased = [c[0] for c in chosen if c[2] == _DUE]
            for part in _chunks(unreleased):
                self._conn.execute(_SQL_UNRELEASE, part)
            fresh = [c[0] for c in chosen if c[2] == _FRESH]
            if fresh:
                self._cursor = max(self._cursor, fresh[-1])
            ids = [c[0] for c in chosen]  # ascending: candidates come merged in id order
            rows = self._by_ids(sql_in, sql_range, ids)
        lease = _Lease(now + lease_seconds)
        for row_id, _, source in chosen:
            if source > 0:
                self._leases[source].sizes.pop(row_id, None)
                self.expired_leased += 1
        lease.sizes = {c[0]: c[1] for c in chosen}
        self._holder.update(dict.fromkeys(ids, lease_id))
        self._leases[lease_id] = lease
        rows.sort()
        return rows

    def _by_ids(self, sql_in: str, sql_range: str, ids: Sequence[int]) -> List[Any]:
        """Run ``sql_in`` (an ``IN {_IN}`` statement) for ``ids`` (distinct, ascending),
        or ``sql_range`` (``BETWEEN ? AND ?``) once when they are consecutive integers,
        as a lease of fresh rows and its ack usually are; the rows either returns."""
        if ids and ids[-1] - ids[0] == len(ids) - 1:
            return self._conn.execute(sql_range, (ids[0], ids[-1])).fetchall()
        rows: List[Any] = []
        for part in _chunks(ids):
            rows.extend(self._conn.execute(sql_in, part))
        return rows

    def _lease_probe(self, max_events: int, max_bytes: int) -> int:
        """Rows a lease looks at first: what ``max_bytes`` holds of rows of the queue's
        mean size, with a margin (sizes vary), at most ``max_events``."""
        if not self._queued:
            return max_events
        mean = self._queued_bytes // self._queued + batching.STM_BYTES + batching.SEPARATOR_BYTES
        return min(max_events, max_bytes // mean * 3 // 2 + 8)

    def _give_back(self, candidates: Sequence[Tuple[int, int, int]]) -> None:
        """Candidates not taken that came from an expired lease go back to its heap."""
        for row_id, size, source in candidates:
            if source > 0:
                heapq.heappush(self._returned, (row_id, size, source))

    def _expire(self, now: float) -> None:
        """Leases past their expiry give their rows back (to the ``_returned`` heap);
        the rows stay attributed to the old lease until leased again, so a late release
        or dead-letter by that lease still applies."""
        for lease_id, lease in list(self._leases.items()):
            if not lease.sizes:
                del self._leases[lease_id]
            elif not lease.returned and lease.expires <= now:
                lease.returned = True
                for row_id, size in lease.sizes.items():
                    heapq.heappush(self._returned, (row_id, size, lease_id))

    def _eligible(self, limit: int, now: float) -> List[Tuple[int, int, int]]:
        """Eligible rows, oldest first (the first ``limit`` of them are the oldest of
        all; more may follow), as (id, size, source): source
        ``_FRESH`` (never leased), ``_DUE`` (released, retry time passed) or the id of
        the expired lease that last held it. Rows younger than the ``limit``-th fresh
        one cannot make the cut, so the other searches stop there."""
        holder = self._holder
        fresh = self._conn.execute(_SQL_FRESH, (self._cursor, limit)).fetchall()
        if holder and not holder.keys().isdisjoint(map(_first, fresh)):
            fresh = [c for c in fresh if c[0] not in holder]
        bound = fresh[-1][0] if len(fresh) == limit else _MAX_ID
        returned: List[Tuple[int, int, int]] = []
        while self._returned and len(returned) < limit and self._returned[0][0] < bound:
            row_id, size, lease_id = heapq.heappop(self._returned)
            if holder.get(row_id) == lease_id:  # not acked, released or leased since
                returned.append((row_id, size, lease_id))
        probe = limit * _PROBE_FACTOR
        (due_count,) = self._conn.execute(_SQL_DUE_COUNT, (now, bound, probe)).fetchone()
        due: List[Tuple[int, int, int]] = []
        if due_count:
            # Few due rows: take them all from the index and sort (cost ~ due). Many
            # (just after an outage): walk the table in id order, where they are dense.
            sql = _SQL_DUE_BY_INDEX if due_count < probe else _SQL_DUE_BY_ID
            due = [(i, size, _DUE) for i, size in self._conn.execute(sql, (now, bound, limit))]
        # Not cut to ``limit`` here: lease() puts the expired-lease rows it does not
        # take back in the heap.
        if not due and not returned:
            return fresh  # the usual case; heapq.merge costs a Python step per row
        return list(heapq.merge(fresh, due, returned))

    def ack(self, lease_id: int, ids: Sequence[int]) -> int:
        lease = self._leases.get(lease_id)
        if lease is not None:
            wanted = set(ids)
            if len(wanted) == len(ids) and lease.sizes.keys() >= wanted:
                return self._ack_held(lease, sorted(wanted))
        deleted = 0
        with self._write("ack"):
            known, other = self._split_held(ids)
            for part in _chunks(other):  # not held: may be gone already
                count, nbytes = self._conn.execute(_SQL_SIZES, part).fetchone()
                self._conn.execute(_SQL_ACK, part)
                deleted += count
                self._queued -= count
                self._queued_bytes -= nbytes
            # held rows exist; their sizes are known
            self._by_ids(_SQL_ACK, _SQL_ACK_RANGE, sorted(i for i, _ in known))
            deleted += len(known)
            self._queued -= len(known)
            self._queued_bytes -= sum(size for _, size in known)
        self._unhold([i for i, _ in known])
        return deleted

    def _ack_held(self, lease: _Lease, ids: List[int]) -> int:
        """The usual ack: distinct ids (ascending), every one still held by ``lease``.
        The other rows of the lease stay held."""
        sizes = lease.sizes
        with self._write("ack"):
            self._by_ids(_SQL_ACK, _SQL_ACK_RANGE, ids)
            self._queued -= len(ids)
            self._queued_bytes -= sum(map(sizes.__getitem__, ids))
        if len(ids) == len(sizes):
            sizes.clear()
        else:
            collections.deque(map(sizes.pop, ids), 0)
        collections.deque(map(self._holder.pop, ids, itertools.repeat(None)), 0)
        return len(ids)

    def _split_held(self, ids: Sequence[int]) -> Tuple[List[Tuple[int, int]], List[int]]:
        """(held rows with their sizes, other ids), duplicates dropped."""
        known: List[Tuple[int, int]] = []
        other: List[int] = []
        seen = set()
        for i in ids:
            if i in seen:
                continue
            seen.add(i)
            lease_id = self._holder.get(i)
            if lease_id is None:
                other.append(i)
            else:
                known.append((i, self._leases[lease_id].sizes[i]))
        return known, other

    def _unhold(self, ids: Sequence[int]) -> None:
        for i in ids:
            lease_id = self._holder.pop(i, None)
            if lease_id is not None:
                lease = self._leases.get(lease_id)
                if lease is not None:
                    lease.sizes.pop(i, None)

    def release(self, lease_id: int, ids: Sequence[int], retry_at: float, now: float) -> int:
        held = sorted({i for i in ids if self._holder.get(i) == lease_id})
        if lease_id == 0 or not held:
            return 0  # lease 0 holds nothing
        # next_attempt_at > 0 marks a released row (0 would mean "never leased").
        retry_at = max(retry_at, _EARLIEST_RETRY)
        with self._write("release"):
            for part in _chunks(held):
                self._conn.execute(_SQL_RELEASE, (retry_at, *part))
        self._unhold(held)
        return len(held)

    def dead_letter(
        self, lease_id: int, ids: Sequence[int], reason: str, status: int, now: float
    ) -> int:
        if lease_id:
            targets = sorted({i for i in ids if self._holder.get(i) == lease_id})
        else:
            targets = sorted({i for i in ids if i not in self._holder})
        with self._write("dead_letter"):
            return self._move_dead(targets, reason, status, now, add_attempts=1)

    def _move_dead(
        self, ids: Sequence[int], reason: str, status: int, now: float, add_attempts: int,
    ) -> int:
        """Move the rows ``ids`` (those that exist) to dead letters, in id order, then
        evict the oldest dead letters over the cap. Returns rows moved."""
        moved = 0
        for part in _chunks(ids):
            count, nbytes = self._conn.execute(_SQL_SIZES, part).fetchone()
            if not count:
                continue
            self._conn.execute(_SQL_COPY_DEAD, (add_attempts, reason, status, now, *part))
            self._conn.execute(_SQL_ACK, part)
            moved += count
            self._queued -= count
            self._queued_bytes -= nbytes
        self._unhold(ids)
        self._dead += moved
        over = self._dead - self.max_dead_letters
        if over > 0:
            self._conn.execute(_SQL_EVICT_DEAD, (over,))
            self._dead -= over
            self._evicting += over
        return moved

    def clear_leases(self) -> int:
        freed = self._forget_leases()
        with self._write("clear_leases"):
            # Files written before leases moved to memory kept them in these columns
            # (next_attempt_at was the lease's expiry): free those rows too.
            return freed + self._conn.execute(
                "UPDATE queue SET lease_id = 0, lease_expires_at = 0, next_attempt_at = 0 "
                "WHERE lease_id != 0"
            ).rowcount

    # ------------------------------------------------------------ reads
    def stats(self, now: float) -> StoreStats:
        leased = sum(len(lease.sizes) for lease in self._leases.values() if lease.expires > now)
        try:
            return _stats(self._conn, now, self._queued, self._queued_bytes, self._dead, leased)
        except sqlite3.Error as exc:
            raise migrations.store_error(self.path, "stats", exc) from exc

    def producer_seq(self, producer_id: bytes) -> Optional[int]:
        row = self._conn.execute(
            "SELECT last_seq FROM producers WHERE producer_id = ?", (producer_id,)
        ).fetchone()
        return None if row is None else int(row[0])

    def set_producer_seq(self, producer_id: bytes, seq: int, now: float) -> None:
        with self._write("set_producer_seq"):
            self._conn.execute(
                "INSERT INTO producers(producer_id, last_seq, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT(producer_id) DO UPDATE SET last_seq = excluded.last_seq, "
                "updated_at = excluded.updated_at",
                (producer_id, seq, now),
            )

    # ------------------------------------------------------------ dead letters
    def dead_letters(self, limit: int, offset: int = 0) -> List[DeadLetter]:
        return _dead_letter_page(self._conn, limit, offset)

    def requeue_dead_letters(self, ids: Optional[Sequence[int]], now: float) -> int:
        """Back to the young end of the queue, attempts 0, ``enqueued_at = now`` (so the
        sender's age budget starts again). Caps are not applied: an operator asked."""
        moved = 0
        with self._write("requeue_dead_letters"):
            for part in self._dead_letter_ids(ids):
                count, nbytes = self._conn.execute(_SQL_DEAD_SIZES, part).fetchone()
                self._conn.execute(_SQL_REQUEUE, (now, *part))
                self._conn.execute(_SQL_DEAD_DELETE, part)
                moved += count
                self._dead -= count
                self._queued += count
                self._queued_bytes += nbytes
        return moved

    def purge_dead_letters(self, ids: Optional[Sequence[int]]) -> int:
        purged = 0
        with self._write("purge_dead_letters"):
            if ids is None:
                purged = self._conn.execute("DELETE FROM dead_letters").rowcount
            else:
                for part in _chunks(ids):
                    purged += self._conn.execute(_SQL_DEAD_DELETE, part).rowcount
            self._dead -= purged
        return purged

    def _dead_letter_ids(self, ids: Optional[Sequence[int]]) -> Iterator[List[int]]:
        if ids is not None:
            yield from _chunks(ids)
            return
        while True:  # all of them, a chunk at a time: memory stays flat
            part = [r[0] for r in self._conn.execute(
                "SELECT id FROM dead_letters ORDER BY id LIMIT ?", (_CHUNK,))]
            if not part:
                return
            yield from _chunks(part)

    # ------------------------------------------------------------ WAL and lifetime
    def checkpoint(self, truncate: bool = False) -> Tuple[int, int]:
        if self._conn.in_transaction:
            raise StoreError(f"store {self.path}: checkpoint() inside a transaction")
        mode = "TRUNCATE" if truncate else "PASSIVE"
        try:
            _busy, frames, done = self._conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
        except sqlite3.Error as exc:
            raise migrations.store_error(self.path, "checkpoint", exc) from exc
        return max(frames, 0), max(done, 0)

    def wal_bytes(self) -> int:
        try:
            return os.stat(self.path + "-wal").st_size
        except FileNotFoundError:
            return 0

    def close(self) -> None:
        if self._conn is None:
            return
        self._abort()
        self._conn.close()
        self._conn = None  # type: ignore[assignment]

    def __enter__(self) -> "SQLiteStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ReadOnlyStore:
    """A read-only view of a store for ``status`` and ``dead-letters list``; it never
    creates or writes the database file and is safe beside a running writer.

    Each call uses a fresh ``mode=ro`` connection. When no ``-wal`` file exists (no
    writer has the file open) the read is ``immutable`` so that no ``-wal``/``-shm``
    files are left behind; if a ``-wal`` appeared meanwhile, the read is repeated
    through the WAL.
    """

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        if not migrations.file_exists(self.path):
            raise StoreError(f"store {self.path}: no such file")
        if not migrations.check_header(self.path):
            raise StoreError(f"store {self.path}: empty file, not initialised by a writer yet")
        self._read(lambda conn: migrations.inspect(conn, self.path))

    def _read(self, query: Callable[[sqlite3.Connection], _T]) -> _T:
        for _ in range(2):
            immutable = not os.path.exists(self.path + "-wal")
            conn = migrations.connect_readonly(self.path, immutable=immutable)
            try:
                result = query(conn)
            except sqlite3.Error as exc:
                raise migrations.store_error(self.path, "read", exc) from exc
            finally:
                conn.close()
            if not immutable or not os.path.exists(self.path + "-wal"):
                return result
        return result

    def stats(self, now: float) -> StoreStats:
        def query(conn: sqlite3.Connection) -> StoreStats:
            queued, nbytes = conn.execute(
                "SELECT count(*), CAST(total(size) AS INTEGER) FROM queue INDEXED BY queue_ready"
            ).fetchone()
            (dead,) = conn.execute("SELECT count(*) FROM dead_letters").fetchone()
            (leased,) = conn.execute(  # leases of files written by older releases
                "SELECT count(*) FROM queue INDEXED BY queue_leased "
                "WHERE lease_id != 0 AND lease_expires_at > ?", (now,)
            ).fetchone()
            return _stats(conn, now, queued, nbytes, dead, leased)

        return self._read(query)

    def dead_letters(self, limit: int, offset: int = 0) -> List[DeadLetter]:
        return self._read(lambda conn: _dead_letter_page(conn, limit, offset))

    def close(self) -> None:
        """Nothing to release: every call closes its own connection."""

    def __enter__(self) -> "ReadOnlyStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------- shared queries
def _stats(conn: sqlite3.Connection, now: float, queued: int, nbytes: int, dead: int,
           leased: int) -> StoreStats:
    oldest = conn.execute("SELECT enqueued_at FROM queue ORDER BY id LIMIT 1").fetchone()
    return StoreStats(
        queued=queued, queued_bytes=nbytes, leased=leased, dead_letters=dead,
        oldest_enqueued_at=None if oldest is None else oldest[0],
    )


def _dead_letter_page(conn: sqlite3.Connection, limit: int, offset: int) -> List[DeadLetter]:
    return [
        DeadLetter(id=r[0], payload=bytes(r[1]), enqueued_at=r[2], attempts=r[3],
                   reason=r[4], last_status=r[5], dead_at=r[6])
        for r in conn.execute(_SQL_DEAD_PAGE, (limit, offset))
    ]
