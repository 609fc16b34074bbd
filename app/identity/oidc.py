"""OpenID Connect relying party: discovery, JWKS, the authorization-code flow with PKCE
(authlib), and verification of id_tokens and access tokens (joserfc, explicit algorithms)."""

from __future__ import annotations

import asyncio
import hmac
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import httpx
from authlib.integrations.base_client.errors import OAuthError
from joserfc import jws, jwt
from joserfc.errors import JoseError
from joserfc.jwk import Key, KeySet

with warnings.catch_warnings():
    # authlib now prefers the httpx2 fork and warns when it falls back to httpx, which this
    # project uses throughout (the code below catches httpx's exceptions).
    warnings.simplefilter("ignore")
    from authlib.integrations.httpx_client import AsyncOAuth2Client

# Asymmetric algorithms only: an HS256 token "signed" with a public key is never accepted here.
ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"]
ACCESS_TOKEN_TYPES = {"at+jwt", "application/at+jwt"}
METADATA_TTL = 3600.0
JWKS_TTL = 3600.0
JWKS_MIN_REFETCH_INTERVAL = 10.0  # an unknown kid cannot make us hammer the provider


class OidcUpstreamError(Exception):
    """The identity provider could not be reached or answered nonsense (HTTP 503)."""


class OidcTokenError(Exception):
    """A token or code from the provider was not accepted; the reason stays in the logs."""


class OidcNonceMismatch(OidcTokenError):
    """A valid id_token that was not issued for this login attempt (replay or mix-up)."""


def email_claim(claims: dict[str, Any]) -> tuple[str | None, bool]:
    """The id_token's email and whether the provider verified it: only the JSON boolean true
    counts (a missing claim, "true" as a string or anything else is unverified). An unverified
    address is never stored, never matches a tenant rule and never names a user to grant a role."""
    email = claims.get("email")
    return (email if isinstance(email, str) else None), claims.get("email_verified") is True


@dataclass
class OidcClient:
    issuer: str
    client_id: str | None = None
    client_secret: str | None = None
    redirect_url: str | None = None
    audience: str | None = None
    timeout: float = 10.0
    _metadata: dict[str, Any] | None = field(default=None, init=False)
    _metadata_at: float = field(default=0.0, init=False)
    _jwks: KeySet | None = field(default=None, init=False)
    _jwks_at: float = field(default=0.0, init=False)
    _forced_at: float = field(default=-JWKS_MIN_REFETCH_INTERVAL, init=False)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, init=False)

    async def _get_json(self, url: str) -> dict[str, Any]:
        try:
            async with httpx.AsyncClient(timeout=self.timeout) as http:
                response = await http.get(url)
                response.raise_for_status()
                data = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise OidcUpstreamError(f"GET {url}: {exc.__class__.__name__}") from exc
        if not isinstance(data, dict):
            raise OidcUpstreamError(f"GET {url}: not a JSON object")
        return data

    async def metadata(self) -> dict[str, Any]:
        if self._metadata is None or time.monotonic() - self._metadata_at > METADATA_TTL:
            data = await self._get_json(self.issuer.rstrip("/") + "/.well-known/openid-configuration")
            if data.get("issuer") != self.issuer:
                raise OidcUpstreamError("discovery document names another issuer")
            self._metadata, self._metadata_at = data, time.monotonic()
        return self._metadata

    async def _key_set(self, *, refresh: bool = False) -> KeySet:
        async with self._lock:
            now = time.monotonic()
            stale = self._jwks is None or now - self._jwks_at > JWKS_TTL
            # An unknown kid forces a refetch (the provider rotated its keys), at most once
            # per interval, so tokens with made-up kids cannot make us hammer the provider.
            forced = refresh and now - self._forced_at > JWKS_MIN_REFETCH_INTERVAL
            if stale or forced:
                if forced:
                    self._forced_at = now
                data = await self._get_json((await self.metadata())["jwks_uri"])
                try:
                    self._jwks = KeySet.import_key_set(data)  # type: ignore[arg-type]
                except (JoseError, ValueError, KeyError, TypeError) as exc:
                    raise OidcUpstreamError("provider JWKS is unusable") from exc
                self._jwks_at = now
            assert self._jwks is not None
            return self._jwks

    async def _verifying_key(self, kid: str | None) -> Key:
        """The provider's key for kid; on an unknown kid refetch the JWKS once (rotation)."""
        for refresh in (False, True):
            try:
                return (await self._key_set(refresh=refresh)).get_by_kid(kid)
            except JoseError:
                continue
        raise OidcTokenError(f"unknown signing key {kid!r}")

    def _required_claims(self, audience: str | None, *present: str) -> dict[str, Any]:
        """Claims options: iss must be our issuer and aud this audience; the others present."""
        return {
            "iss": {"essential": True, "value": self.issuer},
            "aud": {"essential": True, "value": audience},
            **{name: {"essential": True} for name in present},
        }

    async def _verify(self, token: str, claims_options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        try:
            header = jws.extract_compact(token.encode()).headers()
        except (JoseError, ValueError) as exc:
            raise OidcTokenError("malformed token") from exc
        if header.get("alg") not in ALGORITHMS:
            raise OidcTokenError(f"algorithm {header.get('alg')!r} not allowed")
        key = await self._verifying_key(header.get("kid"))
        try:
            parsed = jwt.decode(token, key, algorithms=ALGORITHMS)
            jwt.JWTClaimsRegistry(leeway=30, **claims_options).validate(parsed.claims)
        except (JoseError, ValueError, TypeError) as exc:
            raise OidcTokenError(f"token rejected: {exc.__class__.__name__}: {exc}") from exc
        return dict(parsed.header), dict(parsed.claims)

    # -- people: authorization code flow ------------------------------------------------
    def _oauth_client(self) -> AsyncOAuth2Client:
        return AsyncOAuth2Client(
            client_id=self.client_id,
            client_secret=self.client_secret,
            redirect_uri=self.redirect_url,
            scope="openid email profile",
            code_challenge_method="S256",
            token_endpoint_auth_method="client_secret_basic",
            timeout=self.timeout,
        )

    async def authorization_url(self, state: str, nonce: str, code_verifier: str) -> str:
        endpoint = (await self.metadata())["authorization_endpoint"]
        async with self._oauth_client() as client:
            url, _ = client.create_authorization_url(endpoint, state=state, nonce=nonce, code_verifier=code_verifier)
        return str(url)

    async def exchange_code(self, code: str, code_verifier: str) -> str:
        """Redeem the code (with the PKCE verifier) and return the id_token."""
        endpoint = (await self.metadata())["token_endpoint"]
        try:
            async with self._oauth_client() as client:
                token = await client.fetch_token(endpoint, code=code, code_verifier=code_verifier)
        except httpx.HTTPError as exc:
            raise OidcUpstreamError(f"token endpoint: {exc.__class__.__name__}") from exc
        except OAuthError as exc:
            raise OidcTokenError(f"code rejected: {exc.error}") from exc
        id_token = token.get("id_token")
        if not isinstance(id_token, str):
            raise OidcTokenError("token response without id_token")
        return id_token

    async def verify_id_token(self, id_token: str, nonce: str) -> dict[str, Any]:
        _, claims = await self._verify(id_token, self._required_claims(self.client_id, "sub", "exp", "iat"))
        if not hmac.compare_digest(str(claims.get("nonce", "")).encode(), nonce.encode()):
            raise OidcNonceMismatch("id_token nonce does not match this login")
        aud = claims["aud"]
        if isinstance(aud, list) and len(aud) > 1 and claims.get("azp") != self.client_id:
            raise OidcTokenError("id_token for several audiences without azp = our client")
        return claims

    # -- machines: access tokens ------------------------------------------------------------
    async def verify_access_token(self, token: str) -> dict[str, Any]:
        if not self.audience:
            raise OidcTokenError("DLW_OIDC_AUDIENCE is not set: access tokens are not accepted")
        header, claims = await self._verify(token, self._required_claims(self.audience, "exp", "sub"))
        if str(header.get("typ", "")).lower() not in ACCESS_TOKEN_TYPES:
            raise OidcTokenError("not an access token (typ must be at+jwt)")
        return claims
