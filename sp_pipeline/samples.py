"""A reproducible mix of sample events, for the demo and the benchmarks.

``mixed_events(n, seed)`` yields ``n`` events cycling through every event type the
tracker protocol knows: page views, page pings, structured events, self-describing
events with contexts, screen views, timings and transactions with items. The mix is
the same for a given seed, so two runs (or two trackers) send the same events.
"""

from __future__ import annotations

import random
from typing import Iterator

from .events import (
    EcommerceItem,
    EcommerceTransaction,
    PagePing,
    PageView,
    ScreenView,
    SelfDescribing,
    SelfDescribingJson,
    StructuredEvent,
    Subject,
    Timing,
)

LINK_CLICK = "iglu:com.snowplowanalytics.snowplow/link_click/jsonschema/1-0-1"
WEB_PAGE = "iglu:com.snowplowanalytics.snowplow/web_page/jsonschema/1-0-0"

KINDS = ("page_view", "structured", "self_describing", "screen_view", "timing",
         "transaction", "page_ping")


def sample_event(kind: str, i: int, rng: random.Random):
    """One event of ``kind``; ``i`` makes its fields distinct."""
    page = f"https://shop.example.com/p/{i % 97}"
    if kind == "page_view":
        return PageView(page, title=f"Product {i % 97}", referrer="https://search.example.org/")
    if kind == "page_ping":
        return PagePing(page, min_x=0, max_x=rng.randint(0, 1200), min_y=0,
                        max_y=rng.randint(0, 4000))
    if kind == "structured":
        return StructuredEvent("shop", "add-to-basket", label=f"sku-{i % 50}",
                               property="size=M", value=round(rng.uniform(1, 200), 2))
    if kind == "self_describing":
        ctx = [SelfDescribingJson(WEB_PAGE, {"id": f"{i:08x}-0000-4000-8000-000000000000"})]
        return SelfDescribing(
            SelfDescribingJson(LINK_CLICK, {"targetUrl": page, "elementId": f"link-{i % 13}"}),
            contexts=ctx,
        )
    if kind == "screen_view":
        return ScreenView(name=f"screen-{i % 20}", id=f"{i:08x}-1111-4111-8111-111111111111")
    if kind == "timing":
        return Timing("load", "first-paint", rng.randint(10, 5000), label="home")
    if kind == "transaction":
        items = [EcommerceItem(f"sku-{(i + k) % 50}", round(rng.uniform(1, 50), 2),
                               rng.randint(1, 3), name=f"Item {k}", category="demo")
                 for k in range(2)]
        return EcommerceTransaction(f"order-{i}", sum(it.price * it.quantity for it in items),
                                    affiliation="web", tax=1.5, shipping=4.99, city="Lyon",
                                    country="FR", currency="EUR", items=items)
    raise ValueError(f"unknown sample kind {kind!r}")


def mixed_events(n: int, seed: int = 6000) -> Iterator[object]:
    """``n`` events of every kind in turn (a transaction carries 2 items: 3 payloads)."""
    rng = random.Random(seed)
    for i in range(n):
        yield sample_event(KINDS[i % len(KINDS)], i, rng)


def payload_count(event: object) -> int:
    """How many tracker-protocol payloads ``event`` becomes (a transaction: 1 + items)."""
    if isinstance(event, EcommerceTransaction):
        return 1 + len(event.items)
    return 1


def sample_subject(i: int) -> Subject:
    return Subject(user_id=f"user-{i % 1000}", ip_address="203.0.113.7",
                   useragent="Mozilla/5.0 (X11; Linux x86_64) sp-pipeline-demo",
                   language="en-GB", timezone="Europe/London", screen_resolution=(1920, 1080))
