"""Byte-limited POST batches: the arithmetic, and the body itself.

A POST body is the payload_data envelope around the events, each with ``stm`` added::

    {"schema":"iglu:com.snowplowanalytics.snowplow/payload_data/jsonschema/1-0-4","data":[
      {"stm":"1700000000000",<event>},{"stm":...,<event>}
    ]}

Size of a batch of events whose JSON texts are ``s1..sn`` bytes long:
``ENVELOPE_BYTES + sum(si + STM_BYTES) + (n - 1) * SEPARATOR_BYTES``, exactly the length
of the body ``post_body`` builds (for 13-digit millisecond times). A batch is closed
before it would pass the limit; an event that alone is over the limit travels alone.
"""

from __future__ import annotations

import bisect
import itertools
import operator
from typing import Iterable, Iterator, List, Sequence, Tuple

PAYLOAD_DATA_SCHEMA = "iglu:com.snowplowanalytics.snowplow/payload_data/jsonschema/1-0-4"
_HEAD = b'{"schema":"' + PAYLOAD_DATA_SCHEMA.encode() + b'","data":['
_TAIL = b"]}"
ENVELOPE_BYTES = len(_HEAD) + len(_TAIL)  # 88
STM_BYTES = len(b'"stm":"1700000000000",')  # 22
SEPARATOR_BYTES = 1  # the comma between events


def event_cost(size: int) -> int:
    """Bytes one event of ``size`` JSON bytes adds to a POST, before its separator."""
    return size + STM_BYTES


def post_size(sizes: Iterable[int]) -> int:
    """Exact POST body size for events of these JSON sizes (0 events: the envelope)."""
    n = 0
    total = ENVELOPE_BYTES
    for s in sizes:
        total += s + STM_BYTES
        n += 1
    return total + max(n - 1, 0) * SEPARATOR_BYTES


def split(sizes: Sequence[int], byte_limit: int, max_events: int) -> List[Tuple[int, int]]:
    """Split events, in order, into batches as ``[start, stop)`` index ranges.

    Every event is in exactly one batch, order is kept, no batch holds more than
    ``max_events``, and every batch fits ``byte_limit`` except a batch of one event
    that alone is over it.
    """
    return list(_split(sizes, byte_limit, max_events))


def _split(sizes: Sequence[int], byte_limit: int, max_events: int) -> Iterator[Tuple[int, int]]:
    start = 0
    total = ENVELOPE_BYTES
    for i, s in enumerate(sizes):
        cost = s + STM_BYTES + (SEPARATOR_BYTES if i > start else 0)
        if i > start and (total + cost > byte_limit or i - start >= max_events):
            yield start, i
            start = i
            total = ENVELOPE_BYTES
            cost = s + STM_BYTES
        total += cost
    if start < len(sizes):
        yield start, len(sizes)


def take(sizes: Iterable[int], byte_limit: int, max_events: int) -> int:
    """How many of the leading events form the first batch (at least 1 if any)."""
    # The size of the first n events is ENVELOPE + cum[n-1] - SEPARATOR, where cum holds
    # the running sums of (size + STM + SEPARATOR): one bisect, the sums done in C.
    cum = list(itertools.accumulate(map(operator.add, itertools.islice(sizes, max(1, max_events)),
                                        itertools.repeat(STM_BYTES + SEPARATOR_BYTES))))
    if not cum:
        return 0
    return max(1, bisect.bisect_right(cum, byte_limit - ENVELOPE_BYTES + SEPARATOR_BYTES))


def post_body(events: Sequence[bytes], stm_ms: int) -> bytes:
    """The POST body for these event JSON texts, each given ``stm``.

    Each event must be a JSON object text starting with ``{`` and holding at least one
    key (ours always hold ``e``, ``p`` and ``tv``) and no ``stm`` of its own.
    """
    prefix = b'{"stm":"%d",' % stm_ms
    return _HEAD + b",".join([prefix + ev[1:] for ev in events]) + _TAIL
