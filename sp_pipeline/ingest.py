"""Per-producer frame sequencing in the writer: exactly-once into the store.

Each producer numbers its frames 1, 2, 3... The writer keeps, per producer, the next
seq it expects; the store keeps the last committed seq (``producers`` table, written
in the same transaction as the events). A frame is:

- *next* (seq == expected): its events are stored; expected advances.
- *duplicate* (seq < expected): already stored (a resend after a lost ack); only
  acknowledged again.
- *early* (seq > expected): frames in between were lost (a writer restart); dropped,
  and the producer is asked to resend from ``expected``. Its frames then arrive in order.

A producer's ``base`` (lowest seq it has not seen acknowledged) lifts ``expected``: the
producer vouches that everything before it was confirmed, which heals a writer that
never knew it (a store replaced or pruned).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

NEXT = "next"
DUPLICATE = "duplicate"
EARLY = "early"

_IDLE_FORGET_SECONDS = 600.0
_RESEND_REPEAT_SECONDS = 1.0


@dataclass
class Producer:
    routing_id: bytes
    expected: int
    last_seen: float
    resend_asked: Tuple[int, float] = (0, 0.0)  # (from_seq, when), to avoid flooding


@dataclass
class Sequencer:
    """Decides what to do with each frame. ``lookup`` reads the last committed seq of a
    producer from the store (None if unknown)."""

    lookup: Callable[[bytes], Optional[int]]
    producers: Dict[bytes, Producer] = field(default_factory=dict)

    def classify(self, producer_id: bytes, routing_id: bytes, seq: int, base: int,
                 now: float) -> str:
        p = self.producers.get(producer_id)
        if p is None:
            last = self.lookup(producer_id)
            p = Producer(routing_id, (last + 1) if last is not None else base, now)
            self.producers[producer_id] = p
        p.routing_id = routing_id
        p.last_seen = now
        if base > p.expected:
            p.expected = base
        if seq < p.expected:
            return DUPLICATE
        if seq > p.expected:
            return EARLY
        p.expected += 1
        return NEXT

    def should_ask_resend(self, producer_id: bytes, now: float) -> Optional[int]:
        """The seq to ask the producer to resend from, or None if asked just now."""
        p = self.producers[producer_id]
        asked_from, asked_at = p.resend_asked
        if asked_from == p.expected and now - asked_at < _RESEND_REPEAT_SECONDS:
            return None
        p.resend_asked = (p.expected, now)
        return p.expected

    def last_consumed(self, producer_id: bytes) -> int:
        return self.producers[producer_id].expected - 1

    def forget_idle(self, now: float) -> int:
        """Drop producers idle for long (their seq is in the store); bounds memory."""
        idle = [pid for pid, p in self.producers.items()
                if now - p.last_seen > _IDLE_FORGET_SECONDS]
        for pid in idle:
            del self.producers[pid]
        return len(idle)

    def rollback(self, expected_before: Dict[bytes, int]) -> None:
        """Restore expected seqs after a failed commit: ``expected_before`` maps each
        producer touched in the transaction to its expected seq when it began."""
        for pid, expected in expected_before.items():
            if pid in self.producers:
                self.producers[pid].expected = expected


def merge_ranges(seqs: List[int]) -> List[Tuple[int, int]]:
    """Sorted, merged ``[first, last]`` ranges of the given seqs."""
    out: List[Tuple[int, int]] = []
    for s in sorted(set(seqs)):
        if out and s == out[-1][1] + 1:
            out[-1] = (out[-1][0], s)
        else:
            out.append((s, s))
    return out


__all__ = ["Sequencer", "Producer", "merge_ranges", "NEXT", "DUPLICATE", "EARLY"]
