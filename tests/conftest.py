"""Shared fixtures: short ipc endpoints (socket paths are limited to ~100 bytes)."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest


@pytest.fixture
def short_dir():
    """A short temporary directory for ipc:// sockets and run directories."""
    path = tempfile.mkdtemp(prefix="spp-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def ipc_endpoint(short_dir):
    return f"ipc://{os.path.join(short_dir, 'ingest.sock')}"
