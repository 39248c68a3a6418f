"""Exit codes: the contract between every role process and the supervisor.

A child that exits with a *boot* code could not start (bad configuration, a store that
is not ours, a socket it cannot bind); restarting it would fail the same way, so the
supervisor stops the whole service instead of looping. Other non-zero codes are crashes
and get restarted with backoff.
"""

from __future__ import annotations

OK = 0
ERROR = 1  # unexpected failure while running: restart
USAGE = 2  # command-line misuse (argparse's own code)
BOOT_ERROR = 3  # the role could not start (socket in use, ...): do not restart in a loop
ALREADY_RUNNING = 4  # another supervisor owns the run directory
STORE_ERROR = 74  # the store cannot be opened, is not ours, or the disk is full (EX_IOERR)
CONFIG_ERROR = 78  # invalid configuration (EX_CONFIG)

#: Codes after which a restart cannot help.
NO_RESTART = frozenset({USAGE, BOOT_ERROR, STORE_ERROR, CONFIG_ERROR})


def describe(code: int) -> str:
    return {
        OK: "ok",
        ERROR: "crashed",
        USAGE: "usage error",
        BOOT_ERROR: "could not start",
        ALREADY_RUNNING: "already running",
        STORE_ERROR: "store error",
        CONFIG_ERROR: "configuration error",
    }.get(code, f"exit code {code}" if code >= 0 else f"killed by signal {-code}")
