"""Keyset pagination: pages ordered by (created_at, id), continued by an opaque cursor.

A cursor names the last row of the previous page, so pages stay stable while rows are added,
and reading page N costs the same as reading page 1.
"""
from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime
from typing import Any, Callable, Generic, Sequence, TypeVar
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, field_validator

from web.validation import in_utc

DEFAULT_LIMIT = 100
MAX_LIMIT = 500

Position = tuple[datetime, UUID]
T = TypeVar("T")


def encode_cursor(created_at: datetime, row_id: UUID) -> str:
    raw = json.dumps([created_at.isoformat(), str(row_id)]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> Position:
    """The position a cursor names; ValueError for anything this API would not have encoded."""
    try:
        created_at, row_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        # A forged cursor may hold any JSON: UUID() and fromisoformat() take strings only.
        if not (isinstance(created_at, str) and isinstance(row_id, str)):
            raise ValueError
        after = datetime.fromisoformat(created_at)
        if after.tzinfo is None:
            raise ValueError
        return in_utc(after), UUID(row_id)
    except (binascii.Error, UnicodeDecodeError, TypeError, ValueError, RecursionError):
        raise ValueError("not a cursor returned by this API") from None


class PageQuery(BaseModel):
    """`limit` and `cursor`; resource queries add their filters. Unknown parameters are refused."""

    model_config = ConfigDict(extra="forbid")

    limit: int = Field(default=DEFAULT_LIMIT, ge=1, le=MAX_LIMIT)
    cursor: Position | None = None

    @field_validator("cursor", mode="before")
    @classmethod
    def _decode(cls, value: Any) -> Any:
        return decode_cursor(value) if isinstance(value, str) else value

    @property
    def after(self) -> tuple[datetime | None, UUID | None]:
        """The cursor as two SQL parameters (both NULL on the first page)."""
        return self.cursor if self.cursor is not None else (None, None)


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None


def page_of(rows: Sequence[Any], query: PageQuery, item: Callable[[Any], T], id_column: str,
            more: bool = False) -> Page[T]:
    """Build a page from up to `limit + 1` rows: the extra row only says that more follow (as
    `more` does, when the caller cut the page short for another reason)."""
    shown = rows[: query.limit]
    more = more or len(rows) > query.limit
    last = shown[-1] if shown else None
    next_cursor = encode_cursor(last["created_at"], last[id_column]) if more and last is not None else None
    return Page(items=[item(row) for row in shown], next_cursor=next_cursor)
