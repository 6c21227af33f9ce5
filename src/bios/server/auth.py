"""Who a request acts for: API keys and tenants.

Keys are created with `bios keys create --tenant NAME` and sent as the SDK sends them, in the
`X-API-Key` header. They start with `tml-` (the official SDK refuses any other key client-side)
and are stored only as SHA-256 hashes: a key is 32 random bytes, so a fast hash is enough, and a
stolen database reveals none. With auth on (the default when the server listens beyond
loopback) a request without a valid key gets 401; with auth off every request acts for the one
anonymous tenant (None). Every route takes `Tenant` except `healthz`, the signed archive and
export file downloads (the link is the credential) and `auth/apikey/me` (which describes or
revokes the presented key itself); `forward(_backward)` and `bios/diagnose` read their body
only after the key is checked. Every run, checkpoint, sampler and future belongs to a tenant;
other tenants get 404 for it, as if it did not exist (a published checkpoint they may read).
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Annotated

from fastapi import Depends, Request

KEY_PREFIX = "tml-bios-"


class Unauthorized(Exception):
    """No valid API key (answered with 401)."""


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_prefix(key: str) -> str:
    """The part of a key that is safe to show and to name it by (for `bios keys revoke`)."""
    return key[: len(KEY_PREFIX) + 8]


def tenant_of(request: Request) -> str | None:
    state = request.app.state.bios
    if not state.config.auth:
        return None
    key = request.headers.get("x-api-key", "")
    tenant = state.store.tenant_of_key(hash_key(key)) if key else None
    if tenant is None:
        raise Unauthorized("X-API-Key: missing, unknown or revoked API key")
    return tenant


Tenant = Annotated[str | None, Depends(tenant_of)]
