"""Benchmark: the writer process, fed by real producer processes over ZeroMQ.

For synchronous=normal and synchronous=full: two producer processes track structured
events as fast as they can and flush; measured: committed events/s (first track() to
both flushes returned), peak WAL size. Then, on the backlog left in the store, leases of
500 events through the lease socket: lease latency p50/p99 and lease+ack events/s; the
writer's RSS (VmHWM) with that backlog. Writes bench/results/writer.json.

Each synchronous mode is measured twice: with producers calling ``Client.track()``
(``track``: the producers' own CPU shares the 2 cores with the writer) and with
producers speaking the wire protocol directly (``wire``: events encoded before the clock
starts, frames of 128 events, at most 64 frames unacknowledged, as a producer in another
language would), which shows what the writer itself sustains.

    python bench/writer_bench.py [--events 400000] [--backlog 1000000] [--quick]
                                 [--producers track,wire]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import zmq  # noqa: E402

from sp_pipeline import wire  # noqa: E402
from sp_pipeline.config import load  # noqa: E402
from sp_pipeline.testing import wait_until  # noqa: E402


def producer(endpoint: str, n: int, start, done) -> None:
    from sp_pipeline import Client
    from sp_pipeline.events import StructuredEvent

    ev = StructuredEvent("shop", "add-to-basket", label="sku-1", property="size=M", value=12.5)
    with Client(endpoint, namespace="bench", max_pending_events=200_000) as client:
        start.wait()
        sent = 0
        while sent < n:
            try:
                client.track(ev)
                sent += 1
            except Exception:  # BufferFull: the writer is behind; wait for acks
                client.flush(60)
        client.flush(120)
    done.put(time.time())


def wire_producer(endpoint: str, n: int, start, done) -> None:
    """Send ``n`` distinct structured events in EVENTS frames; done when all are acked."""
    from sp_pipeline import wire
    from sp_pipeline.events import StructuredEvent
    from sp_pipeline.payload import TrackerInfo, build, encode_event

    tracker = TrackerInfo("bench", "writer-bench")
    ev = StructuredEvent("shop", "add-to-basket", label="sku-1", property="size=M", value=12.5)
    per_frame, window = 128, 64
    payloads = [encode_event(build(ev, tracker, now_ms=1_700_000_000_000 + i)[0]) for i in range(n)]
    chunks = [payloads[i:i + per_frame] for i in range(0, n, per_frame)]
    del payloads
    pid = os.urandom(wire.PRODUCER_ID_BYTES)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(endpoint)
    start.wait()
    acked = sent = 0  # frames; seq = index + 1
    while acked < len(chunks):
        while sent < len(chunks) and sent - acked < window:
            sock.send(wire.encode_events(pid, sent + 1, acked + 1, chunks[sent]))
            sent += 1
        reply = wire.decode_producer_reply(sock.recv())
        if reply[0] == wire.OP_ACK:
            for _first, last in reply[1]:
                acked = max(acked, last)
        elif reply[0] == wire.OP_RESEND:  # not expected on one socket; start over from there
            sent = acked = reply[1] - 1
        else:
            raise RuntimeError(f"writer answered {reply!r}")
    done.put(time.time())
    sock.close(0)
    ctx.term()


def rss_kb(pid: int, field: str = "VmHWM") -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class WalSampler(threading.Thread):
    def __init__(self, path: str) -> None:
        super().__init__(daemon=True)
        self.path, self.peak, self.stop = path + "-wal", 0, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.02):
            try:
                self.peak = max(self.peak, os.path.getsize(self.path))
            except OSError:
                pass


def start_writer(work: str, synchronous: str) -> tuple:
    settings = load({"store": os.path.join(work, "events.db"), "run_dir": os.path.join(work, "run"),
                     "synchronous": synchronous}, env={})
    os.makedirs(settings.metrics_dir, exist_ok=True)
    path = os.path.join(work, "settings.json")
    with open(path, "w") as fh:
        fh.write(settings.to_json())
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=settings.metrics_dir)
    proc = subprocess.Popen([sys.executable, "-m", "sp_pipeline.role", "writer", "--settings", path],
                            env=env, stderr=open(os.path.join(work, "writer.log"), "w"))
    sock_path = settings.ingest_endpoint[len("ipc://"):]
    wait_until(lambda: os.path.exists(sock_path), 30, "the writer to bind")
    return proc, settings


def ingest(settings, n_per_producer: int, producers: int = 2, kind: str = "track") -> float:
    ctx = mp.get_context("spawn")
    start, done = ctx.Event(), ctx.Queue()
    target = producer if kind == "track" else wire_producer
    procs = [ctx.Process(target=target, args=(settings.ingest_endpoint, n_per_producer, start, done))
             for _ in range(producers)]
    for p in procs:
        p.start()
    time.sleep(1.5 if kind == "track" else 3.0)  # imports (and, for wire, encoding) first
    t0 = time.time()
    start.set()
    ends = [done.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(30)
    return max(ends) - t0


def lease_all(settings, limit: int) -> dict:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(settings.lease_endpoint)
    lat, n, req = [], 0, 0
    t0 = time.perf_counter()
    while n < limit:
        req += 1
        a = time.perf_counter()
        sock.send(wire.encode_request(wire.OP_LEASE, req, 500, 40000, 0))
        while True:
            reply = wire.decode_reply(sock.recv())
            if reply[0] == wire.OP_BATCH and reply[1] == req:
                break
        lat.append(time.perf_counter() - a)
        lease_id, rows = reply[2], reply[3]
        if not rows:
            break
        n += len(rows)
        req += 1
        sock.send(wire.encode_request(wire.OP_LEASE_ACK, req, lease_id, [r[0] for r in rows]))
    elapsed = time.perf_counter() - t0
    sock.close(0)
    ctx.term()
    lat.sort()
    return {"events": n, "events_per_second": n / elapsed,
            "lease_p50_ms": lat[len(lat) // 2] * 1000, "lease_p99_ms": lat[int(len(lat) * 0.99)] * 1000}


def run(synchronous: str, events: int, lease_events: int, kind: str = "track") -> dict:
    work = tempfile.mkdtemp(prefix="spw-", dir="/tmp")
    proc, settings = start_writer(work, synchronous)
    try:
        wal = WalSampler(settings.store)
        wal.start()
        seconds = ingest(settings, events // 2, kind=kind)
        wal.stop.set()
        leases = lease_all(settings, lease_events)
        result = {"synchronous": synchronous, "producers": kind, "events": events, "seconds": seconds,
                  "committed_per_second": events / seconds, "peak_wal_bytes": wal.peak,
                  "writer_vmhwm_kb": rss_kb(proc.pid), "lease": leases}
    finally:
        proc.terminate()
        proc.wait(30)
    return result


def backlog(events: int) -> dict:
    work = tempfile.mkdtemp(prefix="spw-", dir="/tmp")
    proc, settings = start_writer(work, "normal")
    try:
        seconds = ingest(settings, events // 2)
        rss = rss_kb(proc.pid, "VmRSS")
        leases = lease_all(settings, 50_000)
        return {"backlog_events": events, "fill_seconds": seconds,
                "writer_rss_kb": rss, "writer_vmhwm_kb": rss_kb(proc.pid),
                "lease_from_backlog": leases}
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=400_000)
    parser.add_argument("--backlog", type=int, default=1_000_000)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--producers", default="track,wire",
                        help="comma-separated producer kinds: track (Client.track) and/or wire")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "writer.json"))
    args = parser.parse_args()
    if args.quick:
        args.events, args.backlog = 100_000, 200_000
    out = {"benchmark": "writer", "runs": []}
    for sync in ("normal", "full"):
        for kind in [k for k in args.producers.split(",") if k]:
            r = run(sync, args.events, 100_000, kind)
            out["runs"].append(r)
            print(f"synchronous={sync:6} {kind:5}: {r['committed_per_second']:>9,.0f} events/s committed, "
                  f"peak WAL {r['peak_wal_bytes'] / 2**20:.1f} MiB, writer peak RSS "
                  f"{r['writer_vmhwm_kb'] / 1024:.0f} MiB; lease+ack {r['lease']['events_per_second']:,.0f} "
                  f"events/s, lease p50 {r['lease']['lease_p50_ms']:.2f} ms p99 {r['lease']['lease_p99_ms']:.2f} ms")
    b = backlog(args.backlog)
    out["backlog"] = b
    print(f"backlog {b['backlog_events']:,}: writer RSS {b['writer_rss_kb'] / 1024:.0f} MiB "
          f"(peak {b['writer_vmhwm_kb'] / 1024:.0f} MiB), lease p50 "
          f"{b['lease_from_backlog']['lease_p50_ms']:.2f} ms p99 {b['lease_from_backlog']['lease_p99_ms']:.2f} ms")
    out["targets"] = {"committed_normal": 100_000, "committed_full": 30_000, "rss_mb": 100,
                      "lease_ms": 10}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=2)
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
