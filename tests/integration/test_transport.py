"""Transport against a real HTTP(S) server on 127.0.0.1 (a tiny recording handler)."""

from __future__ import annotations

import gzip
import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import jsonschema
import pytest

from sp_pipeline import config
from sp_pipeline.batching import PAYLOAD_DATA_SCHEMA, post_body
from sp_pipeline.errors import ValidationError
from sp_pipeline.transport import POST_CONTENT_TYPE, POST_PATH, Transport

pytestmark = pytest.mark.integration

STM = 1_700_000_123_456
Reply = Tuple[int, Dict[str, str]]


@dataclass
class Seen:
    method: str
    path: str
    headers: Dict[str, str]
    body: bytes  # as decoded by the server (gunzipped when Content-Encoding: gzip)


@dataclass
class Collector:
    """What the fake collector saw, and how it answers (``reply`` may block)."""

    url: str
    requests: List[Seen] = field(default_factory=list)
    connections: int = 0
    closed: int = 0
    hang_up_after_reply: bool = False  # like a collector's idle timeout, no warning
    reply: Callable[[Seen], Reply] = lambda seen: (200, {})
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _handler(state: Collector) -> type:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive
        disable_nagle_algorithm = True  # headers and body go in two writes

        def setup(self) -> None:
            super().setup()
            with state.lock:
                state.connections += 1

        def finish(self) -> None:
            super().finish()
            with state.lock:
                state.closed += 1

        def do_POST(self) -> None:
            self._serve()

        def do_GET(self) -> None:
            self._serve()

        def _serve(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            seen = Seen(self.command, self.path, dict(self.headers), body)
            with state.lock:
                state.requests.append(seen)
            status, headers = state.reply(seen)
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")
            self.close_connection = state.hang_up_after_reply

        def log_message(self, *args: object) -> None:
            pass

    return Handler


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # failed TLS handshakes are part of the tests


def _serve(tls: Optional[ssl.SSLContext] = None) -> Iterator[Collector]:
    state = Collector(url="")
    server = QuietServer(("127.0.0.1", 0), _handler(state))
    if tls is not None:
        # Handshake in the handler thread, not in accept(), so a refused handshake
        # cannot stall the accept loop.
        server.socket = tls.wrap_socket(server.socket, server_side=True,
                                        do_handshake_on_connect=False)
    scheme = "https" if tls else "http"
    state.url = f"{scheme}://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield state
    finally:
        state.release.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def collector() -> Iterator[Collector]:
    yield from _serve()


@pytest.fixture
def transport_for(collector: Collector) -> Iterator[Callable[..., Transport]]:
    made: List[Transport] = []

    def make(**kwargs: object) -> Transport:
        t = Transport(collector.url, **kwargs)  # type: ignore[arg-type]
        made.append(t)
        return t

    yield make
    for t in made:
        t.close()


def event(i: int, **extra: str) -> bytes:
    fields = {"e": "pv", "p": "srv", "tv": "sp-pipeline-0.1.0", "eid": str(uuid.UUID(int=i)),
              "dtm": str(1_700_000_000_000 + i), "url": f"https://example.com/a?b={i}&c=d é",
              **extra}
    return json.dumps(fields, separators=(",", ":"), ensure_ascii=False).encode()


def payload_data_schema() -> dict:
    path = (resources.files("sp_pipeline") / "schemas/com.snowplowanalytics.snowplow"
            / "payload_data/jsonschema/1-0-4")
    return json.loads(path.read_text())


# ---------------------------------------------------------------- POST

def test_post_sends_the_exact_envelope_that_validates(collector, transport_for):
    events = [event(i) for i in range(3)]
    r = transport_for().post(events, STM)
    assert (r.status, r.error, r.retry_after) == (200, None, None)
    assert r.elapsed > 0 and r.sent_bytes == len(post_body(events, STM))
    [seen] = collector.requests
    assert (seen.method, seen.path) == ("POST", POST_PATH)
    assert seen.headers["Content-Type"] == POST_CONTENT_TYPE
    assert seen.headers["User-Agent"].startswith("sp-pipeline/")
    assert seen.body == post_body(events, STM)
    doc = json.loads(seen.body)
    assert doc["schema"] == PAYLOAD_DATA_SCHEMA
    jsonschema.Draft4Validator(payload_data_schema()).validate(doc["data"])
    assert [d["stm"] for d in doc["data"]] == [str(STM)] * 3
    assert [{k: v for k, v in d.items() if k != "stm"} for d in doc["data"]] == [
        json.loads(e) for e in events
    ]


def test_post_gzip(collector, transport_for):
    events = [event(i) for i in range(50)]
    r = transport_for(gzip=True).post(events, STM)
    assert r.status == 200
    [seen] = collector.requests
    assert seen.headers["Content-Encoding"] == "gzip"
    assert seen.body == post_body(events, STM)  # the server gunzipped it
    assert r.sent_bytes < len(seen.body) // 3


def test_keep_alive_reuses_one_connection(collector, transport_for):
    t = transport_for(maxsize=1)
    statuses = [t.post([event(i)], STM + i).status for i in range(5)]
    assert statuses == [200] * 5
    assert collector.connections == 1


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


def test_connection_the_collector_dropped_is_not_reused(collector, transport_for):
    collector.hang_up_after_reply = True
    t = transport_for(maxsize=1)
    assert t.post([event(1)], STM).status == 200
    wait_for(lambda: collector.closed == 1)
    r = t.post([event(2)], STM)
    assert (r.status, r.error) == (200, None)
    assert collector.connections == 2


def test_threads_share_one_transport(collector, transport_for):
    t = transport_for(maxsize=4)
    results: List[Optional[int]] = []
    lock = threading.Lock()

    def work(k: int) -> None:
        for i in range(10):
            status = t.post([event(k * 100 + i)], STM).status
            with lock:
                results.append(status)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(10)
    assert results == [200] * 40
    assert len(collector.requests) == 40
    assert 1 <= collector.connections <= 4


def test_send_uses_the_configured_method(collector, transport_for):
    assert [r.status for r in transport_for().send([event(1), event(2)], STM)] == [200]
    assert [r.status for r in transport_for(method="get").send([event(1), event(2)], STM)] == [200, 200]
    assert [s.method for s in collector.requests] == ["POST", "GET", "GET"]


# ---------------------------------------------------------------- GET

def test_get_query_decodes_back_to_the_event_plus_stm(collector, transport_for):
    ev = event(7, page="Tïtle & more=+%")
    r = transport_for(method="get").get(ev, STM)
    assert r.status == 200 and r.sent_bytes == 0
    [seen] = collector.requests
    path, _, query = seen.path.partition("?")
    assert (seen.method, path, seen.body) == ("GET", "/i", b"")
    decoded = dict(urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=True))
    assert decoded == {**json.loads(ev), "stm": str(STM)}


def test_get_rejects_a_payload_that_is_not_a_json_object(collector, transport_for):
    t = transport_for(method="get")
    for bad in (b"[1,2]", b"{not json", b"\xff\xfe"):
        with pytest.raises(ValidationError):
            t.get(bad, STM)
    assert collector.requests == []


# ---------------------------------------------------------------- trouble

def test_read_timeout_gives_no_status_quickly(collector, transport_for):
    def stall(seen: Seen) -> Reply:
        collector.release.wait(10)  # set at teardown, so the handler thread ends
        return 200, {}

    collector.reply = stall
    t0 = time.monotonic()
    r = transport_for(read_timeout=0.3).post([event(1)], STM)
    took = time.monotonic() - t0
    assert r.status is None and r.error_kind == "timeout", r.error
    assert 0.25 <= r.elapsed < 2.0 and took < 2.0


def test_connection_refused_gives_no_status():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound, never listening: connects are refused
        port = s.getsockname()[1]
        with Transport(f"http://127.0.0.1:{port}") as t:
            r = t.post([event(1)], STM)
            g = t.get(event(1), STM)
    assert (r.status, r.error_kind) == (None, "connect"), r.error
    assert "refused" in (r.error or "").lower()
    assert g.status is None


def test_server_that_closes_without_answering_gives_no_status():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]

        listener.settimeout(10)
        accepted = []

        def slam() -> None:
            # Twice: a connection closed before any answer byte is retried once, on a
            # fresh connection, in case it was a stale keep-alive one.
            for _ in range(2):
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                accepted.append(conn)
                conn.recv(65536)
                conn.close()

        th = threading.Thread(target=slam)
        th.start()
        with Transport(f"http://127.0.0.1:{port}", read_timeout=5.0) as t:
            r = t.post([event(1)], STM)
        th.join(5)
    assert r.status is None and r.error_kind in ("protocol", "io"), r.error
    assert len(accepted) == 2  # one retry, not more
    assert r.attempts == 2  # and it says so, for the sender's metrics


def test_503_with_retry_after_is_surfaced(collector, transport_for):
    collector.reply = lambda seen: (503, {"Retry-After": "7"})
    r = transport_for().post([event(1)], STM)
    assert (r.status, r.retry_after, r.error) == (503, "7", None)


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_redirects_are_not_followed(collector, transport_for, status):
    collector.reply = lambda seen: (
        (status, {"Location": "/elsewhere"}) if seen.path == POST_PATH else (200, {})
    )
    r = transport_for().post([event(1)], STM)
    assert r.status == status
    assert [s.path for s in collector.requests] == [POST_PATH]


def test_from_settings(collector):
    s = config.defaults().replace(collector=collector.url + "/", method="get", inflight=3,
                                  gzip=True, ca_bundle="")
    with Transport.from_settings(s) as t:
        assert (t.collector_url, t.method, t.gzip) == (collector.url, "get", True)
        assert t.get(event(1), STM).status == 200


# ---------------------------------------------------------------- TLS

def _openssl(tmp: str, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=tmp, check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Dict[str, str]:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command line tool is not installed")
    tmp = str(tmp_path_factory.mktemp("pki"))
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl(tmp, "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=sp-pipeline test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    _openssl(tmp, "req", *ec, "-keyout", "server.key", "-out", "server.csr",
             "-subj", "/CN=127.0.0.1")
    with open(f"{tmp}/ext.cnf", "w") as fh:
        fh.write("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                 "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
                 "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n")
    _openssl(tmp, "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf")
    return {"ca": f"{tmp}/ca.pem", "cert": f"{tmp}/server.pem", "key": f"{tmp}/server.key"}


@pytest.fixture
def tls_collector(pki) -> Iterator[Collector]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki["cert"], pki["key"])
    yield from _serve(ctx)


def test_https_private_ca_refused_without_bundle(tls_collector):
    with Transport(tls_collector.url) as t:
        r = t.post([event(1)], STM)
    assert (r.status, r.error_kind) == (None, "tls"), r.error
    assert "certificate" in (r.error or "").lower()
    assert tls_collector.requests == []


def test_https_private_ca_accepted_with_bundle(tls_collector, pki):
    with Transport(tls_collector.url, ca_bundle=pki["ca"]) as t:
        r = t.post([event(1)], STM)
        g = t.get(event(2), STM)
    assert (r.status, g.status) == (200, 200), (r.error, g.error)
    assert [s.method for s in tls_collector.requests] == ["POST", "GET"]


def test_https_wrong_host_is_refused_even_with_bundle(tls_collector, pki):
    # The certificate names 127.0.0.1 only; "localhost" must fail hostname checking.
    url = tls_collector.url.replace("127.0.0.1", "localhost")
    with Transport(url, ca_bundle=pki["ca"]) as t:
        r = t.post([event(1)], STM)
    assert (r.status, r.error_kind) == (None, "tls"), r.error
    assert "hostname" in (r.error or "").lower()
    assert tls_collector.requests == []
