"""Frames exchanged over ZeroMQ: producers <-> writer, and senders <-> writer.

Every frame is one ZeroMQ message part holding one msgpack array whose first two
elements are the protocol version (``1``) and an operation code (a one-letter str).
The full, language-neutral description is ``docs/wire-protocol.md``; keep the two in step.

Producer side (client DEALER -> writer ROUTER on the ingest endpoint)::

    EVENTS  [1, "E", producer_id: bin(16), seq: uint, base: uint, events: [bin, ...]]
    ACK     [1, "A", [[first_seq, last_seq], ...]]        writer -> producer, after commit
    RESEND  [1, "R", from_seq]                             writer -> producer
    REJECT  [1, "X", seq, reason: str]                     writer -> producer

``events`` are tracker-protocol payloads, each the UTF-8 JSON text of one flat object
whose values are all strings (the object that goes in a POST's ``data`` array).
``seq`` numbers a producer's frames from 1; ``base`` is the lowest seq the producer has
not yet seen acknowledged, so a writer that restarted knows where the producer stands.

Sender side (sender DEALER -> writer ROUTER on the lease endpoint); every request carries
a ``req_id`` the reply echoes::

    LEASE    [1, "L", req_id, max_events, max_bytes, wait_ms]
      -> BATCH [1, "B", req_id, lease_id, [[row_id, payload: bin, enqueued_ms, attempts], ...]]
         (while nothing is eligible the writer holds the request up to wait_ms, then
         answers an empty BATCH; with wait_ms 0 it answers at once)
    ACK      [1, "K", req_id, lease_id, [row_id, ...]]
    RELEASE  [1, "F", req_id, lease_id, [row_id, ...], retry_at_ms, status]
    DEAD     [1, "D", req_id, lease_id, [row_id, ...], reason: str, status]
      -> DONE  [1, "O", req_id, rows_affected]
    STATS    [1, "S", req_id]
      -> STATS [1, "T", req_id, {str: int | float}]
    REQUEUE  [1, "Q", req_id, [dead_letter_id, ...] | nil]   dead letters back to the queue
    PURGE    [1, "P", req_id, [dead_letter_id, ...] | nil]   dead letters deleted
      -> DONE  [1, "O", req_id, rows_affected]               (nil: all of them)
    any      -> ERROR [1, "X", req_id, reason: str]

``status`` is an HTTP status, or 0 when there was none (timeout, connection error).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Sequence, Tuple

import msgpack

from .errors import FrameError

VERSION = 1
PRODUCER_ID_BYTES = 16

# Producer ops.
OP_EVENTS = "E"
OP_ACK = "A"
OP_RESEND = "R"
OP_REJECT = "X"
# Lease ops.
OP_LEASE = "L"
OP_BATCH = "B"
OP_LEASE_ACK = "K"
OP_RELEASE = "F"
OP_DEAD = "D"
OP_DONE = "O"
OP_STATS = "S"
OP_STATS_REPLY = "T"
OP_REQUEUE_DEAD = "Q"
OP_PURGE_DEAD = "P"
OP_ERROR = "X"

_packb = msgpack.Packer(use_bin_type=True).pack


def _unpack(frame: bytes, max_bytes: int) -> list:
    if len(frame) > max_bytes:
        raise FrameError("size", f"frame of {len(frame)} bytes is over the {max_bytes}-byte limit")
    try:
        obj = msgpack.unpackb(
            frame,
            raw=False,
            use_list=True,
            strict_map_key=True,
        )
    except Exception as exc:  # msgpack raises several unrelated types
        raise FrameError("decode", f"not a msgpack value ({type(exc).__name__})") from None
    if not isinstance(obj, list) or len(obj) < 2:
        raise FrameError("decode", "frame is not an array of at least [version, op]")
    if obj[0] != VERSION:
        raise FrameError("version", f"unknown protocol version {obj[0]!r}, expected {VERSION}")
    if not isinstance(obj[1], str):
        raise FrameError("type", "op must be a string")
    return obj


def _uint(value: Any, name: str) -> int:
    if type(value) is not int or value < 0:
        raise FrameError("type", f"{name} must be a non-negative integer")
    return value


# --------------------------------------------------------------------------- producer


@dataclass(frozen=True)
class EventsFrame:
    producer_id: bytes
    seq: int
    base: int
    events: List[bytes]


def encode_events(producer_id: bytes, seq: int, base: int, events: Sequence[bytes]) -> bytes:
    return _packb([VERSION, OP_EVENTS, producer_id, seq, base, list(events)])


def decode_events(frame: bytes, *, max_frame_bytes: int, max_events: int) -> EventsFrame:
    """Decode and check an EVENTS frame. Raises FrameError with a metrics-friendly reason.

    Checks shape and types only; each event's JSON is checked by the writer
    (``payload.check_event_json``) so one bad event is rejected with its frame.
    """
    obj = _unpack(frame, max_frame_bytes)
    if obj[1] != OP_EVENTS:
        raise FrameError("op", f"unexpected op {obj[1]!r} on the ingest socket")
    if len(obj) != 6:
        raise FrameError("shape", f"EVENTS frame has {len(obj)} elements, expected 6")
    _, _, pid, seq, base, events = obj
    if not isinstance(pid, bytes) or len(pid) != PRODUCER_ID_BYTES:
        raise FrameError("type", f"producer_id must be {PRODUCER_ID_BYTES} bytes")
    _uint(seq, "seq")
    _uint(base, "base")
    if seq == 0 or base == 0 or base > seq:
        raise FrameError("type", "seq and base start at 1 and base <= seq")
    if not isinstance(events, list) or not events:
        raise FrameError("type", "events must be a non-empty array")
    if len(events) > max_events:
        raise FrameError("count", f"{len(events)} events in one frame, limit {max_events}")
    for ev in events:
        if not isinstance(ev, bytes):
            raise FrameError("type", "each event must be binary (UTF-8 JSON text)")
    return EventsFrame(pid, seq, base, events)


def encode_ack(ranges: Sequence[Tuple[int, int]]) -> bytes:
    return _packb([VERSION, OP_ACK, [list(r) for r in ranges]])


def encode_resend(from_seq: int) -> bytes:
    return _packb([VERSION, OP_RESEND, from_seq])


def encode_reject(seq: int, reason: str) -> bytes:
    return _packb([VERSION, OP_REJECT, seq, reason])


def decode_producer_reply(frame: bytes) -> list:
    """Decode a writer -> producer frame into ``[op, ...]`` (version stripped)."""
    obj = _unpack(frame, 1 << 24)
    return obj[1:]


# --------------------------------------------------------------------------- lease


def encode_request(op: str, req_id: int, *args: Any) -> bytes:
    return _packb([VERSION, op, req_id, *args])


_REQUEST_ARITY = {
    OP_LEASE: 6,
    OP_LEASE_ACK: 5,
    OP_RELEASE: 7,
    OP_DEAD: 7,
    OP_STATS: 3,
    OP_REQUEUE_DEAD: 4,
    OP_PURGE_DEAD: 4,
}


def decode_request(frame: bytes, *, max_frame_bytes: int = 1 << 20) -> list:
    """Decode a sender -> writer request into ``[op, req_id, *args]``, checking arity
    and the types of ids (the writer checks the rest where it uses them)."""
    obj = _unpack(frame, max_frame_bytes)
    op = obj[1]
    arity = _REQUEST_ARITY.get(op)
    if arity is None:
        raise FrameError("op", f"unknown lease op {op!r}")
    if len(obj) != arity:
        raise FrameError("shape", f"op {op!r} needs {arity} elements, got {len(obj)}")
    _uint(obj[2], "req_id")
    if op == OP_LEASE:
        for i, name in ((3, "max_events"), (4, "max_bytes"), (5, "wait_ms")):
            _uint(obj[i], name)
    elif op in (OP_REQUEUE_DEAD, OP_PURGE_DEAD):
        ids = obj[3]
        if ids is not None and (not isinstance(ids, list)
                                or any(type(i) is not int for i in ids)):
            raise FrameError("type", "dead-letter ids must be an array of integers or nil")
    elif op != OP_STATS:
        _uint(obj[3], "lease_id")
        ids = obj[4]
        if not isinstance(ids, list) or any(type(i) is not int for i in ids):
            raise FrameError("type", "row ids must be an array of integers")
    return obj[1:]


def encode_reply(op: str, req_id: int, *args: Any) -> bytes:
    return _packb([VERSION, op, req_id, *args])


def decode_reply(frame: bytes) -> list:
    """Decode a writer -> sender reply into ``[op, req_id, *args]``."""
    obj = _unpack(frame, 1 << 28)
    return obj[1:]
