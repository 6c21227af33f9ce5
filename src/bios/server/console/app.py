"""The console's web application (mounted at `/console`): pages, their JSON, and the rules.

    GET  /login, POST /login, POST /logout       the API key in a cookie (`access.py`)
    GET  /                                       the tenant's runs
    GET  /runs/{run_id}                          a run: curves and checkpoints
    GET  /api/runs/{run_id}/curves?since=V       its curves (`{"unchanged": true}` if still V)
    GET  /runs/{run_id}/checkpoints/{kind}/{name}/download    the checkpoint as a tar
    POST /runs/{run_id}/checkpoints/{kind}/{name}/delete
    GET  /playground, POST /api/playground/sample
    GET  /static/...                             uPlot (MIT, its licence beside it), CSS, JS

Tenants are the API's: a run of another tenant's is a 404 like a missing one. Pages are Jinja2
templates with autoescaping on; the scripts write what they get with `textContent`, and the
Content-Security-Policy allows no inline script at all. A read-only source (`bios console`
over run folders) has no delete and no playground.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs, quote

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from bios import __version__
from bios.errors import InvalidInputError, NotFoundError
from bios.server.console import access
from bios.server.console.archive import tar_chunks
from bios.server.console.sources import MAX_POINTS, Source
from bios.server.samplers import QuotaExceeded
from bios.server.wire import error_field, problem_of

HERE = Path(__file__).resolve().parent
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # "no-referrer" would make Origin "null"
    "X-Frame-Options": "DENY",
}
FORM_LIMIT = 64 * 1024


def clock(timestamp: float | None) -> str:
    if timestamp is None:
        return "never"
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def size(count: int | None) -> str:
    value = float(count or 0)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def templates() -> Environment:
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=True)
    env.filters.update(clock=clock, size=size, path=lambda text: quote(str(text), safe=""))
    return env


def create_app(source: Source, title: str = "Bios console") -> FastAPI:
    app = FastAPI(title=title, version=__version__, docs_url=None, redoc_url=None)
    app.state.source = source
    app.state.guard = access.Guard()
    app.state.env = templates()
    app.state.title = title
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.add_exception_handler(access.LoginRequired, login_required)
    app.add_exception_handler(access.Forbidden, forbidden)
    app.add_exception_handler(NotFoundError, not_found)
    app.add_exception_handler(InvalidInputError, invalid)
    app.add_exception_handler(QuotaExceeded, over_quota)

    @app.middleware("http")
    async def secure_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.update(HEADERS)
        if not request.url.path.startswith(root(request) + "/static/"):
            response.headers["Cache-Control"] = "no-store"
        return response

    add_routes(app)
    return app


# ---- who asks ---------------------------------------------------------------------------------


def root(request: Request) -> str:
    return request.scope.get("root_path", "")


def is_api(request: Request) -> bool:
    return request.url.path.startswith(root(request) + "/api/")


def tenant_of(request: Request) -> str | None:
    source: Source = request.app.state.source
    if not source.needs_key:
        return None
    key = access.cookie_key(request)
    tenant = source.tenant_of_key(key) if key else None
    if tenant is None:
        raise access.LoginRequired()
    return tenant


Tenant = Annotated[str | None, Depends(tenant_of)]


def csrf_of(request: Request) -> str:
    return request.app.state.guard.token(access.cookie_key(request))


async def form_of(request: Request) -> dict[str, str]:
    """An urlencoded form's fields (first value of each)."""
    raw = await request.body()
    if len(raw) > FORM_LIMIT:
        raise InvalidInputError("body", f"a form of {len(raw):,} bytes; at most {FORM_LIMIT:,}")
    fields = parse_qs(raw.decode("utf-8", "replace"), keep_blank_values=True)
    return {name: values[0] for name, values in fields.items()}


def checked(request: Request, sent: str | None) -> None:
    """A state-changing request: same origin, and the CSRF token of the caller's login."""
    request.app.state.guard.check(request, access.cookie_key(request), sent)


def page(request: Request, template: str, status: int = 200, **values: Any) -> HTMLResponse:
    source: Source = request.app.state.source
    values = {
        "root": root(request),
        "title": request.app.state.title,
        "csrf": csrf_of(request),
        "read_only": source.read_only,
        "needs_key": source.needs_key,
        **values,
    }
    html = request.app.state.env.get_template(template).render(**values)
    return HTMLResponse(html, status)


# ---- errors -----------------------------------------------------------------------------------


async def login_required(request: Request, error: access.LoginRequired):
    if is_api(request):
        return JSONResponse({"error": "log in with an API key first"}, 401)
    return RedirectResponse(root(request) + "/login", 303)


async def forbidden(request: Request, error: access.Forbidden):
    if is_api(request):
        return JSONResponse({"error": str(error)}, 403)
    return page(request, "error.html", 403, message=str(error))


async def not_found(request: Request, error: NotFoundError):
    if is_api(request):
        return JSONResponse({"error": str(error)}, 404)
    return page(request, "error.html", 404, message=str(error))


async def invalid(request: Request, error: InvalidInputError):
    if is_api(request):
        return JSONResponse({"error": str(error), "field": error.field}, 400)
    return page(request, "error.html", 400, message=str(error))


async def over_quota(request: Request, error: QuotaExceeded):
    return JSONResponse({"error": str(error)}, 403)


# ---- routes -----------------------------------------------------------------------------------


def add_routes(app: FastAPI) -> None:
    source: Source = app.state.source

    @app.get("/login", response_class=HTMLResponse)
    async def login_form(request: Request):
        if not source.needs_key:
            return RedirectResponse(root(request) + "/", 303)
        return page(request, "login.html", csrf=request.app.state.guard.token(None))

    @app.post("/login")
    async def login(request: Request):
        form = await form_of(request)
        request.app.state.guard.check(request, None, form.get(access.CSRF_FIELD))
        key = form.get("key", "").strip()
        tenant = await run_in_threadpool(source.tenant_of_key, key) if key else None
        if tenant is None:
            error = "That key is unknown or revoked."
            csrf = request.app.state.guard.token(None)
            return page(request, "login.html", 401, csrf=csrf, error=error)
        response = RedirectResponse(root(request) + "/", 303)
        response.set_cookie(
            access.COOKIE,
            key,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path=root(request) or "/",
        )
        return response

    @app.post("/logout")
    async def logout(request: Request):
        form = await form_of(request)
        checked(request, form.get(access.CSRF_FIELD))
        response = RedirectResponse(root(request) + "/login", 303)
        response.delete_cookie(access.COOKIE, path=root(request) or "/")
        return response

    @app.get("/", response_class=HTMLResponse)
    async def runs(request: Request, tenant: Tenant):
        found = await run_in_threadpool(source.runs, tenant)
        return page(request, "runs.html", runs=found, tenant=tenant)

    @app.get("/runs/{run_id}", response_class=HTMLResponse)
    async def run(request: Request, run_id: str, tenant: Tenant):
        found = await run_in_threadpool(source.run, tenant, run_id)
        checkpoints = await run_in_threadpool(source.checkpoints, tenant, run_id)
        return page(request, "run.html", run=found, checkpoints=checkpoints, tenant=tenant)

    @app.get("/api/runs/{run_id}/curves")
    async def curves(
        request: Request, run_id: str, tenant: Tenant, since: int = -1, max_points: int = 0
    ):
        limit = max_points if 2 <= max_points <= 100_000 else MAX_POINTS
        found = await run_in_threadpool(source.curves, tenant, run_id, limit)
        if found["version"] == since:
            return {"version": since, "unchanged": True}
        return JSONResponse(found)  # already plain JSON: FastAPI's encoder would be slow

    @app.get("/runs/{run_id}/checkpoints/{kind}/{name}/download")
    async def download(request: Request, run_id: str, kind: str, name: str, tenant: Tenant):
        folder = await run_in_threadpool(source.checkpoint_folder, tenant, run_id, kind, name)
        filename = quote(f"{run_id}-{kind}-{name}.tar".replace(":", "_"), safe="")
        headers = {"Content-Disposition": f"attachment; filename*=UTF-8''{filename}"}
        return StreamingResponse(
            tar_chunks(folder), media_type="application/x-tar", headers=headers
        )

    @app.post("/runs/{run_id}/checkpoints/{kind}/{name}/delete")
    async def delete(request: Request, run_id: str, kind: str, name: str, tenant: Tenant):
        form = await form_of(request)
        checked(request, form.get(access.CSRF_FIELD))
        if source.read_only:
            raise NotFoundError("this console is read-only")
        await run_in_threadpool(source.delete_checkpoint, tenant, run_id, kind, name)
        return RedirectResponse(f"{root(request)}/runs/{quote(run_id, safe='')}", 303)

    @app.get("/playground", response_class=HTMLResponse)
    async def playground(request: Request, tenant: Tenant, model: str = ""):
        if source.read_only:
            raise NotFoundError("this console is read-only: it has no playground")
        models = await run_in_threadpool(source.playground_models, tenant)
        return page(request, "playground.html", models=models, chosen=model, tenant=tenant)

    @app.post("/api/playground/sample")
    async def sample(request: Request, tenant: Tenant):
        checked(request, request.headers.get(access.CSRF_HEADER))
        if source.read_only:
            raise NotFoundError("this console is read-only: it has no playground")
        raw = await request.body()
        if len(raw) > 2 * FORM_LIMIT * 16:
            raise InvalidInputError("body", "too large for a playground prompt")
        body = read_sample_body(source, raw)
        started = time.perf_counter()
        answer = await run_in_threadpool(source.sample, tenant, body)
        return {**answer, "seconds": time.perf_counter() - started}


def read_sample_body(source: Source, raw: bytes):
    """The playground's JSON request, or a 400 naming the first bad field."""
    try:
        return source.sample_body.model_validate(json.loads(raw or b"null"))
    except json.JSONDecodeError as error:
        raise InvalidInputError("body", f"not valid JSON ({error})") from None
    except ValidationError as error:
        first = error.errors()[0]
        raise InvalidInputError(error_field(tuple(first["loc"])), problem_of(first)) from None
