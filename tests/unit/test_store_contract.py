"""The Store contract (sp_pipeline/store/base.py), one suite for every implementation.

Add an implementation by adding a factory to ``FACTORIES``: it takes a directory and the
cap keywords and returns a Store that, opened again on the same directory, sees what
was committed before. Time is passed as ``now``; nothing sleeps.
"""

from __future__ import annotations

import os
import json
from pathlib import Path
from typing import Any, Callable, Dict, List

import pytest

from sp_pipeline import batching
from sp_pipeline.store.base import Store
from sp_pipeline.store.sqlite import SQLiteStore

Factory = Callable[..., Store]

FACTORIES: Dict[str, Callable[[Path], Factory]] = {
    "sqlite": lambda d: lambda **kw: SQLiteStore(str(d / "events.db"), **kw),
}

T0 = 1_700_000_000.0
LEASE_S = 30.0


@pytest.fixture(params=sorted(FACTORIES))
def open_store(request: pytest.FixtureRequest, tmp_path: Path):
    """Opens stores on one directory; closes every one it opened."""
    opened: List[Store] = []
    factory = FACTORIES[request.param](tmp_path)

    def make(**kw: Any) -> Store:
        store = factory(**kw)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


@pytest.fixture
def store(open_store: Factory) -> Store:
    return open_store()


def ev(n: int, pad: int = 0) -> bytes:
    """A distinct event JSON of a predictable size."""
    return json.dumps({"e": "pv", "eid": f"ev-{n}", "pad": "x" * pad}, separators=(",", ":")).encode()


def fill(store: Store, count: int, now: float = T0, pad: int = 0) -> List[bytes]:
    payloads = [ev(i, pad) for i in range(count)]
    store.begin()
    result = store.enqueue(payloads, now)
    store.commit()
    assert result.stored == count and result.dropped == 0
    return payloads


def lease(store: Store, lease_id: int, n: int = 100, now: float = T0, nbytes: int = 1 << 20):
    batch = store.lease(lease_id, n, nbytes, now, LEASE_S)
    store.commit()
    return batch


# ------------------------------------------------------------------ order and limits
def test_lease_hands_out_oldest_first_in_enqueue_order(store: Store) -> None:
    payloads = fill(store, 10)
    first = lease(store, 1, n=4)
    second = lease(store, 2, n=4)
    assert [e.payload for e in first] == payloads[:4]
    assert [e.payload for e in second] == payloads[4:8]
    assert [e.id for e in first + second] == sorted(e.id for e in first + second)
    assert all(e.attempts == 0 and e.enqueued_at == T0 for e in first)


def test_lease_stops_at_max_events(store: Store) -> None:
    fill(store, 10)
    assert len(lease(store, 1, n=3)) == 3


def test_lease_stops_before_post_size_passes_max_bytes(store: Store) -> None:
    payloads = fill(store, 20, pad=100)
    limit = batching.post_size([len(p) for p in payloads[:5]]) + 10  # room for 5, not 6
    batch = store.lease(1, 100, limit, T0, LEASE_S)
    assert len(batch) == 5
    assert batching.post_size(len(e.payload) for e in batch) <= limit


def test_lone_oversize_event_is_leased_alone(store: Store) -> None:
    store.begin()
    store.enqueue([ev(0, pad=5000), ev(1)], T0)
    store.commit()
    batch = lease(store, 1, n=10, nbytes=1000)
    assert [e.payload for e in batch] == [ev(0, pad=5000)]
    assert [e.payload for e in lease(store, 2, n=10, nbytes=1000)] == [ev(1)]


def test_lease_fills_max_bytes_when_the_oldest_rows_are_small(store: Store) -> None:
    # Small rows ahead of large ones: the queue's mean size says few rows fit, the
    # oldest rows say many do. The lease takes what fits, not what the mean predicts.
    store.begin()
    store.enqueue([ev(i) for i in range(60)] + [ev(100 + i, pad=8000) for i in range(60)], T0)
    store.commit()
    limit = batching.post_size([len(ev(i)) for i in range(60)]) + 10
    batch = store.lease(1, 500, limit, T0, LEASE_S)
    assert [e.payload for e in batch] == [ev(i) for i in range(60)]


def test_lease_excludes_rows_under_an_unexpired_lease(store: Store) -> None:
    fill(store, 5)
    held = lease(store, 1, n=3)
    rest = lease(store, 2, n=10, now=T0 + 1)
    assert {e.id for e in held}.isdisjoint(e.id for e in rest)
    assert len(rest) == 2
    assert lease(store, 3, now=T0 + 2) == []


def test_expired_lease_makes_rows_eligible_again(store: Store) -> None:
    fill(store, 5)
    held = lease(store, 1, n=3)
    assert lease(store, 2, n=3, now=T0 + LEASE_S - 1) != held  # still held: the other 2
    again = lease(store, 3, n=3, now=T0 + LEASE_S + 1)
    assert [e.id for e in again] == [e.id for e in held]
    assert [e.payload for e in again] == [e.payload for e in held]


def test_lease_on_empty_store_returns_nothing(store: Store) -> None:
    assert lease(store, 1) == []


# ------------------------------------------------------------------ ack, release
def test_ack_deletes_rows_whatever_lease_holds_them(store: Store) -> None:
    fill(store, 4)
    old = lease(store, 1, n=2)
    newer = lease(store, 2, n=2, now=T0 + LEASE_S + 1)  # lease 1 expired: same rows
    assert [e.id for e in newer] == [e.id for e in old]
    assert store.ack(1, [e.id for e in old]) == 2  # delivered by the stale lease
    store.commit()
    assert store.ack(2, [e.id for e in newer]) == 0  # already gone
    store.commit()
    assert store.stats(T0 + LEASE_S + 1).queued == 2
    assert [e.payload for e in lease(store, 3, now=T0 + 100)] == [ev(2), ev(3)]


def test_release_counts_an_attempt_and_waits_for_retry_at(store: Store) -> None:
    fill(store, 3)
    held = lease(store, 1, n=2)
    ids = [e.id for e in held]
    assert store.release(1, ids, retry_at=T0 + 10, now=T0 + 1) == 2
    store.commit()
    before = lease(store, 2, n=10, now=T0 + 9)
    assert [e.payload for e in before] == [ev(2)]  # the released two are not due yet
    after = lease(store, 3, n=10, now=T0 + 10)
    assert [e.id for e in after] == ids
    assert all(e.attempts == 1 for e in after)


def test_released_rows_keep_their_place_ahead_of_younger_rows(store: Store) -> None:
    fill(store, 6)
    held = lease(store, 1, n=2)
    store.release(1, [e.id for e in held], retry_at=T0 + 5, now=T0)
    store.commit()
    assert [e.payload for e in lease(store, 2, n=2, now=T0 + 1)] == [ev(2), ev(3)]
    due = lease(store, 3, n=10, now=T0 + 6)
    assert [e.payload for e in due] == [ev(0), ev(1), ev(4), ev(5)]


def test_release_by_a_stale_lease_is_ignored(store: Store) -> None:
    fill(store, 2)
    old = lease(store, 1, n=2)
    new = lease(store, 2, n=2, now=T0 + LEASE_S + 1)
    ids = [e.id for e in old]
    assert store.release(1, ids, retry_at=T0 + 1000, now=T0 + LEASE_S + 2) == 0
    store.commit()
    assert store.release(2, [e.id for e in new], retry_at=T0 + 40, now=T0 + LEASE_S + 2) == 2
    store.commit()
    again = lease(store, 3, n=2, now=T0 + 40)
    assert [e.attempts for e in again] == [1, 1]  # one release counted, not two


def test_clear_leases_frees_every_leased_row(store: Store) -> None:
    fill(store, 3)
    lease(store, 1, n=2)
    assert store.clear_leases() == 2
    store.commit()
    assert store.stats(T0).leased == 0
    assert len(lease(store, 2, n=10, now=T0)) == 3


# ------------------------------------------------------------------ dead letters
def test_dead_letter_moves_rows_with_reason_status_and_attempt(store: Store) -> None:
    payloads = fill(store, 3)
    held = lease(store, 1, n=2)
    store.release(1, [held[0].id], retry_at=T0, now=T0)
    store.commit()
    held = lease(store, 2, n=2, now=T0 + 1)  # event 0 (second attempt) and event 2
    assert store.dead_letter(2, [e.id for e in held], "status_400", 400, now=T0 + 2) == 2
    store.commit()
    dead = store.dead_letters(10)
    assert [d.payload for d in dead] == [payloads[0], payloads[2]]
    assert [(d.reason, d.last_status, d.attempts) for d in dead] == [
        ("status_400", 400, 2), ("status_400", 400, 1)]
    assert all(d.dead_at == T0 + 2 and d.enqueued_at == T0 for d in dead)
    stats = store.stats(T0 + 2)
    assert (stats.queued, stats.dead_letters, stats.leased) == (1, 2, 1)  # event 1: lease 1


def test_dead_letter_by_another_lease_is_ignored_and_zero_means_unleased(store: Store) -> None:
    fill(store, 2)
    held = lease(store, 1, n=1)
    assert store.dead_letter(9, [held[0].id], "x", 0, T0) == 0
    assert store.dead_letter(0, [held[0].id], "x", 0, T0) == 0  # it is leased
    unleased_id = held[0].id + 1
    assert store.dead_letter(0, [unleased_id], "oversize", 0, T0) == 1
    store.commit()
    assert [d.reason for d in store.dead_letters(10)] == ["oversize"]


def test_dead_letters_page_oldest_first(store: Store) -> None:
    fill(store, 5)
    held = lease(store, 1, n=5)
    for e in reversed(held):  # moved youngest first: the page is still by queue age
        store.dead_letter(1, [e.id], "r", 0, T0)
    store.commit()
    page = store.dead_letters(2, offset=1)
    assert [d.payload for d in page] == [ev(3), ev(2)]


def test_requeue_dead_letters_puts_them_at_the_young_end(store: Store) -> None:
    fill(store, 3)
    held = lease(store, 1, n=1)
    store.dead_letter(1, [held[0].id], "status_500", 500, T0)
    store.commit()
    (dead,) = store.dead_letters(10)
    assert store.requeue_dead_letters([dead.id], now=T0 + 50) == 1
    store.commit()
    assert store.dead_letters(10) == []
    batch = lease(store, 2, n=10, now=T0 + 50)
    assert [e.payload for e in batch] == [ev(1), ev(2), ev(0)]
    assert batch[-1].attempts == 0 and batch[-1].enqueued_at == T0 + 50
    assert store.stats(T0 + 50).queued == 3


def test_requeue_and_purge_all_dead_letters(store: Store) -> None:
    fill(store, 4)
    ids = [e.id for e in lease(store, 1, n=4)]
    store.dead_letter(1, ids, "r", 0, T0)
    store.commit()
    assert store.purge_dead_letters([store.dead_letters(1)[0].id]) == 1
    assert store.requeue_dead_letters(None, now=T0 + 1) == 3
    store.commit()
    assert store.stats(T0 + 1).dead_letters == 0
    assert [e.payload for e in lease(store, 2, now=T0 + 1)] == [ev(1), ev(2), ev(3)]
    ids = [e.id for e in lease(store, 3, now=T0 + LEASE_S + 2)]
    store.dead_letter(3, ids, "r", 0, T0 + 2)
    assert store.purge_dead_letters(None) == 3
    store.commit()
    assert store.dead_letters(10) == [] and store.stats(T0 + 2).dead_letters == 0


# ------------------------------------------------------------------ caps
def test_block_policy_reports_no_room_and_stores_anyway(open_store: Factory) -> None:
    store = open_store(max_events=3, max_bytes=10_000, when_full="block")
    assert store.has_room(3, 100)
    fill(store, 2)
    assert store.has_room(1, 10) and not store.has_room(2, 10)
    assert not store.has_room(1, 10_000)
    store.begin()
    assert store.enqueue([ev(10), ev(11)], T0).dropped == 0
    store.commit()
    assert store.stats(T0).queued == 4


def test_drop_oldest_dead_letters_oldest_unleased_rows(open_store: Factory) -> None:
    store = open_store(max_events=4, max_bytes=10_000, when_full="drop_oldest")
    payloads = fill(store, 4)
    held = lease(store, 1, n=1)  # the oldest is leased: it is not dropped
    store.begin()
    result = store.enqueue([ev(10), ev(11)], T0 + 1)
    store.commit()
    assert (result.stored, result.dropped) == (2, 2)
    dead = store.dead_letters(10)
    assert [d.payload for d in dead] == payloads[1:3]
    assert {d.reason for d in dead} == {"store_full"}
    assert store.stats(T0 + 1).queued == 4
    rest = lease(store, 2, now=T0 + 1)
    assert [e.payload for e in rest] == [payloads[3], ev(10), ev(11)]
    assert held[0].payload == payloads[0]


def test_drop_oldest_by_bytes(open_store: Factory) -> None:
    size = len(ev(0, pad=100))
    store = open_store(max_events=1000, max_bytes=3 * size, when_full="drop_oldest")
    fill(store, 3, pad=100)
    store.begin()
    assert store.enqueue([ev(7, pad=100)], T0).dropped == 1
    store.commit()
    assert store.stats(T0).queued_bytes == 3 * size


# ------------------------------------------------------------------ stats, seqs, tx
def test_stats_track_every_change(store: Store) -> None:
    s = store.stats(T0)
    assert (s.queued, s.queued_bytes, s.leased, s.dead_letters, s.oldest_enqueued_at) == (
        0, 0, 0, 0, None)
    payloads = fill(store, 5, now=T0 + 3)
    held = lease(store, 1, n=3, now=T0 + 4)
    store.ack(1, [held[0].id])
    store.dead_letter(1, [held[1].id], "r", 0, T0 + 4)
    store.commit()
    s = store.stats(T0 + 4)
    assert (s.queued, s.leased, s.dead_letters) == (3, 1, 1)
    assert s.queued_bytes == sum(len(p) for p in payloads[2:])
    assert s.oldest_enqueued_at == T0 + 3
    assert store.stats(T0 + 4 + LEASE_S).leased == 0  # the remaining lease expired


def test_rollback_discards_writes_and_restores_stats(store: Store) -> None:
    fill(store, 2)
    store.begin()
    store.enqueue([ev(5)], T0)
    store.set_producer_seq(b"p1", 9, T0)
    assert store.stats(T0).queued == 3
    store.rollback()
    assert store.stats(T0).queued == 2
    assert store.producer_seq(b"p1") is None
    assert [e.payload for e in lease(store, 1)] == [ev(0), ev(1)]


def test_producer_seqs(store: Store) -> None:
    assert store.producer_seq(b"\x01" * 16) is None
    store.begin()
    store.set_producer_seq(b"\x01" * 16, 7, T0)
    store.set_producer_seq(b"\x02" * 16, 1, T0)
    store.set_producer_seq(b"\x01" * 16, 8, T0 + 1)
    store.commit()
    assert store.producer_seq(b"\x01" * 16) == 8
    assert store.producer_seq(b"\x02" * 16) == 1


def test_reopen_keeps_committed_data_only(open_store: Factory) -> None:
    store = open_store()
    payloads = fill(store, 3)
    lease(store, 1, n=1)
    store.begin()
    store.set_producer_seq(b"p", 3, T0)
    store.commit()
    store.begin()
    store.enqueue([ev(99)], T0)
    store.close()  # an open transaction is rolled back
    again = open_store()
    assert again.producer_seq(b"p") == 3
    assert again.stats(T0).queued == 3
    assert again.stats(T0).leased == 0  # a new store instance owns no leases
    again.clear_leases()
    again.commit()
    assert [e.payload for e in lease(again, 2)] == payloads  # the leased row included


# ------------------------------------------------------------------ against a model
class _Model:
    """The contract as plain Python: rows in queue order, keyed by payload."""

    def __init__(self) -> None:
        self.rows: Dict[bytes, Dict[str, Any]] = {}  # insertion order = queue order
        self.dead: List[bytes] = []

    def eligible(self, now: float) -> List[bytes]:
        return [p for p, r in self.rows.items() if r["next_at"] <= now]

    def lease(self, lease_id: int, n: int, nbytes: int, now: float) -> List[bytes]:
        ready = self.eligible(now)
        taken = ready[: batching.take([len(p) for p in ready], nbytes, n)]
        for p in taken:
            self.rows[p].update(lease_id=lease_id, lease_exp=now + LEASE_S, next_at=now + LEASE_S)
        return taken


def _machine(factory: Callable[[Path], Factory]):
    import shutil
    import tempfile

    from hypothesis import strategies as st
    from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

    class StoreVersusModel(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.dir = Path(tempfile.mkdtemp())
            self.store = factory(self.dir)()
            self.model = _Model()
            self.now = T0
            self.counter = 0
            self.ids: Dict[bytes, int] = {}
            self.leases: Dict[int, List[bytes]] = {}

        def teardown(self) -> None:
            self.store.close()
            shutil.rmtree(self.dir)

        @rule(count=st.integers(1, 6), pad=st.integers(0, 60))
        def enqueue(self, count: int, pad: int) -> None:
            batch = [ev(self.counter + i, pad) for i in range(count)]
            self.counter += count
            self.store.enqueue(batch, self.now)
            self.store.commit()
            for p in batch:
                self.model.rows[p] = dict(attempts=0, next_at=0.0, lease_id=0, lease_exp=0.0)

        @rule(n=st.integers(1, 8), nbytes=st.integers(100, 600))
        def lease(self, n: int, nbytes: int) -> None:
            lease_id = len(self.leases) + 1
            got = self.store.lease(lease_id, n, nbytes, self.now, LEASE_S)
            self.store.commit()
            want = self.model.lease(lease_id, n, nbytes, self.now)
            assert [e.payload for e in got] == want
            assert [e.attempts for e in got] == [self.model.rows[p]["attempts"] for p in want]
            self.ids.update((e.payload, e.id) for e in got)
            self.leases[lease_id] = want

        @rule(data=st.data(), outcome=st.sampled_from(["ack", "release", "dead"]))
        def settle(self, data: Any, outcome: str) -> None:
            if not self.leases:
                return
            lease_id = data.draw(st.sampled_from(sorted(self.leases)))
            payloads = data.draw(st.lists(st.sampled_from(self.leases[lease_id]), unique=True)) \
                if self.leases[lease_id] else []
            ids = [self.ids[p] for p in payloads]
            held = [p for p in payloads if p in self.model.rows
                    and self.model.rows[p]["lease_id"] == lease_id]
            if outcome == "ack":
                present = [p for p in payloads if p in self.model.rows]
                assert self.store.ack(lease_id, ids) == len(present)
                for p in present:
                    del self.model.rows[p]
            elif outcome == "release":
                retry_at = self.now + data.draw(st.sampled_from([0.0, 5.0, 50.0]))
                assert self.store.release(lease_id, ids, retry_at, self.now) == len(held)
                for p in held:
                    self.model.rows[p].update(attempts=self.model.rows[p]["attempts"] + 1,
                                              next_at=retry_at, lease_id=0, lease_exp=0.0)
            else:
                assert self.store.dead_letter(lease_id, ids, "r", 500, self.now) == len(held)
                for p in held:
                    del self.model.rows[p]
                self.model.dead.extend(sorted(held, key=lambda p: self.ids[p]))
            self.store.commit()

        @rule()
        def requeue_all(self) -> None:
            assert self.store.requeue_dead_letters(None, self.now) == len(self.model.dead)
            self.store.commit()
            requeued = set(self.model.dead)
            for p in self.model.dead:
                self.model.rows[p] = dict(attempts=0, next_at=0.0, lease_id=0, lease_exp=0.0)
            self.model.dead = []
            # A requeued event is a new row with a new id: no earlier lease names it.
            for lease_id, payloads in self.leases.items():
                self.leases[lease_id] = [p for p in payloads if p not in requeued]
            for p in requeued:
                self.ids.pop(p, None)

        @rule(seconds=st.sampled_from([1.0, 10.0, LEASE_S + 1]))
        def advance(self, seconds: float) -> None:
            self.now += seconds

        @invariant()
        def stats_agree(self) -> None:
            s = self.store.stats(self.now)
            rows = self.model.rows
            assert s.queued == len(rows)
            assert s.queued_bytes == sum(len(p) for p in rows)
            assert s.leased == sum(1 for r in rows.values() if r["lease_id"] and r["lease_exp"] > self.now)
            assert s.dead_letters == len(self.model.dead)
            assert [d.payload for d in self.store.dead_letters(1000)] == self.model.dead

    return StoreVersusModel


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_store_agrees_with_a_model(name: str) -> None:
    from hypothesis import settings as hsettings

    machine = _machine(FACTORIES[name])
    machine.TestCase.settings = hsettings(max_examples=int(os.environ.get("SP_STORE_MODEL_EXAMPLES", "40")), stateful_step_count=25, deadline=None)
    machine.TestCase().runTest()
