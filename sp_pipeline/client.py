"""``Client``: what an application calls. Validate, encode, push over ZeroMQ, confirm.

``track()`` builds the tracker-protocol payload(s), JSON-encodes them, wraps them in one
EVENTS frame (``wire.py``) and hands it to ZeroMQ without waiting on the network. Each
frame stays in the client's *pending* table until the writer acknowledges that the
transaction holding it has committed; ``flush()`` waits for that. The pending table is
the client's bounded buffer: when it is full (the writer is down or slower than the app),
``track()`` raises ``BufferFull`` rather than dropping anything silently.

Frames are numbered per producer (a random 16-byte id, new in every process). When the
writer restarts it may have lost frames that were in transit; it then asks the producer
to resend from a seq (RESEND), and ``flush()`` also resends frames that stay unconfirmed
for ``resend_after`` seconds. The writer drops frames it already committed, so a resend
never stores an event twice.

Thread-safety: one lock guards the socket and the pending table. Fork-safety: a child
process gets a fresh producer id, socket and empty pending table on first use; frames
pending in the parent stay the parent's to confirm.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import zmq

from . import wire
from .errors import BufferFull, ClientClosed, EventsRejected, SpPipelineError, ValidationError
from .events import SelfDescribingJson, Subject
from .payload import TrackerInfo, build, encode_event

_DRAIN_EVERY = 128  # track() calls between non-blocking reads of writer replies
# track() gathers events into one frame until it holds _BATCH_EVENTS events or
# _BATCH_BYTES bytes, or the first of them is _LINGER_SECONDS old: one frame per
# event would cost the app and the writer more than the event itself.
_BATCH_EVENTS = 128
_BATCH_BYTES = 64 * 1024
_LINGER_SECONDS = 0.002


@dataclass
class ClientStats:
    """Counters of one client, in this process."""

    tracked_events: int = 0
    confirmed_events: int = 0
    buffer_full: int = 0  # track() calls refused because the buffer was full
    rejected_events: int = 0  # events the writer refused (see ``rejections``)
    resent_frames: int = 0


def _check_sizes(payloads: List[Dict[str, str]], data: List[bytes], limit: int) -> None:
    """Raise ValidationError for the first payload over ``limit`` bytes, naming its
    largest field (the one to shorten)."""
    for payload, encoded in zip(payloads, data):
        if len(encoded) > limit:
            field = max(payload, key=lambda k: len(payload[k]))
            raise ValidationError(
                field, f"makes the event {len(encoded)} bytes encoded, over the "
                       f"max_event_bytes limit of {limit} (this field is "
                       f"{len(payload[field])} characters)")


_clients: "weakref.WeakSet[Client]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for client in list(_clients):
        client._reset_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


@atexit.register
def _send_batches_at_exit() -> None:
    """An app that exits without close() still hands its last batch to ZeroMQ (whose
    linger then tries to deliver it); it cannot be confirmed, only sent."""
    for client in list(_clients):
        if client._closed or client._pid != os.getpid() or not client._batch:
            continue
        with client._lock:
            if client._sock is not None:
                client._send_batch(client._sock)


class Client:
    """Tracks events into an sp-pipeline writer.

    ``endpoint`` is the writer's ingest address (``sp-pipeline start --ingest``), e.g.
    ``ipc:///run/sp/ingest.sock``. ``max_pending_events`` / ``max_pending_bytes`` bound
    the events held until the writer confirms them. ``max_event_bytes`` is the largest
    encoded payload ``track()`` accepts (default: the writer's default
    ``max_event_bytes``; keep it at or below the writer's, which refuses a whole frame
    holding a larger event). ``curve_server_key`` (the writer's
    Z85 public key) with ``curve_public_key`` / ``curve_secret_key`` (this producer's
    pair) enable CURVE on a tcp:// endpoint.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        namespace: str,
        app_id: Optional[str] = None,
        platform: str = "srv",
        encode_base64: bool = True,
        subject: Optional[Subject] = None,
        max_pending_events: int = 100_000,
        max_pending_bytes: int = 64 << 20,
        max_event_bytes: int = 1 << 20,
        resend_after: float = 2.0,
        curve_server_key: Optional[str] = None,
        curve_public_key: Optional[str] = None,
        curve_secret_key: Optional[str] = None,
    ) -> None:
        if not isinstance(endpoint, str) or not endpoint.startswith(("ipc://", "tcp://", "inproc://")):
            raise ValidationError("endpoint", "must be a ZeroMQ address (ipc://, tcp:// or inproc://)")
        if subject is not None and not isinstance(subject, Subject):
            raise ValidationError("subject", "must be a Subject")
        for name, value in (("max_pending_events", max_pending_events),
                            ("max_pending_bytes", max_pending_bytes),
                            ("max_event_bytes", max_event_bytes)):
            if type(value) is not int or value <= 0:
                raise ValidationError(name, "must be a positive integer")
        if not resend_after > 0:
            raise ValidationError("resend_after", "must be a positive number of seconds")
        curve = (curve_server_key, curve_public_key, curve_secret_key)
        if any(curve) and not all(curve):
            raise ValidationError(
                "curve_server_key", "CURVE needs curve_server_key, curve_public_key and curve_secret_key"
            )
        self.endpoint = endpoint
        self._tracker = TrackerInfo(namespace=namespace, app_id=app_id, platform=platform,
                                    encode_base64=encode_base64)
        self._subject = subject
        self._max_events = max_pending_events
        self._max_bytes = max_pending_bytes
        self._max_event_bytes = max_event_bytes
        self._resend_after = resend_after
        self._curve = curve if all(curve) else None
        self.stats = ClientStats()
        self._closed = False
        self._init_process_state()
        _clients.add(self)

    # ------------------------------------------------------------------ public

    def track(
        self,
        event: object,
        *,
        subject: Optional[Subject] = None,
        contexts: Sequence[SelfDescribingJson] = (),
    ) -> str:
        """Validate and queue one event; return its ``eid`` (a transaction's ``tr`` eid).

        Never waits on the network. Raises ``ValidationError`` for invalid input,
        ``BufferFull`` when the bounded buffer is full, ``ClientClosed`` after close().
        """
        payloads = build(
            event,
            self._tracker,
            client_subject=self._subject,
            subject=subject,
            contexts=contexts,
            now_ms=int(time.time() * 1000),
        )
        data = [encode_event(p) for p in payloads]
        nbytes = sum(map(len, data))
        if nbytes > self._max_event_bytes:  # a total under the limit: none is over it
            _check_sizes(payloads, data, self._max_event_bytes)
        with self._lock:
            sock = self._sock or self._socket()
            self._tracks += 1
            if self._tracks % _DRAIN_EVERY == 0:
                self._drain(sock)
            if not self._has_room(len(data), nbytes):
                self._drain(sock)
                if not self._has_room(len(data), nbytes):
                    self.stats.buffer_full += 1
                    raise BufferFull(
                        f"{self._pending_events + len(self._batch)} events wait for the "
                        f"writer at {self.endpoint}; the buffer holds {self._max_events} "
                        f"events / {self._max_bytes} bytes"
                    )
            started = not self._batch
            self._batch.extend(data)
            self._batch_bytes += nbytes
            self.stats.tracked_events += len(data)
            if len(self._batch) >= _BATCH_EVENTS or self._batch_bytes >= _BATCH_BYTES:
                self._send_batch(sock)
            elif started:
                self._batch_since = time.monotonic()
                self._wake_linger()
        return payloads[0]["eid"]

    def flush(self, timeout: float = 10.0) -> None:
        """Return once the writer has confirmed every event tracked so far by this
        client (in this process) as committed.

        Raises ``FlushTimeout`` when ``timeout`` seconds pass first, and
        ``EventsRejected`` if the writer refused some frames since the last flush.
        """
        from .errors import FlushTimeout

        deadline = time.monotonic() + timeout
        with self._lock:
            sock = self._socket()
            if self._batch and not self._send_batch(sock):
                # ZeroMQ's queue is full: what is sent below confirms first.
                self._send_batch_until(sock, deadline)
            target = self._seq
            if self._batch:  # still not sent at the deadline: it cannot be confirmed
                waiting = len(self._batch) + sum(len(evs) for evs in self._pending.values())
                raise FlushTimeout(waiting, timeout)
        while True:
            with self._lock:
                sock = self._socket()
                self._drain(sock)
                if self._rejections:
                    rejections, self._rejections = self._rejections, {}
                    raise EventsRejected(rejections)
                first = self._lowest_pending()
                if first is None or first > target:
                    return
                now = time.monotonic()
                if now - self._last_progress >= self._resend_after:
                    self._resend(sock, first, target)
                remaining = deadline - now
                if remaining <= 0:
                    waiting = sum(len(evs) for s, evs in self._pending.items() if s <= target)
                    raise FlushTimeout(waiting, timeout)
                # Poll in short slices so other threads can track() meanwhile.
                sock.poll(max(1, int(min(remaining, 0.005) * 1000)), zmq.POLLIN)

    @property
    def pending_events(self) -> int:
        """Events tracked by this process and not yet confirmed by the writer."""
        return self._pending_events + len(self._batch)

    def close(self, timeout: Optional[float] = 5.0) -> None:
        """Flush (unless ``timeout`` is None), then close the socket. Idempotent.

        Raises FlushTimeout after closing if the writer did not confirm everything.
        """
        if self._closed:
            return
        try:
            if timeout is not None and self.pending_events and os.getpid() == self._pid:
                self.flush(timeout)
        finally:
            with self._lock:
                self._closed = True
                self._wake.notify_all()
                if self._sock is not None and os.getpid() == self._pid:
                    self._sock.close(linger=0)
                self._sock = None
            _clients.discard(self)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(timeout=5.0 if exc_type is None else None)

    # ------------------------------------------------------------------ internals

    def _init_process_state(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)  # tells the linger thread a batch began
        self._linger_thread: Optional[threading.Thread] = None
        self._batch: List[bytes] = []  # tracked, not yet in a frame
        self._batch_bytes = 0
        self._batch_since = 0.0
        self._pid = os.getpid()
        self._sock: Optional[zmq.Socket] = None
        self._producer_id = os.urandom(wire.PRODUCER_ID_BYTES)
        self._seq = 0
        self._low = 1  # no pending seq is below this
        self._pending: Dict[int, List[bytes]] = {}
        self._pending_events = 0
        self._pending_bytes = 0
        self._rejections: Dict[int, str] = {}
        self._tracks = 0
        self._last_progress = time.monotonic()

    def _has_room(self, events: int, nbytes: int) -> bool:
        return (self._pending_events + len(self._batch) + events <= self._max_events
                and self._pending_bytes + self._batch_bytes + nbytes <= self._max_bytes)

    def _send_batch(self, sock: zmq.Socket) -> bool:
        """Send the batch as one EVENTS frame (lock held). False if ZeroMQ's queue is
        full: the batch stays, counted against the buffer, and goes out later."""
        if not self._batch:
            return True
        base = self._lowest_pending()  # before this frame's seq exists
        seq = self._seq + 1
        data = self._batch
        try:
            sock.send(wire.encode_events(self._producer_id, seq, base or seq, data), zmq.NOBLOCK)
        except zmq.Again:
            return False
        self._seq = seq
        self._pending[seq] = data
        self._pending_events += len(data)
        self._pending_bytes += self._batch_bytes
        self._batch = []
        self._batch_bytes = 0
        return True

    def _send_batch_until(self, sock: zmq.Socket, deadline: float) -> None:
        while not self._send_batch(sock) and time.monotonic() < deadline:
            self._drain(sock)
            sock.poll(5, zmq.POLLOUT)

    def _wake_linger(self) -> None:
        """Make sure this process's linger thread runs, and tell it a batch began."""
        thread = self._linger_thread
        if thread is None or not thread.is_alive():
            thread = threading.Thread(target=_linger, args=(weakref.ref(self),),
                                      name="sp-pipeline-linger", daemon=True)
            self._linger_thread = thread
            thread.start()
        self._wake.notify()

    def _lowest_pending(self) -> Optional[int]:
        """The lowest unconfirmed seq, or None. ``next(iter(dict))`` would be O(n) here:
        confirmations delete from the front and the dict skips its dead slots one by one."""
        low, pending, last = self._low, self._pending, self._seq
        while low <= last and low not in pending:
            low += 1
        self._low = low
        return low if low <= last else None

    def _reset_after_fork(self) -> None:
        # The parent's socket and context must not be touched in the child; drop them.
        self._init_process_state()

    def _socket(self) -> zmq.Socket:
        if self._closed:
            raise ClientClosed("the client is closed")
        if self._sock is None:
            ctx = zmq.Context.instance()
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 1000)
            sock.setsockopt(zmq.SNDHWM, max(1000, self._max_events))
            sock.setsockopt(zmq.RCVHWM, 0)
            if self._curve:
                server, public, secret = self._curve
                sock.curve_serverkey = server.encode()
                sock.curve_publickey = public.encode()
                sock.curve_secretkey = secret.encode()
            sock.connect(self.endpoint)
            self._sock = sock
        return self._sock

    def _drain(self, sock: zmq.Socket) -> None:
        """Handle every writer reply already received, without blocking."""
        while True:
            try:
                frame = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                reply = wire.decode_producer_reply(frame)
            except SpPipelineError:
                continue  # not from a writer we understand; nothing to confirm
            self._handle(sock, reply)

    def _handle(self, sock: zmq.Socket, reply: list) -> None:
        op = reply[0]
        if op == wire.OP_ACK and len(reply) == 2:
            for first, last in reply[1]:
                self._confirm(range(first, last + 1))
        elif op == wire.OP_RESEND and len(reply) == 2:
            self._resend(sock, reply[1], self._seq)
        elif op == wire.OP_REJECT and len(reply) == 3:
            seq, reason = reply[1], reply[2]
            events = self._pending.get(seq)
            if events is not None:
                self._rejections[seq] = str(reason)
                self.stats.rejected_events += len(events)
                self._confirm((seq,), confirmed=False)

    def _confirm(self, seqs, confirmed: bool = True) -> None:
        pending = self._pending
        for seq in seqs:
            events = pending.pop(seq, None)
            if events is None:
                continue
            n = len(events)
            self._pending_events -= n
            self._pending_bytes -= sum(map(len, events))
            if confirmed:
                self.stats.confirmed_events += n
        self._last_progress = time.monotonic()

    def _resend(self, sock: zmq.Socket, from_seq: int, to_seq: int) -> None:
        """Send pending frames from ``from_seq`` to ``to_seq`` again, in order, each
        carrying the current base so a restarted writer knows where we stand."""
        base = self._lowest_pending()
        if base is None:
            return
        for seq, events in list(self._pending.items()):
            if seq < from_seq or seq > to_seq:
                continue
            try:
                sock.send(wire.encode_events(self._producer_id, seq, base, events), zmq.NOBLOCK)
            except zmq.Again:
                break
            self.stats.resent_frames += 1
        self._last_progress = time.monotonic()


def _linger(ref: "weakref.ref[Client]") -> None:
    """Send a client's batch once its first event is ``_LINGER_SECONDS`` old, so an
    app that tracks one event and goes quiet still gets it to the writer at once.
    Holds only a weak reference between rounds: a forgotten client can be collected."""
    while True:
        client = ref()
        if client is None or client._closed or client._pid != os.getpid():
            return
        with client._wake:
            if not client._batch:
                client._wake.wait(1.0)
                continue
            wait = client._batch_since + _LINGER_SECONDS - time.monotonic()
            if wait > 0:
                client._wake.wait(wait)
                continue
            sock = client._sock
            if sock is None or not client._send_batch(sock):
                client._wake.wait(_LINGER_SECONDS)  # queue full: try again shortly
        del client


__all__ = ["Client", "ClientStats", "EventsRejected"]
