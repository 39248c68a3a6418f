"""Shared fixtures: short ipc endpoints (socket paths are limited to ~100 bytes)."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
from hypothesis import settings as hypothesis_settings

from tests.writer_process import WriterProcess, _killpg

# CI runs the same examples every time (HYPOTHESIS_PROFILE=ci, set by .ci/run), so a
# landing is not decided by luck; developers get fresh random examples by default.
hypothesis_settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture
def short_dir():
    """A short temporary directory for ipc:// sockets and run directories."""
    path = tempfile.mkdtemp(prefix="spp-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def ipc_endpoint(short_dir):
    return f"ipc://{os.path.join(short_dir, 'ingest.sock')}"


@pytest.fixture
def writer_dir(short_dir):
    """A short work directory; every writer started in it is reaped afterwards."""
    started: list = []

    def make(**overrides: object) -> WriterProcess:
        w = WriterProcess(short_dir, **overrides)
        started.append(w)
        return w

    yield make
    for w in started:
        if w.proc is not None:
            _killpg(w.proc.pid)
            w.proc.wait(10)
