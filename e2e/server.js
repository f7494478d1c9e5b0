// A real OAuth 2.0 authorization server for keyd's end-to-end tests:
// oidc-provider (https://github.com/panva/node-oidc-provider) configured the
// way Okta's org authorization server behaves for service apps — DPoP
// required with server-provided nonces, private_key_jwt client
// authentication — plus a resource endpoint that accepts only DPoP-bound
// access tokens and demands its own nonce.
//
// Protocol with the test (stdin/stdout, one JSON object per line):
//
//  1. The server listens on 127.0.0.1 (a free port) and prints
//     {"url":"http://127.0.0.1:PORT"} — the issuer.
//  2. The test writes one line: {"clients":[CLIENT...]} with, per client,
//     {"client_id", "jwks" | "jwks_uri", "grant_types", "redirect_uris",
//      "assertion_audience": "issuer" | "token_endpoint",
//      "access_token_ttl": seconds (default 600),
//      "jwks_uri_max_age_exact": true (see below)}.
//     (The test needs the port before it can configure keyd's assertion
//     audience, and keyd's public keys before it can register the client.)
//  3. The server builds the provider and prints {"ready":true}.
//  4. It exits when stdin closes (so it never outlives the test) or on
//     SIGTERM/SIGINT.
//
// Every request the servers reject is logged on stderr as one JSON line:
// {"event", "error", "error_description", "error_detail"}. Every fetch of a
// client's jwks_uri is logged too: {"event":"jwks_uri.fetch", "url",
// "status", "cache_control", "kids", "at" (ms since the epoch)}.
//
// jwks_uri: oidc-provider fetches a client's JWK Set when it first needs it
// and caches it for max(60 s, the response's max-age / Expires); on a kid it
// does not know it fetches again only once that cache is stale. Two test
// accommodations, both for clients registered by jwks_uri only:
//   - its SSRF guard refuses special-use addresses (127.0.0.1 included), so
//     the configured `fetch` drops that guard: keyd's JWKS is on loopback;
//   - "jwks_uri_max_age_exact" replaces the 60 s floor with the response's
//     own max-age (a test-only override of that client's key store
//     freshness), so that rotations seconds apart can be run.
//
// Endpoints (Okta's org authorization server layout):
//   /.well-known/oauth-authorization-server, /.well-known/openid-configuration
//                                       metadata (oidc-provider serves both)
//   /oauth2/v1/token, /oauth2/v1/revoke, /oauth2/v1/authorize,
//   /oauth2/v1/userinfo, /oauth2/v1/keys, /oauth2/v1/introspect
//   /interaction/:uid                   logs "alice" in and consents, no UI
//   /api/v1/users[/...]                 the DPoP resource (a management API)

import crypto from 'node:crypto';
import http from 'node:http';
import readline from 'node:readline';

import Provider, { errors } from 'oidc-provider';
import { calculateJwkThumbprint, EmbeddedJWK, jwtVerify } from 'jose';

const DPOP_ALGS = ['ES256', 'ES384', 'RS256', 'PS256', 'EdDSA', 'Ed25519'];
const IAT_WINDOW = 60; // seconds a resource proof's iat may be from now
const RESOURCE_PATH = '/api/v1/users';

function log(obj) {
  process.stderr.write(`${JSON.stringify(obj)}\n`);
}

function out(obj) {
  process.stdout.write(`${JSON.stringify(obj)}\n`);
}

let handler = (req, res) => {
  res.statusCode = 503;
  res.end('not configured yet\n');
};
const server = http.createServer((req, res) => handler(req, res));
server.listen(0, '127.0.0.1', () => {
  const { port } = server.address();
  out({ url: `http://127.0.0.1:${port}` });
});

function stop() {
  server.close();
  process.exit(0);
}
process.on('SIGTERM', stop);
process.on('SIGINT', stop);

const lines = readline.createInterface({ input: process.stdin });
let configured = false;
lines.on('line', async (line) => {
  if (configured || !line.trim()) return;
  configured = true;
  try {
    const setup = JSON.parse(line);
    const { port } = server.address();
    handler = await build(`http://127.0.0.1:${port}`, setup);
    out({ ready: true });
  } catch (err) {
    log({ event: 'setup.error', error: String(err?.stack ?? err) });
    process.exit(1);
  }
});
lines.on('close', stop);

async function build(issuer, setup) {
  const audience = new Map(); // client_id -> "issuer" | "token_endpoint"
  const accessTokenTTL = new Map(); // client_id -> seconds
  const clients = setup.clients.map((c) => {
    audience.set(c.client_id, c.assertion_audience ?? 'issuer');
    if (c.access_token_ttl) accessTokenTTL.set(c.client_id, c.access_token_ttl);
    const grants = c.grant_types ?? ['client_credentials'];
    return {
      client_id: c.client_id,
      token_endpoint_auth_method: 'private_key_jwt',
      ...(c.jwks_uri ? { jwks_uri: c.jwks_uri } : { jwks: c.jwks }),
      grant_types: grants,
      response_types: grants.includes('authorization_code') ? ['code'] : [],
      redirect_uris: c.redirect_uris ?? [],
      // DPoP is required: a token request without a proof is refused.
      dpop_bound_access_tokens: true,
    };
  });

  // When each jwks_uri response stops being fresh by its own max-age, for
  // the clients registered with jwks_uri_max_age_exact.
  const jwksFreshUntil = new Map(); // href -> ms since the epoch
  const ttl = (dflt) => (ctx, token, client) => accessTokenTTL.get(client?.clientId) ?? dflt;

  const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  const signingKey = { ...privateKey.export({ format: 'jwk' }), kid: 'as-signing', use: 'sig', alg: 'RS256' };

  const provider = new Provider(issuer, {
    clients,
    clientAuthMethods: ['private_key_jwt'],
    jwks: { keys: [signingKey] },
    cookies: { keys: [crypto.randomBytes(32).toString('base64url')] },
    scopes: ['openid', 'offline_access', 'api:read', 'okta.users.read'],
    routes: {
      authorization: '/oauth2/v1/authorize',
      token: '/oauth2/v1/token',
      revocation: '/oauth2/v1/revoke',
      introspection: '/oauth2/v1/introspect',
      userinfo: '/oauth2/v1/userinfo',
      jwks: '/oauth2/v1/keys',
      end_session: '/oauth2/v1/logout',
      pushed_authorization_request: '/oauth2/v1/par',
    },
    enabledJWA: { dPoPSigningAlgValues: DPOP_ALGS },
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      revocation: { enabled: true },
      introspection: { enabled: true },
      dPoP: {
        enabled: true,
        nonceSecret: crypto.randomBytes(32),
        // Every DPoP proof must carry a nonce this server issued.
        requireNonce: () => true,
        allowReplay: false,
      },
      resourceIndicators: {
        enabled: true,
        defaultResource: (ctx, client, oneOf) => oneOf,
        useGrantedResource: () => true,
        getResourceServerInfo: (ctx, resourceIndicator) => {
          if (resourceIndicator !== `${issuer}${RESOURCE_PATH}`) {
            throw new errors.InvalidTarget(`unknown resource ${resourceIndicator}`);
          }
          return { scope: 'api:read okta.users.read', audience: resourceIndicator, accessTokenFormat: 'opaque' };
        },
      },
    },
    pkce: { required: () => true },
    // Every client that may refresh gets a refresh token.
    issueRefreshToken: async (ctx, client) => client.grantTypeAllowed('refresh_token'),
    // Each client accepts exactly one assertion audience, as real servers
    // do: the issuer (RFC 7523bis) or, Okta-style, the token endpoint.
    assertJwtClientAuthClaimsAndHeader: async (ctx, claims, header, client) => {
      const want = audience.get(client.clientId) === 'token_endpoint' ? ctx.oidc.urlFor('token') : issuer;
      if (claims.aud !== want) {
        throw new errors.InvalidClientAuth(`audience (aud) must be ${want} for client ${client.clientId}`);
      }
    },
    interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
    findAccount: async (ctx, sub) => ({ accountId: sub, claims: async () => ({ sub }) }),
    ttl: {
      ClientCredentials: ttl(600),
      AccessToken: ttl(600),
      RefreshToken: 3600,
      AuthorizationCode: 60,
      Interaction: 300,
      Session: 3600,
      Grant: 3600,
    },
    // Outgoing requests (a client's jwks_uri): without the SSRF guard, which
    // refuses loopback, and logged.
    fetch: async (url, options) => {
      delete options.dispatcher;
      const res = await globalThis.fetch(url, options);
      const href = String(url);
      const cacheControl = res.headers.get('cache-control');
      const maxAge = /max-age=(\d+)/.exec(cacheControl ?? '');
      jwksFreshUntil.set(href, Date.now() + (maxAge ? Number(maxAge[1]) * 1000 : 0));
      let kids = null;
      try {
        kids = (await res.clone().json()).keys.map((k) => k.kid);
      } catch {}
      log({ event: 'jwks_uri.fetch', url: href, status: res.status, cache_control: cacheControl, kids, at: Date.now() });
      return res;
    },
    renderError: async (ctx, outp) => {
      ctx.type = 'json';
      ctx.body = outp;
    },
  });

  // jwks_uri_max_age_exact: the client's key store is fresh for exactly the
  // max-age of its last jwks_uri response, instead of at least 60 s.
  for (const c of setup.clients.filter((x) => x.jwks_uri && x.jwks_uri_max_age_exact)) {
    const keystore = (await provider.Client.find(c.client_id)).asymmetricKeyStore;
    const href = new URL(c.jwks_uri).href;
    keystore.fresh = () => (jwksFreshUntil.get(href) ?? 0) > Date.now();
  }

  for (const event of ['grant.error', 'revocation.error', 'userinfo.error', 'introspection.error',
    'authorization.error', 'server_error', 'discovery.error', 'jwks.error']) {
    provider.on(event, (ctx, err) => {
      const clientId = ctx?.oidc?.client?.clientId ?? ctx?.oidc?.params?.client_id;
      log({ event, client_id: clientId, error: err.error ?? err.message, error_description: err.error_description, error_detail: err.error_detail });
    });
  }

  const callback = provider.callback();
  const resource = resourceServer(issuer, provider);

  return async (req, res) => {
    const { pathname } = new URL(req.url, issuer);
    try {
      if (pathname.startsWith('/interaction/')) {
        await interaction(provider, req, res);
      } else if (pathname === RESOURCE_PATH || pathname.startsWith(`${RESOURCE_PATH}/`)) {
        await resource(req, res);
      } else {
        callback(req, res);
      }
    } catch (err) {
      log({ event: 'handler.error', error: String(err?.stack ?? err) });
      if (!res.headersSent) {
        res.statusCode = 500;
        res.end();
      }
    }
  };
}

// interaction logs the user "alice" in, then grants what the client asked
// for: a headless stand-in for a login and consent page.
async function interaction(provider, req, res) {
  const details = await provider.interactionDetails(req, res);
  const { prompt, params } = details;
  if (prompt.name === 'login') {
    await provider.interactionFinished(req, res, { login: { accountId: 'alice' } }, { mergeWithLastSubmission: false });
    return;
  }
  const grant = details.grantId
    ? await provider.Grant.find(details.grantId)
    : new provider.Grant({ accountId: details.session.accountId, clientId: params.client_id });
  const missing = prompt.details;
  if (missing.missingOIDCScope) grant.addOIDCScope(missing.missingOIDCScope.join(' '));
  if (missing.missingOIDCClaims) grant.addOIDCClaims(missing.missingOIDCClaims);
  for (const [indicator, scopes] of Object.entries(missing.missingResourceScopes ?? {})) {
    grant.addResourceScope(indicator, scopes.join(' '));
  }
  const grantId = await grant.save();
  await provider.interactionFinished(req, res, { consent: { grantId } }, { mergeWithLastSubmission: true });
}

// resourceServer returns the handler of the DPoP-protected API. It checks,
// in RFC 9449 §7 and §9 order: the Authorization scheme, the proof's
// signature with its embedded key (jose), typ, alg, htm, htu, iat, ath and
// jti replay, then its own nonce, then that the access token is active and
// bound (cnf.jkt) to the proof's key.
function resourceServer(issuer, provider) {
  const secret = crypto.randomBytes(32);
  const nonceFor = (window) => crypto.createHmac('sha256', secret).update(String(window)).digest('base64url');
  const currentWindow = () => Math.floor(Date.now() / 60000);
  const seen = new Map(); // jti -> expiry (ms)

  return async (req, res) => {
    const fail = (status, error, description, nonce) => {
      log({ event: 'resource.error', error, error_description: description });
      const params = [`error="${error}"`, `error_description="${description}"`, `algs="${DPOP_ALGS.join(' ')}"`];
      res.setHeader('WWW-Authenticate', `DPoP ${params.join(', ')}`);
      if (nonce) res.setHeader('DPoP-Nonce', nonce);
      res.setHeader('Content-Type', 'application/json');
      res.statusCode = status;
      res.end(JSON.stringify({ error, error_description: description }));
    };
    const body = await readBody(req);

    const authz = req.headers.authorization ?? '';
    const m = /^DPoP ([A-Za-z0-9\-._~+/]+=*)$/.exec(authz);
    if (!m) {
      return fail(401, 'invalid_token', 'a DPoP-bound access token is required (Authorization: DPoP ...)');
    }
    const accessToken = m[1];
    const proofs = req.headersDistinct.dpop ?? [];
    if (proofs.length !== 1) {
      return fail(401, 'invalid_dpop_proof', 'exactly one DPoP header is required');
    }

    let payload;
    let protectedHeader;
    try {
      ({ payload, protectedHeader } = await jwtVerify(proofs[0], EmbeddedJWK, { typ: 'dpop+jwt', algorithms: DPOP_ALGS }));
    } catch (err) {
      return fail(401, 'invalid_dpop_proof', `DPoP proof does not verify: ${err.message}`);
    }
    const now = Math.floor(Date.now() / 1000);
    const expected = new URL(req.url, issuer);
    expected.search = '';
    expected.hash = '';
    let htu;
    try {
      htu = new URL(payload.htu);
      htu.search = '';
      htu.hash = '';
    } catch {
      return fail(401, 'invalid_dpop_proof', 'DPoP proof htu is not a URL');
    }
    if (payload.htm !== req.method) {
      return fail(401, 'invalid_dpop_proof', `DPoP proof htm mismatch: ${payload.htm} for a ${req.method} request`);
    }
    if (htu.href !== expected.href) {
      return fail(401, 'invalid_dpop_proof', `DPoP proof htu mismatch: ${htu.href}, want ${expected.href}`);
    }
    if (typeof payload.iat !== 'number' || Math.abs(now - payload.iat) > IAT_WINDOW) {
      return fail(401, 'invalid_dpop_proof', 'DPoP proof iat is not recent enough');
    }
    if (payload.ath !== crypto.hash('sha256', accessToken, 'base64url')) {
      return fail(401, 'invalid_dpop_proof', 'DPoP proof ath mismatch');
    }
    if (typeof payload.jti !== 'string' || !payload.jti) {
      return fail(401, 'invalid_dpop_proof', 'DPoP proof has no jti');
    }
    for (const [jti, exp] of seen) if (exp < Date.now()) seen.delete(jti);
    if (seen.has(payload.jti)) {
      return fail(401, 'invalid_dpop_proof', 'DPoP proof jti replayed');
    }

    const w = currentWindow();
    const current = nonceFor(w);
    if (payload.nonce !== current && payload.nonce !== nonceFor(w - 1)) {
      return fail(401, 'use_dpop_nonce', 'Resource server requires nonce in DPoP proof', current);
    }
    seen.set(payload.jti, Date.now() + 2 * IAT_WINDOW * 1000);

    const token = await provider.AccessToken.find(accessToken) ?? await provider.ClientCredentials.find(accessToken);
    if (!token) {
      return fail(401, 'invalid_token', 'the access token is not active (unknown, expired or revoked)', current);
    }
    // find() still returns a token for clockTolerance (15 s) past its exp;
    // this resource takes none.
    if (token.isExpired) {
      return fail(401, 'invalid_token', `the access token is not active (it expired at ${token.exp})`, current);
    }
    if (!token.jkt) {
      return fail(401, 'invalid_token', 'the access token is not DPoP-bound', current);
    }
    const jkt = await calculateJwkThumbprint(protectedHeader.jwk, 'sha256');
    if (token.jkt !== jkt) {
      return fail(401, 'invalid_token', `DPoP proof key ${jkt} does not match the access token's cnf.jkt ${token.jkt}`, current);
    }
    if (token.aud && token.aud !== `${issuer}${RESOURCE_PATH}`) {
      return fail(401, 'invalid_token', `the access token is for ${token.aud}`, current);
    }

    res.setHeader('DPoP-Nonce', current);
    res.setHeader('Content-Type', 'application/json');
    if (expected.pathname !== RESOURCE_PATH) {
      res.statusCode = 404;
      res.end(JSON.stringify({ error: 'not_found', path: expected.pathname }));
      return;
    }
    res.statusCode = 200;
    res.end(JSON.stringify({
      method: req.method,
      client_id: token.clientId,
      sub: token.accountId ?? null,
      scope: token.scope ?? '',
      token_kind: token.kind,
      cnf: { jkt: token.jkt },
      proof_jti: payload.jti,
      x_keyd_test: req.headers['x-keyd-test'] ?? null,
      content_type: req.headers['content-type'] ?? null,
      body,
    }));
  };
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    req.on('data', (c) => {
      size += c.length;
      if (size > 64 * 1024) {
        reject(new Error('body too large'));
        req.destroy();
        return;
      }
      chunks.push(c);
    });
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}
