"""Soak: the crash scenario for a chosen number of minutes, with collector faults.

Producers offer ``--rate`` events/s for ``--minutes``; meanwhile the writer, a sender
and the supervisor are killed with SIGKILL at jittered intervals, and the collector is
made to fail through its runtime faults API (a 30 s outage of 503s, 50 % 503s, answers
slower than the read timeout, connection resets). At the end every event confirmed by
``flush()`` must be at the collector (or in the dead-letter table, by reason), and
duplicates must stay within the in-flight bound of ``tests/crash_scenario.py``.

Prints progress and a summary, writes ``bench/results/soak.json``; exits 0 when nothing
was lost and duplicates are within the bound, 1 otherwise. Run it through
``scripts/soak`` (sets up .venv), or with any interpreter that has the package.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from typing import List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=5.0, help="length of the load")
    p.add_argument("--rate", type=float, default=400.0, help="events/s offered, all producers")
    p.add_argument("--producers", type=int, default=2)
    p.add_argument("--seed", type=int, default=None, help="default: from the clock (printed)")
    p.add_argument("--writer-every", type=float, default=40.0,
                   help="mean seconds between writer kills (0: never)")
    p.add_argument("--sender-every", type=float, default=25.0,
                   help="mean seconds between sender kills (0: never)")
    p.add_argument("--supervisor-every", type=float, default=90.0,
                   help="mean seconds between supervisor kills (0: never)")
    p.add_argument("--faults-every", type=float, default=20.0,
                   help="mean seconds between collector fault windows (0: none)")
    p.add_argument("--workdir", default=None, help="default: a new short directory in /tmp")
    p.add_argument("--keep-workdir", action="store_true", help="keep logs and the store")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "soak.json"))
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse(argv)
    sys.path.insert(0, ROOT)  # tests.crash_scenario holds the scenario
    from tests.crash_scenario import ChaosConfig, run_scenario

    seed = args.seed if args.seed is not None else int(time.time()) % 1_000_000
    cfg = ChaosConfig(
        events=int(args.rate * args.minutes * 60), rate=args.rate, producers=args.producers,
        seed=seed, kill_every={"writer": args.writer_every, "sender": args.sender_every,
                               "supervisor": args.supervisor_every},
        faults_every=args.faults_every, delivery_timeout=180.0,
        collector_args=("--good-cap", "50000"),
    )
    # ipc:// paths are limited to ~100 bytes: keep the work directory short.
    workdir = args.workdir or tempfile.mkdtemp(prefix="spp-soak-", dir="/tmp")
    started = time.monotonic()

    def log(line: str) -> None:
        print(f"[{time.monotonic() - started:7.1f} s] {line}", flush=True)

    log(f"soak: {args.minutes:g} min at {args.rate:g} events/s ({cfg.events} events), "
        f"seed {seed}, work directory {workdir}")
    try:
        outcome = run_scenario(workdir, cfg, log=log, report_every=15.0)
    finally:
        if not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    ok = not outcome.lost and outcome.duplicates <= outcome.duplicate_bound
    print("\n" + outcome.summary())
    print("RESULT:", "ok" if ok else "FAILED (events lost or duplicates beyond the bound)")
    write(args, cfg, outcome, ok)
    return 0 if ok else 1


def write(args: argparse.Namespace, cfg, outcome, ok: bool) -> None:
    command = "scripts/soak " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    result = {
        "benchmark": "soak",
        "command": command.strip(),
        "minutes": args.minutes,
        "rate_offered": args.rate,
        "kill_every_seconds": dict(cfg.kill_every),
        "faults_every_seconds": cfg.faults_every,
        "pipeline_args": cfg.pipeline_args(),
        "ok": ok,
        **outcome.to_json(),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
        fh.write("\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
