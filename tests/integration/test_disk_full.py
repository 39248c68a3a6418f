"""A full disk: a clear error, no corruption, no loss, recovery when space returns.

The store lives on a small tmpfs (needs root and mount; skipped otherwise). The writer
must stay up, refuse nothing it already confirmed, and store every event once the
filesystem grows again."""

from __future__ import annotations

import os
import sqlite3
import subprocess

import pytest

from sp_pipeline import Client
from sp_pipeline.errors import FlushTimeout
from sp_pipeline.events import StructuredEvent
from tests.writer_process import WriterProcess, _killpg

pytestmark = pytest.mark.integration


@pytest.fixture
def small_fs(short_dir):
    mnt = os.path.join(short_dir, "fs")
    os.makedirs(mnt)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", mnt],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", mnt], capture_output=True)


@pytest.mark.parametrize("wal_max_bytes", [64 << 20, 16 << 10],
                         ids=["default-wal", "checkpoint-every-commit"])
def test_full_disk_then_space_returns(small_fs, short_dir, wal_max_bytes):
    # With a 16 KiB WAL limit the writer checkpoints after almost every commit, so the
    # disk fills during a checkpoint too (committed events stay safe in the WAL).
    w = WriterProcess(short_dir, store=os.path.join(small_fs, "events.db"),
                      wal_max_bytes=wal_max_bytes)
    try:
        w.start()
        label = "x" * 2000  # ~2 KB events: the 1 MiB filesystem fills within ~500
        client = Client(w.ingest, namespace="full", resend_after=0.5)
        eids = [client.track(StructuredEvent("disk", "fill", label=label)) for _ in range(1500)]
        with pytest.raises(FlushTimeout):
            client.flush(3)
        assert w.alive(), w.log()
        assert "no space left" in w.log()
        subprocess.run(["mount", "-o", "remount,size=64m", small_fs], check=True)
        client.flush(30)  # unconfirmed frames are resent and stored now
        client.close()
        assert w.stop() == 0
        conn = sqlite3.connect(f"file:{w.store}?mode=ro", uri=True)
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        stored = [row[0] for row in conn.execute("SELECT payload FROM queue")]
        conn.close()
        stored_eids = sorted(p.split(b'"eid":"', 1)[1][:36].decode() for p in stored)
        assert stored_eids == sorted(eids)  # every event once: nothing lost, nothing twice
    finally:
        if w.proc is not None:
            _killpg(w.proc.pid)
            w.proc.wait(10)
