"""Demo: a local collector, the pipeline, 6000 mixed events, a report. See scripts/demo."""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import time

from sp_pipeline import Client
from sp_pipeline.samples import mixed_events, payload_count, sample_subject
from sp_pipeline.testing import LocalCollector, Pipeline, http_json


def progress(label: str, done: int, total: int) -> None:
    width = 30
    filled = int(width * done / max(total, 1))
    sys.stdout.write(f"\r{label:<22} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
    sys.stdout.flush()


def _free_port(preferred: int) -> int:
    """``preferred`` when nothing listens there, else any free port of 127.0.0.1."""
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError("no free port on 127.0.0.1")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=6000)
    parser.add_argument("--workdir", default=None, help="default: a new temporary directory")
    parser.add_argument("--keep-running", action="store_true",
                        help="leave the pipeline running until Ctrl-C after the report")
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="sp-demo-")
    print(f"working directory: {workdir}")
    metrics_port = _free_port(9465)
    with LocalCollector(workdir) as collector:
        print(f"local collector:   {collector.url}")
        with Pipeline(workdir, collector.url, "--metrics-addr", f"127.0.0.1:{metrics_port}") as pipe:
            print(f"pipeline ingest:   {pipe.ingest}")
            events = list(mixed_events(args.events))
            expected = sum(payload_count(e) for e in events)
            started = time.perf_counter()
            inside = 0.0
            with Client(pipe.ingest, namespace="demo", app_id="sp-pipeline-demo") as client:
                for i, event in enumerate(events):
                    subject = sample_subject(i)
                    t0 = time.perf_counter()
                    client.track(event, subject=subject)
                    inside += time.perf_counter() - t0
                    if i % 500 == 0:
                        progress("tracked", i, len(events))
                progress("tracked", len(events), len(events))
                print()
                client.flush(30)
            durable = time.perf_counter() - started
            deadline = time.monotonic() + 60
            good = 0
            while time.monotonic() < deadline:
                counts = collector.counts()
                good = counts["good"]
                progress("arrived at collector", good, expected)
                if good + counts["bad"] >= expected:
                    break
                time.sleep(0.02)
            delivered = time.perf_counter() - started
            print()
            counts = collector.counts()
            print(f"\n{len(events)} track() calls -> {expected} tracker-protocol events")
            print(f"  arrived at the collector: {counts['good']} good, {counts['bad']} bad")
            print(f"  all committed to SQLite (flush returned) after {durable:.3f} s")
            print(f"  all delivered after {delivered:.3f} s "
                  f"({expected / delivered:,.0f} events/s)")
            print(f"  time inside track(): {inside:.3f} s "
                  f"({inside / len(events) * 1e6:.1f} µs per call)")
            try:
                health = http_json(f"http://127.0.0.1:{metrics_port}/health")
                print(f"  metrics: http://127.0.0.1:{metrics_port}/metrics "
                      f"(health: {health})")
            except OSError as exc:
                print(f"  metrics: http://127.0.0.1:{metrics_port}/metrics (unreachable: {exc})")
            print(f"  status:  sp-pipeline status --run-dir {pipe.run_dir} --store {pipe.store}")
            if args.keep_running:
                print("running; Ctrl-C to stop")
                try:
                    while pipe.proc.poll() is None:
                        time.sleep(0.5)
                except KeyboardInterrupt:
                    pass
            code = pipe.stop()
            print(f"pipeline stopped (exit {code})")
    ok = counts["good"] == expected
    print("OK: every event arrived" if ok else "MISSING EVENTS")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
