"""ASGI guards in front of the app: the Host check (DNS rebinding), the API key, security headers.

Order (outermost first): HostCheck -> CORS (starlette's, only when origins are given) -> ApiKey -> app,
so a page on a rebound name never reaches anything, and a CORS preflight (which carries no key) is
answered before the key is asked for.
"""
from __future__ import annotations

import hmac
import ipaddress

from starlette.datastructures import Headers, MutableHeaders

from nima_edge.serve.errors import ApiError

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """'example.com:8000' -> 'example.com', '[::1]:8000' -> '::1' (lower case)."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class HostCheck:
    """Refuse requests whose Host header is not one of `allowed` (None: any host)."""

    def __init__(self, app, allowed: set[str] | None):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.allowed is not None:
            host = host_name(Headers(scope=scope).get("host", ""))
            if host not in self.allowed:
                err = ApiError(403, f"Host {host!r} is not served here (a loopback server answers only to "
                                    f"{', '.join(sorted(self.allowed))})", code="host_not_allowed")
                return await err.response()(scope, receive, send)
        await self.app(scope, receive, send)


class ApiKey:
    """Require `Authorization: Bearer KEY` on /v1/ (the page and /health stay open; the page asks for
    the key and sends it)."""

    def __init__(self, app, key: str | None):
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send):
        if (self.key and scope["type"] == "http" and scope["path"].startswith("/v1/")
                and scope["method"] != "OPTIONS"):
            scheme, _, given = Headers(scope=scope).get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.key.encode()):
                err = ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                return await err.response()(scope, receive, send)
        await self.app(scope, receive, send)


# The page loads only its own files: no inline script, nothing from elsewhere, no framing.
PAGE_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class SecurityHeaders:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("x-content-type-options", "nosniff")
                headers.setdefault("referrer-policy", "no-referrer")
                if not scope["path"].startswith("/v1/"):
                    headers.setdefault("content-security-policy", PAGE_POLICY)
                    headers.setdefault("x-frame-options", "DENY")
            await send(message)

        await self.app(scope, receive, send_with_headers)
