"""Conditional requests (RFC 9110, section 13): ETags, If-Match and If-None-Match.

Each resource a tenant can change (a rule, an endpoint, a silence, a client) has a strong ETag: a
hash of its JSON representation as `GET` shows it, so it changes whenever anything `GET` shows
does (an `updated_at`, a silence's `state`), and needs no column of its own. A change evaluates
If-Match and If-None-Match against the row it has locked, in the transaction that writes it: no
other change can come between the check and the write.

If-Unmodified-Since is refused rather than evaluated: an HTTP date has whole seconds, so two
changes within one second would pass for one, the very lost update the header is for (and a
silence's `state` changes with no write at all). Alongside If-Match it is ignored, as RFC 9110
13.1.4 requires. If-Modified-Since, a cache's validator only, is ignored: the answer is then the
whole representation, which is never wrong.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from http import HTTPStatus
from typing import Literal, NamedTuple

from aiohttp.web import RequestKey
from faust.web import Request, Response, View
from pydantic import BaseModel

from web.errors import PreconditionFailed, ValidationFailed

ANY = "*"
# The methods a single resource's view evaluates If-Match and If-None-Match for
# (ApiView.conditional_methods); HEAD is GET.
RESOURCE_METHODS = frozenset({"GET", "PUT", "PATCH", "DELETE"})

# One element of the list (RFC 9110 8.8.3): [W/] DQUOTE *etagc DQUOTE, then a comma or the end.
# aiohttp's request.if_match reads only the first header line and stops silently at anything it
# cannot read: `If-Match: 3` read as a list of no tags, and so as a mismatch nobody was told of.
_ELEMENT = re.compile(r'[ \t]*(?:(W/)?"([\x21\x23-\x7e\x80-\U0010ffff]*)")?[ \t]*(?:,|$)')


class EntityTag(NamedTuple):
    weak: bool
    opaque: str  # without its quotes


def entity_tag(representation: BaseModel) -> str:
    """The strong ETag (quoted) of what GET answers for the resource."""
    data = json.dumps(representation.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return '"' + hashlib.sha256(data.encode()).hexdigest()[:32] + '"'


Tags = tuple[EntityTag, ...] | Literal["*"]


def entity_tags(header: str, lines: list[str]) -> Tags:
    """The header's tags (all its lines are one list), or `*`; a 422 naming it if malformed."""
    value = ", ".join(lines)
    if value.strip(" \t") == ANY:
        return ANY
    tags, at = [], 0
    while at < len(value):
        element = _ELEMENT.match(value, at)
        if element is None or element.end() == at:
            break
        if element[2] is not None:
            tags.append(EntityTag(weak=element[1] is not None, opaque=element[2]))
        at = element.end()
    if at < len(value) or not tags:
        raise ValidationFailed.field(header, 'must be * or a list of quoted entity tags, as an ETag header gives '
                                             'them ("3f2a...", W/"3f2a..."); the request was not carried out')
    return tuple(tags)


@dataclass(frozen=True)
class Preconditions:
    """The request's If-Match and If-None-Match: their tags, `*`, or None when absent."""

    if_match: Tags | None = None
    if_none_match: Tags | None = None

    def check(self, current: BaseModel, what: str, *, reading: bool = False) -> bool:
        """Whether the request goes on with `current`, the resource as it stands: 412 if If-Match
        does not name its ETag, or If-None-Match does while changing it; False (answer 304) if
        If-None-Match names it while `reading`."""
        if self.if_match is None and self.if_none_match is None:
            return True
        tag = entity_tag(current)[1:-1]
        # Strong comparison for If-Match (a weak tag never matches), weak for If-None-Match (13.1.1-2).
        if self.if_match not in (None, ANY) and \
                not any(not given.weak and given.opaque == tag for given in self.if_match):
            raise PreconditionFailed(f"If-Match names no ETag of the {what} as it stands (it has changed since "
                                     f"it was read): read it again for its current ETag; nothing was changed")
        if self.if_none_match == ANY or \
                (self.if_none_match is not None and any(given.opaque == tag for given in self.if_none_match)):
            if reading:
                return False
            raise PreconditionFailed(f"If-None-Match names the {what} as it stands: nothing was changed")
        return True


NONE = Preconditions()
PRECONDITIONS = RequestKey("preconditions", Preconditions)


def read_preconditions(request: Request, method: str, evaluated: bool) -> Preconditions:
    """The request's preconditions, or a 422 naming a header this request would not honour:
    If-Unmodified-Since anywhere without If-Match, and If-Match or (but on GET) If-None-Match where
    the view does not evaluate them (`evaluated`), rather than a change made regardless."""
    headers = request.headers
    if not evaluated:
        for header in ("If-Match", "If-Unmodified-Since") + (() if method == "GET" else ("If-None-Match",)):
            if header in headers:
                raise ValidationFailed.field(
                    header, "not evaluated by this request (only by GET, PUT, PATCH and DELETE of one rule, "
                            "endpoint, silence or client): send it without it; nothing was carried out")
        return NONE
    if "If-Unmodified-Since" in headers and "If-Match" not in headers:
        raise ValidationFailed.field(
            "If-Unmodified-Since", "not supported: a date has whole seconds, and two changes within one "
                                   "would pass for one; send If-Match with the ETag instead; nothing was carried out")
    return Preconditions(
        if_match=entity_tags("If-Match", headers.getall("If-Match")) if "If-Match" in headers else None,
        if_none_match=(entity_tags("If-None-Match", headers.getall("If-None-Match"))
                       if "If-None-Match" in headers else None),
    )


def preconditions(request: Request) -> Preconditions:
    return request.get(PRECONDITIONS, NONE)  # type: ignore[attr-defined]


def representation(view: View, request: Request, shown: BaseModel, *, tagged: BaseModel | None = None,
                   status: int = 200, what: str) -> Response:
    """`shown` as JSON, with the ETag of `tagged`: the resource as GET shows it, where `shown` adds
    what is shown once (a secret, a key); `shown` itself by default. A GET evaluates the request's
    preconditions here: 304 without a body when If-None-Match names the ETag, 412 when If-Match
    names none."""
    tag_of = tagged if tagged is not None else shown
    headers = {"ETag": entity_tag(tag_of)}
    if request.method in ("GET", "HEAD") and not preconditions(request).check(tag_of, what, reading=True):
        return view.bytes(b"", status=HTTPStatus.NOT_MODIFIED, headers=headers)
    return view.json(shown.model_dump(mode="json"), status=status, headers=headers)

