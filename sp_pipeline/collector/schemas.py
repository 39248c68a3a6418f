"""Iglu schemas and a small JSON-Schema (Draft 4) validator, without ``jsonschema``.

The collector must check what it receives without a heavy run-time dependency, and
fast: a sender may push 50,000 events/s at it. So each schema is *compiled* once into a
tree of closures, and the object keyword set is pre-digested (allowed keys as a
frozenset, required keys as a tuple, string-only properties checked in one loop).

Supported keywords, with Draft 4 meaning (``jsonschema.Draft4Validator`` without a
format checker is the reference the unit tests compare against):

    type (name or list; "integer" is an int, 1.0 is not; bool is neither integer nor
    number), properties, required, additionalProperties (false or a schema), items (a
    schema), minItems, maxItems, enum, pattern (``re.search``), minLength, maxLength,
    minimum, maximum (+ boolean exclusiveMinimum/exclusiveMaximum), minProperties,
    maxProperties, and ``{}``.

Annotations (``$schema``, ``self``, ``description``, ``title``, ``default``, ``format``)
are ignored, as Draft4Validator ignores ``format`` unless given a format checker. Any
other keyword raises ``SchemaError`` at compile time: a schema we cannot check fully
is never half-checked silently.

Error strings name the JSON path and the rule: ``data[3].se_va: must be a string``.
"""

from __future__ import annotations

import binascii
import functools
import json
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

from ..errors import SpPipelineError

#: An Iglu URI, as the tracker protocol and the unstruct_event/contexts schemas define it.
IGLU_URI = re.compile(
    r"^iglu:([a-zA-Z0-9-_.]+)/([a-zA-Z0-9-_]+)/([a-zA-Z0-9-_]+)/([0-9]+-[0-9]+-[0-9]+)$"
)

#: Vendors whose bundled files are meta-schemas (they describe schemas, not events, and
#: use ``$ref``/``allOf``, which this validator does not implement).
META_VENDORS = frozenset({"com.snowplowanalytics.self-desc"})

_ANNOTATIONS = frozenset({"$schema", "self", "description", "title", "default", "format"})
_KNOWN = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "minItems",
    "maxItems", "enum", "pattern", "minLength", "maxLength", "minimum", "maximum",
    "exclusiveMinimum", "exclusiveMaximum", "minProperties", "maxProperties",
}) | _ANNOTATIONS

#: ``check(instance, path, errors)`` appends one string per broken rule to ``errors``.
Check = Callable[[Any, str, List[str]], None]


class SchemaError(SpPipelineError):
    """A schema uses a keyword or value this validator does not implement."""


_decode_json = json.JSONDecoder().decode


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_TYPE_TESTS: Dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "integer": _is_int,
    "number": _is_number,
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
}
_ARTICLE = {"integer": "an integer", "array": "an array", "object": "an object"}


def _json_equal(a: Any, b: Any) -> bool:
    """JSON equality as Draft 4 ``enum`` means it: true is not 1, 1 equals 1.0."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a is b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b))
    if _is_number(a) and _is_number(b):
        return bool(a == b)
    return type(a) is type(b) and bool(a == b)


_EXACT_TYPES: Dict[str, Tuple[type, ...]] = {
    "string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
    "null": (type(None),), "object": (dict,), "array": (list,),
}


def _type_check(spec: Any) -> Check:
    names = [spec] if isinstance(spec, str) else list(spec)
    for name in names:
        if name not in _TYPE_TESTS:
            raise SchemaError(f"type: unsupported type name {name!r}")
    # ``type(v) in exact`` answers the JSON-decoded case in one lookup (type(True) is
    # bool, so bool never passes as int); subclasses fall back to the full tests.
    exact = frozenset(t for n in names for t in _EXACT_TYPES[n])
    tests = tuple(_TYPE_TESTS[n] for n in names)
    if len(names) == 1:
        rule = f"must be {_ARTICLE.get(names[0], 'a ' + names[0])}"
    else:
        rule = "must be one of the types " + ", ".join(names)

    def check(v: Any, path: str, errors: List[str]) -> None:
        if type(v) not in exact and not any(t(v) for t in tests):
            errors.append(f"{path}: {rule}")
    return check


def _enum_check(values: List[Any]) -> Check:
    shown = json.dumps(values)[:200]

    def check(v: Any, path: str, errors: List[str]) -> None:
        if not any(_json_equal(v, allowed) for allowed in values):
            errors.append(f"{path}: must be one of {shown}")
    return check


#: Strings whose pattern outcome each compiled ``pattern`` keeps (then starts afresh).
PATTERN_MEMO = 4096


def _string_checks(schema: Mapping[str, Any]) -> Iterator[Check]:
    if "pattern" in schema:
        regex = re.compile(schema["pattern"])
        shown = schema["pattern"]
        # Patterned strings are mostly Iglu URIs, the same few on every event.
        memo: Dict[str, bool] = {}

        def pattern(v: Any, path: str, errors: List[str]) -> None:
            if isinstance(v, str):
                ok = memo.get(v)
                if ok is None:
                    ok = regex.search(v) is not None
                    if len(memo) >= PATTERN_MEMO:
                        memo.clear()
                    memo[v] = ok
                if not ok:
                    errors.append(f"{path}: must match pattern {shown}")
        yield pattern
    lo, hi = schema.get("minLength"), schema.get("maxLength")
    if lo is not None or hi is not None:
        def length(v: Any, path: str, errors: List[str]) -> None:
            if isinstance(v, str):
                if lo is not None and len(v) < lo:
                    errors.append(f"{path}: must be at least {lo} characters long")
                if hi is not None and len(v) > hi:
                    errors.append(f"{path}: must be at most {hi} characters long")
        yield length


def _number_checks(schema: Mapping[str, Any]) -> Iterator[Check]:
    lo, hi = schema.get("minimum"), schema.get("maximum")
    lo_x, hi_x = bool(schema.get("exclusiveMinimum")), bool(schema.get("exclusiveMaximum"))
    if lo is None and hi is None:
        return

    def bounds(v: Any, path: str, errors: List[str]) -> None:
        if not _is_number(v):
            return
        if lo is not None and (v <= lo if lo_x else v < lo):
            errors.append(f"{path}: must be {'>' if lo_x else '>='} {lo}")
        if hi is not None and (v >= hi if hi_x else v > hi):
            errors.append(f"{path}: must be {'<' if hi_x else '<='} {hi}")
    yield bounds


def _size_check(kind: type, lo: Any, hi: Any, noun: str) -> Check:
    """minItems/maxItems or minProperties/maxProperties for values of ``kind``."""
    def size(v: Any, path: str, errors: List[str]) -> None:
        if isinstance(v, kind):
            if lo is not None and len(v) < lo:
                errors.append(f"{path}: must have at least {lo} {noun}")
            if hi is not None and len(v) > hi:
                errors.append(f"{path}: must have at most {hi} {noun}")
    return size


def _array_checks(schema: Mapping[str, Any]) -> Iterator[Check]:
    lo, hi = schema.get("minItems"), schema.get("maxItems")
    if lo is not None or hi is not None:
        yield _size_check(list, lo, hi, "item(s)")
    if "items" in schema:
        if not isinstance(schema["items"], dict):
            raise SchemaError("items: only a single schema is supported, not a list")
        item = compile_schema(schema["items"])

        def items(v: Any, path: str, errors: List[str]) -> None:
            if isinstance(v, list):
                for i, element in enumerate(v):
                    item(element, f"{path}[{i}]", errors)
        yield items


def _is_plain_string(schema: Any) -> bool:
    """True for ``{"type": "string"}`` (plus annotations): checked without a call."""
    return (isinstance(schema, dict) and schema.get("type") == "string"
            and all(k == "type" or k in _ANNOTATIONS for k in schema))


def _object_checks(schema: Mapping[str, Any]) -> Iterator[Check]:
    lo, hi = schema.get("minProperties"), schema.get("maxProperties")
    if lo is not None or hi is not None:
        yield _size_check(dict, lo, hi, "propert(ies)")
    keys = ("properties", "required", "additionalProperties")
    if any(k in schema for k in keys):
        yield _members_check(schema)


_STR_ONLY = frozenset({str})


def _members_check(schema: Mapping[str, Any]) -> Check:
    """properties + required + additionalProperties, in one pass over the members."""
    props: Mapping[str, Any] = schema.get("properties", {})
    required: Tuple[str, ...] = tuple(schema.get("required", ()))
    strings = frozenset(k for k, s in props.items() if _is_plain_string(s))
    others = {k: compile_schema(s) for k, s in props.items() if k not in strings}
    allowed = frozenset(props)
    extra = schema.get("additionalProperties", True)
    closed = extra is False
    extra_check = compile_schema(extra) if isinstance(extra, dict) and extra else None

    # The hot case (payload_data): closed, every property a plain string. A valid
    # event is then recognised with set operations done in C; errors take the long way.
    all_strings = closed and not others and strings == allowed
    required_set = frozenset(required)

    def check(v: Any, path: str, errors: List[str]) -> None:
        if not isinstance(v, dict):
            return
        keys = v.keys()
        if all_strings and keys <= allowed and keys >= required_set \
                and {*map(type, v.values())} <= _STR_ONLY:
            return
        for name in required:
            if name not in v:
                errors.append(f"{path}: missing required property {name!r}")
        for name, value in v.items():
            if name in strings:
                if type(value) is not str and not isinstance(value, str):
                    errors.append(f"{path}.{name}: must be a string")
            elif name in others:
                others[name](value, f"{path}.{name}", errors)
            elif name not in allowed:
                if closed:
                    errors.append(f"{path}.{name}: property not allowed by the schema")
                elif extra_check is not None:
                    extra_check(value, f"{path}.{name}", errors)
    return check


def compile_schema(schema: Any) -> Check:
    """Compile one Draft 4 (sub)schema into a check function.

    Raises ``SchemaError`` for an unsupported keyword. ``{}`` accepts everything.
    """
    if not isinstance(schema, dict):
        raise SchemaError(f"a schema must be an object, got {type(schema).__name__}")
    unknown = set(schema) - _KNOWN
    if unknown:
        raise SchemaError(f"unsupported keyword(s): {', '.join(sorted(unknown))}")
    checks: List[Check] = []
    if "type" in schema:
        checks.append(_type_check(schema["type"]))
    if "enum" in schema:
        checks.append(_enum_check(list(schema["enum"])))
    for family in (_string_checks, _number_checks, _array_checks, _object_checks):
        checks.extend(family(schema))
    if not checks:
        return lambda v, path, errors: None
    if len(checks) == 1:
        return checks[0]
    sequence = tuple(checks)

    def check_all(v: Any, path: str, errors: List[str]) -> None:
        for c in sequence:
            c(v, path, errors)
    return check_all


@dataclass(frozen=True)
class Validator:
    """A compiled schema. ``errors(instance, path)`` returns the broken rules (empty
    when valid); ``path`` is the name the messages give to the root of ``instance``."""

    schema: Mapping[str, Any]
    check: Check

    @classmethod
    def compile(cls, schema: Mapping[str, Any]) -> "Validator":
        return cls(schema, compile_schema(schema))

    def errors(self, instance: Any, path: str = "$") -> List[str]:
        found: List[str] = []
        self.check(instance, path, found)
        return found

    def is_valid(self, instance: Any) -> bool:
        return not self.errors(instance)


@functools.lru_cache(maxsize=4096)
def _parse_iglu_text(uri: str) -> Optional[Tuple[str, str, str, str]]:
    match = IGLU_URI.fullmatch(uri)  # fullmatch: ``$`` alone accepts a final newline
    if match is None:
        return None
    vendor, name, fmt, version = match.groups()
    return vendor, name, fmt, version


def parse_iglu_uri(uri: Any) -> Optional[Tuple[str, str, str, str]]:
    """``(vendor, name, format, version)`` of a well-formed Iglu URI, else ``None``."""
    return _parse_iglu_text(uri) if isinstance(uri, str) else None


def bundled_schemas() -> Dict[str, Dict[str, Any]]:
    """Every bundled instance schema, by Iglu URI (meta-schemas left out).

    Read from the ``sp_pipeline`` package data: ``schemas/<vendor>/<name>/<format>/<version>``.
    """
    found: Dict[str, Dict[str, Any]] = {}
    root = resources.files("sp_pipeline").joinpath("schemas")
    for vendor in root.iterdir():
        if not vendor.is_dir() or vendor.name in META_VENDORS:
            continue
        for name in vendor.iterdir():
            for fmt in (name.iterdir() if name.is_dir() else ()):
                for version in (fmt.iterdir() if fmt.is_dir() else ()):
                    uri = f"iglu:{vendor.name}/{name.name}/{fmt.name}/{version.name}"
                    found[uri] = json.loads(version.read_text(encoding="utf-8"))
    return found


class SchemaRegistry:
    """Compiled validators by Iglu URI. Not changed after construction but for the
    pattern checks' memos, which tolerate concurrent use: shared without a lock."""

    def __init__(self, schemas: Optional[Mapping[str, Mapping[str, Any]]] = None) -> None:
        source = bundled_schemas() if schemas is None else schemas
        self._validators = {uri: Validator.compile(s) for uri, s in source.items()}

    def get(self, uri: str) -> Optional[Validator]:
        """The validator for ``uri``, or ``None`` when the schema is not known."""
        return self._validators.get(uri)

    def uris(self) -> List[str]:
        return sorted(self._validators)


# --- events: payload_data, contexts (cx/co) and self-describing events (ue_px/ue_pr) ---

SNOWPLOW = "com.snowplowanalytics.snowplow"
PAYLOAD_DATA_1_0_4 = f"iglu:{SNOWPLOW}/payload_data/jsonschema/1-0-4"


#: Event fields holding self-describing JSON (plain or base64url), checked in this order.
_JSON_FIELDS = ("cx", "co", "ue_px", "ue_pr")
_JSON_FIELD_SET = frozenset(_JSON_FIELDS)
#: Distinct valid JSON field values remembered per checker (see ``_known_good``), and
#: how many values seen once are remembered as candidates for it.
JSON_FIELD_CACHE = 1024
JSON_FIELD_SEEN = 4096


class EnvelopeError(SpPipelineError, ValueError):
    """A POST body is not a payload_data envelope (answered with 400)."""


@dataclass
class Inspection:
    """What checking one event found.

    ``contexts`` are the decoded entities (``{"schema", "data"}``), ``unstruct_event``
    the decoded inner self-describing event or ``None``; ``unknown_schemas`` the
    well-formed Iglu URIs we hold no schema for (accepted, like Snowplow Micro
    without a custom resolver). The event is good when ``errors`` is empty.
    """

    errors: List[str]
    contexts: List[Any]
    unstruct_event: Optional[Any]
    unknown_schemas: List[str]


_TO_STANDARD_ALPHABET = bytes.maketrans(b"-_", b"+/")


def decode_base64url(text: str) -> bytes:
    """URL-safe base64 with or without padding (standard ``+/`` tolerated too)."""
    try:
        raw = text.encode("ascii").rstrip(b"=").translate(_TO_STANDARD_ALPHABET)
        # strict_mode: only alphabet characters, and padding only at the end (what
        # b64decode(validate=True) checks), without b64decode's Python layers.
        return binascii.a2b_base64(raw + b"=" * (-len(raw) % 4), strict_mode=True)
    except (UnicodeEncodeError, binascii.Error):
        raise ValueError("not valid base64url") from None


class EventChecker:
    """Checks payload_data envelopes and events against a ``SchemaRegistry``.

    Meant for one thread at a time: besides the compiled validators it keeps a cache
    of valid JSON field values (``_known_good``); the compiled ``pattern`` checks keep
    memos that any thread may share (a lost update only means a regex runs again).
    """

    def __init__(self, registry: SchemaRegistry) -> None:
        self.registry = registry
        # Events are checked one by one (a bad event must not spoil its batch), so
        # compile each payload_data version's ``items`` schema on its own.
        self._items: Dict[str, Validator] = {}
        for uri in registry.uris():
            parsed = parse_iglu_uri(uri)
            if parsed and parsed[0] == SNOWPLOW and parsed[1] == "payload_data":
                validator = registry.get(uri)
                assert validator is not None
                self._items[uri] = Validator.compile(validator.schema["items"])
        self.default_items = self._items[PAYLOAD_DATA_1_0_4]
        self._cache: Dict[Tuple[str, str], Inspection] = {}
        self._seen_once: set = set()

    def envelope(self, body: Any) -> Tuple[Validator, List[Any]]:
        """``(event validator, events)`` of a parsed POST body, or ``EnvelopeError``."""
        if not isinstance(body, dict) or set(body) != {"schema", "data"}:
            raise EnvelopeError('body must be {"schema": <payload_data URI>, "data": [...]}')
        parsed = parse_iglu_uri(body["schema"])
        if parsed is None or parsed[:3] != (SNOWPLOW, "payload_data", "jsonschema"):
            raise EnvelopeError("schema: must be a payload_data Iglu URI")
        items = self._items.get(body["schema"])
        if items is None:
            raise EnvelopeError(f"schema: unsupported payload_data version {parsed[3]}")
        if not isinstance(body["data"], list) or not body["data"]:
            raise EnvelopeError("data: must be an array of at least 1 event")
        return items, body["data"]

    def plain_and_valid(self, event: Any, items: Optional[Validator] = None) -> bool:
        """True for a valid event with no JSON field to decode (no ``cx``, ``co``,
        ``ue_px``, ``ue_pr``, and not a self-describing event): most events of a
        batch, recognised without building an ``Inspection`` or a path. False means
        "not known to be fine": call ``event()`` for the full story."""
        if type(event) is not dict or not _JSON_FIELD_SET.isdisjoint(event) or event.get("e") == "ue":
            return False
        errors: List[str] = []
        (items or self.default_items).check(event, "$", errors)
        return not errors

    def event(self, event: Any, path: str, items: Optional[Validator] = None) -> Inspection:
        """Check one event (a flat dict of strings) and decode its JSON fields."""
        found = Inspection((items or self.default_items).errors(event, path), [], None, [])
        if not isinstance(event, dict):
            return found
        for field in _JSON_FIELDS:
            text = event.get(field)
            if isinstance(text, str):
                known = self._known_good(field, text)
                if known is None:  # not seen, or not valid: check it, naming the paths
                    self._json_field(field, text, f"{path}.{field}", found)
                else:
                    found.contexts.extend(known.contexts)
                    found.unstruct_event = known.unstruct_event or found.unstruct_event
                    found.unknown_schemas.extend(known.unknown_schemas)
        if event.get("e") == "ue" and "ue_px" not in event and "ue_pr" not in event:
            found.errors.append(f"{path}.e: a self-describing event (ue) needs ue_px or ue_pr")
        return found

    def _json_field(self, field: str, text: str, path: str, found: Inspection) -> None:
        if field in ("cx", "co"):
            self._contexts(text, field == "cx", path, found)
        else:
            self._unstruct(text, field == "ue_px", path, found)

    def _known_good(self, field: str, text: str) -> Optional[Inspection]:
        """The inspection of one JSON field when it is valid, else ``None``.

        Trackers repeat the same ``cx`` (device, application contexts) on event after
        event, and decoding is most of the cost, so valid values are cached. Only a
        value seen twice is cached: values that never come back (an ``ue_px``, a
        per-page context) would only push the useful ones out, and freeing their cold
        decoded trees costs more than the cache saves. Cached results are shared
        between events and must not be mutated. Used from one thread (the collector's
        event loop); concurrent use can at worst decode a value twice.
        """
        key = (field, text)
        found = self._cache.get(key)
        if found is not None:
            return found
        found = self._check_alone(field, text)
        if found is None:
            return None
        h = hash(key)  # the str caches its hash: cheap the second time
        if h in self._seen_once:
            if len(self._cache) >= JSON_FIELD_CACHE:
                del self._cache[next(iter(self._cache))]  # the oldest entry
            self._cache[key] = found
        else:
            if len(self._seen_once) >= JSON_FIELD_SEEN:
                self._seen_once.clear()
            self._seen_once.add(h)
        return found

    def _check_alone(self, field: str, text: str) -> Optional[Inspection]:
        """The inspection of one JSON field when it is valid, else ``None``."""
        found = Inspection([], [], None, [])
        self._json_field(field, text, field, found)
        return None if found.errors else found

    def _wrapper(self, text: str, encoded: bool, name: str, path: str,
                 found: Inspection) -> Optional[Tuple[Optional[Validator], Any]]:
        """Decode a self-describing JSON field; check it names a ``name`` schema."""
        try:
            # a str for json: bytes would first go through its encoding detection
            value = _decode_json(decode_base64url(text).decode("utf-8") if encoded else text)
        except ValueError as exc:  # UnicodeDecodeError is one
            rule = str(exc) if "base64" in str(exc) else "not valid JSON"
            found.errors.append(f"{path}: {rule}")
            return None
        if not isinstance(value, dict) or "schema" not in value or "data" not in value:
            found.errors.append(f'{path}: must be a self-describing JSON {{"schema", "data"}}')
            return None
        parsed = parse_iglu_uri(value["schema"])
        if parsed is None or parsed[:2] != (SNOWPLOW, name):
            found.errors.append(f"{path}.schema: must be a {SNOWPLOW}/{name} Iglu URI")
            return None
        validator = self.registry.get(value["schema"])
        if validator is None:
            found.unknown_schemas.append(value["schema"])
        else:
            validator.check(value["data"], f"{path}.data", found.errors)
        return validator, value["data"]

    def _entity(self, entity: Any, path: str, checked: bool, found: Inspection) -> None:
        """Check one ``{"schema", "data"}`` against its own schema when known."""
        if not isinstance(entity, dict) or "data" not in entity:
            if not checked:
                found.errors.append(f'{path}: must be a self-describing JSON {{"schema", "data"}}')
            return
        uri = entity.get("schema")
        if not isinstance(uri, str) or parse_iglu_uri(uri) is None:
            if not checked:  # otherwise the wrapper schema's pattern already said so
                found.errors.append(f"{path}.schema: must be an Iglu URI")
            return
        validator = self.registry.get(uri)
        if validator is None:
            found.unknown_schemas.append(uri)
        else:
            validator.check(entity["data"], f"{path}.data", found.errors)

    def _contexts(self, text: str, encoded: bool, path: str, found: Inspection) -> None:
        wrapped = self._wrapper(text, encoded, "contexts", path, found)
        if wrapped is None:
            return
        validator, data = wrapped
        if not isinstance(data, list):
            if validator is None:
                found.errors.append(f"{path}.data: must be an array")
            return
        for i, entity in enumerate(data):
            self._entity(entity, f"{path}.data[{i}]", validator is not None, found)
        found.contexts.extend(data)

    def _unstruct(self, text: str, encoded: bool, path: str, found: Inspection) -> None:
        wrapped = self._wrapper(text, encoded, "unstruct_event", path, found)
        if wrapped is not None:
            validator, data = wrapped
            self._entity(data, f"{path}.data", validator is not None, found)
            found.unstruct_event = data
