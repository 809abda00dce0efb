"""Reading request bodies and query strings into pydantic models; anything invalid is a 422.

A body larger than MAX_BODY_BYTES is a 413.
"""
from __future__ import annotations

import codecs
import json
import math
import re
import sys
from datetime import datetime, timezone
from typing import Annotated, Any, TypeVar
from uuid import UUID

from aiohttp.web_protocol import RequestPayloadError
from faust.web import Request
from pydantic import (AfterValidator, AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Strict, TypeAdapter,
                      ValidationError)
from pydantic_core import PydanticCustomError

from web.errors import NotFound, PayloadTooLarge, UnsupportedMediaType, ValidationFailed

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")

# The largest request body read, counted after any Content-Encoding is undone. Our bodies are
# small (one alert with every context entry full is about 150 KB; a batch of a thousand typical
# alerts is a few hundred KB); without a bound one request could make the worker buffer gigabytes.
MAX_BODY_BYTES = 1024 * 1024

# What aiohttp undoes for us. It takes the header as one coding: another one, or a list ("gzip,
# br"), it hands over still encoded, which would then be read as if it were JSON.
READABLE_ENCODINGS = ("", "identity", "gzip", "deflate")


async def read_body(request: Request) -> bytes:
    """The whole body, or PayloadTooLarge (413) once it exceeds MAX_BODY_BYTES.

    Read in chunks rather than trusting Content-Length alone: a chunked or compressed body has no
    length that bounds what it decodes to.
    """
    # Every line of the header, as one list (RFC 9110, 5.3): aiohttp undoes the coding of the last
    # line, so the first alone was not what the body is read as (`gzip` then `identity` was checked
    # as gzip and read as it came; `gzip` twice, a list of two codings, was undone once).
    encoding = ", ".join(request.headers.getall("Content-Encoding", [])).strip().lower()
    if encoding not in READABLE_ENCODINGS:
        raise UnsupportedMediaType(f"Content-Encoding {encoding!r} is not read here: send the body as it is, "
                                   "or gzip- or deflate-compressed")
    if (request.content_length or 0) > MAX_BODY_BYTES:
        raise PayloadTooLarge(MAX_BODY_BYTES)
    body = bytearray()
    try:
        async for chunk in request.content.iter_any():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise PayloadTooLarge(MAX_BODY_BYTES)
    except RequestPayloadError as exc:
        # A body its Content-Encoding does not undo (gzip that is not gzip), or one cut short.
        raise ValidationFailed.field("body", f"cannot be read: {exc}") from None
    return bytes(body)


def in_utc(value: datetime) -> datetime:
    """`value` in UTC. Near year 1 or 9999 an offset can move it outside what Python's datetime
    (and so asyncpg) can carry: such a time is refused rather than failing in the driver."""
    try:
        return value.astimezone(timezone.utc)
    except OverflowError:
        raise ValueError("out of range: must lie between years 1 and 9999 in UTC") from None


def before_the_last_instant(value: datetime) -> datetime:
    """A time to store: asyncpg writes the last instant Python can hold (9999-12-31T23:59:59.999999)
    as Postgres's infinity, and reads it back without a time zone."""
    if value.replace(tzinfo=None) == datetime.max:
        raise ValueError("out of range: must be before 9999-12-31T23:59:59.999999Z")
    return value


# A number written as text (a query string's `since=1700000000`, or `"ends_at": "1700000000"`).
UNIX_SECONDS_TEXT = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


def from_unix_seconds(value: Any) -> Any:
    """A number, or a number as text, as the UTC instant it is in unix seconds (docs/api.md,
    "Cursors and times").

    Bodies are strict, and strict pydantic takes a datetime from a JSON string only: without this,
    `"ends_at": 1700000000` was refused while `"ends_at": "1700000000"` was taken. Always seconds,
    as silence.changed carries them: pydantic reads a number past 2e10 as milliseconds, so
    `since=253402300800` (seconds past year 9999) was taken as a day of 1978.
    """
    if isinstance(value, str) and UNIX_SECONDS_TEXT.fullmatch(value):
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value  # other text is parsed by pydantic: ISO 8601
    if not math.isfinite(value):  # NaN, Infinity, 1e400: not "out of range" of the calendar, not a time at all
        raise PydanticCustomError("finite_number", "Input should be a finite number")
    try:
        return datetime.fromtimestamp(value, timezone.utc)
    except (OverflowError, OSError, ValueError):
        # Past year 9999, the likely mistake is milliseconds (`since=1700000000000`): say so, as the
        # calendar's bounds alone left the sender to find it.
        hint = ": unix seconds, not milliseconds (a time in milliseconds is a thousand times too large)" if value > 0 else ""
        raise ValueError(f"out of range: must lie between years 1 and 9999 in UTC{hint}") from None


# A timestamptz given by a client: with a UTC offset (or unix seconds), and storable.
# Strict(False): after the number is converted, text (ISO 8601) is parsed as before, in a strict body too.
StorableDatetime = Annotated[AwareDatetime, Strict(False), BeforeValidator(from_unix_seconds), AfterValidator(in_utc),
                             AfterValidator(before_the_last_instant)]


class _DuplicateKey(ValueError):
    pass


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) < len(pairs):
        names = [name for name, _ in pairs]
        raise _DuplicateKey(next(name for name in names if names.count(name) > 1))
    return result


def parse_body(raw: bytes, model: type[M]) -> M:
    # Ambiguous JSON first (a key given twice: pydantic and json.loads would keep the last); then
    # invalid JSON fails here too (pydantic's json_invalid, reported against "body").
    parse_json(raw)
    try:
        return model.model_validate_json(raw.removeprefix(codecs.BOM_UTF8) or b"")
    except ValidationError as exc:
        raise ValidationFailed.from_pydantic(exc) from None


def refuse_a_body(raw: bytes) -> None:
    """422 naming `body` unless `raw` holds nothing: empty, `{}` or `null` (ApiView.body_methods)."""
    if raw.strip() and parse_json(raw) not in ({}, None):
        raise ValidationFailed.field("body", "this request takes no body, and nothing in it would be read: "
                                             "send it without one")


def parse_json(raw: bytes) -> Any:
    # Read as UTF-8 on every route, a leading byte order mark ignored (RFC 8259, 8.1, allows either):
    # json.loads on bytes also detects UTF-16 and UTF-32, which pydantic then refused as "invalid
    # JSON ... column 1", so POST /alerts took what every other route refused, with a message that
    # did not say why. A NUL byte is never in JSON text but is in every UTF-16 or UTF-32 one.
    if b"\0" in raw:
        raise ValidationFailed.field("body", f"not UTF-8 text (a NUL byte at byte {raw.index(0)}): JSON is read as "
                                             "UTF-8, not UTF-16 or UTF-32")
    try:
        text = raw.removeprefix(codecs.BOM_UTF8).decode("utf-8")
    except UnicodeDecodeError as exc:
        start = exc.start + (len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0)
        raise ValidationFailed.field("body", f"not UTF-8 text ({exc.reason} at byte {start}): "
                                             "JSON is read as UTF-8") from None
    try:
        data = json.loads(text, object_pairs_hook=_refuse_duplicate_keys)
    except _DuplicateKey as exc:
        raise ValidationFailed.field("body", f"the key {str(exc)!r} is given more than once") from None
    except json.JSONDecodeError as exc:
        raise ValidationFailed.field("body", f"invalid JSON: {exc}") from None
    except ValueError:
        # The one other ValueError json.loads raises: an integer past Python's limit on converting
        # text to int, whose message tells the caller to call sys.set_int_max_str_digits().
        raise ValidationFailed.field("body", f"a number too long: an integer has at most "
                                             f"{sys.get_int_max_str_digits()} digits") from None
    except RecursionError:
        raise ValidationFailed.field("body", "invalid JSON: nested too deeply") from None
    if _SURROGATE_ESCAPE.search(raw):
        _refuse_lone_surrogates(data)
    return data


# A lone surrogate can only come from a \u escape: UTF-8 cannot encode one. Without this check
# pydantic's JSON parser refused it as "invalid JSON" naming the body (with a message about the
# escape ending), where it names the field for every other value.
# The escape of a high surrogate not followed by a low one, or of a low one not preceded by a high
# one (pairs, as emoji are often written, are one character): only then is the whole body walked.
_HIGH, _LOW = rb"\\u[dD][89abAB][0-9a-fA-F]{2}", rb"\\u[dD][c-fC-F][0-9a-fA-F]{2}"
# The bytes before a low half's escape can look like a high half's without being one: in
# `"\\ud83d\udcdf"` they are an escaped backslash and the text "ud83d", and the low half is alone.
# Such a body is walked too (the walk tells which it is).
_SURROGATE_ESCAPE = re.compile(_HIGH + b"(?!" + _LOW + b")|(?<!" + _HIGH + b")" + _LOW
                               + b"|" + rb"\\" + _HIGH + _LOW)
_SURROGATE = re.compile("[\ud800-\udfff]")


def _refuse_lone_surrogates(data: Any) -> None:
    """422 naming the first string (or object key) holding a surrogate json.loads could not pair:
    text that is no Unicode, which Postgres cannot store and no JSON encoder can write back out."""
    # Iterative, each entry linked to its parent's path: JSON nested a thousand levels deep does
    # not exhaust the stack, nor copies a path per value.
    stack: list[tuple[Any, tuple | None]] = [(data, None)]
    while stack:
        value, path = stack.pop()
        if isinstance(value, dict):
            if any(_SURROGATE.search(key) for key in value):
                raise _lone_surrogate(path, "a key")
            children = list(value.items())
        elif isinstance(value, list):
            children = list(enumerate(value))
        else:
            if isinstance(value, str) and _SURROGATE.search(value):
                raise _lone_surrogate(path, "the value")
            continue
        stack.extend((item, (path, name)) for name, item in reversed(children))  # in document order


def _lone_surrogate(path: tuple | None, what: str) -> ValidationFailed:
    names: list[str] = []
    while path is not None:
        path, name = path
        names.append(str(name))
    return ValidationFailed.field(".".join(reversed(names)) or "body",
                                  f"{what} holds a lone surrogate (\\ud800-\\udfff without its pair), "
                                  "which is not a character")


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


class NoQuery(BaseModel):
    """The query of a handler that reads none: every parameter is unknown, and refused as a list
    refuses one it does not take (ApiView.dispatch)."""

    model_config = ConfigDict(extra="forbid")


def path_id(value: str, what: str) -> UUID:
    """The id of the `what` (rule, endpoint...) a path names. One that cannot exist is simply not
    found, like any other unknown id."""
    try:
        return UUID(value)
    except ValueError:
        raise NotFound(what) from None
