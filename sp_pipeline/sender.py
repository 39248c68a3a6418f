"""The sender role: lease batches from the writer, deliver them, report the outcome.

One sender process runs ``inflight`` request threads sharing one urllib3 pool
(``transport.Transport``) and one ``retry.Pause``. Each thread owns a DEALER socket
to the writer's lease endpoint (ZeroMQ sockets are not shared between threads) and
loops: wait for the pause gate, LEASE, send, then ACK (2xx), RELEASE with a retry time
(5xx, 408, 429, no answer) or DEAD (non-retryable status, retry budget spent). A 413
to a batch of several events halves this sender's byte limit and sends them again;
only an event too large on its own is dead-lettered with ``status_413``. Reports
are fire-and-forget: if one is lost (writer restart) the rows are delivered again,
never lost (at-least-once, DESIGN invariant 3).

SIGTERM: threads finish the request in hand, report it, and the process exits.
"""

from __future__ import annotations

import logging
import random
import signal
import threading
import time
from typing import List, NamedTuple, Optional, Sequence, Tuple

import zmq

from . import batching, exitcodes, wire
from .config import Settings
from .errors import FrameError, ValidationError
from .retry import Outcome, Pause, RetryPolicy, parse_retry_after
from .transport import Response, Transport

log = logging.getLogger("sp_pipeline.sender")

LEASE_WAIT_MS = 1000  # how long the writer may hold an empty lease request
_MIN_BYTE_LIMIT = 200  # the smallest byte_limit the configuration accepts
_REPLY_GRACE_S = 3.0  # beyond LEASE_WAIT_MS before a lease request counts as lost


class Row(NamedTuple):
    id: int
    payload: bytes
    enqueued_at: float
    attempts: int


class LeaseClient:
    """One thread's connection to the writer's lease socket."""

    def __init__(self, ctx: zmq.Context, endpoint: str) -> None:
        self.ctx = ctx
        self.endpoint = endpoint
        self.sock: Optional[zmq.Socket] = None
        self.req_id = 0
        self._connect()

    def _connect(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 2000)
        self.sock.connect(self.endpoint)

    def _send(self, op: str, *args) -> int:
        self.req_id += 1
        try:
            self.sock.send(wire.encode_request(op, self.req_id, *args), zmq.NOBLOCK)
        except zmq.Again:
            pass  # writer unreachable and queue full: the lease will expire
        return self.req_id

    def lease(self, max_events: int, max_bytes: int, wait_ms: int) -> Optional[Tuple[int, List[Row]]]:
        """(lease_id, rows), rows possibly empty; None when the writer did not answer."""
        req = self._send(wire.OP_LEASE, max_events, max_bytes, wait_ms)
        deadline = time.monotonic() + wait_ms / 1000 + _REPLY_GRACE_S
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.sock.poll(int(remaining * 1000) + 1, zmq.POLLIN):
                self._connect()  # drop anything queued for a writer that went away
                return None
            try:
                reply = wire.decode_reply(self.sock.recv())
            except FrameError:
                continue
            if reply[0] == wire.OP_BATCH and reply[1] == req:
                lease_id, rows = reply[2], reply[3]
                return lease_id, [Row(r[0], r[1], r[2] / 1000, r[3]) for r in rows]
            # Anything else is the DONE of an earlier report: nothing to do.

    def ack(self, lease_id: int, ids: List[int]) -> None:
        self._send(wire.OP_LEASE_ACK, lease_id, ids)

    def release(self, lease_id: int, ids: List[int], retry_at: float, status: int) -> None:
        self._send(wire.OP_RELEASE, lease_id, ids, int(retry_at * 1000), status)

    def dead(self, lease_id: int, ids: List[int], reason: str, status: int) -> None:
        self._send(wire.OP_DEAD, lease_id, ids, reason, status)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()  # linger lets the last reports reach the writer
            self.sock = None


class Sender:
    def __init__(self, settings: Settings, transport: Transport, ctx: zmq.Context,
                 clock=time.time) -> None:
        from . import metrics

        self.s = settings
        self.transport = transport
        self.ctx = ctx
        self.clock = clock
        self.policy = RetryPolicy.from_settings(settings)
        self.rng = random.Random()
        self.pause = Pause(self.policy, random.Random())
        self.byte_limit = settings.byte_limit  # lowered when the collector answers 413
        self.stop = threading.Event()
        self.m = metrics
        for outcome in ("delivered", "retried", "dead_lettered"):
            metrics.SENDER_EVENTS.labels(outcome)  # series exist (at 0) from the start
        self._delivered = metrics.SENDER_EVENTS.labels("delivered")
        self._requests_by_code: dict = {}  # status code -> its SENDER_REQUESTS child

    def run_thread(self) -> None:
        lc = LeaseClient(self.ctx, self.s.lease_endpoint)
        try:
            while not self.stop.is_set():
                wait = self.pause.wait(self.clock())
                if wait > 0:
                    self.stop.wait(min(wait, 1.0))
                    continue
                got = lc.lease(self.s.batch_max_events, self.byte_limit, LEASE_WAIT_MS)
                if got is None:
                    self.stop.wait(0.2)  # writer away: do not spin while it restarts
                    continue
                lease_id, rows = got
                if rows:
                    self.deliver(lc, lease_id, rows)
        finally:
            lc.close()

    def deliver(self, lc: LeaseClient, lease_id: int, rows: Sequence[Row]) -> None:
        self.m.SENDER_INFLIGHT.inc()
        try:
            if self.s.method == "post":
                resp = self.transport.post([r.payload for r in rows], int(self.clock() * 1000))
                if resp.status is not None and 200 <= resp.status <= 299:
                    self._observe(resp, len(rows))  # the common case: no per-row decisions
                    self.pause.observe(Outcome.DELIVERED, now=self.clock())
                    self._ack(lc, lease_id, rows)
                elif resp.status == 413 and len(rows) > 1:
                    self._observe(resp, len(rows))
                    self._shrink(lc, lease_id, rows)
                else:
                    self._settle(lc, lease_id, rows, resp)
            else:
                self._deliver_get(lc, lease_id, rows)
        finally:
            self.m.SENDER_INFLIGHT.dec()

    def _deliver_get(self, lc: LeaseClient, lease_id: int, rows: Sequence[Row]) -> None:
        delivered: List[Row] = []
        for i, row in enumerate(rows):
            try:
                resp = self.transport.get(row.payload, int(self.clock() * 1000))
            except ValidationError as exc:
                lc.dead(lease_id, [row.id], "invalid_payload", 0)
                self._count_dead("invalid_payload", 1)
                log.warning("dead-lettered row %d: %s", row.id, exc)
                continue
            if self.policy.classify(resp.status) is Outcome.DELIVERED:
                self._observe(resp, 1)
                delivered.append(row)
                continue
            # The collector refused or is away: settle this row and everything unsent
            # with the same answer rather than hammering it row by row.
            if delivered:
                self._ack(lc, lease_id, delivered)
                delivered = []
            self._settle(lc, lease_id, rows[i:], resp)
            return
        if delivered:
            self.pause.observe(Outcome.DELIVERED, now=self.clock())
            self._ack(lc, lease_id, delivered)

    def _settle(self, lc: LeaseClient, lease_id: int, rows: Sequence[Row], resp: Response) -> None:
        now = self.clock()
        retry_after = parse_retry_after(resp.retry_after, now)
        self._observe(resp, len(rows))
        decision = self.policy.decide_batch(resp.status, rows, now=now,
                                            retry_after=retry_after, rng=self.rng)
        self.pause.observe(self.policy.classify(resp.status), now=now, retry_after=retry_after)
        if decision.delivered:
            self._ack(lc, lease_id, decision.delivered)
        if decision.retry:
            lc.release(lease_id, [r.id for r in decision.retry], decision.retry_at,
                       resp.status or 0)
            self.m.SENDER_EVENTS.labels("retried").inc(len(decision.retry))
            self.m.SENDER_BACKOFF_SECONDS.observe(decision.delay or 0.0)
            log.info("collector answered %s (%s): %d events retry in %.1f s",
                     resp.status, resp.error or "", len(decision.retry), decision.delay or 0)
        for reason, group in decision.dead:
            lc.dead(lease_id, [r.id for r in group], reason, resp.status or 0)
            self._count_dead(reason, len(group))
            log.warning("dead-lettered %d events: %s", len(group), reason)

    def _shrink(self, lc: LeaseClient, lease_id: int, rows: Sequence[Row]) -> None:
        """The collector refused the body as too large (413): its limit is below our
        byte_limit. Halve this sender's limit and send the rows again at once, in
        smaller batches; only an event too large on its own is dead-lettered."""
        size = batching.post_size(len(r.payload) for r in rows)
        new_limit = max(_MIN_BYTE_LIMIT, min(self.byte_limit, size // 2))
        if new_limit < self.byte_limit:
            log.warning("collector answered 413 to a %d-byte body: byte limit %d -> %d",
                        size, self.byte_limit, new_limit)
            self.byte_limit = new_limit
        lc.release(lease_id, [r.id for r in rows], self.clock(), 413)
        self.m.SENDER_EVENTS.labels("retried").inc(len(rows))

    def _ack(self, lc: LeaseClient, lease_id: int, rows: Sequence[Row]) -> None:
        lc.ack(lease_id, [r.id for r in rows])
        now = self.clock()
        self._delivered.inc(len(rows))
        self.m.observe_many(self.m.DELIVERY_LATENCY, [max(0.0, now - r.enqueued_at) for r in rows])

    def _observe(self, resp: Response, events: int) -> None:
        child = self._requests_by_code.get(resp.status)
        if child is None:
            code = str(resp.status) if resp.status is not None else "error"
            child = self._requests_by_code[resp.status] = self.m.SENDER_REQUESTS.labels(code)
        child.inc()
        if resp.attempts > 1:  # the connection died before an answer: tried again at once
            self.m.SENDER_REQUESTS.labels("reset_resent").inc(resp.attempts - 1)
        self.m.SENDER_REQUEST_SECONDS.observe(resp.elapsed)

    def _count_dead(self, reason: str, n: int) -> None:
        self.m.SENDER_EVENTS.labels("dead_lettered").inc(n)


def run(settings: Settings, index: int = 0) -> int:
    """Entry point of a sender role. Returns an exit code (``exitcodes``)."""
    try:
        transport = Transport.from_settings(settings)
    except (ValueError, OSError) as exc:
        log.error("cannot set up the HTTP transport: %s", exc)
        return exitcodes.CONFIG_ERROR
    ctx = zmq.Context()
    sender = Sender(settings, transport, ctx)

    def on_signal(signum, frame):  # record only; threads see the event
        sender.stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    threads = [threading.Thread(target=sender.run_thread, name=f"request-{i}", daemon=True)
               for i in range(settings.inflight)]
    for t in threads:
        t.start()
    log.info("sender %d delivering to %s (%s, %d in flight)", index, settings.collector,
             settings.method.upper(), settings.inflight)
    while not sender.stop.wait(0.5):
        if not any(t.is_alive() for t in threads):
            log.error("every request thread died")
            return exitcodes.ERROR
    deadline = time.monotonic() + settings.drain_timeout * 0.5
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    stuck = [t.name for t in threads if t.is_alive()]
    if stuck:
        # A thread still in a request holds its socket; terminating the context would
        # wait for it. Its lease expires and another sender delivers the batch.
        log.warning("exiting with %d request(s) unfinished: %s", len(stuck), ", ".join(stuck))
        return exitcodes.OK
    transport.close()
    ctx.term()
    return exitcodes.OK
