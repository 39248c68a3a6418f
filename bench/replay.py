"""Benchmark: 6000 mixed events through sp-pipeline and through the official Snowplow
Python tracker (``snowplow-tracker``), to the same local collector, in the same run.

Configurations (each run once per repeat, interleaved so that drift in the machine's
load hits all of them alike):

    sp-1proc      sp-pipeline Client, 1 producer process
    sp-4proc      sp-pipeline Client, 4 producer processes (the events split 4 ways)
    sp-4threads   sp-pipeline Client shared by 4 threads of 1 process
    off-emitter   snowplow_tracker.Tracker + Emitter (defaults: POST, batches of 10)
    off-async     snowplow_tracker.Tracker + AsyncEmitter (defaults: 1 thread, batches of 10)

The events are ``sp_pipeline.samples.mixed_events(N)`` with ``sample_subject(i)``, built
before the clock starts (for the official tracker: converted to its event classes; a
transaction goes through ``track_ecommerce_transaction``, which it offers for nothing
else; screen views and timings as self-describing events with the same schemas that
sp-pipeline sends). Every producer runs in a process of its own, started before the
clock and released together by a barrier.

Measured per run: ``total_s``, from the first ``track()`` to the moment the collector's
``/micro/all`` first shows every event (polled every 5 ms); ``track_s``, the time spent
inside ``track()`` calls (summed over producers / threads); then every eid ``track()``
returned is looked up in ``/micro/eids`` and the number of distinct eids must equal the
number of tracker-protocol events (a transaction with 2 items is 3). Writes
bench/results/replay.json.

    python bench/replay.py [--events 6000] [--repeat 3] [--quick]
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import sys
import tempfile
import threading
import time
import warnings
from typing import Any, Dict, List, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    Progress,
    check_eids,
    fmt_ratio,
    free_port,
    median,
    ratio,
    wait_good,
    write_result,
)
from sp_pipeline import Client  # noqa: E402
from sp_pipeline.events import (  # noqa: E402
    EcommerceTransaction,
    PagePing,
    PageView,
    ScreenView,
    SelfDescribing,
    StructuredEvent,
    Timing,
)
from sp_pipeline.payload import SCREEN_VIEW_SCHEMA, TIMING_SCHEMA  # noqa: E402
from sp_pipeline.samples import mixed_events, payload_count, sample_subject  # noqa: E402
from sp_pipeline.testing import LocalCollector, Pipeline  # noqa: E402

CONFIGS = ("sp-1proc", "sp-4proc", "sp-4threads", "off-emitter", "off-async")
TARGETS = {"total_vs_official_emitter": 0.25, "track_vs_official_async": 0.2}


# --------------------------------------------------------------------- sp-pipeline

def _sp_loop(client: Client, work: Sequence[Tuple[Any, Any]], eids: List[str]) -> float:
    """Track ``work`` ((event, subject) pairs); return seconds spent inside track()."""
    track, clock, inside = client.track, time.perf_counter, 0.0
    append = eids.append
    for event, subject in work:
        t0 = clock()
        eid = track(event, subject=subject)
        inside += clock() - t0
        append(eid)
    return inside


def sp_producer(endpoint: str, n_events: int, part: int, parts: int, threads: int,
                barrier: Any, out: Any) -> None:
    """One producer process: track its share of the events (``part`` of ``parts``),
    over ``threads`` threads sharing one Client, flush, report to ``out``."""
    events = list(mixed_events(n_events))
    work = [(events[i], sample_subject(i)) for i in range(part, n_events, parts)]
    client = Client(endpoint, namespace="bench", app_id="replay-sp")
    slices = [work[t::threads] for t in range(threads)]
    eids: List[List[str]] = [[] for _ in range(threads)]
    inside = [0.0] * threads

    def run(t: int) -> None:
        inside[t] = _sp_loop(client, slices[t], eids[t])

    barrier.wait()
    t_first = time.monotonic()
    if threads == 1:
        run(0)
    else:
        pool = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
        for th in pool:
            th.start()
        for th in pool:
            th.join()
    t_tracked = time.monotonic()
    client.flush(120)
    t_committed = time.monotonic()
    client.close()
    out.put({"t_first": t_first, "t_tracked": t_tracked, "t_committed": t_committed,
             "track_s": sum(inside), "calls": len(work),
             "eids": [e for chunk in eids for e in chunk]})


# --------------------------------------------------------------- official tracker

def official_events(n_events: int) -> List[Tuple[bool, Any]]:
    """The sample events in the official tracker's API: ``(is_event, value)`` where an
    event object goes to ``Tracker.track`` and a dict (transactions) to
    ``Tracker.track_ecommerce_transaction(**value)``."""
    import snowplow_tracker as off

    out: List[Tuple[bool, Any]] = []
    for i, ev in enumerate(mixed_events(n_events)):
        s = sample_subject(i)
        subj = (off.Subject().set_user_id(s.user_id).set_ip_address(s.ip_address)
                .set_useragent(s.useragent).set_lang(s.language).set_timezone(s.timezone)
                .set_screen_resolution(*map(int, s.screen_resolution.split("x"))))
        out.append(_official(off, ev, subj))
    return out


def _official(off: Any, ev: Any, subj: Any) -> Tuple[bool, Any]:
    sdj = off.SelfDescribingJson
    if isinstance(ev, PageView):
        return True, off.PageView(ev.url, ev.title, ev.referrer, event_subject=subj)
    if isinstance(ev, PagePing):
        return True, off.PagePing(ev.url, ev.title, ev.referrer, ev.min_x, ev.max_x, ev.min_y,
                                  ev.max_y, event_subject=subj)
    if isinstance(ev, StructuredEvent):
        return True, off.StructuredEvent(ev.category, ev.action, ev.label, ev.property,
                                         ev.value, event_subject=subj)
    if isinstance(ev, SelfDescribing):
        ctx = [sdj(c.schema, c.data) for c in ev.contexts]
        return True, off.SelfDescribing(sdj(ev.event_json.schema, ev.event_json.data),
                                        event_subject=subj, context=ctx)
    if isinstance(ev, ScreenView):
        return True, off.SelfDescribing(sdj(SCREEN_VIEW_SCHEMA, {"name": ev.name, "id": ev.id}),
                                        event_subject=subj)
    if isinstance(ev, Timing):
        data = {"category": ev.category, "variable": ev.variable, "timing": ev.timing,
                "label": ev.label}
        return True, off.SelfDescribing(sdj(TIMING_SCHEMA, data), event_subject=subj)
    if isinstance(ev, EcommerceTransaction):
        items = [{"sku": it.sku, "price": it.price, "quantity": it.quantity, "name": it.name,
                  "category": it.category} for it in ev.items]
        return False, dict(order_id=ev.order_id, total_value=ev.total, affiliation=ev.affiliation,
                           tax_value=ev.tax, shipping=ev.shipping, city=ev.city, state=ev.state,
                           country=ev.country, currency=ev.currency, items=items,
                           event_subject=subj)
    raise TypeError(f"no official equivalent for {type(ev).__name__}")


def official_producer(url: str, n_events: int, kind: str, barrier: Any, out: Any) -> None:
    """The official tracker with its default ``Emitter`` (``kind`` "emitter") or
    ``AsyncEmitter`` ("async"): track every event, ``flush()``, report to ``out``."""
    import snowplow_tracker as off

    warnings.simplefilter("ignore", DeprecationWarning)  # track_ecommerce_transaction
    # Its default is an INFO line per request on stderr; silenced (it would only slow
    # the official tracker down and flood the terminal).
    off.logger.setLevel(logging.WARNING)
    emitter = off.Emitter(url) if kind == "emitter" else off.AsyncEmitter(url)
    tracker = off.Tracker("bench", emitter, app_id=f"replay-off-{kind}")
    work = official_events(n_events)
    track, track_tr = tracker.track, tracker.track_ecommerce_transaction
    clock, inside, eids = time.perf_counter, 0.0, []
    barrier.wait()
    t_first = time.monotonic()
    for is_event, value in work:
        t0 = clock()
        eid = track(value) if is_event else track_tr(**value)
        inside += clock() - t0
        if is_event:
            eids.append(eid)
    t_tracked = time.monotonic()
    tracker.flush()  # synchronous: returns when every batch was sent
    t_committed = time.monotonic()
    out.put({"t_first": t_first, "t_tracked": t_tracked, "t_committed": t_committed,
             "track_s": inside, "calls": len(work), "eids": eids})


# --------------------------------------------------------------------- one run

def run_config(config: str, n_events: int, expected: int, collector: LocalCollector,
               pipeline: Pipeline) -> Dict[str, Any]:
    """Run one configuration; the collector must be empty. Returns its figures."""
    ctx = mp.get_context("fork")  # the parent holds no threads: forking is safe, and quick
    out = ctx.Queue()
    if config.startswith("sp-"):
        procs, threads = {"sp-1proc": (1, 1), "sp-4proc": (4, 1), "sp-4threads": (1, 4)}[config]
        barrier = ctx.Barrier(procs + 1)
        workers = [ctx.Process(target=sp_producer,
                               args=(pipeline.ingest, n_events, p, procs, threads, barrier, out))
                   for p in range(procs)]
    else:
        procs, threads = 1, 1
        barrier = ctx.Barrier(2)
        kind = config.split("-", 1)[1]
        workers = [ctx.Process(target=official_producer,
                               args=(collector.url, n_events, kind, barrier, out))]
    for w in workers:
        w.start()
    barrier.wait(120)
    progress = Progress(config)
    t_end = wait_good(collector, expected, 300, progress)
    progress.done()
    reports = [out.get(timeout=120) for _ in workers]
    for w in workers:
        w.join(30)
    t_first = min(r["t_first"] for r in reports)
    arrived = check_eids(collector, expected, (e for r in reports for e in r["eids"] if e))
    track_s = sum(r["track_s"] for r in reports)
    calls = sum(r["calls"] for r in reports)
    return {
        "config": config, "processes": procs, "threads": threads,
        "calls": calls, "events": expected,
        "total_s": t_end - t_first,
        "events_per_s": expected / (t_end - t_first),
        "track_s": track_s,
        "track_us_per_call": track_s / calls * 1e6,
        "tracking_wall_s": max(r["t_tracked"] for r in reports) - t_first,
        "flushed_s": max(r["t_committed"] for r in reports) - t_first,
        "arrival": arrived,
        "bad": collector.counts()["bad"],
    }


def summarize(runs: List[Dict[str, Any]], repeats: int) -> Dict[str, Any]:
    """Medians per configuration and the ratios against the official tracker, per repeat
    (same run) and their median."""
    by: Dict[str, List[Dict[str, Any]]] = {}
    for r in runs:
        by.setdefault(r["config"], []).append(r)
    med = {c: {k: median(r[k] for r in rs) for k in
               ("total_s", "events_per_s", "track_s", "track_us_per_call", "tracking_wall_s",
                "flushed_s")}
           for c, rs in by.items()}
    for c, rs in by.items():
        med[c]["all_arrived"] = all(r["arrival"]["all_arrived"] for r in rs)
    per_repeat = []
    for i in range(repeats):
        get = {c: rs[i] for c, rs in by.items() if len(rs) > i}
        if {"sp-1proc", "off-emitter", "off-async"} <= get.keys():
            per_repeat.append({
                "total_vs_official_emitter": ratio(get["sp-1proc"]["total_s"],
                                                   get["off-emitter"]["total_s"]),
                "track_vs_official_async": ratio(get["sp-1proc"]["track_s"],
                                                 get["off-async"]["track_s"]),
                "best_sp_total_vs_official_emitter": ratio(
                    min(get[c]["total_s"] for c in get if c.startswith("sp-")),
                    get["off-emitter"]["total_s"]),
            })
    ratios = {k: median(p[k] for p in per_repeat) for k in
              (per_repeat[0].keys() if per_repeat else ())}
    return {"median": med, "ratios_per_repeat": per_repeat, "ratios": ratios}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=6000, help="track() calls per run")
    parser.add_argument("--repeat", type=int, default=3, help="runs of every configuration")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"comma-separated subset of {','.join(CONFIGS)}")
    parser.add_argument("--quick", action="store_true", help="one repeat")
    parser.add_argument("--workdir", default=None, help="default: a new temporary directory")
    parser.add_argument("--out", default=None, help="default: bench/results/replay.json")
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeat
    configs = [c for c in args.configs.split(",") if c]
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown configs: {', '.join(sorted(unknown))}")
    import snowplow_tracker

    expected = sum(payload_count(e) for e in mixed_events(args.events))
    work = args.workdir or tempfile.mkdtemp(prefix="sp-replay-")
    runs: List[Dict[str, Any]] = []
    print(f"{args.events} track() calls -> {expected} events; snowplow-tracker "
          f"{snowplow_tracker.__version__}; workdir {work}")
    print(f"{'run':>3} {'config':<12} {'total s':>8} {'events/s':>9} {'track() s':>9} "
          f"{'µs/call':>8} {'arrived':>8}")
    with LocalCollector(work) as collector, \
            Pipeline(work, collector.url, "--metrics-addr", f"127.0.0.1:{free_port()}") as pipe:
        for rep in range(repeats):
            for config in configs:
                collector.reset()
                r = run_config(config, args.events, expected, collector, pipe)
                r["repeat"] = rep + 1
                runs.append(r)
                print(f"{rep + 1:>3} {config:<12} {r['total_s']:>8.3f} {r['events_per_s']:>9,.0f} "
                      f"{r['track_s']:>9.3f} {r['track_us_per_call']:>8.1f} "
                      f"{'yes' if r['arrival']['all_arrived'] else 'NO':>8}", flush=True)
        pipe.stop()
    summary = summarize(runs, repeats)
    rat = summary["ratios"]
    print(f"\nmedian of {repeats} repeat(s):")
    for c, m in summary["median"].items():
        print(f"  {c:<12} total {m['total_s']:.3f} s ({m['events_per_s']:,.0f} events/s), "
              f"inside track() {m['track_s']:.3f} s ({m['track_us_per_call']:.1f} µs/call)")
    if rat:
        print(f"sp-pipeline total / official Emitter total:          "
              f"{fmt_ratio(rat['total_vs_official_emitter'])} (target <= 0.25)")
        print(f"sp-pipeline track() time / official AsyncEmitter's:  "
              f"{fmt_ratio(rat['track_vs_official_async'])} (target <= 0.2)")
    path = write_result("replay", {
        "events": args.events, "payloads": expected, "repeats": repeats,
        "snowplow_tracker_version": snowplow_tracker.__version__,
        "targets": TARGETS, **summary, "runs": runs,
    }, args.out)
    print(f"-> {path}")
    ok = all(m["all_arrived"] for m in summary["median"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
