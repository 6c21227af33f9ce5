"""Who a console request acts for, and what keeps other sites from acting through it.

Login is a form that posts the API key: the key then lives only in an HttpOnly, SameSite=Strict
cookie scoped to the console's path (never in a URL, so never in an access log; never readable
by the page's scripts). Every state-changing request (login, logout, deleting a checkpoint, a
playground sample) must carry the CSRF token of its login — an HMAC of the key's hash under a
secret this process draws at start — in a form field or the `X-CSRF-Token` header, and must not
come from another origin (`Origin`, where the browser sends one, is checked against `Host`).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from urllib.parse import urlsplit

from fastapi import Request

COOKIE = "bios_console_key"
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf_token"
LOGGED_OUT = "login"  # what the CSRF token of the login form is bound to


class LoginRequired(Exception):
    """No valid key in the cookie (a page redirects to the login form; JSON answers 401)."""


class Forbidden(Exception):
    """A state-changing request without a valid CSRF token, or from another origin (403)."""


class Guard:
    """The secret of this process's CSRF tokens and the checks that use it."""

    def __init__(self, secret: bytes | None = None) -> None:
        self._secret = secret or secrets.token_bytes(32)

    def token(self, key: str | None) -> str:
        """The CSRF token of a login with `key` (None: the login form, or no keys needed)."""
        bound = hashlib.sha256(key.encode()).hexdigest() if key else LOGGED_OUT
        return hmac.new(self._secret, f"csrf:{bound}".encode(), hashlib.sha256).hexdigest()

    def check(self, request: Request, key: str | None, sent: str | None) -> None:
        """Refuse a cross-origin request, or one whose token is not `key`'s."""
        if not same_origin(request):
            raise Forbidden("Origin: a request from another site")
        if not sent or not hmac.compare_digest(sent.encode(), self.token(key).encode()):
            raise Forbidden(f"{CSRF_FIELD}: missing or invalid (reload the page)")


def same_origin(request: Request) -> bool:
    """Whether the request's `Origin` (where the browser sent one) is this server's own."""
    origin = request.headers.get("origin")
    if origin is None:
        return True  # not a browser's cross-site request; the CSRF token still has to match
    host = request.headers.get("host", "")
    return origin != "null" and urlsplit(origin).netloc == host


def cookie_key(request: Request) -> str | None:
    return request.cookies.get(COOKIE) or None
