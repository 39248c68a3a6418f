"""Test helper: a stand-in writer that receives and decodes producer frames.

    with FrameReceiver(endpoint, ack=True) as rx:
        client.track(...)
        frames = rx.wait_for_events(n, timeout=5)

It binds a ROUTER socket, decodes every EVENTS frame with ``wire.decode_events`` and
(optionally) acknowledges each one at once, so ``Client.flush()`` returns. It never
commits anything: it is for testing the client and the wire format, not durability.
"""

from __future__ import annotations

import json
import threading
import time
from typing import List

import zmq

from sp_pipeline import wire


class FrameReceiver:
    def __init__(self, endpoint: str, *, ack: bool = True) -> None:
        self.endpoint = endpoint
        self.ack = ack
        self.frames: List[wire.EventsFrame] = []
        self.routing_ids: List[bytes] = []
        self.errors: List[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(endpoint)
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> "FrameReceiver":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close(linger=0)
        self._ctx.term()

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self._sock.poll(20, zmq.POLLIN):
                continue
            routing_id, frame = self._sock.recv_multipart()
            try:
                f = wire.decode_events(frame, max_frame_bytes=1 << 24, max_events=100_000)
            except Exception as exc:  # recorded for the test to assert on
                with self._lock:
                    self.errors.append(str(exc))
                continue
            with self._lock:
                self.frames.append(f)
                self.routing_ids.append(routing_id)
            if self.ack:
                self._sock.send_multipart([routing_id, wire.encode_ack([(f.seq, f.seq)])])

    def events(self) -> List[dict]:
        with self._lock:
            return [json.loads(ev) for f in self.frames for ev in f.events]

    def wait_for_events(self, n: int, timeout: float = 10.0) -> List[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            evs = self.events()
            if len(evs) >= n:
                return evs
            time.sleep(0.005)  # polling interval of a deadline-bound wait
        raise AssertionError(f"expected {n} events, got {len(self.events())} in {timeout} s")
