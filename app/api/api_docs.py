"""/openapi.json, /docs (Swagger UI) and /redoc, working offline.

FastAPI's own pages load their scripts from a CDN, so they are blank on a host without
internet. These pages load the pinned copies the `fastapi-offline` package ships (Swagger UI
and ReDoc), served under /docs-assets. DLW_API_DOCS decides who may read them (see
docs/operator.md): the assets themselves are the vendors' public files and stay public.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import fastapi_offline
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from app.config import Settings
from app.identity.credentials import current_principal

ApiDocsMode = Literal["public", "authenticated", "off"]

ASSETS_PATH = "/docs-assets"
ASSETS_DIR = Path(fastapi_offline.__file__).parent / "static"
OPENAPI_PATH = "/openapi.json"


def api_docs_mode(settings: Settings) -> ApiDocsMode:
    """The configured mode; unset means public in dev mode, authenticated otherwise (fail closed)."""
    if settings.api_docs is not None:
        return settings.api_docs
    return "public" if settings.auth_dev_mode else "authenticated"


def install(app: FastAPI, settings: Settings) -> None:
    """Add the docs routes; create the app with openapi_url, docs_url and redoc_url all None."""
    mode = api_docs_mode(settings)
    if mode == "off":
        return
    app.mount(ASSETS_PATH, StaticFiles(directory=ASSETS_DIR), name="docs-assets")
    dependencies = [Depends(current_principal)] if mode == "authenticated" else []
    router = APIRouter(include_in_schema=False, dependencies=dependencies)

    @router.get(OPENAPI_PATH)
    async def openapi(request: Request) -> JSONResponse:
        schema: dict[str, Any] = request.app.openapi()
        return JSONResponse(schema)

    @router.get("/docs")
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=OPENAPI_PATH,
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS_PATH}/favicon.png",
            oauth2_redirect_url=None,
            # No badge fetched from validator.swagger.io.
            swagger_ui_parameters={"validatorUrl": None},
        )

    @router.get("/redoc")
    async def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=OPENAPI_PATH,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{ASSETS_PATH}/redoc.standalone.js",
            redoc_favicon_url=f"{ASSETS_PATH}/favicon.png",
            with_google_fonts=False,
        )

    app.include_router(router)
