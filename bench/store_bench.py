"""Benchmark of the SQLite store: prints numbers, writes bench/results/store.json.

Measures, on real files in a temporary directory:
  * enqueue throughput in 5000-event transactions, synchronous normal and full;
  * lease+ack throughput with 500-event leases;
  * lease latency (p50/p99) with a large backlog (1,000,000 rows by default): plain,
    with the head of the queue leased, while an outage keeps early rows waiting for
    their retry, and just after the outage when those rows are all due at once;
  * peak WAL size while enqueueing with a checkpoint every N commits;
  * the process's RSS (VmRSS, and the VmHWM peak) with the backlog in the store.

Usage: python bench/store_bench.py [--quick] [--backlog N] [--dir DIR] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from typing import Callable, Dict, List

from sp_pipeline.store import SQLiteStore

PAYLOAD_BYTES = 300
TX_EVENTS = 5000
LEASE_EVENTS = 500
LEASE_BYTES = 1 << 20  # large: the event count is what limits these leases
POST_BYTES = 40_000  # the senders' default byte_limit: ~120 of these rows per lease
LEASE_S = 30.0
T0 = 1_700_000_000.0


def payloads(count: int, start: int = 0) -> List[bytes]:
    """Distinct ~300-byte event texts."""
    out = []
    for i in range(start, start + count):
        head = b'{"e":"pv","eid":"%032d","url":"' % i
        out.append(head + b"x" * (PAYLOAD_BYTES - len(head) - 2) + b'"}')
    return out


def vm(field: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def percentiles(samples: List[float]) -> Dict[str, float]:
    ordered = sorted(samples)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50_ms": pick(0.50) * 1e3, "p99_ms": pick(0.99) * 1e3,
            "max_ms": ordered[-1] * 1e3, "mean_ms": statistics.fmean(ordered) * 1e3,
            "samples": len(ordered)}


def fill(store: SQLiteStore, events: int, checkpoint_every: int = 0) -> Dict[str, float]:
    """Enqueue ``events`` in TX_EVENTS-event transactions; returns rate and peak WAL."""
    batch = payloads(TX_EVENTS)
    peak_wal = 0
    started = time.perf_counter()
    for n in range(events // TX_EVENTS):
        store.begin()
        store.enqueue(batch, T0)
        store.commit()
        peak_wal = max(peak_wal, store.wal_bytes())
        if checkpoint_every and (n + 1) % checkpoint_every == 0:
            store.checkpoint()
    elapsed = time.perf_counter() - started
    return {"events": events, "seconds": elapsed, "events_per_s": events / elapsed,
            "peak_wal_bytes": peak_wal}


def bench_enqueue(directory: str, events: int, checkpoint_every: int) -> Dict[str, object]:
    out: Dict[str, object] = {"checkpoint_every_commits": checkpoint_every}
    for sync in ("normal", "full"):
        path = os.path.join(directory, f"enqueue-{sync}.db")
        with SQLiteStore(path, synchronous=sync) as store:
            out[sync] = fill(store, events, checkpoint_every=checkpoint_every)
        _remove(path)
    path = os.path.join(directory, "enqueue-every-commit.db")
    with SQLiteStore(path) as store:
        out["normal_checkpoint_every_commit"] = fill(store, events, checkpoint_every=1)
    _remove(path)
    return out


def bench_lease_ack(directory: str, events: int, max_bytes: int = LEASE_BYTES) -> Dict[str, float]:
    """Lease (``LEASE_EVENTS``, ``max_bytes``) and ack the whole queue, CPU seconds
    beside wall seconds (the machine is shared: CPU time is the steadier figure)."""
    path = os.path.join(directory, "lease-ack.db")
    with SQLiteStore(path) as store:
        fill(store, events, checkpoint_every=20)
        started, cpu_started = time.perf_counter(), time.process_time()
        done, lease_id, now = 0, 0, T0
        while True:
            lease_id += 1
            batch = store.lease(lease_id, LEASE_EVENTS, max_bytes, now, LEASE_S)
            store.commit()
            if not batch:
                break
            done += store.ack(lease_id, [e.id for e in batch])
            store.commit()
            if lease_id % 40 == 0:
                store.checkpoint()
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu_started
    _remove(path)
    return {"events": done, "max_bytes": max_bytes, "seconds": elapsed,
            "events_per_s": done / elapsed, "events_per_cpu_s": done / cpu,
            "leases_per_s": (lease_id - 1) / elapsed}


def timed_leases(store: SQLiteStore, count: int, now: float, settle: Callable[[List[int], int], None]) -> Dict[str, float]:
    """Time ``count`` lease()+commit() calls; ``settle(ids, lease_id)`` disposes of each
    batch (untimed) so the backlog keeps its shape."""
    samples = []
    for i in range(count):
        lease_id = 1_000_000 + i
        started = time.perf_counter()
        batch = store.lease(lease_id, LEASE_EVENTS, LEASE_BYTES, now, LEASE_S)
        store.commit()
        samples.append(time.perf_counter() - started)
        settle([e.id for e in batch], lease_id)
        if i % 20 == 19:
            store.checkpoint()  # as the writer does between commits (untimed)
    return percentiles(samples)


def bench_backlog(directory: str, backlog: int, outage_rows: int, samples: int) -> Dict[str, object]:
    path = os.path.join(directory, "backlog.db")
    out: Dict[str, object] = {"backlog": backlog, "outage_rows": outage_rows}
    with SQLiteStore(path) as store:
        out["build"] = fill(store, backlog, checkpoint_every=20)
        store.checkpoint(truncate=True)

        def put_back(ids: List[int], lease_id: int) -> None:
            store.clear_leases()  # keep the head as it was: nothing stays leased
            store.commit()

        out["lease_plain"] = timed_leases(store, samples, T0, put_back)
        # Steady delivery: 8 batches (4000 rows) always in flight at the head.
        for i in range(8):
            store.lease(i + 1, LEASE_EVENTS, LEASE_BYTES, T0, 3600.0)
        store.commit()
        out["lease_head_leased_4000"] = timed_leases(
            store, samples, T0, lambda ids, lid: (store.ack(lid, ids), store.commit()))
        store.clear_leases()
        store.commit()
        # Collector outage: the oldest rows were tried and wait for their retry.
        lease_id = 10
        while lease_id * LEASE_EVENTS < outage_rows:
            ids = [e.id for e in store.lease(lease_id, LEASE_EVENTS, LEASE_BYTES, T0, LEASE_S)]
            store.release(lease_id, ids, T0 + 60 + lease_id % 50, T0)
            lease_id += 1
        store.commit()
        out["lease_outage_waiting"] = timed_leases(
            store, samples, T0 + 1, lambda ids, lid: (store.release(lid, ids, T0 + 500, T0 + 1), store.commit()))
        out["lease_recovery_half_due"] = timed_leases(
            store, samples, T0 + 85, lambda ids, lid: (store.ack(lid, ids), store.commit()))
        out["lease_after_outage_all_due"] = timed_leases(
            store, samples, T0 + 200, lambda ids, lid: (store.ack(lid, ids), store.commit()))
        started = time.perf_counter()
        for _ in range(100):
            store.stats(T0 + 200)
        out["stats_ms"] = (time.perf_counter() - started) * 10
        out["rss_bytes"] = vm("VmRSS")
        out["hwm_bytes"] = vm("VmHWM")
        out["db_bytes"] = os.path.getsize(path)
    started = time.perf_counter()
    SQLiteStore(path).close()
    out["reopen_seconds"] = time.perf_counter() - started
    _remove(path)
    return out


def _remove(path: str) -> None:
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs (a few seconds)")
    parser.add_argument("--backlog", type=int, default=None, help="rows in the backlog (default 1,000,000; quick 100,000)")
    parser.add_argument("--checkpoint-every", type=int, default=20, help="commits between PASSIVE checkpoints while enqueueing")
    parser.add_argument("--dir", default=None, help="where to put the databases (default: a temp dir)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "store.json"))
    args = parser.parse_args()
    backlog = args.backlog or (100_000 if args.quick else 1_000_000)
    enqueue_events = 50_000 if args.quick else 200_000
    results: Dict[str, object] = {"quick": args.quick, "payload_bytes": PAYLOAD_BYTES,
                                  "tx_events": TX_EVENTS, "lease_events": LEASE_EVENTS}
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        results["enqueue"] = bench_enqueue(directory, enqueue_events, args.checkpoint_every)
        _show("enqueue", results["enqueue"])
        results["lease_ack"] = bench_lease_ack(directory, enqueue_events)
        _show("lease_ack", results["lease_ack"])
        results["lease_ack_post_bytes"] = bench_lease_ack(directory, enqueue_events, POST_BYTES)
        _show("lease_ack_post_bytes", results["lease_ack_post_bytes"])
        results["backlog"] = bench_backlog(directory, backlog, backlog // 10, 50 if args.quick else 100)
        _show("backlog", results["backlog"])
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}")


def _show(name: str, value: object) -> None:
    print(f"{name}: {json.dumps(value, indent=2, default=str)}")


if __name__ == "__main__":
    main()
