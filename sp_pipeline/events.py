"""The events an application tracks, and the rules their fields must satisfy.

Every type here is a frozen dataclass validated once, in its constructor: an event that
exists is an event that can be sent. A broken rule raises
``sp_pipeline.errors.ValidationError(field, rule)`` whose ``field`` names the culprit,
dotted and indexed for nested values (``contexts[1].data``, ``items[0].price``).

Rules shared by every type:

- Text fields are ``str`` (never bytes) and must be encodable as UTF-8 (no lone
  surrogates). Required text must not be empty; optional text may be ``None`` or ``""``,
  both of which are left out of the payload.
- Numbers are ``int`` or ``float`` (``bool`` is not a number) and finite doubles (no
  NaN, no infinity, no int beyond the double range). Integer fields (page-ping
  offsets, ``quantity``, ``session_index``, ``color_depth``) are ``int`` within the
  signed 32-bit range, which is how Snowplow's enrichment reads them.
- Timestamps (``timestamp`` -> ``dtm``, ``true_timestamp`` -> ``ttm``) are milliseconds
  since the Unix epoch, from 0 to :data:`MAX_TIMESTAMP_MS` (year 9999); a float is
  truncated to whole milliseconds when the payload is built.
- ``event_id`` is a UUID in canonical 8-4-4-4-12 hex form; it is sent exactly as given.
- Iglu schema URIs match PROTOCOL.md's pattern (:data:`IGLU_URI`).
- Self-describing data must serialise to JSON (``allow_nan=False``). Its JSON text is
  taken once, at construction (:attr:`SelfDescribingJson.json_text`): mutating the
  ``data`` object afterwards does not change what is sent.

Signs, chosen deliberately:

- Money (``total``, ``tax``, ``shipping``, ``price``) and ``quantity`` may be negative:
  refunds and returns are recorded as negative transactions. ``quantity`` is an int.
- Durations (``Timing.timing``), timestamps, session index, colour depth and screen
  sizes must not be negative (sizes and the counters must be positive).
- Page-ping scroll offsets may be negative (right-to-left pages scroll to negative x),
  must be ints, and a given minimum must not exceed its maximum.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import KW_ONLY, dataclass, field
from json import JSONEncoder
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

from sp_pipeline.errors import ValidationError

#: Pattern every Iglu schema URI must match entirely (PROTOCOL.md, contexts 1-0-1).
IGLU_URI = re.compile(r"iglu:[a-zA-Z0-9-_.]+/[a-zA-Z0-9-_]+/[a-zA-Z0-9-_]+/[0-9]+-[0-9]+-[0-9]+")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_SIZE = re.compile(r"([1-9][0-9]*)x([1-9][0-9]*)")

FLOAT_MAX = sys.float_info.max
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
#: Latest accepted timestamp: 9999-12-31T23:59:59.999Z in ms. Also catches values
#: given in microseconds or nanoseconds by mistake.
MAX_TIMESTAMP_MS = 253_402_300_799_999

# allow_nan=False: NaN/Infinity are not JSON and collectors reject them.
# ensure_ascii=False: compact output; lone surrogates then surface as UTF-8 errors.
_JSON = JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)

Number = Union[int, float]
Size = Union[str, Tuple[int, int]]


# ---------------------------------------------------------------------------- checks


def _utf8(name: str, text: str) -> None:
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValidationError(
                name, f"must be valid Unicode text (lone surrogate at index {exc.start})"
            ) from None


def check_text(name: str, value: Any, *, required: bool = False) -> None:
    """Raise ValidationError(name, ...) unless ``value`` is a str encodable as UTF-8;
    ``None`` and ``""`` are allowed only when not ``required``."""
    if value is None:
        if required:
            raise ValidationError(name, "is required")
        return
    if not isinstance(value, str):
        raise ValidationError(name, f"must be a str, not {type(value).__name__}")
    if required and not value:
        raise ValidationError(name, "must not be empty")
    _utf8(name, value)


def _number(
    name: str, value: Any, *, minimum: Optional[Number] = None, maximum: Number = FLOAT_MAX
) -> None:
    """Check an int or float (not bool) that is a finite double, within the bounds.

    Ints beyond the double range are refused too: collectors parse numbers as doubles.
    """
    if value is None:
        raise ValidationError(name, "is required")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError(name, f"must be a number (int or float), not {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValidationError(name, "must be a finite number (no NaN or infinity)")
    if minimum is not None and value < minimum:
        raise ValidationError(name, f"must be >= {minimum}")
    if value > maximum or value < -FLOAT_MAX:
        raise ValidationError(name, f"must be between {-FLOAT_MAX:g} and {maximum:g}")


def _integer(name: str, value: Any, *, minimum: int = INT32_MIN) -> None:
    """Check an int (not bool) from ``minimum`` up to INT32_MAX: Snowplow's enrichment
    reads the integer fields (pp_*, ti_qu, vid) as 32-bit ints."""
    if value is None:
        raise ValidationError(name, "is required")
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(name, f"must be an int, not {type(value).__name__}")
    if value < minimum:
        raise ValidationError(name, f"must be >= {minimum}")
    if value > INT32_MAX:
        raise ValidationError(name, f"must be <= {INT32_MAX} (a 32-bit integer)")


def _iglu(name: str, value: Any) -> None:
    check_text(name, value, required=True)
    if not IGLU_URI.fullmatch(value):
        raise ValidationError(
            name, "must be an Iglu URI like iglu:com.acme/name/jsonschema/1-0-0"
        )


def _json_text(name: str, obj: Any) -> str:
    """Compact JSON text of ``obj``; ``name`` is blamed when it cannot be serialised."""
    try:
        text = _JSON.encode(obj)
    except (TypeError, ValueError, RecursionError) as exc:
        raise ValidationError(name, f"must be JSON-serialisable without NaN/infinity ({exc})")
    _utf8(name, text)
    return text


def _size(name: str, value: Any) -> Optional[str]:
    """Normalise a (width, height) pair or a "WxH" string to "WxH"; None stays None."""
    if value is None:
        return None
    if isinstance(value, str):
        if not _SIZE.fullmatch(value):
            raise ValidationError(name, 'must look like "1920x1080" (positive integers)')
        return value
    if isinstance(value, (tuple, list)) and len(value) == 2:
        _integer(f"{name}[0]", value[0], minimum=1)
        _integer(f"{name}[1]", value[1], minimum=1)
        return f"{value[0]}x{value[1]}"
    raise ValidationError(name, 'must be a (width, height) pair or a "WxH" string')


def _scroll_range(low_name: str, low: Any, high_name: str, high: Any) -> None:
    for name, value in ((low_name, low), (high_name, high)):
        if value is not None:
            _integer(name, value)
    if low is not None and high is not None and low > high:
        raise ValidationError(low_name, f"must not exceed {high_name}")


# ------------------------------------------------------------ self-describing JSON


@dataclass(frozen=True, slots=True)
class SelfDescribingJson:
    """A JSON value with the Iglu schema that describes it (an entity or event body).

    ``json_text`` is the compact JSON of ``{"schema": schema, "data": data}``, taken at
    construction; the payload uses it, so later changes to ``data`` are not sent.
    """

    schema: str
    data: Any
    json_text: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _iglu("schema", self.schema)
        text = _json_text("data", {"schema": self.schema, "data": self.data})
        object.__setattr__(self, "json_text", text)


def _self_describing(name: str, value: Any) -> SelfDescribingJson:
    """Accept a SelfDescribingJson, or a mapping with exactly "schema" and "data"."""
    if isinstance(value, SelfDescribingJson):
        return value
    if not isinstance(value, Mapping):
        raise ValidationError(name, f"must be a SelfDescribingJson, not {type(value).__name__}")
    extra = set(value) - {"schema", "data"}
    if extra:
        raise ValidationError(name, f"unexpected key(s) {sorted(map(str, extra))}")
    if "data" not in value:
        raise ValidationError(f"{name}.data", "is required")
    try:
        return SelfDescribingJson(value.get("schema"), value["data"])
    except ValidationError as exc:
        raise ValidationError(f"{name}.{exc.field}", exc.rule) from None


def check_contexts(contexts: Any, name: str = "contexts") -> Tuple[SelfDescribingJson, ...]:
    """Validate a sequence of context entities and return it as a tuple.

    Each item is a :class:`SelfDescribingJson` or a mapping ``{"schema", "data"}``
    (converted). ``Client.track(contexts=...)`` should call this once per call.
    """
    if type(contexts) is tuple:
        for c in contexts:
            if type(c) is not SelfDescribingJson:
                break
        else:
            return contexts  # the common, already-valid case: no copy
    if isinstance(contexts, (str, bytes, Mapping)) or not isinstance(contexts, Sequence):
        raise ValidationError(name, "must be a sequence of SelfDescribingJson")
    return tuple(_self_describing(f"{name}[{i}]", c) for i, c in enumerate(contexts))


def check_subject(subject: Any, name: str = "subject") -> None:
    """Raise ValidationError unless ``subject`` is None or a :class:`Subject`."""
    if subject is not None and not isinstance(subject, Subject):
        raise ValidationError(name, f"must be a Subject, not {type(subject).__name__}")


# --------------------------------------------------------------------------- subject

# Subject attribute -> tracker-protocol key, in payload order.
_SUBJECT_KEYS = (
    ("user_id", "uid"),
    ("ip_address", "ip"),
    ("useragent", "ua"),
    ("domain_user_id", "duid"),
    ("network_user_id", "tnuid"),
    ("session_id", "sid"),
    ("session_index", "vid"),
    ("screen_resolution", "res"),
    ("viewport", "vp"),
    ("color_depth", "cd"),
    ("timezone", "tz"),
    ("language", "lang"),
)
_SUBJECT_TEXT = (
    "user_id", "ip_address", "useragent", "domain_user_id", "network_user_id",
    "session_id", "timezone", "language",
)


@dataclass(frozen=True, slots=True)
class Subject:
    """Who and where an event comes from. Set per client, per ``track()`` call or per
    event; when several are given they merge key by key, the most specific winning.

    ``screen_resolution`` and ``viewport`` accept ``(width, height)`` or ``"WxH"`` and
    are stored as ``"WxH"``. ``protocol_fields`` holds the non-empty fields under their
    tracker-protocol keys (uid, ip, ua, duid, tnuid, sid, vid, res, vp, cd, tz, lang),
    every value a str.
    """

    user_id: Optional[str] = None
    ip_address: Optional[str] = None
    useragent: Optional[str] = None
    domain_user_id: Optional[str] = None
    network_user_id: Optional[str] = None
    session_id: Optional[str] = None
    session_index: Optional[int] = None
    screen_resolution: Optional[Size] = None
    viewport: Optional[Size] = None
    color_depth: Optional[int] = None
    timezone: Optional[str] = None
    language: Optional[str] = None
    protocol_fields: Mapping[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in _SUBJECT_TEXT:
            check_text(name, getattr(self, name))
        for name in ("session_index", "color_depth"):
            if getattr(self, name) is not None:
                _integer(name, getattr(self, name), minimum=1)
        for name in ("screen_resolution", "viewport"):
            object.__setattr__(self, name, _size(name, getattr(self, name)))
        pairs = {}
        for name, key in _SUBJECT_KEYS:
            value = getattr(self, name)
            if value is not None and value != "":
                pairs[key] = value if isinstance(value, str) else str(value)
        object.__setattr__(self, "protocol_fields", pairs)


# ---------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Event:
    """Base of every trackable event: the keyword-only fields all events share.

    ``timestamp`` (-> ``dtm``) and ``true_timestamp`` (-> ``ttm``) are ms since the
    epoch; ``contexts`` are entities attached to this event (stored as a tuple);
    ``subject`` overrides the client's and the ``track()`` call's subject key by key.
    """

    _: KW_ONLY
    event_id: Optional[str] = None
    timestamp: Optional[Number] = None
    true_timestamp: Optional[Number] = None
    contexts: Sequence[SelfDescribingJson] = ()
    subject: Optional[Subject] = None

    def __post_init__(self) -> None:
        if self.event_id is not None:
            check_text("event_id", self.event_id, required=True)
            if not _UUID.fullmatch(self.event_id):
                raise ValidationError("event_id", "must be a UUID like 8-4-4-4-12 hex digits")
        if self.timestamp is not None:
            _number("timestamp", self.timestamp, minimum=0, maximum=MAX_TIMESTAMP_MS)
        if self.true_timestamp is not None:
            _number("true_timestamp", self.true_timestamp, minimum=0, maximum=MAX_TIMESTAMP_MS)
        if self.contexts != ():  # skip the call in the common case: events are built per track()
            object.__setattr__(self, "contexts", check_contexts(self.contexts))
        if self.subject is not None:
            check_subject(self.subject)
        self._check()

    def _check(self) -> None:
        """Validate the fields specific to one event type (overridden)."""


@dataclass(frozen=True, slots=True)
class PageView(Event):
    """A page view (``e=pv``): ``url`` required; ``title`` -> page, ``referrer`` -> refr."""

    url: str
    title: Optional[str] = None
    referrer: Optional[str] = None

    def _check(self) -> None:
        check_text("url", self.url, required=True)
        check_text("title", self.title)
        check_text("referrer", self.referrer)


@dataclass(frozen=True, slots=True)
class PagePing(Event):
    """A page ping (``e=pp``): like a page view plus scroll offsets in pixels (ints)."""

    url: str
    title: Optional[str] = None
    referrer: Optional[str] = None
    min_x: Optional[int] = None
    max_x: Optional[int] = None
    min_y: Optional[int] = None
    max_y: Optional[int] = None

    def _check(self) -> None:
        check_text("url", self.url, required=True)
        check_text("title", self.title)
        check_text("referrer", self.referrer)
        _scroll_range("min_x", self.min_x, "max_x", self.max_x)
        _scroll_range("min_y", self.min_y, "max_y", self.max_y)


@dataclass(frozen=True, slots=True)
class ScreenView(Event):
    """A screen view: a self-describing event (screen_view 1-0-0); at least one of
    ``name`` and ``id`` must be non-empty."""

    name: Optional[str] = None
    id: Optional[str] = None

    def _check(self) -> None:
        check_text("name", self.name)
        check_text("id", self.id)
        if not self.name and not self.id:
            raise ValidationError("name", "name or id is required (both are empty)")


@dataclass(frozen=True, slots=True)
class StructuredEvent(Event):
    """A structured event (``e=se``): ``category`` and ``action`` required; ``value``
    a finite number of any sign."""

    category: str
    action: str
    label: Optional[str] = None
    property: Optional[str] = None
    value: Optional[Number] = None

    def _check(self) -> None:
        check_text("category", self.category, required=True)
        check_text("action", self.action, required=True)
        check_text("label", self.label)
        check_text("property", self.property)
        if self.value is not None:
            _number("value", self.value)


@dataclass(frozen=True, slots=True)
class SelfDescribing(Event):
    """A custom self-describing event (``e=ue``) whose body is ``event_json``."""

    event_json: SelfDescribingJson

    def _check(self) -> None:
        if self.event_json is None:
            raise ValidationError("event_json", "is required")
        object.__setattr__(self, "event_json", _self_describing("event_json", self.event_json))


@dataclass(frozen=True, slots=True)
class Timing(Event):
    """A user timing: a self-describing event (timing 1-0-0). ``timing`` is a
    non-negative duration in milliseconds; an int stays an int in the JSON."""

    category: str
    variable: str
    timing: Number
    label: Optional[str] = None

    def _check(self) -> None:
        check_text("category", self.category, required=True)
        check_text("variable", self.variable, required=True)
        _number("timing", self.timing, minimum=0)
        check_text("label", self.label)


@dataclass(frozen=True, slots=True)
class EcommerceItem:
    """One line of a transaction. ``price`` is money (any sign), ``quantity`` an int
    (negative for returns). Sent as its own ``ti`` event with the transaction."""

    sku: str
    price: Number
    quantity: int
    name: Optional[str] = None
    category: Optional[str] = None

    def __post_init__(self) -> None:
        check_text("sku", self.sku, required=True)
        _number("price", self.price)
        _integer("quantity", self.quantity)
        check_text("name", self.name)
        check_text("category", self.category)


@dataclass(frozen=True, slots=True)
class EcommerceTransaction(Event):
    """An order (``e=tr``) and its ``items`` (one ``ti`` event each). Money values are
    finite numbers of any sign; ``currency`` is an ISO 4217 code by convention."""

    order_id: str
    total: Number
    affiliation: Optional[str] = None
    tax: Optional[Number] = None
    shipping: Optional[Number] = None
    city: Optional[str] = None
    state: Optional[str] = None
    country: Optional[str] = None
    currency: Optional[str] = None
    items: Sequence[EcommerceItem] = ()

    def _check(self) -> None:
        check_text("order_id", self.order_id, required=True)
        _number("total", self.total)
        for name in ("tax", "shipping"):
            if getattr(self, name) is not None:
                _number(name, getattr(self, name))
        for name in ("affiliation", "city", "state", "country", "currency"):
            check_text(name, getattr(self, name))
        object.__setattr__(self, "items", _items(self.items))


def _items(items: Any) -> Tuple[EcommerceItem, ...]:
    if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Sequence):
        raise ValidationError("items", "must be a sequence of EcommerceItem")
    for i, item in enumerate(items):
        if not isinstance(item, EcommerceItem):
            raise ValidationError(f"items[{i}]", f"must be an EcommerceItem, not {type(item).__name__}")
    return tuple(items)
