"""The supervised child's state machine (``supervisor.process.Child`` and ``states``),
driven by an injected clock and a fake spawner: no processes."""

from __future__ import annotations

import signal
from typing import List, Optional

import pytest

from sp_pipeline import exitcodes
from sp_pipeline.supervisor.process import Child
from sp_pipeline.supervisor.states import ALLOWED, RestartPolicy, State, TransitionError, check

POLICY = RestartPolicy(boot_seconds=1.0, max_boot_failures=3, first_delay=0.1, max_delay=1.0,
                       stable_seconds=10.0)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeProc:
    """What Child needs of a Popen: ``pid``, ``poll()``, ``send_signal()``."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: Optional[int] = None
        self.signals: List[int] = []

    def poll(self) -> Optional[int]:
        return self.returncode

    def send_signal(self, signum: int) -> None:
        self.signals.append(signum)

    def exit(self, code: int) -> None:
        self.returncode = code


class Spawner:
    def __init__(self) -> None:
        self.procs: List[FakeProc] = []

    def __call__(self, command, **kwargs) -> FakeProc:
        proc = FakeProc(100 + len(self.procs))
        self.procs.append(proc)
        return proc

    @property
    def last(self) -> FakeProc:
        return self.procs[-1]


def make_child(policy: RestartPolicy = POLICY):
    clock, spawner = Clock(), Spawner()
    child = Child(role="writer", index=0, command=["x"], env={}, policy=policy, clock=clock,
                  spawn=spawner)
    return child, clock, spawner


def test_starts_then_runs_after_boot_seconds():
    child, clock, spawner = make_child()
    child.start()
    assert child.state is State.STARTING and child.pid == 100
    clock.advance(0.5)
    assert child.poll() is None and child.state is State.STARTING
    clock.advance(0.5)
    assert child.poll() is None and child.state is State.RUNNING
    assert child.running()


def test_crash_after_boot_backs_off_then_restarts_with_a_new_process():
    child, clock, spawner = make_child()
    child.start()
    clock.advance(2)
    child.poll()
    spawner.last.exit(exitcodes.ERROR)
    assert child.poll() == exitcodes.ERROR
    assert child.state is State.BACKOFF and child.boot_failures == 0 and child.failures == 1
    assert not child.due()
    clock.advance(POLICY.first_delay)
    assert child.due()
    child.restart()
    assert child.state is State.STARTING and child.pid == 101 and child.restarts == 1


def test_killed_by_signal_is_a_crash_not_fatal():
    child, clock, spawner = make_child()
    child.start()
    clock.advance(2)
    child.poll()
    spawner.last.exit(-signal.SIGKILL)
    assert child.poll() == -signal.SIGKILL
    assert child.state is State.BACKOFF and child.last_exit == -signal.SIGKILL


def test_boot_failures_are_counted_and_fatal_after_max():
    child, clock, spawner = make_child()
    child.start()
    for n in range(1, POLICY.max_boot_failures + 1):
        clock.advance(0.2)  # dies within boot_seconds
        spawner.last.exit(exitcodes.ERROR)
        child.poll()
        assert child.boot_failures == n
        if n < POLICY.max_boot_failures:
            assert child.state is State.BACKOFF
            clock.advance(5)
            assert child.due()
            child.restart()
    assert child.state is State.FATAL
    assert "failed to boot 3 times" in child.fatal_reason
    assert not child.due()
    with pytest.raises(TransitionError):
        child.restart()  # FATAL never starts again


def test_a_crash_after_boot_resets_the_boot_failure_count():
    child, clock, spawner = make_child()
    child.start()
    clock.advance(0.1)
    spawner.last.exit(exitcodes.ERROR)
    child.poll()
    assert child.boot_failures == 1
    clock.advance(1)
    child.restart()
    clock.advance(1.5)  # past boot_seconds
    child.poll()
    spawner.last.exit(exitcodes.ERROR)
    child.poll()
    assert child.boot_failures == 0 and child.state is State.BACKOFF


@pytest.mark.parametrize("code", sorted(exitcodes.NO_RESTART))
def test_no_restart_codes_are_fatal_at_once(code):
    child, clock, spawner = make_child()
    child.start()
    clock.advance(3)  # even long after boot
    child.poll()
    spawner.last.exit(code)
    assert child.poll() == code
    assert child.state is State.FATAL
    assert f"exit {code}" in child.fatal_reason and child.name in child.fatal_reason
    assert len(spawner.procs) == 1


def test_backoff_delays_grow_and_are_capped():
    assert [POLICY.delay(n) for n in range(1, 7)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    child, clock, spawner = make_child()
    child.start()
    waits = []
    for _ in range(5):
        clock.advance(2)  # a crash after boot, never stable
        child.poll()
        spawner.last.exit(exitcodes.ERROR)
        crashed_at = clock.now
        child.poll()
        waits.append(round(child.restart_at - crashed_at, 6))
        clock.advance(child.restart_at - clock.now)
        assert child.due()
        child.restart()
    assert waits == [0.1, 0.2, 0.4, 0.8, 1.0]


def test_staying_up_stable_seconds_resets_the_backoff():
    child, clock, spawner = make_child()
    child.start()
    for _ in range(3):
        clock.advance(2)
        child.poll()
        spawner.last.exit(exitcodes.ERROR)
        child.poll()
        clock.advance(5)
        child.restart()
    assert child.failures == 3
    clock.advance(POLICY.stable_seconds)
    child.poll()
    assert child.state is State.RUNNING and child.failures == 0
    spawner.last.exit(exitcodes.ERROR)
    crashed_at = clock.now
    child.poll()
    assert child.restart_at - crashed_at == pytest.approx(POLICY.first_delay)


def test_stop_sends_sigterm_and_an_exit_then_is_stopped_not_restarted():
    child, clock, spawner = make_child()
    child.start()
    clock.advance(2)
    child.poll()
    child.stop()
    assert child.state is State.STOPPING and spawner.last.signals == [signal.SIGTERM]
    child.stop()  # idempotent: no second signal
    assert spawner.last.signals == [signal.SIGTERM]
    spawner.last.exit(exitcodes.ERROR)  # whatever the code while stopping
    child.poll()
    assert child.state is State.STOPPED and not child.due()
    assert len(spawner.procs) == 1


def test_stop_in_backoff_stays_down():
    child, clock, spawner = make_child()
    child.start()
    clock.advance(2)
    spawner.last.exit(exitcodes.ERROR)
    child.poll()
    assert child.state is State.BACKOFF
    child.stop()
    assert child.state is State.STOPPED
    clock.advance(100)
    assert not child.due()


def test_kill_sends_sigkill():
    child, clock, spawner = make_child()
    child.start()
    child.kill()
    assert spawner.last.signals == [signal.SIGKILL]


def test_history_records_every_state():
    child, clock, spawner = make_child()
    child.start()
    clock.advance(1)
    child.poll()
    spawner.last.exit(1)
    child.poll()
    clock.advance(1)
    child.restart()
    assert child.history == ["starting", "running", "backoff", "starting"]


@pytest.mark.parametrize(
    "old, new",
    [(old, new) for old in State for new in State if new not in ALLOWED[old]],
)
def test_disallowed_transitions_raise(old, new):
    with pytest.raises(TransitionError, match=f"{old.value} -> {new.value}"):
        check(old, new)


def test_allowed_transitions_pass_and_terminal_states_have_no_way_back():
    for old, targets in ALLOWED.items():
        for new in targets:
            check(old, new)
    assert ALLOWED[State.STOPPED] == set()
    assert State.STARTING not in ALLOWED[State.FATAL]


def test_poll_without_a_process_is_none():
    child, clock, spawner = make_child()
    assert child.poll() is None and child.state is State.STOPPED
