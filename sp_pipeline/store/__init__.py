"""Durable storage for the writer: the ``Store`` contract and its SQLite implementation.

``open_store(settings)`` is how the writer gets its store; ``open_readonly(path)`` is
how the ``status`` and ``dead-letters list`` commands look at one without writing.
"""

from __future__ import annotations

from sp_pipeline.config import Settings
from sp_pipeline.store.base import DeadLetter, EnqueueResult, QueuedEvent, Store, StoreStats
from sp_pipeline.store.sqlite import ReadOnlyStore, SQLiteStore

__all__ = [
    "DeadLetter",
    "EnqueueResult",
    "QueuedEvent",
    "ReadOnlyStore",
    "SQLiteStore",
    "Store",
    "StoreStats",
    "open_readonly",
    "open_store",
]


def open_store(settings: Settings) -> SQLiteStore:
    """The writer's store, per ``store``, ``synchronous``, ``max_queued_events``,
    ``max_queued_bytes``, ``when_full`` and ``max_dead_letters``. Raises ``StoreError`` (or ``StoreNotOurs``)
    when the file cannot be used; a missing file is created (its directory must exist)."""
    return SQLiteStore(
        settings.store,
        synchronous=settings.synchronous,
        max_events=settings.max_queued_events,
        max_bytes=settings.max_queued_bytes,
        when_full=settings.when_full,
        max_dead_letters=settings.max_dead_letters,
    )


def open_readonly(path: str) -> ReadOnlyStore:
    """A read-only view (``stats(now)``, ``dead_letters(limit, offset)``) that never
    creates or modifies the database file. Raises ``StoreError`` when there is no store
    at ``path`` and ``StoreNotOurs`` when the file is not one."""
    return ReadOnlyStore(path)
