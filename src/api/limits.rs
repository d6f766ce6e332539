//! Limits the API keeps in memory: failed password attempts per account, and one request at a
//! time per client transaction id.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ruma::{OwnedUserId, UserId};

use super::error::{ApiError, ApiResult};
use crate::net::rt::{Duration, Instant};

/// Failed password attempts allowed per account per window.
pub const MAX_FAILED_LOGINS: u32 = 10;
/// The window those failures are counted in, from the first of them.
pub const FAILED_LOGIN_WINDOW: Duration = Duration::from_secs(60);
/// Accounts with counters kept before the expired ones are dropped.
const MAX_TRACKED: usize = 10_000;

/// Counts password attempts per account. An attempt counts *before* its password is checked
/// and stays counted unless it succeeds, so a burst of concurrent guesses gets no more checks
/// than the limit.
#[derive(Default)]
pub struct LoginLimiter {
    /// Account → start of its window, attempts counted in it (failed or still running).
    counted: Mutex<HashMap<OwnedUserId, (Instant, u32)>>,
}

/// One counted attempt: it stays counted (as a failure) when dropped, unless
/// [`LoginAttempt::uncount`] is called because the password proved right or was never checked.
pub struct LoginAttempt<'a> {
    limiter: &'a LoginLimiter,
    user: OwnedUserId,
    window: Instant,
}

impl LoginLimiter {
    /// Counts an attempt for `user`, or answers `M_LIMIT_EXCEEDED` (with when to retry) if the
    /// account has used up its attempts for this window.
    pub fn begin(&self, user: &UserId) -> ApiResult<LoginAttempt<'_>> {
        let mut counted = self.counted.lock().expect("login limiter");
        if counted.len() >= MAX_TRACKED {
            counted.retain(|_, (since, _)| since.elapsed() < FAILED_LOGIN_WINDOW);
        }
        let entry = counted
            .entry(user.to_owned())
            .or_insert((Instant::now(), 0));
        let elapsed = entry.0.elapsed();
        if elapsed >= FAILED_LOGIN_WINDOW {
            *entry = (Instant::now(), 0);
        } else if entry.1 >= MAX_FAILED_LOGINS {
            let wait = FAILED_LOGIN_WINDOW - elapsed;
            return Err(ApiError::limit_exceeded(wait.as_millis().max(1) as u64));
        }
        entry.1 += 1;
        Ok(LoginAttempt {
            limiter: self,
            user: user.to_owned(),
            window: entry.0,
        })
    }
}

impl LoginAttempt<'_> {
    /// Takes the attempt back: the password was right, or it was never checked.
    pub fn uncount(self) {
        let mut counted = self.limiter.counted.lock().expect("login limiter");
        if let Some((since, n)) = counted.get_mut(&self.user) {
            // (A window that started over since this attempt began does not hold it.)
            if *since == self.window {
                *n = n.saturating_sub(1);
            }
        }
    }
}

/// One holder at a time per key; waiters queue. Entries live only while someone holds or
/// waits for them. A guard owns its hold, so it can outlive the request that took it (a send
/// that goes on after its client hung up keeps its transaction until it is durable).
#[derive(Default)]
pub struct KeyedLocks {
    held: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
}

pub struct KeyedGuard {
    held: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
    key: String,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl KeyedLocks {
    pub async fn lock(&self, key: String) -> KeyedGuard {
        let lock = self
            .held
            .lock()
            .expect("keyed locks")
            .entry(key.clone())
            .or_default()
            .clone();
        let guard = lock.lock_owned().await;
        KeyedGuard {
            held: self.held.clone(),
            key,
            guard: Some(guard),
        }
    }
}

impl Drop for KeyedGuard {
    fn drop(&mut self) {
        let mut held = self.held.lock().expect("keyed locks");
        drop(self.guard.take());
        // Waiters hold a clone of the lock: when only the map's is left, nobody wants it.
        if held
            .get(&self.key)
            .is_some_and(|l| Arc::strong_count(l) == 1)
        {
            held.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alice() -> OwnedUserId {
        "@alice:example.org".try_into().unwrap()
    }

    #[test]
    fn attempts_count_until_they_succeed() {
        let limiter = LoginLimiter::default();
        let running: Vec<_> = (0..MAX_FAILED_LOGINS)
            .map(|_| limiter.begin(&alice()).unwrap())
            .collect();
        let refused = limiter.begin(&alice()).err().expect("over the limit");
        assert_eq!(refused.errcode, "M_LIMIT_EXCEEDED");
        assert!(refused.retry_after_ms.is_some_and(|ms| ms > 0));
        // One that succeeds gives its attempt back; failures keep theirs.
        let mut running = running.into_iter();
        running.next().unwrap().uncount();
        drop(running);
        limiter.begin(&alice()).unwrap();
        assert!(limiter.begin(&alice()).is_err());
        let bob: OwnedUserId = "@bob:example.org".try_into().unwrap();
        limiter.begin(&bob).unwrap().uncount();
    }

    #[test]
    fn keyed_locks_serialise_one_key_and_forget_it_after() {
        futures::executor::block_on(async {
            let locks = KeyedLocks::default();
            let first = locks.lock("a".into()).await;
            let _other = locks.lock("b".into()).await;
            let second = locks.lock("a".into());
            futures::pin_mut!(second);
            assert!(futures::poll!(second.as_mut()).is_pending());
            drop(first);
            drop(second.await);
            assert!(!locks.held.lock().unwrap().contains_key("a"));
        });
    }
}
