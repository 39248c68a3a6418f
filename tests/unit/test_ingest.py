"""The writer's per-producer sequencing rules (``ingest.Sequencer``) and ``merge_ranges``.

No processes, no sockets: ``lookup`` stands in for the store's ``producers`` table and
``now`` is passed explicitly.
"""

from __future__ import annotations

from typing import Dict, Optional

import pytest

from sp_pipeline.ingest import DUPLICATE, EARLY, NEXT, Sequencer, merge_ranges

P1 = b"p" * 16
P2 = b"q" * 16
R1 = b"route-1"
R2 = b"route-2"


def sequencer(committed: Optional[Dict[bytes, int]] = None) -> Sequencer:
    committed = dict(committed or {})
    return Sequencer(lookup=committed.get)


# ----------------------------------------------------------------------- classify


def test_new_producer_starts_at_its_base_and_frames_in_order_are_next():
    s = sequencer()
    assert [s.classify(P1, R1, seq, 1, now=0.0) for seq in (1, 2, 3)] == [NEXT] * 3
    assert s.last_consumed(P1) == 3


def test_new_producer_unknown_to_the_store_trusts_base_not_one():
    # A producer that has seen 1..9 acknowledged (by an earlier writer) sends seq 10.
    s = sequencer()
    assert s.classify(P1, R1, 10, 10, now=0.0) == NEXT
    assert s.last_consumed(P1) == 10


def test_known_producer_continues_after_the_committed_seq():
    s = sequencer({P1: 7})
    assert s.classify(P1, R1, 7, 5, now=0.0) == DUPLICATE
    assert s.classify(P1, R1, 8, 5, now=0.0) == NEXT
    assert s.last_consumed(P1) == 8


def test_duplicate_does_not_advance():
    s = sequencer()
    s.classify(P1, R1, 1, 1, now=0.0)
    s.classify(P1, R1, 2, 1, now=0.0)
    assert s.classify(P1, R1, 1, 1, now=0.0) == DUPLICATE
    assert s.classify(P1, R1, 2, 1, now=0.0) == DUPLICATE
    assert s.last_consumed(P1) == 2
    assert s.classify(P1, R1, 3, 1, now=0.0) == NEXT


def test_early_frame_is_dropped_without_advancing():
    s = sequencer()
    s.classify(P1, R1, 1, 1, now=0.0)
    assert s.classify(P1, R1, 3, 1, now=0.0) == EARLY
    assert s.last_consumed(P1) == 1
    # The gap filled in order, the early frame must come again.
    assert s.classify(P1, R1, 2, 1, now=0.0) == NEXT
    assert s.classify(P1, R1, 3, 1, now=0.0) == NEXT


def test_base_lifts_expected_over_a_gap_the_producer_vouches_for():
    s = sequencer({P1: 3})
    # Producer says 1..9 were confirmed (base 10): 4..9 must not be asked for again.
    assert s.classify(P1, R1, 10, 10, now=0.0) == NEXT
    assert s.last_consumed(P1) == 10


def test_base_never_lowers_expected():
    s = sequencer({P1: 20})
    assert s.classify(P1, R1, 5, 1, now=0.0) == DUPLICATE
    assert s.last_consumed(P1) == 20


def test_producers_are_independent_and_routing_id_follows_the_latest_frame():
    s = sequencer()
    assert s.classify(P1, R1, 1, 1, now=0.0) == NEXT
    assert s.classify(P2, R2, 1, 1, now=0.0) == NEXT
    assert s.classify(P2, R2, 3, 1, now=0.0) == EARLY
    assert s.classify(P1, R2, 2, 1, now=1.0) == NEXT  # reconnected under a new routing id
    assert s.producers[P1].routing_id == R2
    assert s.last_consumed(P1) == 2 and s.last_consumed(P2) == 1


# ----------------------------------------------------------------------- resend requests


def test_resend_request_asks_from_expected_and_is_rate_limited():
    s = sequencer()
    s.classify(P1, R1, 1, 1, now=0.0)
    assert s.classify(P1, R1, 4, 1, now=10.0) == EARLY
    assert s.should_ask_resend(P1, now=10.0) == 2
    s.classify(P1, R1, 5, 1, now=10.2)
    assert s.should_ask_resend(P1, now=10.2) is None  # asked just now for the same seq
    assert s.should_ask_resend(P1, now=10.99) is None
    assert s.should_ask_resend(P1, now=11.0) == 2  # a second later: ask again


def test_resend_request_for_a_new_gap_is_not_rate_limited():
    s = sequencer()
    s.classify(P1, R1, 1, 1, now=0.0)
    s.classify(P1, R1, 3, 1, now=0.0)
    assert s.should_ask_resend(P1, now=0.0) == 2
    s.classify(P1, R1, 2, 1, now=0.1)
    s.classify(P1, R1, 5, 1, now=0.1)
    assert s.should_ask_resend(P1, now=0.1) == 3  # expected moved: a new question


# ----------------------------------------------------------------------- rollback


def test_rollback_restores_expected_of_touched_producers_only():
    s = sequencer()
    s.classify(P1, R1, 1, 1, now=0.0)
    s.classify(P2, R2, 1, 1, now=0.0)
    before = {P1: s.producers[P1].expected}
    s.classify(P1, R1, 2, 1, now=0.0)
    s.classify(P1, R1, 3, 1, now=0.0)
    s.rollback(before)
    assert s.last_consumed(P1) == 1
    assert s.last_consumed(P2) == 1
    assert s.classify(P1, R1, 2, 1, now=0.0) == NEXT  # the resend is accepted again


def test_rollback_ignores_producers_forgotten_meanwhile():
    s = sequencer()
    s.rollback({P1: 5})  # must not raise or invent a producer
    assert P1 not in s.producers


# ----------------------------------------------------------------------- forget idle


def test_forget_idle_drops_only_idle_producers_and_store_seq_takes_over():
    committed: Dict[bytes, int] = {}
    s = Sequencer(lookup=committed.get)
    s.classify(P1, R1, 1, 1, now=0.0)
    s.classify(P1, R1, 2, 1, now=0.0)
    s.classify(P2, R2, 1, 1, now=500.0)
    committed[P1] = 2  # what the writer committed for P1
    assert s.forget_idle(now=600.5) == 1
    assert P1 not in s.producers and P2 in s.producers
    assert s.forget_idle(now=600.5) == 0
    # P1 comes back: the store's seq decides, so an old resend is a duplicate.
    assert s.classify(P1, R1, 2, 1, now=601.0) == DUPLICATE
    assert s.classify(P1, R1, 3, 1, now=601.0) == NEXT


def test_forget_idle_keeps_a_producer_seen_within_the_window():
    s = sequencer()
    s.classify(P1, R1, 1, 1, now=0.0)
    assert s.forget_idle(now=599.0) == 0


# ----------------------------------------------------------------------- merge_ranges


@pytest.mark.parametrize(
    "seqs, ranges",
    [
        ([], []),
        ([5], [(5, 5)]),
        ([1, 2, 3], [(1, 3)]),
        ([3, 1, 2], [(1, 3)]),
        ([1, 1, 2, 2], [(1, 2)]),
        ([1, 3, 4, 7], [(1, 1), (3, 4), (7, 7)]),
        ([10, 9, 2, 1, 5], [(1, 2), (5, 5), (9, 10)]),
    ],
)
def test_merge_ranges(seqs, ranges):
    assert merge_ranges(seqs) == ranges


def test_merge_ranges_covers_exactly_its_input():
    seqs = [17, 3, 4, 99, 5, 18, 100, 1]
    covered = [s for a, b in merge_ranges(seqs) for s in range(a, b + 1)]
    assert covered == sorted(set(seqs))
