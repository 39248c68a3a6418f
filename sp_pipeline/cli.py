"""The ``sp-pipeline`` command line.

Subcommands: ``start``, ``stop``, ``status``, ``check-config``, ``dead-letters``,
``collector``. The option flags come from ``config.OPTIONS`` (declared once); every
subcommand that reads settings accepts all of them and ``--config FILE``.

Nothing here imports prometheus-client before ``start`` has set the multiprocess
directory.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import List, Optional

from . import config, exitcodes
from .errors import ConfigError, StoreError


def _settings_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", default=os.environ.get("SP_PIPELINE_CONFIG"),
                        help="TOML file of options (env SP_PIPELINE_CONFIG)")
    config.add_arguments(common)
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _settings_parser()
    parser = argparse.ArgumentParser(prog="sp-pipeline", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("start", parents=[common], help="run the pipeline in the foreground")
    sub.add_parser("stop", parents=[common], help="stop a running pipeline gracefully")
    p = sub.add_parser("status", parents=[common], help="queue, leases, dead letters, rates")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    sub.add_parser("check-config", parents=[common], help="print the effective configuration")
    p = sub.add_parser("dead-letters", parents=[common], help="list, requeue or purge dead letters")
    p.add_argument("action", choices=("list", "requeue", "purge"))
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--ids", default="", help="comma-separated ids (default: all)")
    p.add_argument("--json", action="store_true")
    sub.add_parser("curve-keypair", help="print a new CURVE key pair (Z85) for tcp ingest")
    from .collector import add_arguments as collector_arguments
    p = sub.add_parser("collector", help="run a local development collector")
    collector_arguments(p)
    return parser


def _load(args: argparse.Namespace) -> config.Settings:
    return config.load(config.flags_from_namespace(args), config_file=args.config)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "curve-keypair":
        from .curve import keypair

        public, secret = keypair()
        print(f"public {public}\nsecret {secret}")
        return exitcodes.OK
    if args.command == "collector":
        from .collector import main as collector_main
        return collector_main(args)
    try:
        settings = _load(args)
    except ConfigError as exc:
        print(f"sp-pipeline: configuration error: {exc}", file=sys.stderr)
        return exitcodes.CONFIG_ERROR
    handler = {
        "start": cmd_start,
        "stop": cmd_stop,
        "status": cmd_status,
        "check-config": cmd_check_config,
        "dead-letters": cmd_dead_letters,
    }[args.command]
    try:
        return handler(settings, args)
    except StoreError as exc:  # a store that cannot be read: its message says why
        print(f"sp-pipeline: {exc}", file=sys.stderr)
        return exitcodes.STORE_ERROR


def cmd_start(settings: config.Settings, args: argparse.Namespace) -> int:
    from . import logs
    from .supervisor.arbiter import start

    logs.setup("supervisor", settings.log_format, settings.log_level)
    return start(settings, preflight=_preflight)


def _preflight(settings: config.Settings) -> int:
    """Fail fast, with a clear message, on a store the writer could not open."""
    from .store import open_store

    parent = os.path.dirname(os.path.abspath(settings.store))
    try:
        os.makedirs(parent, exist_ok=True)
        store = open_store(settings)
    except (StoreError, OSError) as exc:
        print(f"sp-pipeline: cannot use store {settings.store}: {exc}", file=sys.stderr)
        return exitcodes.STORE_ERROR
    store.close()
    return exitcodes.OK


def cmd_stop(settings: config.Settings, args: argparse.Namespace) -> int:
    from .supervisor.arbiter import read_pid

    pid = read_pid(settings.pidfile)
    if pid is None:
        print(f"sp-pipeline: not running (no live pidfile at {settings.pidfile})", file=sys.stderr)
        return exitcodes.ERROR
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + settings.drain_timeout + 5
    while time.monotonic() < deadline:
        if read_pid(settings.pidfile) != pid:
            print(f"sp-pipeline: stopped (pid {pid})")
            return exitcodes.OK
        time.sleep(0.05)
    print(f"sp-pipeline: pid {pid} still running after {settings.drain_timeout + 5:g} s",
          file=sys.stderr)
    return exitcodes.ERROR


def cmd_status(settings: config.Settings, args: argparse.Namespace) -> int:
    from .status import gather

    info = gather(settings)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
    else:
        for key in sorted(info):
            print(f"{key:28} {info[key]}")
    return exitcodes.OK if info.get("running") else exitcodes.ERROR


def cmd_check_config(settings: config.Settings, args: argparse.Namespace) -> int:
    effective = config.as_dict(settings)
    effective["ingest"] = settings.ingest_endpoint
    print(json.dumps(effective, indent=2, sort_keys=True))
    return exitcodes.OK


def cmd_dead_letters(settings: config.Settings, args: argparse.Namespace) -> int:
    from .status import dead_letters

    ids = [int(x) for x in args.ids.split(",") if x.strip()] or None
    try:
        return dead_letters(settings, args.action, ids, args.limit, args.json)
    except StoreError as exc:
        print(f"sp-pipeline: {exc}", file=sys.stderr)
        return exitcodes.STORE_ERROR


if __name__ == "__main__":
    sys.exit(main())
