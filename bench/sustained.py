"""Benchmark: sustained load through sp-pipeline to the local collector.

Two phases, each with a fresh collector, pipeline and store:

1. **max**: producer processes track mixed events (with subjects) as fast as they can for
   ``--duration`` seconds (a full client buffer, ``BufferFull``, makes a producer wait
   1 ms). Measured: events/s arriving at the collector over the steady window (after
   ``--warmup`` seconds to the end of the offering), and events/s offered.
2. **latency**: the producers offer a fixed ``--rate`` (default 10,000 events/s, paced in
   1 ms steps) for ``--duration`` seconds. Latency, end to end, is the collector's
   ``received_at`` (ms, when the request carrying the event arrived) minus the event's
   ``dtm`` (ms, set by ``Client.track()``), for a sample: every second the newest
   ``--sample`` good events of ``GET /micro/good?limit=N``. The pipeline's own
   ``sp_pipeline_delivery_latency_seconds`` histogram (store enqueue to 2xx, from the
   exporter) is reported beside it, interpolated within its buckets.

3. **steady**: the highest steady rate: offered rates from ``--steady-rates`` in turn,
   ``--step`` seconds each with a fresh pipeline, until one is not kept up with. A rate
   is kept up with when the producers offered at least 98 % of it and the collector
   received at least 98 % of what was offered, after the warmup. The max phase shows
   what arrives while producers take all the CPU they can; this one, the rate the
   pipeline sustains with its producers on the same 2 cores.

Every phase samples every second: the RSS of the writer and the senders (from
/proc/PID/status of the pids in RUN_DIR/children.json) and the WAL size
(``events.db-wal``). An event is one tracker-protocol payload (a transaction with 2 items
is 3). Each phase also reports where the CPU went after the warmup: cores used by each
role, the collector and the producers, and CPU microseconds per delivered event.
Writes bench/results/sustained.json.

    python bench/sustained.py [--duration 60] [--rate 10000] [--producers 1] [--quick]
                              [--phases steady,latency,max] [--steady-rates 10000,...]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import re
import sys
import tempfile
import time
import urllib.request
from typing import Any, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    Progress,
    file_mb,
    free_port,
    percentile,
    role_cpu,
    role_rss,
    write_result,
)
from sp_pipeline import Client  # noqa: E402
from sp_pipeline.errors import BufferFull, SpPipelineError  # noqa: E402
from sp_pipeline.samples import mixed_events, payload_count, sample_subject  # noqa: E402
from sp_pipeline.testing import LocalCollector, Pipeline, http_json  # noqa: E402

TARGETS = {"delivered_events_per_s": 40_000, "p99_ms_at_rate": 250}
KEPT_UP = 0.98  # share of the offered rate that must arrive for a steady step to pass
MIX = 7000  # distinct sample events a producer cycles through (eids are new every time)


def producer(endpoint: str, seed: int, rate: Optional[float], duration: float, barrier: Any,
             offered: Any) -> None:
    """Track mixed events for ``duration`` seconds: as fast as possible (``rate`` None)
    or paced to ``rate`` events/s. ``offered.value`` follows the events tracked."""
    events = list(mixed_events(MIX, seed=seed))
    work = [(ev, sample_subject(i), payload_count(ev)) for i, ev in enumerate(events)]
    client = Client(endpoint, namespace="bench", app_id="sustained")
    track = client.track
    n = sent = 0
    barrier.wait()
    start = time.monotonic()
    end = start + duration
    while True:
        now = time.monotonic()
        if now >= end:
            break
        burst = 256 if rate is None else min(int((now - start) * rate) - sent, 2000)
        if burst <= 0:
            time.sleep(0.001)
            continue
        try:
            while burst > 0:
                ev, subject, count = work[n % MIX]
                track(ev, subject=subject)
                n += 1
                sent += count
                burst -= count
        except BufferFull:
            time.sleep(0.001)
        offered.value = sent
    offered.value = sent
    try:
        client.flush(30)
    except SpPipelineError:
        pass
    client.close(timeout=None)


def scrape_histogram(url: str, name: str) -> Dict[float, float]:
    """Cumulative bucket counts ``{le: count}`` of histogram ``name`` at ``url``."""
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    out: Dict[float, float] = {}
    for m in re.finditer(rf'^{name}_bucket\{{[^}}]*le="([^"]+)"[^}}]*\}} (\S+)$', text, re.M):
        le = float("inf") if m.group(1) == "+Inf" else float(m.group(1))
        out[le] = out.get(le, 0.0) + float(m.group(2))
    return out


def histogram_quantile(before: Dict[float, float], after: Dict[float, float],
                       q: float) -> Optional[float]:
    """``q``-quantile of the observations between two scrapes, interpolated linearly
    within a bucket (as PromQL's histogram_quantile does); None without observations."""
    les = sorted(after)
    counts = [after[le] - before.get(le, 0.0) for le in les]
    if not counts or counts[-1] <= 0:
        return None
    rank, prev_le, prev_c = q * counts[-1], 0.0, 0.0
    for le, c in zip(les, counts):
        if c >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * ((rank - prev_c) / (c - prev_c) if c > prev_c else 0)
        prev_le, prev_c = le, c
    return None


def latency_sample(collector: LocalCollector, limit: int, seen: Dict[str, float]) -> None:
    """Add (eid -> received_at - dtm, ms) for the newest ``limit`` good events."""
    for rec in http_json(f"{collector.url}/micro/good?limit={limit}", timeout=10):
        ev = rec.get("event", {})
        eid, dtm = ev.get("eid"), ev.get("dtm")
        if eid and dtm and eid not in seen:
            seen[eid] = rec["received_at"] - int(dtm)


def run_phase(name: str, root: str, rate: Optional[float], args: argparse.Namespace
              ) -> Dict[str, Any]:
    """One phase with its own collector, pipeline and store; its figures."""
    work = os.path.join(root, name)
    os.makedirs(work)
    metrics_port = free_port()
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    hist = "sp_pipeline_delivery_latency_seconds"
    ctx = mp.get_context("fork")
    with LocalCollector(work) as collector, \
            Pipeline(work, collector.url, "--metrics-addr", f"127.0.0.1:{metrics_port}",
                     *args.pipeline_args) as pipe:
        barrier = ctx.Barrier(args.producers + 1)
        offered = [ctx.Value("q", 0, lock=False) for _ in range(args.producers)]
        each = None if rate is None else rate / args.producers
        procs = [ctx.Process(target=producer, args=(pipe.ingest, 6000 + p, each, args.duration,
                                                     barrier, offered[p]))
                 for p in range(args.producers)]
        for p in procs:
            p.start()
        barrier.wait(60)
        start = time.monotonic()
        samples: List[Dict[str, Any]] = []
        latencies: Dict[str, float] = {}
        hist_before: Dict[float, float] = {}
        cpu: List[Any] = []  # (t, good, {role: CPU seconds}) at the warmup's end and at the end
        others = {"collector": [collector.proc.pid], "producers": [p.pid for p in procs]}
        progress = Progress(f"{name}")
        next_tick = start
        while True:
            now = time.monotonic()
            elapsed = now - start
            good = collector.counts()["good"]
            rss = role_rss(pipe)
            sample = {"t": round(elapsed, 3), "good": good,
                      "offered": sum(v.value for v in offered), "rss_mb": rss,
                      "wal_mb": file_mb(pipe.store + "-wal"), "db_mb": file_mb(pipe.store)}
            samples.append(sample)
            if (not cpu and elapsed >= args.warmup) or elapsed >= args.duration:
                cpu.append((elapsed, good, role_cpu(pipe, **others)))
            if rate is not None and elapsed >= args.warmup:
                if not hist_before:
                    hist_before = scrape_histogram(metrics_url, hist) or {0.0: 0.0}
                latency_sample(collector, args.sample, latencies)
            progress.show(f"{elapsed:5.1f}/{args.duration:g} s  offered {sample['offered']:,}  "
                          f"delivered {good:,}  writer {rss.get('writer', 0):.0f} MB  "
                          f"WAL {sample['wal_mb']:.1f} MB")
            if elapsed >= args.duration:
                break
            next_tick += 1.0
            time.sleep(max(next_tick - time.monotonic(), 0))
        hist_after = scrape_histogram(metrics_url, hist)
        progress.done()
        for p in procs:
            p.join(60)
        pipe.stop()
    return summarize_phase(name, rate, args, samples, latencies, hist_before, hist_after, cpu)


def _rate_between(samples: List[Dict[str, Any]], key: str, t0: float) -> Optional[float]:
    window = [s for s in samples if s["t"] >= t0]
    if len(window) < 2 or window[-1]["t"] <= window[0]["t"]:
        return None
    return (window[-1][key] - window[0][key]) / (window[-1]["t"] - window[0]["t"])


def summarize_phase(name: str, rate: Optional[float], args: argparse.Namespace,
                    samples: List[Dict[str, Any]], latencies: Dict[str, float],
                    hist_before: Dict[float, float], hist_after: Dict[float, float],
                    cpu: List[Any]) -> Dict[str, Any]:
    lat = list(latencies.values())

    def peak(role: str) -> Optional[float]:
        vals = [s["rss_mb"].get(role) for s in samples if s["rss_mb"].get(role) is not None]
        return max(vals) if vals else None

    return {
        "phase": name, "offered_rate": rate, "duration_s": args.duration,
        "warmup_s": args.warmup, "producers": args.producers,
        "delivered_events_per_s": _rate_between(samples, "good", args.warmup),
        "offered_events_per_s": _rate_between(samples, "offered", args.warmup),
        "delivered_total": samples[-1]["good"], "offered_total": samples[-1]["offered"],
        "backlog_at_end": samples[-1]["offered"] - samples[-1]["good"],
        "latency_source": "collector received_at - event dtm (ms), sampled eids",
        "latency_samples": len(lat),
        "latency_ms": {"p50": percentile(lat, 0.5), "p99": percentile(lat, 0.99),
                       "max": max(lat) if lat else None},
        "pipeline_histogram_s": {
            "source": "sp_pipeline_delivery_latency_seconds (store enqueue -> 2xx)",
            "p50": histogram_quantile(hist_before, hist_after, 0.5) if hist_before else None,
            "p99": histogram_quantile(hist_before, hist_after, 0.99) if hist_before else None,
        },
        "peak_rss_mb": {role: peak(role) for role in ("writer", "sender", "exporter",
                                                      "supervisor", "total")},
        "peak_wal_mb": max(s["wal_mb"] for s in samples),
        "cpu": cpu_breakdown(cpu),
        "samples": samples,
    }


def cpu_breakdown(cpu: List[Any]) -> Optional[Dict[str, Any]]:
    """Where the CPU went between the warmup's end and the end: cores used per role
    and CPU microseconds per delivered event (producers' time per delivered event too,
    which is their time per tracked event when the pipeline keeps up)."""
    if len(cpu) < 2 or cpu[-1][0] <= cpu[0][0]:
        return None
    (t0, good0, before), (t1, good1, after) = cpu[0], cpu[-1]
    seconds, delivered = t1 - t0, good1 - good0
    used = {role: after[role] - before.get(role, 0.0) for role in after}
    used["total"] = sum(used.values())
    return {
        "window_s": round(seconds, 3), "delivered": delivered,
        "cores": {role: round(v / seconds, 3) for role, v in used.items()},
        "us_per_delivered_event": {role: round(v / delivered * 1e6, 1) if delivered else None
                                   for role, v in used.items()},
    }


def cpu_line(cpu: Optional[Dict[str, Any]]) -> str:
    if not cpu:
        return "cpu: no window"
    per = cpu["us_per_delivered_event"]
    parts = [f"{role} {cpu['cores'][role]:.2f} cores/{per[role] or 0:.0f} us"
             for role in sorted(per, key=lambda r: -(per[r] or 0)) if role != "total"]
    return (f"cpu per delivered event: {per['total'] or 0:.0f} us in all "
            f"({cpu['cores']['total']:.2f} cores): " + ", ".join(parts))


def steady_search(root: str, args: argparse.Namespace) -> Dict[str, Any]:
    """Offer each of ``--steady-rates`` in turn until one is not kept up with."""
    step_args = argparse.Namespace(**vars(args))
    step_args.duration, step_args.warmup = args.step, min(4.0, args.step / 3)
    steps: List[Dict[str, Any]] = []
    highest: Optional[float] = None
    for rate in [float(r) for r in args.steady_rates.split(",") if r]:
        res = run_phase(f"steady-{rate:.0f}", root, rate, step_args)
        res.pop("samples")
        offered = res["offered_events_per_s"] or 0.0
        delivered = res["delivered_events_per_s"] or 0.0
        res["kept_up"] = offered >= KEPT_UP * rate and delivered >= KEPT_UP * offered
        steps.append(res)
        lat = res["latency_ms"]
        print(f"  steady {rate:>7,.0f}/s: offered {offered:,.0f}/s, delivered {delivered:,.0f}/s, "
              f"p99 {lat['p99'] or 0:.0f} ms -> {'kept up' if res['kept_up'] else 'fell behind'}"
              f"\n          {cpu_line(res['cpu'])}", flush=True)
        if not res["kept_up"]:
            break
        highest = rate
    print(f"  steady: highest rate kept up with: "
          f"{'none tried' if highest is None else f'{highest:,.0f} events/s'}", flush=True)
    return {"phase": "steady", "highest_steady_events_per_s": highest, "kept_up_share": KEPT_UP,
            "step_s": args.step, "steps": steps}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per phase")
    parser.add_argument("--warmup", type=float, default=None,
                        help="seconds not counted (default: 15%% of the duration, at least 2)")
    parser.add_argument("--rate", type=float, default=10_000,
                        help="events/s offered in the latency phase")
    parser.add_argument("--producers", type=int, default=1, help="producer processes")
    parser.add_argument("--sample", type=int, default=500,
                        help="newest good events read each second for latency")
    parser.add_argument("--phases", default="steady,latency,max",
                        help="comma-separated: steady,latency,max")
    parser.add_argument("--steady-rates", default="10000,12500,15000,17500,20000,25000,30000,40000",
                        help="offered rates (events/s) the steady phase tries in turn")
    parser.add_argument("--step", type=float, default=15.0,
                        help="seconds per steady step (warmup: 4 s of them)")
    parser.add_argument("--quick", action="store_true", help="10 s phases")
    parser.add_argument("--pipeline-arg", dest="pipeline_args", action="append", default=[],
                        help="extra `sp-pipeline start` argument (repeatable), e.g. "
                             "--pipeline-arg=--senders=3")
    parser.add_argument("--out", default=None, help="default: bench/results/sustained.json")
    args = parser.parse_args()
    if args.quick:
        args.duration = min(args.duration, 10.0)
    if args.warmup is None:
        args.warmup = max(2.0, 0.15 * args.duration)
    root = tempfile.mkdtemp(prefix="sp-sustained-")
    print(f"workdir {root}; {args.producers} producer(s), {args.duration:g} s per phase")
    phases: Dict[str, Any] = {}
    for name in [p for p in args.phases.split(",") if p]:
        if name == "steady":
            phases[name] = steady_search(root, args)
            continue
        rate = None if name == "max" else args.rate
        res = run_phase(name, root, rate, args)
        phases[name] = res
        lat = res["latency_ms"]
        line = (f"{name:>8}: offered {res['offered_events_per_s'] or 0:,.0f}/s, delivered "
                f"{res['delivered_events_per_s'] or 0:,.0f}/s, backlog at end "
                f"{res['backlog_at_end']:,}, peak RSS writer "
                f"{res['peak_rss_mb']['writer'] or 0:.1f} MB senders "
                f"{res['peak_rss_mb']['sender'] or 0:.1f} MB, peak WAL {res['peak_wal_mb']:.1f} MB")
        if lat["p50"] is not None:
            h = res["pipeline_histogram_s"]
            line += (f"\n          latency (collector - dtm, {res['latency_samples']} events): "
                     f"p50 {lat['p50']:.0f} ms, p99 {lat['p99']:.0f} ms, max {lat['max']:.0f} ms"
                     f"; pipeline histogram p50 "
                     f"{(h['p50'] or 0) * 1000:.0f} ms, p99 {(h['p99'] or 0) * 1000:.0f} ms")
        line += "\n          " + cpu_line(res["cpu"])
        print(line, flush=True)
    path = write_result("sustained", {
        "duration_s": args.duration, "rate": args.rate, "producers": args.producers,
        "pipeline_args": args.pipeline_args, "targets": TARGETS, "phases": phases,
    }, args.out)
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
