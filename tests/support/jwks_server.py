"""A tiny local identity-provider stand-in for token-validation tests: it serves a discovery
document and a JWKS over real HTTP, and signs tokens with the test keys of the real provider
(tests/oidc_provider/keys.json). The end-to-end tests use the real provider instead."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from joserfc import jwt
from joserfc.jwk import RSAKey

KEYS_FILE = Path(__file__).resolve().parent.parent / "oidc_provider" / "keys.json"


def test_keys() -> list[RSAKey]:
    data = json.loads(KEYS_FILE.read_text())
    return [RSAKey.import_key(k) for k in data["keys"]]


class JwksServer:
    def __init__(self) -> None:
        self.keys = test_keys()
        self.published = [self.keys[0]]
        self.fetches = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/.well-known/openid-configuration":
                    body: dict[str, Any] = {
                        "issuer": server.issuer,
                        "jwks_uri": server.issuer + "/jwks",
                        "authorization_endpoint": server.issuer + "/auth",
                        "token_endpoint": server.issuer + "/token",
                    }
                elif self.path == "/jwks":
                    server.fetches += 1
                    body = {"keys": [k.as_dict(private=False) for k in server.published]}
                else:
                    self.send_error(404)
                    return
                payload = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.issuer = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def sign(
        self, claims: dict[str, Any], *, key: RSAKey | None = None, typ: str = "at+jwt", alg: str = "RS256"
    ) -> str:
        key = key or self.published[0]
        header = {"alg": alg, "kid": key.kid, "typ": typ}
        return jwt.encode(header, claims, key, algorithms=[alg])

    def access_claims(self, audience: str, client_id: str, **extra: Any) -> dict[str, Any]:
        now = int(time.time())
        return {
            "iss": self.issuer,
            "aud": audience,
            "sub": client_id,
            "client_id": client_id,
            "iat": now,
            "exp": now + 300,
            **extra,
        }

    def rotate(self) -> None:
        self.published = [self.keys[1]]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
