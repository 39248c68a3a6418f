"""The development collector's HTTP server: tracker-protocol endpoints, the ``/micro/``
reporting API, fault injection, and the ``Collector`` handle tests use in-process.

Endpoints (see ``docs/collector.md`` for the JSON shapes)::

    POST /com.snowplowanalytics.snowplow/tp2   payload_data envelope (gzip allowed) -> 200 "ok"
    GET  /i?e=pv&p=web&tv=...                  one event in the query           -> 200 1x1 GIF
    GET  /micro/all | good | bad | eids | requests | faults
    POST /micro/faults   (JSON: fields to change; ?replace=1 replaces them all)
    POST /micro/reset    (GET too)

One ``ThreadingHTTPServer`` (daemon threads, HTTP/1.1 keep-alive): a request that is
delayed by a fault holds only its own thread.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import logging
import socket
import struct
import sys
import threading
import time
import zlib
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Deque, Dict, List, NamedTuple, Optional, Sequence, Set, Tuple
from urllib.parse import parse_qs, parse_qsl, urlsplit

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
#: Seconds an idle keep-alive connection is kept before its thread lets it go.
IDLE_TIMEOUT_S = 60.0
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


@dataclass(frozen=True)
class Limits:
    """Memory caps. Stored events beyond a cap evict the oldest; the counts and the
    eid tally keep counting everything (the eid tally is not capped: about 100 bytes
    per distinct eid)."""

    good_cap: int = 20_000
    bad_cap: int = 10_000
    requests_cap: int = 1_000


class GoodEvent(NamedTuple):
    """A stored good event, kept as a tuple because 200,000 of them may be held:
    ``meta`` (received_at ms, method, request_id) is one tuple shared by the events
    of a request, and empty lists are stored as ``()``. ``to_json`` gives the API form."""

    event: Dict[str, Any]
    contexts: Sequence[Any]
    unstruct_event: Optional[Any]
    unknown_schemas: Sequence[str]
    meta: Tuple[int, str, int]

    def to_json(self) -> Dict[str, Any]:
        received_at, method, request_id = self.meta
        return {"event": self.event, "contexts": list(self.contexts),
                "unstruct_event": self.unstruct_event,
                "unknown_schemas": list(self.unknown_schemas),
                "received_at": received_at, "method": method, "request_id": request_id}


class Recorder:
    """Everything the collector has received, bounded by ``Limits``. Thread-safe: one
    lock, taken once per request."""

    def __init__(self, limits: Optional[Limits] = None) -> None:
        self.limits = limits or Limits()
        self._lock = threading.Lock()
        self._request_ids = itertools.count(1)
        self.reset()

    def reset(self) -> None:
        """Forget every event, count and request (request ids keep increasing)."""
        with self._lock:
            self._good: Deque[GoodEvent] = deque(maxlen=self.limits.good_cap)
            self._bad: Deque[Dict[str, Any]] = deque(maxlen=self.limits.bad_cap)
            self._requests: Deque[Dict[str, Any]] = deque(maxlen=self.limits.requests_cap)
            self._eids: Dict[str, int] = {}
            self._n_good = self._n_bad = 0

    def next_request(self) -> Tuple[int, int]:
        """``(request id, received_at)`` for a new collection request; ms since epoch."""
        with self._lock:
            request_id = next(self._request_ids)
        return request_id, int(time.time() * 1000)

    def log_request(self, summary: Dict[str, Any]) -> None:
        with self._lock:
            self._requests.append(summary)

    def record(self, summary: Dict[str, Any], good: List[GoodEvent],
               bad: List[Dict[str, Any]]) -> None:
        """Store one request's summary and its checked events."""
        with self._lock:
            self._requests.append(summary)
            self._good.extend(good)
            self._bad.extend(bad)
            self._n_good += len(good)
            self._n_bad += len(bad)
            eids = self._eids
            for record in good:
                eid = record.event.get("eid")
                if eid is not None:
                    eids[eid] = eids.get(eid, 0) + 1

    def counts(self) -> Dict[str, int]:
        with self._lock:
            return {"total": self._n_good + self._n_bad, "good": self._n_good,
                    "bad": self._n_bad}

    def eids(self) -> Dict[str, int]:
        """Times each good event's ``eid`` was received (2+ means duplicates)."""
        with self._lock:
            return dict(self._eids)

    def good(self, limit: Optional[int] = None, eid: Optional[str] = None,
             event_type: Optional[str] = None) -> List[Dict[str, Any]]:
        """Stored good events in arrival order, filtered; ``limit`` keeps the newest."""
        with self._lock:
            found = list(self._good)
        if eid is not None:
            found = [r for r in found if r.event.get("eid") == eid]
        if event_type is not None:
            found = [r for r in found if r.event.get("e") == event_type]
        return [r.to_json() for r in _newest(found, limit)]

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


class _Server(ThreadingHTTPServer):
    """The listening socket plus what every request thread shares."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # socketserver's 5 refuses bursts of sender connections

    def __init__(self, address: Tuple[str, int], recorder: Recorder,
                 injector: FaultInjector, checker: EventChecker) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.recorder = recorder
        self.injector = injector
        self.checker = checker
        self.stopping = threading.Event()
        # Decoding and checking take the GIL for milliseconds per request; with one
        # thread per keep-alive connection (2 senders x 8 in flight = 16), requests
        # take turns on this lock instead of handing the GIL back and forth mid-request
        # (bench/README.md: interleaved runs with and without it were within noise).
        # Never held while waiting: not during a fault's delay, nor while reading a
        # request (only the small answer is written under it).
        self.cpu_lock = threading.Lock()
        self.connections: Set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up (or a stop() that hangs up on it) is routine."""
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            log.debug("connection from %s ended: %s", client_address, exc)
        else:
            log.exception("request from %s failed", client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as urllib3 pools expect
    timeout = IDLE_TIMEOUT_S
    server: _Server
    server_version = "sp-pipeline-collector"

    # -- connection bookkeeping, so Collector.stop() can end idle keep-alives --

    def setup(self) -> None:
        super().setup()
        # Headers and body leave in two writes; without NODELAY, Nagle plus the
        # client's delayed ACK add ~40 ms to every keep-alive answer.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.server.connections_lock:
                self.server.connections.discard(self.connection)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
        log.debug("%s " + format, self.address_string(), *args)

    # -- routing --

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        if parts.path == GET_PATH:
            self._collect("GET", parts.query.encode("latin-1", "replace"))
        elif parts.path.startswith("/micro/"):
            self._report(parts.path[len("/micro/"):], parse_qs(parts.query), None)
        else:
            self._send(404, b"not found\n", "text/plain")

    def do_POST(self) -> None:
        parts = urlsplit(self.path)
        body = self._read_body()
        if body is None:
            return
        if parts.path == TP2_PATH:
            self._collect("POST", body)
        elif parts.path.startswith("/micro/"):
            self._report(parts.path[len("/micro/"):], parse_qs(parts.query), body)
        else:
            self._send(404, b"not found\n", "text/plain")

    # -- I/O --

    def _read_body(self) -> Optional[bytes]:
        """The request body; ``None`` when an answer was already sent (411/400/413).
        No ``Content-Length`` means an empty body (``curl -XPOST .../micro/reset``);
        chunked bodies are not supported (trackers send a length)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            self._send(411, b"Content-Length required (chunked bodies not supported)\n",
                       "text/plain")
            return None
        length = self.headers.get("Content-Length", "0").strip()
        if not length.isdigit():
            self.close_connection = True
            self._send(400, b"invalid Content-Length\n", "text/plain")
            return None
        size = int(length)
        if size > MAX_READ_BYTES:
            self.close_connection = True  # too big to drain: hang up after the answer
            self._send(413, b"body too large\n", "text/plain")
            return None
        body = self.rfile.read(size)
        if len(body) < size:
            # The client hung up mid-body (a sender killed mid-request): no request was
            # made, so nothing is recorded, good or bad, and nobody is left to answer.
            self.close_connection = True
            log.debug("request body cut off after %d of %d bytes", len(body), size)
            return None
        return body

    def _send(self, status: int, body: bytes, content_type: str,
              headers: Optional[Dict[str, str]] = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _send_json(self, status: int, value: Any) -> None:
        self._send(status, json.dumps(value).encode(), "application/json")

    def _reset(self) -> None:
        """Hang up with a TCP RST and no answer (SO_LINGER 0, then close)."""
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()  # the fd really closes when rfile/wfile close in finish()

    # -- collection --

    def _collect(self, method: str, raw: bytes) -> None:
        server = self.server
        request_id, received_at = server.recorder.next_request()
        decision = server.injector.decide(len(raw) if method == "POST" else 0)
        with server.cpu_lock:
            items, events, problem = self._decode(method, raw, decision)
        if decision.delay_s > 0:
            server.stopping.wait(decision.delay_s)
        summary = {"request_id": request_id, "method": method, "bytes": len(raw),
                   "received_at": received_at, "fault": decision.reason,
                   "events": None if events is None else len(events),
                   "stm": _stm_values(events)}
        with server.cpu_lock:
            self._answer(method, raw, decision, items, events, problem, summary)

    def _answer(self, method: str, raw: bytes, decision: Decision, items: Optional[Validator],
                events: Optional[List[Any]], problem: str, summary: Dict[str, Any]) -> None:
        """Record the request and answer it (the answer is a small write that does not block)."""
        if decision.action != "record":
            self._answer_fault(decision, summary)
            return
        try:
            status = self._record(method, items, events, problem, raw, summary)
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

    def _decode(self, method: str, raw: bytes, decision: Decision
                ) -> Tuple[Optional[Validator], Optional[List[Any]], str]:
        """``(event validator, events, problem)``; events ``None`` when there are none
        to check, and ``problem`` says why. Decoded before the fault decision is acted
        on so that the request log can show a faulted request's events and ``stm``."""
        if decision.reason == "too_large":
            return None, None, "body too large"
        if method == "GET":
            return None, [dict(parse_qsl(raw.decode("latin-1"), keep_blank_values=True))], ""
        try:
            body = _gunzip(raw) if _is_gzip(self.headers.get("Content-Encoding")) else raw
            items, events = self.server.checker.envelope(json.loads(body))
        except EnvelopeError as exc:
            return None, None, str(exc)
        except ValueError as exc:  # JSON, UTF-8 or gzip
            return None, None, f"body: {exc}"
        return items, events, ""

    def _record(self, method: str, items: Optional[Validator], events: Optional[List[Any]],
                problem: str, raw: bytes, summary: Dict[str, Any]) -> int:
        """Check and store the events; the status to answer (400: not an envelope)."""
        recorder, checker = self.server.recorder, self.server.checker
        meta = {"received_at": summary["received_at"], "method": method,
                "request_id": summary["request_id"]}
        if events is None:
            text = raw[:RAW_KEEP_CHARS].decode("utf-8", "replace")
            summary["status"] = 400
            recorder.record(summary, [], [dict(meta, errors=[problem], raw=text)])
            return 400
        good: List[GoodEvent] = []
        bad: List[Dict[str, Any]] = []
        shared_meta = (summary["received_at"], method, summary["request_id"])
        plain = checker.plain_and_valid
        for i, event in enumerate(events):
            if plain(event, items):
                good.append(GoodEvent(event, (), None, (), shared_meta))
                continue
            found = checker.event(event, f"data[{i}]" if method == "POST" else "query", items)
            if found.errors:
                bad.append(dict(meta, errors=found.errors, raw=event))
            else:
                good.append(GoodEvent(event, found.contexts or (), found.unstruct_event,
                                      found.unknown_schemas or (), shared_meta))
        summary["status"] = 200
        recorder.record(summary, good, bad)
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
        self.recorder = Recorder(limits)
        self.checker = EventChecker(registry or SchemaRegistry())
        self._server: Optional[_Server] = None
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "Collector":
        """Bind and serve in a daemon thread. Raises ``OSError`` if the port is taken."""
        if self._server is not None:
            raise RuntimeError("collector already started")
        self._server = _Server((self.host, self._requested_port), self.recorder,
                               self.injector, self.checker)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.1},
                                        name=f"collector:{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving, hang up every connection and wait (up to ``timeout`` s) for
        the request threads to finish. Idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        server.stopping.set()  # wakes requests sleeping on a delay fault
        server.shutdown()
        server.server_close()
        with server.connections_lock:
            open_connections = list(server.connections)
        for conn in open_connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by its thread
        deadline = time.monotonic() + timeout
        while server.connections and time.monotonic() < deadline:
            time.sleep(0.01)  # request threads are daemons we do not hold handles to
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> "Collector":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The bound port (the real one when started with port 0)."""
        if self._server is None:
            return self._requested_port
        return self._server.server_address[1]

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
