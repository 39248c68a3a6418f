"""HTTP to the collector: one urllib3 pool per sender process, shared by its threads.

Requests::

    POST {collector}/com.snowplowanalytics.snowplow/tp2
         Content-Type: application/json; charset=utf-8
         [Content-Encoding: gzip]
         body: batching.post_body(events, stm)          one request per batch
    GET  {collector}/i?<event fields, URL-encoded>&stm=<ms>   one request per event

Every request answers with a ``Response``; network trouble (timeouts, refused or reset
connections, TLS failures) is a Response with ``status`` None and an ``error``, never an
exception, so the caller has one path for every outcome. Redirects are not followed
and urllib3 does not retry: the delivery policy (``retry.py``) owns both decisions. The
one exception: a connection closed or reset before any byte of an answer (typically a
keep-alive connection the collector closed as we reused it) is tried once more at once,
on a fresh connection, and ``Response.attempts`` says so (the sender counts it).

Build the Transport inside the process that uses it, after it started (DESIGN
invariant 8); a pool must never cross a fork.
"""

from __future__ import annotations

import gzip as gzip_lib
import json
import time
import urllib.parse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, Optional, Sequence

import urllib3
from urllib3 import exceptions as u3

from . import __version__
from .batching import post_body
from .errors import ValidationError

if TYPE_CHECKING:  # pragma: no cover
    from .config import Settings

POST_PATH = "/com.snowplowanalytics.snowplow/tp2"
GET_PATH = "/i"
POST_CONTENT_TYPE = "application/json; charset=utf-8"
DEFAULT_USER_AGENT = f"sp-pipeline/{__version__}"
# Level 1 gets most of the size win on JSON for a fraction of level 6's CPU; senders
# are CPU-bound long before a LAN link is full.
GZIP_LEVEL = 1


@dataclass(frozen=True)
class Response:
    """The outcome of one request.

    ``status`` is the HTTP status, or None when no answer came; then ``error`` says why
    as ``"<kind>: <detail>"`` with kind one of ``timeout``, ``connect``, ``tls``,
    ``protocol``, ``io``. ``retry_after`` is the raw Retry-After header, if any (parse it
    with ``retry.parse_retry_after``). ``elapsed`` is seconds from just before the
    request to the end of reading the answer (or of the failure). ``sent_bytes`` is the
    size of the body as sent (after gzip), 0 for GET. ``attempts`` is 2 when the first
    connection died before any answer and the request was sent again at once.
    """

    status: Optional[int]
    retry_after: Optional[str] = None
    error: Optional[str] = None
    elapsed: float = 0.0
    sent_bytes: int = 0
    attempts: int = 1

    @property
    def error_kind(self) -> Optional[str]:
        """The ``<kind>`` part of ``error`` (for metric labels), or None."""
        return None if self.error is None else self.error.partition(":")[0]


class Transport:
    """Sends tracker-protocol requests to one collector. Thread-safe.

    ``maxsize`` is the pool size and should equal the number of threads sending at once:
    a thread that finds every connection busy waits for one (``block=True``) rather
    than opening an extra connection that would be thrown away.
    """

    def __init__(
        self,
        collector_url: str,
        *,
        method: str = "post",
        connect_timeout: float = 3.0,
        read_timeout: float = 5.0,
        gzip: bool = False,
        ca_bundle: Optional[str] = None,
        maxsize: int = 4,
        user_agent: str = DEFAULT_USER_AGENT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if method not in ("post", "get"):
            raise ValueError(f"method must be 'post' or 'get', got {method!r}")
        if not collector_url.startswith(("http://", "https://")):
            raise ValueError(f"collector_url must be an http:// or https:// URL, got {collector_url!r}")
        self.collector_url = collector_url.rstrip("/")
        self.method = method
        self.gzip = gzip
        self._clock = clock
        self._headers = {"User-Agent": user_agent}
        self._pool = urllib3.PoolManager(
            num_pools=1,  # one collector
            maxsize=maxsize,
            block=True,
            retries=False,
            timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
            cert_reqs="CERT_REQUIRED",
            ca_certs=ca_bundle or None,
        )
        # The one connection pool of the one collector, used directly: PoolManager's
        # urlopen would parse the URL and look the pool up again on every request.
        self._host_pool = self._pool.connection_from_url(self.collector_url)
        self._base_path = urllib.parse.urlsplit(self.collector_url).path

    @classmethod
    def from_settings(cls, settings: "Settings") -> "Transport":
        """A Transport for ``settings.collector``, sized to ``settings.inflight``."""
        return cls(
            settings.collector,
            method=settings.method,
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.read_timeout,
            gzip=settings.gzip,
            ca_bundle=settings.ca_bundle or None,
            maxsize=settings.inflight,
        )

    def send(self, events: Sequence[bytes], stm_ms: int) -> Sequence[Response]:
        """Send with the configured method: one POST for all ``events``, or one GET
        per event (in order). Returns one Response per request made."""
        if self.method == "post":
            return [self.post(events, stm_ms)]
        return [self.get(ev, stm_ms) for ev in events]

    def post(self, events: Sequence[bytes], stm_ms: int) -> Response:
        """POST ``events`` (JSON object texts without ``stm``) as one payload_data
        body, each with ``stm`` = ``stm_ms`` (ms since the epoch)."""
        body = post_body(events, stm_ms)
        headers = dict(self._headers, **{"Content-Type": POST_CONTENT_TYPE})
        if self.gzip:
            body = gzip_lib.compress(body, compresslevel=GZIP_LEVEL, mtime=0)
            headers["Content-Encoding"] = "gzip"
        return self._request("POST", self._base_path + POST_PATH, body, headers)

    def get(self, event: bytes, stm_ms: int) -> Response:
        """GET ``/i`` with the event's fields plus ``stm`` as the query string.

        Raises ValidationError if ``event`` is not a JSON object text: that is a bad
        row to dead-letter, not network trouble.
        """
        fields = _event_fields(event)
        fields["stm"] = str(stm_ms)
        path = self._base_path + GET_PATH + "?" + urllib.parse.urlencode(fields)
        return self._request("GET", path, None, self._headers)

    def close(self) -> None:
        """Close every pooled connection. The Transport must not be used afterwards."""
        self._pool.clear()

    def __enter__(self) -> "Transport":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(
        self, method: str, path: str, body: Optional[bytes], headers: Dict[str, str]
    ) -> Response:
        sent = len(body) if body is not None else 0
        start = self._clock()
        for attempt in (1, 2):
            try:
                # preload_content reads the whole (small) answer, which returns the
                # connection to the pool for keep-alive reuse.
                r = self._host_pool.urlopen(
                    method, path, body=body, headers=headers,
                    retries=False, redirect=False, preload_content=True,
                )
            except (u3.HTTPError, OSError) as exc:
                if attempt == 1 and _stale_keep_alive(exc):
                    # The collector closed an idle pooled connection as we reused it:
                    # no answer was started, so try once more on a fresh connection
                    # (at worst a duplicate, which at-least-once delivery allows).
                    continue
                return Response(None, None, _describe(exc), self._clock() - start, sent,
                                attempt)
            return Response(r.status, r.headers.get("Retry-After"), None,
                            self._clock() - start, sent, attempt)
        raise AssertionError("unreachable")  # pragma: no cover


def _stale_keep_alive(exc: BaseException) -> bool:
    """A reused connection that the server had already closed: closed or reset before
    any byte of an answer arrived."""
    import http.client

    reason = exc.args[1] if isinstance(exc, u3.ProtocolError) and len(exc.args) > 1 else None
    return isinstance(reason, (http.client.RemoteDisconnected, ConnectionResetError,
                               BrokenPipeError))


def _event_fields(event: bytes) -> Dict[str, str]:
    try:
        obj = json.loads(event)
    except (ValueError, UnicodeDecodeError):
        raise ValidationError("payload", "must be UTF-8 JSON text") from None
    if not isinstance(obj, dict):
        raise ValidationError("payload", "must be a JSON object")
    # Values are strings by contract; a stray non-string goes as its JSON text.
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in obj.items()}


def _describe(exc: BaseException) -> str:
    """``"<kind>: <detail>"`` for a failed request; see ``Response.error``."""
    # NewConnectionError subclasses ConnectTimeoutError, so test it first.
    if isinstance(exc, u3.NewConnectionError):
        kind = "connect"
    elif isinstance(exc, (u3.TimeoutError, TimeoutError)):
        kind = "timeout"
    elif isinstance(exc, u3.SSLError):
        kind = "tls"
    elif isinstance(exc, u3.ProtocolError):
        kind = "protocol"
    elif isinstance(exc, u3.HTTPError):
        kind = "protocol"
    else:
        kind = "io"
    return f"{kind}: {exc}"


__all__ = ["Transport", "Response", "POST_PATH", "GET_PATH", "POST_CONTENT_TYPE"]
