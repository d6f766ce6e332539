//! Server-side key backup (`/room_keys/*`): versions with their algorithm and auth data, and
//! the encrypted session keys clients back up in them. The server cannot read the keys; it
//! keeps the best copy of each session (verified over unverified, then the lowest first
//! message index, then the fewest forwards), counts them, and moves the version's `etag` on
//! every change.

use http::Method;
use serde_json::{json, Map, Value};

use super::accounts::Session;
use super::error::{ApiError, ApiResult};
use super::{body_object, ok, url_query, ApiRequest, ApiResponse, ClientApi};

/// Session keys one request may back up.
const MAX_KEYS_PER_REQUEST: usize = 10_000;
/// Bytes of one backed-up session key.
const MAX_SESSION_BYTES: usize = 16 << 10;

fn no_backup() -> ApiError {
    ApiError::not_found("no current key backup")
}

/// Whether backed-up key `new` should replace `old` (the spec's order of preference).
fn better(new: &Value, old: &Value) -> bool {
    let verified = |v: &Value| v["is_verified"].as_bool().unwrap_or(false);
    if verified(new) != verified(old) {
        return verified(new);
    }
    let index = |v: &Value| v["first_message_index"].as_u64().unwrap_or(u64::MAX);
    if index(new) != index(old) {
        return index(new) < index(old);
    }
    let forwards = |v: &Value| v["forwarded_count"].as_u64().unwrap_or(u64::MAX);
    forwards(new) < forwards(old)
}

fn valid_session(data: &Value) -> bool {
    data.is_object()
        && data["first_message_index"].is_u64()
        && data["forwarded_count"].is_u64()
        && data["is_verified"].is_boolean()
        && data["session_data"].is_object()
        && data.to_string().len() <= MAX_SESSION_BYTES
}

impl ClientApi {
    /// Routes `/room_keys/...` (`rest` is the path after `room_keys`).
    pub(super) async fn room_keys(
        &self,
        req: &ApiRequest,
        s: &Session,
        rest: &[&str],
    ) -> ApiResult<ApiResponse> {
        let m = req.method();
        match (m, rest) {
            (&Method::POST, ["version"]) => self.create_backup_version(req, s).await,
            (&Method::GET, ["version"]) => self.get_backup_version(s, None).await,
            (&Method::GET, ["version", v]) => self.get_backup_version(s, Some(v)).await,
            (&Method::PUT, ["version", v]) => self.update_backup_version(req, s, v).await,
            (&Method::DELETE, ["version", v]) => {
                let (version, record) = self
                    .data
                    .backup_version(&s.user_id, Some(v))
                    .await?
                    .ok_or_else(no_backup)?;
                self.data
                    .delete_backup(&s.user_id, &version, &record)
                    .await?;
                ok(json!({}))
            }
            (&Method::GET, ["keys", scope @ ..]) if scope.len() <= 2 => {
                self.get_backup_keys(req, s, scope).await
            }
            (&Method::PUT, ["keys", scope @ ..]) if scope.len() <= 2 => {
                self.put_backup_keys(req, s, scope).await
            }
            (&Method::DELETE, ["keys", scope @ ..]) if scope.len() <= 2 => {
                self.delete_backup_keys(req, s, scope).await
            }
            _ => Err(ApiError::unrecognized(http::StatusCode::NOT_FOUND)),
        }
    }

    async fn create_backup_version(&self, req: &ApiRequest, s: &Session) -> ApiResult<ApiResponse> {
        let body = body_object(req)?;
        let algorithm = body
            .get("algorithm")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::bad_json("`algorithm` is required"))?;
        let auth_data = body
            .get("auth_data")
            .filter(|a| a.is_object())
            .ok_or_else(|| ApiError::bad_json("`auth_data` must be an object"))?;
        if auth_data.to_string().len() > MAX_SESSION_BYTES {
            return Err(ApiError::new(
                http::StatusCode::BAD_REQUEST,
                "M_TOO_LARGE",
                "auth_data is too large",
            ));
        }
        let version = self
            .data
            .create_backup(&s.user_id, algorithm, auth_data)
            .await?;
        ok(json!({ "version": version }))
    }

    async fn get_backup_version(
        &self,
        s: &Session,
        version: Option<&str>,
    ) -> ApiResult<ApiResponse> {
        let (version, record) = self
            .data
            .backup_version(&s.user_id, version)
            .await?
            .ok_or_else(no_backup)?;
        let count = self
            .data
            .backup_keys(&s.user_id, &version, None, None)
            .await?
            .len();
        ok(json!({
            "algorithm": record["algorithm"],
            "auth_data": record["auth_data"],
            "count": count,
            "etag": record["etag"].to_string(),
            "version": version,
        }))
    }

    async fn update_backup_version(
        &self,
        req: &ApiRequest,
        s: &Session,
        version: &str,
    ) -> ApiResult<ApiResponse> {
        let body = body_object(req)?;
        let (version, mut record) = self
            .data
            .backup_version(&s.user_id, Some(version))
            .await?
            .ok_or_else(no_backup)?;
        if body.get("version").is_some_and(|v| v != version.as_str()) {
            return Err(ApiError::invalid_param(
                "the version in the body is another one",
            ));
        }
        if body.get("algorithm") != Some(&record["algorithm"]) {
            return Err(ApiError::invalid_param(
                "a backup's algorithm cannot change",
            ));
        }
        let auth_data = body
            .get("auth_data")
            .filter(|a| a.is_object())
            .ok_or_else(|| ApiError::bad_json("`auth_data` must be an object"))?;
        record["auth_data"] = auth_data.clone();
        self.data
            .put_backup_record(&s.user_id, &version, &record)
            .await?;
        ok(json!({}))
    }

    /// The current version named by `?version=`: keys go only into the current one.
    async fn current_backup(
        &self,
        req: &ApiRequest,
        s: &Session,
        writing: bool,
    ) -> ApiResult<(String, Value)> {
        let query = url_query(req.uri().query().unwrap_or(""));
        let asked = query
            .get("version")
            .ok_or_else(|| ApiError::invalid_param("`version` is required"))?;
        let current = self.data.backup_version(&s.user_id, None).await?;
        match current {
            Some((v, record)) if &v == asked => Ok((v, record)),
            Some((v, _)) if writing => Err(ApiError::new(
                http::StatusCode::FORBIDDEN,
                "M_WRONG_ROOM_KEYS_VERSION",
                format!("the current backup version is {v}"),
            )
            .with_field("current_version", json!(v))),
            _ => {
                // Reading an older version that still exists is allowed.
                self.data
                    .backup_version(&s.user_id, Some(asked))
                    .await?
                    .ok_or_else(no_backup)
            }
        }
    }

    async fn get_backup_keys(
        &self,
        req: &ApiRequest,
        s: &Session,
        scope: &[&str],
    ) -> ApiResult<ApiResponse> {
        let (version, _) = self.current_backup(req, s, false).await?;
        let keys = self
            .data
            .backup_keys(
                &s.user_id,
                &version,
                scope.first().copied(),
                scope.get(1).copied(),
            )
            .await?;
        match scope {
            [_, _] => match keys.into_iter().next() {
                Some((_, _, data)) => ok(data),
                None => Err(ApiError::not_found("no such session in the backup")),
            },
            [_] => {
                let sessions: Map<String, Value> =
                    keys.into_iter().map(|(_, sid, data)| (sid, data)).collect();
                ok(json!({ "sessions": sessions }))
            }
            _ => {
                let mut rooms = Map::new();
                for (room, sid, data) in keys {
                    let entry = rooms.entry(room).or_insert_with(|| json!({"sessions": {}}));
                    entry["sessions"][sid] = data;
                }
                ok(json!({ "rooms": rooms }))
            }
        }
    }

    async fn put_backup_keys(
        &self,
        req: &ApiRequest,
        s: &Session,
        scope: &[&str],
    ) -> ApiResult<ApiResponse> {
        let (version, mut record) = self.current_backup(req, s, true).await?;
        let body: Value =
            serde_json::from_slice(req.body()).map_err(|e| ApiError::not_json(e.to_string()))?;
        // Every shape comes down to (room, session, key data).
        let mut given: Vec<(String, String, Value)> = Vec::new();
        let sessions_of = |room: &str, sessions: &Value, given: &mut Vec<_>| -> ApiResult<()> {
            let sessions = sessions
                .as_object()
                .ok_or_else(|| ApiError::bad_json("`sessions` must be an object"))?;
            for (sid, data) in sessions {
                given.push((room.to_owned(), sid.clone(), data.clone()));
            }
            Ok(())
        };
        match scope {
            [room, session] => given.push(((*room).to_owned(), (*session).to_owned(), body)),
            [room] => sessions_of(room, &body["sessions"], &mut given)?,
            _ => {
                let rooms = body["rooms"]
                    .as_object()
                    .ok_or_else(|| ApiError::bad_json("`rooms` must be an object"))?;
                for (room, v) in rooms {
                    sessions_of(room, &v["sessions"], &mut given)?;
                }
            }
        }
        if given.len() > MAX_KEYS_PER_REQUEST {
            return Err(ApiError::new(
                http::StatusCode::BAD_REQUEST,
                "M_TOO_LARGE",
                format!("at most {MAX_KEYS_PER_REQUEST} keys per request"),
            ));
        }
        if let Some((room, sid, _)) = given.iter().find(|(_, _, d)| !valid_session(d)) {
            return Err(ApiError::bad_json(format!(
                "the key for session {sid} in {room} is not a backed-up key"
            )));
        }
        let existing: std::collections::HashMap<(String, String), Value> = self
            .data
            .backup_keys(&s.user_id, &version, None, None)
            .await?
            .into_iter()
            .map(|(r, sid, d)| ((r, sid), d))
            .collect();
        let mut count = existing.len();
        let mut kept = Vec::new();
        for (room, sid, data) in given {
            match existing.get(&(room.clone(), sid.clone())) {
                Some(old) if !better(&data, old) => {}
                Some(_) => kept.push((room, sid, data)),
                None => {
                    count += 1;
                    kept.push((room, sid, data));
                }
            }
        }
        if !kept.is_empty() {
            record["etag"] = json!(record["etag"].as_u64().unwrap_or(0) + 1);
            self.data
                .write_backup_keys(&s.user_id, &version, &record, kept, Vec::new())
                .await?;
        }
        ok(json!({"count": count, "etag": record["etag"].to_string()}))
    }

    async fn delete_backup_keys(
        &self,
        req: &ApiRequest,
        s: &Session,
        scope: &[&str],
    ) -> ApiResult<ApiResponse> {
        let (version, mut record) = self.current_backup(req, s, true).await?;
        let doomed: Vec<(String, String)> = self
            .data
            .backup_keys(
                &s.user_id,
                &version,
                scope.first().copied(),
                scope.get(1).copied(),
            )
            .await?
            .into_iter()
            .map(|(r, sid, _)| (r, sid))
            .collect();
        let before = self
            .data
            .backup_keys(&s.user_id, &version, None, None)
            .await?
            .len();
        if !doomed.is_empty() {
            record["etag"] = json!(record["etag"].as_u64().unwrap_or(0) + 1);
        }
        let count = before - doomed.len();
        self.data
            .write_backup_keys(&s.user_id, &version, &record, Vec::new(), doomed)
            .await?;
        ok(json!({"count": count, "etag": record["etag"].to_string()}))
    }
}
