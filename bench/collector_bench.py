"""Benchmark: the local collector alone, CPU per event it checks and records.

Builds N events of the benchmarks' mix (``samples.mixed_events``: a third of them
self-describing, with ``ue_px`` and ``cx``), cuts them into POST bodies of at most
``--byte-limit`` bytes as a sender would, starts ``sp-pipeline collector`` and posts
every body from ``--connections`` client threads (each its own keep-alive
connection). Prints events/s and the collector's CPU time per event and per request
(from /proc), for each connection count; writes bench/results/collector.json.

    python bench/collector_bench.py [--events 100000] [--connections 1,16]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from typing import List

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import urllib3  # noqa: E402

from delivery_bench import cpu_seconds  # noqa: E402

from sp_pipeline.batching import post_body, take  # noqa: E402
from sp_pipeline.payload import TrackerInfo, build, encode_event  # noqa: E402
from sp_pipeline.samples import mixed_events  # noqa: E402
from sp_pipeline.testing import LocalCollector  # noqa: E402

TP2 = "/com.snowplowanalytics.snowplow/tp2"


def bodies(n: int, byte_limit: int) -> List[bytes]:
    tracker = TrackerInfo(namespace="bench", app_id="collector-bench")
    now_ms = int(time.time() * 1000)
    events = [encode_event(p) for ev in mixed_events(n) for p in build(ev, tracker, now_ms=now_ms)][:n]
    out, i = [], 0
    while i < len(events):
        k = take([len(e) for e in events[i:i + 500]], byte_limit, 500)
        out.append(post_body(events[i:i + k], now_ms))
        i += k
    return out


def run(batches: List[bytes], n: int, connections: int) -> dict:
    work = tempfile.mkdtemp(prefix="spc-", dir="/tmp")
    with LocalCollector(work) as collector:
        pool = urllib3.PoolManager(maxsize=connections, block=True, retries=False)
        url = collector.url + TP2
        queue = iter(batches)
        lock = threading.Lock()
        failures: List[int] = []

        def post_all() -> None:
            while True:
                with lock:
                    body = next(queue, None)
                if body is None:
                    return
                status = pool.request("POST", url, body=body,
                                      headers={"Content-Type": "application/json"}).status
                if status != 200:
                    failures.append(status)

        cpu0, t0 = cpu_seconds(collector.proc.pid), time.perf_counter()
        threads = [threading.Thread(target=post_all) for _ in range(connections)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
        cpu = cpu_seconds(collector.proc.pid) - cpu0
        counts = collector.counts()
        pool.clear()
    if failures or counts["good"] != n:
        raise SystemExit(f"collector answered {failures[:5]}, counted {counts} of {n}")
    return {"events": n, "requests": len(batches), "connections": connections,
            "seconds": elapsed, "events_per_second": n / elapsed,
            "collector_cpu_us_per_event": cpu / n * 1e6,
            "collector_cpu_us_per_request": cpu / len(batches) * 1e6}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--connections", default="1,16",
                        help="comma-separated client connection counts, one run each")
    parser.add_argument("--byte-limit", type=int, default=40_000)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "collector.json"))
    args = parser.parse_args()
    batches = bodies(args.events, args.byte_limit)
    print(f"{args.events:,} events in {len(batches):,} bodies of <= {args.byte_limit:,} bytes")
    print(f"{'connections':>11} {'events/s':>10} {'cpu µs/event':>13} {'cpu µs/request':>15}")
    results = []
    for connections in (int(c) for c in args.connections.split(",")):
        r = run(batches, args.events, connections)
        results.append(r)
        print(f"{connections:>11} {r['events_per_second']:>10,.0f} "
              f"{r['collector_cpu_us_per_event']:>13.1f} {r['collector_cpu_us_per_request']:>15.0f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"benchmark": "collector", "byte_limit": args.byte_limit,
                   "results": results}, fh, indent=2)
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
