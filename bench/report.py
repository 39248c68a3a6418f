"""Report: the issue-6 benchmark results side by side with the official tracker.

Reads bench/results/{replay,sustained,drain}.json (whichever exist), prints a markdown
table of the headline figures with their targets and their ratio to the committed
bench/baseline.json, writes it to bench/results/report.md, and draws
bench/results/report.png (matplotlib, Agg): throughput (events/s to the collector) and
producer-side latency (µs inside track() per call) of each replay configuration, the
official tracker's beside sp-pipeline's, plus the sustained-load figures.

    python bench/report.py [--baseline bench/baseline.json] [--no-chart]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import BENCH_DIR, RESULTS_DIR, read_result, summary_lines  # noqa: E402

#: (key, label, unit, target text, good when lower?) of every headline figure.
FIGURES: List[Tuple[str, str, str, str, bool]] = [
    ("replay.sp_1proc_total_s", "replay: sp-pipeline, 1 process, first track -> all arrived", "s", "", True),
    ("replay.sp_4proc_total_s", "replay: sp-pipeline, 4 processes", "s", "", True),
    ("replay.sp_4threads_total_s", "replay: sp-pipeline, 4 threads", "s", "", True),
    ("replay.official_emitter_total_s", "replay: official Emitter", "s", "", True),
    ("replay.official_async_total_s", "replay: official AsyncEmitter", "s", "", True),
    ("replay.sp_1proc_track_us", "replay: sp-pipeline µs inside track() per call", "µs", "", True),
    ("replay.official_async_track_us", "replay: official AsyncEmitter µs inside track()", "µs", "", True),
    ("replay.official_emitter_track_us", "replay: official Emitter µs inside track()", "µs", "", True),
    ("replay.ratio_total_vs_official_emitter", "ratio: sp total / official Emitter total", "×", "<= 0.25", True),
    ("replay.ratio_track_vs_official_async", "ratio: sp track() / official AsyncEmitter track()", "×", "<= 0.2", True),
    ("sustained.steady_eps", "sustained: highest offered rate kept up with (steady)", "events/s", ">= 40,000", False),
    ("sustained.max_delivered_eps", "sustained: delivered, producers unthrottled", "events/s", "", False),
    ("sustained.max_offered_eps", "sustained: offered, producers unthrottled", "events/s", "", False),
    ("sustained.latency_delivered_eps", "sustained: delivered at the fixed offered rate", "events/s", "", False),
    ("sustained.latency_p50_ms", "sustained: latency p50 at the fixed rate (collector - dtm)", "ms", "", True),
    ("sustained.latency_p99_ms", "sustained: latency p99 at the fixed rate (collector - dtm)", "ms", "< 250", True),
    ("sustained.writer_rss_mb", "sustained: writer peak RSS", "MB", "", True),
    ("sustained.sender_rss_mb", "sustained: senders peak RSS (sum)", "MB", "", True),
    ("sustained.wal_mb", "sustained: peak WAL size", "MB", "", True),
    ("drain.events", "drain: events queued", "events", "", False),
    ("drain.fill_eps", "drain: fill rate through Client.track()", "events/s", "", False),
    ("drain.drain_eps", "drain: drain rate", "events/s", ">= sustained", False),
    ("drain.recovery_s", "drain: collector up -> first event", "s", "", True),
    ("drain.peak_total_rss_mb", "drain: peak RSS of all roles", "MB", "< 150", True),
    ("drain.peak_total_pss_mb", "drain: peak PSS of all roles", "MB", "", True),
]


def _g(d: Optional[Dict[str, Any]], *path: str) -> Optional[float]:
    for p in path:
        if not isinstance(d, dict):
            return None
        d = d.get(p)
    return d if isinstance(d, (int, float)) and not isinstance(d, bool) else None


def headline(replay: Optional[dict], sustained: Optional[dict], drain: Optional[dict]
             ) -> Dict[str, Optional[float]]:
    """The figures of ``FIGURES`` from the results files (None where missing)."""
    med = (replay or {}).get("median", {})
    mx = (sustained or {}).get("phases", {}).get("max")
    lt = (sustained or {}).get("phases", {}).get("latency")
    return {
        "replay.sp_1proc_total_s": _g(med, "sp-1proc", "total_s"),
        "replay.sp_4proc_total_s": _g(med, "sp-4proc", "total_s"),
        "replay.sp_4threads_total_s": _g(med, "sp-4threads", "total_s"),
        "replay.official_emitter_total_s": _g(med, "off-emitter", "total_s"),
        "replay.official_async_total_s": _g(med, "off-async", "total_s"),
        "replay.sp_1proc_track_us": _g(med, "sp-1proc", "track_us_per_call"),
        "replay.official_async_track_us": _g(med, "off-async", "track_us_per_call"),
        "replay.official_emitter_track_us": _g(med, "off-emitter", "track_us_per_call"),
        "replay.ratio_total_vs_official_emitter": _g(replay, "ratios", "total_vs_official_emitter"),
        "replay.ratio_track_vs_official_async": _g(replay, "ratios", "track_vs_official_async"),
        "sustained.steady_eps": _g((sustained or {}).get("phases", {}).get("steady"),
                                   "highest_steady_events_per_s"),
        "sustained.max_delivered_eps": _g(mx, "delivered_events_per_s"),
        "sustained.max_offered_eps": _g(mx, "offered_events_per_s"),
        "sustained.latency_delivered_eps": _g(lt, "delivered_events_per_s"),
        "sustained.latency_p50_ms": _g(lt, "latency_ms", "p50"),
        "sustained.latency_p99_ms": _g(lt, "latency_ms", "p99"),
        "sustained.writer_rss_mb": max(filter(None, [_g(mx, "peak_rss_mb", "writer"),
                                                     _g(lt, "peak_rss_mb", "writer")]),
                                       default=None),
        "sustained.sender_rss_mb": max(filter(None, [_g(mx, "peak_rss_mb", "sender"),
                                                     _g(lt, "peak_rss_mb", "sender")]),
                                       default=None),
        "sustained.wal_mb": max(filter(None, [_g(mx, "peak_wal_mb"), _g(lt, "peak_wal_mb")]),
                                default=None),
        "drain.events": _g(drain, "events"),
        "drain.fill_eps": _g(drain, "fill", "events_per_s"),
        "drain.drain_eps": _g(drain, "drain", "events_per_s"),
        "drain.recovery_s": _g(drain, "drain", "recovery_s"),
        "drain.peak_total_rss_mb": _g(drain, "peak_rss_mb", "total"),
        "drain.peak_total_pss_mb": _g(drain, "peak_pss_mb", "total"),
    }


def _fmt(v: Optional[float]) -> str:
    if v is None:
        return "–"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.3f}"


def table(figures: Dict[str, Optional[float]], baseline: Dict[str, Any]) -> List[str]:
    base = baseline.get("figures", {})
    rows = []
    for key, label, unit, target, _lower in FIGURES:
        v, b = figures.get(key), base.get(key)
        vs = f"{v / b:.2f}" if v is not None and b else "–"
        rows.append((label, f"{_fmt(v)} {unit}", target or "", _fmt(b), vs))
    return summary_lines(rows, ("figure", "this run", "target", "baseline", "run / baseline"))


def chart(replay: Optional[dict], sustained: Optional[dict], path: str) -> Optional[str]:
    """Throughput and per-call latency, sp-pipeline beside the official tracker."""
    if not replay:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    med = replay["median"]
    names = [c for c in ("sp-1proc", "sp-4proc", "sp-4threads", "off-emitter", "off-async")
             if c in med]
    colors = ["#1f77b4" if n.startswith("sp-") else "#ff7f0e" for n in names]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    eps = [med[n]["events_per_s"] for n in names]
    ax1.bar(names, eps, color=colors)
    mx = (sustained or {}).get("phases", {}).get("max", {}).get("delivered_events_per_s")
    if mx:
        ax1.axhline(mx, color="#2ca02c", ls="--", label=f"sp-pipeline sustained {mx:,.0f}/s")
        ax1.legend(loc="center right")
    ax1.set_title(f"throughput: {replay['payloads']:,} events to the collector\n"
                  "(first track() -> all arrived; median of runs)")
    ax1.set_ylabel("events / s")
    us = [med[n]["track_us_per_call"] for n in names]
    ax2.bar(names, us, color=colors)
    ax2.set_yscale("log")
    ax2.set_title("producer latency: time inside track()\n(µs per call, log scale)")
    ax2.set_ylabel("µs per call")
    for ax, vals in ((ax1, eps), (ax2, us)):
        ax.tick_params(axis="x", rotation=20)
        for i, v in enumerate(vals):
            ax.annotate(f"{v:,.0f}" if v >= 100 else f"{v:.1f}", (i, v), ha="center",
                        va="bottom", fontsize=8)
    lt = (sustained or {}).get("phases", {}).get("latency", {})
    if lt.get("latency_ms", {}).get("p99") is not None:
        fig.text(0.5, 0.01, f"sustained at {lt['offered_rate']:,.0f} events/s offered: end-to-end "
                 f"latency p50 {lt['latency_ms']['p50']:.0f} ms, p99 {lt['latency_ms']['p99']:.0f} ms"
                 f"; delivered {lt['delivered_events_per_s'] or 0:,.0f}/s",
                 ha="center", fontsize=9)
    fig.suptitle(f"sp-pipeline (blue) vs snowplow-tracker "
                 f"{replay.get('snowplow_tracker_version', '')} (orange)")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default=os.path.join(BENCH_DIR, "baseline.json"))
    parser.add_argument("--no-chart", action="store_true")
    parser.add_argument("--print-figures", action="store_true",
                        help="print this run's figures as JSON (to update the baseline)")
    args = parser.parse_args()
    replay, sustained, drain = (read_result(n) for n in ("replay", "sustained", "drain"))
    if not (replay or sustained or drain):
        print(f"no results in {RESULTS_DIR}: run bench/replay.py, sustained.py, drain.py first")
        return 1
    try:
        with open(args.baseline) as fh:
            baseline = json.load(fh)
    except (OSError, ValueError):
        baseline = {}
    figures = headline(replay, sustained, drain)
    if args.print_figures:
        print(json.dumps({k: v for k, v in figures.items() if v is not None}, indent=2))
        return 0
    lines = ["# sp-pipeline benchmarks (issue 6)", ""]
    for name, res in (("replay", replay), ("sustained", sustained), ("drain", drain)):
        if res:
            m = res.get("machine", {})
            lines.append(f"- {name}: {m.get('date', '?')}, {m.get('cpus', '?')} × {m.get('cpu', '?')}"
                         f", load at start {', '.join(f'{x:.1f}' for x in m.get('loadavg_at_start', []))}")
    if baseline:
        lines.append(f"- baseline: {baseline.get('date', '?')}, {baseline.get('machine', '?')}")
    lines += [""] + table(figures, baseline)
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(RESULTS_DIR, exist_ok=True)
    md = os.path.join(RESULTS_DIR, "report.md")
    with open(md, "w") as fh:
        fh.write(text)
    print(f"-> {md}")
    if not args.no_chart:
        png = chart(replay, sustained, os.path.join(RESULTS_DIR, "report.png"))
        if png:
            print(f"-> {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
