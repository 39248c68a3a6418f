"""``/health`` as the exporter decides it: from the supervisor's children.json."""

from __future__ import annotations

import json

from sp_pipeline.exporter import health


def write_children(run_dir, states):
    children = [{"role": role, "index": i, "pid": 100 + i if state != "stopped" else None,
                 "state": state, "restarts": 0}
                for i, (role, state) in enumerate(states)]
    (run_dir / "children.json").write_text(json.dumps({"supervisor_pid": 1, "children": children}))


def test_healthy_with_the_writer_and_one_sender_running(tmp_path):
    write_children(tmp_path, [("writer", "running"), ("sender", "running"), ("sender", "backoff")])
    ok, detail = health(str(tmp_path))
    assert ok and detail == {"writer": 1, "senders": 1}


def test_unhealthy_when_the_writer_is_down(tmp_path):
    write_children(tmp_path, [("writer", "backoff"), ("sender", "running")])
    ok, detail = health(str(tmp_path))
    assert not ok and detail["writer"] == 0 and "reason" in detail


def test_unhealthy_when_every_sender_is_down(tmp_path):
    write_children(tmp_path, [("writer", "running"), ("sender", "stopped"), ("sender", "fatal")])
    ok, detail = health(str(tmp_path))
    assert not ok and detail["senders"] == 0


def test_unhealthy_without_supervisor_state(tmp_path):
    ok, detail = health(str(tmp_path))
    assert not ok and detail["reason"] == "no supervisor state"
