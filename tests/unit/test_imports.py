"""The supervisor stays small: `sp-pipeline start` loads neither prometheus_client
(the exporter serves the supervisor's figures from children.json) nor the
development collector's server, whose flags its parser lists."""

from __future__ import annotations

import argparse
import subprocess
import sys

from sp_pipeline.collector import _limits, add_arguments
from sp_pipeline.collector.server import Limits

HEAVY = ("prometheus_client", "sp_pipeline.collector.server", "http.server", "urllib3", "zmq")


def test_start_path_imports_nothing_heavy() -> None:
    code = ("import sys\n"
            "from sp_pipeline import cli\n"
            "cli.build_parser().parse_args(['start'])\n"
            "from sp_pipeline.supervisor import arbiter\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_collector_cap_defaults_are_the_limits_defaults() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert _limits(parser.parse_args([])) == Limits()
    assert _limits(parser.parse_args(["--good-cap", "5"])) == Limits(good_cap=5)
    text = " ".join(parser.format_help().split())  # help wraps lines
    assert f"default {Limits.good_cap:,}" in text and f"default {Limits.bad_cap:,}" in text
