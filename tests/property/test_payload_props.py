"""Property tests: any valid event, with any subject and contexts, gives payloads that
validate against the Iglu schemas, encode, pass the writer's check and carry the
values back unchanged."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any, Dict, List

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sp_pipeline.errors import FrameError, ValidationError
from sp_pipeline.events import (
    MAX_TIMESTAMP_MS,
    EcommerceItem,
    EcommerceTransaction,
    Event,
    PagePing,
    PageView,
    ScreenView,
    SelfDescribing,
    SelfDescribingJson,
    StructuredEvent,
    Subject,
    Timing,
)
from sp_pipeline.payload import (
    PAYLOAD_KEYS,
    PLATFORMS,
    TrackerInfo,
    build,
    check_event_json,
    encode_event,
)
from tests.schemas import PAYLOAD_DATA, validate, validate_event

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NOW = 1_700_000_000_000

# st.text() never draws surrogates, so every drawn str is valid UTF-8 text.
text = st.text(max_size=30)
required_text = st.text(min_size=1, max_size=30)
optional_text = st.none() | text
integers = st.integers(min_value=-(10**30), max_value=10**30)
floats = st.floats(allow_nan=False, allow_infinity=False)
numbers = integers | floats
durations = st.integers(min_value=0, max_value=10**30) | st.floats(min_value=0, allow_infinity=False)
timestamps = st.integers(min_value=0, max_value=MAX_TIMESTAMP_MS) | st.floats(
    min_value=0, max_value=MAX_TIMESTAMP_MS
)
int32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)
json_values = st.recursive(
    st.none() | st.booleans() | integers | floats | text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(text, children, max_size=4),
    max_leaves=12,
)
iglu = st.builds(
    "iglu:{}/{}/{}/{}-{}-{}".format,
    st.from_regex(r"[a-zA-Z0-9_.-]{1,12}", fullmatch=True),
    st.from_regex(r"[a-zA-Z0-9_-]{1,12}", fullmatch=True),
    st.sampled_from(["jsonschema", "avro"]),
    st.integers(0, 20), st.integers(0, 20), st.integers(0, 20),
)
entities = st.lists(st.builds(SelfDescribingJson, iglu, json_values), max_size=3)
sizes = st.none() | st.tuples(st.integers(1, 10**5), st.integers(1, 10**5))
subjects = st.none() | st.builds(
    Subject,
    user_id=optional_text, ip_address=optional_text, useragent=optional_text,
    domain_user_id=optional_text, network_user_id=optional_text, session_id=optional_text,
    session_index=st.none() | st.integers(1, 2**31 - 1), screen_resolution=sizes, viewport=sizes,
    color_depth=st.none() | st.integers(1, 64), timezone=optional_text, language=optional_text,
)
common = st.fixed_dictionaries(
    {},
    optional={
        "event_id": st.uuids().map(str),
        "timestamp": timestamps,
        "true_timestamp": timestamps,
        "contexts": entities,
        "subject": subjects,
    },
)
trackers = st.builds(
    TrackerInfo, required_text, optional_text, st.sampled_from(sorted(PLATFORMS)), st.booleans()
)


@st.composite
def ping_offsets(draw: Any) -> Dict[str, int]:
    out: Dict[str, int] = {}
    for axis in "xy":
        a, b = sorted(draw(st.lists(int32, min_size=2, max_size=2)))
        if draw(st.booleans()):
            out[f"min_{axis}"] = a
        if draw(st.booleans()):
            out[f"max_{axis}"] = b
    return out


items = st.lists(
    st.builds(EcommerceItem, required_text, numbers, int32, optional_text, optional_text),
    max_size=3,
)


def events_with(c: Dict[str, Any]) -> st.SearchStrategy[Event]:
    return st.one_of(
        st.builds(PageView, required_text, optional_text, optional_text, **_just(c)),
        ping_offsets().flatmap(lambda o: st.builds(
            PagePing, required_text, optional_text, optional_text, **_just({**c, **o}))),
        st.builds(ScreenView, name=required_text, id=optional_text, **_just(c)),
        st.builds(ScreenView, name=optional_text, id=required_text, **_just(c)),
        st.builds(StructuredEvent, required_text, required_text, optional_text, optional_text,
                  st.none() | numbers, **_just(c)),
        st.builds(SelfDescribing, st.builds(SelfDescribingJson, iglu, json_values), **_just(c)),
        st.builds(Timing, required_text, required_text, durations, optional_text, **_just(c)),
        st.builds(EcommerceTransaction, required_text, numbers, optional_text,
                  st.none() | numbers, st.none() | numbers, optional_text, optional_text,
                  optional_text, optional_text, items, **_just(c)),
    )


def _just(values: Dict[str, Any]) -> Dict[str, st.SearchStrategy[Any]]:
    return {k: st.just(v) for k, v in values.items()}


events = common.flatmap(events_with)


def _normalised(value: Any) -> Any:
    """``value`` as JSON gives it back (the form a collector sees)."""
    return json.loads(json.dumps(value))


@SETTINGS
@given(events, trackers, subjects, subjects, entities)
def test_payloads_validate_encode_and_pass_the_writer_check(
    event: Event, tracker: TrackerInfo, client_subject: Any, call_subject: Any, call_contexts: List[Any]
) -> None:
    payloads = build(event, tracker, client_subject=client_subject, subject=call_subject,
                     contexts=call_contexts, now_ms=NOW)
    validate(payloads, PAYLOAD_DATA)
    sent_contexts = [_normalised({"schema": c.schema, "data": c.data})
                     for c in (*event.contexts, *call_contexts)]
    for p in payloads:
        assert next(iter(p)) == "e"
        assert all(type(v) is str and v for v in p.values())
        parts = validate_event(p)
        got = parts["contexts"]["data"] if parts["contexts"] else []
        assert got == sent_contexts
        data = encode_event(p)
        check_event_json(data, len(data))
        assert json.loads(data.decode("utf-8")) == p
    assert len({p["eid"] for p in payloads}) == len(payloads)
    if event.event_id is not None:
        assert payloads[0]["eid"] == event.event_id
    _assert_event_values(event, payloads)


def _assert_event_values(event: Event, payloads: List[Dict[str, str]]) -> None:
    p = payloads[0]
    if isinstance(event, StructuredEvent):
        assert (p["se_ca"], p["se_ac"]) == (event.category, event.action)
        if event.value is not None:
            back = int(p["se_va"]) if isinstance(event.value, int) else float(p["se_va"])
            assert back == event.value
    elif isinstance(event, PagePing):
        for key, value in (("pp_mix", event.min_x), ("pp_max", event.max_x),
                           ("pp_miy", event.min_y), ("pp_may", event.max_y)):
            assert p.get(key) == (None if value is None else str(value))
    elif isinstance(event, (Timing, ScreenView, SelfDescribing)):
        body = validate_event(p)["unstruct"]["data"]["data"]
        if isinstance(event, Timing):
            assert body["timing"] == event.timing and type(body["timing"]) is type(event.timing)
        elif isinstance(event, SelfDescribing):
            assert body == _normalised(event.event_json.data)
    elif isinstance(event, EcommerceTransaction):
        assert _close(p["tr_tt"], event.total)
        assert len(payloads) == 1 + len(event.items)
        for item, ti in zip(event.items, payloads[1:]):
            assert _close(ti["ti_pr"], item.price) and ti["ti_qu"] == str(item.quantity)
            assert (ti["ti_id"], ti["dtm"], ti.get("ttm")) == (event.order_id, p["dtm"], p.get("ttm"))


def _close(money: str, value: float) -> bool:
    """Two-decimal text within half a cent of the exact value."""
    assert money.rsplit(".", 1)[1].isdigit() and len(money.rsplit(".", 1)[1]) == 2
    return abs(Decimal(money) - Decimal(value)) <= Decimal("0.005")


@SETTINGS
@given(st.text(min_size=1), st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), st.text())
def test_text_with_a_lone_surrogate_is_rejected_naming_the_field(before: str, lone: str, after: str) -> None:
    for make, field in (
        (lambda s: StructuredEvent("c", "a", label=s), "label"),
        (lambda s: PageView(s), "url"),
        (lambda s: Subject(useragent=s), "useragent"),
        (lambda s: SelfDescribingJson("iglu:a/b/c/1-0-0", {"k": s}), "data"),
    ):
        try:
            make(before + lone + after)
        except ValidationError as exc:
            assert exc.field == field
        else:
            raise AssertionError(f"{field} accepted a lone surrogate")


@SETTINGS
@given(events, st.text(min_size=1, max_size=10).filter(lambda k: k not in PAYLOAD_KEYS), text)
def test_check_rejects_any_key_outside_payload_data(event: Event, key: str, value: str) -> None:
    payload = {**build(event, TrackerInfo("ns", None), now_ms=NOW)[0], key: value}
    data = encode_event(payload)
    try:
        check_event_json(data, len(data))
    except FrameError as exc:
        assert exc.reason == "unknown_field"
    else:
        raise AssertionError(f"accepted unknown key {key!r}")
