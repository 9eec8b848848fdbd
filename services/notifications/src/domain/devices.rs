//! Devices: the Web Push subscriptions browsers hand out (`PushSubscription.toJSON()`:
//! `endpoint`, `keys.p256dh`, `keys.auth`), checked before they are kept, so a push never fails
//! on a key that could not have worked.

use base64::Engine as _;
use service_kit::db::{Database, DbError};
use service_kit::sqlx::Connection;
use uuid::Uuid;
use web_push_native::p256;

use crate::storage;
use crate::storage::push::{Registered, SubscriptionRow};

/// Longest endpoint kept (push services' URLs are a few hundred characters).
pub const ENDPOINT_MAX: usize = 2048;

/// A subscription that passed every check.
#[derive(Debug, Clone)]
pub struct Subscription {
    pub endpoint: String,
    /// The device's P-256 public key, uncompressed (65 bytes).
    pub p256dh: Vec<u8>,
    /// The device's authentication secret (16 bytes).
    pub auth: Vec<u8>,
}

/// A rule a subscription broke: the field and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub field: &'static str,
    pub message: &'static str,
}

impl Subscription {
    /// Checks a subscription as a browser gave it. `allow_http_loopback` admits
    /// `http://127.0.0.1`/`localhost` endpoints (the local push service); otherwise only https.
    pub fn parse(
        endpoint: &str,
        p256dh: &str,
        auth: &str,
        allow_http_loopback: bool,
    ) -> Result<Self, Vec<Invalid>> {
        let mut problems = Vec::new();
        if let Err(message) = check_endpoint(endpoint, allow_http_loopback) {
            problems.push(Invalid {
                field: "endpoint",
                message,
            });
        }
        let p256dh = decode(p256dh)
            .filter(|key| key.len() == 65 && p256::PublicKey::from_sec1_bytes(key).is_ok());
        if p256dh.is_none() {
            problems.push(Invalid {
                field: "keys.p256dh",
                message: "must be an uncompressed P-256 public key (65 bytes) in base64url",
            });
        }
        let auth = decode(auth).filter(|secret| secret.len() == 16);
        if auth.is_none() {
            problems.push(Invalid {
                field: "keys.auth",
                message: "must be the 16-byte authentication secret in base64url",
            });
        }
        match (p256dh, auth) {
            (Some(p256dh), Some(auth)) if problems.is_empty() => Ok(Self {
                endpoint: endpoint.to_owned(),
                p256dh,
                auth,
            }),
            _ => Err(problems),
        }
    }
}

fn check_endpoint(endpoint: &str, allow_http_loopback: bool) -> Result<(), &'static str> {
    if endpoint.len() > ENDPOINT_MAX {
        return Err("must be at most 2048 characters");
    }
    let url = url::Url::parse(endpoint).map_err(|_| "must be an absolute URL")?;
    if !url.username().is_empty() || url.password().is_some() || url.fragment().is_some() {
        return Err("must not carry credentials or a fragment");
    }
    let loopback = matches!(url.host(), Some(url::Host::Domain("localhost")))
        || matches!(url.host(), Some(url::Host::Ipv4(ip)) if ip.is_loopback())
        || matches!(url.host(), Some(url::Host::Ipv6(ip)) if ip.is_loopback());
    match url.scheme() {
        "https" if url.host().is_some() => Ok(()),
        "http" if allow_http_loopback && loopback => Ok(()),
        _ => Err("must be an https URL of a push service"),
    }
}

/// Base64url as browsers write it (unpadded), also accepting padding and the standard alphabet.
fn decode(text: &str) -> Option<Vec<u8>> {
    let trimmed = text.trim_end_matches('=');
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(trimmed)
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(trimmed))
        .ok()
}

/// Encodes a key the way browsers do.
pub fn encode(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("at most {0} devices per account; delete one first")]
    LimitReached(i64),
    #[error("no device {0} registered")]
    NotFound(Uuid),
    #[error("push is not configured on this server (no VAPID key)")]
    PushDisabled,
    #[error(transparent)]
    Database(#[from] DbError),
}

impl From<service_kit::sqlx::Error> for DeviceError {
    fn from(err: service_kit::sqlx::Error) -> Self {
        DeviceError::Database(err.into())
    }
}

/// Registering, listing and deleting devices.
pub struct Devices {
    db: Database,
    max_per_user: i64,
    push_enabled: bool,
}

impl Devices {
    pub fn new(db: Database, max_per_user: i64, push_enabled: bool) -> Self {
        Self {
            db,
            max_per_user,
            push_enabled,
        }
    }

    /// Returns the device and whether it is new.
    pub async fn register(
        &self,
        user: Uuid,
        subscription: &Subscription,
    ) -> Result<(SubscriptionRow, bool), DeviceError> {
        if !self.push_enabled {
            return Err(DeviceError::PushDisabled);
        }
        let mut conn = self.db.writer_connection().await?;
        let mut tx = conn.begin().await?;
        let registered = storage::push::register(
            &mut tx,
            user,
            &subscription.endpoint,
            &subscription.p256dh,
            &subscription.auth,
            self.max_per_user,
        )
        .await?;
        tx.commit().await?;
        match registered {
            Registered::Created(device) => Ok((device, true)),
            Registered::Existing(device) => Ok((device, false)),
            Registered::LimitReached => Err(DeviceError::LimitReached(self.max_per_user)),
        }
    }

    pub async fn list(&self, user: Uuid) -> Result<Vec<SubscriptionRow>, DeviceError> {
        Ok(self
            .db
            .primary(|mut conn| async move { storage::push::subscriptions(&mut conn, user).await })
            .await?)
    }

    pub async fn delete(&self, user: Uuid, id: Uuid) -> Result<(), DeviceError> {
        let deleted = self
            .db
            .primary(|mut conn| async move { storage::push::unregister(&mut conn, user, id).await })
            .await?;
        if deleted {
            Ok(())
        } else {
            Err(DeviceError::NotFound(id))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P256DH: &str =
        "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4";
    const AUTH: &str = "BTBZMqHH6r4Tts7J_aSIgg";

    #[test]
    fn a_browsers_subscription_passes() {
        let parsed = Subscription::parse(
            "https://fcm.googleapis.com/fcm/send/abc",
            P256DH,
            AUTH,
            false,
        )
        .unwrap();
        assert_eq!(parsed.p256dh.len(), 65);
        assert_eq!(parsed.auth.len(), 16);
    }

    #[test]
    fn each_broken_field_is_named() {
        let problems =
            Subscription::parse("http://push.example.com/x", "AAAA", "short", false).unwrap_err();
        let fields: Vec<_> = problems.iter().map(|p| p.field).collect();
        assert_eq!(fields, ["endpoint", "keys.p256dh", "keys.auth"]);
        // 65 bytes that are not a point on the curve.
        let not_a_point = encode(&[4u8; 65]);
        assert!(Subscription::parse("https://a.example/x", &not_a_point, AUTH, false).is_err());
        assert!(Subscription::parse("https://user:pw@a.example/x", P256DH, AUTH, false).is_err());
    }

    #[test]
    fn plain_http_only_to_loopback_and_only_when_allowed() {
        assert!(Subscription::parse("http://127.0.0.1:9/push/1", P256DH, AUTH, false).is_err());
        assert!(Subscription::parse("http://127.0.0.1:9/push/1", P256DH, AUTH, true).is_ok());
        assert!(Subscription::parse("http://10.0.0.1/push/1", P256DH, AUTH, true).is_err());
    }
}
