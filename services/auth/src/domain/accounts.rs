//! The account operations: signup, login, refresh, logout, profile.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::FutureExt;
use jsonwebtoken::jwk::JwkSet;
use service_kit::access_token::{AccessClaims, TokenRules};
use service_kit::db::{Database, Lsn};
use service_kit::housekeeping;
use service_kit::revoked_users::{self, RevokedUsers};
use time::OffsetDateTime;
use uuid::Uuid;

use super::login_limits::LoginLimits;
use super::passwords::Passwords;
use super::rules::normalize_username;
use super::sessions::{hash_presented, EndReason, RefreshToken};
use super::AuthError;
use crate::keys::SigningKeys;
use crate::settings::AuthSettings;
use crate::storage;
use events::catalog::{SessionRevoked, UserDeleted, UserRegistered, UserUpdated};
use events::outbox;

/// The CloudEvents `source` of auth's events.
const EVENT_SOURCE: &str = "/taskstream/auth";

/// An account as its owner sees it.
#[derive(Debug, Clone, PartialEq, Eq, service_kit::sqlx::FromRow)]
pub struct User {
    pub id: Uuid,
    pub username: String,
    pub nickname: Option<String>,
    pub avatar_url: Option<String>,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
}

/// Signup input, already checked against the rules.
pub struct NewAccount {
    pub username: String,
    pub password: String,
    pub nickname: Option<String>,
}

/// Profile fields to change: absent leaves a field as is, `Some(None)` clears it.
#[derive(Debug, Clone, Default)]
pub struct ProfileChange {
    pub nickname: Option<Option<String>>,
    pub avatar_url: Option<Option<String>>,
}

/// What a successful login or refresh returns.
#[derive(Debug)]
pub struct TokenPair {
    pub access_token: String,
    pub refresh_token: String,
    /// Seconds the access token is valid for.
    pub expires_in: u64,
}

/// How presenting a refresh token turned out.
enum Rotation {
    Rotated { user_id: Uuid, session_id: Uuid },
    Reused { user_id: Uuid, session_id: Uuid },
    Unusable,
}

/// The account operations and everything they need.
pub struct Accounts {
    db: Database,
    passwords: Passwords,
    limits: LoginLimits,
    keys: SigningKeys,
    rules: TokenRules,
    access_token_ttl: Duration,
    refresh_token_ttl: Duration,
    session_max_lifetime: Duration,
    refresh_reuse_grace: Duration,
    /// Deleted accounts, whose tokens the verifier refuses.
    revoked: Arc<RevokedUsers>,
}

impl Accounts {
    pub fn new(
        db: Database,
        settings: AuthSettings,
        revoked: Arc<RevokedUsers>,
    ) -> Result<Self, String> {
        Ok(Self {
            db,
            revoked,
            passwords: Passwords::start(
                settings.password_workers,
                settings.password_queue,
                settings.signup_password_workers,
                settings.signup_password_queue,
            )?,
            limits: LoginLimits::new(
                settings.login_limit_per_username,
                settings.login_limit_per_client,
                settings.signup_limit_per_client,
            ),
            keys: settings.keys,
            rules: settings.rules,
            access_token_ttl: settings.access_token_ttl,
            refresh_token_ttl: settings.refresh_token_ttl,
            session_max_lifetime: settings.session_max_lifetime,
            refresh_reuse_grace: settings.refresh_reuse_grace,
        })
    }

    /// Creates an account; returns it with the consistency token of the write. At most
    /// `AUTH_SIGNUP_LIMIT_PER_CLIENT` a minute from one `client`.
    pub async fn signup(
        &self,
        account: NewAccount,
        client: Option<IpAddr>,
    ) -> Result<(User, Option<Lsn>), AuthError> {
        self.limits.signup(client).map_err(AuthError::RateLimited)?;
        let username = normalize_username(&account.username);
        // A taken name is answered at once, without spending a password hash on it.
        let taken = {
            let username = username.clone();
            self.db
                .primary(
                    |mut conn| async move { storage::username_exists(&mut conn, &username).await },
                )
                .await?
        };
        if taken {
            return Err(AuthError::UsernameTaken(username));
        }
        let password_hash = self.passwords.hash(account.password).await?;
        let (inserted, lsn) = {
            let username = username.clone();
            self.db
                .transaction(move |tx| {
                    async move {
                        let user = storage::insert_user(
                            tx,
                            Uuid::now_v7(),
                            &username,
                            &password_hash,
                            account.nickname.as_deref(),
                        )
                        .await?;
                        if let Some(user) = &user {
                            let registered = UserRegistered {
                                user_id: user.id,
                                username: user.username.clone(),
                                nickname: user.nickname.clone(),
                                registered_at: user.created_at,
                            };
                            outbox::enqueue(tx, EVENT_SOURCE, &registered).await?;
                        }
                        Ok::<_, AuthError>(user)
                    }
                    .boxed()
                })
                .await?
        };
        // `None`: someone took the name between our check and our insert.
        let user = inserted.ok_or(AuthError::UsernameTaken(username))?;
        tracing::info!(user_id = %user.id, "account created");
        Ok((user, lsn))
    }

    /// Checks the credentials and starts a session. Unknown users and wrong passwords take the
    /// same path and the same time, and get the same answer; each counts against the limits of
    /// this username from this `client` and of this `client` (a correct login costs nothing).
    pub async fn login(
        &self,
        username: &str,
        password: String,
        client: Option<IpAddr>,
    ) -> Result<TokenPair, AuthError> {
        let username = normalize_username(username);
        // Holds a place under the limits until the password is checked: guesses sent at once
        // count before any of them has failed.
        let attempt = self
            .limits
            .attempt(&username, client)
            .map_err(AuthError::RateLimited)?;
        // Read on the primary: a login right after signup must find the account.
        let found = self
            .db
            .primary(|mut conn| {
                let username = username.clone();
                async move { storage::find_credentials(&mut conn, &username).await }
            })
            .await?;
        let (user_id, stored_hash) = found.unzip();
        let matches = self.passwords.verify(password, stored_hash).await?;
        match user_id {
            Some(user_id) if matches => self.start_session(user_id).await,
            _ => {
                attempt.failed();
                Err(AuthError::InvalidCredentials)
            }
        }
    }

    async fn start_session(&self, user_id: Uuid) -> Result<TokenPair, AuthError> {
        let refresh = RefreshToken::generate();
        let (hash, ttl, session) = (
            refresh.hash,
            self.refresh_token_ttl.as_secs(),
            self.session_max_lifetime.as_secs(),
        );
        let (session_id, _) = self
            .db
            .transaction(move |tx| {
                async move {
                    let family = storage::create_family(tx, user_id).await?;
                    storage::insert_refresh_token(tx, &hash, family, ttl, session).await?;
                    Ok::<_, AuthError>(family)
                }
                .boxed()
            })
            .await?;
        self.token_pair(user_id, session_id, refresh.token)
    }

    /// Rotates a refresh token: the presented one dies, a new pair is issued. Presenting a token
    /// that was already rotated revokes its whole session (someone else may hold it), unless it
    /// comes within `AUTH_REFRESH_REUSE_GRACE_SECS` of its rotation: that is a retry (the first
    /// answer was lost, or two tabs refreshed at once) and gets a pair of its own. A session
    /// ends `AUTH_SESSION_MAX_LIFETIME_SECS` after its login, however often it was refreshed.
    pub async fn refresh(&self, presented: &str) -> Result<TokenPair, AuthError> {
        let hash = hash_presented(presented).ok_or(AuthError::RefreshTokenInvalid)?;
        let next = RefreshToken::generate();
        let (next_hash, ttl) = (next.hash, self.refresh_token_ttl.as_secs());
        let (grace, session) = (
            self.refresh_reuse_grace.as_secs(),
            self.session_max_lifetime.as_secs(),
        );
        let (now, token_life) = (OffsetDateTime::now_utc(), self.token_life_with_leeway());
        let (rotation, _) = self
            .db
            .transaction(move |tx| {
                async move {
                    let Some(current) =
                        storage::lock_refresh_token(tx, &hash, grace, session).await?
                    else {
                        return Ok(Rotation::Unusable);
                    };
                    if current.family_revoked {
                        return Ok(Rotation::Unusable);
                    }
                    if current.used && current.used_within_grace && !current.expired {
                        // A retry: another token of the same session; the first stays good too.
                        storage::insert_refresh_token(
                            tx,
                            &next_hash,
                            current.family_id,
                            ttl,
                            session,
                        )
                        .await?;
                        return Ok(Rotation::Rotated {
                            user_id: current.user_id,
                            session_id: current.family_id,
                        });
                    }
                    if current.used {
                        // Committed, even though the caller gets an error. The family is locked
                        // and was live, so it ends here, once.
                        let reason = EndReason::Reuse;
                        let ended =
                            storage::revoke_family(tx, current.family_id, reason, now).await?;
                        if let Some(ended) = ended {
                            let event = session_revoked(ended, reason, now, token_life);
                            outbox::enqueue(tx, EVENT_SOURCE, &event).await?;
                        }
                        return Ok(Rotation::Reused {
                            user_id: current.user_id,
                            session_id: current.family_id,
                        });
                    }
                    if current.expired {
                        return Ok(Rotation::Unusable);
                    }
                    storage::mark_used(tx, &hash).await?;
                    storage::insert_refresh_token(tx, &next_hash, current.family_id, ttl, session)
                        .await?;
                    Ok::<_, AuthError>(Rotation::Rotated {
                        user_id: current.user_id,
                        session_id: current.family_id,
                    })
                }
                .boxed()
            })
            .await?;
        match rotation {
            Rotation::Rotated {
                user_id,
                session_id,
            } => self.token_pair(user_id, session_id, next.token),
            Rotation::Reused {
                user_id,
                session_id,
            } => {
                tracing::warn!(%user_id, %session_id, "refresh token reused: session revoked");
                Err(AuthError::RefreshTokenReused)
            }
            Rotation::Unusable => Err(AuthError::RefreshTokenInvalid),
        }
    }

    /// Ends the session of `presented`, publishing `session.revoked` with the revocation.
    /// Idempotent: an unknown token, or one of a session that has ended, changes nothing and
    /// publishes nothing.
    pub async fn logout(&self, presented: &str) -> Result<(), AuthError> {
        let Some(hash) = hash_presented(presented) else {
            return Ok(());
        };
        let (now, token_life) = (OffsetDateTime::now_utc(), self.token_life_with_leeway());
        let (ended, _) = self
            .db
            .transaction(move |tx| {
                async move {
                    let reason = EndReason::Logout;
                    let Some(ended) =
                        storage::revoke_family_of_token(tx, &hash, reason, now).await?
                    else {
                        return Ok(None);
                    };
                    let ids = (ended.user_id, ended.id);
                    let event = session_revoked(ended, reason, now, token_life);
                    outbox::enqueue(tx, EVENT_SOURCE, &event).await?;
                    Ok::<_, AuthError>(Some(ids))
                }
                .boxed()
            })
            .await?;
        if let Some((user_id, session_id)) = ended {
            tracing::info!(%user_id, %session_id, "logged out: session revoked");
        }
        Ok(())
    }

    /// The caller's account, from a replica unless `read_after` says it is not there yet.
    pub async fn profile(&self, user_id: Uuid, read_after: Option<Lsn>) -> Result<User, AuthError> {
        self.db
            .find_on_replica_or_primary(read_after, |mut conn| async move {
                storage::find_user(&mut conn, user_id).await
            })
            .await?
            .ok_or(AuthError::AccountGone)
    }

    pub async fn update_profile(
        &self,
        user_id: Uuid,
        change: ProfileChange,
    ) -> Result<(User, Option<Lsn>), AuthError> {
        let (user, lsn) = self
            .db
            .transaction(move |tx| {
                async move {
                    let user = storage::update_profile(tx, user_id, &change).await?;
                    if let Some(user) = &user {
                        let updated = UserUpdated {
                            user_id: user.id,
                            nickname: user.nickname.clone(),
                            avatar_url: user.avatar_url.clone(),
                            updated_at: user.updated_at,
                        };
                        outbox::enqueue(tx, EVENT_SOURCE, &updated).await?;
                    }
                    Ok::<_, AuthError>(user)
                }
                .boxed()
            })
            .await?;
        Ok((user.ok_or(AuthError::AccountGone)?, lsn))
    }

    /// Deletes the caller's account once the password proves it is them: credentials, every
    /// session, and the outbox's copies of its earlier events, with `user.deleted` published
    /// for the other services to erase what they hold. Its access tokens are refused from now
    /// on (on this instance at once, on the others within a second). Wrong guesses count
    /// against the username's login limit, so a stolen token cannot be used to guess.
    pub async fn delete_account(
        &self,
        user_id: Uuid,
        password: String,
        client: Option<IpAddr>,
    ) -> Result<(), AuthError> {
        let found = self
            .db
            .primary(
                |mut conn| async move { storage::find_credentials_by_id(&mut conn, user_id).await },
            )
            .await?;
        let Some((username, stored_hash)) = found else {
            return Err(AuthError::AccountGone);
        };
        let attempt = self
            .limits
            .attempt(&username, client)
            .map_err(AuthError::RateLimited)?;
        if !self.passwords.verify(password, Some(stored_hash)).await? {
            attempt.failed();
            return Err(AuthError::InvalidCredentials);
        }
        drop(attempt);
        let deleted_at = OffsetDateTime::now_utc();
        let tokens_valid_until = deleted_at + self.token_life_with_leeway();
        let (deleted, _) = self
            .db
            .transaction(move |tx| {
                async move {
                    if !storage::delete_user(tx, user_id).await? {
                        return Ok(false);
                    }
                    revoked_users::record(tx, user_id, deleted_at, tokens_valid_until).await?;
                    let event = UserDeleted {
                        user_id,
                        deleted_at,
                        tokens_valid_until,
                    };
                    outbox::enqueue(tx, EVENT_SOURCE, &event).await?;
                    Ok::<_, AuthError>(true)
                }
                .boxed()
            })
            .await?;
        if !deleted {
            return Err(AuthError::AccountGone);
        }
        self.revoked.note(user_id);
        tracing::info!(%user_id, "account deleted");
        Ok(())
    }

    pub fn jwks(&self) -> &JwkSet {
        self.keys.jwks()
    }

    /// Chores for the life of the process: forget idle rate-limit keys (this instance's
    /// memory) every minute; delete long-expired refresh tokens and their sessions every
    /// `interval` (housekeeping: in batches, one instance at a time).
    pub fn spawn_housekeeping(accounts: std::sync::Arc<Self>, interval: Duration) {
        housekeeping::spawn(
            accounts.db.clone(),
            "auth sessions",
            interval,
            storage::housekeeping_sweeps(),
        );
        service_kit::workers::spawn_periodic(
            "forget idle login limits",
            Duration::from_secs(60),
            move || {
                accounts.limits.forget_idle();
                async { Ok(()) }
            },
        );
    }

    /// How long after it is issued an access token is still accepted by signature: its lifetime
    /// plus the verifiers' clock leeway. The last token issued before a moment is good until then.
    fn token_life_with_leeway(&self) -> Duration {
        self.access_token_ttl + Duration::from_secs(service_kit::access_token::CLOCK_LEEWAY_SECS)
    }

    /// An access token for `user_id` in session `session_id`, with `refresh_token` beside it.
    fn token_pair(
        &self,
        user_id: Uuid,
        session_id: Uuid,
        refresh_token: String,
    ) -> Result<TokenPair, AuthError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_secs()) as i64;
        let ttl = self.access_token_ttl.as_secs();
        let claims = AccessClaims {
            sub: user_id,
            iss: self.rules.issuer.clone(),
            aud: self.rules.audience.clone(),
            iat: now,
            exp: now + ttl as i64,
            jti: Uuid::new_v4(),
            sid: Some(session_id),
        };
        Ok(TokenPair {
            access_token: self.keys.sign(&claims)?,
            refresh_token,
            expires_in: ttl,
        })
    }
}

/// `session.revoked` for a session that ended at `revoked_at`: the last access token issued in it
/// (at the latest then; the leeway covers a refresh finishing alongside) is good until
/// `token_life` later.
fn session_revoked(
    ended: storage::EndedSession,
    reason: EndReason,
    revoked_at: OffsetDateTime,
    token_life: Duration,
) -> SessionRevoked {
    SessionRevoked {
        user_id: ended.user_id,
        session_id: ended.id,
        reason: reason.as_str().to_owned(),
        revoked_at,
        tokens_valid_until: revoked_at + token_life,
    }
}
