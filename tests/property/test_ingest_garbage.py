"""Hypothesis-made garbage on a real writer's ingest socket, interleaved with valid
events from a real ``Client``: the writer survives and stores every valid event once
(DESIGN invariant 7).

One writer process serves the whole module (starting one per example would cost more
than the examples); each example checks only what it tracked.
"""

from __future__ import annotations

import collections
import json
import shutil
import tempfile
from typing import Counter, Iterator, List

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sp_pipeline import Client, wire
from sp_pipeline.events import StructuredEvent
from sp_pipeline.testing import wait_until
from tests.writer_process import WriterProcess, _killpg, read_metric, ro_connect, valid_event

pytestmark = pytest.mark.integration

_pack = msgpack.Packer(use_bin_type=True).pack
MAX_EVENT_BYTES = 4000


class Rig:
    """The module's writer, a real client and a raw socket for garbage."""

    def __init__(self, workdir: str) -> None:
        self.writer = WriterProcess(workdir, max_event_bytes=MAX_EVENT_BYTES).start()
        self.client = Client(self.writer.ingest, namespace="prop", resend_after=0.5)
        self.ctx = zmq.Context()
        self.raw = self.ctx.socket(zmq.DEALER)
        self.raw.setsockopt(zmq.LINGER, 0)
        self.raw.connect(self.writer.ingest)
        self.stored: Counter[str] = collections.Counter()
        self._last_id = 0
        self.garbage_sent = 0

    def read_new_rows(self) -> None:
        """Count eids of rows committed since the last call."""
        conn = ro_connect(self.writer.store)
        try:
            rows = conn.execute("SELECT id, payload FROM queue WHERE id > ? ORDER BY id",
                                (self._last_id,)).fetchall()
        finally:
            conn.close()
        for row_id, payload in rows:
            self._last_id = row_id
            eid = json.loads(bytes(payload)).get("eid")
            if eid:
                self.stored[eid] += 1

    def drain_raw_replies(self) -> None:
        while self.raw.poll(0):
            self.raw.recv()  # ACK / REJECT / RESEND for garbage that parsed: not checked here

    def close(self) -> None:
        self.client.close(timeout=None)
        self.raw.close(linger=0)
        self.ctx.term()


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    workdir = tempfile.mkdtemp(prefix="spp-", dir="/tmp")
    r = Rig(workdir)
    try:
        yield r
        assert r.writer.alive(), r.writer.log()
        assert r.writer.stop() == 0
    finally:
        if r.writer.proc is not None:
            _killpg(r.writer.proc.pid)
            r.writer.proc.wait(10)
        r.close()
        shutil.rmtree(workdir, ignore_errors=True)


# --------------------------------------------------------------------------- strategies

_scalars = (st.none() | st.booleans() | st.integers(-(2 ** 63), 2 ** 64 - 1)
            | st.floats(allow_nan=True) | st.text(max_size=20) | st.binary(max_size=40))
_structures = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=25,
)
_event_keys = st.sampled_from(["e", "p", "tv", "eid", "se_ca", "se_ac", "stm", "dtm", "zz", ""])
_event_json = st.dictionaries(_event_keys | st.text(max_size=6),
                              st.text(max_size=12) | st.integers() | st.none(),
                              max_size=6).map(lambda d: json.dumps(d).encode())
_events = st.lists(_event_json | st.binary(max_size=60) | st.just(valid_event()), max_size=4)


@st.composite
def _frame_shaped(draw) -> bytes:
    """Arrays that look like EVENTS frames, with any part wrong (or, rarely, all right)."""
    return _pack([
        draw(st.sampled_from([1, 1, 1, 0, 2, "1"])),
        draw(st.sampled_from(["E", "E", "E", "A", "X", "", 69])),
        draw(st.binary(min_size=16, max_size=16) | st.binary(max_size=20) | _scalars),
        draw(st.integers(-2, 2 ** 64 - 1) | _scalars),
        draw(st.integers(-2, 2 ** 64 - 1) | _scalars),
        draw(_events | _scalars),
        *draw(st.lists(_scalars, max_size=2)),
    ][: draw(st.integers(0, 8))])


@st.composite
def _sequenced_events(draw) -> bytes:
    """A valid header a new producer's first frame would have (seq == base), carrying
    arbitrary events: reaches the writer's per-event checks."""
    seq = draw(st.integers(1, 1000))
    return wire.encode_events(draw(st.binary(min_size=16, max_size=16)), seq, seq,
                              draw(st.lists(_event_json | st.binary(max_size=60)
                                            | st.just(valid_event()), min_size=1, max_size=4)))


@st.composite
def _mutated_valid(draw) -> bytes:
    """A valid frame with bytes replaced, deleted or inserted, or cut short."""
    frame = bytearray(wire.encode_events(draw(st.binary(min_size=16, max_size=16)),
                                         draw(st.integers(1, 5)), 1,
                                         [valid_event(draw(st.integers(0, 99)))]))
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(frame) - 1))
        kind = draw(st.sampled_from(["replace", "delete", "insert", "truncate"]))
        if kind == "replace":
            frame[pos] = draw(st.integers(0, 255))
        elif kind == "delete":
            del frame[pos]
        elif kind == "insert":
            frame.insert(pos, draw(st.integers(0, 255)))
        else:
            del frame[pos:]
        if not frame:
            break
    return bytes(frame)


garbage = st.one_of(
    st.binary(max_size=512),
    _structures.map(_pack),
    _frame_shaped(),
    _sequenced_events(),
    _mutated_valid(),
)


# --------------------------------------------------------------------------- property


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=st.lists(st.tuples(garbage, st.integers(0, 3)), min_size=1, max_size=8))
def test_writer_survives_garbage_and_stores_every_valid_event(rig: Rig, plan) -> None:
    tracked: List[str] = []
    for frame, valid_after in plan:
        rig.raw.send(frame)
        rig.garbage_sent += 1
        tracked += [rig.client.track(StructuredEvent("prop", "valid", value=i))
                    for i in range(valid_after)]
    tracked.append(rig.client.track(StructuredEvent("prop", "last")))
    rig.client.flush(10)
    rig.drain_raw_replies()
    assert rig.writer.alive(), rig.writer.log()
    rig.read_new_rows()
    assert [e for e in tracked if rig.stored[e] != 1] == []


def test_the_garbage_was_counted(rig: Rig) -> None:
    """Runs after the property (same module, same writer): rejects are in the metrics."""
    if rig.garbage_sent == 0:
        pytest.skip("the property did not run")
    frames = wait_until(
        lambda: (f := read_metric(rig.writer.metrics_dir, "sp_pipeline_ingest_frames_total",
                                  "outcome")) and f,
        5, "ingest frame metrics")
    rejected = sum(v for k, v in frames.items() if k.startswith("rejected_"))
    assert rejected >= rig.garbage_sent // 2
    # Both the frame checks and the per-event checks were reached.
    assert {"rejected_decode", "rejected_json"} <= set(frames)
    assert frames.get("accepted", 0) > 0
    assert rig.writer.alive()
