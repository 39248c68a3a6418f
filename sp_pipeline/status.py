"""What ``sp-pipeline status`` and ``sp-pipeline dead-letters`` read.

Status asks the running writer (a STATS request on the lease socket: counts plus recent
rates); when no writer answers it reads the store read-only. Dead-letter changes are
writes: while the pipeline runs they are asked of the writer (it owns the store, DESIGN
invariant 1); when it is stopped they are made on the store directly.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Dict, List, Optional

import zmq

from . import exitcodes, wire
from .config import Settings
from .errors import StoreError


def ask_writer(settings: Settings, timeout: float = 2.0) -> Optional[Dict[str, Any]]:
    """The writer's STATS answer, or None when it does not answer in time."""
    reply = _ask(settings, wire.OP_STATS, timeout=timeout)
    return reply[2] if reply and reply[0] == wire.OP_STATS_REPLY else None


def _ask(settings: Settings, op: str, *args: Any, timeout: float = 2.0) -> Optional[list]:
    """One request to the running writer on its lease socket; its reply (without the
    version), or None when no writer answers in time."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(settings.lease_endpoint)
        sock.send(wire.encode_request(op, 1, *args))
        if not sock.poll(int(timeout * 1000), zmq.POLLIN):
            return None
        return wire.decode_reply(sock.recv())
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
        # The writer owns the store while it runs: it makes the change.
        op = wire.OP_REQUEUE_DEAD if action == "requeue" else wire.OP_PURGE_DEAD
        reply = _ask(settings, op, ids, timeout=10.0)
        if not reply or reply[0] != wire.OP_DONE:
            print("sp-pipeline: the running writer did not answer; try again", file=sys.stderr)
            return exitcodes.ERROR
        print(f"sp-pipeline: {action}d {reply[2]} dead letter(s)")
        return exitcodes.OK
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
