"""Tracker-protocol payloads: shape, schemas, merging, formats, encoding, checking."""

from __future__ import annotations

import json
import re
from typing import Any, Dict, List

import pytest

from sp_pipeline import __version__
from sp_pipeline.batching import post_body
from sp_pipeline.errors import FrameError, ValidationError
from sp_pipeline.events import (
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
    TRACKER_VERSION,
    TrackerInfo,
    build,
    check_event_json,
    encode_event,
    format_money,
    format_number,
    new_event_id,
)
from tests.schemas import (
    PAYLOAD_DATA,
    SCREEN_VIEW,
    TIMING,
    decode_b64,
    load_schema,
    validate,
    validate_event,
)

NOW = 1_700_000_000_123
SCHEMA = "iglu:com.acme/thing/jsonschema/1-0-0"
UUID = "1b4e28ba-2fa1-41d2-883f-0016d3cca427"
UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
B64 = TrackerInfo("ns", "app")
PLAIN = TrackerInfo("ns", "app", platform="mob", encode_base64=False)


def one(event: Event, tracker: TrackerInfo = B64, **kwargs: Any) -> Dict[str, str]:
    payloads = build(event, tracker, now_ms=NOW, **kwargs)
    assert len(payloads) == 1
    return payloads[0]


def all_event_types(**common: Any) -> List[Event]:
    return [
        PageView("https://a.example/ü", "Tïtle ☃", "https://r.example/", **common),
        PagePing("https://a.example/", "t", None, -3, 40, 0, 900, **common),
        ScreenView(name="Accueil ☃", id="s-1", **common),
        ScreenView(id="only-id", **common),
        StructuredEvent("cat ü", "act", "lab", "prop", 12.75, **common),
        SelfDescribing(SelfDescribingJson(SCHEMA, {"k": "v ☃", "n": [1, 2.5, None]}), **common),
        Timing("cat", "var", 1234, "label ☃", **common),
        EcommerceTransaction("order-1", 99.999, "aff", 1.5, 2, "Paris", "IDF", "FR", "EUR",
                             items=[EcommerceItem("sku-1", 10, 2, "Näme", "cat")], **common),
    ]


CONTEXTS = [SelfDescribingJson(SCHEMA, {"a": "é"}), SelfDescribingJson(SCREEN_VIEW, {"name": "n"})]


# ------------------------------------------------------------------ schemas


@pytest.mark.parametrize("tracker", [B64, PLAIN], ids=["base64", "plain"])
@pytest.mark.parametrize("with_extras", [False, True], ids=["bare", "subject+contexts"])
def test_every_event_type_validates_against_the_schemas(tracker: TrackerInfo, with_extras: bool) -> None:
    common: Dict[str, Any] = {}
    if with_extras:
        common = {"subject": Subject(user_id="ü", viewport=(3, 4)), "contexts": CONTEXTS[:1]}
    for event in all_event_types(**common):
        payloads = build(event, tracker, now_ms=NOW, contexts=CONTEXTS[1:] if with_extras else ())
        validate(payloads, PAYLOAD_DATA)
        for p in payloads:
            assert all(isinstance(v, str) and v for v in p.values()), p
            parts = validate_event(p)
            assert ("cx" in p or "co" in p) == with_extras
            if with_extras:
                assert [c["data"] for c in parts["contexts"]["data"]] == [{"a": "é"}, {"name": "n"}]
            assert (parts["unstruct"] is not None) == (p["e"] == "ue")
            unused = {"co", "ue_pr"} if tracker.encode_base64 else {"cx", "ue_px"}
            assert not unused & set(p)


def test_common_fields() -> None:
    p = one(PageView("u"))
    assert p["e"] == "pv" and p["p"] == "srv" and p["tna"] == "ns" and p["aid"] == "app"
    assert p["tv"] == TRACKER_VERSION == f"py-sp-pipeline-{__version__}"
    assert p["dtm"] == str(NOW)
    assert UUID4.fullmatch(p["eid"])
    assert "ttm" not in p and "cx" not in p and "co" not in p
    assert next(iter(p)) == "e"


def test_given_ids_and_timestamps_are_used() -> None:
    p = one(PageView("u", event_id=UUID, timestamp=1234.9, true_timestamp=55))
    assert p["eid"] == UUID and p["dtm"] == "1234" and p["ttm"] == "55"


def test_empty_optional_fields_are_left_out() -> None:
    p = one(PageView("u", title="", referrer=None), TrackerInfo("ns", None))
    assert not {"page", "refr", "aid"} & set(p)
    p = one(StructuredEvent("c", "a", label="", property=""))
    assert not {"se_la", "se_pr", "se_va"} & set(p)


def test_event_ids_are_random_v4() -> None:
    ids = {new_event_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(UUID4.fullmatch(i) for i in ids)


# ------------------------------------------------------------------ event fields


def test_page_view_and_ping_fields() -> None:
    p = one(PageView("https://x/", "T", "https://r/"))
    assert (p["url"], p["page"], p["refr"]) == ("https://x/", "T", "https://r/")
    p = one(PagePing("https://x/", min_x=-3, max_x=40, min_y=0, max_y=900))
    assert (p["e"], p["pp_mix"], p["pp_max"], p["pp_miy"], p["pp_may"]) == ("pp", "-3", "40", "0", "900")


def test_structured_fields() -> None:
    p = one(StructuredEvent("c", "a", "l", "p", 3.0))
    assert {k: p[k] for k in ("e", "se_ca", "se_ac", "se_la", "se_pr", "se_va")} == {
        "e": "se", "se_ca": "c", "se_ac": "a", "se_la": "l", "se_pr": "p", "se_va": "3",
    }


@pytest.mark.parametrize(
    "value, text",
    [(0, "0"), (-7, "-7"), (10**30, "1" + "0" * 30), (3.0, "3"), (-0.0, "0"), (2.5, "2.5"),
     (0.1, "0.1"), (1e20, "1e+20"), (1e300, "1e+300"), (2.0**53, "9007199254740992.0"),
     (1.5e-7, "1.5e-07")],
)
def test_number_format_round_trips(value: float, text: str) -> None:
    assert format_number(value) == text
    assert (int(text) if isinstance(value, int) else float(text)) == value


@pytest.mark.parametrize(
    "value, text",
    [(123.456, "123.46"), (7, "7.00"), (-5, "-5.00"), (0.005, "0.01"), (2.675, "2.67"),
     (-0.001, "0.00"), (10**20, "100000000000000000000.00"), (1.0, "1.00"), (-12.345, "-12.35")],
)
def test_money_has_two_decimals(value: float, text: str) -> None:
    assert format_money(value) == text


def test_screen_view_is_self_describing() -> None:
    p = one(ScreenView(name="home"))
    body = decode_b64(p["ue_px"])["data"]
    assert p["e"] == "ue" and body == {"schema": SCREEN_VIEW, "data": {"name": "home"}}


def test_timing_keeps_int_and_float() -> None:
    p = one(Timing("c", "v", 12, label="l"), PLAIN)
    body = json.loads(p["ue_pr"])["data"]
    assert body == {"schema": TIMING, "data": {"category": "c", "variable": "v", "timing": 12, "label": "l"}}
    assert '"timing":12,' in p["ue_pr"]
    assert json.loads(one(Timing("c", "v", 1.25), PLAIN)["ue_pr"])["data"]["data"]["timing"] == 1.25


def test_self_describing_body_and_padding() -> None:
    p = one(SelfDescribing(SelfDescribingJson(SCHEMA, {"x": "é"})))
    assert decode_b64(p["ue_px"])["data"] == {"schema": SCHEMA, "data": {"x": "é"}}
    assert len(p["ue_px"]) % 4 == 0  # '=' padding kept, as the Python tracker sends it
    assert "+" not in p["ue_px"] and "/" not in p["ue_px"]


# ------------------------------------------------------------------ merging


def test_subject_precedence_event_over_call_over_client() -> None:
    client = Subject(user_id="client", ip_address="1.1.1.1", language="en", timezone="UTC")
    call = Subject(user_id="call", ip_address="2.2.2.2", useragent="ua")
    own = Subject(user_id="event", viewport=(1, 2))
    p = one(PageView("u", subject=own), client_subject=client, subject=call)
    assert (p["uid"], p["ip"], p["ua"], p["lang"], p["tz"], p["vp"]) == (
        "event", "2.2.2.2", "ua", "en", "UTC", "1x2",
    )
    assert one(PageView("u"), client_subject=client)["uid"] == "client"
    assert one(PageView("u"), client_subject=client, subject=call)["uid"] == "call"


def test_empty_subject_field_does_not_erase_a_lower_one() -> None:
    p = one(PageView("u", subject=Subject(user_id="")), client_subject=Subject(user_id="c"))
    assert p["uid"] == "c"


def test_contexts_event_first_then_call() -> None:
    a, b = SelfDescribingJson(SCHEMA, 1), SelfDescribingJson(SCHEMA, 2)
    p = one(PageView("u", contexts=[a]), contexts=[b])
    assert [c["data"] for c in decode_b64(p["cx"])["data"]] == [1, 2]
    p = one(PageView("u"), PLAIN, contexts=[{"schema": SCHEMA, "data": 3}])  # type: ignore[list-item]
    assert json.loads(p["co"])["data"] == [{"schema": SCHEMA, "data": 3}]


def test_build_checks_call_arguments() -> None:
    with pytest.raises(ValidationError) as info:
        build(PageView("u"), B64, now_ms=NOW, contexts=[{"schema": "bad", "data": 1}])  # type: ignore[list-item]
    assert info.value.field == "contexts[0].schema"
    with pytest.raises(ValidationError) as info:
        build(PageView("u"), B64, now_ms=NOW, subject={"user_id": "x"})  # type: ignore[arg-type]
    assert info.value.field == "subject"
    with pytest.raises(ValidationError) as info:
        build(PageView("u"), B64, now_ms=NOW, client_subject="x")  # type: ignore[arg-type]
    assert info.value.field == "client_subject"
    with pytest.raises(ValidationError) as info:
        build({"e": "pv"}, B64, now_ms=NOW)  # type: ignore[arg-type]
    assert info.value.field == "event"


# ------------------------------------------------------------------ transactions


def test_transaction_items_inherit_and_get_their_own_eids() -> None:
    ctx = SelfDescribingJson(SCHEMA, {"c": 1})
    tr = EcommerceTransaction(
        "order-9", 123.456, tax=10, shipping=0.5, currency="EUR", event_id=UUID,
        timestamp=1000, true_timestamp=2000, contexts=[ctx], subject=Subject(user_id="u"),
        items=[EcommerceItem("a", 9.999, 2, name="A"), EcommerceItem("b", 5, -1, category="C")],
    )
    payloads = build(tr, B64, now_ms=NOW)
    assert [p["e"] for p in payloads] == ["tr", "ti", "ti"]
    main, *items = payloads
    assert (main["eid"], main["tr_id"], main["tr_tt"], main["tr_tx"], main["tr_sh"], main["tr_cu"]) == (
        UUID, "order-9", "123.46", "10.00", "0.50", "EUR",
    )
    assert len({p["eid"] for p in payloads}) == 3
    for item in items:
        assert (item["ti_id"], item["ti_cu"], item["dtm"], item["ttm"], item["uid"]) == (
            "order-9", "EUR", "1000", "2000", "u",
        )
        assert item["cx"] == main["cx"]
        assert UUID4.fullmatch(item["eid"])
        assert not any(k.startswith("tr_") for k in item)
    assert (items[0]["ti_sk"], items[0]["ti_pr"], items[0]["ti_qu"], items[0]["ti_nm"]) == ("a", "10.00", "2", "A")
    assert (items[1]["ti_pr"], items[1]["ti_qu"], items[1]["ti_ca"]) == ("5.00", "-1", "C")


def test_transaction_items_share_now_when_no_timestamp() -> None:
    payloads = build(EcommerceTransaction("o", 1, items=[EcommerceItem("s", 1, 1)]), B64, now_ms=NOW)
    assert {p["dtm"] for p in payloads} == {str(NOW)}
    assert "ti_cu" not in payloads[1]


# ------------------------------------------------------------------ tracker info


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"namespace": ""}, "namespace"),
        ({"namespace": 3}, "namespace"),
        ({"app_id": "a\ud800"}, "app_id"),
        ({"platform": "desktop"}, "platform"),
        ({"platform": ["srv"]}, "platform"),
        ({"encode_base64": 1}, "encode_base64"),
    ],
)
def test_tracker_info_rules(kwargs: Dict[str, Any], field: str) -> None:
    args: Dict[str, Any] = {"namespace": "ns", "app_id": "a", **kwargs}
    with pytest.raises(ValidationError) as info:
        TrackerInfo(**args)
    assert info.value.field == field and field in str(info.value)


@pytest.mark.parametrize("platform", ["web", "mob", "pc", "srv", "app", "tv", "cnsl", "iot"])
def test_every_platform_code_is_accepted(platform: str) -> None:
    assert one(PageView("u"), TrackerInfo("ns", None, platform))["p"] == platform


# ------------------------------------------------------------------ encoding


def test_payload_keys_match_the_schema_file() -> None:
    schema = load_schema(PAYLOAD_DATA)
    assert PAYLOAD_KEYS == frozenset(schema["items"]["properties"])


def test_encode_event_is_compact_utf8_json_starting_with_e() -> None:
    p = one(PageView("https://x/é☃", title='quote " and \\ and \n'))
    data = encode_event(p)
    assert data.startswith(b'{"e":"pv",')
    assert data == json.dumps(p, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    assert "é☃".encode() in data  # non-ASCII kept, not escaped
    assert json.loads(data) == p


def test_encode_event_moves_e_first() -> None:
    assert encode_event({"p": "srv", "e": "pv", "tv": "t"}).startswith(b'{"e":"pv",')


@pytest.mark.parametrize(
    "payload, field",
    [
        ({"e": "pv", "url": "x\udc80"}, "url"),
        ({"e": "pv", "k\ud800": "x"}, "k\ud800"),
        ({"e": "pv", "dtm": 5}, "dtm"),
        ({"p": "srv"}, "e"),
    ],
)
def test_encode_event_names_the_bad_field(payload: Dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        encode_event(payload)
    assert info.value.field == field


def test_encoded_events_splice_into_a_valid_post_body() -> None:
    events = [encode_event(p) for ev in all_event_types() for p in build(ev, B64, now_ms=NOW)]
    body = json.loads(post_body(events, 1_700_000_000_999))
    validate(body["data"], PAYLOAD_DATA)
    assert all(e["stm"] == "1700000000999" for e in body["data"])


# ------------------------------------------------------------------ checking


def test_check_accepts_every_encoded_event() -> None:
    for tracker in (B64, PLAIN):
        for ev in all_event_types(contexts=CONTEXTS, subject=Subject(user_id="u")):
            for p in build(ev, tracker, now_ms=NOW):
                data = encode_event(p)
                assert check_event_json(data, len(data)) is None


GOOD = {"e": "pv", "p": "srv", "tv": "t", "url": "u"}


def _json(obj: Any) -> bytes:
    return json.dumps(obj).encode()


@pytest.mark.parametrize(
    "data, reason",
    [
        (_json(GOOD) + b" " * 100, "size"),
        (b"\xff" + _json(GOOD), "json"),
        (b'{"e":"pv","p":"srv","tv":"t","url":"\xff"}', "json"),
        (b'{"e":"pv","p":"srv","tv":"t","url":"\xed\xa0\x80"}', "json"),  # encoded surrogate
        (b'{"e":"pv",', "json"),
        (b" " + _json(GOOD), "json"),
        (b"[" + _json(GOOD) + b"]", "json"),
        (b'"e"', "json"),
        (json.dumps(GOOD).encode("utf-16"), "json"),
        (b'{"e":"pv","p":"srv","tv":"t"} x', "json"),
        (_json({**GOOD, "dtm": 1700000000000}), "field_type"),
        (_json({**GOOD, "url": None}), "field_type"),
        (_json({**GOOD, "url": ["u"]}), "field_type"),
        (b'{"e":"pv","p":"srv","tv":"t","se_va":NaN}', "field_type"),
        (_json({"p": "srv", "tv": "t"}), "missing"),
        (_json({**GOOD, "p": ""}), "missing"),
        (_json({"e": "pv", "p": "srv"}), "missing"),
        (b"{}", "missing"),
        (_json({**GOOD, "stm": "1"}), "stm"),
        (_json({**GOOD, "nope": "1"}), "unknown_field"),
        (_json({**GOOD, "E": "pv"}), "unknown_field"),
    ],
)
def test_check_rejects_with_reason(data: bytes, reason: str) -> None:
    with pytest.raises(FrameError) as info:
        check_event_json(data, len(_json(GOOD)) + 50)
    assert info.value.reason == reason, str(info.value)


def test_event_ids_are_version_4_uuids_and_distinct():
    import uuid

    from sp_pipeline.payload import new_event_id

    ids = [new_event_id() for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    for text in ids[:200]:
        u = uuid.UUID(text)
        assert str(u) == text and u.version == 4 and u.variant == uuid.RFC_4122


def test_a_forked_child_draws_other_event_ids():
    import os

    from sp_pipeline.payload import new_event_id

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(w, new_event_id().encode())
        os._exit(0)
    os.close(w)
    child = os.read(r, 64).decode()
    os.waitpid(pid, 0)
    os.close(r)
    assert child != new_event_id()
