"""Properties of byte-limited batching (sp_pipeline.batching)."""

from __future__ import annotations

import json
from typing import List

from hypothesis import given, settings
from hypothesis import strategies as st

from sp_pipeline.batching import (
    ENVELOPE_BYTES,
    PAYLOAD_DATA_SCHEMA,
    STM_BYTES,
    post_body,
    post_size,
    split,
    take,
)

PROFILE = settings(max_examples=150, deadline=None)

sizes_st = st.lists(st.integers(min_value=2, max_value=3000), max_size=60)
limits_st = st.integers(min_value=200, max_value=20000)
max_events_st = st.integers(min_value=1, max_value=30)
stm_st = st.integers(min_value=10**12, max_value=10**13 - 1)  # 13-digit ms times

# Flat string objects, like tracker payloads; keys never "stm" (the sender adds it).
_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
event_st = st.dictionaries(
    st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=8).filter(
        lambda k: k != "stm"
    ),
    _text,
    min_size=1,
    max_size=8,
).map(lambda d: json.dumps(d, ensure_ascii=False, separators=(",", ":")).encode())
events_st = st.lists(event_st, max_size=20)


@PROFILE
@given(sizes_st, limits_st, max_events_st)
def test_split_covers_every_event_once_in_order(sizes, limit, max_events):
    batches = split(sizes, limit, max_events)
    flat: List[int] = [i for start, stop in batches for i in range(start, stop)]
    assert flat == list(range(len(sizes)))
    assert all(stop > start for start, stop in batches)


@PROFILE
@given(sizes_st, limits_st, max_events_st)
def test_split_respects_byte_limit_and_max_events(sizes, limit, max_events):
    for start, stop in split(sizes, limit, max_events):
        assert stop - start <= max_events
        size = post_size(sizes[start:stop])
        assert size <= limit or stop - start == 1, (start, stop, size)


@PROFILE
@given(sizes_st, limits_st, max_events_st)
def test_split_closes_a_batch_only_when_the_next_event_would_not_fit(sizes, limit, max_events):
    """Greedy: each batch but the last was closed because one more event would have
    passed the byte limit or max_events."""
    batches = split(sizes, limit, max_events)
    for start, stop in batches[:-1]:
        grown = post_size(sizes[start:stop + 1])
        assert grown > limit or stop - start == max_events


@PROFILE
@given(sizes_st, limits_st, max_events_st)
def test_take_agrees_with_the_first_batch_of_split(sizes, limit, max_events):
    batches = split(sizes, limit, max_events)
    n = take(sizes, limit, max_events)
    if not sizes:
        assert (n, batches) == (0, [])
    else:
        assert (0, n) == batches[0]
    assert take(iter(sizes), limit, max_events) == n  # works on any iterable


@PROFILE
@given(events_st, stm_st)
def test_post_size_is_the_exact_body_length(events, stm):
    assert post_size(len(e) for e in events) == len(post_body(events, stm))


@PROFILE
@given(events_st, stm_st)
def test_post_body_is_the_envelope_with_stm_in_every_item(events, stm):
    doc = json.loads(post_body(events, stm))
    assert doc == {
        "schema": PAYLOAD_DATA_SCHEMA,
        "data": [{"stm": str(stm), **json.loads(e)} for e in events],
    }
    assert all(item["stm"] == str(stm) for item in doc["data"])


def test_empty_body_is_the_bare_envelope():
    assert len(post_body([], 1_700_000_000_000)) == post_size([]) == ENVELOPE_BYTES == 88
    assert STM_BYTES == 22


def test_golang_tracker_case_three_events_of_138_bytes_limit_500():
    sizes = [138, 138, 138]
    assert split(sizes, 500, 500) == [(0, 2), (2, 3)]
    assert take(sizes, 500, 500) == 2
    assert post_size(sizes[:2]) == 88 + 2 * (138 + 22) + 1 == 409


def test_lone_oversize_event_travels_alone():
    assert split([100, 5000, 100], 1000, 10) == [(0, 1), (1, 2), (2, 3)]
    assert take([5000, 10], 1000, 10) == 1


def test_exact_fit_is_kept_in_the_batch():
    # Two events that exactly reach the limit stay together.
    limit = post_size([300, 300])
    assert split([300, 300, 1], limit, 10) == [(0, 2), (2, 3)]
