"""/docs and /redoc render in a real headless browser that can reach nothing but localhost:
Swagger UI and ReDoc come from the pinned fastapi-offline package, not from a CDN."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.database import MigratedDb
from tests.support.requirements import require
from tests.support.server import running_server

# Every host name but 127.0.0.1 fails to resolve: a page fetching a CDN script stays blank.
OFFLINE = "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"
MIN_SCREENSHOT_BYTES = 40_000  # a blank 1280x2000 PNG is a few kilobytes


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    require(None if found else "no chromium on PATH (apt-get install chromium; .ci/run installs it)", "API docs test")
    assert found is not None
    return found


@pytest.fixture(scope="module")
def base_url(db: MigratedDb) -> Iterator[str]:
    with running_server(db, DLW_API_DOCS="public") as url:
        yield url


def browse(url: str, *mode: str) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="dlw-chromium-") as profile:
        return subprocess.run(
            [
                chromium(),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                OFFLINE,
                "--window-size=1280,2000",
                "--virtual-time-budget=10000",
                *mode,
                url,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )


def rendered(url: str, tmp_path: Path) -> tuple[str, Path]:
    """The page's DOM after its scripts ran, and a screenshot of it."""
    dom = browse(url, "--dump-dom")
    assert dom.returncode == 0, dom.stderr
    png = tmp_path / "page.png"
    shot = browse(url, f"--screenshot={png}")
    assert shot.returncode == 0 and png.exists(), shot.stderr
    return dom.stdout, png


def assert_a_real_screenshot(png: Path) -> None:
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > MIN_SCREENSHOT_BYTES, f"{png} is {len(data)} bytes: a blank page?"


def test_swagger_ui_renders_the_operations_offline(base_url: str, tmp_path: Path):
    dom, png = rendered(f"{base_url}/docs", tmp_path)
    assert 'class="swagger-ui' in dom, dom[:2000]
    assert dom.count("opblock-summary") > 10, dom[:2000]
    assert "/api/v1/tasks" in dom and "createTask" in dom
    assert_a_real_screenshot(png)


def test_redoc_renders_the_operations_offline(base_url: str, tmp_path: Path):
    dom, png = rendered(f"{base_url}/redoc", tmp_path)
    assert "operation/createTask" in dom, dom[:2000]
    assert "/api/v1/tasks" in dom
    assert_a_real_screenshot(png)


def test_the_browser_really_is_offline(tmp_path: Path):
    """The control: the same Swagger UI page with FastAPI's CDN script URLs stays blank."""
    page = tmp_path / "cdn.html"
    page.write_text(
        '<html><body><div id="swagger-ui"></div>'
        '<script src="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js"></script>'
        '<script>SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui"})</script>'
        "</body></html>"
    )
    dom = browse(page.as_uri(), "--dump-dom")
    assert dom.returncode == 0, dom.stderr
    assert '<div id="swagger-ui"></div>' in dom.stdout, dom.stdout  # never filled in
    assert 'class="swagger-ui' not in dom.stdout and "opblock" not in dom.stdout
