"""Benchmark: events/s delivered from a pre-filled store to the local collector.

For each configuration (senders, collector delay, byte limit) it fills a fresh store
with N events (written directly with SQLiteStore, as the writer would), starts the local
collector and ``sp-pipeline start``, and measures the time until the collector has
received all N. Prints a table, writes bench/results/delivery.json.

    python bench/delivery_bench.py [--events 60000] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from sp_pipeline.config import load  # noqa: E402
from sp_pipeline.payload import TrackerInfo, build, encode_event  # noqa: E402
from sp_pipeline.samples import mixed_events  # noqa: E402
from sp_pipeline.store import open_store  # noqa: E402
from sp_pipeline.testing import LocalCollector, Pipeline, wait_until  # noqa: E402


def fill(store_path: str, n: int) -> int:
    settings = load({"store": store_path}, env={})
    store = open_store(settings)
    tracker = TrackerInfo(namespace="bench", app_id="delivery-bench")
    payloads = []
    for ev in mixed_events(n):
        for p in build(ev, tracker, now_ms=int(time.time() * 1000)):
            payloads.append(encode_event(p))
            if len(payloads) >= n:
                break
        if len(payloads) >= n:
            break
    now = time.time()
    for i in range(0, len(payloads), 5000):
        store.begin()
        store.enqueue(payloads[i:i + 5000], now)
        store.commit()
    store.checkpoint(truncate=True)
    store.close()
    return sum(map(len, payloads)) // len(payloads)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(n: int, senders: int, delay_ms: int, byte_limit: int, extra=()) -> dict:
    work = tempfile.mkdtemp(prefix="spd-", dir="/tmp")
    avg = fill(os.path.join(work, "events.db"), n)
    args = ["--delay-ms", str(delay_ms)] if delay_ms else []
    with LocalCollector(work, *args) as collector:
        with Pipeline(work, collector.url, "--senders", str(senders), "--byte-limit",
                      str(byte_limit), "--metrics-addr", "127.0.0.1:0", *extra,
                      wait_ready=False) as pipe:
            # The clock starts at the first delivered event, so process start-up
            # (about a second of imports) is not counted as delivery time.
            first = wait_until(lambda: collector.counts()["good"], 60, "a first event", 0.005)
            started = time.perf_counter()
            wait_until(lambda: collector.counts()["good"] >= n, 600, f"{n} events", 0.02)
            elapsed = time.perf_counter() - started
            n_timed = n - int(first)
            counts = collector.counts()
            cpu = {f"{c['role']}-{c['index']}": cpu_seconds(c["pid"]) for c in pipe.children()}
            cpu["collector"] = cpu_seconds(collector.proc.pid)
            pipe.stop()
    return {"events": n, "senders": senders, "collector_delay_ms": delay_ms,
            "byte_limit": byte_limit, "avg_event_bytes": avg, "seconds": elapsed,
            "events_per_second": n_timed / elapsed, "good": counts["good"], "bad": counts["bad"],
            "extra": list(extra), "cpu_seconds": cpu}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=60_000)
    parser.add_argument("--quick", action="store_true", help="fewer configurations")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "delivery.json"))
    args = parser.parse_args()
    configs = [(1, 0, 40000), (2, 0, 40000), (2, 50, 40000)]
    if not args.quick:
        configs += [(2, 0, 10000), (2, 0, 100000), (1, 50, 40000)]
    results = []
    print(f"{'senders':>7} {'delay':>6} {'limit':>7} {'events/s':>10} {'seconds':>8}")
    for senders, delay, limit in configs:
        r = run(args.events, senders, delay, limit)
        results.append(r)
        print(f"{senders:>7} {delay:>5}ms {limit:>7} {r['events_per_second']:>10,.0f} "
              f"{r['seconds']:>8.2f}   cpu s: " +
              ", ".join(f"{k} {v:.1f}" for k, v in r["cpu_seconds"].items()))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"benchmark": "delivery", "results": results,
                   "note": "timed from the first event received by the collector to the last"},
                  fh, indent=2)
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
