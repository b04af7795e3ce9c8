// A real OpenID Provider (panva/oidc-provider, pinned in package.json) for tollgate's
// integration tests, started by testkit/src/op.rs. Usage: node server.mjs <config.json>
//
// It listens on 127.0.0.1 port 0 over HTTP (the issuer) and, when the config has TLS
// material, on a second HTTPS port that asks for client certificates (RFC 8705's
// mtls_endpoint_aliases). It prints one JSON line on stdout when ready and exits when
// stdin closes, so a test that dies never leaves it running.
//
// Beyond what oidc-provider ships, it adds the RFC 7523 jwt-bearer and RFC 8693
// token-exchange grants (subject tokens signed by configured trusted issuers), a log of
// every token request (GET /__test/log) and injected token-endpoint failures
// (POST /__test/fail?status=503&count=N).

import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as https from 'node:https';
import * as querystring from 'node:querystring';

import * as jose from 'jose';
import Provider, { errors } from 'oidc-provider';

const cfgPath = process.argv[2];
if (!cfgPath) {
  console.error('usage: node server.mjs <config.json>');
  process.exit(2);
}
const cfg = JSON.parse(fs.readFileSync(cfgPath, 'utf8'));

const GRANT_JWT_BEARER = 'urn:ietf:params:oauth:grant-type:jwt-bearer';
const GRANT_TOKEN_EXCHANGE = 'urn:ietf:params:oauth:grant-type:token-exchange';
const TT_ACCESS_TOKEN = 'urn:ietf:params:oauth:token-type:access_token';
const TT_JWT = 'urn:ietf:params:oauth:token-type:jwt';
const TT_ID_TOKEN = 'urn:ietf:params:oauth:token-type:id_token';
const SUBJECT_TOKEN_TYPES = new Set([TT_JWT, TT_ID_TOKEN, TT_ACCESS_TOKEN]);
const ISSUED_TOKEN_TYPES = new Set([TT_ACCESS_TOKEN, TT_JWT]);

const ttl = cfg.access_token_ttl ?? 300;
const resources = new Set(cfg.resources ?? []);
const resourceScope = cfg.resource_scope ?? '';
const accessTokenAlg = cfg.access_token_alg ?? 'ES256';

// ---- signing keys: one per key type, so any configured JWS algorithm has a key ----
async function privateJwk(alg, kid, opts) {
  const { privateKey } = await jose.generateKeyPair(alg, { extractable: true, ...opts });
  return { ...(await jose.exportJWK(privateKey)), kid, use: 'sig' };
}
const keys = [
  await privateJwk('ES256', 'op-es256'),
  await privateJwk('RS256', 'op-rsa', { modulusLength: 2048 }),
  await privateJwk('EdDSA', 'op-ed25519', { crv: 'Ed25519' }),
];
// the first key of the configured algorithm's type signs; put it first
if (accessTokenAlg.startsWith('RS') || accessTokenAlg.startsWith('PS')) keys.unshift(keys.splice(1, 1)[0]);
if (accessTokenAlg === 'EdDSA' || accessTokenAlg === 'Ed25519') keys.unshift(keys.splice(2, 1)[0]);

// ---- trusted issuers of assertions and subject tokens (RFC 7523 / RFC 8693) ----
const trusted = (cfg.trusted_issuers ?? []).map((t) => ({
  issuer: t.issuer,
  audience: t.audience,
  keys: jose.createLocalJWKSet(t.jwks),
}));

// ---- listeners first: the issuer and the mTLS alias need their ports ----
let handler = (_req, res) => { res.statusCode = 503; res.end(); };
const httpServer = http.createServer((req, res) => handler(req, res));
await new Promise((resolve) => { httpServer.listen(0, '127.0.0.1', resolve); });
const issuer = `http://127.0.0.1:${httpServer.address().port}`;

let httpsServer;
let mtlsUrl = null;
if (cfg.tls) {
  const opts = {
    cert: fs.readFileSync(cfg.tls.cert_file),
    key: fs.readFileSync(cfg.tls.key_file),
    requestCert: true,
    rejectUnauthorized: false,
  };
  if (cfg.tls.client_ca_file) opts.ca = fs.readFileSync(cfg.tls.client_ca_file);
  httpsServer = https.createServer(opts, (req, res) => handler(req, res));
  await new Promise((resolve) => { httpsServer.listen(0, '127.0.0.1', resolve); });
  mtlsUrl = `https://127.0.0.1:${httpsServer.address().port}`;
}

function peerCertificate(ctx) {
  const sock = ctx.req.socket;
  if (typeof sock.getPeerCertificate !== 'function') return undefined;
  const peer = sock.getPeerCertificate();
  if (!peer || !peer.raw) return undefined;
  return new crypto.X509Certificate(peer.raw);
}

// "CN=a, O=b" (RFC 4514, any order) against node's "CN=a\nO=b": compared as sets.
function dnParts(dn, sep) {
  return dn.split(sep).map((s) => s.trim()).filter(Boolean).sort().join('\n');
}

function certificateSubjectMatches(ctx, property, expected) {
  const cert = peerCertificate(ctx);
  if (!cert) return false;
  switch (property) {
    case 'tls_client_auth_subject_dn':
      return dnParts(cert.subject, '\n') === dnParts(expected, /,(?![^=,]*\\)/);
    case 'tls_client_auth_san_dns':
      return (cert.subjectAltName ?? '').split(', ').includes(`DNS:${expected}`);
    case 'tls_client_auth_san_ip':
      return (cert.subjectAltName ?? '').split(', ').includes(`IP Address:${expected}`);
    case 'tls_client_auth_san_email':
      return (cert.subjectAltName ?? '').split(', ').includes(`email:${expected}`);
    case 'tls_client_auth_san_uri':
      return (cert.subjectAltName ?? '').split(', ').includes(`URI:${expected}`);
    default:
      return false;
  }
}

// ---- capture the built-in client_credentials handler: the extra grants reuse it so
// their tokens are made exactly the same way (keys, aud, TTL, DPoP and mTLS binding) ----
let clientCredentialsHandler;
const originalRegister = Provider.prototype.registerGrantType;
Provider.prototype.registerGrantType = function register(name, fn, ...rest) {
  if (name === 'client_credentials') clientCredentialsHandler = fn;
  return originalRegister.call(this, name, fn, ...rest);
};

const authMethods = cfg.client_auth_methods ?? [
  'client_secret_basic', 'client_secret_post', 'client_secret_jwt', 'private_key_jwt', 'none',
  ...(cfg.tls ? ['tls_client_auth', 'self_signed_tls_client_auth'] : []),
];

const configuration = {
  clients: cfg.clients ?? [],
  jwks: { keys },
  clientAuthMethods: authMethods,
  cookies: { keys: [crypto.randomBytes(32).toString('hex')] },
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    introspection: { enabled: true },
    revocation: { enabled: true },
    dPoP: {
      enabled: true,
      nonceSecret: crypto.randomBytes(32),
      requireNonce: () => cfg.dpop_require_nonce === true,
    },
    resourceIndicators: {
      enabled: true,
      defaultResource: async (_ctx, _client, oneOf) => oneOf ?? cfg.default_resource ?? undefined,
      useGrantedResource: async () => true,
      getResourceServerInfo: async (_ctx, resource) => {
        if (!resources.has(resource)) throw new errors.InvalidTarget(`resource ${resource} is not accepted`);
        return {
          scope: resourceScope,
          audience: resource,
          accessTokenFormat: 'jwt',
          accessTokenTTL: ttl,
          jwt: { sign: { alg: accessTokenAlg } },
        };
      },
    },
    mTLS: {
      enabled: !!cfg.tls,
      certificateBoundAccessTokens: !!cfg.tls,
      tlsClientAuth: !!cfg.tls,
      selfSignedTlsClientAuth: !!cfg.tls,
      getCertificate: (ctx) => peerCertificate(ctx),
      certificateAuthorized: (ctx) => ctx.req.socket.authorized === true,
      certificateSubjectMatches,
    },
  },
  discovery: mtlsUrl ? { mtls_endpoint_aliases: { token_endpoint: `${mtlsUrl}/token` } } : {},
  ttl: {
    AccessToken: ttl,
    ClientCredentials: ttl,
  },
  formats: {
    customizers: {
      // the extra grants issue tokens for the subject of the presented token, not the client
      jwt: async (ctx, _token, jwt) => {
        const extra = ctx?.state?.tgGrant;
        if (extra) {
          jwt.payload.sub = extra.sub;
          if (extra.act) jwt.payload.act = extra.act;
        }
      },
    },
  },
};

const provider = new Provider(issuer, configuration);
Provider.prototype.registerGrantType = originalRegister;
provider.proxy = false;

// ---- RFC 7523 / RFC 8693 ----
async function verifySubjectJwt(token, what) {
  let claims;
  try {
    claims = jose.decodeJwt(token);
  } catch {
    throw new errors.InvalidGrant(`${what} is not a JWT`);
  }
  const t = trusted.find((x) => x.issuer === claims.iss);
  if (!t) throw new errors.InvalidGrant(`${what} issuer is not trusted`);
  const audience = t.audience ?? [issuer, `${issuer}/token`, ...(mtlsUrl ? [`${mtlsUrl}/token`] : [])];
  try {
    const { payload } = await jose.jwtVerify(token, t.keys, {
      issuer: t.issuer,
      audience,
      requiredClaims: ['exp', 'sub'],
    });
    return payload;
  } catch (e) {
    throw new errors.InvalidGrant(`${what} is invalid (${e.code ?? 'verification failed'})`);
  }
}

function single(ctx, name) {
  const v = ctx.oidc.params[name];
  if (Array.isArray(v)) throw new errors.InvalidRequest(`${name} must be a single value`);
  return v;
}

async function jwtBearer(ctx) {
  const assertion = single(ctx, 'assertion');
  if (!assertion) throw new errors.InvalidRequest('missing required parameter \'assertion\'');
  const claims = await verifySubjectJwt(assertion, 'assertion');
  ctx.state.tgGrant = { sub: claims.sub };
  await clientCredentialsHandler(ctx);
}

async function tokenExchange(ctx) {
  const subjectToken = single(ctx, 'subject_token');
  const subjectTokenType = single(ctx, 'subject_token_type');
  if (!subjectToken) throw new errors.InvalidRequest('missing required parameter \'subject_token\'');
  if (!subjectTokenType) throw new errors.InvalidRequest('missing required parameter \'subject_token_type\'');
  if (!SUBJECT_TOKEN_TYPES.has(subjectTokenType)) throw new errors.InvalidRequest('unsupported subject_token_type');
  const actorToken = single(ctx, 'actor_token');
  const actorTokenType = single(ctx, 'actor_token_type');
  if (actorToken && !actorTokenType) throw new errors.InvalidRequest('actor_token_type is required with actor_token');
  if (!actorToken && actorTokenType) throw new errors.InvalidRequest('actor_token_type without actor_token');
  if (actorTokenType && !SUBJECT_TOKEN_TYPES.has(actorTokenType)) throw new errors.InvalidRequest('unsupported actor_token_type');
  const requested = single(ctx, 'requested_token_type') ?? TT_ACCESS_TOKEN;
  if (!ISSUED_TOKEN_TYPES.has(requested)) throw new errors.InvalidRequest('unsupported requested_token_type');

  const subject = await verifySubjectJwt(subjectToken, 'subject_token');
  const act = actorToken ? { sub: (await verifySubjectJwt(actorToken, 'actor_token')).sub } : undefined;

  // `audience` (a logical name) stands for the resource when no resource is requested
  const { audience } = ctx.oidc.params;
  if (ctx.oidc.params.resource === undefined && audience !== undefined) {
    ctx.oidc.params.resource = audience;
  }

  ctx.state.tgGrant = { sub: subject.sub, act };
  await clientCredentialsHandler(ctx);
  ctx.body = { ...ctx.body, issued_token_type: requested };
}

provider.registerGrantType(GRANT_JWT_BEARER, jwtBearer, ['assertion', 'scope', 'resource'], ['resource']);
provider.registerGrantType(
  GRANT_TOKEN_EXCHANGE,
  tokenExchange,
  ['subject_token', 'subject_token_type', 'actor_token', 'actor_token_type',
    'requested_token_type', 'audience', 'resource', 'scope'],
  ['resource', 'audience'],
);

// ---- the token request log and injected failures ----
const log = [];
let failures = { status: 0, count: 0, error: undefined };

const sha256 = (s) => crypto.createHash('sha256').update(s).digest('base64url');
const list = (v) => (v === undefined ? [] : Array.isArray(v) ? v : [v]);

function describeJwt(token) {
  if (typeof token !== 'string' || !token) return null;
  try {
    const h = jose.decodeProtectedHeader(token);
    const c = jose.decodeJwt(token);
    return {
      header: { alg: h.alg ?? null, kid: h.kid ?? null, typ: h.typ ?? null },
      iss: c.iss ?? null,
      sub: c.sub ?? null,
      aud: c.aud ?? null,
      jti: c.jti ?? null,
      iat: c.iat ?? null,
      exp: c.exp ?? null,
      sha256: sha256(token),
    };
  } catch {
    return { header: null, sha256: sha256(token), malformed: true };
  }
}

async function describeDpop(proof) {
  if (!proof) return null;
  try {
    const h = jose.decodeProtectedHeader(proof);
    const c = jose.decodeJwt(proof);
    return {
      jti: c.jti ?? null,
      nonce: c.nonce ?? null,
      htu: c.htu ?? null,
      htm: c.htm ?? null,
      iat: c.iat ?? null,
      alg: h.alg ?? null,
      jkt: h.jwk ? await jose.calculateJwkThumbprint(h.jwk) : null,
    };
  } catch {
    return { malformed: true };
  }
}

function clientAuthUsed(ctx, body, client) {
  if (/^basic /i.test(ctx.get('authorization'))) return 'client_secret_basic';
  if (body.client_assertion) {
    try {
      return jose.decodeProtectedHeader(body.client_assertion).alg?.startsWith('HS')
        ? 'client_secret_jwt' : 'private_key_jwt';
    } catch {
      return 'private_key_jwt';
    }
  }
  if (body.client_secret !== undefined) return 'client_secret_post';
  if (peerCertificate(ctx)) {
    return client?.clientAuthMethod === 'self_signed_tls_client_auth'
      ? 'self_signed_tls_client_auth' : 'tls_client_auth';
  }
  return 'none';
}

function basicClientId(ctx) {
  const m = /^basic (.+)$/i.exec(ctx.get('authorization'));
  if (!m) return undefined;
  try {
    const dec = Buffer.from(m[1], 'base64').toString();
    return decodeURIComponent(dec.slice(0, dec.indexOf(':')).replace(/\+/g, '%20'));
  } catch {
    return undefined;
  }
}

async function record(ctx, body, injected) {
  let client;
  try { client = ctx.oidc?.client; } catch { client = undefined; }
  const cert = peerCertificate(ctx);
  let responseBody = ctx.body;
  if (typeof responseBody === 'string') {
    try { responseBody = JSON.parse(responseBody); } catch { responseBody = {}; }
  }
  const issued = responseBody?.access_token ? describeJwt(responseBody.access_token) : null;
  if (issued && !issued.malformed) {
    const c = jose.decodeJwt(responseBody.access_token);
    issued.cnf = c.cnf ?? null;
    issued.client_id = c.client_id ?? null;
    issued.scope = c.scope ?? null;
    issued.act = c.act ?? null;
  }
  log.push({
    seq: log.length + 1,
    at_ms: Date.now(),
    listener: ctx.req.socket.encrypted ? 'mtls' : 'http',
    grant_type: body.grant_type ?? null,
    client_id: client?.clientId ?? body.client_id ?? basicClientId(ctx) ?? null,
    client_auth: clientAuthUsed(ctx, body, client),
    registered_auth: client?.clientAuthMethod ?? null,
    client_assertion: describeJwt(body.client_assertion),
    client_cert: cert ? {
      subject: cert.subject,
      sha256: crypto.createHash('sha256').update(cert.raw).digest('base64url'),
      authorized: ctx.req.socket.authorized === true,
    } : null,
    assertion: describeJwt(body.assertion),
    subject_token: describeJwt(body.subject_token),
    subject_token_type: body.subject_token_type ?? null,
    actor_token: describeJwt(body.actor_token),
    actor_token_type: body.actor_token_type ?? null,
    requested_token_type: body.requested_token_type ?? null,
    resource: list(body.resource),
    audience: list(body.audience),
    scope: body.scope ?? null,
    dpop: await describeDpop(ctx.get('dpop')),
    status: ctx.status,
    error: responseBody?.error ?? null,
    error_description: responseBody?.error_description ?? null,
    token_type: responseBody?.token_type ?? null,
    issued_token_type: responseBody?.issued_token_type ?? null,
    issued,
    dpop_nonce: ctx.response.get('dpop-nonce') || null,
    injected,
  });
}

async function readForm(req) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > 64 * 1024) break;
    chunks.push(chunk);
  }
  return querystring.parse(Buffer.concat(chunks).toString());
}

provider.use(async (ctx, next) => {
  if (ctx.path === '/__test/log' && ctx.method === 'GET') {
    ctx.type = 'json';
    ctx.body = JSON.stringify(log);
    return;
  }
  if (ctx.path === '/__test/log' && ctx.method === 'DELETE') {
    log.length = 0;
    ctx.status = 204;
    return;
  }
  if (ctx.path === '/__test/fail' && ctx.method === 'POST') {
    const status = Number(ctx.query.status ?? 503);
    const count = Number(ctx.query.count ?? 1);
    if (!Number.isInteger(status) || status < 400 || status > 599 || !Number.isInteger(count) || count < 0) {
      ctx.status = 400;
      ctx.body = { error: 'status must be 400-599 and count >= 0' };
      return;
    }
    failures = { status, count, error: ctx.query.error };
    ctx.status = 204;
    return;
  }
  if (ctx.path !== '/token' || ctx.method !== 'POST') {
    await next();
    return;
  }
  if (failures.count > 0) {
    failures.count -= 1;
    const body = await readForm(ctx.req);
    ctx.status = failures.status;
    ctx.set('cache-control', 'no-store');
    ctx.body = {
      error: failures.error ?? (failures.status >= 500 ? 'temporarily_unavailable' : 'invalid_request'),
      error_description: 'failure injected by the test',
    };
    await record(ctx, body, true);
    return;
  }
  try {
    await next();
  } finally {
    let body = {};
    try { body = ctx.oidc?.body ?? {}; } catch { body = {}; }
    await record(ctx, body, false);
  }
});

provider.on('server_error', (_ctx, err) => { console.error('op server_error:', err); });

const callback = provider.callback();
handler = callback;

process.stdout.write(`${JSON.stringify({ issuer, mtls: mtlsUrl })}\n`);

// stdin closing is the parent going away, whichever way it went
process.stdin.on('end', () => process.exit(0));
process.stdin.on('close', () => process.exit(0));
process.stdin.resume();
