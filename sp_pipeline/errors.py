"""Every exception sp-pipeline raises, under one root.

Messages name the field and the rule that was broken, so that the person reading a
traceback knows what to change without opening our source.
"""

from __future__ import annotations


class SpPipelineError(Exception):
    """Root of every sp-pipeline error."""


class ValidationError(SpPipelineError, ValueError):
    """An event, subject, context or setting broke a rule.

    ``field`` names the offending field (dotted for nested values, e.g.
    ``contexts[1].schema``) and ``rule`` says what it had to satisfy.
    """

    def __init__(self, field: str, rule: str) -> None:
        self.field = field
        self.rule = rule
        super().__init__(f"{field}: {rule}")


class ConfigError(SpPipelineError, ValueError):
    """A configuration option (flag, environment variable or file) is invalid."""


class BufferFull(SpPipelineError):
    """``Client.track()`` could not queue the event: the writer is not taking frames
    and the client's bounded buffer is full. The event was not accepted."""


class FlushTimeout(SpPipelineError, TimeoutError):
    """``Client.flush()`` ran out of time before the writer confirmed every event."""

    def __init__(self, pending_events: int, timeout: float) -> None:
        self.pending_events = pending_events
        self.timeout = timeout
        super().__init__(
            f"{pending_events} event(s) not yet confirmed as committed by the writer "
            f"after {timeout:g} s"
        )


class EventsRejected(SpPipelineError):
    """The writer refused frames this client sent (``rejections``: frame seq -> reason,
    e.g. ``size`` when the writer's ``max_event_bytes`` is below the client's). Raised
    by ``Client.flush()``; the events of those frames were not stored."""

    def __init__(self, rejections: dict[int, str]) -> None:
        self.rejections = dict(rejections)
        reasons = sorted(set(self.rejections.values()))
        super().__init__(
            f"the writer rejected {len(self.rejections)} frame(s): {', '.join(reasons)}"
        )


class ClientClosed(SpPipelineError):
    """The client was used after ``close()``."""


class FrameError(SpPipelineError, ValueError):
    """A producer or lease frame could not be decoded. ``reason`` is a short,
    stable label used for metrics (``decode``, ``version``, ``type``, ``size``...)."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        super().__init__(f"{reason}: {detail}")


class StoreError(SpPipelineError):
    """The SQLite store cannot be used (cannot open, not ours, full, corrupt)."""


class StoreNotOurs(StoreError):
    """The database file exists but was not created by sp-pipeline; it is left untouched."""


class StoreFull(StoreError):
    """The disk or the configured cap does not leave room for more events."""
