"""Entry point of a supervised child: ``python -m sp_pipeline.role ROLE --index N --settings F``.

The supervisor starts every role as a fresh interpreter through this module, so the
command line (``ps``) names the role, and the child builds its own sockets, database
connection and HTTP pool after it starts. ``PROMETHEUS_MULTIPROC_DIR`` is already in the
environment, so metrics record into the shared directory.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import sys

from . import exitcodes, logs
from .config import Settings
from .errors import ConfigError

ROLES = ("writer", "sender", "exporter")


_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Ask Linux to send SIGTERM when the supervisor dies (even by SIGKILL), so no role
    outlives it; a second supervisor must never find an old writer on the store."""
    try:
        # The process's own symbols hold libc's prctl; ctypes.util.find_library would
        # load subprocess, shutil and tempfile (~2 MB in every role) to find it.
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return  # not Linux: the writer's store lock still prevents two writers
    if os.getppid() != parent_pid:  # the supervisor died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sp_pipeline.role")
    parser.add_argument("role", choices=ROLES)
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--settings", required=True, help="settings JSON written by the supervisor")
    args = parser.parse_args(argv)
    supervisor = os.environ.get("SP_PIPELINE_SUPERVISOR_PID", "")
    if supervisor.isdigit():
        die_with_parent(int(supervisor))
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
