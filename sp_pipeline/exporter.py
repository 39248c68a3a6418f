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
from typing import Tuple

from . import exitcodes
from .config import Settings

log = logging.getLogger("sp_pipeline.exporter")


def health(run_dir: str) -> Tuple[bool, dict]:
    """(healthy, detail) from the supervisor's view of its children."""
    try:
        with open(os.path.join(run_dir, "children.json")) as fh:
            state = json.load(fh)
    except (OSError, ValueError):
        return False, {"reason": "no supervisor state"}
    running = {}
    for child in state.get("children", []):
        if child.get("state") in ("starting", "running"):
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
