"""Event constructors: every validation rule names its field and its rule."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import pytest

from sp_pipeline.errors import ValidationError
from sp_pipeline.events import (
    MAX_TIMESTAMP_MS,
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
    check_contexts,
)

SCHEMA = "iglu:com.acme/thing/jsonschema/1-0-0"
UUID = "1b4e28ba-2fa1-41d2-883f-0016d3cca427"
LONE = "ok\ud800"  # a lone surrogate: not encodable as UTF-8


def rejects(make: Callable[[], Any], field: str, rule_words: str = "") -> ValidationError:
    """Assert ``make()`` raises ValidationError for ``field`` whose message names it."""
    with pytest.raises(ValidationError) as info:
        make()
    err = info.value
    assert err.field == field, f"expected field {field!r}, got {err.field!r} ({err})"
    assert str(err).startswith(f"{field}: ")
    assert rule_words.lower() in err.rule.lower(), err.rule
    return err


# ------------------------------------------------------------------ valid events


def test_every_event_type_constructs_with_shared_keyword_fields() -> None:
    common = dict(
        event_id=UUID, timestamp=1_700_000_000_000, true_timestamp=1.5,
        contexts=[SelfDescribingJson(SCHEMA, {"a": 1})], subject=Subject(user_id="u"),
    )
    events = [
        PageView("https://a.example/", "Title", "https://r.example/", **common),
        PagePing("https://a.example/", min_x=-5, max_x=10, min_y=0, max_y=0, **common),
        ScreenView(name="home", **common),
        StructuredEvent("cat", "act", "lab", "prop", 2.5, **common),
        SelfDescribing(SelfDescribingJson(SCHEMA, {"k": "v"}), **common),
        Timing("cat", "var", 12, "lab", **common),
        EcommerceTransaction("o1", 10, items=[EcommerceItem("sku", 5, 2)], **common),
    ]
    for ev in events:
        assert ev.event_id == UUID
        assert isinstance(ev.contexts, tuple)
    with pytest.raises(dataclasses.FrozenInstanceError):
        events[0].url = "x"  # type: ignore[misc]


def test_shared_fields_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        PageView("https://a.example/", None, None, UUID)  # type: ignore[misc]


def test_contexts_accept_mappings_and_become_self_describing_json() -> None:
    ev = PageView("u", contexts=[{"schema": SCHEMA, "data": [1, 2]}])
    assert ev.contexts == (SelfDescribingJson(SCHEMA, [1, 2]),)


def test_self_describing_json_text_is_a_snapshot() -> None:
    data = {"a": "é"}
    sdj = SelfDescribingJson(SCHEMA, data)
    data["a"] = "changed"
    assert sdj.json_text == '{"schema":"iglu:com.acme/thing/jsonschema/1-0-0","data":{"a":"é"}}'


def test_bounds_are_inclusive() -> None:
    assert PageView("u", timestamp=MAX_TIMESTAMP_MS, true_timestamp=0).timestamp == MAX_TIMESTAMP_MS
    assert EcommerceItem("s", 1, 2**31 - 1).quantity == 2**31 - 1
    assert EcommerceItem("s", 1, -(2**31)).quantity == -(2**31)
    assert StructuredEvent("c", "a", value=10**308).value == 10**308


def test_negative_money_and_quantity_are_refunds_and_allowed() -> None:
    item = EcommerceItem("sku", -5.5, -1)
    tr = EcommerceTransaction("o", -5.5, tax=-1, shipping=-0.5, items=[item])
    assert tr.items == (item,)


def test_check_contexts_returns_the_same_tuple_when_already_valid() -> None:
    ctx = (SelfDescribingJson(SCHEMA, {}),)
    assert check_contexts(ctx) is ctx


# ------------------------------------------------------------------ text rules


@pytest.mark.parametrize(
    "make, field, words",
    [
        (lambda: PageView(""), "url", "empty"),
        (lambda: PageView(None), "url", "required"),  # type: ignore[arg-type]
        (lambda: PageView(b"https://x"), "url", "str"),  # type: ignore[arg-type]
        (lambda: PageView("u", title=3), "title", "str"),  # type: ignore[arg-type]
        (lambda: PageView("u", referrer=LONE), "referrer", "surrogate"),
        (lambda: PagePing(""), "url", "empty"),
        (lambda: PagePing("u", title=LONE), "title", "surrogate"),
        (lambda: StructuredEvent("", "a"), "category", "empty"),
        (lambda: StructuredEvent("c", ""), "action", "empty"),
        (lambda: StructuredEvent("c", "a", label=1), "label", "str"),  # type: ignore[arg-type]
        (lambda: StructuredEvent("c", "a", property=LONE), "property", "surrogate"),
        (lambda: ScreenView(), "name", "required"),
        (lambda: ScreenView(name="", id=""), "name", "required"),
        (lambda: ScreenView(id=5), "id", "str"),  # type: ignore[arg-type]
        (lambda: Timing("", "v", 1), "category", "empty"),
        (lambda: Timing("c", "", 1), "variable", "empty"),
        (lambda: Timing("c", "v", 1, label=LONE), "label", "surrogate"),
        (lambda: EcommerceTransaction("", 1), "order_id", "empty"),
        (lambda: EcommerceTransaction("o", 1, city=7), "city", "str"),  # type: ignore[arg-type]
        (lambda: EcommerceTransaction("o", 1, currency=LONE), "currency", "surrogate"),
        (lambda: EcommerceItem("", 1, 1), "sku", "empty"),
        (lambda: EcommerceItem("s", 1, 1, name=LONE), "name", "surrogate"),
        (lambda: EcommerceItem("s", 1, 1, category=[]), "category", "str"),  # type: ignore[arg-type]
    ],
)
def test_text_rules_name_the_field(make: Callable[[], Any], field: str, words: str) -> None:
    rejects(make, field, words)


# ------------------------------------------------------------------ number rules


@pytest.mark.parametrize(
    "make, field, words",
    [
        (lambda: StructuredEvent("c", "a", value=True), "value", "number"),
        (lambda: StructuredEvent("c", "a", value="3"), "value", "number"),  # type: ignore[arg-type]
        (lambda: StructuredEvent("c", "a", value=math.nan), "value", "finite"),
        (lambda: StructuredEvent("c", "a", value=-math.inf), "value", "finite"),
        (lambda: Timing("c", "v", -1), "timing", ">= 0"),
        (lambda: Timing("c", "v", None), "timing", "required"),  # type: ignore[arg-type]
        (lambda: Timing("c", "v", math.inf), "timing", "finite"),
        (lambda: Timing("c", "v", False), "timing", "number"),
        (lambda: EcommerceTransaction("o", math.nan), "total", "finite"),
        (lambda: EcommerceTransaction("o", "1"), "total", "number"),  # type: ignore[arg-type]
        (lambda: EcommerceTransaction("o", 1, tax=math.inf), "tax", "finite"),
        (lambda: EcommerceTransaction("o", 1, shipping=True), "shipping", "number"),
        (lambda: EcommerceItem("s", math.nan, 1), "price", "finite"),
        (lambda: EcommerceItem("s", 1, 1.0), "quantity", "int"),  # type: ignore[arg-type]
        (lambda: EcommerceItem("s", 1, True), "quantity", "int"),
        (lambda: StructuredEvent("c", "a", value=10**309), "value", "between"),
        (lambda: StructuredEvent("c", "a", value=-(10**309)), "value", "between"),
        (lambda: EcommerceTransaction("o", 10**400), "total", "between"),
        (lambda: EcommerceItem("s", 1, 2**31), "quantity", "32-bit"),
        (lambda: EcommerceItem("s", 1, -(2**31) - 1), "quantity", ">="),
        (lambda: PagePing("u", max_x=2**31), "max_x", "32-bit"),
        (lambda: PagePing("u", min_x=1.5), "min_x", "int"),  # type: ignore[arg-type]
        (lambda: PagePing("u", max_y=False), "max_y", "int"),
        (lambda: PagePing("u", min_x=5, max_x=4), "min_x", "max_x"),
        (lambda: PagePing("u", min_y=5, max_y=4), "min_y", "max_y"),
    ],
)
def test_number_rules_name_the_field(make: Callable[[], Any], field: str, words: str) -> None:
    rejects(make, field, words)


# ------------------------------------------------------------------ shared fields


@pytest.mark.parametrize(
    "kwargs, field, words",
    [
        ({"event_id": "not-a-uuid"}, "event_id", "uuid"),
        ({"event_id": UUID + "0"}, "event_id", "uuid"),
        ({"event_id": UUID + "\n"}, "event_id", "uuid"),
        ({"event_id": ""}, "event_id", "empty"),
        ({"event_id": 5}, "event_id", "str"),
        ({"timestamp": -1}, "timestamp", ">= 0"),
        ({"timestamp": math.nan}, "timestamp", "finite"),
        ({"timestamp": "1700000000000"}, "timestamp", "number"),
        ({"timestamp": True}, "timestamp", "number"),
        ({"true_timestamp": math.inf}, "true_timestamp", "finite"),
        ({"true_timestamp": -0.5}, "true_timestamp", ">= 0"),
        ({"timestamp": 1_700_000_000_000_000}, "timestamp", "between"),  # microseconds
        ({"true_timestamp": MAX_TIMESTAMP_MS + 1}, "true_timestamp", "between"),
        ({"subject": {"user_id": "u"}}, "subject", "Subject"),
        ({"contexts": SelfDescribingJson(SCHEMA, {})}, "contexts", "sequence"),
        ({"contexts": "iglu:x"}, "contexts", "sequence"),
        ({"contexts": [SelfDescribingJson(SCHEMA, {}), 3]}, "contexts[1]", "SelfDescribingJson"),
        ({"contexts": [{"schema": "iglu:bad", "data": {}}]}, "contexts[0].schema", "Iglu"),
        ({"contexts": [{"data": {}}]}, "contexts[0].schema", "required"),
        ({"contexts": [{"schema": SCHEMA}]}, "contexts[0].data", "required"),
        ({"contexts": [{"schema": SCHEMA, "data": {}, "x": 1}]}, "contexts[0]", "unexpected"),
        (
            {"contexts": [{"schema": SCHEMA, "data": {}}, {"schema": SCHEMA, "data": {"f": object()}}]},
            "contexts[1].data",
            "JSON",
        ),
        ({"contexts": [{"schema": SCHEMA, "data": [math.nan]}]}, "contexts[0].data", "NaN"),
        ({"contexts": [{"schema": SCHEMA, "data": {"k": LONE}}]}, "contexts[0].data", "surrogate"),
        ({"contexts": [{"schema": SCHEMA, "data": {LONE: 1}}]}, "contexts[0].data", "surrogate"),
    ],
)
def test_shared_field_rules_name_the_field(kwargs: dict, field: str, words: str) -> None:
    rejects(lambda: PageView("u", **kwargs), field, words)
    rejects(lambda: EcommerceTransaction("o", 1, **kwargs), field, words)


def test_event_id_is_kept_exactly_as_given() -> None:
    upper = UUID.upper()
    assert PageView("u", event_id=upper).event_id == upper


def test_circular_data_is_not_json() -> None:
    data: dict = {}
    data["self"] = data
    rejects(lambda: SelfDescribingJson(SCHEMA, data), "data", "JSON")


# ---------------------------------------------------------------- self-describing


@pytest.mark.parametrize(
    "schema",
    [
        "iglu:com.acme/thing/jsonschema/1-0",
        "iglu:com.acme/thing/jsonschema/1-0-0\n",
        "iglu:com.acme/thing/1-0-0",
        "com.acme/thing/jsonschema/1-0-0",
        "iglu:com acme/thing/jsonschema/1-0-0",
        "iglu:com.acme/th.ing/jsonschema/1-0-0",
        "",
    ],
)
def test_malformed_iglu_uri_is_rejected(schema: str) -> None:
    rejects(lambda: SelfDescribingJson(schema, {}), "schema")
    rejects(lambda: SelfDescribing({"schema": schema, "data": {}}), "event_json.schema")  # type: ignore[arg-type]


def test_self_describing_event_rules() -> None:
    rejects(lambda: SelfDescribing(None), "event_json", "required")  # type: ignore[arg-type]
    rejects(lambda: SelfDescribing("iglu:x"), "event_json", "SelfDescribingJson")  # type: ignore[arg-type]
    rejects(
        lambda: SelfDescribing({"schema": SCHEMA, "data": {1j: 1}}),  # type: ignore[arg-type]
        "event_json.data",
        "JSON",
    )
    ev = SelfDescribing({"schema": SCHEMA, "data": {"x": 1}})  # type: ignore[arg-type]
    assert ev.event_json == SelfDescribingJson(SCHEMA, {"x": 1})


def test_schema_must_be_str() -> None:
    rejects(lambda: SelfDescribingJson(b"iglu:a/b/c/1-0-0", {}), "schema", "str")  # type: ignore[arg-type]


# ------------------------------------------------------------------ transaction


def test_items_must_be_ecommerce_items() -> None:
    rejects(lambda: EcommerceTransaction("o", 1, items=[{"sku": "s"}]), "items[0]", "EcommerceItem")
    rejects(lambda: EcommerceTransaction("o", 1, items=EcommerceItem("s", 1, 1)), "items", "sequence")


# ------------------------------------------------------------------------ subject


def test_subject_maps_fields_to_protocol_keys() -> None:
    s = Subject(
        user_id="u", ip_address="1.2.3.4", useragent="ua/1", domain_user_id="d",
        network_user_id="n", session_id="s", session_index=3, screen_resolution=(1920, 1080),
        viewport="800x600", color_depth=24, timezone="Europe/Paris", language="fr",
    )
    assert s.protocol_fields == {
        "uid": "u", "ip": "1.2.3.4", "ua": "ua/1", "duid": "d", "tnuid": "n", "sid": "s",
        "vid": "3", "res": "1920x1080", "vp": "800x600", "cd": "24", "tz": "Europe/Paris",
        "lang": "fr",
    }
    assert s.screen_resolution == "1920x1080"


def test_subject_leaves_out_empty_and_none() -> None:
    assert Subject(user_id="", language=None).protocol_fields == {}


@pytest.mark.parametrize(
    "kwargs, field, words",
    [
        ({"user_id": 5}, "user_id", "str"),
        ({"ip_address": LONE}, "ip_address", "surrogate"),
        ({"useragent": b"x"}, "useragent", "str"),
        ({"session_index": 0}, "session_index", ">= 1"),
        ({"session_index": "1"}, "session_index", "int"),
        ({"session_index": 2**31}, "session_index", "32-bit"),
        ({"color_depth": True}, "color_depth", "int"),
        ({"screen_resolution": (0, 10)}, "screen_resolution[0]", ">= 1"),
        ({"screen_resolution": (10, 1.5)}, "screen_resolution[1]", "int"),
        ({"screen_resolution": (1, 2, 3)}, "screen_resolution", "pair"),
        ({"viewport": "800x"}, "viewport", "1920x1080"),
        ({"viewport": "0x10"}, "viewport", "1920x1080"),
        ({"viewport": "10x10\n"}, "viewport", "1920x1080"),
        ({"viewport": 800}, "viewport", "pair"),
    ],
)
def test_subject_rules_name_the_field(kwargs: dict, field: str, words: str) -> None:
    rejects(lambda: Subject(**kwargs), field, words)
