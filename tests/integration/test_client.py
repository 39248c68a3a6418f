"""Client over real ZeroMQ sockets, with a stand-in writer (tests/receiver.py)."""

from __future__ import annotations

import os
import threading
import time

import pytest

from sp_pipeline import Client, SelfDescribingJson, Subject
from sp_pipeline.errors import BufferFull, ClientClosed, FlushTimeout, ValidationError
from sp_pipeline.events import EcommerceItem, EcommerceTransaction, PageView, StructuredEvent
from tests.receiver import FrameReceiver
from tests.schemas import validate_event

pytestmark = pytest.mark.integration


def test_track_returns_eid_and_payload_arrives_valid(ipc_endpoint):
    with FrameReceiver(ipc_endpoint) as rx, Client(ipc_endpoint, namespace="ns", app_id="app",
                                                   subject=Subject(user_id="u1")) as client:
        eid = client.track(PageView("https://example.com/ü", title="Ünïcode"),
                           contexts=[SelfDescribingJson("iglu:com.acme/ctx/jsonschema/1-0-0", {"a": 1})])
        client.flush(5)
        (ev,) = rx.events()
    assert ev["eid"] == eid
    assert ev["e"] == "pv" and ev["url"] == "https://example.com/ü" and ev["uid"] == "u1"
    assert ev["tna"] == "ns" and ev["aid"] == "app" and ev["p"] == "srv"
    validate_event(ev)


def test_transaction_travels_in_one_frame(ipc_endpoint):
    with FrameReceiver(ipc_endpoint) as rx, Client(ipc_endpoint, namespace="ns") as client:
        eid = client.track(EcommerceTransaction("o-1", 12.5, items=[
            EcommerceItem("sku-1", 5, 1), EcommerceItem("sku-2", 7.5, 1)]))
        client.flush(5)
        assert len(rx.frames) == 1
        evs = rx.events()
    assert [e["e"] for e in evs] == ["tr", "ti", "ti"]
    assert evs[0]["eid"] == eid


def test_frames_arrive_intact_from_many_threads(ipc_endpoint):
    per_thread, threads = 300, 4
    with FrameReceiver(ipc_endpoint) as rx, Client(ipc_endpoint, namespace="ns") as client:
        eids = [[] for _ in range(threads)]

        def work(i):
            for j in range(per_thread):
                eids[i].append(client.track(StructuredEvent("cat", f"t{i}", value=j)))

        ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        client.flush(10)
        evs = rx.wait_for_events(per_thread * threads)
    assert sorted(e["eid"] for e in evs) == sorted(x for xs in eids for x in xs)
    seqs = [f.seq for f in rx.frames]
    assert seqs == list(range(1, len(seqs) + 1))  # numbered without gaps, in order
    assert len(seqs) < per_thread * threads  # events share frames
    for i in range(threads):  # each thread's events keep their order
        values = [int(e["se_va"]) for e in evs if e["se_ac"] == f"t{i}"]
        assert values == sorted(values)


def test_forked_child_gets_its_own_socket(ipc_endpoint):
    with FrameReceiver(ipc_endpoint) as rx, Client(ipc_endpoint, namespace="ns") as client:
        client.track(StructuredEvent("parent", "before"))
        client.flush(5)
        pid = os.fork()
        if pid == 0:  # child: track, flush, report through the exit code
            code = 0
            try:
                for i in range(50):
                    client.track(StructuredEvent("child", "a", value=i))
                client.flush(5)
            except BaseException:
                code = 1
            os._exit(code)
        client.track(StructuredEvent("parent", "after"))
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        client.flush(5)
        evs = rx.wait_for_events(52)
    assert sum(e["se_ca"] == "child" for e in evs) == 50
    producers = {f.producer_id for f in rx.frames}
    assert len(producers) == 2  # the child numbered its frames under its own id


def test_flush_times_out_when_nobody_acknowledges(ipc_endpoint):
    with FrameReceiver(ipc_endpoint, ack=False) as rx:
        client = Client(ipc_endpoint, namespace="ns")
        client.track(PageView("https://example.com"))
        rx.wait_for_events(1)
        started = time.monotonic()
        with pytest.raises(FlushTimeout) as err:
            client.flush(0.3)
        assert 0.3 <= time.monotonic() - started < 3
        assert err.value.pending_events == 1
        client.close(timeout=None)


def test_bounded_buffer_fails_loudly_when_writer_is_away(ipc_endpoint):
    client = Client(ipc_endpoint, namespace="ns", max_pending_events=10)
    for _ in range(10):
        client.track(PageView("https://example.com"))
    with pytest.raises(BufferFull):
        client.track(PageView("https://example.com"))
    assert client.stats.buffer_full == 1
    assert client.pending_events == 10
    client.close(timeout=None)
    with pytest.raises(ClientClosed):
        client.track(PageView("https://example.com"))


def test_buffered_events_reach_a_writer_that_starts_late(ipc_endpoint):
    client = Client(ipc_endpoint, namespace="ns")
    for i in range(20):
        client.track(StructuredEvent("late", "x", value=i))
    with FrameReceiver(ipc_endpoint) as rx:
        client.flush(10)
        assert len(rx.wait_for_events(20)) == 20
    client.close(timeout=None)


def test_invalid_event_is_refused_before_sending(ipc_endpoint):
    with FrameReceiver(ipc_endpoint) as rx, Client(ipc_endpoint, namespace="ns") as client:
        with pytest.raises(ValidationError) as err:
            client.track(StructuredEvent("", "a"))
        assert err.value.field == "category"
        client.flush(2)
        assert rx.events() == []


def test_event_over_max_event_bytes_is_refused_naming_its_largest_field(ipc_endpoint):
    big = "x" * 3000
    with FrameReceiver(ipc_endpoint) as rx, \
            Client(ipc_endpoint, namespace="ns", max_event_bytes=2000) as client:
        with pytest.raises(ValidationError) as err:
            client.track(StructuredEvent("c", "a", label=big))
        assert err.value.field == "se_la"
        assert "max_event_bytes" in err.value.rule and "2000" in err.value.rule
        with pytest.raises(ValidationError) as err:  # an item of a transaction, too
            client.track(EcommerceTransaction("o-1", 1, items=[EcommerceItem("s", 1, 1, name=big)]))
        assert err.value.field == "ti_nm"
        assert client.pending_events == 0  # nothing of a refused call was queued
        eid = client.track(StructuredEvent("c", "a", label="x" * 1500))
        client.flush(5)
        assert [e["eid"] for e in rx.wait_for_events(1)] == [eid]


def test_client_event_size_limit_defaults_to_the_writers():
    import inspect
    from sp_pipeline import config
    default = inspect.signature(Client).parameters["max_event_bytes"].default
    assert default == config.load({}, env={}).max_event_bytes


def test_bad_endpoint_is_a_validation_error():
    with pytest.raises(ValidationError) as err:
        Client("http://localhost:1", namespace="ns")
    assert err.value.field == "endpoint"


def test_a_lone_event_is_sent_without_flush(ipc_endpoint):
    """Events wait in a batch for at most a couple of milliseconds: an app that tracks
    one event and goes quiet does not leave it in memory."""
    with FrameReceiver(ipc_endpoint) as rx:
        client = Client(ipc_endpoint, namespace="ns")
        client.track(PageView("https://example.com/lone"))
        started = time.monotonic()
        (ev,) = rx.wait_for_events(1, timeout=5)
        assert time.monotonic() - started < 1.0
        assert ev["url"] == "https://example.com/lone"
        client.close()


def test_events_share_frames_up_to_the_batch_size(ipc_endpoint):
    from sp_pipeline.client import _BATCH_EVENTS

    with FrameReceiver(ipc_endpoint) as rx, Client(ipc_endpoint, namespace="ns") as client:
        for i in range(500):
            client.track(StructuredEvent("batch", "x", value=i))
        client.track(EcommerceTransaction("o-9", 3, items=[EcommerceItem("a", 1, 1),
                                                           EcommerceItem("b", 2, 1)]))
        client.flush(10)
        evs = rx.wait_for_events(503)
    assert [int(e["se_va"]) for e in evs[:500]] == list(range(500))
    assert all(len(f.events) <= _BATCH_EVENTS + 2 for f in rx.frames)
    assert len(rx.frames) < 100
    tr_frame = next(f for f in rx.frames if any(b'"e":"tr"' in ev for ev in f.events))
    assert sum(b'"e":"ti"' in ev for ev in tr_frame.events) == 2  # a transaction stays whole


def test_events_tracked_just_before_exit_are_sent(ipc_endpoint):
    """An app that exits right after track(), without close(), still hands its last
    batch to ZeroMQ, which delivers it while the process exits."""
    import subprocess
    import sys

    script = ("import sys\nfrom sp_pipeline import Client\nfrom sp_pipeline.events import PageView\n"
              "c = Client(sys.argv[1], namespace='x')\n"
              "for i in range(3):\n    c.track(PageView(f'https://exit.example/{i}'))\n")
    with FrameReceiver(ipc_endpoint) as rx:
        out = subprocess.run([sys.executable, "-c", script, ipc_endpoint], capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        evs = rx.wait_for_events(3, timeout=10)
    assert sorted(e["url"] for e in evs) == [f"https://exit.example/{i}" for i in range(3)]
