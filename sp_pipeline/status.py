"""What ``sp-pipeline status`` and ``sp-pipeline dead-letters`` read.

Status asks the running writer (a STATS request on the lease socket: counts plus recent
rates); when no writer answers it reads the store read-only. Dead-letter changes are
writes, so they are done only while the pipeline is stopped (the writer owns the store
while it runs: DESIGN invariant 1).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, List, Optional

import zmq

from . import exitcodes, wire
from .config import Settings
from .errors import StoreError


def ask_writer(settings: Settings, timeout: float = 2.0) -> Optional[Dict[str, Any]]:
    """The writer's STATS answer, or None when it does not answer in time."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(settings.lease_endpoint)
        sock.send(wire.encode_request(wire.OP_STATS, 1))
        if not sock.poll(int(timeout * 1000), zmq.POLLIN):
            return None
        reply = wire.decode_reply(sock.recv())
        return reply[2] if reply[0] == wire.OP_STATS_REPLY else None
    finally:
        sock.close(linger=0)
        ctx.term()


def gather(settings: Settings) -> Dict[str, Any]:
    from .supervisor.arbiter import read_pid

    pid = read_pid(settings.pidfile)
    info: Dict[str, Any] = {"running": pid is not None, "supervisor_pid": pid,
                            "store": os.path.abspath(settings.store)}
    stats = ask_writer(settings) if pid is not None else None
    if stats is not None:
        info.update(stats)
        info["source"] = "writer"
    else:
        info.update(_read_store(settings))
    children = _children(settings)
    if children is not None:
        info["processes"] = children
    return info


def _read_store(settings: Settings) -> Dict[str, Any]:
    from .store import open_readonly

    if not os.path.exists(settings.store):
        return {"source": "none", "error": "store file does not exist"}
    try:
        store = open_readonly(settings.store)
    except StoreError as exc:
        return {"source": "none", "error": str(exc)}
    try:
        now = time.time()
        st = store.stats(now)
    finally:
        store.close()
    return {
        "source": "store",
        "queued": st.queued,
        "queued_bytes": st.queued_bytes,
        "leased": st.leased,
        "dead_letters": st.dead_letters,
        "oldest_age_seconds": (now - st.oldest_enqueued_at) if st.oldest_enqueued_at else 0.0,
    }


def _children(settings: Settings) -> Optional[List[Dict[str, Any]]]:
    try:
        with open(os.path.join(os.path.abspath(settings.run_dir), "children.json")) as fh:
            return json.load(fh).get("children")
    except (OSError, ValueError):
        return None


def dead_letters(settings: Settings, action: str, ids: Optional[List[int]], limit: int,
                 as_json: bool) -> int:
    from .store import open_readonly, open_store
    from .supervisor.arbiter import read_pid

    if action == "list":
        store = open_readonly(settings.store)
        try:
            rows = store.dead_letters(limit)
        finally:
            store.close()
        out = [{"id": r.id, "reason": r.reason, "last_status": r.last_status,
                "attempts": r.attempts, "dead_at": r.dead_at,
                "payload": r.payload.decode("utf-8", "replace")} for r in rows]
        if as_json:
            print(json.dumps(out, indent=2))
        else:
            for r in out:
                print(f"{r['id']:>10} {r['reason']:<24} status={r['last_status']:<4} "
                      f"attempts={r['attempts']:<3} {r['payload'][:80]}")
        return exitcodes.OK
    if read_pid(settings.pidfile) is not None:
        print("sp-pipeline: stop the pipeline first: the writer owns the store while it runs")
        return exitcodes.ERROR
    store = open_store(settings)
    try:
        store.begin()
        if action == "requeue":
            n = store.requeue_dead_letters(ids, time.time())
        else:
            n = store.purge_dead_letters(ids)
        store.commit()
    finally:
        store.close()
    print(f"sp-pipeline: {action}d {n} dead letter(s)")
    return exitcodes.OK
