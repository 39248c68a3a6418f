"""What the issue-6 benchmark programs share: results files, the machine description,
a one-line progress display, process memory, and polling the local collector.

Only the programs in ``bench/`` import this module; nothing under ``sp_pipeline/`` does.
Times are ``time.monotonic()`` seconds (CLOCK_MONOTONIC: comparable between processes
on Linux), sizes are MB (10**6 bytes), rates are events (tracker-protocol payloads)
per second.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import socket
import statistics
import sys
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(BENCH_DIR, "results")
REPO_DIR = os.path.dirname(BENCH_DIR)

if REPO_DIR not in sys.path:  # run as `python bench/x.py` from anywhere
    sys.path.insert(0, REPO_DIR)


def machine() -> Dict[str, Any]:
    """Describe this machine and moment: CPU model and count, memory, OS, Python, load."""
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_mb = None
    try:
        with open("/proc/meminfo") as fh:
            mem_mb = int(fh.readline().split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": model,
        "cpus": os.cpu_count(),
        "mem_mb": mem_mb,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "loadavg_at_start": list(os.getloadavg()),
    }


def write_result(name: str, data: Dict[str, Any], path: Optional[str] = None) -> str:
    """Write ``data`` (plus ``benchmark`` and ``machine``) as JSON to
    ``bench/results/<name>.json`` (or ``path``); return the path."""
    path = path or os.path.join(RESULTS_DIR, f"{name}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    out = {"benchmark": name, "machine": machine(), **data}
    with open(path, "w") as fh:
        json.dump(out, fh, indent=2)
        fh.write("\n")
    return path


def read_result(name: str) -> Optional[Dict[str, Any]]:
    """The JSON a program wrote to ``bench/results/<name>.json``, or None."""
    try:
        with open(os.path.join(RESULTS_DIR, f"{name}.json")) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


class Progress:
    """A one-line progress display on stderr.

    On a terminal the line is redrawn in place (at most 10 times a second); otherwise
    (logs, CI) a plain line is written at most every 5 seconds.
    """

    def __init__(self, label: str) -> None:
        self.label = label
        self.tty = sys.stderr.isatty()
        self._last = 0.0
        self._width = 0

    def show(self, text: str, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < (0.1 if self.tty else 5.0):
            return
        self._last = now
        line = f"{self.label}: {text}"
        if self.tty:
            pad = max(self._width - len(line), 0)
            sys.stderr.write("\r" + line + " " * pad)
            self._width = len(line)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def done(self, text: str = "") -> None:
        if text:
            self.show(text, force=True)
        if self.tty and self._width:
            sys.stderr.write("\n")
            sys.stderr.flush()
        self._width = 0


def rss_mb(pid: int) -> Optional[float]:
    """Resident set size of ``pid`` in MB (``VmRSS`` of /proc/PID/status); None if gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024 / 1e6
    except (OSError, ValueError, IndexError):
        return None
    return None


def pss_mb(pid: int) -> Optional[float]:
    """Proportional set size of ``pid`` in MB (``Pss`` of /proc/PID/smaps_rollup): shared
    pages (the interpreter, libzmq, libsqlite) divided among the processes sharing them."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024 / 1e6
    except (OSError, ValueError, IndexError):
        return None
    return None


def cpu_seconds(pid: int) -> Optional[float]:
    """User plus system CPU seconds ``pid`` has used (/proc/PID/stat); None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def role_cpu(pipeline: Any, **others: Sequence[int]) -> Dict[str, float]:
    """CPU seconds used so far per role of a running ``Pipeline`` (senders summed), the
    supervisor, and each group of pids in ``others`` (e.g. ``collector=[pid]``)."""
    groups: Dict[str, List[int]] = {}
    for child in pipeline.children():
        if child.get("pid"):
            groups.setdefault(child["role"], []).append(child["pid"])
    sup = pipeline.supervisor_pid()
    if sup:
        groups["supervisor"] = [sup]
    groups.update({name: list(pids) for name, pids in others.items()})
    return {name: sum(cpu_seconds(pid) or 0.0 for pid in pids) for name, pids in groups.items()}


def role_rss(pipeline: Any, measure: Callable[[int], Optional[float]] = rss_mb
             ) -> Dict[str, float]:
    """MB per role of a running ``sp_pipeline.testing.Pipeline`` (``measure``: ``rss_mb``
    or ``pss_mb``): ``writer``, ``sender`` (all senders summed), ``exporter``,
    ``supervisor``, and ``total``."""
    out: Dict[str, float] = {}
    for child in pipeline.children():
        if child.get("pid"):
            mb = measure(child["pid"])
            if mb is not None:
                out[child["role"]] = out.get(child["role"], 0.0) + mb
    sup = pipeline.supervisor_pid()
    mb = measure(sup) if sup else None
    if mb is not None:
        out["supervisor"] = mb
    out["total"] = sum(out.values())
    return out


def file_mb(path: str) -> float:
    """Size of ``path`` in MB, 0.0 when it does not exist."""
    try:
        return os.path.getsize(path) / 1e6
    except OSError:
        return 0.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: Sequence[float], q: float) -> Optional[float]:
    """The ``q``-quantile (0..1, nearest rank) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def median(values: Iterable[float]) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def good_count(collector: Any) -> int:
    """Good events the collector has received (``GET /micro/all``)."""
    return int(collector.counts()["good"])


def wait_good(collector: Any, target: int, timeout: float, progress: Optional[Progress] = None,
              interval: float = 0.005) -> float:
    """Poll ``/micro/all`` until ``good >= target``; return the monotonic time at which
    it was first seen. Raise TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        counts = collector.counts()
        now = time.monotonic()
        if counts["good"] >= target:
            return now
        if progress is not None:
            progress.show(f"{counts['good']:,}/{target:,} at the collector"
                          + (f" ({counts['bad']} bad)" if counts["bad"] else ""))
        if now >= deadline:
            raise TimeoutError(f"{counts['good']} of {target} events at the collector after "
                               f"{timeout:g} s (bad: {counts['bad']})")
        time.sleep(interval)


def check_eids(collector: Any, expected_total: int, known: Iterable[str]) -> Dict[str, Any]:
    """Check arrivals by eid (``GET /micro/eids``): every eid in ``known`` arrived, and
    ``expected_total`` distinct eids arrived in all. Returns the findings."""
    eids = collector.eids()
    known = list(known)
    missing = [e for e in known if e not in eids]
    return {
        "distinct_eids": len(eids),
        "expected": expected_total,
        "checked_eids": len(known),
        "missing_checked": len(missing),
        "duplicates": sum(1 for n in eids.values() if n > 1),
        "all_arrived": not missing and len(eids) == expected_total,
    }


def fmt_ratio(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or not b else a / b


def flatten(figures: Dict[str, Any], prefix: str = "") -> Dict[str, float]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` keeping numbers only."""
    out: Dict[str, float] = {}
    for key, value in figures.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = value
    return out


def summary_lines(rows: List[Sequence[Any]], header: Sequence[str]) -> List[str]:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return lines
