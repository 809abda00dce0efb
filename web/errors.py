"""The API's error answers, as Faust web errors: a view raises one and Faust renders it as JSON.

Every body is `{"error": <code>, ...}`; a 422 also lists the failing fields.
"""
from __future__ import annotations

from http import HTTPStatus
from typing import Any

from faust.web.exceptions import WebError
from pydantic import ValidationError


class Unauthorized(WebError):
    code = HTTPStatus.UNAUTHORIZED
    detail = "unauthorized"

    # Says what to send, never why a token was refused (one of the messages below). Before, a 401
    # alone had no message, unlike every other error.
    def __init__(self, message: str) -> None:
        super().__init__(message=message)


# No token at all, or an Authorization header that holds none (another scheme, an empty token).
NO_TOKEN = "send Authorization: Bearer <token>"
# The same words for every token that is none of ours: a mistyped or stale client key, one whose
# client was deleted, a wrong guess at the admin or ingest token, bytes that are not UTF-8. Nothing
# says which kind of token was nearly right, or whether a client existed.
NOT_OUR_TOKEN = "this token is not valid (a client key replaced or deleted, or mistyped)"
TWO_AUTHORIZATIONS = "send one Authorization header, not several"


class Forbidden(WebError):
    code = HTTPStatus.FORBIDDEN
    detail = "forbidden"

    # Says what the token may not do: a bare `{"error": "forbidden"}` left a tenant whose key was
    # refused (sending an alert, say) to guess whether the key was wrong or the route closed to it.
    def __init__(self, message: str) -> None:
        super().__init__(message=message)


class NotFound(WebError):
    code = HTTPStatus.NOT_FOUND
    detail = "not_found"

    # The same words for an id that names nothing and one that names another client's object: a
    # tenant must not learn that the object exists. Before, the 404 alone had no message.
    def __init__(self, what: str) -> None:
        super().__init__(message=f"no {what} with this id that this token may see")


class Conflict(WebError):
    code = HTTPStatus.CONFLICT
    detail = "conflict"

    def __init__(self, message: str) -> None:
        super().__init__(message=message)


class PayloadTooLarge(WebError):
    code = HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    detail = "payload_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(message=f"the request body is larger than {limit} bytes")


class UnsupportedMediaType(WebError):
    code = HTTPStatus.UNSUPPORTED_MEDIA_TYPE
    detail = "unsupported_media_type"

    def __init__(self, message: str) -> None:
        super().__init__(message=message)


class RateLimited(WebError):
    code = HTTPStatus.TOO_MANY_REQUESTS
    detail = "rate_limited"

    def __init__(self, retry_after_s: int, message: str) -> None:
        super().__init__(message=message)
        self.retry_after_s = retry_after_s  # whole seconds: the Retry-After header


class BrokerUnavailable(WebError):
    code = HTTPStatus.SERVICE_UNAVAILABLE
    detail = "broker_unavailable"


def pydantic_message(error: Any) -> str:
    """One pydantic error's text as the API shows it: our validators' own message, without the
    "Value error, " pydantic puts before it (a Python exception class's name, noise to a tenant)."""
    return error["msg"].removeprefix("Value error, ")


class ValidationFailed(WebError):
    code = HTTPStatus.UNPROCESSABLE_ENTITY
    detail = "validation_failed"

    def __init__(self, fields: list[dict[str, str]]) -> None:
        super().__init__(fields=fields)

    @classmethod
    def field(cls, name: str, message: str) -> "ValidationFailed":
        return cls([{"field": name, "message": message}])

    @classmethod
    def from_pydantic(cls, exc: ValidationError, *, whole: str = "body") -> "ValidationFailed":
        """One entry per failing field, named by its dotted path (`0.severity` inside a list)."""
        fields: list[dict[str, Any]] = []
        for error in exc.errors(include_url=False):
            name = ".".join(str(part) for part in error["loc"]) or whole
            fields.append({"field": name, "message": pydantic_message(error)})
        return cls(fields)


class PreconditionFailed(WebError):
    """412: an If-Match or If-None-Match the resource as it stands does not meet (web/preconditions.py)."""

    code = HTTPStatus.PRECONDITION_FAILED
    detail = "precondition_failed"

    def __init__(self, message: str) -> None:
        super().__init__(message=message)
