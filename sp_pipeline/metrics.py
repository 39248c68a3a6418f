"""Every Prometheus metric of sp-pipeline, defined in one place.

Processes record into prometheus-client's multiprocess mode: the supervisor sets
``PROMETHEUS_MULTIPROC_DIR`` (``RUN_DIR/metrics``) before any child starts, each child
writes its own files there, and the exporter merges them for ``/metrics``. Importing
this module has no side effect beyond creating metric objects; outside a pipeline
(tests, the client library in an app) they record into the default in-process registry.

Names are in base units (seconds, bytes), counters end in ``_total``.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0)
_DELIVERY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                     60.0, 300.0, 900.0, 3600.0)

# ---------------------------------------------------------------- ingest (writer)
INGEST_EVENTS = Counter(
    "sp_pipeline_ingest_events",
    "Events received on the ingest socket, by outcome (stored, rejected_<reason>, "
    "duplicate, out_of_order, dropped_oldest).",
    ["outcome"],
)
INGEST_FRAMES = Counter(
    "sp_pipeline_ingest_frames",
    "Producer frames received, by outcome (accepted, rejected_<reason>, duplicate, "
    "out_of_order).",
    ["outcome"],
)

# ---------------------------------------------------------------- store (writer)
STORE_QUEUED = Gauge(
    "sp_pipeline_store_queued_events", "Events in the queue (leased or not).",
    multiprocess_mode="livemax",
)
STORE_QUEUED_BYTES = Gauge(
    "sp_pipeline_store_queued_bytes", "Payload bytes in the queue.", multiprocess_mode="livemax",
)
STORE_LEASED = Gauge(
    "sp_pipeline_store_leased_events", "Events under an unexpired lease.",
    multiprocess_mode="livemax",
)
STORE_DEAD = Gauge(
    "sp_pipeline_store_dead_letter_events", "Events in the dead-letter table.",
    multiprocess_mode="livemax",
)
STORE_OLDEST_AGE = Gauge(
    "sp_pipeline_store_oldest_event_age_seconds",
    "Age of the oldest queued event (0 when the queue is empty).",
    multiprocess_mode="livemax",
)
STORE_WAL_BYTES = Gauge(
    "sp_pipeline_store_wal_bytes", "Size of the SQLite WAL file.", multiprocess_mode="livemax",
)
STORE_COMMIT_SECONDS = Histogram(
    "sp_pipeline_store_commit_seconds", "Time to commit one writer transaction.",
    buckets=_LATENCY_BUCKETS,
)
STORE_COMMIT_EVENTS = Histogram(
    "sp_pipeline_store_commit_events", "Events inserted per writer transaction.",
    buckets=(1, 10, 50, 100, 500, 1000, 2500, 5000, 10000),
)
STORE_DEAD_LETTERED = Counter(
    "sp_pipeline_store_dead_lettered_events",
    "Events moved to the dead-letter table, by reason.",
    ["reason"],
)
STORE_DEAD_EVICTED = Counter(
    "sp_pipeline_store_dead_letters_evicted",
    "Dead letters deleted because the dead-letter table was at max_dead_letters.",
)
STORE_FULL = Gauge(
    "sp_pipeline_store_full",
    "1 while the store is at its cap and the writer blocks ingest (when_full=block).",
    multiprocess_mode="livemax",
)
LEASES = Counter(
    "sp_pipeline_leases", "Lease requests answered, by outcome (events, empty).", ["outcome"],
)
LEASE_EXPIRED = Counter(
    "sp_pipeline_lease_expired_events", "Events whose lease expired before an ack or release.",
)

# ---------------------------------------------------------------- senders
SENDER_REQUESTS = Counter(
    "sp_pipeline_sender_requests",
    "HTTP requests to the collector, by status code ('error' for no answer; "
    "'reset_resent' for a connection that died before answering and was retried at once).",
    ["code"],
)
SENDER_EVENTS = Counter(
    "sp_pipeline_sender_events",
    "Events by delivery outcome (delivered, retried, dead_lettered).",
    ["outcome"],
)
SENDER_REQUEST_SECONDS = Histogram(
    "sp_pipeline_sender_request_seconds", "Time for one HTTP request to the collector.",
    buckets=_LATENCY_BUCKETS,
)
SENDER_BACKOFF_SECONDS = Histogram(
    "sp_pipeline_sender_backoff_seconds", "Delays chosen before retrying a batch.",
    buckets=(0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 60, 120, 300),
)
SENDER_INFLIGHT = Gauge(
    "sp_pipeline_sender_inflight_requests", "Requests in flight.", multiprocess_mode="livesum",
)
DELIVERY_LATENCY = Histogram(
    "sp_pipeline_delivery_latency_seconds",
    "From enqueue in the store to the collector's 2xx, per event.",
    buckets=_DELIVERY_BUCKETS,
)

# ---------------------------------------------------------------- supervisor
# sp_pipeline_process_restarts_total{role} and sp_pipeline_process_up{role} are not
# defined here: the exporter reads them from the supervisor's children.json at each
# scrape (exporter.SupervisorCollector), so the supervisor never loads
# prometheus_client (about 12 MB of RSS for two numbers per role).


def observe_many(histogram: Histogram, values: "list[float]") -> None:
    """Observe many values with one update per bucket instead of one per value.

    A sender delivers hundreds of events per request; per-event ``observe()`` calls in
    multiprocess mode cost as much as the rest of the request's bookkeeping. This uses
    the histogram's bucket layout (``_upper_bounds``, ``_buckets``, ``_sum``), falling
    back to plain ``observe()`` if a prometheus-client release changes it.
    """
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for v in values:
            histogram.observe(v)
        return
    from bisect import bisect_left

    counts = [0] * len(bounds)
    for v in values:
        counts[bisect_left(bounds, v)] += 1  # first bound >= v, as observe() does
    for i, n in enumerate(counts):
        if n:
            buckets[i].inc(n)
    total.inc(sum(values))
