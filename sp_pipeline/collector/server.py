"""The development collector's HTTP server: tracker-protocol endpoints, the ``/micro/``
reporting API, fault injection, and the ``Collector`` handle tests use in-process.

Endpoints (see ``docs/collector.md`` for the JSON shapes)::

    POST /com.snowplowanalytics.snowplow/tp2   payload_data envelope (gzip allowed) -> 200 "ok"
    GET  /i?e=pv&p=web&tv=...                  one event in the query           -> 200 1x1 GIF
    GET  /micro/all | good | bad | eids | requests | faults
    POST /micro/faults   (JSON: fields to change; ?replace=1 replaces them all)
    POST /micro/reset    (GET too)

One asyncio event loop on one thread serves every connection (HTTP/1.1, keep-alive,
requests on a connection answered in order). A request delayed by a fault waits on a
timer and holds up only its own connection.
"""

from __future__ import annotations

import asyncio
import email.utils
import http
import ipaddress
import itertools
import json
import logging
import socket
import struct
import threading
import time
import zlib
from collections import deque
from dataclasses import dataclass
from typing import Any, Deque, Dict, FrozenSet, List, NamedTuple, Optional, Set, Tuple, Union
from urllib.parse import parse_qs, parse_qsl

from ..errors import ConfigError, ValidationError
from .faults import Decision, FaultInjector, Faults
from .schemas import EnvelopeError, EventChecker, SchemaRegistry, Validator

log = logging.getLogger(__name__)

TP2_PATH = "/com.snowplowanalytics.snowplow/tp2"
GET_PATH = "/i"
#: The classic transparent 1x1 GIF that collectors answer ``GET /i`` with.
PIXEL = (b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00"
         b"\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;")
#: Largest body we read (or drain before a 413) and largest gunzipped body (bytes).
MAX_READ_BYTES = 64 * 1024 * 1024
#: Largest request line plus headers (bytes); larger heads get 431.
MAX_HEAD_BYTES = 64 * 1024
#: Seconds an idle keep-alive connection is kept, and how often that is looked at.
IDLE_TIMEOUT_S = 60.0
IDLE_SWEEP_S = 5.0
#: Connections the kernel queues before they are accepted (bursts of sender connections).
LISTEN_BACKLOG = 128
SERVER_NAME = "sp-pipeline-collector"
#: Bytes of an unparseable body kept in its bad record.
RAW_KEEP_CHARS = 4096


def check_host(host: str, allow_remote: bool) -> None:
    """Refuse a non-loopback bind address unless ``allow_remote`` (``ConfigError``)."""
    if allow_remote or host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ConfigError(f"host: {host!r} is not a loopback address; pass allow_remote "
                          "(--allow-remote) to listen beyond this machine")


class _BadRequest(Exception):
    """A request that cannot be served: answered with ``status``, then the connection
    is closed (what follows it on the connection cannot be trusted)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


_date_cache: List[Any] = [0, ""]


def _http_date() -> str:
    """The ``Date`` header value, formatted once a second."""
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[:] = [now, email.utils.formatdate(now, usegmt=True)]
    return _date_cache[1]


@dataclass(frozen=True)
class Limits:
    """Memory caps. Stored events beyond a cap evict the oldest; the counts and the
    eid tally keep counting everything (the eid tally is not capped: about 100 bytes
    per distinct eid)."""

    good_cap: int = 20_000
    bad_cap: int = 10_000
    requests_cap: int = 1_000


class StoredBatch(NamedTuple):
    """The good events of one request, kept as they arrived and decoded again only
    when ``/micro/good`` asks. Holding 20,000 decoded events, and freeing the oldest
    ones' dicts as new ones came, cost the collector about a sixth of its CPU.

    ``meta`` is (received_at ms, method, request_id); ``source`` the (gunzipped) POST
    body, or the list of events of a GET; ``bad`` the positions of the bad events in
    it; ``good`` how many good events it holds."""

    meta: Tuple[int, str, int]
    source: Union[bytes, List[Dict[str, Any]]]
    bad: FrozenSet[int]
    good: int

    def events(self) -> List[Tuple[int, Dict[str, Any]]]:
        """``(position, event)`` of the good events, oldest first (decoded again)."""
        source = self.source
        events = json.loads(source)["data"] if isinstance(source, bytes) else source
        return [(i, e) for i, e in enumerate(events) if i not in self.bad]

    def to_json(self, position: int, event: Dict[str, Any],
                checker: EventChecker) -> Dict[str, Any]:
        """One good event in the ``/micro/good`` form, its JSON fields decoded."""
        found = checker.event(event, f"data[{position}]")
        received_at, method, request_id = self.meta
        return {"event": event, "contexts": found.contexts,
                "unstruct_event": found.unstruct_event,
                "unknown_schemas": found.unknown_schemas,
                "received_at": received_at, "method": method, "request_id": request_id}


class Recorder:
    """Everything the collector has received, bounded by ``Limits``. Thread-safe: one
    lock, taken once per request. Stored events are decoded when asked with a checker
    of its own (a checker's cache is not for two threads), one caller at a time."""

    def __init__(self, limits: Optional[Limits] = None,
                 registry: Optional[SchemaRegistry] = None) -> None:
        self.limits = limits or Limits()
        self.checker = EventChecker(registry or SchemaRegistry())
        self._decode_lock = threading.Lock()
        self._lock = threading.Lock()
        self._request_ids = itertools.count(1)
        self.reset()

    def reset(self) -> None:
        """Forget every event, count and request (request ids keep increasing)."""
        with self._lock:
            self._good: Deque[StoredBatch] = deque()
            self._stored_good = 0  # good events in self._good
            self._bad: Deque[Dict[str, Any]] = deque(maxlen=self.limits.bad_cap)
            self._requests: Deque[Dict[str, Any]] = deque(maxlen=self.limits.requests_cap)
            self._eids: Dict[str, int] = {}
            self._new_eids: List[List[Optional[str]]] = []  # tallied when asked
            self._n_good = self._n_bad = 0

    def next_request(self) -> Tuple[int, int]:
        """``(request id, received_at)`` for a new collection request; ms since epoch."""
        with self._lock:
            request_id = next(self._request_ids)
        return request_id, int(time.time() * 1000)

    def log_request(self, summary: Dict[str, Any]) -> None:
        with self._lock:
            self._requests.append(summary)

    def record(self, summary: Dict[str, Any], batch: Optional[StoredBatch],
               eids: List[Optional[str]], bad: List[Dict[str, Any]]) -> None:
        """Store one request's summary, its good events (``batch``, their ``eids``)
        and its bad events."""
        with self._lock:
            self._requests.append(summary)
            self._bad.extend(bad)
            self._n_bad += len(bad)
            if batch is None or not batch.good:
                return
            self._n_good += batch.good
            self._new_eids.append(eids)
            stored = self._good
            stored.append(batch)
            self._stored_good += batch.good
            cap = self.limits.good_cap
            while stored and self._stored_good - stored[0].good >= cap:
                self._stored_good -= stored.popleft().good

    def counts(self) -> Dict[str, int]:
        with self._lock:
            return {"total": self._n_good + self._n_bad, "good": self._n_good,
                    "bad": self._n_bad}

    def eids(self) -> Dict[str, int]:
        """Times each good event's ``eid`` was received (2+ means duplicates)."""
        with self._lock:
            tally = self._eids
            for eids in self._new_eids:
                for eid in eids:
                    if eid is not None:
                        tally[eid] = tally.get(eid, 0) + 1
            self._new_eids = []
            return dict(tally)

    def good(self, limit: Optional[int] = None, eid: Optional[str] = None,
             event_type: Optional[str] = None) -> List[Dict[str, Any]]:
        """Stored good events in arrival order, filtered; ``limit`` keeps the newest.

        Requests are decoded newest first, and only until ``limit`` events are found,
        so polling for the newest few (as ``bench/sustained.py`` does every second)
        does not decode all 20,000 stored events each time."""
        with self._lock:
            batches = list(self._good)
        room = self.limits.good_cap  # the newest good_cap events are the stored ones
        newest_first: List[Tuple[StoredBatch, List[Tuple[int, Dict[str, Any]]]]] = []
        found = 0
        for batch in reversed(batches):
            if room <= 0 or (limit is not None and found >= limit):
                break
            events = batch.events()
            if len(events) > room:
                events = events[len(events) - room:]
            room -= len(events)
            if eid is not None:
                events = [(i, e) for i, e in events if e.get("eid") == eid]
            if event_type is not None:
                events = [(i, e) for i, e in events if e.get("e") == event_type]
            newest_first.append((batch, events))
            found += len(events)
        with self._decode_lock:
            records = [batch.to_json(i, e, self.checker)
                       for batch, events in reversed(newest_first) for i, e in events]
        return _newest(records, limit)

    def bad(self, limit: Optional[int] = None) -> List[Dict[str, Any]]:
        with self._lock:
            return _newest(list(self._bad), limit)

    def requests(self, limit: Optional[int] = None) -> List[Dict[str, Any]]:
        with self._lock:
            return _newest(list(self._requests), limit)


def _newest(records: List[Any], limit: Optional[int]) -> List[Any]:
    if limit is None:
        return records
    return records[-limit:] if limit > 0 else []


class _Request(NamedTuple):
    method: str
    path: str
    query: str
    headers: Dict[str, str]  # names lower-cased
    body: bytes
    keep_alive: bool


class _Server:
    """What every connection shares. Lives on the event loop's thread, except the
    recorder and the fault injector, which other threads read and change (locked)."""

    def __init__(self, recorder: Recorder, injector: FaultInjector,
                 checker: EventChecker) -> None:
        self.recorder = recorder
        self.injector = injector
        self.checker = checker
        self.connections: Set["_Connection"] = set()


class _Connection(asyncio.Protocol):
    """One client connection: HTTP/1.1 with keep-alive, requests answered in order.

    Everything runs on the collector's one event-loop thread, so checking a batch
    never competes with another request for the GIL (measured: a thread per
    connection cost about a third more CPU per event with 16 connections). A delayed
    answer is a timer: the connection waits, nothing else does.
    """

    def __init__(self, server: _Server) -> None:
        self.server = server
        self.transport: Optional[asyncio.Transport] = None
        self.buffer = bytearray()
        self.waiting = False  # a delayed answer is pending: later requests wait for it
        self.keep_alive = True  # of the request being answered
        self.closing = False
        self.last_active = time.monotonic()

    # -- asyncio callbacks --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.closing = True
        self.server.connections.discard(self)

    def data_received(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        self.buffer += data
        if not self.waiting:
            self._serve()

    def eof_received(self) -> bool:
        if self.buffer and not self.waiting:
            # The client hung up mid-request (a sender killed mid-body): no request
            # was made, so nothing is recorded, good or bad, and nobody is left to answer.
            log.debug("request cut off after %d bytes", len(self.buffer))
        return False  # close our side too

    # -- requests --

    def _serve(self) -> None:
        while not self.waiting and not self.closing:
            try:
                request = self._parse()
            except _BadRequest as exc:
                self._send(exc.status, exc.message.encode() + b"\n", "text/plain", close=True)
                return
            if request is None:
                return
            self.keep_alive = request.keep_alive  # until its answer: later ones wait
            try:
                self._route(request)
            except Exception:  # a collector bug must not take the connection's peers down
                log.exception("%s %s failed", request.method, request.path)
                self._send(500, b"internal error\n", "text/plain", close=True)
                return

    def _parse(self) -> Optional[_Request]:
        """The next whole request in the buffer, taken out of it; ``None`` until one
        has fully arrived. Raises ``_BadRequest`` for what cannot be served."""
        buf = self.buffer
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > MAX_HEAD_BYTES:
                raise _BadRequest(431, "request head too large")
            return None
        head = buf[:end].decode("latin-1").split("\r\n")
        parts = head[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise _BadRequest(400, "bad request line")
        method, target, version = parts
        headers: Dict[str, str] = {}
        for line in head[1:]:
            name, sep, value = line.partition(":")
            name = name.strip().lower()
            if not sep or not name:
                raise _BadRequest(400, "bad header line")
            headers[name] = value.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            raise _BadRequest(411, "Content-Length required (chunked bodies not supported)")
        length = headers.get("content-length", "0")
        if not length.isdigit():
            raise _BadRequest(400, "invalid Content-Length")
        size = int(length)
        if size > MAX_READ_BYTES:
            raise _BadRequest(413, "body too large")  # too big to drain: hang up after
        start = end + 4
        if len(buf) < start + size:
            return None
        body = bytes(buf[start:start + size])
        del buf[:start + size]
        # HTTP/1.0 clients (curl -0, ab) get one answer per connection.
        keep_alive = version != "HTTP/1.0" and headers.get("connection", "").lower() != "close"
        path, _, query = target.partition("?")
        return _Request(method, path, query, headers, body, keep_alive)

    def _route(self, req: _Request) -> None:
        if req.method not in ("GET", "POST"):
            self._send(501, b"unsupported method\n", "text/plain")
        elif req.path == TP2_PATH and req.method == "POST":
            self._collect(req, "POST", req.body)
        elif req.path == GET_PATH and req.method == "GET":
            self._collect(req, "GET", req.query.encode("latin-1", "replace"))
        elif req.path.startswith("/micro/"):
            body = req.body if req.method == "POST" else None
            self._report(req.path[len("/micro/"):], parse_qs(req.query), body)
        else:
            self._send(404, b"not found\n", "text/plain")

    # -- answers --

    def _send(self, status: int, body: bytes, content_type: str,
              headers: Optional[Dict[str, str]] = None, close: bool = False) -> None:
        """Answer the request in hand; the connection closes after it when ``close`` or
        when that request did not keep the connection alive."""
        if self.transport is None or self.closing:
            return
        close = close or not self.keep_alive
        lines = [f"HTTP/1.1 {status} {_reason(status)}", f"Server: {SERVER_NAME}",
                 f"Date: {_http_date()}", f"Content-Type: {content_type}",
                 f"Content-Length: {len(body)}"]
        lines.extend(f"{name}: {value}" for name, value in (headers or {}).items())
        if close:
            lines.append("Connection: close")
        self.transport.write("\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + body)
        if close:
            self.closing = True
            self.transport.close()  # after the answer is written

    def _send_json(self, status: int, value: Any) -> None:
        self._send(status, json.dumps(value).encode(), "application/json")

    def _reset(self) -> None:
        """Hang up with a TCP RST and no answer (SO_LINGER 0, then abort)."""
        assert self.transport is not None
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.closing = True
        self.transport.abort()

    # -- collection --

    def _collect(self, req: _Request, method: str, raw: bytes) -> None:
        server = self.server
        request_id, received_at = server.recorder.next_request()
        decision = server.injector.decide(len(raw) if method == "POST" else 0)
        items, events, problem, body = self._decode(method, raw, decision,
                                                    req.headers.get("content-encoding"))
        summary = {"request_id": request_id, "method": method, "bytes": len(raw),
                   "received_at": received_at, "fault": decision.reason,
                   "events": None if events is None else len(events),
                   "stm": _stm_values(events)}
        if decision.delay_s > 0:
            # Answer later; requests pipelined behind this one wait (and stay unread).
            self.waiting = True
            assert self.transport is not None
            self.transport.pause_reading()
            asyncio.get_running_loop().call_later(
                decision.delay_s, self._answer_later,
                method, raw, decision, items, events, problem, body, summary)
            return
        self._answer(method, raw, decision, items, events, problem, body, summary)

    def _answer_later(self, *args: Any) -> None:
        self.waiting = False
        if self.closing:
            return
        self._answer(*args)
        if not self.closing and self.transport is not None:
            self.transport.resume_reading()
            self._serve()

    def _answer(self, method: str, raw: bytes, decision: Decision,
                items: Optional[Validator], events: Optional[List[Any]], problem: str,
                body: bytes, summary: Dict[str, Any]) -> None:
        """Record the request and answer it."""
        if decision.action != "record":
            self._answer_fault(decision, summary)
            return
        try:
            status = self._record(method, items, events, problem, raw, body, summary)
        except Exception:  # a collector bug must not take the whole server down
            log.exception("request %d could not be processed", summary["request_id"])
            summary.update(status=500, fault="internal_error")
            self.server.recorder.log_request(summary)
            self._send(500, b"internal error\n", "text/plain")
            return
        if method == "GET":
            self._send(status, PIXEL, "image/gif")
        else:
            self._send(status, b"ok" if status == 200 else problem.encode(), "text/plain")

    def _answer_fault(self, decision: Decision, summary: Dict[str, Any]) -> None:
        summary["status"] = None if decision.action == "reset" else decision.status
        self.server.recorder.log_request(summary)
        if decision.action == "reset":
            self._reset()
            return
        headers = {"Retry-After": decision.retry_after} if decision.retry_after else None
        self._send(decision.status, f"fault: {decision.reason}\n".encode(), "text/plain",
                   headers)

    def _decode(self, method: str, raw: bytes, decision: Decision, encoding: Optional[str]
                ) -> Tuple[Optional[Validator], Optional[List[Any]], str, bytes]:
        """``(event validator, events, problem, body)``; events ``None`` when there are
        none to check, and ``problem`` says why; ``body`` is the POST body gunzipped. Decoded before the fault decision is acted
        on so that the request log can show a faulted request's events and ``stm``."""
        if decision.reason == "too_large":
            return None, None, "body too large", raw
        if method == "GET":
            return None, [dict(parse_qsl(raw.decode("latin-1"), keep_blank_values=True))], "", raw
        try:
            body = _gunzip(raw) if _is_gzip(encoding) else raw
            items, events = self.server.checker.envelope(json.loads(body))
        except EnvelopeError as exc:
            return None, None, str(exc), raw
        except ValueError as exc:  # JSON, UTF-8 or gzip
            return None, None, f"body: {exc}", raw
        return items, events, "", body

    def _record(self, method: str, items: Optional[Validator], events: Optional[List[Any]],
                problem: str, raw: bytes, body: bytes, summary: Dict[str, Any]) -> int:
        """Check and store the events; the status to answer (400: not an envelope)."""
        recorder, checker = self.server.recorder, self.server.checker
        meta = {"received_at": summary["received_at"], "method": method,
                "request_id": summary["request_id"]}
        if events is None:
            text = raw[:RAW_KEEP_CHARS].decode("utf-8", "replace")
            summary["status"] = 400
            recorder.record(summary, None, [], [dict(meta, errors=[problem], raw=text)])
            return 400
        bad: List[Dict[str, Any]] = []
        bad_at: List[int] = []
        plain = checker.plain_and_valid
        for i, event in enumerate(events):
            if plain(event, items):
                continue
            found = checker.event(event, f"data[{i}]" if method == "POST" else "query", items)
            if found.errors:
                bad_at.append(i)
                bad.append(dict(meta, errors=found.errors, raw=event))
        if bad_at:
            skip = frozenset(bad_at)
            eids = [e.get("eid") for i, e in enumerate(events) if i not in skip]
        else:
            skip = frozenset()
            eids = [e.get("eid") for e in events]
        shared_meta = (summary["received_at"], method, summary["request_id"])
        source = body if method == "POST" else events
        batch = StoredBatch(shared_meta, source, skip, len(events) - len(bad_at))
        summary["status"] = 200
        recorder.record(summary, batch, eids, bad)
        return 200

    # -- reporting API --

    def _report(self, name: str, query: Dict[str, List[str]], body: Optional[bytes]) -> None:
        recorder = self.server.recorder
        try:
            if name == "reset":
                recorder.reset()
                self._send_json(200, {"reset": True})
            elif name == "faults":
                self._send_json(200, self._faults(query, body).to_json())
            elif body is not None:
                self._send(405, b"use GET\n", "text/plain", {"Allow": "GET"})
            elif name == "all":
                self._send_json(200, recorder.counts())
            elif name == "good":
                self._send_json(200, recorder.good(_limit(query), _one(query, "eid"),
                                                   _one(query, "e")))
            elif name == "bad":
                self._send_json(200, recorder.bad(_limit(query)))
            elif name == "eids":
                self._send_json(200, {"eids": recorder.eids()})
            elif name == "requests":
                self._send_json(200, recorder.requests(_limit(query)))
            else:
                self._send(404, b"not found\n", "text/plain")
        except ValidationError as exc:
            self._send_json(400, {"error": str(exc)})

    def _faults(self, query: Dict[str, List[str]], body: Optional[bytes]) -> Faults:
        """GET: the current faults; POST: change them (merge, or replace with ?replace=1)."""
        injector = self.server.injector
        if body is None:
            return injector.faults
        try:
            changes = json.loads(body or b"{}")
        except ValueError:
            raise ValidationError("body", "must be a JSON object") from None
        if not isinstance(changes, dict):
            raise ValidationError("body", "must be a JSON object")
        if _one(query, "replace") in ("1", "true"):
            return injector.set(Faults().updated(changes))
        return injector.update(changes)


def _one(query: Dict[str, List[str]], name: str) -> Optional[str]:
    values = query.get(name)
    return values[-1] if values else None


def _limit(query: Dict[str, List[str]]) -> Optional[int]:
    text = _one(query, "limit")
    if text is None:
        return None
    if not text.isdigit():
        raise ValidationError("limit", "must be a non-negative integer")
    return int(text)


def _is_gzip(encoding: Optional[str]) -> bool:
    return (encoding or "").strip().lower() in ("gzip", "x-gzip")


def _gunzip(raw: bytes) -> bytes:
    """Inflate a gzip body, refusing more than ``MAX_READ_BYTES`` (a gzip bomb)."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(raw, MAX_READ_BYTES)
    except zlib.error as exc:
        raise ValueError(f"not valid gzip ({exc})") from None
    if inflater.unconsumed_tail:
        raise ValueError(f"gunzipped body larger than {MAX_READ_BYTES} bytes")
    if not inflater.eof:
        raise ValueError("truncated gzip stream")
    return out


def _stm_values(events: Optional[List[Any]]) -> List[str]:
    """Distinct ``stm`` (sent time) values in a request, in order (usually one)."""
    seen: Dict[str, None] = {}
    for event in events or ():
        if isinstance(event, dict) and isinstance(event.get("stm"), str):
            seen.setdefault(event["stm"], None)
            if len(seen) >= 10:
                break
    return list(seen)


class Collector:
    """A development collector running in a background thread of this process.

    ``with Collector(port=0, fail_rate=0.5, seed=1) as c:`` starts it on a free
    loopback port; ``c.url`` is its base URL. Keyword arguments beyond the named ones
    are ``Faults`` fields (or pass ``faults=Faults(...)``, not both). ``stop()`` (or
    leaving the ``with``) shuts the server down and closes every open connection.
    Raises ``ConfigError`` for a non-loopback ``host`` without ``allow_remote``, and
    ``ValidationError`` for an invalid fault.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *,
                 faults: Optional[Faults] = None, limits: Optional[Limits] = None,
                 allow_remote: bool = False, registry: Optional[SchemaRegistry] = None,
                 **fault_fields: Any) -> None:
        if faults is not None and fault_fields:
            raise TypeError("pass either faults=Faults(...) or fault keywords, not both")
        check_host(host, allow_remote)
        self.host, self._requested_port = host, port
        self.injector = FaultInjector(faults or Faults().updated(fault_fields))
        self.checker = EventChecker(registry or SchemaRegistry())
        self.recorder = Recorder(limits, self.checker.registry)
        self._port: Optional[int] = None
        self._state: Optional[_Server] = None
        self._listener: Optional[asyncio.AbstractServer] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "Collector":
        """Bind and serve on an event loop in a daemon thread. Raises ``OSError`` if
        the port is taken."""
        if self._thread is not None:
            raise RuntimeError("collector already started")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self._requested_port))
            sock.listen(LISTEN_BACKLOG)
        except OSError:
            sock.close()
            raise
        self._port = sock.getsockname()[1]
        self._state = _Server(self.recorder, self.injector, self.checker)
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._loop = loop
        self._thread = threading.Thread(target=self._serve, args=(loop, sock, ready),
                                        name=f"collector:{self._port}", daemon=True)
        self._thread.start()
        ready.wait()
        return self

    def _serve(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
               ready: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        state = self._state
        assert state is not None
        try:
            self._listener = loop.run_until_complete(
                loop.create_server(lambda: _Connection(state), sock=sock))
            loop.call_later(IDLE_SWEEP_S, self._sweep_idle, loop)
        finally:
            ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    def _sweep_idle(self, loop: asyncio.AbstractEventLoop) -> None:
        """Hang up keep-alive connections idle for ``IDLE_TIMEOUT_S``."""
        assert self._state is not None
        oldest = time.monotonic() - IDLE_TIMEOUT_S
        for conn in list(self._state.connections):
            if conn.last_active < oldest and not conn.waiting and conn.transport is not None:
                conn.closing = True
                conn.transport.close()
        loop.call_later(IDLE_SWEEP_S, self._sweep_idle, loop)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving, hang up every connection (delayed answers are not sent) and
        wait (up to ``timeout`` s) for the loop to end. Idempotent."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        self._thread = self._loop = None

        def shut_down() -> None:
            if self._listener is not None:
                self._listener.close()
            assert self._state is not None
            for conn in list(self._state.connections):
                conn.closing = True
                if conn.transport is not None:
                    conn.transport.abort()
            loop.call_soon(loop.stop)  # after the aborts' connection_lost callbacks

        try:
            loop.call_soon_threadsafe(shut_down)
        except RuntimeError:
            pass  # the loop already ended
        thread.join(timeout)

    @property
    def connections(self) -> int:
        """Open client connections (0 after ``stop()``)."""
        return len(self._state.connections) if self._state is not None else 0

    @property
    def delayed(self) -> int:
        """Requests received whose answer waits on a ``delay_ms`` timer."""
        if self._state is None:
            return 0
        return sum(1 for conn in list(self._state.connections) if conn.waiting)

    def __enter__(self) -> "Collector":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The bound port (the real one once started with port 0)."""
        return self._port if self._port is not None else self._requested_port

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:40123`` (no trailing slash)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def faults(self) -> Faults:
        return self.injector.faults

    def set_faults(self, **changes: Any) -> Faults:
        """Change some faults now (``None`` restores a field's default)."""
        return self.injector.update(changes)

    def clear_faults(self) -> Faults:
        """Back to a well-behaved collector."""
        return self.injector.set(Faults())

    def counts(self) -> Dict[str, int]:
        return self.recorder.counts()

    def eids(self) -> Dict[str, int]:
        return self.recorder.eids()

    def good(self, limit: Optional[int] = None, eid: Optional[str] = None) -> List[Dict[str, Any]]:
        return self.recorder.good(limit, eid)

    def bad(self, limit: Optional[int] = None) -> List[Dict[str, Any]]:
        return self.recorder.bad(limit)

    def requests(self, limit: Optional[int] = None) -> List[Dict[str, Any]]:
        return self.recorder.requests(limit)

    def reset(self) -> None:
        self.recorder.reset()
