"""An LLM's answer text in; ``[{"type", "description"}]`` or the reason it is not that out.

``FailureAnswer`` is the one model of the answer: its JSON schema (``FAILURES_SCHEMA``, at
least one failure type) constrains generation, and its validation is the first parse. The
paper's ``{"Heading": "Description"}`` dict, a bare list, code fences and surrounding prose
are accepted after it.
"""

from __future__ import annotations

import ast
import json
import re
import unicodedata
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_TYPE_CHARS = 120  # a heading longer than this is cut (report rows stay readable)
MAX_DESCRIPTION_CHARS = 500
MAX_ITEMS = 16  # failure types per answer



def clean_text(text: str, limit: int) -> str:
    """Control and format characters dropped, whitespace collapsed, cut to ``limit`` characters."""
    text = "".join(" " if ch.isspace() else ch for ch in str(text) if ch.isspace() or unicodedata.category(ch)[0] != "C")
    return " ".join(text.split())[:limit]


def _strip_description(text: str) -> str:
    text = clean_text(text, 10 * MAX_DESCRIPTION_CHARS)
    return re.sub(r"^description\s*:\s*", "", text, flags=re.I)[:MAX_DESCRIPTION_CHARS]


def _items(obj: Any) -> tuple[list[dict[str, str]] | None, str | None]:
    valid = validate_answer(obj)
    if valid is not None:
        return valid, None
    if isinstance(obj, dict) and "failures" in obj:
        obj = obj["failures"]
    if isinstance(obj, dict):  # the paper's shape: {"Failure Type Heading": "Description"}
        if not all(isinstance(v, str) for v in obj.values()):
            return None, "a JSON object whose values are not all strings"
        obj = [{"type": k, "description": v} for k, v in obj.items()]
    if not isinstance(obj, list):
        return None, f"expected a list of failure types, got {type(obj).__name__}"
    items: list[dict[str, str]] = []
    for entry in obj:
        if not isinstance(entry, dict):
            continue
        heading = entry.get("type", entry.get("heading", entry.get("name")))
        heading = clean_text(heading, MAX_TYPE_CHARS) if isinstance(heading, str) else ""
        if not heading:
            continue
        description = entry.get("description", "")
        items.append({
            "type": heading,
            "description": _strip_description(description if isinstance(description, str) else ""),
        })
    if obj and not items:
        return None, "no item has a non-empty string 'type'"
    return items, None


_CODE_FENCE = re.compile(r"```[A-Za-z]*\s*\n?(.*?)```", re.S)


def parse_answer(text: str | None) -> tuple[list[dict[str, str]] | None, str | None]:
    """An answer to ``([{"type", "description"}], None)`` or ``(None, reason)``; never raises.

    Accepts ``{"failures": [...]}``, a bare list, the paper's ``{"Heading": "Description"}``
    dict (a Python literal too), inside a code fence or surrounded by prose.
    """
    if text is None or not str(text).strip():
        return None, "empty answer"
    text = str(text).strip()
    m = _CODE_FENCE.search(text)
    if m:
        text = m.group(1).strip()
    obj: Any = None
    # strict=False: raw control characters inside strings, which some grammar backends let
    # through, are kept (and cleaned later) rather than failing the answer.
    decoder = json.JSONDecoder(strict=False)
    try:
        obj = decoder.decode(text)
    except ValueError as e:
        error = f"not JSON: {e}"
        starts = [p for p in (text.find("{"), text.find("[")) if p >= 0]
        if starts:
            try:
                obj, _ = decoder.raw_decode(text[min(starts):])
            except ValueError:
                obj = None
            if obj is None and len(text) < 100_000:
                end = max(text.rfind("}"), text.rfind("]"))
                try:
                    obj = ast.literal_eval(text[min(starts) : end + 1])
                except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
                    obj = None
        if obj is None:
            return None, error
    return _items(obj)



# --------------------------------------------------------------------------- the answer model


class FailureItem(BaseModel):
    """One failure type: a short heading and what the cases show."""

    model_config = ConfigDict(extra="forbid")

    type: str = Field(min_length=1, max_length=MAX_TYPE_CHARS)
    description: str = Field(max_length=MAX_DESCRIPTION_CHARS)


class FailureAnswer(BaseModel):
    """The answer to one prompt: 1 to ``MAX_ITEMS`` failure types."""

    model_config = ConfigDict(extra="forbid")

    failures: list[FailureItem] = Field(min_length=1, max_length=MAX_ITEMS)


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON schema with its ``$defs`` inlined and titles dropped: one flat
    object every structured-output backend reads (some do not follow ``$ref``)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return walk(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: walk(v) for k, v in node.items() if k != "title"}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(schema)


FAILURES_SCHEMA: dict[str, Any] = inline_schema(FailureAnswer)


def validate_answer(obj: Any) -> list[dict[str, str]] | None:
    """Items of an answer that is exactly ``FailureAnswer`` (cleaned), else None."""
    try:
        answer = FailureAnswer.model_validate(obj)
    except ValidationError:
        return None
    items = [{"type": clean_text(f.type, MAX_TYPE_CHARS), "description": _strip_description(f.description)}
             for f in answer.failures]
    return [i for i in items if i["type"]] or None
