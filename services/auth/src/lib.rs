//! The auth service: accounts, login sessions and the keys every other service verifies access
//! tokens with.
//!
//! Layers: [`routes`] → [`handlers`] (with [`api`] bodies) → [`domain`] → [`storage`]. A library
//! so integration tests reach its parts; the binary is `src/main.rs`.

pub mod api;
pub mod domain;
pub mod handlers;
pub mod keys;
pub mod routes;
pub mod settings;
pub mod storage;

use events::outbox::{Relay, RELAY_STOP_LIMIT};
use service_kit::access_token::TokenVerifier;
use service_kit::actix_web::web;
use service_kit::config::{ConfigError, Env};
use service_kit::http::AppContext;
use service_kit::revoked_users::RevokedUsers;
use service_kit::sqlx::migrate::Migrator;
use service_kit::Service;

use crate::domain::Accounts;
use crate::settings::AuthSettings;

static MIGRATIONS: Migrator = sqlx::migrate!();

/// The service: its account operations, the relay of its outbox, and its own token verifier.
pub struct Auth {
    accounts: web::Data<Accounts>,
    /// Publishes the events signup and profile changes write to the outbox.
    relay: Relay,
    /// Auth checks its own tokens with the same verifier other services use, fed its own keys.
    verifier: web::Data<TokenVerifier>,
}

impl Service for Auth {
    const NAME: &'static str = "auth";
    const DEFAULT_PORT: u16 = 8081;
    type Settings = AuthSettings;

    fn settings(env: &Env) -> Result<AuthSettings, ConfigError> {
        AuthSettings::from_env(env)
    }

    fn migrations() -> Option<&'static Migrator> {
        Some(&MIGRATIONS)
    }

    async fn start(settings: AuthSettings, context: &AppContext) -> Result<Self, String> {
        let revoked = RevokedUsers::new();
        revoked.spawn_reload(context.db.clone());
        let verifier = web::Data::new(
            TokenVerifier::with_keys(settings.keys.jwks(), &settings.rules)
                .refusing(revoked.clone()),
        );
        let accounts = web::Data::new(Accounts::new(context.db.clone(), settings, revoked)?);
        Accounts::spawn_housekeeping(
            accounts.clone().into_inner(),
            context.config.housekeeping.interval,
        );
        let relay = Relay::for_service(context)?;
        Ok(Self {
            accounts,
            relay,
            verifier,
        })
    }

    async fn stop(&self) {
        self.relay.stop(RELAY_STOP_LIMIT).await;
    }

    fn routes(&self, routes: &mut web::ServiceConfig) {
        routes
            .app_data(self.accounts.clone())
            .app_data(self.verifier.clone());
        routes::configure(routes);
    }
}
