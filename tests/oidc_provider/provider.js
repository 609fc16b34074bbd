// Test-only OpenID Connect provider for the DLW test suite (see README.md).
// Built on oidc-provider (version pinned in package.json); state is in memory only.
import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { Provider, errors } from 'oidc-provider';
// Internal module of the pinned version: its default storage is module-wide, whereas the built-in
// default gives every Provider instance a private store. Sharing it lets sessions and codes survive
// the Provider swap done on key rotation.
import MemoryAdapter from 'oidc-provider/lib/adapters/memory_adapter.js';

// oidc-provider prints notices via console.info; keep stdout for the single READY line.
console.info = console.error;

const env = (name, fallback) => {
  const value = process.env[name] ?? fallback;
  if (value === undefined) throw new Error(`missing environment variable ${name}`);
  return value;
};

const PORT = Number(env('OIDC_PORT', '0'));
const AUDIENCE = env('OIDC_AUDIENCE', 'dlw-api');
// oidc-provider only accepts absolute URIs as resource indicators: "dlw-api" is requested as "urn:dlw-api".
const RESOURCE = /^[a-z][a-z0-9+.-]*:/i.test(AUDIENCE) ? AUDIENCE : `urn:${AUDIENCE}`;
const WEB_CLIENT = {
  client_id: env('OIDC_CLIENT_ID'),
  client_secret: env('OIDC_CLIENT_SECRET'),
  redirect_uris: env('OIDC_REDIRECT_URIS').split(',').map((s) => s.trim()).filter(Boolean),
  grant_types: ['authorization_code'],
  response_types: ['code'],
  scope: 'openid email profile',
  token_endpoint_auth_method: env('OIDC_CLIENT_AUTH_METHOD', 'client_secret_basic'),
  id_token_signed_response_alg: 'RS256',
};
if (!WEB_CLIENT.redirect_uris.length) throw new Error('OIDC_REDIRECT_URIS must not be empty');
const M2M_CLIENT = {
  client_id: env('OIDC_M2M_CLIENT_ID'),
  client_secret: env('OIDC_M2M_CLIENT_SECRET'),
  redirect_uris: [],
  grant_types: ['client_credentials'],
  response_types: [],
  token_endpoint_auth_method: 'client_secret_basic',
};

// TEST-ONLY static keys: keys.json holds two private RSA JWKs; exactly one is active at a time.
const { keys: KEYS } = JSON.parse(readFileSync(new URL('./keys.json', import.meta.url), 'utf8'));
let activeKey = 0;

// Users are created on the fly by the test login form: account id = login. The form may also
// set the email claim (default: the login) and email_verified (default true; "false" = false),
// as a provider does when a user changes their address and has not confirmed it yet.
const profileByAccount = new Map();

class SharedMemoryAdapter extends MemoryAdapter {} // no store argument -> module-wide storage

function buildProvider(issuer) {
  const provider = new Provider(issuer, {
    clients: [WEB_CLIENT, M2M_CLIENT],
    adapter: SharedMemoryAdapter,
    jwks: { keys: [KEYS[activeKey]] }, // publish + sign with the active key only
    cookies: {
      keys: ['dlw-test-only-cookie-key'], // fixed so sessions survive key rotation
      // prefixed names: cookies are shared across ports on 127.0.0.1, avoid clashing with the app
      names: { session: 'oidc_op_session', interaction: 'oidc_op_interaction', resume: 'oidc_op_resume' },
    },
    pkce: { required: () => true }, // S256 is the only method oidc-provider supports
    scopes: ['openid', 'email', 'profile'],
    claims: { openid: ['sub', 'groups'], email: ['email', 'email_verified'], profile: ['name'] },
    conformIdTokenClaims: false, // put scope claims (email, groups, ...) into the id_token itself
    findAccount: (ctx, sub) => ({
      accountId: sub,
      claims: () => {
        const profile = profileByAccount.get(sub) ?? { groups: [], email: sub, emailVerified: true };
        return {
          sub, email: profile.email, email_verified: profile.emailVerified, name: sub, groups: profile.groups,
        };
      },
    }),
    interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      resourceIndicators: {
        enabled: true,
        // The m2m client gets the DLW audience even without an explicit resource parameter.
        defaultResource: (ctx, client, oneOf) => (client?.clientId === M2M_CLIENT.client_id ? RESOURCE : oneOf),
        getResourceServerInfo: (ctx, resource) => {
          if (resource !== RESOURCE) throw new errors.InvalidTarget(`unknown resource indicator ${resource}`);
          return { audience: AUDIENCE, scope: '', accessTokenFormat: 'jwt', accessTokenTTL: 600 };
        },
        useGrantedResource: () => false,
      },
    },
  });
  provider.on('server_error', (ctx, err) => console.error('server_error', err));
  return provider;
}

const readForm = async (req) => {
  let body = '';
  for await (const chunk of req) body += chunk;
  return new URLSearchParams(body);
};

const html = (res, status, body) => {
  res.writeHead(status, { 'content-type': 'text/html; charset=utf-8', 'cache-control': 'no-store' });
  res.end(`<!DOCTYPE html><html><body>${body}</body></html>`);
};

let provider;
let handler;

async function interaction(req, res, uid, action) {
  const details = await provider.interactionDetails(req, res);
  if (details.uid !== uid) return html(res, 400, 'interaction mismatch');
  const { prompt, params, session } = details;

  if (prompt.name === 'consent') {
    // Auto-grant everything that is missing; no consent screen.
    const grant = details.grantId
      ? await provider.Grant.find(details.grantId)
      : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
    const { missingOIDCScope, missingOIDCClaims, missingResourceScopes } = prompt.details;
    if (missingOIDCScope) grant.addOIDCScope(missingOIDCScope.join(' '));
    if (missingOIDCClaims) grant.addOIDCClaims(missingOIDCClaims);
    for (const [indicator, scopes] of Object.entries(missingResourceScopes ?? {})) {
      grant.addResourceScope(indicator, scopes.join(' '));
    }
    return provider.interactionFinished(req, res, { consent: { grantId: await grant.save() } });
  }

  if (action === 'login' && req.method === 'POST') {
    const form = await readForm(req);
    const email = (form.get('login') || '').trim();
    if (!email) return html(res, 400, 'login is required');
    profileByAccount.set(email, {
      groups: (form.get('groups') || '').split(',').map((g) => g.trim()).filter(Boolean),
      email: (form.get('email') || '').trim() || email,
      emailVerified: form.get('email_verified') !== 'false',
    });
    return provider.interactionFinished(req, res, { login: { accountId: email } });
  }

  // Minimal test login form (prompt "login").
  return html(res, 200, `<form method="post" action="/interaction/${uid}/login">
    <input name="login" placeholder="email"> <input name="groups" placeholder="group-a,group-b">
    <button type="submit">Sign in</button></form>`);
}

const server = createServer(async (req, res) => {
  try {
    const { pathname } = new URL(req.url, 'http://localhost');
    if (pathname === '/__test__/health') {
      res.writeHead(200, { 'content-type': 'text/plain' });
      return res.end('ok');
    }
    if (pathname === '/__test__/rotate' && req.method === 'POST') {
      // Full rotation: a fresh Provider instance (same issuer, same in-memory storage)
      // that publishes and signs with the next key only.
      activeKey = (activeKey + 1) % KEYS.length;
      provider = buildProvider(provider.issuer);
      handler = provider.callback();
      res.writeHead(200, { 'content-type': 'application/json' });
      return res.end(JSON.stringify({ kid: KEYS[activeKey].kid }));
    }
    const match = pathname.match(/^\/interaction\/([^/]+)(?:\/(login))?$/);
    if (match) return await interaction(req, res, match[1], match[2]);
    return handler(req, res);
  } catch (err) {
    console.error(err);
    // oidc-provider errors (e.g. unknown/expired interaction) carry an HTTP status
    if (!res.headersSent) {
      res.writeHead(err.statusCode || 500, { 'content-type': 'text/plain' });
      res.end(`${err.name}: ${err.message}`);
    } else {
      res.end();
    }
  }
});

server.listen(PORT, '127.0.0.1', () => {
  const issuer = `http://127.0.0.1:${server.address().port}`;
  provider = buildProvider(issuer);
  handler = provider.callback();
  process.stdout.write(`READY ${issuer}\n`);
});
