"""The exporter's metrics against a real pipeline: names, types, values, promtool's lint,
and every metric the dashboard and alert rules use.

One pipeline run (collector, supervisor, writer, senders, exporter as real processes on
127.0.0.1) drives every labelled series into existence: 300 delivered events, 5 events
dead-lettered by a collector answering 400, and one sender killed with SIGKILL so the
supervisor restarts it. The scrape taken afterwards is shared by the tests of this module.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Tuple

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sp_pipeline import Client
from sp_pipeline.events import StructuredEvent
from sp_pipeline.testing import LocalCollector, Pipeline, wait_until
from tests.unit.test_dashboard import (
    alert_rules,
    dashboard_expressions,
    metric_names,
    template_queries,
)

pytestmark = pytest.mark.integration

DELIVERED = 300
DEAD = 5

LabelKey = Tuple[Tuple[str, str], ...]


@dataclass
class Scrape:
    """One ``/metrics`` answer: raw text, family types, and sample values."""

    text: str
    types: Dict[str, str]  # family name as parsed (counters without _total) -> type
    samples: Dict[str, Dict[LabelKey, float]]  # sample name -> labels -> value
    restarts_seen_before: Optional[bool] = None  # set by the fixture below

    @classmethod
    def parse(cls, text: str) -> "Scrape":
        types: Dict[str, str] = {}
        samples: Dict[str, Dict[LabelKey, float]] = {}
        for family in text_string_to_metric_families(text):
            types[family.name] = family.type
            for s in family.samples:
                samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
        return cls(text, types, samples)

    def value(self, name: str, **labels: str) -> Optional[float]:
        return self.samples.get(name, {}).get(tuple(sorted(labels.items())))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> Tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _track(ingest: str, n: int) -> None:
    with Client(ingest, namespace="metrics-test", app_id="test") as client:
        for i in range(n):
            client.track(StructuredEvent("metrics", "test", label=f"e{i}", value=float(i)))
        client.flush(timeout=10)


class Run:
    """The pipeline under test and a way to scrape it."""

    def __init__(self, collector: LocalCollector, pipeline: Pipeline, addr: str) -> None:
        self.collector, self.pipeline, self.base = collector, pipeline, f"http://{addr}"

    def scrape(self) -> Scrape:
        status, body = _get(self.base + "/metrics")
        assert status == 200
        return Scrape.parse(body.decode())

    def until(self, what: str, check, timeout: float = 10.0) -> Scrape:
        """Scrape until ``check(scrape)`` holds; return that scrape."""
        def attempt() -> Optional[Scrape]:
            s = self.scrape()
            return s if check(s) else None
        return wait_until(attempt, timeout, what, interval=0.05)  # type: ignore[return-value]


@pytest.fixture(scope="module")
def run() -> Iterator[Run]:
    # ipc:// socket paths are limited to ~100 bytes: a short directory under /tmp.
    workdir = tempfile.mkdtemp(prefix="spm-", dir="/tmp")
    addr = f"127.0.0.1:{_free_port()}"
    try:
        with LocalCollector(workdir) as collector, \
                Pipeline(workdir, collector.url, "--metrics-addr", addr) as pipeline:
            yield Run(collector, pipeline, addr)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def scrape(run: Run) -> Scrape:
    """Scrape after deliveries, dead letters and one sender restart."""
    _track(run.pipeline.ingest, DELIVERED)
    run.collector.wait_for(DELIVERED, timeout=15)
    run.until("every delivery counted", lambda s: s.value(
        "sp_pipeline_sender_events_total", outcome="delivered") == DELIVERED)

    run.collector.set_faults(status=400)  # a dead-letter status by default
    _track(run.pipeline.ingest, DEAD)
    run.until("dead letters counted and in the store gauge", lambda s: (
        s.value("sp_pipeline_store_dead_lettered_events_total", reason="status_400") == DEAD
        and s.value("sp_pipeline_store_dead_letter_events") == DEAD))
    run.collector.set_faults(status=None)

    before = run.scrape()
    os.kill(run.pipeline.pids("sender")[0], signal.SIGKILL)
    after = run.until("a sender restart counted", lambda s: s.value(
        "sp_pipeline_process_restarts_total", role="sender") == 1)
    after.restarts_seen_before = "sp_pipeline_process_restarts_total" in before.samples
    return after


# ---------------------------------------------------------------- the exposition

def test_promtool_check_metrics_is_clean(scrape):
    from tests.unit.test_dashboard import run_promtool

    result = run_promtool("check", "metrics", stdin=scrape.text.encode())
    # promtool exits non-zero on lint problems (bad suffixes, missing HELP, wrong
    # histogram layout) as well as parse errors; it prints nothing when all is well.
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


@pytest.mark.parametrize("name,kind,label", [
    ("sp_pipeline_ingest_events_total", "counter", "outcome"),
    ("sp_pipeline_store_queued_events", "gauge", None),
    ("sp_pipeline_store_leased_events", "gauge", None),
    ("sp_pipeline_store_dead_letter_events", "gauge", None),
    ("sp_pipeline_store_oldest_event_age_seconds", "gauge", None),
    ("sp_pipeline_store_commit_seconds", "histogram", None),
    ("sp_pipeline_sender_requests_total", "counter", "code"),
    ("sp_pipeline_sender_events_total", "counter", "outcome"),
    ("sp_pipeline_sender_request_seconds", "histogram", None),
    ("sp_pipeline_delivery_latency_seconds", "histogram", None),
    ("sp_pipeline_process_restarts_total", "counter", "role"),
])
def test_required_family_is_exposed(scrape, name, kind, label):
    family = name[:-len("_total")] if kind == "counter" else name
    assert scrape.types.get(family) == kind, f"{name}: {scrape.types.get(family)}"
    exposed = [f"{name}_bucket", f"{name}_sum", f"{name}_count"] if kind == "histogram" \
        else [name]
    for sample_name in exposed:
        assert scrape.samples.get(sample_name), f"{sample_name} has no sample"
        for labels in scrape.samples[sample_name]:
            keys = {k for k, _ in labels} - {"le"}
            assert keys == ({label} if label else set()), f"{sample_name}{dict(labels)}"
    assert f"# TYPE {name} {kind}" in scrape.text  # the exact exposed name


def test_every_metric_of_the_dashboard_and_alerts_is_exposed(scrape):
    used = metric_names(dashboard_expressions() + template_queries()
                        + [r["expr"] for r in alert_rules()])
    assert len(used) >= 12  # the extraction found them
    missing = sorted(used - set(scrape.samples))
    assert not missing, f"used by the dashboard or alerts but not exposed: {missing}"
    for name in used:
        if name.endswith("_bucket"):
            assert scrape.types[name[:-len("_bucket")]] == "histogram", name


# ---------------------------------------------------------------- the values

def test_counters_match_what_happened(scrape):
    v = scrape.value
    assert v("sp_pipeline_ingest_events_total", outcome="stored") == DELIVERED + DEAD
    assert v("sp_pipeline_sender_events_total", outcome="delivered") == DELIVERED
    assert v("sp_pipeline_sender_events_total", outcome="dead_lettered") == DEAD
    assert v("sp_pipeline_store_dead_lettered_events_total", reason="status_400") == DEAD
    assert v("sp_pipeline_delivery_latency_seconds_count") == DELIVERED
    assert v("sp_pipeline_sender_requests_total", code="200") >= 1
    assert v("sp_pipeline_sender_requests_total", code="400") >= 1
    requests = sum(scrape.samples["sp_pipeline_sender_requests_total"].values())
    assert v("sp_pipeline_sender_request_seconds_count") == requests
    assert v("sp_pipeline_store_commit_seconds_count") >= 1
    assert v("sp_pipeline_process_restarts_total", role="sender") == 1


def test_histogram_buckets_are_cumulative_and_end_at_count(scrape):
    for name in ("sp_pipeline_store_commit_seconds", "sp_pipeline_sender_request_seconds",
                 "sp_pipeline_delivery_latency_seconds"):
        buckets = sorted((float(dict(k)["le"]), val)
                         for k, val in scrape.samples[f"{name}_bucket"].items())
        counts = [val for _, val in buckets]
        assert counts == sorted(counts), name
        assert buckets[-1] == (float("inf"), scrape.value(f"{name}_count")), name


def test_store_gauges_settle_once_the_queue_is_empty(run, scrape):
    settled = run.until("the store gauges to settle", lambda s: (
        s.value("sp_pipeline_store_queued_events") == 0
        and s.value("sp_pipeline_store_leased_events") == 0
        and s.value("sp_pipeline_store_oldest_event_age_seconds") == 0
        # the WAL holds the commits above: only a truncating checkpoint (past half of
        # wal_max_bytes, 64 MiB by default) empties it
        and s.value("sp_pipeline_store_wal_bytes") > 0))
    assert settled.value("sp_pipeline_store_dead_letter_events") == DEAD
    assert settled.value("sp_pipeline_store_full") == 0


def test_health_is_ok_while_running(run, scrape):
    status, body = _get(run.base + "/health")
    assert status == 200, body


def test_restart_counter_existed_before_the_first_restart(scrape):
    """A series that appears only at its first increment hides that increment from
    increase() (alert SpPipelineRoleRestarting) until more restarts follow."""
    assert scrape.restarts_seen_before, (
        "sp_pipeline_process_restarts_total{role} is not initialised at 0 before the first restart")
