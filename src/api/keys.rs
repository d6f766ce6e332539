//! End-to-end encryption keys: `/keys/upload`, `/keys/query`, `/keys/claim`, `/keys/changes`,
//! cross-signing (`/keys/device_signing/upload`, `/keys/signatures/upload`), and the answers
//! to peers' key requests and device-list changes.
//!
//! Keys of users on other peers are asked of their server over libp2p (a timeout per server),
//! checked (each device's keys signed by the device's own key, for the user and device they
//! name; a self-signing key signed by the master key) and cached until that server says the
//! user's devices changed, or for [`REMOTE_KEYS_TTL`] at most.

use std::collections::{BTreeMap, HashMap};

use base64::Engine as _;
use ruma::{OwnedUserId, UserId};
use serde_json::{json, Map, Value};

use super::accounts::Session;
use super::error::{ApiError, ApiResult};
use super::sync::SyncToken;
use super::{body_object, ok, ApiRequest, ApiResponse, ClientApi, Instant};
use crate::identity::ServerName;
use crate::net::protocol::{FedRequest, FedResponse};
use crate::net::rt;
use crate::rooms::devices::{DeviceAsk, DeviceRequest};

/// How long keys fetched from another server are trusted without a change notice.
pub const REMOTE_KEYS_TTL: std::time::Duration = std::time::Duration::from_secs(600);
/// How long `/keys/query` and `/keys/claim` wait for another server at most.
const REMOTE_TIMEOUT_MS: u64 = 10_000;
/// One-time keys one upload may carry, and the bytes of one key.
pub const MAX_UPLOADED_KEYS: usize = 200;
pub const MAX_KEY_BYTES: usize = 4096;
/// Users whose remote keys are cached at once.
const MAX_CACHED_USERS: usize = 10_000;

/// Keys of users of other servers, as their server last answered.
#[derive(Default)]
pub(super) struct RemoteKeys {
    users: HashMap<OwnedUserId, (Instant, Value)>,
}

fn unpadded(s: &str) -> Option<Vec<u8>> {
    let b64 = base64::engine::general_purpose::STANDARD_NO_PAD;
    b64.decode(s.trim_end_matches('=')).ok()
}

/// Whether `object` is signed by `signer` with `key_id`, whose public key is `public_key`
/// (unpadded base64 ed25519).
pub fn signed_by(object: &Value, signer: &str, key_id: &str, public_key: &str) -> bool {
    let Some(signature) = object["signatures"][signer][key_id].as_str() else {
        return false;
    };
    let (Some(key), Some(signature)) = (unpadded(public_key), unpadded(signature)) else {
        return false;
    };
    let Ok(ruma::CanonicalJsonValue::Object(canonical)) =
        ruma::CanonicalJsonValue::try_from(object.clone())
    else {
        return false;
    };
    let Ok(signed) = ruma::signatures::to_canonical_json_string_for_signing(&canonical) else {
        return false;
    };
    ruma::signatures::verify_canonical_json_bytes(
        &ruma::SigningKeyAlgorithm::Ed25519,
        &key,
        &signature,
        signed.as_bytes(),
    )
    .is_ok()
}

/// Whether `keys` are well-formed device keys of `user`'s `device`, signed by that device's
/// own ed25519 key.
pub fn valid_device_keys(keys: &Value, user: &str, device: &str) -> bool {
    if keys["user_id"] != user || keys["device_id"] != device {
        return false;
    }
    if serde_json::from_value::<ruma::encryption::DeviceKeys>(keys.clone()).is_err() {
        return false;
    }
    let key_id = format!("ed25519:{device}");
    match keys["keys"][&key_id].as_str() {
        Some(public) => signed_by(keys, user, &key_id, public),
        None => false,
    }
}

/// The single public key of a cross-signing key object, as `(key id, key)`.
fn cross_signing_public(key: &Value) -> Option<(String, String)> {
    let keys = key["keys"].as_object()?;
    if keys.len() != 1 {
        return None;
    }
    let (id, public) = keys.iter().next()?;
    Some((id.clone(), public.as_str()?.to_owned()))
}

/// Whether `key` is a well-formed cross-signing key of `user` for `usage`.
fn valid_cross_signing(key: &Value, user: &str, usage: &str) -> bool {
    key["user_id"] == user
        && key["usage"]
            .as_array()
            .is_some_and(|u| u.iter().any(|x| x == usage))
        && cross_signing_public(key).is_some()
}

/// Whether `key` (self- or user-signing) carries `user`'s master key's signature.
fn signed_by_master(key: &Value, master: &Value, user: &str) -> bool {
    cross_signing_public(master).is_some_and(|(id, public)| signed_by(key, user, &id, &public))
}

impl ClientApi {
    pub(super) async fn upload_keys(
        &self,
        req: &ApiRequest,
        s: &Session,
    ) -> ApiResult<ApiResponse> {
        use ruma::api::client::keys::upload_keys::v3::Request;
        let _: Request = super::parse(req, &[])?;
        let body = body_object(req)?;
        let (user, device) = (s.user_id.as_str(), s.device_id.as_str());
        let otks = body.get("one_time_keys").and_then(Value::as_object);
        let fallbacks = body
            .get("fallback_keys")
            .or_else(|| body.get("org.matrix.msc2732.fallback_keys"))
            .and_then(Value::as_object);
        let uploaded = otks.map_or(0, Map::len) + fallbacks.map_or(0, Map::len);
        if uploaded > MAX_UPLOADED_KEYS {
            return Err(ApiError::new(
                http::StatusCode::BAD_REQUEST,
                "M_TOO_LARGE",
                format!("at most {MAX_UPLOADED_KEYS} keys per upload"),
            ));
        }
        let too_big = |keys: Option<&Map<String, Value>>| {
            keys.into_iter()
                .flatten()
                .any(|(id, k)| id.len() > 255 || k.to_string().len() > MAX_KEY_BYTES)
        };
        if too_big(otks) || too_big(fallbacks) {
            return Err(ApiError::new(
                http::StatusCode::BAD_REQUEST,
                "M_TOO_LARGE",
                format!("a key is over {MAX_KEY_BYTES} bytes"),
            ));
        }
        if let Some(keys) = body.get("device_keys") {
            if keys["user_id"] != user || keys["device_id"] != device {
                return Err(ApiError::bad_json("device_keys are for another device"));
            }
            if !valid_device_keys(keys, user, device) {
                return Err(ApiError::bad_json(
                    "device_keys must be signed by the device's own ed25519 key",
                ));
            }
            let stored = self
                .data
                .device_keys(&s.user_id)
                .await?
                .into_iter()
                .find(|(d, _)| d == device)
                .map(|(_, k)| k);
            if stored.as_ref() != Some(keys) {
                self.data.put_device_keys(&s.user_id, device, keys).await?;
                self.devices_changed(&s.user_id).await?;
            }
        }
        if let Some(otks) = otks {
            self.data
                .put_one_time_keys(&s.user_id, device, otks)
                .await?;
        }
        for (id, k) in fallbacks.into_iter().flatten() {
            self.data
                .put_fallback_key(&s.user_id, device, id, k)
                .await?;
        }
        let counts = self.data.one_time_key_counts(&s.user_id, device).await?;
        ok(json!({ "one_time_key_counts": counts }))
    }

    /// Notes that a local user's devices changed: their own clients and every server sharing
    /// a room with them are told.
    pub(super) async fn devices_changed(&self, user: &UserId) -> ApiResult<()> {
        let pos = self.data.note_device_change(user).await?;
        self.node.announce_device_change(user, pos);
        self.node.changed();
        Ok(())
    }

    /// Forgets the keys of deleted devices and tells who needs to know.
    pub(super) async fn devices_removed(&self, user: &UserId, devices: &[String]) -> ApiResult<()> {
        for d in devices {
            self.data.delete_device_keys(user, d).await?;
        }
        if !devices.is_empty() {
            self.devices_changed(user).await?;
        }
        Ok(())
    }

    /// The keys of local `user` as `/keys/query` answers them: devices (all, or `wanted`),
    /// master and self-signing keys, and the user-signing key for the user themself.
    async fn local_keys(
        &self,
        user: &UserId,
        wanted: &[String],
        for_self: bool,
        answer: &mut Map<String, Value>,
    ) -> ApiResult<()> {
        let mut devices = Map::new();
        for (device, mut keys) in self.data.device_keys(user).await? {
            if !wanted.is_empty() && !wanted.contains(&device) {
                continue;
            }
            if !for_self {
                // Device names stay on the user's own server.
                if let Some(u) = keys.get_mut("unsigned").and_then(Value::as_object_mut) {
                    u.remove("device_display_name");
                }
            }
            devices.insert(device, keys);
        }
        entry(answer, "device_keys").insert(user.to_string(), Value::Object(devices));
        for (usage, field) in [
            ("master", "master_keys"),
            ("self_signing", "self_signing_keys"),
            ("user_signing", "user_signing_keys"),
        ] {
            if usage == "user_signing" && !for_self {
                continue;
            }
            if let Some(k) = self.data.cross_signing_key(user, usage).await? {
                entry(answer, field).insert(user.to_string(), k);
            }
        }
        Ok(())
    }

    pub(super) async fn query_keys(&self, req: &ApiRequest, s: &Session) -> ApiResult<ApiResponse> {
        use ruma::api::client::keys::get_keys::v3::Request;
        let r: Request = super::parse(req, &[])?;
        let timeout = r.timeout.map_or(REMOTE_TIMEOUT_MS, |t| {
            (t.as_millis() as u64).min(REMOTE_TIMEOUT_MS)
        });
        let mut answer = Map::new();
        for field in [
            "device_keys",
            "master_keys",
            "self_signing_keys",
            "failures",
        ] {
            answer.insert(field.into(), json!({}));
        }
        let me = self.node.server_name();
        let mut remote: BTreeMap<ServerName, Vec<(OwnedUserId, Vec<String>)>> = BTreeMap::new();
        for (user, wanted) in &r.device_keys {
            let wanted: Vec<String> = wanted.iter().map(|d| d.to_string()).collect();
            match ServerName::try_from(user.server_name()) {
                Ok(server) if server == me => {
                    self.local_keys(user, &wanted, *user == s.user_id, &mut answer)
                        .await?;
                }
                Ok(server) => remote
                    .entry(server)
                    .or_default()
                    .push((user.clone(), wanted)),
                Err(_) => {
                    entry(&mut answer, "failures").insert(
                        user.server_name().to_string(),
                        json!({"status": 404, "message": "not a Hyphae server"}),
                    );
                }
            }
        }
        let asked = remote.into_iter().map(|(server, users)| async move {
            let result = self.remote_keys(server, &users, timeout).await;
            (server, users, result)
        });
        for (server, users, result) in futures::future::join_all(asked).await {
            match result {
                Ok(keys) => {
                    for (user, wanted) in users {
                        let Some(k) = keys.get(&user) else { continue };
                        let mut devices = k["device_keys"].as_object().cloned().unwrap_or_default();
                        if !wanted.is_empty() {
                            devices.retain(|d, _| wanted.contains(d));
                        }
                        entry(&mut answer, "device_keys")
                            .insert(user.to_string(), Value::Object(devices));
                        for field in ["master_keys", "self_signing_keys"] {
                            if !k[field].is_null() {
                                entry(&mut answer, field)
                                    .insert(user.to_string(), k[field].clone());
                            }
                        }
                    }
                }
                Err(message) => {
                    entry(&mut answer, "failures").insert(
                        server.to_string(),
                        json!({"status": 503, "message": message}),
                    );
                }
            }
        }
        self.add_own_signatures(s, &mut answer).await?;
        ok(Value::Object(answer))
    }

    /// Adds to the master keys in a query answer the signatures the caller made of them with
    /// their user-signing key, where the key is still the one they signed.
    async fn add_own_signatures(
        &self,
        s: &Session,
        answer: &mut Map<String, Value>,
    ) -> ApiResult<()> {
        let signer = s.user_id.as_str();
        for (user, master) in entry(answer, "master_keys").iter_mut() {
            let Ok(user) = OwnedUserId::try_from(user.as_str()) else {
                continue;
            };
            if user == s.user_id {
                continue;
            }
            let Some(record) = self.data.user_signature(&s.user_id, &user).await? else {
                continue;
            };
            let (Some(key_id), Some(signature)) =
                (record["key_id"].as_str(), record["signature"].as_str())
            else {
                continue;
            };
            if without(master, &["signatures", "unsigned"]) == record["key"] {
                master["signatures"][signer][key_id] = signature.into();
            }
        }
        Ok(())
    }

    /// Checked keys of `users` of `server`: from the cache, or asked of the server.
    async fn remote_keys(
        &self,
        server: ServerName,
        users: &[(OwnedUserId, Vec<String>)],
        timeout_ms: u64,
    ) -> Result<HashMap<OwnedUserId, Value>, String> {
        let mut out = HashMap::new();
        let mut missing = Vec::new();
        {
            let cache = self.remote_keys.lock().expect("remote keys");
            for (user, _) in users {
                match cache.users.get(user) {
                    Some((at, keys)) if at.elapsed() < REMOTE_KEYS_TTL => {
                        out.insert(user.clone(), keys.clone());
                    }
                    _ => missing.push(user.clone()),
                }
            }
        }
        if missing.is_empty() {
            return Ok(out);
        }
        let request = FedRequest::QueryKeys {
            user_ids: missing.clone(),
        };
        let json = match self.ask_server(server, request, timeout_ms).await? {
            FedResponse::Keys { json } => json,
            other => return Err(format!("unexpected answer {other:?}")),
        };
        let answer: Value = serde_json::from_str(&json).map_err(|e| e.to_string())?;
        let mut cache = self.remote_keys.lock().expect("remote keys");
        if cache.users.len() + missing.len() > MAX_CACHED_USERS {
            cache
                .users
                .retain(|_, (at, _)| at.elapsed() < REMOTE_KEYS_TTL);
            if cache.users.len() + missing.len() > MAX_CACHED_USERS {
                cache.users.clear();
            }
        }
        for user in missing {
            let keys = checked_remote_keys(&answer, &user);
            cache
                .users
                .insert(user.clone(), (Instant::now(), keys.clone()));
            out.insert(user, keys);
        }
        Ok(out)
    }

    /// Asks `server`, and asks again each time a peer connects while it cannot be reached (a
    /// tab that has just started finds its peers through the relay within seconds), until
    /// `timeout_ms` have passed. A request still waiting for a way to the server (a look-up in
    /// the DHT) is asked again at once when the server itself connects.
    async fn ask_server(
        &self,
        server: ServerName,
        request: FedRequest,
        timeout_ms: u64,
    ) -> Result<FedResponse, String> {
        let deadline = Instant::now() + std::time::Duration::from_millis(timeout_ms);
        let mut connected = self.node.connected_peer_events();
        let peer = server.peer_id();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let asked = Box::pin(self.node.request(peer, request.clone()));
            let mut came = self.node.connected_peer_events();
            let server_came = Box::pin(async move {
                loop {
                    match came.recv().await {
                        Ok(p) if p == peer => return,
                        Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                        // No more news of connections: only the request can end this.
                        Err(_) => futures::future::pending::<()>().await,
                    }
                }
            });
            let answer = match rt::timeout(left, futures::future::select(asked, server_came)).await
            {
                None => return Err("the user's server did not answer in time".into()),
                Some(futures::future::Either::Left((answer, _))) => answer,
                // The server connected while the request waited: ask it directly now.
                Some(futures::future::Either::Right(_)) => continue,
            };
            match answer {
                Ok(answer) => return Ok(answer),
                Err(crate::rooms::NodeError::Network(e)) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if rt::timeout(left, connected.recv()).await.is_none() {
                        return Err(format!("network: {e}"));
                    }
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    pub(super) async fn claim_keys(
        &self,
        req: &ApiRequest,
        _s: &Session,
    ) -> ApiResult<ApiResponse> {
        use ruma::api::client::keys::claim_keys::v3::Request;
        let r: Request = super::parse(req, &[])?;
        let timeout = r.timeout.map_or(REMOTE_TIMEOUT_MS, |t| {
            (t.as_millis() as u64).min(REMOTE_TIMEOUT_MS)
        });
        let me = self.node.server_name();
        let mut claimed = Map::new();
        let mut failures = Map::new();
        let mut remote: BTreeMap<ServerName, BTreeMap<OwnedUserId, BTreeMap<String, String>>> =
            BTreeMap::new();
        for (user, devices) in &r.one_time_keys {
            let wanted: BTreeMap<String, String> = devices
                .iter()
                .map(|(d, a)| (d.to_string(), a.to_string()))
                .collect();
            match ServerName::try_from(user.server_name()) {
                Ok(server) if server == me => {
                    let keys = self.claim_local(user, &wanted).await?;
                    if !keys.is_empty() {
                        claimed.insert(user.to_string(), Value::Object(keys));
                    }
                }
                Ok(server) => {
                    remote
                        .entry(server)
                        .or_default()
                        .insert(user.clone(), wanted);
                }
                Err(_) => {
                    failures.insert(user.server_name().to_string(), json!({}));
                }
            }
        }
        let asked = remote.into_iter().map(|(server, claims)| async move {
            let request = FedRequest::ClaimKeys {
                claims: claims.clone(),
            };
            let answer = self.ask_server(server, request, timeout).await;
            (server, claims, answer)
        });
        for (server, claims, answer) in futures::future::join_all(asked).await {
            let json = match answer {
                Ok(FedResponse::Keys { json }) => json,
                _ => {
                    failures.insert(server.to_string(), json!({"status": 503}));
                    continue;
                }
            };
            let answer: Value = serde_json::from_str(&json).unwrap_or_default();
            for (user, devices) in claims {
                let mut keys = Map::new();
                for (device, algorithm) in devices {
                    // Only what was asked for: one key of that algorithm for that device.
                    let Some(got) = answer["one_time_keys"][user.as_str()][&device].as_object()
                    else {
                        continue;
                    };
                    let mut got = got.iter().filter(|(id, k)| {
                        id.split(':').next() == Some(algorithm.as_str())
                            && k.to_string().len() <= MAX_KEY_BYTES
                    });
                    if let (Some((id, k)), None) = (got.next(), got.next()) {
                        keys.insert(device, json!({ id.clone(): k.clone() }));
                    }
                }
                if !keys.is_empty() {
                    claimed.insert(user.to_string(), Value::Object(keys));
                }
            }
        }
        ok(json!({ "one_time_keys": claimed, "failures": failures }))
    }

    /// One key per device of local `user`: a one-time key, else the fallback key.
    async fn claim_local(
        &self,
        user: &UserId,
        wanted: &BTreeMap<String, String>,
    ) -> ApiResult<Map<String, Value>> {
        let mut per_device = Map::new();
        for (device, algorithm) in wanted {
            let key = match self
                .data
                .claim_one_time_key(user, device, algorithm)
                .await?
            {
                Some(k) => Some(k),
                None => self.data.use_fallback_key(user, device, algorithm).await?,
            };
            if let Some((id, key)) = key {
                per_device.insert(device.clone(), json!({ id: key }));
            }
        }
        Ok(per_device)
    }

    /// `/keys/changes`: users whose devices changed between two sync tokens, among those who
    /// share a room with the caller, and those the caller stopped sharing any room with.
    pub(super) async fn key_changes(
        &self,
        req: &ApiRequest,
        s: &Session,
    ) -> ApiResult<ApiResponse> {
        let query = super::url_query(req.uri().query().unwrap_or(""));
        let token = |name: &str| {
            let t = query
                .get(name)
                .ok_or_else(|| ApiError::invalid_param(format!("`{name}` is required")))?;
            SyncToken::parse(t)
        };
        let (from, to) = (token("from")?, token("to")?);
        let (changed, left) = self.device_list_changes(s, from, to).await?;
        ok(json!({"changed": changed, "left": left}))
    }

    /// Device-list news for `s`'s user between two sync tokens: whose devices to fetch again
    /// (the user themself and anyone sharing a room with them whose devices changed, and anyone
    /// they newly share a room with) and whom to stop tracking.
    pub(super) async fn device_list_changes(
        &self,
        s: &Session,
        from: SyncToken,
        to: SyncToken,
    ) -> ApiResult<(Vec<OwnedUserId>, Vec<OwnedUserId>)> {
        let news = self
            .node
            .membership_device_changes(&s.user_id, from.events, to.events)
            .await?;
        let (mut changed, left) = (news.changed, news.left);
        // The rooms were just read for membership: who shares one comes with them.
        for user in self.data.device_changes(from.client, to.client).await? {
            if user == s.user_id || news.sharing.contains(&user) {
                changed.insert(user);
            }
        }
        let left = left.into_iter().filter(|u| !changed.contains(u)).collect();
        Ok((changed.into_iter().collect(), left))
    }

    /// `/keys/device_signing/upload`: the user's master, self-signing and user-signing keys.
    /// The first upload needs no more than the access token; replacing a master key needs the
    /// user's password (user-interactive auth).
    pub(super) async fn upload_cross_signing(
        &self,
        req: &ApiRequest,
        s: &Session,
    ) -> ApiResult<ApiResponse> {
        let body = body_object(req)?;
        let user = s.user_id.as_str();
        let stored_master = self.data.cross_signing_key(&s.user_id, "master").await?;
        let master = body.get("master_key").or(stored_master.as_ref());
        if let Some(new_master) = body.get("master_key") {
            if !valid_cross_signing(new_master, user, "master") {
                return Err(ApiError::bad_json(
                    "master_key is not a master key of yours",
                ));
            }
            if stored_master.as_ref().is_some_and(|old| old != new_master) {
                let auth = match body.get("auth") {
                    Some(a) => Some(
                        serde_json::from_value(a.clone())
                            .map_err(|e| ApiError::bad_json(format!("auth: {e}")))?,
                    ),
                    None => None,
                };
                let purpose = super::UiaPurpose::CrossSigning {
                    user: s.user_id.clone(),
                };
                if let Some(challenge) = self.password_uia(auth, s, purpose).await? {
                    return Ok(challenge);
                }
            }
        }
        let Some(master) = master.cloned() else {
            return Err(ApiError::bad_json("upload a master key first"));
        };
        let mut changes = Vec::new();
        if let Some(k) = body.get("master_key") {
            changes.push(("master", k.clone()));
        }
        for (field, usage) in [
            ("self_signing_key", "self_signing"),
            ("user_signing_key", "user_signing"),
        ] {
            let Some(k) = body.get(field) else { continue };
            if !valid_cross_signing(k, user, usage) || !signed_by_master(k, &master, user) {
                return Err(ApiError::bad_json(format!(
                    "{field} must be yours and signed by your master key"
                )));
            }
            changes.push((usage, k.clone()));
        }
        for (usage, k) in &changes {
            self.data
                .put_cross_signing_key(&s.user_id, usage, k)
                .await?;
        }
        if !changes.is_empty() {
            self.devices_changed(&s.user_id).await?;
        }
        ok(json!({}))
    }

    /// `/keys/signatures/upload`: signatures of the user's own devices (by the self-signing
    /// key) and of the user's master key (by one of the user's devices), merged into the
    /// stored keys once they verify. Signatures of other users' keys are not kept yet.
    pub(super) async fn upload_signatures(
        &self,
        req: &ApiRequest,
        s: &Session,
    ) -> ApiResult<ApiResponse> {
        let body = body_object(req)?;
        let user = s.user_id.as_str();
        let mut failures = Map::new();
        let mut fail = |target: &str, key: &str, why: &str| {
            let entry = failures
                .entry(target.to_owned())
                .or_insert_with(|| json!({}));
            entry[key] = json!({"errcode": "M_INVALID_SIGNATURE", "error": why});
        };
        let mut changed = false;
        for (target, signed) in &body {
            let Some(signed) = signed.as_object() else {
                continue;
            };
            if target != user {
                // Another user's master key, signed by the caller's user-signing key (after
                // verifying them). Kept for the caller alone: nobody else is shown whom they
                // verified.
                let Ok(target_id) = OwnedUserId::try_from(target.as_str()) else {
                    for key in signed.keys() {
                        fail(target, key, "not a user id");
                    }
                    continue;
                };
                let usk = self
                    .data
                    .cross_signing_key(&s.user_id, "user_signing")
                    .await?;
                for (key_id, object) in signed {
                    let Some((usk_id, usk_pub)) = usk.as_ref().and_then(cross_signing_public)
                    else {
                        fail(target, key_id, "no user-signing key to check it with");
                        continue;
                    };
                    let is_their_master = valid_cross_signing(object, target, "master")
                        && cross_signing_public(object)
                            .is_some_and(|(id, _)| id == format!("ed25519:{key_id}"));
                    if !is_their_master || !signed_by(object, user, &usk_id, &usk_pub) {
                        fail(
                            target,
                            key_id,
                            "not their master key, or not signed by your user-signing key",
                        );
                        continue;
                    }
                    let record = json!({
                        "key": without(object, &["signatures", "unsigned"]),
                        "key_id": usk_id,
                        "signature": object["signatures"][user][&usk_id],
                    });
                    self.data
                        .put_user_signature(&s.user_id, &target_id, &record)
                        .await?;
                    // The caller's clients fetch the target's keys again and see the signature.
                    self.data.note_device_change(&target_id).await?;
                    self.node.changed();
                }
                continue;
            }
            let devices: HashMap<String, Value> = self
                .data
                .device_keys(&s.user_id)
                .await?
                .into_iter()
                .collect();
            let master = self.data.cross_signing_key(&s.user_id, "master").await?;
            let ssk = self
                .data
                .cross_signing_key(&s.user_id, "self_signing")
                .await?;
            for (key_id, object) in signed {
                let new_sigs = object["signatures"][user]
                    .as_object()
                    .cloned()
                    .unwrap_or_default();
                if let Some(stored) = devices.get(key_id) {
                    // A device, signed by the self-signing key.
                    let Some((ssk_id, ssk_pub)) = ssk.as_ref().and_then(cross_signing_public)
                    else {
                        fail(target, key_id, "no self-signing key to check it with");
                        continue;
                    };
                    let same_keys = without(object, &["unsigned", "signatures"])
                        == without(stored, &["unsigned", "signatures"]);
                    if !same_keys || !signed_by(object, user, &ssk_id, &ssk_pub) {
                        fail(
                            target,
                            key_id,
                            "not the device's keys, or not signed by your self-signing key",
                        );
                        continue;
                    }
                    let mut merged = stored.clone();
                    merged["signatures"][user][&ssk_id] = new_sigs[&ssk_id].clone();
                    self.data
                        .put_device_keys(&s.user_id, key_id, &merged)
                        .await?;
                    changed = true;
                } else if let Some(master) = master.as_ref().filter(|m| {
                    cross_signing_public(m).is_some_and(|(id, _)| id == format!("ed25519:{key_id}"))
                }) {
                    // The master key, signed by one of the user's devices.
                    let by_device = new_sigs.keys().find_map(|sig_id| {
                        let device = sig_id.strip_prefix("ed25519:")?;
                        let public = devices.get(device)?["keys"][sig_id].as_str()?.to_owned();
                        signed_by(object, user, sig_id, &public).then(|| sig_id.clone())
                    });
                    let same_key =
                        without(object, &["signatures"]) == without(master, &["signatures"]);
                    match by_device {
                        Some(sig_id) if same_key => {
                            let mut merged = master.clone();
                            merged["signatures"][user][&sig_id] = new_sigs[&sig_id].clone();
                            self.data
                                .put_cross_signing_key(&s.user_id, "master", &merged)
                                .await?;
                            changed = true;
                        }
                        _ => fail(
                            target,
                            key_id,
                            "not your master key, or not signed by your device",
                        ),
                    }
                } else {
                    fail(target, key_id, "no such key");
                }
            }
        }
        if changed {
            self.devices_changed(&s.user_id).await?;
        }
        ok(json!({ "failures": failures }))
    }

    // ---- what peers ask of this server's users' devices ------------------------------------

    /// Answers one device request the room service let through.
    pub(super) async fn answer_device_request(&self, request: DeviceRequest) {
        let DeviceRequest { asker, ask, reply } = request;
        let answer = match self.device_answer(&asker, ask).await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(server = %asker, error = %e.message, "device request failed");
                FedResponse::error(crate::net::protocol::FedErrorCode::Internal, e.message)
            }
        };
        let _ = reply.send(answer);
    }

    async fn device_answer(&self, asker: &ServerName, ask: DeviceAsk) -> ApiResult<FedResponse> {
        Ok(match ask {
            DeviceAsk::QueryKeys { user_ids } => {
                let mut answer = Map::new();
                for user in user_ids {
                    self.local_keys(&user, &[], false, &mut answer).await?;
                }
                FedResponse::Keys {
                    json: Value::Object(answer).to_string(),
                }
            }
            DeviceAsk::ClaimKeys { claims } => {
                let mut claimed = Map::new();
                for (user, wanted) in claims {
                    let keys = self.claim_local(&user, &wanted).await?;
                    claimed.insert(user.to_string(), Value::Object(keys));
                }
                FedResponse::Keys {
                    json: json!({ "one_time_keys": claimed }).to_string(),
                }
            }
            DeviceAsk::ToDevice {
                seq,
                sender,
                kind,
                messages,
            } => {
                self.take_remote_to_device(asker, seq, &sender, &kind, messages)
                    .await?;
                FedResponse::Ok
            }
            DeviceAsk::DeviceListChanged { user_id } => {
                self.remote_keys
                    .lock()
                    .expect("remote keys")
                    .users
                    .remove(&user_id);
                self.data.note_device_change(&user_id).await?;
                self.node.changed();
                FedResponse::Ok
            }
        })
    }
}

/// The keys of `user` in a server's `/keys/query`-shaped answer that pass the checks: devices
/// signed by themselves for that user, a master key of that user, and a self-signing key
/// signed by it. Anything else is dropped and logged.
fn checked_remote_keys(answer: &Value, user: &UserId) -> Value {
    let u = user.as_str();
    let mut devices = Map::new();
    for (device, keys) in answer["device_keys"][u].as_object().into_iter().flatten() {
        if valid_device_keys(keys, u, device) {
            devices.insert(device.clone(), keys.clone());
        } else {
            tracing::warn!(%user, device, "remote device keys with a bad signature dropped");
        }
    }
    let mut out = json!({ "device_keys": devices });
    let master = &answer["master_keys"][u];
    if valid_cross_signing(master, u, "master") {
        out["master_keys"] = master.clone();
        let ssk = &answer["self_signing_keys"][u];
        if valid_cross_signing(ssk, u, "self_signing") && signed_by_master(ssk, master, u) {
            out["self_signing_keys"] = ssk.clone();
        } else if !ssk.is_null() {
            tracing::warn!(%user, "remote self-signing key not signed by the master key dropped");
        }
    } else if !master.is_null() {
        tracing::warn!(%user, "malformed remote master key dropped");
    }
    out
}

/// `v` without the top-level `fields`.
fn without(v: &Value, fields: &[&str]) -> Value {
    let mut v = v.clone();
    if let Some(o) = v.as_object_mut() {
        for f in fields {
            o.remove(*f);
        }
    }
    v
}

fn entry<'a>(answer: &'a mut Map<String, Value>, field: &str) -> &'a mut Map<String, Value> {
    let v = answer.entry(field.to_owned()).or_insert_with(|| json!({}));
    if !v.is_object() {
        *v = json!({});
    }
    v.as_object_mut().expect("an object")
}

/// Drops the cached keys of a server's users whenever its peer connects: a device-list change
/// it announced while the two were apart never arrived.
pub(super) async fn forget_keys_on_reconnect(
    api: std::sync::Weak<ClientApi>,
    connected: &mut tokio::sync::broadcast::Receiver<libp2p::PeerId>,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        let peer = connected.recv().await;
        let Some(api) = api.upgrade() else { return };
        let mut cache = api.remote_keys.lock().expect("remote keys");
        match peer {
            Ok(peer) => {
                let Some(server) = ServerName::from_peer_id(&peer) else {
                    continue;
                };
                cache.users.retain(|user, _| {
                    ServerName::try_from(user.server_name()).ok() != Some(server)
                });
            }
            // Missed some connections: forget them all.
            Err(RecvError::Lagged(_)) => cache.users.clear(),
            Err(RecvError::Closed) => return,
        }
    }
}

/// Runs the answers to peers' device requests, a few at a time.
pub(super) async fn serve_device_requests(
    api: std::sync::Weak<ClientApi>,
    requests: &mut tokio::sync::mpsc::Receiver<DeviceRequest>,
) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(8));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(request) = requests.recv().await else {
            return;
        };
        let Some(api) = api.upgrade() else { return };
        rt::spawn(async move {
            api.answer_device_request(request).await;
            drop(slot);
        });
    }
}
