//! Access tokens: the claims auth signs, and their verification in every service.
//!
//! Access tokens are short-lived JWTs that auth signs with an Ed25519 key (EdDSA), naming the key
//! in the `kid` header. Other services verify them locally against auth's published keys (its
//! JWKS), fetched over HTTP and cached, so no request waits on auth. Only EdDSA is accepted:
//! `alg: none`, HMAC tokens (including ones keyed with a public key) and unknown keys are
//! rejected, and issuer, audience and expiry are checked. A handler that takes [`Authenticated`]
//! runs only for a valid token and learns whose it is.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::{web, FromRequest, HttpRequest};
use arc_swap::ArcSwap;
use futures_util::future::LocalBoxFuture;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::config::{ConfigError, Env};
use crate::error::ApiError;
use crate::metrics as names;
use crate::revoked_users::RevokedUsers;

/// Tolerated clock difference between auth and the verifying service.
pub const CLOCK_LEEWAY_SECS: u64 = 30;
/// Tokens naming an unknown key trigger at most one JWKS fetch this often, so forged tokens
/// cannot make a service hammer auth; failed background refreshes are retried this often too.
const MIN_REFETCH_INTERVAL: Duration = Duration::from_secs(10);
/// While no keys were ever fetched, the background fetch tries again this often.
const RETRY_WITHOUT_KEYS: Duration = Duration::from_secs(1);
/// Verified tokens remembered (about 0.6 KiB each): a client sends the same token for its
/// whole life, and checking its Ed25519 signature again cost ~50 µs, a fifth of a GET's CPU.
const VERIFIED_TOKENS_KEPT: usize = 10_000;

/// What an access token says. `sub` is the user id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessClaims {
    pub sub: Uuid,
    pub iss: String,
    pub aud: String,
    /// Issued at, seconds since the Unix epoch.
    pub iat: i64,
    /// Expires at, seconds since the Unix epoch.
    pub exp: i64,
    /// Unique token id, for tracing a token through logs.
    pub jti: Uuid,
    /// The session (auth's refresh-token family) the token was issued in: the same across its
    /// refreshes, so a service can end what a session holds open (live sockets) when auth
    /// publishes `session.revoked`. Absent in tokens issued before auth named sessions, which
    /// still verify.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sid: Option<Uuid>,
}

/// Who issues tokens and for whom: shared by auth (signing) and every verifier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRules {
    /// `AUTH_JWT_ISSUER`, default `taskstream-auth`.
    pub issuer: String,
    /// `AUTH_JWT_AUDIENCE`, default `taskstream`.
    pub audience: String,
}

impl TokenRules {
    pub fn from_env(env: &Env) -> Self {
        Self {
            issuer: env
                .raw("AUTH_JWT_ISSUER")
                .unwrap_or_else(|| "taskstream-auth".to_owned()),
            audience: env
                .raw("AUTH_JWT_AUDIENCE")
                .unwrap_or_else(|| "taskstream".to_owned()),
        }
    }
}

/// Where a service that is not auth finds the keys.
#[derive(Debug, Clone)]
pub struct RemoteKeysSettings {
    /// `AUTH_JWKS_URL` (required), e.g. `http://auth:8081/v1/auth/jwks`.
    pub jwks_url: String,
    /// `AUTH_JWKS_REFRESH_SECS`, default 300: how long fetched keys are used before re-fetching
    /// (a token signed by a key not yet seen triggers a fetch at once).
    pub refresh_after: Duration,
    /// `AUTH_JWKS_TIMEOUT_MS`, default 2000: bound on one fetch.
    pub timeout: Duration,
}

impl RemoteKeysSettings {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let jwks_url = env.required("AUTH_JWKS_URL")?;
        if !(jwks_url.starts_with("http://") || jwks_url.starts_with("https://")) {
            return Err(ConfigError::Invalid {
                name: "AUTH_JWKS_URL",
                value: jwks_url,
                reason: "must be an http:// or https:// URL".to_owned(),
            });
        }
        Ok(Self {
            jwks_url,
            refresh_after: Duration::from_secs(env.ranged(
                "AUTH_JWKS_REFRESH_SECS",
                300,
                1,
                86_400,
            )?),
            timeout: env.millis("AUTH_JWKS_TIMEOUT_MS", 2_000, 10, 60_000)?,
        })
    }
}

/// Why a token was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("an access token is required: send `Authorization: Bearer <token>`")]
    Missing,
    #[error("the access token is malformed")]
    Malformed,
    #[error("the access token has expired")]
    Expired,
    #[error("the access token was signed by an unknown key")]
    UnknownKey,
    #[error("the access token is invalid: {0}")]
    Invalid(String),
    /// No keys to check against (auth unreachable since start-up): not the client's fault.
    #[error("signing keys unavailable: {0}")]
    KeysUnavailable(String),
    /// Valid, but its account was deleted.
    #[error("the access token belongs to a deleted account")]
    Revoked,
}

impl TokenError {
    fn metric_reason(&self) -> &'static str {
        match self {
            TokenError::Missing => "missing",
            TokenError::Malformed => "malformed",
            TokenError::Expired => "expired",
            TokenError::UnknownKey => "unknown_key",
            TokenError::Invalid(_) => "invalid",
            TokenError::KeysUnavailable(_) => "keys_unavailable",
            TokenError::Revoked => "revoked",
        }
    }
}

impl From<TokenError> for ApiError {
    fn from(err: TokenError) -> Self {
        match err {
            TokenError::KeysUnavailable(_) => {
                tracing::warn!(error = %err, "cannot verify access tokens");
                Self::unavailable("access tokens cannot be verified right now; try again")
            }
            TokenError::Missing => Self::unauthorized("unauthorized", err.to_string()),
            _ => Self::unauthorized("invalid_token", err.to_string()).with_header(
                actix_web::http::header::WWW_AUTHENTICATE,
                format!("Bearer error=\"invalid_token\", error_description=\"{err}\""),
            ),
        }
    }
}

/// The verification keys by key id.
type KeyRing = HashMap<String, DecodingKey>;

/// A token whose signature and claims were checked, by its exact text.
struct Verified {
    claims: AccessClaims,
    /// The key that signed it: once auth stops publishing that key, the token is checked again
    /// (and refused).
    kid: String,
}

struct RemoteKeys {
    settings: RemoteKeysSettings,
    client: reqwest::Client,
    /// Held while fetching for a token of an unknown key, so concurrent requests share one fetch.
    unknown_key_fetch: tokio::sync::Mutex<Option<Instant>>,
}

/// Verifies access tokens. Register it as `web::Data<TokenVerifier>` for [`Authenticated`].
///
/// A remote verifier ([`TokenVerifier::remote`]) fetches the keys in the background: at once,
/// again every second until that worked, then every `AUTH_JWKS_REFRESH_SECS` (and every
/// 10 s while a refresh fails, keeping the keys it has). No request waits for that. Until the
/// first keys arrive, requests get 503 and [`TokenVerifier::has_keys`] is false (the service is
/// not ready); a token naming a key not seen yet (a rotation) fetches at once, at most every
/// 10 s, and that request waits for it.
pub struct TokenVerifier {
    validation: Validation,
    ring: Arc<ArcSwap<KeyRing>>,
    /// Tokens verified already: the same text was checked once, so only expiry, the key still
    /// being published and revocation are checked again.
    verified: quick_cache::sync::Cache<String, Arc<Verified>>,
    remote: Option<Arc<RemoteKeys>>,
    revoked: Option<Arc<RevokedUsers>>,
}

impl TokenVerifier {
    /// A verifier with fixed keys (auth verifying its own tokens).
    pub fn with_keys(jwks: &JwkSet, rules: &TokenRules) -> Self {
        Self {
            validation: validation(rules),
            ring: Arc::new(ArcSwap::from_pointee(decoding_keys(jwks))),
            verified: quick_cache::sync::Cache::new(VERIFIED_TOKENS_KEPT),
            remote: None,
            revoked: None,
        }
    }

    /// Refuses the tokens of the users in `revoked` too (deleted accounts).
    pub fn refusing(mut self, revoked: Arc<RevokedUsers>) -> Self {
        self.revoked = Some(revoked);
        self
    }

    /// A verifier that fetches auth's JWKS in the background and keeps it fresh; call it inside
    /// the runtime (it spawns the fetching task, a background task of the process).
    pub fn remote(settings: RemoteKeysSettings, rules: &TokenRules) -> Result<Self, String> {
        let client = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout)
            .build()
            .map_err(|err| format!("cannot build the JWKS client: {err}"))?;
        let verifier = Self {
            validation: validation(rules),
            ring: Arc::new(ArcSwap::from_pointee(KeyRing::new())),
            verified: quick_cache::sync::Cache::new(VERIFIED_TOKENS_KEPT),
            remote: Some(Arc::new(RemoteKeys {
                settings,
                client,
                unknown_key_fetch: tokio::sync::Mutex::new(None),
            })),
            revoked: None,
        };
        if let Some(remote) = &verifier.remote {
            crate::workers::background().spawn(keep_fresh(verifier.ring.clone(), remote.clone()));
        }
        Ok(verifier)
    }

    /// Whether there are keys to verify with (a service is not ready before).
    pub fn has_keys(&self) -> bool {
        !self.ring.load().is_empty()
    }

    /// [`crate::Service::ready`] of a service that authenticates requests: ready once it has
    /// keys, since without them it could authenticate none.
    pub fn readiness(&self) -> Result<(), String> {
        if self.has_keys() {
            Ok(())
        } else {
            Err("the keys to verify access tokens have not been fetched from auth yet".to_owned())
        }
    }

    /// Checks `token` and returns its claims.
    pub async fn verify(&self, token: &str) -> Result<AccessClaims, TokenError> {
        let outcome = self.check(token).await;
        if let Err(err) = &outcome {
            metrics::counter!(names::ACCESS_TOKENS_REJECTED, "reason" => err.metric_reason())
                .increment(1);
        }
        outcome
    }

    async fn check(&self, token: &str) -> Result<AccessClaims, TokenError> {
        let claims = match self.verified_before(token) {
            Some(claims) => claims,
            None => self.verify_signature(token).await?,
        };
        if self
            .revoked
            .as_ref()
            .is_some_and(|revoked| revoked.is_revoked(claims.sub))
        {
            return Err(TokenError::Revoked);
        }
        Ok(claims)
    }

    /// The claims of `token` if it was verified before, is not expired (with the same leeway
    /// as a full check) and its key is still published.
    fn verified_before(&self, token: &str) -> Option<AccessClaims> {
        let verified = self.verified.get(token)?;
        let now = jsonwebtoken::get_current_timestamp();
        let fresh = verified.claims.exp.saturating_add(CLOCK_LEEWAY_SECS as i64) >= now as i64;
        (fresh && self.ring.load().contains_key(&verified.kid)).then(|| verified.claims.clone())
    }

    /// The full check: header, key, signature, issuer, audience, expiry. A token that passes
    /// is remembered.
    async fn verify_signature(&self, token: &str) -> Result<AccessClaims, TokenError> {
        // Unknown algorithms (`none` included) fail to parse here.
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        if header.alg != Algorithm::EdDSA {
            return Err(TokenError::Invalid(format!(
                "algorithm {:?} is not accepted",
                header.alg
            )));
        }
        let kid = header
            .kid
            .ok_or_else(|| TokenError::Invalid("no key id (kid) in the header".to_owned()))?;
        if !self.has_keys() {
            return Err(TokenError::KeysUnavailable(
                "auth's keys have not been fetched yet".to_owned(),
            ));
        }
        let key = match self.key(&kid) {
            Some(key) => key,
            None => {
                self.refetch_for_unknown_key().await;
                self.key(&kid).ok_or(TokenError::UnknownKey)?
            }
        };
        let claims = jsonwebtoken::decode::<AccessClaims>(token, &key, &self.validation)
            .map(|data| data.claims)
            .map_err(|err| match err.kind() {
                ErrorKind::ExpiredSignature => TokenError::Expired,
                ErrorKind::InvalidSignature => TokenError::Invalid("bad signature".to_owned()),
                ErrorKind::InvalidIssuer => TokenError::Invalid("wrong issuer".to_owned()),
                ErrorKind::InvalidAudience => TokenError::Invalid("wrong audience".to_owned()),
                ErrorKind::MissingRequiredClaim(claim) => {
                    TokenError::Invalid(format!("claim {claim} is missing"))
                }
                _ => TokenError::Malformed,
            })?;
        self.verified.insert(
            token.to_owned(),
            Arc::new(Verified {
                claims: claims.clone(),
                kid,
            }),
        );
        Ok(claims)
    }

    fn key(&self, kid: &str) -> Option<DecodingKey> {
        self.ring.load().get(kid).cloned()
    }

    /// A key id we do not know may be a freshly rotated key: fetch again, at most every
    /// [`MIN_REFETCH_INTERVAL`] for this reason.
    async fn refetch_for_unknown_key(&self) {
        let Some(remote) = &self.remote else {
            return;
        };
        let mut last = remote.unknown_key_fetch.lock().await;
        if !within(*last, MIN_REFETCH_INTERVAL) {
            *last = Some(Instant::now());
            if let Err(err) = fetch(&self.ring, remote).await {
                tracing::warn!(error = %err, "JWKS fetch for an unknown key id failed");
            }
        }
    }
}

fn within(at: Option<Instant>, interval: Duration) -> bool {
    at.is_some_and(|at| at.elapsed() < interval)
}

/// The background fetches of a remote verifier's keys, for the life of the process.
async fn keep_fresh(ring: Arc<ArcSwap<KeyRing>>, remote: Arc<RemoteKeys>) {
    let mut failing = false;
    loop {
        let wait = match fetch(&ring, &remote).await {
            Ok(()) => {
                if failing {
                    tracing::info!("JWKS fetched again");
                }
                failing = false;
                remote.settings.refresh_after
            }
            Err(err) => {
                if !failing {
                    tracing::warn!(error = %err, "JWKS fetch failed; keeping the keys we have and retrying");
                }
                failing = true;
                if ring.load().is_empty() {
                    RETRY_WITHOUT_KEYS
                } else {
                    MIN_REFETCH_INTERVAL
                }
            }
        };
        tokio::time::sleep(wait).await;
    }
}

async fn fetch(ring: &ArcSwap<KeyRing>, remote: &RemoteKeys) -> Result<(), String> {
    let url = &remote.settings.jwks_url;
    let response = remote
        .client
        .get(url)
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .map_err(|err| format!("GET {url}: {err}"))?;
    let jwks: JwkSet = response
        .json()
        .await
        .map_err(|err| format!("GET {url}: not a JWKS: {err}"))?;
    let keys = decoding_keys(&jwks);
    if keys.is_empty() {
        return Err(format!("GET {url}: no usable EdDSA keys"));
    }
    tracing::debug!(keys = keys.len(), "fetched signing keys");
    ring.store(Arc::new(keys));
    Ok(())
}

fn validation(rules: &TokenRules) -> Validation {
    let mut validation = Validation::new(Algorithm::EdDSA);
    validation.set_issuer(&[&rules.issuer]);
    validation.set_audience(&[&rules.audience]);
    validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    validation.leeway = CLOCK_LEEWAY_SECS;
    validation
}

/// The EdDSA keys of `jwks` that have a key id; anything else is ignored.
fn decoding_keys(jwks: &JwkSet) -> HashMap<String, DecodingKey> {
    jwks.keys
        .iter()
        .filter(|jwk| matches!(jwk.common.key_algorithm, Some(KeyAlgorithm::EdDSA)))
        .filter_map(|jwk| {
            let kid = jwk.common.key_id.clone()?;
            let key = DecodingKey::from_jwk(jwk).ok()?;
            Some((kid, key))
        })
        .collect()
}

/// The caller, proven by a valid `Authorization: Bearer` access token. Extracting it answers
/// 401 (with `WWW-Authenticate`) for a missing or bad token.
#[derive(Debug, Clone)]
pub struct Authenticated {
    pub user_id: Uuid,
    pub claims: AccessClaims,
}

impl FromRequest for Authenticated {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Self, ApiError>>;

    fn from_request(request: &HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        let verifier = request.app_data::<web::Data<TokenVerifier>>().cloned();
        let token = bearer_token(request);
        Box::pin(async move {
            let verifier = verifier
                .ok_or_else(|| ApiError::internal("no TokenVerifier registered as app data"))?;
            let token = token.inspect_err(|missing| {
                metrics::counter!(names::ACCESS_TOKENS_REJECTED, "reason" => missing.metric_reason())
                    .increment(1);
            })?;
            let claims = verifier.verify(&token).await?;
            Ok(Authenticated {
                user_id: claims.sub,
                claims,
            })
        })
    }
}

fn bearer_token(request: &HttpRequest) -> Result<String, TokenError> {
    let value = request
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .ok_or(TokenError::Missing)?
        .to_str()
        .map_err(|_| TokenError::Malformed)?;
    let (scheme, token) = value.split_once(' ').ok_or(TokenError::Missing)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(TokenError::Missing);
    }
    Ok(token.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use ed25519_dalek::pkcs8::EncodePrivateKey;
    use jsonwebtoken::jwk::Jwk;
    use jsonwebtoken::{EncodingKey, Header};

    fn rules() -> TokenRules {
        TokenRules {
            issuer: "taskstream-auth".into(),
            audience: "taskstream".into(),
        }
    }

    /// A fresh Ed25519 key: the signing half, and its public JWK under `kid`.
    fn key_pair(kid: &str) -> (EncodingKey, Jwk) {
        let signing = ed25519_dalek::SigningKey::generate(&mut rand_core::OsRng);
        // PKCS#8 v1 (private key only), the form `openssl genpkey` writes.
        let der = ed25519_dalek::pkcs8::KeypairBytes {
            secret_key: signing.to_bytes(),
            public_key: None,
        }
        .to_pkcs8_der()
        .unwrap();
        let encoding = EncodingKey::from_ed_der(der.as_bytes());
        let mut jwk = Jwk::from_encoding_key(&encoding, Algorithm::EdDSA).unwrap();
        jwk.common.key_id = Some(kid.to_owned());
        (encoding, jwk)
    }

    fn claims(expires_in: i64) -> AccessClaims {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        AccessClaims {
            sub: Uuid::new_v4(),
            iss: "taskstream-auth".into(),
            aud: "taskstream".into(),
            iat: now,
            exp: now + expires_in,
            jti: Uuid::new_v4(),
            sid: Some(Uuid::new_v4()),
        }
    }

    fn sign(claims: &AccessClaims, key: &EncodingKey, kid: Option<&str>) -> String {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&header, claims, key).unwrap()
    }

    fn verifier_for(jwks: Vec<Jwk>) -> TokenVerifier {
        TokenVerifier::with_keys(&JwkSet { keys: jwks }, &rules())
    }

    /// A JWKS endpoint on loopback whose first answer comes only after `first_delay`.
    async fn slow_jwks(jwks: &JwkSet, first_delay: Duration) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1/auth/jwks", listener.local_addr().unwrap());
        let body = serde_json::to_string(jwks).unwrap();
        tokio::spawn(async move {
            let mut delay = Some(first_delay);
            while let Ok((mut socket, _)) = listener.accept().await {
                let body = body.clone();
                let wait = delay.take().unwrap_or_default();
                tokio::spawn(async move {
                    let mut request = [0u8; 4096];
                    let _ = socket.read(&mut request).await;
                    tokio::time::sleep(wait).await;
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = socket.write_all(answer.as_bytes()).await;
                });
            }
        });
        url
    }

    #[tokio::test]
    async fn no_request_waits_for_the_keys_they_are_fetched_in_the_background() {
        // The JWKS answers only after 2 s: requests meanwhile get "keys unavailable" at once
        // (503 to the client) instead of waiting on the fetch, and the service is not ready.
        let (key, jwk) = key_pair("k1");
        let url = slow_jwks(&JwkSet { keys: vec![jwk] }, Duration::from_secs(2)).await;
        let verifier = TokenVerifier::remote(
            RemoteKeysSettings {
                jwks_url: url,
                refresh_after: Duration::from_secs(300),
                timeout: Duration::from_secs(10),
            },
            &rules(),
        )
        .unwrap();
        let token = sign(&claims(600), &key, Some("k1"));
        let asked = Instant::now();
        let early = verifier.verify(&token).await;
        assert!(
            matches!(early, Err(TokenError::KeysUnavailable(_))),
            "{early:?}"
        );
        assert!(asked.elapsed() < Duration::from_millis(500), "it waited");
        assert!(!verifier.has_keys());
        tokio::time::sleep(Duration::from_millis(2_500)).await;
        assert!(verifier.has_keys());
        assert!(verifier.verify(&token).await.is_ok());
    }

    #[tokio::test]
    async fn accepts_a_valid_token_and_returns_its_claims() {
        let (key, jwk) = key_pair("k1");
        let verifier = verifier_for(vec![jwk]);
        let claims = claims(600);
        assert_eq!(
            verifier.verify(&sign(&claims, &key, Some("k1"))).await,
            Ok(claims)
        );
    }

    #[tokio::test]
    async fn accepts_tokens_without_a_session_as_issued_before_sessions_were_named() {
        let (key, jwk) = key_pair("k1");
        let verifier = verifier_for(vec![jwk]);
        let claims = AccessClaims {
            sid: None,
            ..claims(600)
        };
        let token = sign(&claims, &key, Some("k1"));
        let payload = token.split('.').nth(1).unwrap();
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap();
        assert!(
            !String::from_utf8(payload).unwrap().contains("sid"),
            "no session, no claim"
        );
        assert_eq!(verifier.verify(&token).await, Ok(claims));
    }

    #[tokio::test]
    async fn accepts_tokens_of_every_published_key() {
        let (old_key, old_jwk) = key_pair("old");
        let (new_key, new_jwk) = key_pair("new");
        let verifier = verifier_for(vec![old_jwk, new_jwk]);
        for (key, kid) in [(&old_key, "old"), (&new_key, "new")] {
            assert!(verifier
                .verify(&sign(&claims(600), key, Some(kid)))
                .await
                .is_ok());
        }
    }

    #[tokio::test]
    async fn rejects_expired_tokens_beyond_the_leeway() {
        let (key, jwk) = key_pair("k1");
        let verifier = verifier_for(vec![jwk]);
        let token = sign(&claims(-(CLOCK_LEEWAY_SECS as i64) - 5), &key, Some("k1"));
        assert_eq!(verifier.verify(&token).await, Err(TokenError::Expired));
    }

    #[tokio::test]
    async fn a_remembered_token_is_refused_once_it_expires() {
        let (key, jwk) = key_pair("k1");
        let verifier = verifier_for(vec![jwk]);
        // Valid for about one more second, the leeway included.
        let token = sign(&claims(1 - CLOCK_LEEWAY_SECS as i64), &key, Some("k1"));
        assert!(verifier.verify(&token).await.is_ok());
        assert!(verifier.verify(&token).await.is_ok(), "remembered");
        tokio::time::sleep(Duration::from_millis(2_100)).await;
        assert_eq!(verifier.verify(&token).await, Err(TokenError::Expired));
    }

    #[tokio::test]
    async fn a_remembered_token_is_refused_once_its_key_is_no_longer_published() {
        let (old_key, old_jwk) = key_pair("old");
        let (_, new_jwk) = key_pair("new");
        let verifier = verifier_for(vec![old_jwk]);
        let token = sign(&claims(600), &old_key, Some("old"));
        assert!(verifier.verify(&token).await.is_ok());
        verifier.ring.store(Arc::new(decoding_keys(&JwkSet {
            keys: vec![new_jwk],
        })));
        assert_eq!(verifier.verify(&token).await, Err(TokenError::UnknownKey));
    }

    #[tokio::test]
    async fn a_remembered_token_of_a_deleted_account_is_refused() {
        let (key, jwk) = key_pair("k1");
        let revoked = RevokedUsers::new();
        let verifier = verifier_for(vec![jwk]).refusing(revoked.clone());
        let claims = claims(600);
        let token = sign(&claims, &key, Some("k1"));
        assert!(verifier.verify(&token).await.is_ok());
        revoked.note(claims.sub);
        assert_eq!(verifier.verify(&token).await, Err(TokenError::Revoked));
    }

    #[tokio::test]
    async fn rejects_wrong_issuer_or_audience() {
        let (key, jwk) = key_pair("k1");
        let verifier = verifier_for(vec![jwk]);
        let mut foreign_issuer = claims(600);
        foreign_issuer.iss = "someone-else".into();
        let mut foreign_audience = claims(600);
        foreign_audience.aud = "another-app".into();
        for (claims, reason) in [
            (foreign_issuer, "wrong issuer"),
            (foreign_audience, "wrong audience"),
        ] {
            assert_eq!(
                verifier.verify(&sign(&claims, &key, Some("k1"))).await,
                Err(TokenError::Invalid(reason.into()))
            );
        }
    }

    #[tokio::test]
    async fn rejects_tokens_signed_by_another_key() {
        let (_, published) = key_pair("k1");
        let (forger, _) = key_pair("k1");
        let verifier = verifier_for(vec![published]);
        let same_kid = sign(&claims(600), &forger, Some("k1"));
        assert_eq!(
            verifier.verify(&same_kid).await,
            Err(TokenError::Invalid("bad signature".into()))
        );
        let unknown_kid = sign(&claims(600), &forger, Some("k2"));
        assert_eq!(
            verifier.verify(&unknown_kid).await,
            Err(TokenError::UnknownKey)
        );
        let no_kid = sign(&claims(600), &forger, None);
        assert!(matches!(
            verifier.verify(&no_kid).await,
            Err(TokenError::Invalid(_))
        ));
    }

    #[tokio::test]
    async fn rejects_alg_none_and_hmac_keyed_with_the_public_key() {
        let (_, jwk) = key_pair("k1");
        let verifier = verifier_for(vec![jwk.clone()]);
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);

        let unsigned = format!(
            "{}.{}.",
            b64(br#"{"alg":"none","typ":"JWT","kid":"k1"}"#),
            b64(serde_json::to_string(&claims(600)).unwrap().as_bytes())
        );
        assert_eq!(verifier.verify(&unsigned).await, Err(TokenError::Malformed));

        let jsonwebtoken::jwk::AlgorithmParameters::OctetKeyPair(public) = &jwk.algorithm else {
            panic!("an Ed25519 JWK");
        };
        let public_bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&public.x)
            .unwrap();
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("k1".into());
        let hmac = jsonwebtoken::encode(
            &header,
            &claims(600),
            &EncodingKey::from_secret(&public_bytes),
        )
        .unwrap();
        assert_eq!(
            verifier.verify(&hmac).await,
            Err(TokenError::Invalid(
                "algorithm HS256 is not accepted".into()
            ))
        );
    }

    #[tokio::test]
    async fn rejects_garbage() {
        let (_, jwk) = key_pair("k1");
        let verifier = verifier_for(vec![jwk]);
        for token in ["", "abc", "a.b.c", "....."] {
            assert_eq!(
                verifier.verify(token).await,
                Err(TokenError::Malformed),
                "{token:?}"
            );
        }
    }
}
