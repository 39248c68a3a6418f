"""A misbehaving collector (issue "Reliability"): every tracked event is delivered or
dead-lettered with its reason, never lost, whatever the collector does.

Real processes on 127.0.0.1: ``sp-pipeline collector`` with its fault options
(``docs/collector.md``) and ``sp-pipeline start``. Faults covered: the collector down
(and the senders idle meanwhile), half the requests answered 503, answers slower than
the read timeout, connections reset mid-request, 413 for large bodies; the backoff shows
in the senders' metrics. 429 with ``Retry-After`` is in ``test_sender.py``.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Dict, List, Sequence

import pytest

from sp_pipeline import Client, exitcodes
from sp_pipeline.testing import LocalCollector, Pipeline, wait_until

from tests.integration.test_sender import (
    FAST,
    dead_eids,
    dead_letters,
    duplicates,
    metric_value,
    requests,
    track,
    wait_delivered,
)
from tests.writer_process import count_rows

pytestmark = pytest.mark.integration

# How long the collector stays down. Short for CI; scripts/soak holds it down for 30 s.
DOWN_SECONDS = 5.0
# Most CPU the senders together may burn while the collector is down, as a fraction of
# the wall time: backing off means sleeping, not spinning on refused connections.
IDLE_CPU_FRACTION = 0.10
_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """A loopback port nothing listens on (free when this returns)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU time the processes used so far (``/proc/PID/stat``)."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rpartition(")")[2].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime: fields 14, 15
    return total / _TICKS


def queue_empty(pipeline: Pipeline) -> bool:
    return count_rows(pipeline.store) == 0


def settled(pipeline: Pipeline, timeout: float) -> None:
    """Wait until every queued row was delivered or dead-lettered."""
    wait_until(lambda: queue_empty(pipeline), timeout, "an empty queue")


# --------------------------------------------------------------------------- down


def test_collector_down_senders_idle_then_everything_arrives(short_dir):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with Pipeline(short_dir, url, *FAST) as pipeline:
        with Client(pipeline.ingest, namespace="down") as client:
            eids = track(client, 500, "down")
            client.flush(15)
        senders = pipeline.pids("sender")
        assert len(senders) == 2
        wait_until(lambda: metric_value(pipeline, "sp_pipeline_sender_requests_total",
                                        "code", "error") > 0, 10, "refused connections")
        refused_before = metric_value(pipeline, "sp_pipeline_sender_requests_total",
                                      "code", "error")
        cpu_before, wall_before = cpu_seconds(senders), time.monotonic()
        # An observation window, not a wait for a condition: the senders must stay
        # quiet for all of it.
        wait_until(lambda: time.monotonic() - wall_before >= DOWN_SECONDS,
                   DOWN_SECONDS + 5, "the down period to pass", interval=0.2)
        cpu = cpu_seconds(senders) - cpu_before
        wall = time.monotonic() - wall_before
        refused = metric_value(pipeline, "sp_pipeline_sender_requests_total",
                               "code", "error") - refused_before
        assert pipeline.pids("sender") == senders  # backing off, not crashing
        assert cpu < IDLE_CPU_FRACTION * wall, f"senders used {cpu:.2f} s CPU in {wall:.1f} s"
        # Backoff capped at 2 s: a few attempts per second per sender at first, then
        # one per 1.6-2 s; without it a refused connection loops thousands of times.
        assert refused < 60, f"{refused:.0f} attempts in {wall:.1f} s while down"
        assert count_rows(pipeline.store) == len(eids)  # all still queued, none dead

        with LocalCollector(short_dir, "--port", str(port)) as collector:
            delivered = wait_delivered(collector, eids, 20)
            assert set(delivered) == set(eids) and set(delivered.values()) == {1}
            assert pipeline.stop() == exitcodes.OK


# --------------------------------------------------------------------------- 503


def test_half_the_requests_503_everything_arrives_and_backoff_is_measured(short_dir):
    with LocalCollector(short_dir, "--fail-rate", "0.5", "--seed", "7") as collector, \
            Pipeline(short_dir, collector.url, *FAST, "--byte-limit", "5000",
                     "--retry-max-delay", "1") as pipeline:
        with Client(pipeline.ingest, namespace="half") as client:
            eids = track(client, 300, "half")
            client.flush(15)
        delivered = wait_delivered(collector, eids, 40)
        assert set(delivered) == set(eids)
        assert duplicates(delivered) == 0  # a 503'd request records nothing
        log = requests(collector)
        failed = [r for r in log if r["fault"] == "fail_rate"]
        assert failed and {r["status"] for r in failed} == {503}
        assert sum(r["events"] for r in log if r["status"] == 200) == len(eids)

        settled(pipeline, 10)
        assert metric_value(pipeline, "sp_pipeline_sender_requests_total", "code",
                            "503") == len(failed)
        assert metric_value(pipeline, "sp_pipeline_sender_events_total", "outcome",
                            "retried") == sum(r["events"] for r in failed)
        assert metric_value(pipeline, "sp_pipeline_sender_backoff_seconds_count") == len(failed)
        assert metric_value(pipeline, "sp_pipeline_sender_backoff_seconds_sum") > 0
        assert metric_value(pipeline, "sp_pipeline_store_dead_letter_events") == 0
        assert pipeline.stop() == exitcodes.OK


# --------------------------------------------------------------------------- slow


def test_answers_slower_than_the_read_timeout_are_retried(short_dir):
    batch = 50
    with LocalCollector(short_dir, "--delay-ms", "2500") as collector, \
            Pipeline(short_dir, collector.url, *FAST, "--read-timeout", "1",
                     "--connect-timeout", "0.5", "--batch-max-events", str(batch)) as pipeline:
        with Client(pipeline.ingest, namespace="slow") as client:
            eids = track(client, 200, "slow")
            client.flush(15)

        def timeouts() -> float:
            return metric_value(pipeline, "sp_pipeline_sender_requests_total", "code", "error")

        wait_until(lambda: timeouts() >= 4, 15, "requests timing out")
        collector.set_faults(delay_ms=None)
        wait_delivered(collector, eids, 20)
        settled(pipeline, 10)
        # The collector records a request once its delay ends, even if the sender gave
        # up on it meanwhile (docs/collector.md: only faulted requests go unrecorded),
        # so every timed-out request comes back as duplicates once its delay ends.
        wait_until(lambda: duplicates(collector.eids()) > 0, 5, "the slow requests recorded")
        delivered = collector.eids()
        assert set(delivered) == set(eids)
        assert duplicates(delivered) <= timeouts() * batch
        assert metric_value(pipeline, "sp_pipeline_sender_events_total", "outcome", "retried") > 0
        assert metric_value(pipeline, "sp_pipeline_store_dead_letter_events") == 0
        assert pipeline.stop() == exitcodes.OK


# --------------------------------------------------------------------------- resets


def test_connections_reset_mid_request_everything_arrives_once(short_dir):
    with LocalCollector(short_dir, "--reset-rate", "0.3", "--seed", "3") as collector, \
            Pipeline(short_dir, collector.url, *FAST, "--byte-limit", "5000") as pipeline:
        with Client(pipeline.ingest, namespace="reset") as client:
            eids = track(client, 1000, "reset")
            client.flush(15)
        delivered = wait_delivered(collector, eids, 40)
        assert set(delivered) == set(eids)
        assert duplicates(delivered) == 0  # a reset request records nothing
        log = requests(collector)
        resets = [r for r in log if r["fault"] == "reset"]
        assert resets and {r["status"] for r in resets} == {None}
        settled(pipeline, 10)
        # Every answered request is counted. A reset is counted as "error" unless the
        # transport's one immediate resend (transport._stale_keep_alive) absorbed it.
        assert metric_value(pipeline, "sp_pipeline_sender_requests_total", "code",
                            "200") == sum(r["status"] == 200 for r in log)
        assert metric_value(pipeline, "sp_pipeline_store_dead_letter_events") == 0
        assert pipeline.stop() == exitcodes.OK


# --------------------------------------------------------------------------- 413


def test_413_shrinks_batches_and_dead_letters_only_events_too_large_alone(short_dir):
    max_body, byte_limit = 3000, 5000  # a byte_limit the collector does not accept
    with LocalCollector(short_dir, "--max-body-bytes", str(max_body)) as collector, \
            Pipeline(short_dir, collector.url, *FAST, "--byte-limit", str(byte_limit)) as pipeline:
        with Client(pipeline.ingest, namespace="big") as client:
            # One at a time: each travels alone, well under the collector's limit.
            alone: List[str] = []
            for i in range(5):
                alone += track(client, 1, f"alone{i}")
                client.flush(10)
                wait_delivered(collector, alone, 10)
            # A backlog: the collector answers 503 (a 413 still wins for large bodies)
            # until it is all queued, so the senders then lease full 5000-byte batches.
            collector.set_faults(status=503)
            backlog = track(client, 400, "backlog")
            big = track(client, 2, "big", label="x" * 4000)  # alone over both limits
            client.flush(15)
            collector.set_faults(status=None)
        settled(pipeline, 20)

        tracked = alone + backlog + big
        delivered: Dict[str, int] = collector.eids()
        rows = dead_letters(pipeline)
        dead = dead_eids(rows)
        assert len(dead) == len(set(dead))
        assert not set(dead) & set(delivered)
        assert sorted(dead + list(delivered)) == sorted(tracked)  # nothing lost
        assert set(delivered.values()) == {1}
        assert {r["reason"] for r in rows} == {"status_413"}
        assert {r["last_status"] for r in rows} == {413}
        assert set(dead) == set(big)  # too large on their own
        assert set(alone) <= set(delivered) and set(backlog) <= set(delivered)
        assert f"byte limit {byte_limit} ->" in pipeline.log()  # batches were split
        log = requests(collector)
        assert all(r["bytes"] > max_body for r in log if r["status"] == 413)
        assert all(r["bytes"] <= max_body for r in log if r["status"] == 200)
        assert metric_value(pipeline, "sp_pipeline_store_dead_lettered_events_total",
                            "reason", "status_413") == len(dead)
        assert pipeline.stop() == exitcodes.OK
