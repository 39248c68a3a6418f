"""``sp-pipeline dead-letters`` against a running pipeline: the writer makes the change."""

from __future__ import annotations

import json

import pytest

from sp_pipeline import Client
from sp_pipeline.events import StructuredEvent
from sp_pipeline.testing import LocalCollector, Pipeline, wait_until

pytestmark = pytest.mark.integration


def _dead(pipe: Pipeline) -> list:
    out = pipe.cli("dead-letters", "list", "--json", "--limit", "1000")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_requeue_and_purge_while_running(short_dir):
    with LocalCollector(short_dir, "--status", "400") as collector, \
            Pipeline(short_dir, collector.url, "--metrics-addr", "127.0.0.1:0") as pipe:
        with Client(pipe.ingest, namespace="dl") as client:
            eids = [client.track(StructuredEvent("dl", "x", value=i)) for i in range(30)]
            client.flush(10)
        wait_until(lambda: len(_dead(pipe)) == 30, 20, "30 dead letters")
        dead = _dead(pipe)
        assert {d["reason"] for d in dead} == {"status_400"}
        assert {d["last_status"] for d in dead} == {400}
        collector.set_faults(status=None)  # the collector accepts again
        ids = [d["id"] for d in dead]
        out = pipe.cli("dead-letters", "purge", "--ids", ",".join(map(str, ids[:10])))
        assert out.returncode == 0 and "purged 10" in out.stdout, out
        out = pipe.cli("dead-letters", "requeue")
        assert out.returncode == 0 and "requeued 20" in out.stdout, out
        wait_until(lambda: len(collector.eids()) == 20, 20, "the requeued events delivered")
        assert set(collector.eids()) <= set(eids)
        assert _dead(pipe) == []
