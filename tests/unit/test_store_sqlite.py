"""What only the SQLite store promises: the file it writes, the files it refuses, and
what survives a crash, a full disk and a newer schema. Real files in tmp_path."""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict

import pytest

from sp_pipeline import config
from sp_pipeline.errors import StoreError, StoreFull, StoreNotOurs
from sp_pipeline.store import SQLiteStore, open_readonly, open_store
from sp_pipeline.store import migrations, sqlite as store_sqlite

T0 = 1_700_000_000.0


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def listing(directory: Path) -> Dict[str, str]:
    return {p.name: digest(p) for p in directory.iterdir()}


def make_store(path: Path, rows: int = 3, **kw) -> None:
    with SQLiteStore(str(path), **kw) as store:
        store.enqueue([b'{"e":"pv","n":%d}' % i for i in range(rows)], T0)
        store.commit()


def raw(path: Path, sql: str) -> list:
    conn = sqlite3.connect(str(path), isolation_level=None)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


# ------------------------------------------------------------------ the file we write
@pytest.mark.parametrize("synchronous, level", [("normal", 1), ("full", 2)])
def test_pragmas_are_set_and_verified(tmp_path: Path, synchronous: str, level: int) -> None:
    with SQLiteStore(str(tmp_path / "s.db"), synchronous=synchronous) as store:
        conn = store._conn
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("PRAGMA synchronous").fetchone() == (level,)
        assert conn.execute("PRAGMA wal_autocheckpoint").fetchone() == (0,)
        assert conn.execute("PRAGMA foreign_keys").fetchone() == (0,)
    assert raw(tmp_path / "s.db", "PRAGMA application_id") == [(migrations.APPLICATION_ID,)]
    assert raw(tmp_path / "s.db", "PRAGMA user_version") == [(migrations.LATEST_VERSION,)]


def test_new_file_is_private(tmp_path: Path) -> None:
    make_store(tmp_path / "s.db")
    assert (tmp_path / "s.db").stat().st_mode & 0o777 == 0o600


def test_open_store_maps_settings(tmp_path: Path) -> None:
    settings = config.defaults().replace(
        store=str(tmp_path / "x.db"), synchronous="full", max_queued_events=7,
        max_queued_bytes=999, when_full="drop_oldest")
    with open_store(settings) as store:
        assert (store.max_events, store.max_bytes, store.when_full) == (7, 999, "drop_oldest")
        assert store._conn.execute("PRAGMA synchronous").fetchone() == (2,)


def test_lease_queries_search_an_index_never_scan_the_table(tmp_path: Path) -> None:
    with SQLiteStore(str(tmp_path / "s.db")) as store:
        queries = [(store_sqlite._SQL_DUE_COUNT, (T0, 9, 500)), (store_sqlite._SQL_FRESH, (0, 500)),
                   (store_sqlite._SQL_DUE_BY_INDEX, (T0, 9, 500))]
        for sql, args in queries:
            plan = " ".join(r[-1] for r in store._conn.execute("EXPLAIN QUERY PLAN " + sql, args))
            assert "COVERING INDEX queue_ready" in plan and "SCAN queue" not in plan, plan


# ------------------------------------------------------------------ files we refuse
def _refused_untouched(tmp_path: Path, path: Path, error: type) -> None:
    before = listing(tmp_path)
    with pytest.raises(error, match=str(path)):
        SQLiteStore(str(path))
    with pytest.raises(error, match=str(path)):
        open_readonly(str(path))
    assert listing(tmp_path) == before  # same bytes, and no -wal / -shm left beside it


def test_non_sqlite_file_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    path.write_bytes(b"these are my notes, not a database\n" * 10)
    _refused_untouched(tmp_path, path, StoreNotOurs)


@pytest.mark.parametrize("journal", ["delete", "wal"])
def test_foreign_sqlite_file_is_refused_untouched(tmp_path: Path, journal: str) -> None:
    path = tmp_path / "app.db"
    conn = sqlite3.connect(str(path), isolation_level=None)
    conn.execute(f"PRAGMA journal_mode = {journal}")
    conn.execute("CREATE TABLE users(id INTEGER PRIMARY KEY, name TEXT)")
    conn.execute("INSERT INTO users(name) VALUES ('ada')")
    conn.close()
    _refused_untouched(tmp_path, path, StoreNotOurs)


def test_our_id_with_unknown_tables_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    make_store(path)
    raw(path, "CREATE TABLE extra(x)")
    _refused_untouched(tmp_path, path, StoreNotOurs)


def test_newer_schema_version_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    make_store(path)
    raw(path, f"PRAGMA user_version = {migrations.LATEST_VERSION + 1}")
    before = listing(tmp_path)
    with pytest.raises(StoreError, match="newer"):
        SQLiteStore(str(path))
    assert listing(tmp_path) == before


def garble(path: Path, start: int, length: int) -> None:
    data = bytearray(path.read_bytes())
    for i in range(start, min(start + length, len(data))):
        data[i] = (data[i] * 7 + 13) & 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["index and table pages", "schema page"])
def test_damaged_store_is_refused_untouched_with_advice(tmp_path: Path, where: str) -> None:
    # One of our files, damaged on disk: a clear StoreError at open (never a raw
    # sqlite3 error, never a repair or a new file in its place).
    path = tmp_path / "s.db"
    make_store(path, rows=20_000)
    page = raw(path, "PRAGMA page_size")[0][0]
    if where == "schema page":
        garble(path, 100, page - 100)  # page 1 past the 100-byte header: sqlite_master
    else:
        garble(path, 2 * page, 20 * page)
    before = listing(tmp_path)
    with pytest.raises(StoreError) as err:
        SQLiteStore(str(path))
    assert not isinstance(err.value, StoreNotOurs)
    assert str(path) in str(err.value) and "damaged" in str(err.value)
    assert "left untouched" in str(err.value)
    assert listing(tmp_path) == before


def test_clear_leases_frees_rows_leased_on_disk_by_older_writers(tmp_path: Path) -> None:
    # Files written before leases moved to memory kept them in lease_id /
    # lease_expires_at, with next_attempt_at holding the expiry: such rows must come
    # back to the queue when a writer starts (clear_leases), in id order.
    path = tmp_path / "s.db"
    make_store(path, rows=5)
    raw(path, "UPDATE queue SET lease_id = 7, lease_expires_at = 4e9, next_attempt_at = 4e9 "
              "WHERE id IN (1, 2)")
    with SQLiteStore(str(path)) as store:
        assert store.clear_leases() == 2
        store.commit()
        batch = store.lease(1, 10, 1 << 20, T0, 30.0)
        store.commit()
        assert [e.id for e in batch] == [1, 2, 3, 4, 5]
    assert raw(path, "SELECT count(*) FROM queue WHERE lease_id != 0") == [(0,)]


def test_reopen_at_current_version_keeps_data_and_version(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    make_store(path, rows=4)
    with SQLiteStore(str(path)) as store:
        assert store.stats(T0).queued == 4
    assert raw(path, "PRAGMA user_version") == [(migrations.LATEST_VERSION,)]


def test_empty_file_becomes_a_store(tmp_path: Path) -> None:
    (tmp_path / "s.db").touch()
    make_store(tmp_path / "s.db", rows=1)
    assert raw(tmp_path / "s.db", "SELECT count(*) FROM queue") == [(1,)]


def test_missing_directory_names_path_and_reason(tmp_path: Path) -> None:
    path = tmp_path / "no" / "such" / "s.db"
    with pytest.raises(StoreError, match=r"s\.db.*No such file or directory"):
        SQLiteStore(str(path))
    with pytest.raises(StoreError, match="is a directory"):
        SQLiteStore(str(tmp_path))


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_unwritable_directory_names_path(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        with pytest.raises(StoreError, match=r"locked/s\.db.*Permission denied"):
            SQLiteStore(str(locked / "s.db"))
    finally:
        locked.chmod(0o700)


# ------------------------------------------------------------------ crash and full disk
_CHILD = """
import sys
from sp_pipeline.store import SQLiteStore
store = SQLiteStore(sys.argv[1])
store.enqueue([b'{"e":"pv","n":%d}' % i for i in range(100)], 1.0)
store.set_producer_seq(b"p", 100, 1.0)
store.commit()
store.begin()
# Large enough to spill uncommitted pages into the WAL before the kill.
store.enqueue([b'{"e":"pv","pad":"%s"}' % (b"x" * 1000) for _ in range(12000)], 2.0)
store.set_producer_seq(b"p", 12100, 2.0)
print("ready", flush=True)
sys.stdin.read()
"""


def test_sigkill_mid_transaction_keeps_committed_rows_only(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path)], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        assert os.path.getsize(str(path) + "-wal") > 4 << 20  # spilled, not committed
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        child.stdin.close()  # type: ignore[union-attr]
        child.stdout.close()  # type: ignore[union-attr]
    with open_readonly(str(path)) as view:
        assert view.stats(3.0).queued == 100
    with SQLiteStore(str(path)) as store:
        assert store.stats(3.0).queued == 100
        assert store.producer_seq(b"p") == 100
        batch = store.lease(1, 500, 1 << 20, 3.0, 30.0)
        assert [e.payload for e in batch] == [b'{"e":"pv","n":%d}' % i for i in range(100)]


def test_disk_full_raises_store_full_rolls_back_and_recovers(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    make_store(path, rows=5)
    with SQLiteStore(str(path)) as store:
        (pages,) = store._conn.execute("PRAGMA page_count").fetchone()
        store._conn.execute(f"PRAGMA max_page_count = {pages + 4}")  # a disk about to fill
        store.begin()
        store.set_producer_seq(b"p", 1, T0)
        with pytest.raises(StoreFull, match=str(path)):
            store.enqueue([b'{"e":"pv","pad":"%s"}' % (b"x" * 4000)] * 50, T0)
        assert not store._conn.in_transaction
        assert store.stats(T0).queued == 5 and store.producer_seq(b"p") is None
        store._conn.execute("PRAGMA max_page_count = 1073741823")  # space is back
        store.enqueue([b'{"e":"pv","pad":"%s"}' % (b"x" * 4000)] * 50, T0)
        store.commit()
        assert store.stats(T0).queued == 55
    assert raw(path, "PRAGMA integrity_check") == [("ok",)]


# ------------------------------------------------------------------ dead-letter cap, WAL
def test_dead_letters_over_the_cap_drop_their_oldest_and_are_counted(tmp_path: Path) -> None:
    with SQLiteStore(str(tmp_path / "s.db"), max_dead_letters=3) as store:
        store.enqueue([b'{"n":%d}' % i for i in range(6)], T0)
        ids = [e.id for e in store.lease(1, 10, 1 << 20, T0, 30.0)]
        store.dead_letter(1, ids[:5], "r", 0, T0)
        store.rollback()
        assert store.dead_letters_evicted == 0
        store.enqueue([b'{"n":%d}' % i for i in range(6)], T0)
        ids = [e.id for e in store.lease(1, 10, 1 << 20, T0, 30.0)]
        store.dead_letter(1, ids[:5], "r", 0, T0)
        assert store.dead_letters_evicted == 0  # counted at commit
        store.commit()
        assert store.dead_letters_evicted == 2
        assert [d.payload for d in store.dead_letters(10)] == [b'{"n":2}', b'{"n":3}', b'{"n":4}']
        assert store.stats(T0).dead_letters == 3


def test_checkpoint_and_wal_bytes(tmp_path: Path) -> None:
    with SQLiteStore(str(tmp_path / "s.db")) as store:
        store.enqueue([b'{"e":"pv"}'] * 1000, T0)
        with pytest.raises(StoreError, match="inside a transaction"):
            store.checkpoint()
        store.commit()
        assert store.wal_bytes() > 0
        frames, done = store.checkpoint()
        assert frames > 0 and done == frames
        store.checkpoint(truncate=True)
        assert store.wal_bytes() == 0


# ------------------------------------------------------------------ read-only view
def test_readonly_view_never_writes_and_sees_the_writer(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with pytest.raises(StoreError, match="no such file"):
        open_readonly(str(path))
    assert not path.exists()
    make_store(path, rows=3)
    before = digest(path)
    with open_readonly(str(path)) as view:
        assert view.stats(T0).queued == 3
    assert listing(tmp_path) == {"s.db": before}
    with SQLiteStore(str(path)) as store:
        ids = [e.id for e in store.lease(1, 2, 1 << 20, T0, 30.0)]
        store.dead_letter(1, ids[:1], "oversize", 0, T0)
        store.commit()
        with open_readonly(str(path)) as view:
            s = view.stats(T0)
            # Leases live in the writer's memory: the file shows none (status asks the
            # running writer for them).
            assert (s.queued, s.queued_bytes, s.leased, s.dead_letters) == (2, 32, 0, 1)
            (dead,) = view.dead_letters(10)
            assert (dead.reason, dead.attempts, dead.payload) == ("oversize", 1, b'{"e":"pv","n":0}')
        assert store.stats(T0).leased == 1
    conn = migrations.connect_readonly(str(path))
    try:
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            conn.execute("DELETE FROM queue")
    finally:
        conn.close()


def test_stats_with_counters_match_a_recount(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with SQLiteStore(str(path), max_events=50, when_full="drop_oldest") as store:
        deadline = time.monotonic() + 5  # a bounded loop, not a wait
        for round_ in range(20):
            assert time.monotonic() < deadline
            store.enqueue([b'{"r":%d,"i":%d}' % (round_, i) for i in range(7)], T0 + round_)
            batch = store.lease(round_ + 1, 5, 1 << 20, T0 + round_, 3.0)
            store.ack(round_ + 1, [e.id for e in batch[:2]])
            store.release(round_ + 1, [e.id for e in batch[2:3]], T0 + round_ + 2, T0 + round_)
            store.dead_letter(round_ + 1, [e.id for e in batch[3:4]], "r", 500, T0 + round_)
            store.commit()
        mine = store.stats(T0 + 100)
    with open_readonly(str(path)) as view:
        assert view.stats(T0 + 100) == mine


def test_lease_wire_gives_the_rows_of_lease_as_reply_tuples(tmp_path: Path) -> None:
    # The writer packs lease_wire()'s rows into the lease reply as they come: they must
    # be lease()'s rows, oldest first, with enqueued_at in integer milliseconds.
    with SQLiteStore(str(tmp_path / "a.db")) as a, SQLiteStore(str(tmp_path / "b.db")) as b:
        for store in (a, b):
            store.enqueue([b'{"e":"pv","n":%d}' % i for i in range(4)], T0 + 0.0015)
            store.enqueue([b'{"e":"se"}'], T0 + 2.25)
            store.commit()
        first = a.lease(1, 3, 1 << 20, T0 + 5, 30.0)
        wire_rows = b.lease_wire(1, 3, 1 << 20, T0 + 5, 30.0)
        assert wire_rows == [(e.id, e.payload, round(e.enqueued_at * 1000), e.attempts)
                             for e in first]
        assert all(type(r) is tuple and type(r[2]) is int for r in wire_rows)
        assert [r[0] for r in b.lease_wire(2, 10, 1 << 20, T0 + 5, 30.0)] == [4, 5]
        assert b.ack(1, [r[0] for r in wire_rows]) == 3
