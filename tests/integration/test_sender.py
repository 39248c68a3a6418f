"""The senders' promises, proven end to end: ``sp-pipeline start`` (writer, senders,
exporter as real processes) delivering to ``sp-pipeline collector`` on 127.0.0.1.

Pinned here: every event arrives exactly once when nothing fails, in POST bodies within
``byte_limit`` (one event alone may pass it) with one millisecond ``stm`` per request;
503 and 429 answers are retried no earlier than the backoff or ``Retry-After`` allows and
every event arrives in the end; a 400 dead-letters with its status recorded and
``requeue`` brings the events back; a sender killed with SIGKILL mid-request loses
nothing (its lease expires and another sender delivers); GET and gzip deliver; a spent
retry budget dead-letters with ``retry_budget_attempts``.

The collector's request log (``/micro/requests``) is the witness: it lists faulted
requests too, with the time each arrived (``received_at``, ms since the epoch).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Sequence

import pytest

from sp_pipeline import Client, exitcodes
from sp_pipeline.events import StructuredEvent
from sp_pipeline.testing import LocalCollector, Pipeline, http_json, wait_until

from tests.writer_process import count_rows, read_metric

pytestmark = pytest.mark.integration

# Short timeouts and backoff so that every retry happens within a test; a free metrics
# port per pipeline (other suites run side by side).
FAST = ("--metrics-addr", "127.0.0.1:0", "--connect-timeout", "1", "--read-timeout", "2",
        "--lease-seconds", "6", "--retry-base", "0.2", "--retry-max-delay", "2",
        "--senders", "2", "--drain-timeout", "8")
JITTER = 0.2  # RetryPolicy.from_settings' default: a delay is at least (1 - JITTER) x nominal
CLOCK_SLACK_MS = 2  # received_at and retry_at are truncated to the millisecond


# --------------------------------------------------------------------------- helpers


def track(client: Client, n: int, tag: str, label: str | None = None) -> List[str]:
    """Track ``n`` structured events; their eids in order."""
    return [client.track(StructuredEvent("sender", tag, label=label, value=i)) for i in range(n)]


def missing(expected: Iterable[str], delivered: Dict[str, int]) -> List[str]:
    return [e for e in expected if not delivered.get(e)]


def wait_delivered(collector: LocalCollector, eids: Sequence[str], timeout: float) -> Dict[str, int]:
    """Wait until every eid reached the collector; the collector's eid tally."""
    wait_until(lambda: not missing(eids, collector.eids()), timeout,
               f"all {len(eids)} events at the collector")
    return collector.eids()


def duplicates(delivered: Dict[str, int]) -> int:
    return sum(n - 1 for n in delivered.values())


def requests(collector: LocalCollector) -> List[dict]:
    """The collector's request log (faulted requests included), oldest first."""
    return http_json(collector.url + "/micro/requests")  # type: ignore[return-value]


def metric(pipeline: Pipeline, name: str, label: str | None = None) -> Dict[str, float]:
    """Samples of ``name`` merged over the pipeline's metrics files, by ``label``."""
    return read_metric(os.path.join(pipeline.run_dir, "metrics"), name, label)


def metric_value(pipeline: Pipeline, name: str, label: str | None = None, key: str = "") -> float:
    return metric(pipeline, name, label).get(key, 0.0)


def dead_letters(pipeline: Pipeline) -> List[dict]:
    """``sp-pipeline dead-letters list --json`` (reads the store read-only)."""
    out = pipeline.cli("dead-letters", "list", "--json", "--limit", "100000")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def dead_eids(rows: Sequence[dict]) -> List[str]:
    return [json.loads(r["payload"])["eid"] for r in rows]


def gaps_ms(log: Sequence[dict]) -> List[int]:
    """Milliseconds between consecutive requests' arrivals."""
    times = [r["received_at"] for r in log]
    return [b - a for a, b in zip(times, times[1:])]


# --------------------------------------------------------------------------- delivery


def test_post_delivers_each_event_once_within_the_byte_limit(short_dir):
    byte_limit = 5000
    with LocalCollector(short_dir) as collector, \
            Pipeline(short_dir, collector.url, *FAST, "--byte-limit", str(byte_limit)) as pipeline:
        started_ms = int(time.time() * 1000)
        with Client(pipeline.ingest, namespace="once") as client:
            eids = track(client, 1000, "small")
            # Alone over the limit: must travel alone rather than be stuck or split.
            big = track(client, 2, "big", label="x" * (byte_limit + 500))
            client.flush(15)
        delivered = wait_delivered(collector, eids + big, 30)
        ended_ms = int(time.time() * 1000)

        assert set(delivered) == set(eids + big)
        assert set(delivered.values()) == {1}
        assert collector.counts()["bad"] == 0
        log = requests(collector)
        assert {r["method"] for r in log} == {"POST"}
        assert {r["status"] for r in log} == {200} and {r["fault"] for r in log} == {None}
        assert sum(r["events"] for r in log) == len(eids) + len(big)
        oversized = [r for r in log if r["bytes"] > byte_limit]
        assert len(oversized) == len(big) and all(r["events"] == 1 for r in oversized)
        assert max(r["events"] for r in log) > 10  # batches, not one event per request
        for r in log:
            assert len(r["stm"]) == 1, r  # one send time per request
            stm = r["stm"][0]
            assert stm.isdigit() and len(stm) == 13, r  # milliseconds since the epoch
            assert started_ms <= int(stm) <= ended_ms
            assert int(stm) <= r["received_at"] + CLOCK_SLACK_MS  # set when sent
        assert metric_value(pipeline, "sp_pipeline_sender_events_total", "outcome",
                            "delivered") == len(eids) + len(big)
        assert pipeline.stop() == exitcodes.OK


def test_one_sender_keeps_several_requests_in_flight(short_dir):
    # Latency hiding: with every answer 400 ms away, one sender's requests overlap
    # (one at a time would leave a 400 ms gap between arrivals).
    delay_ms, inflight = 400, 4
    with LocalCollector(short_dir, "--delay-ms", str(delay_ms)) as collector, \
            Pipeline(short_dir, collector.url, *FAST, "--senders", "1", "--inflight", str(inflight),
                     "--batch-max-events", "10", "--read-timeout", "3") as pipeline:
        with Client(pipeline.ingest, namespace="inflight") as client:
            eids = track(client, 120, "overlap")
            client.flush(15)
        wait_delivered(collector, eids, 30)
        arrivals = sorted(r["received_at"] for r in requests(collector))
        assert len(arrivals) >= 12
        # Most requests that arrived while an earlier one was still being answered.
        overlap = max(sum(1 for t in arrivals if start <= t < start + delay_ms)
                      for start in arrivals)
        assert overlap >= inflight - 1, arrivals
        assert pipeline.stop() == exitcodes.OK


def test_get_delivers_every_event_once_with_one_request_each(short_dir):
    with LocalCollector(short_dir) as collector, \
            Pipeline(short_dir, collector.url, *FAST, "--method", "get") as pipeline:
        with Client(pipeline.ingest, namespace="get") as client:
            eids = track(client, 200, "get")
            client.flush(15)
        delivered = wait_delivered(collector, eids, 30)
        assert set(delivered) == set(eids) and set(delivered.values()) == {1}
        assert collector.counts()["bad"] == 0
        log = requests(collector)
        assert len(log) == len(eids)
        assert {r["method"] for r in log} == {"GET"}
        assert {r["events"] for r in log} == {1} and {r["status"] for r in log} == {200}
        assert all(len(r["stm"]) == 1 and len(r["stm"][0]) == 13 for r in log)
        good = http_json(collector.url + "/micro/good")
        assert {g["method"] for g in good} == {"GET"}  # type: ignore[union-attr]
        assert pipeline.stop() == exitcodes.OK


def test_gzip_bodies_deliver(short_dir):
    with LocalCollector(short_dir) as collector, \
            Pipeline(short_dir, collector.url, *FAST, "--gzip", "true",
                     "--byte-limit", "20000") as pipeline:
        with Client(pipeline.ingest, namespace="gzip") as client:
            eids = track(client, 600, "gzip")
            client.flush(15)
        delivered = wait_delivered(collector, eids, 30)
        assert set(delivered) == set(eids) and set(delivered.values()) == {1}
        assert collector.counts()["bad"] == 0
        log = requests(collector)
        assert {r["status"] for r in log} == {200}
        # About 195 bytes per event as plain JSON; the bodies on the wire were compressed.
        per_event = sum(r["bytes"] for r in log) / sum(r["events"] for r in log)
        assert per_event < 120, f"{per_event:.0f} bytes per event: not gzipped"
        assert pipeline.stop() == exitcodes.OK


# --------------------------------------------------------------------------- retries


def test_flapping_503_backs_off_exponentially_and_every_event_arrives(short_dir):
    base, max_delay = 0.2, 2.0  # as in FAST
    with LocalCollector(short_dir, "--status", "503") as collector, \
            Pipeline(short_dir, collector.url, *FAST) as pipeline:
        with Client(pipeline.ingest, namespace="flap") as client:
            # One event, so one batch: every request in the log carries it, whichever
            # sender leased it, and the gaps between requests are its retry delays.
            first = track(client, 1, "first")
            client.flush(15)
            wait_until(lambda: len(requests(collector)) >= 4, 15, "four 503 answers")
            log = requests(collector)[:4]
            assert {r["status"] for r in log} == {503} and {r["events"] for r in log} == {1}
            for attempt, gap in enumerate(gaps_ms(log), start=1):
                least = min(base * 2 ** (attempt - 1), max_delay) * (1 - JITTER) * 1000
                assert gap >= least - CLOCK_SLACK_MS, (attempt, gaps_ms(log))
            wait_until(lambda: metric_value(pipeline, "sp_pipeline_sender_requests_total",
                                            "code", "503") >= 4, 5, "503 answers counted")

            collector.set_faults(status=None)
            wait_delivered(collector, first, 15)

            # The collector goes away again, with more in the queue, and comes back.
            collector.set_faults(status=503)
            answered = len(requests(collector))
            second = track(client, 500, "second")
            client.flush(15)
            wait_until(lambda: sum(r["status"] == 503 for r in requests(collector)[answered:]) >= 2,
                       15, "503 answers to the second lot")
            collector.set_faults(status=None)
            delivered = wait_delivered(collector, first + second, 20)

        assert set(delivered) == set(first + second)
        assert duplicates(delivered) == 0  # a 503 records nothing: nothing to send twice
        assert metric_value(pipeline, "sp_pipeline_sender_events_total", "outcome", "retried") > 0
        assert metric_value(pipeline, "sp_pipeline_sender_backoff_seconds_count") > 0
        assert metric_value(pipeline, "sp_pipeline_store_dead_letter_events") == 0
        assert pipeline.stop() == exitcodes.OK


def test_429_retry_after_is_never_cut_short(short_dir):
    retry_after = 1  # seconds; longer than the backoff base (0.2 s)
    with LocalCollector(short_dir, "--status", "429", "--retry-after", str(retry_after)) \
            as collector, Pipeline(short_dir, collector.url, *FAST) as pipeline:
        with Client(pipeline.ingest, namespace="busy") as client:
            eids = track(client, 1, "busy")  # one batch, leased by either sender
            client.flush(15)
            wait_until(lambda: len(requests(collector)) >= 3, 15, "three 429 answers")
        log = requests(collector)[:3]
        assert {r["status"] for r in log} == {429} and {r["events"] for r in log} == {1}
        for gap in gaps_ms(log):
            assert gap >= retry_after * 1000 - CLOCK_SLACK_MS, gaps_ms(log)
        # Every delay the senders chose honoured the header (the first bucket is 0.5 s).
        wait_until(lambda: metric_value(pipeline, "sp_pipeline_sender_backoff_seconds_count")
                   >= 2, 5, "backoffs counted")
        early = metric(pipeline, "sp_pipeline_sender_backoff_seconds_bucket", "le")
        assert early.get("0.5", 0.0) == 0, early
        assert metric_value(pipeline, "sp_pipeline_sender_requests_total", "code", "429") >= 2

        collector.set_faults(status=None)
        delivered = wait_delivered(collector, eids, 15)
        assert set(delivered.values()) == {1}
        assert pipeline.stop() == exitcodes.OK


def test_retry_budget_spent_dead_letters_with_its_reason(short_dir):
    with LocalCollector(short_dir, "--status", "503") as collector, \
            Pipeline(short_dir, collector.url, *FAST, "--retry-max-attempts", "2") as pipeline:
        with Client(pipeline.ingest, namespace="budget") as client:
            eids = track(client, 50, "budget")
            client.flush(15)
        wait_until(lambda: metric_value(pipeline, "sp_pipeline_store_dead_letter_events")
                   >= len(eids), 15, "every event dead-lettered")
        rows = dead_letters(pipeline)
        assert sorted(dead_eids(rows)) == sorted(eids)
        assert {r["reason"] for r in rows} == {"retry_budget_attempts"}
        assert {r["last_status"] for r in rows} == {503}
        assert {r["attempts"] for r in rows} == {2}
        log = requests(collector)
        assert sum(r["events"] for r in log) == 2 * len(eids)  # two attempts, no third
        assert metric_value(pipeline, "sp_pipeline_sender_events_total", "outcome",
                            "dead_lettered") == len(eids)
        assert collector.counts()["good"] == 0
        assert pipeline.stop() == exitcodes.OK


# --------------------------------------------------------------------------- dead letters


def test_400_dead_letters_with_status_and_requeue_delivers_them(short_dir):
    with LocalCollector(short_dir, "--status", "400") as collector, \
            Pipeline(short_dir, collector.url, *FAST) as pipeline:
        with Client(pipeline.ingest, namespace="dead") as client:
            eids = track(client, 100, "dead")
            client.flush(15)
        wait_until(lambda: metric_value(pipeline, "sp_pipeline_store_dead_letter_events")
                   >= len(eids), 15, "every event dead-lettered")
        assert metric_value(pipeline, "sp_pipeline_store_dead_lettered_events_total",
                            "reason", "status_400") == len(eids)
        assert metric_value(pipeline, "sp_pipeline_sender_requests_total", "code", "400") >= 1
        assert pipeline.stop() == exitcodes.OK

        rows = dead_letters(pipeline)
        assert sorted(dead_eids(rows)) == sorted(eids)
        assert {r["reason"] for r in rows} == {"status_400"}
        assert {r["last_status"] for r in rows} == {400}
        assert {r["attempts"] for r in rows} == {1}  # dead at once, never retried
        assert collector.counts()["good"] == 0

        collector.set_faults(status=None)
        out = pipeline.cli("dead-letters", "requeue")
        assert out.returncode == 0, out.stdout + out.stderr
        assert f"requeued {len(eids)}" in out.stdout
        assert dead_letters(pipeline) == []

        pipeline.start()
        delivered = wait_delivered(collector, eids, 20)
        assert set(delivered) == set(eids) and set(delivered.values()) == {1}
        assert pipeline.stop() == exitcodes.OK


# --------------------------------------------------------------------------- kill -9


def _sockets_of(pid: int) -> set:
    """Socket inodes open in process ``pid``."""
    found = set()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(os.path.join(fd_dir, fd))
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            found.add(target[len("socket:["):-1])
    return found


def connected_to(pid: int, port: int) -> bool:
    """True if process ``pid`` holds an established TCP connection to 127.0.0.1:port."""
    try:
        inodes = _sockets_of(pid)
        with open(f"/proc/{pid}/net/tcp") as fh:
            lines = fh.read().splitlines()[1:]
    except OSError:
        return False
    for line in lines:
        fields = line.split()
        remote, state, inode = fields[2], fields[3], fields[9]
        if state == "01" and int(remote.split(":")[1], 16) == port and inode in inodes:
            return True
    return False


@dataclass
class KillRun:
    """What one sender killed mid-request left behind."""

    eids: List[str]
    delivered: Dict[str, int]
    lease_expired_metric: float
    senders_after: List[int]
    victim: int
    exit_code: Optional[int]


@pytest.fixture(scope="module")
def kill_run() -> Iterator[KillRun]:
    """Kill one sender (SIGKILL) while its requests wait 2.5 s at the collector, drop
    the delay, and wait until the queue is empty. Shared by the tests below."""
    workdir = tempfile.mkdtemp(prefix="spp-", dir="/tmp")
    try:
        yield _kill_one_sender(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _kill_one_sender(workdir: str) -> KillRun:
    with LocalCollector(workdir, "--delay-ms", "2500") as collector, \
            Pipeline(workdir, collector.url, *FAST, "--read-timeout", "4", "--inflight", "4",
                     "--connect-timeout", "0.5", "--lease-seconds", "5",
                     "--batch-max-events", "20") as pipeline:
        port = int(collector.url.rsplit(":", 1)[1])
        with Client(pipeline.ingest, namespace="kill") as client:
            eids = track(client, 300, "kill")
            client.flush(15)
        victim = pipeline.pids("sender")[0]
        # Requests take 2.5 s, so a connection to the collector means one in flight.
        wait_until(lambda: connected_to(victim, port), 10, "the victim's first request")
        os.kill(victim, signal.SIGKILL)
        collector.set_faults(delay_ms=0)
        # Every eid arrives early (the collector still records the killed requests when
        # their delay ends); the victim's rows leave the queue only once their lease
        # expired and another sender delivered them.
        wait_delivered(collector, eids, 25)
        wait_until(lambda: count_rows(pipeline.store) == 0, 20, "an empty queue")
        wait_until(lambda: len(pipeline.pids("sender")) == 2
                   and victim not in pipeline.pids("sender"), 10, "the victim restarted")
        return KillRun(eids, collector.eids(),
                       metric_value(pipeline, "sp_pipeline_lease_expired_events_total"),
                       pipeline.pids("sender"), victim, pipeline.stop())


def test_sender_killed_mid_request_loses_nothing(kill_run):
    assert set(kill_run.delivered) == set(kill_run.eids)
    # At-least-once: the victim's batches (at most inflight 4 x 20 events) arrived
    # twice, once from its own request and once from the sender that took over.
    assert 0 < duplicates(kill_run.delivered) <= 4 * 20, duplicates(kill_run.delivered)
    assert kill_run.victim not in kill_run.senders_after  # restarted by the supervisor
    assert kill_run.exit_code == exitcodes.OK


def test_expired_lease_is_counted(kill_run):
    assert kill_run.lease_expired_metric >= duplicates(kill_run.delivered) > 0
