//! Password hashing with argon2id on bounded worker pools.
//!
//! Each hash costs ~19 MiB and tens of milliseconds of CPU, so hashes run on a few low-priority
//! threads behind a bounded queue: a login storm queues up to a limit and is then refused with
//! 503, while other requests keep being served. New passwords (signup) are hashed on a pool of
//! their own, so a signup flood fills that pool's queue, never the one logins wait in.

use std::sync::Arc;

use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::{Algorithm, Argon2, Params, Version};
use service_kit::workers::WorkerPool;

use super::AuthError;

/// OWASP's argon2id recommendation: 19 MiB, 2 passes, 1 lane.
const MEMORY_KIB: u32 = 19 * 1024;
const PASSES: u32 = 2;
const LANES: u32 = 1;
/// Hash threads yield the CPU to request handling when both want it.
const WORKER_NICENESS: i32 = 10;

pub struct Passwords {
    /// Verifications: login, account deletion.
    pool: WorkerPool,
    /// New hashes: signup.
    signup_pool: WorkerPool,
    argon2: Argon2<'static>,
    /// A real hash of a random password: an unknown username is checked against it, so that
    /// answering "no such user" costs as much as a wrong password.
    decoy: Arc<str>,
}

impl Passwords {
    /// `workers` threads (and `queue` waiting) verify; `signup_workers` (and `signup_queue`)
    /// hash new passwords.
    pub fn start(
        workers: usize,
        queue: usize,
        signup_workers: usize,
        signup_queue: usize,
    ) -> Result<Self, String> {
        let params = Params::new(MEMORY_KIB, PASSES, LANES, None).map_err(|err| err.to_string())?;
        let argon2 = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
        let decoy = argon2
            .hash_password(uuid::Uuid::new_v4().as_bytes())
            .map_err(|err| err.to_string())?
            .to_string();
        let pool = WorkerPool::start("password", workers, queue, WORKER_NICENESS)
            .map_err(|err| format!("cannot start password workers: {err}"))?;
        let signup_pool = WorkerPool::start(
            "password-signup",
            signup_workers,
            signup_queue,
            WORKER_NICENESS,
        )
        .map_err(|err| format!("cannot start signup password workers: {err}"))?;
        Ok(Self {
            pool,
            signup_pool,
            argon2,
            decoy: decoy.into(),
        })
    }

    /// A PHC string (`$argon2id$v=19$m=19456,t=2,p=1$...`) with a fresh salt.
    pub async fn hash(&self, password: String) -> Result<String, AuthError> {
        let argon2 = self.argon2.clone();
        self.signup_pool
            .run(move || {
                argon2
                    .hash_password(password.as_bytes())
                    .map(|h| h.to_string())
            })
            .await?
            .map_err(|err| AuthError::Hashing(err.to_string()))
    }

    /// Whether `password` matches `stored`; with no stored hash (unknown user) it does the same
    /// work against the decoy and answers false.
    pub async fn verify(
        &self,
        password: String,
        stored: Option<String>,
    ) -> Result<bool, AuthError> {
        let argon2 = self.argon2.clone();
        let decoy = self.decoy.clone();
        self.pool
            .run(move || match stored {
                Some(hash) => argon2
                    .verify_password(password.as_bytes(), hash.as_str())
                    .is_ok(),
                None => {
                    let _ = argon2.verify_password(password.as_bytes(), &*decoy);
                    false
                }
            })
            .await
            .map_err(AuthError::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hashes_verify_and_are_salted() {
        let passwords = Passwords::start(1, 4, 1, 4).unwrap();
        let first = passwords.hash("correct horse".into()).await.unwrap();
        let second = passwords.hash("correct horse".into()).await.unwrap();
        assert!(
            first.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{first}"
        );
        assert_ne!(first, second, "each hash has its own salt");
        assert!(passwords
            .verify("correct horse".into(), Some(first.clone()))
            .await
            .unwrap());
        assert!(!passwords
            .verify("wrong horse".into(), Some(first))
            .await
            .unwrap());
        assert!(!passwords.verify("anything".into(), None).await.unwrap());
        // An unknown user is checked against a hash as costly as a real one.
        assert!(
            passwords
                .decoy
                .starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{}",
            passwords.decoy
        );
    }
}
