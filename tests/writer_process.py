"""Test helpers around one writer role process (``python -m sp_pipeline.role writer``)
and read-only looks into its SQLite store and metrics files. The ``writer_dir``
fixture (tests/conftest.py) builds them and reaps every process afterwards."""

from __future__ import annotations

import collections
import json
import os
import signal
import sqlite3
import subprocess
import sys
from typing import Counter, Dict, Optional

from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from sp_pipeline import config
from sp_pipeline.events import StructuredEvent
from sp_pipeline.payload import TrackerInfo, build, encode_event
from sp_pipeline.testing import ManagedProcess, wait_until

class WriterProcess(ManagedProcess):
    """One writer role process on a settings file in ``workdir`` (a short directory:
    the ingest endpoint is ipc:// inside it). Metrics go to ``workdir/metrics``."""

    def __init__(self, workdir: str, **overrides: object) -> None:
        self.workdir = workdir
        self.metrics_dir = os.path.join(workdir, "metrics")
        os.makedirs(self.metrics_dir, exist_ok=True)
        run_dir = os.path.join(workdir, "run")
        os.makedirs(run_dir, mode=0o700, exist_ok=True)
        flags = {"run_dir": run_dir, "store": os.path.join(workdir, "events.db")}
        flags.update(overrides)
        self.settings = config.load(flags, env={})
        self.settings_path = os.path.join(workdir, "settings.json")
        self.log_path = os.path.join(workdir, "writer.log")
        self.proc: Optional[subprocess.Popen] = None
        self.starts = 0
        self.reconfigure()

    @property
    def store(self) -> str:
        return self.settings.store

    @property
    def ingest(self) -> str:
        return self.settings.ingest_endpoint

    def reconfigure(self, **changes: object) -> None:
        """Change settings for the next start."""
        self.settings = self.settings.replace(**changes)
        with open(self.settings_path, "w") as fh:
            fh.write(self.settings.to_json())

    def start(self, wait_ready: bool = True) -> "WriterProcess":
        env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=self.metrics_dir)
        self._spawn([sys.executable, "-m", "sp_pipeline.role", "writer", "--settings",
                     self.settings_path], self.log_path, env)
        self.starts += 1
        if wait_ready:
            wait_until(self._ready, 20, "the writer to log 'writer ready'")
        return self

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"writer exited {self.proc.returncode}:\n{self.log()}")
        return self.log().count("writer ready") >= self.starts

    def kill9(self) -> None:
        if self.proc is not None:
            self.kill()
            self.proc.wait(10)

    def metric(self, name: str, label: Optional[str] = None) -> Dict[str, float]:
        """Samples of ``name`` merged over the metrics files, keyed by ``label``'s value
        (or "" for an unlabelled metric)."""
        return read_metric(self.metrics_dir, name, label)


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def read_metric(metrics_dir: str, name: str, label: Optional[str] = None) -> Dict[str, float]:
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=metrics_dir)
    out: Dict[str, float] = collections.defaultdict(float)
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == name:
                out[sample.labels.get(label, "") if label else ""] += sample.value
    return dict(out)


def ro_connect(path: str) -> sqlite3.Connection:
    """A separate read-only connection (reads through the WAL the writer keeps)."""
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)


def queue_eids(path: str, table: str = "queue") -> Counter[str]:
    """How many rows of ``table`` carry each eid."""
    assert table in ("queue", "dead_letters")
    conn = ro_connect(path)
    try:
        rows = conn.execute(f"SELECT payload FROM {table}").fetchall()
    finally:
        conn.close()
    return collections.Counter(json.loads(bytes(r[0]))["eid"] for r in rows)


def count_rows(path: str, where: str = "1") -> int:
    conn = ro_connect(path)
    try:
        return conn.execute(f"SELECT count(*) FROM queue WHERE {where}").fetchone()[0]
    except sqlite3.OperationalError:
        return 0  # not created yet
    finally:
        conn.close()


def valid_event(i: int = 0) -> bytes:
    """One encoded tracker-protocol event, as a client would send it."""
    (payload,) = build(StructuredEvent("raw", "valid", value=i),
                       TrackerInfo(namespace="raw", app_id=None), now_ms=1_700_000_000_000)
    return encode_event(payload)


def eid_of(event: bytes) -> str:
    return json.loads(event)["eid"]


