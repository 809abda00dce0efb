"""Reading request bodies and query strings into pydantic models; anything invalid is a 422.

A body larger than MAX_BODY_BYTES is a 413.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Annotated, Any, TypeVar
from uuid import UUID

from faust.web import Request
from pydantic import AfterValidator, AwareDatetime, BaseModel, TypeAdapter, ValidationError

from web.errors import NotFound, PayloadTooLarge, ValidationFailed

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")

# The largest request body read, counted after any Content-Encoding is undone. Our bodies are
# small (one alert with every context entry full is about 150 KB; a batch of a thousand typical
# alerts is a few hundred KB); without a bound one request could make the worker buffer gigabytes.
MAX_BODY_BYTES = 1024 * 1024


async def read_body(request: Request) -> bytes:
    """The whole body, or PayloadTooLarge (413) once it exceeds MAX_BODY_BYTES.

    Read in chunks rather than trusting Content-Length alone: a chunked or compressed body has no
    length that bounds what it decodes to.
    """
    if (request.content_length or 0) > MAX_BODY_BYTES:
        raise PayloadTooLarge(MAX_BODY_BYTES)
    body = bytearray()
    async for chunk in request.content.iter_any():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise PayloadTooLarge(MAX_BODY_BYTES)
    return bytes(body)


def in_utc(value: datetime) -> datetime:
    """`value` in UTC. Near year 1 or 9999 an offset can move it outside what Python's datetime
    (and so asyncpg) can carry: such a time is refused rather than failing in the driver."""
    try:
        return value.astimezone(timezone.utc)
    except OverflowError:
        raise ValueError("out of range: must lie between years 1 and 9999 in UTC") from None


# A timestamptz given by a client: with a UTC offset, and storable.
StorableDatetime = Annotated[AwareDatetime, AfterValidator(in_utc)]


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
    except RecursionError:
        raise ValidationFailed.field("body", "invalid JSON: nested too deeply") from None


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
