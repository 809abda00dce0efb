"""Reading request bodies and query strings into pydantic models; anything invalid is a 422."""
from __future__ import annotations

import json
from typing import Any, TypeVar
from uuid import UUID

from faust.web import Request
from pydantic import BaseModel, TypeAdapter, ValidationError

from web.errors import NotFound, ValidationFailed

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


def parse_body(raw: bytes, model: type[M]) -> M:
    # Invalid JSON fails here too (pydantic's json_invalid, reported against "body").
    try:
        return model.model_validate_json(raw or b"")
    except ValidationError as exc:
        raise ValidationFailed.from_pydantic(exc) from None


def parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw or b"")
    except ValueError as exc:
        raise ValidationFailed.field("body", f"invalid JSON: {exc}") from None


def validate_as(data: Any, adapter: TypeAdapter[T]) -> T:
    try:
        return adapter.validate_python(data)
    except ValidationError as exc:
        raise ValidationFailed.from_pydantic(exc) from None


def parse_query(request: Request, model: type[M]) -> M:
    """Query parameters into `model`, which forbids unknown ones; a repeated parameter is refused too."""
    names = [name for name, _ in request.query.items()]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValidationFailed([{"field": name, "message": "given more than once"} for name in repeated])
    try:
        return model.model_validate(dict(request.query))
    except ValidationError as exc:
        raise ValidationFailed.from_pydantic(exc, whole="query") from None


def path_id(value: str) -> UUID:
    # An id that cannot exist is simply not found, like any other unknown id.
    try:
        return UUID(value)
    except ValueError:
        raise NotFound() from None
