//! The Ed25519 keys auth signs access tokens with, and the JWKS that publishes their public
//! halves.
//!
//! Keys live in a folder (a Kubernetes Secret mounted as a volume), one PKCS#8 PEM file per key,
//! named `<key-id>.pem`; `openssl genpkey -algorithm ed25519` or `auth keygen` makes one. Every
//! key in the folder is published, and the one named by `AUTH_JWT_ACTIVE_KEY_ID` signs. Rotation
//! is: add the new key and deploy (verifiers learn it), make it active and deploy, remove the old
//! one once the last token it signed has expired.

use std::path::{Path, PathBuf};

use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey, KeypairBytes};
use ed25519_dalek::SigningKey;
use jsonwebtoken::jwk::{Jwk, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use service_kit::access_token::AccessClaims;

/// The keys found in the folder.
pub struct SigningKeys {
    active_key_id: String,
    active: EncodingKey,
    published: JwkSet,
}

impl SigningKeys {
    /// Reads every `*.pem` in `dir`; fails with a message fit for an operator.
    pub fn load(dir: &Path, active_key_id: &str) -> Result<Self, String> {
        let entries = std::fs::read_dir(dir).map_err(|err| format!("cannot read it: {err}"))?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "pem"))
            .collect();
        files.sort();
        let mut published = JwkSet { keys: Vec::new() };
        let mut active = None;
        for file in files {
            let key_id = file
                .file_stem()
                .and_then(|stem| stem.to_str())
                .filter(|stem| valid_key_id(stem))
                .ok_or_else(|| {
                    format!(
                        "{}: key file names must be <key-id>.pem with a key id of letters, digits, '.', '_' or '-'",
                        file.display()
                    )
                })?
                .to_owned();
            let pem = std::fs::read_to_string(&file)
                .map_err(|err| format!("{}: {err}", file.display()))?;
            let signing = SigningKey::from_pkcs8_pem(&pem).map_err(|_| {
                format!(
                    "{}: not an Ed25519 private key in PKCS#8 PEM",
                    file.display()
                )
            })?;
            let encoding = encoding_key(&signing)?;
            let mut jwk = Jwk::from_encoding_key(&encoding, Algorithm::EdDSA)
                .map_err(|err| format!("{}: {err}", file.display()))?;
            jwk.common.key_id = Some(key_id.clone());
            jwk.common.public_key_use = Some(PublicKeyUse::Signature);
            published.keys.push(jwk);
            if key_id == active_key_id {
                active = Some(encoding);
            }
        }
        if published.keys.is_empty() {
            return Err("it holds no <key-id>.pem files".to_owned());
        }
        let active = active.ok_or_else(|| {
            format!("it holds no {active_key_id}.pem for AUTH_JWT_ACTIVE_KEY_ID={active_key_id}")
        })?;
        Ok(Self {
            active_key_id: active_key_id.to_owned(),
            active,
            published,
        })
    }

    /// Signs `claims` with the active key, naming it in the header.
    pub fn sign(&self, claims: &AccessClaims) -> Result<String, jsonwebtoken::errors::Error> {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.active_key_id.clone());
        jsonwebtoken::encode(&header, claims, &self.active)
    }

    /// The public keys, as served at `/v1/auth/jwks`.
    pub fn jwks(&self) -> &JwkSet {
        &self.published
    }
}

/// jsonwebtoken wants PKCS#8 v1 (private key only); files may be v1 or v2.
fn encoding_key(signing: &SigningKey) -> Result<EncodingKey, String> {
    let der = KeypairBytes {
        secret_key: signing.to_bytes(),
        public_key: None,
    }
    .to_pkcs8_der()
    .map_err(|err| err.to_string())?;
    Ok(EncodingKey::from_ed_der(der.as_bytes()))
}

fn valid_key_id(key_id: &str) -> bool {
    (1..=64).contains(&key_id.len())
        && key_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// `auth keygen <dir> <key-id>`: writes a new key to `<dir>/<key-id>.pem` (owner-only), never
/// over an existing file.
pub fn generate(dir: &Path, key_id: &str) -> Result<PathBuf, String> {
    if !valid_key_id(key_id) {
        return Err(format!(
            "key id {key_id:?}: use 1-64 letters, digits, '.', '_' or '-'"
        ));
    }
    let signing = SigningKey::generate(&mut rand_core::OsRng);
    let pem = KeypairBytes {
        secret_key: signing.to_bytes(),
        public_key: None,
    }
    .to_pkcs8_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF)
    .map_err(|err| err.to_string())?;
    std::fs::create_dir_all(dir).map_err(|err| format!("{}: {err}", dir.display()))?;
    let path = dir.join(format!("{key_id}.pem"));
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|err| format!("{}: {err}", path.display()))?;
    file.write_all(pem.as_bytes())
        .map_err(|err| format!("{}: {err}", path.display()))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(label: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "auth-keys-{label}-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn publishes_every_key_and_signs_with_the_active_one() {
        let dir = scratch("publish");
        generate(&dir, "2026-01").unwrap();
        generate(&dir, "2026-02").unwrap();
        let keys = SigningKeys::load(&dir, "2026-02").unwrap();
        let kids: Vec<_> = keys
            .jwks()
            .keys
            .iter()
            .map(|jwk| jwk.common.key_id.clone().unwrap())
            .collect();
        assert_eq!(kids, ["2026-01", "2026-02"]);

        let claims = AccessClaims {
            sub: uuid::Uuid::new_v4(),
            iss: "i".into(),
            aud: "a".into(),
            iat: 0,
            exp: i64::MAX / 2,
            jti: uuid::Uuid::new_v4(),
            sid: Some(uuid::Uuid::new_v4()),
        };
        let token = keys.sign(&claims).unwrap();
        let header = jsonwebtoken::decode_header(&token).unwrap();
        assert_eq!(header.kid.as_deref(), Some("2026-02"));
        let key = jsonwebtoken::DecodingKey::from_jwk(&keys.jwks().keys[1]).unwrap();
        let mut validation = jsonwebtoken::Validation::new(Algorithm::EdDSA);
        validation.set_audience(&["a"]);
        let decoded = jsonwebtoken::decode::<AccessClaims>(&token, &key, &validation).unwrap();
        assert_eq!(decoded.claims, claims);
    }

    #[test]
    fn explains_what_is_wrong_with_the_folder() {
        let empty = scratch("empty");
        assert_eq!(
            SigningKeys::load(&empty, "k").err().unwrap(),
            "it holds no <key-id>.pem files"
        );
        generate(&empty, "k1").unwrap();
        assert!(SigningKeys::load(&empty, "k2")
            .err()
            .unwrap()
            .contains("no k2.pem"));
        std::fs::write(empty.join("broken.pem"), "not a key").unwrap();
        assert!(SigningKeys::load(&empty, "k1")
            .err()
            .unwrap()
            .contains("broken.pem: not an Ed25519 private key"));
        assert!(SigningKeys::load(&empty.join("missing"), "k1")
            .err()
            .unwrap()
            .starts_with("cannot read it"));
    }

    #[test]
    fn keygen_never_overwrites_and_checks_the_key_id() {
        let dir = scratch("keygen");
        generate(&dir, "k1").unwrap();
        assert!(generate(&dir, "k1").is_err());
        assert!(generate(&dir, "../escape").is_err());
    }
}
