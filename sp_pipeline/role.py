"""Entry point of a supervised child: ``python -m sp_pipeline.role ROLE --index N --settings F``.

The supervisor starts every role as a fresh interpreter through this module, so the
command line (``ps``) names the role, and the child builds its own sockets, database
connection and HTTP pool after it starts. ``PROMETHEUS_MULTIPROC_DIR`` is already in the
environment, so metrics record into the shared directory.
"""

from __future__ import annotations

import argparse
import logging
import sys

from . import exitcodes, logs
from .config import Settings
from .errors import ConfigError

ROLES = ("writer", "sender", "exporter")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sp_pipeline.role")
    parser.add_argument("role", choices=ROLES)
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--settings", required=True, help="settings JSON written by the supervisor")
    args = parser.parse_args(argv)
    try:
        with open(args.settings) as fh:
            settings = Settings.from_json(fh.read())
    except (OSError, ValueError, TypeError, ConfigError) as exc:
        print(f"{args.role}: cannot read settings {args.settings}: {exc}", file=sys.stderr)
        return exitcodes.CONFIG_ERROR
    name = args.role if args.role != "sender" else f"sender-{args.index}"
    logs.setup(name, settings.log_format, settings.log_level)
    if args.role == "writer":
        from . import writer
        return writer.run(settings)
    if args.role == "sender":
        from . import sender
        return sender.run(settings, args.index)
    from . import exporter
    return exporter.run(settings)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(exitcodes.OK)
    except Exception:
        logging.getLogger("sp_pipeline").exception("unexpected failure")
        sys.exit(exitcodes.ERROR)
