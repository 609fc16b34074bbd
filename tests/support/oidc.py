"""Helpers to run the real test OpenID Connect provider (tests/oidc_provider, Node.js).

The provider is `oidc-provider` (npm) wrapped by tests/oidc_provider/provider.js. Contract:

* web client (authorization code + PKCE S256, required): token endpoint auth method
  ``client_secret_basic`` by default; scopes ``openid email profile``; the id_token is RS256
  and carries ``email``, ``email_verified`` and ``groups`` directly (the email claim is the
  login unless :func:`complete_login` claims another address, verified or not).
* m2m client (client credentials, ``client_secret_basic``): access tokens are JWTs with header
  ``typ: at+jwt`` and ``aud`` = the configured audience. oidc-provider only accepts absolute URIs
  as ``resource`` indicators, so the audience ``dlw-api`` is requested as ``resource=urn:dlw-api``
  (see :func:`resource_indicator`); omitting ``resource`` yields the same token.
* ``POST /__test__/rotate`` switches to the next key of keys.json: the JWKS then publishes only
  the new key and everything is signed with it.
"""

from __future__ import annotations

import collections
import os
import queue
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import IO
from urllib.parse import parse_qs, quote, urljoin, urlsplit

import httpx

PROVIDER_DIR = Path(__file__).resolve().parent.parent / "oidc_provider"
_INSTALL_HINT = "run `npm ci` in tests/oidc_provider"
_COOKIE_PREFIX = "oidc_op_"  # provider cookie names (see cookies.names in provider.js)


class OidcProviderError(RuntimeError):
    """The test OIDC provider could not be started or did not behave as expected."""


def node_available() -> str | None:
    """Return why the provider cannot run (missing Node.js or node_modules), or None if usable."""
    if shutil.which("node") is None:
        return "Node.js (`node`) is not installed or not on PATH"
    if not (PROVIDER_DIR / "node_modules" / "oidc-provider" / "package.json").is_file():
        return f"oidc-provider is not installed: {_INSTALL_HINT}"
    return None


def resource_indicator(audience: str) -> str:
    """Resource indicator the provider maps to ``audience`` (``dlw-api`` -> ``urn:dlw-api``)."""
    return audience if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", audience) else f"urn:{audience}"


def _drain(stream: IO[str], sink: collections.deque[str], ready: queue.Queue[str] | None) -> None:
    for line in stream:
        if ready is not None and line.startswith("READY "):
            ready.put(line.split(" ", 1)[1].strip())
            ready = None
        else:
            sink.append(line.rstrip("\n"))


class OidcProvider:
    """A running test provider (a ``node provider.js`` subprocess); use as a context manager."""

    def __init__(
        self,
        process: subprocess.Popen[str],
        issuer: str,
        audience: str,
        output: collections.deque[str] | None = None,
    ) -> None:
        self.process = process
        self.issuer = issuer
        self.audience = audience
        self.resource = resource_indicator(audience)
        self.output = output if output is not None else collections.deque()

    def logs(self) -> str:
        """Last lines the provider wrote (stderr and non-READY stdout), for failure messages."""
        return "\n".join(self.output)

    def rotate_keys(self) -> str:
        """Sign with (and publish only) the next key; returns its ``kid``."""
        response = httpx.post(f"{self.issuer}/__test__/rotate", timeout=10, trust_env=False)
        response.raise_for_status()
        return str(response.json()["kid"])

    def stop(self) -> None:
        """Terminate the provider process (idempotent)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)

    def __enter__(self) -> OidcProvider:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_oidc_provider(
    *,
    client_id: str,
    client_secret: str,
    redirect_uris: list[str],
    m2m_client_id: str,
    m2m_client_secret: str,
    audience: str,
    port: int = 0,
    token_endpoint_auth_method: str = "client_secret_basic",
    timeout: float = 20.0,
) -> OidcProvider:
    """Start ``node provider.js`` and wait for its ``READY <issuer>`` line."""
    reason = node_available()
    if reason is not None:
        raise OidcProviderError(reason)
    env = {
        **os.environ,
        "OIDC_PORT": str(port),
        "OIDC_CLIENT_ID": client_id,
        "OIDC_CLIENT_SECRET": client_secret,
        "OIDC_REDIRECT_URIS": ",".join(redirect_uris),
        "OIDC_CLIENT_AUTH_METHOD": token_endpoint_auth_method,
        "OIDC_M2M_CLIENT_ID": m2m_client_id,
        "OIDC_M2M_CLIENT_SECRET": m2m_client_secret,
        "OIDC_AUDIENCE": audience,
    }
    process = subprocess.Popen(
        ["node", "provider.js"],
        cwd=PROVIDER_DIR,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    ready: queue.Queue[str] = queue.Queue()
    output: collections.deque[str] = collections.deque(maxlen=200)
    assert process.stdout is not None and process.stderr is not None
    readers = [
        threading.Thread(target=_drain, args=(process.stdout, output, ready), daemon=True),
        threading.Thread(target=_drain, args=(process.stderr, output, None), daemon=True),
    ]
    for reader in readers:
        reader.start()
    deadline = time.monotonic() + timeout
    while True:
        try:
            issuer = ready.get(timeout=0.1)
            break
        except queue.Empty:
            if process.poll() is None and time.monotonic() < deadline:
                continue
        timed_out = process.poll() is None
        if timed_out:
            process.kill()
        process.wait(timeout=5)
        for reader in readers:
            reader.join(timeout=1)
        state = "was killed" if timed_out else f"exited with code {process.returncode}"
        raise OidcProviderError(
            f"OIDC provider {state} before printing READY (timeout {timeout}s):\n" + "\n".join(output)
        )
    return OidcProvider(process, issuer, audience, output)


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc


def complete_login(
    http: httpx.Client,
    authorize_url: str,
    email: str,
    groups: list[str] | None = None,
    *,
    reuse_session: bool = False,
    claimed_email: str | None = None,
    email_verified: bool = True,
) -> str:
    """Drive the provider's login from ``authorize_url``; return the redirect back to the RP.

    ``http`` must be a real network client (not an ASGI TestClient); it keeps the provider
    cookies. Unless ``reuse_session`` is set, the provider's session cookies are dropped first
    so the login form is always submitted with ``email``/``groups``. ``claimed_email`` and
    ``email_verified`` set the id_token's email claims (default: ``email``, verified). The returned URL
    (``redirect_uri?code=...&state=...&iss=...``) is NOT requested.
    """
    if not reuse_session:
        for cookie in list(http.cookies.jar):
            if cookie.name.startswith(_COOKIE_PREFIX):
                http.cookies.jar.clear(cookie.domain, cookie.path, cookie.name)
    redirect_uri = parse_qs(urlsplit(authorize_url).query).get("redirect_uri", [None])[0]
    provider_origin = _origin(authorize_url)

    def is_rp(url: str) -> bool:
        if redirect_uri is not None:
            return url.split("#", 1)[0].split("?", 1)[0] == redirect_uri
        return _origin(url) != provider_origin

    url = authorize_url
    for _ in range(20):
        response = http.get(url, follow_redirects=False)
        if response.status_code == 200 and "/interaction/" in urlsplit(url).path:
            match = re.search(r'<form[^>]*action="([^"]+)"', response.text)
            action = urljoin(url, match.group(1)) if match else f"{url}/login"
            form = {"login": email, "groups": ",".join(groups or []), "email": claimed_email or email}
            form["email_verified"] = "true" if email_verified else "false"
            response = http.post(action, data=form, follow_redirects=False)
        if not response.is_redirect:
            raise OidcProviderError(
                f"unexpected {response.status_code} from {response.request.url}: {response.text[:500]}"
            )
        url = urljoin(str(response.request.url), response.headers["location"])
        if is_rp(url):
            return url
    raise OidcProviderError(f"too many redirects starting at {authorize_url}")


def client_credentials_token(issuer: str, client_id: str, client_secret: str, audience: str) -> str:
    """Fetch a JWT access token for ``audience`` with the client-credentials grant."""
    with httpx.Client(timeout=10, trust_env=False) as http:
        discovery = http.get(f"{issuer}/.well-known/openid-configuration")
        discovery.raise_for_status()
        response = http.post(
            discovery.json()["token_endpoint"],
            # client_secret_basic with RFC 6749 form-encoding of the credentials
            auth=(quote(client_id, safe=""), quote(client_secret, safe="")),
            data={"grant_type": "client_credentials", "resource": resource_indicator(audience)},
        )
    if response.status_code != 200:
        raise OidcProviderError(f"client_credentials failed: {response.status_code} {response.text}")
    return str(response.json()["access_token"])
