"""Life of a supervised child, as an explicit state machine.

::

    STARTING --(alive past boot_seconds)--> RUNNING --(exit)--> BACKOFF --(delay)--> STARTING
        |                                      |                   ^
        +--(exit, boot failure)----------------+-------------------+
        +--(exit code in NO_RESTART, or too many boot failures)--> FATAL
    any --(stop requested)--> STOPPING --(exit)--> STOPPED

A boot failure is an exit within ``boot_seconds`` of starting. ``max_boot_failures``
boot failures in a row make the role FATAL: the supervisor then stops the service
with a clear message instead of looping.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class State(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FATAL = "fatal"


ALLOWED = {
    State.STARTING: {State.RUNNING, State.BACKOFF, State.STOPPING, State.FATAL},
    State.RUNNING: {State.BACKOFF, State.STOPPING, State.FATAL},
    State.BACKOFF: {State.STARTING, State.STOPPED, State.STOPPING},
    State.STOPPING: {State.STOPPED},
    State.STOPPED: set(),
    State.FATAL: {State.STOPPING, State.STOPPED},
}


class TransitionError(RuntimeError):
    pass


def check(old: State, new: State) -> None:
    if new not in ALLOWED[old]:
        raise TransitionError(f"{old.value} -> {new.value} is not allowed")


@dataclass(frozen=True)
class RestartPolicy:
    """Restart timing. A child that stayed up ``stable_seconds`` resets its backoff."""

    boot_seconds: float = 1.0
    max_boot_failures: int = 5
    first_delay: float = 0.1
    max_delay: float = 5.0
    stable_seconds: float = 10.0

    def delay(self, consecutive_failures: int) -> float:
        """Delay before restart number ``consecutive_failures`` (1-based)."""
        if consecutive_failures <= 1:
            return self.first_delay
        return min(self.max_delay, self.first_delay * 2 ** (consecutive_failures - 1))
