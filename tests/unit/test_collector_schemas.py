"""The collector's Draft-4 subset validator and event checker.

The validator is cross-checked against ``jsonschema.Draft4Validator`` (the reference)
on every bundled schema, with hypothesis-built instances that are valid by
construction and mutated copies of them; the two must agree on valid/invalid.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Dict, Tuple

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sp_pipeline.collector.schemas import (
    PAYLOAD_DATA_1_0_4, EnvelopeError, EventChecker, SchemaError, SchemaRegistry,
    Validator, bundled_schemas, compile_schema, decode_base64url, parse_iglu_uri,
)

SCHEMAS = bundled_schemas()
REGISTRY = SchemaRegistry(SCHEMAS)
CHECKER = EventChecker(REGISTRY)
SP = "iglu:com.snowplowanalytics.snowplow"

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


def instances(schema: Dict[str, Any]) -> st.SearchStrategy[Any]:
    """Instances of ``schema``'s shape, valid or just past a bound (a number one unit
    beyond minimum/maximum, a string one character too long), so that the comparison
    exercises the edges of every rule."""
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    types = schema.get("type")
    if types is None:
        return json_values
    names = [types] if isinstance(types, str) else types
    return st.one_of([_of_type(name, schema) for name in names])


def _of_type(name: str, schema: Dict[str, Any]) -> st.SearchStrategy[Any]:
    lo, hi = schema.get("minimum"), schema.get("maximum")
    lo = None if lo is None else lo - 1
    hi = None if hi is None else hi + 1
    if name == "string":
        if "pattern" in schema:
            return st.from_regex(schema["pattern"])
        return st.text(max_size=schema.get("maxLength", 20) + 1)
    if name == "integer":
        return st.integers(lo, hi)
    if name == "number":
        return st.integers(lo, hi) | st.floats(lo, hi, allow_nan=False, allow_infinity=False)
    if name == "boolean":
        return st.booleans()
    if name == "null":
        return st.none()
    if name == "array":
        return st.lists(instances(schema.get("items", {})), min_size=schema.get("minItems", 0),
                        max_size=3)
    assert name == "object", name
    props = schema.get("properties", {})
    required = set(schema.get("required", ()))
    return st.fixed_dictionaries(
        {k: instances(props[k]) for k in required},
        optional={k: instances(s) for k, s in props.items() if k not in required},
    ).filter(lambda d: len(d) >= schema.get("minProperties", 0))


@st.composite
def mutated(draw: st.DrawFn, schema: Dict[str, Any]) -> Any:
    """A valid instance, then possibly broken in one place."""
    value = draw(instances(schema))
    how = draw(st.sampled_from(["keep", "drop", "extra", "retype", "replace", "nest"]))
    if how == "replace":
        return draw(json_values)
    if isinstance(value, list) and value and how != "keep":
        i = draw(st.integers(0, len(value) - 1))
        value[i] = draw(json_values) if how == "retype" else {"x": value[i]}
    if isinstance(value, dict) and how != "keep":
        keys = sorted(value)
        if how == "drop" and keys:
            del value[draw(st.sampled_from(keys))]
        elif how == "extra":
            value[draw(st.text(max_size=5))] = draw(json_values)
        elif keys:
            value[draw(st.sampled_from(keys))] = draw(json_values)
    return value


_VALIDATORS: Dict[int, Tuple[Validator, jsonschema.Draft4Validator]] = {}


def _agree(schema: Dict[str, Any], instance: Any) -> None:
    if id(schema) not in _VALIDATORS:  # the schemas are module constants: ids are stable
        _VALIDATORS[id(schema)] = (Validator.compile(schema), jsonschema.Draft4Validator(schema))
    ours, reference = _VALIDATORS[id(schema)]
    errors = ours.errors(instance, "data")
    assert (not errors) == reference.is_valid(instance), (instance, errors)


# Strategies built once per schema: building them per example dominates the run time.
CASES = {uri: st.tuples(instances(schema), mutated(schema)) for uri, schema in SCHEMAS.items()}


@pytest.mark.parametrize("uri", sorted(SCHEMAS))
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.filter_too_much])
@given(data=st.data())
def test_agrees_with_draft4validator(uri: str, data: st.DataObject) -> None:
    valid, broken = data.draw(CASES[uri])
    _agree(SCHEMAS[uri], valid)
    _agree(SCHEMAS[uri], broken)


@settings(max_examples=100, deadline=None)
@given(event=mutated(SCHEMAS[f"{SP}/payload_data/jsonschema/1-0-4"]["items"]))
def test_payload_event_fast_path_agrees(event: Any) -> None:
    _agree(SCHEMAS[f"{SP}/payload_data/jsonschema/1-0-4"]["items"], event)


@pytest.mark.parametrize("schema, instance, valid", [
    ({"type": "integer"}, 1.0, False),
    ({"type": "integer"}, True, False),
    ({"type": "number"}, False, False),
    ({"type": "number"}, 3, True),
    ({"type": ["string", "null"]}, None, True),
    ({"enum": [1, None]}, True, False),
    ({"enum": [1]}, 1.0, True),
    ({"pattern": "^a$"}, "a\n", True),  # re.search and ``$``, as the reference does
    ({"pattern": "^a$"}, 5, True),      # pattern applies to strings only
    ({"maxLength": 2}, "\U0001F600\U0001F600", True),  # code points, not bytes
    ({"minimum": 0, "maximum": 100}, 100.5, False),
    ({"minProperties": 1}, {}, False),
    ({"additionalProperties": {"type": "string"}}, {"a": 1}, False),
    ({}, {"anything": [1, None]}, True),
])
def test_edge_cases_match_reference(schema: Dict[str, Any], instance: Any, valid: bool) -> None:
    assert jsonschema.Draft4Validator(schema).is_valid(instance) is valid
    assert Validator.compile(schema).is_valid(instance) is valid


def test_errors_name_the_path_and_the_rule() -> None:
    items = CHECKER.default_items
    event = {"p": "srv", "tv": "t", "se_va": 3, "zz": "x"}
    assert items.errors(event, "data[3]") == [
        "data[3]: missing required property 'e'",
        "data[3].se_va: must be a string",
        "data[3].zz: property not allowed by the schema",
    ]


def test_unsupported_keyword_is_refused_at_compile_time() -> None:
    with pytest.raises(SchemaError, match="allOf"):
        compile_schema({"allOf": [{"type": "string"}]})


def test_registry_holds_the_bundled_instance_schemas_only() -> None:
    uris = REGISTRY.uris()
    assert PAYLOAD_DATA_1_0_4 in uris and f"{SP}/mobile_context/jsonschema/1-0-3" in uris
    assert not any("self-desc" in u for u in uris)  # the meta-schema is not an event schema
    assert REGISTRY.get("iglu:com.acme/thing/jsonschema/1-0-0") is None


@pytest.mark.parametrize("uri, ok", [
    ("iglu:com.acme/my_event/jsonschema/1-0-0", True),
    ("iglu:com.acme/my_event/jsonschema/1-0", False),
    ("iglu:com.acme/my_event/jsonschema/1-0-0\n", False),
    ("com.acme/my_event/jsonschema/1-0-0", False),
    (5, False),
])
def test_parse_iglu_uri(uri: Any, ok: bool) -> None:
    assert (parse_iglu_uri(uri) is not None) is ok


def _b64(value: Any, pad: bool = False) -> str:
    text = base64.urlsafe_b64encode(json.dumps(value).encode()).decode()
    return text if pad else text.rstrip("=")


def _event(**fields: str) -> Dict[str, str]:
    return {"e": "pv", "p": "srv", "tv": "py-1", "eid": "e-1", **fields}


def _contexts(*entities: Any) -> Dict[str, Any]:
    return {"schema": f"{SP}/contexts/jsonschema/1-0-1", "data": list(entities)}


MOBILE = {"schema": f"{SP}/mobile_context/jsonschema/1-0-2",
          "data": {"osType": "ios", "osVersion": "17", "deviceManufacturer": "A",
                   "deviceModel": "B"}}


def test_unpadded_cx_is_decoded_and_entities_checked() -> None:
    acme = {"schema": "iglu:com.acme/thing/jsonschema/1-0-0", "data": {"k": 1}}
    found = CHECKER.event(_event(cx=_b64(_contexts(MOBILE, acme))), "data[0]")
    assert found.errors == []
    assert found.contexts == [MOBILE, acme]
    assert found.unknown_schemas == ["iglu:com.acme/thing/jsonschema/1-0-0"]


def test_bad_entity_is_named_by_its_path() -> None:
    broken = {"schema": MOBILE["schema"], "data": dict(MOBILE["data"], batteryLevel=101)}
    found = CHECKER.event(_event(co=json.dumps(_contexts(MOBILE, broken))), "data[2]")
    assert found.errors == ["data[2].co.data[1].data.batteryLevel: must be <= 100"]


@pytest.mark.parametrize("cx, message", [
    ("%%%", "data[0].cx: not valid base64url"),
    (base64.urlsafe_b64encode(b"{nope").decode(), "data[0].cx: not valid JSON"),
    (_b64({"data": []}), 'data[0].cx: must be a self-describing JSON {"schema", "data"}'),
    (_b64({"schema": f"{SP}/screen_view/jsonschema/1-0-0", "data": []}),
     "data[0].cx.schema: must be a com.snowplowanalytics.snowplow/contexts Iglu URI"),
    (_b64(_contexts({"schema": "not-iglu", "data": {}})),
     "data[0].cx.data[0].schema: must match pattern"),
])
def test_bad_contexts_are_reported(cx: str, message: str) -> None:
    errors = CHECKER.event(_event(cx=cx), "data[0]").errors
    assert len(errors) == 1 and errors[0].startswith(message), errors


def test_self_describing_event_is_checked_against_its_schema() -> None:
    def ue(data: Dict[str, Any]) -> Dict[str, str]:
        inner = {"schema": f"{SP}/timing/jsonschema/1-0-0", "data": data}
        return _event(e="ue", ue_px=_b64({"schema": f"{SP}/unstruct_event/jsonschema/1-0-0",
                                          "data": inner}, pad=True))
    good = CHECKER.event(ue({"category": "c", "variable": "v", "timing": 12.5}), "query")
    assert good.errors == [] and good.unstruct_event["data"]["timing"] == 12.5
    bad = CHECKER.event(ue({"category": "c", "variable": "v", "timing": "12"}), "query")
    assert bad.errors == ["query.ue_px.data.data.timing: must be a number"]
    assert CHECKER.event(_event(e="ue"), "query").errors == [
        "query.e: a self-describing event (ue) needs ue_px or ue_pr"]


def test_envelope_rules() -> None:
    items, events = CHECKER.envelope({"schema": PAYLOAD_DATA_1_0_4, "data": [_event()]})
    assert events == [_event()] and items is CHECKER.default_items
    for body in ([], {"schema": PAYLOAD_DATA_1_0_4}, {"schema": PAYLOAD_DATA_1_0_4, "data": []},
                 {"schema": f"{SP}/payload_data/jsonschema/9-9-9", "data": [_event()]},
                 {"schema": f"{SP}/contexts/jsonschema/1-0-1", "data": [_event()]}):
        with pytest.raises(EnvelopeError):
            CHECKER.envelope(body)


def test_base64url_tolerates_missing_padding_and_standard_alphabet() -> None:
    raw = bytes(range(250))
    for text in (base64.urlsafe_b64encode(raw).decode().rstrip("="),
                 base64.b64encode(raw).decode()):
        assert decode_base64url(text) == raw
    with pytest.raises(ValueError):
        decode_base64url("a")


def test_repeated_contexts_give_the_same_answer_at_each_path() -> None:
    checker = EventChecker(REGISTRY)  # fresh cache
    good = _b64(_contexts(MOBILE))
    broken = _b64(_contexts({"schema": MOBILE["schema"], "data": {}}))
    for i in range(3):
        assert checker.event(_event(cx=good), f"data[{i}]").contexts == [MOBILE]
        errors = checker.event(_event(cx=broken), f"data[{i}]").errors
        assert errors and all(e.startswith(f"data[{i}].cx.data[0].data: missing") for e in errors)
