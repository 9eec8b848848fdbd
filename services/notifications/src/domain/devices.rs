//! Devices: the Web Push subscriptions browsers hand out (`PushSubscription.toJSON()`:
//! `endpoint`, `keys.p256dh`, `keys.auth`), checked before they are kept, so a push never fails
//! on a key that could not have worked and never goes anywhere but a browser's push service.
//!
//! An endpoint is a URL the server will POST to, so it is checked like one ([`EndpointPolicy`]):
//! https on the default port, a host that is a browser's push service (`PUSH_ALLOWED_HOSTS`, by
//! default the four that browsers use), never an address inside the network (private, loopback,
//! link-local, unique-local, reserved; IPv4 in any spelling, IPv4-mapped IPv6) nor a local name
//! (`localhost`, single labels, `.local`, `.internal`, `.svc`, …). The same check runs again
//! before each push (rows kept from before it existed), and the push client resolves names
//! itself and drops every address [`EndpointPolicy::admits_address`] refuses, so a name that
//! later resolves inside the network (DNS rebinding) is not reached either. Loopback over plain
//! http is admitted only with `PUSH_ALLOW_HTTP_LOOPBACK` (the local push service of the stack).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use base64::Engine as _;
use futures_util::FutureExt;
use service_kit::db::{Database, DbError};
use service_kit::erased_users;
use uuid::Uuid;
use web_push_native::p256;

use crate::storage;
use crate::storage::push::{Registered, SubscriptionRow};

/// Longest endpoint kept (push services' URLs are a few hundred characters).
pub const ENDPOINT_MAX: usize = 2048;

/// The push services browsers subscribe at: Chrome, Opera, Samsung Internet and other Chromium
/// browsers use FCM; Firefox Mozilla's autopush; Safari Apple's (`web.push.apple.com`); Edge
/// Windows Push Notification Services (`wns2-….notify.windows.com`).
pub const BROWSER_PUSH_SERVICES: &str =
    "fcm.googleapis.com,updates.push.services.mozilla.com,*.push.apple.com,*.notify.windows.com";

/// Names that only mean something inside a network (RFC 6761, 6762, 8375, and the cluster's).
const LOCAL_SUFFIXES: &[&str] = &[
    "localhost",
    "local",
    "localdomain",
    "internal",
    "home.arpa",
    "svc",
    "test",
    "invalid",
];

const NOT_HTTPS: &str = "must be an https URL of a push service";
const INSIDE_NETWORK: &str =
    "must not point inside the network (private, loopback, link-local or reserved addresses, local names)";
const NOT_A_PUSH_SERVICE: &str =
    "must be the URL of a browser's push service (FCM, Mozilla, Apple, Windows)";
const NOT_DEFAULT_PORT: &str = "must use the default https port";
const CREDENTIALS: &str = "must not carry credentials or a fragment";

/// Which hosts endpoints may name (`PUSH_ALLOWED_HOSTS`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowedHosts {
    /// `*`: any public host (the address rules still apply).
    Any,
    /// Host names, lower case; `*.example.com` admits every name below `example.com`.
    Listed(Vec<String>),
}

impl AllowedHosts {
    /// A comma-separated list of host names and `*.` wildcards, or `*` alone.
    pub fn parse(text: &str) -> Result<Self, String> {
        let entries: Vec<String> = text
            .split(',')
            .map(|entry| entry.trim().trim_end_matches('.').to_ascii_lowercase())
            .filter(|entry| !entry.is_empty())
            .collect();
        if entries == ["*"] {
            return Ok(Self::Any);
        }
        if entries.is_empty() {
            return Err("must list at least one host (or be `*` for any public host)".to_owned());
        }
        for entry in &entries {
            let name = entry.strip_prefix("*.").unwrap_or(entry);
            let labels_ok = name.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
            if !labels_ok || !name.contains('.') || name.parse::<Ipv4Addr>().is_ok() {
                return Err(format!(
                    "{entry:?} is not a host name with a dot (or `*.` and one)"
                ));
            }
        }
        Ok(Self::Listed(entries))
    }

    /// Whether `host` (a lower-case name without a trailing dot) is admitted.
    fn admits_name(&self, host: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Listed(entries) => entries.iter().any(|entry| match entry.strip_prefix('*') {
                // "*.example.com": a name ending in ".example.com", longer than it.
                Some(suffix) => host.len() > suffix.len() && host.ends_with(suffix),
                None => host == entry,
            }),
        }
    }
}

/// Where pushes may go: checked at registration and before each push.
#[derive(Debug, Clone)]
pub struct EndpointPolicy {
    pub allowed_hosts: AllowedHosts,
    /// `PUSH_ALLOW_HTTP_LOOPBACK`: `http://127.0.0.1`, `[::1]` and `localhost` are admitted (the
    /// local push service of the stack and the tests); otherwise nothing on loopback is.
    pub allow_http_loopback: bool,
}

impl EndpointPolicy {
    /// Why `url` may not be pushed to, if it may not.
    pub fn check(&self, url: &url::Url) -> Result<(), &'static str> {
        if !url.username().is_empty() || url.password().is_some() || url.fragment().is_some() {
            return Err(CREDENTIALS);
        }
        let Some(host) = url.host() else {
            return Err(NOT_HTTPS);
        };
        let loopback = match host {
            url::Host::Domain(name) => is_localhost(&host_name(name)),
            url::Host::Ipv4(ip) => ip.is_loopback(),
            url::Host::Ipv6(ip) => ip == Ipv6Addr::LOCALHOST,
        };
        if loopback {
            // The local push service only, and only where the switch is on.
            return if self.allow_http_loopback && url.scheme() == "http" {
                Ok(())
            } else {
                Err(INSIDE_NETWORK)
            };
        }
        if url.scheme() != "https" {
            return Err(NOT_HTTPS);
        }
        match host {
            url::Host::Ipv4(ip) => self.check_literal(IpAddr::V4(ip))?,
            url::Host::Ipv6(ip) => self.check_literal(IpAddr::V6(ip))?,
            url::Host::Domain(name) => {
                let name = host_name(name);
                if !name.contains('.') || is_local_name(&name) {
                    return Err(INSIDE_NETWORK);
                }
                if !self.allowed_hosts.admits_name(&name) {
                    return Err(NOT_A_PUSH_SERVICE);
                }
            }
        }
        // Push services listen on 443 (and the network policy lets nothing else out).
        if url.port().is_some() {
            return Err(NOT_DEFAULT_PORT);
        }
        Ok(())
    }

    fn check_literal(&self, ip: IpAddr) -> Result<(), &'static str> {
        if !is_public(ip) {
            Err(INSIDE_NETWORK)
        } else if self.allowed_hosts != AllowedHosts::Any {
            // Browsers' push services are names, never bare addresses.
            Err(NOT_A_PUSH_SERVICE)
        } else {
            Ok(())
        }
    }

    /// Whether a push may connect to `ip`, an address a name resolved to.
    pub fn admits_address(&self, ip: IpAddr) -> bool {
        is_public(ip) || (self.allow_http_loopback && is_loopback(ip))
    }
}

/// A host name as compared: lower case (the URL parser made it so), without a trailing dot.
fn host_name(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn is_localhost(name: &str) -> bool {
    name == "localhost" || name.ends_with(".localhost")
}

fn is_local_name(name: &str) -> bool {
    LOCAL_SUFFIXES.iter().any(|suffix| {
        name == *suffix
            || name
                .strip_suffix(suffix)
                .is_some_and(|rest| rest.ends_with('.'))
    })
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(ip) => ip.is_loopback(),
        IpAddr::V6(ip) => {
            ip == Ipv6Addr::LOCALHOST || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// Whether the public internet routes to `ip`, so a push service may have it. Everything
/// special-purpose (IANA's registries) is not: this host, private and shared (CGNAT) ranges,
/// link-local (cloud metadata at 169.254.169.254), unique-local, documentation, benchmarking,
/// multicast, reserved. IPv4 inside IPv6 (mapped, NAT64) is judged as the IPv4 address it is.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(ip) => is_public_v4(ip),
        IpAddr::V6(ip) => is_public_v6(ip),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    /// (network, prefix length) of the IPv4 special-purpose ranges that are not global.
    const NOT_GLOBAL: &[([u8; 4], u32)] = &[
        ([0, 0, 0, 0], 8),       // "this network", 0.0.0.0
        ([10, 0, 0, 0], 8),      // private
        ([100, 64, 0, 0], 10),   // shared address space (CGNAT)
        ([127, 0, 0, 0], 8),     // loopback
        ([169, 254, 0, 0], 16),  // link-local, cloud metadata
        ([172, 16, 0, 0], 12),   // private
        ([192, 0, 0, 0], 24),    // IETF protocol assignments
        ([192, 0, 2, 0], 24),    // documentation
        ([192, 88, 99, 0], 24),  // 6to4 relay anycast (deprecated)
        ([192, 168, 0, 0], 16),  // private
        ([198, 18, 0, 0], 15),   // benchmarking
        ([198, 51, 100, 0], 24), // documentation
        ([203, 0, 113, 0], 24),  // documentation
        ([224, 0, 0, 0], 4),     // multicast
        ([240, 0, 0, 0], 4),     // reserved, and broadcast
    ];
    let address = u32::from(ip);
    !NOT_GLOBAL.iter().any(|(network, prefix)| {
        let mask = u32::MAX << (32 - prefix);
        address & mask == u32::from_be_bytes(*network)
    })
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return is_public_v4(v4);
    }
    let address = u128::from(ip);
    let within = |network: u128, prefix: u32| address & (u128::MAX << (128 - prefix)) == network;
    // NAT64 (64:ff9b::/96): the IPv4 address in its last 32 bits.
    if within(0x0064_ff9b << 96, 96) {
        return is_public_v4(Ipv4Addr::from(address as u32));
    }
    // Global unicast is 2000::/3; inside it, these are not global.
    within(0x2 << 124, 3)
        && !within(0x2001 << 112, 23) // IETF protocol assignments: Teredo, ORCHID, …
        && !within(0x2001_0db8 << 96, 32) // documentation
        && !within(0x2002 << 112, 16) // 6to4 (any IPv4 inside, deprecated)
        && !within(0x3fff << 112, 20) // documentation
}

/// A subscription that passed every check.
#[derive(Debug, Clone)]
pub struct Subscription {
    /// The endpoint as parsed and written back (surrounding spaces gone, host in lower case, no
    /// default port): one URL is one device however it was spelled.
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
    /// Checks a subscription as a browser gave it, its endpoint against `policy`.
    pub fn parse(
        endpoint: &str,
        p256dh: &str,
        auth: &str,
        policy: &EndpointPolicy,
    ) -> Result<Self, Vec<Invalid>> {
        let mut problems = Vec::new();
        let endpoint = match parse_endpoint(endpoint, policy) {
            Ok(endpoint) => Some(endpoint),
            Err(message) => {
                problems.push(Invalid {
                    field: "endpoint",
                    message,
                });
                None
            }
        };
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
        match (endpoint, p256dh, auth) {
            (Some(endpoint), Some(p256dh), Some(auth)) => Ok(Self {
                endpoint,
                p256dh,
                auth,
            }),
            _ => Err(problems),
        }
    }
}

/// The endpoint as it is kept: parsed, checked, and written back in the parser's form.
fn parse_endpoint(endpoint: &str, policy: &EndpointPolicy) -> Result<String, &'static str> {
    const TOO_LONG: &str = "must be at most 2048 characters";
    if endpoint.trim().len() > ENDPOINT_MAX {
        return Err(TOO_LONG);
    }
    let mut url = url::Url::parse(endpoint).map_err(|_| "must be an absolute URL")?;
    policy.check(&url)?;
    // "push.example.com." is "push.example.com": one spelling, so one device.
    if let Some(url::Host::Domain(name)) = url.host() {
        if name.ends_with('.') {
            let name = host_name(name);
            url.set_host(Some(&name))
                .map_err(|_| "must be an absolute URL")?;
        }
    }
    let normalized = String::from(url);
    if normalized.len() > ENDPOINT_MAX {
        return Err(TOO_LONG);
    }
    Ok(normalized)
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
    /// Moving a device needs its keys: the endpoint URL alone proves nothing.
    #[error("this endpoint is registered to another account with other keys")]
    EndpointInUse,
    #[error("registrations of this endpoint are racing; retry")]
    Contended,
    #[error(transparent)]
    AccountErased(erased_users::AccountErased),
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
        let max_per_user = self.max_per_user;
        let subscription = subscription.clone();
        let (registered, _) = self
            .db
            .transaction(|tx| {
                async move {
                    // A device is a row of the user's: none may outlive an erasure.
                    if erased_users::guard(tx, user).await?.is_erased() {
                        return Err(DeviceError::AccountErased(erased_users::AccountErased));
                    }
                    Ok(storage::push::register(
                        tx,
                        user,
                        &subscription.endpoint,
                        &subscription.p256dh,
                        &subscription.auth,
                        max_per_user,
                    )
                    .await?)
                }
                .boxed()
            })
            .await?;
        match registered {
            Registered::Created(device) => Ok((device, true)),
            Registered::Existing(device) => Ok((device, false)),
            Registered::LimitReached => Err(DeviceError::LimitReached(self.max_per_user)),
            Registered::InUse => Err(DeviceError::EndpointInUse),
            Registered::Contended => Err(DeviceError::Contended),
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

    fn policy(allow_http_loopback: bool) -> EndpointPolicy {
        EndpointPolicy {
            allowed_hosts: AllowedHosts::parse(BROWSER_PUSH_SERVICES).unwrap(),
            allow_http_loopback,
        }
    }

    fn any_public_host() -> EndpointPolicy {
        EndpointPolicy {
            allowed_hosts: AllowedHosts::Any,
            allow_http_loopback: false,
        }
    }

    fn endpoint_of(endpoint: &str, policy: &EndpointPolicy) -> Result<String, &'static str> {
        parse_endpoint(endpoint, policy)
    }

    #[test]
    fn a_browsers_subscription_passes() {
        let parsed = Subscription::parse(
            "https://fcm.googleapis.com/fcm/send/abc",
            P256DH,
            AUTH,
            &policy(false),
        )
        .unwrap();
        assert_eq!(parsed.p256dh.len(), 65);
        assert_eq!(parsed.auth.len(), 16);
    }

    #[test]
    fn each_broken_field_is_named() {
        let problems =
            Subscription::parse("http://push.example.com/x", "AAAA", "short", &policy(false))
                .unwrap_err();
        let fields: Vec<_> = problems.iter().map(|p| p.field).collect();
        assert_eq!(fields, ["endpoint", "keys.p256dh", "keys.auth"]);
        // 65 bytes that are not a point on the curve.
        let not_a_point = encode(&[4u8; 65]);
        let fcm = "https://fcm.googleapis.com/fcm/send/x";
        assert!(Subscription::parse(fcm, &not_a_point, AUTH, &policy(false)).is_err());
        let with_password = "https://user:pw@fcm.googleapis.com/fcm/send/x";
        assert!(Subscription::parse(with_password, P256DH, AUTH, &policy(false)).is_err());
    }

    #[test]
    fn plain_http_only_to_loopback_and_only_when_allowed() {
        let local = "http://127.0.0.1:9/push/1";
        assert!(Subscription::parse(local, P256DH, AUTH, &policy(false)).is_err());
        assert!(Subscription::parse(local, P256DH, AUTH, &policy(true)).is_ok());
        for endpoint in ["http://[::1]:9/push/1", "http://localhost:9/push/1"] {
            assert!(endpoint_of(endpoint, &policy(true)).is_ok(), "{endpoint}");
            assert_eq!(endpoint_of(endpoint, &policy(false)), Err(INSIDE_NETWORK));
        }
        // Loopback only in its plain spellings, only over http, and nothing else private.
        for endpoint in [
            "http://10.0.0.1/push/1",
            "https://127.0.0.1:9/push/1",
            "https://localhost:9/push/1",
            "http://[::ffff:127.0.0.1]:9/push/1",
            "http://0.0.0.0:9/push/1",
        ] {
            assert!(endpoint_of(endpoint, &policy(true)).is_err(), "{endpoint}");
        }
    }

    #[test]
    fn endpoints_are_kept_in_one_spelling() {
        let fcm = "https://fcm.googleapis.com/fcm/send/abc";
        for spelling in [
            "  https://fcm.googleapis.com/fcm/send/abc \t",
            "HTTPS://FCM.googleapis.com:443/fcm/send/abc",
            "https://fcm.googleapis.com./fcm/send/abc",
        ] {
            let kept = endpoint_of(spelling, &policy(false));
            assert_eq!(kept.as_deref(), Ok(fcm), "{spelling:?}");
        }
    }

    #[test]
    fn endpoints_inside_the_network_are_refused_even_with_any_host_allowed() {
        for endpoint in [
            "https://169.254.169.254/latest/meta-data/",
            "https://10.1.2.3/x",
            "https://172.31.255.255/x",
            "https://192.168.1.1/x",
            "https://100.100.100.200/x",
            "https://0.0.0.0/x",
            "https://0x7f.1/x",
            "https://2130706433/x",
            "https://017700000001/x",
            "https://[::]/x",
            "https://[::1]/x",
            "https://[::ffff:10.0.0.1]/x",
            "https://[::ffff:169.254.169.254]/x",
            "https://[64:ff9b::a00:1]/x",
            "https://[fd00::1]/x",
            "https://[fe80::1]/x",
            "https://[ff02::1]/x",
            "https://[2001:db8::1]/x",
            "https://[2002:a00:1::]/x",
            "https://localhost/x",
            "https://push.localhost/x",
            "https://kafka/x",
            "https://kafka./x",
            "https://auth.taskstream.svc/x",
            "https://auth.taskstream.svc.cluster.local/x",
            "https://metadata.google.internal/x",
            "https://printer.local/x",
            "https://router.home.arpa/x",
        ] {
            assert_eq!(
                endpoint_of(endpoint, &any_public_host()),
                Err(INSIDE_NETWORK),
                "{endpoint}"
            );
        }
        // Public addresses and names pass when any public host is allowed (on port 443).
        for endpoint in [
            "https://8.8.8.8/x",
            "https://[2a00:1450:4001:82b::200a]/x",
            "https://[::ffff:8.8.8.8]/x",
            "https://[64:ff9b::808:808]/x",
            "https://push.example.com/x",
        ] {
            assert!(
                endpoint_of(endpoint, &any_public_host()).is_ok(),
                "{endpoint}"
            );
        }
        assert_eq!(
            endpoint_of("https://push.example.com:8443/x", &any_public_host()),
            Err(NOT_DEFAULT_PORT)
        );
    }

    #[test]
    fn only_browsers_push_services_by_default() {
        for endpoint in [
            "https://fcm.googleapis.com/fcm/send/abc",
            "https://updates.push.services.mozilla.com/wpush/v2/gAAAA",
            "https://web.push.apple.com/QGxk",
            "https://wns2-par02p.notify.windows.com/w/?token=BQYAAA",
        ] {
            assert!(endpoint_of(endpoint, &policy(false)).is_ok(), "{endpoint}");
        }
        for endpoint in [
            "https://push.apple.com/x",
            "https://notify.windows.com.attacker.example/x",
            "https://fcm.googleapis.com.attacker.example/x",
            "https://evilfcm.googleapis.com/x",
            "https://8.8.8.8/x",
        ] {
            assert_eq!(
                endpoint_of(endpoint, &policy(false)),
                Err(NOT_A_PUSH_SERVICE),
                "{endpoint}"
            );
        }
    }

    #[test]
    fn the_allowed_hosts_setting_is_checked() {
        assert_eq!(AllowedHosts::parse(" * "), Ok(AllowedHosts::Any));
        assert_eq!(
            AllowedHosts::parse("Push.Example.com., *.example.net"),
            Ok(AllowedHosts::Listed(vec![
                "push.example.com".to_owned(),
                "*.example.net".to_owned()
            ]))
        );
        for wrong in [
            "",
            "push",
            "10.0.0.1",
            "*.com.",
            "push.exa mple.com",
            "*",
            "**.a.b",
        ] {
            if wrong == "*" {
                continue;
            }
            assert!(AllowedHosts::parse(wrong).is_err(), "{wrong:?}");
        }
    }

    #[test]
    fn addresses_are_public_only_outside_every_special_range() {
        let public = [
            "1.1.1.1",
            "8.8.8.8",
            "142.250.185.74",
            "2a00:1450:4001:82b::200a",
        ];
        for ip in public {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
        let special = [
            "0.1.2.3",
            "10.255.255.255",
            "100.64.0.1",
            "100.127.255.255",
            "127.0.0.1",
            "169.254.169.254",
            "172.16.0.1",
            "172.31.255.255",
            "192.0.0.8",
            "192.0.2.1",
            "192.168.255.255",
            "198.18.0.1",
            "198.19.255.255",
            "198.51.100.7",
            "203.0.113.9",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "::ffff:192.168.0.1",
            "::10.0.0.1",
            "64:ff9b::7f00:1",
            "64:ff9b:1::1",
            "100::1",
            "2001::1",
            "2001:db8::1",
            "2002:c000:0204::1",
            "3fff::1",
            "fc00::1",
            "fdff:ffff::1",
            "fe80::1",
            "fec0::1",
            "ff02::1",
        ];
        for ip in special {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
        // Just outside the private ranges.
        for ip in [
            "11.0.0.1",
            "100.128.0.1",
            "172.32.0.1",
            "192.169.0.1",
            "223.255.255.255",
        ] {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn resolved_addresses_are_admitted_like_literals() {
        let loopback: IpAddr = "127.0.0.1".parse().unwrap();
        let private: IpAddr = "10.0.0.7".parse().unwrap();
        let public: IpAddr = "142.250.185.74".parse().unwrap();
        assert!(policy(false).admits_address(public));
        assert!(!policy(false).admits_address(loopback));
        assert!(!policy(false).admits_address(private));
        assert!(policy(true).admits_address(loopback));
        assert!(policy(true).admits_address("::1".parse().unwrap()));
        assert!(!policy(true).admits_address(private));
    }
}
