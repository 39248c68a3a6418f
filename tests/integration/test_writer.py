"""The writer role as a real process (``python -m sp_pipeline.role writer``), with real
clients, raw ZeroMQ sockets and a real SQLite file checked through separate read-only
connections.

Promises pinned here: ``flush()`` returns only after commit (DESIGN 2); a writer killed
with SIGKILL loses nothing a flush confirmed and stores nothing twice; garbage on the
ingest socket is counted and skipped (DESIGN 7); a foreign store file is refused
untouched; the store cap blocks or drops oldest as configured (DESIGN 6).
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import random
import sqlite3
import subprocess
import sys
import textwrap
from typing import Dict, List

import msgpack
import pytest
import zmq

from sp_pipeline import Client, exitcodes, wire
from sp_pipeline.errors import BufferFull, EventsRejected, FlushTimeout
from sp_pipeline.events import StructuredEvent
from sp_pipeline.testing import wait_until
from tests.writer_process import _killpg, count_rows, eid_of, queue_eids, ro_connect, valid_event

pytestmark = pytest.mark.integration


# --------------------------------------------------------------------------- flush


def test_flush_returns_only_after_commit(writer_dir):
    # A slow commit interval: a flush that returned on receipt would see nothing stored.
    w = writer_dir(commit_interval_ms=300, commit_max_events=100_000).start()
    with Client(w.ingest, namespace="flush") as client:
        tracked: List[str] = []
        for round_ in range(4):
            tracked += [client.track(StructuredEvent("flush", "t", value=i))
                        for i in range(50 * (round_ + 1))]
            client.flush(10)
            stored = queue_eids(w.store)
            assert count_rows(w.store) == len(tracked)
            assert set(stored) == set(tracked) and max(stored.values()) == 1
    assert w.stop() == exitcodes.OK


# --------------------------------------------------------------------------- kill -9

PRODUCER = textwrap.dedent('''
    """Track N events, flushing every 200; write which eids a flush confirmed."""
    import json, sys, time
    from sp_pipeline import Client
    from sp_pipeline.errors import FlushTimeout
    from sp_pipeline.events import StructuredEvent

    endpoint, n, out, name = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    client = Client(endpoint, namespace=name, resend_after=0.3)
    confirmed, unconfirmed, timeouts = [], [], 0

    def try_flush(timeout):
        global timeouts
        try:
            client.flush(timeout)
        except FlushTimeout:
            timeouts += 1
            return False
        confirmed.extend(unconfirmed)
        unconfirmed.clear()
        return True

    for i in range(n):
        unconfirmed.append(client.track(StructuredEvent(name, "load", value=i)))
        if (i + 1) % 200 == 0:
            try_flush(0.5)
    deadline = time.monotonic() + 40
    while not try_flush(2.0) and time.monotonic() < deadline:
        pass
    with open(out, "w") as fh:
        json.dump({"confirmed": confirmed, "unconfirmed": unconfirmed,
                   "timeouts": timeouts, "resent": client.stats.resent_frames}, fh)
    client.close(timeout=None)
''')


def test_kill9_during_load_loses_nothing_confirmed_and_stores_nothing_twice(writer_dir):
    per_producer, kills = 3000, 4
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    thresholds = sorted(rng.sample(range(300, 2 * per_producer - 600), kills))
    w = writer_dir().start()
    script = os.path.join(w.workdir, "producer.py")
    with open(script, "w") as fh:
        fh.write(PRODUCER)
    outs = [os.path.join(w.workdir, f"producer-{i}.json") for i in range(2)]
    producers = [
        subprocess.Popen([sys.executable, script, w.ingest, str(per_producer), out, f"p{i}"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         start_new_session=True)
        for i, out in enumerate(outs)
    ]
    killed = 0
    try:
        for threshold in thresholds:
            # "Random moments": when the store reaches a random count, or never if the
            # producers finish first.
            wait_until(lambda: count_rows(w.store) >= threshold
                       or all(p.poll() is not None for p in producers),
                       40, f"{threshold} stored events (seed {seed})")
            if all(p.poll() is not None for p in producers):
                break
            w.kill9()
            killed += 1
            w.start()
        for p in producers:
            assert p.wait(60) == 0, p.stderr.read().decode()
    finally:
        for p in producers:
            _killpg(p.pid)
            p.wait(10)
    assert killed >= 3, f"producers finished before the kills (seed {seed})"

    results = [json.load(open(out)) for out in outs]
    assert all(not r["unconfirmed"] for r in results), "the final flush did not succeed"
    confirmed = [eid for r in results for eid in r["confirmed"]]
    assert len(confirmed) == 2 * per_producer
    stored = queue_eids(w.store)
    missing = [e for e in confirmed if stored[e] == 0]
    twice = {e: n for e, n in stored.items() if n > 1}
    assert not missing, f"{len(missing)} confirmed events lost (seed {seed})"
    assert not twice, f"{len(twice)} events stored more than once (seed {seed})"
    assert set(stored) == set(confirmed)
    # The kills hit frames in flight: the producers had to resend (else this proved little).
    assert sum(r["resent"] for r in results) > 0


def _lease_once(endpoint: str, n: int) -> list:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send(wire.encode_request(wire.OP_LEASE, 1, n, 1 << 24, 0))
        assert sock.poll(5000), "no answer to LEASE"
        op, _req_id, _lease_id, batch = wire.decode_reply(sock.recv())
        assert op == wire.OP_BATCH
        return [row[0] for row in batch]
    finally:
        sock.close(linger=0)
        ctx.term()


def test_leases_of_a_killed_writer_are_freed_by_the_next(writer_dir):
    w = writer_dir().start()
    with Client(w.ingest, namespace="lease") as client:
        for i in range(300):
            client.track(StructuredEvent("lease", "t", value=i))
        client.flush(10)
    first = _lease_once(w.settings.lease_endpoint, 100)
    assert len(first) == 100
    assert _lease_once(w.settings.lease_endpoint, 100) != first  # held while the writer lives
    w.kill9()
    w.start()
    # The new writer owns no lease: the rows a dead writer leased are handed out again,
    # oldest first, with no traffic and no wait for the old leases to expire.
    again = _lease_once(w.settings.lease_endpoint, 300)
    assert again[:100] == first and len(again) == 300
    # Everything is leased now: a LEASE that asks for no wait is answered at once, empty.
    assert _lease_once(w.settings.lease_endpoint, 100) == []
    assert w.stop() == exitcodes.OK
    assert count_rows(w.store) == 300


# --------------------------------------------------------------------------- garbage

_PID = b"G" * wire.PRODUCER_ID_BYTES
_pack = msgpack.Packer(use_bin_type=True).pack


def _frame(seq: int, events: List[bytes], pid: bytes = _PID) -> bytes:
    return wire.encode_events(pid, seq, 1, events)


def _header_garbage(rng: random.Random) -> Dict[str, List[bytes]]:
    """Frames the writer must reject before sequencing, by expected reason."""
    ev = valid_event()
    good = _frame(1, [ev])
    return {
        "decode": [
            rng.randbytes(200),
            bytes([0xC1]) * 8,  # a byte msgpack never uses
            good[: len(good) // 2],  # truncated
            _pack({"v": 1}),
            _pack([1]),
            b"",
            b"\xdd\xff\xff\xff\xff\x01",  # an array claiming 4 billion elements
            b"\x91" * 100_000 + b"\xc0",  # nesting deeper than the unpacker allows
            _pack({1: 2}),  # non-str map key
        ],
        "version": [_pack([2, "E", _PID, 1, 1, [ev]]), _pack(["1", "E", _PID, 1, 1, [ev]])],
        "op": [_pack([1, "L", 1, 10, 1000, 0]), _pack([1, "Z", _PID])],
        "shape": [_pack([1, "E", _PID, 1, 1]), _pack([1, "E", _PID, 1, 1, [ev], "x"])],
        "type": [
            _pack([1, "E", "G" * 16, 1, 1, [ev]]),  # producer id as str
            _pack([1, "E", b"short", 1, 1, [ev]]),
            _pack([1, "E", _PID, "1", 1, [ev]]),
            _pack([1, "E", _PID, -1, 1, [ev]]),
            _pack([1, "E", _PID, 0, 0, [ev]]),
            _pack([1, "E", _PID, 3, 5, [ev]]),  # base > seq
            _pack([1, "E", _PID, 1, 1, ev]),  # events not an array
            _pack([1, "E", _PID, 1, 1, []]),
            _pack([1, "E", _PID, 1, 1, [ev.decode()]]),  # events as str
            _pack([1, 5, _PID, 1, 1, [ev]]),  # op not a str
        ],
        "count": [_pack([1, "E", _PID, 1, 1, [b"{}"] * 10_001])],
    }


def _event_garbage(max_event_bytes: int) -> Dict[str, List[List[bytes]]]:
    """Event lists that pass the frame checks and fail the per-event JSON checks."""
    ev = valid_event(7)
    obj = json.loads(ev)
    return {
        "json": [[b"not json"], [b"{not json"], [b"\xff\xfe{}"], [ev, b"[1, 2]"]],
        "missing": [[json.dumps({k: v for k, v in obj.items() if k != "e"}).encode()],
                    [b'{"e":"se"}']],
        "unknown_field": [[json.dumps({**obj, "zz_unknown": "1"}).encode()]],
        "field_type": [[json.dumps({**obj, "se_va": 3}).encode()]],
        "stm": [[json.dumps({**obj, "stm": "1"}).encode()]],
        "size": [[json.dumps({**obj, "se_la": "x" * max_event_bytes}).encode()]],
    }


def test_garbage_on_the_ingest_socket_is_counted_and_valid_events_around_it_kept(writer_dir):
    rng = random.Random(1234)
    max_event_bytes = 4000
    w = writer_dir(max_event_bytes=max_event_bytes).start()
    header_garbage = _header_garbage(rng)
    event_garbage = _event_garbage(max_event_bytes)
    expected = collections.Counter({r: len(fs) for r, fs in header_garbage.items()})
    expected.update({r: len(fs) for r, fs in event_garbage.items()})

    ctx = zmq.Context()
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(w.ingest)
    tracked: List[str] = []
    raw_valid: List[str] = []
    rejected_seqs: Dict[int, str] = {}
    try:
        with Client(w.ingest, namespace="mixed") as client:
            def track_some() -> None:
                tracked.extend(client.track(StructuredEvent("mixed", "v", value=i))
                               for i in range(3))

            for frames in header_garbage.values():
                for frame in frames:
                    track_some()
                    raw.send(frame)
            # The raw producer's own sequence: bad events consume a seq and get a REJECT,
            # good frames in between are stored.
            seq = 0
            for reason, lists in event_garbage.items():
                for events in lists:
                    track_some()
                    seq += 1
                    rejected_seqs[seq] = reason
                    raw.send(_frame(seq, events))
                    seq += 1
                    ev = valid_event(seq)
                    raw_valid.append(eid_of(ev))
                    raw.send(_frame(seq, [ev]))
            # A multi-part message: only its first part is a frame.
            seq += 1
            ev = valid_event(seq)
            raw_valid.append(eid_of(ev))
            raw.send_multipart([_frame(seq, [ev]), b"trailing part"])
            track_some()
            client.flush(10)

        replies = _collect_replies(raw, want_acked=seq, want_rejected=len(rejected_seqs))
        # A frame over the size limit closes that connection (ZMQ_MAXMSGSIZE): send it
        # on a socket of its own, after everything else.
        big = ctx.socket(zmq.DEALER)
        big.setsockopt(zmq.LINGER, 0)
        big.connect(w.ingest)
        big.send(_pack([1, "E", b"B" * 16, 1, 1, [b"x" * (w.settings.max_event_bytes * 4 + (2 << 20))]]))
        big.close(linger=1000)
        with Client(w.ingest, namespace="after") as client:
            tracked.append(client.track(StructuredEvent("after", "big frame")))
            client.flush(10)
    finally:
        raw.close(linger=0)
        ctx.term()

    assert w.alive(), w.log()
    stored = queue_eids(w.store)
    assert set(stored) == set(tracked) | set(raw_valid)
    assert max(stored.values()) == 1
    assert replies["rejected"] == rejected_seqs
    acked = {s for first, last in replies["acked"] for s in range(first, last + 1)}
    assert acked == set(range(1, seq + 1)) - set(rejected_seqs)

    frames = w.metric("sp_pipeline_ingest_frames_total", "outcome")
    rejected = {k[len("rejected_"):]: v for k, v in frames.items() if k.startswith("rejected_")}
    assert rejected == {r: float(n) for r, n in expected.items()}
    assert frames["accepted"] >= len(raw_valid) + 1
    assert w.stop() == exitcodes.OK


def _collect_replies(sock: zmq.Socket, want_acked: int, want_rejected: int) -> dict:
    """Read ACK / REJECT replies on the raw producer socket until every seq is answered."""
    out: dict = {"acked": [], "rejected": {}}

    def answered() -> bool:
        while sock.poll(0):
            op, *rest = wire.decode_producer_reply(sock.recv())
            if op == wire.OP_ACK:
                out["acked"].extend(tuple(r) for r in rest[0])
            elif op == wire.OP_REJECT:
                out["rejected"][rest[0]] = rest[1]
        acked = sum(last - first + 1 for first, last in out["acked"])
        return acked + len(out["rejected"]) >= want_acked

    wait_until(answered, 10, "ACK or REJECT for every raw frame")
    return out


# --------------------------------------------------------------------------- foreign store


def _foreign_sqlite(path: str) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE accounts(id INTEGER PRIMARY KEY, name TEXT)")
    conn.execute("INSERT INTO accounts(name) VALUES ('alice'), ('bob')")
    conn.commit()
    conn.close()


def _text_file(path: str) -> None:
    with open(path, "w") as fh:
        fh.write("these are somebody's notes, not an event store\n" * 50)


@pytest.mark.parametrize("make", [_foreign_sqlite, _text_file], ids=["sqlite", "text"])
def test_a_store_file_that_is_not_ours_is_refused_untouched(writer_dir, make):
    w = writer_dir()
    make(w.store)
    before = hashlib.sha256(open(w.store, "rb").read()).hexdigest()
    w.start(wait_ready=False)
    code = w.proc.wait(20)
    assert code == exitcodes.STORE_ERROR, w.log()
    assert w.store in w.log()
    assert hashlib.sha256(open(w.store, "rb").read()).hexdigest() == before
    assert not os.path.exists(w.store + "-wal") and not os.path.exists(w.store + "-shm")


# --------------------------------------------------------------------------- store full


def test_when_full_block_stops_reading_and_drops_nothing(writer_dir):
    cap = 50
    w = writer_dir(max_queued_events=cap, when_full="block").start()
    client = Client(w.ingest, namespace="block", max_pending_events=100, resend_after=0.3)
    try:
        tracked = [client.track(StructuredEvent("block", "t", value=i)) for i in range(cap)]
        client.flush(10)
        assert count_rows(w.store) == cap
        tracked += [client.track(StructuredEvent("block", "over", value=i)) for i in range(30)]
        with pytest.raises(FlushTimeout):
            client.flush(1.0)
        assert count_rows(w.store) == cap
        assert w.metric("sp_pipeline_store_full") == {"": 1.0}
        with pytest.raises(BufferFull):
            for i in range(200):
                tracked.append(client.track(StructuredEvent("block", "more", value=i)))
        assert client.pending_events == 100
        assert client.stats.buffer_full == 1
        # Room again (a bigger cap): every event tracked is stored, once.
        assert w.stop() == exitcodes.OK
        w.reconfigure(max_queued_events=1000)
        w.start()
        client.flush(15)
    finally:
        client.close(timeout=None)
    stored = queue_eids(w.store)
    assert set(stored) == set(tracked) and max(stored.values()) == 1
    assert len(tracked) == cap + 100
    assert not queue_eids(w.store, "dead_letters")


def test_when_full_drop_oldest_dead_letters_the_oldest(writer_dir):
    cap, total = 50, 80
    w = writer_dir(max_queued_events=cap, when_full="drop_oldest").start()
    with Client(w.ingest, namespace="drop") as client:
        tracked = []
        for i in range(total):
            tracked.append(client.track(StructuredEvent("drop", "t", value=i)))
            if i % 10 == 9:
                client.flush(10)
        client.flush(10)
    assert set(queue_eids(w.store)) == set(tracked[total - cap:])
    assert set(queue_eids(w.store, "dead_letters")) == set(tracked[: total - cap])
    conn = ro_connect(w.store)
    try:
        reasons = conn.execute("SELECT DISTINCT reason FROM dead_letters").fetchall()
    finally:
        conn.close()
    assert reasons == [("store_full",)]
    dead = w.metric("sp_pipeline_store_dead_lettered_events_total", "reason")
    assert dead == {"store_full": float(total - cap)}
    assert w.stop() == exitcodes.OK


def test_a_frame_over_the_writers_event_limit_is_rejected_and_flush_says_so(writer_dir):
    # The client allows more than this writer does: the writer refuses the frame,
    # stores none of it, and flush() raises naming the reason instead of returning.
    w = writer_dir(max_event_bytes=1000).start()
    with Client(w.ingest, namespace="limit", max_event_bytes=5000) as client:
        client.track(StructuredEvent("limit", "big", label="x" * 2000))
        with pytest.raises(EventsRejected) as err:
            client.flush(10)
        assert set(err.value.rejections.values()) == {"size"}
        assert client.stats.rejected_events == 1
        eid = client.track(StructuredEvent("limit", "small"))
        client.flush(10)  # the rejection was reported once; later events go through
    assert list(queue_eids(w.store)) == [eid]
    assert w.stop() == exitcodes.OK
