"""The supervisor's main loop: start every role, watch, restart, drain on SIGTERM.

Signal handlers only record the signal and wake the loop (a self-pipe); the loop acts.
The run directory (0700) holds the pidfile (locked with ``flock`` so a second ``start``
on it refuses), the settings file the children read, the children's state for
``/health`` and the prometheus multiprocess directory.

Stop order on SIGTERM/SIGINT: senders first (they finish or release their requests and
report to the writer), then the writer (commits what producers already sent), then the
exporter; anything still alive at ``drain_timeout`` is killed.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import select
import shutil
import signal
import time
from typing import Callable, Dict, List, Optional

from .. import exitcodes
from ..config import Settings
from .process import Child, child_command
from .states import RestartPolicy, State

log = logging.getLogger("sp_pipeline.supervisor")

STOP_ORDER = ("sender", "writer", "exporter")


class AlreadyRunning(Exception):
    pass


def prepare_run_dir(settings: Settings) -> None:
    """Create the run directory 0700 (and tighten it if it exists)."""
    run_dir = os.path.abspath(settings.run_dir)
    os.makedirs(run_dir, mode=0o700, exist_ok=True)
    os.chmod(run_dir, 0o700)


def reset_metrics_dir(settings: Settings) -> None:
    """A clean prometheus multiprocess directory; only once the pidfile is ours, so a
    refused second start never touches a running pipeline's files."""
    shutil.rmtree(settings.metrics_dir, ignore_errors=True)
    os.makedirs(settings.metrics_dir, mode=0o700)


def lock_pidfile(path: str) -> int:
    """Take the run directory's pidfile; raise AlreadyRunning if another supervisor has it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise AlreadyRunning(path) from None
        raise
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def read_pid(path: str) -> Optional[int]:
    """The pid of the running supervisor, or None when no supervisor holds the pidfile."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            text = os.read(fd, 64).decode().strip()
            return int(text) if text.isdigit() else None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None  # nobody holds it: stale file
    finally:
        os.close(fd)


class Arbiter:
    def __init__(self, settings: Settings, *, policy: RestartPolicy = RestartPolicy(),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.s = settings
        self.policy = policy
        self.clock = clock
        self.children: List[Child] = []
        self.signals: List[int] = []
        self.exit_code = exitcodes.OK
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)

    # ------------------------------------------------------------------ setup

    def _env(self) -> Dict[str, str]:
        env = dict(os.environ)
        env["PROMETHEUS_MULTIPROC_DIR"] = self.s.metrics_dir
        env["SP_PIPELINE_SUPERVISOR_PID"] = str(os.getpid())
        # glibc gives each thread that allocates its own arena (ZeroMQ I/O threads,
        # request threads); two are plenty here and keep RSS flat under load.
        env.setdefault("MALLOC_ARENA_MAX", "2")
        return env

    def _build_children(self, settings_path: str) -> None:
        env = self._env()
        roles = [("writer", 0)] + [("sender", i) for i in range(self.s.senders)] + [("exporter", 0)]
        for role, index in roles:
            self.children.append(Child(
                role=role, index=index, command=child_command(role, index, settings_path),
                env=env, policy=self.policy, clock=self.clock,
            ))

    def _record_signal(self, signum: int, frame) -> None:
        self.signals.append(signum)
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    # ------------------------------------------------------------------ loop

    def run(self) -> int:
        settings_path = os.path.join(os.path.abspath(self.s.run_dir), "settings.json")
        with open(settings_path, "w") as fh:
            fh.write(self.s.to_json())
        self._build_children(settings_path)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, self._record_signal)
        for child in self.children:
            child.start()
        log.info("started %s", ", ".join(f"{c.name}[{c.pid}]" for c in self.children))
        self._write_state()
        while True:
            self._wait(0.2)
            stop = any(s in (signal.SIGTERM, signal.SIGINT) for s in self.signals)
            self.signals.clear()
            if stop:
                log.info("stop requested: draining")
                return self.drain()
            if self._reap_and_restart():
                return self.drain(exit_code=self.exit_code)

    def _wait(self, timeout: float) -> None:
        try:
            ready, _, _ = select.select([self._wake_r], [], [], timeout)
        except InterruptedError:
            return
        if ready:
            try:
                os.read(self._wake_r, 4096)
            except BlockingIOError:
                pass

    def _reap_and_restart(self) -> bool:
        """Reap exits, restart due children. True when a role turned FATAL."""
        changed = False
        for child in self.children:
            pid, before = child.pid, child.state
            code = child.poll()
            changed = changed or child.state is not before
            if code is not None:
                changed = True
                _mark_dead(pid)
                log.warning("%s[%s] exited: %s", child.name, pid, exitcodes.describe(code))
                if child.state is State.FATAL:
                    log.error("giving up: %s; stopping the service", child.fatal_reason)
                    self.exit_code = child.last_exit if child.last_exit and child.last_exit > 0 \
                        else exitcodes.BOOT_ERROR
                    self._write_state()
                    return True
            if child.due():
                child.restart()
                log.info("restarted %s as pid %s (restart %d)", child.name, child.pid,
                         child.restarts)
                changed = True
        if changed:
            self._write_state()
        return False

    def drain(self, exit_code: int = exitcodes.OK) -> int:
        deadline = self.clock() + self.s.drain_timeout
        for role in STOP_ORDER:
            group = [c for c in self.children if c.role == role]
            for child in group:
                child.stop()
            # Senders and the writer share the budget; leave the writer a fair part.
            share = deadline if role != "sender" else self.clock() + self.s.drain_timeout * 0.6
            self._wait_exit(group, min(share, deadline))
        self._write_state()
        for child in self.children:
            _mark_dead(child.pid)
        return exit_code

    def _wait_exit(self, group: List[Child], deadline: float) -> None:
        while any(c.proc is not None for c in group):
            for c in group:
                pid = c.pid
                if c.poll() is not None:
                    _mark_dead(pid)
            if self.clock() >= deadline:
                for c in group:
                    if c.proc is not None:
                        log.error("%s[%s] did not stop in time: killing it", c.name, c.pid)
                        c.kill()
                        c.proc.wait()
                        c.proc = None
                        c.state = State.STOPPED
                return
            self._wait(0.02)

    def _write_state(self) -> None:
        # The exporter turns this file into sp_pipeline_process_up and
        # sp_pipeline_process_restarts_total at every scrape.
        state = {
            "supervisor_pid": os.getpid(),
            "children": [
                {"role": c.role, "index": c.index, "pid": c.pid, "state": c.state.value,
                 "restarts": c.restarts, "last_exit": c.last_exit}
                for c in self.children
            ],
        }
        path = os.path.join(os.path.abspath(self.s.run_dir), "children.json")
        tmp = path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(state, fh)
        os.replace(tmp, path)


def _mark_dead(pid: Optional[int]) -> None:
    """Forget a dead child's ``live*`` gauges, as prometheus_client's
    ``multiprocess.mark_process_dead`` does (their files are named
    ``gauge_live<mode>_<pid>.db``), without loading prometheus_client here."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR") if pid is not None else None
    if not directory:
        return
    try:
        names = os.listdir(directory)
    except OSError:
        return
    suffix = f"_{pid}.db"
    for name in names:
        if name.startswith("gauge_live") and name.endswith(suffix):
            try:
                os.unlink(os.path.join(directory, name))
            except OSError:  # metrics must never stop supervision
                pass


def start(settings: Settings, preflight: Optional[Callable[[Settings], int]] = None) -> int:
    """``sp-pipeline start``: run the service in the foreground; returns an exit code.

    Order matters: run directory, pidfile lock (a second start stops here), then
    ``preflight`` (checks that may open the store), then a fresh metrics directory."""
    try:
        prepare_run_dir(settings)
    except OSError as exc:
        log.error("cannot prepare run directory %s: %s", settings.run_dir, exc.strerror)
        return exitcodes.BOOT_ERROR
    try:
        fd = lock_pidfile(settings.pidfile)
    except AlreadyRunning:
        log.error("another sp-pipeline (pid %s) is running with run directory %s",
                  read_pid(settings.pidfile), settings.run_dir)
        return exitcodes.ALREADY_RUNNING
    try:
        code = preflight(settings) if preflight is not None else exitcodes.OK
        if code != exitcodes.OK:
            return code
        reset_metrics_dir(settings)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = settings.metrics_dir
        return Arbiter(settings).run()
    finally:
        try:
            os.unlink(settings.pidfile)
        except OSError:
            pass
        os.close(fd)
