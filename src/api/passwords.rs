//! Password hashing and verification (argon2id, 19 MiB and two passes each), bounded so that a
//! flood of logins or registrations cannot stall the node: natively the work runs on tokio's
//! blocking threads, at most one per core at once; in the tab (one thread) it runs inline, one
//! at a time. Past [`QUEUED_PER_WORKER`] waiting per worker, requests are refused with
//! `M_LIMIT_EXCEEDED` instead of queueing without end.

use std::sync::Arc;

use argon2::password_hash::{
    rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString,
};
use argon2::Argon2;
use tokio::sync::Semaphore;

use super::error::{ApiError, ApiResult};

/// Password checks that may wait for a free worker, per worker.
pub const QUEUED_PER_WORKER: usize = 16;
/// What a client refused for a full queue is told to wait.
pub const RETRY_AFTER_MS: u64 = 1000;

pub struct Passwords {
    /// Checks running or waiting; a full one refuses more.
    admitted: Arc<Semaphore>,
    /// Checks running.
    running: Arc<Semaphore>,
}

impl Default for Passwords {
    fn default() -> Self {
        Self::new()
    }
}

impl Passwords {
    pub fn new() -> Self {
        #[cfg(not(target_arch = "wasm32"))]
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
        #[cfg(target_arch = "wasm32")]
        let workers = 1;
        Self {
            admitted: Arc::new(Semaphore::new(workers * (1 + QUEUED_PER_WORKER))),
            running: Arc::new(Semaphore::new(workers)),
        }
    }

    /// A new argon2 hash (PHC string) of `password`.
    pub async fn hash(&self, password: &str) -> ApiResult<String> {
        let password = password.to_owned();
        self.run(move || {
            let salt = SaltString::generate(&mut OsRng);
            Argon2::default()
                .hash_password(password.as_bytes(), &salt)
                .map(|h| h.to_string())
                .map_err(|e| ApiError::unknown(format!("password hashing: {e}")))
        })
        .await?
    }

    /// Whether `password` matches the stored `hash`.
    pub async fn verify(&self, password: &str, hash: &str) -> ApiResult<bool> {
        // A malformed stored hash is the server's fault, not a wrong password.
        PasswordHash::new(hash)
            .map_err(|e| ApiError::unknown(format!("stored password hash: {e}")))?;
        let (password, hash) = (password.to_owned(), hash.to_owned());
        self.run(move || {
            let hash = PasswordHash::new(&hash).expect("checked above");
            Argon2::default()
                .verify_password(password.as_bytes(), &hash)
                .is_ok()
        })
        .await
    }

    /// Runs `work` once a worker is free, or refuses at once if too many are waiting.
    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> ApiResult<T> {
        let admitted = self
            .admitted
            .clone()
            .try_acquire_owned()
            .map_err(|_| ApiError::limit_exceeded(RETRY_AFTER_MS))?;
        let running = self
            .running
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ApiError::unknown("password checks have stopped"))?;
        #[cfg(not(target_arch = "wasm32"))]
        {
            // The permits go with the work: a client that hangs up does not free a worker
            // that is still hashing.
            tokio::task::spawn_blocking(move || {
                let _permits = (admitted, running);
                work()
            })
            .await
            .map_err(|e| ApiError::unknown(format!("password check failed: {e}")))
        }
        #[cfg(target_arch = "wasm32")]
        {
            let _permits = (admitted, running);
            Ok(work())
        }
    }
}
