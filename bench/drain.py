"""Benchmark: drain a backlog. N events are queued while the collector is down, then the
collector comes up; measured: the drain rate and the RSS of every role over time.

1. ``sp-pipeline start`` points at ``http://127.0.0.1:PORT`` where nothing listens
   (senders fail to connect and back off; ``--retry-max-delay`` caps their pause, so
   recovery after the collector comes up takes at most about that long).
2. ``--producers`` processes track mixed events (with subjects) through ``Client.track()``
   until N events (tracker-protocol payloads) are committed (``flush()`` returned).
3. The local collector starts on PORT. Sampled every second until all N arrived: events
   at the collector, RSS of the writer, senders, exporter and supervisor (from
   /proc/PID/status of the pids in RUN_DIR/children.json) and their total, the
   collector's own RSS (not counted in the total), WAL and database size.

Figures: fill rate, recovery (collector up -> first event arrives), drain rate (first
arrival -> last, and the median of the per-second rates), peak RSS per role and total.
Writes bench/results/drain.json.

    python bench/drain.py [--events 1000000] [--producers 2] [--quick]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from typing import Any, Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    Progress,
    file_mb,
    free_port,
    median,
    pss_mb,
    role_rss,
    rss_mb,
    write_result,
)
from sp_pipeline import Client  # noqa: E402
from sp_pipeline.errors import BufferFull  # noqa: E402
from sp_pipeline.samples import mixed_events, payload_count, sample_subject  # noqa: E402
from sp_pipeline.testing import LocalCollector, Pipeline  # noqa: E402

TARGETS = {"peak_total_rss_mb": 150, "drain_vs_sustained": 1.0}
MIX = 7000


def filler(endpoint: str, seed: int, events: int, barrier: Any, offered: Any) -> None:
    """Track mixed events until ``events`` payloads are tracked, then flush."""
    work = [(ev, sample_subject(i), payload_count(ev))
            for i, ev in enumerate(mixed_events(MIX, seed=seed))]
    client = Client(endpoint, namespace="bench", app_id="drain")
    track = client.track
    n = sent = 0
    barrier.wait()
    while sent < events:
        ev, subject, count = work[n % MIX]
        try:
            track(ev, subject=subject)
        except BufferFull:
            time.sleep(0.001)
            continue
        n += 1
        sent += count
        if n % 256 == 0:
            offered.value = sent
    offered.value = sent
    client.flush(300)
    client.close()


def sample(pipe: Pipeline, t0: float, good: int, collector_pid: int = 0) -> Dict[str, Any]:
    return {"t": round(time.monotonic() - t0, 3), "good": good, "rss_mb": role_rss(pipe),
            "pss_mb": role_rss(pipe, pss_mb),
            "collector_rss_mb": rss_mb(collector_pid) if collector_pid else None,
            "wal_mb": file_mb(pipe.store + "-wal"), "db_mb": file_mb(pipe.store)}


def fill(pipe: Pipeline, n: int, producers: int) -> Dict[str, Any]:
    """Queue ``n`` events through ``producers`` processes; sample every second."""
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(producers + 1)
    offered = [ctx.Value("q", 0, lock=False) for _ in range(producers)]
    shares = [n // producers + (1 if p < n % producers else 0) for p in range(producers)]
    procs = [ctx.Process(target=filler, args=(pipe.ingest, 6000 + p, shares[p], barrier,
                                              offered[p])) for p in range(producers)]
    for p in procs:
        p.start()
    barrier.wait(60)
    t0 = time.monotonic()
    samples: List[Dict[str, Any]] = []
    progress = Progress("fill")
    while any(p.is_alive() for p in procs):
        s = sample(pipe, t0, 0)
        s["offered"] = sum(v.value for v in offered)
        samples.append(s)
        progress.show(f"{s['offered']:,}/{n:,} tracked  writer {s['rss_mb'].get('writer', 0):.0f} MB"
                      f"  total {s['rss_mb']['total']:.0f} MB  db {s['db_mb']:.0f} MB")
        for p in procs:
            p.join(max(0.0, 1.0 - (time.monotonic() - t0 - s["t"])))
    elapsed = time.monotonic() - t0
    progress.done()
    total = sum(v.value for v in offered)
    return {"events": total, "seconds": elapsed, "events_per_s": total / elapsed,
            "exit_codes": [p.exitcode for p in procs], "samples": samples}


def drain(pipe: Pipeline, work: str, port: int, n: int, timeout: float) -> Dict[str, Any]:
    """Start the collector on ``port``; sample until ``n`` events arrived."""
    t0 = time.monotonic()
    collector = LocalCollector(work, "--port", str(port), "--good-cap", "1000")
    samples: List[Dict[str, Any]] = []
    progress = Progress("drain")
    t_first = None
    try:
        cpid = collector.proc.pid
        t_up = time.monotonic() - t0
        next_tick = time.monotonic()
        while True:
            good = collector.counts()["good"]
            now = time.monotonic()
            if t_first is None and good > 0:
                t_first = now - t0
            if now >= next_tick or good >= n:
                s = sample(pipe, t0, good, cpid)
                samples.append(s)
                next_tick += 1.0
                progress.show(f"{good:,}/{n:,} delivered  total RSS {s['rss_mb']['total']:.0f} MB"
                              f"  WAL {s['wal_mb']:.0f} MB")
            if good >= n:
                break
            if now - t0 > timeout:
                raise TimeoutError(f"{good} of {n} events delivered after {timeout:g} s")
            time.sleep(0.05 if t_first is None else 0.2)
        t_done = time.monotonic() - t0
        counts = collector.counts()
    finally:
        progress.done()
        collector.stop()
    rates = [(b["good"] - a["good"]) / (b["t"] - a["t"])
             for a, b in zip(samples, samples[1:]) if b["t"] > a["t"] and a["good"] > 0]
    return {"collector_up_s": t_up, "recovery_s": (t_first or t_done) - t_up,
            "drain_s": t_done - (t_first or t_done),
            "events_per_s": n / (t_done - t_first) if t_first and t_done > t_first else None,
            "median_per_second_rate": median(rates), "good": counts["good"],
            "bad": counts["bad"], "samples": samples}


def peaks(samples: List[Dict[str, Any]], key: str = "rss_mb") -> Dict[str, float]:
    out: Dict[str, float] = {}
    for s in samples:
        for role, mb in s[key].items():
            out[role] = max(out.get(role, 0.0), mb)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="events to queue")
    parser.add_argument("--producers", type=int, default=2, help="filling processes")
    parser.add_argument("--retry-max-delay", type=float, default=10.0,
                        help="sp-pipeline --retry-max-delay while the collector is down (s)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="give up draining after (s)")
    parser.add_argument("--quick", action="store_true", help="100,000 events")
    parser.add_argument("--out", default=None, help="default: bench/results/drain.json")
    args = parser.parse_args()
    n = 100_000 if args.quick else args.events
    work = tempfile.mkdtemp(prefix="sp-drain-")
    port = free_port()
    print(f"workdir {work}; {n:,} events via {args.producers} producer(s); collector down at "
          f"127.0.0.1:{port}")
    with Pipeline(work, f"http://127.0.0.1:{port}", "--metrics-addr", f"127.0.0.1:{free_port()}",
                  "--retry-max-delay", str(args.retry_max_delay)) as pipe:
        filled = fill(pipe, n, args.producers)
        print(f"filled {filled['events']:,} events in {filled['seconds']:.1f} s "
              f"({filled['events_per_s']:,.0f}/s); db {file_mb(pipe.store):.0f} MB", flush=True)
        status = pipe.cli("status", "--json")
        try:
            before = json.loads(status.stdout)
        except ValueError:
            before = {"raw": status.stdout[-2000:]}
        drained = drain(pipe, work, port, filled["events"], args.timeout)
        pipe.stop()
    all_samples = filled["samples"] + drained["samples"]
    peak = peaks(all_samples)
    peak_drain = peaks(drained["samples"])
    peak_pss = peaks(all_samples, "pss_mb")
    sustained = None
    try:
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                               "sustained.json")) as fh:
            phases = json.load(fh)["phases"]
        # The sustained rate: the highest steady rate when measured, else what arrived
        # with producers unthrottled.
        sustained = ((phases.get("steady") or {}).get("highest_steady_events_per_s")
                     or phases["max"]["delivered_events_per_s"])
    except (OSError, ValueError, KeyError):
        pass
    rate = drained["events_per_s"]
    print(f"collector up -> first event {drained['recovery_s']:.2f} s; drained "
          f"{filled['events']:,} in {drained['drain_s']:.1f} s = {rate or 0:,.0f} events/s "
          f"(median per-second {drained['median_per_second_rate'] or 0:,.0f}/s)")
    print("peak RSS MB: " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(peak.items()))
          + f" (target total < {TARGETS['peak_total_rss_mb']} MB)")
    print("peak PSS MB (shared pages divided): "
          + ", ".join(f"{k} {v:.1f}" for k, v in sorted(peak_pss.items())))
    if sustained:
        print(f"drain rate / sustained rate ({sustained:,.0f}/s): {rate / sustained:.2f} "
              f"(target >= 1)")
    path = write_result("drain", {
        "events": filled["events"], "producers": args.producers,
        "retry_max_delay": args.retry_max_delay, "targets": TARGETS,
        "fill": filled, "status_before_drain": before, "drain": drained,
        "peak_rss_mb": peak, "peak_rss_mb_while_draining": peak_drain,
        "peak_pss_mb": peak_pss,
        "sustained_delivered_events_per_s": sustained,
        "drain_vs_sustained": rate / sustained if rate and sustained else None,
    }, args.out)
    print(f"-> {path}")
    return 0 if drained["good"] >= filled["events"] else 1


if __name__ == "__main__":
    sys.exit(main())
