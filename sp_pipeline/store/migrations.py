"""The store file: how it is recognised as ours, opened, configured and migrated.

A store file is ours when its header says SQLite and its ``application_id`` (header
bytes 68..71, big-endian) is ``APPLICATION_ID``. Its schema version is ``PRAGMA
user_version``: 0 for a file we have not initialised yet, ``N`` after migration ``N``.
Migrations run in order inside one write transaction, each exactly once; a file whose
version is newer than ``LATEST_VERSION`` was written by a newer sp-pipeline and is
refused, untouched.

Layout after migration 1 (small columns first and ``payload`` last, so a scan that
reads only the small columns never touches overflow pages of a large payload)::

    queue(id INTEGER PRIMARY KEY AUTOINCREMENT,  -- age order; never reused, so a stale
                                                 -- ack cannot delete a newer event
          size INTEGER,             -- len(payload)
          enqueued_at REAL,
          attempts INTEGER,         -- failed deliveries so far
          next_attempt_at REAL,     -- 0: waiting for its first lease; after a release,
                                    -- the retry time (leases themselves live in the
                                    -- writer's memory, see store/sqlite.py)
          lease_id INTEGER,         -- unused since leases moved to memory: 0 (a file
          lease_expires_at REAL,    -- from an older writer may hold leases: freed)
          payload BLOB)
      index queue_ready(next_attempt_at, id, size)     -- lease scans; sum(size) on open
      index queue_leased(lease_expires_at) WHERE lease_id != 0   -- stats().leased
    dead_letters(id INTEGER PRIMARY KEY AUTOINCREMENT, size, enqueued_at, attempts,
                 reason TEXT, last_status INTEGER, dead_at REAL, payload BLOB)
    producers(producer_id BLOB PRIMARY KEY, last_seq INTEGER, updated_at REAL)
"""

from __future__ import annotations

import os
import sqlite3
import struct
import urllib.parse
from typing import Callable, FrozenSet, List, Tuple

from sp_pipeline.errors import StoreError, StoreFull, StoreNotOurs

SQLITE_FULL = 13
SQLITE_CORRUPT = 11
SQLITE_NOTADB = 26
BUSY_TIMEOUT_MS = 5000
CACHE_KIB = 8192  # page cache per connection; memory stays flat whatever the backlog

# "spPL" in ASCII: marks a SQLite file as an sp-pipeline store.
APPLICATION_ID = 0x7370504C

SQLITE_MAGIC = b"SQLite format 3\x00"
_HEADER_BYTES = 100
_APP_ID_OFFSET = 68

_MIGRATION_1 = (
    """CREATE TABLE queue(
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        size INTEGER NOT NULL,
        enqueued_at REAL NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL DEFAULT 0,
        lease_id INTEGER NOT NULL DEFAULT 0,
        lease_expires_at REAL NOT NULL DEFAULT 0,
        payload BLOB NOT NULL)""",
    "CREATE INDEX queue_ready ON queue(next_attempt_at, id, size)",
    "CREATE INDEX queue_leased ON queue(lease_expires_at) WHERE lease_id != 0",
    """CREATE TABLE dead_letters(
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        size INTEGER NOT NULL,
        enqueued_at REAL NOT NULL,
        attempts INTEGER NOT NULL,
        reason TEXT NOT NULL,
        last_status INTEGER NOT NULL,
        dead_at REAL NOT NULL,
        payload BLOB NOT NULL)""",
    """CREATE TABLE producers(
        producer_id BLOB PRIMARY KEY,
        last_seq INTEGER NOT NULL,
        updated_at REAL NOT NULL) WITHOUT ROWID""",
)


def _statements(sql: Tuple[str, ...]) -> Callable[[sqlite3.Connection], None]:
    def apply(conn: sqlite3.Connection) -> None:
        for statement in sql:
            conn.execute(statement)

    return apply


# MIGRATIONS[i] takes a file from version i to version i + 1. Append, never edit.
MIGRATIONS: List[Callable[[sqlite3.Connection], None]] = [_statements(_MIGRATION_1)]
LATEST_VERSION = len(MIGRATIONS)

# Tables a store of LATEST_VERSION may hold (sqlite_* are SQLite's own).
KNOWN_TABLES: FrozenSet[str] = frozenset({"queue", "dead_letters", "producers"})


def check_header(path: str) -> bool:
    """Decide from the file's first 100 bytes, without SQLite, whether ``path`` may be
    opened as a store. Returns False for an empty file (a new store), True for a SQLite
    file whose application_id is ours; raises ``StoreNotOurs`` for anything else
    (another format, or SQLite belonging to another application) and ``StoreError``
    when the file cannot be read. Reads only: the file is never modified.
    """
    try:
        with open(path, "rb") as f:
            header = f.read(_HEADER_BYTES)
    except OSError as exc:
        raise StoreError(f"store {path}: cannot read: {exc.strerror or exc}") from exc
    if not header:
        return False
    if len(header) < _HEADER_BYTES or not header.startswith(SQLITE_MAGIC):
        raise StoreNotOurs(f"store {path}: not a SQLite database; left untouched")
    (app_id,) = struct.unpack_from(">I", header, _APP_ID_OFFSET)
    if app_id != APPLICATION_ID:
        raise StoreNotOurs(
            f"store {path}: SQLite database of another application "
            f"(application_id {app_id:#010x}, ours is {APPLICATION_ID:#010x}); left untouched"
        )
    return True


def inspect(conn: sqlite3.Connection, path: str) -> int:
    """Check an open connection to one of our files (read-only is enough) and return its
    schema version. Raises ``StoreError`` for a newer version than we know and
    ``StoreNotOurs`` for tables we do not know."""
    (app_id,) = conn.execute("PRAGMA application_id").fetchone()
    if app_id != APPLICATION_ID:
        raise StoreNotOurs(f"store {path}: application_id {app_id:#010x} is not ours; left untouched")
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    if version > LATEST_VERSION:
        raise StoreError(
            f"store {path}: schema version {version} is newer than this sp-pipeline "
            f"knows ({LATEST_VERSION}); upgrade sp-pipeline. File left untouched"
        )
    tables = {
        row[0]
        for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        if not row[0].startswith("sqlite_")
    }
    unknown = tables - KNOWN_TABLES
    if unknown:
        raise StoreNotOurs(f"store {path}: unknown tables {sorted(unknown)}; left untouched")
    return int(version)


def migrate(conn: sqlite3.Connection, path: str) -> int:
    """Bring the schema to ``LATEST_VERSION`` inside the caller's open write
    transaction, stamping ``application_id`` and ``user_version``. Returns the number
    of migrations applied (0 when already current)."""
    version = inspect_version_for_write(conn, path)
    if version == LATEST_VERSION:
        return 0  # nothing to write: an up-to-date file is not touched
    for step in MIGRATIONS[version:]:
        step(conn)
    # PRAGMA values cannot be bound parameters; both are our own integer constants.
    conn.execute(f"PRAGMA application_id = {int(APPLICATION_ID)}")
    conn.execute(f"PRAGMA user_version = {int(LATEST_VERSION)}")
    return LATEST_VERSION - version


def inspect_version_for_write(conn: sqlite3.Connection, path: str) -> int:
    """Like ``inspect`` but accepts a brand-new, empty database (application_id 0, no
    tables), which ``migrate`` is about to stamp as ours."""
    (app_id,) = conn.execute("PRAGMA application_id").fetchone()
    (objects,) = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    if app_id == 0 and objects == 0:
        return 0
    return inspect(conn, path)


def file_exists(path: str) -> bool:
    """Whether ``path`` names an existing file (a directory is an error)."""
    if os.path.isdir(path):
        raise StoreError(f"store {path}: is a directory")
    return os.path.exists(path)


def store_error(path: str, what: str, exc: sqlite3.Error) -> StoreError:
    """The StoreError for a SQLite error: ``StoreFull`` when the disk or the page limit
    is reached; a "damaged" message when SQLite finds the file corrupt (it is refused,
    never repaired or replaced in place); otherwise SQLite's own words."""
    code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF  # primary code
    if code == SQLITE_FULL:
        return StoreFull(f"store {path}: disk or database full during {what}; rolled back ({exc})")
    if code in (SQLITE_CORRUPT, SQLITE_NOTADB):
        return StoreError(
            f"store {path}: the file is damaged ({exc}, during {what}); left untouched. "
            "Restore it from a backup, or move it aside (sqlite3's .recover salvages "
            "what rows it can) and start again on a new file"
        )
    return StoreError(f"store {path}: {what} failed: {exc}")


def connect_readonly(path: str, immutable: bool = False) -> sqlite3.Connection:
    uri = "file:" + urllib.parse.quote(path) + "?mode=ro" + ("&immutable=1" if immutable else "")
    try:
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
        conn.execute("PRAGMA schema_version").fetchone()  # forces the file to be read
    except sqlite3.Error as exc:
        raise StoreError(f"store {path}: cannot open read-only: {exc}") from exc
    return conn


def open_writable(path: str, synchronous: int) -> sqlite3.Connection:
    """Check the file is ours (or create it) before anything is written, then connect,
    migrate, switch to WAL and verify the pragmas."""
    if file_exists(path) and check_header(path):
        # Without a -wal file the main file holds everything, and an immutable read
        # creates no -wal/-shm beside a file we may be about to refuse.
        probe = connect_readonly(path, immutable=not os.path.exists(path + "-wal"))
        try:
            inspect(probe, path)
        except sqlite3.Error as exc:
            raise store_error(path, "open", exc) from exc
        finally:
            probe.close()
    else:
        create_file(path)
    check_access(path)
    try:
        conn = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
    except sqlite3.Error as exc:
        raise StoreError(f"store {path}: cannot open: {exc}") from exc
    try:
        configure(conn, path, synchronous)
    except BaseException:
        conn.close()
        raise
    return conn


def create_file(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return  # an empty file, or one that appeared since: SQLite and inspect() decide
    except OSError as exc:
        raise StoreError(f"store {path}: cannot create: {exc.strerror or exc}") from exc
    os.close(fd)


def check_access(path: str) -> None:
    if not os.access(path, os.R_OK | os.W_OK):
        raise StoreError(f"store {path}: cannot open for writing: permission denied")
    directory = os.path.dirname(path)
    if not os.access(directory, os.W_OK | os.X_OK):
        raise StoreError(
            f"store {path}: directory {directory} is not writable "
            "(SQLite needs to create the -wal and -shm files there)"
        )


def configure(conn: sqlite3.Connection, path: str, synchronous: int) -> None:
    expected = {
        "busy_timeout": BUSY_TIMEOUT_MS,
        "foreign_keys": 0,
        "cache_size": -CACHE_KIB,
        "temp_store": 2,  # MEMORY
        "synchronous": synchronous,
    }
    try:
        for name, value in expected.items():
            conn.execute(f"PRAGMA {name} = {int(value)}")
        conn.execute("BEGIN IMMEDIATE")
        try:
            migrate(conn, path)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        # WAL only now: the first transaction (application_id, schema) went through the
        # rollback journal, so the file's header says "ours" even after a crash.
        conn.execute("PRAGMA journal_mode = WAL").fetchone()
        conn.execute("PRAGMA wal_autocheckpoint = 0").fetchone()  # the writer checkpoints
    except sqlite3.Error as exc:
        raise store_error(path, "open", exc) from exc
    expected.update(journal_mode="wal", wal_autocheckpoint=0)
    for name, value in expected.items():
        (actual,) = conn.execute(f"PRAGMA {name}").fetchone()
        if actual != value:
            raise StoreError(f"store {path}: PRAGMA {name} is {actual!r} after setting {value!r}")
