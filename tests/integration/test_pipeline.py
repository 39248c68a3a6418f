"""The whole service as an operator runs it: ``sp-pipeline start`` (supervisor, writer,
senders, exporter as real processes) delivering to ``sp-pipeline collector`` on
127.0.0.1, driven through ``sp_pipeline.testing``.

Promises pinned here: exactly-once delivery when nothing fails; a graceful stop loses
nothing; killed children are restarted and nothing is lost (at-least-once); bad
configuration and unusable stores fail fast with a clear message and the documented
exit code; one supervisor per run directory; ``status`` and ``stop`` work.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from typing import Dict, Iterable, List

import pytest

from sp_pipeline import Client, exitcodes
from sp_pipeline.events import StructuredEvent
from sp_pipeline.exporter import SupervisorCollector
from sp_pipeline.store import open_readonly
from sp_pipeline.testing import LocalCollector, Pipeline, wait_until


pytestmark = pytest.mark.integration

# A free metrics port per pipeline (tests and other suites run side by side), and
# timeouts short enough that a killed sender's lease expires within the test.
FAST = ("--metrics-addr", "127.0.0.1:0", "--connect-timeout", "1", "--read-timeout", "2",
        "--lease-seconds", "4", "--drain-timeout", "8")


def track(client: Client, n: int, tag: str) -> List[str]:
    return [client.track(StructuredEvent("pipeline", tag, value=i)) for i in range(n)]


def missing(expected: Iterable[str], delivered: Dict[str, int]) -> List[str]:
    return [e for e in expected if not delivered.get(e)]


def cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sp_pipeline.cli", *args],
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def child(pipeline: Pipeline, role: str, index: int = 0) -> dict:
    for c in pipeline.children():
        if c["role"] == role and c["index"] == index:
            return c
    return {}


# --------------------------------------------------------------------------- delivery


def test_delivers_exactly_once_and_status_and_stop_agree(short_dir):
    with LocalCollector(short_dir) as collector, \
            Pipeline(short_dir, collector.url, *FAST) as pipeline:
        assert stat.S_IMODE(os.stat(pipeline.run_dir).st_mode) == 0o700
        with Client(pipeline.ingest, namespace="once") as client:
            eids = track(client, 2000, "once")
            client.flush(15)
        collector.wait_for(2000, timeout=30)
        delivered = collector.eids()
        assert set(delivered) == set(eids)
        assert set(delivered.values()) == {1}
        assert collector.counts()["bad"] == 0

        def settled() -> dict:
            out = pipeline.cli("status", "--json")
            info = json.loads(out.stdout)
            return info if info.get("queued") == 0 and info.get("leased") == 0 else {}

        info = wait_until(settled, 10, "status to show an empty queue")
        assert info["running"] is True and info["source"] == "writer"
        assert info["delivered_total"] == 2000 and info["ingested_total"] == 2000
        assert info["dead_letters"] == 0
        assert {p["role"] for p in info["processes"]} == {"writer", "sender", "exporter"}

        stopped = pipeline.cli("stop")
        assert stopped.returncode == 0, stopped.stderr
        assert pipeline.proc.wait(15) == exitcodes.OK
        assert pipeline.supervisor_pid() is None
        after = pipeline.cli("status", "--json")
        assert after.returncode != 0 and '"running": false' in after.stdout
        assert '"source": "store"' in after.stdout and '"queued": 0' in after.stdout


def test_sigterm_with_events_in_flight_drains_and_loses_nothing(short_dir):
    with LocalCollector(short_dir, "--delay-ms", "100") as collector, \
            Pipeline(short_dir, collector.url, *FAST, "--batch-max-events", "25",
                     "--inflight", "2") as pipeline:
        with Client(pipeline.ingest, namespace="drain") as client:
            eids = track(client, 1500, "drain")
            client.flush(15)
        wait_until(lambda: collector.counts()["good"] >= 100, 15, "delivery to start")
        assert pipeline.stop() == exitcodes.OK  # SIGTERM while most are queued or in flight
        delivered_before = collector.eids()
        assert len(delivered_before) < len(eids), "all delivered before the stop: no test"
        st = open_readonly(pipeline.store).stats(time.time())
        assert st.leased == 0  # senders reported what they had in hand
        assert st.dead_letters == 0
        undelivered = [e for e in eids if e not in delivered_before]
        assert st.queued == len(undelivered)  # nothing lost, nothing left twice
        assert set(delivered_before.values()) == {1}

        collector.set_faults(delay_ms=0)
        pipeline.start()
        wait_until(lambda: not missing(eids, collector.eids()), 30,
                   "every flushed event delivered after the restart")
        delivered = collector.eids()
        assert set(delivered) == set(eids)
        assert sum(n - 1 for n in delivered.values()) == 0  # a clean stop sends nothing twice


def test_killed_sender_and_writer_are_restarted_and_nothing_is_lost(short_dir):
    # Paced delivery (2 senders x 1 request of 50 events per 150 ms: ~650 events/s) so
    # both kills land while events are still being delivered.
    with LocalCollector(short_dir, "--delay-ms", "150") as collector, \
            Pipeline(short_dir, collector.url, *FAST, "--batch-max-events", "50",
                     "--inflight", "1") as pipeline:
        with Client(pipeline.ingest, namespace="kill", resend_after=0.5) as client:
            eids = track(client, 3000, "before")
            client.flush(15)
            wait_until(lambda: collector.counts()["good"] >= 300, 15, "delivery to start")

            for c in pipeline.children():  # ps tells the roles apart
                with open(f"/proc/{c['pid']}/cmdline", "rb") as fh:
                    argv = fh.read().split(b"\0")
                assert [c["role"].encode(), b"--index", str(c["index"]).encode()] == \
                    argv[argv.index(b"sp_pipeline.role") + 1:][:3], argv

            sender = child(pipeline, "sender", 0)
            killed = time.monotonic()
            os.kill(sender["pid"], signal.SIGKILL)
            wait_until(lambda: child(pipeline, "sender", 0)["pid"] not in (None, sender["pid"]),
                       15, "sender-0 respawned")
            respawned = time.monotonic() - killed
            assert respawned < 1.0, f"sender-0 respawned {respawned:.2f} s after its death"
            wait_until(lambda: child(pipeline, "sender", 0)["state"] == "running", 15,
                       "sender-0 running again")
            assert child(pipeline, "sender", 0)["restarts"] == 1
            assert child(pipeline, "sender", 0)["last_exit"] == -signal.SIGKILL

            good = collector.counts()["good"]
            wait_until(lambda: collector.counts()["good"] >= good + 200, 15, "more deliveries")
            assert collector.counts()["good"] < 2500, "delivered before the writer kill: no test"
            writer = child(pipeline, "writer")
            os.kill(writer["pid"], signal.SIGKILL)
            eids += track(client, 500, "during")  # tracked while the writer is down
            wait_until(lambda: (c := child(pipeline, "writer"))["pid"] not in (None, writer["pid"])
                       and c["state"] == "running", 15, "the writer restarted")
            assert child(pipeline, "writer")["restarts"] == 1
            client.flush(15)

        wait_until(lambda: not missing(eids, collector.eids()), 40,
                   "every flushed event delivered")
        delivered = collector.eids()
        assert set(delivered) == set(eids)
        duplicates = sum(n - 1 for n in delivered.values())
        # At-least-once: only batches in flight at a kill may come twice.
        assert duplicates <= 1000, f"{duplicates} duplicates"
        # What the exporter serves (tests/integration/test_metrics.py scrapes it).
        restarts = {s.labels["role"]: s.value
                    for family in SupervisorCollector(pipeline.run_dir).collect()
                    for s in family.samples if s.name == "sp_pipeline_process_restarts_total"}
        assert {role: n for role, n in restarts.items() if n} == {"sender": 1.0, "writer": 1.0}
        assert pipeline.stop() == exitcodes.OK


def test_a_child_that_does_not_stop_is_killed_at_the_drain_deadline(short_dir):
    drain_timeout = 3.0
    with LocalCollector(short_dir) as collector, \
            Pipeline(short_dir, collector.url, *FAST, "--drain-timeout", str(drain_timeout)) as pipeline:
        stuck = child(pipeline, "sender", 1)["pid"]
        os.kill(stuck, signal.SIGSTOP)  # deaf to SIGTERM from now on
        started = time.monotonic()
        code = pipeline.stop(timeout=drain_timeout + 10)
        took = time.monotonic() - started
        log = pipeline.log()
    assert code == exitcodes.OK, log
    assert drain_timeout * 0.5 <= took < drain_timeout + 2, f"stopped after {took:.1f} s"
    assert f"sender-1[{stuck}] did not stop in time: killing it" in log
    with pytest.raises(ProcessLookupError):
        os.kill(stuck, 0)


def test_json_log_lines_carry_role_and_pid_of_every_process(short_dir):
    with LocalCollector(short_dir) as collector, \
            Pipeline(short_dir, collector.url, *FAST, "--log-format", "json") as pipeline:
        pids = {(c["role"] if c["role"] != "sender" else f"sender-{c['index']}", c["pid"])
                for c in pipeline.children()}
        supervisor = pipeline.proc.pid
        assert pipeline.stop() == exitcodes.OK
        lines = [line for line in pipeline.log().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"ts", "level", "role", "pid", "logger", "msg"} <= r.keys() for r in records)
    seen = {(r["role"], r["pid"]) for r in records}
    assert ("supervisor", supervisor) in seen
    assert pids <= seen, f"roles that logged nothing: {pids - seen}"


# --------------------------------------------------------------------------- refusals


def _start(short_dir: str, *args: str, timeout: float = 20.0) -> subprocess.CompletedProcess:
    return cli("start", "--run-dir", os.path.join(short_dir, "run"),
               "--store", os.path.join(short_dir, "events.db"),
               "--collector", "http://127.0.0.1:9", "--metrics-addr", "127.0.0.1:0", *args,
               timeout=timeout)


def test_zero_senders_is_a_config_error_naming_the_flag(short_dir):
    out = _start(short_dir, "--senders", "0")
    assert out.returncode == exitcodes.CONFIG_ERROR
    assert "senders" in out.stderr and "--senders" in out.stderr and "positive" in out.stderr
    assert not os.path.exists(os.path.join(short_dir, "run"))  # nothing started


def test_malformed_toml_is_a_config_error_naming_the_file(short_dir):
    path = os.path.join(short_dir, "bad.toml")
    with open(path, "w") as fh:
        fh.write("senders = [1,\n")
    out = _start(short_dir, "--config", path)
    assert out.returncode == exitcodes.CONFIG_ERROR
    assert path in out.stderr and "TOML" in out.stderr


def test_bad_value_in_toml_names_option_and_file(short_dir):
    path = os.path.join(short_dir, "bad.toml")
    with open(path, "w") as fh:
        fh.write('when_full = "explode"\n')
    out = _start(short_dir, "--config", path)
    assert out.returncode == exitcodes.CONFIG_ERROR
    assert "when_full" in out.stderr and path in out.stderr


def test_unusable_store_path_exits_74_fast_without_a_restart_loop(short_dir):
    blocker = os.path.join(short_dir, "not-a-dir")
    with open(blocker, "w") as fh:
        fh.write("a regular file where a directory should be\n")
    store = os.path.join(blocker, "events.db")
    started = time.monotonic()
    out = cli("start", "--run-dir", os.path.join(short_dir, "run"), "--store", store,
              "--collector", "http://127.0.0.1:9", "--metrics-addr", "127.0.0.1:0", timeout=20)
    elapsed = time.monotonic() - started
    assert out.returncode == exitcodes.STORE_ERROR, out.stderr
    assert store in out.stderr
    assert elapsed < 5, f"took {elapsed:.1f} s"
    assert not os.path.exists(os.path.join(short_dir, "run", "children.json"))


def test_a_role_that_cannot_boot_stops_the_service_without_a_restart_loop(short_dir):
    # The metrics port is taken: the exporter cannot start. The supervisor must give up
    # with the boot-error code and say why, not restart the exporter in a loop.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        addr = "%s:%d" % taken.getsockname()
        started = time.monotonic()
        out = cli("start", "--run-dir", os.path.join(short_dir, "run"),
                  "--store", os.path.join(short_dir, "events.db"),
                  "--collector", "http://127.0.0.1:9", "--metrics-addr", addr, timeout=30)
    assert out.returncode == exitcodes.BOOT_ERROR, out.stderr
    assert addr in out.stderr and "giving up: exporter" in out.stderr
    assert out.stderr.count("cannot listen on") == 1  # started once, not in a loop
    assert time.monotonic() - started < 15
    with open(os.path.join(short_dir, "run", "children.json")) as fh:
        pids = [c["pid"] for c in json.load(fh)["children"] if c.get("pid")]
    for pid in pids:  # every child was stopped with the service
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_foreign_store_file_exits_74_and_stays_untouched(short_dir):
    store = os.path.join(short_dir, "events.db")
    with open(store, "w") as fh:
        fh.write("somebody else's file\n")
    started = time.monotonic()
    out = _start(short_dir)
    assert out.returncode == exitcodes.STORE_ERROR, out.stderr
    assert store in out.stderr
    assert time.monotonic() - started < 5
    with open(store) as fh:
        assert fh.read() == "somebody else's file\n"


def test_damaged_store_exits_74_for_start_and_status_and_stays_untouched(short_dir):
    from sp_pipeline.store import SQLiteStore

    store = os.path.join(short_dir, "events.db")
    with SQLiteStore(store) as s:
        s.enqueue([b'{"e":"pv","n":%d}' % i for i in range(20_000)], 1.0)
        s.commit()
        s.checkpoint(truncate=True)
    with open(store, "r+b") as fh:  # scramble 20 pages past the schema: rows and index
        fh.seek(8192)
        scrambled = bytes((b * 7 + 13) & 0xFF for b in fh.read(20 * 4096))
        fh.seek(8192)
        fh.write(scrambled)
    with open(store, "rb") as fh:
        before = fh.read()
    for command in (_start(short_dir), cli("status", "--run-dir", os.path.join(short_dir, "run"),
                                            "--store", store)):
        assert command.returncode == exitcodes.STORE_ERROR, command.stderr
        assert "damaged" in command.stderr and store in command.stderr
        assert "Traceback" not in command.stderr
    with open(store, "rb") as fh:
        assert fh.read() == before


def test_second_start_on_the_same_run_dir_refuses_with_4(short_dir):
    with LocalCollector(short_dir) as collector, \
            Pipeline(short_dir, collector.url, *FAST) as pipeline:
        out = cli("start", *pipeline.args, *FAST, timeout=20)
        assert out.returncode == exitcodes.ALREADY_RUNNING
        assert str(pipeline.supervisor_pid()) in out.stderr
        assert "another sp-pipeline" in out.stderr
        # The first one is unharmed and still delivers.
        assert pipeline.proc.poll() is None
        with Client(pipeline.ingest, namespace="second") as client:
            eids = track(client, 50, "second")
            client.flush(10)
        wait_until(lambda: not missing(eids, collector.eids()), 15, "delivery")
        assert pipeline.stop() == exitcodes.OK


def test_second_start_leaves_the_running_pipelines_metrics_alone(short_dir):
    with LocalCollector(short_dir) as collector, \
            Pipeline(short_dir, collector.url, *FAST) as pipeline:
        metrics_dir = os.path.join(pipeline.run_dir, "metrics")
        wait_until(lambda: len(os.listdir(metrics_dir)) >= 4, 10, "metrics files")
        before = set(os.listdir(metrics_dir))
        out = cli("start", *pipeline.args, *FAST, timeout=20)
        assert out.returncode == exitcodes.ALREADY_RUNNING
        assert before <= set(os.listdir(metrics_dir))
