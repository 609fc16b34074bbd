"""`dlw openapi`: print (or write) the API's OpenAPI document, as committed in docs/openapi.json.

Regenerate the committed copy after changing a route: `./run dlw openapi --output docs/openapi.json`
(tests/api/test_openapi_document.py fails while it is stale)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from app.config import Settings

COMMITTED = Path("docs/openapi.json")


def document() -> dict[str, Any]:
    """The document of this code, whatever the environment's DLW_* settings say (the routes and
    their declarations alone decide it)."""
    from app.api.factory import create_app

    # model_construct: defaults only, no environment; dev mode so the startup guard needs no secrets.
    settings = Settings.model_construct(auth_dev_mode=True, api_docs="off")
    logging.getLogger("dlw").setLevel(logging.ERROR)  # not the dev-mode warning: no server starts
    schema: dict[str, Any] = create_app(settings).openapi()
    return schema


def document_text() -> str:
    return json.dumps(document(), indent=2, ensure_ascii=False) + "\n"


def cmd_openapi(args: argparse.Namespace) -> int:
    text = document_text()
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0
