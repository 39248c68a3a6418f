"""The writer role: the one process that writes the store.

It binds two ROUTER sockets: *ingest* (producers' EVENTS frames) and *lease* (senders'
LEASE / ACK / RELEASE / DEAD / STATS requests, see ``wire.py``). Everything it reads goes
into one open transaction; the transaction commits when it holds ``commit_max_events``
events or is ``commit_interval_ms`` old (at once when it holds no producer events), and
only then are producers acknowledged and senders answered (DESIGN invariant 2).

A LEASE that finds nothing eligible is parked up to its ``wait_ms`` and answered as soon
as events arrive, so idle senders wait in the writer instead of polling it.

With ``when_full=block`` the writer stops reading the ingest socket while the store is at
its cap: frames wait in ZeroMQ queues and producers' bounded buffers push back.
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Deque, Dict, List, Optional, Tuple

import zmq

from . import exitcodes, wire
from .config import Settings
from .errors import ConfigError, FrameError, StoreError, StoreFull
from .ingest import DUPLICATE, EARLY, NEXT, Sequencer, merge_ranges
from .logs import RateLimited
from .payload import check_event_json
from .store.base import Store

log = logging.getLogger("sp_pipeline.writer")

_READ_BUDGET = 2000  # messages read per loop pass, so neither socket starves the other
_HOUSEKEEPING_SECONDS = 1.0
_PARKED_RECHECK_SECONDS = 0.1
_MAX_FRAME_EVENTS = 10_000
_DISK_FULL_PAUSE_SECONDS = 1.0
_CHECKPOINT_SECONDS = 1.0
_INGEST_RCVHWM = 16  # frames queued per producer connection inside the writer
_ROW_WRITE_BYTES = 128  # WAL bytes a lease, ack or release of one row costs, roughly


@dataclass
class _Parked:
    routing_id: bytes
    req_id: int
    max_events: int
    max_bytes: int
    deadline: float


class Writer:
    def __init__(self, settings: Settings, store: Store, ctx: zmq.Context,
                 clock=time.time) -> None:
        self.s = settings
        self.store = store
        self.clock = clock
        self.ctx = ctx
        self.sequencer = Sequencer(lookup=store.producer_seq)
        self.bad = RateLimited(log)
        self.stopping = False
        self._metrics = _Metrics()
        self._next_lease_id = int(clock() * 1000) & 0x7FFFFFFF
        # Open-transaction state.
        self._txn_started: Optional[float] = None
        self._txn_events = 0
        self._txn_payloads: List[bytes] = []
        self._txn_producers: Dict[bytes, int] = {}  # producer -> expected when first touched
        self._acks: Dict[bytes, List[int]] = collections.defaultdict(list)
        self._replies: List[Tuple[bytes, bytes]] = []  # (routing id, frame) on lease socket
        self._producer_replies: List[Tuple[bytes, bytes]] = []
        self._parked: Deque[_Parked] = collections.deque()
        self._last_parked_check = 0.0
        self._last_housekeeping = 0.0
        self._full_until = 0.0
        self._dirty = 0  # bytes written to the WAL since the last checkpoint, estimated
        self._last_checkpoint = 0.0
        self._max_frame = settings.max_event_bytes * 4 + (1 << 20)
        self.authenticator = None
        self.ingest: Optional[zmq.Socket] = None
        self.lease: Optional[zmq.Socket] = None
        self.totals = collections.Counter()
        self._history: Deque[Tuple[float, int, int]] = collections.deque(maxlen=61)

    # ------------------------------------------------------------------ sockets

    def bind(self) -> None:
        self.ingest = self.ctx.socket(zmq.ROUTER)
        self.ingest.setsockopt(zmq.LINGER, 0)
        self.ingest.setsockopt(zmq.MAXMSGSIZE, self._max_frame)
        # Frames hold up to 64 KiB: a small per-producer queue bounds the writer's
        # memory; beyond it producers keep frames in their own bounded buffers.
        self.ingest.setsockopt(zmq.RCVHWM, _INGEST_RCVHWM)
        self.ingest.setsockopt(zmq.ROUTER_MANDATORY, 0)
        if self.s.ingest_curve_secret_key:
            from .curve import secure_server

            self.authenticator = secure_server(self.ctx, self.ingest,
                                               self.s.ingest_curve_secret_key,
                                               self.s.ingest_curve_client_keys)
        self.ingest.bind(self.s.ingest_endpoint)
        self.lease = self.ctx.socket(zmq.ROUTER)
        self.lease.setsockopt(zmq.LINGER, 0)
        self.lease.bind(self.s.lease_endpoint)
        self.poller = zmq.Poller()
        self.poller.register(self.lease, zmq.POLLIN)
        self.poller.register(self.ingest, zmq.POLLIN)
        self._ingest_registered = True

    def close(self) -> None:
        for sock in (self.ingest, self.lease):
            if sock is not None:
                sock.close(linger=0)
        if self.authenticator is not None:
            self.authenticator.stop()

    # ------------------------------------------------------------------ loop

    def run(self) -> int:
        freed = self.store.clear_leases()
        self.store.commit()  # visible now, and the write lock is not held while idle
        if freed:
            log.info("freed %d events leased before the last stop", freed)
        self._housekeeping(self.clock())
        drain_until: Optional[float] = None
        idle_since: Optional[float] = None
        while True:
            now = self.clock()
            if self.stopping and drain_until is None:
                drain_until = now + min(2.0, self.s.drain_timeout / 2)
                log.info("stopping: committing what producers already sent")
            self._set_ingest_polling(self._has_room())
            got = self._poll_and_read(self._poll_timeout(now))
            now = self.clock()
            if self._txn_started is not None and self._should_commit(now, got):
                self._commit(now)
            if self._parked and (got or now - self._last_parked_check >= _PARKED_RECHECK_SECONDS):
                try:
                    self._serve_parked(now)
                except StoreFull as exc:
                    self._disk_full(exc)
            if now - self._last_housekeeping >= _HOUSEKEEPING_SECONDS:
                self._housekeeping(now)
            if drain_until is not None:
                idle_since = None if got else (idle_since or now)
                if now >= drain_until or (idle_since is not None and now - idle_since > 0.1):
                    if self._txn_started is not None:
                        self._commit(now)
                    self._answer_parked_empty(now, everything=True)
                    self._housekeeping(now)
                    return exitcodes.OK

    def _poll_timeout(self, now: float) -> int:
        timeout = 200.0
        if self._txn_started is not None:
            timeout = max(0.0, self.s.commit_interval_ms - (now - self._txn_started) * 1000)
        if self._parked:
            timeout = min(timeout, _PARKED_RECHECK_SECONDS * 1000)
        if self.stopping:
            timeout = min(timeout, 20.0)
        return int(timeout)

    def _poll_and_read(self, timeout_ms: int) -> int:
        ready = dict(self.poller.poll(timeout_ms))
        got = 0
        if self.lease in ready:
            got += self._read(self.lease, self._on_lease_request)
        if self.ingest in ready and self._ingest_registered:
            got += self._read(self.ingest, self._on_events, check_room=True)
        return got

    def _read(self, sock: zmq.Socket, handle, check_room: bool = False) -> int:
        n = 0
        while n < _READ_BUDGET:
            if check_room and not self._has_room():
                break
            try:
                routing_id, frame = sock.recv_multipart(zmq.NOBLOCK, copy=True)[:2]
            except zmq.Again:
                break
            except ValueError:
                continue  # fewer than two parts: nothing to answer
            n += 1
            try:
                handle(routing_id, frame)
            except StoreFull as exc:
                self._disk_full(exc)
                break
            if self._txn_events >= self.s.commit_max_events:
                break
            if (self._txn_started is not None
                    and (self.clock() - self._txn_started) * 1000 >= self.s.commit_interval_ms):
                break  # close the transaction on time: senders wait for its commit
        return n

    def _should_commit(self, now: float, got: int) -> bool:
        if self._txn_events >= self.s.commit_max_events:
            return True
        if self._txn_events == 0:
            return True  # only lease work: answer senders at once
        return (now - self._txn_started) * 1000 >= self.s.commit_interval_ms

    def _set_ingest_polling(self, on: bool) -> None:
        if on != self._ingest_registered:
            if on:
                self.poller.register(self.ingest, zmq.POLLIN)
            else:
                self.poller.unregister(self.ingest)
                log.warning("store is full (%s): not reading producers until senders free room",
                            self.s.when_full)
            self._ingest_registered = on
            self._metrics.full(not on)

    def _has_room(self) -> bool:
        if self.clock() < self._full_until:
            return False
        return self.s.when_full != "block" or self.store.has_room(len(self._txn_payloads) + 1, 1)

    def _disk_full(self, exc: StoreFull) -> None:
        """The disk (or SQLite's page limit) is full: the store rolled the transaction
        back. Producers resend what was not acknowledged; stop reading them for a while
        and retry, so the pipeline recovers by itself when space returns."""
        self._abort(f"no space left for the store, not reading producers for "
                    f"{_DISK_FULL_PAUSE_SECONDS:g} s: {exc}")
        self._full_until = self.clock() + _DISK_FULL_PAUSE_SECONDS

    # ------------------------------------------------------------------ transactions

    def _begin(self) -> None:
        if self._txn_started is None:
            self.store.begin()
            self._txn_started = self.clock()

    def _insert_pending(self, now: float) -> None:
        """Insert the events read so far in this transaction, in one statement batch
        (a per-frame insert costs more than the event's own work)."""
        if self._txn_payloads:
            self._dirty += sum(map(len, self._txn_payloads)) + _ROW_WRITE_BYTES * len(self._txn_payloads)
            result = self.store.enqueue(self._txn_payloads, now)
            self._txn_payloads = []
            if result.dropped:
                self._metrics.dropped(result.dropped)

    def _commit(self, now: float) -> None:
        started = time.perf_counter()
        try:
            self._insert_pending(now)
            for pid in self._txn_producers:
                self.store.set_producer_seq(pid, self.sequencer.last_consumed(pid), now)
            self.store.commit()
        except StoreFull as exc:
            self._disk_full(exc)
            return
        except StoreError as exc:
            self._abort(f"commit failed, transaction rolled back: {exc}")
            return
        self._metrics.commit(time.perf_counter() - started, self._txn_events)
        self._metrics.publish()
        for routing_id, seqs in self._acks.items():
            self._producer_replies.append((routing_id, wire.encode_ack(merge_ranges(seqs))))
        self._send_replies()
        self._reset_txn()
        self._maybe_checkpoint()

    def _abort(self, why: str) -> None:
        """Roll back; producers get no ack (they resend), senders' ops are dropped (their
        leases expire). Requests parked or answered from this transaction are voided."""
        log.error(why)
        try:
            self.store.rollback()
        except StoreError:
            pass
        self.sequencer.rollback(self._txn_producers)
        self._replies.clear()
        self._producer_replies.clear()
        self._reset_txn()

    def _reset_txn(self) -> None:
        self._txn_payloads = []
        self._txn_started = None
        self._txn_events = 0
        self._txn_producers = {}
        self._acks = collections.defaultdict(list)

    def _send_replies(self) -> None:
        for sock, queue in ((self.lease, self._replies), (self.ingest, self._producer_replies)):
            for routing_id, frame in queue:
                try:
                    sock.send_multipart((routing_id, frame), zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass  # peer gone: it will resend or its lease expires
            queue.clear()

    # ------------------------------------------------------------------ producers

    def _on_events(self, routing_id: bytes, frame: bytes) -> None:
        try:
            f = wire.decode_events(frame, max_frame_bytes=self._max_frame,
                                   max_events=_MAX_FRAME_EVENTS)
        except FrameError as exc:
            self._reject_frame(None, routing_id, exc.reason, str(exc))
            return
        now = self.clock()
        if f.producer_id not in self._txn_producers:
            known = self.sequencer.producers.get(f.producer_id)
            before = known.expected if known else None
        verdict = self.sequencer.classify(f.producer_id, routing_id, f.seq, f.base, now)
        if verdict == DUPLICATE:
            self._begin()
            self._acks[routing_id].append(f.seq)
            self._metrics.frames("duplicate", len(f.events))
            return
        if verdict == EARLY:
            from_seq = self.sequencer.should_ask_resend(f.producer_id, now)
            if from_seq is not None:
                self._producer_replies.append((routing_id, wire.encode_resend(from_seq)))
                if self._txn_started is None:
                    self._send_replies()
            self._metrics.frames("out_of_order", len(f.events))
            return
        assert verdict == NEXT
        self._begin()
        if f.producer_id not in self._txn_producers:
            self._txn_producers[f.producer_id] = before if before is not None else f.seq
        try:
            for ev in f.events:
                check_event_json(ev, self.s.max_event_bytes)
        except FrameError as exc:
            self._reject_frame(f.seq, routing_id, exc.reason, str(exc), len(f.events))
            return
        self._txn_payloads.extend(f.events)
        self._txn_events += len(f.events)
        self._acks[routing_id].append(f.seq)
        self._metrics.frames("accepted", len(f.events))
        self.totals["ingested"] += len(f.events)

    def _reject_frame(self, seq: Optional[int], routing_id: bytes, reason: str, detail: str,
                      events: int = 0) -> None:
        self._metrics.frames("rejected_" + reason, events)
        self.bad.warning("reject:" + reason, "rejected a producer frame: %s", detail)
        if seq is not None:
            self._producer_replies.append((routing_id, wire.encode_reject(seq, reason)))

    # ------------------------------------------------------------------ senders

    def _on_lease_request(self, routing_id: bytes, frame: bytes) -> None:
        try:
            req = wire.decode_request(frame)
        except FrameError as exc:
            self.bad.warning("lease:" + exc.reason, "bad lease request: %s", exc)
            return
        op, req_id, args = req[0], req[1], req[2:]
        now = self.clock()
        if op == wire.OP_STATS:
            self._reply_now(routing_id, wire.encode_reply(wire.OP_STATS_REPLY, req_id,
                                                          self.stats(now)))
            return
        self._begin()
        if op in (wire.OP_REQUEUE_DEAD, wire.OP_PURGE_DEAD):
            ids = args[0]
            if op == wire.OP_REQUEUE_DEAD:
                n = self.store.requeue_dead_letters(ids, now)
            else:
                n = self.store.purge_dead_letters(ids)
            log.info("%s %d dead letter(s) on request", "requeued" if op == wire.OP_REQUEUE_DEAD
                     else "purged", n)
            self._replies.append((routing_id, wire.encode_reply(wire.OP_DONE, req_id, n)))
            return
        if op == wire.OP_LEASE:
            max_events, max_bytes, wait_ms = args
            if not self._lease(routing_id, req_id, max_events, max_bytes, now):
                if wait_ms:
                    self._parked.append(_Parked(routing_id, req_id, max_events, max_bytes,
                                                now + wait_ms / 1000))
                else:  # nothing eligible and no wait asked for: say so at once
                    self._replies.append((routing_id, _empty_batch(req_id)))
            return
        lease_id, ids = args[0], args[1]
        if op == wire.OP_LEASE_ACK:
            n = self.store.ack(lease_id, ids)
            self.totals["delivered"] += n
        elif op == wire.OP_RELEASE:
            retry_at_ms = args[2]
            n = self.store.release(lease_id, ids, retry_at_ms / 1000, now)
        else:
            reason, status = str(args[2]), int(args[3]) if type(args[3]) is int else 0
            n = self.store.dead_letter(lease_id, ids, reason, status, now)
            self._metrics.dead(reason, n)
        self._dirty += _ROW_WRITE_BYTES * n
        self._replies.append((routing_id, wire.encode_reply(wire.OP_DONE, req_id, n)))

    def _lease(self, routing_id: bytes, req_id: int, max_events: int, max_bytes: int,
               now: float) -> bool:
        self._insert_pending(now)  # a lease sees the events read before it
        lease_id = self._next_lease_id
        self._next_lease_id = (self._next_lease_id + 1) & 0x7FFFFFFF or 1
        rows = self.store.lease_wire(lease_id, max(1, min(max_events, 10_000)),
                                     max(1, max_bytes), now, self.s.lease_seconds)
        if not rows:
            return False
        expired = getattr(self.store, "expired_leased", 0)
        if expired > self.totals["expired_leased"]:
            self._metrics.m.LEASE_EXPIRED.inc(expired - self.totals["expired_leased"])
            self.totals["expired_leased"] = expired
        self._dirty += _ROW_WRITE_BYTES * len(rows)
        # (id, payload, enqueued_at ms, attempts) tuples, packed as they come from SQLite
        self._replies.append((routing_id, wire.encode_reply(wire.OP_BATCH, req_id, lease_id, rows)))
        self._metrics.lease(len(rows))
        return True

    def _serve_parked(self, now: float) -> None:
        self._last_parked_check = now
        still: Deque[_Parked] = collections.deque()
        exhausted = False  # a lease found nothing eligible: the ones after it would not either
        while self._parked:
            p = self._parked.popleft()
            if not exhausted:
                self._begin()
                exhausted = not self._lease(p.routing_id, p.req_id, p.max_events, p.max_bytes, now)
            if exhausted:
                if now >= p.deadline:
                    self._replies.append((p.routing_id, _empty_batch(p.req_id)))
                else:
                    still.append(p)
        self._parked = still
        if self._txn_started is not None and self._txn_events == 0:
            self._commit(now)

    def _answer_parked_empty(self, now: float, everything: bool = False) -> None:
        for p in self._parked:
            if everything or now >= p.deadline:
                self._reply_now(p.routing_id, _empty_batch(p.req_id))
        self._parked.clear()

    def _reply_now(self, routing_id: bytes, frame: bytes) -> None:
        try:
            self.lease.send_multipart((routing_id, frame), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    # ------------------------------------------------------------------ housekeeping

    def stats(self, now: float) -> Dict[str, float]:
        st = self.store.stats(now)
        rates = self._rates()
        return {
            "queued": st.queued,
            "queued_bytes": st.queued_bytes,
            "leased": st.leased,
            "dead_letters": st.dead_letters,
            "oldest_age_seconds": (now - st.oldest_enqueued_at) if st.oldest_enqueued_at else 0.0,
            "ingested_total": self.totals["ingested"],
            "delivered_total": self.totals["delivered"],
            "ingest_rate_per_s": rates[0],
            "delivery_rate_per_s": rates[1],
            "pid": os.getpid(),
        }

    def _rates(self) -> Tuple[float, float]:
        if len(self._history) < 2:
            return 0.0, 0.0
        t0, i0, d0 = self._history[0]
        t1, i1, d1 = self._history[-1]
        span = max(t1 - t0, 1e-9)
        return (i1 - i0) / span, (d1 - d0) / span

    def _housekeeping(self, now: float) -> None:
        self._last_housekeeping = now
        self._metrics.publish()  # rejects outside any transaction
        self._history.append((now, self.totals["ingested"], self.totals["delivered"]))
        self._metrics.store_stats(self.store.stats(now), now, self.store.wal_bytes())
        evicted = getattr(self.store, "dead_letters_evicted", 0)
        if evicted > self.totals["evicted"]:
            self._metrics.m.STORE_DEAD_EVICTED.inc(evicted - self.totals["evicted"])
            self.totals["evicted"] = evicted
        self.sequencer.forget_idle(now)

    def _maybe_checkpoint(self) -> None:
        """Checkpoint by work done, not by WAL file size: a passive checkpoint lets the
        WAL be rewritten from its start but never shrinks the file, so a size test
        would fire after every commit. ``_dirty`` estimates bytes written since the
        last checkpoint; a file over half of ``wal_max_bytes`` is truncated."""
        now = self.clock()
        if self._dirty < self.s.wal_max_bytes // 8 and not (
                self._dirty and now - self._last_checkpoint >= _CHECKPOINT_SECONDS):
            return
        self._last_checkpoint = now
        try:
            self.store.checkpoint(truncate=self.store.wal_bytes() > self.s.wal_max_bytes // 2)
        except StoreFull as exc:
            # Committed events are safe in the WAL; the checkpoint is retried after the
            # pause, and producers are not read meanwhile (the WAL must not grow).
            log.error("no space left to checkpoint the WAL, not reading producers for %g s: %s",
                      _DISK_FULL_PAUSE_SECONDS, exc)
            self._full_until = now + _DISK_FULL_PAUSE_SECONDS
            return
        except StoreError as exc:
            log.error("checkpoint failed, retried later: %s", exc)
            return
        self._dirty = 0


def _empty_batch(req_id: int) -> bytes:
    return wire.encode_reply(wire.OP_BATCH, req_id, 0, [])


class _Metrics:
    """The writer's metric updates, kept out of the loop's way."""

    def __init__(self) -> None:
        from . import metrics as m
        self.m = m
        m.INGEST_EVENTS.labels("stored")  # series exist (at 0) from the start
        m.INGEST_FRAMES.labels("accepted")
        self._accepted_frames = 0
        self._accepted_events = 0
        self._frames: collections.Counter = collections.Counter()
        self._events: collections.Counter = collections.Counter()

    def frames(self, outcome: str, events: int) -> None:
        """Counted locally; ``publish()`` (after each commit) writes the sums: a metric
        update per frame would cost as much as storing the event."""
        if outcome == "accepted":  # the hot path: two int additions
            self._accepted_frames += 1
            self._accepted_events += events
            return
        self._frames[outcome] += 1
        if events:
            self._events[outcome] += events

    def publish(self) -> None:
        if self._accepted_frames:
            self.m.INGEST_FRAMES.labels("accepted").inc(self._accepted_frames)
            self.m.INGEST_EVENTS.labels("stored").inc(self._accepted_events)
            self._accepted_frames = self._accepted_events = 0
        for outcome, n in self._frames.items():
            self.m.INGEST_FRAMES.labels(outcome).inc(n)
        for outcome, n in self._events.items():
            self.m.INGEST_EVENTS.labels(outcome).inc(n)
        self._frames.clear()
        self._events.clear()

    def dropped(self, n: int) -> None:
        self._events["dropped_oldest"] += n
        self.m.STORE_DEAD_LETTERED.labels("store_full").inc(n)

    def commit(self, seconds: float, events: int) -> None:
        self.m.STORE_COMMIT_SECONDS.observe(seconds)
        if events:
            self.m.STORE_COMMIT_EVENTS.observe(events)

    def lease(self, n: int) -> None:
        self.m.LEASES.labels("events").inc()

    def dead(self, reason: str, n: int) -> None:
        if n:
            self.m.STORE_DEAD_LETTERED.labels(reason).inc(n)

    def full(self, on: bool) -> None:
        self.m.STORE_FULL.set(1 if on else 0)

    def store_stats(self, st, now: float, wal: int) -> None:
        m = self.m
        m.STORE_QUEUED.set(st.queued)
        m.STORE_QUEUED_BYTES.set(st.queued_bytes)
        m.STORE_LEASED.set(st.leased)
        m.STORE_DEAD.set(st.dead_letters)
        m.STORE_OLDEST_AGE.set((now - st.oldest_enqueued_at) if st.oldest_enqueued_at else 0)
        m.STORE_WAL_BYTES.set(wal)


def run(settings: Settings) -> int:
    """Entry point of the writer role. Returns an exit code (``exitcodes``)."""
    from .store import open_store

    # A writer of a killed supervisor may still be draining (up to half drain_timeout).
    lock_fd = _lock_store(settings.store, settings.drain_timeout + _STORE_LOCK_MARGIN_SECONDS)
    if lock_fd is None:
        return exitcodes.BOOT_ERROR
    try:
        try:
            store = open_store(settings)
        except StoreError as exc:
            log.error("%s", exc)
            return exitcodes.STORE_ERROR
        try:
            return _serve(settings, store)
        finally:
            store.close()
    finally:
        os.close(lock_fd)


def _serve(settings: Settings, store: Store) -> int:
    ctx = zmq.Context()
    writer = Writer(settings, store, ctx)
    try:
        try:
            writer.bind()
        except ConfigError as exc:
            log.error("%s", exc)
            return exitcodes.CONFIG_ERROR
        except zmq.ZMQError as exc:
            log.error("cannot bind %s or %s: %s", settings.ingest_endpoint,
                      settings.lease_endpoint, exc)
            return exitcodes.BOOT_ERROR

        def on_signal(signum, frame):  # record only; the loop acts
            writer.stopping = True

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        log.info("writer ready: ingest %s, store %s", settings.ingest_endpoint, settings.store)
        try:
            return writer.run()
        except StoreError as exc:
            log.error("store failed: %s", exc)
            return exitcodes.STORE_ERROR
    finally:
        writer.close()
        ctx.term()


_STORE_LOCK_MARGIN_SECONDS = 5.0


def _lock_store(path: str, wait_seconds: float) -> Optional[int]:
    """Hold ``PATH.lock`` (flock) for the writer's lifetime: one writer per store, even
    across supervisors (DESIGN invariant 1). Waits a little for a previous writer that
    is still draining; returns None (logged) if it stays taken."""
    import fcntl

    lock_path = os.path.abspath(path) + ".lock"
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        log.error("cannot create the store lock %s: %s", lock_path, exc.strerror)
        return None
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except OSError:
            if time.monotonic() >= deadline:
                log.error("another writer holds %s: refusing to open the store twice", lock_path)
                os.close(fd)
                return None
            time.sleep(0.05)
