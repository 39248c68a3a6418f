"""sp-pipeline: durable, fast delivery of Snowplow analytics events.

``Client`` pushes validated events to the pipeline's writer over ZeroMQ; ``Subject``
and ``SelfDescribingJson`` describe who did it and attached entities. Event types are
in ``sp_pipeline.events``.
"""

__version__ = "0.1.0"

from .client import Client  # noqa: E402
from .events import SelfDescribingJson, Subject  # noqa: E402

__all__ = ["Client", "Subject", "SelfDescribingJson", "__version__"]
