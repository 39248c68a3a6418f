"""Tracker-protocol payloads: from a validated event to the flat JSON object(s) sent.

A payload is a ``dict[str, str]`` that validates against payload_data 1-0-4 (one item
of its array): every value a string, empty values left out, first key ``e``. Its
encoded form (:func:`encode_event`) is compact UTF-8 JSON starting ``{"e":``, so the
sender can splice ``"stm":"<ms>",`` in right after the opening brace.

Value formats (all strings):

- ``dtm``/``ttm``: whole milliseconds since the epoch (floats truncated).
- ``se_va``: ints as written; floats in Python's shortest round-trip ``repr``, except
  integral floats below 2**53 which drop the ``.0`` (``3.0`` -> ``"3"``, as the
  JavaScript tracker sends them). ``float(s)`` always gives the value back.
- money (``tr_tt``, ``tr_tx``, ``tr_sh``, ``ti_pr``): two decimals, ``"123.46"``,
  rounded like Go's ``FormatFloat(v, 'f', 2, 64)``; ints exactly (``7`` -> ``"7.00"``).
- ``pp_*``, ``ti_qu``, ``vid``, ``cd``: decimal integers.
- ``cx``/``ue_px``: URL-safe base64 with ``=`` padding (what the Python tracker sends)
  of the contexts 1-0-1 / unstruct_event 1-0-0 JSON; ``co``/``ue_pr`` the JSON itself
  when ``TrackerInfo.encode_base64`` is False.

Precedence when merging: the client's subject < the ``track()`` call's subject < the
event's own subject, key by key. Contexts sent: the event's, then the call's.
"""

from __future__ import annotations

import json
import json.scanner
import os
import random
from base64 import urlsafe_b64encode
from json.encoder import encode_basestring
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from sp_pipeline import __version__
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
    check_contexts,
    check_subject,
    check_text,
)

TRACKER_VERSION = f"py-sp-pipeline-{__version__}"
PLATFORMS = frozenset({"web", "mob", "pc", "srv", "app", "tv", "cnsl", "iot"})

PAYLOAD_DATA_SCHEMA = "iglu:com.snowplowanalytics.snowplow/payload_data/jsonschema/1-0-4"
CONTEXTS_SCHEMA = "iglu:com.snowplowanalytics.snowplow/contexts/jsonschema/1-0-1"
UNSTRUCT_EVENT_SCHEMA = "iglu:com.snowplowanalytics.snowplow/unstruct_event/jsonschema/1-0-0"
SCREEN_VIEW_SCHEMA = "iglu:com.snowplowanalytics.snowplow/screen_view/jsonschema/1-0-0"
TIMING_SCHEMA = "iglu:com.snowplowanalytics.snowplow/timing/jsonschema/1-0-0"

#: Property names of payload_data 1-0-4 (additionalProperties is false there); a unit
#: test compares this list with the bundled schema file.
PAYLOAD_KEYS = frozenset(
    """
    tna aid p dtm tz e tid eid tv duid nuid uid vid ip res url page refr fp ctype
    cookie lang f_pdf f_qt f_realp f_wma f_dir f_fla f_java f_gears f_ag cd ds cs vp
    mac pp_mix pp_max pp_miy pp_may ad_ba ad_ca ad_ad ad_uid tr_id tr_af tr_tt tr_tx
    tr_sh tr_ci tr_st tr_co tr_cu ti_id ti_sk ti_nm ti_na ti_ca ti_pr ti_qu ti_cu sa
    sn st sp se_ca se_ac se_la se_pr se_va ue_na ue_pr ue_px co cx ua tnuid stm sid ttm
    """.split()
)
_ACCEPTED_KEYS = PAYLOAD_KEYS - {"stm"}  # the sender adds stm; producers must not
_REQUIRED_KEYS = ("e", "p", "tv")

_CONTEXTS_HEAD = '{"schema":"' + CONTEXTS_SCHEMA + '","data":['
_UNSTRUCT_HEAD = '{"schema":"' + UNSTRUCT_EVENT_SCHEMA + '","data":'
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
_quote = encode_basestring  # C: a str -> its JSON string literal, non-ASCII kept
_QUOTED_KEYS = {k: _quote(k) + ":" for k in PAYLOAD_KEYS}  # '"se_ca":' for every key
_decode_json = json.JSONDecoder().decode
# The C scanner behind json.loads, called directly: (value, end index) for the JSON
# value at an index, without loads()'s Python layers (a third of the writer's check).
_scan_json = json.scanner.make_scanner(json.JSONDecoder())
_JSON_SPACE = " \t\n\r"
_STR_ONLY = frozenset({str})
_STR = str  # bound once: checked per value in check_event_json

Fields = Dict[str, str]


@dataclass(frozen=True, slots=True)
class TrackerInfo:
    """Per-client constants of every payload.

    ``namespace`` -> ``tna`` (non-empty), ``app_id`` -> ``aid`` (left out when None or
    empty), ``platform`` -> ``p`` (one of :data:`PLATFORMS`), ``encode_base64`` picks
    ``cx``/``ue_px`` (True) or ``co``/``ue_pr``. ``static_fields`` is the precomputed
    ``{p, tv, tna, aid}`` part of every payload.
    """

    namespace: str
    app_id: Optional[str]
    platform: str = "srv"
    encode_base64: bool = True
    static_fields: Mapping[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_text("namespace", self.namespace, required=True)
        check_text("app_id", self.app_id)
        if not isinstance(self.platform, str) or self.platform not in PLATFORMS:
            raise ValidationError("platform", f"must be one of {', '.join(sorted(PLATFORMS))}")
        if not isinstance(self.encode_base64, bool):
            raise ValidationError("encode_base64", "must be a bool")
        static = {"p": self.platform, "tv": TRACKER_VERSION, "tna": self.namespace}
        if self.app_id:
            static["aid"] = self.app_id
        object.__setattr__(self, "static_fields", static)


# -------------------------------------------------------------------- value formats


def format_number(value: float) -> str:
    """``se_va`` format: round-trippable decimal text (see the module docstring)."""
    if type(value) is int:
        return str(value)
    if value.is_integer() and abs(value) < 9007199254740992.0:  # 2**53: exact as int
        return str(int(value))
    return repr(value)


def format_money(value: float) -> str:
    """Two decimals, ``"123.46"``; ints exactly; never ``"-0.00"``."""
    if type(value) is int:
        return f"{value}.00"
    text = f"{value:.2f}"
    return "0.00" if text == "-0.00" else text


# Event ids come from a generator seeded from the OS once per process (and again in a
# forked child, so parent and child never share a sequence): a system call per id cost
# more than the rest of the id. Uniqueness is what eids need, not secrecy.
_ids = random.Random(os.urandom(32))
os.register_at_fork(after_in_child=lambda: _ids.seed(os.urandom(32)))
_UUID_KEEP = ~((0xF << 76) | (0xC << 60)) & ((1 << 128) - 1)
_UUID_SET = (0x4 << 76) | (0x8 << 60)  # version 4, RFC 4122 variant


def new_event_id() -> str:
    """A random (version 4) UUID string, several times faster than
    ``str(uuid.uuid4())``; distinct across threads and forked processes."""
    h = "%032x" % ((_ids.getrandbits(128) & _UUID_KEEP) | _UUID_SET)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _b64(text: str) -> str:
    return urlsafe_b64encode(text.encode("utf-8")).decode("ascii")


def _put(fields: Fields, key: str, value: Optional[str]) -> None:
    if value:
        fields[key] = value


def _ue(fields: Fields, body_json: str, encode_base64: bool) -> Fields:
    text = _UNSTRUCT_HEAD + body_json + "}"
    if encode_base64:
        fields["ue_px"] = _b64(text)
    else:
        fields["ue_pr"] = text
    return fields


# ------------------------------------------------------------- per-type fields


def _page_view(ev: PageView, b64: bool) -> Fields:
    fields = {"e": "pv", "url": ev.url}
    _put(fields, "page", ev.title)
    _put(fields, "refr", ev.referrer)
    return fields


def _page_ping(ev: PagePing, b64: bool) -> Fields:
    fields = {"e": "pp", "url": ev.url}
    _put(fields, "page", ev.title)
    _put(fields, "refr", ev.referrer)
    for key, value in (("pp_mix", ev.min_x), ("pp_max", ev.max_x),
                       ("pp_miy", ev.min_y), ("pp_may", ev.max_y)):
        if value is not None:
            fields[key] = str(value)
    return fields


def _structured(ev: StructuredEvent, b64: bool) -> Fields:
    fields = {"e": "se", "se_ca": ev.category, "se_ac": ev.action}
    _put(fields, "se_la", ev.label)
    _put(fields, "se_pr", ev.property)
    if ev.value is not None:
        fields["se_va"] = format_number(ev.value)
    return fields


def _self_describing(ev: SelfDescribing, b64: bool) -> Fields:
    return _ue({"e": "ue"}, ev.event_json.json_text, b64)


def _screen_view(ev: ScreenView, b64: bool) -> Fields:
    data = {}
    _put(data, "name", ev.name)
    _put(data, "id", ev.id)
    body = _ENCODER.encode({"schema": SCREEN_VIEW_SCHEMA, "data": data})
    return _ue({"e": "ue"}, body, b64)


def _timing(ev: Timing, b64: bool) -> Fields:
    data: Dict[str, Any] = {"category": ev.category, "variable": ev.variable, "timing": ev.timing}
    _put(data, "label", ev.label)
    body = _ENCODER.encode({"schema": TIMING_SCHEMA, "data": data})
    return _ue({"e": "ue"}, body, b64)


def _transaction(ev: EcommerceTransaction, b64: bool) -> Fields:
    fields = {"e": "tr", "tr_id": ev.order_id, "tr_tt": format_money(ev.total)}
    _put(fields, "tr_af", ev.affiliation)
    if ev.tax is not None:
        fields["tr_tx"] = format_money(ev.tax)
    if ev.shipping is not None:
        fields["tr_sh"] = format_money(ev.shipping)
    _put(fields, "tr_ci", ev.city)
    _put(fields, "tr_st", ev.state)
    _put(fields, "tr_co", ev.country)
    _put(fields, "tr_cu", ev.currency)
    return fields


def _item(item: EcommerceItem, tr: EcommerceTransaction) -> Fields:
    fields = {
        "e": "ti",
        "ti_id": tr.order_id,
        "ti_sk": item.sku,
        "ti_pr": format_money(item.price),
        "ti_qu": str(item.quantity),
    }
    _put(fields, "ti_nm", item.name)
    _put(fields, "ti_ca", item.category)
    _put(fields, "ti_cu", tr.currency)
    return fields


_EVENT_FIELDS: Dict[type, Callable[[Any, bool], Fields]] = {
    PageView: _page_view,
    PagePing: _page_ping,
    StructuredEvent: _structured,
    SelfDescribing: _self_describing,
    ScreenView: _screen_view,
    Timing: _timing,
    EcommerceTransaction: _transaction,
}


def _fields_maker(event: Any) -> Callable[[Any, bool], Fields]:
    make = _EVENT_FIELDS.get(type(event))
    if make is not None:
        return make
    for cls, make in _EVENT_FIELDS.items():  # a subclass of one of ours
        if isinstance(event, cls):
            return make
    raise ValidationError("event", f"must be one of the sp_pipeline.events types, not {type(event).__name__}")


# --------------------------------------------------------------------------- build


def build(
    event: Event,
    tracker: TrackerInfo,
    *,
    client_subject: Optional[Subject] = None,
    subject: Optional[Subject] = None,
    contexts: Sequence[SelfDescribingJson] = (),
    now_ms: int,
) -> List[Fields]:
    """The payload(s) for ``event``: the event itself first, then (for a transaction)
    one ``ti`` payload per item sharing its dtm, ttm, subject and contexts.

    ``subject`` and ``contexts`` come from the ``track()`` call; they get the cheap
    checks (type, and ``events.check_contexts``), the event was validated when it was
    constructed. ``now_ms`` is the ``dtm`` used when the event has no ``timestamp``.
    Raises ValidationError for an unknown event type or a bad subject/contexts.
    """
    make = _fields_maker(event)
    check_subject(client_subject, "client_subject")
    check_subject(subject)
    if contexts:
        contexts = check_contexts(contexts)
    b64 = tracker.encode_base64
    common = dict(tracker.static_fields)
    common["dtm"] = str(now_ms) if event.timestamp is None else str(int(event.timestamp))
    if event.true_timestamp is not None:
        common["ttm"] = str(int(event.true_timestamp))
    for sub in (client_subject, subject, event.subject):
        if sub is not None:
            common.update(sub.protocol_fields)
    entities = event.contexts + contexts if contexts else event.contexts
    if entities:
        text = _CONTEXTS_HEAD + ",".join([c.json_text for c in entities]) + "]}"
        if b64:
            common["cx"] = _b64(text)
        else:
            common["co"] = text
    main = make(event, b64)
    main.update(common)
    main["eid"] = event.event_id or new_event_id()
    if not isinstance(event, EcommerceTransaction) or not event.items:
        return [main]
    payloads = [main]
    for item in event.items:
        fields = _item(item, event)
        fields.update(common)
        fields["eid"] = new_event_id()
        payloads.append(fields)
    return payloads


# ------------------------------------------------------------------------ encoding


def encode_event(payload: Mapping[str, str]) -> bytes:
    """Compact UTF-8 JSON of one payload (no spaces, non-ASCII kept), first key ``e``.

    Raises ValidationError naming the field whose key or value is not a str or is not
    encodable as UTF-8 (a lone surrogate), or ``e`` when it is missing.
    """
    if next(iter(payload), None) != "e":
        if "e" not in payload:
            raise ValidationError("e", "is required")
        payload = {"e": payload["e"], **payload}
    # Hand-joined rather than json.dumps: every value is a str, and this is about twice
    # as fast as building a C encoder per call (track()'s budget is ~10 us).
    try:
        text = "{" + ",".join([(_QUOTED_KEYS.get(k) or _quote(k) + ":") + _quote(v)
                               for k, v in payload.items()]) + "}"
        return text.encode("utf-8")
    except (TypeError, UnicodeEncodeError):
        raise _unencodable(payload) from None


def _unencodable(payload: Mapping[str, str]) -> ValidationError:
    for key, value in payload.items():
        for part in (key, value):
            if not isinstance(part, str):
                return ValidationError(str(key), f"must be a str, not {type(part).__name__}")
            try:
                part.encode("utf-8")
            except UnicodeEncodeError:
                return ValidationError(str(key), "must be valid Unicode text (lone surrogate)")
    return ValidationError("payload", "is not encodable as UTF-8")  # pragma: no cover


def check_event_json(data: bytes, max_bytes: int) -> None:
    """Check one encoded event received from a producer; return None if it is fine.

    Raises ``FrameError(reason, detail)`` with reason ``size`` (over ``max_bytes``),
    ``json`` (not a UTF-8 JSON object starting with ``{``), ``field_type`` (a value that
    is not a string), ``missing`` (``e``, ``p`` or ``tv`` absent or empty), ``stm`` (the
    sender sets stm, producers must not) or ``unknown_field`` (a key payload_data 1-0-4
    does not allow). The leading ``{`` matters: the sender splices ``stm`` after it.
    """
    if len(data) > max_bytes:
        raise FrameError("size", f"event is {len(data)} bytes, limit {max_bytes}")
    if not data or data[0] != 0x7B:  # b"{"
        raise FrameError("json", "event must be a JSON object starting with '{'")
    try:
        text = data.decode("utf-8")
        obj, end = _scan_json(text, 0)
        if end != len(text) and text[end:].strip(_JSON_SPACE):
            raise ValueError(f"extra data at character {end}")
    except StopIteration:
        raise FrameError("json", "event is not UTF-8 JSON (no value at the start)") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise FrameError("json", f"event is not UTF-8 JSON ({exc})") from None
    if type(obj) is not dict:
        raise FrameError("json", "event must be a JSON object")
    if not {*map(type, obj.values())} <= _STR_ONLY:
        key, value = next((k, v) for k, v in obj.items() if type(v) is not _STR)
        raise FrameError("field_type", f"{key!r} must be a string, not {type(value).__name__}")
    get = obj.get
    if not (get("e") and get("p") and get("tv")):
        key = next(k for k in _REQUIRED_KEYS if not get(k))
        raise FrameError("missing", f"{key!r} is required and must not be empty")
    if not obj.keys() <= _ACCEPTED_KEYS:
        if "stm" in obj:
            raise FrameError("stm", "event carries stm; the sender sets it")
        unknown = sorted(obj.keys() - _ACCEPTED_KEYS)
        raise FrameError("unknown_field", f"field(s) not in payload_data 1-0-4: {unknown[:5]}")
