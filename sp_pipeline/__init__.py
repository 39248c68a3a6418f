"""sp-pipeline: durable, fast delivery of Snowplow analytics events."""

__version__ = "0.1.0"
