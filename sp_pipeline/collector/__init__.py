"""``sp-pipeline collector``: a local development collector in the spirit of Snowplow
Micro. It accepts tracker-protocol requests, validates every event against the bundled
Iglu schemas, keeps good and bad events in memory for inspection over a small JSON API,
and can misbehave on purpose (fixed status, failure rate, delay, resets, 413) so that
senders can be tested against a bad collector. See ``docs/collector.md``.

Entry points: ``run()`` (foreground process), ``Collector`` (in-process, for tests),
``add_arguments()``/``main()`` (for ``cli.py``).

Exit codes of ``run``/``main`` (``sp_pipeline.exitcodes``): ``OK`` stopped by SIGTERM
or SIGINT, ``BOOT_ERROR`` could not bind the port, ``CONFIG_ERROR`` invalid options.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from typing import TYPE_CHECKING, Any, Optional

from .. import exitcodes, logs
from ..errors import ConfigError, ValidationError

if TYPE_CHECKING:
    from .faults import Faults
    from .server import Collector, Limits

# The server (asyncio, the schemas) loads on first use, so that
# ``sp-pipeline start``, whose parser lists this command's flags, does not carry it.
_LAZY = {"Collector": "server", "Limits": "server", "Faults": "faults"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Collector", "Faults", "Limits", "run", "add_arguments", "main"]

log = logging.getLogger(__name__)

#: Seconds between two "counts" log lines of a running collector.
LOG_EVERY_S = 60.0


def run(host: str = "127.0.0.1", port: int = 9095, *, faults: Optional[Faults] = None,
        allow_remote: bool = False, ready_file: Optional[str] = None,
        limits: Optional[Limits] = None) -> int:
    """Serve in the foreground until SIGTERM or SIGINT; return the exit code.

    Prints ``listening on http://HOST:PORT`` once bound (port 0 picks a free port) and,
    when ``ready_file`` is given, writes that URL to it atomically. Logs the counts once
    a minute. Must be called from the main thread (it installs signal handlers).
    """
    from .server import Collector

    try:
        collector = Collector(host, port, faults=faults, limits=limits,
                              allow_remote=allow_remote)
        collector.start()
    except (ConfigError, ValidationError) as exc:
        log.error("collector: %s", exc)
        return exitcodes.CONFIG_ERROR
    except OSError as exc:
        log.error("collector: cannot listen on %s:%s: %s", host, port, exc)
        return exitcodes.BOOT_ERROR
    stop = threading.Event()
    # Handlers only record the request; the loop below acts on it.
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        print(f"listening on {collector.url}", flush=True)
        if ready_file:
            _write_atomically(ready_file, collector.url + "\n")
        while not stop.wait(LOG_EVERY_S):
            log.info("collector counts: %s", collector.counts())
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        collector.stop()
    log.info("collector stopped; counts: %s", collector.counts())
    return exitcodes.OK


def _write_atomically(path: str, text: str) -> None:
    """Write then rename, so a reader polling for ``path`` never sees half a URL."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``sp-pipeline collector`` flags to ``parser``."""
    parser.add_argument("--host", default="127.0.0.1", help="bind address (loopback unless --allow-remote)")
    parser.add_argument("--port", type=int, default=9095, help="port (0 picks a free one)")
    parser.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --host")
    parser.add_argument("--ready-file", metavar="PATH", help="write the URL here once listening")
    parser.add_argument("--status", type=int, metavar="CODE", help="answer every request with CODE")
    parser.add_argument("--fail-rate", type=float, default=0.0, metavar="FRACTION",
                        help="fraction (0..1) of requests answered --fail-status")
    parser.add_argument("--fail-status", type=int, default=503, metavar="CODE",
                        help="status of the --fail-rate failures (default 503)")
    parser.add_argument("--delay-ms", type=float, default=0.0, metavar="MS",
                        help="delay added to every collection answer")
    parser.add_argument("--retry-after", metavar="VALUE", help="Retry-After sent with failures")
    parser.add_argument("--reset-rate", type=float, default=0.0, metavar="FRACTION",
                        help="fraction (0..1) of connections reset without an answer")
    parser.add_argument("--max-body-bytes", type=int, metavar="BYTES",
                        help="answer 413 to larger request bodies")
    parser.add_argument("--seed", type=int, help="seed of the --fail-rate/--reset-rate draws")
    parser.add_argument("--good-cap", type=int, default=None,
                        help="good events kept in memory, oldest evicted (default 20,000)")
    parser.add_argument("--bad-cap", type=int, default=None,
                        help="bad events kept in memory, oldest evicted (default 10,000)")


def main(args: argparse.Namespace) -> int:
    """Run the collector from parsed ``add_arguments`` flags; the exit code."""
    from .faults import Faults

    logs.setup("collector")
    try:
        faults = Faults(status=args.status, fail_rate=args.fail_rate,
                        fail_status=args.fail_status, delay_ms=args.delay_ms,
                        retry_after=args.retry_after, reset_rate=args.reset_rate,
                        max_body_bytes=args.max_body_bytes, seed=args.seed)
        limits = _limits(args)
    except ValidationError as exc:
        log.error("collector: --%s", str(exc).replace("_", "-"))
        return exitcodes.CONFIG_ERROR
    return run(args.host, args.port, faults=faults, allow_remote=args.allow_remote,
               ready_file=args.ready_file, limits=limits)


def _limits(args: Any) -> "Limits":
    from .server import Limits

    caps = {}
    for name in ("good_cap", "bad_cap"):
        value = getattr(args, name)
        if value is not None:
            if value < 0:
                raise ValidationError(name, "must be >= 0")
            caps[name] = value
    return Limits(**caps)
