"""The Bearer token of an Authorization header, and comparing it with one of ours.

The API (web/auth.py) and the probes' full details (dependencies.shows_full_detail) read tokens
alike; the probes run before the app exists too (alerting_app/startup_wait.py), so this imports
nothing of it.
"""
from __future__ import annotations

import hmac


def bearer(authorization: str | None) -> str | None:
    """The token of `Authorization: Bearer <token>`, or None when the header holds no usable one."""
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    # aiohttp decodes header bytes that are not UTF-8 as lone surrogates, which cannot be encoded
    # for hashing or comparison; no token we issue or accept contains them.
    try:
        token.encode()
    except UnicodeEncodeError:
        return None
    return token


def is_token(token: str, ours: str | None) -> bool:
    """Whether `token` is `ours` (a token that is set), compared in constant time."""
    return ours is not None and hmac.compare_digest(token.encode(), ours.encode())
