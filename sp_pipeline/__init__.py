"""sp-pipeline: durable, fast delivery of Snowplow analytics events.

``Client`` pushes validated events to the pipeline's writer over ZeroMQ; ``Subject``
and ``SelfDescribingJson`` describe who did it and attached entities. Event types are
in ``sp_pipeline.events``.

The names are imported on first use, so a role process that needs none of them (the
exporter, the supervisor) does not load ZeroMQ and the event code for nothing.
"""

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["Client", "Subject", "SelfDescribingJson", "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from .client import Client
    from .events import SelfDescribingJson, Subject


def __getattr__(name: str) -> Any:
    if name == "Client":
        from .client import Client

        return Client
    if name in ("Subject", "SelfDescribingJson"):
        from . import events

        return getattr(events, name)
    raise AttributeError(f"module 'sp_pipeline' has no attribute {name!r}")
