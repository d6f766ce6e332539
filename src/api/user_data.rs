//! Per-user data of the Client-Server API, in the store's `client_data` table:
//!
//! - `acct\0<user>\0<room or empty>\0<type>` → `{"pos", "content"}` account data
//! - `filter\0<user>\0<id>` → a stored sync filter
//! - `txn\0<user>\0<device>\0<txn id>` → event id; `txnev\0<event id>` → `{"device", "txn"}`
//! - `alias\0<alias>` → `{"room_id", "creator"}` (records from before creators were kept: the
//!   room id alone)
//! - `receipt\0<room>\0<user>\0<type>` → `{"pos", "event_id", "ts", "thread_id"}`
//! - `keys\0<user>\0<device>` → device keys; `otk\0<user>\0<device>\0<key id>` → one-time key
//! - `todev\0<user>\0<device>\0<pos>` → a to-device message, until the device syncs past it
//! - `forgot\0<user>\0<room>` → a room the user forgot
//!
//! Every change takes the next position of one counter (`client_stream` in `meta`), so `/sync`
//! can ask for "what changed since position N" with one number.

use futures::lock::Mutex;
use ruma::{EventId, OwnedRoomId, RoomId, UserId};
use serde_json::{json, Value};

use super::accounts::Session;
use super::error::{ApiError, ApiResult};
use super::events::membership_of;
use super::{body_object, now_ms, ok, parse, ApiRequest, ApiResponse, ClientApi};
use crate::engine::pdu::StoredEvent;
use crate::store::{Direction, Entry, KeyRange, SharedStore, Table, WriteBatch};

const CLIENT_STREAM_KEY: &[u8] = b"client_stream";
/// The receipt type only its owner is shown.
const PRIVATE_READ: &str = "m.read.private";

pub struct UserData {
    pub(super) store: SharedStore,
    /// Held by read-check-write sequences of E2EE data (incoming to-device, backup versions).
    pub(super) incoming: Mutex<()>,
    /// Aliases some request is creating right now (see [`UserData::claim_alias`]).
    claimed_aliases: std::sync::Mutex<std::collections::HashSet<String>>,
    /// The next position; every position below it is durable.
    next: Mutex<u64>,
    /// A copy of `next` readable without waiting for a writer.
    visible: std::sync::atomic::AtomicU64,
}

pub(super) fn key(parts: &[&str]) -> Vec<u8> {
    parts.join("\0").into_bytes()
}

pub(super) fn prefix(parts: &[&str]) -> Vec<u8> {
    let mut k = key(parts);
    k.push(0);
    k
}

pub(super) fn decode(v: &[u8]) -> ApiResult<Value> {
    serde_json::from_slice(v).map_err(|e| ApiError::unknown(format!("stored client data: {e}")))
}

/// Where an alias points, and who made it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct AliasRecord {
    pub room_id: String,
    /// `None` for aliases stored before creators were kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creator: Option<ruma::OwnedUserId>,
}

/// The right to create one alias, held from the check that it is free to the write that makes
/// it (or until dropped).
pub struct AliasClaim<'a> {
    data: &'a UserData,
    alias: String,
}

impl AliasClaim<'_> {
    /// Stores the alias, pointing at `room`, made by `creator`.
    pub async fn store(self, room: &RoomId, creator: &UserId) -> ApiResult<()> {
        let record = AliasRecord {
            room_id: room.to_string(),
            creator: Some(creator.to_owned()),
        };
        let mut batch = WriteBatch::new();
        batch.put(
            Table::ClientData,
            key(&["alias", &self.alias]),
            serde_json::to_vec(&record).expect("record serialises"),
        );
        Ok(self.data.store.write(batch).await?)
    }
}

impl Drop for AliasClaim<'_> {
    fn drop(&mut self) {
        self.data
            .claimed_aliases
            .lock()
            .expect("alias claims")
            .remove(&self.alias);
    }
}

impl UserData {
    pub async fn open(store: SharedStore) -> ApiResult<Self> {
        let next = match store.get(Table::Meta, CLIENT_STREAM_KEY).await? {
            Some(raw) => u64::from_be_bytes(
                raw.as_slice()
                    .try_into()
                    .map_err(|_| ApiError::unknown("client stream counter is not 8 bytes"))?,
            ),
            None => 1,
        };
        Ok(Self {
            store,
            incoming: Mutex::new(()),
            claimed_aliases: Default::default(),
            next: Mutex::new(next),
            visible: std::sync::atomic::AtomicU64::new(next),
        })
    }

    /// Every change below this position is durable.
    pub fn position(&self) -> u64 {
        self.visible.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Writes what `build` puts in a batch, handing it the position of this change.
    pub(super) async fn write_at(
        &self,
        build: impl FnOnce(u64, &mut WriteBatch),
    ) -> ApiResult<u64> {
        let mut next = self.next.lock().await;
        let pos = *next;
        let mut batch = WriteBatch::new();
        build(pos, &mut batch);
        batch.put(Table::Meta, CLIENT_STREAM_KEY, (pos + 1).to_be_bytes());
        self.store.write(batch).await?;
        *next = pos + 1;
        self.visible
            .store(pos + 1, std::sync::atomic::Ordering::SeqCst);
        Ok(pos)
    }

    pub(super) async fn get(&self, k: &[u8]) -> ApiResult<Option<Value>> {
        match self.store.get(Table::ClientData, k).await? {
            Some(v) => Ok(Some(decode(&v)?)),
            None => Ok(None),
        }
    }

    pub(super) async fn scan(&self, p: &[u8]) -> ApiResult<Vec<Entry>> {
        Ok(self
            .store
            .scan(
                Table::ClientData,
                KeyRange::prefix(p),
                Direction::Forward,
                usize::MAX,
            )
            .await?)
    }

    pub async fn put_account_data(
        &self,
        user: &UserId,
        room: Option<&RoomId>,
        kind: &str,
        content: Value,
    ) -> ApiResult<()> {
        let k = key(&["acct", user.as_str(), room.map_or("", |r| r.as_str()), kind]);
        self.write_at(|pos, b| {
            b.put(
                Table::ClientData,
                k,
                json!({"pos": pos, "content": content}).to_string(),
            )
        })
        .await?;
        Ok(())
    }

    pub async fn account_data(
        &self,
        user: &UserId,
        room: Option<&RoomId>,
        kind: &str,
    ) -> ApiResult<Option<Value>> {
        let k = key(&["acct", user.as_str(), room.map_or("", |r| r.as_str()), kind]);
        Ok(self.get(&k).await?.map(|v| v["content"].clone()))
    }

    /// `(room or None, type, content)` of the user's account data changed in `since..until`.
    pub async fn account_data_since(
        &self,
        user: &UserId,
        since: u64,
        until: u64,
    ) -> ApiResult<Vec<(Option<String>, String, Value)>> {
        let p = prefix(&["acct", user.as_str()]);
        let mut out = Vec::new();
        for (k, v) in self.scan(&p).await? {
            let v = decode(&v)?;
            if !(since..until).contains(&v["pos"].as_u64().unwrap_or(0)) {
                continue;
            }
            let rest = String::from_utf8_lossy(&k[p.len()..]).into_owned();
            let (room, kind) = rest.split_once('\0').unwrap_or(("", &rest));
            let room = (!room.is_empty()).then(|| room.to_owned());
            out.push((room, kind.to_owned(), v["content"].clone()));
        }
        Ok(out)
    }

    /// Takes a position without storing anything else (marks a change noticed outside the store).
    pub async fn bump(&self) -> ApiResult<u64> {
        self.write_at(|_, _| {}).await
    }

    /// The event the user's latest `m.read` receipt in `room` points at.
    pub async fn receipt_of(&self, room: &RoomId, user: &UserId) -> ApiResult<Option<String>> {
        Ok(self
            .get(&key(&["receipt", room.as_str(), user.as_str(), "m.read"]))
            .await?
            .and_then(|v| v["event_id"].as_str().map(str::to_owned)))
    }

    pub async fn put_filter(&self, user: &UserId, filter: Value) -> ApiResult<String> {
        // The filter's id is the position of the change that stores it: unique, one write.
        let pos = self
            .write_at(|pos, b| {
                let k = key(&["filter", user.as_str(), &pos.to_string()]);
                b.put(Table::ClientData, k, filter.to_string())
            })
            .await?;
        Ok(pos.to_string())
    }

    pub async fn filter(&self, user: &UserId, id: &str) -> ApiResult<Option<Value>> {
        self.get(&key(&["filter", user.as_str(), id])).await
    }

    /// The event a transaction id of this device already produced.
    pub async fn txn(&self, s: &Session, txn: &str) -> ApiResult<Option<String>> {
        let k = key(&["txn", s.user_id.as_str(), s.device_id.as_str(), txn]);
        Ok(self
            .get(&k)
            .await?
            .and_then(|v| v.as_str().map(str::to_owned)))
    }

    pub async fn put_txn(&self, s: &Session, txn: &str, event: &EventId) -> ApiResult<()> {
        let mut batch = WriteBatch::new();
        Self::txn_records(s, txn, event, &mut batch);
        Ok(self.store.write(batch).await?)
    }

    /// The records that remember which event a transaction id produced.
    pub fn txn_records(s: &Session, txn: &str, event: &EventId, batch: &mut WriteBatch) {
        batch.put(
            Table::ClientData,
            key(&["txn", s.user_id.as_str(), s.device_id.as_str(), txn]),
            Value::from(event.as_str()).to_string(),
        );
        batch.put(
            Table::ClientData,
            key(&["txnev", event.as_str()]),
            json!({"device": s.device_id, "txn": txn}).to_string(),
        );
    }

    /// The transaction id `ev` was sent with, if the session's device sent it.
    pub async fn txn_of(&self, s: &Session, ev: &StoredEvent) -> ApiResult<Option<String>> {
        if ev.pdu.sender != s.user_id {
            return Ok(None);
        }
        let Some(v) = self.get(&key(&["txnev", ev.pdu.event_id.as_str()])).await? else {
            return Ok(None);
        };
        Ok((v["device"].as_str() == Some(s.device_id.as_str()))
            .then(|| v["txn"].as_str().map(str::to_owned))
            .flatten())
    }

    /// The room `alias` points at.
    pub async fn alias(&self, alias: &str) -> ApiResult<Option<String>> {
        Ok(self.alias_record(alias).await?.map(|a| a.room_id))
    }

    pub async fn alias_record(&self, alias: &str) -> ApiResult<Option<AliasRecord>> {
        Ok(match self.get(&key(&["alias", alias])).await? {
            None => None,
            // Stored before aliases kept their creator.
            Some(Value::String(room_id)) => Some(AliasRecord {
                room_id,
                creator: None,
            }),
            Some(v) => Some(
                serde_json::from_value(v)
                    .map_err(|e| ApiError::unknown(format!("stored alias: {e}")))?,
            ),
        })
    }

    /// Claims `alias` to create it, or `None` if it exists or another request is creating it
    /// right now: an alias, once made, is never re-pointed.
    pub async fn claim_alias(&self, alias: &str) -> ApiResult<Option<AliasClaim<'_>>> {
        if !self
            .claimed_aliases
            .lock()
            .expect("alias claims")
            .insert(alias.to_owned())
        {
            return Ok(None);
        }
        let claim = AliasClaim {
            data: self,
            alias: alias.to_owned(),
        };
        // (Dropping the claim gives it up.)
        if self.alias_record(alias).await?.is_some() {
            return Ok(None);
        }
        Ok(Some(claim))
    }

    pub async fn delete_alias(&self, alias: &str) -> ApiResult<()> {
        let mut batch = WriteBatch::new();
        batch.delete(Table::ClientData, key(&["alias", alias]));
        Ok(self.store.write(batch).await?)
    }

    pub async fn forget(&self, user: &UserId, room: &RoomId) -> ApiResult<()> {
        self.write_at(|_, b| {
            b.put(
                Table::ClientData,
                key(&["forgot", user.as_str(), room.as_str()]),
                "true",
            )
        })
        .await?;
        Ok(())
    }

    pub async fn forgotten(&self, user: &UserId, room: &RoomId) -> ApiResult<bool> {
        Ok(self
            .get(&key(&["forgot", user.as_str(), room.as_str()]))
            .await?
            .is_some())
    }

    pub async fn put_receipt(
        &self,
        room: &RoomId,
        user: &UserId,
        kind: &str,
        event: &EventId,
        thread: Option<&str>,
    ) -> ApiResult<()> {
        // A receipt in a thread is kept beside the user's main one, not instead of it.
        let k = match thread {
            Some(t) if t != "main" => key(&["receipt", room.as_str(), user.as_str(), kind, t]),
            _ => key(&["receipt", room.as_str(), user.as_str(), kind]),
        };
        let ts = now_ms();
        self.write_at(|pos, b| {
            let mut v = json!({"pos": pos, "event_id": event, "ts": ts});
            if let Some(t) = thread {
                v["thread_id"] = t.into();
            }
            b.put(Table::ClientData, k, v.to_string())
        })
        .await?;
        Ok(())
    }

    /// The receipts of a room changed in `since..until`, as an `m.receipt` event content for
    /// `viewer` (private receipts are for their owner only).
    pub async fn receipts_since(
        &self,
        room: &RoomId,
        since: u64,
        until: u64,
        viewer: &UserId,
    ) -> ApiResult<Option<Value>> {
        let p = prefix(&["receipt", room.as_str()]);
        let mut content = serde_json::Map::new();
        for (k, v) in self.scan(&p).await? {
            let v = decode(&v)?;
            if !(since..until).contains(&v["pos"].as_u64().unwrap_or(0)) {
                continue;
            }
            let rest = String::from_utf8_lossy(&k[p.len()..]).into_owned();
            let Some((user, kind)) = rest.split_once('\0') else {
                continue;
            };
            // (`kind\0thread` for a receipt in a thread.)
            let kind = kind.split('\0').next().unwrap_or(kind);
            if kind == PRIVATE_READ && user != viewer.as_str() {
                continue;
            }
            let Some(event) = v["event_id"].as_str() else {
                continue;
            };
            let mut receipt = json!({"ts": v["ts"]});
            if let Some(t) = v.get("thread_id") {
                receipt["thread_id"] = t.clone();
            }
            let by_event = content.entry(event.to_owned()).or_insert_with(|| json!({}));
            by_event[kind][user] = receipt;
        }
        Ok((!content.is_empty()).then_some(Value::Object(content)))
    }

    /// Deletes the value at `k`, at the next position.
    pub(super) async fn delete_value(&self, k: Vec<u8>) -> ApiResult<()> {
        self.write_at(|_, b| b.delete(Table::ClientData, k)).await?;
        Ok(())
    }

    /// Stores one JSON value at `k`, at the next position.
    pub(super) async fn put_value(&self, k: Vec<u8>, value: &Value) -> ApiResult<()> {
        self.write_at(|_, b| b.put(Table::ClientData, k, value.to_string()))
            .await?;
        Ok(())
    }

    pub async fn put_device_keys(
        &self,
        user: &UserId,
        device: &str,
        keys: &Value,
    ) -> ApiResult<()> {
        self.put_value(key(&["keys", user.as_str(), device]), keys)
            .await
    }

    pub async fn device_keys(&self, user: &UserId) -> ApiResult<Vec<(String, Value)>> {
        let p = prefix(&["keys", user.as_str()]);
        self.scan(&p)
            .await?
            .into_iter()
            .map(|(k, v)| {
                Ok((
                    String::from_utf8_lossy(&k[p.len()..]).into_owned(),
                    decode(&v)?,
                ))
            })
            .collect()
    }

    pub async fn put_one_time_keys(
        &self,
        user: &UserId,
        device: &str,
        keys: &serde_json::Map<String, Value>,
    ) -> ApiResult<()> {
        self.write_at(|_, b| {
            for (id, k) in keys {
                b.put(
                    Table::ClientData,
                    key(&["otk", user.as_str(), device, id]),
                    k.to_string(),
                );
            }
        })
        .await?;
        Ok(())
    }

    /// Counts of unclaimed one-time keys by algorithm.
    pub async fn one_time_key_counts(
        &self,
        user: &UserId,
        device: &str,
    ) -> ApiResult<serde_json::Map<String, Value>> {
        let p = prefix(&["otk", user.as_str(), device]);
        let mut counts = serde_json::Map::new();
        for (k, _) in self.scan(&p).await? {
            let id = String::from_utf8_lossy(&k[p.len()..]).into_owned();
            let algorithm = id.split(':').next().unwrap_or_default().to_owned();
            let n = counts.entry(algorithm).or_insert(json!(0));
            *n = json!(n.as_u64().unwrap_or(0) + 1);
        }
        Ok(counts)
    }

    /// Takes one one-time key of `algorithm` for the device, if any is left.
    pub async fn claim_one_time_key(
        &self,
        user: &UserId,
        device: &str,
        algorithm: &str,
    ) -> ApiResult<Option<(String, Value)>> {
        let p = prefix(&["otk", user.as_str(), device]);
        let mut lock = self.next.lock().await;
        let entries = self
            .store
            .scan(
                Table::ClientData,
                KeyRange::prefix(&[p.clone(), format!("{algorithm}:").into_bytes()].concat()),
                Direction::Forward,
                1,
            )
            .await?;
        let Some((k, v)) = entries.into_iter().next() else {
            return Ok(None);
        };
        let mut batch = WriteBatch::new();
        batch.delete(Table::ClientData, k.clone());
        batch.put(Table::Meta, CLIENT_STREAM_KEY, (*lock + 1).to_be_bytes());
        self.store.write(batch).await?;
        *lock += 1;
        self.visible
            .store(*lock, std::sync::atomic::Ordering::SeqCst);
        Ok(Some((
            String::from_utf8_lossy(&k[p.len()..]).into_owned(),
            decode(&v)?,
        )))
    }

    pub async fn put_to_device(
        &self,
        messages: Vec<(ruma::OwnedUserId, String, Value)>,
    ) -> ApiResult<()> {
        self.write_at(|pos, b| {
            for (i, (user, device, msg)) in messages.into_iter().enumerate() {
                let mut k = prefix(&["todev", user.as_str(), &device]);
                k.extend_from_slice(&pos.to_be_bytes());
                k.extend_from_slice(&(i as u32).to_be_bytes());
                b.put(Table::ClientData, k, msg.to_string());
            }
        })
        .await?;
        Ok(())
    }

    /// To-device messages for a device below `until`: those before `ack` are acknowledged (and
    /// deleted).
    pub async fn to_device(&self, s: &Session, ack: u64, until: u64) -> ApiResult<Vec<Value>> {
        let p = prefix(&["todev", s.user_id.as_str(), s.device_id.as_str()]);
        let mut out = Vec::new();
        let mut done = WriteBatch::new();
        for (k, v) in self.scan(&p).await? {
            let pos = k[p.len()..]
                .get(..8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes)
                .unwrap_or(0);
            if pos < ack {
                done.delete(Table::ClientData, k);
            } else if pos < until {
                out.push(decode(&v)?);
            }
        }
        if !done.is_empty() {
            self.store.write(done).await?;
        }
        Ok(out)
    }
}

/// Tags one room may have for one user.
const MAX_TAGS: usize = 100;

impl ClientApi {
    /// Adds the user's display name and avatar to a member event's content.
    /// Adds the user's profile (`displayname`, `avatar_url` when set) to member-event content.
    pub(super) async fn add_profile(&self, user: &UserId, content: &mut Value) -> ApiResult<()> {
        for (k, v) in self.profile_content(user).await? {
            content[k] = v;
        }
        Ok(())
    }

    /// The user's profile as member-event content (`displayname`, `avatar_url` when set).
    pub(super) async fn profile_content(
        &self,
        user: &UserId,
    ) -> ApiResult<serde_json::Map<String, Value>> {
        let mut content = serde_json::Map::new();
        if let Some(u) = self.accounts.user(user).await? {
            if let Some(d) = u.displayname {
                content.insert("displayname".into(), d.into());
            }
            if let Some(a) = u.avatar_url {
                content.insert("avatar_url".into(), a.into());
            }
        }
        Ok(content)
    }

    /// A user's profile: this server's users' to anyone (as Matrix servers serve them);
    /// another peer's users' to a signed-in user who shares a room with them.
    pub(super) async fn get_profile(
        &self,
        req: &ApiRequest,
        user: &str,
        field: Option<&str>,
    ) -> ApiResult<ApiResponse> {
        let user = ruma::OwnedUserId::try_from(user)
            .map_err(|e| ApiError::invalid_param(format!("bad user id: {e}")))?;
        let profile = if user.server_name().as_str() == self.node.server_name().to_string() {
            let record = self
                .accounts
                .user(&user)
                .await?
                .ok_or_else(|| ApiError::not_found("no such user here"))?;
            let mut profile = serde_json::Map::new();
            if let Some(d) = record.displayname {
                profile.insert("displayname".into(), d.into());
            }
            if let Some(a) = record.avatar_url {
                profile.insert("avatar_url".into(), a.into());
            }
            profile
        } else {
            let s = self.session(req).await?;
            self.remote_profile(&s, &user).await?
        };
        match field {
            None => ok(Value::Object(profile)),
            Some(f) => match profile.get(f) {
                Some(v) => ok(json!({ f: v })),
                None => Err(ApiError::not_found("that profile field is not set")),
            },
        }
    }

    /// Sets a profile field and sends fresh member events to every joined room.
    pub(super) async fn put_profile(
        &self,
        req: &ApiRequest,
        s: &Session,
        user: &str,
        field: &str,
    ) -> ApiResult<ApiResponse> {
        let body = body_object(req)?;
        if user != s.user_id.as_str() {
            return Err(ApiError::forbidden("you may only change your own profile"));
        }
        if field != "displayname" && field != "avatar_url" {
            return Err(ApiError::invalid_param(
                "only displayname and avatar_url are kept",
            ));
        }
        let value = match body.get(field) {
            Some(Value::String(v)) => Some(v.clone()),
            Some(Value::Null) | None => None,
            Some(_) => return Err(ApiError::bad_json(format!("{field} must be a string"))),
        };
        if value.as_ref().is_some_and(|v| v.len() > 1024) {
            return Err(ApiError::invalid_param(format!("{field} is too long")));
        }
        let mut record = self
            .accounts
            .user(&s.user_id)
            .await?
            .ok_or_else(ApiError::unknown_token)?;
        if field == "displayname" {
            record.displayname = value;
        } else {
            record.avatar_url = value;
        }
        self.accounts.put_user(&s.user_id, &record).await?;
        for room in self.joined_room_ids(&s.user_id).await? {
            let state = self.state_of(&room).await?;
            let Some(ev) = self.member_event(&state, &s.user_id).await? else {
                continue;
            };
            if membership_of(&ev).as_deref() != Some("join") {
                continue;
            }
            let mut content: Value =
                serde_json::from_str(ev.pdu.content.get()).unwrap_or_else(|_| json!({}));
            content["displayname"] = json!(record.displayname);
            content["avatar_url"] = json!(record.avatar_url);
            if let Value::Object(o) = &mut content {
                o.retain(|_, v| !v.is_null());
            }
            self.send_as(s, &room, "m.room.member", Some(s.user_id.as_str()), content)
                .await?;
        }
        ok(json!({}))
    }

    pub(super) async fn typing(
        &self,
        req: &ApiRequest,
        s: &Session,
        room: &str,
        user: &str,
    ) -> ApiResult<ApiResponse> {
        use ruma::api::client::typing::create_typing_event::v3::{Request, Typing};
        let r: Request = parse(req, &[room, user])?;
        if r.user_id != s.user_id {
            return Err(ApiError::forbidden(
                "you may only set your own typing state",
            ));
        }
        let state = self.state_of(&r.room_id).await?;
        if self.membership(&state, &s.user_id).await?.as_deref() != Some("join") {
            return Err(ApiError::forbidden("you are not in that room"));
        }
        let until = match r.state {
            Typing::Yes(t) => {
                Some(super::Instant::now() + t.timeout.min(super::Duration::from_secs(120)))
            }
            _ => None,
        };
        self.set_typing(&r.room_id, &s.user_id, until);
        self.node
            .send_typing(&r.room_id, &s.user_id, until.is_some());
        ok(json!({}))
    }

    pub(super) async fn receipt(
        &self,
        req: &ApiRequest,
        s: &Session,
        room: &str,
        kind: &str,
        event: &str,
    ) -> ApiResult<ApiResponse> {
        use ruma::api::client::receipt::create_receipt::v3::Request;
        let r: Request = parse(req, &[room, kind, event])?;
        self.set_receipt(
            s,
            &r.room_id,
            r.receipt_type.as_ref(),
            &r.event_id,
            match &r.thread {
                ruma::events::receipt::ReceiptThread::Thread(t) => Some(t.to_string()),
                ruma::events::receipt::ReceiptThread::Main => Some("main".to_owned()),
                _ => None,
            },
        )
        .await?;
        ok(json!({}))
    }

    async fn set_receipt(
        &self,
        s: &Session,
        room: &RoomId,
        kind: &str,
        event: &EventId,
        thread: Option<String>,
    ) -> ApiResult<()> {
        let state = self.state_of(room).await?;
        if self.membership(&state, &s.user_id).await?.as_deref() != Some("join") {
            return Err(ApiError::forbidden("you are not in that room"));
        }
        match self.node.engine().event(event).await? {
            Some(ev) if ev.pdu.room_id == room => {}
            _ => return Err(ApiError::not_found("no such event in that room")),
        }
        // A receipt in a thread is kept per thread: only for threads that are in the room.
        if let Some(thread) = thread.as_deref().filter(|t| *t != "main") {
            let root = EventId::parse(thread)
                .map_err(|_| ApiError::invalid_param("thread_id is an event id or main"))?;
            match self.node.engine().event(&root).await? {
                Some(ev) if ev.pdu.room_id == room => {}
                _ => return Err(ApiError::invalid_param("no such thread in that room")),
            }
        }
        if kind == "m.fully_read" {
            self.data
                .put_account_data(
                    &s.user_id,
                    Some(room),
                    "m.fully_read",
                    json!({"event_id": event}),
                )
                .await?;
        } else {
            self.data
                .put_receipt(room, &s.user_id, kind, event, thread.as_deref())
                .await?;
            // Only public receipts go to peers: a private one is for the user's own clients.
            // Peers take a receipt for the main timeline: one in a thread stays here.
            if kind == "m.read" && thread.as_deref().is_none_or(|t| t == "main") {
                self.node.send_receipt(room, &s.user_id, event);
            }
        }
        self.node.changed();
        Ok(())
    }

    pub(super) async fn read_markers(
        &self,
        req: &ApiRequest,
        s: &Session,
        room: &str,
    ) -> ApiResult<ApiResponse> {
        use ruma::api::client::read_marker::set_read_marker::v3::Request;
        let r: Request = parse(req, &[room])?;
        if let Some(e) = &r.fully_read {
            self.set_receipt(s, &r.room_id, "m.fully_read", e, None)
                .await?;
        }
        if let Some(e) = &r.read_receipt {
            self.set_receipt(s, &r.room_id, "m.read", e, None).await?;
        }
        if let Some(e) = &r.private_read_receipt {
            self.set_receipt(s, &r.room_id, "m.read.private", e, None)
                .await?;
        }
        ok(json!({}))
    }

    /// A receipt a peer reported for one of its users.
    pub async fn remote_receipt(
        &self,
        room: &RoomId,
        user: &UserId,
        event: &EventId,
    ) -> ApiResult<()> {
        self.data
            .put_receipt(room, user, "m.read", event, None)
            .await?;
        self.node.changed();
        Ok(())
    }

    pub(super) async fn put_account_data(
        &self,
        req: &ApiRequest,
        s: &Session,
        user: &str,
        room: Option<&str>,
        kind: &str,
    ) -> ApiResult<ApiResponse> {
        let content = body_object(req)?;
        if user != s.user_id.as_str() {
            return Err(ApiError::forbidden(
                "you may only change your own account data",
            ));
        }
        let room: Option<OwnedRoomId> = room.map(super::rooms::room_id).transpose()?;
        if kind == "m.fully_read" || kind == "m.push_rules" {
            return Err(ApiError::new(
                http::StatusCode::BAD_REQUEST,
                "M_BAD_JSON",
                format!("{kind} is managed by the server"),
            ));
        }
        self.data
            .put_account_data(&s.user_id, room.as_deref(), kind, Value::Object(content))
            .await?;
        self.node.changed();
        ok(json!({}))
    }

    /// `GET /user/{user}/rooms/{room}/tags`.
    pub(super) async fn tags(&self, s: &Session, user: &str, room: &str) -> ApiResult<ApiResponse> {
        let room = self.own_room_data(s, user, room)?;
        let content = self
            .data
            .account_data(&s.user_id, Some(&room), "m.tag")
            .await?;
        let tags = content
            .map(|c| c["tags"].clone())
            .filter(Value::is_object)
            .unwrap_or_else(|| json!({}));
        ok(json!({ "tags": tags }))
    }

    /// `PUT` (with an optional `order` between 0 and 1) or `DELETE` (`body` is `None`) one
    /// tag of a room; the room's `m.tag` account data changes, so every client hears of it.
    pub(super) async fn set_tag(
        &self,
        req: Option<&ApiRequest>,
        s: &Session,
        user: &str,
        room: &str,
        tag: &str,
    ) -> ApiResult<ApiResponse> {
        let room = self.own_room_data(s, user, room)?;
        if tag.is_empty() || tag.len() > 255 {
            return Err(ApiError::invalid_param("tags are 1 to 255 bytes"));
        }
        let info = match req {
            Some(req) => {
                let body = body_object(req)?;
                let mut info = serde_json::Map::new();
                match body.get("order") {
                    None | Some(Value::Null) => {}
                    Some(order) => match order.as_f64() {
                        Some(o) if (0.0..=1.0).contains(&o) => {
                            info.insert("order".into(), order.clone());
                        }
                        _ => return Err(ApiError::bad_json("`order` is a number from 0 to 1")),
                    },
                }
                Some(Value::Object(info))
            }
            None => None,
        };
        // Read, change, write: one change to a room's tags at a time.
        let _one_at_a_time = self.txns.lock(format!("tags\0{}\0{room}", s.user_id)).await;
        let mut content = self
            .data
            .account_data(&s.user_id, Some(&room), "m.tag")
            .await?
            .filter(|c| c["tags"].is_object())
            .unwrap_or_else(|| json!({"tags": {}}));
        let tags = content["tags"].as_object_mut().expect("checked above");
        match info {
            Some(_) if tags.len() >= MAX_TAGS && !tags.contains_key(tag) => {
                return Err(ApiError::new(
                    http::StatusCode::BAD_REQUEST,
                    "M_LIMIT_EXCEEDED",
                    format!("at most {MAX_TAGS} tags per room"),
                ));
            }
            Some(info) => {
                tags.insert(tag.to_owned(), info);
            }
            None => {
                tags.remove(tag);
            }
        }
        self.data
            .put_account_data(&s.user_id, Some(&room), "m.tag", content)
            .await?;
        self.node.changed();
        ok(json!({}))
    }

    /// The room of a request about the caller's own per-room data.
    fn own_room_data(&self, s: &Session, user: &str, room: &str) -> ApiResult<OwnedRoomId> {
        if user != s.user_id.as_str() {
            return Err(ApiError::forbidden(
                "you may only see and change your own tags",
            ));
        }
        super::rooms::room_id(room)
    }

    pub(super) async fn get_account_data(
        &self,
        s: &Session,
        user: &str,
        room: Option<&str>,
        kind: &str,
    ) -> ApiResult<ApiResponse> {
        if user != s.user_id.as_str() {
            return Err(ApiError::forbidden(
                "you may only read your own account data",
            ));
        }
        let room: Option<OwnedRoomId> = room.map(super::rooms::room_id).transpose()?;
        match self
            .data
            .account_data(&s.user_id, room.as_deref(), kind)
            .await?
        {
            Some(c) => ok(c),
            None => Err(ApiError::not_found("no account data of that type")),
        }
    }

    pub(super) async fn create_filter(
        &self,
        req: &ApiRequest,
        s: &Session,
        user: &str,
    ) -> ApiResult<ApiResponse> {
        use ruma::api::client::filter::create_filter::v3::Request;
        let r: Request = parse(req, &[user])?;
        if r.user_id != s.user_id {
            return Err(ApiError::forbidden("you may only create your own filters"));
        }
        let filter =
            serde_json::to_value(&r.filter).map_err(|e| ApiError::bad_json(e.to_string()))?;
        let id = self.data.put_filter(&s.user_id, filter).await?;
        ok(json!({ "filter_id": id }))
    }

    pub(super) async fn get_filter(
        &self,
        s: &Session,
        user: &str,
        id: &str,
    ) -> ApiResult<ApiResponse> {
        if user != s.user_id.as_str() {
            return Err(ApiError::forbidden("you may only read your own filters"));
        }
        match self.data.filter(&s.user_id, id).await? {
            Some(f) => ok(f),
            None => Err(ApiError::not_found("no such filter")),
        }
    }
}
