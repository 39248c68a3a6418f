"""Run a real pipeline and a local collector as processes: for tests, demos, benchmarks.

    with LocalCollector() as collector, Pipeline(workdir, collector.url) as pipeline:
        with Client(pipeline.ingest, namespace="demo") as client:
            client.track(...)
        collector.wait_for(count)

Everything runs as real processes on 127.0.0.1 (``sp-pipeline collector`` and
``sp-pipeline start``); ``stop()`` sends SIGTERM and waits, ``kill()`` sends SIGKILL, and
leaving the ``with`` block always reaps both, process groups included.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from typing import Callable, Dict, List, Optional, Sequence

from .supervisor.arbiter import read_pid


def wait_until(predicate: Callable[[], object], timeout: float, what: str,
               interval: float = 0.02) -> object:
    """Poll ``predicate`` until it returns something truthy; raise TimeoutError naming
    ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def _cli() -> List[str]:
    return [sys.executable, "-m", "sp_pipeline.cli"]


def http_json(url: str, method: str = "GET", body: Optional[dict] = None,
              timeout: float = 5.0) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read() or b"{}")


class ManagedProcess:
    """A child process in its own session (process group), logging to a file."""

    proc: Optional[subprocess.Popen] = None

    def _spawn(self, args: Sequence[str], log_path: str, env: Optional[Dict[str, str]]) -> None:
        self.log_path = log_path
        if getattr(self, "_log", None) is not None:
            self._log.close()  # a restart: one handle at a time
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(list(args), stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, start_new_session=True)

    def stop(self, timeout: float = 20.0) -> Optional[int]:
        """SIGTERM, then wait; SIGKILL the group if it does not exit in time."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.wait(5)
        finally:
            self._reap_group()

    def kill(self) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _reap_group(self) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # stragglers of the group
            except ProcessLookupError:
                pass
            self._log.close()

    def log(self) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                return fh.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __exit__(self, *exc) -> None:
        self.stop()


class LocalCollector(ManagedProcess):
    """``sp-pipeline collector`` on a free port of 127.0.0.1."""

    def __init__(self, workdir: str, *extra_args: str) -> None:
        os.makedirs(workdir, exist_ok=True)
        ready = os.path.join(workdir, "collector.url")
        if os.path.exists(ready):
            os.unlink(ready)
        self._spawn(_cli() + ["collector", "--port", "0", "--ready-file", ready, *extra_args],
                    os.path.join(workdir, "collector.log"), None)
        self.url = str(wait_until(lambda: _read(ready), 20, "the collector to listen")).strip()

    def __enter__(self) -> "LocalCollector":
        return self

    def counts(self) -> dict:
        return http_json(self.url + "/micro/all")

    def eids(self) -> Dict[str, int]:
        return http_json(self.url + "/micro/eids")["eids"]

    def set_faults(self, **faults) -> dict:
        return http_json(self.url + "/micro/faults", "POST", faults)

    def reset(self) -> None:
        http_json(self.url + "/micro/reset", "POST", {})

    def wait_for(self, good: int, timeout: float = 60.0) -> dict:
        return wait_until(lambda: (c := self.counts())["good"] >= good and c, timeout,
                          f"{good} good events at the collector")  # type: ignore[return-value]


class Pipeline(ManagedProcess):
    """``sp-pipeline start`` with its run directory and store under ``workdir``."""

    def __init__(self, workdir: str, collector_url: str, *extra_args: str,
                 env: Optional[Dict[str, str]] = None, wait_ready: bool = True) -> None:
        self.workdir = workdir
        self.run_dir = os.path.join(workdir, "run")
        self.store = os.path.join(workdir, "events.db")
        self.args = ["--run-dir", self.run_dir, "--store", self.store,
                     "--collector", collector_url, *extra_args]
        self.ingest = f"ipc://{os.path.abspath(self.run_dir)}/ingest.sock"
        self.env = env
        self.start(wait_ready)

    def start(self, wait_ready: bool = True) -> None:
        self._spawn(_cli() + ["start", *self.args], os.path.join(self.workdir, "pipeline.log"),
                    self.env)
        if wait_ready:
            self.wait_ready()

    def wait_ready(self, timeout: float = 30.0) -> None:
        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"sp-pipeline start exited {self.proc.returncode}:\n{self.log()}")
            # The children.json of a previous (killed) supervisor does not count.
            if self._state().get("supervisor_pid") != self.proc.pid:
                return False
            return all(c.get("state") == "running" for c in self.children() or [{}])
        wait_until(ready, timeout, "every pipeline process to run")

    def __enter__(self) -> "Pipeline":
        return self

    def _state(self) -> dict:
        try:
            with open(os.path.join(self.run_dir, "children.json")) as fh:
                return json.load(fh)
        except (OSError, ValueError):
            return {}

    def children(self) -> List[dict]:
        return self._state().get("children", [])

    def pids(self, role: str) -> List[int]:
        return [c["pid"] for c in self.children() if c["role"] == role and c["pid"]]

    def supervisor_pid(self) -> Optional[int]:
        return read_pid(os.path.join(self.run_dir, "sp-pipeline.pid"))

    def cli(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
        """Run another ``sp-pipeline`` subcommand against this pipeline."""
        return subprocess.run(_cli() + list(args) + ["--run-dir", self.run_dir,
                                                     "--store", self.store],
                              capture_output=True, text=True, timeout=timeout)


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as fh:
            return fh.read() or None
    except OSError:
        return None
