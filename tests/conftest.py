"""Shared fixtures: short ipc endpoints (socket paths are limited to ~100 bytes)."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from tests.writer_process import WriterProcess, _killpg


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
