"""The collector's Recorder keeps good events as request bodies and decodes them when
asked: what /micro/good returns must be what a plain list of every good event, cut to
the newest ``good_cap``, filtered and cut to ``limit``, would give."""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

from hypothesis import given, settings, strategies as st

from sp_pipeline.collector.server import Limits, Recorder, StoredBatch

PAYLOAD = "iglu:com.snowplowanalytics.snowplow/payload_data/jsonschema/1-0-4"

event_st = st.builds(lambda n, e: {"e": e, "p": "srv", "tv": "t", "eid": f"id-{n}"},
                     st.integers(0, 5), st.sampled_from(["se", "pv"]))
request_st = st.tuples(st.lists(event_st, min_size=1, max_size=6),
                       st.sets(st.integers(0, 5)),  # positions that count as bad
                       st.booleans())  # POST body or GET list


@settings(max_examples=150, deadline=None)
@given(st.lists(request_st, max_size=8), st.integers(0, 12),
       st.one_of(st.none(), st.integers(0, 10)),
       st.one_of(st.none(), st.sampled_from(["id-1", "id-2"])),
       st.one_of(st.none(), st.sampled_from(["se", "pv"])))
def test_good_is_the_newest_stored_events_filtered_then_limited(
        requests: List[Any], cap: int, limit: Optional[int], eid: Optional[str],
        event_type: Optional[str]) -> None:
    recorder = Recorder(Limits(good_cap=cap))
    every: List[Dict[str, Any]] = []
    for n, (events, bad, post) in enumerate(requests):
        bad = frozenset(i for i in bad if i < len(events))
        source = json.dumps({"schema": PAYLOAD, "data": events}).encode() if post else events
        batch = StoredBatch((n, "POST" if post else "GET", n), source, bad,
                            len(events) - len(bad))
        good = [e for i, e in enumerate(events) if i not in bad]
        recorder.record({"request_id": n}, batch, [e["eid"] for e in good], [])
        every.extend(dict(e, request_id=n) for e in good)
    expected = every[-cap:] if cap else []
    if eid is not None:
        expected = [e for e in expected if e["eid"] == eid]
    if event_type is not None:
        expected = [e for e in expected if e["e"] == event_type]
    if limit is not None:
        expected = expected[-limit:] if limit else []
    got = recorder.good(limit, eid, event_type)
    assert [dict(r["event"], request_id=r["request_id"]) for r in got] == expected
    assert recorder.counts()["good"] == len(every)
    assert sum(recorder.eids().values()) == len(every)
