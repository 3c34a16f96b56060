"""What the server refuses at the door, before a request reaches a route.

A model server on 127.0.0.1 with no key is meant for the user and programs on their
machine, but the user's browser is on that machine too, and any web page it shows can
send requests to 127.0.0.1. Two defences keep web pages out (see docs/serving.md):

- the Host header must name this server: localhost, 127.0.0.1, ::1, the bound address, or
  a name given with ``--allowed-host``. A DNS-rebinding page reaches 127.0.0.1 under its
  own name (``Host: attacker.example``), so it is refused (403); so is a request whose
  ``Origin`` is another site (the chat page at / is this server's own origin);
- an API POST must be ``Content-Type: application/json``. A page can send a form or a
  ``text/plain`` body to another site without asking, but a JSON body needs the browser's
  CORS permission first, which this server never gives: anything else is a 415.

And so that clients cannot hold connections for ever: the request headers must arrive
within ``read_timeout`` seconds of the connection opening (or of the previous response),
and the body within ``read_timeout`` of the headers (else 408); a body past
``max_body_bytes`` is a 413, checked before and while reading it; an API key, when set,
is checked in constant time.

>>> sorted(allowed_hosts("0.0.0.0", ["Models.Example.com"]))
['127.0.0.1', '::1', 'localhost', 'models.example.com']
>>> host_name("[::1]:8000"), host_name("LocalHost.:8000"), host_name("10.0.0.5")
('::1', 'localhost', '10.0.0.5')
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Iterable
from urllib.parse import urlsplit

from ..errors import ScratchLMError
from . import READ_TIMEOUT_S
from .protocol import APIError

LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
WILDCARDS = ("", "0.0.0.0", "::")  # bind addresses that mean "every interface", not a name


# ---- Host and Origin ---------------------------------------------------------------------------
def host_name(value: str) -> str:
    """The host of a Host header (or an --allowed-host): lower case, without port, brackets
    or a final dot."""
    value = value.strip().lower()
    if value.startswith("["):  # [::1]:8000
        value = value[1:value.find("]")] if "]" in value else value[1:]
    elif value.count(":") == 1:  # name:port (an IPv6 address without brackets has several)
        value = value.split(":")[0]
    return value.rstrip(".")


def allowed_hosts(bound: str, extra: Iterable[str] = ()) -> frozenset[str] | None:
    """The Host names this server answers to: the local names, the address it is bound to
    (unless a wildcard such as 0.0.0.0) and ``extra``; None when ``extra`` holds ``*``."""
    extra = [e for e in extra]
    if "*" in extra:
        return None
    names = {*LOCAL_HOSTS, *(host_name(e) for e in extra)}
    if host_name(bound) not in WILDCARDS:
        names.add(host_name(bound))
    if any(not n for n in names):
        raise ScratchLMError("an allowed host must not be empty")
    return frozenset(names)


def check_api_key(key: str | None) -> str | None:
    """The API key as configured: None for none; an empty or blank key is a mistake (it would
    look set and protect nothing), and so is one no client could send in a header."""
    if key is None:
        return None
    if not key.strip():
        raise ScratchLMError("the API key is empty: give a real key, or leave --api-key and "
                             "SCRATCHLM_API_KEY unset for no key")
    if key != key.strip() or not key.isascii() or not key.isprintable():
        raise ScratchLMError("the API key must be printable ASCII without surrounding spaces "
                             "(it is sent as 'Authorization: Bearer KEY')")
    return key


class RequestGuard:
    """ASGI middleware: refuses a foreign Host or Origin (403) and, on /v1, a POST that is
    not JSON (415), with the OpenAI error body; everything else goes on to the app."""

    def __init__(self, app, allowed: frozenset[str] | None):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            error = self.refusal(scope)
            if error is not None:
                from fastapi.responses import JSONResponse

                await JSONResponse(error.body(), status_code=error.status)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def refusal(self, scope) -> APIError | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = host_name(headers.get("host", ""))
        if self.allowed is not None and host not in self.allowed:
            return APIError(403, f"the Host header {headers.get('host', '')[:100]!r} is not a name of this "
                                 "server (start it with --allowed-host NAME to accept it)", code="host_not_allowed")
        origin = headers.get("origin")
        # A browser names the page a request comes from; only this server's own page (the chat
        # page at /) may call it. Other sites could not read the answers anyway: no CORS here.
        if origin is not None and urlsplit(origin).netloc.lower() != headers.get("host", "").strip().lower():
            return APIError(403, f"cross-origin requests are refused (Origin {origin[:100]!r})",
                            code="origin_not_allowed")
        if scope["method"] in ("POST", "PUT", "PATCH") and scope["path"].startswith("/v1/"):
            media_type = headers.get("content-type", "").split(";")[0].strip().lower()
            if media_type != "application/json":
                return APIError(415, f"the request body must be JSON, sent with 'Content-Type: application/json' "
                                     f"(got {media_type[:100] or 'none'!r})", code="unsupported_media_type")
        return None


def authorize(headers, api_key: str | None) -> None:
    """With an API key set, a request carries ``Authorization: Bearer <key>`` (else 401)."""
    if api_key is None:
        return
    scheme, _, given = headers.get("authorization", "").partition(" ")
    # compare_digest takes the same time wherever the strings differ: no timing hints.
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
        raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                       type="invalid_request_error", code="invalid_api_key")


# ---- the body: its size and how long it takes ----------------------------------------------------
async def read_body(request, limit: int, timeout: float) -> bytes:
    """The body, refusing more than ``limit`` bytes (413) before and while reading it, and a
    body that has not all arrived ``timeout`` seconds after the headers (408)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    body = bytearray()
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise too_large(limit)
    except TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout:g} s",
                       code="request_timeout") from None
    return bytes(body)


def too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than the limit of {limit} bytes", code="request_too_large")


# ---- the headers: a connection that sends nothing, or sends it slowly ------------------------------
def uvicorn_config(app, *, read_timeout: float = READ_TIMEOUT_S, **options):
    """A uvicorn.Config for ``app`` whose connections are closed when a request's headers
    have not all arrived ``read_timeout`` seconds after the connection opened or the last
    response ended. uvicorn's own timeout_keep_alive only covers a connection that sends
    nothing at all after a response: one byte every minute would hold it open for ever."""
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutH11(H11Protocol):
        _header_timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm_header_timer()

        def on_response_complete(self):
            # Armed first, with the finished cycle: super() may start a pipelined request
            # at once (a new cycle), which the timer must then leave alone.
            self._arm_header_timer()
            super().on_response_complete()

        def connection_lost(self, exc):
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

        def _arm_header_timer(self):
            if self._header_timer is not None:
                self._header_timer.cancel()
            # A new request (its headers complete) makes a new self.cycle: then the timer does nothing.
            self._header_timer = self.loop.call_later(read_timeout, self._headers_too_slow, self.cycle)

        def _headers_too_slow(self, cycle):
            if self.cycle is cycle and not self.transport.is_closing():
                self.transport.close()

    options.setdefault("timeout_keep_alive", 5)  # idle between requests (uvicorn's default, said here)
    options.setdefault("h11_max_incomplete_event_size", 16 * 1024)  # request line + headers: 16 KB at most
    return uvicorn.Config(app, http=HeaderTimeoutH11, **options)


__all__ = ["RequestGuard", "allowed_hosts", "host_name", "check_api_key", "authorize", "read_body",
           "too_large", "uvicorn_config", "LOCAL_HOSTS"]
