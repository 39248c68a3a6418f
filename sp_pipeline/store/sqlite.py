"""The SQLite store: the writer's queue, dead letters and producer seqs in one file.

One process (the writer) opens it for writing; ``ReadOnlyStore`` serves the ``status``
and ``dead-letters list`` commands through a ``mode=ro`` connection. The table layout
is drawn in ``migrations.py``.

How ``lease()`` stays fast with a million-row backlog. Eligible means
``next_attempt_at <= now``: a lease moves ``next_attempt_at`` to the lease's expiry and
a release to the retry time, so one indexed column answers "eligible?". Rows never
touched have ``next_attempt_at = 0``. The index ``queue_ready(next_attempt_at, id,
size)`` then yields, without reading the table, (a) untouched rows in id order (an
equality range, O(batch)) and (b) touched rows that are eligible again (a range over
``0 < next_attempt_at <= now``, sorted by id: O(eligible touched rows), which is small
except just after a long collector outage). The two streams are merged by id, so leased
and retry-waiting rows at the head of the queue are never scanned one by one.

Counters (queued events and bytes, dead letters) live in memory: read once on open,
updated by every write, and restored from a snapshot taken at ``begin()`` when the
transaction rolls back.

Errors: any ``sqlite3.Error`` inside a write rolls the whole open transaction back and
raises ``StoreFull`` (SQLITE_FULL: disk or ``max_page_count`` reached) or
``StoreError``; the store stays usable.
"""

from __future__ import annotations

import heapq
import itertools
import os
import sqlite3
from contextlib import contextmanager
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, TypeVar

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
_SQL_FRESH = (
    "SELECT id, size FROM queue INDEXED BY queue_ready "
    "WHERE next_attempt_at = 0 ORDER BY id LIMIT ?"
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
# No RETURNING: an UPDATE/DELETE ... RETURNING on these indexed rows measured 3-4x
# slower than the statement followed by a SELECT of the same rows.
_SQL_LEASE = (
    "UPDATE queue SET lease_id = ?, lease_expires_at = ?, next_attempt_at = ? "
    f"WHERE id IN {_IN}"
)
_SQL_EXPIRED_COUNT = f"SELECT count(*) FROM queue WHERE lease_id != 0 AND id IN {_IN}"
_SQL_LEASED_ROWS = f"SELECT id, enqueued_at, attempts, payload FROM queue WHERE id IN {_IN}"
_SQL_SIZES = f"SELECT count(*), CAST(total(size) AS INTEGER) FROM queue WHERE id IN {_IN}"
_SQL_ACK = f"DELETE FROM queue WHERE id IN {_IN}"
_SQL_RELEASE = (
    "UPDATE queue SET attempts = attempts + 1, next_attempt_at = ?, lease_id = 0, "
    f"lease_expires_at = 0 WHERE lease_id = ? AND id IN {_IN}"
)
_SQL_COPY_DEAD = (
    "INSERT INTO dead_letters(size, enqueued_at, attempts, reason, last_status, dead_at, "
    "payload) SELECT size, enqueued_at, attempts + ?, ?, ?, ?, payload FROM queue "
    f"WHERE lease_id = ? AND id IN {_IN} ORDER BY id"
)
_SQL_HELD_SIZES = (
    "SELECT count(*), CAST(total(size) AS INTEGER) FROM queue "
    f"WHERE lease_id = ? AND id IN {_IN}"
)
_SQL_DELETE_HELD = f"DELETE FROM queue WHERE lease_id = ? AND id IN {_IN}"
_SQL_DROP_CANDIDATES = (
    "SELECT id, size, lease_id FROM queue "
    "WHERE lease_id = 0 OR lease_expires_at <= ? ORDER BY id"
)
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
        self._queued, self._queued_bytes = self._conn.execute(
            "SELECT count(*), CAST(total(size) AS INTEGER) FROM queue INDEXED BY queue_ready"
        ).fetchone()
        (self._dead,) = self._conn.execute("SELECT count(*) FROM dead_letters").fetchone()
        self._evicting = 0
        self._saved: Tuple[int, int, int] = (self._queued, self._queued_bytes, self._dead)

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
        by_lease: dict[int, List[int]] = {}
        cursor = self._conn.execute(_SQL_DROP_CANDIDATES, (now,))
        for row_id, size, lease_id in cursor:
            if excess_events <= 0 and excess_bytes <= 0:
                break
            by_lease.setdefault(lease_id, []).append(row_id)
            excess_events -= 1
            excess_bytes -= size
        cursor.close()
        return sum(
            self._move_dead(lease_id, ids, "store_full", 0, now, add_attempts=0)
            for lease_id, ids in by_lease.items()
        )

    def lease(
        self,
        lease_id: int,
        max_events: int,
        max_bytes: int,
        now: float,
        lease_seconds: float,
    ) -> List[QueuedEvent]:
        if lease_id == 0:
            raise ValueError("lease_id: 0 means 'not leased'; use a non-zero id")
        if max_events < 1:
            return []
        with self._write("lease"):
            candidates = self._eligible(max_events, now)
            if not candidates:
                return []
            count = batching.take([size for _, size in candidates], max_bytes, max_events)
            chosen = [row_id for row_id, _ in candidates[:count]]
            expires = now + lease_seconds
            rows: List[Tuple[int, float, int, bytes]] = []
            for part in _chunks(chosen):
                # A chosen row that still names a lease is coming off an expired one
                # (release clears lease_id; ack and dead-letter delete the row).
                (expired,) = self._conn.execute(_SQL_EXPIRED_COUNT, part).fetchone()
                self.expired_leased += expired
                self._conn.execute(_SQL_LEASE, (lease_id, expires, expires, *part))
                rows.extend(self._conn.execute(_SQL_LEASED_ROWS, part))
        rows.sort()
        return [QueuedEvent(id=r[0], payload=bytes(r[3]), enqueued_at=r[1], attempts=r[2]) for r in rows]

    def _eligible(self, limit: int, now: float) -> List[Tuple[int, int]]:
        """Up to ``limit`` (id, size) of eligible rows, oldest first: never-touched rows
        merged with touched rows that are due again. Touched rows younger than the
        ``limit``-th untouched one cannot make the cut, so the search stops there."""
        fresh = self._conn.execute(_SQL_FRESH, (limit,)).fetchall()
        bound = fresh[-1][0] if len(fresh) == limit else _MAX_ID
        probe = limit * _PROBE_FACTOR
        (due,) = self._conn.execute(_SQL_DUE_COUNT, (now, bound, probe)).fetchone()
        if due == 0:
            return fresh
        # Few due rows: take them all from the index and sort (cost ~ due). Many (just
        # after an outage): walk the table in id order, where they are dense.
        sql = _SQL_DUE_BY_INDEX if due < probe else _SQL_DUE_BY_ID
        retry = self._conn.execute(sql, (now, bound, limit)).fetchall()
        return list(itertools.islice(heapq.merge(retry, fresh), limit))

    def ack(self, lease_id: int, ids: Sequence[int]) -> int:
        deleted = 0
        with self._write("ack"):
            for part in _chunks(ids):
                count, nbytes = self._conn.execute(_SQL_SIZES, part).fetchone()
                self._conn.execute(_SQL_ACK, part)
                deleted += count
                self._queued -= count
                self._queued_bytes -= nbytes
        return deleted

    def release(self, lease_id: int, ids: Sequence[int], retry_at: float, now: float) -> int:
        if lease_id == 0:
            return 0  # rows with lease_id 0 are not held by anyone
        released = 0
        with self._write("release"):
            for part in _chunks(ids):
                released += self._conn.execute(_SQL_RELEASE, (retry_at, lease_id, *part)).rowcount
        return released

    def dead_letter(
        self, lease_id: int, ids: Sequence[int], reason: str, status: int, now: float
    ) -> int:
        with self._write("dead_letter"):
            return self._move_dead(lease_id, ids, reason, status, now, add_attempts=1)

    def _move_dead(
        self, lease_id: int, ids: Sequence[int], reason: str, status: int, now: float,
        add_attempts: int,
    ) -> int:
        """Move rows held by ``lease_id`` among ``ids`` to dead letters, in id order,
        then evict the oldest dead letters over the cap. Returns rows moved."""
        moved = 0
        for part in _chunks(ids):
            count, nbytes = self._conn.execute(_SQL_HELD_SIZES, (lease_id, *part)).fetchone()
            if not count:
                continue
            self._conn.execute(_SQL_COPY_DEAD, (add_attempts, reason, status, now, lease_id, *part))
            self._conn.execute(_SQL_DELETE_HELD, (lease_id, *part))
            moved += count
            self._queued -= count
            self._queued_bytes -= nbytes
        self._dead += moved
        over = self._dead - self.max_dead_letters
        if over > 0:
            self._conn.execute(_SQL_EVICT_DEAD, (over,))
            self._dead -= over
            self._evicting += over
        return moved

    def clear_leases(self) -> int:
        with self._write("clear_leases"):
            return self._conn.execute(
                # next_attempt_at of a leased row is its lease's expiry: 0 frees it now.
                "UPDATE queue SET lease_id = 0, lease_expires_at = 0, next_attempt_at = 0 "
                "WHERE lease_id != 0"
            ).rowcount

    # ------------------------------------------------------------ reads
    def stats(self, now: float) -> StoreStats:
        try:
            return _stats(self._conn, now, self._queued, self._queued_bytes, self._dead)
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
            return _stats(conn, now, queued, nbytes, dead)

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
def _stats(conn: sqlite3.Connection, now: float, queued: int, nbytes: int, dead: int) -> StoreStats:
    (leased,) = conn.execute(
        "SELECT count(*) FROM queue INDEXED BY queue_leased "
        "WHERE lease_id != 0 AND lease_expires_at > ?", (now,)
    ).fetchone()
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
