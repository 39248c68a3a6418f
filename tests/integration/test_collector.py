"""The development collector over real HTTP on 127.0.0.1 (urllib3 client, in-process
server thread; one test runs it as a real subprocess)."""

from __future__ import annotations

import base64
import gzip
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from typing import Any, Callable, Dict, Iterator, List

import pytest
import urllib3

from sp_pipeline import exitcodes
from sp_pipeline.collector import Collector, Limits, run
from sp_pipeline.errors import ConfigError, ValidationError

pytestmark = pytest.mark.integration

TP2 = "/com.snowplowanalytics.snowplow/tp2"
SP = "iglu:com.snowplowanalytics.snowplow"
PAYLOAD = f"{SP}/payload_data/jsonschema/1-0-4"


def event(**fields: str) -> Dict[str, str]:
    return {"e": "se", "p": "srv", "tv": "py-1", "eid": str(uuid.uuid4()),
            "dtm": "1700000000000", "se_ca": "cat", "se_ac": "act", **fields}


def envelope(*events: Any) -> bytes:
    return json.dumps({"schema": PAYLOAD, "data": list(events)}).encode()


def wait_for(condition: Callable[[], Any], timeout: float = 5.0) -> Any:
    """Poll ``condition`` until it is truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        time.sleep(0.01)


@pytest.fixture
def http() -> Iterator[urllib3.PoolManager]:
    pool = urllib3.PoolManager(retries=False, timeout=10)
    yield pool
    pool.clear()


@pytest.fixture
def collector() -> Iterator[Collector]:
    with Collector(port=0) as c:
        yield c
    # stop() hangs up idle keep-alive connections and ends the loop's thread
    assert c.connections == 0
    assert not [t for t in threading.enumerate() if t.name == f"collector:{c.port}"]


def post(http: urllib3.PoolManager, c: Collector, body: bytes, **headers: str) -> urllib3.BaseHTTPResponse:
    return http.request("POST", c.url + TP2, body=body,
                        headers={"Content-Type": "application/json; charset=utf-8", **headers})


def micro(http: urllib3.PoolManager, c: Collector, name: str, body: Any = None) -> Any:
    if body is None:
        r = http.request("GET", f"{c.url}/micro/{name}")
    else:
        r = http.request("POST", f"{c.url}/micro/{name}", body=json.dumps(body).encode())
    assert r.status == 200, r.data
    return json.loads(r.data)


def test_good_batch_is_counted_and_decoded(http: urllib3.PoolManager, collector: Collector) -> None:
    contexts = {"schema": f"{SP}/contexts/jsonschema/1-0-1", "data": [
        {"schema": "iglu:com.acme/user/jsonschema/1-0-0", "data": {"plan": "pro"}}]}
    cx = base64.urlsafe_b64encode(json.dumps(contexts).encode()).decode().rstrip("=")
    events = [event(stm="1700000000100"), event(stm="1700000000100", cx=cx), event(stm="1700000000100")]
    r = post(http, collector, envelope(*events))
    assert r.status == 200
    assert micro(http, collector, "all") == {"total": 3, "good": 3, "bad": 0}
    assert micro(http, collector, "eids")["eids"] == {e["eid"]: 1 for e in events}
    stored = micro(http, collector, f"good?eid={events[1]['eid']}")
    assert len(stored) == 1 and stored[0]["method"] == "POST"
    assert stored[0]["contexts"] == contexts["data"]
    assert stored[0]["unknown_schemas"] == ["iglu:com.acme/user/jsonschema/1-0-0"]
    [summary] = micro(http, collector, "requests")
    assert summary["status"] == 200 and summary["events"] == 3
    assert summary["stm"] == ["1700000000100"] and summary["bytes"] == len(envelope(*events))


def test_bad_event_is_reported_with_the_field(http: urllib3.PoolManager, collector: Collector) -> None:
    good, bad = event(), event(se_va=3)  # numbers must be sent as strings
    assert post(http, collector, envelope(good, bad)).status == 200  # like a real collector
    assert collector.counts() == {"total": 2, "good": 1, "bad": 1}
    [record] = micro(http, collector, "bad")
    assert "data[1].se_va: must be a string" in record["errors"]
    assert record["raw"]["eid"] == bad["eid"]
    assert set(collector.eids()) == {good["eid"]}


def test_get_pixel_decodes_the_query(http: urllib3.PoolManager, collector: Collector) -> None:
    r = http.request("GET", collector.url + "/i?e=pv&p=web&tv=js-3&eid=abc&url=https%3A%2F%2Fx.io%2Fa%3Fb%3D1")
    assert r.status == 200 and r.headers["Content-Type"] == "image/gif"
    assert r.data.startswith(b"GIF89a")
    [record] = collector.good()
    assert record["method"] == "GET" and record["event"]["url"] == "https://x.io/a?b=1"
    r = http.request("GET", collector.url + "/i?e=pv&p=web")  # no tv
    assert r.status == 200
    assert collector.bad()[0]["errors"] == ["query: missing required property 'tv'"]


def test_gzip_body(http: urllib3.PoolManager, collector: Collector) -> None:
    events = [event() for _ in range(20)]
    r = post(http, collector, gzip.compress(envelope(*events)), **{"Content-Encoding": "gzip"})
    assert r.status == 200
    assert collector.counts()["good"] == 20


@pytest.mark.parametrize("body", [b"not json", b'{"schema": "x", "data": []}',
                                  envelope(), b"[1, 2]"])
def test_not_an_envelope_is_400(http: urllib3.PoolManager, collector: Collector, body: bytes) -> None:
    assert post(http, collector, body).status == 400
    assert collector.counts() == {"total": 1, "good": 0, "bad": 1}


def test_fixed_status_records_nothing(http: urllib3.PoolManager) -> None:
    with Collector(port=0, status=503) as c:
        assert post(http, c, envelope(event())).status == 503
        assert c.counts()["total"] == 0
        [summary] = c.requests()
        assert summary["status"] == 503 and summary["fault"] == "status" and summary["events"] == 1


def _statuses(c: Collector, http: urllib3.PoolManager, n: int) -> List[int]:
    return [http.request("GET", c.url + f"/i?e=pv&p=web&tv=t&eid=g{i}").status for i in range(n)]


def test_fail_rate_is_seeded_and_statistically_right(http: urllib3.PoolManager) -> None:
    with Collector(port=0, fail_rate=0.3, fail_status=500, seed=7) as c:
        first = _statuses(c, http, 300)
        failed = first.count(500)
        assert set(first) == {200, 500}
        assert 60 <= failed <= 120  # mean 90, sd ~7.9
        assert c.counts()["good"] == first.count(200)  # failed requests are not recorded
        c.set_faults(seed=7)  # restart the draws: same sequence again
        assert _statuses(c, http, 300) == first


def test_delay_applies_and_does_not_block_other_requests(http: urllib3.PoolManager) -> None:
    with Collector(port=0, delay_ms=400) as c:
        started = time.monotonic()
        assert post(http, c, envelope(event())).status == 200
        assert time.monotonic() - started >= 0.4
        statuses: List[int] = []
        threads = [threading.Thread(target=lambda: statuses.append(
            post(http, c, envelope(event())).status)) for _ in range(4)]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - started
        assert statuses == [200] * 4
        assert 0.4 <= elapsed < 1.2  # served one after another it would take >= 1.6 s


def test_retry_after_is_sent_with_failures(http: urllib3.PoolManager) -> None:
    with Collector(port=0, status=429, retry_after=7) as c:
        r = post(http, c, envelope(event()))
        assert r.status == 429 and r.headers["Retry-After"] == "7"


def test_body_over_max_is_413(http: urllib3.PoolManager) -> None:
    small, large = envelope(event()), envelope(*[event() for _ in range(30)])
    with Collector(port=0, max_body_bytes=len(small) + 10) as c:
        assert post(http, c, large).status == 413
        assert post(http, c, small).status == 200  # same keep-alive pool still usable
        assert c.counts()["good"] == 1


def test_reset_connection_gives_no_answer(http: urllib3.PoolManager) -> None:
    with Collector(port=0, reset_rate=1.0) as c:
        with pytest.raises(urllib3.exceptions.ProtocolError):
            post(http, c, envelope(event()))
        assert c.counts()["total"] == 0
        assert c.requests()[0]["fault"] == "reset" and c.requests()[0]["status"] is None
        c.set_faults(reset_rate=0)
        assert post(http, c, envelope(event())).status == 200


def test_faults_change_at_run_time_over_http(http: urllib3.PoolManager, collector: Collector) -> None:
    assert micro(http, collector, "faults", {"status": 503, "retry_after": "2"})["status"] == 503
    r = post(http, collector, envelope(event()))
    assert r.status == 503 and r.headers["Retry-After"] == "2"
    micro(http, collector, "faults", {"status": None})  # null restores the default
    assert post(http, collector, envelope(event())).status == 200
    assert micro(http, collector, "faults?replace=1", {"delay_ms": 1})["retry_after"] is None
    r = http.request("POST", collector.url + "/micro/faults", body=b'{"fail_rate": 2}')
    assert r.status == 400 and b"fail_rate" in r.data
    r = http.request("POST", collector.url + "/micro/faults", body=b'{"nope": 1}')
    assert r.status == 400 and b"nope" in r.data


def test_body_cut_off_by_a_client_that_dies_records_nothing(http: urllib3.PoolManager,
                                                          collector: Collector) -> None:
    # A sender killed mid-request leaves half a body: that is no request, not a bad event.
    body = envelope(event(), event())
    with socket.create_connection(("127.0.0.1", collector.port), timeout=5) as s:
        s.sendall(f"POST {TP2} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:len(body) // 2])
        s.shutdown(socket.SHUT_WR)
        assert s.recv(100) == b""  # hung up without an answer
    assert post(http, collector, envelope(event())).status == 200  # and serving the next
    assert micro(http, collector, "all") == {"total": 1, "good": 1, "bad": 0}
    assert micro(http, collector, "requests")[0]["events"] == 1


def test_reset_forgets_everything(http: urllib3.PoolManager, collector: Collector) -> None:
    post(http, collector, envelope(event(), event(se_va=1)))
    assert micro(http, collector, "reset", {}) == {"reset": True}
    assert micro(http, collector, "all") == {"total": 0, "good": 0, "bad": 0}
    assert micro(http, collector, "eids") == {"eids": {}}
    assert micro(http, collector, "good") == [] and micro(http, collector, "requests") == []


def test_caps_bound_storage_but_not_counts(http: urllib3.PoolManager) -> None:
    limits = Limits(good_cap=5, bad_cap=2, requests_cap=3)
    with Collector(port=0, limits=limits) as c:
        events = [event() for _ in range(8)]
        for e in events:
            post(http, c, envelope(e, event(se_va=2)))
        assert c.counts() == {"total": 16, "good": 8, "bad": 8}
        assert len(c.eids()) == 8
        assert [r["event"]["eid"] for r in c.good()] == [e["eid"] for e in events[3:]]
        assert len(c.bad()) == 2 and len(c.requests()) == 3
        assert [r["event"]["eid"] for r in micro(http, c, "good?limit=2")] == \
            [e["eid"] for e in events[6:]]


def test_counts_are_thread_safe(collector: Collector) -> None:
    def sender() -> None:
        pool = urllib3.PoolManager(retries=False)
        for _ in range(15):
            assert post(pool, collector, envelope(*[event() for _ in range(20)])).status == 200
        pool.clear()
    threads = [threading.Thread(target=sender) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert collector.counts()["good"] == 6 * 15 * 20
    assert set(collector.eids().values()) == {1} and len(collector.eids()) == 1800


def test_refuses_non_loopback_and_bad_faults() -> None:
    with pytest.raises(ConfigError, match="loopback"):
        Collector(host="0.0.0.0")
    with pytest.raises(ValidationError, match="reset_rate"):
        Collector(reset_rate=-1)


def test_runs_as_a_process_and_stops_on_sigterm(tmp_path: Any, http: urllib3.PoolManager) -> None:
    ready = tmp_path / "url"
    code = ("import argparse, sys\n"
            "from sp_pipeline.collector import add_arguments, main\n"
            "parser = argparse.ArgumentParser()\n"
            "add_arguments(parser)\n"
            "sys.exit(main(parser.parse_args(sys.argv[1:])))\n")
    proc = subprocess.Popen([sys.executable, "-c", code, "--port", "0", "--ready-file",
                             str(ready), "--status", "503"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = wait_for(lambda: ready.exists() and ready.read_text().strip(), timeout=15)
        assert http.request("POST", url + TP2, body=envelope(event())).status == 503
        assert json.loads(http.request("GET", url + "/micro/faults").data)["status"] == 503
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
        assert f"listening on {url}" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_reset_without_a_body_and_unknown_paths(http: urllib3.PoolManager, collector: Collector) -> None:
    post(http, collector, envelope(event()))
    r = http.request("POST", collector.url + "/micro/reset")  # no Content-Length, like curl -XPOST
    assert r.status == 200 and collector.counts()["total"] == 0
    assert http.request("GET", collector.url + "/nope").status == 404
    assert http.request("GET", collector.url + "/micro/good?limit=x").status == 400
    r = http.request("POST", collector.url + TP2, body=iter([envelope(event())]),
                     chunked=True)
    assert r.status == 411


def test_exit_codes_for_a_taken_port_and_a_bad_option(collector: Collector) -> None:
    assert run(port=collector.port) == exitcodes.BOOT_ERROR
    cli = "import sys; from sp_pipeline.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", cli, "collector", "--port", "0",
                           "--fail-rate", "1.5"], capture_output=True, text=True, timeout=30)
    assert done.returncode == exitcodes.CONFIG_ERROR
    assert "--fail-rate" in done.stderr


def _raw_exchange(c: Collector, data: bytes) -> bytes:
    """Send ``data`` on a fresh connection and read until the collector hangs up."""
    with socket.create_connection(("127.0.0.1", c.port), timeout=5) as s:
        s.sendall(data)
        received = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return received
            received += chunk


def test_pipelined_requests_are_answered_in_order_and_close_is_honoured(collector: Collector) -> None:
    first, second = envelope(event(se_la="one")), envelope(event(se_la="two"))
    data = b"".join(
        f"POST {TP2} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(b)}\r\n{extra}\r\n".encode() + b
        for b, extra in ((first, ""), (second, "Connection: close\r\n")))
    answers = _raw_exchange(collector, data)  # returns only because the collector hangs up
    assert answers.count(b"HTTP/1.1 200 OK\r\n") == 2
    assert answers.index(b"Connection: close") > answers.index(b"HTTP/1.1 200", 1)
    assert [r["event"]["se_la"] for r in collector.good()] == ["one", "two"]


def test_http_1_0_gets_one_answer_per_connection(collector: Collector) -> None:
    answer = _raw_exchange(collector, b"GET /micro/all HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b'"bad": 0}')
    assert b"Connection: close\r\n" in answer


@pytest.mark.parametrize("data, status", [
    (b"NONSENSE\r\n\r\n", b"400"),
    (b"POST /micro/reset HTTP/1.1\r\nno colon here\r\n\r\n", b"400"),
    (b"POST /micro/reset HTTP/1.1\r\nContent-Length: -3\r\n\r\n", b"400"),
    (b"DELETE /micro/reset HTTP/1.1\r\nConnection: close\r\n\r\n", b"501"),
    (b"GET /micro/all HTTP/1.1\r\nX: " + b"a" * 70_000, b"431"),
])
def test_malformed_requests_get_an_error_and_a_hang_up(collector: Collector, data: bytes,
                                                       status: bytes) -> None:
    answer = _raw_exchange(collector, data)
    assert answer.startswith(b"HTTP/1.1 " + status + b" "), answer[:80]
    assert collector.counts()["total"] == 0


def test_idle_keep_alive_connections_are_hung_up(monkeypatch: Any) -> None:
    from sp_pipeline.collector import server

    monkeypatch.setattr(server, "IDLE_TIMEOUT_S", 0.3)
    monkeypatch.setattr(server, "IDLE_SWEEP_S", 0.05)
    with Collector(port=0) as c:
        with socket.create_connection(("127.0.0.1", c.port), timeout=5) as s:
            s.sendall(b"GET /micro/all HTTP/1.1\r\n\r\n")
            assert s.recv(4096).startswith(b"HTTP/1.1 200")
            assert c.connections == 1
            started = time.monotonic()
            assert s.recv(4096) == b""  # the collector hung up
            assert time.monotonic() - started >= 0.2
        wait_for(lambda: c.connections == 0)


def test_stop_does_not_wait_for_a_delayed_answer() -> None:
    c = Collector(port=0, delay_ms=30_000).start()
    outcome: List[Any] = []

    def post_one() -> None:
        pool = urllib3.PoolManager(retries=False, timeout=60)
        try:
            outcome.append(post(pool, c, envelope(event())).status)
        except urllib3.exceptions.HTTPError as exc:
            outcome.append(exc)

    client = threading.Thread(target=post_one)
    client.start()
    wait_for(lambda: c.delayed == 1)  # received, its answer waiting on the 30 s timer
    started = time.monotonic()
    c.stop()
    client.join(10)
    assert time.monotonic() - started < 5 and not client.is_alive()
    assert isinstance(outcome[0], urllib3.exceptions.ProtocolError)  # hung up, no answer
    assert c.connections == 0 and c.counts()["total"] == 0  # recorded only when answered
