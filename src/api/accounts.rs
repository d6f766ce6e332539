//! Accounts, devices and access tokens, kept in the store's `accounts` table:
//!
//! - `user\0<user id>` → [`UserRecord`] (argon2 password hash, profile)
//! - `device\0<user id>\0<device id>` → [`DeviceRecord`]
//! - `token\0<access token>` → [`TokenRecord`]

use std::collections::HashMap;
use std::sync::Mutex;

use rand::Rng;
use ruma::{OwnedDeviceId, OwnedUserId, UserId};
use serde::{Deserialize, Serialize};

use super::error::{ApiError, ApiResult};
use super::passwords::Passwords;
use crate::store::{KeyRange, SharedStore, Table, WriteBatch};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserRecord {
    pub password_hash: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub displayname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avatar_url: Option<String>,
    /// The account was closed: it never logs in again, and its name stays taken.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deactivated: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub device_id: OwnedDeviceId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    pub access_token: String,
    #[serde(default)]
    pub last_seen_ts: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenRecord {
    pub user_id: OwnedUserId,
    pub device_id: OwnedDeviceId,
}

/// Who a request comes from, once its access token checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub user_id: OwnedUserId,
    pub device_id: OwnedDeviceId,
    pub access_token: String,
}

fn user_key(user: &UserId) -> Vec<u8> {
    format!("user\0{user}").into_bytes()
}
fn device_key(user: &UserId, device: &str) -> Vec<u8> {
    format!("device\0{user}\0{device}").into_bytes()
}
fn devices_prefix(user: &UserId) -> Vec<u8> {
    format!("device\0{user}\0").into_bytes()
}
fn token_key(token: &str) -> Vec<u8> {
    format!("token\0{token}").into_bytes()
}

fn random_string(len: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::thread_rng();
    (0..len)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect()
}

/// Localparts the spec allows for new users (historical ones may be wider).
pub fn check_localpart(localpart: &str) -> ApiResult<()> {
    if localpart.is_empty() || localpart.len() > 200 {
        return Err(ApiError::invalid_username(
            "user names are 1 to 200 characters",
        ));
    }
    if !localpart
        .bytes()
        .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'=' | b'-' | b'/' | b'+'))
    {
        return Err(ApiError::invalid_username(
            "user names may only contain a-z, 0-9, and . _ = - / +",
        ));
    }
    Ok(())
}

pub struct Accounts {
    store: SharedStore,
    /// Access token → session: every request checks its token, so keep them at hand.
    tokens: Mutex<HashMap<String, TokenRecord>>,
    /// Held from the check that a user id is free to the write that takes it. This API is the
    /// only writer of its store's accounts, so that makes creation atomic.
    creating: futures::lock::Mutex<()>,
    passwords: Passwords,
}

impl Accounts {
    pub fn new(store: SharedStore) -> Self {
        Self {
            store,
            tokens: Mutex::new(HashMap::new()),
            creating: futures::lock::Mutex::new(()),
            passwords: Passwords::new(),
        }
    }

    pub async fn user(&self, user: &UserId) -> ApiResult<Option<UserRecord>> {
        let Some(raw) = self.store.get(Table::Accounts, &user_key(user)).await? else {
            return Ok(None);
        };
        serde_json::from_slice(&raw)
            .map(Some)
            .map_err(|e| ApiError::unknown(format!("stored account is unreadable: {e}")))
    }

    pub async fn put_user(&self, user: &UserId, record: &UserRecord) -> ApiResult<()> {
        let mut batch = WriteBatch::new();
        batch.put(
            Table::Accounts,
            user_key(user),
            serde_json::to_vec(record).expect("record serialises"),
        );
        Ok(self.store.write(batch).await?)
    }

    /// Creates `user` with `password`; fails with `M_USER_IN_USE` if it exists, also when
    /// another request creates it at the same time.
    pub async fn create_user(&self, user: &UserId, password: &str) -> ApiResult<()> {
        if self.user(user).await?.is_some() {
            return Err(ApiError::user_in_use());
        }
        // Hashing is slow: outside the lock, so registrations of other names do not wait for it.
        let record = UserRecord {
            password_hash: self.passwords.hash(password).await?,
            displayname: Some(user.localpart().to_owned()),
            avatar_url: None,
            deactivated: false,
        };
        let _creating = self.creating.lock().await;
        if self.user(user).await?.is_some() {
            return Err(ApiError::user_in_use());
        }
        self.put_user(user, &record).await
    }

    /// Replaces the user's password.
    pub async fn set_password(&self, user: &UserId, password: &str) -> ApiResult<()> {
        let hash = self.passwords.hash(password).await?;
        let mut record = self
            .user(user)
            .await?
            .ok_or_else(|| ApiError::not_found("no such user"))?;
        record.password_hash = hash;
        self.put_user(user, &record).await
    }

    /// Closes the account: no password matches it any more; `erase` also drops its profile.
    pub async fn deactivate(&self, user: &UserId, erase: bool) -> ApiResult<()> {
        let mut record = self
            .user(user)
            .await?
            .ok_or_else(|| ApiError::not_found("no such user"))?;
        record.deactivated = true;
        record.password_hash = String::new();
        if erase {
            record.displayname = None;
            record.avatar_url = None;
        }
        self.put_user(user, &record).await
    }

    /// Whether `password` is the account's; an error means it could not be checked (say, too
    /// many checks are waiting).
    pub async fn password_matches(&self, record: &UserRecord, password: &str) -> ApiResult<bool> {
        self.passwords.verify(password, &record.password_hash).await
    }

    /// Starts a session on a new (or named) device and returns it.
    pub async fn login(
        &self,
        user: &UserId,
        device_id: Option<OwnedDeviceId>,
        display_name: Option<String>,
        now_ms: u64,
    ) -> ApiResult<Session> {
        let device_id = device_id.unwrap_or_else(|| random_string(10).into());
        let access_token = format!("hyphae_{}", random_string(32));
        let mut batch = WriteBatch::new();
        // Logging in again on a known device replaces its token.
        if let Some(old) = self.device(user, device_id.as_str()).await? {
            batch.delete(Table::Accounts, token_key(&old.access_token));
            self.tokens
                .lock()
                .expect("token cache")
                .remove(&old.access_token);
        }
        let device = DeviceRecord {
            device_id: device_id.clone(),
            display_name,
            access_token: access_token.clone(),
            last_seen_ts: now_ms,
        };
        let token = TokenRecord {
            user_id: user.to_owned(),
            device_id: device_id.clone(),
        };
        batch.put(
            Table::Accounts,
            device_key(user, device_id.as_str()),
            serde_json::to_vec(&device).expect("record serialises"),
        );
        batch.put(
            Table::Accounts,
            token_key(&access_token),
            serde_json::to_vec(&token).expect("record serialises"),
        );
        self.store.write(batch).await?;
        Ok(Session {
            user_id: user.to_owned(),
            device_id,
            access_token,
        })
    }

    /// The session an access token belongs to.
    pub async fn authenticate(&self, access_token: &str) -> ApiResult<Session> {
        let cached = self
            .tokens
            .lock()
            .expect("token cache")
            .get(access_token)
            .cloned();
        let record = match cached {
            Some(r) => r,
            None => {
                let raw = self
                    .store
                    .get(Table::Accounts, &token_key(access_token))
                    .await?
                    .ok_or_else(ApiError::unknown_token)?;
                let record: TokenRecord = serde_json::from_slice(&raw)
                    .map_err(|e| ApiError::unknown(format!("stored token: {e}")))?;
                self.tokens
                    .lock()
                    .expect("token cache")
                    .insert(access_token.to_owned(), record.clone());
                record
            }
        };
        Ok(Session {
            user_id: record.user_id,
            device_id: record.device_id,
            access_token: access_token.to_owned(),
        })
    }

    pub async fn device(&self, user: &UserId, device: &str) -> ApiResult<Option<DeviceRecord>> {
        let Some(raw) = self
            .store
            .get(Table::Accounts, &device_key(user, device))
            .await?
        else {
            return Ok(None);
        };
        serde_json::from_slice(&raw)
            .map(Some)
            .map_err(|e| ApiError::unknown(format!("stored device: {e}")))
    }

    pub async fn devices(&self, user: &UserId) -> ApiResult<Vec<DeviceRecord>> {
        let prefix = devices_prefix(user);
        let entries = self
            .store
            .scan(
                Table::Accounts,
                KeyRange::prefix(&prefix),
                crate::store::Direction::Forward,
                usize::MAX,
            )
            .await?;
        entries
            .into_iter()
            .map(|(_, v)| {
                serde_json::from_slice(&v)
                    .map_err(|e| ApiError::unknown(format!("stored device: {e}")))
            })
            .collect()
    }

    pub async fn rename_device(
        &self,
        user: &UserId,
        device: &str,
        display_name: Option<String>,
    ) -> ApiResult<()> {
        let mut record = self
            .device(user, device)
            .await?
            .ok_or_else(|| ApiError::not_found("no such device"))?;
        record.display_name = display_name;
        let mut batch = WriteBatch::new();
        batch.put(
            Table::Accounts,
            device_key(user, device),
            serde_json::to_vec(&record).expect("record serialises"),
        );
        Ok(self.store.write(batch).await?)
    }

    /// Ends the sessions of `devices` (their tokens stop working at once).
    pub async fn remove_devices(&self, user: &UserId, devices: &[DeviceRecord]) -> ApiResult<()> {
        let mut batch = WriteBatch::new();
        for d in devices {
            batch.delete(Table::Accounts, device_key(user, d.device_id.as_str()));
            batch.delete(Table::Accounts, token_key(&d.access_token));
        }
        self.store.write(batch).await?;
        let mut cache = self.tokens.lock().expect("token cache");
        for d in devices {
            cache.remove(&d.access_token);
        }
        Ok(())
    }
}
