//! What end-to-end encryption needs kept, in the `client_data` table beside the rest of
//! [`UserData`]:
//!
//! - `fallback\0<user>\0<device>\0<algorithm>` → `{"key_id", "key", "used"}` the fallback key
//! - `devchange\0<pos>` → a user whose devices or keys changed at client-data position `pos`
//! - `outbox\0<server>\0<pos>` → to-device messages for another server, until it takes them
//! - `todevin\0<server>` → the last `seq` of to-device messages taken from that server
//! - `xsign\0<user>\0<usage>` → the user's cross-signing key for `master`, `self_signing`,
//!   `user_signing`
//! - `usersig\0<signer>\0<user>` → `{"key", "key_id", "signature"}`: the signer's signature
//!   (by their user-signing key) of that user's master key `key`, shown to the signer alone
//! - `backup\0<user>\0<version>` → `{"algorithm", "auth_data", "etag"}`; `backupkey\0<user>\0
//!   <version>\0<room>\0<session>` → the session's backed-up key; `backupver\0<user>` → the last
//!   version made

use ruma::{OwnedUserId, UserId};
use serde_json::{json, Value};

use super::error::{ApiError, ApiResult};
use super::user_data::{decode, key, prefix, UserData};
use crate::identity::ServerName;
use crate::store::{Direction, KeyRange, Table};

/// One queued batch of to-device messages for a server.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Outgoing {
    pub sender: OwnedUserId,
    pub kind: String,
    /// `{user: {device or "*": content}}` for that server's users.
    pub messages: Value,
}

fn pos_key(parts: &[&str], pos: u64) -> Vec<u8> {
    let mut k = prefix(parts);
    k.extend_from_slice(&pos.to_be_bytes());
    k
}

fn pos_of(k: &[u8], prefix_len: usize) -> u64 {
    k.get(prefix_len..prefix_len + 8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

impl UserData {
    /// Stores a fallback key for the device (replacing the last one for that algorithm).
    pub async fn put_fallback_key(
        &self,
        user: &UserId,
        device: &str,
        key_id: &str,
        value: &Value,
    ) -> ApiResult<()> {
        let algorithm = key_id.split(':').next().unwrap_or_default();
        let record = json!({"key_id": key_id, "key": value, "used": false});
        self.put_value(
            key(&["fallback", user.as_str(), device, algorithm]),
            &record,
        )
        .await
    }

    /// The fallback key of `algorithm` for a device, marked used (it stays until replaced).
    pub async fn use_fallback_key(
        &self,
        user: &UserId,
        device: &str,
        algorithm: &str,
    ) -> ApiResult<Option<(String, Value)>> {
        let k = key(&["fallback", user.as_str(), device, algorithm]);
        let Some(mut record) = self.get(&k).await? else {
            return Ok(None);
        };
        let found = (
            record["key_id"].as_str().unwrap_or_default().to_owned(),
            record["key"].clone(),
        );
        if record["used"] != true {
            record["used"] = true.into();
            self.put_value(k, &record).await?;
        }
        Ok(Some(found))
    }

    /// Algorithms of the device's fallback keys not claimed yet.
    pub async fn unused_fallback_key_types(
        &self,
        user: &UserId,
        device: &str,
    ) -> ApiResult<Vec<String>> {
        let p = prefix(&["fallback", user.as_str(), device]);
        let mut out = Vec::new();
        for (k, v) in self.scan(&p).await? {
            if decode(&v)?["used"] != true {
                out.push(String::from_utf8_lossy(&k[p.len()..]).into_owned());
            }
        }
        Ok(out)
    }

    /// Forgets everything kept for a device's keys (it was deleted).
    pub async fn delete_device_keys(&self, user: &UserId, device: &str) -> ApiResult<()> {
        let mut doomed = Vec::new();
        for p in [
            key(&["keys", user.as_str(), device]),
            prefix(&["otk", user.as_str(), device]),
            prefix(&["fallback", user.as_str(), device]),
        ] {
            doomed.extend(self.scan(&p).await?.into_iter().map(|(k, _)| k));
        }
        self.write_at(|_, b| {
            for k in doomed {
                b.delete(Table::ClientData, k);
            }
        })
        .await?;
        Ok(())
    }

    /// Records that `user`'s devices or keys changed; returns the position it was noted at.
    pub async fn note_device_change(&self, user: &UserId) -> ApiResult<u64> {
        self.write_at(|pos, b| {
            b.put(
                Table::ClientData,
                pos_key(&["devchange"], pos),
                user.as_str(),
            )
        })
        .await
    }

    /// Users whose devices changed at positions in `from..until`.
    pub async fn device_changes(&self, from: u64, until: u64) -> ApiResult<Vec<OwnedUserId>> {
        let p = prefix(&["devchange"]);
        let range = KeyRange {
            start: std::ops::Bound::Included(pos_key(&["devchange"], from)),
            end: std::ops::Bound::Excluded(pos_key(&["devchange"], until)),
        };
        let mut users: Vec<OwnedUserId> = self
            .store
            .scan(Table::ClientData, range, Direction::Forward, usize::MAX)
            .await?
            .into_iter()
            .filter(|(k, _)| k.starts_with(&p))
            .filter_map(|(_, v)| OwnedUserId::try_from(String::from_utf8(v).ok()?).ok())
            .collect();
        users.sort();
        users.dedup();
        Ok(users)
    }

    /// Queues to-device messages for other servers, durably, in one write.
    pub async fn queue_outgoing(&self, batches: Vec<(ServerName, Outgoing)>) -> ApiResult<()> {
        self.write_at(|pos, b| {
            for (i, (server, out)) in batches.iter().enumerate() {
                // One position per write; the index keeps batches of one write apart.
                let mut k = pos_key(&["outbox", &server.to_string()], pos);
                k.extend_from_slice(&(i as u32).to_be_bytes());
                b.put(
                    Table::ClientData,
                    k,
                    serde_json::to_vec(out).expect("serialises"),
                );
            }
        })
        .await?;
        Ok(())
    }

    /// The oldest queued to-device batch for `server`: its key (to delete once taken), a
    /// sequence number that grows with every batch, and the batch.
    pub async fn next_outgoing(
        &self,
        server: &ServerName,
    ) -> ApiResult<Option<(Vec<u8>, u64, Outgoing)>> {
        let p = prefix(&["outbox", &server.to_string()]);
        let first = self
            .store
            .scan(
                Table::ClientData,
                KeyRange::prefix(&p),
                Direction::Forward,
                1,
            )
            .await?;
        let Some((k, v)) = first.into_iter().next() else {
            return Ok(None);
        };
        let pos = pos_of(&k, p.len());
        let index = k
            .get(p.len() + 8..p.len() + 12)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_be_bytes)
            .unwrap_or(0);
        let out: Outgoing = serde_json::from_slice(&v)
            .map_err(|e| ApiError::unknown(format!("stored to-device batch: {e}")))?;
        // Positions are below 2^40 for any store's life; the index takes the low bits.
        Ok(Some((k, (pos << 20) | u64::from(index), out)))
    }

    /// Servers with to-device messages waiting: one lookup per server, however many wait.
    pub async fn outgoing_servers(&self) -> ApiResult<Vec<ServerName>> {
        let p = prefix(&["outbox"]);
        let mut servers = Vec::new();
        let mut from = std::ops::Bound::Included(p.clone());
        loop {
            let range = KeyRange {
                start: from,
                end: KeyRange::prefix(&p).end,
            };
            let first = self
                .store
                .scan(Table::ClientData, range, Direction::Forward, 1)
                .await?;
            let Some((k, _)) = first.into_iter().next() else {
                return Ok(servers);
            };
            let rest = &k[p.len()..];
            let name = rest
                .iter()
                .position(|b| *b == 0)
                .and_then(|end| std::str::from_utf8(&rest[..end]).ok());
            let Some(name) = name else {
                return Err(ApiError::unknown("outbox key without a server"));
            };
            if let Ok(server) = name.parse() {
                servers.push(server);
            }
            // Past every key of this server: its prefix with the separator bumped.
            let mut next = prefix(&["outbox", name]);
            *next.last_mut().expect("not empty") += 1;
            from = std::ops::Bound::Included(next);
        }
    }

    /// How many batches wait for `server`, counting up to `limit`.
    pub async fn outgoing_count(&self, server: &ServerName, limit: usize) -> ApiResult<usize> {
        let p = prefix(&["outbox", &server.to_string()]);
        Ok(self
            .store
            .scan(
                Table::ClientData,
                KeyRange::prefix(&p),
                Direction::Forward,
                limit,
            )
            .await?
            .len())
    }

    pub async fn drop_outgoing(&self, k: Vec<u8>) -> ApiResult<()> {
        let mut batch = crate::store::WriteBatch::new();
        batch.delete(Table::ClientData, k);
        Ok(self.store.write(batch).await?)
    }

    /// Takes to-device messages from `server` if `seq` is newer than the last taken from it:
    /// the messages and the new `seq` in one write. Returns whether they were taken.
    pub async fn take_incoming(
        &self,
        server: &ServerName,
        seq: u64,
        messages: Vec<(OwnedUserId, String, Value)>,
    ) -> ApiResult<bool> {
        let seq_key = key(&["todevin", &server.to_string()]);
        // One taker at a time per store: the check and the write must not interleave.
        let _turn = self.incoming.lock().await;
        let last = self
            .get(&seq_key)
            .await?
            .and_then(|v| v.as_u64())
            .unwrap_or(0);
        if seq <= last {
            return Ok(false);
        }
        self.write_at(|pos, b| {
            for (i, (user, device, msg)) in messages.into_iter().enumerate() {
                let mut k = prefix(&["todev", user.as_str(), &device]);
                k.extend_from_slice(&pos.to_be_bytes());
                k.extend_from_slice(&(i as u32).to_be_bytes());
                b.put(Table::ClientData, k, msg.to_string());
            }
            b.put(Table::ClientData, seq_key, seq.to_string());
        })
        .await?;
        Ok(true)
    }

    pub async fn put_cross_signing_key(
        &self,
        user: &UserId,
        usage: &str,
        value: &Value,
    ) -> ApiResult<()> {
        self.put_value(key(&["xsign", user.as_str(), usage]), value)
            .await
    }

    /// Forgets the user's cross-signing keys (the account is closed).
    pub async fn delete_cross_signing_keys(&self, user: &UserId) -> ApiResult<()> {
        self.write_at(|_, b| {
            for usage in ["master", "self_signing", "user_signing"] {
                b.delete(Table::ClientData, key(&["xsign", user.as_str(), usage]));
            }
        })
        .await?;
        Ok(())
    }

    pub async fn cross_signing_key(&self, user: &UserId, usage: &str) -> ApiResult<Option<Value>> {
        self.get(&key(&["xsign", user.as_str(), usage])).await
    }

    pub async fn put_user_signature(
        &self,
        signer: &UserId,
        user: &UserId,
        record: &Value,
    ) -> ApiResult<()> {
        self.put_value(key(&["usersig", signer.as_str(), user.as_str()]), record)
            .await
    }

    pub async fn user_signature(&self, signer: &UserId, user: &UserId) -> ApiResult<Option<Value>> {
        self.get(&key(&["usersig", signer.as_str(), user.as_str()]))
            .await
    }

    /// The newest key-backup version of `user` that is not deleted: (version, record).
    pub async fn backup_version(
        &self,
        user: &UserId,
        version: Option<&str>,
    ) -> ApiResult<Option<(String, Value)>> {
        let version = match version {
            Some(v) => v.to_owned(),
            None => match self.get(&key(&["backupver", user.as_str()])).await? {
                Some(v) => v.as_str().unwrap_or_default().to_owned(),
                None => return Ok(None),
            },
        };
        let record = self.get(&key(&["backup", user.as_str(), &version])).await?;
        Ok(record
            .filter(|r| r["deleted"] != true)
            .map(|r| (version, r)))
    }

    /// Makes a new backup version, which becomes the current one.
    pub async fn create_backup(
        &self,
        user: &UserId,
        algorithm: &str,
        auth_data: &Value,
    ) -> ApiResult<String> {
        let _turn = self.incoming.lock().await;
        let last = self
            .get(&key(&["backupver", user.as_str()]))
            .await?
            .and_then(|v| v.as_str().and_then(|s| s.parse::<u64>().ok()))
            .unwrap_or(0);
        let version = (last + 1).to_string();
        let record = json!({"algorithm": algorithm, "auth_data": auth_data, "etag": 0});
        self.write_at(|_, b| {
            b.put(
                Table::ClientData,
                key(&["backup", user.as_str(), &version]),
                record.to_string(),
            );
            b.put(
                Table::ClientData,
                key(&["backupver", user.as_str()]),
                json!(version).to_string(),
            );
        })
        .await?;
        Ok(version)
    }

    pub async fn put_backup_record(
        &self,
        user: &UserId,
        version: &str,
        record: &Value,
    ) -> ApiResult<()> {
        self.put_value(key(&["backup", user.as_str(), version]), record)
            .await
    }

    /// Deletes a backup version and every key in it.
    pub async fn delete_backup(
        &self,
        user: &UserId,
        version: &str,
        record: &Value,
    ) -> ApiResult<()> {
        let keys = self
            .scan(&prefix(&["backupkey", user.as_str(), version]))
            .await?;
        let mut record = record.clone();
        record["deleted"] = true.into();
        self.write_at(|_, b| {
            for (k, _) in keys {
                b.delete(Table::ClientData, k);
            }
            b.put(
                Table::ClientData,
                key(&["backup", user.as_str(), version]),
                record.to_string(),
            );
        })
        .await?;
        Ok(())
    }

    /// Backed-up session keys of a version, optionally of one room (and one session):
    /// `(room, session, key data)`.
    pub async fn backup_keys(
        &self,
        user: &UserId,
        version: &str,
        room: Option<&str>,
        session: Option<&str>,
    ) -> ApiResult<Vec<(String, String, Value)>> {
        let mut parts = vec!["backupkey", user.as_str(), version];
        parts.extend(room);
        parts.extend(session);
        let p = if session.is_some() {
            key(&parts)
        } else {
            prefix(&parts)
        };
        let base = prefix(&["backupkey", user.as_str(), version]).len();
        let mut out = Vec::new();
        for (k, v) in self.scan(&p).await? {
            let rest = String::from_utf8_lossy(&k[base..]).into_owned();
            let Some((room, session)) = rest.split_once('\0') else {
                continue;
            };
            out.push((room.to_owned(), session.to_owned(), decode(&v)?));
        }
        Ok(out)
    }

    /// Stores session keys in a backup version (with the record's new etag), and deletes
    /// `doomed` keys, in one write.
    pub async fn write_backup_keys(
        &self,
        user: &UserId,
        version: &str,
        record: &Value,
        keys: Vec<(String, String, Value)>,
        doomed: Vec<(String, String)>,
    ) -> ApiResult<()> {
        self.write_at(|_, b| {
            for (room, session, data) in keys {
                b.put(
                    Table::ClientData,
                    key(&["backupkey", user.as_str(), version, &room, &session]),
                    data.to_string(),
                );
            }
            for (room, session) in doomed {
                b.delete(
                    Table::ClientData,
                    key(&["backupkey", user.as_str(), version, &room, &session]),
                );
            }
            b.put(
                Table::ClientData,
                key(&["backup", user.as_str(), version]),
                record.to_string(),
            );
        })
        .await?;
        Ok(())
    }
}
