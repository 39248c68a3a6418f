"""The exporter role: serves every process's metrics, merged, and a health check.

``GET /metrics`` merges the prometheus multiprocess files of all roles (the supervisor
sets ``PROMETHEUS_MULTIPROC_DIR``). ``GET /health`` answers 200 only when the writer and
at least one sender are running, per the supervisor's ``children.json``; 503 otherwise,
with the reason in a small JSON body.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional, Tuple

from . import exitcodes
from .config import Settings

log = logging.getLogger("sp_pipeline.exporter")


def _children(run_dir: str) -> Optional[List[dict]]:
    """The supervisor's children.json entries; None when there is none to read."""
    try:
        with open(os.path.join(run_dir, "children.json")) as fh:
            return list(json.load(fh).get("children", []))
    except (OSError, ValueError, AttributeError):
        return None


def _running(child: dict) -> bool:
    return bool(child.get("pid")) and child.get("state") in ("starting", "running")


class SupervisorCollector:
    """``sp_pipeline_process_up{role}`` (running children) and
    ``sp_pipeline_process_restarts_total{role}`` (restarts since the supervisor
    started), from children.json at each scrape. Every role the supervisor runs has
    both series, at 0 before anything happened (increase() cannot see a first
    increment of a series that did not exist)."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        up = GaugeMetricFamily("sp_pipeline_process_up", "Running child processes by role.",
                               labels=["role"])
        restarts = CounterMetricFamily("sp_pipeline_process_restarts",
                                       "Child processes restarted by the supervisor.",
                                       labels=["role"])
        by_role: Dict[str, List[int]] = {}
        for child in _children(self.run_dir) or []:
            counts = by_role.setdefault(str(child.get("role")), [0, 0])
            counts[0] += _running(child)
            counts[1] += int(child.get("restarts") or 0)
        for role in sorted(by_role):
            up.add_metric([role], by_role[role][0])
            restarts.add_metric([role], by_role[role][1])
        yield up
        yield restarts


def health(run_dir: str) -> Tuple[bool, dict]:
    """(healthy, detail) from the supervisor's view of its children."""
    children = _children(run_dir)
    if children is None:
        return False, {"reason": "no supervisor state"}
    running: Dict[str, int] = {}
    for child in children:
        if _running(child):
            running[child["role"]] = running.get(child["role"], 0) + 1
    ok = running.get("writer", 0) >= 1 and running.get("sender", 0) >= 1
    detail = {"writer": running.get("writer", 0), "senders": running.get("sender", 0)}
    if not ok:
        detail["reason"] = "writer or every sender down"
    return ok, detail


def make_handler(settings: Settings):
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    run_dir = os.path.abspath(settings.run_dir)

    class Handler(BaseHTTPRequestHandler):
        # Headers and body are separate writes; without TCP_NODELAY the body waits for
        # the client's delayed ACK (~40 ms per scrape).
        disable_nagle_algorithm = True

        def do_GET(self) -> None:  # noqa: N802 (http.server naming)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                registry = CollectorRegistry()
                MultiProcessCollector(registry, path=settings.metrics_dir)
                registry.register(SupervisorCollector(run_dir))
                self._send(200, CONTENT_TYPE_LATEST, generate_latest(registry))
            elif path == "/health":
                ok, detail = health(run_dir)
                self._send(200 if ok else 503, "application/json", json.dumps(detail).encode())
            else:
                self._send(404, "text/plain", b"not found\n")

        def _send(self, status: int, ctype: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt, *args) -> None:
            pass

    return Handler


def run(settings: Settings) -> int:
    host, _, port = settings.metrics_addr.rpartition(":")
    try:
        server = ThreadingHTTPServer((host.strip("[]"), int(port)), make_handler(settings))
    except OSError as exc:
        log.error("cannot listen on %s: %s", settings.metrics_addr, exc.strerror)
        return exitcodes.BOOT_ERROR
    server.daemon_threads = True
    stop = threading.Event()

    def on_signal(signum, frame):  # record only; the main thread acts
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    bound_host, bound_port = server.server_address[:2]
    log.info("metrics on http://%s:%d/metrics", bound_host, bound_port)
    stop.wait()
    server.shutdown()
    server.server_close()
    return exitcodes.OK
