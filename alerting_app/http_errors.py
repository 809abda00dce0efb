"""aiohttp middleware: the web server's own error answers (no such route, a method a route does not
take) as JSON like every other API error (web/errors.py), not aiohttp's plain text: a client
parsing `{"error": ...}` gets one shape whatever went wrong."""
from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

_KEPT_HEADERS = ("Allow",)  # a 405 says which methods the route takes


@web.middleware
async def json_http_errors(request: web.Request,
                           handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise  # redirects and the like are not errors
        code = exc.reason.lower().replace(" ", "_")  # "Not Found" -> "not_found", as web/errors.py names them
        headers = {name: exc.headers[name] for name in _KEPT_HEADERS if name in exc.headers}
        return web.json_response({"error": code}, status=exc.status, headers=headers)
