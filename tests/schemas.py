"""Test helper: the Iglu JSON Schemas bundled in ``sp_pipeline/schemas``.

    from tests.schemas import load_schema, validate, validate_event, decode_b64

    validate([payload], "iglu:com.snowplowanalytics.snowplow/payload_data/jsonschema/1-0-4")
    validate_event(payload)  # payload_data, then cx/co and ue_px/ue_pr, inner bodies too

Schemas are read from disk once each and cached. ``validate`` raises
``jsonschema.ValidationError`` (Draft 4, no format checking) on the first violation.
"""

from __future__ import annotations

import base64
import functools
import json
from pathlib import Path
from typing import Any, Dict, Union

import jsonschema

import sp_pipeline

SCHEMA_ROOT = Path(sp_pipeline.__file__).resolve().parent / "schemas"
IGLU_PREFIX = "iglu:"

PAYLOAD_DATA = "iglu:com.snowplowanalytics.snowplow/payload_data/jsonschema/1-0-4"
CONTEXTS = "iglu:com.snowplowanalytics.snowplow/contexts/jsonschema/1-0-1"
UNSTRUCT_EVENT = "iglu:com.snowplowanalytics.snowplow/unstruct_event/jsonschema/1-0-0"
SCREEN_VIEW = "iglu:com.snowplowanalytics.snowplow/screen_view/jsonschema/1-0-0"
TIMING = "iglu:com.snowplowanalytics.snowplow/timing/jsonschema/1-0-0"


def schema_path(uri_or_path: Union[str, Path]) -> Path:
    """File of a schema given as ``iglu:vendor/name/format/version``, as a path
    relative to the bundled schema root, or as an absolute path."""
    text = str(uri_or_path)
    if text.startswith(IGLU_PREFIX):
        text = text[len(IGLU_PREFIX):]
    path = Path(text)
    return path if path.is_absolute() else SCHEMA_ROOT / path


def load_schema(uri_or_path: Union[str, Path]) -> Dict[str, Any]:
    """The schema as a dict (a fresh copy; the cached original stays untouched)."""
    return json.loads(json.dumps(_cached_schema(str(schema_path(uri_or_path)))))


@functools.lru_cache(maxsize=None)
def _cached_schema(path: str) -> Dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        schema: Dict[str, Any] = json.load(f)
    return schema


@functools.lru_cache(maxsize=None)
def _validator(path: str) -> jsonschema.Draft4Validator:
    return jsonschema.Draft4Validator(_cached_schema(path))


def validate(instance: Any, uri_or_path: Union[str, Path]) -> None:
    """Raise ``jsonschema.ValidationError`` unless ``instance`` fits the schema."""
    _validator(str(schema_path(uri_or_path))).validate(instance)


def decode_b64(text: str) -> Any:
    """JSON value inside URL-safe base64 text (padding optional), as ``cx``/``ue_px``."""
    padded = text + "=" * (-len(text) % 4)
    return json.loads(base64.urlsafe_b64decode(padded.encode("ascii")).decode("utf-8"))


def validate_self_describing(instance: Dict[str, Any], expected_schema: str = "") -> None:
    """Validate ``{"schema": uri, "data": value}``: ``value`` against the schema ``uri``
    names (which must be bundled), and ``uri`` equal to ``expected_schema`` if given."""
    if set(instance) != {"schema", "data"}:
        raise AssertionError(f"not a self-describing JSON: keys {sorted(instance)}")
    if expected_schema and instance["schema"] != expected_schema:
        raise AssertionError(f"schema {instance['schema']!r}, expected {expected_schema!r}")
    validate(instance["data"], instance["schema"])


def validate_event(payload: Dict[str, Any]) -> Dict[str, Any]:
    """Validate one tracker-protocol event deeply and return its decoded parts.

    Checks ``[payload]`` against payload_data 1-0-4; the envelope in ``cx``/``co``
    against contexts 1-0-1; the envelope in ``ue_px``/``ue_pr`` against unstruct_event
    1-0-0; and each entity or event body against its own schema when that schema is
    bundled (screen_view, timing...). Returns ``{"contexts": envelope or None,
    "unstruct": envelope or None}`` (decoded JSON).
    """
    validate([payload], PAYLOAD_DATA)
    contexts = _embedded(payload, "cx", "co")
    if contexts is not None:
        validate_self_describing(contexts, CONTEXTS)
        for entity in contexts["data"]:
            _validate_if_bundled(entity)
    unstruct = _embedded(payload, "ue_px", "ue_pr")
    if unstruct is not None:
        validate_self_describing(unstruct, UNSTRUCT_EVENT)
        _validate_if_bundled(unstruct["data"])
    return {"contexts": contexts, "unstruct": unstruct}


def _embedded(payload: Dict[str, Any], b64_key: str, json_key: str) -> Any:
    if b64_key in payload and json_key in payload:
        raise AssertionError(f"both {b64_key} and {json_key} are set")
    if b64_key in payload:
        return decode_b64(payload[b64_key])
    if json_key in payload:
        return json.loads(payload[json_key])
    return None


def _validate_if_bundled(instance: Dict[str, Any]) -> None:
    if schema_path(instance["schema"]).is_file():
        validate_self_describing(instance)
