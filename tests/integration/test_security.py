"""Closed by default (DESIGN invariant 9): CURVE on tcp ingest, a private run directory,
no event contents in the logs."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys

import pytest

from sp_pipeline import Client
from sp_pipeline.curve import keypair, public_key
from sp_pipeline.errors import FlushTimeout
from sp_pipeline.events import StructuredEvent
from tests.writer_process import count_rows

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def curve_writer(writer_dir, short_dir):
    server_public, server_secret = keypair()
    allowed_public, allowed_secret = keypair()
    keys_file = os.path.join(short_dir, "producers.keys")
    with open(keys_file, "w") as fh:
        fh.write(f"# the one producer allowed in\n{allowed_public}\n")
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    writer = writer_dir(ingest=endpoint, ingest_curve_secret_key=server_secret,
                        ingest_curve_client_keys=keys_file).start()
    return writer, server_public, (allowed_public, allowed_secret)


def test_curve_admits_the_listed_producer_only(curve_writer):
    writer, server_public, (pub, sec) = curve_writer
    assert public_key(sec) == pub
    with Client(writer.ingest, namespace="ok", curve_server_key=server_public,
                curve_public_key=pub, curve_secret_key=sec) as client:
        client.track(StructuredEvent("curve", "allowed"))
        client.flush(10)
    stranger_pub, stranger_sec = keypair()
    stranger = Client(writer.ingest, namespace="no", curve_server_key=server_public,
                      curve_public_key=stranger_pub, curve_secret_key=stranger_sec)
    stranger.track(StructuredEvent("curve", "stranger"))
    with pytest.raises(FlushTimeout):
        stranger.flush(1.5)
    stranger.close(timeout=None)
    plain = Client(writer.ingest, namespace="no")  # no CURVE at all
    plain.track(StructuredEvent("curve", "plain"))
    with pytest.raises(FlushTimeout):
        plain.flush(1.5)
    plain.close(timeout=None)
    assert count_rows(writer.store) == 1
    assert writer.alive()
    assert "not allowed" in writer.log()


def test_a_bad_client_key_file_stops_the_writer_with_a_config_error(writer_dir, short_dir):
    bad = os.path.join(short_dir, "bad.keys")
    with open(bad, "w") as fh:
        fh.write("too-short\n")
    _, secret = keypair()
    w = writer_dir(ingest=f"tcp://127.0.0.1:{_free_port()}", ingest_curve_secret_key=secret,
                   ingest_curve_client_keys=bad).start(wait_ready=False)
    assert w.proc.wait(20) == 78
    assert "line 1" in w.log()


def test_tcp_ingest_on_a_public_address_is_refused_unless_allowed():
    out = subprocess.run([sys.executable, "-m", "sp_pipeline.cli", "check-config",
                          "--ingest", "tcp://0.0.0.0:5555"], capture_output=True, text=True)
    assert out.returncode == 78
    assert "loopback" in out.stderr
    out = subprocess.run([sys.executable, "-m", "sp_pipeline.cli", "check-config",
                          "--ingest", "tcp://0.0.0.0:5555", "--ingest-allow-remote", "true"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_run_directory_is_private_and_the_socket_lives_inside(writer_dir):
    w = writer_dir().start()
    run_dir = os.path.dirname(w.ingest[len("ipc://"):])
    assert stat.S_IMODE(os.stat(run_dir).st_mode) == 0o700


def test_other_users_cannot_reach_the_ipc_socket(writer_dir):
    if os.geteuid() != 0:
        pytest.skip("needs root to become another user")
    w = writer_dir().start()
    os.chmod(os.path.dirname(w.settings.run_dir), 0o755)  # only the run dir itself protects
    pid = os.fork()
    if pid == 0:  # child: become nobody, then try to deliver one event
        code = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            client = Client(w.ingest, namespace="x")
            client.track(StructuredEvent("intruder", "try"))
            try:
                client.flush(2)
                code = 0
            except FlushTimeout:
                code = 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 3  # the 0700 run dir kept it out
    assert count_rows(w.store) == 0


def test_event_contents_never_reach_the_log(writer_dir):
    import zmq

    from sp_pipeline import wire

    secret = "s3cr3t-card-4111111111111111"
    w = writer_dir(log_level="debug").start()
    with Client(w.ingest, namespace="ns") as client:
        client.track(StructuredEvent("pay", "card", label=secret))
        client.flush(10)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(w.ingest)
    bad = [
        ('{"e":"se","p":"srv","tv":"t","nope":"%s"}' % secret).encode(),  # unknown key
        b'{"e":"se","p":"srv","tv":"t","se_la":111}',  # not a string
        ('{"e":"se","p":"srv","tv":"t","se_la":"%s"' % secret).encode(),  # not JSON
    ]
    for seq, ev in enumerate(bad, 1):
        sock.send(wire.encode_events(os.urandom(16), seq, seq, [ev]))
    from sp_pipeline.testing import wait_until

    wait_until(lambda: "rejected" in w.log(), 10, "a rejection logged")
    sock.close(0)
    ctx.term()
    assert secret not in w.log()


def test_client_key_file_keeps_keys_containing_a_hash(short_dir):
    from sp_pipeline.curve import read_client_keys

    keys = ["a#" + "b" * 38, "#" + "c" * 39]  # '#' is a Z85 digit, even the first
    path = os.path.join(short_dir, "keys")
    with open(path, "w") as fh:
        fh.write(f"# comment line\n\n{keys[0]}\n{keys[1]}\n")
    assert read_client_keys(path) == frozenset(k.encode() for k in keys)
