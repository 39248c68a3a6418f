"""Benchmark: Client.track() of a structured event, with a receiver in another process.

Prints calls per second and p50 / p99 / p99.9 microseconds per call, and writes
bench/results/track.json. The receiver is a separate process that binds the ingest
endpoint, decodes every frame and acknowledges it (like the writer, minus SQLite), so
the client's work (validate, build, encode, send, drain acks) is what is measured.

    python bench/track_bench.py [--events 200000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def receiver(endpoint: str, ready, stop) -> None:
    import zmq

    from sp_pipeline import wire

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(endpoint)
    ready.set()
    while not stop.is_set():
        if not sock.poll(50):
            continue
        acks = {}
        for _ in range(1000):
            try:
                rid, frame = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            f = wire.decode_events(frame, max_frame_bytes=1 << 24, max_events=10000)
            acks.setdefault(rid, []).append(f.seq)
        for rid, seqs in acks.items():
            sock.send_multipart([rid, wire.encode_ack([(min(seqs), max(seqs))])])
    sock.close(0)
    ctx.term()


def run_once(endpoint: str, n: int) -> dict:
    from sp_pipeline import Client
    from sp_pipeline.events import StructuredEvent

    ev = StructuredEvent("shop", "add-to-basket", label="sku-1", property="size=M", value=12.5)
    lat = [0] * n
    perf = time.perf_counter_ns
    with Client(endpoint, namespace="bench", app_id="track-bench",
                max_pending_events=n + 1) as client:
        track = client.track
        for _ in range(2000):  # warm up
            track(ev)
        client.flush(30)
        t0 = time.perf_counter()
        for i in range(n):
            a = perf()
            track(ev)
            lat[i] = perf() - a
        elapsed = time.perf_counter() - t0
        client.flush(60)
    lat.sort()
    return {
        "calls": n,
        "seconds": elapsed,
        "calls_per_second": n / elapsed,
        "p50_us": lat[n // 2] / 1000,
        "p99_us": lat[int(n * 0.99)] / 1000,
        "p999_us": lat[int(n * 0.999)] / 1000,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "track.json"))
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="spb-")
    endpoint = f"ipc://{tmp}/ingest.sock"
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=receiver, args=(endpoint, ready, stop), daemon=True)
    proc.start()
    ready.wait(30)
    runs = []
    try:
        for r in range(args.repeat):
            res = run_once(endpoint, args.events)
            runs.append(res)
            print(f"run {r + 1}: {res['calls_per_second']:,.0f} calls/s  p50 {res['p50_us']:.1f} µs  "
                  f"p99 {res['p99_us']:.1f} µs  p99.9 {res['p999_us']:.1f} µs")
    finally:
        stop.set()
        proc.join(10)
    best = max(runs, key=lambda r: r["calls_per_second"])
    summary = {
        "benchmark": "track",
        "median_calls_per_second": statistics.median(r["calls_per_second"] for r in runs),
        "median_p50_us": statistics.median(r["p50_us"] for r in runs),
        "median_p99_us": statistics.median(r["p99_us"] for r in runs),
        "best": best,
        "runs": runs,
        "targets": {"calls_per_second": 100_000, "p99_us": 50},
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(summary, fh, indent=2)
    print(f"median: {summary['median_calls_per_second']:,.0f} calls/s, p50 "
          f"{summary['median_p50_us']:.1f} µs, p99 {summary['median_p99_us']:.1f} µs -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
