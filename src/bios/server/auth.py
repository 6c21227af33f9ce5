"""Who a request acts for.

This server runs single-tenant: every request acts for the one anonymous tenant (None), and
the SDK's `X-API-Key` header (which it insists on sending) is accepted as it is. Rows in the
database already carry a tenant column, so per-key tenants slot in here.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request


def tenant_of(request: Request) -> str | None:
    return None


Tenant = Annotated[str | None, Depends(tenant_of)]
